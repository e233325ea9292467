"""Layer-normalised LSTM and GRU layers and cells, with zoneout: fusedrnn.LayerNormLSTM, LayerNormGRU,
LayerNormLSTMCell, LayerNormGRUCell.

Equations (fusedrnn.reference, "layer-normalised LSTM / GRU"; Ba, Kiros & Hinton 2016 in haste's form):
the input projection W_ih x and the recurrent projection W_hh h are each normalised over the whole gate
vector (4H for LSTM, 3H for GRU) with their own gain, then their bias b_ih / b_hh is added; the LSTM
also normalises c_t before its tanh (h_t = o * tanh(LN(c_t))). The GRU keeps torch.nn.GRU's gate
equations (the reset gate multiplies the normalised W_hn h plus b_hn). LN's epsilon is
`layer_norm_eps` (default 1e-5, as nn.LayerNorm), its variance the biased one.

Parameters: torch.nn's, with the same names, shapes and initialisation (weight_ih_l{k}[_reverse],
weight_hh_l{k}, bias_ih_l{k}, bias_hh_l{k}; the cells weight_ih, weight_hh, bias_ih, bias_hh), plus
per layer and direction
    weight_ln_ih_l{k}  [G]  gain of LN(W_ih x), starts at 1
    weight_ln_hh_l{k}  [G]  gain of LN(W_hh h), starts at 1
    weight_ln_c_l{k}   [H]  LSTM: gain of LN(c), starts at 1
    bias_ln_c_l{k}     [H]  LSTM: shift of LN(c), starts at 0 (absent with bias=False)
The gate LNs have no shift of their own: LN(v) * gain + shift + b would hold the same parameter twice
(shift and b in identical roles); b_ih / b_hh are it. bias=False drops every additive parameter. A
state_dict of torch.nn.LSTM / GRU loads with strict=False (the LN parameters keep their init).

Zoneout (Krueger et al. 2016): `zoneout=p` (LSTM: p or (p_h, p_c)). In training each unit of h (and c)
keeps its previous value with probability p, a fresh Bernoulli mask per step, layer and direction drawn
from torch's generator (so reproducible under torch.manual_seed; p rounded to a multiple of 2**-16, see
zoneout_weights); in eval the expectation,
p * previous + (1 - p) * new. The output at each step is the zoned-out h.

Everything else is the plain layers' (fusedrnn.modules._RNNBase, reused): num_layers, bidirectional,
batch_first, inter-layer dropout, PackedSequence and lengths=, hx, unbatched input, dtypes and
autocast, torch.compile / torch.export, state_dict / pickling, DDP, torch.jit.trace. ONNX: the
TorchScript-based exporter (dynamo=False) records fusedrnn.reference's standard ops, unrolled over the
traced steps (_layernorm_ops._in_onnx_export); the dynamo exporter raises, naming dynamo=False.
Not supported: proj_size (ValueError), torch.jit.script (RuntimeError).
"""

import math
import numbers
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import functional
from ._layernorm_ops import ln_gru_layer, ln_lstm_layer
from .modules import (_check_input, _check_input_dims, _check_state, _fx_leaf, _fx_proxy, _no_lengths_with_packed,
                      _require_tensor, _RNNBase, _split_lstm_state)
from .reference import LAYER_NORM_EPS

ZoneoutArg = Union[float, Tuple[float, float]]


def _check_probability(name: str, arg: str, p) -> float:
    if not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0 <= p <= 1:
        raise ValueError(f"{name}: {arg} must be a probability in [0, 1], got {p!r}")
    return float(p)


def _parse_zoneout(name: str, zoneout, is_lstm: bool) -> Tuple[float, float]:
    """(p_h, p_c) from `zoneout`: one probability for every state, or for an LSTM a pair (p_h, p_c)."""
    if isinstance(zoneout, (tuple, list)):
        if not is_lstm or len(zoneout) != 2:
            what = "a probability or a pair (p_h, p_c)" if is_lstm else "a probability"
            raise ValueError(f"{name}: zoneout must be {what}, got {zoneout!r}")
        return _check_probability(name, "zoneout p_h", zoneout[0]), _check_probability(name, "zoneout p_c", zoneout[1])
    p = _check_probability(name, "zoneout", zoneout)
    return p, (p if is_lstm else 0.0)


