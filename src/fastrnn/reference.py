"""The fastrnn math in plain PyTorch: readable documentation and the tests' second opinion.

``rnn_reference`` has the contract of ``fastrnn.rnn`` (csrc/ops.h): a whole stack,
padded [T, B, I] or packed [N, I] + batch_sizes input, the flat weights of
torch.nn.RNN. ``elman_reference`` is one of its layers in one direction. Both are
differentiable by autograd and slow; nothing in the package calls them.
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def elman_reference(
    input: Tensor,
    hx: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    batch_sizes: Optional[Tensor] = None,
    *,
    nonlinearity: str = "tanh",
    reverse: bool = False,
) -> Tuple[Tensor, Tensor]:
    """One layer, one direction: (output [T, B, H] or [N, H], h_n [B, H])."""
    act = {"tanh": torch.tanh, "relu": torch.relu}[nonlinearity]
    if batch_sizes is None:
        steps, batch = input.shape[0], input.shape[1]
        sizes = [batch] * steps
        rows = input.reshape(steps * batch, input.shape[-1])
    else:
        sizes = [int(b) for b in batch_sizes]
        rows = input
    offsets = [sum(sizes[:t]) for t in range(len(sizes))]

    # P = X W_ih^T + b_ih + b_hh for every row at once.
    proj = rows @ weight_ih.t()
    for b in (bias_ih, bias_hh):
        if b is not None:
            proj = proj + b

    h = hx  # h[b] is sequence b's latest state; rows past a sequence's end keep it
    outputs: List[Optional[Tensor]] = [None] * len(sizes)
    order = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    for t in order:
        n = sizes[t]
        h_t = act(proj[offsets[t] : offsets[t] + n] + h[:n] @ weight_hh.t())
        outputs[t] = h_t
        h = torch.cat([h_t, h[n:]], 0)
    output = torch.cat(outputs, 0) if outputs else rows.new_zeros(0, weight_hh.shape[0])
    if batch_sizes is None:
        output = output.reshape(len(sizes), hx.shape[0], weight_hh.shape[0])
    return output, h


def rnn_reference(
    input: Tensor,
    hx: Tensor,
    weights: Sequence[Tensor],
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    nonlinearity: str = "tanh",
    batch_sizes: Optional[Tensor] = None,
    dropout_masks: Sequence[Tensor] = (),
) -> Tuple[Tensor, Tensor]:
    """A whole stack: (output, h_n [num_layers * D, B, H]).

    ``weights`` is torch.nn.RNN's ``_flat_weights``; ``dropout_masks[l]`` (0 or
    1/(1-p), shaped like layer l's output) multiplies layer l's output before
    layer l+1 reads it, standing in for dropout's random draw.
    """
    dirs = 2 if bidirectional else 1
    per_cell = len(weights) // (num_layers * dirs)
    layer_input = input
    h_n = []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            cell = layer * dirs + d
            w = list(weights[cell * per_cell : (cell + 1) * per_cell]) + [None, None]
            out, h = elman_reference(
                layer_input, hx[cell], w[0], w[1], w[2], w[3], batch_sizes,
                nonlinearity=nonlinearity, reverse=d == 1,
            )
            outs.append(out)
            h_n.append(h)
        layer_input = torch.cat(outs, -1) if dirs == 2 else outs[0]
        if layer < len(dropout_masks):
            layer_input = layer_input * dropout_masks[layer]
    return layer_input, torch.stack(h_n, 0)
