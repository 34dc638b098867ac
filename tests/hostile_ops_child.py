"""Hostile arguments for the raw ops torch.ops.fastrnn.elman_forward / elman_backward.

Run as a script (by tests/test_hardening.py), in a child process, so that a crash
(segfault, abort) is reported as a failing case instead of killing pytest:

    python tests/hostile_ops_child.py [CASE ...]      # no names: every case

For each case it prints one JSON line {"case": name, "status": "start"} before
running it, then one with the outcome:
  {"case", "outcome": "raised", "type", "message"}       the op raised
  {"case", "outcome": "returned"}                          the op returned (an error case)
  {"case", "outcome": "checked", "ok", "detail"}           a parity case compared results

CASES maps a name to (kind, argument, thunk):
  kind "error": the op must raise RuntimeError or ValueError naming ``argument``;
  kind "parity": ``thunk`` itself runs the op and compares it with torch.nn.RNN or
  fastrnn.reference (NaN/Inf propagation, unusual but valid arguments) and returns
  (ok, detail).
"""

import json
import math
import os
import sys

import torch

import fastrnn  # noqa: F401 - loads the fastrnn ops
from fastrnn.reference import elman_reference

FWD = torch.ops.fastrnn.elman_forward
BWD = torch.ops.fastrnn.elman_backward
T, B, I, H = 4, 3, 5, 4
BATCH_SIZES = [3, 2, 2, 1]  # sums to 8 rows
N = sum(BATCH_SIZES)


def fwd_args(packed=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=dtype) - 0.5

    x = rand(N, I) if packed else rand(T, B, I)
    bs = torch.tensor(BATCH_SIZES) if packed else None
    return [x, rand(B, H), rand(H, I), rand(H, H), rand(H), rand(H), bs, False, False]


def bwd_args(packed=False, dtype=torch.float32):
    a = fwd_args(packed, dtype)
    out, h_n = FWD(*a)
    #       grad_output, grad_h_n, input, hx, w_ih, w_hh, output, batch_sizes, relu, reverse, needs
    return [torch.randn_like(out), torch.randn_like(h_n), a[0], a[1], a[2], a[3], out, a[6],
            False, False, True, True, True]


# Positions of the arguments by name.
F_POS = dict(input=0, hx=1, weight_ih=2, weight_hh=3, bias_ih=4, bias_hh=5, batch_sizes=6)
B_POS = dict(grad_output=0, grad_h_n=1, input=2, hx=3, weight_ih=4, weight_hh=5, output=6,
             batch_sizes=7)

CASES = {}


def op_error(kind, name, arg, value, packed=False):
    """The ``kind`` ("forward" or "backward") op with argument ``arg`` replaced by
    value(original) must name ``arg``."""
    positions, make_args, op = (F_POS, fwd_args, FWD) if kind == "forward" else (B_POS, bwd_args, BWD)
    pos = positions[arg if isinstance(arg, str) else arg[0]]

    def thunk():
        a = make_args(packed)
        a[pos] = value(a[pos]) if callable(value) else value
        return op(*a)

    CASES[f"{kind}/{name}"] = ("error", arg, thunk)


def fwd_error(name, arg, value, packed=False):
    op_error("forward", name, arg, value, packed)


def bwd_error(name, arg, value, packed=False):
    op_error("backward", name, arg, value, packed)


def meta(t):
    return t.to("meta")


def huge_rows(rows, cols):
    """A [rows, cols] tensor of any size with one element of storage (stride 0)."""
    return torch.zeros(1).as_strided((rows, cols), (0, 0))


