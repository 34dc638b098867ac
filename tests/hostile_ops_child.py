"""Hostile arguments for the raw ops torch.ops.fastrnn.rnn / rnn_backward.

Run as a script (by tests/test_ops.py), in a child process, so that a crash
(segfault, abort) is reported as a failing case instead of killing pytest:

    python tests/hostile_ops_child.py [CASE ...]      # no names: every case

For each case it prints one JSON line {"case": name, "status": "start"} before
running it, then one with the outcome:
  {"case", "outcome": "raised", "type", "mro", "message"}  the op raised
  {"case", "outcome": "returned"}                          the op returned (an error case)
  {"case", "outcome": "checked", "ok", "detail"}           a parity case compared results

CASES maps a name to (kind, argument, thunk):
  kind "error": the op must raise RuntimeError or ValueError naming ``argument`` (a
  name, or a tuple of acceptable names), its message starting "fastrnn::rnn: " or
  "fastrnn::rnn_backward: "; kind "binding": the same, but torch's argument parser
  rejects the value before fastrnn's code runs (message "fastrnn::rnn() Expected ...");
  kind "parity": ``thunk`` itself runs the op and compares it with torch.nn.RNN or
  fastrnn.reference (NaN/Inf propagation, unusual but valid arguments) and returns
  (ok, detail).

The arguments are those of a 2-layer bidirectional stack with biases (16 weights),
T=4, B=3, I=5, H=4, packed with batch_sizes [3, 2, 2, 1].
"""

import json
import math
import os
import sys

import torch

import fastrnn  # noqa: F401 - loads the fastrnn ops
from fastrnn.reference import rnn_reference

FWD = torch.ops.fastrnn.rnn
BWD = torch.ops.fastrnn.rnn_backward
T, B, I, H = 4, 3, 5, 4
L, D = 2, 2
BATCH_SIZES = [3, 2, 2, 1]  # sums to 8 rows
N = sum(BATCH_SIZES)

KINDS = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
CELLS = ["l0", "l0_reverse", "l1", "l1_reverse"]
WEIGHT_NAMES = [f"{k}_{c}" for c in CELLS for k in KINDS]


def fwd_args(packed=False, dtype=torch.float32, seed=0, nonlinearity="tanh"):
    """[input, hx, weights, has_biases, num_layers, dropout, train, bidirectional,
    nonlinearity, batch_sizes]"""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=dtype) - 0.5

    x = rand(N, I) if packed else rand(T, B, I)
    bs = torch.tensor(BATCH_SIZES) if packed else None
    weights = []
    for layer in range(L):
        for _ in range(D):
            weights += [rand(H, I if layer == 0 else D * H), rand(H, H), rand(H), rand(H)]
    return [x, rand(L * D, B, H), weights, True, L, 0.0, False, True, nonlinearity, bs]


def bwd_args(packed=False, dtype=torch.float32):
    """fwd_args + [output, reserve, grad_output, grad_h_n, need_input_grad, need_weight_grad]"""
    a = fwd_args(packed, dtype)
    out, h_n, reserve = FWD(*a)
    return a + [out, reserve, torch.randn_like(out), torch.randn_like(h_n), True, True]


# Positions of the arguments by name.
POS = dict(input=0, hx=1, weights=2, has_biases=3, num_layers=4, dropout=5, train=6,
           bidirectional=7, nonlinearity=8, batch_sizes=9, output=10, reserve=11,
           grad_output=12, grad_h_n=13, need_input_grad=14, need_weight_grad=15)

CASES = {}


def _replace(a, arg, value):
    if arg in WEIGHT_NAMES:
        a[2] = list(a[2])
        i = WEIGHT_NAMES.index(arg)
        a[2][i] = value(a[2][i]) if callable(value) else value
    else:
        a[POS[arg]] = value(a[POS[arg]]) if callable(value) else value


def op_error(kind, name, arg, value, packed=False, case_kind="error", at=None):
    """The ``kind`` ("forward" or "backward") op with argument ``at`` (a name of POS or a
    weight's name; by default ``arg``, or the first of a tuple) replaced by
    value(original) must name ``arg``."""
    make_args, op = (fwd_args, FWD) if kind == "forward" else (bwd_args, BWD)
    target = at or (arg if isinstance(arg, str) else arg[0])

    def thunk():
        a = make_args(packed)
        _replace(a, target, value)
        return op(*a)

    CASES[f"{kind}/{name}"] = (case_kind, arg, thunk)


def fwd_error(name, arg, value, packed=False, case_kind="error", at=None):
    op_error("forward", name, arg, value, packed, case_kind, at)


def bwd_error(name, arg, value, packed=False, case_kind="error", at=None):
    op_error("backward", name, arg, value, packed, case_kind, at)


def meta(t):
    return t.to("meta")


def huge(*shape):
    """A tensor of any size with one element of storage (stride 0)."""
    return torch.zeros(1).as_strided(shape, (0,) * len(shape))