def _check_eps(name: str, eps) -> float:
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"{name}: layer_norm_eps must be a positive number, got {eps!r}")
    return float(eps)


# Zoneout masks compare 16-bit uniform integers with p * 2**16: p is rounded to a multiple of 2**-16 (at
# most 7.6e-6 off) in training; eval uses p itself.
ZONEOUT_BITS = 16


def zoneout_threshold(p: float) -> int:
    """The training masks' threshold: a unit keeps its previous value where its signed 16-bit uniform
    integer u (in [-2**15, 2**15)) is below this, i.e. with probability round(p * 2**16) / 2**16."""
    return round(p * (1 << ZONEOUT_BITS)) - (1 << (ZONEOUT_BITS - 1))


def zoneout_uniforms(rows: int, hidden: int, device) -> Tensor:
    """The uniform integers of one training mask: [rows, hidden] int16, uniform over all 2**16 values,
    drawn as 64-bit words from torch's generator of `device` (random_ over the full int64 range: every
    bit uniform) and read as four int16 each. One 64-bit draw per four units: 0.49 ms for [3200, 128]
    against torch.rand's 1.6-2.0 ms, both the generator's serial mt19937 (benchmarks/NOTES.md)."""
    n = rows * hidden
    count = (n + 3) // 4
    if torch.compiler.is_compiling():
        # Dynamo has no in-place random_; randint's range stops one short of 2**63 (2**-64 of bias).
        words = torch.randint(-(1 << 63), (1 << 63) - 1, (count,), dtype=torch.int64, device=device)
    else:
        words = torch.empty(count, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    return words.view(torch.int16)[:n].view(rows, hidden)


def zoneout_weights(p: float, rows: int, hidden: int, like: Tensor, training: bool) -> Optional[Tensor]:
    """The ops' zoneout argument for one layer and direction: a Bernoulli(p) mask [rows, hidden] of 0 / 1 in
    like's dtype in training (a fresh draw per row and step: zoneout_uniforms below zoneout_threshold(p)),
    the constant p in eval (one row of p's expanded over the rows: stride 0, so the CPU kernels read that one
    row for every row instead of an [rows, hidden] tensor filled per call), None without zoneout.

    The comparison writes the mask's dtype directly (torch.lt out=): a bool mask's conversion to float32
    alone cost more than the comparison (0.59 against 0.14 ms for [3200, 128], 1 thread)."""
    if p == 0.0:
        return None
    if training:
        threshold = zoneout_threshold(p)
        if threshold >= 1 << (ZONEOUT_BITS - 1):  # p rounds to 1: every unit keeps its state
            return like.new_ones((rows, hidden))
        mask = like.new_empty((rows, hidden))
        return torch.lt(zoneout_uniforms(rows, hidden, like.device), threshold, out=mask)
    return like.new_full((1, hidden), p).expand(rows, hidden)


# (gain of LN(W_ih x), gain of LN(W_hh h), LSTM: gain and shift of LN(c)) of one layer and direction.
LayerNormWeights = Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]


