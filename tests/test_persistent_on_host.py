"""The persistent CUDA kernels' own code (csrc/cuda/persistent.cuh), run on the CPU through
tests/persistent_on_host.cpp: each CUDA thread a fiber, taking turns in a fresh pseudo-random
order every round (reproducible interleavings), a barrier per cluster, a buffer per CTA's shared
memory. What a GPU is needed for (the cluster API, distributed shared memory,
the launch) is proven by tests/test_cuda.py; this proves the kernels' logic everywhere CI runs:
tiles of batch rows, each CTA's units, rows carried between steps or starting from the initial
state, packed and reversed sequences, the barriers' placement, the state and gradients handed
between CTAs. Each kernel against an autograd reference, in float64, a layer at a time."""

import ctypes
import itertools
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
THREADS, ROWS_PER_THREAD = 256, 4  # persistent.cuh's kThreads, kRows


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler to build tests/persistent_on_host.cpp")
    lib = tmp_path_factory.mktemp("persistent") / "libpersistent_on_host.so"
    subprocess.run([cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "tests" / "persistent_on_host.cpp"), "-o", str(lib)], check=True)
    return ctypes.CDLL(str(lib))


class Layer:
    """A layer's sequence: padded (B rows at every step) or packed (lengths sorted down,
    uneven), visited backwards when reverse; its launch shape."""

    def __init__(self, hidden, size, tile, reverse, packed, seed, steps=4, batch=7, lengths=None,
                 storage=torch.float64, arithmetic=torch.float64):
        self.T, self.B, self.H, self.reverse = steps, batch, hidden, reverse
        self.storage, self.arithmetic = storage, arithmetic  # the kernels' T and acc_t
        # tests/persistent_on_host.cpp's mode: double; float storage, double arithmetic; float
        self.mode = 0 if storage == torch.float64 else (1 if arithmetic == torch.float64 else 2)
        self.size, self.units = size, math.ceil(hidden / size)
        assert self.units <= THREADS
        self.tile = min(tile, THREADS // self.units * ROWS_PER_THREAD)
        self.g = torch.Generator().manual_seed(seed)
        if packed:
            if lengths is None:
                lengths = torch.randint(1, steps + 1, (batch,), generator=self.g).tolist()
                lengths[0] = steps
            assert len(lengths) == batch and max(lengths) == steps
            lengths = sorted(lengths, reverse=True)
            self.bs = [sum(n > t for n in lengths) for t in range(steps)]
            self.offs = [sum(self.bs[:t]) for t in range(steps)]
        else:
            self.bs = self.offs = None
        self.N = sum(self.bs) if packed else steps * batch

    def rand(self, *shape, scale=1.0):
        """float64 values that the storage type holds exactly."""
        return (torch.randn(*shape, generator=self.g, dtype=torch.float64) * scale).to(self.storage).double()

    def visit(self):
        """(row of each sequence b at step t) for t in the forward's order."""
        for t in (range(self.T - 1, -1, -1) if self.reverse else range(self.T)):
            n = self.bs[t] if self.bs else self.B
            base = self.offs[t] if self.bs else t * self.B
            yield [(b, base + b) for b in range(n)]

    def with_final(self, dY, d_n):
        """dY with d_n added on each sequence's last row: what the kernels take as dY."""
        last = {}
        for rows in self.visit():
            last.update(rows)
        d = dY.clone()
        d[[last[b] for b in range(self.B)]] += d_n
        return d

    def args(self, lib_call, *tensors):
        """Calls lib_call with the float64 tensors' pointers (as the storage type: what the
        kernels write comes back rounded to it) and the layer's batch sizes and shape."""
        bs = torch.tensor(self.bs, dtype=torch.int64) if self.bs else None
        ptr = lambda t: ctypes.c_void_p(t.data_ptr() if t is not None else 0)  # noqa: E731
        for t in tensors:
            assert t is None or (t.is_contiguous() and t.dtype == torch.float64)
        stored = [None if t is None else t.to(self.storage) for t in tensors]
        lib_call(*(ptr(t) for t in stored), ptr(bs), ctypes.c_int64(self.T),
                 ctypes.c_int64(self.B), self.H, self.units, self.tile, self.size,
                 ctypes.c_bool(self.reverse), self.mode)
        for t, s in zip(tensors, stored):
            if t is not None and s is not t and not torch.equal(t, s.double()):  # written
                t.copy_(s)

    def check(self, got, want, what):
        # float32 arithmetic: sums of up to 200 products of magnitude 1 round to about 1e-4 (a
        # missing or misplaced term is off by 0.1 or more)
        tol = [dict(rtol=1e-9, atol=1e-11), dict(rtol=2e-5, atol=2e-6), dict(rtol=1e-3, atol=2e-4)][self.mode]
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{what}: {m}")


def recur(layer, state, step):
    """Runs step(row, states of b) -> new states over the layer's visit; returns per row outputs."""
    states = [list(s) for s in zip(*state)]  # per sequence b
    outs = {}
    for rows in layer.visit():
        for b, row in rows:
            states[b] = step(row, states[b])
            outs[row] = states[b]
    return [torch.stack([outs[r][i] for r in range(layer.N)]) for i in range(len(state))], \
        [torch.stack([s[i] for s in states]) for i in range(len(state))]


def nan(*shape):
    """A buffer the kernels must write (NaN wherever they do not)."""
    return torch.full(shape, float("nan"), dtype=torch.float64)


CASES = [dict(hidden=h, size=s, tile=t, reverse=r, packed=p)
         for (h, s), t, r, p in itertools.product([(7, 1), (10, 4), (9, 2), (70, 8)], [3],
                                                  [False, True], [False, True])]
# A longer packed sequence whose batch sizes change in 11 runs (some of several steps), over
# three tiles of rows.
CASES += [dict(hidden=10, size=2, tile=5, reverse=r, packed=True, steps=30, batch=13,
               lengths=[30, 29, 27, 27, 20, 18, 15, 15, 9, 6, 3, 2, 1]) for r in (False, True)]
# W_hh's slice kept in a storage type narrower than the arithmetic's (as the half types are on
# a GPU): float32 storage, float64 arithmetic.
CASES += [dict(hidden=h, size=s, tile=3, reverse=r, packed=p, storage=torch.float32)
          for (h, s), r, p in [((9, 2), True, True), ((70, 8), False, False)]]
# Threads with several rows each (a hundred units leave two groups of threads): 2 rows, 3 (run
# as 4) and 4, in one CTA and over a cluster.
CASES += [dict(hidden=h, size=s, tile=t, reverse=r, packed=p)
          for h, s, t, r, p in [(100, 1, 4, False, True), (100, 1, 5, True, False),
                                (100, 1, 8, False, False), (200, 2, 3, True, True)]]
# A cluster of 16 CTAs (the largest, non-portable), the last two with no units of their own.
CASES += [dict(hidden=40, size=16, tile=3, reverse=False, packed=False)]
# float32 arithmetic, as on a GPU (4 k per vector load where float64 takes 2): lanes sharing a
# sum (9/2, 70/8: 8 lanes; 120/1 with one row per CTA: 2 lanes), 1, 2 and 4 rows per thread.
CASES += [dict(hidden=h, size=s, tile=t, reverse=r, packed=p, storage=torch.float32, arithmetic=torch.float32)
          for h, s, t, r, p in [(9, 2, 3, True, True), (70, 8, 3, False, False), (120, 1, 1, False, True),
                                (100, 1, 5, True, False), (200, 2, 3, False, True)]]
MAX_RUNS = 192  # persistent.cuh's kMaxRuns


def case_id(c):
    return (f"H{c['hidden']}-cluster{c['size']}-{'reverse' if c['reverse'] else 'forward'}-"
            f"{'packed' if c['packed'] else 'padded'}" + (f"-T{c['steps']}" if "steps" in c else "")
            + ("-float32" if c.get("storage") == torch.float32 else "")
            + ("-arithmetic-float32" if c.get("arithmetic") == torch.float32 else ""))


def runs(kernels, batch_sizes):
    bs = torch.tensor(batch_sizes, dtype=torch.int64)
    return kernels.count_runs(ctypes.c_void_p(bs.data_ptr()), ctypes.c_int64(len(batch_sizes)))


def test_batch_sizes_as_runs(kernels):
    """The kernels take a packed sequence's batch sizes in their parameters as runs of equal
    size: one per distinct size, up to MAX_RUNS (beyond, the layer steps with GEMMs)."""
    assert runs(kernels, [5, 5, 3, 3, 3, 1]) == 3
    assert runs(kernels, [4] * 10) == 1
    assert runs(kernels, list(range(MAX_RUNS, 0, -1))) == MAX_RUNS
    assert runs(kernels, list(range(MAX_RUNS + 1, 0, -1))) == -1
    assert runs(kernels, [9] * 300 + list(range(MAX_RUNS - 1, 0, -1))) == MAX_RUNS


@pytest.mark.parametrize("source", ["steps of a batch_first tensor", "strided rows", "a vector"])
def test_copy_steps(kernels, source):
    """cells.h's CopySteps, the copy of CUDA's Backend::copy (a backward's top gradient, the
    cells' saved gates, b_ih's gradient): every element in place, from a [T, B, W] source in any
    step and batch strides into [N, W] rows, and between 2-D and 1-D views."""
    T, B, W = 5, 3, 7
    g = torch.Generator().manual_seed(0)
    if source == "steps of a batch_first tensor":
        src = torch.randn(B, T, W + 2, dtype=torch.float64, generator=g).transpose(0, 1)[..., 1:W + 1]
        expected = src.reshape(T * B, W)
        dst = torch.full((T * B, W + 4), math.nan, dtype=torch.float64)[:, 2:W + 2]
        shape = (T * B, W, B, B * dst.stride(0), dst.stride(0), src.stride(0), src.stride(1))
    elif source == "strided rows":
        src = torch.randn(T, W + 3, dtype=torch.float64, generator=g)[:, :W]
        expected = src
        dst = torch.full((T, W + 1), math.nan, dtype=torch.float64)[:, 1:]
        shape = (T, W, 1, dst.stride(0), 0, src.stride(0), 0)
    else:
        src = torch.randn(W, dtype=torch.float64, generator=g)
        expected = src
        dst = torch.full((W,), math.nan, dtype=torch.float64)
        shape = (1, W, 1, 0, 0, 0, 0)
    kernels.copy_steps(ctypes.c_void_p(dst.data_ptr()), ctypes.c_void_p(src.data_ptr()),
                       *(ctypes.c_int64(v) for v in shape))
    assert torch.equal(dst.reshape(expected.shape), expected)
    # Nothing outside dst's own elements was written.
    storage = dst.as_strided((dst.untyped_storage().nbytes() // 8,), (1,), 0)
    outside = torch.ones_like(storage, dtype=torch.bool)
    outside.as_strided(dst.shape, dst.stride(), dst.storage_offset()).fill_(False)
    assert storage[outside].isnan().all()


@pytest.mark.parametrize("act", ["tanh", "relu"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_elman_kernels(kernels, case, act):
    elman_case(kernels, case, act)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_elman_kernels_at_the_most_runs(kernels, reverse):
    """MAX_RUNS sequences of lengths 1 .. MAX_RUNS: every step a run of its own."""
    case = dict(hidden=4, size=1, tile=100, reverse=reverse, packed=True, steps=MAX_RUNS, batch=MAX_RUNS,
                lengths=list(range(1, MAX_RUNS + 1)))
    assert runs(kernels, Layer(**case, seed=0).bs) == MAX_RUNS
    elman_case(kernels, case, "tanh")


def elman_case(kernels, case, act):
    L = Layer(**case, seed=1)
    H, f = L.H, (torch.tanh if act == "tanh" else torch.relu)
    P, hx, W = L.rand(L.N, H).requires_grad_(), L.rand(L.B, H).requires_grad_(), L.rand(H, H, scale=0.4)
    (out_ref,), (hn_ref,) = recur(L, [hx], lambda row, s: [f(P[row] + s[0] @ W.T)])
    out = P.detach().clone()
    L.args(lambda *a: kernels.elman_forward(*a, int(act == "relu")), out, hx.detach(), W)
    L.check(out, out_ref.detach(), "h")

    dY, dhn = L.rand(L.N, H), L.rand(L.B, H)
    ((out_ref * dY).sum() + (hn_ref * dhn).sum()).backward()
    dA, grad_hx = L.with_final(dY, dhn), nan(L.B, H)
    L.args(lambda *a: kernels.elman_backward(*a, int(act == "relu")), dA, out, grad_hx, W)
    L.check(dA, P.grad, "dA")
    L.check(grad_hx, hx.grad, "grad_hx")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_lstm_kernels(kernels, case):
    L = Layer(**case, seed=2)
    H = L.H
    P = L.rand(L.N, 4 * H).requires_grad_()
    h0, c0 = L.rand(L.B, H).requires_grad_(), L.rand(L.B, H).requires_grad_()
    W = L.rand(4 * H, H, scale=0.4)

    def step(row, s):
        i, f, g, o = (P[row] + s[0] @ W.T).chunk(4)
        c = torch.sigmoid(f) * s[1] + torch.sigmoid(i) * torch.tanh(g)
        return [torch.sigmoid(o) * torch.tanh(c), c]

    (out_ref, c_ref), (hn_ref, cn_ref) = recur(L, [h0, c0], step)
    gates = P.detach().clone()
    c, out = nan(L.N, H), nan(L.N, H)
    L.args(kernels.lstm_forward, gates, c, out, h0.detach(), c0.detach(), W)
    L.check(out, out_ref.detach(), "h")
    L.check(c, c_ref.detach(), "c")

    dY, dhn, dcn = L.rand(L.N, H), L.rand(L.B, H), L.rand(L.B, H)
    ((out_ref * dY).sum() + (hn_ref * dhn).sum() + (cn_ref * dcn).sum()).backward()
    dh, grad_hx, grad_cx = L.with_final(dY, dhn), nan(L.B, H), nan(L.B, H)
    L.args(kernels.lstm_backward, dh, gates, c, c0.detach(), dcn, grad_hx, grad_cx, W)
    L.check(gates, P.grad, "dA")
    L.check(grad_hx, h0.grad, "grad_hx")
    L.check(grad_cx, c0.grad, "grad_cx")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gru_kernels(kernels, case):
    L = Layer(**case, seed=3)
    H = L.H
    P, h0 = L.rand(L.N, 3 * H).requires_grad_(), L.rand(L.B, H).requires_grad_()
    W, b_hh = L.rand(3 * H, H, scale=0.4), L.rand(3 * H).requires_grad_()

    def step(row, s):
        (xr, xz, xn), (hr, hz, hn) = P[row].chunk(3), (s[0] @ W.T + b_hh).chunk(3)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return [(1 - z) * n + z * s[0]]

    (out_ref,), (hn_ref,) = recur(L, [h0], step)
    gates = P.detach().clone()
    hn, out = nan(L.N, H), nan(L.N, H)
    L.args(kernels.gru_forward, gates, hn, out, h0.detach(), W, b_hh.detach())
    L.check(out, out_ref.detach(), "h")

    dY, dhn = L.rand(L.N, H), L.rand(L.B, H)
    ((out_ref * dY).sum() + (hn_ref * dhn).sum()).backward()
    dh, grad_hx = L.with_final(dY, dhn), nan(L.B, H)
    L.args(kernels.gru_backward, dh, gates, hn, out, h0.detach(), grad_hx, W)
    # gates end as [dA_r, dA_z, dA_hn] and hn as dA_n: r and z's input-side gradients, n's,
    # and (summed over rows) the gradient of b_hh.
    L.check(gates[:, :2 * H], P.grad[:, :2 * H], "dA_r, dA_z")
    L.check(hn, P.grad[:, 2 * H:], "dA_n")
    L.check(gates.sum(0), b_hh.grad, "dA_hn (db_hh)")
    L.check(grad_hx, h0.grad, "grad_hx")


# ---- where layers run: persistent::plan ------------------------------------------------

H100 = dict(max_cluster=16, max_smem=227 * 1024, sms=132)  # sm_90: clusters up to 16, 227 KB a CTA
A100 = dict(max_cluster=1, max_smem=163 * 1024, sms=108)  # sm_80: no clusters, 163 KB
CELLS = {"rnn": 0, "lstm": 1, "gru": 2}


STORAGE = {"float32": 0, "float64": 1, "half": 2}  # half: bfloat16 and float16 (float arithmetic)


def plan(kernels, cell, hidden, batch=64, backward=False, dtype="float32", device=H100):
    out = (ctypes.c_int * 4)()
    kernels.plan_layer(CELLS[cell], ctypes.c_bool(backward), STORAGE[dtype], ctypes.c_int64(batch),
                       ctypes.c_int64(hidden), device["max_cluster"],
                       ctypes.c_int64(device["max_smem"]), ctypes.c_int64(device["sms"]), out)
    return dict(zip(("size", "units", "tile", "clusters"), out))


def lanes_of(p):
    """persistent.cuh's lanes(): the lanes that share a sum in a plan's CTAs."""
    lanes = 1
    while lanes < 8 and p["units"] * p["tile"] * lanes * 2 <= THREADS:
        lanes *= 2
    return lanes


def path(kernels, cell, hidden, **kw):
    """Where a layer's forward and backward run: "one CTA", "cluster", or None (a GEMM per step)."""
    sizes = {plan(kernels, cell, hidden, backward=b, **kw)["size"] for b in (False, True)}
    if 0 in sizes:
        return None
    return "one CTA" if sizes == {1} else "cluster"


@pytest.mark.parametrize("cell, hidden, batch, dtype, where", [
    # tests/test_cuda.py's expectations, on an H100
    ("rnn", 100, 64, "float32", "one CTA"), ("rnn", 256, 64, "float32", "cluster"),
    ("rnn", 512, 64, "float32", "cluster"), ("rnn", 300, 64, "float64", "cluster"),
    ("rnn", 1024, 64, "float32", None), ("rnn", 128, 300, "float64", "one CTA"),
    ("rnn", 300, 64, "half", "cluster"), ("rnn", 1200, 64, "half", "cluster"),
    ("rnn", 1200, 64, "float32", None), ("rnn", 944, 64, "float32", "cluster"), ("rnn", 945, 64, "float32", None),
    ("lstm", 37, 300, "float64", "one CTA"), ("lstm", 128, 300, "float64", "cluster"),
    ("lstm", 160, 300, "float64", "cluster"), ("gru", 37, 300, "float64", "one CTA"),
    ("gru", 128, 300, "float64", "cluster"), ("gru", 160, 300, "float64", "cluster"),
    ("lstm", 128, 64, "float32", "cluster"),  # the MNIST notebook's LSTM
], ids=lambda v: str(v))
def test_plan_where_test_cuda_expects(kernels, cell, hidden, batch, dtype, where):
    assert path(kernels, cell, hidden, batch=batch, dtype=dtype) == where


def largest(kernels, cell, dtype, start):
    h = start
    while path(kernels, cell, h + 1, dtype=dtype):
        h += 1
    return h


@pytest.mark.parametrize("cell, one_cta, cluster", [("rnn", 236, 944), ("lstm", 118, 456),
                                                    ("gru", 137, 528)])
def test_plan_limits_as_the_readme_says(kernels, cell, one_cta, cluster):
    """The largest float32 hidden size in one CTA and in a cluster on an H100 (the README
    rounds them: about 235 / 945, 120 / 455, 135 / 530); in float64 about 0.7 times, in the
    half types (W_hh's slice kept as they are, the rest in float) about 1.4 times."""
    assert path(kernels, cell, one_cta) == "one CTA" and path(kernels, cell, one_cta + 1) == "cluster"
    assert path(kernels, cell, cluster) == "cluster" and path(kernels, cell, cluster + 1) is None
    assert 0.66 < largest(kernels, cell, "float64", cluster // 2) / cluster < 0.74
    assert 1.35 < largest(kernels, cell, "half", cluster) / cluster < 1.45


@pytest.mark.parametrize("device", [H100, A100], ids=["H100", "A100"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_plan_fits(kernels, device, cell):
    """Every plan covers the batch and the hidden units, fits the shared memory (W_hh's slice
    in the storage type, the rest in the arithmetic's), gives every row a thread; clusters
    only where the device has them."""
    smem = {"rnn": (1, 0, 1), "lstm": (4, 1, 2), "gru": (3, 0, 1)}[cell]  # G, extra fwd / bwd
    sizes = {"float32": (4, 4), "float64": (8, 8), "half": (2, 4)}  # bytes of W's and the rest
    for (dtype, (w_bytes, acc_bytes)), hidden, batch, backward in itertools.product(
            sizes.items(), [1, 8, 100, 255, 400, 700, 900], [1, 7, 64, 300], [False, True]):
        p = plan(kernels, cell, hidden, batch=batch, backward=backward, device=device, dtype=dtype)
        if p["size"] == 0:
            continue
        assert p["size"] <= device["max_cluster"]
        assert p["units"] * p["size"] >= hidden > p["units"] * (p["size"] - 1)
        assert p["clusters"] * p["tile"] >= batch > (p["clusters"] - 1) * p["tile"]
        assert p["tile"] <= THREADS // p["units"] * ROWS_PER_THREAD
        G, width = smem[0], (hidden * (smem[0] if backward else 1))
        extra = smem[2] if backward else smem[1]
        lanes = lanes_of(p)  # and persistent.cuh's Slice: W's layout and the rows it multiplies
        vec, sums = 16 // acc_bytes, (1 if backward else G)
        blocks = math.ceil(math.ceil(width / vec) / lanes)
        blocks += lanes > 1 and blocks % 2 == 0
        stride = blocks * sums + (blocks * sums % 2 == 0)
        ld = ((lanes * blocks) | 1) * vec
        bytes_ = (16 + math.ceil(p["units"] * lanes * stride * vec * w_bytes / 16) * 16  # mbarriers, W
                  + acc_bytes * (2 * p["tile"] * ld + extra * p["tile"] * p["units"]))
        assert bytes_ <= device["max_smem"]


@pytest.mark.parametrize("cell", list(CELLS))
def test_products_load_without_bank_conflicts(kernels, cell):
    """A step's vector loads from shared memory (W's slice, in blocks of 16 or 8 bytes; the rows
    of h or dA, 16) give each bank one address per phase of the warp's load, as the kernels'
    own offsets place them, for the plans of an H100. The exceptions are two-way, in the phases
    that straddle two groups of threads: where units x lanes is not a multiple of the phase's
    threads (8 for 16-byte loads, 16 for 8-byte ones), for W; between rows, for h."""
    for dtype, hidden, batch, backward in itertools.product(
            ["float32", "half", "float64"], [37, 100, 120, 128, 200, 256, 300, 512, 600], [1, 7, 34, 64, 128, 300],
            [False, True]):
        p = plan(kernels, cell, hidden, batch=batch, backward=backward, dtype=dtype)
        if p["size"] == 0:
            continue
        ways = (ctypes.c_int * 2)()
        kernels.bank_conflicts(CELLS[cell], ctypes.c_bool(backward), STORAGE[dtype], hidden, p["units"], p["tile"],
                               p["size"], ways)
        lanes = lanes_of(p)
        phase = 16 if dtype == "half" else 8
        where = (dtype, hidden, batch, backward, p)
        assert ways[0] == 1 or (ways[0] == 2 and p["units"] * lanes % phase), where
        assert ways[1] <= 2, where
