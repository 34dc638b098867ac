"""The raw ops fastrnn::rnn and fastrnn::rnn_backward (and the wrapper fastrnn.rnn):
against fastrnn.reference.rnn_reference (padded/packed, 1-3 layers, both directions,
tanh/relu, with and without biases, dropout with the masks read back from ``reserve``),
the reserve layout, dropout masks, gradcheck, torch.library.opcheck, torch.compile,
fake kernels, gradients not needed, double backward, bad arguments (every check of
csrc/checks.h), autocast, and hostile arguments in a child process (a crash is a
failing case, not a dead pytest; tests/hostile_ops_child.py)."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import fastrnn
from fastrnn.reference import layer_reference

import hostile_ops_child
from conftest import (LAYOUTS, PROPERTY, Case, OpArgs, OpCalls, case_id, devices, flat, grid,
                      op_inputs, tolerance, weight_shapes, weighted_sum, with_layout)

RNN = torch.ops.fastrnn.rnn
RNN_BACKWARD = torch.ops.fastrnn.rnn_backward
EXACT = dict(rtol=1e-10, atol=1e-12)  # float64, the same math in another order

BASE = Case(steps=4, batch=3, input_size=5, hidden_size=4, h0=True)
GRID = grid(BASE, nonlinearity=["tanh", "relu"], bias=[True, False], bidirectional=[False, True],
            num_layers=[1, 2, 3], packed=[False, True])
DROPOUT_GRID = grid(BASE.replace(dropout=0.5), nonlinearity=["tanh", "relu"],
                    bidirectional=[False, True], num_layers=[2, 3], packed=[False, True])
# dropout 1 (every mask zero), dropout set but not training (no masks), dropout with one
# layer (never applied), no biases
DROPOUT_EDGES = [
    BASE.replace(dropout=1.0, num_layers=2, bidirectional=True, packed=True),
    BASE.replace(dropout=0.5, num_layers=3, train=False),
    BASE.replace(dropout=0.5, num_layers=1, bidirectional=True),
    BASE.replace(dropout=0.25, num_layers=2, bias=False, nonlinearity="relu"),
]


def upstream(*outputs, seed=3):
    """Random upstream gradients of the op's outputs (output, h_n[, c_n])."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in outputs)


def check_against_reference(case):
    """Forward (output, h_n, the reserve's layer outputs and masks) and every gradient
    of the raw op against rnn_reference with the op's own masks."""
    args = op_inputs(case, requires_grad=True)
    torch.manual_seed(1234)
    out, h_n, reserve = args.call()
    rows, width = args.rows, case.directions * case.hidden_size
    assert out.shape == (*args.input.shape[:-1], width)
    assert h_n.shape == (case.cells, case.batch, case.hidden_size)
    assert out.dtype == h_n.dtype == reserve.dtype == case.dtype
    assert not reserve.requires_grad
    layer_outputs, masks = args.reserve_parts(reserve)  # asserts the reserve's size

    keep = 1 - case.dropout
    for m in masks:
        values = m.unique()
        allowed = torch.tensor([0.0] + ([1 / keep] if keep > 0 else []), dtype=m.dtype)
        assert all(bool(torch.isclose(v.cpu(), allowed).any()) for v in values), values

    ref_out, ref_h = args.reference(masks=[m.detach() for m in masks])
    torch.testing.assert_close(out, ref_out, **EXACT)
    torch.testing.assert_close(h_n, ref_h, **EXACT)
    for layer, saved in enumerate(layer_outputs):  # the reserve holds layer l's output
        want, _ = args.reference(masks=[m.detach() for m in masks[:layer]], num_layers=layer + 1)
        torch.testing.assert_close(saved, want.detach(), **EXACT)

    g_out, g_h = upstream(out, h_n)
    got = torch.autograd.grad((out, h_n), args.leaves(), (g_out, g_h))
    want = torch.autograd.grad((ref_out, ref_h), args.leaves(), (g_out, g_h))
    for i, (a, e) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, e, **EXACT, msg=lambda m: f"gradient {i}: {m}")
    return masks


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_matches_reference(case, device):
    check_against_reference(case.replace(device=device))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", DROPOUT_GRID + DROPOUT_EDGES, ids=case_id)
def test_dropout_matches_reference_with_reserved_masks(case, device):
    masks = check_against_reference(case.replace(device=device))
    assert len(masks) == (case.num_layers - 1 if case.dropout_applied else 0)
    if case.dropout == 1.0:
        assert all(bool((m == 0).all()) for m in masks)
    elif masks:
        assert all(bool((m == 0).any()) and bool((m != 0).any()) for m in masks)


def test_zero_hx_and_float32():
    """No h0 (zeros, what the module passes) and float32 against the float64 reference."""
    case = BASE.replace(h0=False, dtype=torch.float32, num_layers=2, bidirectional=True)
    args = op_inputs(case)
    out, h_n, _ = args.call()
    args64 = op_inputs(case.replace(dtype=torch.float64))
    ref_out, ref_h = args64.reference()
    torch.testing.assert_close(out, ref_out.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_n, ref_h.float(), rtol=1e-5, atol=1e-6)


def test_wrapper_matches_op():
    """fastrnn.rnn is the op with keyword arguments (has_biases from the weight count),
    returning (output, h_n)."""
    for case in (BASE.replace(num_layers=2, bidirectional=True, packed=True),
                 BASE.replace(num_layers=3, bias=False, nonlinearity="relu")):
        args = op_inputs(case)
        out, h_n, _ = args.call()
        got = fastrnn.rnn(args.input, args.hx, args.weights, num_layers=case.num_layers,
                          bidirectional=case.bidirectional, nonlinearity=case.nonlinearity,
                          batch_sizes=args.batch_sizes)
        assert len(got) == 2
        assert torch.equal(got[0], out) and torch.equal(got[1], h_n)


# ---------------------------------------------------------------------------------------
# Property-based: the raw op against the reference over sizes (0 included), memory
# layouts, requires_grad patterns, packed lengths, dtypes, entry points
# ---------------------------------------------------------------------------------------


@st.composite
def op_cases(draw):
    packed = draw(st.booleans())
    c = dict(
        case=Case(
            dtype=draw(st.sampled_from([torch.float32, torch.float64])),
            nonlinearity=draw(st.sampled_from(["tanh", "relu"])),
            bias=draw(st.booleans()),
            bidirectional=draw(st.booleans()),
            num_layers=draw(st.integers(1, 3)),
            packed=packed,
            h0=True,
            dropout=draw(st.sampled_from([0.0, 0.0, 0.5, 1.0])),
            train=draw(st.booleans()),
            steps=draw(st.integers(0, 5)),
            batch=draw(st.integers(0, 4)),
            input_size=draw(st.integers(0, 4)),
            hidden_size=draw(st.integers(0, 5)),
            seed=draw(st.integers(0, 2 ** 16)),
        ),
        layouts=draw(st.lists(st.sampled_from(LAYOUTS), min_size=26, max_size=26)),
        batch_sizes_layout=draw(st.sampled_from(["contiguous", "sliced"])),
        requires_grad=draw(st.lists(st.booleans(), min_size=26, max_size=26)),
        entry=draw(st.sampled_from(["fastrnn.rnn", "torch.ops"])),
    )
    if packed:
        steps = c["case"].steps
        lengths = draw(st.lists(st.integers(1, max(steps, 1)), min_size=c["case"].batch,
                                max_size=c["case"].batch))
        c["lengths"] = sorted(lengths, reverse=True)
    return c


def build_op_property_case(c):
    case = c["case"]
    g = torch.Generator().manual_seed(case.seed)

    def rand(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1).to(case.dtype)

    batch_sizes = None
    if case.packed:
        lengths = c["lengths"]
        steps = max(lengths, default=0)
        batch_sizes = with_layout(
            torch.tensor([sum(1 for n in lengths if n > t) for t in range(steps)], dtype=torch.long),
            c["batch_sizes_layout"])
        x = rand(sum(lengths), case.input_size)
    else:
        x = rand(case.steps, case.batch, case.input_size)
    hx = rand(case.cells, case.batch, case.hidden_size)
    tensors = [x, hx, *[rand(*shape) for shape in weight_shapes(case)]]
    laid = []
    for t, layout, rg in zip(tensors, c["layouts"], c["requires_grad"]):
        laid.append(with_layout(t, layout).requires_grad_(rg))
    return OpArgs(case, laid[0], laid[1], laid[2:], batch_sizes)


def grads_of(outputs, tensors):
    """Gradients of a weighted sum of ``outputs`` (zeros for tensors not reached)."""
    if not tensors:
        return []
    if not any(o.requires_grad for o in outputs):  # not connected: zero gradients
        return [torch.zeros_like(t) for t in tensors]
    g = torch.Generator().manual_seed(5)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)).sum()
               for o in outputs)
    return list(torch.autograd.grad(loss, tensors, allow_unused=True, materialize_grads=True))


def check_op_property(c):
    args = build_op_property_case(c)
    case = args.case
    leaves = [t for t in args.leaves() if t.requires_grad]
    torch.manual_seed(case.seed)
    if c["entry"] == "torch.ops":
        out, h_n, reserve = args.call()
        _, masks = args.reserve_parts(reserve)
    else:
        out, h_n = fastrnn.rnn(args.input, args.hx, args.weights, num_layers=case.num_layers,
                               bidirectional=case.bidirectional, nonlinearity=case.nonlinearity,
                               dropout=case.dropout, train=case.train,
                               batch_sizes=args.batch_sizes)
        torch.manual_seed(case.seed)  # the same masks again, from the raw op's reserve
        _, masks = args.reserve_parts(args.call()[2])
    got = [out, h_n, *grads_of([out, h_n], leaves)]
    ref_out, ref_h = args.reference(masks=[m.detach() for m in masks])
    want = [ref_out, ref_h, *grads_of([ref_out, ref_h], leaves)]
    assert len(got) == len(want)
    for i, (a, e) in enumerate(zip(got, want)):
        assert a.shape == e.shape and a.dtype == e.dtype, (i, a.shape, e.shape)
        torch.testing.assert_close(a, e, **tolerance(a, case.dtype),
                                   msg=lambda m: f"tensor {i}: {m}")


_OP_BASE = dict(case=Case(steps=3, batch=2, input_size=3, hidden_size=4, h0=True),
                layouts=["contiguous"] * 26, batch_sizes_layout="contiguous",
                requires_grad=[True] * 26, entry="torch.ops")


def _op_example(lengths=None, **changes):
    c = dict(_OP_BASE)
    c["case"] = c["case"].replace(**changes)
    if lengths is not None:
        c["lengths"] = lengths
    return c


