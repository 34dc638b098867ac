"""ONNX export of fastrnn.RNN: each layer becomes one ONNX ``RNN`` operator.

Imported by fastrnn.RNN only when a model holding it is traced, exported or
scripted (torch.onnx and the onnx package are never needed to train or run
fastrnn). Both of torch.onnx.export's exporters are covered, with no argument
from the user:

- TorchScript-based (``dynamo=False``): the model is traced, so the graph holds
  ``fastrnn::rnn`` calls; importing this module registers their symbolic.
- torch.export-based (``dynamo=True``, the default): fastrnn.RNN calls
  :func:`rnn` instead of the op, which states each layer's ONNX ``RNN`` with
  ``torch.onnx.ops.symbolic_multi_out``.

ONNX ``RNN`` (opset >= 7) computes ``H_t = f(X_t W^T + H_{t-1} R^T + Wb + Rb)``
for a layer in both directions at once: ``W`` [D, H, I], ``R`` [D, H, H] and
``B`` [D, 2H] are torch.nn.RNN's weight_ih, weight_hh and (bias_ih, bias_hh)
stacked over the directions, unchanged. Its output is [T, D, B, H] (layout 0,
time major, which every opset has), reshaped to torch's [T, B, D*H]. The
nodes carry no opset of their own: they take the model's, torch.onnx.export's
``opset_version`` (both exporters default to 20 under torch 2.14; the
TorchScript-based one accepts 7 to 20).
"""

from typing import List, Optional, Sequence

import torch
from torch import Tensor

_ACTIVATIONS = {"tanh": "Tanh", "relu": "Relu"}


def exporting() -> bool:
    """Whether torch.onnx.export (either exporter) is running."""
    return torch.onnx.is_in_onnx_export()


def _cells(weights: Sequence[Tensor], num_layers: int, directions: int):
    """torch's flat weights, grouped per layer into per-direction tuples."""
    per_cell = len(weights) // (num_layers * directions)
    cells = [tuple(weights[c * per_cell:(c + 1) * per_cell])
             for c in range(num_layers * directions)]
    return [cells[layer * directions:(layer + 1) * directions] for layer in range(num_layers)]


# torch.export-based exporter ------------------------------------------------


def rnn(
    input: Tensor,
    hx: Tensor,
    weights: List[Tensor],
    *,
    num_layers: int,
    bidirectional: bool,
    nonlinearity: str,
    dropout: float,
    train: bool,
    batch_sizes: Optional[Tensor],
):
    """fastrnn.ops.rnn's contract, stated as ONNX RNN operators for the
    torch.export-based exporter: input [T, B, I], hx [L*D, B, H]."""
    if batch_sizes is not None:
        # torch.export cannot trace pack_padded_sequence (it reads the lengths),
        # for torch.nn.RNN as for fastrnn.RNN.
        raise RuntimeError(
            "fastrnn.RNN: a PackedSequence cannot be exported with torch.onnx.export(..., "
            "dynamo=True), nor can torch.nn.RNN's; export with dynamo=False (packed input "
            "becomes the RNN operators' sequence_lens) or pass padded input")
    directions = 2 if bidirectional else 1
    steps, batch = input.shape[0], input.shape[1]
    hidden = weights[1].shape[1]
    attrs = {
        "hidden_size": hidden,
        "activations": [_ACTIVATIONS[nonlinearity]] * directions,
        "direction": "bidirectional" if bidirectional else "forward",
    }
    x = input
    h_n = []
    for layer, cells in enumerate(_cells(weights, num_layers, directions)):
        if layer > 0 and train and dropout > 0:
            x = torch.nn.functional.dropout(x, dropout, training=True)
        w = torch.stack([c[0] for c in cells])
        r = torch.stack([c[1] for c in cells])
        b = torch.stack([torch.cat([c[2], c[3]]) for c in cells]) if len(cells[0]) == 4 else None
        h0 = hx[layer * directions:(layer + 1) * directions]
        y, h = torch.onnx.ops.symbolic_multi_out(
            "RNN", [x, w, r, b, None, h0], attrs,
            dtypes=[x.dtype, x.dtype],
            shapes=[[steps, directions, batch, hidden], [directions, batch, hidden]],
        )
        x = y.permute(0, 2, 1, 3).reshape(steps, batch, directions * hidden)
        h_n.append(h)
    return x, torch.cat(h_n) if num_layers > 1 else h_n[0]


