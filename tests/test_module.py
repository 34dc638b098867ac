"""fastrnn.RNN / LSTM / GRU against torch.nn.RNN / LSTM / GRU: the full parity grid
(output, h_n (and c_n) and every gradient), one fastrnn::rnn / lstm / gru call per forward
and one *_backward call per backward, dropout between layers, property-based parity (sizes, strides, requires_grad
patterns, empty sequences), the module's interface (constructor, state_dict, convert,
copies, errors, warnings), threads, determinism, autocast and reduced precision,
checkpoints and torch.compile."""

import copy
import io
import math
import os
import pickle
import subprocess
import sys
import threading
import warnings

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrnn
import fastrnn.modules
from fastrnn.reference import gru_reference, lstm_reference, rnn_reference

from conftest import (FAST_MODULES, LAYOUTS, PROPERTY, TOL, TORCH_MODULES, Case, OpArgs, OpCalls,
                      assert_close_all, case_id, devices, feed, flat, grads, grid, module_inputs,
                      pack, pairwise, rnn_pair, run_module, tolerance, twins, weighted_sum,
                      with_layout)

# ---------------------------------------------------------------------------------------
# The parity grid, with the op calls counted
# ---------------------------------------------------------------------------------------

GRID = [c.replace(seed=i) for i, c in enumerate(grid(
    Case(), nonlinearity=["tanh", "relu"], bias=[True, False], batch_first=[False, True],
    bidirectional=[False, True], num_layers=[1, 2, 3], batched=[True, False], h0=[False, True],
    packed=[False, True]))]
# LSTM (without and with a projection, proj_size 2 < hidden_size 4) and GRU over the same
# axes. The float64 product runs in the fast suite; float32 adds rounding only, so the fast
# suite takes a pairwise cover of it and the slow suite the whole product.
# Sizes: hidden 4 (G*H = 16 or 12 gate columns) keeps every GEMM below the size at which
# MKL hands it to a second thread, which on a loaded 2-core machine can cost a scheduler
# tick (~30 ms) per call and made this grid 10x slower at hidden 6.
CELL_BASE = Case(steps=4, batch=3, input_size=3, hidden_size=4)
CELL_AXES = dict(bias=[True, False], batch_first=[False, True], bidirectional=[False, True],
                 num_layers=[1, 2, 3], batched=[True, False], h0=[False, True],
                 packed=[False, True])
CELL_GRID = [c.replace(seed=i) for i, c in enumerate(
    grid(CELL_BASE.replace(cell="lstm"), proj_size=[0, 2], **CELL_AXES)
    + grid(CELL_BASE.replace(cell="gru"), **CELL_AXES))]
CELL_GRID_F32 = [c.replace(dtype=torch.float32) for c in CELL_GRID]
CELL_GRID_F32_PAIRWISE = [
    c for cell in ("lstm", "gru") for c in pairwise(
        [c for c in CELL_GRID_F32 if c.cell == cell], ["proj_size", *CELL_AXES])]


def run_twins(case):
    """Runs both modules on the same input; returns their (output, h_n, grads) and the
    fastrnn op calls of the fastrnn module's forward and of its backward."""
    ref, fast = twins(case)
    x, h0, lengths = module_inputs(case)
    torch.manual_seed(case.seed + 100)
    want = run_module(ref, case, x, h0, lengths)
    torch.manual_seed(case.seed + 100)
    with OpCalls() as forward_calls:
        out, h_n = fast(feed(case, x, lengths), h0)
    loss = weighted_sum(out, h_n)
    with OpCalls() as backward_calls:
        g = grads(fast, loss, [x, h0])
    return want, (out, h_n, g), forward_calls, backward_calls, fast


def check_one_call_each(case, fast, forward_calls, backward_calls):
    """Exactly one fastrnn::<cell> call in forward (with the module's settings) and one
    fastrnn::<cell>_backward call in backward; no torch RNN op ran instead."""
    assert forward_calls.names() == [case.cell], forward_calls.names()
    assert backward_calls.names() == [case.cell + "_backward"], backward_calls.names()
    _, args, _ = forward_calls.calls[0]
    states = 2 if case.cell == "lstm" else 1
    assert tuple(args[2 + states:-1]) == case.op_config
    op_args = OpArgs.from_call(case, args)
    assert len(op_args.weights) == len(list(fast.parameters())) == case.cells * case.per_cell
    assert (op_args.batch_sizes is not None) == case.packed
    for calls in (forward_calls, backward_calls):
        assert not [op for op in calls.aten if "rnn" in op or "lstm" in op or "gru" in op], calls.aten


def check_parity(case, want, got):
    (out_r, h_r, g_r), (out_f, h_f, g_f) = want, got
    if case.packed:
        assert type(out_f) is type(out_r) is PackedSequence
        assert torch.equal(out_f.batch_sizes, out_r.batch_sizes)
        assert torch.equal(out_f.sorted_indices, out_r.sorted_indices)
        assert torch.equal(out_f.unsorted_indices, out_r.unsorted_indices)
        out_r, out_f = out_r.data, out_f.data
    if case.cell == "lstm":  # (h_n, c_n), as torch.nn.LSTM returns them
        assert type(h_f) is type(h_r) is tuple and len(h_f) == 2
    assert out_f.shape == out_r.shape
    assert [h.shape for h in flat(h_f)] == [h.shape for h in flat(h_r)]
    assert {t.dtype for t in (out_f, *flat(h_f))} == {case.dtype}
    assert out_f.device == out_r.device
    assert_close_all([out_f, h_f], [out_r, h_r], case.dtype, "output/h_n(/c_n)")
    assert_close_all(g_f, g_r, case.dtype, "grads (input, h0, parameters)")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_parity_with_torch(case, dtype, device):
    case = case.replace(dtype=dtype, device=device)
    want, got, fwd, bwd, fast = run_twins(case)
    check_parity(case, want, got)
    check_one_call_each(case, fast, fwd, bwd)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", CELL_GRID + CELL_GRID_F32_PAIRWISE, ids=case_id)
def test_cell_parity_with_torch(case, device):
    """fastrnn.LSTM / GRU against torch.nn.LSTM / GRU: output, h_n (and c_n) and the
    gradients of x, h0 (and c0) and every parameter (weight_hr included)."""
    case = case.replace(device=device)
    want, got, fwd, bwd, fast = run_twins(case)
    check_parity(case, want, got)
    check_one_call_each(case, fast, fwd, bwd)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CELL_GRID_F32 if c not in CELL_GRID_F32_PAIRWISE],
                         ids=case_id)
def test_cell_parity_with_torch_float32_exhaustive(case):
    """The rest of the float32 product (the fast suite has a pairwise cover of it)."""
    want, got, fwd, bwd, fast = run_twins(case)
    check_parity(case, want, got)
    check_one_call_each(case, fast, fwd, bwd)


# Dropout in training: on the CPU fastrnn draws the masks as torch.nn.RNN does (one
# bernoulli_ per layer boundary from the default generator, torch's dropout noise), so
# under the same seed the results are torch's.
DROPOUT_GRID = [c.replace(seed=i) for i, c in enumerate(grid(
    Case(dropout=0.5, h0=True), nonlinearity=["tanh", "relu"], batch_first=[False, True],
    bidirectional=[False, True], num_layers=[2, 3], batched=[True, False], packed=[False, True]))]
# The same holds for LSTM (with and without a projection: the masks then cover the
# projected width D*proj_size) and GRU.
DROPOUT_GRID += [c.replace(seed=100 + i) for i, c in enumerate(
    grid(CELL_BASE.replace(cell="lstm", dropout=0.5, h0=True), proj_size=[0, 2],
         batch_first=[False, True], bidirectional=[False, True], num_layers=[2, 3],
         batched=[True, False], packed=[False, True])
    + grid(CELL_BASE.replace(cell="gru", dropout=0.5, h0=True), batch_first=[False, True],
           bidirectional=[False, True], num_layers=[2, 3], batched=[True, False],
           packed=[False, True]))]


@pytest.mark.parametrize("case", DROPOUT_GRID, ids=case_id)
def test_dropout_training_parity_with_torch(case):
    want, got, fwd, bwd, fast = run_twins(case)
    check_parity(case, want, got)
    check_one_call_each(case, fast, fwd, bwd)


