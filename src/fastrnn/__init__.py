"""fastrnn: a fused Elman RNN for PyTorch, a drop-in replacement for torch.nn.RNN.

    import fastrnn
    rnn = fastrnn.RNN(28, 128, num_layers=2)     # same arguments as torch.nn.RNN
    model = fastrnn.convert(model)               # or swap every nn.RNN in a model
    model = fastrnn.revert(model)                # and back
"""

from ._loader import load_ops

HAS_CUDA = load_ops()

from . import ops, reference  # noqa: E402
from .modules import RNN, convert, revert  # noqa: E402
from .ops import rnn  # noqa: E402

__version__ = "0.1.0"
__all__ = ["RNN", "convert", "revert", "rnn", "ops", "reference", "HAS_CUDA"]
