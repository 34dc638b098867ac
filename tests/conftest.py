"""The one case builder every test file uses.

The suite, by the unit under test:
  test_ops.py       the raw ops fastrnn::rnn / lstm / gru and their *_backward (and the
                    wrappers fastrnn.rnn / lstm / gru): reference, reserve, gradcheck,
                    opcheck, compile, fakes, argument errors, autocast, hostile arguments in
                    a child process (hostile_ops_child.py)
  test_module.py    fastrnn.RNN / LSTM / GRU against torch.nn's: the parity grid with one op
                    call each way, dropout, property-based parity, interface, threads,
                    determinism, precision, checkpoints, warnings, compile
  test_cuda.py      CUDA-only behaviour (skipped without a GPU)
  test_stress.py    slow: sizes past 2**31 elements/bytes, the memory soak
  test_distributed.py  DistributedDataParallel (gloo)
  csrc/test/        the C++ test of libfastrnn (ctest, .ci/cpp_test.sh)

A ``Case`` is one configuration of a recurrent stack and its input: the cell
("rnn" with its nonlinearity, "lstm" with its proj_size, "gru"), module settings,
input shape and layout, dtype, device, sizes. From it:

* ``twins(case)``: (torch.nn.RNN/LSTM/GRU, fastrnn's drop-in) with identical
  parameters;
* ``module_inputs(case)``: (x, h0, lengths) as the module takes them (h0 is the
  pair (h0, c0) for LSTM), and ``feed(case, x, lengths)``: x itself or packed;
* ``run_module(module, case, x, h0, lengths)``: output, h_n ((h_n, c_n) for LSTM)
  and the gradients of a weighted sum with respect to x, h0 (and c0) and every
  parameter;
* ``op_inputs(case)``: an ``OpArgs`` with the raw op's arguments (time-major or
  packed rows, hx [L*D, B, R] (and cx [L*D, B, H]), torch.nn's flat weights) that
  calls ``torch.ops.fastrnn.<cell>`` and ``fastrnn.reference.<cell>_reference``
  and reads the reserve back (layer outputs, dropout masks, the cells' saved
  tensors);
* ``OpCalls``: a dispatch mode recording every fastrnn op call.
"""

import copy
import dataclasses
import itertools
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from typing import List, Optional

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence
from torch.utils._python_dispatch import TorchDispatchMode

import fastrnn
from fastrnn.reference import gru_reference, lstm_reference, rnn_reference

TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
}
# float32 on CUDA: cuDNN, cuBLAS and fastrnn's kernels sum in different orders, and CUDA's
# tanhf is not correctly rounded; after a sequence and its backward a few elements lie ~5e-5
# apart.
CUDA_FLOAT32_TOL = dict(rtol=1e-4, atol=1e-4)
# cuDNN's RNN takes TF32 for float32 by default (Ampere on, ~1e-3 apart): the parity tests
# compare against float32's own arithmetic.
torch.backends.cudnn.allow_tf32 = False


def tolerance(tensor, dtype):
    """TOL[dtype], widened for float32 on CUDA."""
    return CUDA_FLOAT32_TOL if tensor.is_cuda and dtype == torch.float32 else TOL[dtype]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")