@pytest.mark.parametrize("case", [
    Case(num_layers=3, bidirectional=True, dropout=0.3, train=False, h0=True, packed=True),
    Case(num_layers=2, dropout=0.3, batched=False),
    Case(num_layers=1, dropout=0.6),
    Case(num_layers=2, dropout=1.0, bidirectional=True, nonlinearity="relu"),
    Case(num_layers=2, batch=0),
    CELL_BASE.replace(cell="lstm", num_layers=3, bidirectional=True, dropout=0.3, train=False, h0=True,
         packed=True),
    CELL_BASE.replace(cell="lstm", proj_size=2, num_layers=2, dropout=0.3, batched=False),
    CELL_BASE.replace(cell="lstm", proj_size=3, num_layers=2, dropout=1.0, bidirectional=True),
    CELL_BASE.replace(cell="lstm", proj_size=1, num_layers=2, batch=0, h0=True),
    CELL_BASE.replace(cell="lstm", num_layers=1, dropout=0.6),
    CELL_BASE.replace(cell="gru", num_layers=3, dropout=0.3, train=False, h0=True, packed=True),
    CELL_BASE.replace(cell="gru", num_layers=2, dropout=1.0, bidirectional=True, batched=False),
    CELL_BASE.replace(cell="gru", num_layers=2, batch=0, h0=True),
    # hidden 1, one step
    CELL_BASE.replace(cell="lstm", proj_size=0, hidden_size=1, steps=1, num_layers=2, bidirectional=True),
    CELL_BASE.replace(cell="gru", hidden_size=1, steps=1, num_layers=2, bidirectional=True, h0=True),
], ids=case_id)
def test_one_call_each_and_parity_in_other_modes(case):
    """Eval mode with dropout, unbatched dropout, dropout with one layer, dropout 1, an
    empty batch: still one op call each way, and torch's results."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want, got, fwd, bwd, fast = run_twins(case)
    check_parity(case, want, got)
    check_one_call_each(case, fast, fwd, bwd)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_no_backward_call_without_gradients(cell):
    """Under torch.no_grad and with nothing requiring grad: one forward op call, which
    keeps no reserve for a backward that cannot come."""
    _, fast = twins(Case(cell=cell, num_layers=2, bidirectional=True))
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    for context in (torch.no_grad, torch.inference_mode):
        with context(), OpCalls() as calls:
            out, h_n = fast(x)
        assert calls.names() == [cell]
        assert calls.calls[0][2][-1].shape == (0,)
        assert not any(t.requires_grad for t in (out, *flat(h_n)))


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_backward_twice_through_a_retained_graph(cell):
    """loss.backward(retain_graph=True) and again: the same gradients both times, as
    torch.nn's modules give."""
    case = Case(cell=cell, num_layers=2, bidirectional=True, h0=True, steps=4, batch=3,
                input_size=3, hidden_size=4)
    ref, fast = twins(case)
    x, h0, _ = module_inputs(case)
    for module in (ref, fast):
        out, h_n = module(x, h0)
        loss = weighted_sum(out, h_n)
        first = torch.autograd.grad(loss, [x, *flat(h0), *module.parameters()],
                                    retain_graph=True)
        again = torch.autograd.grad(loss, [x, *flat(h0), *module.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(first, again)), type(module).__name__


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_backward_fills_no_zeros(cell):
    """With a gradient for every output, backward makes no zero tensor: in particular none
    for the reserve, which has no gradient and is as large as the whole stack's saved
    tensors."""
    case = Case(cell=cell, num_layers=2, steps=5, batch=3)
    _, fast = twins(case)
    x, h0, _ = module_inputs(case)
    out, h_n = fast(x, h0)
    loss = weighted_sum(out, h_n)
    with OpCalls() as calls:
        loss.backward()
    assert calls.names() == [f"{cell}_backward"]
    assert not [name for name in calls.aten if "zero" in name or "fill" in name], calls.aten


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("used", ["output", "h_n", "last step"])
def test_backward_of_part_of_the_outputs_like_torch(cell, used):
    """A loss of some outputs only (the last step, as a classifier reads it; or h_n): the
    gradients that do not come are zeros, which on the CPU reach the backward op as one zero
    broadcast, not a zero tensor filled per call; the gradients are torch.nn's."""
    case = Case(cell=cell, num_layers=2, steps=5, batch=3, batch_first=True)
    ref, fast = twins(case)
    x, _, _ = module_inputs(case)

    def loss_of(module):
        out, h_n = module(x)
        h_n = h_n[0] if cell == "lstm" else h_n
        return {"output": out.sum(), "h_n": h_n.sum(), "last step": out[:, -1].sum()}[used]

    loss = loss_of(fast)
    with OpCalls() as calls:
        got = torch.autograd.grad(loss, [x, *fast.parameters()])
    assert calls.names() == [f"{cell}_backward"]
    assert not [name for name in calls.aten if "zeros" in name or "fill" in name], calls.aten
    want = torch.autograd.grad(loss_of(ref), [x, *ref.parameters()])
    assert_close_all(got, want, case.dtype, cell)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_untouched_by_later_calls(cell, dtype):
    """Every tensor a call returns (output, final states, every gradient) keeps its values
    through later calls of other shapes: the CPU kernels keep their temporaries between
    calls (csrc/scratch.h), and none of them may be something a call returned."""
    case = Case(cell=cell, num_layers=2, batch_first=True, h0=True, steps=6, batch=5,
                input_size=7, hidden_size=9, dtype=dtype)
    ref, fast = twins(case)
    x, h0, _ = module_inputs(case)
    first = run_module(fast, case, x, h0, None)
    kept = [t.clone() for t in flat(first)]
    for steps, batch in [(6, 5), (9, 4), (3, 8)]:
        later = case.replace(steps=steps, batch=batch, seed=steps)
        run_module(fast, later, *module_inputs(later)[:2], None)
    assert all(torch.equal(a, b) for a, b in zip(flat(first), kept))
    assert_close_all(first, run_module(ref, case, x, h0, None), dtype, cell)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("value", [0.0, 0.5])
@pytest.mark.parametrize("layout", ["scalar", "per-unit"])
def test_broadcast_initial_state_like_torch(cell, value, layout):
    """An initial state broadcast from fewer elements (stride 0 in some dimensions, as the
    modules pass hx=None on the CPU) gives torch.nn's results and gradients, its own included
    (summed over the broadcast, by autograd)."""
    case = Case(cell=cell, num_layers=2, bidirectional=True, steps=5, batch=3, input_size=4,
                hidden_size=6, proj_size=3 if cell == "lstm" else 0)
    ref, fast = twins(case)
    x = torch.randn(case.steps, case.batch, case.input_size, dtype=case.dtype)

    def state(width):
        base = (torch.full((), value, dtype=case.dtype) if layout == "scalar"
                else torch.randn(1, 1, width, dtype=case.dtype))
        return base.clone().requires_grad_()

    def run(module, leaves):
        states = [leaf.expand(4, case.batch, leaf_width) for leaf, leaf_width in leaves]
        assert all(s.stride(1) == 0 for s in states)
        out, h_n = module(x, tuple(states) if cell == "lstm" else states[0])
        loss = weighted_sum(out, h_n)
        return out, h_n, torch.autograd.grad(loss, [leaf for leaf, _ in leaves]
                                             + list(module.parameters()))

    widths = [case.proj_size or case.hidden_size] + ([case.hidden_size] if cell == "lstm" else [])
    leaves = [(state(w), w) for w in widths]
    assert_close_all(run(fast, leaves), run(ref, leaves), case.dtype, cell)


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_zero_state_first_made_in_inference_mode(cell):
    """The modules' cached zero state, first made under torch.inference_mode, still serves
    a later call that autograd records (an inference tensor could not be saved for it)."""
    case = Case(cell=cell, steps=4, batch=2, input_size=3, hidden_size=5)
    ref, fast = twins(case)
    x = torch.randn(case.steps, case.batch, case.input_size, dtype=case.dtype,
                    requires_grad=True)
    fastrnn.ops._ZERO.clear()
    fastrnn.ops._ZEROS.clear()
    with torch.inference_mode():
        fast(x)
    kept = [*fastrnn.ops._ZERO.values(), *fastrnn.ops._ZEROS.values()]
    assert kept and all(not z.is_inference() for z in kept)
    got = run_module(fast, case, x, None, None)
    assert_close_all(got, run_module(ref, case, x, None, None), case.dtype, cell)


def test_zeros_are_broadcast_only_in_eager_cpu_calls():
    """hx=None: one element broadcast in an eager CPU call (the ops copy it into memory of
    their own); a dense torch.zeros where a graph is recorded, as torch.nn makes."""
    x = torch.randn(4, 2, 3)
    eager = fastrnn.ops._zeros((2, 2, 5), x)
    assert eager.shape == (2, 2, 5) and eager.stride() == (0, 0, 0) and not eager.any()
    traced = torch.jit.trace(lambda t: fastrnn.ops._zeros((2, 2, 5), t), (x,))
    assert traced(x).is_contiguous() and traced(x).stride() != (0, 0, 0)


def test_zeros_kept_per_shape_within_a_bound():
    """The broadcast zero of each shape is kept (even a view costs a dispatcher call), and
    inputs of ever new batch sizes (packed sequences) do not grow what is kept past its
    bound."""
    x = torch.randn(4, 2, 3)
    first = fastrnn.ops._zeros((2, 2, 5), x)
    assert fastrnn.ops._zeros((2, 2, 5), x) is first
    assert fastrnn.ops._zeros((2, 2, 5), x.double()).dtype == torch.float64
    for batch in range(1, 3 * fastrnn.ops._ZEROS_KEPT):
        zero = fastrnn.ops._zeros((2, batch, 5), x)
        assert zero.shape == (2, batch, 5) and not zero.any()
        assert len(fastrnn.ops._ZEROS) <= fastrnn.ops._ZEROS_KEPT


# ---------------------------------------------------------------------------------------
# Dropout between layers
# ---------------------------------------------------------------------------------------


CELL_KINDS = [Case(), CELL_BASE.replace(cell="lstm"), CELL_BASE.replace(cell="lstm", proj_size=2),
              CELL_BASE.replace(cell="gru")]


def cell_id(case):
    return case.cell + (f"-P{case.proj_size}" if case.proj_size else "")


@pytest.mark.parametrize("kind", CELL_KINDS, ids=cell_id)
def test_dropout_repeatable_under_manual_seed(kind):
    case = kind.replace(num_layers=3, bidirectional=True, dropout=0.5, packed=True, h0=True)
    _, fast = twins(case)
    x, h0, lengths = module_inputs(case)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        out, h_n, g = run_module(fast, case, x, h0, lengths)
        runs.append([out.data, *flat(h_n), *g])
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][0], runs[2][0])


@pytest.mark.parametrize("kind", CELL_KINDS, ids=cell_id)
def test_dropout_eval_mode_has_no_dropout(kind):
    """eval(): the output of the stack without dropout (torch's, and fastrnn's with
    dropout 0), whatever the seed; train() brings dropout back."""
    case = kind.replace(num_layers=3, dropout=0.7, train=False)
    ref, fast = twins(case)
    _, no_dropout = twins(case.replace(dropout=0.0))
    x, h0, _ = module_inputs(case, requires_grad=False)
    torch.manual_seed(0)
    out, h = fast(x)
    torch.manual_seed(1)
    assert_close_all(fast(x), [out, h], torch.float64)
    assert_close_all([out, h], ref(x), torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(flat(no_dropout(x)), flat([out, h])))
    fast.train()
    assert not torch.allclose(fast(x)[0], out)


@pytest.mark.parametrize("kind, p", [(Case(), 0.25), (Case(), 0.6)] + [(k, 0.6) for k in CELL_KINDS[1:]],
                         ids=lambda v: cell_id(v) if isinstance(v, Case) else str(v))
def test_dropout_statistics(p, kind):
    """The masks the module's op call drew: zeros with probability p (within 5 standard
    deviations), the rest 1/(1-p); the module passes its own p and training flag."""
    # many rows in few steps for the gated cells: few (but large) GEMMs
    sizes = dict(steps=30, batch=20, hidden_size=16) if kind.cell == "rnn" else dict(steps=4, batch=150)
    case = kind.replace(num_layers=3, bidirectional=True, dropout=p, dtype=torch.float32, **sizes)
    _, fast = twins(case)
    x, _, _ = module_inputs(case, requires_grad=False)
    with OpCalls() as calls:
        fast(x)
    (_, args, outputs), = calls.calls
    op_args = OpArgs.from_call(case, args)
    _, masks = op_args.reserve_parts(outputs[-1])
    assert masks[0].shape == (case.steps, case.batch, 2 * case.state_size)
    assert len(masks) == 2
    sigma = math.sqrt(p * (1 - p) / masks[0].numel())
    for m in masks:
        assert abs(float((m == 0).float().mean()) - p) < 5 * sigma
        torch.testing.assert_close(m[m != 0], torch.full_like(m[m != 0], 1 / (1 - p)))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", [
    Case(num_layers=2, dropout=0.5, h0=True),
    Case(num_layers=3, bidirectional=True, dropout=0.4, packed=True, batch_first=True,
         nonlinearity="relu", h0=True),
    Case(num_layers=2, bidirectional=True, dropout=0.5, batched=False, bias=False),
    CELL_BASE.replace(cell="lstm", num_layers=3, bidirectional=True, dropout=0.4, packed=True, h0=True),
    CELL_BASE.replace(cell="lstm", proj_size=3, num_layers=2, dropout=0.5, batch_first=True, h0=True),
    CELL_BASE.replace(cell="lstm", proj_size=2, num_layers=2, bidirectional=True, dropout=0.5,
         batched=False, bias=False),
    CELL_BASE.replace(cell="gru", num_layers=3, bidirectional=True, dropout=0.4, packed=True, h0=True),
    CELL_BASE.replace(cell="gru", num_layers=2, dropout=0.5, batched=False, bias=False, h0=True),
], ids=case_id)
def test_dropout_gradients_consistent_with_the_mask(case, device, monkeypatch):
    """The module's output and every gradient equal those of the same module computing
    with fastrnn.reference and the masks that its op call drew (read back from the
    reserve): forward and backward apply the same masks (on CUDA too, where torch.nn's
    modules draw differently)."""
    case = case.replace(device=device)
    _, fast = twins(case)
    x, h0, lengths = module_inputs(case)
    with OpCalls() as calls:
        got = run_module(fast, case, x, h0, lengths)
    assert calls.names() == [case.cell, case.cell + "_backward"]
    _, args, outputs = calls.calls[0]
    _, masks = OpArgs.from_call(case, args).reserve_parts(outputs[-1])
    assert len(masks) == case.num_layers - 1
    assert all(bool((m == 0).any()) and bool((m != 0).any()) for m in masks)

    reference = {"rnn": rnn_reference, "lstm": lstm_reference, "gru": gru_reference}[case.cell]

    def reference_op(input, hx, weights, *, dropout, train, **settings):
        assert (dropout, train) == (case.dropout, True)
        return reference(input, hx, weights, dropout_masks=masks, **settings)

    monkeypatch.setattr(fastrnn.modules, "_" + case.cell, reference_op)
    with OpCalls() as calls:
        want = run_module(fast, case, x, h0, lengths)
    assert calls.names() == []  # the reference ran, not the op
    out_f, out_r = (got[0].data, want[0].data) if case.packed else (got[0], want[0])
    assert_close_all([out_f, got[1]], [out_r, want[1]], case.dtype, "output/h_n")
    assert_close_all(got[2], want[2], case.dtype, "gradients")


