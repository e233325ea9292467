"""nn.Module drop-ins for torch.nn.LSTM / GRU / RNN and their *Cell twins.

Same constructor arguments, defaults, parameter names, shapes, registration
order and initialisation as torch.nn, so a state_dict moves both ways without
conversion and the same seed gives the same weights. forward() accepts what
torch.nn accepts (batched 3-D, unbatched 2-D, PackedSequence, optional hx) and
returns the same structure; it additionally takes `lengths=` for padded
variable-length batches.

These classes deliberately do NOT subclass torch.nn.RNNBase: TorchDynamo
refuses nn.LSTM/GRU/RNN instances, while these compile with fullgraph=True.
"""

import math
import numbers
import warnings
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import functional, onnx
from .functional import GATES


def _name(module: nn.Module) -> str:
    return f"fusedrnn.{type(module).__name__}"


def _reset_uniform(module: nn.Module) -> None:
    """torch.nn's initialisation of every recurrent weight: U(-1/sqrt(hidden), 1/sqrt(hidden))."""
    stdv = 1.0 / math.sqrt(module.hidden_size) if module.hidden_size > 0 else 0
    for weight in module.parameters():
        nn.init.uniform_(weight, -stdv, stdv)


def _check_input(module: nn.Module, input, dims: Tuple[int, ...], what: str, weight: Tensor) -> None:
    """The input checks shared by layers and cells: a floating tensor of `dims` dimensions, its last
    one input_size, on the parameters' device and (outside CUDA autocast) of their dtype."""
    name = _name(module)
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: input must be a Tensor or a PackedSequence, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{name}: input must be a floating-point tensor, got dtype {input.dtype}")
    if input.dim() not in dims:
        raise ValueError(f"{name}: expected input to be {what}, got {input.dim()}-D input of shape "
                         f"{tuple(input.shape)}")
    if input.size(-1) != module.input_size:
        raise ValueError(f"{name}: input.size(-1) must be equal to input_size. Expected {module.input_size}, "
                         f"got {input.size(-1)}")
    if input.dtype != weight.dtype and functional.autocast_dtype(input.device.type) is None:
        raise TypeError(f"{name}: input must have the dtype of the module's parameters ({weight.dtype}), "
                        f"got {input.dtype}")
    if input.device != weight.device:
        raise RuntimeError(f"{name}: input is on {input.device} but the module's parameters are on {weight.device}")


def _check_state(module: nn.Module, state, arg: str, expected: Tuple[int, ...], input: Tensor) -> None:
    """An initial state: a tensor of the expected shape, with input's device and (outside CUDA autocast) dtype."""
    name = _name(module)
    if tuple(state.shape) != tuple(expected):
        raise ValueError(f"{name}: expected {arg} of size {tuple(expected)}, got {tuple(state.shape)}")
    if state.dtype != input.dtype and functional.autocast_dtype(input.device.type) is None:
        raise TypeError(f"{name}: {arg} must have the dtype of input ({input.dtype}), got {state.dtype}")
    if state.device != input.device:
        raise RuntimeError(f"{name}: {arg} must be on the device of input ({input.device}), got {state.device}")


def _as_tensor_state(module: nn.Module, state, arg: str) -> Tensor:
    if not isinstance(state, Tensor):
        raise TypeError(f"{_name(module)}: {arg} must be a Tensor, got {type(state).__name__}")
    return state


def _split_lstm_state(module: nn.Module, hx) -> Tuple[object, object]:
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError(f"{_name(module)}: hx must be a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}")
    return hx[0], hx[1]


