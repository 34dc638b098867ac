"""Deployment: a model holding fastrnn.RNN, LSTM or GRU through torch.onnx.export (both
exporters, the result run in onnxruntime), torch.jit.script, torch.export, revert() back
to torch.nn's modules, and a whole-model torch.save / torch.load under safe globals. The
exported or scripted model must give the eager model's outputs at batch sizes and
sequence lengths other than the example's (for LSTM and GRU, torch.nn's module's too)."""

import copy
import functools
import importlib.util
import io
import itertools
import re
import runpy
import warnings
from typing import NamedTuple, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from torch.utils._pytree import tree_leaves

import fastrnn

from conftest import TOL, covering, lengths_for, rnn_pair, weighted_sum

I, H = 5, 6
EXAMPLE = (5, 3)  # (T, B) of the example input that export sees
SIZES = [(5, 3), (9, 2), (1, 1), (3, 7)]  # (T, B) the exported model is run at

_MISSING = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
ONNX = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"the ONNX tests need {', '.join(_MISSING)} (pip install -r requirements-dev.txt)")

pytestmark = pytest.mark.filterwarnings(
    "ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning", "ignore::FutureWarning",
    "ignore:.*:UserWarning:torch.*")


class Config(NamedTuple):
    num_layers: int
    bidirectional: bool
    bias: bool
    nonlinearity: str
    batch_first: bool
    h0: bool

    def rnn_kwargs(self):
        return dict(num_layers=self.num_layers, bidirectional=self.bidirectional, bias=self.bias,
                    nonlinearity=self.nonlinearity, batch_first=self.batch_first)

    def id(self):
        return "-".join([f"L{self.num_layers}", "bi" if self.bidirectional else "uni",
                         "bias" if self.bias else "nobias", self.nonlinearity,
                         "bf" if self.batch_first else "tf", "h0" if self.h0 else "noh0"])

    def dims(self):
        """(time dim, batch dim) of x."""
        return (1, 0) if self.batch_first else (0, 1)

    def inputs(self, steps, batch, seed=0):
        g = torch.Generator().manual_seed(seed)
        shape = (batch, steps, I) if self.batch_first else (steps, batch, I)
        x = torch.randn(shape, generator=g)
        if not self.h0:
            return (x,)
        layers = self.num_layers * (2 if self.bidirectional else 1)
        return x, torch.randn(layers, batch, H, generator=g)


GRID = [Config(*c) for c in itertools.product([1, 2], [False, True], [True, False],
                                               ["tanh", "relu"], [False, True], [False, True])]


def _pairwise():
    """Six configurations that hold every pair of values of any two settings (columns:
    distinct 3-subsets of rows 1..5, so any two columns meet in 00, 01, 10 and 11;
    row 0 has every setting off, row 1 every setting on)."""
    columns = list(itertools.combinations(range(1, 6), 3))[:6]
    rows = [[row in col for col in columns] for row in range(6)]
    return [Config(2 if layers else 1, bi, bias, "relu" if relu else "tanh", bf, h0)
            for layers, bi, bias, relu, bf, h0 in rows]


PAIRWISE = _pairwise()
# The rows that, with PAIRWISE's, hold every triple of values of any three settings. The dynamo
# exporter's whole grid costs two seconds an export; its code (onnx.py: per layer and
# direction, with or without biases and initial states) meets at most three settings at once.
THREE_WISE = covering(GRID, Config._fields, 3, given=PAIRWISE)


class Wrap(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: Tensor, h0: Optional[Tensor] = None):
        return self.rnn(x, h0)


class PackedWrap(nn.Module):
    """pack_padded_sequence -> RNN -> pad_packed_sequence, the usual packed model."""

    def __init__(self, rnn, enforce_sorted):
        super().__init__()
        self.rnn = rnn
        self.enforce_sorted = enforce_sorted

    def forward(self, x: Tensor, lengths: Tensor, h0: Optional[Tensor] = None):
        packed = pack_padded_sequence(x, lengths, batch_first=self.rnn.batch_first,
                                      enforce_sorted=self.enforce_sorted)
        out, h_n = self.rnn(packed, h0)
        out, _ = pad_packed_sequence(out, batch_first=self.rnn.batch_first)
        return out, h_n


