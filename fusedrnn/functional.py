"""Multi-layer, bidirectional recurrent networks over the one-layer ops.

Everything here works on packed, time-major data ([tokens, features] plus
per-step `batch_sizes`, sequences sorted by decreasing length), which is what
a PackedSequence holds and what a full-length [T, B, F] batch is once
reshaped. The modules (fusedrnn.modules) turn user input into this form.
"""

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _bidirectional, _ops

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}

# (w_ih, w_hh, b_ih, b_hh, w_hr) of one layer in one direction; absent ones are None.
LayerWeights = Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]


# ---- autocast ---------------------------------------------------------------------------------
# One contract on every device: under torch.autocast for the input's device type, the layers run
# in the autocast dtype. As autocast does for every op it casts, floating tensors (input, states,
# weights) of any precision but float64 are cast to that dtype and float64 ones are left alone; so
# a float64 model with float64 input stays float64, and float64 mixed with anything else is a
# dtype mismatch, as outside autocast. The ops have no autocast kernel: the casts happen here.
# (torch.nn is not consistent: on the CPU, nn.LSTM fails on float32 input under bfloat16 autocast
# while nn.GRU and the cells run float32 and nn.RNN runs bfloat16; nn's CUDA RNNs return float16
# under bfloat16 autocast.) TorchScript does not see autocast: scripted modules run in their
# parameters' dtype.

def _autocast_possible() -> bool:
    """False when autocast is off for every device: one C call, where the full test costs a few us
    per layer call (a cell's whole budget is ~20 us). While tracing, the full test always runs."""
    return torch.compiler.is_compiling() or torch._C._is_any_autocast_enabled()


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype the layers run in under torch.autocast for `device_type`, or None outside autocast."""
    if not torch.jit.is_scripting():
        if not _autocast_possible():
            return None
        # is_autocast_enabled raises for device types autocast does not know (e.g. "meta").
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    return None


def run_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype a floating tensor of `dtype` on `device_type` runs in (see the contract above)."""
    cast_to = autocast_dtype(device_type)
    if cast_to is None or dtype == torch.float64:
        return dtype
    return cast_to


def same_run_dtype(a: torch.dtype, b: torch.dtype, device_type: str) -> bool:
    return run_dtype(a, device_type) == run_dtype(b, device_type)


def _autocast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == torch.float64 else t.to(dtype)


