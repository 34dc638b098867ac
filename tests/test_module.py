"""fastrnn.RNN against torch.nn.RNN: the full parity grid (output, h_n and every
gradient), one fastrnn::rnn call per forward and one fastrnn::rnn_backward call per
backward, dropout between layers, property-based parity (sizes, strides, requires_grad
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
from fastrnn.reference import rnn_reference

from conftest import (LAYOUTS, PROPERTY, TOL, Case, OpArgs, OpCalls, assert_close_all, case_id,
                      devices, feed, grads, grid, module_inputs, pack, rnn_pair, run_module,
                      twins, weighted_sum, with_layout)

# ---------------------------------------------------------------------------------------
# The parity grid, with the op calls counted
# ---------------------------------------------------------------------------------------

GRID = [c.replace(seed=i) for i, c in enumerate(grid(
    Case(), nonlinearity=["tanh", "relu"], bias=[True, False], batch_first=[False, True],
    bidirectional=[False, True], num_layers=[1, 2, 3], batched=[True, False], h0=[False, True],
    packed=[False, True]))]


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
    """Exactly one fastrnn::rnn call in forward (with the module's settings) and one
    fastrnn::rnn_backward call in backward; no torch RNN op ran instead."""
    assert forward_calls.names() == ["rnn"], forward_calls.names()
    assert backward_calls.names() == ["rnn_backward"], backward_calls.names()
    _, args, _ = forward_calls.calls[0]
    input, hx, weights, has_biases, num_layers, dropout, train, bidirectional, nl, bs = args
    assert (has_biases, num_layers, dropout, train, bidirectional, nl) == (
        case.bias, case.num_layers, case.dropout, case.train, case.bidirectional,
        case.nonlinearity)
    assert len(weights) == len(list(fast.parameters()))
    assert (bs is not None) == case.packed
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
    assert out_f.shape == out_r.shape and h_f.shape == h_r.shape
    assert out_f.dtype == h_f.dtype == case.dtype
    assert out_f.device == out_r.device
    assert_close_all([out_f, h_f], [out_r, h_r], case.dtype, "output/h_n")
    assert_close_all(g_f, g_r, case.dtype, "grads (input, h0, parameters)")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_parity_with_torch(case, dtype, device):
    case = case.replace(dtype=dtype, device=device)
    want, got, fwd, bwd, fast = run_twins(case)
    check_parity(case, want, got)
    check_one_call_each(case, fast, fwd, bwd)


# Dropout in training: on the CPU fastrnn draws the masks as torch.nn.RNN does (one
# bernoulli_ per layer boundary from the default generator, torch's dropout noise), so
# under the same seed the results are torch's.
DROPOUT_GRID = [c.replace(seed=i) for i, c in enumerate(grid(
    Case(dropout=0.5, h0=True), nonlinearity=["tanh", "relu"], batch_first=[False, True],
    bidirectional=[False, True], num_layers=[2, 3], batched=[True, False], packed=[False, True]))]


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
], ids=case_id)
def test_one_call_each_and_parity_in_other_modes(case):
    """Eval mode with dropout, unbatched dropout, dropout with one layer, dropout 1, an
    empty batch: still one op call each way, and torch's results."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want, got, fwd, bwd, fast = run_twins(case)
    check_parity(case, want, got)
    check_one_call_each(case, fast, fwd, bwd)


def test_no_backward_call_without_gradients():
    """Under torch.no_grad and with nothing requiring grad: one forward op call, no
    reserve kept alive for a backward that cannot come."""
    _, fast = twins(Case(num_layers=2, bidirectional=True))
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    for context in (torch.no_grad, torch.inference_mode):
        with context(), OpCalls() as calls:
            out, h_n = fast(x)
        assert calls.names() == ["rnn"]
        assert not out.requires_grad and not h_n.requires_grad


# ---------------------------------------------------------------------------------------
# Dropout between layers
# ---------------------------------------------------------------------------------------


def test_dropout_repeatable_under_manual_seed():
    case = Case(num_layers=3, bidirectional=True, dropout=0.5, packed=True, h0=True)
    _, fast = twins(case)
    x, h0, lengths = module_inputs(case)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(run_module(fast, case, x, h0, lengths))
    (o0, h0_, g0), (o1, h1, g1), (o2, h2, g2) = runs
    assert torch.equal(o0.data, o1.data) and torch.equal(h0_, h1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert not torch.equal(o0.data, o2.data)


def test_dropout_eval_mode_has_no_dropout():
    """eval(): the output of the stack without dropout (torch's, and fastrnn's with
    dropout 0), whatever the seed; train() brings dropout back."""
    case = Case(num_layers=3, dropout=0.7, train=False)
    ref, fast = twins(case)
    _, no_dropout = twins(case.replace(dropout=0.0))
    x, h0, _ = module_inputs(case, requires_grad=False)
    torch.manual_seed(0)
    out, h = fast(x)
    torch.manual_seed(1)
    assert_close_all(fast(x), [out, h], torch.float64)
    assert_close_all([out, h], ref(x), torch.float64)
    assert torch.equal(no_dropout(x)[0], out)
    fast.train()
    assert not torch.allclose(fast(x)[0], out)


@pytest.mark.parametrize("p", [0.25, 0.6])
def test_dropout_statistics(p):
    """The masks the module's op call drew: zeros with probability p (within 5 standard
    deviations), the rest 1/(1-p); the module passes its own p and training flag."""
    case = Case(num_layers=3, bidirectional=True, dropout=p, steps=30, batch=20, hidden_size=16,
                dtype=torch.float32)
    _, fast = twins(case)
    x, _, _ = module_inputs(case, requires_grad=False)
    with OpCalls() as calls:
        fast(x)
    (_, args, (_, _, reserve)), = calls.calls
    op_args = OpArgs(case, args[0], args[1], list(args[2]), args[9])
    _, masks = op_args.reserve_parts(reserve)
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
], ids=case_id)
def test_dropout_gradients_consistent_with_the_mask(case, device, monkeypatch):
    """The module's output and every gradient equal those of the same module computing
    with rnn_reference and the masks that its op call drew (read back from the reserve):
    forward and backward apply the same masks (on CUDA too, where torch.nn.RNN draws
    differently)."""
    case = case.replace(device=device)
    _, fast = twins(case)
    x, h0, lengths = module_inputs(case)
    with OpCalls() as calls:
        got = run_module(fast, case, x, h0, lengths)
    assert calls.names() == ["rnn", "rnn_backward"]
    _, args, (_, _, reserve) = calls.calls[0]
    _, masks = OpArgs(case, args[0], args[1], list(args[2]), args[9]).reserve_parts(reserve)
    assert len(masks) == case.num_layers - 1
    assert all(bool((m == 0).any()) and bool((m != 0).any()) for m in masks)

    def reference_rnn(input, hx, weights, *, num_layers, bidirectional, nonlinearity, dropout,
                      train, batch_sizes):
        assert (dropout, train) == (case.dropout, True)
        return rnn_reference(input, hx, weights, num_layers=num_layers,
                             bidirectional=bidirectional, nonlinearity=nonlinearity,
                             batch_sizes=batch_sizes, dropout_masks=masks)

    monkeypatch.setattr(fastrnn.modules, "_rnn", reference_rnn)
    want = run_module(fast, case, x, h0, lengths)
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
    if not any(o.requires_grad for o in outputs):  # not connected: zero gradients
        return [torch.zeros_like(t) for t in tensors]
    loss = weighted_sum(*outputs)
    return list(torch.autograd.grad(loss, tensors, allow_unused=True, materialize_grads=True))


