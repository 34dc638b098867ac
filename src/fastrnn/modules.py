"""fastrnn.RNN, the drop-in torch.nn.RNN, and convert() / revert().

fastrnn.RNN is built on torch.nn.RNNBase, like torch.nn.RNN itself, with
torch.nn.RNN's constructor: parameters, state_dict, repr, argument checks,
flatten_parameters, pickling and .to() are torch's own. Only the forward
computation differs: one call of the fused whole-stack op ``fastrnn::rnn``
(every layer and direction, dropout between layers) instead of torch's
per-step ops, and one call of ``fastrnn::rnn_backward`` in backward.

It is deliberately not a subclass of torch.nn.RNN: torch.compile refuses to
trace anything that is an instance of torch.nn.RNN/GRU/LSTM, and fastrnn.RNN
must compile with fullgraph=True.

Deployment: torch.jit.script compiles forward (once per input type, as for
torch.nn.RNN) into the same op call; torch.jit.trace and torch.export record
the op; torch.onnx.export goes through fastrnn/onnx.py, which is imported only
when a model is traced, exported or scripted.
"""

from typing import List, Optional, Tuple, overload

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .ops import _autocast_on, _zeros
from .ops import gru as _gru
from .ops import lstm as _lstm
from .ops import rnn as _rnn

# c10's names of the dtypes, as torch's own messages spell them.
_C10_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16",
              torch.float16: "Half", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
              torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
              torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}


def _dtype_name(dtype):
    return _C10_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _autocast_reconciles(a: Tensor, b: Tensor) -> bool:
    """Whether autocast casts both to one dtype (as it does for torch.nn.RNN's GEMMs),
    so that different dtypes are no error."""
    eligible = (torch.float32, torch.float16, torch.bfloat16)
    return (
        a.device.type == b.device.type
        and _autocast_on(a.device.type)
        and a.dtype in eligible
        and b.dtype in eligible
    )


class _Fused(nn.RNNBase):
    """What fastrnn's modules share on top of torch.nn.RNNBase."""

    def _get_name(self):
        # print(model) tells a converted model from the original.
        return "fastrnn." + type(self).__name__

    def _update_flat_weights(self):
        if not torch.jit.is_scripting():
            _refresh_flat_weights(self)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this. A scripted model may go on to the
        # TorchScript-based ONNX exporter, which needs the ops' symbolics.
        from . import onnx  # noqa: F401

        return self

    def _time_major(self, input: Tensor, batch_sizes: Optional[Tensor]) -> Tensor:
        """A padded input as the op takes it: [T, B, I]; an empty sequence is torch.nn's error."""
        if batch_sizes is None:
            if input.size(1 if self.batch_first else 0) == 0:
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
            if self.batch_first:
                input = input.transpose(0, 1)
        return input


class _OneState(_Fused):
    """RNN and GRU: one state tensor, hx [L*D, B, H]."""

    def _forward(self, input: Tensor, hx: Optional[Tensor], batch_sizes: Optional[Tensor],
                 sorted_indices: Optional[Tensor], max_batch_size: int,
                 is_batched: bool) -> Tuple[Tensor, Tensor]:
        # The input handling mirrors torch.nn.RNN.forward and torch.nn.GRU.forward, so
        # that shapes, defaults and error messages are the same.
        num_directions = 2 if self.bidirectional else 1
        batch_dim = 0 if self.batch_first else 1
        if batch_sizes is None:
            if not is_batched:
                input = input.unsqueeze(batch_dim)
                if hx is not None:
                    if hx.dim() != 2:
                        raise RuntimeError(
                            f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor"
                        )
                    hx = hx.unsqueeze(1)
            elif hx is not None and hx.dim() != 3:
                raise RuntimeError(
                    f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor"
                )
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
        if hx is None:
            shape = (self.num_layers * num_directions, max_batch_size, self.hidden_size)
            if torch.jit.is_scripting():
                hx = torch.zeros(shape, dtype=input.dtype, device=input.device)
            else:
                hx = _zeros(shape, input)
        else:
            hx = self.permute_hidden(hx, sorted_indices)
        self.check_input(input, batch_sizes)
        expected_hidden_size = (self.num_layers * num_directions, max_batch_size, self.hidden_size)
        if not torch.jit.is_scripting() and torch.compiler.is_compiling() and batch_sizes is not None:
            # max_batch_size may be data-dependent here: assert instead of guarding.
            _check_hidden_size_compiling(hx, expected_hidden_size)
        else:
            self.check_hidden_size(hx, expected_hidden_size)
        output, hidden = self._op(self._time_major(input, batch_sizes), hx, batch_sizes)
        if batch_sizes is None:
            if self.batch_first:
                output = output.transpose(0, 1)
            if not is_batched:
                output = output.squeeze(batch_dim)
                hidden = hidden.squeeze(1)
        return output, hidden