class _RNNBase(nn.Module):
    """Shared machinery of LSTM, GRU and RNN (torch.nn.RNNBase's contract)."""

    __constants__ = ["mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                     "bidirectional", "proj_size"]

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError("dropout should be a number in range [0, 1] representing the probability of an "
                             f"element being zeroed, got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}")
        for arg, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers),
                           ("proj_size", proj_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{arg} should be of type int, got: {type(value).__name__}")
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be greater than zero, got {hidden_size}")
        if num_layers <= 0:
            raise ValueError(f"num_layers must be greater than zero, got {num_layers}")
        if input_size < 0:
            raise ValueError(f"input_size must be non-negative, got {input_size}")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections, "
                             f"got {proj_size}")
        if proj_size >= hidden_size:
            raise ValueError(f"proj_size has to be smaller than hidden_size, got proj_size={proj_size} and "
                             f"hidden_size={hidden_size}")
        if proj_size > 0 and mode != "LSTM":
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        num_directions = 2 if bidirectional else 1
        gate_size = GATES[mode] * hidden_size
        state_size = proj_size if proj_size > 0 else hidden_size

        self._flat_weights_names: List[str] = []
        self._all_weights: List[List[str]] = []
        for layer in range(num_layers):
            for direction in range(num_directions):
                layer_input_size = input_size if layer == 0 else state_size * num_directions
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = [("weight_ih", (gate_size, layer_input_size)), ("weight_hh", (gate_size, state_size))]
                if bias:
                    shapes += [("bias_ih", (gate_size,)), ("bias_hh", (gate_size,))]
                if proj_size > 0:
                    shapes += [("weight_hr", (proj_size, hidden_size))]
                names = []
                for base, shape in shapes:
                    setattr(self, base + suffix, nn.Parameter(torch.empty(shape, **factory_kwargs)))
                    names.append(base + suffix)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_uniform(self)

    def flatten_parameters(self) -> None:
        """No-op, kept for drop-in compatibility: the fused kernels take the weights as they are."""

    @property
    def all_weights(self) -> List[List[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def _layer_weights(self) -> List[functional.LayerWeights]:
        out = []
        for names in self._all_weights:
            w = {n.split("_l")[0]: getattr(self, n) for n in names}
            out.append((w["weight_ih"], w["weight_hh"], w.get("bias_ih"), w.get("bias_hh"), w.get("weight_hr")))
        return out

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        return s.format(**self.__dict__)

    # ---- forward -------------------------------------------------------------------------

    @property
    def _is_lstm(self) -> bool:
        return self.mode == "LSTM"

    def _state_shapes(self, batch: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        d = 2 if self.bidirectional else 1
        real = self.proj_size if self.proj_size > 0 else self.hidden_size
        return (self.num_layers * d, batch, real), (self.num_layers * d, batch, self.hidden_size)

    def _check_input(self, input: Tensor, packed: bool) -> None:
        if packed:
            _check_input(self, input, (2,), "2-D packed data", self.weight_ih_l0)
        else:
            _check_input(self, input, (2, 3), "2-D (unbatched) or 3-D (batched)", self.weight_ih_l0)

    def _check_state(self, state, arg: str, expected: Tuple[int, ...], input: Tensor, batched: bool) -> Tensor:
        name = _name(self)
        state = _as_tensor_state(self, state, arg)
        if not batched:
            if state.dim() != 2:
                raise ValueError(f"{name}: for unbatched 2-D input, {arg} should also be 2-D but got "
                                 f"{state.dim()}-D tensor")
            state = state.unsqueeze(1)
        elif state.dim() != 3:
            raise ValueError(f"{name}: for batched 3-D input, {arg} should also be 3-D but got {state.dim()}-D "
                             "tensor")
        _check_state(self, state, arg, expected, input)
        return state

    def _initial_state(self, hx, batch: int, input: Tensor, batched: bool) -> Tuple[Tensor, Optional[Tensor]]:
        h_shape, c_shape = self._state_shapes(batch)
        if hx is None:
            h = torch.zeros(h_shape, dtype=input.dtype, device=input.device)
            c = torch.zeros(c_shape, dtype=input.dtype, device=input.device) if self._is_lstm else None
            return h, c
        if self._is_lstm:
            h, c = _split_lstm_state(self, hx)
            return (self._check_state(h, "h_0", h_shape, input, batched),
                    self._check_state(c, "c_0", c_shape, input, batched))
        return self._check_state(hx, "hx", h_shape, input, batched), None

    def _run(self, data: Tensor, batch_sizes: Tensor, h: Tensor, c: Optional[Tensor]):
        return functional.rnn_packed(self.mode, data, batch_sizes, h, c, self._layer_weights(), self.num_layers,
                                     self.bidirectional, self.dropout, self.training)

    def _pack_state(self, h: Tensor, c: Optional[Tensor]):
        return (h, c) if self._is_lstm else h

    def forward(self, input: Union[Tensor, PackedSequence], hx=None, *, lengths: Optional[Tensor] = None):
        if isinstance(input, PackedSequence) or lengths is not None:
            onnx.reject_variable_lengths(_name(self))
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError(f"{_name(self)}: lengths must not be given with a PackedSequence input")
            return self._forward_packed(input, hx)
        if lengths is not None:
            return self._forward_lengths(input, hx, lengths)
        self._check_input(input, packed=False)
        batched = input.dim() == 3
        if not batched:
            x = input.unsqueeze(1)
        else:
            x = input.transpose(0, 1) if self.batch_first else input
        steps, batch = x.shape[0], x.shape[1]
        if steps == 0:
            raise ValueError(f"{_name(self)}: expected sequence length to be larger than 0, got input of shape "
                             f"{tuple(input.shape)}")
        h0, c0 = self._initial_state(hx, batch, x, batched)
        batch_sizes = torch.full((steps,), batch, dtype=torch.int64)
        out, h, c = self._run(x.reshape(steps * batch, x.shape[2]), batch_sizes, h0, c0)
        out = out.view(steps, batch, out.shape[-1])
        if not batched:
            out, h = out.squeeze(1), h.squeeze(1)
            c = c.squeeze(1) if c is not None else None
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, self._pack_state(h, c)

    def _forward_packed(self, input: PackedSequence, hx):
        data, batch_sizes, sorted_indices, unsorted_indices = input
        self._check_input(data, packed=True)
        batch = int(batch_sizes[0]) if batch_sizes.numel() else 0
        if hx is not None and sorted_indices is not None:
            # hx is given in the caller's batch order; the packed data is sorted by length.
            if self._is_lstm and isinstance(hx, (tuple, list)) and len(hx) == 2:
                hx = tuple(s.index_select(1, sorted_indices) if isinstance(s, Tensor) and s.dim() == 3 else s
                           for s in hx)
            elif isinstance(hx, Tensor) and hx.dim() == 3:
                hx = hx.index_select(1, sorted_indices)
        h0, c0 = self._initial_state(hx, batch, data, batched=True)
        out, h, c = self._run(data, batch_sizes, h0, c0)
        if unsorted_indices is not None:
            h = h.index_select(1, unsorted_indices)
            c = c.index_select(1, unsorted_indices) if c is not None else None
        return PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices), self._pack_state(h, c)

    def _forward_lengths(self, input: Tensor, hx, lengths: Tensor):
        """Padded batch plus per-sequence lengths: runs only the real tokens and returns a padded
        output (zeros past each length) and the state at each sequence's last real step."""
        name = _name(self)
        self._check_input(input, packed=False)
        if input.dim() != 3:
            raise ValueError(f"{name}: lengths needs batched 3-D input, got {input.dim()}-D")
        steps, batch = (input.shape[1], input.shape[0]) if self.batch_first else (input.shape[0], input.shape[1])
        lengths = torch.as_tensor(lengths)
        if lengths.dim() != 1 or lengths.numel() != batch or lengths.is_floating_point():
            raise ValueError(f"{name}: lengths must be a 1-D integer tensor of {batch} sequence lengths, got "
                             f"{lengths.dtype} of shape {tuple(lengths.shape)}")
        lengths = lengths.to("cpu", torch.int64)
        if batch and (int(lengths.min()) < 1 or int(lengths.max()) > steps):
            raise ValueError(f"{name}: every length must be in [1, {steps}] (the padded sequence length), got "
                             f"min {int(lengths.min())} and max {int(lengths.max())}")
        packed = pack_padded_sequence(input, lengths, batch_first=self.batch_first, enforce_sorted=False)
        out, state = self._forward_packed(packed, hx)
        padded, _ = pad_packed_sequence(out, batch_first=self.batch_first, total_length=steps)
        return padded, state


class LSTM(_RNNBase):
    """Drop-in for torch.nn.LSTM (gates i, f, g, o; proj_size supported)."""

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)


class GRU(_RNNBase):
    """Drop-in for torch.nn.GRU (PyTorch's / cuDNN's variant: reset applied after the W_hn matmul)."""

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)


