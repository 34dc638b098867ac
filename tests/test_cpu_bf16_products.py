"""A bfloat16 call's products on bfloat16 pairs (csrc/cpu/bf16_pairs.h): on a CPU with
AVX512-BF16, the fused RNN, LSTM and GRU multiply x_t, h_{t-1} rounded to bfloat16 and W by
pairs into float32 sums, forward and (dA rounded) backward, and so do fastrnn's own products
around the recurrence (FASTRNN_CPU_LINEAR=1, pinned here; the default on AMD, and for bfloat16
calls on CPUs with AMX). The pairs are the default on AMD's CPUs and on CPUs with AMX-BF16,
where they run on AMX tiles (csrc/cpu/amx_tiles.h; FASTRNN_CPU_AMX=0 keeps them on vdpbf16ps);
FASTRNN_CPU_BF16_PRODUCTS=1, pinned here, takes them on any CPU with AVX512-BF16. Every check
runs with the tiles and without them.

Each case is checked against an emulation in float64 of exactly those roundings: h_{t-1}
rounded where the product reads it, dA rounded where dh_{t-1} = dA W_hh, dX = dA W_ih and
the weight gradients are formed, and what the backward reads of the layer's output (act',
dW_hh, the GRU's dz) as the bfloat16 output holds it. Sums in float32 against float64 now
and then move a result, or an operand that a later product rounds, across a bfloat16
rounding boundary, so the check is that almost every element is the emulation's, rounded,
and the others near it; the same call with float32 products (FASTRNN_CPU_BF16_PRODUCTS=0) is
not (in each case some result matches in only 21-58% of its elements)."""

import os

import pytest
import torch
from torch.nn.utils.rnn import pad_packed_sequence

import fastrnn
from conftest import flat, lengths_for, pack, child_pytest

BF = torch.bfloat16
MATCH = 0.95  # the share of elements that must be the emulation's, rounded


def _cpuinfo():
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def _bf16_dot():
    """Whether a bfloat16 call's products can run on pairs here: AVX512-BF16, and the kernels
    not capped below AVX-512 (FASTRNN_CPU_ISA)."""
    if os.environ.get("FASTRNN_CPU_ISA") in ("avx2", "baseline"):
        return False
    flags = _cpuinfo()
    return " avx512f" in flags and " avx512_bf16" in flags


def _tiles():
    """Whether the pairs can run on AMX tiles here (AMX-BF16; Linux asks for the tile state)."""
    return _bf16_dot() and " amx_bf16" in _cpuinfo() and " amx_tile" in _cpuinfo()


def _pairs_by_default():
    """Whether they do without FASTRNN_CPU_BF16_PRODUCTS: on AMD's CPUs, where they are faster
    than float32 products (csrc/cpu/bf16_pairs.h, bf16_pairs_pay), and where they run on AMX
    tiles (all but the shallowest products: csrc/cpu/amx_tiles.h, layout_fits)."""
    return _bf16_dot() and ("AuthenticAMD" in _cpuinfo() or _tiles())


needs_bf16_dot = pytest.mark.skipif(
    not _bf16_dot(), reason="no AVX512-BF16 here: bfloat16 calls run float32 products "
    "(test_pairs_only_where_the_cpu_has_them checks that)")


@pytest.fixture(params=["1", "0"], ids=["tiles", "vdpbf16ps"])
def tiles(request, monkeypatch):
    """The pairs on AMX tiles (FASTRNN_CPU_AMX=1, where the CPU has them) and on vdpbf16ps."""
    if request.param == "1" and not _tiles():
        pytest.skip("no AMX-BF16 here: the pairs run on vdpbf16ps (the other case)")
    monkeypatch.setenv("FASTRNN_CPU_AMX", request.param)
    return request.param == "1"


def _rb(t):
    return t.to(BF).double()