# ---------------------------------------------------------------------------------------
# Property-based parity over sizes, layouts, requires_grad patterns, edge cases
# ---------------------------------------------------------------------------------------


def outcome(fn):
    """("ok", result) or ("error", type, message): what fn() did."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ("ok", fn())
    except Exception as e:  # noqa: BLE001 - compared between torch.nn.RNN and fastrnn
        return ("error", type(e), str(e))


def grads_of(outputs, tensors):
    """Gradients of a weighted sum of ``outputs`` (zeros for tensors not reached)."""
    if not any(o.requires_grad for o in flat(outputs)):  # not connected: zero gradients
        return [torch.zeros_like(t) for t in tensors]
    loss = weighted_sum(outputs[0], outputs[1:])
    return list(torch.autograd.grad(loss, tensors, allow_unused=True, materialize_grads=True))


@st.composite
def module_cases(draw, cells=("rnn",)):
    num_layers = draw(st.integers(1, 3))
    cell = draw(st.sampled_from(cells))
    hidden_size = draw(st.integers(1, 6))
    # proj_size < hidden_size (torch's rule), so hidden_size 1 cannot have one
    proj_size = draw(st.integers(0, hidden_size - 1)) if cell == "lstm" else 0
    # up to 3 layers x 2 directions x 5 tensors (LSTM's weight_hr): 30 parameters; the
    # RNN-only strategy keeps its 24 so that its examples stay what they were
    n_params = 24 if cells == ("rnn",) else 30
    c = dict(
        case=Case(
            cell=cell,
            proj_size=proj_size,
            dtype=draw(st.sampled_from([torch.float32, torch.float64])),
            nonlinearity=draw(st.sampled_from(["tanh", "relu"])),
            bias=draw(st.booleans()),
            batch_first=draw(st.booleans()),
            bidirectional=draw(st.booleans()),
            num_layers=num_layers,
            # dropout in training (torch's masks under the same seed) or eval
            dropout=draw(st.sampled_from([0.0, 0.0, 0.5])) if num_layers > 1 else 0.0,
            train=draw(st.booleans()),
            input_size=draw(st.integers(1, 5)),
            hidden_size=hidden_size,
            steps=draw(st.integers(0, 6)),
            batch=draw(st.integers(0, 4)),
            h0=draw(st.booleans()),
            seed=draw(st.integers(0, 2 ** 16)),
        ),
        mode=draw(st.sampled_from(["batched", "unbatched", "packed"])),
        x_layout=draw(st.sampled_from(LAYOUTS)),
        h0_layout=draw(st.sampled_from(LAYOUTS)),
        weight_layouts=draw(st.lists(st.sampled_from(LAYOUTS), min_size=n_params, max_size=n_params)),
        x_grad=draw(st.booleans()),
        h0_grad=draw(st.booleans()),
        param_grads=draw(st.lists(st.booleans(), min_size=n_params, max_size=n_params)),
        enforce_sorted=draw(st.booleans()),
    )
    if c["mode"] == "packed":
        # pack_padded_sequence needs a batch and lengths >= 1 (its errors are not ours)
        case = c["case"]
        c["case"] = case = case.replace(steps=max(case.steps, 1), batch=max(case.batch, 1))
        lengths = draw(st.lists(st.integers(1, case.steps), min_size=case.batch, max_size=case.batch))
        c["lengths"] = sorted(lengths, reverse=True) if c["enforce_sorted"] else lengths
    return c


def build_module_case(c):
    """(modules (torch, fastrnn) sharing the same Parameter objects, input factory, h0
    (LSTM's (h0, c0)), leaves)."""
    case = c["case"]
    ref, fast = twins(case)
    for i, (name, p) in enumerate(list(ref.named_parameters())):
        shared = nn.Parameter(with_layout(p, c["weight_layouts"][i]), requires_grad=c["param_grads"][i])
        setattr(ref, name, shared)
        setattr(fast, name, shared)  # the same Parameter: identical values and strides
    g = torch.Generator().manual_seed(case.seed)
    T, B, I, H = case.steps, case.batch, case.input_size, case.hidden_size
    if c["mode"] == "unbatched":
        shape = (T, I)
    else:
        shape = (B, T, I) if case.batch_first else (T, B, I)
    x = with_layout(torch.randn(shape, generator=g, dtype=case.dtype), c["x_layout"])
    x.requires_grad_(c["x_grad"])
    h0 = None
    if case.h0:
        def state(size):
            h_shape = (case.cells, size) if c["mode"] == "unbatched" else (case.cells, B, size)
            t = with_layout(torch.randn(h_shape, generator=g, dtype=case.dtype), c["h0_layout"])
            return t.requires_grad_(c["h0_grad"])

        h0 = state(case.state_size)
        if case.cell == "lstm":
            h0 = (h0, state(H))

    def make_input():
        if c["mode"] == "packed":
            return pack_padded_sequence(x, torch.tensor(c["lengths"]), batch_first=case.batch_first,
                                        enforce_sorted=c["enforce_sorted"])
        return x

    leaves = [t for t in flat(x, h0) if t.requires_grad]
    leaves += [p for p in ref.parameters() if p.requires_grad]
    return ref, fast, make_input, h0, leaves


def run_property_module(module, make_input, h0, leaves, seed):
    torch.manual_seed(seed)  # the same dropout masks for both modules
    out, h_n = module(make_input(), h0)
    data = out.data if isinstance(out, PackedSequence) else out
    return [data, *flat(h_n), *grads_of([data, h_n], leaves)], out


def check_module_parity(c):
    ref, fast, make_input, h0, leaves = build_module_case(c)
    seed = c["case"].seed
    want = outcome(lambda: run_property_module(ref, make_input, h0, leaves, seed))
    got = outcome(lambda: run_property_module(fast, make_input, h0, leaves, seed))
    assert got[0] == want[0], (got, want)
    if want[0] == "error":
        assert got[1] is want[1] and got[2] == want[2], (got, want)
        return
    (got_tensors, got_out), (want_tensors, want_out) = got[1], want[1]
    if isinstance(want_out, PackedSequence):
        assert isinstance(got_out, PackedSequence)
        assert torch.equal(got_out.batch_sizes, want_out.batch_sizes)
        for a, b in ((got_out.sorted_indices, want_out.sorted_indices),
                     (got_out.unsorted_indices, want_out.unsorted_indices)):
            assert (a is None and b is None) or torch.equal(a, b)
    assert len(got_tensors) == len(want_tensors)
    dtype = c["case"].dtype
    for i, (a, e) in enumerate(zip(got_tensors, want_tensors)):
        assert a.shape == e.shape and a.dtype == e.dtype, (i, a.shape, e.shape)
        torch.testing.assert_close(a, e, **tolerance(a, dtype), msg=lambda m: f"tensor {i}: {m}")


_BASE = dict(case=Case(dtype=torch.float32, steps=3, batch=2, input_size=3, hidden_size=4),
             mode="batched", x_layout="contiguous", h0_layout="contiguous",
             weight_layouts=["contiguous"] * 24, x_grad=True, h0_grad=False,
             param_grads=[True] * 24, enforce_sorted=False)


def _example(case=None, **changes):
    c = dict(_BASE, **changes)
    if case:
        c["case"] = c["case"].replace(**case)
    return c


@given(module_cases())
@example(_example(dict(steps=0)))  # T = 0: the same error as torch.nn.RNN
@example(_example(dict(batch=0, h0=True), h0_grad=True))  # batch 0: empty results
@example(_example(dict(batch=0, steps=0, batch_first=True)))
@example(_example(dict(steps=0), mode="unbatched"))
@example(_example(x_grad=False, param_grads=[False] * 24))  # nothing needs a gradient
@example(_example(dict(bidirectional=True, num_layers=2, h0=True, batch_first=True),
                  weight_layouts=["expanded"] * 24, x_layout="expanded", h0_layout="transposed"))
@example(_example(dict(steps=4, batch=3, bidirectional=True, h0=True), mode="packed",
                  lengths=[1, 4, 2], h0_grad=True, x_layout="sliced"))
@example(_example(dict(steps=4, batch=3, num_layers=3, dropout=0.5, h0=True, batch_first=True),
                  mode="packed", lengths=[1, 4, 2], h0_grad=True))
@PROPERTY
def test_module_matches_torch_property(c):
    check_module_parity(c)


_CELL_BASE = dict(_BASE, weight_layouts=["contiguous"] * 30, param_grads=[True] * 30)


def _cell_example(case, **changes):
    c = dict(_CELL_BASE, **changes)
    c["case"] = c["case"].replace(**case)
    return c


@given(module_cases(cells=("lstm", "gru")))
# T = 0: the same error as torch.nn.LSTM / GRU (padded, batch_first, unbatched)
@example(_cell_example(dict(cell="lstm", steps=0)))
@example(_cell_example(dict(cell="gru", steps=0, batch_first=True)))
@example(_cell_example(dict(cell="lstm", proj_size=2, steps=0), mode="unbatched"))
# batch 0: empty results, h0 and c0 of batch 0
@example(_cell_example(dict(cell="lstm", proj_size=1, batch=0, h0=True), h0_grad=True))
@example(_cell_example(dict(cell="gru", batch=0, steps=0, batch_first=True)))
# nothing needs a gradient
@example(_cell_example(dict(cell="lstm", proj_size=3), x_grad=False, param_grads=[False] * 30))
# only c0 / h0 need one
@example(_cell_example(dict(cell="lstm", h0=True), x_grad=False, h0_grad=True,
                       param_grads=[False] * 30))
@example(_cell_example(dict(cell="lstm", proj_size=2, bidirectional=True, num_layers=3, h0=True,
                            batch_first=True),
                       weight_layouts=["expanded"] * 30, x_layout="expanded",
                       h0_layout="transposed"))
@example(_cell_example(dict(cell="gru", steps=4, batch=3, bidirectional=True, h0=True),
                       mode="packed", lengths=[1, 4, 2], h0_grad=True, x_layout="sliced",
                       h0_layout="sliced", weight_layouts=["sliced"] * 30))
@example(_cell_example(dict(cell="lstm", proj_size=1, steps=4, batch=3, num_layers=3,
                            dropout=0.5, h0=True, batch_first=True, bidirectional=True),
                       mode="packed", lengths=[1, 4, 2], h0_grad=True,
                       param_grads=[True, False, True] * 10))
@PROPERTY
def test_cell_module_matches_torch_property(c):
    """fastrnn.LSTM / GRU against torch.nn.LSTM / GRU over sizes (proj_size drawn in
    [0, hidden_size)), memory layouts of every tensor, requires_grad patterns, packed
    lengths, dropout in training and eval: the same results, or the same error."""
    check_module_parity(c)


# ---------------------------------------------------------------------------------------
# The module's interface: torch.nn.RNN's
# ---------------------------------------------------------------------------------------


def test_parameters_and_init_like_torch():
    torch.manual_seed(0)
    ref = nn.RNN(7, 5, 3, bidirectional=True)
    torch.manual_seed(0)
    fast = fastrnn.RNN(7, 5, 3, bidirectional=True)
    names = [n for n, _ in ref.named_parameters()]
    assert names == [n for n, _ in fast.named_parameters()]
    assert "weight_hh_l1_reverse" in names and "bias_ih_l0" in names
    for (_, a), (_, b) in zip(ref.named_parameters(), fast.named_parameters()):
        assert torch.equal(a, b)  # same init, same RNG draws
    assert repr(fast) == "fastrnn." + repr(ref)  # print(model) tells them apart


def test_positional_constructor_matches_torch():
    args = (4, 6, 2, "relu", False, True, 0.25, True)
    ref, fast = nn.RNN(*args), fastrnn.RNN(*args)
    for attr in ("input_size", "hidden_size", "num_layers", "nonlinearity", "bias",
                 "batch_first", "dropout", "bidirectional"):
        assert getattr(fast, attr) == getattr(ref, attr), attr
    fast64 = fastrnn.RNN(4, 6, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in fast64.parameters())


@pytest.mark.parametrize("direction", ["torch->fastrnn", "fastrnn->torch"])
def test_state_dict_loads_both_ways(direction):
    src = (nn.RNN if direction.startswith("torch") else fastrnn.RNN)(3, 5, 2, bidirectional=True)
    dst = (fastrnn.RNN if direction.startswith("torch") else nn.RNN)(3, 5, 2, bidirectional=True)
    dst.load_state_dict(src.state_dict(), strict=True)
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(dst(x)[0], src(x)[0])


def test_convert_in_place_keeps_parameters():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.RNN(28, 16, 2, batch_first=True)
            self.inner = nn.Sequential(nn.RNN(16, 8, nonlinearity="relu"))
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            y, _ = self.rnn(x)
            y, _ = self.inner[0](y.transpose(0, 1))
            return self.head(y[-1])

    model = Model()
    x = torch.randn(3, 5, 28)
    expected = model(x)
    params = list(model.parameters())
    rnn_before = model.rnn
    assert fastrnn.convert(model) is model
    assert type(model.rnn) is fastrnn.RNN and type(model.inner[0]) is fastrnn.RNN
    assert model.rnn is rnn_before
    assert all(a is b for a, b in zip(params, model.parameters()))
    torch.testing.assert_close(model(x), expected)
    assert fastrnn.convert(nn.RNN(2, 3)).__class__ is fastrnn.RNN


def test_convert_swaps_every_recurrent_module_but_subclasses():
    class MyRNN(nn.RNN):
        pass

    class MyLSTM(nn.LSTM):
        pass

    model = nn.Sequential(MyRNN(2, 3), nn.LSTM(2, 3), nn.GRU(2, 3), MyLSTM(2, 3), nn.Linear(2, 3))
    fastrnn.convert(model)
    assert [type(m) for m in model] == [MyRNN, fastrnn.LSTM, fastrnn.GRU, MyLSTM, nn.Linear]
    fastrnn.revert(model)
    assert [type(m) for m in model] == [MyRNN, nn.LSTM, nn.GRU, MyLSTM, nn.Linear]


@pytest.mark.parametrize("cell, kwargs", [
    ("lstm", dict(num_layers=3, bidirectional=True)),
    ("lstm", dict(num_layers=2, bidirectional=True, proj_size=3)),
    ("lstm", dict(num_layers=1, bias=False, proj_size=1)),
    ("gru", dict(num_layers=3, bidirectional=True)),
    ("gru", dict(num_layers=2, bias=False)),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}{v}" for k, v in v.items()))
def test_cell_parameters_and_init_like_torch(cell, kwargs):
    """The same parameter names, shapes and order (weight_hr_l* with proj_size), the same
    values under the same seed (the same RNG draws), _flat_weights in torch's order, and a
    repr that tells them apart."""
    torch.manual_seed(0)
    ref = TORCH_MODULES[cell](7, 5, **kwargs)
    torch.manual_seed(0)
    fast = FAST_MODULES[cell](7, 5, **kwargs)
    named_r, named_f = list(ref.named_parameters()), list(fast.named_parameters())
    assert [n for n, _ in named_f] == [n for n, _ in named_r]
    assert ("weight_hr_l0" in dict(named_f)) == bool(kwargs.get("proj_size"))
    for (name, a), (_, b) in zip(named_r, named_f):
        assert a.shape == b.shape and torch.equal(a, b), name
    assert [w.shape for w in fast._flat_weights] == [w.shape for w in ref._flat_weights]
    assert fast._flat_weights_names == ref._flat_weights_names
    assert repr(fast) == "fastrnn." + repr(ref)
    # reset_parameters (torch's own) draws the same, too
    torch.manual_seed(5)
    ref.reset_parameters()
    torch.manual_seed(5)
    fast.reset_parameters()
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), fast.parameters()))