# ---- wrong ranks -------------------------------------------------------------------------
fwd_error("input-1d", "input", lambda x: x.reshape(-1))
fwd_error("input-4d", "input", lambda x: x[None])
fwd_error("input-0d", "input", torch.tensor(1.0))
fwd_error("packed-input-3d", "input", lambda x: x[None], packed=True)
fwd_error("packed-input-1d", "input", lambda x: x.reshape(-1), packed=True)
fwd_error("hx-2d", "hx", lambda h: h[0])
fwd_error("hx-4d", "hx", lambda h: h[None])
fwd_error("hx-0d", "hx", torch.tensor(0.0))
# H is read from weight_hh_l0: its rank is checked before anything reads its size
fwd_error("weight_hh_l0-1d", "weight_hh_l0", lambda w: w.reshape(-1))
fwd_error("weight_hh_l0-3d", "weight_hh_l0", lambda w: w[None])
fwd_error("weight_hh_l0-0d", "weight_hh_l0", torch.tensor(0.5))
fwd_error("weight_ih_l0-1d", "weight_ih_l0", lambda w: w.reshape(-1))
fwd_error("weight_ih_l0-3d", "weight_ih_l0", lambda w: w[None])
fwd_error("weight_hh_l1_reverse-1d", "weight_hh_l1_reverse", lambda w: w.reshape(-1))
fwd_error("weight_ih_l1-3d", "weight_ih_l1", lambda w: w[None])
fwd_error("bias_ih_l1-2d", "bias_ih_l1", lambda b: b[None])
fwd_error("bias_hh_l0-0d", "bias_hh_l0", lambda b: b[0])

# ---- mismatched shapes -------------------------------------------------------------------
fwd_error("hx-batch", "hx", lambda h: h[:, :2])
fwd_error("hx-hidden", "hx", lambda h: torch.cat([h, h], 2))
fwd_error("hx-layers", "hx", lambda h: h[:3])
fwd_error("hx-layers-too-many", "hx", lambda h: torch.cat([h, h]))
fwd_error("weight_ih_l0-input-size", "weight_ih_l0", lambda w: torch.cat([w, w], 1))
fwd_error("weight_ih_l0-hidden", "weight_ih_l0", lambda w: w[:2])
fwd_error("weight_ih_l1-width", "weight_ih_l1", lambda w: w[:, :H])  # must read D*H
fwd_error("weight_ih_l0_reverse-hidden", "weight_ih_l0_reverse", lambda w: w[:3])
fwd_error("weight_hh_l0-not-square", "weight_hh_l0", lambda w: torch.cat([w, w], 1))
fwd_error("weight_hh_l1-size", "weight_hh_l1", lambda w: w[:3, :3])
fwd_error("bias_ih_l0-size", "bias_ih_l0", lambda b: b[:2])
fwd_error("bias_hh_l1_reverse-size", "bias_hh_l1_reverse", lambda b: torch.cat([b, b]))
fwd_error("packed-hx-batch", "hx", lambda h: h[:, :2], packed=True)
fwd_error("packed-hx-batch-too-big", "hx", lambda h: torch.cat([h, h], 1), packed=True)

# ---- weights list, counts and flags ------------------------------------------------------
fwd_error("weights-empty", "weights", [])
fwd_error("weights-one-short", "weights", lambda w: w[:-1])
fwd_error("weights-one-more", "weights", lambda w: w + [w[-1]])
fwd_error("has_biases-false-with-biases", "weights", False, at="has_biases")
fwd_error("bidirectional-false", "weights", False, at="bidirectional")
fwd_error("num_layers-0", "num_layers", 0)
fwd_error("num_layers-negative", "num_layers", -3)
fwd_error("num_layers-3", "weights", 3, at="num_layers")
fwd_error("num_layers-min-int64", "num_layers", -(2 ** 63))
fwd_error("num_layers-huge", ("weights", "num_layers"), 2 ** 62, at="num_layers")
# 2**61 layers x 2 directions x 4 tensors = 2**64: the expected weight count overflows
# to 0, which an empty list matches.
CASES["forward/num_layers-count-overflows-to-0"] = (
    "error", ("weights", "num_layers"),
    lambda: FWD(*(fwd_args()[:2] + [[], True, 2 ** 61] + fwd_args()[5:])))
fwd_error("dropout-negative", "dropout", -0.1)
fwd_error("dropout-above-1", "dropout", 1.0000001)
fwd_error("dropout-nan", "dropout", math.nan)
fwd_error("dropout-inf", "dropout", math.inf)
fwd_error("dropout-minus-inf", "dropout", -math.inf)
fwd_error("nonlinearity-empty", "nonlinearity", "")
fwd_error("nonlinearity-upper", "nonlinearity", "TANH")
fwd_error("nonlinearity-nul", "nonlinearity", "tanh\0")
fwd_error("nonlinearity-sigmoid", "nonlinearity", "sigmoid")

