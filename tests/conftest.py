"""The one case builder every test file uses.

The suite, by the unit under test:
  test_ops.py       the raw ops fastrnn::rnn / rnn_backward (and fastrnn.rnn): reference,
                    gradcheck, opcheck, compile, fakes, argument errors, autocast, hostile
                    arguments in a child process (hostile_ops_child.py)
  test_module.py    fastrnn.RNN against torch.nn.RNN: the parity grid with one op call each
                    way, dropout, property-based parity, interface, threads, determinism,
                    precision, checkpoints, warnings, compile
  test_cuda.py      CUDA-only behaviour (skipped without a GPU)
  test_stress.py    slow: sizes past 2**31 elements/bytes, the memory soak
  test_distributed.py  DistributedDataParallel (gloo)
  csrc/test/        the C++ test of libfastrnn (ctest, .ci/cpp_test.sh)

A ``Case`` is one configuration of an Elman RNN stack and its input (module
settings, input shape and layout, dtype, device, sizes). From it:

* ``twins(case)``: (torch.nn.RNN, fastrnn.RNN) with identical parameters;
* ``module_inputs(case)``: (x, h0, lengths) as the module takes them, and
  ``feed(case, x, lengths)``: x itself or packed;
* ``run_module(module, case, x, h0, lengths)``: output, h_n and the gradients
  of a weighted sum with respect to x, h0 and every parameter;
* ``op_inputs(case)``: an ``OpArgs`` with the raw op's arguments (time-major or
  packed rows, hx [L*D, B, H], torch.nn.RNN's flat weights) that calls
  ``torch.ops.fastrnn.rnn`` and ``fastrnn.reference.rnn_reference``;
* ``OpCalls``: a dispatch mode recording every fastrnn op call.
"""

import copy
import dataclasses
import itertools
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
from fastrnn.reference import rnn_reference

TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
}

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