def _autocast_optional(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else _autocast(t, dtype)


# ---- layers -----------------------------------------------------------------------------------

_BATCH_SIZES: Dict[Tuple[int, int], Tensor] = {}


def full_batch_sizes(steps: int, batch: int) -> Tensor:
    """batch_sizes of a full-length batch ([batch] * steps, CPU int64), as the ops take it. Eager calls
    share one tensor per (steps, batch) (the ops only read it; a cell or a decoding step would
    otherwise allocate it on every call); traced, scripted or under a dispatch mode (FakeTensorMode,
    ...) a fresh one, so that it is part of what is traced."""
    if not torch.jit.is_scripting():
        if (not torch.compiler.is_compiling() and not torch._C._is_tracing()
                and torch._C._len_torch_dispatch_stack() == 0):
            key = (steps, batch)
            t = _BATCH_SIZES.get(key)
            if t is None or t._version != 0:
                if len(_BATCH_SIZES) > 256:
                    _BATCH_SIZES.clear()
                # Never an inference tensor (a first call under torch.inference_mode would cache one,
                # and every later call of the shape would fail on its _version).
                with torch.inference_mode(False):
                    t = _BATCH_SIZES[key] = torch.full((steps,), batch, dtype=torch.int64)
            return t
    return torch.full((steps,), batch, dtype=torch.int64)


def layer(mode: str, input: Tensor, h0: Tensor, c0: Optional[Tensor], weights: LayerWeights, batch_sizes: Tensor,
          reverse: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """One layer, one direction. Returns (output [N, P], h_n [B, P], c_n [B, H] or None)."""
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    if not torch.jit.is_scripting():
        if _autocast_possible():
            cast_to = autocast_dtype(input.device.type)
            if cast_to is not None:
                input, h0, w_ih, w_hh = (_autocast(input, cast_to), _autocast(h0, cast_to),
                                         _autocast(w_ih, cast_to), _autocast(w_hh, cast_to))
                c0, b_ih, b_hh, w_hr = (_autocast_optional(c0, cast_to), _autocast_optional(b_ih, cast_to),
                                        _autocast_optional(b_hh, cast_to), _autocast_optional(w_hr, cast_to))
    if mode == "LSTM":
        assert c0 is not None
        return _ops.lstm_layer(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse)
    if mode == "GRU":
        out, h = _ops.gru_layer(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)
    elif mode == "RNN_TANH":
        out, h = _ops.rnn_layer("tanh", input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)
    else:
        out, h = _ops.rnn_layer("relu", input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)
    return out, h, None


def _both_directions(mode: str, x: Tensor, hx: Tensor, cx: Optional[Tensor], weights: List[LayerWeights], k: int,
                     batch_sizes: Tensor):
    """Directions k and k + 1 (forward, reverse) of a bidirectional layer through the two-direction op
    pair (fusedrnn/_bidirectional.py: on CUDA one persistent launch for both recurrences), or None
    where it does not serve the call and the directions run one by one. Autocast as in `layer`."""
    if not _bidirectional.may_take(x):  # a CPU layer: nothing more to look at (small calls count)
        return None
    h0, h0_r = hx[k], hx[k + 1]
    c0 = cx[k] if cx is not None else None
    c0_r = cx[k + 1] if cx is not None else None
    w, w_r = weights[k], weights[k + 1]
    if _autocast_possible():
        cast_to = autocast_dtype(x.device.type)
        if cast_to is not None:
            x, h0, h0_r = _autocast(x, cast_to), _autocast(h0, cast_to), _autocast(h0_r, cast_to)
            c0, c0_r = _autocast_optional(c0, cast_to), _autocast_optional(c0_r, cast_to)
            w = tuple(_autocast_optional(t, cast_to) for t in w)
            w_r = tuple(_autocast_optional(t, cast_to) for t in w_r)
    return _bidirectional.layer(mode, x, h0, h0_r, c0, c0_r, w, w_r, batch_sizes)


def rnn_packed(mode: str, data: Tensor, batch_sizes: Tensor, hx: Tensor, cx: Optional[Tensor],
               weights: List[LayerWeights], num_layers: int, bidirectional: bool, dropout: float,
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
        outputs: List[Tensor] = []
        if not torch.jit.is_scripting():
            if num_directions == 2:
                both = _both_directions(mode, x, hx, cx, weights, 2 * layer_index, batch_sizes)
                if both is not None:
                    for out, h, c in both:
                        outputs.append(out)
                        h_n.append(h)
                        if c is not None:
                            c_n.append(c)
        for direction in range(num_directions if len(outputs) == 0 else 0):
            k = layer_index * num_directions + direction
            c0: Optional[Tensor] = None
            if cx is not None:
                c0 = cx[k]
            out, h, c = layer(mode, x, hx[k], c0, weights[k], batch_sizes, direction == 1)
            outputs.append(out)
            h_n.append(h)
            if c is not None:
                c_n.append(c)
        x = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=1)
        if dropout > 0 and training and layer_index < num_layers - 1:
            x = F.dropout(x, p=dropout, training=True)
    # One layer and direction (cells, most decoders): a view, not a copy.
    c_stack: Optional[Tensor] = None
    if len(c_n) == 1:
        c_stack = c_n[0].unsqueeze(0)
    elif len(c_n) > 1:
        c_stack = torch.stack(c_n)
    h_stack = h_n[0].unsqueeze(0) if len(h_n) == 1 else torch.stack(h_n)
    return x, h_stack, c_stack
