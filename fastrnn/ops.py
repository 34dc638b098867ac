"""Python side of the fastrnn ops: shapes for tracing (register_fake), autograd
(register_autograd) and a typed wrapper. The ops themselves and their
contracts are in csrc/elman.h.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _loader

_ops = torch.ops.fastrnn


def elman(
    input: Tensor,
    hx: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    batch_sizes: Optional[Tensor] = None,
    *,
    relu: bool = False,
    reverse: bool = False,
) -> Tuple[Tensor, Tensor]:
    """One layer, one direction of an Elman RNN over a whole sequence.

    input: [T, B, I] time-major, or packed [N, I] rows with ``batch_sizes`` [T]
    (the layout of PackedSequence.data); hx: [B, H]; weight_ih: [H, I];
    weight_hh: [H, H]; biases: [H] or None. Returns (output [T, B, H] or [N, H], h_n [B, H]).
    ``reverse`` runs the sequence from its end (the backward direction).
    """
    if isinstance(input, Tensor) and input.is_cuda and not _loader.cuda_loaded:
        raise RuntimeError(
            "fastrnn was built without CUDA kernels, so it cannot run on CUDA tensors; "
            f"rebuild with a CUDA toolkit present (FASTRNN_CUDA=1): {_loader.REBUILD}"
        )
    return _ops.elman_forward(
        input, hx, weight_ih, weight_hh, bias_ih, bias_hh, batch_sizes, relu, reverse
    )


# The device kernels check every argument (csrc/elman_driver.h). The fake
# kernels below run instead of them for meta tensors, under torch.compile, and
# whenever one argument is a meta tensor (the Meta key outranks CPU/CUDA, so a
# CPU op with one meta argument lands here), so they make the same checks, with
# the same messages, on everything but batch_sizes' values. Without them, a
# meta hx or weight next to CPU tensors gave uninitialised CPU "results".
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_C10_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16",
              torch.float16: "Half"}


def _dtype_name(dtype):
    return _C10_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _check_same(op, name, t, input):
    if t.device != input.device:
        raise RuntimeError(f"{op}: {name} must be on the same device as input")
    if t.dtype != input.dtype:
        raise RuntimeError(
            f"{op}: {name} must have the same dtype as input ({_dtype_name(input.dtype)}), "
            f"got {_dtype_name(t.dtype)}"
        )


def _check_shape(op, name, t, expected):
    def message():
        return (f"{op}: {name} must have shape [{', '.join(map(str, expected))}], "
                f"got [{', '.join(map(str, t.shape))}]")

    if t.dim() != len(expected):
        raise RuntimeError(message())
    for size, want in zip(t.shape, expected):
        torch._check(size == want, message)  # symbolic sizes: an assertion, not a guard


def _check_defined(op, **tensors):
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise RuntimeError(f"{op}: {name} must be a tensor, got None")


def _check_args(op, input, hx, weight_ih, weight_hh, batch_sizes):
    """The checks of check_and_layout (elman_driver.h) that need no data."""
    packed = batch_sizes is not None
    _check_defined(op, input=input, hx=hx, weight_ih=weight_ih, weight_hh=weight_hh)
    if input.dtype not in _SUPPORTED_DTYPES:
        raise RuntimeError(
            f"{op}: input dtype {_dtype_name(input.dtype)} is not supported on "
            f"{input.device.type}"
        )
    if input.dim() != (2 if packed else 3):
        want = ("2-D [N, I] when batch_sizes is given" if packed
                else "3-D [T, B, I] when batch_sizes is None")
        raise RuntimeError(f"{op}: input must be {want}, got {input.dim()}-D")
    if hx.dim() != 2:
        raise RuntimeError(f"{op}: hx must be 2-D [B, H], got {hx.dim()}-D")
    if weight_hh.dim() != 2:
        raise RuntimeError(f"{op}: weight_hh must be 2-D [H, H], got {weight_hh.dim()}-D")
    hidden = weight_hh.shape[0]
    _check_shape(op, "weight_hh", weight_hh, (hidden, hidden))
    _check_shape(op, "weight_ih", weight_ih, (hidden, input.shape[-1]))
    for name, t in (("hx", hx), ("weight_ih", weight_ih), ("weight_hh", weight_hh)):
        _check_same(op, name, t, input)
    if packed:
        if batch_sizes.device.type != "cpu" or batch_sizes.dim() != 1 or \
                batch_sizes.dtype != torch.int64:
            raise RuntimeError(f"{op}: batch_sizes must be a 1-D int64 CPU tensor")
        # hx's batch is batch_sizes[0]: data, checked by the device kernel.
        torch._check(hx.shape[1] == hidden, lambda: f"{op}: hx must have shape [B, {hidden}], "
                     f"got [{', '.join(map(str, hx.shape))}]")
    else:
        _check_shape(op, "hx", hx, (input.shape[1], hidden))
    return hidden


@torch.library.register_fake("fastrnn::elman_forward")
def _forward_fake(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, batch_sizes, relu, reverse):
    op = "fastrnn::elman_forward"
    hidden = _check_args(op, input, hx, weight_ih, weight_hh, batch_sizes)
    for name, b in (("bias_ih", bias_ih), ("bias_hh", bias_hh)):
        if b is not None:
            _check_shape(op, name, b, (hidden,))
            _check_same(op, name, b, input)
    output = input.new_empty((*input.shape[:-1], hidden))
    return output, hx.new_empty(hx.shape)


@torch.library.register_fake("fastrnn::elman_backward")
def _backward_fake(
    grad_output, grad_h_n, input, hx, weight_ih, weight_hh, output, batch_sizes,
    relu, reverse, need_input_grad, need_weight_grad, need_bias_grad,
):
    op = "fastrnn::elman_backward"
    hidden = _check_args(op, input, hx, weight_ih, weight_hh, batch_sizes)
    _check_defined(op, grad_output=grad_output, grad_h_n=grad_h_n, output=output)
    out_shape = (*input.shape[:-1], hidden)
    for name, t in (("output", output), ("grad_output", grad_output)):
        if t.dim() != input.dim():
            raise RuntimeError(f"{op}: {name} must be {input.dim()}-D, got {t.dim()}-D")
        for size, want in zip(t.shape, out_shape):
            torch._check(
                size == want,
                lambda: f"{op}: {name} must have the shape of the forward output, got "
                f"[{', '.join(map(str, t.shape))}]",
            )
        _check_same(op, name, t, input)
    _check_shape(op, "grad_h_n", grad_h_n, tuple(hx.shape))
    _check_same(op, "grad_h_n", grad_h_n, input)

    def maybe(needed, like):
        return like.new_empty(like.shape) if needed else input.new_empty(0)

    return (
        maybe(need_input_grad, input),
        hx.new_empty(hx.shape),
        maybe(need_weight_grad, weight_ih),
        maybe(need_weight_grad, weight_hh),
        input.new_empty(weight_hh.shape[0]) if need_bias_grad else input.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    input, hx, weight_ih, weight_hh, bias_ih, bias_hh, batch_sizes, relu, reverse = inputs
    ctx.save_for_backward(input, hx, weight_ih, weight_hh, output[0], batch_sizes)
    ctx.relu = relu
    ctx.reverse = reverse


def _backward(ctx, grad_output, grad_h_n):
    input, hx, weight_ih, weight_hh, output, batch_sizes = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_bias = need[4] or need[5]
    if grad_output is None:
        grad_output = torch.zeros_like(output)
    if grad_h_n is None:
        grad_h_n = torch.zeros_like(hx)
    grad_input, grad_hx, grad_w_ih, grad_w_hh, grad_bias = _ops.elman_backward(
        grad_output, grad_h_n, input, hx, weight_ih, weight_hh, output, batch_sizes,
        ctx.relu, ctx.reverse, need[0], need[2] or need[3], need_bias,
    )
    return (
        grad_input if need[0] else None,
        grad_hx if need[1] else None,
        grad_w_ih if need[2] else None,
        grad_w_hh if need[3] else None,
        grad_bias if need[4] else None,
        grad_bias if need[5] else None,
        None,
        None,
        None,
    )


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "fastrnn: double backward (a gradient of a gradient, e.g. create_graph=True "
        "followed by another backward) is not supported by fastrnn.RNN; use torch.nn.RNN "
        "for higher-order gradients"
    )


torch.library.register_autograd("fastrnn::elman_forward", _backward, setup_context=_setup_context)
torch.library.register_autograd(
    "fastrnn::elman_backward", _no_double_backward, setup_context=lambda ctx, inputs, output: None
)


# Autocast. torch.nn.RNN under torch.autocast runs in the autocast dtype (on the
# CPU its GEMMs are autocast ops; on CUDA cudnn's RNN is an autocast op), so its
# output and h_n come out in that dtype. A custom op is not cast by default: it
# would run, and return, float32. This kernel casts the floating-point inputs of
# the autocast device (float64 excepted, as autocast does) to the current
# autocast dtype, read at call time (torch.library.register_autocast only takes
# a fixed dtype), and runs the op with autocast off. The casts are recorded by
# autograd, so the float32 parameters get float32 gradients.
_autocast_lib = torch.library.Library("fastrnn", "IMPL")


def _register_autocast(device_type: str) -> None:
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)
    op = _ops.elman_forward.default

    def cast(value, dtype):
        if (isinstance(value, Tensor) and value.is_floating_point()
                and value.device.type == device_type and value.dtype != torch.float64):
            return value.to(dtype)
        return value

    def autocast_forward(*args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*(cast(a, dtype) for a in args))

    op.py_kernels.pop(key, None)
    op.py_impl(key)(autocast_forward)  # for the Python dispatcher (tracing)
    _autocast_lib.impl("elman_forward", lambda _keyset, *args: autocast_forward(*args),
                       key_name, with_keyset=True)


for _device_type in ("cpu", "cuda"):
    if torch._C._is_autocast_available(_device_type):
        _register_autocast(_device_type)
