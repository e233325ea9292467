"""Multi-layer, bidirectional recurrent networks over the one-layer ops.

Everything here works on packed, time-major data ([tokens, features] plus
per-step `batch_sizes`, sequences sorted by decreasing length), which is what
a PackedSequence holds and what a full-length [T, B, F] batch is once
reshaped. The modules (fusedrnn.modules) turn user input into this form.
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ops

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}

# (w_ih, w_hh, b_ih, b_hh, w_hr) of one layer in one direction; absent ones are None.
LayerWeights = Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]


def layer(mode: str, input: Tensor, h0: Tensor, c0: Optional[Tensor], weights: LayerWeights, batch_sizes: Tensor,
          reverse: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """One layer, one direction. Returns (output [N, P], h_n [B, P], c_n [B, H] or None)."""
    run_dtype = autocast_dtype(input.device.type)
    if run_dtype is not None:
        # The ops have no autocast rule of their own: cast their floating inputs here.
        input, h0 = input.to(run_dtype), h0.to(run_dtype)
        c0 = c0.to(run_dtype) if c0 is not None else None
        weights = tuple(w.to(run_dtype) if w is not None else None for w in weights)  # type: ignore[assignment]
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    if mode == "LSTM":
        assert c0 is not None
        return _ops.lstm_layer(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse)
    if mode == "GRU":
        out, h = _ops.gru_layer(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)
    else:
        out, h = _ops.rnn_layer("tanh" if mode == "RNN_TANH" else "relu", input, h0, w_ih, w_hh, b_ih, b_hh,
                                batch_sizes, reverse)
    return out, h, None


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype to run in under torch.autocast on CUDA (as nn.LSTM does there), else None."""
    if device_type == "cuda" and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def rnn_packed(mode: str, data: Tensor, batch_sizes: Tensor, hx: Tensor, cx: Optional[Tensor],
               weights: Sequence[LayerWeights], num_layers: int, bidirectional: bool, dropout: float,
               training: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """A stack of `num_layers` (bi)directional layers over packed data.

    data [N, input_size]; hx [num_layers * D, B, P]; cx [num_layers * D, B, H] (LSTM) or None;
    weights[layer * D + direction]. Dropout (training only) is applied to the output of every
    layer but the last, as torch.nn does. Returns (output [N, D * P], h_n, c_n)."""
    num_directions = 2 if bidirectional else 1
    h_n: List[Tensor] = []
    c_n: List[Tensor] = []
    x = data
    for layer_index in range(num_layers):
        outputs = []
        for direction in range(num_directions):
            k = layer_index * num_directions + direction
            out, h, c = layer(mode, x, hx[k], cx[k] if cx is not None else None, weights[k], batch_sizes,
                              reverse=direction == 1)
            outputs.append(out)
            h_n.append(h)
            if c is not None:
                c_n.append(c)
        x = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=1)
        if dropout > 0 and training and layer_index < num_layers - 1:
            x = F.dropout(x, p=dropout, training=True)
    return x, torch.stack(h_n), (torch.stack(c_n) if c_n else None)
