"""ONNX export of fastrnn.RNN, LSTM and GRU: each layer becomes one ONNX ``RNN``,
``LSTM`` or ``GRU`` operator, the ones torch emits for torch.nn's modules.

Imported by fastrnn's modules only when a model holding them is traced, exported
or scripted (torch.onnx and the onnx package are never needed to train or run
fastrnn). Both of torch.onnx.export's exporters are covered, with no argument
from the user:

- TorchScript-based (``dynamo=False``): the model is traced, so the graph holds
  ``fastrnn::rnn`` / ``lstm`` / ``gru`` calls; importing this module registers
  their symbolics.
- torch.export-based (``dynamo=True``, the default): the modules call
  :func:`rnn`, :func:`lstm` and :func:`gru` instead of the ops, which state each
  layer's ONNX operator with ``torch.onnx.ops.symbolic_multi_out``.

An ONNX recurrent operator runs one layer in both directions at once: ``W``
[D, G*H, I], ``R`` [D, G*H, H] and ``B`` [D, 2*G*H] are torch's weight_ih,
weight_hh and (bias_ih, bias_hh) stacked over the directions, with the G gate
blocks of each in ONNX's order (below). Its output is [T, D, B, H] (layout 0,
time major, which every opset has), reshaped to torch's [T, B, D*H]. The nodes
carry no opset of their own: they take the model's, torch.onnx.export's
``opset_version`` (both exporters default to 20 under torch 2.14; the
TorchScript-based one accepts 7 to 20, and RNN, LSTM and GRU with
linear_before_reset exist since 7).
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

_ACTIVATIONS = {"tanh": "Tanh", "relu": "Relu"}

# torch's gate blocks in ONNX's order, as runs of blocks (first, end): torch's
# LSTM is [i, f, g, o] and ONNX's [i, o, f, c]; torch's GRU is [r, z, n] and
# ONNX's [z, r, h]. The default activations of ONNX's LSTM (Sigmoid, Tanh, Tanh)
# and GRU (Sigmoid, Tanh) are torch's; linear_before_reset=1 is torch's GRU, whose
# reset gate multiplies (W_hn h + b_hn), not h.
_GATE_RUNS = {"RNN": None, "LSTM": [(0, 1), (3, 4), (1, 3)], "GRU": [(1, 2), (0, 1), (2, 3)]}
_GATES = {"RNN": 1, "LSTM": 4, "GRU": 3}

_PROJECTION = ("LSTMs with projections (proj_size > 0) cannot be exported to ONNX, whose LSTM "
               "operator has no projection (torch.jit.script and torch.export take them)")


try:
    from torch.onnx._internal.exporter import _flags as _exporter_flags
except ImportError:  # a torch whose exporter keeps its flag elsewhere
    _exporter_flags = None


def exporting() -> bool:
    """Whether torch.onnx.export (either exporter) is running."""
    # torch.onnx.export falls back to torch.export's strict mode when the
    # non-strict one fails, and dynamo folds torch.onnx.is_in_onnx_export() to
    # False there; the exporter's flag behind it, a module global, dynamo reads
    # as it is. Without it the graph would hold fastrnn's ops, which the exporter
    # cannot translate, and an error of ours (proj_size) would be lost among the
    # fallback's.
    return torch.onnx.is_in_onnx_export() or bool(
        getattr(_exporter_flags, "_is_onnx_exporting", False))


def _cells(weights: Sequence, num_layers: int, directions: int):
    """torch's flat weights, grouped per layer into per-direction tuples."""
    per_cell = len(weights) // (num_layers * directions)
    cells = [tuple(weights[c * per_cell:(c + 1) * per_cell])
             for c in range(num_layers * directions)]
    return [cells[layer * directions:(layer + 1) * directions] for layer in range(num_layers)]


def _projected(weights: Sequence, num_layers: int, directions: int) -> bool:
    # weight_hr makes a cell's weights odd: 3 without biases, 5 with them.
    return len(weights) // (num_layers * directions) % 2 == 1


# torch.export-based exporter ------------------------------------------------


def _in_onnx_order(op: str, w: Tensor) -> Tensor:
    runs = _GATE_RUNS[op]
    if runs is None:
        return w
    block = w.shape[0] // _GATES[op]
    return torch.cat([w[first * block:end * block] for first, end in runs])