# Property-based tests: reproducible (derandomized), no deadline on a busy machine.
PROPERTY = settings(max_examples=50, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded"]


def devices():
    """CPU always; CUDA when a GPU is visible (skipped with a reason otherwise)."""
    return ["cpu", pytest.param("cuda", marks=CUDA)]


# ---------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------


CELLS = ("rnn", "lstm", "gru")
TORCH_MODULES = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
FAST_MODULES = {"rnn": fastrnn.RNN, "lstm": fastrnn.LSTM, "gru": fastrnn.GRU}
GATES = {"rnn": 1, "lstm": 4, "gru": 3}


@dataclass(frozen=True)
class Case:
    cell: str = "rnn"  # "rnn" (Elman, with nonlinearity), "lstm", "gru"
    nonlinearity: str = "tanh"  # rnn only
    proj_size: int = 0  # lstm only
    bias: bool = True
    batch_first: bool = False
    bidirectional: bool = False
    num_layers: int = 1
    batched: bool = True
    h0: bool = False
    packed: bool = False
    dropout: float = 0.0
    train: bool = True  # the module's training flag, the op's ``train``
    dtype: torch.dtype = torch.float64
    device: str = "cpu"
    steps: int = 5
    batch: int = 3
    input_size: int = 4
    hidden_size: int = 6
    seed: int = 0

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def cells(self) -> int:
        return self.num_layers * self.directions

    @property
    def gates(self) -> int:
        return GATES[self.cell]

    @property
    def state_size(self) -> int:
        """R, the size of h (proj_size for a projected LSTM, else hidden_size)."""
        return self.proj_size or self.hidden_size

    @property
    def per_cell(self) -> int:
        """Flat weights per layer and direction."""
        return (4 if self.bias else 2) + (1 if self.proj_size else 0)

    @property
    def saved_per_row(self) -> int:
        """What the reserve keeps of each layer per row and direction besides the output
        (csrc/checks.h saved_per_row)."""
        H = self.hidden_size
        return {"rnn": 0, "lstm": 5 * H + (H if self.proj_size else 0), "gru": 4 * H}[self.cell]

    @property
    def dropout_applied(self) -> bool:
        return self.train and self.dropout > 0 and self.num_layers > 1

    @property
    def op_config(self) -> tuple:
        """The op's arguments between the weights and batch_sizes (csrc/ops.h)."""
        extra = (self.nonlinearity,) if self.cell == "rnn" else ()
        return (self.bias, self.num_layers, self.dropout, self.train, self.bidirectional, *extra)

    def replace(self, **changes) -> "Case":
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        parts = [
            self.nonlinearity if self.cell == "rnn" else self.cell,
            *([f"P{self.proj_size}"] if self.proj_size else []),
            "bias" if self.bias else "nobias",
            "bf" if self.batch_first else "tf", "bi" if self.bidirectional else "uni",
            f"L{self.num_layers}", "batched" if self.batched else "unbatched",
            "h0" if self.h0 else "noh0", "packed" if self.packed else "padded",
        ]
        if self.dropout:
            parts.append(f"p{self.dropout:g}" + ("" if self.train else "-eval"))
        defaults = Case()
        for name, short in (("steps", "T"), ("batch", "B"), ("input_size", "I"),
                            ("hidden_size", "H")):
            if getattr(self, name) != getattr(defaults, name):
                parts.append(f"{short}{getattr(self, name)}")
        if self.dtype != defaults.dtype:
            parts.append(str(self.dtype).replace("torch.", ""))
        if self.device != defaults.device:
            parts.append(self.device)
        return "-".join(parts)


def weight_shapes(case: Case):
    """The shapes of torch.nn's flat weights for ``case``: per layer and direction
    weight_ih [G*H, I_l], weight_hh [G*H, R], (bias_ih, bias_hh [G*H]), (weight_hr [R, H])."""
    H, R, GH, shapes = case.hidden_size, case.state_size, case.gates * case.hidden_size, []
    for layer in range(case.num_layers):
        width = case.input_size if layer == 0 else case.directions * R
        for _ in range(case.directions):
            shapes += [(GH, width), (GH, R)] + ([(GH,), (GH,)] if case.bias else [])
            shapes += [(R, H)] if case.proj_size else []
    return shapes


def with_layout(t, layout):
    """A leaf tensor with ``t``'s shape and the given memory layout, not requiring grad.

    "transposed": every dimension's stride order reversed; "sliced": every other
    element of a twice-as-wide last dimension (storage offset 1); "expanded": row 0 of
    ``t`` repeated along dimension 0 with stride 0 (the values change: the caller gives
    the same tensor to both sides of a comparison).
    """
    t = t.detach()
    if layout == "transposed" and t.dim() >= 2:
        order = list(range(t.dim()))[::-1]
        return t.permute(order).contiguous().permute(order)
    if layout == "sliced" and t.dim() >= 1:
        big = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1] + 1)
        big[..., 1::2] = t
        return big[..., 1::2]
    if layout == "expanded" and t.dim() >= 1 and t.shape[0] > 0:
        return t[:1].expand(t.shape)
    return t.contiguous()


def grid(base: Case = Case(), **axes) -> List[Case]:
    """Every combination of the given values (lists) on top of ``base``; a
    PackedSequence is always batched, so unbatched packed combinations are left out."""
    names = list(axes)
    cases = [base.replace(**dict(zip(names, values)))
             for values in itertools.product(*(axes[n] for n in names))]
    return [c for c in cases if c.batched or not c.packed]


