"""The fastrnn math in plain PyTorch: readable documentation, the tests' second opinion, and
what fastrnn/ops.py runs where the ops have no formula (double backward on a GPU,
forward-mode AD, gradients of gradients inside torch.func).

``rnn_reference`` has the contract of ``fastrnn.rnn`` (csrc/ops.h): a whole stack,
padded [T, B, I] or packed [N, I] + batch_sizes input, the flat weights of
torch.nn.RNN; ``lstm_reference`` and ``gru_reference`` those of ``fastrnn.lstm``
and ``fastrnn.gru``. Each layer and direction runs the cell's step function
(``elman_cell``, ``lstm_cell``, ``gru_cell``) over the sequence. All are
differentiable by autograd (to any order) and batchable by vmap, and slow.
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def elman_cell(x_proj, h, c, weight_hh, bias_hh, weight_hr, nonlinearity="tanh"):
    """One Elman step: x_proj = x W_ih^T + b_ih for the step's rows."""
    act = {"tanh": torch.tanh, "relu": torch.relu}[nonlinearity]
    a = x_proj + h @ weight_hh.t()
    return act(a if bias_hh is None else a + bias_hh), None


def lstm_cell(x_proj, h, c, weight_hh, bias_hh, weight_hr, nonlinearity=None):
    """One LSTM step (gates i f g o); with weight_hr, h is projected."""
    a = x_proj + h @ weight_hh.t()
    if bias_hh is not None:
        a = a + bias_hh
    i, f, g, o = a.chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return (h if weight_hr is None else h @ weight_hr.t()), c


def gru_cell(x_proj, h, c, weight_hh, bias_hh, weight_hr, nonlinearity=None):
    """One GRU step (gates r z n): n = tanh(x_n + r (h W_hn^T + b_hn))."""
    hg = h @ weight_hh.t()
    if bias_hh is not None:
        hg = hg + bias_hh
    xr, xz, xn = x_proj.chunk(3, 1)
    hr, hz, hn = hg.chunk(3, 1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h, None


def layer_reference(
    cell,
    input: Tensor,
    hx: Tensor,
    cx: Optional[Tensor],
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    weight_hr: Optional[Tensor] = None,
    batch_sizes: Optional[Tensor] = None,
    *,
    reverse: bool = False,
    nonlinearity: str = "tanh",
):
    """One layer, one direction of ``cell``: (output [T, B, R] or [N, R], h_n, c_n)."""
    if batch_sizes is None:
        steps, batch = input.shape[0], input.shape[1]
        sizes = [batch] * steps
        rows = input.reshape(steps * batch, input.shape[-1])
    else:
        sizes = [int(b) for b in batch_sizes]
        rows = input
    offsets = [sum(sizes[:t]) for t in range(len(sizes))]
    proj = rows @ weight_ih.t()  # every row's input projection at once
    if bias_ih is not None:
        proj = proj + bias_ih

    # h[b], c[b]: sequence b's latest state; rows past a sequence's end keep it.
    h, c = hx, cx
    outputs: List[Optional[Tensor]] = [None] * len(sizes)
    order = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    for t in order:
        n = sizes[t]
        h_t, c_t = cell(proj[offsets[t] : offsets[t] + n], h[:n], None if c is None else c[:n],
                        weight_hh, bias_hh, weight_hr, nonlinearity)
        outputs[t] = h_t
        h = torch.cat([h_t, h[n:]], 0)
        if c is not None:
            c = torch.cat([c_t, c[n:]], 0)
    output = torch.cat(outputs, 0) if outputs else rows.new_zeros(0, hx.shape[-1])
    if batch_sizes is None:
        output = output.reshape(len(sizes), hx.shape[0], hx.shape[-1])
    return output, h, c


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
    """One Elman layer, one direction: (output [T, B, H] or [N, H], h_n [B, H])."""
    output, h, _ = layer_reference(elman_cell, input, hx, None, weight_ih, weight_hh, bias_ih,
                                   bias_hh, None, batch_sizes, reverse=reverse,
                                   nonlinearity=nonlinearity)
    return output, h


def _stack_reference(cell, input, hx, cx, weights, num_layers, bidirectional, nonlinearity,
                     batch_sizes, dropout_masks):
    dirs = 2 if bidirectional else 1
    per_cell = len(weights) // (num_layers * dirs)
    has_biases = per_cell in (4, 5)
    layer_input = input
    h_n, c_n = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            w = list(weights[k * per_cell : (k + 1) * per_cell])
            b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
            w_hr = w[-1] if per_cell in (3, 5) else None
            out, h, c = layer_reference(cell, layer_input, hx[k], None if cx is None else cx[k],
                                        w[0], w[1], b_ih, b_hh, w_hr, batch_sizes,
                                        reverse=d == 1, nonlinearity=nonlinearity)
            outs.append(out)
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outs, -1) if dirs == 2 else outs[0]
        if layer < len(dropout_masks):
            layer_input = layer_input * dropout_masks[layer]
    return layer_input, torch.stack(h_n, 0), (None if cx is None else torch.stack(c_n, 0))


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
    """A whole Elman stack: (output, h_n [num_layers * D, B, H]).

    ``weights`` is torch.nn.RNN's ``_flat_weights``; ``dropout_masks[l]`` (0 or
    1/(1-p), shaped like layer l's output) multiplies layer l's output before
    layer l+1 reads it, standing in for dropout's random draw.
    """
    output, h_n, _ = _stack_reference(elman_cell, input, hx, None, weights, num_layers,
                                      bidirectional, nonlinearity, batch_sizes, dropout_masks)
    return output, h_n


def lstm_reference(input, hx, weights, *, num_layers=1, bidirectional=False, batch_sizes=None,
                   dropout_masks=()):
    """A whole LSTM stack, hx = (h0, c0): (output, (h_n, c_n)), as rnn_reference."""
    output, h_n, c_n = _stack_reference(lstm_cell, input, hx[0], hx[1], weights, num_layers,
                                        bidirectional, None, batch_sizes, dropout_masks)
    return output, (h_n, c_n)


def gru_reference(input, hx, weights, *, num_layers=1, bidirectional=False, batch_sizes=None,
                  dropout_masks=()):
    """A whole GRU stack: (output, h_n), as rnn_reference."""
    output, h_n, _ = _stack_reference(gru_cell, input, hx, None, weights, num_layers,
                                      bidirectional, None, batch_sizes, dropout_masks)
    return output, h_n