@pytest.mark.parametrize("cell, args, kwargs", [
    # input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size
    ("lstm", (4, 6, 2, False, True, 0.25, True, 3), {}),
    ("lstm", (4, 6), dict(num_layers=2, bias=False, batch_first=True, dropout=0.25,
                          bidirectional=True, proj_size=3)),
    ("lstm", (), dict(input_size=4, hidden_size=6, proj_size=5)),
    ("gru", (4, 6, 2, False, True, 0.25, True), {}),
    ("gru", (4, 6), dict(num_layers=2, bias=False, batch_first=True, dropout=0.25,
                         bidirectional=True)),
    ("gru", (), dict(input_size=4, hidden_size=6)),
], ids=["lstm-positional", "lstm-keywords", "lstm-all-keywords", "gru-positional",
        "gru-keywords", "gru-all-keywords"])
def test_cell_constructor_matches_torch(cell, args, kwargs):
    """torch.nn.LSTM / GRU's positional order and keywords (proj_size included, last
    positionally as in torch), device and dtype, and the same module attributes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, fast = TORCH_MODULES[cell](*args, **kwargs), FAST_MODULES[cell](*args, **kwargs)
    for attr in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first",
                 "dropout", "bidirectional", "proj_size"):
        assert getattr(fast, attr) == getattr(ref, attr), attr
    fast64 = FAST_MODULES[cell](4, 6, device="cpu", dtype=torch.float64, **(
        dict(proj_size=2) if cell == "lstm" else {}))
    assert all(p.dtype == torch.float64 for p in fast64.parameters())
    out, _ = fast64(torch.randn(3, 2, 4, dtype=torch.float64))
    assert out.shape == (3, 2, 2 if cell == "lstm" else 6)


@pytest.mark.parametrize("cell", ["rnn", "gru"])
def test_proj_size_refused_like_torch(cell):
    """RNN and GRU refuse proj_size (any value, 0 included) with torch's message."""
    for value in (0, 2):
        with pytest.raises(ValueError) as want:
            TORCH_MODULES[cell](3, 4, proj_size=value)
        with pytest.raises(ValueError) as got:
            FAST_MODULES[cell](3, 4, proj_size=value)
        assert str(got.value) == str(want.value)
        assert "proj_size argument is only supported for LSTM" in str(got.value)


@pytest.mark.parametrize("direction", ["torch->fastrnn", "fastrnn->torch"])
@pytest.mark.parametrize("cell, kwargs", [
    ("lstm", dict(num_layers=2, bidirectional=True)),
    ("lstm", dict(num_layers=2, bidirectional=True, proj_size=3)),
    ("gru", dict(num_layers=2, bidirectional=True, bias=False)),
], ids=["lstm", "lstm-proj", "gru-nobias"])
def test_cell_state_dict_loads_both_ways(cell, kwargs, direction):
    """strict=True both ways, the same keys, and then the same results (bitwise
    parameters); a projected LSTM's state_dict does not load into one without (the
    weight_hr keys), in either module, with torch's error."""
    src_cls, dst_cls = ((TORCH_MODULES[cell], FAST_MODULES[cell]) if direction.startswith("torch")
                        else (FAST_MODULES[cell], TORCH_MODULES[cell]))
    torch.manual_seed(3)
    src = src_cls(3, 5, **kwargs)
    torch.manual_seed(4)
    dst = dst_cls(3, 5, **kwargs)
    result = dst.load_state_dict(src.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert list(dst.state_dict()) == list(src.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(dst.parameters(), src.parameters()))
    x = torch.randn(4, 2, 3)
    assert_close_all(dst(x), src(x), torch.float32)
    if kwargs.get("proj_size"):
        unprojected = {k: v for k, v in kwargs.items() if k != "proj_size"}
        errors = []
        for cls in (TORCH_MODULES[cell], FAST_MODULES[cell]):
            with pytest.raises(RuntimeError) as info:
                cls(3, 5, **unprojected).load_state_dict(src.state_dict(), strict=True)
            errors.append(str(info.value).split(":", 1)[1])  # after "Error(s) in ... for X"
        assert errors[0] == errors[1] and "weight_hr_l0" in errors[0]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cell_convert_and_revert_round_trip(cell):
    """convert turns torch.nn.LSTM / GRU (nested, and the module itself) into fastrnn's in
    place with the same Parameter objects and the same results; revert turns them back
    into torch's own modules, which compute the same; a round trip changes nothing."""
    kwargs = dict(proj_size=2) if cell == "lstm" else {}

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = TORCH_MODULES[cell](5, 4, 2, batch_first=True, bidirectional=True, **kwargs)
            self.inner = nn.Sequential(TORCH_MODULES[cell](self.rnn.proj_size * 2 or 8, 3))
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            y, _ = self.rnn(x)
            y, _ = self.inner[0](y.transpose(0, 1))
            return self.head(y[-1])

    torch.manual_seed(0)
    model = Model().double()
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    expected = model(x)
    params = list(model.parameters())
    outer = model.rnn
    assert fastrnn.convert(model) is model
    assert type(model.rnn) is FAST_MODULES[cell] and type(model.inner[0]) is FAST_MODULES[cell]
    assert model.rnn is outer and all(a is b for a, b in zip(params, model.parameters()))
    with OpCalls() as calls:
        got = model(x)
    assert calls.names() == [cell, cell]
    torch.testing.assert_close(got, expected, **TOL[torch.float64])
    assert fastrnn.revert(model) is model
    assert type(model.rnn) is TORCH_MODULES[cell] and type(model.inner[0]) is TORCH_MODULES[cell]
    assert all(a is b for a, b in zip(params, model.parameters()))
    with OpCalls() as calls:
        again = model(x)
    assert calls.names() == []  # torch's own kernels again
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    # a module given directly, and converting twice is converting once
    single = TORCH_MODULES[cell](2, 3)
    assert fastrnn.convert(fastrnn.convert(single)) is single and type(single) is FAST_MODULES[cell]
    assert fastrnn.revert(fastrnn.revert(single)) is single and type(single) is TORCH_MODULES[cell]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cell_copies_pickle_and_save(cell):
    torch.manual_seed(0)
    module = FAST_MODULES[cell](3, 4, 2, **(dict(proj_size=2) if cell == "lstm" else {}))
    x = torch.randn(5, 2, 3)
    expected = flat(module(x))
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module)),
                  torch.load(buf, weights_only=False)):
        assert type(clone) is FAST_MODULES[cell]
        assert all(torch.equal(a, b) for a, b in zip(flat(clone(x)), expected))


def test_copies_pickle_and_save():
    rnn = fastrnn.RNN(3, 4, 2, nonlinearity="relu")
    x = torch.randn(5, 2, 3)
    expected = rnn(x)[0]
    for clone in (copy.deepcopy(rnn), pickle.loads(pickle.dumps(rnn))):
        assert type(clone) is fastrnn.RNN
        torch.testing.assert_close(clone(x)[0], expected)
    buf = io.BytesIO()
    torch.save(rnn, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x)[0], expected)


def test_to_dtype_and_flatten_parameters():
    ref, fast = rnn_pair(3, 4, 2)
    ref, fast = ref.double(), fast.to(torch.float64)
    fast.flatten_parameters()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    assert_close_all(fast(x), ref(x), torch.float64)


@pytest.mark.parametrize("cell, kwargs", [("rnn", {}), ("lstm", {}), ("gru", {}),
                                          ("lstm", dict(proj_size=3))],
                         ids=["rnn", "lstm", "gru", "lstm-proj"])
