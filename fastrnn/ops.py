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
    if input.is_cuda and not _loader.cuda_loaded:
        raise RuntimeError(
            "fastrnn was built without CUDA kernels, so it cannot run on CUDA tensors; "
            f"rebuild with a CUDA toolkit present (FASTRNN_CUDA=1): {_loader.REBUILD}"
        )
    return _ops.elman_forward(
        input, hx, weight_ih, weight_hh, bias_ih, bias_hh, batch_sizes, relu, reverse
    )


@torch.library.register_fake("fastrnn::elman_forward")
def _forward_fake(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, batch_sizes, relu, reverse):
    torch._check(input.dim() == (2 if batch_sizes is not None else 3), lambda: "bad input rank")
    hidden = weight_hh.shape[0]
    output = input.new_empty((*input.shape[:-1], hidden))
    return output, hx.new_empty(hx.shape)


@torch.library.register_fake("fastrnn::elman_backward")
def _backward_fake(
    grad_output, grad_h_n, input, hx, weight_ih, weight_hh, output, batch_sizes,
    relu, reverse, need_input_grad, need_weight_grad, need_bias_grad,
):
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
