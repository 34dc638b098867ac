"""CUDA-only behaviour (the parity grid in test_parity.py also runs on CUDA).
Skipped with a reason where no GPU is visible; run whenever one is lent."""

import copy

import pytest
import torch

import fastrnn

from conftest import CUDA, grads, rnn_pair, weighted_sum

pytestmark = CUDA


def test_cuda_matches_cpu_float64():
    _, fast = rnn_pair(5, 16, 2, bidirectional=True)
    fast = fast.double()
    x = torch.randn(9, 4, 5, dtype=torch.float64)
    cpu_out, cpu_h = fast(x)
    gpu = copy.deepcopy(fast).cuda()
    out, h = gpu(x.cuda())
    torch.testing.assert_close(out.cpu(), cpu_out, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(h.cpu(), cpu_h, rtol=1e-9, atol=1e-10)
    g_cpu = grads(fast, weighted_sum(cpu_out, cpu_h), [])
    g_gpu = grads(gpu, weighted_sum(out, h), [])
    for a, e in zip(g_gpu, g_cpu):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_error_within_twice_torch(dtype):
    ref, fast = rnn_pair(32, 64, 2)
    x = torch.randn(20, 8, 32)
    exact_out, exact_h = copy.deepcopy(ref).double()(x.double())
    errors = []
    for m in (ref, fast):
        out, h = copy.deepcopy(m).to("cuda", dtype)(x.to("cuda", dtype))
        assert out.dtype == dtype
        errors.append(max((out.double().cpu() - exact_out).abs().max(),
                          (h.double().cpu() - exact_h).abs().max()))
    assert errors[1] <= 2 * errors[0], errors


def test_deterministic_bits():
    _, fast = rnn_pair(8, 32, 2, bidirectional=True)
    fast = fast.cuda()
    x = torch.randn(12, 6, 8, device="cuda")
    runs = []
    for _ in range(2):
        out, h = fast(x)
        runs.append([out, h, *grads(fast, weighted_sum(out, h), [])])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_cuda_graph_capture_and_replay():
    _, fast = rnn_pair(8, 32, 2)
    fast = fast.cuda()
    static_x = torch.randn(10, 4, 8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fast(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_h = fast(static_x)
    new_x = torch.randn_like(static_x)
    static_x.copy_(new_x)
    graph.replay()
    out, h = fast(new_x)
    torch.testing.assert_close(static_out, out)
    torch.testing.assert_close(static_h, h)


def test_packed_uneven_lengths_cuda():
    ref, fast = rnn_pair(4, 16, 2, bidirectional=True)
    ref, fast = ref.cuda().double(), fast.cuda().double()
    x = torch.randn(9, 5, 4, device="cuda", dtype=torch.float64)
    lengths = torch.tensor([9, 2, 7, 1, 4])
    p = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    (o1, h1), (o2, h2) = fast(p), ref(p)
    torch.testing.assert_close(o1.data, o2.data, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(h1, h2, rtol=1e-9, atol=1e-10)


def test_runs_on_the_inputs_device_not_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    _, fast = rnn_pair(4, 8)
    fast = fast.to("cuda:1")
    x = torch.randn(3, 2, 4, device="cuda:1")
    with torch.cuda.device(0):
        out, _ = fast(x)
    assert out.device == x.device


@pytest.mark.parametrize("hidden", [1, 37, 128, 256, 1024], ids=lambda h: f"H{h}")
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_persistent_kernels_match_torch(monkeypatch, hidden, packed, nonlinearity):
    """The persistent kernels (opt-in, FASTRNN_CUDA_PERSISTENT=1) against torch.nn.RNN in
    float64; hidden 1024 does not fit on chip and takes the per-step path."""
    monkeypatch.setenv("FASTRNN_CUDA_PERSISTENT", "1")
    ref, fast = rnn_pair(5, hidden, 2, nonlinearity=nonlinearity, bidirectional=True)
    ref, fast = ref.cuda().double(), fast.cuda().double()
    x = torch.randn(11, 300, 5, device="cuda", dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 300, hidden, device="cuda", dtype=torch.float64, requires_grad=True)
    lengths = torch.randint(1, 12, (300,))
    lengths[7] = 11
    results = []
    for m in (ref, fast):
        inp = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        out, h = m(inp, h0)
        results.append([out.data if packed else out, h, *grads(m, weighted_sum(out, h), [x, h0])])
    for a, e in zip(results[1], results[0]):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)