@given(op_cases())
@example(_op_example(steps=0))  # T = 0: empty output, h_n = hx
@example(_op_example(batch=0, num_layers=2, bidirectional=True))  # batch 0: empty results
@example(_op_example(packed=True, batch=0, lengths=[]))  # packed, T = 0 and batch 0
@example(_op_example(packed=True, batch=3, lengths=[2, 2, 2], bidirectional=True))
@example(_op_example(input_size=0, num_layers=2))  # I = 0: only the recurrence and the bias
@example(_op_example(hidden_size=0, num_layers=3, bidirectional=True))
@example(_op_example(steps=0, batch=0, input_size=0, hidden_size=0, bias=False, num_layers=2,
                     dtype=torch.float32) | dict(requires_grad=[True] + [False] * 25,
                                                 entry="fastrnn.rnn"))
@example(_op_example(nonlinearity="relu", num_layers=2) | dict(layouts=["expanded"] * 26))
@example(_op_example(packed=True, batch=4, lengths=[5, 3, 3, 1], steps=5, num_layers=3,
                     bidirectional=True, dropout=0.5, train=True)
         | dict(batch_sizes_layout="sliced",
                layouts=["sliced", "transposed", "transposed", "sliced", "expanded"] * 5 + ["sliced"],
                requires_grad=[False, True, False, True, True, False] * 4 + [True, True]))
@PROPERTY
def test_ops_match_reference_property(c):
    check_op_property(c)


# ---------------------------------------------------------------------------------------
# Dropout: the masks
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_dropout_mask_statistics(p):
    """Each mask element is 0 with probability p (else 1/(1-p)), independently: the
    fraction of zeros per layer is within 5 standard deviations of p; layers' masks
    differ; two calls draw new masks; torch.manual_seed repeats them."""
    case = Case(num_layers=3, bidirectional=True, dropout=p, steps=20, batch=50,
                input_size=3, hidden_size=16, dtype=torch.float32)
    args = op_inputs(case)
    torch.manual_seed(7)
    _, _, reserve = args.call()
    _, masks = args.reserve_parts(reserve)
    n = masks[0].numel()
    sigma = math.sqrt(p * (1 - p) / n)
    for m in masks:
        assert abs(float((m == 0).float().mean()) - p) < 5 * sigma
        assert torch.equal(m.unique(), torch.tensor([0.0, 1 / (1 - p)]))
        # the mean of the mask is 1: the expectation of a layer's input is kept
        assert abs(float(m.mean()) - 1) < 5 * sigma / (1 - p)
    assert not torch.equal(masks[0], masks[1])
    _, _, again = args.call()
    assert not torch.equal(args.reserve_parts(again)[1][0], masks[0])
    torch.manual_seed(7)
    _, _, repeat = args.call()
    assert torch.equal(repeat, reserve)


def test_dropout_not_applied_when_not_training_or_one_layer():
    """train=False: no masks in the reserve and the output of the plain stack; the same
    for one layer in training (dropout only applies between layers)."""
    for case in (BASE.replace(num_layers=2, dropout=0.9, train=False),
                 BASE.replace(num_layers=1, dropout=0.9, train=True)):
        args = op_inputs(case)
        out, h_n, reserve = args.call()
        assert reserve.numel() == (case.num_layers - 1) * args.rows * case.hidden_size
        ref_out, ref_h = args.reference()
        torch.testing.assert_close(out, ref_out, **EXACT)
        torch.testing.assert_close(h_n, ref_h, **EXACT)


def test_dropout_uses_torch_generator_not_global_state():
    """Masks come from torch's default generator: torch.manual_seed repeats a whole
    training forward, and a draw from the generator in between changes it."""
    args = op_inputs(BASE.replace(num_layers=2, dropout=0.5))
    torch.manual_seed(3)
    first = args.call()
    torch.manual_seed(3)
    torch.rand(1)
    other = args.call()
    torch.manual_seed(3)
    same = args.call()
    assert all(torch.equal(a, b) for a, b in zip(first, same))
    assert not torch.equal(first[2], other[2])


# ---------------------------------------------------------------------------------------
# gradcheck
# ---------------------------------------------------------------------------------------

SMALL = Case(steps=3, batch=2, input_size=2, hidden_size=3, h0=True, seed=5)
GRADCHECK = [
    SMALL,
    SMALL.replace(nonlinearity="relu", bias=False, bidirectional=True, packed=True),
    SMALL.replace(num_layers=2, packed=True),
    SMALL.replace(num_layers=3, bidirectional=True, nonlinearity="relu"),
    SMALL.replace(num_layers=2, bidirectional=True, packed=True, dropout=0.4),
    SMALL.replace(num_layers=3, nonlinearity="relu", bias=False, dropout=0.5),
]


@pytest.mark.parametrize("case", GRADCHECK, ids=case_id)
def test_gradcheck(case):
    """float64 gradcheck of fastrnn.rnn with respect to input, hx and every weight; with
    dropout, every evaluation draws the same masks (a fixed seed)."""
    args = op_inputs(case, requires_grad=True, scale=0.5)

    def fn(x, hx, *weights):
        with torch.random.fork_rng():
            torch.manual_seed(99)
            return fastrnn.rnn(x, hx, weights, num_layers=case.num_layers,
                               bidirectional=case.bidirectional, nonlinearity=case.nonlinearity,
                               dropout=case.dropout, train=case.train,
                               batch_sizes=args.batch_sizes)

    assert torch.autograd.gradcheck(fn, tuple(args.leaves()))


# ---------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------

# Deterministic configurations only: opcheck runs the op several times and compares.
OPCHECK = [
    BASE,
    BASE.replace(packed=True, nonlinearity="relu", bias=False),
    BASE.replace(num_layers=2, bidirectional=True, packed=True),
    BASE.replace(num_layers=3, bidirectional=True, dropout=0.5, train=False),
    BASE.replace(num_layers=2, nonlinearity="relu", h0=False),
]


@pytest.mark.parametrize("case", OPCHECK, ids=case_id)
def test_opcheck_forward(case):
    args = op_inputs(case, requires_grad=True)
    torch.library.opcheck(RNN.default, args.raw())