# ---- dtypes ------------------------------------------------------------------------------
fwd_error("input-int", "input", lambda x: x.long())
fwd_error("input-bool", "input", lambda x: x > 0)
fwd_error("input-complex", "input", lambda x: x.to(torch.complex64))
fwd_error("input-float8", "input", lambda x: x.to(torch.float8_e4m3fn))
fwd_error("hx-double", "hx", lambda h: h.double())
fwd_error("weight_ih_l0-bfloat16", "weight_ih_l0", lambda w: w.bfloat16())
fwd_error("weight_hh_l1_reverse-half", "weight_hh_l1_reverse", lambda w: w.half())
fwd_error("bias_ih_l1-int", "bias_ih_l1", lambda b: b.int())
fwd_error("bias_hh_l0-double", "bias_hh_l0", lambda b: b.double())

# ---- devices (a meta tensor among CPU tensors: the Meta key wins dispatch, so the fake
# kernel answers, and must refuse; all-meta is the fake kernel's job) ---------------------
for _arg in ("input", "hx", "weight_ih_l0", "weight_hh_l0", "bias_ih_l1_reverse", "bias_hh_l1"):
    # With a meta input, every other argument is "on another device": the error names one.
    fwd_error(f"{_arg}-meta", ("input", "hx") if _arg == "input" else _arg, meta)
fwd_error("batch_sizes-meta", "batch_sizes", meta, packed=True)

# ---- missing tensors (None where a tensor is required) -----------------------------------
fwd_error("input-None", "input", None)
fwd_error("hx-None", "hx", None)
# None in the weights list, or no list: torch's argument parser refuses it
fwd_error("weight_ih_l0-None", "weights", None, case_kind="binding", at="weight_ih_l0")
fwd_error("weight_hh_l1-None", "weights", None, case_kind="binding", at="weight_hh_l1")
fwd_error("weights-None", "weights", None, case_kind="binding")
# A packed [N, I] input given without batch_sizes is a rank error naming input.
CASES["forward/packed-input-batch_sizes-None"] = (
    "error", "input", lambda: FWD(*(fwd_args(True)[:9] + [None])))

# ---- empty tensors and absurd sizes ------------------------------------------------------
fwd_error("hx-empty", "hx", torch.zeros(0, B, H))
# H is read from weight_hh_l0, so an inconsistent weight_hh_l0 may be reported as
# weight_ih_l0's mismatch: either name is right.
fwd_error("weight_hh_l0-empty", ("weight_hh_l0", "weight_ih_l0"), torch.zeros(0, 0))
fwd_error("weight_ih_l0-empty", "weight_ih_l0", torch.zeros(H, 0))
fwd_error("hx-huge-batch", "hx", huge(L * D, 2 ** 40, H))
fwd_error("packed-hx-huge-batch", "hx", huge(L * D, 2 ** 40, H), packed=True)
fwd_error("hx-huge-layers", "hx", huge(2 ** 40, B, H))
fwd_error("weight_hh_l0-huge", ("weight_hh_l0", "weight_ih_l0"), huge(2 ** 31 + 1, 2 ** 31 + 1))
fwd_error("weight_ih_l0-huge-input-size", "weight_ih_l0", huge(H, 2 ** 40))
fwd_error("weight_ih_l1-huge-input-size", "weight_ih_l1", huge(H, 2 ** 60))

# ---- batch_sizes -------------------------------------------------------------------------
_bs = dict(
    too_long=[3, 2, 2, 1, 1],
    too_short=[3, 2, 2],
    sum_too_big=[3, 3, 2, 1],
    sum_too_small=[3, 2, 1, 1],
    zero=[3, 3, 2, 0],
    all_zero=[0, 0, 0, 0],
    negative=[3, 3, 3, -1],
    increasing=[1, 2, 2, 3],
    first_too_big=[4, 2, 1, 1],
    absurd=[2 ** 62, 2 ** 62, 2 ** 62, 2 ** 62],  # the sum overflows int64 to 0
    absurd_one=[2 ** 63 - 1],
    min_int64=[-(2 ** 63), 8],
)
for _name, _sizes in _bs.items():
    # batch_sizes[0] is the batch: one larger than hx's may be reported as hx's mismatch.
    _names = ("batch_sizes", "hx") if _name == "first_too_big" else "batch_sizes"
    fwd_error(f"batch_sizes-{_name}", _names, torch.tensor(_sizes), packed=True)
    bwd_error(f"batch_sizes-{_name}", _names, torch.tensor(_sizes), packed=True)
fwd_error("batch_sizes-int32", "batch_sizes", lambda b: b.int(), packed=True)
fwd_error("batch_sizes-float", "batch_sizes", lambda b: b.double(), packed=True)
fwd_error("batch_sizes-bool", "batch_sizes", lambda b: b > 0, packed=True)
fwd_error("batch_sizes-2d", "batch_sizes", lambda b: b[None], packed=True)
fwd_error("batch_sizes-0d", "batch_sizes", lambda b: b[0], packed=True)
fwd_error("batch_sizes-empty-with-rows", "batch_sizes",
          torch.zeros(0, dtype=torch.long), packed=True)
