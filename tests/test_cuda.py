"""CUDA-only behaviour (the parity grids of test_module.py, the reference grids of
test_ops.py and the dropout-mask consistency test also run on CUDA through
conftest.devices(), LSTM and GRU included). Skipped with a reason where no GPU is visible; run whenever one
is lent."""

import copy

import pytest
import torch

import fastrnn

from conftest import (CUDA, Case, OpCalls, case_id, flat, grads, module_inputs, op_inputs,
                      rnn_pair, run_module, twins, weighted_sum)

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


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("steps, batch", [(1, 1), (5, 51), (8, 32), (257, 1), (11, 100)],
                         ids=lambda v: str(v))
def test_bias_gradients_over_row_chunks(cell, steps, batch):
    """The bias gradients are column sums of the steps' rows, summed by chunks of 256 rows
    on the GPU: 1, 255, 256, 257 and 1100 rows, in a bidirectional layer (each direction's
    columns a strided view), against the CPU in float64, and the same bits twice."""
    _, fast = rnn_pair(3, 9, 1, bidirectional=True, cell=cell)
    fast = fast.double()
    gpu = copy.deepcopy(fast).cuda()
    x = torch.randn(steps, batch, 3, dtype=torch.float64)
    results = []
    for module, device in ((fast, "cpu"), (gpu, "cuda"), (gpu, "cuda")):
        out, h = module(x.to(device))
        named = dict(zip([n for n, _ in module.named_parameters()],
                         grads(module, weighted_sum(out, h), [])))
        results.append({n: g.cpu() for n, g in named.items() if n.startswith("bias")})
    assert len(results[0]) == 4
    for n, e in results[0].items():
        torch.testing.assert_close(results[1][n], e, rtol=1e-9, atol=1e-10, msg=n)
        assert torch.equal(results[2][n], results[1][n]), n


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_half_precision_bias_gradients_within_twice_torch(cell, dtype):
    """The bias gradients of 1100 rows (five chunks, their sums kept in float32) in float16
    and bfloat16: off the float64 result by at most twice torch.nn's error, or by one unit
    of the dtype's precision at the gradients' scale."""
    ref, fast = rnn_pair(3, 9, 1, bidirectional=True, cell=cell)
    x = torch.randn(11, 100, 3)
    exact_module = copy.deepcopy(ref).double()
    exact = grads(exact_module, weighted_sum(*exact_module(x.double())), [])
    names = [n for n, _ in ref.named_parameters()]
    exact = [e for n, e in zip(names, exact) if n.startswith("bias")]
    errors = []
    for m in (ref, fast):
        m = copy.deepcopy(m).to("cuda", dtype)
        got = [g for n, g in zip(names, grads(m, weighted_sum(*m(x.to("cuda", dtype))), []))
               if n.startswith("bias")]
        assert all(g.dtype == dtype for g in got)
        errors.append(max(float((g.double().cpu() - e).abs().max()) for g, e in zip(got, exact)))
    scale = max(float(e.abs().max()) for e in exact)
    assert errors[1] <= max(2 * errors[0], torch.finfo(dtype).eps * scale), (errors, scale)


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


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("persistent", [False, True], ids=["per-step", "persistent"])
def test_packed_call_makes_no_host_sync_and_a_cuda_graph_replays_it(monkeypatch, cell, persistent):
    """A packed module call, forward and backward, waits on the GPU nowhere (torch's sync debug
    mode raises where a call would: a packed sequence's batch sizes reach the persistent kernels
    in their parameters, not by a copy), on either path; so a CUDA graph captures it, and its
    replays on new data match eager calls."""
    monkeypatch.setenv("FASTRNN_CUDA_PERSISTENT", "1" if persistent else "0")
    _, fast = rnn_pair(8, 32, 2, cell=cell, bidirectional=True)
    fast = fast.cuda()
    x = torch.randn(10, 4, 8, device="cuda")
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([10, 7, 7, 3]), enforce_sorted=False)
    static = packed.data.requires_grad_()
    params = list(fast.parameters())
    weights = None  # of each output in the loss, made on the device before any capture

    def call():
        nonlocal weights
        out, h = fast(packed._replace(data=static))
        outputs = [out.data, *flat(h)]
        weights = weights or [torch.randn_like(t) for t in outputs]
        loss = sum((t * w).sum() for t, w in zip(outputs, weights))
        return [*outputs, *torch.autograd.grad(loss, [static, *params])]

    names = cuda_kernels(call)
    assert any("fastrnn::persistent::" in n for n in names) == persistent, names
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda.set_sync_debug_mode("error")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            captured = call()
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        with torch.no_grad():
            static.copy_(torch.randn_like(static))
        graph.replay()
        for a, e in zip(captured, call()):
            torch.testing.assert_close(a, e)


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