def covering(cases, axes, strength, given=()):
    """A subset of ``cases`` in which every combination of values of any ``strength`` of the
    named ``axes`` that occurs in ``cases`` occurs at least once, in it or in ``given``
    (greedy, deterministic). Works on any cases with those attributes."""
    def combos(case):
        return set(itertools.combinations([(a, getattr(case, a)) for a in axes], strength))

    todo = set().union(*(combos(c) for c in cases)).difference(*(combos(c) for c in given))
    chosen = []
    while todo:
        best = max(cases, key=lambda c: len(combos(c) & todo))
        chosen.append(best)
        todo -= combos(best)
    return chosen


def pairwise(cases: List[Case], axes) -> List[Case]:
    """covering(cases, axes, 2): for the grids whose full product is kept for the slow suite."""
    return covering(cases, axes, 2)


def case_id(case: Case) -> str:
    return str(case)


# ---------------------------------------------------------------------------------------
# Modules and their inputs
# ---------------------------------------------------------------------------------------


def twins(case: Case):
    """(torch.nn.RNN/LSTM/GRU, fastrnn's drop-in) with identical parameters, on the case's
    device and dtype, in training mode when ``case.train``."""
    torch.manual_seed(case.seed)
    kwargs = dict(num_layers=case.num_layers, bias=case.bias, batch_first=case.batch_first,
                  dropout=case.dropout, bidirectional=case.bidirectional)
    if case.cell == "rnn":
        kwargs["nonlinearity"] = case.nonlinearity
    if case.proj_size:
        kwargs["proj_size"] = case.proj_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropout with one layer
        ref = TORCH_MODULES[case.cell](case.input_size, case.hidden_size, **kwargs)
    fast = fastrnn.convert(copy.deepcopy(ref))
    assert type(fast) is FAST_MODULES[case.cell]
    ref, fast = ref.to(case.device, case.dtype), fast.to(case.device, case.dtype)
    ref.train(case.train)
    fast.train(case.train)
    return ref, fast


def rnn_pair(*args, seed=0, cell="rnn", **kwargs):
    """(torch.nn.RNN/LSTM/GRU, fastrnn's drop-in) with identical parameters from torch.nn's
    constructor arguments."""
    torch.manual_seed(seed)
    ref = TORCH_MODULES[cell](*args, **kwargs)
    fast = fastrnn.convert(copy.deepcopy(ref))
    assert type(fast) is FAST_MODULES[cell]
    return ref, fast


def lengths_for(batch, steps, seed=0):
    """Uneven lengths in 1..steps, unsorted, with the maximum present."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, steps + 1, (batch,), generator=g)
    lengths[int(torch.randint(0, batch, (1,), generator=g))] = steps
    return lengths


def pack(x, lengths, batch_first):
    return pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)


def module_inputs(case: Case, requires_grad=True):
    """(x, h0 or None, lengths or None) shaped as the module takes them; h0 is the pair
    (h0, c0) for LSTM."""
    g = torch.Generator().manual_seed(case.seed + 7)
    T, B, I, H, R = case.steps, case.batch, case.input_size, case.hidden_size, case.state_size
    if not case.batched:
        shape = (T, I)
    else:
        shape = (B, T, I) if case.batch_first else (T, B, I)
    x = torch.randn(shape, generator=g, dtype=case.dtype).to(case.device)
    x.requires_grad_(requires_grad)
    h0 = None
    if case.h0:
        def state(size):
            shape = (case.cells, B, size) if case.batched else (case.cells, size)
            t = torch.randn(shape, generator=g, dtype=case.dtype).to(case.device)
            return t.requires_grad_(requires_grad)

        h0 = state(R)
        if case.cell == "lstm":
            h0 = (h0, state(H))
    lengths = lengths_for(B, T, seed=case.seed) if case.packed else None
    return x, h0, lengths


def feed(case: Case, x, lengths):
    return pack(x, lengths, case.batch_first) if case.packed else x


def flat(*items):
    """The tensors among ``items``, tuples (LSTM's (h, c)) unpacked and None left out."""
    out = []
    for item in items:
        if isinstance(item, (tuple, list)):
            out += flat(*item)
        elif item is not None:
            out.append(item)
    return out


def weighted_sum(out, h_n, seed=1):
    """A scalar whose gradient differs in every element of out and h_n (each of LSTM's
    (h_n, c_n))."""
    if isinstance(out, PackedSequence):
        out = out.data
    g = torch.Generator().manual_seed(seed)
    total = 0
    for t in (out, *flat(h_n)):
        total = total + (t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t)).sum()
    return total