CASES["forward/batch_sizes-with-padded-input"] = (
    "error", "input", lambda: FWD(*(fwd_args(False)[:9] + [torch.tensor(BATCH_SIZES)])))


def _absurd_empty():
    # 4 * 2**62 wraps around to 0 = the input's rows: must not be taken for an empty
    # input (hidden size 0, so that an hx of 2**62 rows can exist).
    weights = [torch.zeros(0, I), torch.zeros(0, 0), torch.zeros(0), torch.zeros(0)]
    return FWD(torch.zeros(0, I), huge(1, 2 ** 62, 0), weights, True, 1, 0.0, False, False,
               "tanh", torch.tensor([2 ** 62] * 4))


CASES["forward/batch_sizes-absurd-empty-input"] = ("error", "batch_sizes", _absurd_empty)

# ---- backward ----------------------------------------------------------------------------
bwd_error("grad_output-shape", "grad_output", lambda g: g[:, :, :2])
bwd_error("grad_output-rank", "grad_output", lambda g: g[0])
bwd_error("grad_output-dtype", "grad_output", lambda g: g.double())
bwd_error("grad_output-meta", "grad_output", meta)
bwd_error("grad_output-None", "grad_output", None)
bwd_error("grad_h_n-shape", "grad_h_n", lambda g: g[:1])
bwd_error("grad_h_n-2d", "grad_h_n", lambda g: g[0])
bwd_error("grad_h_n-dtype", "grad_h_n", lambda g: g.bfloat16())
bwd_error("grad_h_n-meta", "grad_h_n", meta)
bwd_error("grad_h_n-None", "grad_h_n", None)
bwd_error("output-shape", "output", lambda o: o[:, :, :2])
bwd_error("output-rank", "output", lambda o: o.reshape(-1))
bwd_error("output-dtype", "output", lambda o: o.long())
bwd_error("output-meta", "output", meta)
bwd_error("output-None", "output", None)
bwd_error("reserve-short", "reserve", lambda r: r[1:])
bwd_error("reserve-long", "reserve", lambda r: torch.cat([r, r]))
bwd_error("reserve-2d", "reserve", lambda r: r[None])
bwd_error("reserve-empty", "reserve", lambda r: r[:0])
bwd_error("reserve-dtype", "reserve", lambda r: r.double())
bwd_error("reserve-meta", "reserve", meta)
bwd_error("reserve-None", "reserve", None)
# train=True with dropout: the reserve must also hold the masks
def _without_masks(a):
    a[POS["dropout"]], a[POS["train"]] = 0.5, True
    return BWD(*a)


CASES["backward/reserve-without-masks"] = ("error", "reserve", lambda: _without_masks(bwd_args()))
bwd_error("input-rank", "input", lambda x: x[0])
bwd_error("input-None", "input", None)
bwd_error("hx-batch", "hx", lambda h: h[:, :1])
bwd_error("hx-meta", "hx", meta)
bwd_error("weight_ih_l0-shape", "weight_ih_l0", lambda w: w[:, :1])
bwd_error("weight_hh_l1_reverse-dtype", "weight_hh_l1_reverse", lambda w: w.double())
bwd_error("weights-empty", "weights", [])
bwd_error("num_layers-0", "num_layers", 0)
bwd_error("dropout-nan", "dropout", math.nan)
bwd_error("nonlinearity", "nonlinearity", "gelu")
bwd_error("packed-grad_output-rows", "grad_output", lambda g: g[:5], packed=True)
bwd_error("packed-output-rows", "output", lambda o: torch.cat([o, o]), packed=True)
bwd_error("batch_sizes-meta", "batch_sizes", meta, packed=True)
bwd_error("batch_sizes-int32", "batch_sizes", lambda b: b.int(), packed=True)


# ---- valid but unusual arguments: must match fastrnn.reference ---------------------------
def _close(a, b):
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)


def parity_with_reference(mutate, packed=False):
    def thunk():
        a = fwd_args(packed)
        mutate(a)
        out, h_n, _ = FWD(*a)
        ref_out, ref_h = rnn_reference(a[0], a[1], a[2], num_layers=a[4], bidirectional=a[7],
                                       nonlinearity=a[8], batch_sizes=a[9])
        ok = _close(out, ref_out) and _close(h_n, ref_h)
        return ok, f"out {tuple(out.shape)} vs {tuple(ref_out.shape)}"
    return thunk


def _no_bias(a):
    a[2] = [w for i, w in enumerate(a[2]) if i % 4 < 2]
    a[3] = False


def _one_layer_one_direction(a):
    a[1], a[2], a[4], a[7] = a[1][:1], a[2][:4], 1, False


def _empty_steps(a):
    a[0] = a[0][:0]
    if a[9] is not None:
        a[9] = torch.zeros(0, dtype=torch.long)


def _set(**changes):
    return lambda a: [a.__setitem__(POS[k], v) for k, v in changes.items()]


