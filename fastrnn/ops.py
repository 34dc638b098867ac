"""Python side of the fastrnn ops: a typed wrapper, shapes for tracing
(register_fake), autograd (register_autograd) and autocast. The ops, their
contracts and every argument check are in csrc/ (ops.h, checks.h).
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _loader

_ops = torch.ops.fastrnn


def rnn(
    input: Tensor,
    hx: Tensor,
    weights: Sequence[Tensor],
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    nonlinearity: str = "tanh",
    dropout: float = 0.0,
    train: bool = False,
    batch_sizes: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """A whole Elman RNN stack over a whole sequence, in one op call.

    input: [T, B, I] time-major, or packed [N, I] rows with ``batch_sizes`` [T]
    (the layout of PackedSequence.data); hx: [num_layers * D, B, H];
    weights: torch.nn.RNN's ``_flat_weights`` (per layer and direction
    weight_ih, weight_hh and, if any, bias_ih, bias_hh). ``dropout`` applies
    between layers when ``train``. Returns (output [T, B, D*H] or [N, D*H],
    h_n [num_layers * D, B, H]).
    """
    if isinstance(input, Tensor) and input.is_cuda and not _loader.cuda_loaded:
        raise RuntimeError(
            "fastrnn was built without CUDA kernels, so it cannot run on CUDA tensors; "
            f"rebuild with a CUDA toolkit present (FASTRNN_CUDA=1): {_loader.REBUILD}"
        )
    directions = 2 if bidirectional else 1
    has_biases = len(weights) != num_layers * directions * 2
    output, h_n, _ = _ops.rnn(input, hx, list(weights), has_biases, num_layers, dropout, train,
                              bidirectional, nonlinearity, batch_sizes)
    return output, h_n


# Fake kernels: output shapes for meta tensors and tracing (torch.compile,
# torch.export). The device kernels own the argument checks and their
# messages; the few checks here are the ones a shape computation needs, and
# the device check: with one meta tensor among CPU tensors the Meta key wins
# dispatch, and returning meta "results" for CPU inputs would be wrong (nor
# may batch_sizes be a meta tensor: CPU "results" of garbage).
def _weight_names(count, has_biases, bidirectional):
    """The flat weights' names as csrc/checks.h (param_name) gives them: weight_ih_l0, ..."""
    per_cell, directions = (4 if has_biases else 2), (2 if bidirectional else 1)
    kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    return [f"{kinds[i % per_cell]}_l{i // per_cell // directions}"
            f"{'_reverse' if i // per_cell % directions else ''}" for i in range(count)]


def _check_devices(op, input, named, batch_sizes):
    """named: (name, tensor) pairs. The device kernels' messages (csrc/checks.h)."""
    for name, t in named:
        if t.device != input.device:
            raise RuntimeError(f"{op}: {name} must be on the same device as input")
    if batch_sizes is not None and batch_sizes.device.type != "cpu":
        raise RuntimeError(f"{op}: batch_sizes must be a 1-D int64 CPU tensor")


def _reserve_size(input, hx, weights, num_layers, dropout, train, bidirectional):
    directions = 2 if bidirectional else 1
    rows = input.shape[0] if input.dim() == 2 else input.shape[0] * input.shape[1]
    dropped = train and dropout > 0 and num_layers > 1
    return (num_layers - 1) * rows * directions * hx.shape[2] * (2 if dropped else 1)


@torch.library.register_fake("fastrnn::rnn")
def _rnn_fake(input, hx, weights, has_biases, num_layers, dropout, train, bidirectional,
              nonlinearity, batch_sizes):
    _check_devices("fastrnn::rnn", input,
                   [("hx", hx), *zip(_weight_names(len(weights), has_biases, bidirectional), weights)],
                   batch_sizes)
    if hx.dim() != 3:
        raise RuntimeError(f"fastrnn::rnn: hx must be 3-D [L*D, B, H], got {hx.dim()}-D")
    width = (2 if bidirectional else 1) * hx.shape[2]
    output = input.new_empty((*input.shape[:-1], width))
    reserve = input.new_empty(
        _reserve_size(input, hx, weights, num_layers, dropout, train, bidirectional))
    return output, hx.new_empty(hx.shape), reserve