class Cell(NamedTuple):
    """A fastrnn.LSTM or fastrnn.GRU configuration (``Config``'s, less the
    nonlinearity); h0: the initial state given, (h0, c0) for LSTM."""

    cell: str  # "LSTM" or "GRU"
    num_layers: int
    bidirectional: bool
    bias: bool
    batch_first: bool
    h0: bool

    def rnn_kwargs(self):
        return dict(num_layers=self.num_layers, bidirectional=self.bidirectional, bias=self.bias,
                    batch_first=self.batch_first)

    def id(self):
        return "-".join([self.cell, f"L{self.num_layers}", "bi" if self.bidirectional else "uni",
                         "bias" if self.bias else "nobias", "bf" if self.batch_first else "tf",
                         "h0" if self.h0 else "noh0"])

    def dims(self):
        return (1, 0) if self.batch_first else (0, 1)

    def states(self):
        return ["h0", "c0"] if self.cell == "LSTM" else ["h0"]

    def input_names(self):
        return ["x"] + self.states() * self.h0

    def output_names(self):
        return ["output"] + [s.replace("0", "_n") for s in self.states()]

    def inputs(self, steps, batch, seed=0):
        g = torch.Generator().manual_seed(seed)
        shape = (batch, steps, I) if self.batch_first else (steps, batch, I)
        x = torch.randn(shape, generator=g)
        layers = self.num_layers * (2 if self.bidirectional else 1)
        return (x, *(torch.randn(layers, batch, H, generator=g) for _ in self.states() * self.h0))

    def wrap(self, rnn):
        return (LSTMWrap if self.cell == "LSTM" else Wrap)(rnn)

    def pair(self, seed=0):
        """(torch.nn's module, fastrnn's) with identical parameters, wrapped, in eval mode."""
        torch.manual_seed(seed)
        ref = getattr(nn, self.cell)(I, H, **self.rnn_kwargs())
        fast = fastrnn.convert(copy.deepcopy(ref))
        assert type(fast) is getattr(fastrnn, self.cell)
        return self.wrap(ref).eval(), self.wrap(fast).eval()


CELL_GRID = [Cell(*c) for c in itertools.product(["LSTM", "GRU"], [1, 2], [False, True],
                                                  [True, False], [False, True], [False, True])]
# Per cell, Config's pairwise rows less the nonlinearity: every pair of values of any
# two settings.
CELL_PAIRWISE = [Cell(cell, c.num_layers, c.bidirectional, c.bias, c.batch_first, c.h0)
                 for cell in ("LSTM", "GRU") for c in PAIRWISE]
# Config's pairwise rows with the nonlinearity's column choosing the cell: every pair
# of values of any two settings, the cell one of them, in six configurations.
CELL_PAIRWISE_6 = [Cell("GRU" if c.nonlinearity == "relu" else "LSTM", c.num_layers,
                        c.bidirectional, c.bias, c.batch_first, c.h0) for c in PAIRWISE]
CELL_THREE_WISE = covering(CELL_GRID, Cell._fields, 3, given=CELL_PAIRWISE_6)


class LSTMWrap(nn.Module):
    """An LSTM with (h0, c0) in and (h_n, c_n) out as separate tensors, as an ONNX model
    takes and gives them."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: Tensor, h0: Optional[Tensor] = None, c0: Optional[Tensor] = None):
        hx: Optional[Tuple[Tensor, Tensor]] = None
        if h0 is not None and c0 is not None:
            hx = (h0, c0)
        out, (h_n, c_n) = self.rnn(x, hx)
        return out, h_n, c_n


class LSTMPackedWrap(nn.Module):
    """PackedWrap's model with an LSTM."""

    def __init__(self, rnn, enforce_sorted):
        super().__init__()
        self.rnn = rnn
        self.enforce_sorted = enforce_sorted

    def forward(self, x: Tensor, lengths: Tensor, h0: Optional[Tensor] = None,
                c0: Optional[Tensor] = None):
        packed = pack_padded_sequence(x, lengths, batch_first=self.rnn.batch_first,
                                      enforce_sorted=self.enforce_sorted)
        hx: Optional[Tuple[Tensor, Tensor]] = None
        if h0 is not None and c0 is not None:
            hx = (h0, c0)
        out, (h_n, c_n) = self.rnn(packed, hx)
        out, _ = pad_packed_sequence(out, batch_first=self.rnn.batch_first)
        return out, h_n, c_n


def fast_model(c, seed=0):
    _, fast = rnn_pair(I, H, seed=seed, **c.rnn_kwargs())
    return Wrap(fast).eval()


def assert_matches(actual, expected, what=""):
    """expected may nest, as (output, (h_n, c_n)) does."""
    expected = tree_leaves(expected)
    assert len(actual) == len(expected), f"{what}: {len(actual)} outputs, {len(expected)} expected"
    for i, (a, e) in enumerate(zip(actual, expected)):
        a = torch.as_tensor(a)
        torch.testing.assert_close(a, e.detach(), **TOL[torch.float32],
                                   msg=lambda m: f"{what} output {i}: {m}")


# ONNX ------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def torchlib_table_built_once():
    """torch.onnx.export(dynamo=True) builds onnxscript's table of ATen translations anew for
    every export: about half of a small model's export (1.1-1.4 s of 2.3 s), some 150 times
    in these tests. Here it is built once; the exported bytes are the same. (Where torch's
    private lazy import of onnxscript has another form, exports simply build it each time.)"""
    try:
        from torch.onnx._internal._lazy_import import onnxscript_apis
        onnxscript_apis.get_torchlib_ops  # imports the module the exporter calls
        module = onnxscript_apis._module
        build = module.get_torchlib_ops
    except Exception:  # no onnxscript, or another torch
        yield
        return
    module.get_torchlib_ops = functools.cache(build)
    try:
        yield
    finally:
        module.get_torchlib_ops = build