CASES["valid/no-bias"] = ("parity", None, parity_with_reference(_no_bias))
CASES["valid/no-bias-packed"] = ("parity", None, parity_with_reference(_no_bias, packed=True))
CASES["valid/one-layer-one-direction"] = ("parity", None,
                                          parity_with_reference(_one_layer_one_direction))
CASES["valid/batch_sizes-non-contiguous"] = ("parity", None, parity_with_reference(
    _set(batch_sizes=torch.tensor([[3, 9], [2, 9], [2, 9], [1, 9]])[:, 0]), packed=True))
CASES["valid/T0-padded"] = ("parity", None, parity_with_reference(_empty_steps))
CASES["valid/T0-packed"] = ("parity", None, parity_with_reference(_empty_steps, packed=True))
CASES["valid/B0"] = ("parity", None, parity_with_reference(
    lambda a: (a.__setitem__(0, a[0][:, :0]), a.__setitem__(1, a[1][:, :0]))))
CASES["valid/expanded-everything"] = ("parity", None, parity_with_reference(
    lambda a: (a.__setitem__(0, a[0].flatten()[:1].expand(a[0].shape)),
               a.__setitem__(1, a[1].flatten()[:1].expand(a[1].shape)),
               a.__setitem__(2, [w.flatten()[:1].expand(w.shape) for w in a[2]]))))
CASES["valid/transposed-weights"] = ("parity", None, parity_with_reference(
    lambda a: a.__setitem__(2, [w.t().contiguous().t() if w.dim() == 2 else w for w in a[2]]),
    packed=True))
CASES["valid/relu-packed"] = ("parity", None, parity_with_reference(
    _set(nonlinearity="relu"), packed=True))
CASES["valid/dropout-not-training"] = ("parity", None, parity_with_reference(
    _set(dropout=1.0, train=False), packed=True))
CASES["valid/dropout-0-training"] = ("parity", None, parity_with_reference(
    _set(dropout=0.0, train=True)))


def _dropout_1():
    # Every mask zero: layer 1 reads zeros, so its output is that of a zero input.
    a = fwd_args(True)
    a[5], a[6] = 1.0, True
    out, h_n, reserve = FWD(*a)
    masks = [torch.zeros(N, D * H)]
    ref_out, ref_h = rnn_reference(a[0], a[1], a[2], num_layers=L, bidirectional=True,
                                   batch_sizes=a[9], dropout_masks=masks)
    ok = _close(out, ref_out) and _close(h_n, ref_h) and bool((reserve[N * D * H:] == 0).all())
    return ok, ""


CASES["valid/dropout-1-training"] = ("parity", None, _dropout_1)


def _all_meta_valid():
    a = fwd_args(packed=True)
    a[0], a[1], a[2] = meta(a[0]), meta(a[1]), [meta(w) for w in a[2]]
    out, h_n, reserve = FWD(*a)
    ok = (out.device.type == h_n.device.type == reserve.device.type == "meta"
          and out.shape == (N, D * H) and h_n.shape == (L * D, B, H)
          and reserve.shape == ((L - 1) * N * D * H,))
    return ok, f"{out.device} {tuple(out.shape)} {tuple(h_n.shape)} {tuple(reserve.shape)}"


CASES["valid/all-meta-packed"] = ("parity", None, _all_meta_valid)


def _all_meta_bad_shape():
    # The fake kernels work out shapes and check devices; a wrong weight shape among meta
    # tensors may pass there (the device kernel reports it). It must not crash.
    a = fwd_args()
    a[0], a[1], a[2] = meta(a[0]), meta(a[1]), [meta(w)[:, :2] if w.dim() == 2 else meta(w)
                                               for w in a[2]]
    try:
        out, _, _ = FWD(*a)
    except RuntimeError:
        return True, "raised"
    return out.device.type == "meta", "returned"


CASES["valid/all-meta-bad-weight-shape-no-crash"] = ("parity", None, _all_meta_bad_shape)