# ---- wrong ranks -------------------------------------------------------------------------
fwd_error("input-1d", "input", lambda x: x.reshape(-1))
fwd_error("input-4d", "input", lambda x: x[None])
fwd_error("input-0d", "input", torch.tensor(1.0))
fwd_error("packed-input-3d", "input", lambda x: x[None], packed=True)
fwd_error("hx-1d", "hx", lambda h: h[0])
fwd_error("hx-3d", "hx", lambda h: h[None])
fwd_error("weight_ih-1d", "weight_ih", lambda w: w.reshape(-1))
fwd_error("weight_ih-3d", "weight_ih", lambda w: w[None])
fwd_error("weight_hh-1d", "weight_hh", lambda w: w.reshape(-1))
fwd_error("weight_hh-3d", "weight_hh", lambda w: w[None])
fwd_error("bias_ih-2d", "bias_ih", lambda b: b[None])
fwd_error("bias_hh-0d", "bias_hh", lambda b: b[0])

# ---- mismatched shapes -------------------------------------------------------------------
fwd_error("hx-batch", "hx", lambda h: h[:2])
fwd_error("hx-hidden", "hx", lambda h: torch.cat([h, h], 1))
fwd_error("weight_ih-input-size", "weight_ih", lambda w: torch.cat([w, w], 1))
fwd_error("weight_ih-hidden", "weight_ih", lambda w: w[:2])
fwd_error("weight_hh-not-square", "weight_hh", lambda w: torch.cat([w, w], 1))
fwd_error("bias_ih-size", "bias_ih", lambda b: b[:2])
fwd_error("bias_hh-size", "bias_hh", lambda b: torch.cat([b, b]))
fwd_error("packed-hx-batch", "hx", lambda h: h[:2], packed=True)
fwd_error("packed-hx-batch-too-big", "hx", lambda h: torch.cat([h, h]), packed=True)

# ---- dtypes ------------------------------------------------------------------------------
fwd_error("input-int", "input", lambda x: x.long())
fwd_error("input-bool", "input", lambda x: x > 0)
fwd_error("input-complex", "input", lambda x: x.to(torch.complex64))
fwd_error("hx-double", "hx", lambda h: h.double())
fwd_error("weight_ih-bfloat16", "weight_ih", lambda w: w.bfloat16())
fwd_error("weight_hh-half", "weight_hh", lambda w: w.half())
fwd_error("bias_ih-int", "bias_ih", lambda b: b.int())
fwd_error("bias_hh-double", "bias_hh", lambda b: b.double())

# ---- devices (a meta tensor among CPU tensors; all-meta is the fake kernel's job) --------
for _arg in ("input", "hx", "weight_ih", "weight_hh", "bias_ih", "bias_hh"):
    # With a meta input, every other argument is "on another device": the error names one.
    fwd_error(f"{_arg}-meta", "hx" if _arg == "input" else _arg, meta)
fwd_error("batch_sizes-meta", "batch_sizes", meta, packed=True)


def _all_meta(mutate):
    def thunk():
        a = [meta(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
             for t in fwd_args()]
        mutate(a)
        return FWD(*a)
    return thunk


CASES["forward/all-meta-weight_ih-shape"] = (
    "error", "weight_ih", _all_meta(lambda a: a.__setitem__(2, a[2][:, :2])))
CASES["forward/all-meta-hx-batch"] = (
    "error", "hx", _all_meta(lambda a: a.__setitem__(1, a[1][:1])))
CASES["forward/all-meta-input-rank"] = (
    "error", "input", _all_meta(lambda a: a.__setitem__(0, a[0][0])))

# ---- missing tensors (None where a tensor is required) -----------------------------------
for _arg in ("input", "hx", "weight_ih", "weight_hh"):
    fwd_error(f"{_arg}-None", _arg, None)
# A packed [N, I] input given without batch_sizes is a rank error naming input.
CASES["forward/packed-input-batch_sizes-None"] = (
    "error", "input", lambda: FWD(*(fwd_args(True)[:6] + [None, False, False])))

# ---- empty tensors and absurd sizes ------------------------------------------------------
fwd_error("hx-empty", "hx", torch.zeros(0, H))
# H is read from weight_hh, so an inconsistent weight_hh may be reported as weight_ih's
# mismatch: either name is right.
fwd_error("weight_hh-empty", ("weight_hh", "weight_ih"), torch.zeros(0, 0))
fwd_error("weight_ih-empty", "weight_ih", torch.zeros(H, 0))
fwd_error("hx-huge-batch", "hx", huge_rows(2 ** 40, H))
fwd_error("packed-hx-huge-batch", "hx", huge_rows(2 ** 40, H), packed=True)
fwd_error("weight_hh-huge", ("weight_hh", "weight_ih"), huge_rows(2 ** 31 + 1, 2 ** 31 + 1))
fwd_error("weight_ih-huge-input-size", "weight_ih", huge_rows(H, 2 ** 40))

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
    "error", "input", lambda: FWD(*(fwd_args(False)[:6] + [torch.tensor(BATCH_SIZES), False, False])))