def onnx_export(model, args, names, dynamic, dynamo, opset=None, outputs=("output", "h_n")):
    """The ONNX model's bytes. dynamic: {input name: {dim: symbol}}."""
    kwargs = dict(input_names=names, output_names=list(outputs), opset_version=opset)
    if dynamo:
        dims = {}
        shapes = tuple({d: dims.setdefault(s, torch.export.Dim(s)) for d, s in dynamic[n].items()}
                       for n in names)
        program = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=shapes,
                                    verbose=False, **kwargs)
        return program.model_proto.SerializeToString()
    f = io.BytesIO()
    torch.onnx.export(model, args, f, dynamo=False, dynamic_axes=dynamic, **kwargs)
    return f.getvalue()


def onnx_run(model_bytes, names, args):
    import onnxruntime

    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {n: a.numpy() for n, a in zip(names, args)})


def assert_native_rnn(model_bytes, num_layers, op="RNN"):
    """One ONNX ``op`` node per layer and nothing of fastrnn's in the graph."""
    import onnx

    nodes = onnx.load_from_string(model_bytes).graph.node
    assert [n.op_type for n in nodes].count(op) == num_layers
    assert all(n.domain in ("", "ai.onnx") for n in nodes), {n.domain for n in nodes}


def check_onnx(c, dynamo, opset=None):
    model = fast_model(c)
    names = ["x", "h0"][:1 + c.h0]
    t_dim, b_dim = c.dims()
    dynamic = {"x": {t_dim: "T", b_dim: "B"}, "h0": {1: "B"}}
    model_bytes = onnx_export(model, c.inputs(*EXAMPLE), names, dynamic, dynamo, opset)
    assert_native_rnn(model_bytes, c.num_layers)
    for steps, batch in SIZES:
        args = c.inputs(steps, batch, seed=steps)
        assert_matches(onnx_run(model_bytes, names, args), model(*args), f"T={steps} B={batch}")


@ONNX
@pytest.mark.parametrize("c", GRID, ids=Config.id)
def test_onnx_torchscript_exporter(c):
    check_onnx(c, dynamo=False)


@ONNX
@pytest.mark.parametrize("c", PAIRWISE, ids=Config.id)
def test_onnx_dynamo_exporter(c):
    check_onnx(c, dynamo=True)


@ONNX
@pytest.mark.slow
@pytest.mark.parametrize("c", THREE_WISE, ids=Config.id)
def test_onnx_dynamo_exporter_three_wise(c):
    check_onnx(c, dynamo=True)


@ONNX
@pytest.mark.parametrize("opset", [7, 8, 9, 13, 17])
def test_onnx_torchscript_exporter_opsets(opset):
    """ONNX RNN exists since opset 7; Squeeze/Unsqueeze/Slice changed form on the way."""
    check_onnx(Config(2, True, True, "tanh", False, True), dynamo=False, opset=opset)


@ONNX
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_unbatched_input(dynamo):
    model = fast_model(Config(2, True, True, "relu", False, False))
    model_bytes = onnx_export(model, (torch.randn(5, I),), ["x"], {"x": {0: "T"}}, dynamo)
    for steps in (5, 8, 1):
        x = torch.randn(steps, I)
        assert_matches(onnx_run(model_bytes, ["x"], (x,)), model(x), f"T={steps}")


@ONNX
@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("c", [Config(1, False, True, "tanh", False, False),
                               Config(2, True, True, "relu", True, True),
                               Config(2, False, False, "tanh", False, True)], ids=Config.id)
def test_onnx_packed_torchscript_exporter(c, enforce_sorted):
    """As for torch.nn.RNN: the packing becomes the RNN operators' sequence_lens."""
    model = PackedWrap(fast_model(c).rnn, enforce_sorted).eval()
    names = ["x", "lengths", "h0"][:2 + c.h0]
    t_dim, b_dim = c.dims()
    dynamic = {"x": {t_dim: "T", b_dim: "B"}, "lengths": {0: "B"}, "h0": {1: "B"}}

    def args(steps, batch, seed=0):
        lengths = lengths_for(batch, steps, seed)
        if enforce_sorted:
            lengths = lengths.sort(descending=True).values
        x, *h0 = c.inputs(steps, batch, seed)
        return (x, lengths, *h0)

    model_bytes = onnx_export(model, args(*EXAMPLE), names, dynamic, dynamo=False)
    assert_native_rnn(model_bytes, c.num_layers)
    for steps, batch in SIZES:
        a = args(steps, batch, seed=steps)
        assert_matches(onnx_run(model_bytes, names, a), model(*a), f"T={steps} B={batch}")


@ONNX
def test_onnx_of_a_scripted_model():
    """torch.onnx.export also takes a ScriptModule (no optional inputs, as for any
    ScriptModule)."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = fast_model(Config(2, True, True, "tanh", False, False)).rnn

        def forward(self, x: Tensor):
            return self.rnn(x)

    model = Model().eval()
    model_bytes = onnx_export(torch.jit.script(model), (torch.randn(*EXAMPLE, I),), ["x"],
                              {"x": {0: "T", 1: "B"}}, dynamo=False)
    assert_native_rnn(model_bytes, 2)
    x = torch.randn(8, 2, I)
    assert_matches(onnx_run(model_bytes, ["x"], (x,)), model(x))


def check_cell_onnx(c: Cell, dynamo, opset=None):
    """As check_onnx, for LSTM and GRU, against torch.nn's module as well."""
    ref, model = c.pair()
    names = c.input_names()
    t_dim, b_dim = c.dims()
    dynamic = {"x": {t_dim: "T", b_dim: "B"}, "h0": {1: "B"}, "c0": {1: "B"}}
    model_bytes = onnx_export(model, c.inputs(*EXAMPLE), names, dynamic, dynamo, opset,
                              outputs=c.output_names())
    assert_native_rnn(model_bytes, c.num_layers, op=c.cell)
    for steps, batch in SIZES:
        args = c.inputs(steps, batch, seed=steps)
        result = onnx_run(model_bytes, names, args)
        assert_matches(result, model(*args), f"T={steps} B={batch}")
        assert_matches(result, ref(*args), f"torch.nn.{c.cell}, T={steps} B={batch}")