# ---- NaN and Inf: the same propagation as torch.nn.RNN, forward and backward --------------
def nan_parity(poison, relu, packed, expect_nonfinite=True):
    """Poisons one argument, runs a 2-layer bidirectional stack through fastrnn and
    torch.nn.RNN, and checks that NaN/Inf land in the same places of output, h_n and
    every gradient, and that finite values agree."""

    def thunk():
        nonlinearity = "relu" if relu else "tanh"
        torch.manual_seed(0)
        ref = torch.nn.RNN(I, H, L, nonlinearity=nonlinearity, bidirectional=True).double()
        x = torch.randn(T, B, I, dtype=torch.float64)
        h0 = torch.randn(L * D, B, H, dtype=torch.float64)
        with torch.no_grad():
            poison(x, h0, dict(ref.named_parameters()))
        lengths = torch.tensor([4, 3, 1])
        names = [n for n, _ in ref.named_parameters()]
        results = []
        for use_fast in (False, True):
            xs = x.clone().requires_grad_()
            hs = h0.clone().requires_grad_()
            params = [p.detach().clone().requires_grad_() for p in ref.parameters()]
            if packed:
                data = torch.nn.utils.rnn.pack_padded_sequence(xs, lengths)
                inp, batch_sizes = data.data, data.batch_sizes
            else:
                inp, batch_sizes = xs, None
            if use_fast:
                out, h_n, _ = FWD(inp, hs, params, True, L, 0.0, False, True, nonlinearity,
                                  batch_sizes)
            else:
                feed = torch.nn.utils.rnn.PackedSequence(inp, batch_sizes) if packed else inp
                out, h_n = torch.func.functional_call(ref, dict(zip(names, params)), (feed, hs))
                out = out.data if packed else out
            g = torch.Generator().manual_seed(1)
            loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum() + (
                h_n * torch.randn(h_n.shape, generator=g, dtype=out.dtype)).sum()
            results.append([out, h_n, *torch.autograd.grad(loss, [xs, hs, *params])])
        labels = ["output", "h_n", "grad_input", "grad_hx"] + [f"grad_{n}" for n in names]
        bad = []
        for name, want, got in zip(labels, *results):
            if not (torch.equal(want.isnan(), got.isnan()) and torch.equal(want.isinf(), got.isinf())
                    and torch.equal(want[want.isinf()], got[got.isinf()])
                    and torch.allclose(want, got, rtol=1e-9, atol=1e-10, equal_nan=True)):
                bad.append(f"{name}: nan {int(want.isnan().sum())} vs {int(got.isnan().sum())}, "
                           f"inf {int(want.isinf().sum())} vs {int(got.isinf().sum())}")
        poisoned = any(bool((~r.isfinite()).any()) for r in results[0])
        # (the poison must have reached the results, unless tanh saturates it away)
        ok = not bad and (poisoned or not expect_nonfinite)
        return ok, "; ".join(bad) or ("" if poisoned else "nothing poisoned")

    return thunk


NAN, INF = math.nan, math.inf
_POISONS = {
    "input-nan": lambda x, h, p: x[1, 1, 2].fill_(NAN),
    "input-inf": lambda x, h, p: (x[2, 0, 1].fill_(INF), x[0, 2, 3].fill_(-INF)),
    "hx-inf": lambda x, h, p: h[0, 1, 0].fill_(INF),
    "hx-nan": lambda x, h, p: h[3, 2, 3].fill_(NAN),
    "weight_hh-nan": lambda x, h, p: p["weight_hh_l0"][1, 2].fill_(NAN),
    "weight_ih-inf": lambda x, h, p: p["weight_ih_l0_reverse"][0, 4].fill_(-INF),
    "weight_ih_l1-nan": lambda x, h, p: p["weight_ih_l1"][2, 6].fill_(NAN),
    "bias-inf-minus-inf": lambda x, h, p: (p["bias_ih_l0"][2].fill_(INF),
                                           p["bias_hh_l0"][2].fill_(-INF)),
    "bias-inf": lambda x, h, p: p["bias_hh_l1_reverse"][3].fill_(INF),
}
for _pname, _poison in _POISONS.items():
    for _relu in (False, True):
        for _packed in (False, True):
            CASES[f"nan/{_pname}-{'relu' if _relu else 'tanh'}-{'packed' if _packed else 'padded'}"] = (
                "parity", None,
                nan_parity(_poison, _relu, _packed, expect_nonfinite=_relu or _pname != "bias-inf"))


# ==== fastrnn::lstm / gru and their *_backward ============================================
# Case names "lstm/forward/...", "gru/backward/..."; the same kinds. The arguments are those
# of a 2-layer bidirectional stack with biases (LSTM: 16 weights, 20 with proj_size 2),
# T=4, B=3, I=5, H=4, packed with batch_sizes [3, 2, 2, 1] where packed.
from fastrnn.reference import gru_reference, lstm_reference  # noqa: E402

CELL_OPS = {"lstm": (torch.ops.fastrnn.lstm, torch.ops.fastrnn.lstm_backward),
            "gru": (torch.ops.fastrnn.gru, torch.ops.fastrnn.gru_backward)}
CELL_GATES = {"lstm": 4, "gru": 3}
CELL_POS = {
    "lstm": dict(input=0, hx=1, cx=2, weights=3, has_biases=4, num_layers=5, dropout=6, train=7,
                 bidirectional=8, batch_sizes=9, output=10, reserve=11, grad_output=12,
                 grad_h_n=13, grad_c_n=14, need_input_grad=15, need_weight_grad=16),
    "gru": dict(input=0, hx=1, weights=2, has_biases=3, num_layers=4, dropout=5, train=6,
                bidirectional=7, batch_sizes=8, output=9, reserve=10, grad_output=11,
                grad_h_n=12, need_input_grad=13, need_weight_grad=14),
}


def cell_weight_names(proj):
    kinds = KINDS + (["weight_hr"] if proj else [])
    return [f"{k}_{c}" for c in CELLS for k in kinds]


