"""fusedrnn: fused LSTM / GRU / RNN layers for PyTorch, drop-in replacements for torch.nn.

    import fusedrnn
    rnn = fusedrnn.GRU(100, 128, batch_first=True)   # instead of torch.nn.GRU
    model = fusedrnn.convert(model)                  # or swap every nn.LSTM/GRU/RNN in a model
"""

import torch

from . import _ops, functional, onnx, reference
from ._ops import backends
from .convert import convert, revert
from .layernorm import LayerNormGRU, LayerNormGRUCell, LayerNormLSTM, LayerNormLSTMCell
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

# Whole-model checkpoints: torch.load's default (weights_only=True) unpickles only allow-listed classes.
# Ours hold nothing but what torch.nn's hold (tensors, Parameters, strings, numbers, lists, dicts), and
# restore through nn.Module's / nn.RNNBase's __setstate__, so allowing them is as safe as allowing
# torch.nn's. With this, a model that loads with nn.LSTM & co. in the user's safe_globals loads with
# ours in their place, whether or not the user lists ours.
torch.serialization.add_safe_globals([LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell, LayerNormLSTM, LayerNormGRU,
                                      LayerNormLSTMCell, LayerNormGRUCell])

__version__ = "0.1.0"

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "LayerNormLSTM", "LayerNormGRU",
           "LayerNormLSTMCell", "LayerNormGRUCell", "convert", "revert", "backends", "functional",
           "reference"]