@ONNX
@pytest.mark.parametrize("c", CELL_PAIRWISE, ids=Cell.id)
def test_onnx_lstm_gru_torchscript_exporter(c):
    check_cell_onnx(c, dynamo=False)


@ONNX
@pytest.mark.slow
@pytest.mark.parametrize("c", [c for c in CELL_GRID if c not in CELL_PAIRWISE], ids=Cell.id)
def test_onnx_lstm_gru_torchscript_exporter_whole_grid(c):
    check_cell_onnx(c, dynamo=False)


@ONNX
@pytest.mark.parametrize("c", CELL_PAIRWISE_6, ids=Cell.id)
def test_onnx_lstm_gru_dynamo_exporter(c):
    check_cell_onnx(c, dynamo=True)


@ONNX
@pytest.mark.slow
@pytest.mark.parametrize("c", CELL_THREE_WISE, ids=Cell.id)
def test_onnx_lstm_gru_dynamo_exporter_three_wise(c):
    check_cell_onnx(c, dynamo=True)


@ONNX
@pytest.mark.parametrize("opset", [7, 9, 13, 17])
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_onnx_lstm_gru_torchscript_exporter_opsets(cell, opset):
    """ONNX LSTM, and GRU with linear_before_reset, exist since opset 7."""
    check_cell_onnx(Cell(cell, 2, True, True, False, True), dynamo=False, opset=opset)


@ONNX
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_onnx_lstm_gru_unbatched_input(cell, dynamo):
    c = Cell(cell, 2, True, True, False, False)
    ref, model = c.pair()
    model_bytes = onnx_export(model, (torch.randn(5, I),), ["x"], {"x": {0: "T"}}, dynamo,
                              outputs=c.output_names())
    for steps in (5, 8, 1):
        x = torch.randn(steps, I)
        result = onnx_run(model_bytes, ["x"], (x,))
        assert_matches(result, model(x), f"T={steps}")
        assert_matches(result, ref(x), f"torch.nn.{cell}, T={steps}")


@ONNX
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_onnx_lstm_gru_float16(cell):
    """onnxruntime runs LSTM and GRU in float16 (and float32; in float64 it runs none of
    RNN, LSTM and GRU), as the README says."""
    c = Cell(cell, 2, True, True, False, True)
    model = c.pair()[1].half()
    args = tuple(a.half() for a in c.inputs(*EXAMPLE))
    model_bytes = onnx_export(model, args, c.input_names(), {}, dynamo=False,
                              outputs=c.output_names())
    for a, e in zip(onnx_run(model_bytes, c.input_names(), args), tree_leaves(model(*args))):
        torch.testing.assert_close(torch.as_tensor(a), e.detach(), rtol=1e-2, atol=1e-2)


@ONNX
@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("c", [Cell(cell, *settings) for cell in ("LSTM", "GRU")
                               for settings in [(1, False, True, False, False),
                                                (2, True, True, True, True),
                                                (2, False, False, False, True)]], ids=Cell.id)
def test_onnx_lstm_gru_packed_torchscript_exporter(c, enforce_sorted):
    """As for torch.nn.LSTM and GRU: the packing becomes the operators' sequence_lens."""
    ref, model = c.pair()
    wrap = LSTMPackedWrap if c.cell == "LSTM" else PackedWrap
    ref, model = wrap(ref.rnn, enforce_sorted).eval(), wrap(model.rnn, enforce_sorted).eval()
    names = ["x", "lengths"] + c.input_names()[1:]
    t_dim, b_dim = c.dims()
    dynamic = {"x": {t_dim: "T", b_dim: "B"}, "lengths": {0: "B"}, "h0": {1: "B"},
               "c0": {1: "B"}}

    def args(steps, batch, seed=0):
        lengths = lengths_for(batch, steps, seed)
        if enforce_sorted:
            lengths = lengths.sort(descending=True).values
        x, *states = c.inputs(steps, batch, seed)
        return (x, lengths, *states)

    model_bytes = onnx_export(model, args(*EXAMPLE), names, dynamic, dynamo=False,
                              outputs=c.output_names())
    assert_native_rnn(model_bytes, c.num_layers, op=c.cell)
    for steps, batch in SIZES:
        a = args(steps, batch, seed=steps)
        result = onnx_run(model_bytes, names, a)
        assert_matches(result, model(*a), f"T={steps} B={batch}")
        assert_matches(result, ref(*a), f"torch.nn.{c.cell}, T={steps} B={batch}")