# TorchScript-based exporter --------------------------------------------------


def _rnn_symbolic(g, input, hx, weights, has_biases, num_layers, dropout, train, bidirectional,
                  nonlinearity, batch_sizes):
    """fastrnn::rnn -> one ONNX RNN per layer. The nodes around each RNN are
    the ones torch emits for torch.nn.RNN (Squeeze, or Transpose + Reshape when
    bidirectional), so that the exporter's PackedSequence pass, which moves
    packing past RNN nodes and turns batch_sizes into sequence_lens, applies."""
    from torch.onnx import symbolic_helper as sh

    if dropout and train:
        return sh._unimplemented("fastrnn::rnn", "dropout in training mode", input)
    directions = 2 if bidirectional else 1
    weights = sh._unpack_list(weights)
    hidden = sh._get_tensor_dim_size(weights[1], 1)
    if hidden is None:
        return sh._unimplemented("fastrnn::rnn", "unknown hidden size", input)
    if batch_sizes is None or sh._is_none(batch_sizes):
        sequence_lens = g.op("prim::Constant")
        sequence_lens.setType(torch._C.OptionalType.ofTensor())
    else:
        sequence_lens = batch_sizes
    none = g.op("prim::Constant")
    none.setType(torch._C.OptionalType.ofTensor())

    def stacked(tensors):
        parts = [sh._unsqueeze_helper(g, t, [0]) for t in tensors]
        return parts[0] if len(parts) == 1 else g.op("Concat", *parts, axis_i=0)

    x = input
    h_n = []
    for layer, cells in enumerate(_cells(weights, num_layers, directions)):
        w = stacked([c[0] for c in cells])
        r = stacked([c[1] for c in cells])
        b = stacked([g.op("Concat", c[2], c[3], axis_i=0) for c in cells]) if has_biases else none
        h0 = hx if num_layers == 1 else sh._slice_helper(
            g, hx, axes=[0], starts=[layer * directions], ends=[(layer + 1) * directions])
        kwargs = {"direction_s": "bidirectional"} if bidirectional else {}
        y, h = g.op("RNN", x, w, r, b, sequence_lens, h0, outputs=2, hidden_size_i=hidden,
                    activations_s=[_ACTIVATIONS[nonlinearity]] * directions, **kwargs)
        if bidirectional:
            y = g.op("Transpose", y, perm_i=[0, 2, 1, 3])
            x = sh._reshape_helper(g, y, g.op("Constant", value_t=torch.LongTensor([0, 0, -1])),
                                   allowzero=0)
        else:
            x = sh._squeeze_helper(g, y, [1])
        h_n.append(h)
    h_n = h_n[0] if num_layers == 1 else g.op("Concat", *h_n, axis_i=0)
    # The reserve output only feeds backward; an empty constant stands in for it.
    return x, h_n, g.op("Constant", value_t=torch.zeros(0))


def _register_symbolic():
    from torch.onnx import register_custom_op_symbolic, symbolic_helper as sh

    symbolic = sh.parse_args("v", "v", "v", "b", "i", "f", "b", "b", "s", "v")(_rnn_symbolic)
    # The exporter looks a symbolic up at the highest registered opset <= the
    # target for targets >= 9, but for targets 7 and 8 only among opsets
    # target..9: these three serve every opset it exports to (7 to 20).
    for opset in (7, 8, 9):
        register_custom_op_symbolic("fastrnn::rnn", symbolic, opset)


_register_symbolic()