def test_meta_device_like_torch(cell, kwargs):
    """A module built on the meta device (deferred initialisation, memory planning) runs
    forward and backward there as torch.nn's does, also inside a CPU autocast region, and
    after to_empty + load_state_dict runs for real."""
    with torch.device("meta"):
        ref = TORCH_MODULES[cell](3, 5, 2, batch_first=True, bidirectional=True, **kwargs)
        fast = FAST_MODULES[cell](3, 5, 2, batch_first=True, bidirectional=True, **kwargs)
        x = torch.randn(4, 6, 3)
        for autocast in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                (o1, h1), (o2, h2) = ref(x), fast(x)
            h1, h2 = (h1, h2) if cell == "lstm" else ((h1,), (h2,))
            for a, b in zip((o1, *h1), (o2, *h2)):
                assert (b.device.type, b.shape, b.dtype) == ("meta", a.shape, a.dtype)
        o2.sum().backward()
        for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
            assert (p.grad.device.type, p.grad.shape) == ("meta", q.shape), name
    torch.manual_seed(0)
    real = TORCH_MODULES[cell](3, 5, 2, batch_first=True, bidirectional=True, **kwargs)
    fast = fast.to_empty(device="cpu")
    fast.load_state_dict(real.state_dict())
    x = torch.randn(4, 6, 3)
    assert_close_all(fast(x), real(x), torch.float32)


def test_functional_call_uses_the_given_parameters():
    ref, fast = rnn_pair(3, 4)
    new = {k: torch.randn_like(v) for k, v in fast.state_dict().items()}
    x = torch.randn(5, 2, 3)
    out = torch.func.functional_call(fast, new, (x,))
    expected = torch.func.functional_call(ref, new, (x,))
    assert_close_all(out, expected, torch.float32)
    # and the module's own parameters are untouched
    assert_close_all(fast(x), ref(x), torch.float32)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_torch_func_grad_matches_torch(cell):
    """torch.func.grad over functional_call (functional training) gives torch.nn's
    gradients, for the parameters and the input."""
    ref, fast = rnn_pair(3, 4, 2, cell=cell, batch_first=True, dtype=torch.float64)
    x = torch.randn(2, 5, 3, dtype=torch.float64)

    def grads(module):
        def loss(params, x):
            out, _ = torch.func.functional_call(module, params, (x,))
            return out.square().sum()
        return torch.func.grad(loss, argnums=(0, 1))(dict(module.named_parameters()), x)

    (expected_params, expected_x), (params, gx) = grads(ref), grads(fast)
    assert params.keys() == expected_params.keys()
    for name in params:
        torch.testing.assert_close(params[name], expected_params[name], msg=name)
    torch.testing.assert_close(gx, expected_x)


def test_torch_func_gradients_differentiated_outside_raise():
    """Gradients made inside torch.func.grad that depend on tensors tracked outside it (here
    the module's own parameters) cannot be differentiated again by the outer autograd: the
    backward inside the transform ran the backward op, which has no formula. Differentiating
    them raises, rather than giving a zero gradient. (Nested torch.func transforms and
    create_graph=True work: tests/test_autograd_transforms.py.)"""
    _, fast = rnn_pair(3, 4)
    x = torch.randn(5, 2, 3)
    gx = torch.func.grad(lambda x: fast(x)[0].square().sum())(x)
    with pytest.raises(RuntimeError, match="double backward .* not supported by fastrnn's rnn op"):
        gx.sum().backward()


def test_parameters_replaced_after_construction_are_used():
    """A Parameter assigned after construction (as in the property test's layouts) is the
    one the op reads: _flat_weights is refreshed on each call."""
    ref, fast = rnn_pair(3, 4, 2)
    new = nn.Parameter(torch.randn(4, 4))
    ref.weight_hh_l1 = new
    fast.weight_hh_l1 = new
    x = torch.randn(5, 2, 3)
    assert_close_all(fast(x), ref(x), torch.float32)


EDGE_SIZES = {"T=1": (1, 3, 4, 2), "batch=1": (6, 1, 4, 2), "hidden=1": (6, 3, 1, 2),
              "T=1000": (1000, 2, 8, 1)}  # (steps, batch, hidden, layers)


@pytest.mark.parametrize("cell, dtype, size", [
    pytest.param(cell, dtype, size, id=f"{cell}-{dname}-{size}") for cell in ("rnn", "lstm", "gru")
    for dtype, dname in ((torch.float64, "f64"), (torch.float32, "f32")) for size in EDGE_SIZES
    # LSTM's and GRU's long sequence runs in float64 only (float32 adds rounding only)
    if not (size == "T=1000" and cell != "rnn" and dtype == torch.float32)
])
def test_edge_sizes(cell, dtype, size):
    steps, batch, hidden, layers = EDGE_SIZES[size]
    if steps == 1000 and cell != "rnn":
        hidden = 4  # small per-step GEMMs: one thread (see CELL_BASE)
    ref, fast = rnn_pair(3, hidden, layers, bidirectional=True, cell=cell)
    ref, fast = ref.to(dtype), fast.to(dtype)
    x = torch.randn(steps, batch, 3, dtype=dtype, requires_grad=True)
    results = []
    for m in (ref, fast):
        out, h = m(x)
        results.append([out, *flat(h), *grads(m, weighted_sum(out, h), [x])])
    tol = TOL[dtype] if steps < 1000 else dict(rtol=1e-3, atol=1e-4)
    for a, e in zip(results[1], results[0]):
        torch.testing.assert_close(a, e, **tol)


def test_non_contiguous_inputs_and_weights():
    ref, fast = rnn_pair(4, 6, 2, batch_first=True)
    with torch.no_grad():
        for name, p in list(fast.named_parameters()):
            if p.dim() == 2:  # same values, transposed storage
                setattr(fast, name, nn.Parameter(p.detach().t().contiguous().t()))
                assert not getattr(fast, name).is_contiguous()
    base = torch.randn(3, 5, 8, dtype=torch.float32)  # batch_first: [B, T, 2 * I]
    x = base[:, :, ::2].requires_grad_()  # non-contiguous view
    h0 = torch.randn(3, 2, 6).transpose(0, 1)  # non-contiguous [L, B, H]
    assert not x.is_contiguous() and not h0.is_contiguous()
    results = []
    for m in (ref, fast):
        out, h = m(x, h0)
        results.append([out, h, *grads(m, weighted_sum(out, h), [x])])
    for a, e in zip(results[1], results[0]):
        torch.testing.assert_close(a, e, **TOL[torch.float32])


def test_packed_sorted_and_unsorted():
    ref, fast = rnn_pair(3, 5, 2, bidirectional=True)
    x = torch.randn(7, 4, 3)
    lengths = torch.tensor([7, 5, 5, 2])
    for enforce_sorted in (True, False):
        lens = lengths if enforce_sorted else lengths[[2, 0, 3, 1]]
        p = nn.utils.rnn.pack_padded_sequence(x, lens, enforce_sorted=enforce_sorted)
        (o1, h1), (o2, h2) = fast(p), ref(p)
        torch.testing.assert_close(o1.data, o2.data)
        torch.testing.assert_close(h1, h2)


def rnn_errors():
    """(description, callable) pairs that must raise exactly what torch.nn.RNN raises."""
    x = torch.randn(5, 2, 3)
    return {
        "bad nonlinearity": lambda cls: cls(3, 4, nonlinearity="sigmoid"),
        "dropout > 1": lambda cls: cls(3, 4, dropout=1.5),
        "dropout < 0": lambda cls: cls(3, 4, dropout=-0.1),
        "dropout bool": lambda cls: cls(3, 4, dropout=True),
        "hidden_size 0": lambda cls: cls(3, 0),
        "hidden_size negative": lambda cls: cls(3, -1),
        "num_layers 0": lambda cls: cls(3, 4, num_layers=0),
        "input_size 0": lambda cls: cls(0, 4),
        "hidden_size float": lambda cls: cls(3, 4.0),
        "proj_size": lambda cls: cls(3, 4, proj_size=2),
        "wrong input size": lambda cls: cls(3, 4)(torch.randn(5, 2, 7)),
        "4-D input": lambda cls: cls(3, 4)(torch.randn(5, 2, 3, 1)),
        "1-D input": lambda cls: cls(3, 4)(torch.randn(3)),
        "input dtype": lambda cls: cls(3, 4)(x.double()),
        "hx dtype": lambda cls: cls(3, 4)(x, torch.zeros(1, 2, 4, dtype=torch.float64)),
        "hx layers": lambda cls: cls(3, 4)(x, torch.zeros(2, 2, 4)),
        "hx batch": lambda cls: cls(3, 4)(x, torch.zeros(1, 3, 4)),
        "hx hidden": lambda cls: cls(3, 4)(x, torch.zeros(1, 2, 5)),
        "hx 2-D for batched": lambda cls: cls(3, 4)(x, torch.zeros(2, 4)),
        "hx 3-D for unbatched": lambda cls: cls(3, 4)(x[:, 0], torch.zeros(1, 1, 4)),
        "empty sequence": lambda cls: cls(3, 4)(torch.randn(0, 2, 3)),
        "packed hx batch": lambda cls: cls(3, 4)(
            nn.utils.rnn.pack_padded_sequence(x, [5, 3]), torch.zeros(1, 3, 4)),
        "bidirectional hx layers": lambda cls: cls(3, 4, 2, bidirectional=True)(
            x, torch.zeros(2, 2, 4)),
        "hx on meta": lambda cls: cls(3, 4)(x, torch.zeros(1, 2, 4, device="meta")),
        "int input": lambda cls: cls(3, 4)(x.long()),
        "hx int": lambda cls: cls(3, 4)(x, torch.zeros(1, 2, 4, dtype=torch.long)),
        "hx bool": lambda cls: cls(3, 4)(x, torch.zeros(1, 2, 4, dtype=torch.bool)),
        "empty sequence batch_first": lambda cls: cls(3, 4, batch_first=True)(torch.randn(2, 0, 3)),
        "empty sequence unbatched": lambda cls: cls(3, 4)(torch.randn(0, 3)),
    }


def common_errors():
    """Errors of every recurrent module: constructor and input checks, shared by
    torch.nn.RNN / LSTM / GRU (messages naming the module say LSTM: or GRU:)."""
    x = torch.randn(5, 2, 3)
    return {
        "dropout > 1": lambda cls: cls(3, 4, dropout=1.5),
        "dropout < 0": lambda cls: cls(3, 4, dropout=-0.1),
        "dropout bool": lambda cls: cls(3, 4, dropout=True),
        "hidden_size 0": lambda cls: cls(3, 0),
        "hidden_size negative": lambda cls: cls(3, -1),
        "hidden_size float": lambda cls: cls(3, 4.0),
        "num_layers 0": lambda cls: cls(3, 4, num_layers=0),
        "num_layers float": lambda cls: cls(3, 4, num_layers=2.0),
        "input_size 0": lambda cls: cls(0, 4),
        "nonlinearity keyword": lambda cls: cls(3, 4, nonlinearity="tanh"),
        "too many positional": lambda cls: cls(3, 4, 1, True, False, 0.0, False, 0, "cpu",
                                               torch.float32, 5),
        "wrong input size": lambda cls: cls(3, 4)(torch.randn(5, 2, 7)),
        "4-D input": lambda cls: cls(3, 4)(torch.randn(5, 2, 3, 1)),
        "1-D input": lambda cls: cls(3, 4)(torch.randn(3)),
        "input dtype": lambda cls: cls(3, 4)(x.double()),
        "int input": lambda cls: cls(3, 4)(x.long()),
        "input on meta": lambda cls: cls(3, 4)(x.to("meta")),
        "empty sequence": lambda cls: cls(3, 4)(torch.randn(0, 2, 3)),
        "empty sequence batch_first": lambda cls: cls(3, 4, batch_first=True)(torch.randn(2, 0, 3)),
        "empty sequence unbatched": lambda cls: cls(3, 4)(torch.randn(0, 3)),
    }