@ONNX
@pytest.mark.parametrize("cell", ["RNN", "LSTM", "GRU"])
def test_onnx_packed_dynamo_exporter_is_a_clear_error(cell):
    """torch.export cannot capture pack_padded_sequence, for torch.nn's modules either;
    the error says so, and not the strict-mode fallback's failure."""
    rnn = getattr(fastrnn, cell)(I, H)
    model = (LSTMPackedWrap if cell == "LSTM" else PackedWrap)(rnn, enforce_sorted=False).eval()
    with pytest.raises(RuntimeError, match=f"fastrnn.{cell}: a PackedSequence cannot be exported"):
        onnx_export(model, (torch.randn(*EXAMPLE, I), lengths_for(EXAMPLE[1], EXAMPLE[0])),
                    ["x", "lengths"], {"x": {0: "T", 1: "B"}, "lengths": {0: "B"}}, dynamo=True)


@ONNX
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_onnx_of_a_scripted_lstm_gru_model(cell):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = getattr(fastrnn, cell)(I, H, num_layers=2, bidirectional=True)

        def forward(self, x: Tensor):
            return self.rnn(x)

    c = Cell(cell, 2, True, True, False, False)
    model = Model().eval()
    model_bytes = onnx_export(torch.jit.script(model), (torch.randn(*EXAMPLE, I),), ["x"],
                              {"x": {0: "T", 1: "B"}}, dynamo=False, outputs=c.output_names())
    assert_native_rnn(model_bytes, 2, op=cell)
    x = torch.randn(8, 2, I)
    assert_matches(onnx_run(model_bytes, ["x"], (x,)), model(x))


@ONNX
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_lstm_proj_size_is_an_error(dynamo):
    """ONNX's LSTM has no projection. torch.onnx.export refuses torch.nn.LSTM's with
    dynamo=False ("LSTMs with projections") and, with dynamo=True, writes a graph that
    onnxruntime rejects; fastrnn.LSTM's is the same clear error from both."""
    model = LSTMWrap(fastrnn.LSTM(I, H, proj_size=3)).eval()
    with pytest.raises(RuntimeError, match="LSTMs with projections"):
        onnx_export(model, (torch.randn(*EXAMPLE, I),), ["x"], {"x": {0: "T", 1: "B"}}, dynamo,
                    outputs=("output", "h_n", "c_n"))
    if not dynamo:
        with pytest.raises(RuntimeError, match="LSTMs with projections"):
            onnx_export(LSTMWrap(nn.LSTM(I, H, proj_size=3)).eval(), (torch.randn(*EXAMPLE, I),),
                        ["x"], {"x": {0: "T", 1: "B"}}, dynamo, outputs=("output", "h_n", "c_n"))


# TorchScript -------------------------------------------------------------------


def grads_of(model, out, h_n, tensors):
    loss = weighted_sum(out, h_n)
    return torch.autograd.grad(loss, [t for t in tensors if t is not None] + list(model.parameters()))


@pytest.mark.parametrize("c", PAIRWISE + [Config(1, False, True, "tanh", False, False)],
                         ids=Config.id)
def test_script_matches_eager(c):
    """Outputs and the gradients of the input, h0 and every parameter."""
    model = fast_model(c).train()
    scripted = torch.jit.script(model)
    assert "fastrnn::rnn" in str(scripted.rnn._op.graph)  # the fused op, not torch's RNN
    for steps, batch in SIZES[:2]:
        args = [a.requires_grad_() for a in c.inputs(steps, batch, seed=steps)]
        results = []
        for m in (model, scripted):
            out, h_n = m(*args)
            results.append((out, h_n, *grads_of(m, out, h_n, args)))
        for a, e in zip(*results):
            torch.testing.assert_close(a, e, **TOL[torch.float32])


@pytest.mark.slow
@pytest.mark.parametrize("c", [c for c in GRID if c not in PAIRWISE], ids=Config.id)
def test_script_matches_eager_whole_grid(c):
    test_script_matches_eager(c)


@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
def test_script_packed(enforce_sorted):
    c = Config(2, True, True, "tanh", True, True)
    model = PackedWrap(fast_model(c).rnn, enforce_sorted)
    scripted = torch.jit.script(model)
    lengths = lengths_for(4, 6)
    if enforce_sorted:
        lengths = lengths.sort(descending=True).values
    x, h0 = (a.requires_grad_() for a in c.inputs(6, 4))
    results = []
    for m in (model, scripted):
        out, h_n = m(x, lengths, h0)
        results.append((out, h_n, *grads_of(m, out, h_n, [x, h0])))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, **TOL[torch.float32])


def test_script_unbatched_and_errors_like_torch():
    c = Config(2, False, True, "tanh", False, False)
    ref, fast = rnn_pair(I, H, **c.rnn_kwargs())
    scripted = [torch.jit.script(Wrap(m)) for m in (ref, fast)]
    x = torch.randn(4, I)
    torch.testing.assert_close(scripted[1](x), Wrap(fast)(x))
    for bad, message in [(torch.randn(4, 2, I + 1), "input.size(-1) must be equal to input_size"),
                         (torch.randn(2, 3, 4, I), "Expected input to be 2D or 3D"),
                         (torch.randn(0, 2, I), "sequence length to be larger than 0")]:
        for m in scripted:
            with pytest.raises(Exception, match=re.escape(message)):
                m(bad)