@st.composite
def module_cases(draw):
    num_layers = draw(st.integers(1, 3))
    c = dict(
        case=Case(
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
            hidden_size=draw(st.integers(1, 6)),
            steps=draw(st.integers(0, 6)),
            batch=draw(st.integers(0, 4)),
            h0=draw(st.booleans()),
            seed=draw(st.integers(0, 2 ** 16)),
        ),
        mode=draw(st.sampled_from(["batched", "unbatched", "packed"])),
        x_layout=draw(st.sampled_from(LAYOUTS)),
        h0_layout=draw(st.sampled_from(LAYOUTS)),
        weight_layouts=draw(st.lists(st.sampled_from(LAYOUTS), min_size=24, max_size=24)),
        x_grad=draw(st.booleans()),
        h0_grad=draw(st.booleans()),
        param_grads=draw(st.lists(st.booleans(), min_size=24, max_size=24)),
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
    """(modules (torch, fastrnn) sharing the same Parameter objects, input factory, h0, leaves)."""
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
        h_shape = (case.cells, H) if c["mode"] == "unbatched" else (case.cells, B, H)
        h0 = with_layout(torch.randn(h_shape, generator=g, dtype=case.dtype), c["h0_layout"])
        h0.requires_grad_(c["h0_grad"])

    def make_input():
        if c["mode"] == "packed":
            return pack_padded_sequence(x, torch.tensor(c["lengths"]), batch_first=case.batch_first,
                                        enforce_sorted=c["enforce_sorted"])
        return x

    leaves = [t for t in (x, h0) if t is not None and t.requires_grad]
    leaves += [p for p in ref.parameters() if p.requires_grad]
    return ref, fast, make_input, h0, leaves


def run_property_module(module, make_input, h0, leaves, seed):
    torch.manual_seed(seed)  # the same dropout masks for both modules
    out, h_n = module(make_input(), h0)
    data = out.data if isinstance(out, PackedSequence) else out
    return [data, h_n, *grads_of([data, h_n], leaves)], out


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
        torch.testing.assert_close(a, e, **TOL[dtype], msg=lambda m: f"tensor {i}: {m}")


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


def test_functional_call_uses_the_given_parameters():
    ref, fast = rnn_pair(3, 4)
    new = {k: torch.randn_like(v) for k, v in fast.state_dict().items()}
    x = torch.randn(5, 2, 3)
    out = torch.func.functional_call(fast, new, (x,))
    expected = torch.func.functional_call(ref, new, (x,))
    assert_close_all(out, expected, torch.float32)
    # and the module's own parameters are untouched
    assert_close_all(fast(x), ref(x), torch.float32)


def test_parameters_replaced_after_construction_are_used():
    """A Parameter assigned after construction (as in the property test's layouts) is the
    one the op reads: _flat_weights is refreshed on each call."""
    ref, fast = rnn_pair(3, 4, 2)
    new = nn.Parameter(torch.randn(4, 4))
    ref.weight_hh_l1 = new
    fast.weight_hh_l1 = new
    x = torch.randn(5, 2, 3)
    assert_close_all(fast(x), ref(x), torch.float32)


@pytest.mark.parametrize(
    "steps, batch, hidden, layers",
    [(1, 3, 4, 2), (6, 1, 4, 2), (6, 3, 1, 2), (1000, 2, 8, 1)],
    ids=["T=1", "batch=1", "hidden=1", "T=1000"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_edge_sizes(steps, batch, hidden, layers, dtype):
    ref, fast = rnn_pair(3, hidden, layers, bidirectional=True)
    ref, fast = ref.to(dtype), fast.to(dtype)
    x = torch.randn(steps, batch, 3, dtype=dtype, requires_grad=True)
    results = []
    for m in (ref, fast):
        out, h = m(x)
        results.append([out, h, *grads(m, weighted_sum(out, h), [x])])
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
    }


@pytest.mark.parametrize("name", list(rnn_errors()))
def test_errors_match_torch(name):
    make = rnn_errors()[name]
    with pytest.raises(Exception) as expected:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make(nn.RNN)
    with pytest.raises(type(expected.value)) as got:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make(fastrnn.RNN)
    assert str(got.value) == str(expected.value)


def test_empty_batch_like_torch():
    ref, fast = rnn_pair(3, 4, 2)
    x = torch.randn(5, 0, 3)
    (o1, h1), (o2, h2) = fast(x), ref(x)
    assert o1.shape == o2.shape == (5, 0, 4) and h1.shape == h2.shape == (2, 0, 4)


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
rnn = fastrnn.RNN(5, 24, 3, bidirectional=True, nonlinearity=sys.argv[2], dropout=0.3)
x = torch.randn(40, 9, 5, requires_grad=True)
h0 = torch.randn(6, 9, 24, requires_grad=True)
lengths = torch.randint(1, 41, (9,)); lengths[3] = 40
results = []
for inp in (x, pack_padded_sequence(x, lengths, enforce_sorted=False)):
    out, h = rnn(inp, h0)
    data = out.data if hasattr(out, "batch_sizes") else out
    w = torch.linspace(-1, 1, data.numel()).reshape(data.shape)
    loss = (data * w).sum() + h.sin().sum()
    results += [data, h, *torch.autograd.grad(loss, [x, h0, *rnn.parameters()])]
torch.save([r.detach() for r in results], sys.argv[1])
"""


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
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
    assert len(first) == 2 * (2 + 2 + 24)  # (output, h_n, grads of x, h0, 24 parameters) x 2
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


@pytest.mark.parametrize("name", list(WARNING_SCENARIOS))
def test_warns_like_torch(name):
    make = WARNING_SCENARIOS[name]
    assert _warnings_of(lambda: make(fastrnn.RNN)) == _warnings_of(lambda: make(nn.RNN))
    if name == "dropout with one layer":
        assert _warnings_of(lambda: make(fastrnn.RNN)), "torch warns here, so must fastrnn"


# ---------------------------------------------------------------------------------------
# torch.compile of the module
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [
    Case(num_layers=2, bidirectional=True, h0=True),
    Case(num_layers=2, bidirectional=True, packed=True),
    Case(num_layers=3, dropout=0.5, batch_first=True, nonlinearity="relu"),
    Case(num_layers=2, batched=False, h0=True),
], ids=case_id)
def test_compile_module_fullgraph_matches_eager(case):
    """torch.compile(fastrnn.RNN, fullgraph=True, backend="aot_eager"): output, h_n and
    every gradient as in eager (dropout: the same masks under the same seed)."""
    torch._dynamo.reset()
    _, rnn = twins(case)
    compiled = torch.compile(rnn, fullgraph=True, backend="aot_eager")
    x, h0, lengths = module_inputs(case)
    results = []
    for module in (rnn, compiled):
        torch.manual_seed(3)
        out, h_n = module(feed(case, x, lengths), h0)
        out = out.data if case.packed else out
        results.append([out, h_n, *grads(rnn, weighted_sum(out, h_n), [x, h0])])
    assert_close_all(results[1], results[0], torch.float64, "compiled vs eager")


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