def test_opcheck_forward_with_dropout():
    """Random masks: the checks that do not compare two runs' values."""
    args = op_inputs(BASE.replace(num_layers=3, bidirectional=True, packed=True, dropout=0.5),
                     requires_grad=True)
    torch.library.opcheck(RNN.default, args.raw(),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def backward_args(case, need_input, need_weight, seed=0):
    """The case's *_backward arguments: the forward's, its output and reserve, upstream
    gradients of output, h_n (and c_n), the need_* flags."""
    args = op_inputs(case)
    torch.manual_seed(seed)
    *outputs, reserve = args.call()
    return args, (*args.raw(), outputs[0], reserve, *upstream(*outputs), need_input, need_weight)


NEEDS = [(True, True), (False, True), (True, False), (False, False)]


@pytest.mark.parametrize("need", NEEDS, ids=lambda n: f"input{int(n[0])}-weight{int(n[1])}")
@pytest.mark.parametrize("case", [
    BASE.replace(num_layers=2, bidirectional=True, packed=True),
    # the backward reads its masks from the reserve: deterministic with dropout too
    BASE.replace(num_layers=3, dropout=0.5, nonlinearity="relu", bias=False),
], ids=case_id)
def test_opcheck_backward(case, need):
    _, bwd = backward_args(case, *need)
    torch.library.opcheck(RNN_BACKWARD.default, bwd)


@pytest.mark.parametrize("case", [
    BASE.replace(num_layers=2, bidirectional=True, packed=True),
    BASE.replace(num_layers=3, dropout=0.5, nonlinearity="relu"),
    BASE.replace(num_layers=1, bias=False),
], ids=case_id)
def test_gradients_not_needed_are_empty(case):
    """need_input_grad / need_weight_grad False: those gradients are empty [0] tensors,
    the others (and grad_hx, always) equal to the full call's."""
    args, full_args = backward_args(case, True, True)
    full_input, full_hx, full_weights = RNN_BACKWARD(*full_args)
    assert full_input.shape == args.input.shape
    assert [g.shape for g in full_weights] == [w.shape for w in args.weights]
    for need_input, need_weight in NEEDS[1:]:
        bwd = (*full_args[:-2], need_input, need_weight)
        g_input, g_hx, g_weights = RNN_BACKWARD(*bwd)
        assert len(g_weights) == len(args.weights)
        assert torch.equal(g_hx, full_hx)
        if need_input:
            assert torch.equal(g_input, full_input)
        else:
            assert g_input.shape == (0,)
        for g, full in zip(g_weights, full_weights):
            if need_weight:
                assert torch.equal(g, full)
            else:
                assert g.shape == (0,)
    # the two bias gradients are equal (and distinct tensors)
    if case.bias:
        for cell in range(case.cells):
            b_ih, b_hh = full_weights[cell * 4 + 2], full_weights[cell * 4 + 3]
            assert torch.equal(b_ih, b_hh) and b_ih.data_ptr() != b_hh.data_ptr()


@pytest.mark.parametrize("wanted", ["input", "hx", "weights", "input+hx", "one weight"])
def test_autograd_asks_only_for_needed_gradients(wanted):
    """The autograd formula passes need_input_grad / need_weight_grad from what requires
    grad: one rnn_backward call, and the gradients asked for are right."""
    case = BASE.replace(num_layers=2, bidirectional=True)
    args = op_inputs(case)
    leaves = {"input": [args.input], "hx": [args.hx], "weights": args.weights,
              "input+hx": [args.input, args.hx], "one weight": [args.weights[5]]}[wanted]
    for t in leaves:
        t.requires_grad_()
    full = op_inputs(case, requires_grad=True)
    with OpCalls() as calls:
        out, h_n, _ = args.call()
        got = torch.autograd.grad(out.sum() + h_n.sum(), leaves)
    assert calls.names() == ["rnn", "rnn_backward"]
    need_input, need_weight = calls.calls[1][1][-2:]
    assert need_input == args.input.requires_grad
    assert need_weight == any(w.requires_grad for w in args.weights)
    out, h_n, _ = full.call()
    want = dict(zip(map(id, args.leaves()),
                    torch.autograd.grad(out.sum() + h_n.sum(), full.leaves())))
    for t, g in zip(leaves, got):
        torch.testing.assert_close(g, want[id(t)], **EXACT)


@pytest.mark.parametrize("case", [
    BASE.replace(num_layers=2, h0=True),
    BASE.replace(num_layers=3, bidirectional=True, packed=True, dropout=0.5, nonlinearity="relu"),
    BASE.replace(cell="lstm", num_layers=2, proj_size=2, bidirectional=True, h0=True),
    BASE.replace(cell="lstm", num_layers=2, packed=True, dropout=0.5),
    BASE.replace(cell="gru", num_layers=2, bidirectional=True, dropout=0.5),
], ids=case_id)
def test_double_backward_like_the_reference(case):
    """create_graph=True through the op's autograd: gradients that differentiate again, equal
    to fastrnn.reference's with the call's own dropout masks (read from its reserve)."""
    args = op_inputs(case.replace(dtype=torch.float64), requires_grad=True)
    leaves = args.leaves()

    def second_order(outputs):
        first = torch.autograd.grad(sum((o * o.detach().cos()).sum() for o in outputs), leaves,
                                    create_graph=True)
        return (*first, *torch.autograd.grad(sum(g.sin().sum() for g in first), leaves))

    *outputs, reserve = args.call()
    got = second_order(outputs)
    _, masks = args.reserve_parts(reserve.detach())
    for g, w in zip(got, second_order(args.reference(masks=masks))):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------
# torch.compile of the raw op
# ---------------------------------------------------------------------------------------


COMPILE = [
    (BASE.replace(num_layers=2, bidirectional=True), "aot_eager"),
    (BASE.replace(num_layers=2, bidirectional=True, packed=True, nonlinearity="relu"), "aot_eager"),
    (BASE.replace(num_layers=3, dropout=0.5), "aot_eager"),
    (BASE.replace(num_layers=2, bidirectional=True), "inductor"),
    (BASE.replace(num_layers=3, dropout=0.5, packed=True), "inductor"),
]


@pytest.mark.parametrize("case, backend", COMPILE, ids=[f"{c}-{b}" for c, b in COMPILE])
def test_compile_fullgraph_matches_eager(case, backend):
    """torch.compile(fullgraph=True) of a function calling fastrnn.rnn: output, h_n and
    every gradient as in eager (the same masks under the same seed)."""
    torch._dynamo.reset()

    def step(x, hx, weights, batch_sizes):
        out, h_n = fastrnn.rnn(x, hx, weights, num_layers=case.num_layers,
                               bidirectional=case.bidirectional, nonlinearity=case.nonlinearity,
                               dropout=case.dropout, train=case.train, batch_sizes=batch_sizes)
        return out.tanh() * 2, h_n

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    results = []
    for fn in (step, compiled):
        args = op_inputs(case, requires_grad=True)
        torch.manual_seed(5)
        out, h_n = fn(args.input, args.hx, args.weights, args.batch_sizes)
        g = torch.autograd.grad((out, h_n), args.leaves(), upstream(out, h_n))
        results.append([out, h_n, *g])
    for i, (a, e) in enumerate(zip(*results[::-1])):
        torch.testing.assert_close(a, e, **EXACT, msg=lambda m: f"tensor {i}: {m}")


def test_compile_raw_op_under_fake_tensors():
    """torch.ops.fastrnn.rnn itself under torch.compile, its three outputs included."""
    torch._dynamo.reset()
    case = BASE.replace(num_layers=3, bidirectional=True, packed=True)
    args = op_inputs(case)
    compiled = torch.compile(lambda *a: RNN(*a), fullgraph=True, backend="aot_eager")
    for a, e in zip(compiled(*args.raw()), args.call()):
        torch.testing.assert_close(a, e, **EXACT)


def test_fake_kernels_give_the_real_shapes():
    """Meta tensors (the fake kernels) report the shapes the CPU kernels return, for the
    forward (output, h_n, reserve incl. masks) and the backward (with gradients not
    needed)."""
    for case in (BASE.replace(num_layers=3, bidirectional=True, packed=True, dropout=0.3),
                 BASE.replace(num_layers=2, dropout=0.3, train=False),
                 BASE.replace(num_layers=2, bias=False)):
        args = op_inputs(case)
        real = args.call()
        meta = RNN(*[t.to("meta") if isinstance(t, torch.Tensor) and t.is_floating_point() else
                     [w.to("meta") for w in t] if isinstance(t, list) else t for t in args.raw()])
        assert [m.shape for m in meta] == [r.shape for r in real]
        assert all(m.device.type == "meta" for m in meta)
        for need in NEEDS:
            _, bwd = backward_args(case, *need)
            real_bwd = RNN_BACKWARD(*bwd)
            meta_bwd = RNN_BACKWARD(*[
                t.to("meta") if isinstance(t, torch.Tensor) and t.is_floating_point() else
                [w.to("meta") for w in t] if isinstance(t, list) else t for t in bwd])
            assert meta_bwd[0].shape == real_bwd[0].shape and meta_bwd[1].shape == real_bwd[1].shape
            assert [m.shape for m in meta_bwd[2]] == [r.shape for r in real_bwd[2]]


# ---------------------------------------------------------------------------------------
# Bad arguments: every check of csrc/checks.h names the problem
# ---------------------------------------------------------------------------------------


def _weight(index, change):
    def mutate(a):
        a["weights"] = list(a["weights"])
        a["weights"][index] = change(a["weights"][index])
    return mutate


def _set(name, value):
    def mutate(a):
        a[name] = value(a[name]) if callable(value) else value
    return mutate


# 2 layers, bidirectional, with biases: weights are 16 tensors, cell c's at 4c .. 4c+3
# (weight_ih, weight_hh, bias_ih, bias_hh), cells l0, l0_reverse, l1, l1_reverse.
BAD_FORWARD = {
    # name: (packed input?, mutation, message (a regex))
    "input-None": (False, _set("input", None), "input must be a tensor, got None"),
    "hx-None": (False, _set("hx", None), "hx must be a tensor, got None"),
    "nonlinearity": (False, _set("nonlinearity", "sigmoid"),
                     "unknown nonlinearity 'sigmoid', expected 'tanh' or 'relu'"),
    "num_layers-0": (False, _set("num_layers", 0), "num_layers must be at least 1, got 0"),
    "dropout-negative": (False, _set("dropout", -0.5), r"dropout must be in \[0, 1\], got -0.5"),
    "dropout-above-1": (False, _set("dropout", 1.5), r"dropout must be in \[0, 1\], got 1.5"),
    "dropout-nan": (False, _set("dropout", math.nan), r"dropout must be in \[0, 1\], got nan"),
    "weights-count": (False, _set("weights", lambda w: w[:-1]),
                      r"expected 2 layer\(s\) x 2 direction\(s\) x 4 weights \(weight_ih, "
                      r"weight_hh, bias_ih, bias_hh\), got 15"),
    "weights-count-no-bias": (False, _set("has_biases", False),
                              r"expected 2 layer\(s\) x 2 direction\(s\) x 2 weights "
                              r"\(weight_ih, weight_hh\), got 16"),
    "num_layers-vs-weights": (False, _set("num_layers", 3), r"expected 3 layer\(s\) x 2 direction\(s\) x 4 weights"),
    "input-int": (False, _set("input", lambda x: x.int()), "input dtype Int is not supported on CPU"),
    "input-bool": (False, _set("input", lambda x: x > 0), "input dtype Bool is not supported on CPU"),
    "input-2d-padded": (False, _set("input", lambda x: x[0]),
                        r"input must be 3-D \[T, B, I\] when batch_sizes is None, got 2-D"),
    "input-3d-packed": (True, _set("input", lambda x: x[None]),
                        r"input must be 2-D \[N, I\] when batch_sizes is given, got 3-D"),
    "hx-2d": (False, _set("hx", lambda h: h[0]), r"hx must be 3-D \[L\*D, B, H\], got 2-D"),
    "weight_hh_l0-1d": (False, _weight(1, lambda w: w[0]), r"weight_hh_l0 must be 2-D \[H, H\], got \[4\]"),
    "weight_ih_l0-shape": (False, _weight(0, lambda w: w[:, :2]),
                           r"weight_ih_l0 must have shape \[4, 5\], got \[4, 2\]"),
    "weight_ih_l1-shape": (False, _weight(8, lambda w: w[:, :4]),
                           r"weight_ih_l1 must have shape \[4, 8\], got \[4, 4\]"),
    "weight_hh_l0_reverse-shape": (False, _weight(5, lambda w: w[:3]),
                                   r"weight_hh_l0_reverse must have shape \[4, 4\], got \[3, 4\]"),
    "weight_hh_l1-not-square": (False, _weight(9, lambda w: torch.cat([w, w], 1)),
                                r"weight_hh_l1 must have shape \[4, 4\], got \[4, 8\]"),
    "bias_ih_l1_reverse-shape": (False, _weight(14, lambda b: b[:2]),
                                 r"bias_ih_l1_reverse must have shape \[4\], got \[2\]"),
    "bias_hh_l0-2d": (False, _weight(3, lambda b: b[None]),
                      r"bias_hh_l0 must have shape \[4\], got \[1, 4\]"),
    "weight_hh_l1_reverse-dtype": (False, _weight(13, lambda w: w.float()),
                                   r"weight_hh_l1_reverse must have the same dtype as input "
                                   r"\(Double\), got Float"),
    "bias_ih_l0-dtype": (False, _weight(2, lambda b: b.half()),
                         r"bias_ih_l0 must have the same dtype as input \(Double\), got Half"),
    "hx-dtype": (False, _set("hx", lambda h: h.float()),
                 r"hx must have the same dtype as input \(Double\), got Float"),
    "hx-layers": (False, _set("hx", lambda h: h[:3]), r"hx must have shape \[4, 3, 4\], got \[3, 3, 4\]"),
    "hx-batch": (False, _set("hx", lambda h: h[:, :2]), r"hx must have shape \[4, 3, 4\], got \[4, 2, 4\]"),
    "hx-hidden": (False, _set("hx", lambda h: torch.cat([h, h], 2)),
                  r"hx must have shape \[4, 3, 4\], got \[4, 3, 8\]"),
    "packed-hx-batch": (True, _set("hx", lambda h: h[:, :2]), r"hx must have shape \[4, 3, 4\]"),
    # a meta tensor among CPU tensors: the fake kernel answers (fastrnn/ops.py)
    "hx-meta": (False, _set("hx", lambda h: h.to("meta")), "hx must be on the same device as input"),
    "bias_hh_l1_reverse-meta": (False, _weight(15, lambda b: b.to("meta")),
                                "bias_hh_l1_reverse must be on the same device as input"),
    "batch_sizes-meta": (True, _set("batch_sizes", lambda b: b.to("meta")),
                         "batch_sizes must be a 1-D int64 CPU tensor"),
    "batch_sizes-dtype": (True, _set("batch_sizes", lambda b: b.double()),
                          "batch_sizes must be a 1-D int64 CPU tensor"),
    "batch_sizes-2d": (True, _set("batch_sizes", lambda b: b[None]),
                       "batch_sizes must be a 1-D int64 CPU tensor"),
    "batch_sizes-zero": (True, _set("batch_sizes", torch.tensor([3, 3, 2, 0])),
                         r"batch_sizes must be positive, got batch_sizes\[3\] = 0"),
    "batch_sizes-increasing": (True, _set("batch_sizes", torch.tensor([2, 3, 2, 1])),
                               r"batch_sizes must be non-increasing, got batch_sizes\[1\] = 3 after 2"),
    "batch_sizes-sum-too-big": (True, _set("batch_sizes", lambda b: b + 1),
                                r"input has \d+ rows but batch_sizes sums to more \(\d+ \+ \d+ by "
                                r"batch_sizes\[\d\]\)"),
    "batch_sizes-sum-too-small": (True, _set("batch_sizes", lambda b: b[:-1]),
                                  r"input has \d+ rows but batch_sizes sums to \d+$"),
}

BAD_CASE = BASE.replace(num_layers=2, bidirectional=True)
ARG_NAMES = ["input", "hx", "weights", "has_biases", "num_layers", "dropout", "train",
             "bidirectional", "nonlinearity", "batch_sizes"]


def named_args(packed):
    args = op_inputs(BAD_CASE.replace(packed=packed))
    return dict(zip(ARG_NAMES, args.raw())), args


@pytest.mark.parametrize("name", list(BAD_FORWARD))
def test_forward_bad_arguments_name_the_problem(name):
    packed, mutate, match = BAD_FORWARD[name]
    a, _ = named_args(packed)
    mutate(a)
    with pytest.raises(RuntimeError, match=match) as info:
        RNN(*a.values())
    assert str(info.value).startswith("fastrnn::rnn: "), str(info.value)


BAD_BACKWARD = {
    # name: (packed?, mutation of the backward's arguments, message)
    "output-shape": (False, _set("output", lambda o: o[:, :, :4]),
                     r"output must have shape \[4, 3, 8\], got \[4, 3, 4\]"),
    "output-None": (False, _set("output", None), "output must be a tensor, got None"),
    "output-dtype": (False, _set("output", lambda o: o.float()),
                     r"output must have the same dtype as input \(Double\), got Float"),
    "grad_output-rows": (True, _set("grad_output", lambda g: g[:5]),
                         r"grad_output must have shape \[\d+, 8\], got \[5, 8\]"),
    "grad_output-None": (False, _set("grad_output", None), "grad_output must be a tensor, got None"),
    "grad_output-dtype": (False, _set("grad_output", lambda g: g.bfloat16()),
                          r"grad_output must have the same dtype as input \(Double\), got BFloat16"),
    "reserve-size": (False, _set("reserve", lambda r: r[1:]), r"reserve must have shape \[\d+\]"),
    "reserve-masks-missing": (False, _set("train", True), r"reserve must have shape \[\d+\]"),
    "reserve-None": (False, _set("reserve", None), "reserve must be a tensor, got None"),
    "reserve-dtype": (False, _set("reserve", lambda r: r.float()),
                      r"reserve must have the same dtype as input \(Double\), got Float"),
    "grad_h_n-shape": (False, _set("grad_h_n", lambda g: g[:2]),
                       r"grad_h_n must have shape \[4, 3, 4\], got \[2, 3, 4\]"),
    "reserve-meta": (False, _set("reserve", lambda r: r.to("meta")),
                     "reserve must be on the same device as input"),
    "grad_h_n-None": (False, _set("grad_h_n", None), "grad_h_n must be a tensor, got None"),
    "grad_h_n-dtype": (False, _set("grad_h_n", lambda g: g.float()),
                       r"grad_h_n must have the same dtype as input \(Double\), got Float"),
    # the forward's checks run in the backward too
    "hx-shape": (False, _set("hx", lambda h: h[:, :2]), r"hx must have shape \[4, 3, 4\]"),
    "weight_ih_l1_reverse-shape": (False, _weight(12, lambda w: w[:, :2]),
                                   r"weight_ih_l1_reverse must have shape \[4, 8\]"),
    "nonlinearity": (False, _set("nonlinearity", "gelu"), "unknown nonlinearity 'gelu'"),
    "batch_sizes-increasing": (True, _set("batch_sizes", torch.tensor([2, 3, 2, 1])),
                               "batch_sizes must be non-increasing"),
}
BWD_NAMES = ARG_NAMES + ["output", "reserve", "grad_output", "grad_h_n", "need_input_grad",
                         "need_weight_grad"]


@pytest.mark.parametrize("name", list(BAD_BACKWARD))
def test_backward_bad_arguments_name_the_problem(name):
    packed, mutate, match = BAD_BACKWARD[name]
    # dropout 0.5 without training: flipping train to True makes the reserve too small
    case = BAD_CASE.replace(packed=packed, dropout=0.5, train=False)
    _, bwd = backward_args(case, True, True)
    a = dict(zip(BWD_NAMES, bwd))
    mutate(a)
    with pytest.raises(RuntimeError, match=match) as info:
        RNN_BACKWARD(*a.values())
    assert str(info.value).startswith("fastrnn::rnn_backward: "), str(info.value)


# ---------------------------------------------------------------------------------------
# Autocast on the raw op
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_autocast_raw_op(dtype):
    """Under CPU autocast the op (torch.ops.fastrnn.rnn and fastrnn.rnn) runs in the
    autocast dtype: outputs in it, close to the float32 reference; float32 leaves get
    float32 gradients; float64 is not autocast."""
    case = BASE.replace(num_layers=2, bidirectional=True, packed=True, dtype=torch.float32)
    args = op_inputs(case, requires_grad=True)
    ref_out, ref_h = args.reference()
    with torch.autocast("cpu", dtype=dtype):
        out, h_n, reserve = args.call()
        out2, h2 = fastrnn.rnn(args.input, args.hx, args.weights, num_layers=2,
                               bidirectional=True, batch_sizes=args.batch_sizes)
    assert out.dtype == h_n.dtype == out2.dtype == h2.dtype == dtype
    assert reserve.dtype == torch.float32  # what the CPU's float32 kernels keep (ops.h)
    assert torch.equal(out, out2) and torch.equal(h_n, h2)
    torch.testing.assert_close(out.float(), ref_out, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(h_n.float(), ref_h, atol=3e-2, rtol=3e-2)
    assert not torch.equal(out.float(), ref_out)  # it really ran in reduced precision
    grads = torch.autograd.grad(out.float().sum() + h_n.float().sum(), args.leaves())
    assert all(g.dtype == torch.float32 for g in grads)

    args64 = op_inputs(case.replace(dtype=torch.float64))
    with torch.autocast("cpu", dtype=dtype):
        out64, h64, _ = args64.call()
    assert out64.dtype == h64.dtype == torch.float64
    # autocast disabled inside an enabled region: float32 again
    with torch.autocast("cpu", dtype=dtype):
        with torch.autocast("cpu", enabled=False):
            assert args.call()[0].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_half_type_call_keeps_a_float32_reserve_on_cpu(cell, dtype):
    """A bfloat16 / float16 call on the CPU keeps its reserve in float32, as its kernels
    wrote it (ops.h). Its backward takes that reserve, or the same rounded to the half type
    (within rounding), and names a reserve of a third dtype."""
    case = CELL_BASE.replace(cell=cell, num_layers=2, bidirectional=True, dtype=dtype)
    args = op_inputs(case)
    *outputs, reserve = args.call()
    assert {o.dtype for o in outputs} == {dtype} and reserve.dtype == torch.float32
    upstream = [torch.randn_like(o) for o in outputs]

    def backward(r):
        return flat(args.backward_op(*args.raw(), outputs[0], r, *upstream, True, True))

    kept, rounded = backward(reserve), backward(reserve.to(dtype))
    eps = torch.finfo(dtype).eps
    for a, b in zip(rounded, kept):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=16 * eps,
                                   atol=16 * eps * float(b.float().abs().max()))
    with pytest.raises(RuntimeError, match=r"reserve must have the same dtype as input"):
        backward(reserve.double())
    # the fake kernel gives the reserve's float32 too (torch.compile, torch.export)
    torch.library.opcheck(args.op.default, args.raw(), test_utils=("test_faketensor",))


# ---------------------------------------------------------------------------------------
# Hostile arguments to the raw ops, in a child process (tests/hostile_ops_child.py)
# ---------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
# Known bugs: (reason) by case name; strict, so that a fix is noticed.
HOSTILE_BUGS = {}


def run_hostile_children(names, **extra_env):
    """Runs the cases in child processes; a case during which the child died is 'crashed'
    and the rest are run again in a fresh child."""
    env = dict(os.environ)
    # The child must import the very fastrnn this process imported (in place or installed).
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(fastrnn.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, HERE, env.get("PYTHONPATH", "")])
    env.update(extra_env)
    results, remaining = {}, list(names)
    while remaining:
        proc = subprocess.run([sys.executable, os.path.join(HERE, "hostile_ops_child.py"), *remaining],
                              capture_output=True, text=True, timeout=600, env=env)
        running = None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if record.get("status") == "start":
                running = record["case"]
            else:
                results[record["case"]] = record
                running = None
        if proc.returncode != 0:
            crashed = running or next(n for n in remaining if n not in results)
            results[crashed] = {"outcome": "crashed", "returncode": proc.returncode,
                                "stderr": proc.stderr[-3000:]}
        remaining = [n for n in remaining if n not in results]
    return results


