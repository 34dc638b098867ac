"""The CPU fused recurrence (csrc/cpu/recurrence.h) against torch.nn.RNN, on shapes that reach
every path of the kernel: hidden sizes below, at and off the vector width and the panel width,
batches below and off the tile height, packed uneven lengths in both directions, relu and tanh,
float32 and float64 (the kernel takes float64 with relu; float64 tanh checks the fallback), T = 1,
one and two threads; and its claim that results do not depend on
the thread count or on how rows and columns are split among threads.

The other kernels of the binary (AVX2, baseline), both splits, and the input projection and
gradient products on the same tiles (csrc/cpu/linear.h, on by default only on AMD) are run on
this machine by re-running this file in child processes with FASTRNN_CPU_ISA /
FASTRNN_CPU_SPLIT / FASTRNN_CPU_LINEAR set."""

import itertools
import os
import subprocess
import sys

import pytest
import torch

import fastrnn
from conftest import assert_close_all, grads, lengths_for, pack, rnn_pair, weighted_sum

CHILD = os.environ.get("FASTRNN_CPU_RECURRENCE_CHILD") == "1"


@pytest.fixture
def threads(request):
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


# (hidden, batch, steps): H = 1; H below the vector width (16 floats, 8 doubles); H off the
# panel width (32 / 16); H spanning several panels; B = 1; B off the tile height (8 rows);
# B large enough for a row split; T = 1.
SHAPES = [
    (1, 1, 1),
    (1, 5, 4),
    (5, 3, 6),
    (16, 8, 3),
    (33, 9, 5),
    (47, 1, 7),
    (100, 19, 4),
    (128, 64, 3),
    (70, 40, 1),
]


def run(ref_or_fast, x, h0, packed_lengths):
    inp = pack(x, packed_lengths, batch_first=False) if packed_lengths is not None else x
    out, h_n = ref_or_fast(inp, h0)
    loss = weighted_sum(out, h_n)
    data = out.data if packed_lengths is not None else out
    return [data, h_n, *grads(ref_or_fast, loss, [x, h0])]


def compare(hidden, batch, steps, nonlinearity, dtype, bidirectional=False, layers=1,
            packed=False, input_size=7):
    ref, fast = rnn_pair(input_size, hidden, num_layers=layers, nonlinearity=nonlinearity,
                         bidirectional=bidirectional, seed=hidden * 31 + batch)
    ref, fast = ref.to(dtype), fast.to(dtype)
    g = torch.Generator().manual_seed(steps)
    x = torch.randn(steps, batch, input_size, generator=g, dtype=dtype).requires_grad_()
    dirs = 2 if bidirectional else 1
    h0 = torch.randn(layers * dirs, batch, hidden, generator=g, dtype=dtype).requires_grad_()
    lengths = lengths_for(batch, steps, seed=batch) if packed else None
    expected = run(ref, x, h0, lengths)
    actual = run(fast, x, h0, lengths)
    assert_close_all(actual, expected, dtype, f"H={hidden} B={batch} T={steps}")
    return actual


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}-B{}-T{}".format(*s))
def test_padded_matches_torch(shape, nonlinearity, dtype, threads):
    compare(*shape, nonlinearity, dtype)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("shape", [(33, 9, 6), (5, 12, 5), (100, 21, 8), (1, 4, 3)],
                         ids=lambda s: "H{}-B{}-T{}".format(*s))
def test_packed_uneven_lengths_match_torch(shape, bidirectional, nonlinearity, dtype, threads):
    # The reverse direction of a packed batch starts sequences from h0 at later visited
    # steps; the forward direction ends them early (dh_n enters mid-sequence).
    compare(*shape, nonlinearity, dtype, bidirectional=bidirectional, layers=2, packed=True)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_stacked_bidirectional_matches_torch(nonlinearity, threads):
    compare(40, 10, 6, nonlinearity, torch.float32, bidirectional=True, layers=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_same_bits_for_any_thread_count(packed, nonlinearity, dtype):
    """Each output element is one accumulator over k in order, so 1 and 2 threads (and row or
    column splits, in the child runs) give the same bits."""
    if dtype == torch.float64 and nonlinearity == "tanh":
        pytest.skip("float64 tanh runs the per-step BLAS path (recurrence.h: supports)")
    saved = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(compare(100, 37, 6, nonlinearity, dtype, bidirectional=True,
                                   layers=2, packed=packed))
    finally:
        torch.set_num_threads(saved)
    for a, b in zip(*results):
        assert torch.equal(a, b), "results differ between 1 and 2 threads"


def test_wide_hidden_matches_torch():
    # W_hh past a core's L2 share: the grid prefers splitting columns.
    compare(600, 16, 3, "tanh", torch.float32)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_long_sequence_matches_torch(nonlinearity, packed):
    # T * B past linear.h's chunk of k (1024): dW_ih and dW_hh add up several chunks. In
    # float64: float32 sums of 1440 rows are beyond the float32 tolerance, whoever sums them.
    compare(40, 48, 30, nonlinearity, torch.float64, layers=2, packed=packed)


def test_nonfinite_values_propagate_like_torch():
    ref, fast = rnn_pair(3, 20, nonlinearity="relu")
    x = torch.randn(4, 5, 3)
    x[1, 2, 0] = float("nan")
    x[2, 0, 1] = float("inf")
    (out_r, h_r), (out_f, h_f) = ref(x), fast(x)
    torch.testing.assert_close(out_f, out_r, equal_nan=True)
    torch.testing.assert_close(h_f, h_r, equal_nan=True)


# Each other kernel once, each forced split at least once, and the products around the
# recurrence (linear.h) on our kernels and on BLAS whatever the CPU's vendor.
CHILD_ENVS = [
    dict(FASTRNN_CPU_SPLIT="cols", FASTRNN_CPU_LINEAR="1"),
    dict(FASTRNN_CPU_ISA="avx2", FASTRNN_CPU_SPLIT="rows", FASTRNN_CPU_LINEAR="1"),
    dict(FASTRNN_CPU_ISA="baseline", FASTRNN_CPU_SPLIT="cols", FASTRNN_CPU_LINEAR="0"),
]


@pytest.mark.skipif(CHILD, reason="runs in the parent only")
@pytest.mark.parametrize("env", CHILD_ENVS,
                         ids=lambda e: "-".join(f"{k[12:].lower()}={v}" for k, v in e.items()))
def test_other_kernels_and_splits(env):
    """This file again, with the kernel capped at another ISA or the grid forced to split
    rows or columns (where the shape allows). A cap above what the CPU runs changes nothing,
    so this is correct, if redundant, on any machine."""
    child_env = dict(os.environ, FASTRNN_CPU_RECURRENCE_CHILD="1", **env)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(fastrnn.__file__)))
    child_env["PYTHONPATH"] = os.pathsep.join([pkg_root, child_env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
         "-k", "not wide_hidden and not nonfinite"],
        env=child_env, capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(os.path.abspath(__file__)))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_fused_kernel_is_in_use(monkeypatch):
    """The per-step BLAS path (FASTRNN_CPU_FUSED=0) sums in another order: if no bit differed,
    the kernel would not be running and every test above would test the fallback."""
    results = []
    for fused in ("1", "0"):
        monkeypatch.setenv("FASTRNN_CPU_FUSED", fused)
        results.append(compare(128, 64, 6, "tanh", torch.float32))
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(*results))
    assert not all(torch.equal(a, b) for a, b in zip(*results))