def gru_errors():
    x = torch.randn(5, 2, 3)

    def h(*shape, **kw):
        return torch.zeros(*shape, **kw)

    return {
        **common_errors(),
        "proj_size": lambda cls: cls(3, 4, proj_size=2),
        "proj_size 0": lambda cls: cls(3, 4, proj_size=0),
        "hx dtype": lambda cls: cls(3, 4)(x, h(1, 2, 4, dtype=torch.float64)),
        "hx int": lambda cls: cls(3, 4)(x, h(1, 2, 4, dtype=torch.long)),
        "hx layers": lambda cls: cls(3, 4)(x, h(2, 2, 4)),
        "hx batch": lambda cls: cls(3, 4)(x, h(1, 3, 4)),
        "hx hidden": lambda cls: cls(3, 4)(x, h(1, 2, 5)),
        "hx 2-D for batched": lambda cls: cls(3, 4)(x, h(2, 4)),
        "hx 3-D for unbatched": lambda cls: cls(3, 4)(x[:, 0], h(1, 1, 4)),
        "hx a tuple": lambda cls: cls(3, 4)(x, (h(1, 2, 4), h(1, 2, 4))),
        "packed hx batch": lambda cls: cls(3, 4)(pack_padded_sequence(x, [5, 3]), h(1, 3, 4)),
        "bidirectional hx layers": lambda cls: cls(3, 4, 2, bidirectional=True)(x, h(2, 2, 4)),
        "hx on meta": lambda cls: cls(3, 4)(x, h(1, 2, 4, device="meta")),
    }


def lstm_errors():
    x = torch.randn(5, 2, 3)

    def h(*shape, **kw):
        return torch.zeros(*shape, **kw)

    return {
        **common_errors(),
        "proj_size negative": lambda cls: cls(3, 4, proj_size=-1),
        "proj_size == hidden_size": lambda cls: cls(3, 4, proj_size=4),
        "proj_size > hidden_size": lambda cls: cls(3, 4, proj_size=5),
        "proj_size float": lambda cls: cls(3, 4, proj_size=2.0),
        "hx not a tuple": lambda cls: cls(3, 4)(x, h(1, 2, 4)),
        "hx a 1-tuple": lambda cls: cls(3, 4)(x, (h(1, 2, 4),)),
        "hx layers": lambda cls: cls(3, 4)(x, (h(2, 2, 4), h(1, 2, 4))),
        "cx layers": lambda cls: cls(3, 4)(x, (h(1, 2, 4), h(2, 2, 4))),
        "hx batch": lambda cls: cls(3, 4)(x, (h(1, 3, 4), h(1, 2, 4))),
        "cx batch": lambda cls: cls(3, 4)(x, (h(1, 2, 4), h(1, 3, 4))),
        "hx hidden": lambda cls: cls(3, 4)(x, (h(1, 2, 5), h(1, 2, 4))),
        "cx hidden": lambda cls: cls(3, 4)(x, (h(1, 2, 4), h(1, 2, 5))),
        "proj hx of hidden_size": lambda cls: cls(3, 4, proj_size=2)(x, (h(1, 2, 4), h(1, 2, 4))),
        "proj cx of proj_size": lambda cls: cls(3, 4, proj_size=2)(x, (h(1, 2, 2), h(1, 2, 2))),
        "hx 2-D for batched": lambda cls: cls(3, 4)(x, (h(1, 4), h(1, 2, 4))),
        "cx 2-D for batched": lambda cls: cls(3, 4)(x, (h(1, 2, 4), h(1, 4))),
        "hx 3-D for unbatched": lambda cls: cls(3, 4)(x[:, 0], (h(1, 1, 4), h(1, 4))),
        "cx 3-D for unbatched": lambda cls: cls(3, 4)(x[:, 0], (h(1, 4), h(1, 1, 4))),
        "unbatched hx hidden": lambda cls: cls(3, 4)(x[:, 0], (h(1, 5), h(1, 4))),
        "bidirectional hx layers": lambda cls: cls(3, 4, 2, bidirectional=True)(
            x, (h(2, 2, 4), h(4, 2, 4))),
        "bidirectional cx layers": lambda cls: cls(3, 4, 2, bidirectional=True)(
            x, (h(4, 2, 4), h(2, 2, 4))),
        "hx on meta": lambda cls: cls(3, 4)(x, (h(1, 2, 4, device="meta"), h(1, 2, 4))),
        "cx on meta": lambda cls: cls(3, 4)(x, (h(1, 2, 4), h(1, 2, 4, device="meta"))),
        # torch's CPU LSTM reports these from oneDNN ("get_mkldnn_dtype: unsupported data
        # type", "could not create a primitive descriptor ..."), whose messages depend on
        # the build; they are compared with torch's own implementation (oneDNN off), the
        # one every other device and build runs
        "hx dtype": lambda cls: cls(3, 4)(x, (h(1, 2, 4, dtype=torch.float64), h(1, 2, 4))),
        "hx int": lambda cls: cls(3, 4)(x, (h(1, 2, 4, dtype=torch.long), h(1, 2, 4))),
        "hx half, cx float": lambda cls: cls(3, 4)(x, (h(1, 2, 4).half(), h(1, 2, 4))),
        "proj hx dtype": lambda cls: cls(3, 4, proj_size=2)(
            x, (h(1, 2, 2, dtype=torch.float64), h(1, 2, 4))),
    }


MODULE_ERRORS = {"rnn": rnn_errors, "lstm": lstm_errors, "gru": gru_errors}


def _raised(make, cls, native=False):
    with pytest.raises(Exception) as info:
        with warnings.catch_warnings(), torch.backends.mkldnn.flags(enabled=not native):
            warnings.simplefilter("ignore")
            make(cls)
    return info.value


@pytest.mark.parametrize("cell, name", [(cell, name) for cell, errors in MODULE_ERRORS.items()
                                         for name in errors()])
def test_errors_match_torch(cell, name):
    """Every error a user can meet in the constructor or forward: torch's exception type
    and message, exactly."""
    make = MODULE_ERRORS[cell]()[name]
    want = _raised(make, TORCH_MODULES[cell], native=cell == "lstm")
    got = _raised(make, FAST_MODULES[cell])
    assert type(got) is type(want)
    assert str(got) == str(want)


# Where torch.nn.LSTM does not check (or checks in one backend and not another), fastrnn
# raises a clear error instead: (case, fastrnn's message, what torch does). Reported to the
# lead as deliberate differences, not bugs.
LSTM_STRICTER = {
    # torch.nn.LSTM skips check_forward_args for a PackedSequence with hx given: the
    # batch mismatch surfaces as a broadcast error of the cell math, or not at all
    "packed hx batch": (
        lambda cls: cls(3, 4)(pack_padded_sequence(torch.randn(5, 2, 3), [5, 3]),
                              (torch.zeros(1, 3, 4), torch.zeros(1, 2, 4))),
        "Expected hidden[0] size (1, 2, 4), got [1, 3, 4]"),
    "packed cx batch": (
        lambda cls: cls(3, 4, proj_size=2)(pack_padded_sequence(torch.randn(5, 2, 3), [5, 3]),
                                           (torch.zeros(1, 2, 2), torch.zeros(1, 1, 4))),
        "Expected hidden[1] size (1, 2, 4), got [1, 1, 4]"),
    # a cx of another dtype: torch computes in the promoted dtype or fails inside its
    # kernels with messages that differ by backend; fastrnn's op names cx
    "cx float, module double": (
        lambda cls: cls(3, 4).double()(torch.randn(5, 2, 3, dtype=torch.float64),
                                       (torch.zeros(1, 2, 4, dtype=torch.float64),
                                        torch.zeros(1, 2, 4))),
        "fastrnn::lstm: cx must have the same dtype as input (Double), got Float"),
    "cx double, module float": (
        lambda cls: cls(3, 4, proj_size=2)(torch.randn(5, 2, 3),
                                           (torch.zeros(1, 2, 2),
                                            torch.zeros(1, 2, 4, dtype=torch.float64))),
        "fastrnn::lstm: cx must have the same dtype as input (Float), got Double"),
}


@pytest.mark.parametrize("name", list(LSTM_STRICTER))
def test_lstm_errors_where_torch_does_not_check(name):
    make, message = LSTM_STRICTER[name]
    got = _raised(make, fastrnn.LSTM)
    assert type(got) is RuntimeError and str(got) == message


@pytest.mark.parametrize("cell, kwargs", [("rnn", {}), ("lstm", {}), ("lstm", dict(proj_size=3)),
                                          ("gru", {})], ids=["rnn", "lstm", "lstm-proj", "gru"])
def test_empty_batch_like_torch(cell, kwargs):
    ref, fast = rnn_pair(3, 4, 2, cell=cell, **kwargs)
    x = torch.randn(5, 0, 3)
    got, want = flat(fast(x)), flat(ref(x))
    assert [t.shape for t in got] == [t.shape for t in want]
    assert got[0].shape == (5, 0, kwargs.get("proj_size", 4))


# ---------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------


def _train_step_results(module, x, h0):
    out, h_n = module(x, h0)
    data = out.data if isinstance(out, PackedSequence) else out
    leaves = [h0, *module.parameters()]
    return [data.detach(), h_n.detach(), *torch.autograd.grad(weighted_sum(data, h_n), leaves)]


def test_threads_share_one_module():
    ref, fast = rnn_pair(6, 10, num_layers=2, bidirectional=True, nonlinearity="relu", seed=5)
    ref, fast = ref.double(), fast.double()
    inputs = []
    for i in range(8):
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(7, 3 + i % 3, 6, generator=g, dtype=torch.float64)
        h0 = torch.randn(4, x.shape[1], 10, generator=g, dtype=torch.float64, requires_grad=True)
        if i % 2:
            lengths = torch.randint(1, 8, (x.shape[1],), generator=g)
            x = pack_padded_sequence(x, lengths, enforce_sorted=False)
        inputs.append((x, h0))
    expected = [_train_step_results(fast, x, h0) for x, h0 in inputs]
    for (x, h0), want in zip(inputs, expected):  # and the single-thread results are right
        for a, e in zip(want, _train_step_results(ref, x, h0)):
            torch.testing.assert_close(a, e, **TOL[torch.float64])

    errors, barrier = [], threading.Barrier(len(inputs))

    def worker(i):
        try:
            barrier.wait()
            for _ in range(15):
                got = _train_step_results(fast, *inputs[i])
                for a, e in zip(got, expected[i]):
                    torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append((i, e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors


def test_threads_dropout_masks_follow_each_threads_draws():
    """Training with dropout from several threads at once: every call's output matches the
    reference with the masks of its own reserve (no mask shared or torn between calls)."""
    case = Case(num_layers=3, bidirectional=True, dropout=0.5, steps=6, batch=4)
    _, fast = twins(case)
    x, h0, _ = module_inputs(case, requires_grad=False)
    errors = []

    def worker():
        try:
            for _ in range(10):
                with OpCalls() as calls:
                    out, h_n = fast(x, h0)
                (_, args, (_, _, reserve)), = calls.calls
                op_args = OpArgs(case, *args[:2], list(args[2]), None)
                _, masks = op_args.reserve_parts(reserve)
                ref_out, ref_h = op_args.reference(masks=masks)
                torch.testing.assert_close(out, ref_out.detach(), **TOL[torch.float64])
                torch.testing.assert_close(h_n, ref_h.detach(), **TOL[torch.float64])
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors


# ---------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------


DETERMINISM_SCRIPT = r"""
import sys, torch, fastrnn
from torch.nn.utils.rnn import pack_padded_sequence
torch.manual_seed(0)
kind = sys.argv[2]
T = 40 if kind in ("tanh", "relu") else 20
if kind in ("tanh", "relu"):
    rnn = fastrnn.RNN(5, 24, 3, bidirectional=True, nonlinearity=kind, dropout=0.3)
elif kind == "lstm":
    rnn = fastrnn.LSTM(5, 24, 3, bidirectional=True, dropout=0.3, proj_size=10)
else:
    rnn = fastrnn.GRU(5, 24, 3, bidirectional=True, dropout=0.3)
x = torch.randn(T, 9, 5, requires_grad=True)
h0 = torch.randn(6, 9, 10 if kind == "lstm" else 24, requires_grad=True)
states = [h0, torch.randn(6, 9, 24, requires_grad=True)] if kind == "lstm" else [h0]
lengths = torch.randint(1, T + 1, (9,)); lengths[3] = T
results = []
for inp in (x, pack_padded_sequence(x, lengths, enforce_sorted=False)):
    out, h = rnn(inp, tuple(states) if kind == "lstm" else h0)
    h = list(h) if kind == "lstm" else [h]
    data = out.data if hasattr(out, "batch_sizes") else out
    w = torch.linspace(-1, 1, data.numel()).reshape(data.shape)
    loss = (data * w).sum() + sum(t.sin().sum() for t in h)
    results += [data, *h, *torch.autograd.grad(loss, [x, *states, *rnn.parameters()])]
torch.save([r.detach() for r in results], sys.argv[1])
"""


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu", "lstm", "gru"])
def test_bitwise_deterministic_across_runs_and_processes(tmp_path, nonlinearity):
    """The same seed gives bitwise the same outputs and gradients (dropout masks
    included), in another process and twice in this one."""
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(fastrnn.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, env.get("PYTHONPATH", "")])
    script = tmp_path / "det.py"
    script.write_text(DETERMINISM_SCRIPT)
    runs = []
    path = tmp_path / "child.pt"
    subprocess.run([sys.executable, str(script), str(path), nonlinearity], check=True, env=env,
                   timeout=300)
    runs.append(torch.load(path))
    # ... and twice in this process
    for i in range(2):
        ns = {"__name__": "det"}
        path = tmp_path / f"here{i}.pt"
        saved_argv = sys.argv
        sys.argv = ["det", str(path), nonlinearity]
        try:
            exec(compile(DETERMINISM_SCRIPT, "det", "exec"), ns)
        finally:
            sys.argv = saved_argv
        runs.append(torch.load(path))
    first = runs[0]
    # (output, h_n, grads of x, h0, 24 parameters) x 2; LSTM: c_n, c0 and 6 weight_hr too
    assert len(first) == (2 * (3 + 3 + 30) if nonlinearity == "lstm" else 2 * (2 + 2 + 24))
    for run in runs[1:]:
        for a, b in zip(first, run):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b), "not bitwise identical"