@pytest.fixture(scope="module")
def hostile_results():
    return run_hostile_children(list(hostile_ops_child.CASES))


def _hostile_params():
    for name in hostile_ops_child.CASES:
        marks = ()
        if name in HOSTILE_BUGS:
            marks = pytest.mark.xfail(strict=True, reason=HOSTILE_BUGS[name])
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_hostile_params()))
def test_hostile_arguments(name, hostile_results):
    kind, argument, _ = hostile_ops_child.CASES[name]
    r = hostile_results[name]
    assert r["outcome"] != "crashed", f"the child process died (rc {r['returncode']}): {r['stderr']}"
    if kind == "parity":
        assert r["outcome"] == "checked" and r["ok"], r
        return
    assert r["outcome"] == "raised", f"returned instead of raising: {r}"
    assert "RuntimeError" in r["mro"] or "ValueError" in r["mro"], r
    assert r["type"] != "NotImplementedError", r
    names = (argument,) if isinstance(argument, str) else argument
    assert any(re.search(rf"\b{n}\b", r["message"]) for n in names), (names, r["message"])
    cell, _, rest = name.partition("/") if name.startswith(("lstm/", "gru/")) else ("rnn", "", name)
    op = cell if rest.startswith("forward/") else cell + "_backward"
    if kind == "binding":  # torch's argument parser: "fastrnn::rnn() Expected a value ..."
        assert r["message"].startswith(f"fastrnn::{op}() "), r["message"]
    else:
        assert r["message"].startswith(f"fastrnn::{op}: "), r["message"]


def test_hostile_child_reports_a_crash():
    """The harness itself: a child that dies mid-case (here by abort()) gets that case
    reported as crashed, and the cases after it still run, in a fresh child."""
    names = ["forward/hx-2d", "selftest/abort", "forward/hx-batch"]
    results = run_hostile_children(names, FASTRNN_HOSTILE_SELFTEST="1")
    assert set(results) == set(names)
    assert results["selftest/abort"]["outcome"] == "crashed"
    assert results["selftest/abort"]["returncode"] != 0
    assert results["forward/hx-2d"]["outcome"] == results["forward/hx-batch"]["outcome"] == "raised"


# =======================================================================================
# fastrnn::lstm / gru and their *_backward: the same guarantees
# =======================================================================================