def _stack(op: str, input: Tensor, states: List[Tensor], weights: List[Tensor],
           num_layers: int, bidirectional: bool, dropout: float, train: bool,
           batch_sizes: Optional[Tensor], attrs: dict):
    """A whole stack as one ONNX ``op`` per layer: input [T, B, I], states
    [L*D, B, H] each. Returns (output [T, B, D*H], final states)."""
    if batch_sizes is not None:
        # torch.export cannot trace pack_padded_sequence (it reads the lengths),
        # for torch.nn's modules as for fastrnn's.
        raise RuntimeError(
            f"fastrnn.{op}: a PackedSequence cannot be exported with torch.onnx.export(..., "
            f"dynamo=True), nor can torch.nn.{op}'s; export with dynamo=False (packed input "
            f"becomes the {op} operators' sequence_lens) or pass padded input")
    directions = 2 if bidirectional else 1
    steps, batch = input.shape[0], input.shape[1]
    hidden = weights[1].shape[1]
    attrs = {"hidden_size": hidden, "direction": "bidirectional" if bidirectional else "forward",
             **attrs}
    x = input
    finals: List[List[Tensor]] = [[] for _ in states]
    for layer, cells in enumerate(_cells(weights, num_layers, directions)):
        if layer > 0 and train and dropout > 0:
            x = torch.nn.functional.dropout(x, dropout, training=True)
        w = torch.stack([_in_onnx_order(op, c[0]) for c in cells])
        r = torch.stack([_in_onnx_order(op, c[1]) for c in cells])
        b = (torch.stack([torch.cat([_in_onnx_order(op, c[2]), _in_onnx_order(op, c[3])])
                          for c in cells]) if len(cells[0]) == 4 else None)
        initial = [s[layer * directions:(layer + 1) * directions] for s in states]
        y, *last = torch.onnx.ops.symbolic_multi_out(
            op, [x, w, r, b, None, *initial], attrs,
            dtypes=[x.dtype] * (1 + len(states)),
            shapes=[[steps, directions, batch, hidden]] + [[directions, batch, hidden]] * len(states),
        )
        x = y.permute(0, 2, 1, 3).reshape(steps, batch, directions * hidden)
        for final, state in zip(finals, last):
            final.append(state)
    return x, [torch.cat(f) if num_layers > 1 else f[0] for f in finals]


