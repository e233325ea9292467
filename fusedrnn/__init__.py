"""fusedrnn: fused LSTM / GRU / RNN layers for PyTorch, drop-in replacements for torch.nn.

    import fusedrnn
    rnn = fusedrnn.GRU(100, 128, batch_first=True)   # instead of torch.nn.GRU
    model = fusedrnn.convert(model)                  # or swap every nn.LSTM/GRU/RNN in a model
"""

from . import _ops, functional, onnx, reference
from ._ops import backends
from .convert import convert, revert
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

__version__ = "0.1.0"

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "convert", "revert", "backends", "functional",
           "reference"]