class RNN(_OneState):
    __doc__ = (
        "Drop-in replacement for :class:`torch.nn.RNN`, computed by fastrnn's fused kernels.\n\n"
        "Same constructor, parameters, inputs and outputs as torch.nn.RNN:\n\n" + (nn.RNN.__doc__ or "")
    )

    def __init__(self, *args, **kwargs):
        # torch.nn.RNN's constructor: the same positional order and errors.
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        modes = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}
        if self.nonlinearity not in modes:
            raise ValueError(
                f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        super().__init__(modes[self.nonlinearity], *args, **kwargs)

    # TorchScript compiles forward once per overload, and the overloads must be
    # declared in the class that defines forward: each module has its own.
    @overload
    @torch._jit_internal._overload_method
    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        pass

    @overload
    @torch._jit_internal._overload_method
    def forward(self, input: PackedSequence,
                hx: Optional[Tensor] = None) -> Tuple[PackedSequence, Tensor]:
        pass

    def forward(self, input, hx=None):
        if not torch.compiler.is_compiling():
            self._update_flat_weights()
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            output, hidden = self._forward(data, hx, batch_sizes, sorted_indices,
                                           _packed_batch(batch_sizes, sorted_indices), True)
            return (PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices),
                    self.permute_hidden(hidden, unsorted_indices))
        if input.dim() not in (2, 3):
            raise ValueError(f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
        return self._forward(input, hx, None, None, 0, input.dim() == 3)

    def _op(self, input: Tensor, hx: Tensor, batch_sizes: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """input: time-major [T, B, I] or packed [N, I]; hx: [L * D, B, H]."""
        if torch.jit.is_scripting():  # the same op call; the op checks devices and dtypes
            output, h_n, _ = torch.ops.fastrnn.rnn(
                input, hx, self._flat_weights, self.bias, self.num_layers, float(self.dropout),
                self.training, self.bidirectional, self.nonlinearity, batch_sizes)
            return output, h_n
        _check_like_torch(input, [hx], self._flat_weights)
        return _op_for("rnn")(input, hx, self._flat_weights, num_layers=self.num_layers,
                              bidirectional=self.bidirectional, nonlinearity=self.nonlinearity,
                              dropout=self.dropout, train=self.training, batch_sizes=batch_sizes)


class GRU(_OneState):
    __doc__ = (
        "Drop-in replacement for :class:`torch.nn.GRU`, computed by fastrnn's fused kernels.\n\n"
        "Same constructor, parameters, inputs and outputs as torch.nn.GRU:\n\n" + (nn.GRU.__doc__ or "")
    )

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)

    @overload
    @torch._jit_internal._overload_method
    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        pass

    @overload
    @torch._jit_internal._overload_method
    def forward(self, input: PackedSequence,
                hx: Optional[Tensor] = None) -> Tuple[PackedSequence, Tensor]:
        pass

    def forward(self, input, hx=None):
        if not torch.compiler.is_compiling():
            self._update_flat_weights()
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            output, hidden = self._forward(data, hx, batch_sizes, sorted_indices,
                                           _packed_batch(batch_sizes, sorted_indices), True)
            return (PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices),
                    self.permute_hidden(hidden, unsorted_indices))
        if input.dim() not in (2, 3):
            raise ValueError(f"GRU: Expected input to be 2D or 3D, got {input.dim()}D instead")
        return self._forward(input, hx, None, None, 0, input.dim() == 3)

    def _op(self, input: Tensor, hx: Tensor, batch_sizes: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        if torch.jit.is_scripting():
            output, h_n, _ = torch.ops.fastrnn.gru(
                input, hx, self._flat_weights, self.bias, self.num_layers, float(self.dropout),
                self.training, self.bidirectional, batch_sizes)
            return output, h_n
        _check_like_torch(input, [hx], self._flat_weights)
        return _op_for("gru")(input, hx, self._flat_weights, num_layers=self.num_layers,
                              bidirectional=self.bidirectional, dropout=self.dropout,
                              train=self.training, batch_sizes=batch_sizes)


class LSTM(_Fused):
    __doc__ = (
        "Drop-in replacement for :class:`torch.nn.LSTM`, computed by fastrnn's fused kernels.\n\n"
        "Same constructor, parameters, inputs and outputs as torch.nn.LSTM:\n\n" + (nn.LSTM.__doc__ or "")
    )

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    # torch.nn.LSTM's own helpers: the cell state's expected size, both states'
    # checks and their permutation.
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    @overload
    @torch._jit_internal._overload_method
    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
                ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        pass

    @overload
    @torch._jit_internal._overload_method
    def forward(self, input: PackedSequence, hx: Optional[Tuple[Tensor, Tensor]] = None
                ) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:
        pass

    def forward(self, input, hx=None):
        if not torch.compiler.is_compiling():
            self._update_flat_weights()
        num_directions = 2 if self.bidirectional else 1
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        orig_input = input
        is_batched = True
        batch_dim = 0 if self.batch_first else 1
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = _packed_batch(batch_sizes, sorted_indices)
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
            if hx is not None:
                if is_batched:
                    if hx[0].dim() != 3 or hx[1].dim() != 3:
                        raise RuntimeError(
                            "For batched 3-D input, hx and cx should also be 3-D but got "
                            f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                        )
                else:
                    if hx[0].dim() != 2 or hx[1].dim() != 2:
                        raise RuntimeError(
                            "For unbatched 2-D input, hx and cx should also be 2-D but got "
                            f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                        )
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        if hx is None:
            h_shape = (self.num_layers * num_directions, max_batch_size, real_hidden_size)
            c_shape = (self.num_layers * num_directions, max_batch_size, self.hidden_size)
            if torch.jit.is_scripting():
                hx = (torch.zeros(h_shape, dtype=input.dtype, device=input.device),
                      torch.zeros(c_shape, dtype=input.dtype, device=input.device))
            else:
                hx = (_zeros(h_shape, input), _zeros(c_shape, input))
        else:
            hx = self.permute_hidden(hx, sorted_indices)
        if not torch.jit.is_scripting() and torch.compiler.is_compiling() and batch_sizes is not None:
            self.check_input(input, batch_sizes)
            _check_hidden_size_compiling(
                hx[0], (self.num_layers * num_directions, max_batch_size, real_hidden_size))
            _check_hidden_size_compiling(
                hx[1], (self.num_layers * num_directions, max_batch_size, self.hidden_size))
        else:
            self.check_forward_args(input, hx, batch_sizes)
        input = self._time_major(input, batch_sizes)
        if torch.jit.is_scripting():
            output, h_n, c_n, _ = torch.ops.fastrnn.lstm(
                input, hx[0], hx[1], self._flat_weights, self.bias, self.num_layers,
                float(self.dropout), self.training, self.bidirectional, batch_sizes)
            hidden = (h_n, c_n)
        else:
            _check_like_torch(input, [hx[0], hx[1]], self._flat_weights)
            output, hidden = _op_for("lstm")(
                input, hx, self._flat_weights, num_layers=self.num_layers,
                bidirectional=self.bidirectional, dropout=self.dropout, train=self.training,
                batch_sizes=batch_sizes)
        if isinstance(orig_input, PackedSequence):
            packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return packed, self.permute_hidden(hidden, unsorted_indices)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return output, hidden


def _refresh_flat_weights(self):
    # torch.nn.RNNBase._update_flat_weights, with a fast path: when every flat weight is still the module's
    # plain parameter of that name (nothing replaced or parametrized), there is nothing
    # to update. torch's version looks every name up through nn.Module.__getattr__, which
    # cost about as much as a small stack's whole forward.
    params = self._parameters
    if len(self._flat_weights) == len(self._flat_weights_names) and all(
            params.get(name) is w for name, w in zip(self._flat_weights_names, self._flat_weights)):
        return
    nn.RNNBase._update_flat_weights(self)


def _packed_batch(batch_sizes: Tensor, sorted_indices: Optional[Tensor]):
    """A packed sequence's batch: batch_sizes[0], but known without reading data when
    the sequence was sorted by pack_*(enforce_sorted=False)."""
    if sorted_indices is not None:
        return sorted_indices.numel()
    if not torch.jit.is_scripting() and torch.jit.is_tracing():
        # A trace records int() as a constant; the tensor keeps h0's batch
        # dynamic (the ONNX exporter rewrites it), as in torch.nn's modules.
        return batch_sizes[0]
    return int(batch_sizes[0])


def _check_like_torch(input: Tensor, states: List[Tensor], weights: List[Tensor]):
    """torch.nn's own errors for what the op would report in its words: devices
    (check_attributes in aten's RNN.cpp, hidden first), then hidden vs weight dtypes
    (which torch.nn reports from its GEMM)."""
    on_cpu = input.is_cpu
    for what, tensors in (("hidden", states), ("parameter", weights)):
        for t in tensors:
            # (is_cpu first: it makes no device objects, which cost several microseconds
            # each right after the kernels of the call before)
            if not (on_cpu and t.is_cpu) and t.device != input.device:
                raise RuntimeError(
                    f"Input and {what} tensors are not at the same device, found input "
                    f"tensor at {input.device} and {what} tensor at {t.device}"
                )
    hx = states[0]
    if hx.dtype != weights[0].dtype and not _autocast_reconciles(hx, weights[0]):
        raise RuntimeError(
            "mat1 and mat2 must have the same dtype, but got "
            f"{_dtype_name(hx.dtype)} and {_dtype_name(weights[0].dtype)}"
        )


def _check_hidden_size_compiling(hx: Tensor, expected_hidden_size):
    torch._check(
        hx.dim() == 3
        and hx.size(0) == expected_hidden_size[0]
        and hx.size(1) == expected_hidden_size[1]
        and hx.size(2) == expected_hidden_size[2],
        lambda: "hx does not have the expected size (num_layers * num_directions, batch, hidden_size)",
    )


def _op_for(name: str):
    """The wrapper of op ``name`` ("rnn", "lstm" or "gru") to call. A model being traced
    (torch.jit.trace) or exported (torch.export) may be torch.onnx.export at work, which
    needs fastrnn.onnx: imported then, and its ONNX operators stated when exporting to ONNX."""
    op = {"rnn": _rnn, "lstm": _lstm, "gru": _gru}[name]
    if torch._C._get_tracing_state() is None and not torch.compiler.is_exporting():
        return op
    from . import onnx  # importing it registers the TorchScript-based exporter's symbolics

    return getattr(onnx, name) if torch.compiler.is_exporting() and onnx.exporting() else op


# torch.nn's modules and their drop-ins.
_DROP_INS = {nn.RNN: RNN, nn.LSTM: LSTM, nn.GRU: GRU}


def convert(module: nn.Module) -> nn.Module:
    """Turns every torch.nn.RNN, torch.nn.LSTM and torch.nn.GRU inside ``module``
    (``module`` itself included) into fastrnn's drop-in, in place, and returns
    ``module``.

    The converted modules keep their identity, parameters (the same Parameter
    objects, so optimizers and hooks keep working), buffers and settings; only
    the forward computation changes. Subclasses of torch.nn's modules are left
    alone, as their forward may differ.
    """
    for sub in module.modules():
        drop_in = _DROP_INS.get(type(sub))
        if drop_in is not None:
            sub.__class__ = drop_in
    return module


def revert(module: nn.Module) -> nn.Module:
    """The inverse of :func:`convert`: turns every fastrnn.RNN, LSTM and GRU inside
    ``module`` (``module`` itself included) back into torch.nn's module, in place,
    and returns ``module``, for tools that know torch.nn's modules only.

    As with convert, the modules keep their identity, parameters (the same
    Parameter objects), buffers and settings. Subclasses are left alone.
    """
    originals = {drop_in: original for original, drop_in in _DROP_INS.items()}
    for sub in module.modules():
        original = originals.get(type(sub))
        if original is not None:
            sub.__class__ = original
    return module