LSTM = torch.ops.fastrnn.lstm
LSTM_BACKWARD = torch.ops.fastrnn.lstm_backward
GRU = torch.ops.fastrnn.gru
GRU_BACKWARD = torch.ops.fastrnn.gru_backward

CELL_BASE = Case(steps=4, batch=3, input_size=5, hidden_size=4, h0=True)
LSTM_BASE, GRU_BASE = CELL_BASE.replace(cell="lstm"), CELL_BASE.replace(cell="gru")
CELL_GRID = (grid(LSTM_BASE, proj_size=[0, 2], bias=[True, False], bidirectional=[False, True],
                  num_layers=[1, 2, 3], packed=[False, True])
             + grid(GRU_BASE, bias=[True, False], bidirectional=[False, True],
                    num_layers=[1, 2, 3], packed=[False, True]))
CELL_DROPOUT_GRID = (grid(LSTM_BASE.replace(dropout=0.5), proj_size=[0, 3],
                          bidirectional=[False, True], num_layers=[2, 3], packed=[False, True])
                     + grid(GRU_BASE.replace(dropout=0.5), bidirectional=[False, True],
                            num_layers=[2, 3], packed=[False, True]))
CELL_DROPOUT_EDGES = [
    LSTM_BASE.replace(dropout=1.0, num_layers=2, bidirectional=True, packed=True, proj_size=1),
    LSTM_BASE.replace(dropout=0.5, num_layers=3, train=False),
    GRU_BASE.replace(dropout=0.5, num_layers=1, bidirectional=True),
    GRU_BASE.replace(dropout=1.0, num_layers=2, bias=False, packed=True),
]


def _recording(cell_name, record):
    """A step function of fastrnn.reference that records what the op's reserve keeps of
    each step (csrc/ops.h): LSTM's activated gates, c (and m), GRU's activated gates and
    hn = (h W_hh^T)_n + b_hn."""
    def step(x_proj, h, c, weight_hh, bias_hh, weight_hr, nonlinearity=None):
        hg = h @ weight_hh.t()
        if bias_hh is not None:
            hg = hg + bias_hh
        if cell_name == "lstm":
            a_i, a_f, a_g, a_o = (x_proj + hg).chunk(4, 1)
            i, f, g, o = a_i.sigmoid(), a_f.sigmoid(), a_g.tanh(), a_o.sigmoid()
            c = f * c + i * g
            m = o * c.tanh()
            record.append(dict(gates=torch.cat([i, f, g, o], 1), c=c, m=m))
            return (m if weight_hr is None else m @ weight_hr.t()), c
        xr, xz, xn = x_proj.chunk(3, 1)
        hr, hz, hn = hg.chunk(3, 1)
        r, z = (xr + hr).sigmoid(), (xz + hz).sigmoid()
        n = (xn + r * hn).tanh()
        record.append(dict(gates=torch.cat([r, z, n], 1), hn=hn))
        return (1 - z) * n + z * h, None
    return step


def saved_reference(args: OpArgs, masks):
    """What the op's reserve should hold of every layer after the outputs and masks
    (OpArgs.reserve_saved's layout), computed step by step in plain PyTorch."""
    c = args.case
    sizes = ([int(b) for b in args.batch_sizes] if c.packed else [c.batch] * c.steps)
    offsets = [sum(sizes[:t]) for t in range(len(sizes))]
    layer_input, layers = args.input, []
    for layer in range(c.num_layers):
        outs, per_direction = [], []
        for d in range(c.directions):
            k = layer * c.directions + d
            w = args.weights[k * c.per_cell:(k + 1) * c.per_cell]
            b_ih, b_hh = (w[2], w[3]) if c.bias else (None, None)
            record = []
            out, _, _ = layer_reference(
                _recording(c.cell, record), layer_input, args.hx[k],
                args.cx[k] if c.cell == "lstm" else None, w[0], w[1], b_ih, b_hh,
                w[-1] if c.proj_size else None, args.batch_sizes, reverse=d == 1)
            order = range(len(sizes) - 1, -1, -1) if d == 1 else range(len(sizes))
            rows = {}
            for t, rec in zip(order, record):  # the steps in the order they ran
                for name, value in rec.items():
                    rows.setdefault(name, [None] * len(sizes))[t] = value
            per_direction.append({name: torch.cat(v, 0) for name, v in rows.items()})
            outs.append(out)
        names = {"lstm": ["gates", "c"] + (["m"] if c.proj_size else []),
                 "gru": ["gates", "hn"]}[c.cell]
        layers.append({n: torch.cat([p[n] for p in per_direction], 1) for n in names})
        layer_input = torch.cat(outs, -1) if c.directions == 2 else outs[0]
        if layer < len(masks):
            layer_input = layer_input * masks[layer]
    assert offsets == sorted(offsets)
    return layers


def check_cell_against_reference(case):
    """Forward (output, h_n, c_n, the reserve's layer outputs, masks and saved tensors)
    and every gradient (cx and weight_hr included) of the raw op against
    lstm_reference / gru_reference with the op's own masks."""
    args = op_inputs(case, requires_grad=True)
    torch.manual_seed(1234)
    *outputs, reserve = args.call()
    R, H = case.state_size, case.hidden_size
    assert len(outputs) == (3 if case.cell == "lstm" else 2)
    assert outputs[0].shape == (*args.input.shape[:-1], case.directions * R)
    assert outputs[1].shape == (case.cells, case.batch, R)
    if case.cell == "lstm":
        assert outputs[2].shape == (case.cells, case.batch, H)
    assert {o.dtype for o in (*outputs, reserve)} == {case.dtype}
    assert not reserve.requires_grad
    layer_outputs, masks = args.reserve_parts(reserve)  # asserts the reserve's size
    keep = 1 - case.dropout
    for m in masks:
        allowed = torch.tensor([0.0] + ([1 / keep] if keep > 0 else []), dtype=m.dtype)
        assert all(bool(torch.isclose(v.cpu(), allowed).any()) for v in m.unique())

    masks = [m.detach() for m in masks]
    want = args.reference(masks=masks)
    for i, (a, e) in enumerate(zip(outputs, want)):
        torch.testing.assert_close(a, e, **EXACT, msg=lambda m: f"output {i}: {m}")
    for layer, saved in enumerate(layer_outputs):
        ref_out = args.reference(masks=masks[:layer], num_layers=layer + 1)[0]
        torch.testing.assert_close(saved, ref_out.detach(), **EXACT)
    with torch.no_grad():
        want_saved = saved_reference(args, masks)
    for layer, (got, exp) in enumerate(zip(args.reserve_saved(reserve), want_saved)):
        assert list(got) == list(exp)
        for name in got:
            torch.testing.assert_close(got[name], exp[name], **EXACT,
                                       msg=lambda m: f"layer {layer} {name}: {m}")

    g_up = upstream(*outputs)
    got = torch.autograd.grad(outputs, args.leaves(), g_up)
    exp = torch.autograd.grad(want, args.leaves(), g_up)
    for i, (a, e) in enumerate(zip(got, exp)):
        torch.testing.assert_close(a, e, **EXACT, msg=lambda m: f"gradient {i}: {m}")
    return masks


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", CELL_GRID, ids=case_id)
def test_cell_matches_reference(case, device):
    check_cell_against_reference(case.replace(device=device))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", CELL_DROPOUT_GRID + CELL_DROPOUT_EDGES, ids=case_id)
def test_cell_dropout_matches_reference_with_reserved_masks(case, device):
    masks = check_cell_against_reference(case.replace(device=device))
    assert len(masks) == (case.num_layers - 1 if case.dropout_applied else 0)
    if case.dropout == 1.0:
        assert all(bool((m == 0).all()) for m in masks)
    elif masks:
        assert all(bool((m == 0).any()) and bool((m != 0).any()) for m in masks)


def test_cell_float32_against_float64_reference():
    for case in (LSTM_BASE.replace(h0=False, num_layers=2, bidirectional=True, proj_size=2),
                 GRU_BASE.replace(h0=False, num_layers=2, bidirectional=True, packed=True)):
        got = op_inputs(case.replace(dtype=torch.float32)).call()[:-1]
        want = op_inputs(case).reference()
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", [
    LSTM_BASE.replace(num_layers=2, bidirectional=True, packed=True, proj_size=2),
    LSTM_BASE.replace(num_layers=3, bias=False, dropout=0.5, train=True),
    GRU_BASE.replace(num_layers=2, bidirectional=True, packed=True),
    GRU_BASE.replace(num_layers=3, bias=False),
], ids=case_id)
def test_cell_wrapper_matches_op(case):
    """fastrnn.lstm / gru are the ops with keyword arguments (has_biases from the weight
    count, 5 per cell with proj_size), returning (output, (h_n, c_n)) / (output, h_n)."""
    args = op_inputs(case)
    torch.manual_seed(0)
    want = args.call()[:-1]
    torch.manual_seed(0)
    got = args.wrapper()
    assert len(got) == len(want)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    result = getattr(fastrnn, case.cell)(args.input, args.states() if case.cell == "lstm"
                                         else args.hx, args.weights,
                                         num_layers=case.num_layers,
                                         bidirectional=case.bidirectional,
                                         batch_sizes=args.batch_sizes)
    assert len(result) == 2
    if case.cell == "lstm":
        assert isinstance(result[1], tuple) and len(result[1]) == 2


# ---- gradcheck -------------------------------------------------------------------------

CELL_SMALL = Case(steps=3, batch=2, input_size=2, hidden_size=3, h0=True, seed=5)
CELL_GRADCHECK = [
    CELL_SMALL.replace(cell="lstm"),
    CELL_SMALL.replace(cell="lstm", proj_size=2, bidirectional=True, packed=True),
    CELL_SMALL.replace(cell="lstm", proj_size=1, num_layers=2, bias=False),
    CELL_SMALL.replace(cell="lstm", num_layers=2, bidirectional=True, packed=True, dropout=0.4),
    CELL_SMALL.replace(cell="gru"),
    CELL_SMALL.replace(cell="gru", bias=False, bidirectional=True, packed=True),
    CELL_SMALL.replace(cell="gru", num_layers=2, bidirectional=True, packed=True, dropout=0.4),
]


def _gradcheck_fn(case, args, scalar=False):
    n_states = len(args.states())

    def fn(x, *rest):
        states, weights = rest[:n_states], rest[n_states:]
        with torch.random.fork_rng():
            torch.manual_seed(99)
            outputs = OpArgs(case, x, states[0], list(weights), args.batch_sizes,
                             cx=states[1] if n_states == 2 else None).wrapper()
        return weighted_sum(outputs[0], outputs[1:]) if scalar else outputs

    return fn


@pytest.mark.parametrize("case", CELL_GRADCHECK, ids=case_id)
def test_cell_gradcheck(case):
    """float64 gradcheck of fastrnn.lstm / gru with respect to input, hx (and cx) and
    every weight (weight_hr included); with dropout, every evaluation draws the same masks."""
    args = op_inputs(case, requires_grad=True, scale=0.5)
    assert torch.autograd.gradcheck(_gradcheck_fn(case, args), tuple(args.leaves()))