def test_script_save_load():
    c = Config(2, True, False, "relu", True, True)
    model = fast_model(c)
    f = io.BytesIO()
    torch.jit.save(torch.jit.script(model), f)
    f.seek(0)
    loaded = torch.jit.load(f)
    for steps, batch in SIZES:
        args = c.inputs(steps, batch, seed=steps)
        assert_matches(loaded(*args), model(*args))
    # The module on its own scripts and saves too (like torch.nn.RNN's, its forward is
    # compiled per input type, so it is called through a scripted caller).
    f = io.BytesIO()
    torch.jit.save(torch.jit.script(fastrnn.RNN(I, H)), f)


def test_script_dropout_follows_train_and_eval():
    model = Wrap(fastrnn.RNN(I, H, num_layers=3, dropout=0.5))
    scripted = torch.jit.script(model)
    x = torch.randn(5, 3, I)
    scripted.eval()
    torch.testing.assert_close(scripted(x), model.eval()(x))
    scripted.train()
    torch.manual_seed(0)
    a = scripted(x)[0]
    torch.manual_seed(1)
    b = scripted(x)[0]
    assert not torch.equal(a, b)


def check_cell_script(c: Cell):
    """Outputs and the gradients of the input, the states and every parameter, against
    the eager fastrnn and torch.nn modules."""
    ref, model = (m.train() for m in c.pair())
    scripted = torch.jit.script(model)
    assert f"fastrnn::{c.cell.lower()}" in str(scripted.inlined_graph)
    for steps, batch in SIZES[:2]:
        args = [a.requires_grad_() for a in c.inputs(steps, batch, seed=steps)]
        results = []
        for m in (ref, model, scripted):
            out, *states = m(*args)
            loss = weighted_sum(out, torch.stack(states))
            results.append((out, *states, *torch.autograd.grad(loss, args + list(m.parameters()))))
        for r, e, a in zip(*results):
            torch.testing.assert_close(a, e, **TOL[torch.float32])
            torch.testing.assert_close(a, r, **TOL[torch.float32])


@pytest.mark.parametrize("c", CELL_PAIRWISE, ids=Cell.id)
def test_script_lstm_gru_matches_eager(c):
    check_cell_script(c)


@pytest.mark.slow
@pytest.mark.parametrize("c", [c for c in CELL_GRID if c not in CELL_PAIRWISE], ids=Cell.id)
def test_script_lstm_gru_matches_eager_whole_grid(c):
    check_cell_script(c)


def test_script_lstm_proj_size():
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=3)
    model = LSTMWrap(fastrnn.convert(copy.deepcopy(ref)))
    scripted = torch.jit.script(model)
    x, h0, c0 = torch.randn(6, 4, I), torch.randn(4, 4, 3), torch.randn(4, 4, H)
    for m in (LSTMWrap(ref), model):
        torch.testing.assert_close(scripted(x, h0, c0), m(x, h0, c0), **TOL[torch.float32])


@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_script_lstm_gru_packed(cell, enforce_sorted):
    c = Cell(cell, 2, True, True, True, True)
    wrap = LSTMPackedWrap if cell == "LSTM" else PackedWrap
    ref, model = (wrap(m.rnn, enforce_sorted) for m in c.pair())
    scripted = torch.jit.script(model)
    lengths = lengths_for(4, 6)
    if enforce_sorted:
        lengths = lengths.sort(descending=True).values
    x, *states = (a.requires_grad_() for a in c.inputs(6, 4))
    results = []
    for m in (ref, model, scripted):
        out, *finals = m(x, lengths, *states)
        loss = weighted_sum(out, torch.stack(finals))
        results.append((out, *finals, *torch.autograd.grad(loss, [x, *states])))
    for r, e, a in zip(*results):
        torch.testing.assert_close(a, e, **TOL[torch.float32])
        torch.testing.assert_close(a, r, **TOL[torch.float32])


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_script_lstm_gru_unbatched_and_errors_like_torch(cell):
    c = Cell(cell, 2, False, True, False, False)
    ref, fast = c.pair()
    scripted = [torch.jit.script(m) for m in (ref, fast)]
    x = torch.randn(4, I)
    assert_matches(scripted[1](x), fast(x))
    for bad, message in [(torch.randn(4, 2, I + 1), "input.size(-1) must be equal to input_size"),
                         (torch.randn(2, 3, 4, I), "Expected input to be 2D or 3D"),
                         (torch.randn(0, 2, I), "sequence length to be larger than 0")]:
        for m in scripted + [ref, fast]:
            with pytest.raises(Exception, match=re.escape(message)):
                m(bad)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_script_lstm_gru_save_load(cell):
    c = Cell(cell, 2, True, False, True, True)
    model = c.pair()[1]
    f = io.BytesIO()
    torch.jit.save(torch.jit.script(model), f)
    f.seek(0)
    loaded = torch.jit.load(f)
    for steps, batch in SIZES:
        args = c.inputs(steps, batch, seed=steps)
        assert_matches(loaded(*args), model(*args))
    f = io.BytesIO()
    torch.jit.save(torch.jit.script(getattr(fastrnn, cell)(I, H)), f)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_script_lstm_gru_dropout_follows_train_and_eval(cell):
    model = Cell(cell, 3, False, True, False, False).wrap(
        getattr(fastrnn, cell)(I, H, num_layers=3, dropout=0.5))
    scripted = torch.jit.script(model)
    x = torch.randn(5, 3, I)
    scripted.eval()
    assert_matches(scripted(x), model.eval()(x))
    scripted.train()
    torch.manual_seed(0)
    a = scripted(x)[0]
    torch.manual_seed(1)
    b = scripted(x)[0]
    assert not torch.equal(a, b)