# ---------------------------------------------------------------------------------------
# Mixed and reduced precision
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_autocast_cpu_like_torch(dtype, packed):
    """torch.nn.RNN under CPU autocast computes in the autocast dtype (its GEMMs are
    autocast ops) and returns output and h_n in it; fastrnn must do the same, with an
    error against float64 comparable to torch's, and float32 parameter gradients."""
    ref, fast = rnn_pair(16, 32, 2, bidirectional=True, seed=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, 16, generator=g)
    lengths = torch.tensor([12, 9, 9, 4, 1])

    def feed_(t):
        return pack_padded_sequence(t, lengths, enforce_sorted=False) if packed else t

    exact_mod = copy.deepcopy(ref).double()
    exact_out, exact_h = exact_mod(feed_(x.double()))
    exact_out = exact_out.data if packed else exact_out
    exact_grads = grads_of([exact_out, exact_h], list(exact_mod.parameters()))
    results = []
    for module in (ref, fast):
        with torch.autocast("cpu", dtype=dtype):
            out, h = module(feed_(x))
        out = out.data if packed else out
        grads_ = grads_of([out, h], list(module.parameters()))
        out, h, exact_out, exact_h = out.detach(), h.detach(), exact_out.detach(), exact_h.detach()
        err = max((out.double() - exact_out).abs().max(), (h.double() - exact_h).abs().max())
        gerr = max(((a.double() - e).abs().max() / e.abs().max()) for a, e in zip(grads_, exact_grads))
        results.append((out.dtype, h.dtype, [gr.dtype for gr in grads_], float(err), float(gerr)))
    (rd, rh, rg, rerr, rgerr), (fd, fh, fg, ferr, fgerr) = results
    assert (fd, fh) == (rd, rh) == (dtype, dtype)
    assert fg == rg == [torch.float32] * len(fg)
    assert ferr <= 2 * rerr + 1e-3, (ferr, rerr)
    assert fgerr <= 2 * rgerr + 1e-2, (fgerr, rgerr)
    assert ferr > 0  # it really ran in reduced precision