def layer(mode: str, input: Tensor, h0: Tensor, c0: Optional[Tensor], weights, ln_weights: LayerNormWeights,
          batch_sizes: Tensor, reverse: bool, zoneout: Tuple[float, float], eps: float,
          training: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """One layer-normalised layer, one direction, over packed data (as functional.layer)."""
    w_ih, w_hh, b_ih, b_hh, _ = weights
    ln_ih, ln_hh, ln_c_w, ln_c_b = ln_weights
    if functional._autocast_possible():
        cast_to = functional.autocast_dtype(input.device.type)
        if cast_to is not None:
            cast, cast_opt = functional._autocast, functional._autocast_optional
            input, h0, w_ih, w_hh, ln_ih, ln_hh = (cast(input, cast_to), cast(h0, cast_to), cast(w_ih, cast_to),
                                                   cast(w_hh, cast_to), cast(ln_ih, cast_to), cast(ln_hh, cast_to))
            c0, b_ih, b_hh = cast_opt(c0, cast_to), cast_opt(b_ih, cast_to), cast_opt(b_hh, cast_to)
            ln_c_w, ln_c_b = cast_opt(ln_c_w, cast_to), cast_opt(ln_c_b, cast_to)
    rows, hidden = input.shape[0], w_hh.shape[1]
    zh = zoneout_weights(zoneout[0], rows, hidden, input, training)
    if mode == "LSTM":
        assert c0 is not None and ln_c_w is not None
        zc = zoneout_weights(zoneout[1], rows, hidden, input, training)
        return ln_lstm_layer(input, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c_w, ln_c_b, zh, zc,
                             batch_sizes, reverse, eps)
    out, h = ln_gru_layer(input, h0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, zh, batch_sizes, reverse, eps)
    return out, h, None


class _LayerNormRNNBase(_RNNBase):
    """The plain layers' machinery (input and state checks, batch_first, unbatched input, PackedSequence,
    lengths=, the weights read as torch.nn reads them) with a layer-normalised stack in _run."""

    _type_name = "fusedrnn.LayerNormRNNBase"

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, *,
                 zoneout: ZoneoutArg = 0.0, layer_norm_eps: float = LAYER_NORM_EPS, device=None, dtype=None) -> None:
        name = self._type_name
        _parse_zoneout(name, zoneout, mode == "LSTM")  # before the parameters are drawn, as every check
        eps = _check_eps(name, layer_norm_eps)
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, 0,
                         device, dtype)
        self.zoneout = zoneout
        self.layer_norm_eps = eps
        self._ln_names: List[List[str]] = []
        factory_kwargs = {"device": device, "dtype": dtype}
        gate_size = functional.GATES[mode] * hidden_size
        for names in self._all_weights:
            suffix = names[0][len("weight_ih"):]
            shapes = [("weight_ln_ih", gate_size), ("weight_ln_hh", gate_size)]
            if mode == "LSTM":
                shapes.append(("weight_ln_c", hidden_size))
                if bias:
                    shapes.append(("bias_ln_c", hidden_size))
            ln = []
            for base, size in shapes:
                setattr(self, base + suffix, nn.Parameter(torch.empty(size, **factory_kwargs)))
                ln.append(base + suffix)
            self._ln_names.append(ln)
        self._reset_layer_norm()

    def reset_parameters(self) -> None:
        # torch.nn's weights first, in its order (the same seed gives nn.LSTM's / nn.GRU's weights), then the
        # LN gains (1) and shifts (0).
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for name in self._flat_weights_names:
            nn.init.uniform_(getattr(self, name), -stdv, stdv)
        self._reset_layer_norm()

    def _reset_layer_norm(self) -> None:
        for names in getattr(self, "_ln_names", []):
            for name in names:
                init = nn.init.ones_ if name.startswith("weight") else nn.init.zeros_
                init(getattr(self, name))

    def _layer_norm_weights(self) -> List[LayerNormWeights]:
        out = []
        for names in self._ln_names:
            w = [getattr(self, n) for n in names]
            if self.mode == "LSTM":
                out.append((w[0], w[1], w[2], w[3] if len(w) > 3 else None))
            else:
                out.append((w[0], w[1], None, None))
        return out

    def __prepare_scriptable__(self):
        raise RuntimeError(f"{self._type_name}: TorchScript is not supported for the layer-normalised layers; "
                           "torch.jit.trace, torch.compile and torch.export work")

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.zoneout != 0:
            s += f", zoneout={self.zoneout}"
        if self.layer_norm_eps != LAYER_NORM_EPS:
            s += f", layer_norm_eps={self.layer_norm_eps}"
        return s

    def _run(self, data: Tensor, batch_sizes: Tensor, h: Tensor, c: Optional[Tensor],
             weights) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """functional.rnn_packed's stack (layers x directions, dropout between layers) over the
        layer-normalised layer."""
        num_directions = 2 if self.bidirectional else 1
        ln_weights = self._layer_norm_weights()
        zoneout = _parse_zoneout(self._type_name, self.zoneout, self.mode == "LSTM")
        h_n: List[Tensor] = []
        c_n: List[Tensor] = []
        x = data
        for layer_index in range(self.num_layers):
            outputs: List[Tensor] = []
            for direction in range(num_directions):
                k = layer_index * num_directions + direction
                out, h_k, c_k = layer(self.mode, x, h[k], None if c is None else c[k], weights[k], ln_weights[k],
                                      batch_sizes, direction == 1, zoneout, self.layer_norm_eps, self.training)
                outputs.append(out)
                h_n.append(h_k)
                if c_k is not None:
                    c_n.append(c_k)
            x = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=1)
            if self.dropout > 0 and self.training and layer_index < self.num_layers - 1:
                x = F.dropout(x, p=self.dropout, training=True)
        return x, torch.stack(h_n), (torch.stack(c_n) if c_n else None)