def rnn(input: Tensor, hx: Tensor, weights: List[Tensor], *, num_layers: int,
        bidirectional: bool, nonlinearity: str, dropout: float, train: bool,
        batch_sizes: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """fastrnn.ops.rnn's contract, stated as ONNX RNN operators for the
    torch.export-based exporter: input [T, B, I], hx [L*D, B, H]."""
    directions = 2 if bidirectional else 1
    output, (h_n,) = _stack("RNN", input, [hx], weights, num_layers, bidirectional,
                            dropout, train, batch_sizes,
                            {"activations": [_ACTIVATIONS[nonlinearity]] * directions})
    return output, h_n


def lstm(input: Tensor, hx: Tuple[Tensor, Tensor], weights: List[Tensor], *, num_layers: int,
         bidirectional: bool, dropout: float, train: bool,
         batch_sizes: Optional[Tensor]) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """fastrnn.ops.lstm's contract as ONNX LSTM operators: hx (h0, c0) [L*D, B, H] each."""
    if _projected(weights, num_layers, 2 if bidirectional else 1):
        # torch's own torch.export-based exporter writes a graph that fails in
        # onnxruntime (its LSTM gets h0 [.., proj_size] as hidden size); say so now.
        raise RuntimeError(f"fastrnn.LSTM: {_PROJECTION}")
    output, (h_n, c_n) = _stack("LSTM", input, list(hx), weights, num_layers, bidirectional,
                                dropout, train, batch_sizes, {})
    return output, (h_n, c_n)


def gru(input: Tensor, hx: Tensor, weights: List[Tensor], *, num_layers: int,
        bidirectional: bool, dropout: float, train: bool,
        batch_sizes: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """fastrnn.ops.gru's contract as ONNX GRU operators: hx [L*D, B, H]."""
    output, (h_n,) = _stack("GRU", input, [hx], weights, num_layers, bidirectional,
                            dropout, train, batch_sizes, {"linear_before_reset": 1})
    return output, h_n


# TorchScript-based exporter --------------------------------------------------


def _stack_symbolic(g, op, input, states, weights, has_biases, num_layers, dropout, train,
                    bidirectional, batch_sizes, attrs):
    """A fastrnn op -> one ONNX ``op`` per layer; returns (output, *final states,
    reserve). The nodes around each operator are the ones torch emits for
    torch.nn's modules (Squeeze, or Transpose + Reshape when bidirectional), so
    that the exporter's PackedSequence pass, which moves packing past RNN, LSTM
    and GRU nodes and turns batch_sizes into sequence_lens, applies."""
    from torch.onnx import symbolic_helper as sh

    name = f"fastrnn::{op.lower()}"
    if dropout and train:
        return sh._unimplemented(name, "dropout in training mode", input)
    directions = 2 if bidirectional else 1
    hidden = sh._get_tensor_dim_size(weights[1], 1)
    if hidden is None:
        return sh._unimplemented(name, "unknown hidden size", input)
    if batch_sizes is None or sh._is_none(batch_sizes):
        sequence_lens = g.op("prim::Constant")
        sequence_lens.setType(torch._C.OptionalType.ofTensor())
    else:
        sequence_lens = batch_sizes
    none = g.op("prim::Constant")
    none.setType(torch._C.OptionalType.ofTensor())

    def in_onnx_order(w):
        runs = _GATE_RUNS[op]
        if runs is None:
            return w
        return g.op("Concat", *[sh._slice_helper(g, w, axes=[0], starts=[first * hidden],
                                                 ends=[end * hidden]) for first, end in runs],
                    axis_i=0)

    def stacked(tensors):
        parts = [sh._unsqueeze_helper(g, t, [0]) for t in tensors]
        return parts[0] if len(parts) == 1 else g.op("Concat", *parts, axis_i=0)

    x = input
    finals = [[] for _ in states]
    for layer, cells in enumerate(_cells(weights, num_layers, directions)):
        w = stacked([in_onnx_order(c[0]) for c in cells])
        r = stacked([in_onnx_order(c[1]) for c in cells])
        b = stacked([g.op("Concat", in_onnx_order(c[2]), in_onnx_order(c[3]), axis_i=0)
                     for c in cells]) if has_biases else none
        initial = [s if num_layers == 1 else sh._slice_helper(
            g, s, axes=[0], starts=[layer * directions], ends=[(layer + 1) * directions])
            for s in states]
        kwargs = {"direction_s": "bidirectional"} if bidirectional else {}
        y, *last = g.op(op, x, w, r, b, sequence_lens, *initial, outputs=1 + len(states),
                        hidden_size_i=hidden, **attrs, **kwargs)
        if bidirectional:
            y = g.op("Transpose", y, perm_i=[0, 2, 1, 3])
            x = sh._reshape_helper(g, y, g.op("Constant", value_t=torch.LongTensor([0, 0, -1])),
                                   allowzero=0)
        else:
            x = sh._squeeze_helper(g, y, [1])
        for final, state in zip(finals, last):
            final.append(state)
    finals = [f[0] if num_layers == 1 else g.op("Concat", *f, axis_i=0) for f in finals]
    # The reserve output only feeds backward; an empty constant stands in for it.
    return (x, *finals, g.op("Constant", value_t=torch.zeros(0)))


def _rnn_symbolic(g, input, hx, weights, has_biases, num_layers, dropout, train, bidirectional,
                  nonlinearity, batch_sizes, need_reserve=True):
    from torch.onnx import symbolic_helper as sh

    directions = 2 if bidirectional else 1
    return _stack_symbolic(g, "RNN", input, [hx], sh._unpack_list(weights), has_biases,
                           num_layers, dropout, train, bidirectional, batch_sizes,
                           {"activations_s": [_ACTIVATIONS[nonlinearity]] * directions})


def _lstm_symbolic(g, input, hx, cx, weights, has_biases, num_layers, dropout, train,
                   bidirectional, batch_sizes, need_reserve=True):
    from torch.onnx import symbolic_helper as sh

    weights = sh._unpack_list(weights)
    if _projected(weights, num_layers, 2 if bidirectional else 1):
        # torch.nn.LSTM's symbolic fails the same way, with "LSTMs with projections".
        return sh._unimplemented("fastrnn::lstm", _PROJECTION, input)
    return _stack_symbolic(g, "LSTM", input, [hx, cx], weights, has_biases, num_layers, dropout,
                           train, bidirectional, batch_sizes, {})


def _gru_symbolic(g, input, hx, weights, has_biases, num_layers, dropout, train, bidirectional,
                  batch_sizes, need_reserve=True):
    from torch.onnx import symbolic_helper as sh

    return _stack_symbolic(g, "GRU", input, [hx], sh._unpack_list(weights), has_biases,
                           num_layers, dropout, train, bidirectional, batch_sizes,
                           {"linear_before_reset_i": 1})


def _register_symbolics():
    from torch.onnx import register_custom_op_symbolic, symbolic_helper as sh

    symbolics = {
        "fastrnn::rnn": sh.parse_args("v", "v", "v", "b", "i", "f", "b", "b", "s", "v", "b")(
            _rnn_symbolic),
        "fastrnn::lstm": sh.parse_args("v", "v", "v", "v", "b", "i", "f", "b", "b", "v", "b")(
            _lstm_symbolic),
        "fastrnn::gru": sh.parse_args("v", "v", "v", "b", "i", "f", "b", "b", "v", "b")(
            _gru_symbolic),
    }
    # The exporter looks a symbolic up at the highest registered opset <= the
    # target for targets >= 9, but for targets 7 and 8 only among opsets
    # target..9: these three serve every opset it exports to (7 to 20).
    for name, symbolic in symbolics.items():
        for opset in (7, 8, 9):
            register_custom_op_symbolic(name, symbolic, opset)


_register_symbolics()