CASES["forward/batch_sizes-absurd-empty-input"] = (
    # 4 * 2**62 wraps around to 0 = the input's rows: must not be taken for an empty input
    # (hidden size 0, so that an hx of 2**62 rows can exist).
    "error", "batch_sizes",
    lambda: FWD(torch.zeros(0, I), huge_rows(2 ** 62, 0), torch.zeros(0, I), torch.zeros(0, 0),
                None, None, torch.tensor([2 ** 62] * 4), False, False))

# ---- backward ----------------------------------------------------------------------------
bwd_error("grad_output-shape", "grad_output", lambda g: g[:, :2])
bwd_error("grad_output-rank", "grad_output", lambda g: g[0])
bwd_error("grad_output-dtype", "grad_output", lambda g: g.double())
bwd_error("grad_output-meta", "grad_output", meta)
bwd_error("grad_output-None", "grad_output", None)
bwd_error("grad_h_n-shape", "grad_h_n", lambda g: g[:1])
bwd_error("grad_h_n-3d", "grad_h_n", lambda g: g[None])
bwd_error("grad_h_n-dtype", "grad_h_n", lambda g: g.bfloat16())
bwd_error("grad_h_n-meta", "grad_h_n", meta)
bwd_error("grad_h_n-None", "grad_h_n", None)
bwd_error("output-shape", "output", lambda o: o[:, :, :2])
bwd_error("output-rank", "output", lambda o: o.reshape(-1))
bwd_error("output-dtype", "output", lambda o: o.long())
bwd_error("output-meta", "output", meta)
bwd_error("output-None", "output", None)
bwd_error("input-rank", "input", lambda x: x[0])
bwd_error("input-None", "input", None)
bwd_error("hx-batch", "hx", lambda h: h[:1])
bwd_error("hx-meta", "hx", meta)
bwd_error("weight_ih-shape", "weight_ih", lambda w: w[:, :1])
bwd_error("weight_hh-dtype", "weight_hh", lambda w: w.double())
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
        out, h_n = FWD(*a)
        ref_out, ref_h = elman_reference(*a[:7], relu=a[7], reverse=a[8])
        ok = _close(out, ref_out) and _close(h_n, ref_h)
        return ok, f"out {tuple(out.shape)} vs {tuple(ref_out.shape)}"
    return thunk


def _drop(*positions):
    return lambda a: [a.__setitem__(p, None) for p in positions]


CASES["valid/bias_ih-only"] = ("parity", None, parity_with_reference(_drop(5)))
CASES["valid/bias_hh-only"] = ("parity", None, parity_with_reference(_drop(4)))
CASES["valid/no-bias"] = ("parity", None, parity_with_reference(_drop(4, 5)))
CASES["valid/batch_sizes-non-contiguous"] = ("parity", None, parity_with_reference(
    lambda a: a.__setitem__(6, torch.tensor([[3, 9], [2, 9], [2, 9], [1, 9]])[:, 0]), packed=True))
CASES["valid/T0-padded"] = ("parity", None, parity_with_reference(
    lambda a: a.__setitem__(0, a[0][:0])))
CASES["valid/T0-packed"] = ("parity", None, parity_with_reference(
    lambda a: (a.__setitem__(0, a[0][:0]), a.__setitem__(6, torch.zeros(0, dtype=torch.long))),
    packed=True))