# torch.export ------------------------------------------------------------------


def check_torch_export(c, strict):
    model = fast_model(c)
    t_dim, b_dim = c.dims()
    steps, batch = torch.export.Dim("T"), torch.export.Dim("B")
    shapes = ({t_dim: steps, b_dim: batch}, {1: batch})[:1 + c.h0]
    program = torch.export.export(model, c.inputs(*EXAMPLE), dynamic_shapes=shapes, strict=strict)
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.fastrnn.rnn.default in targets
    for steps, batch in SIZES:
        args = c.inputs(steps, batch, seed=steps)
        assert_matches(program.module()(*args), model(*args), f"T={steps} B={batch}")


@pytest.mark.parametrize("c", PAIRWISE, ids=Config.id)
def test_torch_export_dynamic_batch_and_time(c):
    check_torch_export(c, strict=False)


@pytest.mark.slow
@pytest.mark.parametrize("c", [c for c in GRID if c not in PAIRWISE], ids=Config.id)
def test_torch_export_whole_grid(c):
    check_torch_export(c, strict=False)


def test_torch_export_strict():
    check_torch_export(PAIRWISE[1], strict=True)


def check_cell_torch_export(c: Cell, strict):
    ref, model = c.pair()
    t_dim, b_dim = c.dims()
    steps, batch = torch.export.Dim("T"), torch.export.Dim("B")
    shapes = ({t_dim: steps, b_dim: batch}, *({1: batch} for _ in c.input_names()[1:]))
    program = torch.export.export(model, c.inputs(*EXAMPLE), dynamic_shapes=shapes, strict=strict)
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert getattr(torch.ops.fastrnn, c.cell.lower()).default in targets
    for steps, batch in SIZES:
        args = c.inputs(steps, batch, seed=steps)
        result = program.module()(*args)
        assert_matches(result, model(*args), f"T={steps} B={batch}")
        assert_matches(result, ref(*args), f"torch.nn.{c.cell}, T={steps} B={batch}")


@pytest.mark.parametrize("c", CELL_PAIRWISE, ids=Cell.id)
def test_torch_export_lstm_gru_dynamic_batch_and_time(c):
    check_cell_torch_export(c, strict=False)


@pytest.mark.slow
@pytest.mark.parametrize("c", [c for c in CELL_GRID if c not in CELL_PAIRWISE], ids=Cell.id)
def test_torch_export_lstm_gru_whole_grid(c):
    check_cell_torch_export(c, strict=False)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_torch_export_lstm_gru_strict(cell):
    check_cell_torch_export(Cell(cell, 2, True, True, True, True), strict=True)


def test_torch_export_lstm_proj_size():
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, num_layers=2, proj_size=3)
    model = LSTMWrap(fastrnn.convert(copy.deepcopy(ref))).eval()
    batch = torch.export.Dim("B")
    program = torch.export.export(model, (torch.randn(*EXAMPLE, I),),
                                  dynamic_shapes=({0: torch.export.Dim("T"), 1: batch},))
    x = torch.randn(7, 2, I)
    assert_matches(program.module()(x), LSTMWrap(ref)(x))


def test_compile_fullgraph_still_matches_eager():
    """The export hooks leave torch.compile(fullgraph=True) alone, padded and packed."""
    torch._dynamo.reset()
    c = Config(2, True, True, "tanh", False, True)
    model = fast_model(c)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x, h0 = c.inputs(6, 3)
    assert_matches(compiled(x, h0), model(x, h0))
    packed = pack_padded_sequence(x, lengths_for(3, 6), enforce_sorted=False)
    (out_c, h_c), (out_e, h_e) = compiled(packed, h0), model(packed, h0)
    assert_matches((out_c.data, h_c), (out_e.data, h_e))


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_compile_fullgraph_lstm_gru_still_matches_eager(cell):
    torch._dynamo.reset()
    c = Cell(cell, 2, True, True, False, True)
    model = c.pair()[1].rnn
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x, *states = c.inputs(6, 3)
    hx = tuple(states) if cell == "LSTM" else states[0]
    assert_matches(tree_leaves(compiled(x, hx)), model(x, hx))
    packed = pack_padded_sequence(x, lengths_for(3, 6), enforce_sorted=False)
    (out_c, h_c), (out_e, h_e) = compiled(packed, hx), model(packed, hx)
    assert_matches(tree_leaves((out_c.data, h_c)), (out_e.data, h_e))


# revert() ----------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.RNN(I, H, num_layers=2, bidirectional=True, batch_first=True)
        self.decoder = nn.RNN(2 * H, H, nonlinearity="relu", bias=False)
        self.fc = nn.Linear(H, 2)

    def forward(self, x):
        out, _ = self.encoder(x)
        out, _ = self.decoder(out.transpose(0, 1))
        return self.fc(out[-1])