def test_rnn_backward_leaves_its_arguments_unchanged():
    """rnn_backward reads its arguments only: twice on the same ones, the same gradients."""
    case = CELL_BASE.replace(num_layers=2, bidirectional=True, packed=True, dropout=0.5)
    args, bwd = backward_args(case, True, True)
    before = [t.clone() for t in bwd if isinstance(t, torch.Tensor)]
    first = args.backward_op(*bwd)
    assert all(torch.equal(a, b) for a, b in zip(before, [t for t in bwd if isinstance(t, torch.Tensor)]))
    again = args.backward_op(*bwd)
    assert all(torch.equal(a, b) for a, b in zip(flat(first), flat(again)))


def _layouts(g):
    """g's values in other memory layouts: rows padded (a slice of a wider tensor), the
    batch dimension outermost, one value broadcast over a dimension."""
    wide = torch.zeros(*g.shape[:-1], g.shape[-1] + 3, dtype=g.dtype)
    wide[..., 1 : 1 + g.shape[-1]] = g
    yield "padded rows", wide[..., 1 : 1 + g.shape[-1]]
    if g.dim() == 3:
        yield "batch outermost", g.transpose(0, 1).contiguous().transpose(0, 1)
        yield "broadcast over batch", g[:, :1].expand(g.shape)
    yield "broadcast over columns", g[..., :1].expand(g.shape)


@pytest.mark.parametrize("case", [BASE.replace(num_layers=2, bidirectional=True),
                                  BASE.replace(num_layers=2, packed=True, nonlinearity="relu")],
                         ids=case_id)
def test_rnn_backward_takes_grad_output_in_any_layout(case):
    """The backward reads the output's gradient where it lies when its rows have one stride
    or, padded, its steps have unit column stride (batch-major, broadcast over the batch), and
    copies it otherwise: every layout gives the very gradients of a contiguous copy."""
    args, bwd = backward_args(case, True, True)
    at = BWD_NAMES.index("grad_output")
    for name, g in _layouts(bwd[at]):
        want = args.backward_op(*bwd[:at], g.contiguous(), *bwd[at + 1:])
        got = args.backward_op(*bwd[:at], g, *bwd[at + 1:])
        assert all(torch.equal(a, b) for a, b in zip(flat(got), flat(want))), name


@pytest.mark.parametrize("inside", ["1", "0"], ids=["inside", "outside"])
@pytest.mark.parametrize("case", [
    BASE.replace(batch=9, num_layers=2, bidirectional=True),
    BASE.replace(batch=9, packed=True, nonlinearity="relu"),
    LSTM_BASE.replace(batch=9, num_layers=2), GRU_BASE.replace(batch=9)], ids=case_id)
def test_forward_takes_input_in_any_layout(case, inside, monkeypatch):
    """A recurrence that projects its input inside reads it where it lies (rows with one
    stride, or a padded input's steps in any layout: batch-major as batch_first gives it,
    broadcast over the batch); otherwise it is copied. Every layout gives the very results of
    a contiguous input, on both paths."""
    monkeypatch.setenv("FASTRNN_CPU_PROJECT_INSIDE", inside)
    args = op_inputs(case)
    for name, x in _layouts(args.input):
        args.input = x
        got = args.op(*args.raw())
        args.input = x.contiguous()
        want = args.op(*args.raw())
        assert all(torch.equal(a, b) for a, b in zip(flat(got), flat(want))), name


@pytest.mark.parametrize("linear", ["1", "0"], ids=["own-product", "blas"])
@pytest.mark.parametrize("case", [
    BASE.replace(batch=9, steps=130, num_layers=2, bidirectional=True),
    BASE.replace(batch=9, packed=True, nonlinearity="relu"),
    LSTM_BASE.replace(batch=9, steps=130), GRU_BASE.replace(batch=9, num_layers=2)], ids=case_id)
def test_backward_takes_input_in_any_layout(case, linear, monkeypatch):
    """dW_ih = dA^T x reads x where it lies: rows with one stride, or a padded input's steps
    in any layout on fastrnn's own product (FASTRNN_CPU_LINEAR=1; at 130 steps of 9 rows its
    chunks of k split a step); BLAS gets x's rows copied. Every layout gives the very
    gradients of a contiguous input."""
    monkeypatch.setenv("FASTRNN_CPU_LINEAR", linear)
    args, bwd = backward_args(case, True, True)
    for name, x in _layouts(bwd[0]):
        got = args.backward_op(x, *bwd[1:])
        want = args.backward_op(x.contiguous(), *bwd[1:])
        assert all(torch.equal(a, b) for a, b in zip(flat(got), flat(want))), name


@pytest.mark.parametrize("case", [
    LSTM_BASE, LSTM_BASE.replace(proj_size=2, num_layers=2, bidirectional=True, packed=True),
    GRU_BASE, GRU_BASE.replace(num_layers=2, bidirectional=True, packed=True)], ids=case_id)
def test_cell_backward_does_not_modify_reserve(case):
    """The backward op twice on the same arguments: the reserve unchanged, the same
    gradients both times (what autograd does with retain_graph=True)."""
    args, bwd = backward_args(case, True, True)
    names = CELL_BWD_NAMES[case.cell]
    reserve = bwd[names.index("reserve")]
    saved = reserve.clone()
    first = args.backward_op(*bwd)
    again = args.backward_op(*bwd)
    assert torch.equal(reserve, saved), "the reserve was overwritten"
    assert all(torch.equal(a, b) for a, b in zip(flat(first), flat(again)))


# ---- need_reserve=False: a forward no backward follows ------------------------------------

NO_RESERVE_CASES = [
    BASE.replace(num_layers=3, bidirectional=True, packed=True),
    BASE.replace(num_layers=2, nonlinearity="relu", dtype=torch.float32),
    BASE.replace(num_layers=3, dropout=0.5, train=True, bidirectional=True),
    LSTM_BASE.replace(num_layers=3, bidirectional=True),
    LSTM_BASE.replace(num_layers=2, proj_size=2, packed=True),
    # batch >= 8: the projection inside, the gates and c in a two-step ring
    LSTM_BASE.replace(num_layers=2, batch=9, dtype=torch.float32),
    LSTM_BASE.replace(num_layers=3, batch=10, bidirectional=True, packed=True),
    LSTM_BASE.replace(num_layers=2, batch=8, steps=7, packed=True, h0=False),
    LSTM_BASE.replace(num_layers=3, dropout=0.5, train=True, packed=True),
    GRU_BASE.replace(num_layers=3, bidirectional=True, packed=True),
    GRU_BASE.replace(num_layers=2, dropout=0.5, train=True, dtype=torch.float32),
    GRU_BASE.replace(num_layers=2, batch=9, bidirectional=True, packed=True),  # a ring
    GRU_BASE.replace(num_layers=2, batch=8, steps=6, dtype=torch.float32),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", NO_RESERVE_CASES, ids=case_id)
def test_forward_without_reserve_gives_the_same_results(case, device):
    """need_reserve=False: an empty reserve and the very bits of the call that keeps it
    (the layers share one block of saved tensors in the call's own memory), dropout's
    masks drawn alike."""
    args = op_inputs(case.replace(device=device))
    torch.manual_seed(7)
    kept = args.op(*args.raw())
    torch.manual_seed(7)
    bare = args.op(*args.raw(), False)
    assert kept[-1].numel() > 0
    assert bare[-1].shape == (0,) and bare[-1].dtype == case.dtype
    assert bare[-1].device == args.input.device
    for i, (a, b) in enumerate(zip(kept[:-1], bare[:-1])):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"result {i}: {m}")


@pytest.mark.parametrize("case", [NO_RESERVE_CASES[i] for i in (0, 4, 6, 9, 11)], ids=case_id)
def test_opcheck_forward_without_reserve(case):
    args = op_inputs(case)  # no gradient: such a forward has no backward
    torch.library.opcheck(args.op.default, (*args.raw(), False))


def test_backward_of_a_forward_without_reserve_names_the_problem():
    args = op_inputs(LSTM_BASE.replace(num_layers=2))
    out, h_n, c_n, reserve = args.op(*args.raw(), False)
    with pytest.raises(RuntimeError, match=r"fastrnn::lstm_backward: reserve is empty: its "
                       r"forward ran with need_reserve=False"):
        args.backward_op(*args.raw(), out, reserve, torch.ones_like(out), torch.ones_like(h_n),
                         torch.ones_like(c_n), True, True)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_wrapper_keeps_a_reserve_only_for_a_backward(cell):
    """fastrnn.rnn / lstm / gru ask for the reserve exactly when autograd will want it."""
    case = CELL_BASE.replace(cell=cell, num_layers=2)
    results = {}
    for grad_mode, requires_grad in ((False, True), (True, False), (True, True)):
        args = op_inputs(case, requires_grad=requires_grad)
        with torch.set_grad_enabled(grad_mode), OpCalls() as calls:
            args.wrapper()
        results[grad_mode, requires_grad] = [out[-1].numel() for _, _, out in calls.calls]
    assert results[False, True] == [0] and results[True, False] == [0]
    assert len(results[True, True]) == 1 and results[True, True][0] > 0


# ---- opcheck ---------------------------------------------------------------------------

CELL_OPCHECK = [
    LSTM_BASE,
    LSTM_BASE.replace(packed=True, bias=False, proj_size=2),
    LSTM_BASE.replace(num_layers=2, bidirectional=True, packed=True, proj_size=3),
    LSTM_BASE.replace(num_layers=3, bidirectional=True, dropout=0.5, train=False),
    LSTM_BASE.replace(num_layers=2, h0=False),
    GRU_BASE,
    GRU_BASE.replace(packed=True, bias=False),
    GRU_BASE.replace(num_layers=3, bidirectional=True, dropout=0.5, train=False, packed=True),
    GRU_BASE.replace(num_layers=2, h0=False),
]


@pytest.mark.parametrize("case", CELL_OPCHECK, ids=case_id)
def test_cell_opcheck_forward(case):
    args = op_inputs(case, requires_grad=True)
    torch.library.opcheck(args.op.default, args.raw())


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cell_opcheck_forward_with_dropout(cell):
    """Random masks: the checks that do not compare two runs' values."""
    case = CELL_BASE.replace(cell=cell, num_layers=3, bidirectional=True, packed=True,
                             dropout=0.5, proj_size=2 if cell == "lstm" else 0)
    args = op_inputs(case, requires_grad=True)
    torch.library.opcheck(args.op.default, args.raw(), test_utils=(
        "test_schema", "test_autograd_registration", "test_faketensor"))


CELL_BACKWARD_CASES = [
    LSTM_BASE.replace(num_layers=2, bidirectional=True, packed=True, proj_size=2),
    # the backward reads its masks from the reserve: deterministic with dropout too
    LSTM_BASE.replace(num_layers=3, dropout=0.5, bias=False),
    GRU_BASE.replace(num_layers=2, bidirectional=True, packed=True),
    GRU_BASE.replace(num_layers=3, dropout=0.5, bias=False),
]