def grads(module, loss, extra):
    tensors = flat(extra) + list(module.parameters())
    return torch.autograd.grad(loss, tensors)


def run_module(module, case: Case, x, h0, lengths):
    """(output (a PackedSequence for packed input), h_n ((h_n, c_n) for LSTM), gradients
    of x, h0 (and c0) and every parameter, in that order)."""
    out, h_n = module(feed(case, x, lengths), h0)
    return out, h_n, grads(module, weighted_sum(out, h_n), [x, h0])


def assert_close_all(actual, expected, dtype, what=""):
    actual, expected = flat(actual), flat(expected)
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{what}[{i}]: shape {tuple(a.shape)} != {tuple(e.shape)}"
        torch.testing.assert_close(a, e, **tolerance(a, dtype), msg=lambda m: f"{what}[{i}]: {m}")


# ---------------------------------------------------------------------------------------
# The raw op
# ---------------------------------------------------------------------------------------


@dataclass
class OpArgs:
    case: Case
    input: torch.Tensor  # [T, B, I] or packed [N, I]
    hx: torch.Tensor  # [L*D, B, R]
    weights: List[torch.Tensor]  # torch.nn's _flat_weights order
    batch_sizes: Optional[torch.Tensor]
    cx: Optional[torch.Tensor] = None  # LSTM's [L*D, B, H]

    @classmethod
    def from_call(cls, case: Case, args) -> "OpArgs":
        """The OpArgs of a recorded forward op call's positional arguments (OpCalls)."""
        if case.cell == "lstm":
            return cls(case, args[0], args[1], list(args[3]), args[-1], cx=args[2])
        return cls(case, args[0], args[1], list(args[2]), args[-1])

    @property
    def rows(self) -> int:
        return self.input.shape[0] if self.case.packed else self.input.shape[0] * self.input.shape[1]

    @property
    def op(self):
        """torch.ops.fastrnn.rnn / lstm / gru."""
        return getattr(torch.ops.fastrnn, self.case.cell)

    @property
    def backward_op(self):
        return getattr(torch.ops.fastrnn, self.case.cell + "_backward")

    def states(self):
        """(hx,) or LSTM's (hx, cx)."""
        return (self.hx, self.cx) if self.case.cell == "lstm" else (self.hx,)

    def raw(self):
        """The positional arguments of the case's op (csrc/ops.h)."""
        return (self.input, *self.states(), self.weights, *self.case.op_config, self.batch_sizes)

    def leaves(self):
        return [self.input, *self.states(), *self.weights]

    def call(self):
        """The case's op: (output, h_n, [c_n,] reserve)."""
        return self.op(*self.raw())

    def wrapper(self, **kwargs):
        """fastrnn.rnn / lstm / gru with the case's settings (``kwargs`` override them):
        (output, h_n, [c_n]) flattened like the op's results without the reserve."""
        c = self.case
        settings = dict(num_layers=c.num_layers, bidirectional=c.bidirectional,
                        dropout=c.dropout, train=c.train, batch_sizes=self.batch_sizes)
        if c.cell == "rnn":
            settings["nonlinearity"] = c.nonlinearity
        settings.update(kwargs)
        fn = getattr(fastrnn, c.cell)
        hx = (self.hx, self.cx) if c.cell == "lstm" else self.hx
        out, h = fn(self.input, hx, self.weights, **settings)
        return (out, *flat(h))

    def reference(self, masks=(), num_layers=None):
        """fastrnn.reference's stack of the first ``num_layers`` layers: (output, h_n[, c_n])."""
        c = self.case
        layers = c.num_layers if num_layers is None else num_layers
        k = layers * c.directions
        common = dict(num_layers=layers, bidirectional=c.bidirectional,
                      batch_sizes=self.batch_sizes, dropout_masks=masks)
        weights = self.weights[: k * c.per_cell]
        if c.cell == "lstm":
            out, (h, cn) = lstm_reference(self.input, (self.hx[:k], self.cx[:k]), weights, **common)
            return out, h, cn
        if c.cell == "gru":
            return gru_reference(self.input, self.hx[:k], weights, **common)
        return rnn_reference(self.input, self.hx[:k], weights, nonlinearity=c.nonlinearity,
                             **common)

    def _reserve_layout(self, reserve):
        c = self.case
        per = self.rows * c.directions * c.state_size
        count = (c.num_layers - 1) * (2 if c.dropout_applied else 1)
        saved = c.num_layers * self.rows * c.directions * c.saved_per_row
        assert reserve.shape == (count * per + saved,), (tuple(reserve.shape), count * per, saved)
        return per, count

    def reserve_parts(self, reserve):
        """(layer outputs, dropout masks) read from reserve (csrc/stack.h StackViews: the
        outputs of layers 0..L-2, then their masks, at the reserve's start), each shaped
        like the op's output."""
        c = self.case
        per, count = self._reserve_layout(reserve)
        out_shape = (*self.input.shape[:-1], c.directions * c.state_size)
        parts = [reserve[i * per:(i + 1) * per].view(out_shape) for i in range(count)]
        layers = c.num_layers - 1
        return parts[:layers], parts[layers:]

    def reserve_saved(self, reserve):
        """Per layer, what the cell saved for backward (after the outputs and masks), by
        name: LSTM "gates" [N, D*4H] (activated i f g o), "c" [N, D*H] and with proj_size
        "m" [N, D*H]; GRU "gates" [N, D*3H] (activated r z n) and "hn" [N, D*H]
        ((h_{t-1} W_hh^T)_n + b_hn); each row's directions side by side."""
        c = self.case
        per, count = self._reserve_layout(reserve)
        H, D, N = c.hidden_size, c.directions, self.rows
        names = {"rnn": [], "lstm": [("gates", 4 * H), ("c", H)] + ([("m", H)] if c.proj_size else []),
                 "gru": [("gates", 3 * H), ("hn", H)]}[c.cell]
        offset, layers = count * per, []
        for _ in range(c.num_layers):
            parts = {}
            for name, width in names:
                parts[name] = reserve[offset:offset + N * D * width].view(N, D * width)
                offset += N * D * width
            layers.append(parts)
        assert offset == reserve.numel()
        return layers