@torch.library.register_fake("fastrnn::rnn_backward")
def _rnn_backward_fake(input, hx, weights, has_biases, num_layers, dropout, train, bidirectional,
                       nonlinearity, batch_sizes, output, reserve, grad_output, grad_h_n,
                       need_input_grad, need_weight_grad):
    _check_devices("fastrnn::rnn_backward", input,
                   [("hx", hx), *zip(_weight_names(len(weights), has_biases, bidirectional), weights),
                    ("output", output), ("reserve", reserve), ("grad_output", grad_output),
                    ("grad_h_n", grad_h_n)],
                   batch_sizes)
    grad_input = input.new_empty(input.shape if need_input_grad else (0,))
    grad_weights = [w.new_empty(w.shape if need_weight_grad else (0,)) for w in weights]
    return grad_input, hx.new_empty(hx.shape), grad_weights


# Autograd: one rnn_backward call for the whole stack.
_CONFIG = slice(3, 9)  # has_biases .. nonlinearity: the arguments besides tensors


def _setup_context(ctx, inputs, output):
    input, hx, weights, *_, batch_sizes = inputs
    out, _, reserve = output
    ctx.config = inputs[_CONFIG]
    ctx.num_weights = len(weights)
    ctx.save_for_backward(input, hx, batch_sizes, out, reserve, *weights)
    ctx.mark_non_differentiable(reserve)


def _backward(ctx, grad_output, grad_h_n, _grad_reserve):
    input, hx, batch_sizes, out, reserve, *weights = ctx.saved_tensors
    need_input, need_hx, need_weights = ctx.needs_input_grad[:3]
    if grad_output is None:
        grad_output = torch.zeros_like(out)
    if grad_h_n is None:
        grad_h_n = torch.zeros_like(hx)
    grad_input, grad_hx, grad_weights = _ops.rnn_backward(
        input, hx, weights, *ctx.config, batch_sizes, out, reserve, grad_output, grad_h_n,
        need_input, any(need_weights))
    return (
        grad_input if need_input else None,
        grad_hx if need_hx else None,
        [g if needed else None for g, needed in zip(grad_weights, need_weights)],
        *([None] * 7),
    )


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "fastrnn: double backward (a gradient of a gradient, e.g. create_graph=True "
        "followed by another backward) is not supported by fastrnn.RNN; use torch.nn.RNN "
        "for higher-order gradients"
    )


torch.library.register_autograd("fastrnn::rnn", _backward, setup_context=_setup_context)
torch.library.register_autograd(
    "fastrnn::rnn_backward", _no_double_backward, setup_context=lambda ctx, inputs, output: None
)


# Autocast. torch.nn.RNN under torch.autocast runs in the autocast dtype (on the
# CPU its GEMMs are autocast ops; on CUDA cudnn's RNN is an autocast op), so its
# output and h_n come out in that dtype. A custom op is not cast by default, and
# torch.library.register_autocast casts to one dtype fixed at registration: this
# kernel reads the current autocast dtype at call time, casts the floating-point
# tensors of the autocast device (float64 excepted, as autocast does) and runs the
# op with autocast off. The casts are recorded by autograd, so float32
# parameters get float32 gradients.
_autocast_lib = torch.library.Library("fastrnn", "IMPL")


def _autocast_kernel(device_type: str):
    def cast(value, dtype):
        if isinstance(value, list):
            return [cast(v, dtype) for v in value]
        if (isinstance(value, Tensor) and value.is_floating_point()
                and value.device.type == device_type and value.dtype != torch.float64):
            return value.to(dtype)
        return value

    def kernel(*args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return _ops.rnn.default(*(cast(a, dtype) for a in args))

    return kernel


for _device_type, _key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
    _autocast_lib.impl("rnn", _autocast_kernel(_device_type), _key)