def test_autocast_module_mixed_hx():
    """An hx in the autocast dtype next to float32 weights: accepted under autocast (both
    are cast), an error outside it, as in torch.nn.RNN; one op call under autocast."""
    ref, fast = rnn_pair(3, 5, 2)
    x, h0 = torch.randn(4, 2, 3), torch.randn(2, 2, 5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o1, h1 = ref(x, h0)
        with OpCalls() as calls:
            o2, h2 = fast(x, h0)
    assert calls.names() == ["rnn"]
    assert o1.dtype == o2.dtype and h1.dtype == h2.dtype
    torch.testing.assert_close(o2, o1, atol=3e-2, rtol=3e-2)
    for m in (ref, fast):
        with pytest.raises(RuntimeError, match="mat1 and mat2 must have the same dtype"):
            m(x, h0)
    # autocast disabled inside an enabled region: float32 again
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            assert fast(x)[0].dtype == torch.float32


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_autocast_eager_call_records_casts_then_one_node(cell):
    """Under autocast an eager call casts its arguments where autograd records them, then runs
    as without autocast: one fastrnn node fed by the casts of the float32 parameters (not the
    op's own Python autocast and register_autograd kernels, which took 140 us more per small
    forward+backward)."""
    _, fast = rnn_pair(3, 5, 2, cell=cell)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = fast(torch.randn(4, 2, 3))
    node = out.grad_fn
    assert type(node).__name__ == "_EagerBackward"
    inputs = [type(f).__name__ for f, _ in node.next_functions if f is not None]
    assert inputs == ["ToCopyBackward0"] * len(list(fast.parameters())), inputs


def test_autocast_under_compile():
    """torch.compile(fullgraph=True) of fastrnn.RNN inside an autocast region: the same
    dtypes and values as eager (the autocast kernel is seen by the tracer too)."""
    torch._dynamo.reset()
    _, fast = rnn_pair(5, 7, 2, bidirectional=True, seed=2)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 3, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (o1, h1), (o2, h2) = fast(x), compiled(x)
    assert o1.dtype == o2.dtype == h1.dtype == h2.dtype == torch.bfloat16
    torch.testing.assert_close(o2, o1, atol=0, rtol=0)
    torch.testing.assert_close(h2, h1, atol=0, rtol=0)
    g1 = torch.autograd.grad(o1.float().sum(), list(fast.parameters()))
    g2 = torch.autograd.grad(o2.float().sum(), list(fast.parameters()))
    for a, b in zip(g2, g1):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("cell, kwargs", [("rnn", {}), ("lstm", {}), ("gru", {}),
                                          ("lstm", dict(proj_size=5))],
                         ids=["rnn", "lstm", "gru", "lstm-proj"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_half_types_on_cpu_run_in_float32(dtype, cell, kwargs, packed, monkeypatch):
    """On the CPU a bfloat16 / float16 call runs the float32 kernels on its values (float32
    holds them exactly) and rounds what it returns: its forward gives the very bits of the
    float32 call on the same values, rounded; its gradients, in the half type, are the
    float32 call's within the half type's rounding (the output, which backward reads too, is
    rounded to it in between; the reserve stays float32). (A bfloat16 call's products on
    bfloat16 pairs, on CPUs with AVX512-BF16, are tests/test_cpu_bf16_products.py's.)"""
    monkeypatch.setenv("FASTRNN_CPU_BF16_PRODUCTS", "0")
    _, fast = rnn_pair(8, 16, 2, cell=cell, bidirectional=True, **kwargs)
    half = copy.deepcopy(fast).to(dtype)
    single = copy.deepcopy(half).float()
    x = torch.randn(7, 3, 8).to(dtype)
    lengths = torch.tensor([7, 5, 2])
    results = []
    for m, xs in ((half, x), (single, x.float())):
        xs = xs.clone().requires_grad_()
        inp = pack_padded_sequence(xs, lengths) if packed else xs
        out, h = m(inp)
        outs = [out.data if packed else out, *flat(h)]
        results.append((outs, grads_of(outs, [xs, *m.parameters()])))
    (outs_h, grads_h), (outs_s, grads_s) = results
    for a, b in zip(outs_h, outs_s):
        assert a.dtype == dtype and torch.equal(a, b.to(dtype))
    eps = torch.finfo(dtype).eps
    for a, b in zip(grads_h, grads_s):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, rtol=8 * eps, atol=8 * eps * float(b.abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_reduced_precision_on_cpu_like_torch(dtype, nonlinearity):
    """Without autocast: torch.nn.RNN runs in bfloat16 and float16 on the CPU, so fastrnn
    does (forward and backward), with errors against float64 within twice torch's own."""
    ref, fast = rnn_pair(16, 32, 2, nonlinearity=nonlinearity)
    x = torch.randn(12, 4, 16)
    exact_mod = copy.deepcopy(ref).double()
    exact = exact_mod(x.double())
    exact_grads = grads_of(list(exact), list(exact_mod.parameters()))
    errs, gerrs = [], []
    for m in (ref, fast):
        m = copy.deepcopy(m).to(dtype)
        out, h = m(x.to(dtype))
        assert out.dtype == h.dtype == dtype
        grads_ = grads_of([out, h], list(m.parameters()))
        assert all(gr.dtype == dtype for gr in grads_)
        errs.append(max(float((a.detach().double() - e.detach()).abs().max())
                        for a, e in zip((out, h), exact)))
        gerrs.append(max(float((a.double() - e).abs().max() / e.abs().max())
                         for a, e in zip(grads_, exact_grads)))
    assert errs[1] <= 2 * errs[0] + 1e-3, errs
    assert gerrs[1] <= 2 * gerrs[0] + 1e-2, gerrs


CELL_PRECISION = [("lstm", {}), ("lstm", dict(proj_size=20)), ("gru", {})]
CELL_PRECISION_IDS = ["lstm", "lstm-proj", "gru"]


def _errors_vs_float64(module, x, exact, exact_grads, autocast_dtype=None, feed_=lambda t: t):
    """(output dtypes, parameter gradient dtypes, max abs error of output/h_n/c_n, max
    relative error of the parameter gradients) of ``module`` against float64 results."""
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        out, h = module(feed_(x))
    outs = [out.data if isinstance(out, PackedSequence) else out, *flat(h)]
    grads_ = grads_of(outs, list(module.parameters()))
    err = max(float((a.detach().double() - e).abs().max()) for a, e in zip(outs, exact))
    gerr = max(float((a.double() - e).abs().max() / e.abs().max())
               for a, e in zip(grads_, exact_grads))
    return [o.dtype for o in outs], [g.dtype for g in grads_], err, gerr


def _exact(ref, x, feed_=lambda t: t):
    exact_mod = copy.deepcopy(ref).double()
    out, h = exact_mod(feed_(x.double()))
    exact = [out.data if isinstance(out, PackedSequence) else out, *flat(h)]
    exact_grads = grads_of(exact, list(exact_mod.parameters()))
    return [e.detach() for e in exact], exact_grads


@pytest.mark.parametrize("dtype, packed", [(torch.bfloat16, False), (torch.float16, False),
                                           (torch.bfloat16, True)],
                         ids=["bf16-padded", "f16-padded", "bf16-packed"])
@pytest.mark.parametrize("cell, kwargs", CELL_PRECISION, ids=CELL_PRECISION_IDS)
def test_cell_autocast_cpu_error_within_twice_torch(cell, kwargs, dtype, packed):
    """fastrnn.LSTM / GRU under CPU autocast compute in the autocast dtype: output, h_n
    and c_n in it, float32 parameter gradients, and errors against float64 within twice
    torch.nn's under the same autocast (where torch's CPU LSTM cannot run it -- its oneDNN
    kernel refuses float16 on every CPU and bfloat16 on those without AVX-512 -- within
    twice torch's module cast to the dtype)."""
    ref, fast = rnn_pair(16, 32, 2, cell=cell, bidirectional=True, seed=3, **kwargs)
    x = torch.randn(12, 5, 16, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([12, 9, 9, 4, 1])

    def feed_(t):
        return pack_padded_sequence(t, lengths, enforce_sorted=False) if packed else t

    exact, exact_grads = _exact(ref, x, feed_)
    dtypes, gdtypes, err, gerr = _errors_vs_float64(fast, x, exact, exact_grads, dtype, feed_)
    assert dtypes == [dtype] * len(exact)
    assert gdtypes == [torch.float32] * len(gdtypes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, _, ref_err, ref_gerr = _errors_vs_float64(ref, x, exact, exact_grads, dtype, feed_)
    except RuntimeError as e:
        assert cell == "lstm" and "primitive descriptor" in str(e)
        low = copy.deepcopy(ref).to(dtype)
        _, _, ref_err, ref_gerr = _errors_vs_float64(low, x.to(dtype), exact, exact_grads,
                                                     feed_=feed_)
    assert 0 < err <= 2 * ref_err + 1e-3, (err, ref_err)  # > 0: it ran in reduced precision
    assert gerr <= 2 * ref_gerr + 1e-2, (gerr, ref_gerr)


# torch.nn.GRU on the CPU under autocast returns float32 output and h_n (its GEMMs run in
# the autocast dtype, its pointwise math promotes with the float32 h0), and torch.nn.LSTM
# with proj_size a float32 c_n; fastrnn returns every result in the autocast dtype, as
# torch does on CUDA and for the unprojected LSTM (oneDNN) on the CPU.
_AUTOCAST_DTYPE_DIVERGES = pytest.mark.xfail(strict=True, reason=(
    "fastrnn.GRU / LSTM(proj_size) under CPU autocast return the autocast dtype where "
    "torch.nn.GRU returns float32 output/h_n and torch.nn.LSTM(proj_size) a float32 c_n"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("cell, kwargs", [
    pytest.param("lstm", {}, id="lstm"),
    pytest.param("lstm", dict(proj_size=20), id="lstm-proj", marks=_AUTOCAST_DTYPE_DIVERGES),
    pytest.param("gru", {}, id="gru", marks=_AUTOCAST_DTYPE_DIVERGES),
])
def test_cell_autocast_cpu_dtypes_like_torch(cell, kwargs, dtype):
    ref, fast = rnn_pair(16, 32, 2, cell=cell, seed=3, **kwargs)
    x = torch.randn(6, 3, 16)
    with torch.autocast("cpu", dtype=dtype):
        got = [t.dtype for t in flat(fast(x))]
        try:
            want = [t.dtype for t in flat(ref(x))]
        except RuntimeError as e:
            # torch's oneDNN LSTM refuses float16, and bfloat16 on CPUs without AVX-512;
            # where it runs (and on CUDA) every result is in the autocast dtype.
            assert cell == "lstm" and not kwargs and "primitive descriptor" in str(e)
            want = [dtype] * 3
    assert got == want


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("cell, kwargs", CELL_PRECISION, ids=CELL_PRECISION_IDS)
def test_cell_reduced_precision_on_cpu_like_torch(cell, kwargs, dtype):
    """Without autocast: torch.nn.LSTM / GRU run in bfloat16 and float16 on the CPU, so
    fastrnn's do (forward and backward), with errors against float64 within twice
    torch's."""
    ref, fast = rnn_pair(16, 32, 2, cell=cell, seed=1, **kwargs)
    x = torch.randn(12, 4, 16, generator=torch.Generator().manual_seed(2))
    exact, exact_grads = _exact(ref, x)
    results = []
    for m in (ref, fast):
        dtypes, gdtypes, err, gerr = _errors_vs_float64(copy.deepcopy(m).to(dtype), x.to(dtype),
                                                        exact, exact_grads)
        assert dtypes == [dtype] * len(exact) and gdtypes == [dtype] * len(gdtypes)
        results.append((err, gerr))
    (ref_err, ref_gerr), (err, gerr) = results
    assert err <= 2 * ref_err + 1e-3, (err, ref_err)
    assert gerr <= 2 * ref_gerr + 1e-2, (gerr, ref_gerr)


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------


def _roundtrip(obj, weights_only):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=weights_only)


def test_checkpoint_roundtrip_through_torch_rnn():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.rnn = fastrnn.RNN(5, 12, 2, bidirectional=True, batch_first=True, nonlinearity="relu")
    model.head = nn.Linear(24, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(6, 9, 5), torch.randint(0, 3, (6,))
    for _ in range(5):  # trained, so the parameters are not the initial ones
        out, _ = model.rnn(x)
        loss = nn.functional.cross_entropy(model.head(out[:, -1]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    test_x = torch.randn(4, 9, 5, dtype=torch.float64)
    model = model.double()
    expected = model.rnn(test_x)

    state = _roundtrip(model.rnn.state_dict(), weights_only=True)
    as_torch = nn.RNN(5, 12, 2, bidirectional=True, batch_first=True, nonlinearity="relu").double()
    as_torch.load_state_dict(state, strict=True)
    for a, e in zip(as_torch(test_x), expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)  # different kernels, same math

    back = fastrnn.RNN(5, 12, 2, bidirectional=True, batch_first=True, nonlinearity="relu").double()
    back.load_state_dict(_roundtrip(as_torch.state_dict(), weights_only=True), strict=True)
    for a, e in zip(back(test_x), expected):
        assert torch.equal(a, e)  # identical parameters, identical kernels: bitwise

    whole = _roundtrip(model, weights_only=False)  # the module itself
    assert type(whole.rnn) is fastrnn.RNN
    for a, e in zip(whole.rnn(test_x), expected):
        assert torch.equal(a, e)
    # and the optimizer state with it
    opt_state = _roundtrip(opt.state_dict(), weights_only=True)
    assert len(opt_state["state"]) == len(list(model.parameters()))


def test_converted_model_checkpoint_loads_into_unconverted():
    torch.manual_seed(1)
    src = nn.Sequential(nn.RNN(4, 6))
    fastrnn.convert(src)
    sd = _roundtrip(src.state_dict(), weights_only=True)
    dst = nn.Sequential(nn.RNN(4, 6))
    dst.load_state_dict(sd, strict=True)
    x = torch.randn(5, 2, 4)
    torch.testing.assert_close(dst[0](x)[0], src[0](x)[0])


# ---------------------------------------------------------------------------------------
# Warnings
# ---------------------------------------------------------------------------------------


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [(w.category, str(w.message)) for w in caught]


def _non_contiguous_forward(cls):
    torch.manual_seed(0)
    m = cls(3, 4, 2)
    m.weight_hh_l0 = nn.Parameter(m.weight_hh_l0.detach().t().contiguous().t())
    m.weight_ih_l1 = nn.Parameter(torch.randn(8, 4)[::2])
    m(torch.randn(5, 2, 3))


WARNING_SCENARIOS = {
    "dropout with one layer": lambda cls: cls(3, 4, 1, dropout=0.5),
    "dropout with two layers": lambda cls: cls(3, 4, 2, dropout=0.5),
    # torch.nn.RNN warns about non-contiguous weights only in cudnn's path (CUDA: "RNN
    # module weights are not part of single contiguous chunk of memory ..."); on the CPU it
    # says nothing, and neither does fastrnn. fastrnn never warns about it, on CUDA either:
    # its kernels take each weight as it is, nothing is compacted at every call.
    "non-contiguous weights, CPU forward": _non_contiguous_forward,
    "flatten_parameters on CPU": lambda cls: cls(3, 4).flatten_parameters(),
    "unsorted packed input": lambda cls: cls(3, 4)(
        pack_padded_sequence(torch.randn(5, 3, 3), [2, 5, 3], enforce_sorted=False)),
    "training forward with dropout": lambda cls: cls(3, 4, 3, dropout=0.5)(torch.randn(5, 2, 3)),
}


# the scenarios that take any module (the non-contiguous one sets RNN-shaped weights)
_ANY_CELL = ["dropout with one layer", "dropout with two layers", "flatten_parameters on CPU",
             "unsorted packed input", "training forward with dropout"]


@pytest.mark.parametrize("cell, name", [("rnn", n) for n in WARNING_SCENARIOS]
                         + [(c, n) for c in ("lstm", "gru") for n in _ANY_CELL])
def test_warns_like_torch(cell, name):
    make = WARNING_SCENARIOS[name]
    fast_cls, torch_cls = FAST_MODULES[cell], TORCH_MODULES[cell]
    assert _warnings_of(lambda: make(fast_cls)) == _warnings_of(lambda: make(torch_cls))
    if name == "dropout with one layer":
        assert _warnings_of(lambda: make(fast_cls)), "torch warns here, so must fastrnn"


# ---------------------------------------------------------------------------------------
# torch.compile of the module
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [
    Case(num_layers=2, bidirectional=True, h0=True),
    Case(num_layers=2, bidirectional=True, packed=True),
    Case(num_layers=3, dropout=0.5, batch_first=True, nonlinearity="relu"),
    Case(num_layers=2, batched=False, h0=True),
    CELL_BASE.replace(cell="lstm", num_layers=2, bidirectional=True, h0=True),
    CELL_BASE.replace(cell="lstm", proj_size=3, num_layers=2, bidirectional=True, packed=True, h0=True),
    CELL_BASE.replace(cell="lstm", proj_size=2, num_layers=3, dropout=0.5, batch_first=True),
    CELL_BASE.replace(cell="lstm", num_layers=2, batched=False, h0=True),
    CELL_BASE.replace(cell="gru", num_layers=2, bidirectional=True, packed=True, h0=True),
    CELL_BASE.replace(cell="gru", num_layers=3, dropout=0.5, batch_first=True),
    CELL_BASE.replace(cell="gru", num_layers=2, batched=False, h0=True),
], ids=case_id)
def test_compile_module_fullgraph_matches_eager(case):
    """torch.compile(fastrnn.RNN / LSTM / GRU, fullgraph=True, backend="aot_eager"): output,
    h_n (and c_n) and every gradient as in eager (dropout: the same masks under the same
    seed)."""
    torch._dynamo.reset()
    _, module = twins(case)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x, h0, lengths = module_inputs(case)
    results = []
    for m in (module, compiled):
        torch.manual_seed(3)
        out, h_n = m(feed(case, x, lengths), h0)
        out = out.data if case.packed else out
        results.append([out, *flat(h_n), *grads(module, weighted_sum(out, h_n), [x, h0])])
    assert_close_all(results[1], results[0], torch.float64, "compiled vs eager")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_compile_cell_module_inductor_training_step(cell):
    """The default backend (inductor) too, on a small training step."""
    torch._dynamo.reset()
    _, module = rnn_pair(5, 4, num_layers=2, seed=4, cell=cell,
                         **(dict(proj_size=3) if cell == "lstm" else {}))
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(3, 4, 5).transpose(0, 1)
    results = []
    for m in (module, compiled):
        out, h = m(x)
        outs = [out, *flat(h)]
        results.append([*outs, *torch.autograd.grad(sum(o.sum() for o in outs),
                                                    list(module.parameters()))])
    assert_close_all(results[1], results[0], torch.float32, "inductor vs eager")


def test_compile_module_inductor_training_step():
    """The default backend (inductor) too, on a small training step."""
    torch._dynamo.reset()
    _, rnn = rnn_pair(5, 4, num_layers=2, seed=4)
    compiled = torch.compile(rnn, fullgraph=True)
    x = torch.randn(3, 4, 5).transpose(0, 1)
    out_e, h_e = rnn(x)
    out_c, h_c = compiled(x)
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(h_c, h_e)
    ge = torch.autograd.grad(out_e.sum() + h_e.sum(), list(rnn.parameters()))
    gc = torch.autograd.grad(out_c.sum() + h_c.sum(), list(rnn.parameters()))
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)