@pytest.mark.parametrize("hidden", [1, 37, 128, 256, 300, 1024], ids=lambda h: f"H{h}")
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_persistent_kernels_match_torch(monkeypatch, hidden, packed, nonlinearity):
    """The persistent kernels (FASTRNN_CUDA_PERSISTENT=1, the default) against torch.nn.RNN in
    float64, 300 rows in tiles, uneven lengths; W_hh in one CTA up to hidden 128, split over a
    cluster at 256 and 300 on sm_90 (test_persistent_path_by_hidden_size); 1024 does not fit
    on chip and takes the per-step path."""
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


def cuda_kernels(fn):
    """The names of the CUDA kernels that fn() launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("persistent", [False, True], ids=["per-step", "persistent"])
def test_a_layers_directions_run_at_once(monkeypatch, cell, persistent):
    """A bidirectional layer's directions run at the same time, forward and backward: fastrnn's
    kernels go to the current stream and a side stream (one of torch's pool, which need not be
    the same one in forward and backward); a unidirectional stack's to the current stream only.
    (Results: the parity tests, bidirectional ones included.)"""
    monkeypatch.setenv("FASTRNN_CUDA_PERSISTENT", "1" if persistent else "0")
    streams = {}
    for bidirectional in (False, True):
        _, fast = rnn_pair(8, 32, 2, cell=cell, bidirectional=bidirectional)
        fast = fast.cuda()
        x = torch.randn(10, 4, 8, device="cuda", requires_grad=True)

        def run():
            out, h = fast(x)
            grads(fast, weighted_sum(out, h), [x])

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        streams[bidirectional] = {e.device_resource_id for e in prof.events()
                                  if e.device_type == torch.autograd.DeviceType.CUDA and "fastrnn::" in e.name}
    assert len(streams[False]) == 1 and streams[False] < streams[True], streams


@pytest.mark.parametrize("hidden, dtype, path", [
    (100, torch.float32, "one CTA"), (256, torch.float32, "cluster"),
    (512, torch.float32, "cluster"), (300, torch.float64, "cluster"),
    (300, torch.bfloat16, "cluster"), (1200, torch.bfloat16, "cluster"), (1200, torch.float32, None),
    (944, torch.float32, "cluster"), (945, torch.float32, None), (1024, torch.float32, None)],
    ids=lambda v: str(v).replace("torch.", ""))
def test_persistent_path_by_hidden_size(monkeypatch, hidden, dtype, path):
    """A layer runs in csrc/cuda/persistent.cuh's kernels where its W_hh fits one CTA's shared
    memory, or slices of it a cluster's CTAs (sm_90), else with a GEMM per step; forward and
    backward alike, matching torch.nn.RNN in float64. bfloat16's W_hh takes half float32's
    room: hidden 1200 fits a cluster in it, not in float32. 944 and 945 are float32's limit as
    persistent::plan counts shared memory on an H100, in a cluster of 16 CTAs (a non-portable
    size, which an H100 launches): the device's own answer (the occupancy check) must agree. bfloat16's error (its gates and W_hh are rounded at every step) is held
    to at most twice cuDNN's own bfloat16 error."""
    monkeypatch.setenv("FASTRNN_CUDA_PERSISTENT", "1")
    if path == "cluster" and torch.cuda.get_device_capability()[0] < 9:
        path = None
    ref, fast = rnn_pair(8, hidden, 1, bidirectional=True)
    ref, fast = ref.cuda().to(dtype), fast.cuda().to(dtype)
    x = torch.randn(28, 64, 8, device="cuda", dtype=dtype, requires_grad=True)
    results = []

    def run():
        out, h = fast(x)
        results.append([out, h, *grads(fast, weighted_sum(out, h), [x])])

    names = cuda_kernels(run)
    for kernel in ("forward_kernel", "backward_kernel"):
        ran = any(f"fastrnn::persistent::{kernel}" in n for n in names)
        assert ran == (path is not None), (kernel, names)
    out, h = ref(x)
    cudnn = [out, h, *grads(ref, weighted_sum(out, h), [x])]
    exact = ref.double()
    x64 = x.detach().double().requires_grad_()
    out, h = exact(x64)
    expected = [out, h, *grads(exact, weighted_sum(out, h), [x64])]
    for a, e, c in zip(results[0], expected, cudnn):
        if dtype == torch.bfloat16:
            errors = [float((t.double() - e).abs().max()) for t in (a, c)]
            assert errors[0] <= 2 * errors[1] + 1e-3 * float(e.abs().max()), errors
        else:
            tol = 1e-10 if dtype == torch.float64 else 1e-4
            torch.testing.assert_close(a.double(), e, rtol=tol, atol=tol)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("hidden, cluster", [(37, False), (128, True), (160, True)],
                         ids=["H37-one-CTA", "H128-cluster", "H160-cluster"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_persistent_cells_match_torch(monkeypatch, cell, hidden, cluster, packed):
    """The LSTM's and GRU's persistent kernels (csrc/cuda/persistent.cuh, the default) against
    torch.nn in float64: two layers both ways, 300 rows, uneven lengths, a random initial state.
    W_hh fits one CTA at hidden 37; at 128 and 160 it is split over a cluster (sm_90; elsewhere
    the per-step path runs). Asserts which kernels ran."""
    monkeypatch.setenv("FASTRNN_CUDA_PERSISTENT", "1")
    persistent = not cluster or torch.cuda.get_device_capability()[0] >= 9
    ref, fast = rnn_pair(5, hidden, 2, cell=cell, bidirectional=True)
    ref, fast = ref.cuda().double(), fast.cuda().double()
    kw = dict(device="cuda", dtype=torch.float64, requires_grad=True)
    x, h0, c0 = torch.randn(11, 300, 5, **kw), torch.randn(4, 300, hidden, **kw), torch.randn(4, 300, hidden, **kw)
    state, extra = ((h0, c0), [x, h0, c0]) if cell == "lstm" else (h0, [x, h0])
    lengths = torch.randint(1, 12, (300,))
    lengths[7] = 11
    results = []

    def run(m):
        inp = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        out, h = m(inp, state)
        results.append([out.data if packed else out, *flat(h), *grads(m, weighted_sum(out, h), extra)])

    names = cuda_kernels(lambda: run(fast))
    for kernel in (f"{cell}_forward_kernel", f"{cell}_backward_kernel"):
        assert any(f"fastrnn::persistent::{kernel}" in n for n in names) == persistent, (kernel, names)
    run(ref)
    for a, e in zip(results[0], results[1]):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


def test_persistent_lstm_float32_at_the_notebook_shape(monkeypatch):
    """The MNIST notebook's LSTM (2 x 128, batch 64, 28 steps) on the persistent kernels in
    float32, against torch.nn.LSTM in float64."""
    monkeypatch.setenv("FASTRNN_CUDA_PERSISTENT", "1")
    ref, fast = rnn_pair(28, 128, 2, cell="lstm", batch_first=True)
    fast = fast.cuda()
    exact = ref.cuda().double()
    x = torch.randn(64, 28, 28, device="cuda")
    out, (h, c) = fast(x)
    got = [out, h, c, *grads(fast, weighted_sum(out, (h, c)), [])]
    out, (h, c) = exact(x.double())
    expected = [out, h, c, *grads(exact, weighted_sum(out, (h, c)), [])]
    for a, e in zip(got, expected):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5)


def test_cuda_device_errors_name_the_argument():
    """The device kernel's own checks (csrc/checks.h): a CPU tensor among CUDA tensors,
    and batch_sizes on the GPU."""
    args = op_inputs(Case(num_layers=2, bidirectional=True, packed=True, device="cuda"))
    raw = list(args.raw())
    weights = list(raw[2])
    weights[5] = weights[5].cpu()
    with pytest.raises(RuntimeError, match="^fastrnn::rnn: weight_hh_l0_reverse must be on the "
                                           "same device as input"):
        torch.ops.fastrnn.rnn(raw[0], raw[1], weights, *raw[3:])
    with pytest.raises(RuntimeError, match="^fastrnn::rnn: hx must be on the same device as input"):
        torch.ops.fastrnn.rnn(raw[0], raw[1].cpu(), *raw[2:])
    with pytest.raises(RuntimeError, match="^fastrnn::rnn: batch_sizes must be a 1-D int64 CPU tensor"):
        torch.ops.fastrnn.rnn(*raw[:9], raw[9].cuda())


def test_cuda_dropout_repeatable_and_one_call_each():
    """Dropout masks on the GPU come from the CUDA generator: torch.manual_seed repeats a
    training step bitwise; one op call each way."""
    case = Case(num_layers=3, bidirectional=True, dropout=0.5, packed=True, h0=True,
                device="cuda")
    _, fast = twins(case)
    x, h0, lengths = module_inputs(case)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        with OpCalls() as calls:
            runs.append(run_module(fast, case, x, h0, lengths))
        assert calls.names() == ["rnn", "rnn_backward"]
    (o0, h0_, g0), (o1, h1, g1), (o2, _, _) = runs
    assert torch.equal(o0.data, o1.data) and torch.equal(h0_, h1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert not torch.equal(o0.data, o2.data)


def test_autocast_cuda_like_torch():
    """On CUDA torch.nn.RNN's cuDNN op runs in float16 under autocast, whatever its dtype
    (aten/src/ATen/cudnn/AutocastRNN.cpp): fastrnn's output and h_n come out the same."""
    ref, fast = rnn_pair(8, 16, 2, bidirectional=True)
    ref, fast = ref.cuda(), fast.cuda()
    x = torch.randn(6, 3, 8, device="cuda")
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cuda", dtype=dtype):
            (o1, h1), (o2, h2) = ref(x), fast(x)
        assert (o2.dtype, h2.dtype) == (o1.dtype, h1.dtype) == (torch.float16, torch.float16)
        torch.testing.assert_close(o2.float(), o1.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("case", [
    Case(num_layers=2, bidirectional=True, dtype=torch.float32, device="cuda"),
    Case(num_layers=3, packed=True, nonlinearity="relu", dtype=torch.float32, device="cuda"),
], ids=case_id)
def test_compile_on_cuda(case):
    """torch.compile(fullgraph=True) of the module on the GPU, inductor."""
    torch._dynamo.reset()
    _, rnn = twins(case)
    compiled = torch.compile(rnn, fullgraph=True)
    x, h0, lengths = module_inputs(case)
    (o1, h1, g1), (o2, h2, g2) = (run_module(m, case, x, h0, lengths) for m in (rnn, compiled))
    o1, o2 = (o1.data, o2.data) if case.packed else (o1, o2)
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(h2, h1)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------
# LSTM and GRU
# ---------------------------------------------------------------------------------------

CELL_CUDA = [("lstm", {}), ("lstm", dict(proj_size=7)), ("gru", {})]
CELL_CUDA_IDS = ["lstm", "lstm-proj", "gru"]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cell, kwargs", CELL_CUDA, ids=CELL_CUDA_IDS)
def test_cell_cuda_matches_cpu_float64(cell, kwargs, packed):
    """fastrnn.LSTM / GRU on CUDA against the same module on the CPU in float64: output,
    h_n, c_n and every gradient (h0 and c0 included)."""
    _, fast = rnn_pair(5, 16, 2, bidirectional=True, cell=cell, **kwargs)
    fast = fast.double()
    gpu = copy.deepcopy(fast).cuda()
    x = torch.randn(9, 4, 5, dtype=torch.float64)
    R = kwargs.get("proj_size", 16)
    h0 = [torch.randn(4, 4, R, dtype=torch.float64)]
    if cell == "lstm":
        h0.append(torch.randn(4, 4, 16, dtype=torch.float64))
    lengths = torch.tensor([9, 3, 7, 1])
    results = []
    for module, device in ((fast, "cpu"), (gpu, "cuda")):
        xs = x.to(device).requires_grad_()
        hs = [h.to(device).requires_grad_() for h in h0]
        inp = torch.nn.utils.rnn.pack_padded_sequence(xs, lengths, enforce_sorted=False) if packed else xs
        out, h = module(inp, tuple(hs) if cell == "lstm" else hs[0])
        out = out.data if packed else out
        hs_out = list(h) if cell == "lstm" else [h]
        results.append([t.cpu() for t in [out, *hs_out, *grads(module, weighted_sum(out, h), [xs, *hs])]])
    for a, e in zip(results[1], results[0]):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cell, kwargs", CELL_CUDA, ids=CELL_CUDA_IDS)
def test_cell_matches_cudnn_float32(cell, kwargs, packed):
    """Against torch.nn.LSTM / GRU on CUDA (cuDNN) in float32 with TF32 off: output,
    states and parameter gradients within float32 tolerances."""
    ref, fast = rnn_pair(8, 32, 2, bidirectional=True, cell=cell, **kwargs)
    ref, fast = ref.cuda(), fast.cuda()
    x = torch.randn(12, 6, 8, device="cuda")
    lengths = torch.tensor([12, 11, 7, 7, 2, 1])
    results = []
    assert torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for m in (ref, fast):
            inp = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
            out, h = m(inp)
            out = out.data if packed else out
            hs = list(h) if cell == "lstm" else [h]
            results.append([out, *hs, *grads(m, weighted_sum(out, h), [])])
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    for a, e in zip(results[1], results[0]):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("cell, kwargs", CELL_CUDA, ids=CELL_CUDA_IDS)
def test_cell_half_precision_error_within_twice_torch(cell, kwargs, dtype):
    ref, fast = rnn_pair(32, 64, 2, cell=cell, **kwargs)
    x = torch.randn(20, 8, 32)
    exact = copy.deepcopy(ref).double()(x.double())
    exact = [exact[0], *(exact[1] if cell == "lstm" else [exact[1]])]
    errors = []
    for m in (ref, fast):
        out, h = copy.deepcopy(m).to("cuda", dtype)(x.to("cuda", dtype))
        got = [out, *(h if cell == "lstm" else [h])]
        assert all(t.dtype == dtype for t in got)
        errors.append(max(float((a.double().cpu() - e).abs().max()) for a, e in zip(got, exact)))
    assert errors[1] <= 2 * errors[0], errors


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cell_cuda_dropout_repeatable_and_one_call_each(cell):
    case = Case(cell=cell, num_layers=3, bidirectional=True, dropout=0.5, packed=True, h0=True,
                device="cuda", proj_size=3 if cell == "lstm" else 0)
    _, fast = twins(case)
    x, h0, lengths = module_inputs(case)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        with OpCalls() as calls:
            out, h_n, g = run_module(fast, case, x, h0, lengths)
        assert calls.names() == [cell, cell + "_backward"]
        runs.append([out.data, *(h_n if cell == "lstm" else [h_n]), *g])
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][0], runs[2][0])


def test_cell_cuda_device_errors_name_the_argument():
    """cx and weight_hr on the CPU among CUDA tensors: the device kernel's own checks."""
    args = op_inputs(Case(cell="lstm", proj_size=2, num_layers=2, bidirectional=True,
                          packed=True, device="cuda"))
    raw = list(args.raw())
    with pytest.raises(RuntimeError, match="^fastrnn::lstm: cx must be on the same device as input"):
        torch.ops.fastrnn.lstm(raw[0], raw[1], raw[2].cpu(), *raw[3:])
    weights = list(raw[3])
    weights[4] = weights[4].cpu()
    with pytest.raises(RuntimeError, match="^fastrnn::lstm: weight_hr_l0 must be on the same "
                                           "device as input"):
        torch.ops.fastrnn.lstm(*raw[:3], weights, *raw[4:])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cell_autocast_cuda_like_torch(cell):
    """On CUDA torch.nn's cuDNN op runs in float16 under autocast, whatever its dtype: every
    output in float16, as fastrnn's."""
    ref, fast = rnn_pair(8, 16, 2, bidirectional=True, cell=cell)
    ref, fast = ref.cuda(), fast.cuda()
    x = torch.randn(6, 3, 8, device="cuda")
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cuda", dtype=dtype):
            want, got = ref(x), fast(x)
        want = [want[0], *(want[1] if cell == "lstm" else [want[1]])]
        got = [got[0], *(got[1] if cell == "lstm" else [got[1]])]
        assert [t.dtype for t in got] == [t.dtype for t in want] == [torch.float16] * len(got)
        for a, e in zip(got, want):
            torch.testing.assert_close(a.float(), e.float(), atol=3e-2, rtol=3e-2)