class LayerNormLSTM(_LayerNormRNNBase):
    """Layer-normalised LSTM with optional zoneout (module docstring); torch.nn.LSTM's interface."""

    _type_name = "fusedrnn.LayerNormLSTM"

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError(f"{self._type_name}: proj_size is not supported by the layer-normalised LSTM")
        super().__init__("LSTM", *args, **kwargs)

    def forward(self, input, hx=None, lengths=None):
        proxy = _fx_proxy(input, hx)  # torch.fx.symbolic_trace: one call_module node, as torch.nn's layers
        if proxy is not None:
            return _fx_leaf(self, proxy, (input, hx), {"lengths": lengths} if lengths is not None else {})
        h0: Optional[Tensor] = None
        c0: Optional[Tensor] = None
        if hx is not None:
            h0, c0 = _split_lstm_state(self._type_name, hx, is_cell=False)
        if isinstance(input, PackedSequence):
            _no_lengths_with_packed(self._type_name, lengths)
            packed, h, c = self._forward_packed(input, h0, c0)
            return packed, (h, c)
        out, h, c = self._forward_tensor(input, h0, c0, lengths)
        return out, (h, c)


class LayerNormGRU(_LayerNormRNNBase):
    """Layer-normalised GRU (torch.nn.GRU's gate equations) with optional zoneout; torch.nn.GRU's interface."""

    _type_name = "fusedrnn.LayerNormGRU"

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError(f"{self._type_name}: proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)

    def forward(self, input, hx=None, lengths=None):
        proxy = _fx_proxy(input, hx)  # torch.fx.symbolic_trace: one call_module node, as torch.nn's layers
        if proxy is not None:
            return _fx_leaf(self, proxy, (input, hx), {"lengths": lengths} if lengths is not None else {})
        if isinstance(input, PackedSequence):
            _no_lengths_with_packed(self._type_name, lengths)
            packed, h, _ = self._forward_packed(input, hx, None)
            return packed, h
        out, h, _ = self._forward_tensor(input, hx, None, lengths)
        return out, h


# ---- cells ------------------------------------------------------------------------------------

class _LayerNormCellBase(nn.Module):
    """One step of the layer-normalised layer (a one-step sequence through the same op)."""

    _type_name = "fusedrnn.LayerNormCellBase"

    def __init__(self, mode: str, input_size: int, hidden_size: int, bias: bool = True, *,
                 zoneout: ZoneoutArg = 0.0, layer_norm_eps: float = LAYER_NORM_EPS, device=None, dtype=None):
        super().__init__()
        name = self._type_name
        for arg, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name}: {arg} should be of type int, got {type(value).__name__} {value!r}")
            if value <= 0:
                raise ValueError(f"{name}: {arg} must be greater than zero, got {value!r}")
        if not isinstance(bias, bool):
            raise TypeError(f"{name}: bias should be of type bool, got {type(bias).__name__} {bias!r}")
        _parse_zoneout(name, zoneout, mode == "LSTM")
        factory_kwargs = {"device": device, "dtype": dtype}
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.zoneout = zoneout
        self.layer_norm_eps = _check_eps(name, layer_norm_eps)
        gate_size = functional.GATES[mode] * hidden_size
        self.weight_ih = nn.Parameter(torch.empty((gate_size, input_size), **factory_kwargs))
        self.weight_hh = nn.Parameter(torch.empty((gate_size, hidden_size), **factory_kwargs))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(gate_size, **factory_kwargs))
            self.bias_hh = nn.Parameter(torch.empty(gate_size, **factory_kwargs))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.weight_ln_ih = nn.Parameter(torch.empty(gate_size, **factory_kwargs))
        self.weight_ln_hh = nn.Parameter(torch.empty(gate_size, **factory_kwargs))
        if mode == "LSTM":
            self.weight_ln_c = nn.Parameter(torch.empty(hidden_size, **factory_kwargs))
            if bias:
                self.bias_ln_c = nn.Parameter(torch.empty(hidden_size, **factory_kwargs))
            else:
                self.register_parameter("bias_ln_c", None)
        self.reset_parameters()

    def __prepare_scriptable__(self):
        raise RuntimeError(f"{self._type_name}: TorchScript is not supported for the layer-normalised cells; "
                           "torch.jit.trace, torch.compile and torch.export work")

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):  # torch.nn's cells' order
            w = getattr(self, name)
            if w is not None:
                nn.init.uniform_(w, -stdv, stdv)
        for name in ("weight_ln_ih", "weight_ln_hh", "weight_ln_c"):
            if hasattr(self, name):
                nn.init.ones_(getattr(self, name))
        if getattr(self, "bias_ln_c", None) is not None:
            nn.init.zeros_(self.bias_ln_c)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.zoneout != 0:
            s += f", zoneout={self.zoneout}"
        if self.layer_norm_eps != LAYER_NORM_EPS:
            s += f", layer_norm_eps={self.layer_norm_eps}"
        return s

    def _step(self, input: Tensor, h0: Optional[Tensor], c0: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        name = self._type_name
        is_lstm = self.mode == "LSTM"
        _require_tensor(name, input, "input")
        _check_input_dims(name, input, [1, 2], "1-D (unbatched) or 2-D (batched)")
        _check_input(name, input, [1, 2], "1-D (unbatched) or 2-D (batched)", self.input_size, self.weight_ih)
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        batch = x.shape[0]
        states = []
        for arg, state in (("h_0" if is_lstm else "hx", h0), ("c_0", c0)):
            if arg == "c_0" and not is_lstm:
                continue
            if state is None:
                states.append(x.new_zeros(batch, self.hidden_size))
                continue
            _require_tensor(name, state, arg)
            if state.dim() != input.dim():
                raise ValueError(f"{name}: expected {arg} to be {input.dim()}-D like input, got {state.dim()}-D")
            _check_state(name, state, arg, [batch, self.hidden_size] if batched else [self.hidden_size], input)
            states.append(state if batched else state.unsqueeze(0))
        weights = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, None)
        ln_weights = (self.weight_ln_ih, self.weight_ln_hh, getattr(self, "weight_ln_c", None),
                      getattr(self, "bias_ln_c", None))
        zoneout = _parse_zoneout(name, self.zoneout, is_lstm)
        _, h, c = layer(self.mode, x, states[0], states[1] if is_lstm else None, weights, ln_weights,
                        functional.full_batch_sizes(1, batch), False, zoneout, self.layer_norm_eps, self.training)
        if not batched:
            h = h.squeeze(0)
            c = None if c is None else c.squeeze(0)
        return h, c