def test_revert_is_the_inverse_of_convert():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(3, 5, I)
    expected = model(x)
    params = {n: p for n, p in model.named_parameters()}
    modules = dict(model.named_modules())

    assert fastrnn.revert(fastrnn.convert(model)) is model
    assert type(model.encoder) is nn.RNN and type(model.decoder) is nn.RNN
    assert dict(model.named_modules()) == modules  # the same module objects
    for name, p in model.named_parameters():
        assert p is params[name]  # the same Parameter objects
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    # and round again, from fastrnn.RNN
    fastrnn.convert(model)
    torch.testing.assert_close(model(x), expected, **TOL[torch.float32])
    fastrnn.revert(model)
    assert repr(model) == repr(Net())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    # a plain torch.nn.RNN state_dict, strictly
    Net().load_state_dict(model.state_dict())


class CellNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True,
                               proj_size=4)
        self.decoder = nn.GRU(8, H, bias=False)
        self.fc = nn.Linear(H, 2)

    def forward(self, x):
        out, _ = self.encoder(x)
        out, _ = self.decoder(out.transpose(0, 1))
        return self.fc(out[-1])


def test_revert_is_the_inverse_of_convert_for_lstm_gru():
    torch.manual_seed(0)
    model = CellNet()
    x = torch.randn(3, 5, I)
    expected = model(x)
    params = {n: p for n, p in model.named_parameters()}
    modules = dict(model.named_modules())

    assert fastrnn.revert(fastrnn.convert(model)) is model
    assert type(model.encoder) is nn.LSTM and type(model.decoder) is nn.GRU
    assert dict(model.named_modules()) == modules
    for name, p in model.named_parameters():
        assert p is params[name]
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    fastrnn.convert(model)
    assert type(model.encoder) is fastrnn.LSTM and type(model.decoder) is fastrnn.GRU
    torch.testing.assert_close(model(x), expected, **TOL[torch.float32])
    fastrnn.revert(model)
    assert repr(model) == repr(CellNet())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    CellNet().load_state_dict(model.state_dict())


@pytest.mark.parametrize("cell", ["RNN", "LSTM", "GRU"])
def test_revert_module_itself_and_leaves_subclasses_alone(cell):
    class Mine(getattr(fastrnn, cell)):
        pass

    rnn = getattr(fastrnn, cell)(I, H)
    assert type(fastrnn.revert(rnn)) is getattr(nn, cell)
    mine = Mine(I, H)
    assert type(fastrnn.revert(mine)) is Mine


# torch.save / torch.load of a whole model ----------------------------------------


def test_whole_model_save_load_with_safe_globals():
    model = fastrnn.convert(Net())
    f = io.BytesIO()
    torch.save(model, f)
    allowed = [Net, nn.modules.rnn.RNN, nn.Linear]
    f.seek(0)
    with pytest.raises(Exception, match="fastrnn.modules.RNN"):
        with torch.serialization.safe_globals(allowed):
            torch.load(f)
    f.seek(0)
    with torch.serialization.safe_globals(allowed + [fastrnn.RNN]):
        loaded = torch.load(f)
    assert type(loaded.encoder) is fastrnn.RNN
    x = torch.randn(3, 5, I)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_whole_model_save_load_with_safe_globals_lstm_gru():
    model = fastrnn.convert(CellNet())
    f = io.BytesIO()
    torch.save(model, f)
    allowed = [CellNet, nn.modules.rnn.LSTM, nn.modules.rnn.GRU, nn.Linear]
    for missing in (fastrnn.LSTM, fastrnn.GRU):
        f.seek(0)
        others = [fastrnn.LSTM, fastrnn.GRU]
        others.remove(missing)
        with pytest.raises(Exception, match=f"fastrnn.modules.{missing.__name__}"):
            with torch.serialization.safe_globals(allowed + others):
                torch.load(f)
    f.seek(0)
    with torch.serialization.safe_globals(allowed + [fastrnn.LSTM, fastrnn.GRU]):
        loaded = torch.load(f)
    assert type(loaded.encoder) is fastrnn.LSTM and type(loaded.decoder) is fastrnn.GRU
    x = torch.randn(3, 5, I)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


# README --------------------------------------------------------------------------


@ONNX
def test_readme_deploy_section(tmp_path, monkeypatch):
    """The Deploy section's snippets (```py blocks, which test_readme leaves to this
    test) run as written, after the use section's (which define MnistRNN)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Deploy: ONNX, TorchScript, torch.export", 1)[1].split("\n## ", 1)[0]
    use = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    deploy = re.findall(r"```py\n(.*?)```", section, flags=re.S)
    assert deploy, "the Deploy section lost its snippets"
    # A file, not exec of a string: torch.jit.script reads the source of MnistRNN.forward.
    script = tmp_path / "readme_snippets.py"
    script.write_text("\n".join(use + deploy))
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ns = runpy.run_path(str(script))
    assert isinstance(ns["model"].rnn, fastrnn.RNN)
    for name in ("mnist_rnn.onnx", "mnist_rnn_ts.onnx", "mnist_rnn.pt", "model.pt"):
        assert (tmp_path / name).exists(), name