@pytest.mark.parametrize("need", NEEDS, ids=lambda n: f"input{int(n[0])}-weight{int(n[1])}")
@pytest.mark.parametrize("case", CELL_BACKWARD_CASES, ids=case_id)
def test_cell_opcheck_backward(case, need):
    """Every opcheck but the schema's mutation check (test_cell_opcheck_backward_schema)."""
    args, bwd = backward_args(case, *need)
    torch.library.opcheck(args.backward_op.default, bwd, test_utils=(
        "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("case", CELL_BACKWARD_CASES, ids=case_id)
def test_cell_opcheck_backward_schema(case):
    args, bwd = backward_args(case, True, True)
    torch.library.opcheck(args.backward_op.default, bwd, test_utils=("test_schema",))


@pytest.mark.parametrize("case", CELL_BACKWARD_CASES + [LSTM_BASE.replace(bias=False),
                                                        GRU_BASE.replace(num_layers=1)],
                         ids=case_id)
def test_cell_gradients_not_needed_are_empty(case):
    """need_input_grad / need_weight_grad False: those gradients are empty [0] tensors,
    the others (grad_hx and grad_cx always) equal to the full call's."""
    args, full_args = backward_args(case, True, True)
    n_states = len(args.states())
    full = args.backward_op(*full_args)
    assert len(full) == 2 + n_states
    full_input, full_states, full_weights = full[0], full[1:-1], full[-1]
    assert full_input.shape == args.input.shape
    assert [g.shape for g in full_states] == [s.shape for s in args.states()]
    assert [g.shape for g in full_weights] == [w.shape for w in args.weights]
    for need_input, need_weight in NEEDS[1:]:
        got = args.backward_op(*full_args[:-2], need_input, need_weight)
        g_input, g_states, g_weights = got[0], got[1:-1], got[-1]
        assert all(torch.equal(a, b) for a, b in zip(g_states, full_states))
        assert len(g_weights) == len(args.weights)
        if need_input:
            assert torch.equal(g_input, full_input)
        else:
            assert g_input.shape == (0,)
        for g, f in zip(g_weights, full_weights):
            assert torch.equal(g, f) if need_weight else g.shape == (0,)
    if case.bias:  # the two bias gradients are equal (and distinct tensors)
        for cell in range(case.cells):
            b_ih, b_hh = full_weights[cell * case.per_cell + 2], full_weights[cell * case.per_cell + 3]
            if case.cell == "lstm":
                assert torch.equal(b_ih, b_hh)
            else:  # GRU: b_hn sits inside r * (...): only the r and z parts are equal
                H = case.hidden_size
                assert torch.equal(b_ih[:2 * H], b_hh[:2 * H])
                assert not torch.equal(b_ih[2 * H:], b_hh[2 * H:])
            assert b_ih.data_ptr() != b_hh.data_ptr()


@pytest.mark.parametrize("cell, wanted", [
    pytest.param(cell, wanted, id=f"{wanted}-{cell}") for cell in ("lstm", "gru")
    for wanted in ("input", "hx", "cx", "weights", "one weight")
    if not (cell == "gru" and wanted == "cx")  # GRU has no cell state
])
def test_cell_autograd_asks_only_for_needed_gradients(cell, wanted):
    """need_input_grad / need_weight_grad follow what requires grad: one forward and one
    backward op call, and the gradients asked for are right."""
    case = CELL_BASE.replace(cell=cell, num_layers=2, bidirectional=True,
                             proj_size=2 if cell == "lstm" else 0)
    args = op_inputs(case)
    leaves = {"input": [args.input], "hx": [args.hx], "cx": [args.cx], "weights": args.weights,
              "one weight": [args.weights[-1]]}[wanted]
    for t in leaves:
        t.requires_grad_()
    full = op_inputs(case, requires_grad=True)
    with OpCalls() as calls:
        outputs = args.call()[:-1]
        got = torch.autograd.grad(sum(o.sum() for o in outputs), leaves)
    assert calls.names() == [cell, cell + "_backward"]
    need_input, need_weight = calls.calls[1][1][-2:]
    assert need_input == args.input.requires_grad
    assert need_weight == any(w.requires_grad for w in args.weights)
    outputs = full.call()[:-1]
    want = dict(zip(map(id, args.leaves()),
                    torch.autograd.grad(sum(o.sum() for o in outputs), full.leaves())))
    for t, g in zip(leaves, got):
        torch.testing.assert_close(g, want[id(t)], **EXACT)


# ---- torch.compile and the fake kernels --------------------------------------------------

CELL_COMPILE = [
    (LSTM_BASE.replace(num_layers=2, bidirectional=True, proj_size=2), "aot_eager"),
    (LSTM_BASE.replace(num_layers=2, packed=True, dropout=0.5), "aot_eager"),
    (GRU_BASE.replace(num_layers=2, bidirectional=True, packed=True), "aot_eager"),
    (LSTM_BASE.replace(num_layers=2, bidirectional=True, packed=True, proj_size=3), "inductor"),
    (GRU_BASE.replace(num_layers=3, dropout=0.5), "inductor"),
]


@pytest.mark.parametrize("case, backend", CELL_COMPILE, ids=[f"{c}-{b}" for c, b in CELL_COMPILE])
def test_cell_compile_fullgraph_matches_eager(case, backend):
    """torch.compile(fullgraph=True) of a function calling fastrnn.lstm / gru: every
    output and gradient as in eager (the same masks under the same seed)."""
    torch._dynamo.reset()

    def step(x, states, weights, batch_sizes):
        a = OpArgs(case, x, states[0], weights, batch_sizes,
                   cx=states[1] if len(states) == 2 else None)
        out, *rest = a.wrapper()
        return (out.tanh() * 2, *rest)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    results = []
    for fn in (step, compiled):
        args = op_inputs(case, requires_grad=True)
        torch.manual_seed(5)
        outputs = fn(args.input, list(args.states()), args.weights, args.batch_sizes)
        g = torch.autograd.grad(outputs, args.leaves(), upstream(*outputs))
        results.append([*outputs, *g])
    for i, (a, e) in enumerate(zip(*results[::-1])):
        torch.testing.assert_close(a, e, **EXACT, msg=lambda m: f"tensor {i}: {m}")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cell_compile_raw_op_under_fake_tensors(cell):
    """torch.ops.fastrnn.lstm / gru themselves under torch.compile, the reserve included."""
    torch._dynamo.reset()
    case = CELL_BASE.replace(cell=cell, num_layers=3, bidirectional=True, packed=True,
                             proj_size=2 if cell == "lstm" else 0)
    args = op_inputs(case)
    compiled = torch.compile(lambda *a: args.op(*a), fullgraph=True, backend="aot_eager")
    got, want = compiled(*args.raw()), args.call()
    assert len(got) == len(want)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **EXACT)


def _to_meta(values):
    return [v.to("meta") if isinstance(v, torch.Tensor) and v.is_floating_point() else
            [w.to("meta") for w in v] if isinstance(v, list) else v for v in values]


@pytest.mark.parametrize("case", [
    LSTM_BASE.replace(num_layers=3, bidirectional=True, packed=True, dropout=0.3),
    LSTM_BASE.replace(num_layers=2, bidirectional=True, packed=True, dropout=0.3, proj_size=2),
    LSTM_BASE.replace(num_layers=2, dropout=0.3, train=False, proj_size=1, bias=False),
    GRU_BASE.replace(num_layers=3, bidirectional=True, packed=True, dropout=0.3),
    GRU_BASE.replace(num_layers=2, bias=False),
], ids=case_id)
def test_cell_fake_kernels_give_the_real_shapes(case):
    """Meta tensors (the fake kernels) report the shapes the CPU kernels return: forward
    (output, h_n, c_n, the reserve with saved gates, m and masks) and backward (with
    gradients not needed)."""
    args = op_inputs(case)
    real = args.call()
    meta = args.op(*_to_meta(args.raw()))
    assert [m.shape for m in meta] == [r.shape for r in real]
    assert all(m.device.type == "meta" for m in meta)
    for need in NEEDS:
        _, bwd = backward_args(case, *need)
        real_bwd = args.backward_op(*bwd)
        meta_bwd = args.backward_op(*_to_meta(bwd))
        assert [m.shape for m in meta_bwd[:-1]] == [r.shape for r in real_bwd[:-1]]
        assert [m.shape for m in meta_bwd[-1]] == [r.shape for r in real_bwd[-1]]


# ---- bad arguments: the cell-specific checks of csrc/checks.h ----------------------------

# 2 layers, bidirectional, with biases: LSTM's weights are 16 tensors (20 with
# proj_size: weight_ih, weight_hh, bias_ih, bias_hh, weight_hr per cell), GRU's 16.
BAD_CELL_FORWARD = {
    # name: (cell, proj_size, mutation, message (a regex))
    "lstm-cx-None": ("lstm", 0, _set("cx", None), "cx must be a tensor, got None"),
    "lstm-cx-layers": ("lstm", 0, _set("cx", lambda c: c[:3]),
                       r"cx must have shape \[4, 3, 4\], got \[3, 3, 4\]"),
    "lstm-cx-batch": ("lstm", 0, _set("cx", lambda c: c[:, :2]),
                      r"cx must have shape \[4, 3, 4\], got \[4, 2, 4\]"),
    "lstm-cx-2d": ("lstm", 0, _set("cx", lambda c: c[0]),
                   r"cx must have shape \[4, 3, 4\], got \[3, 4\]"),
    # with proj_size cx keeps hidden_size (4) and hx takes proj_size (2)
    "lstm-proj-cx-of-proj_size": ("lstm", 2, _set("cx", lambda c: c[..., :2]),
                                  r"cx must have shape \[4, 3, 4\], got \[4, 3, 2\]"),
    "lstm-proj-hx-of-hidden_size": ("lstm", 2, _set("hx", lambda h: torch.cat([h, h], 2)),
                                    r"hx must have shape \[4, 3, 2\], got \[4, 3, 4\]"),
    "lstm-cx-dtype": ("lstm", 0, _set("cx", lambda c: c.float()),
                      r"cx must have the same dtype as input \(Double\), got Float"),
    "lstm-cx-meta": ("lstm", 0, _set("cx", lambda c: c.to("meta")),
                     "cx must be on the same device as input"),
    "lstm-weights-count": ("lstm", 0, _set("weights", lambda w: w[:-1]),
                           r"expected 2 layer\(s\) x 2 direction\(s\) x 4 weights \(weight_ih, "
                           r"weight_hh, bias_ih, bias_hh and, with proj_size, weight_hr\), got 15"),
    "lstm-proj-weights-count": ("lstm", 2, _set("weights", lambda w: w[:-1]),
                                r"expected 2 layer\(s\) x 2 direction\(s\) x 4 weights "
                                r"\(weight_ih, weight_hh, bias_ih, bias_hh and, with proj_size, "
                                r"weight_hr\), got 19"),
    "lstm-proj-weights-count-no-bias": ("lstm", 2, _set("has_biases", False),
                                        r"expected 2 layer\(s\) x 2 direction\(s\) x 2 weights "
                                        r"\(weight_ih, weight_hh and, with proj_size, "
                                        r"weight_hr\), got 20"),
    "lstm-weight_hh_l0-rows": ("lstm", 0, _weight(1, lambda w: w[:-1]),
                               r"weight_hh_l0 must be 2-D \[4\*H, H\], got \[15, 4\]"),
    "lstm-proj-weight_hh_l0-1d": ("lstm", 2, _weight(1, lambda w: w[:, 0]),
                                  r"weight_hh_l0 must be 2-D \[4\*H, proj_size\], got \[16\]"),
    "lstm-weight_ih_l0-shape": ("lstm", 0, _weight(0, lambda w: w[:4]),
                                r"weight_ih_l0 must have shape \[16, 5\], got \[4, 5\]"),
    "lstm-weight_ih_l1-width": ("lstm", 2, _weight(10, lambda w: torch.cat([w, w], 1)),
                                r"weight_ih_l1 must have shape \[16, 4\], got \[16, 8\]"),
    "lstm-weight_hh_l1_reverse-shape": ("lstm", 0, _weight(13, lambda w: w[:, :2]),
                                        r"weight_hh_l1_reverse must have shape \[16, 4\], "
                                        r"got \[16, 2\]"),
    "lstm-bias_hh_l0-shape": ("lstm", 0, _weight(3, lambda b: b[:4]),
                              r"bias_hh_l0 must have shape \[16\], got \[4\]"),
    "lstm-weight_hr_l0-shape": ("lstm", 2, _weight(4, lambda w: w.t()),
                                r"weight_hr_l0 must have shape \[2, 4\], got \[4, 2\]"),
    "lstm-weight_hr_l1_reverse-dtype": ("lstm", 2, _weight(19, lambda w: w.float()),
                                        r"weight_hr_l1_reverse must have the same dtype as "
                                        r"input \(Double\), got Float"),
    "lstm-weight_hr_l0-meta": ("lstm", 2, _weight(4, lambda w: w.to("meta")),
                               "weight_hr_l0 must be on the same device as input"),
    "gru-weights-count": ("gru", 0, _set("weights", lambda w: w + [w[-1]]),
                          r"expected 2 layer\(s\) x 2 direction\(s\) x 4 weights \(weight_ih, "
                          r"weight_hh, bias_ih, bias_hh\), got 17"),
    "gru-weight_hh_l0-rows": ("gru", 0, _weight(1, lambda w: w[:-1]),
                              r"weight_hh_l0 must be 2-D \[3\*H, H\], got \[11, 4\]"),
    "gru-weight_ih_l0-shape": ("gru", 0, _weight(0, lambda w: w[:4]),
                               r"weight_ih_l0 must have shape \[12, 5\], got \[4, 5\]"),
    "gru-weight_hh_l1-shape": ("gru", 0, _weight(9, lambda w: torch.cat([w, w], 1)),
                               r"weight_hh_l1 must have shape \[12, 4\], got \[12, 8\]"),
    "gru-bias_ih_l1_reverse-shape": ("gru", 0, _weight(14, lambda b: b[:4]),
                                     r"bias_ih_l1_reverse must have shape \[12\], got \[4\]"),
    "gru-hx-hidden": ("gru", 0, _set("hx", lambda h: h[..., :3]),
                      r"hx must have shape \[4, 3, 4\], got \[4, 3, 3\]"),
    "gru-hx-dtype": ("gru", 0, _set("hx", lambda h: h.float()),
                     r"hx must have the same dtype as input \(Double\), got Float"),
    "gru-input-int": ("gru", 0, _set("input", lambda x: x.int()),
                      "input dtype Int is not supported on CPU"),
    "gru-batch_sizes-increasing": ("gru", 0, _set("batch_sizes", torch.tensor([2, 3, 2, 1])),
                                   r"batch_sizes must be non-increasing, got batch_sizes\[1\] = 3 "
                                   r"after 2"),
    "lstm-num_layers-0": ("lstm", 0, _set("num_layers", 0), "num_layers must be at least 1, got 0"),
    "lstm-dropout-nan": ("lstm", 0, _set("dropout", math.nan), r"dropout must be in \[0, 1\], got nan"),
}
CELL_ARG_NAMES = {"lstm": ["input", "hx", "cx", "weights", "has_biases", "num_layers", "dropout",
                           "train", "bidirectional", "batch_sizes"],
                  "gru": ["input", "hx", "weights", "has_biases", "num_layers", "dropout", "train",
                          "bidirectional", "batch_sizes"]}


def _bad_cell_case(cell, proj_size):
    return CELL_BASE.replace(cell=cell, proj_size=proj_size, num_layers=2, bidirectional=True,
                             packed=True)


@pytest.mark.parametrize("name", list(BAD_CELL_FORWARD))
def test_cell_forward_bad_arguments_name_the_problem(name):
    cell, proj_size, mutate, match = BAD_CELL_FORWARD[name]
    args = op_inputs(_bad_cell_case(cell, proj_size))
    a = dict(zip(CELL_ARG_NAMES[cell], args.raw()))
    mutate(a)
    with pytest.raises(RuntimeError, match=match) as info:
        args.op(*a.values())
    assert str(info.value).startswith(f"fastrnn::{cell}: "), str(info.value)


BAD_CELL_BACKWARD = {
    "lstm-grad_c_n-None": ("lstm", 0, _set("grad_c_n", None), "grad_c_n must be a tensor, got None"),
    "lstm-grad_c_n-shape": ("lstm", 0, _set("grad_c_n", lambda g: g[:2]),
                            r"grad_c_n must have shape \[4, 3, 4\], got \[2, 3, 4\]"),
    "lstm-proj-grad_c_n-of-proj_size": ("lstm", 2, _set("grad_c_n", lambda g: g[..., :2]),
                                        r"grad_c_n must have shape \[4, 3, 4\], got \[4, 3, 2\]"),
    "lstm-proj-grad_h_n-of-hidden_size": ("lstm", 2, _set("grad_h_n", lambda g: torch.cat([g, g], 2)),
                                          r"grad_h_n must have shape \[4, 3, 2\], got \[4, 3, 4\]"),
    "lstm-grad_c_n-dtype": ("lstm", 0, _set("grad_c_n", lambda g: g.float()),
                            r"grad_c_n must have the same dtype as input \(Double\), got Float"),
    "lstm-grad_c_n-meta": ("lstm", 0, _set("grad_c_n", lambda g: g.to("meta")),
                           "grad_c_n must be on the same device as input"),
    "lstm-proj-output-width": ("lstm", 2, _set("output", lambda o: torch.cat([o, o], 1)),
                               r"output must have shape \[\d+, 4\], got \[\d+, 8\]"),
    # the reserve's size counts the saved gates, c and (with proj_size) m
    "lstm-proj-reserve-without-m": ("lstm", 2, _set("reserve", lambda r: r[: r.numel() - 2 * 4 * 8]),
                                    r"reserve must have shape \[\d+\]"),
    "lstm-reserve-masks-missing": ("lstm", 0, _set("train", True), r"reserve must have shape \[\d+\]"),
    "lstm-cx-shape": ("lstm", 0, _set("cx", lambda c: c[:, :2]), r"cx must have shape \[4, 3, 4\]"),
    "gru-reserve-size": ("gru", 0, _set("reserve", lambda r: r[1:]), r"reserve must have shape \[\d+\]"),
    "gru-grad_h_n-shape": ("gru", 0, _set("grad_h_n", lambda g: g[:, :1]),
                           r"grad_h_n must have shape \[4, 3, 4\], got \[4, 1, 4\]"),
    "gru-grad_output-dtype": ("gru", 0, _set("grad_output", lambda g: g.float()),
                              r"grad_output must have the same dtype as input \(Double\), got Float"),
    "gru-weight_hh_l0-shape": ("gru", 0, _weight(1, lambda w: w[:, :2]),
                               r"weight_hh_l0 must have shape \[12, 4\], got \[12, 2\]"),
}
CELL_BWD_NAMES = {
    "lstm": CELL_ARG_NAMES["lstm"] + ["output", "reserve", "grad_output", "grad_h_n", "grad_c_n",
                                      "need_input_grad", "need_weight_grad"],
    "gru": CELL_ARG_NAMES["gru"] + ["output", "reserve", "grad_output", "grad_h_n",
                                    "need_input_grad", "need_weight_grad"],
}


@pytest.mark.parametrize("name", list(BAD_CELL_BACKWARD))
def test_cell_backward_bad_arguments_name_the_problem(name):
    cell, proj_size, mutate, match = BAD_CELL_BACKWARD[name]
    # dropout 0.5 without training: flipping train to True makes the reserve too small
    case = _bad_cell_case(cell, proj_size).replace(dropout=0.5, train=False)
    args, bwd = backward_args(case, True, True)
    a = dict(zip(CELL_BWD_NAMES[cell], bwd))
    assert len(a) == len(bwd)
    mutate(a)
    with pytest.raises(RuntimeError, match=match) as info:
        args.backward_op(*a.values())
    assert str(info.value).startswith(f"fastrnn::{cell}_backward: "), str(info.value)


# ---- autocast ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cell_autocast_raw_op(cell, dtype):
    """Under CPU autocast the ops (torch.ops.fastrnn.lstm / gru and the wrappers) run in
    the autocast dtype: every output in it, close to the float32 reference; float32
    leaves get float32 gradients; float64 is not autocast."""
    case = CELL_BASE.replace(cell=cell, num_layers=2, bidirectional=True, packed=True,
                             dtype=torch.float32, proj_size=2 if cell == "lstm" else 0)
    args = op_inputs(case, requires_grad=True)
    want = args.reference()
    with torch.autocast("cpu", dtype=dtype):
        *outputs, reserve = args.call()
        wrapped = args.wrapper()
    assert {o.dtype for o in (*outputs, *wrapped)} == {dtype}
    assert reserve.dtype == torch.float32  # what the CPU's float32 kernels keep (ops.h)
    assert all(torch.equal(a, b) for a, b in zip(outputs, wrapped))
    for a, e in zip(outputs, want):
        torch.testing.assert_close(a.float(), e, atol=3e-2, rtol=3e-2)
    assert not torch.equal(outputs[0].float(), want[0])  # it really ran in reduced precision
    grads = torch.autograd.grad(sum(o.float().sum() for o in outputs), args.leaves())
    assert all(g.dtype == torch.float32 for g in grads)
    args64 = op_inputs(case.replace(dtype=torch.float64))
    with torch.autocast("cpu", dtype=dtype):
        assert {o.dtype for o in args64.call()} == {torch.float64}