def op_inputs(case: Case, requires_grad=False, scale=1.0) -> OpArgs:
    """The raw op's arguments for ``case``: weights are those of twins(case), the input
    and hx (and cx) random (zero when not case.h0), packed rows when case.packed."""
    ref, _ = twins(case)
    g = torch.Generator().manual_seed(case.seed + 11)
    T, B, I, H, R = case.steps, case.batch, case.input_size, case.hidden_size, case.state_size

    def rand(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(
            case.device, case.dtype)

    def state(size):
        if case.h0:
            return rand(case.cells, B, size)
        return torch.zeros(case.cells, B, size, dtype=case.dtype, device=case.device)

    batch_sizes = None
    if case.packed:
        lengths = lengths_for(B, T, seed=case.seed).sort(descending=True).values
        batch_sizes = torch.tensor([int((lengths > t).sum()) for t in range(T)], dtype=torch.long)
        x = rand(int(batch_sizes.sum()), I)
    else:
        x = rand(T, B, I)
    hx = state(R)
    cx = state(H) if case.cell == "lstm" else None
    weights = [w.detach().clone() for w in ref._flat_weights]
    args = OpArgs(case, x, hx, weights, batch_sizes, cx=cx)
    for t in args.leaves():
        t.requires_grad_(requires_grad)
    return args


# ---------------------------------------------------------------------------------------
# Counting op calls
# ---------------------------------------------------------------------------------------


class OpCalls(TorchDispatchMode):
    """Records every fastrnn op call under it: ``calls`` is a list of (name, args, outputs),
    name "rnn", "lstm", "gru" or their "*_backward"; ``aten`` counts the other ops by name."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.aten = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "fastrnn":
            self.calls.append((func._opname, args, out))
        else:
            self.aten[str(func)] = self.aten.get(str(func), 0) + 1
        return out

    def names(self):
        return [name for name, _, _ in self.calls]


@pytest.fixture
def threads(request):
    """torch.set_num_threads(request.param) for the test (parametrize it indirectly)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


def child_pytest(test_file, env, *args):
    """`pytest test_file *args` in a child process with `env` added to the environment and
    this fastrnn importable (for switches read once per process, e.g. FASTRNN_CPU_ISA);
    returns the CompletedProcess."""
    child_env = dict(os.environ, **env)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(fastrnn.__file__)))
    child_env["PYTHONPATH"] = os.pathsep.join([pkg_root, child_env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file, *args],
        env=child_env, capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(os.path.abspath(test_file)))