class _Product(torch.autograd.Function):
    """a W^T as every product of the call takes it (x_t W_ih^T, h_{t-1} W_hh^T): a rounded;
    backward da = bf16(dG) W, dW = bf16(dG)^T bf16(a)."""

    @staticmethod
    def forward(ctx, a, w):
        ab = _rb(a)
        ctx.save_for_backward(ab, w)
        return ab @ w.T

    @staticmethod
    def backward(ctx, g):
        ab, w = ctx.saved_tensors
        return _rb(g) @ w, _rb(g).T @ ab


class _Act(torch.autograd.Function):
    """tanh / relu whose backward reads the output as the bfloat16 output holds it."""

    @staticmethod
    def forward(ctx, pre, relu):
        y = torch.relu(pre) if relu else torch.tanh(pre)
        ctx.save_for_backward(_rb(y))
        ctx.relu = relu
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return (g * (y > 0) if ctx.relu else g * (1 - y * y)), None


class _Blend(torch.autograd.Function):
    """The GRU's (1 - z) n + z h, whose backward reads h as the bfloat16 output holds it."""

    @staticmethod
    def forward(ctx, z, n, h):
        ctx.save_for_backward(z, n, _rb(h))
        return (1 - z) * n + z * h

    @staticmethod
    def backward(ctx, g):
        z, n, hb = ctx.saved_tensors
        return g * (hb - n), g * (1 - z), g * z


def _step(cell, p, x, h, c, relu):
    w_ih, w_hh, b_ih, b_hh = p
    xw = _Product.apply(x, w_ih)
    if cell == "rnn":
        return _Act.apply(xw + b_ih + b_hh + _Product.apply(h, w_hh), relu), None
    if cell == "lstm":
        i, f, g, o = (xw + b_ih + b_hh + _Product.apply(h, w_hh)).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    xr, xz, xn = (xw + b_ih).chunk(3, 1)
    hr, hz, hn = (_Product.apply(h, w_hh) + b_hh).chunk(3, 1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    return _Blend.apply(z, torch.tanh(xn + r * hn), h), None


def _emulate(cell, params, x, h0, c0, lengths, relu):
    """One layer (both directions where params has two sets) in float64, the sequences of
    each length together over that length: output [T, B, D*H] (zero past each length),
    h_n, c_n."""
    T, B = x.shape[:2]
    D = len(params)
    H = h0.shape[-1]
    out = x.new_zeros(T, B, D * H)
    hn = x.new_zeros(D, B, H)
    cn = x.new_zeros(D, B, H)
    for d, p in enumerate(params):
        cols = torch.arange(d * H, (d + 1) * H)
        for L in lengths.unique().tolist():
            rows = (lengths == L).nonzero()[:, 0]
            h, c = h0[d, rows], (c0[d, rows] if c0 is not None else None)
            for t in (range(L - 1, -1, -1) if d else range(L)):
                h, c = _step(cell, p, x[t, rows], h, c, relu)
                out = out.index_put((torch.tensor([t]), rows[:, None], cols), h)
            hn = hn.index_put((torch.tensor([d]), rows), h)
            if c is not None:
                cn = cn.index_put((torch.tensor([d]), rows), c)
    return out, hn, (cn if c0 is not None else None)


def _case(cell, hidden, batch, steps, input_size, bidirectional, packed, zero_h0=False, seed=0):
    """A bfloat16 module and inputs: (run, emulate, mask), where run() and emulate() give
    fastrnn's results and the emulation's, each [output, h_n, (c_n), grad x, grad h0,
    (grad c0), grad of every parameter], and mask marks the output's steps. zero_h0: h0 is
    zero (its first product skipped)."""
    kind, _, nonlinearity = cell.partition("-")
    torch.manual_seed(seed)
    kwargs = dict(bidirectional=bidirectional)
    if kind == "rnn":
        kwargs["nonlinearity"] = nonlinearity or "tanh"
    module = {"rnn": fastrnn.RNN, "lstm": fastrnn.LSTM, "gru": fastrnn.GRU}[kind](
        input_size, hidden, **kwargs).to(BF)
    D = 2 if bidirectional else 1
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, input_size, generator=g).to(BF)
    h0 = torch.randn(D, batch, hidden, generator=g).to(BF)
    if zero_h0:
        h0.zero_()
    c0 = torch.randn(D, batch, hidden, generator=g).to(BF) if kind == "lstm" else None
    lengths = lengths_for(batch, steps, seed=batch) if packed else torch.full((batch,), steps)
    mask = (torch.arange(steps)[:, None] < lengths[None, :])[..., None]
    upstream = [torch.randn(steps, batch, D * hidden, generator=g).to(BF) * mask,
                torch.randn(D, batch, hidden, generator=g).to(BF)]
    if kind == "lstm":
        upstream.append(torch.randn(D, batch, hidden, generator=g).to(BF))

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, h0, c0) if t is not None]
        state = tuple(leaves[1:]) if kind == "lstm" else leaves[1]
        out, hn = module(pack(leaves[0], lengths, False) if packed else leaves[0], state)
        if packed:
            out = pad_packed_sequence(out, total_length=steps)[0]
        results = [out, *flat(hn)]
        gs = torch.autograd.grad(results, leaves + list(module.parameters()), upstream)
        return [r.detach() for r in results] + list(gs)

    def emulate():
        leaves = [t.double().requires_grad_() for t in (x, h0, c0) if t is not None]
        leaves += [p.detach().double().requires_grad_() for p in module.parameters()]
        n_state = len(leaves) - 4 * D
        params = [leaves[n_state + 4 * d:n_state + 4 * d + 4] for d in range(D)]
        out, hn, cn = _emulate(kind, params, leaves[0], leaves[1],
                               leaves[2] if kind == "lstm" else None, lengths,
                               nonlinearity == "relu")
        results = [out, hn] + ([cn] if kind == "lstm" else [])
        gs = torch.autograd.grad(results, leaves, [u.double() for u in upstream])
        return [r.detach() for r in results] + list(gs)

    return run, emulate, mask


