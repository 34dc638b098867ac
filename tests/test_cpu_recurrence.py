"""The CPU fused recurrences (csrc/cpu/recurrence.h; LSTM and GRU: csrc/cpu/cell_recurrence.h)
against torch.nn.RNN / LSTM / GRU, on shapes that reach every path of the kernels: hidden sizes
below, at and off the vector width and the panel width, batches below and off the tile heights,
packed uneven lengths in both directions, relu and tanh, float32 and float64, T = 1, one and two
threads; float64 tanh's accuracy (activation.h: tanh_exp_inplace); and
their claim that results do not depend on the thread count or on how rows and columns are split
among threads.

The other kernels of the binary (AVX2, baseline), both splits, and the input projection and
gradient products on the same tiles (csrc/cpu/linear.h, on by default only on AMD) are run on
this machine by re-running this file in child processes with FASTRNN_CPU_ISA /
FASTRNN_CPU_SPLIT / FASTRNN_CPU_LINEAR set."""

import contextlib
import itertools
import os
import shutil
import subprocess

import pytest
import torch

import fastrnn
from conftest import (assert_close_all, flat, grads, lengths_for, pack, child_pytest, rnn_pair,
                      weighted_sum)

CHILD = os.environ.get("FASTRNN_CPU_RECURRENCE_CHILD") == "1"


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