class LayerNormLSTMCell(_LayerNormCellBase):
    """One step of LayerNormLSTM; torch.nn.LSTMCell's interface: forward(input, (h_0, c_0)) -> (h_1, c_1)."""

    _type_name = "fusedrnn.LayerNormLSTMCell"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, **kwargs):
        super().__init__("LSTM", input_size, hidden_size, bias, **kwargs)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        proxy = _fx_proxy(input, hx)  # torch.fx.symbolic_trace: one call_module node, as torch.nn's cells
        if proxy is not None:
            return _fx_leaf(self, proxy, (input, hx), {})
        h0: Optional[Tensor] = None
        c0: Optional[Tensor] = None
        if hx is not None:
            h0, c0 = _split_lstm_state(self._type_name, hx, is_cell=True)
        h, c = self._step(input, h0, c0)
        assert c is not None
        return h, c


class LayerNormGRUCell(_LayerNormCellBase):
    """One step of LayerNormGRU; torch.nn.GRUCell's interface: forward(input, h_0) -> h_1."""

    _type_name = "fusedrnn.LayerNormGRUCell"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, **kwargs):
        super().__init__("GRU", input_size, hidden_size, bias, **kwargs)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        proxy = _fx_proxy(input, hx)  # torch.fx.symbolic_trace: one call_module node, as torch.nn's cells
        if proxy is not None:
            return _fx_leaf(self, proxy, (input, hx), {})
        return self._step(input, hx, None)[0]