def _matches(got, emulated, mask):
    """The share of each result's elements that are the emulation's, rounded (the output
    only where a sequence has a step)."""
    shares = []
    for i, (a, e) in enumerate(zip(got, emulated)):
        same = a == e.to(BF)
        shares.append(float(same[mask.expand_as(same)].float().mean()) if i == 0
                      else float(same.float().mean()))
    return shares


def _assert_like_emulation(got, emulated, mask):
    shares = _matches(got, emulated, mask)
    assert min(shares) >= MATCH, shares
    for a, e in zip(got, emulated):
        # one bfloat16 step (at most 2**-7 of the value) from the emulation's rounding, or
        # an operand rounded the other way (one of the dA in dW = bf16(dA)^T bf16(h)): a
        # bfloat16 step of one term, which can be most of a sum that cancels to near 0
        bound = 1.5 * 2.0**-7 * e.abs() + 2.0**-10 * e.abs().max()
        assert bool(((a.double() - e).abs() <= bound).all())


# (cell, hidden, batch, steps, input, bidirectional, packed): odd and tiny I and H (a pair
# padded with zero), I = 1, H past the vector and panel widths, K = I + H past the
# prefetch's 128, B = 1 (projection outside by the cost rule), I > 2H, packed uneven lengths
# in both directions; T * B = 640 and 4H = 320 rows, more than a slot of the products around
# the recurrence rounds at a time (linear.h: kPairRows). On AMX tiles (all but the shallowest):
# 50 rows, a slot's two row tiles and a partial one; a zero h0; parts of k shallower than a
# tile (I = 20 and H = 24 pad to 32 each).
CASES = [
    ("rnn-tanh", 33, 9, 6, 7, False, False),
    ("rnn-relu", 200, 12, 5, 28, True, True),
    ("rnn-tanh", 16, 1, 5, 3, False, True),
    ("lstm", 33, 9, 6, 7, True, True),
    ("lstm", 200, 12, 4, 28, False, False),
    ("lstm", 5, 3, 4, 1, False, False),
    ("gru", 33, 9, 6, 7, True, True),
    ("gru", 100, 19, 4, 300, False, False),
    ("gru", 1, 4, 3, 2, True, False),
    ("lstm", 80, 64, 10, 28, False, False),
    ("gru", 96, 50, 3, 20, False, False),
    ("rnn-relu", 64, 21, 4, 28, False, True, True),
    ("lstm", 24, 10, 4, 20, False, False),
    ("rnn-tanh", 24, 10, 4, 20, True, True),
]