# (hidden, batch, steps, layers, bidirectional): a stack; and batch 5, which one thread runs
# as one tile of 5 rows and a row split as tiles of 3 and 2 (each height its own compiled
# code: float64 tanh once differed there in the last bit, where GCC had kept the activation
# out of line for some heights).
SAME_BITS_SHAPES = [(100, 37, 6, 2, True), (40, 5, 3, 1, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("shape", SAME_BITS_SHAPES, ids=["H100-B37-2x-bi", "H40-B5"])
def test_same_bits_for_any_thread_count(shape, packed, nonlinearity, dtype, monkeypatch):
    """Each output element is one accumulator over k in order, so 1 thread and 2 threads
    splitting rows or columns give the same bits."""
    hidden, batch, steps, layers, bidirectional = shape
    results = over_splits(monkeypatch, lambda: compare(
        hidden, batch, steps, nonlinearity, dtype, bidirectional=bidirectional, layers=layers,
        packed=packed))
    for split, result in results.items():
        for a, b in zip(results[SERIAL], result):
            assert torch.equal(a, b), f"results differ between 1 thread and {split}"


# One thread, and two splitting rows or columns.
SERIAL = (1, "rows")
SPLITS = (SERIAL, (2, "rows"), (2, "cols"))


def over_splits(monkeypatch, run):
    """run()'s result under each of SPLITS, with the input projection inside the recurrence
    and fastrnn's own products where the CPU runs them (AVX-512): elsewhere the products
    are torch's BLAS, whose bits may change with the thread count (MKL's do, batch 5 packed,
    under AVX2)."""
    monkeypatch.setenv("FASTRNN_CPU_PROJECT_INSIDE", "1")
    monkeypatch.setenv("FASTRNN_CPU_LINEAR", "1")
    saved = torch.get_num_threads()
    results = {}
    try:
        for threads, split in SPLITS:
            torch.set_num_threads(threads)
            monkeypatch.setenv("FASTRNN_CPU_SPLIT", split)
            results[threads, split] = run()
    finally:
        torch.set_num_threads(saved)
    return results


# The Elman forward's input projection inside the fused recurrence (recurrence.h:
# projection_inside, taken from batch 8 for I <= 2H): the step writes P where the projection
# outside would, then adds the recurrent product, so both paths match torch.nn alike (the
# C++ test checks that they give the same bits and that the inside path reads no P).
# Input sizes below, at and past 2H (forced inside), B = 1 and large, stacked,
# bidirectional (layer 2 reads [N, 2H]) and packed.
@pytest.mark.parametrize("inside", ["1", "0"], ids=["inside", "outside"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", [
    # (hidden, batch, steps, input_size, layers, bidirectional, packed, nonlinearity)
    (100, 64, 5, 28, 1, False, False, "relu"),
    (33, 9, 4, 7, 2, True, True, "tanh"),
    (17, 40, 3, 34, 2, False, False, "relu"),
    (16, 1, 6, 100, 2, True, True, "tanh"),
], ids=lambda c: "H{}-B{}-T{}-I{}-L{}-{}-{}-{}".format(
    *c[:5], "bi" if c[5] else "uni", "packed" if c[6] else "padded", c[7]))
def test_elman_projection_inside_and_outside_match_torch(case, dtype, inside):
    hidden, batch, steps, input_size, layers, bidirectional, packed, nonlinearity = case
    with env_vars(FASTRNN_CPU_PROJECT_INSIDE=inside):
        compare(hidden, batch, steps, nonlinearity, dtype, bidirectional=bidirectional,
                layers=layers, packed=packed, input_size=input_size)


def test_wide_hidden_matches_torch():
    # W_hh past a core's L2 share: the grid prefers splitting columns.
    compare(600, 16, 3, "tanh", torch.float32)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_long_sequence_matches_torch(nonlinearity, packed):
    # T * B past linear.h's chunk of k (1024): dW_ih and dW_hh add up several chunks. In
    # float64: float32 sums of 1440 rows are beyond the float32 tolerance, whoever sums them.
    compare(40, 48, 30, nonlinearity, torch.float64, layers=2, packed=packed)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cell", ["tanh", "lstm", "gru"])
def test_thin_weight_gradients_match_torch(cell, packed):
    # A weight gradient of at most 32 columns over at least 1024 rows of dA (T * B = 2400;
    # packed, 1174) is computed turned around on Intel (csrc/cpu/backend.cpp,
    # thin_weight_grad) where the weight-product tiles do not take it (switched off here):
    # an Elman layer's dW_ih at input 7 and 80 units; an LSTM's and a GRU's dW_ih and, at
    # hidden 24 (96 and 72 rows), dW_hh, to which h0's rows are added (accumulate).
    # Float64, as test_long_sequence's.
    with env_vars(FASTRNN_CPU_WEIGHT_PRODUCT="0"):
        if cell == "tanh":
            compare(80, 40, 60, cell, torch.float64, layers=2, packed=packed)
        else:
            compare_cell(cell, 24, 40, 60, torch.float64, packed=packed)


def test_nonfinite_values_propagate_like_torch():
    ref, fast = rnn_pair(3, 20, nonlinearity="relu")
    x = torch.randn(4, 5, 3)
    x[1, 2, 0] = float("nan")
    x[2, 0, 1] = float("inf")
    (out_r, h_r), (out_f, h_f) = ref(x), fast(x)
    torch.testing.assert_close(out_f, out_r, equal_nan=True)
    torch.testing.assert_close(h_f, h_r, equal_nan=True)


# ---------------------------------------------------------------------------------------
# A zero initial state (the modules' default): its products are left out, in the fused
# forwards (the steps' rows that start from h0, tile by tile, where the slot's rows of W_hh
# are finite) and in dW_hh (its rows of h0, where their dA is finite); FASTRNN_CPU_SKIP_ZERO_H0=0
# keeps them. Both ways give the same bits; an infinity in W_hh or in dA still spreads NaN
# through 0 * inf as in torch.nn.
# ---------------------------------------------------------------------------------------

def switch_results(cell, hidden, batch, steps, dtype, packed, switch, on, off, layers=2):
    """(torch.nn's results, fastrnn's with the environment variable `switch` set to `on`, and
    to `off`; None: unset) with h0 (and c0) zero leaves; bidirectional, so that a packed
    batch's reverse direction starts rows from h0 at later steps, in tiles beside rows that
    carry on."""
    ref, fast = rnn_pair(7, hidden, cell=cell if cell in ("lstm", "gru") else "rnn",
                         num_layers=layers, bidirectional=True, seed=hidden + batch,
                         **({} if cell in ("lstm", "gru") else {"nonlinearity": cell}))
    ref, fast = ref.to(dtype), fast.to(dtype)
    g = torch.Generator().manual_seed(steps)
    x = torch.randn(steps, batch, 7, generator=g, dtype=dtype).requires_grad_()
    hx = torch.zeros(2 * layers, batch, hidden, dtype=dtype, requires_grad=True)
    if cell == "lstm":
        hx = (hx, torch.randn(2 * layers, batch, hidden, generator=g, dtype=dtype).requires_grad_())
    lengths = lengths_for(batch, steps, seed=batch) if packed else None
    expected = run_cell(ref, x, hx, lengths)
    with env_vars(**{switch: on}):
        with_on = run_cell(fast, x, hx, lengths)
    with env_vars(**{switch: off}):
        with_off = run_cell(fast, x, hx, lengths)
    return expected, with_on, with_off


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cell", ["tanh", "relu", "lstm", "gru"])
def test_zero_initial_state_left_out_gives_the_same_bits(cell, packed, dtype, threads):
    # B = 19: tiles of 8, 6 and 5 rows, so that h0's rows start mid-tile at some steps.
    expected, skipped, kept = switch_results(cell, 40, 19, 6, dtype, packed,
                                             "FASTRNN_CPU_SKIP_ZERO_H0", None, "0")
    assert_close_all(skipped, expected, dtype, f"{cell} zero h0")
    for a, b in zip(skipped, kept):
        assert torch.equal(a, b), f"{cell}: the products of a zero h0 changed the bits"


# ---------------------------------------------------------------------------------------
# The next panel fetched into L2 while a panel's row tiles run (StepTask::l2_ahead: on Intel
# CPUs where a slot's panels fill half of its L2 or more; FASTRNN_CPU_L2_AHEAD=1 forces it
# on any CPU): a prefetch, so the same bits as without. H = 100: three panels of 32 columns and
# a half-vector one (the forward and backward Elman panels; the cells' forward: 6 panels of 16
# units and one of 4), so that the last panel fetches the first; B = 19 and packed lengths:
# slices of the panel over tiles of 8, 6 and 5 rows and over steps with fewer rows; B = 5:
# one tile, which asks for two lines a k of the cells' panels (a line a k of Elman's).
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("batch", [19, 5], ids=["B19", "B5"])
@pytest.mark.parametrize("cell", ["tanh", "lstm", "gru"])
def test_panels_fetched_into_l2_ahead_give_the_same_bits(cell, batch, packed, dtype, threads):
    expected, ahead, plain = switch_results(cell, 100, batch, 6, dtype, packed,
                                            "FASTRNN_CPU_L2_AHEAD", "1", "0")
    assert_close_all(ahead, expected, dtype, f"{cell} with L2 fetches")
    for a, b in zip(ahead, plain):
        assert torch.equal(a, b), f"{cell}: fetching panels into L2 changed the bits"


@pytest.mark.parametrize("cell", ["tanh", "relu", "lstm", "gru"])
def test_zero_initial_state_with_nonfinite_weights_or_gradients_like_torch(cell):
    name = cell if cell in ("lstm", "gru") else "rnn"
    kwargs = {} if cell in ("lstm", "gru") else {"nonlinearity": cell}
    ref, fast = rnn_pair(3, 20, cell=name, seed=3, **kwargs)
    x = torch.randn(5, 16, 3)
    with torch.no_grad():  # an infinity in W_hh: 0 * inf is NaN at step 0 already
        for m in (ref, fast):
            m.weight_hh_l0[7, 2] = float("inf")
    torch.testing.assert_close(fast(x)[0], ref(x)[0], equal_nan=True)

    ref, fast = rnn_pair(3, 20, cell=name, seed=3, **kwargs)
    results = []
    for m in (ref, fast):  # an infinity reaching dA at step 0: dW_hh's h0 rows give NaN
        out, _ = m(x)
        grad = torch.ones_like(out)
        grad[0, 4, 3] = float("inf")
        results.append(torch.autograd.grad(out, m.weight_hh_l0, grad)[0])
    assert results[0].isnan().any()
    torch.testing.assert_close(results[1], results[0], equal_nan=True)


# ---------------------------------------------------------------------------------------
# LSTM and GRU (csrc/cpu/cell_recurrence.h): the forward's gate-interleaved tiles (one vector
# of units per gate: 16 floats / 8 doubles on AVX-512; 6 rows per LSTM tile, 8 per GRU tile),
# the backward's tiles (32 / 16 units, 8 rows) and its epilogue that runs the earlier step's
# cell gradient, the rows no product feeds (a sequence's last row: dh_n, dc_n), and b_hh in
# GRU's epilogue. Each case runs fastrnn fused and per-step (FASTRNN_CPU_FUSED=0), the LSTM
# fused twice: its input projection inside the recurrence (each step's product over
# K = I + H, FASTRNN_CPU_PROJECT_INSIDE=1) and outside (one product before it, =0); and checks
# every run against torch.nn and against each other.
# ---------------------------------------------------------------------------------------

# (hidden, batch, steps): H = 1; H below, off and past the vector width and the backward's
# panel width; H spanning several panels; B = 1; B off every tile height; B large enough for
# a row split; T = 1.
CELL_SHAPES = [
    (1, 1, 1),
    (3, 5, 4),
    (17, 7, 3),
    (33, 9, 5),
    (100, 1, 7),
    (130, 19, 4),
    (128, 64, 3),
    (70, 40, 1),
]


@contextlib.contextmanager
def env_vars(**values):
    """os.environ with `values` set (None: unset) for the block."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fused_kernels(on):
    return env_vars(FASTRNN_CPU_FUSED="1" if on else "0")


# The runs of compare_cell: name -> environment. The cells' fused forwards take their input
# projection inside or outside by a cost rule (recurrence.h: projection_inside);
# FASTRNN_CPU_PROJECT_INSIDE forces either wherever the kernel takes the job.
RUNS = {
    "lstm": {
        "inside": dict(FASTRNN_CPU_FUSED="1", FASTRNN_CPU_PROJECT_INSIDE="1"),
        "outside": dict(FASTRNN_CPU_FUSED="1", FASTRNN_CPU_PROJECT_INSIDE="0"),
        "per-step": dict(FASTRNN_CPU_FUSED="0", FASTRNN_CPU_PROJECT_INSIDE=None),
    },
    "gru": {
        "inside": dict(FASTRNN_CPU_FUSED="1", FASTRNN_CPU_PROJECT_INSIDE="1"),
        "outside": dict(FASTRNN_CPU_FUSED="1", FASTRNN_CPU_PROJECT_INSIDE="0"),
        "per-step": dict(FASTRNN_CPU_FUSED="0", FASTRNN_CPU_PROJECT_INSIDE=None),
    },
}


def run_cell(module, x, hx, packed_lengths):
    inp = pack(x, packed_lengths, batch_first=False) if packed_lengths is not None else x
    out, h_n = module(inp, hx)
    loss = weighted_sum(out, h_n)
    data = out.data if packed_lengths is not None else out
    return flat(data, h_n, *grads(module, loss, [x, hx]))


def compare_cell(cell, hidden, batch, steps, dtype, bidirectional=False, layers=1, packed=False,
                 initial=True, bias=True, proj_size=0, input_size=7):
    """fastrnn's runs (RUNS[cell]: fused, the LSTM's with its input projection inside and
    outside, and per-step) against torch.nn and each other on one case (outputs, final states
    and the gradients of x, h0 (c0) and every parameter); returns {run: results}."""
    kwargs = dict(num_layers=layers, bidirectional=bidirectional, bias=bias)
    if proj_size:
        kwargs["proj_size"] = proj_size
    ref, fast = rnn_pair(input_size, hidden, cell=cell, seed=hidden * 31 + batch, **kwargs)
    ref, fast = ref.to(dtype), fast.to(dtype)
    g = torch.Generator().manual_seed(steps)
    x = torch.randn(steps, batch, input_size, generator=g, dtype=dtype).requires_grad_()
    hx = None
    if initial:
        cells = layers * (2 if bidirectional else 1)
        shape = (cells, batch, proj_size or hidden)
        hx = torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
        if cell == "lstm":
            c0 = torch.randn(cells, batch, hidden, generator=g, dtype=dtype).requires_grad_()
            hx = (hx, c0)
    lengths = lengths_for(batch, steps, seed=batch) if packed else None
    expected = run_cell(ref, x, hx, lengths)
    what = f"{cell} H={hidden} B={batch} T={steps} I={input_size}"
    results = {}
    for name, env in RUNS[cell].items():
        with env_vars(**env):
            results[name] = run_cell(fast, x, hx, lengths)
        assert_close_all(results[name], expected, dtype, f"{what} {name}")
    for (a, ra), (b, rb) in itertools.combinations(results.items(), 2):
        assert_close_all(ra, rb, dtype, f"{what} {a} vs {b}")
    return results


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", CELL_SHAPES, ids=lambda s: "H{}-B{}-T{}".format(*s))
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cell_padded_matches_torch(cell, shape, dtype, threads):
    compare_cell(cell, *shape, dtype)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("shape", [(33, 9, 6), (3, 12, 5), (100, 21, 8), (1, 4, 3)],
                         ids=lambda s: "H{}-B{}-T{}".format(*s))
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cell_packed_uneven_lengths_match_torch(cell, shape, bidirectional, dtype, threads):
    # Forward direction: sequences end early (dh_n, dc_n enter mid-sequence, rows no product
    # feeds); reverse direction: sequences start from h0 / c0 at later visited steps.
    compare_cell(cell, *shape, dtype, bidirectional=bidirectional, layers=2, packed=True)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cell_stacked_bidirectional_without_bias_or_initial_state(cell, threads):
    # Layers 2 and 3 read [N, 2H] inputs; no bias (GRU's epilogue has no b_hh); zero h0 / c0.
    compare_cell(cell, 40, 11, 6, torch.float32, bidirectional=True, layers=3, bias=False,
                 initial=False)


@pytest.fixture
def same_products(monkeypatch):
    """FASTRNN_CPU_FUSED=0 also hands the products around the recurrence (linear.h) to BLAS
    unless FASTRNN_CPU_LINEAR says otherwise: pinned, only the recurrence differs between a
    fused and a per-step run."""
    monkeypatch.setenv("FASTRNN_CPU_LINEAR", os.environ.get("FASTRNN_CPU_LINEAR", "1"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_lstm_proj_size_takes_the_per_step_path(dtype, same_products):
    # proj_size is not the fused kernel's (cell_recurrence.h): the per-step path runs it
    # whatever FASTRNN_CPU_FUSED says, so both runs give the same bits.
    runs = compare_cell("lstm", 33, 9, 5, dtype, layers=2, bidirectional=True, packed=True,
                        proj_size=7)
    for other in ("outside", "per-step"):
        for a, b in zip(runs["inside"], runs[other]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("shape", SAME_BITS_SHAPES, ids=["H100-B37-2x-bi", "H40-B5"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cell_same_bits_for_any_thread_count(cell, shape, packed, dtype, monkeypatch):
    """Each element is one accumulator over k in order and each unit's cell math runs on the
    thread that owns the unit, so 1 thread and 2 threads splitting rows or columns give the
    same bits."""
    hidden, batch, steps, layers, bidirectional = shape
    results = over_splits(monkeypatch, lambda: compare_cell(
        cell, hidden, batch, steps, dtype, bidirectional=bidirectional, layers=layers,
        packed=packed))
    # BLAS's runs: the per-step one, and the one with the projection outside where
    # fastrnn's own products do not run.
    blas = {"per-step"} | (set() if _avx512() else {"outside"})
    for split, result in results.items():
        for name in result:
            if name in blas:
                continue
            for a, b in zip(results[SERIAL][name], result[name]):
                assert torch.equal(a, b), f"{name}: results differ between 1 thread and {split}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fused_cell_kernels_are_in_use(cell, dtype, same_products):
    """The per-step path sums in another order (and, in float32, has other activations): if
    no bit differed, the fused kernels would not be running and every cell test above would
    test the per-step path twice."""
    runs = compare_cell(cell, 128, 64, 6, dtype)
    for name, fused in runs.items():
        if name != "per-step":
            assert not all(torch.equal(a, b) for a, b in zip(fused, runs["per-step"])), name


# The LSTM's input projection inside the fused recurrence (recurrence.h:
# projection_inside): input sizes below, at, past 2H and far past H (forced inside, the
# panels then hold more W_ih rows than W_hh rows); B = 1 and large; stacked, bidirectional
# (layer 2 reads [N, 2H]) and packed.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", [
    # (hidden, batch, steps, input_size, layers, bidirectional, packed)
    (33, 1, 5, 7, 1, False, False),
    (33, 64, 5, 7, 2, True, True),
    (17, 9, 4, 34, 2, False, False),
    (17, 40, 3, 35, 1, True, False),
    (16, 1, 6, 100, 2, True, True),
    (70, 19, 4, 300, 1, False, True),
    (128, 70, 3, 28, 2, False, False),
], ids=lambda c: "H{}-B{}-T{}-I{}-L{}-{}-{}".format(
    *c[:5], "bi" if c[5] else "uni", "packed" if c[6] else "padded"))
def test_lstm_projection_inside_and_outside_match_torch(case, dtype):
    hidden, batch, steps, input_size, layers, bidirectional, packed = case
    compare_cell("lstm", hidden, batch, steps, dtype, bidirectional=bidirectional, layers=layers,
                 packed=packed, input_size=input_size)


def lstm_projection_runs(hidden, batch, input_size, dtype, layers=1, bidirectional=False):
    """The fused LSTM's results with the input projection by the cost rule ("auto": no
    FASTRNN_CPU_PROJECT_INSIDE), forced inside and forced outside."""
    ref, fast = rnn_pair(input_size, hidden, cell="lstm", num_layers=layers,
                         bidirectional=bidirectional, seed=batch)
    fast = fast.to(dtype)
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(5, batch, input_size, generator=g, dtype=dtype).requires_grad_()
    runs = {}
    for name, value in (("auto", None), ("inside", "1"), ("outside", "0")):
        with env_vars(FASTRNN_CPU_FUSED="1", FASTRNN_CPU_PROJECT_INSIDE=value):
            runs[name] = run_cell(fast, x, None, None)
    return runs


def same_bits(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_lstm_projection_paths_both_run(dtype, same_products):
    """The two paths sum in different orders (inside: one accumulator over x_t W_ih^T and
    h_{t-1} W_hh^T, the bias last; outside: bias and x_t W_ih^T first, then the recurrence's
    product): if no bit differed, the tests above would test one path twice."""
    for batch in (1, 64):
        runs = lstm_projection_runs(33, batch, 7, dtype)
        assert not same_bits(runs["inside"], runs["outside"]), f"B={batch}"


def _avx512():
    """Whether the kernels run AVX-512 here (the CPU has it, FASTRNN_CPU_ISA does not cap it)."""
    if os.environ.get("FASTRNN_CPU_ISA") in ("avx2", "baseline"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


# The weight gradients on fastrnn's weight-product tiles (csrc/cpu/weight_product.h: taken on
# Intel with AVX-512 where they beat MKL; forced here, FASTRNN_CPU_WEIGHT_PRODUCT=1, wherever
# AVX-512 runs, else BLAS runs both ways). The cases reach C's rows ending inside a tile (8
# rows) and its columns inside a vector (16 floats, 8 doubles: the block summed on the side),
# a last block of one vector and a thin one (dW_ih at input 7); K past the chunk (128 rows)
# in one half or in two (from 1024); h0's rows added to dW_hh (accumulate), columns ending
# inside a vector too; packed rows (H_prev gathered); dA's columns of a bidirectional
# [N, 2H]; the cells' 4H and 3H rows and GRU's pieces. Float64 where K passes a thousand
# rows (test_long_sequence's reason), float32 below.
WEIGHT_PRODUCT_CASES = [
    # (cell, hidden, batch, steps, dtype, bidirectional, packed)
    ("tanh", 33, 48, 30, torch.float64, False, False),
    ("relu", 33, 40, 30, torch.float64, True, True),
    ("tanh", 44, 20, 30, torch.float32, False, False),
    ("relu", 48, 21, 25, torch.float32, True, True),
    ("lstm", 24, 40, 30, torch.float64, False, True),
    ("gru", 20, 40, 30, torch.float64, True, False),
]


@pytest.mark.parametrize("on", ["1", "0"], ids=["tiles", "blas"])
@pytest.mark.parametrize("case", WEIGHT_PRODUCT_CASES,
                         ids=lambda c: "{}-H{}-B{}-T{}".format(*c[:4]))
def test_weight_product_matches_torch(case, on):
    cell, hidden, batch, steps, dtype, bidirectional, packed = case
    with env_vars(FASTRNN_CPU_WEIGHT_PRODUCT=on, FASTRNN_CPU_LINEAR="0"):
        if cell in ("lstm", "gru"):
            compare_cell(cell, hidden, batch, steps, dtype, bidirectional=bidirectional,
                         layers=2, packed=packed)
        else:
            compare(hidden, batch, steps, cell, dtype, bidirectional=bidirectional, layers=2,
                    packed=packed)


@pytest.mark.skipif(not _avx512(), reason="the weight-product tiles are AVX-512's")
@pytest.mark.parametrize("case", WEIGHT_PRODUCT_CASES[:2],
                         ids=lambda c: "{}-H{}-B{}-T{}".format(*c[:4]))
def test_weight_product_same_bits_for_any_thread_count(case):
    """K goes in two fixed halves, not one per thread: 1 and 2 threads give the same bits.
    And the tiles run: BLAS's bits differ (at K past a thousand rows; below, MKL can sum
    in the same order)."""
    cell, hidden, batch, steps, dtype, bidirectional, packed = case
    saved = torch.get_num_threads()
    results = {}
    try:
        for threads, on in ((1, "1"), (2, "1"), (2, "0")):
            torch.set_num_threads(threads)
            with env_vars(FASTRNN_CPU_WEIGHT_PRODUCT=on, FASTRNN_CPU_LINEAR="0"):
                results[threads, on] = compare(hidden, batch, steps, cell, dtype,
                                               bidirectional=bidirectional, layers=2, packed=packed)
    finally:
        torch.set_num_threads(saved)
    for a, b in zip(results[1, "1"], results[2, "1"]):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(results[2, "1"], results[2, "0"]))


@pytest.mark.skipif(not _avx512(), reason="fastrnn's own products (linear.h) are AVX-512's")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_gru_projection_inside_gives_the_bits_of_the_one_outside(dtype, same_products):
    """The GRU keeps X W_ih^T + b_ih apart from the recurrent sums (r scales only the
    latter's n): inside each step's product it is summed in the order of fastrnn's own
    product outside (FASTRNN_CPU_LINEAR=1), so both give the same bits, at both batch
    sizes, stacked, bidirectional and packed."""
    for layers, bidirectional, packed in ((1, False, False), (2, True, True)):
        runs = compare_cell("gru", 33, 19, 5, dtype, layers=layers, bidirectional=bidirectional,
                            packed=packed, input_size=9)
        assert same_bits(runs["inside"], runs["outside"]), (layers, bidirectional, packed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_lstm_projection_cost_rule(dtype, same_products):
    """Without FASTRNN_CPU_PROJECT_INSIDE the projection goes inside from batch 8 on, for
    I <= 2H, layer by layer (same bits as the forced path that should have run)."""
    # (hidden, batch, input_size, expected path)
    for hidden, batch, input_size, expected in [
        (33, 64, 7, "inside"),
        (33, 8, 66, "inside"),
        (33, 7, 7, "outside"),
        (33, 1, 7, "outside"),
        (33, 64, 67, "outside"),
    ]:
        runs = lstm_projection_runs(hidden, batch, input_size, dtype)
        other = "outside" if expected == "inside" else "inside"
        what = f"H={hidden} B={batch} I={input_size}"
        assert same_bits(runs["auto"], runs[expected]), f"{what}: not {expected}"
        assert not same_bits(runs["auto"], runs[other]), f"{what}: {other}"
    # Layer 1 (I = 100 > 2H) outside, layer 2 (I = 2H, bidirectional) inside: neither forced run.
    runs = lstm_projection_runs(33, 16, 100, dtype, layers=2, bidirectional=True)
    assert not same_bits(runs["auto"], runs["inside"])
    assert not same_bits(runs["auto"], runs["outside"])


def test_cell_half_types_close_to_float32():
    # A bfloat16 call runs the float32 kernels (or, with AVX512-BF16, bfloat16 products):
    # close to the float32 call.
    ref, fast = rnn_pair(7, 24, cell="lstm", num_layers=2)
    x = torch.randn(5, 3, 7)
    expected, _ = fast(x)
    actual, _ = fast.to(torch.bfloat16)(x.to(torch.bfloat16))
    torch.testing.assert_close(actual.float(), expected, atol=0.05, rtol=0.05)


# Each other kernel once, each forced split at least once, and the products around the
# recurrence (linear.h) on our kernels and on BLAS whatever the CPU's vendor.
CHILD_ENVS = [
    dict(FASTRNN_CPU_SPLIT="cols", FASTRNN_CPU_LINEAR="1", FASTRNN_CPU_L2_AHEAD="1"),
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
    result = child_pytest(__file__, dict(FASTRNN_CPU_RECURRENCE_CHILD="1", **env),
                          "-k", "not wide_hidden and not nonfinite")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


# The portable kernels (aarch64, macOS, compilers without AVX512-BF16) with every x86 path
# compiled out, as such a build sees tile_kernels.h: a name used only on x86 outside its
# #if fails there and nowhere here.
PORTABLE_KERNELS = """
#include "cpu/tile_kernels.h"
namespace k = fastrnn::cpu;
using E = k::Epilogue;
#define STEPS(T)                                                                          \
  template void k::kernels::Baseline<T>::step<E::Forward>(const k::StepTask<T>&);         \
  template void k::kernels::Baseline<T>::step<E::Backward>(const k::StepTask<T>&);        \
  template void k::kernels::Baseline<T>::step<E::Linear>(const k::StepTask<T>&);          \
  template void k::kernels::Baseline<T>::step<E::LinearAT>(const k::StepTask<T>&);        \
  template void k::kernels::Baseline<T>::step<E::LstmForward>(const k::StepTask<T>&);     \
  template void k::kernels::Baseline<T>::step<E::GruBackward>(const k::StepTask<T>&);     \
  template k::KernelSet<T> k::kernel_set<T>(k::simd::Isa);
STEPS(float)
STEPS(double)
"""


@pytest.mark.skipif(CHILD, reason="runs in the parent only")
def test_portable_kernels_compile_without_x86_dispatch(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    source = tmp_path / "portable.cpp"
    source.write_text(PORTABLE_KERNELS)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([cxx, "-std=c++20", "-fsyntax-only", "-DFASTRNN_X86_DISPATCH=0",
                             f"-I{os.path.join(root, 'csrc')}", str(source)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_fused_kernel_is_in_use(dtype, monkeypatch):
    """The per-step BLAS path (FASTRNN_CPU_FUSED=0) sums in another order: if no bit differed,
    the kernel would not be running and every test above would test the fallback."""
    results = []
    for fused in ("1", "0"):
        monkeypatch.setenv("FASTRNN_CPU_FUSED", fused)
        results.append(compare(128, 64, 6, "tanh", dtype))
    assert not all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("fused", ["1", "0"], ids=["fused", "per-step"])
def test_float64_tanh_within_4_ulp_of_torch(fused, monkeypatch):
    """float64 tanh is fastrnn's own (expm1 by range reduction and a polynomial, within 3 ulp
    of the exact value): with W_ih = I and no bias or state, one step's output is tanh(x)."""
    monkeypatch.setenv("FASTRNN_CPU_FUSED", fused)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.empty(20000, dtype=torch.float64).uniform_(-25, 25, generator=g),
        torch.empty(20000, dtype=torch.float64).uniform_(-1, 1, generator=g),
        torch.logspace(-320, 1.3, 4000, dtype=torch.float64) * torch.tensor([1.0, -1.0]).repeat(2000),
        torch.tensor([0.0, 18.5, 19.0, 20.0, 710.0, -710.0], dtype=torch.float64),
    ])  # (not inf or NaN: x W_ih^T would spread NaN along the row, 0 * inf)
    H = 64
    x = torch.nn.functional.pad(x, (0, -x.numel() % H)).view(1, -1, H)  # T = 1, B rows of H
    rnn = fastrnn.RNN(H, H, bias=False).double()
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(torch.eye(H, dtype=torch.float64))
        rnn.weight_hh_l0.zero_()
        out, _ = rnn(x)
    expected = torch.tanh(x)
    assert torch.equal(out.signbit(), expected.signbit())
    ulps = (out.view(torch.int64) - expected.view(torch.int64)).abs()
    assert ulps.max().item() <= 4, x.flatten()[ulps.argmax()].item()