CASES["valid/B0"] = ("parity", None, parity_with_reference(
    lambda a: (a.__setitem__(0, a[0][:, :0]), a.__setitem__(1, a[1][:0]))))
CASES["valid/expanded-everything"] = ("parity", None, parity_with_reference(
    lambda a: [a.__setitem__(i, a[i].flatten()[:1].expand(a[i].shape)) for i in range(6)]))
def _all_meta_valid():
    a = [meta(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
         for t in fwd_args(packed=True)]
    out, h_n = FWD(*a)
    ok = out.device.type == h_n.device.type == "meta" and out.shape == (N, H) and h_n.shape == (B, H)
    return ok, f"{out.device} {tuple(out.shape)} {tuple(h_n.shape)}"


CASES["valid/all-meta-packed"] = ("parity", None, _all_meta_valid)
CASES["valid/relu-reverse-packed"] = ("parity", None, parity_with_reference(
    lambda a: (a.__setitem__(7, True), a.__setitem__(8, True)), packed=True))


# ---- NaN and Inf: the same propagation as torch.nn.RNN, forward and backward --------------
def nan_parity(poison, relu, packed, expect_nonfinite=True):
    """Poisons one argument, runs one layer through fastrnn and torch.nn.RNN, and checks
    that NaN/Inf land in the same places of output, h_n and every gradient, and that
    finite values agree."""

    def thunk():
        torch.manual_seed(0)
        ref = torch.nn.RNN(I, H, nonlinearity="relu" if relu else "tanh").double()
        x = torch.randn(T, B, I, dtype=torch.float64)
        h0 = torch.randn(1, B, H, dtype=torch.float64)
        with torch.no_grad():
            poison(x, h0, dict(ref.named_parameters()))
        lengths = torch.tensor([4, 3, 1])
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
                out, h_n = FWD(inp, hs[0], *params, batch_sizes, relu, False)
            else:
                m = torch.nn.RNN(I, H, nonlinearity="relu" if relu else "tanh").double()
                with torch.no_grad():
                    for p, q in zip(m.parameters(), params):
                        p.copy_(q)
                feed = torch.nn.utils.rnn.PackedSequence(inp, batch_sizes) if packed else inp
                out, h = torch.func.functional_call(
                    m, dict(zip([n for n, _ in m.named_parameters()], params)), (feed, hs))
                out = out.data if packed else out
                h_n = h[0]
            g = torch.Generator().manual_seed(1)
            loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum() + (
                h_n * torch.randn(h_n.shape, generator=g, dtype=out.dtype)).sum()
            results.append([out, h_n, *torch.autograd.grad(loss, [xs, hs, *params])])
        names = ["output", "h_n", "grad_input", "grad_hx", "grad_weight_ih", "grad_weight_hh",
                 "grad_bias_ih", "grad_bias_hh"]
        bad = []
        for name, want, got in zip(names, *results):
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
    "hx-nan": lambda x, h, p: h[0, 2, 3].fill_(NAN),
    "weight_hh-nan": lambda x, h, p: p["weight_hh_l0"][1, 2].fill_(NAN),
    "weight_ih-inf": lambda x, h, p: p["weight_ih_l0"][0, 4].fill_(-INF),
    "bias-inf-minus-inf": lambda x, h, p: (p["bias_ih_l0"][2].fill_(INF),
                                           p["bias_hh_l0"][2].fill_(-INF)),
    "bias-inf": lambda x, h, p: p["bias_hh_l0"][3].fill_(INF),
}
for _pname, _poison in _POISONS.items():
    for _relu in (False, True):
        for _packed in (False, True):
            CASES[f"nan/{_pname}-{'relu' if _relu else 'tanh'}-{'packed' if _packed else 'padded'}"] = (
                "parity", None,
                nan_parity(_poison, _relu, _packed, expect_nonfinite=_relu or _pname != "bias-inf"))


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