@needs_bf16_dot
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("inside", ["1", "0"], ids=["inside", "outside"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "{}-H{}-B{}-T{}-I{}-{}-{}{}".format(
    *c[:5], "bi" if c[5] else "uni", "packed" if c[6] else "padded",
    "-zero_h0" if c[7:] else ""))
def test_pairs_match_their_emulation(case, inside, threads, tiles, monkeypatch):
    """Outputs, final states and every gradient, with the input projection inside each
    step's product and outside it."""
    monkeypatch.setenv("FASTRNN_CPU_PROJECT_INSIDE", inside)
    monkeypatch.setenv("FASTRNN_CPU_LINEAR", "1")
    monkeypatch.setenv("FASTRNN_CPU_BF16_PRODUCTS", "1")
    run, emulate, mask = _case(*case)
    _assert_like_emulation(run(), emulate(), mask)


@needs_bf16_dot
@pytest.mark.parametrize("cell", ["rnn-relu", "lstm", "gru"])
def test_pairs_same_bits_for_any_thread_count_and_split(cell, tiles, monkeypatch):
    """As in float32: each element is one accumulator over k in order, so 1 or 2 threads
    and row or column splits give the same bits (37 rows: on tiles a slot's whole and
    partial row tiles)."""
    monkeypatch.setenv("FASTRNN_CPU_BF16_PRODUCTS", "1")
    run, _, _ = _case(cell, 100, 37, 5, 28, True, True)
    saved = torch.get_num_threads()
    results = []
    try:
        for n, split in ((1, None), (2, "rows"), (2, "cols")):
            torch.set_num_threads(n)
            if split:
                monkeypatch.setenv("FASTRNN_CPU_SPLIT", split)
            results.append(run())
    finally:
        torch.set_num_threads(saved)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("cell", ["rnn-tanh", "lstm", "gru"])
def test_pairs_only_where_the_cpu_has_them(cell, monkeypatch):
    """With AVX512-BF16 a bfloat16 call with the pairs taken (FASTRNN_CPU_BF16_PRODUCTS=1)
    differs from its run with float32 products (=0), which the emulation does not match;
    without it (another CPU, or FASTRNN_CPU_ISA=avx2 in the child run below) the two are the
    same bits. Without the switch a call takes the pairs on AMD's CPUs only
    (_pairs_by_default). Under autocast too."""
    monkeypatch.setenv("FASTRNN_CPU_LINEAR", "1")
    run, emulate, mask = _case(cell, 64, 16, 5, 28, False, False)
    default = run()
    runs = {}
    for products in ("1", "0"):
        monkeypatch.setenv("FASTRNN_CPU_BF16_PRODUCTS", products)
        runs[products] = run()
    same = all(torch.equal(a, b) for a, b in zip(runs["1"], runs["0"]))
    if _bf16_dot():
        assert not same
        _assert_like_emulation(runs["1"], emulate(), mask)
        assert min(_matches(runs["0"], emulate(), mask)) < 0.8
    else:
        assert same
    expected = runs["1"] if _pairs_by_default() else runs["0"]
    assert all(torch.equal(a, b) for a, b in zip(default, expected))
    monkeypatch.delenv("FASTRNN_CPU_BF16_PRODUCTS")
    module = {"rnn-tanh": fastrnn.RNN, "lstm": fastrnn.LSTM, "gru": fastrnn.GRU}[cell](28, 64)
    x = torch.randn(5, 16, 28)
    with torch.autocast("cpu", dtype=BF):
        default = flat(module(x))
        monkeypatch.setenv("FASTRNN_CPU_BF16_PRODUCTS", "0")
        float32 = flat(module(x))
    assert all(t.dtype == BF for t in default)
    assert all(torch.equal(a, b) for a, b in zip(default, float32)) != _pairs_by_default()


def test_tiles_add_a_pairs_even_product_first(monkeypatch):
    """Of a pair of k, tdpbf16ps adds the even k's product to the sum first, vdpbf16ps the odd
    k's (Intel's manual): h_{t-1} W_hh^T over k = 0..3 with products 1, 0, 2^-24, 2^-23 sums
    to 1 + 2^-23 on tiles ((1 + 2^-24) rounds to 1) and to 1 + 2^-22 on vdpbf16ps
    (1 + 2^-23 + 2^-24 rounds to even); relu(sum - 1) shows it in bfloat16. Tiles are the
    default where the CPU has them; elsewhere FASTRNN_CPU_AMX changes nothing."""
    monkeypatch.setenv("FASTRNN_CPU_BF16_PRODUCTS", "1")
    H, B = 64, 16
    module = fastrnn.RNN(4, H, nonlinearity="relu").to(BF)
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
        module.bias_hh_l0.fill_(-1)
        module.weight_hh_l0[:, 0] = 1
        module.weight_hh_l0[:, 2:4] = 2.0**-12
    h0 = torch.zeros(1, B, H, dtype=BF)
    h0[..., 0], h0[..., 2], h0[..., 3] = 1, 2.0**-12, 2.0**-11
    x = torch.zeros(1, B, 4, dtype=BF)
    default = module(x, h0)[0]
    monkeypatch.setenv("FASTRNN_CPU_AMX", "0")
    vdpbf16ps = module(x, h0)[0]
    if _tiles():
        assert bool((default == 2.0**-23).all()) and bool((vdpbf16ps == 2.0**-22).all())
    else:
        assert torch.equal(default, vdpbf16ps)


@pytest.mark.skipif(os.environ.get("FASTRNN_CPU_ISA") is not None, reason="the child run")
def test_pairs_not_taken_below_avx512():
    """FASTRNN_CPU_ISA=avx2 (read once per process): the bfloat16 calls run float32
    products whatever the CPU, and no tiles."""
    result = child_pytest(__file__, dict(FASTRNN_CPU_ISA="avx2"), "-k", "only_where")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 passed" in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize("inside", ["1", "0"], ids=["inside", "outside"])
@pytest.mark.parametrize("cell", ["rnn-relu", "lstm", "gru"])
def test_pairs_propagate_nonfinite_values_like_float32_products(cell, inside, monkeypatch):
    """A NaN or an infinity in x reaches the same outputs, as NaN or infinity alike, with
    bfloat16 pairs as with float32 products (rounding keeps a NaN a NaN and an infinity
    infinite)."""
    monkeypatch.setenv("FASTRNN_CPU_PROJECT_INSIDE", inside)
    kind, _, nonlinearity = cell.partition("-")
    torch.manual_seed(0)
    kwargs = dict(nonlinearity=nonlinearity) if kind == "rnn" else {}
    module = {"rnn": fastrnn.RNN, "lstm": fastrnn.LSTM, "gru": fastrnn.GRU}[kind](
        3, 20, **kwargs).to(BF)
    x = torch.randn(4, 9, 3).to(BF)
    x[1, 2, 0] = float("nan")
    x[2, 0, 1] = float("inf")
    results = []
    for products in ("1", "0"):
        monkeypatch.setenv("FASTRNN_CPU_BF16_PRODUCTS", products)
        results.append(flat(module(x)))
    for a, b in zip(*results):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
        assert a.isnan().any()