@dataclass(frozen=True)
class Case:
    nonlinearity: str = "tanh"
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
    def dropout_applied(self) -> bool:
        return self.train and self.dropout > 0 and self.num_layers > 1

    def replace(self, **changes) -> "Case":
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        parts = [
            self.nonlinearity, "bias" if self.bias else "nobias",
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
    """The shapes of torch.nn.RNN's flat weights for ``case``."""
    H, shapes = case.hidden_size, []
    for layer in range(case.num_layers):
        width = case.input_size if layer == 0 else case.directions * H
        for _ in range(case.directions):
            shapes += [(H, width), (H, H)] + ([(H,), (H,)] if case.bias else [])
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


def case_id(case: Case) -> str:
    return str(case)


# ---------------------------------------------------------------------------------------
# Modules and their inputs
# ---------------------------------------------------------------------------------------


def twins(case: Case):
    """(torch.nn.RNN, fastrnn.RNN) with identical parameters, on the case's device and
    dtype, in training mode when ``case.train``."""
    torch.manual_seed(case.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropout with one layer
        ref = nn.RNN(case.input_size, case.hidden_size, num_layers=case.num_layers,
                     nonlinearity=case.nonlinearity, bias=case.bias, batch_first=case.batch_first,
                     dropout=case.dropout, bidirectional=case.bidirectional)
    fast = fastrnn.convert(copy.deepcopy(ref))
    assert type(fast) is fastrnn.RNN
    ref, fast = ref.to(case.device, case.dtype), fast.to(case.device, case.dtype)
    ref.train(case.train)
    fast.train(case.train)
    return ref, fast


def rnn_pair(*args, seed=0, **kwargs):
    """(torch.nn.RNN, fastrnn.RNN) with identical parameters from torch.nn.RNN's arguments."""
    torch.manual_seed(seed)
    ref = nn.RNN(*args, **kwargs)
    fast = fastrnn.convert(copy.deepcopy(ref))
    assert type(fast) is fastrnn.RNN
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
    """(x, h0 or None, lengths or None) shaped as the module takes them."""
    g = torch.Generator().manual_seed(case.seed + 7)
    T, B, I, H = case.steps, case.batch, case.input_size, case.hidden_size
    if not case.batched:
        shape = (T, I)
    else:
        shape = (B, T, I) if case.batch_first else (T, B, I)
    x = torch.randn(shape, generator=g, dtype=case.dtype).to(case.device)
    x.requires_grad_(requires_grad)
    h0 = None
    if case.h0:
        h_shape = (case.cells, B, H) if case.batched else (case.cells, H)
        h0 = torch.randn(h_shape, generator=g, dtype=case.dtype).to(case.device)
        h0.requires_grad_(requires_grad)
    lengths = lengths_for(B, T, seed=case.seed) if case.packed else None
    return x, h0, lengths


def feed(case: Case, x, lengths):
    return pack(x, lengths, case.batch_first) if case.packed else x


def weighted_sum(out, h_n, seed=1):
    """A scalar whose gradient differs in every element of out and h_n."""
    if isinstance(out, PackedSequence):
        out = out.data
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    w_h = torch.randn(h_n.shape, generator=g, dtype=torch.float64).to(h_n)
    return (out * w_out).sum() + (h_n * w_h).sum()


def grads(module, loss, extra):
    tensors = [t for t in extra if t is not None] + list(module.parameters())
    return torch.autograd.grad(loss, tensors)


def run_module(module, case: Case, x, h0, lengths):
    """(output (a PackedSequence for packed input), h_n, gradients of x, h0 and every
    parameter, in that order)."""
    out, h_n = module(feed(case, x, lengths), h0)
    return out, h_n, grads(module, weighted_sum(out, h_n), [x, h0])


def assert_close_all(actual, expected, dtype, what=""):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{what}[{i}]: shape {tuple(a.shape)} != {tuple(e.shape)}"
        torch.testing.assert_close(a, e, **TOL[dtype], msg=lambda m: f"{what}[{i}]: {m}")


# ---------------------------------------------------------------------------------------
# The raw op
# ---------------------------------------------------------------------------------------


@dataclass
class OpArgs:
    case: Case
    input: torch.Tensor  # [T, B, I] or packed [N, I]
    hx: torch.Tensor  # [L*D, B, H]
    weights: List[torch.Tensor]  # torch.nn.RNN's _flat_weights order
    batch_sizes: Optional[torch.Tensor]

    @property
    def rows(self) -> int:
        return self.input.shape[0] if self.case.packed else self.input.shape[0] * self.input.shape[1]

    def raw(self):
        """The positional arguments of torch.ops.fastrnn.rnn."""
        c = self.case
        return (self.input, self.hx, self.weights, c.bias, c.num_layers, c.dropout, c.train,
                c.bidirectional, c.nonlinearity, self.batch_sizes)

    def leaves(self):
        return [self.input, self.hx, *self.weights]

    def call(self):
        """torch.ops.fastrnn.rnn: (output, h_n, reserve)."""
        return torch.ops.fastrnn.rnn(*self.raw())

    def reference(self, masks=(), num_layers=None):
        """fastrnn.reference.rnn_reference of the first ``num_layers`` layers."""
        c = self.case
        layers = c.num_layers if num_layers is None else num_layers
        per_cell = 4 if c.bias else 2
        return rnn_reference(self.input, self.hx[: layers * c.directions],
                             self.weights[: layers * c.directions * per_cell],
                             num_layers=layers, bidirectional=c.bidirectional,
                             nonlinearity=c.nonlinearity, batch_sizes=self.batch_sizes,
                             dropout_masks=masks)

    def reserve_parts(self, reserve):
        """(layer outputs, dropout masks) read from reserve (ops.h), each shaped like the
        op's output."""
        c = self.case
        out_shape = (*self.input.shape[:-1], c.directions * c.hidden_size)
        width = c.directions * c.hidden_size
        per = self.rows * width
        count = (c.num_layers - 1) * (2 if c.dropout_applied else 1)
        assert reserve.shape == (count * per,), (tuple(reserve.shape), count * per)
        parts = [reserve[i * per:(i + 1) * per].view(out_shape) for i in range(count)]
        layers = c.num_layers - 1
        return parts[:layers], parts[layers:]


def op_inputs(case: Case, requires_grad=False, scale=1.0) -> OpArgs:
    """The raw op's arguments for ``case``: weights are those of twins(case), the input
    and hx random (hx zero when not case.h0), packed rows when case.packed."""
    ref, _ = twins(case)
    g = torch.Generator().manual_seed(case.seed + 11)
    T, B, I, H = case.steps, case.batch, case.input_size, case.hidden_size

    def rand(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(
            case.device, case.dtype)

    batch_sizes = None
    if case.packed:
        lengths = lengths_for(B, T, seed=case.seed).sort(descending=True).values
        batch_sizes = torch.tensor([int((lengths > t).sum()) for t in range(T)], dtype=torch.long)
        x = rand(int(batch_sizes.sum()), I)
    else:
        x = rand(T, B, I)
    hx = rand(case.cells, B, H) if case.h0 else torch.zeros(case.cells, B, H, dtype=case.dtype,
                                                            device=case.device)
    weights = [w.detach().clone() for w in ref._flat_weights]
    args = OpArgs(case, x, hx, weights, batch_sizes)
    for t in args.leaves():
        t.requires_grad_(requires_grad)
    return args


# ---------------------------------------------------------------------------------------
# Counting op calls
# ---------------------------------------------------------------------------------------


class OpCalls(TorchDispatchMode):
    """Records every fastrnn op call under it: ``calls`` is a list of (name, args, outputs),
    name "rnn" or "rnn_backward"; ``aten`` counts the other ops by name."""

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