def cell_fwd_args(cell, packed=False, proj=0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=dtype) - 0.5

    G, R = CELL_GATES[cell], proj or H
    x = rand(N, I) if packed else rand(T, B, I)
    bs = torch.tensor(BATCH_SIZES) if packed else None
    weights = []
    for layer in range(L):
        for _ in range(D):
            weights += [rand(G * H, I if layer == 0 else D * R), rand(G * H, R), rand(G * H),
                        rand(G * H)] + ([rand(R, H)] if proj else [])
    states = [rand(L * D, B, R)] + ([rand(L * D, B, H)] if cell == "lstm" else [])
    return [x, *states, weights, True, L, 0.0, False, True, bs]


def cell_bwd_args(cell, packed=False, proj=0):
    a = cell_fwd_args(cell, packed, proj)
    *outputs, reserve = CELL_OPS[cell][0](*a)
    return a + [outputs[0], reserve, *[torch.randn_like(o) for o in outputs], True, True]


def cell_error(cell, kind, name, arg, value, packed=False, proj=0, case_kind="error", at=None):
    target = at or (arg if isinstance(arg, str) else arg[0])
    names = cell_weight_names(proj)

    def thunk():
        a = cell_fwd_args(cell, packed, proj) if kind == "forward" else cell_bwd_args(cell, packed, proj)
        if target in names:
            w = CELL_POS[cell]["weights"]
            a[w] = list(a[w])
            i = names.index(target)
            a[w][i] = value(a[w][i]) if callable(value) else value
        else:
            i = CELL_POS[cell][target]
            a[i] = value(a[i]) if callable(value) else value
        return CELL_OPS[cell][0 if kind == "forward" else 1](*a)

    CASES[f"{cell}/{kind}/{name}"] = (case_kind, arg, thunk)


for _cell in ("lstm", "gru"):
    for _kind in ("forward", "backward"):
        def _e(name, arg, value, **kw):
            cell_error(_cell, _kind, name, arg, value, **kw)

        _e("hx-huge-batch", "hx", huge(L * D, 2 ** 40, H))
        _e("hx-huge-layers", "hx", huge(2 ** 40, B, H))
        _e("hx-2d", "hx", lambda h: h[0])
        _e("hx-None", "hx", None)
        _e("hx-meta", "hx", meta)
        _e("weights-empty", "weights", [])
        _e("weights-one-short", "weights", lambda w: w[:-1])
        _e("num_layers-huge", ("weights", "num_layers"), 2 ** 62, at="num_layers")
        _e("num_layers-min-int64", "num_layers", -(2 ** 63))
        _e("dropout-nan", "dropout", math.nan)
        # the gate count divides weight_hh's rows: a row more or a row less
        _e("weight_hh_l0-rows-not-multiple", ("weight_hh_l0", "weight_ih_l0"),
           lambda w: torch.cat([w, w[:1]]))
        _e("weight_hh_l0-empty", ("weight_hh_l0", "weight_ih_l0"), torch.zeros(0, 0))
        _e("weight_hh_l0-huge", ("weight_hh_l0", "weight_ih_l0"), huge(2 ** 31 + 2, 2 ** 31 + 1))
        _e("weight_ih_l1-huge-input-size", "weight_ih_l1", huge(CELL_GATES[_cell] * H, 2 ** 58))
        _e("bias_ih_l1_reverse-H-not-GH", "bias_ih_l1_reverse", lambda b: b[:H])
        _e("weight_ih_l0-int", "weight_ih_l0", lambda w: w.int())
        _e("input-float8", "input", lambda x: x.to(torch.float8_e4m3fn))
        _e("batch_sizes-absurd", "batch_sizes", torch.tensor([2 ** 62] * 4), packed=True)
        _e("batch_sizes-increasing", "batch_sizes", torch.tensor([1, 2, 2, 3]), packed=True)
        if _cell == "lstm":
            _e("cx-None", "cx", None)
            _e("cx-2d", "cx", lambda c: c[0])
            _e("cx-huge-batch", "cx", huge(L * D, 2 ** 40, H))
            _e("cx-meta", "cx", meta)
            _e("cx-int", "cx", lambda c: c.long())
            _e("cx-of-proj_size", "cx", lambda c: c[..., :2], proj=2)
            _e("proj-weight_hr_l0-transposed", "weight_hr_l0", lambda w: w.t(), proj=2)
            _e("proj-weight_hr_l1-huge", "weight_hr_l1", huge(2, 2 ** 40), proj=2)
            _e("proj-weight_hr_l0-None", "weights", None, proj=2, case_kind="binding",
               at="weight_hr_l0")
            # 20 weights read as 5 per cell with has_biases False: not a valid count
            _e("proj-has_biases-false", "weights", False, proj=2, at="has_biases")
            # proj_size = H: weight_hr [H, H] and hx of H look like a 5th weight of an
            # unprojected stack: the shapes must still be checked, not crash
            _e("proj-weight_hh_l1-proj-mismatch", "weight_hh_l1", lambda w: w[:, :1], proj=2)
        if _kind == "backward":
            _e("reserve-short", "reserve", lambda r: r[1:])
            _e("reserve-None", "reserve", None)
            _e("reserve-meta", "reserve", meta)
            _e("grad_output-shape", "grad_output", lambda g: g[..., :2])
            _e("grad_h_n-huge", "grad_h_n", huge(L * D, 2 ** 40, H))
            _e("output-None", "output", None)
            if _cell == "lstm":
                _e("grad_c_n-None", "grad_c_n", None)
                _e("grad_c_n-shape", "grad_c_n", lambda g: g[:1])
                _e("grad_c_n-huge", "grad_c_n", huge(2 ** 40, B, H))
                _e("grad_c_n-meta", "grad_c_n", meta)
                _e("grad_c_n-dtype", "grad_c_n", lambda g: g.double())
                _e("proj-reserve-without-m", "reserve", lambda r: r[: r.numel() - 2 * N * D * H],
                   proj=2)