class RNN(_RNNBase):
    """Drop-in for torch.nn.RNN (Elman network, nonlinearity 'tanh' or 'relu')."""

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:  # torch.nn.RNN's positional order: input_size, hidden_size, num_layers, nonlinearity
            kwargs["nonlinearity"] = args[3]
            args = args[:3] + args[4:]
        self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__("RNN_TANH" if self.nonlinearity == "tanh" else "RNN_RELU", *args, **kwargs)


# ---- cells ------------------------------------------------------------------------------------

class _CellBase(nn.Module):
    """One time step: runs the layer op over a one-step sequence."""

    __constants__ = ["input_size", "hidden_size", "bias"]

    def __init__(self, mode: str, input_size: int, hidden_size: int, bias: bool, device=None, dtype=None):
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        gate_size = GATES[mode] * hidden_size
        self.weight_ih = nn.Parameter(torch.empty((gate_size, input_size), **factory_kwargs))
        self.weight_hh = nn.Parameter(torch.empty((gate_size, hidden_size), **factory_kwargs))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(gate_size, **factory_kwargs))
            self.bias_hh = nn.Parameter(torch.empty(gate_size, **factory_kwargs))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_uniform(self)

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if "bias" in self.__dict__ and self.bias is not True:
            s += ", bias={bias}"
        if "nonlinearity" in self.__dict__ and self.nonlinearity != "tanh":
            s += ", nonlinearity={nonlinearity}"
        return s.format(**self.__dict__)

    def _check(self, input: Tensor, state, arg: str, batched: bool) -> Tensor:
        state = _as_tensor_state(self, state, arg)
        expected = (input.shape[0], self.hidden_size) if batched else (self.hidden_size,)
        _check_state(self, state, arg, expected, input)
        return state if batched else state.unsqueeze(0)

    def _step(self, input: Tensor, hx):
        _check_input(self, input, (1, 2), "1-D (unbatched) or 2-D (batched)", self.weight_ih)
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        batch = x.shape[0]
        is_lstm = self.mode == "LSTM"
        if hx is None:
            h0 = x.new_zeros(batch, self.hidden_size)
            c0 = x.new_zeros(batch, self.hidden_size) if is_lstm else None
        elif is_lstm:
            h, c = _split_lstm_state(self, hx)
            h0, c0 = self._check(input, h, "h_0", batched), self._check(input, c, "c_0", batched)
        else:
            h0, c0 = self._check(input, hx, "hx", batched), None
        weights = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, None)
        batch_sizes = torch.full((1,), batch, dtype=torch.int64)
        _, h, c = functional.layer(self.mode, x, h0, c0, weights, batch_sizes, reverse=False)
        if not batched:
            h = h.squeeze(0)
            c = c.squeeze(0) if c is not None else None
        return (h, c) if is_lstm else h


class LSTMCell(_CellBase):
    """Drop-in for torch.nn.LSTMCell."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__("LSTM", input_size, hidden_size, bias, device, dtype)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        return self._step(input, hx)


class GRUCell(_CellBase):
    """Drop-in for torch.nn.GRUCell."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__("GRU", input_size, hidden_size, bias, device, dtype)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        return self._step(input, hx)


class RNNCell(_CellBase):
    """Drop-in for torch.nn.RNNCell."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity: {nonlinearity}. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size, hidden_size, bias,
                         device, dtype)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        return self._step(input, hx)
