"""The fastrnn math in plain PyTorch: readable documentation and the tests' second opinion.

``elman_reference`` has the contract of ``fastrnn.ops.elman`` (csrc/elman.h): one layer,
one direction, padded [T, B, I] or packed [N, I] + batch_sizes input. ``rnn_reference``
runs a whole torch.nn.RNN-shaped stack from its parameters. Both are differentiable
by autograd and slow; nothing in the package calls them.
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
    relu: bool = False,
    reverse: bool = False,
) -> Tuple[Tensor, Tensor]:
    act = torch.relu if relu else torch.tanh
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
    weights: Sequence[Sequence[Tensor]],
    *,
    relu: bool = False,
    bidirectional: bool = False,
    batch_sizes: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """A stack of layers, time-major (or packed) input, hx [L * D, B, H].

    ``weights[layer * D + direction]`` is (w_ih, w_hh[, b_ih, b_hh]) as in
    torch.nn.RNN.all_weights. No dropout.
    """
    dirs = 2 if bidirectional else 1
    layer_input = input
    h_n = []
    for layer in range(len(weights) // dirs):
        outs = []
        for d in range(dirs):
            w = list(weights[layer * dirs + d]) + [None, None]
            out, h = elman_reference(
                layer_input, hx[layer * dirs + d], w[0], w[1], w[2], w[3], batch_sizes,
                relu=relu, reverse=d == 1,
            )
            outs.append(out)
            h_n.append(h)
        layer_input = torch.cat(outs, -1) if dirs == 2 else outs[0]
    return layer_input, torch.stack(h_n, 0)