def cell_parity(cell, mutate=lambda a: None, packed=False, proj=0):
    """The op on valid but unusual arguments against fastrnn.reference."""
    def thunk():
        a = cell_fwd_args(cell, packed, proj)
        mutate(a)
        P = CELL_POS[cell]
        *outputs, _ = CELL_OPS[cell][0](*a)
        common = dict(num_layers=a[P["num_layers"]], bidirectional=a[P["bidirectional"]],
                      batch_sizes=a[P["batch_sizes"]])
        if cell == "lstm":
            out, (h, c) = lstm_reference(a[0], (a[1], a[2]), a[3], **common)
            want = [out, h, c]
        else:
            want = list(gru_reference(a[0], a[1], a[2], **common))
        ok = len(outputs) == len(want) and all(_close(o, w) for o, w in zip(outputs, want))
        return ok, " ".join(f"{tuple(o.shape)} vs {tuple(w.shape)}" for o, w in zip(outputs, want))
    return thunk


def _cell_empty_steps(cell):
    def mutate(a):
        a[0] = a[0][:0]
        bs = CELL_POS[cell]["batch_sizes"]
        if a[bs] is not None:
            a[bs] = torch.zeros(0, dtype=torch.long)
    return mutate


def _cell_expanded(cell):
    def mutate(a):
        w = CELL_POS[cell]["weights"]
        for i in range(w):
            a[i] = a[i].flatten()[:1].expand(a[i].shape)
        a[w] = [t.flatten()[:1].expand(t.shape) for t in a[w]]
    return mutate


def _cell_poison(cell):
    def mutate(a):
        a[0][1, 1, 2] = math.nan  # NaN input: NaN where torch has it (rows of batch 1)
    return mutate


for _cell in ("lstm", "gru"):
    for _packed in (False, True):
        _p = "packed" if _packed else "padded"
        CASES[f"{_cell}/valid/T0-{_p}"] = ("parity", None, cell_parity(_cell, _cell_empty_steps(_cell), _packed))
        CASES[f"{_cell}/valid/expanded-everything-{_p}"] = ("parity", None, cell_parity(_cell, _cell_expanded(_cell), _packed))
    CASES[f"{_cell}/valid/B0"] = ("parity", None, cell_parity(_cell, lambda a, n=3 if _cell == "lstm" else 2: [
        a.__setitem__(i, a[i][:, :0]) for i in range(n)]))  # input, hx (, cx): batch 0
    CASES[f"{_cell}/valid/nan-input"] = ("parity", None, cell_parity(_cell, _cell_poison(_cell)))
CASES["lstm/valid/proj-packed"] = ("parity", None, cell_parity("lstm", packed=True, proj=2))
CASES["lstm/valid/proj-T0"] = ("parity", None, cell_parity("lstm", _cell_empty_steps("lstm"), proj=1))


if os.environ.get("FASTRNN_HOSTILE_SELFTEST"):
    # For the harness's own test: a case that kills the process.
    CASES["selftest/abort"] = ("error", "none", os.abort)


def run(name):
    kind, _, thunk = CASES[name]
    if kind == "parity":
        try:
            ok, detail = thunk()
            return {"outcome": "checked", "ok": bool(ok), "detail": detail}
        except Exception as e:  # noqa: BLE001 - reported to the parent
            return {"outcome": "checked", "ok": False,
                    "detail": f"raised {type(e).__name__}: {str(e)[:500]}"}
    try:
        thunk()
    except Exception as e:  # noqa: BLE001 - the parent judges the type and message
        mro = [c.__name__ for c in type(e).__mro__]
        return {"outcome": "raised", "type": type(e).__name__, "mro": mro,
                "message": str(e)[:2000]}
    return {"outcome": "returned"}


def main(names):
    for name in names or list(CASES):
        print(json.dumps({"case": name, "status": "start"}), flush=True)
        result = run(name)
        result["case"] = name
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
