"""fastrnn: fused recurrent layers for PyTorch, drop-ins for torch.nn.RNN, LSTM and GRU.

    import fastrnn
    rnn = fastrnn.RNN(28, 128, num_layers=2)     # same arguments as torch.nn.RNN
    model = fastrnn.convert(model)               # or swap every nn.RNN/LSTM/GRU in a model
    model = fastrnn.revert(model)                # and back
"""

from ._loader import load_ops

HAS_CUDA = load_ops()

from . import ops, reference  # noqa: E402
from .modules import GRU, LSTM, RNN, convert, revert  # noqa: E402
from .ops import gru, lstm, rnn  # noqa: E402

__version__ = "0.1.0"
__all__ = ["RNN", "LSTM", "GRU", "convert", "revert", "rnn", "lstm", "gru", "ops", "reference",
           "HAS_CUDA"]
