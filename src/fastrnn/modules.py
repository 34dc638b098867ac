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

import warnings
from typing import Optional, Tuple, overload

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .ops import rnn as _rnn

# c10's names of the dtypes, as torch's own messages spell them.
_C10_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16",
              torch.float16: "Half"}


def _dtype_name(dtype):
    return _C10_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _autocast_reconciles(a: Tensor, b: Tensor) -> bool:
    """Whether autocast casts both to one dtype (as it does for torch.nn.RNN's GEMMs),
    so that different dtypes are no error."""
    eligible = (torch.float32, torch.float16, torch.bfloat16)
    return (
        a.device.type == b.device.type
        and torch.is_autocast_enabled(a.device.type)
        and a.dtype in eligible
        and b.dtype in eligible
    )


class RNN(nn.RNNBase):
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

    def _get_name(self):
        # print(model) tells a converted model from the original.
        return "fastrnn.RNN"

    def __prepare_scriptable__(self):
        # torch.jit.script calls this. A scripted model may go on to the
        # TorchScript-based ONNX exporter, which needs fastrnn::rnn's symbolic.
        from . import onnx  # noqa: F401

        return self

    # TorchScript compiles forward once per overload, as for torch.nn.RNN.
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
        # The input handling mirrors torch.nn.RNN.forward so that shapes,
        # defaults and error messages are the same.
        if not torch.compiler.is_compiling():
            self._update_flat_weights()
        num_directions = 2 if self.bidirectional else 1
        orig_input = input
        is_batched = True
        batch_dim = 0 if self.batch_first else 1

        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            # The same number as batch_sizes[0], but known without reading data
            # when the sequence was sorted by pack_*(enforce_sorted=False).
            if sorted_indices is not None:
                max_batch_size = sorted_indices.numel()
            elif not torch.jit.is_scripting() and torch.jit.is_tracing():
                # A trace records int() as a constant; the tensor keeps h0's batch
                # dynamic (the ONNX exporter rewrites it), as in torch.nn.RNN.
                max_batch_size = batch_sizes[0]
            else:
                max_batch_size = int(batch_sizes[0])
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead"
                )
            is_batched = input.dim() == 3
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
            hx = torch.zeros(
                self.num_layers * num_directions,
                max_batch_size,
                self.hidden_size,
                dtype=input.dtype,
                device=input.device,
            )
        else:
            hx = self.permute_hidden(hx, sorted_indices)
        self.check_input(input, batch_sizes)
        expected_hidden_size = (self.num_layers * num_directions, max_batch_size, self.hidden_size)
        if not torch.jit.is_scripting() and torch.compiler.is_compiling() and batch_sizes is not None:
            # max_batch_size may be data-dependent here: assert instead of guarding.
            _check_hidden_size_compiling(hx, expected_hidden_size)
        else:
            self.check_hidden_size(hx, expected_hidden_size)

        if batch_sizes is None:
            if input.size(1 if self.batch_first else 0) == 0:
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
            if self.batch_first:
                input = input.transpose(0, 1)
        if torch.jit.is_scripting():
            output, hidden = self._run_scripted(input, hx, batch_sizes)
        else:
            output, hidden = self._run_layers(input, hx, batch_sizes)

        if isinstance(orig_input, PackedSequence):
            packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return packed, self.permute_hidden(hidden, unsorted_indices)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = hidden.squeeze(1)
        return output, hidden

    def _run_layers(self, input: Tensor, hx: Tensor, batch_sizes: Optional[Tensor]):
        """input: time-major [T, B, I] or packed [N, I]; hx: [L * D, B, H]."""
        weights = self._flat_weights
        # torch.nn.RNN's device checks (check_attributes in aten's RNN.cpp), hidden first.
        for what, tensors in (("hidden", [hx]), ("parameter", weights)):
            for t in tensors:
                if t.device != input.device:
                    raise RuntimeError(
                        f"Input and {what} tensors are not at the same device, found input "
                        f"tensor at {input.device} and {what} tensor at {t.device}"
                    )
        if hx.dtype != weights[0].dtype and not _autocast_reconciles(hx, weights[0]):
            # torch.nn.RNN reports this from its GEMM: the same words.
            raise RuntimeError(
                "mat1 and mat2 must have the same dtype, but got "
                f"{_dtype_name(hx.dtype)} and {_dtype_name(weights[0].dtype)}"
            )
        rnn = _rnn
        if torch._C._get_tracing_state() is not None or torch.compiler.is_exporting():
            rnn = _recording_rnn()
        return rnn(input, hx, weights, num_layers=self.num_layers,
                   bidirectional=self.bidirectional, nonlinearity=self.nonlinearity,
                   dropout=self.dropout, train=self.training, batch_sizes=batch_sizes)

    def _run_scripted(self, input: Tensor, hx: Tensor,
                      batch_sizes: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """_run_layers under TorchScript: the same op call; the op checks devices and dtypes."""
        output, h_n, _ = torch.ops.fastrnn.rnn(
            input, hx, self._flat_weights, self.bias, self.num_layers, float(self.dropout),
            self.training, self.bidirectional, self.nonlinearity, batch_sizes)
        return output, h_n


def _check_hidden_size_compiling(hx: Tensor, expected_hidden_size):
    torch._check(
        hx.dim() == 3
        and hx.size(0) == expected_hidden_size[0]
        and hx.size(1) == expected_hidden_size[1]
        and hx.size(2) == expected_hidden_size[2],
        lambda: "hx does not have the expected size (num_layers * num_directions, batch, hidden_size)",
    )


def _recording_rnn():
    """The op's wrapper for a model being traced (torch.jit.trace) or exported
    (torch.export): either may be torch.onnx.export at work, which needs fastrnn.onnx."""
    from . import onnx  # importing it registers the TorchScript-based exporter's symbolic

    if torch.compiler.is_exporting() and onnx.exporting():
        return onnx.rnn
    return _rnn


def convert(module: nn.Module) -> nn.Module:
    """Turns every torch.nn.RNN inside ``module`` (``module`` itself included) into a
    fastrnn.RNN, in place, and returns ``module``.

    The converted modules keep their identity, parameters (the same Parameter
    objects, so optimizers and hooks keep working), buffers and settings; only
    the forward computation changes. Subclasses of torch.nn.RNN other than
    fastrnn.RNN are left alone, as their forward may differ. Recurrent modules
    fastrnn has no kernels for (torch.nn.LSTM, torch.nn.GRU) stay as they are,
    with a warning naming them.
    """
    skipped = []
    for name, sub in module.named_modules():
        if type(sub) is nn.RNN:
            sub.__class__ = RNN
        elif isinstance(sub, (nn.LSTM, nn.GRU)):
            skipped.append(f"{name or 'the module itself'} ({type(sub).__name__})")
    if skipped:
        warnings.warn("fastrnn.convert left these as they are (fastrnn converts torch.nn.RNN "
                      "only): " + ", ".join(skipped), stacklevel=2)
    return module


def revert(module: nn.Module) -> nn.Module:
    """The inverse of :func:`convert`: turns every fastrnn.RNN inside ``module``
    (``module`` itself included) back into a torch.nn.RNN, in place, and returns
    ``module``, for tools that know torch.nn.RNN only.

    As with convert, the modules keep their identity, parameters (the same
    Parameter objects), buffers and settings. Subclasses of fastrnn.RNN are left alone.
    """
    for sub in module.modules():
        if type(sub) is RNN:
            sub.__class__ = nn.RNN
    return module
