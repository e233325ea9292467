"""nn.Module drop-ins for torch.nn.LSTM / GRU / RNN and their *Cell twins.

Same constructor arguments, defaults, parameter names, shapes, registration
order and initialisation as torch.nn, so a state_dict moves both ways without
conversion and the same seed gives the same weights. forward() accepts what
torch.nn accepts (batched 3-D, unbatched 2-D, PackedSequence, optional hx) and
returns the same structure; it additionally takes `lengths=` for padded
variable-length batches. Mistakes raise the exception type torch.nn raises for
the same mistake, with a message that says what was expected and what came.

Class hierarchy: fusedrnn.LSTM / GRU / RNN subclass torch.nn.LSTM / GRU / RNN
(and so torch.nn.RNNBase), the cells subclass torch.nn.LSTMCell / GRUCell /
RNNCell (and so torch.nn.RNNCellBase), so that code selecting modules with
`isinstance(m, nn.LSTM)` (init loops, optimiser groups, pruning, DP-SGD,
explanation libraries) treats ours as it treats torch.nn's. What is inherited
and what is not:
- torch.nn's constructors are not run (_ModuleInit ends the chain at
  nn.Module.__init__): ours check the arguments and create the parameters
  (same names, order, shapes and init), without a second set of weights.
- forward, reset_parameters, extra_repr, flatten_parameters are ours: the
  forward signature is ours (`lengths=`), and flatten_parameters is a no-op
  because the kernels take the weights as they are (nn's would call cuDNN).
- nn.RNNBase's bookkeeping is inherited as is: `_flat_weights` (kept up to
  date by its __setattr__ when a weight is reassigned, by its _apply after
  .to()/.half(), so after load_state_dict(assign=True) too),
  `_flat_weights_names`, `all_weights`, __getstate__/__setstate__ (pickling
  without the weakrefs), _replicate_for_data_parallel. forward reads the
  weights by name on every call, as before, so parametrizations and
  functional_call take effect; `_flat_weights` is for the user code that
  reads it.
- TorchDynamo refuses every instance of nn.LSTM/GRU/RNN unless
  torch._dynamo.config.allow_rnn is set (VariableBuilder.wrap_module), and
  that would refuse ours too. Setting allow_rnn globally would change how
  torch.compile treats torch.nn's own modules for every user of the process,
  so instead _accept_ours_in_dynamo wraps wrap_module: for instances of our
  classes only, it runs with allow_rnn=True (the flag is read nowhere else);
  torch.nn's modules are treated exactly as without fusedrnn. The wrapper is
  installed right after dynamo's builder module is imported (a post-import
  hook, so `import fusedrnn` does not import dynamo). torch offers no hook for
  this (checked in torch 2.14: allow_rnn is the only switch); if a torch
  release drops the check or renames the method, the wrapper is skipped.
  torch.export sets allow_rnn itself.

TorchScript: forward and everything it calls is written in the TorchScript
subset, with torch.nn's @overload pattern for Tensor / PackedSequence input.
What only eager Python can do (non-tensor arguments, autocast, parametrized
weights) sits behind `torch.jit.is_scripting()`, a compile-time constant there.
"""

import functools
import math
import numbers
import warnings
from typing import List, Optional, Tuple, overload

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import _ops, functional, onnx
from .functional import GATES, LayerWeights


class NotATensorError(TypeError, AttributeError):
    """A non-tensor passed where a tensor belongs. A TypeError by meaning; also an AttributeError
    because that is what torch.nn raises for the same mistake (it calls `.dim()` on whatever it
    was given), so code written against torch.nn catches it too."""


def _reset_uniform(module: nn.Module) -> None:
    """torch.nn's initialisation of every recurrent weight: U(-1/sqrt(hidden), 1/sqrt(hidden))."""
    stdv = 1.0 / math.sqrt(module.hidden_size) if module.hidden_size > 0 else 0
    for weight in module.parameters():
        nn.init.uniform_(weight, -stdv, stdv)


def _size(shape: List[int]) -> str:
    """A shape as `(2, 3)`, the same in eager Python and TorchScript."""
    return "(" + ", ".join([str(s) for s in shape]) + ")"


def _require_tensor(name: str, value, arg: str) -> None:
    if not isinstance(value, Tensor):
        raise NotATensorError(f"{name}: {arg} must be a Tensor, got {type(value).__name__}")


def _check_input(name: str, is_cell: bool, input: Tensor, dims: List[int], what: str, input_size: int,
                 weight: Tensor) -> None:
    """The input checks shared by layers and cells: a floating tensor of `dims` dimensions, its last one
    input_size, on the parameters' device and of their dtype (or, under autocast, running in the same
    dtype). Exception types are torch.nn's for each mistake, which differ between layers and cells."""
    if input.dim() not in dims:
        raise ValueError(f"{name}: expected input to be {what}, got {input.dim()}-D input of shape "
                         f"{_size(input.shape)}")
    if not input.is_floating_point() or not functional.same_run_dtype(input.dtype, weight.dtype,
                                                                        input.device.type):
        message = (f"{name}: input dtype ({input.dtype}) does not match the module's parameters' dtype "
                   f"({weight.dtype}); convert one of them, e.g. input.to({weight.dtype})")
        # torch.nn's layers check this themselves (ValueError) except under autocast, where the op
        # fails (RuntimeError), as its cells' ops always do.
        if is_cell or functional.autocast_dtype(input.device.type) is not None:
            raise RuntimeError(message)
        raise ValueError(message)
    if input.size(-1) != input_size:
        raise RuntimeError(f"{name}: input.size(-1) must be equal to input_size. Expected {input_size}, "
                           f"got {input.size(-1)}")
    if input.device != weight.device:
        raise RuntimeError(f"{name}: input is on {input.device} but the module's parameters are on "
                           f"{weight.device}")


def _check_state(name: str, state: Tensor, arg: str, expected: List[int], input: Tensor) -> None:
    """An initial state: a tensor of the expected shape, on input's device, of input's dtype (or, under
    autocast, running in the same dtype). torch.nn raises RuntimeError for each of these mistakes."""
    if list(state.shape) != expected:
        raise RuntimeError(f"{name}: expected {arg} of size {_size(expected)}, got {_size(state.shape)}")
    if not functional.same_run_dtype(state.dtype, input.dtype, input.device.type):
        raise RuntimeError(f"{name}: {arg} must have the dtype of input ({input.dtype}), got {state.dtype}")
    if state.device != input.device:
        raise RuntimeError(f"{name}: {arg} must be on the device of input ({input.device}), got {state.device}")


def _check_lstm_state_pair(name: str, hx, exception) -> None:
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise exception(f"{name}: hx must be a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}")


class _ModuleInit(nn.Module):
    """Ends our classes' super().__init__() chain at nn.Module.__init__, skipping torch.nn's
    RNNBase / RNNCellBase constructors (which would create and initialise the weights a second
    time, drawing random numbers, and call cuDNN's flatten on CUDA): ours create them."""

    def __init__(self) -> None:
        nn.Module.__init__(self)


class _RNNBase(_ModuleInit, nn.RNNBase):
    """Shared machinery of LSTM, GRU and RNN (torch.nn.RNNBase's contract). A torch.nn.RNNBase: its
    bookkeeping (`_flat_weights` and its refresh, pickling, DataParallel replicas) is inherited."""

    __constants__ = ["mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                     "bidirectional", "proj_size", "_type_name"]
    __jit_unused_properties__ = ["all_weights"]
    _type_name = "fusedrnn.RNNBase"  # each class's name in messages (a TorchScript constant)
    # The weights as TorchScript sees them, set by __prepare_scriptable__; eager code reads the
    # attributes on every call instead, so that parametrizations and reassigned weights take effect.
    _script_weights: List[LayerWeights]

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
        self._init_flat_weights()  # nn.RNNBase's `_flat_weights` (calls our no-op flatten_parameters)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_uniform(self)

    def flatten_parameters(self) -> None:
        """No-op, kept for drop-in compatibility: the fused kernels take the weights as they are
        (torch.nn's compacts them for cuDNN on CUDA and is a no-op elsewhere too)."""

    def __setstate__(self, state) -> None:
        if "_flat_weights" not in state:  # pickled by fusedrnn 0.1.0, whose modules were not nn.RNNBase's
            state = dict(state)
            state["_flat_weights"] = [state["_parameters"].get(n) for n in state["_flat_weights_names"]]
        super().__setstate__(state)

    @property
    def all_weights(self) -> List[List[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def _layer_weights(self) -> List[LayerWeights]:
        out = []
        for names in self._all_weights:
            w = {n.split("_l")[0]: getattr(self, n) for n in names}
            out.append((w["weight_ih"], w["weight_hh"], w.get("bias_ih"), w.get("bias_hh"), w.get("weight_hr")))
        return out

    def __prepare_scriptable__(self):
        """Called by torch.jit.script before compiling: TorchScript cannot look attributes up by a
        computed name, so it gets the weights as a list, holding the same Parameter objects."""
        if not _ops.COMPILED:
            raise RuntimeError(f"{self._type_name}: torch.jit.script needs fusedrnn's compiled operators, which "
                               f"could not be loaded ({_ops.LOAD_ERROR}); torch.jit.trace, torch.compile and "
                               "torch.export work without them")
        self._script_weights = self._layer_weights()
        return self

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
    # The class-specific forward() splits hx into (h_0, c_0) and calls _forward_tensor or
    # _forward_packed; both return (output, h_n, c_n or None).

    def _weights(self) -> List[LayerWeights]:
        if torch.jit.is_scripting():
            return self._script_weights
        return self._layer_weights()

    def _check_input(self, input: Tensor, packed: bool) -> None:
        if not torch.jit.is_scripting():
            _require_tensor(self._type_name, input, "input")
        if packed:
            _check_input(self._type_name, False, input, [2], "2-D packed data", self.input_size, self.weight_ih_l0)
        else:
            _check_input(self._type_name, False, input, [2, 3], "2-D (unbatched) or 3-D (batched)",
                         self.input_size, self.weight_ih_l0)

    def _initial_state(self, h0: Optional[Tensor], c0: Optional[Tensor], batch: int, input: Tensor,
                       batched: bool) -> Tuple[Tensor, Optional[Tensor], bool]:
        """(h_0, c_0 or None, given): the caller's states checked and made batched, or zeros."""
        d = 2 if self.bidirectional else 1
        real_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        is_lstm = self.mode == "LSTM"
        if h0 is None:
            h = torch.zeros((self.num_layers * d, batch, real_size), dtype=input.dtype, device=input.device)
            c: Optional[Tensor] = None
            if is_lstm:
                c = torch.zeros((self.num_layers * d, batch, self.hidden_size), dtype=input.dtype,
                                device=input.device)
            return h, c, False
        h = self._check_state(h0, "h_0" if is_lstm else "hx", [self.num_layers * d, batch, real_size], input,
                              batched)
        if c0 is not None:
            c0 = self._check_state(c0, "c_0", [self.num_layers * d, batch, self.hidden_size], input, batched)
        return h, c0, True

    def _check_state(self, state: Tensor, arg: str, expected: List[int], input: Tensor, batched: bool) -> Tensor:
        name = self._type_name
        if not torch.jit.is_scripting():
            _require_tensor(name, state, arg)
        if not batched:
            if state.dim() != 2:
                raise RuntimeError(f"{name}: for unbatched 2-D input, {arg} should also be 2-D but got "
                                   f"{state.dim()}-D tensor")
            state = state.unsqueeze(1)
        elif state.dim() != 3:
            raise RuntimeError(f"{name}: for batched 3-D input, {arg} should also be 3-D but got {state.dim()}-D "
                               "tensor")
        _check_state(name, state, arg, expected, input)
        return state

    def _run(self, data: Tensor, batch_sizes: Tensor, h: Tensor,
             c: Optional[Tensor]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        return functional.rnn_packed(self.mode, data, batch_sizes, h, c, self._weights(), self.num_layers,
                                     self.bidirectional, self.dropout, self.training)

    def _forward_tensor(self, input: Tensor, h0: Optional[Tensor], c0: Optional[Tensor],
                        lengths: Optional[Tensor]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        if lengths is not None:
            return self._forward_lengths(input, h0, c0, lengths)
        self._check_input(input, packed=False)
        batched = input.dim() == 3
        if not batched:
            x = input.unsqueeze(1)
        elif self.batch_first:
            x = input.transpose(0, 1)
        else:
            x = input
        steps, batch = x.shape[0], x.shape[1]
        if steps == 0:
            raise RuntimeError(f"{self._type_name}: expected sequence length to be larger than 0, got input of "
                               f"shape {_size(input.shape)}")
        h, c, _ = self._initial_state(h0, c0, batch, x, batched)
        batch_sizes = torch.full((steps,), batch, dtype=torch.int64)
        out, h, c = self._run(x.reshape(steps * batch, x.shape[2]), batch_sizes, h, c)
        out = out.view(steps, batch, out.shape[-1])
        if not batched:
            out, h = out.squeeze(1), h.squeeze(1)
            if c is not None:
                c = c.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, h, c

    def _forward_packed(self, input: PackedSequence, h0: Optional[Tensor],
                        c0: Optional[Tensor]) -> Tuple[PackedSequence, Tensor, Optional[Tensor]]:
        if not torch.jit.is_scripting():
            onnx.reject_variable_lengths(self._type_name)  # an ONNX export cannot capture packing
        data, batch_sizes = input.data, input.batch_sizes
        sorted_indices, unsorted_indices = input.sorted_indices, input.unsorted_indices
        self._check_input(data, packed=True)
        batch = int(batch_sizes[0]) if batch_sizes.numel() > 0 else 0
        h, c, given = self._initial_state(h0, c0, batch, data, batched=True)
        if given and sorted_indices is not None:
            # hx is given in the caller's batch order; the packed data is sorted by length.
            h = h.index_select(1, sorted_indices)
            if c is not None:
                c = c.index_select(1, sorted_indices)
        out, h, c = self._run(data, batch_sizes, h, c)
        if unsorted_indices is not None:
            h = h.index_select(1, unsorted_indices)
            if c is not None:
                c = c.index_select(1, unsorted_indices)
        return PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices), h, c

    def _forward_lengths(self, input: Tensor, h0: Optional[Tensor], c0: Optional[Tensor],
                         lengths: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Padded batch plus per-sequence lengths: runs only the real tokens and returns a padded
        output (zeros past each length) and the state at each sequence's last real step."""
        name = self._type_name
        if not torch.jit.is_scripting():
            onnx.reject_variable_lengths(name)  # before the data-dependent checks below
        self._check_input(input, packed=False)
        if input.dim() != 3:
            raise ValueError(f"{name}: lengths needs batched 3-D input, got {input.dim()}-D")
        if self.batch_first:
            steps, batch = input.shape[1], input.shape[0]
        else:
            steps, batch = input.shape[0], input.shape[1]
        if not torch.jit.is_scripting():
            lengths = torch.as_tensor(lengths)
        if lengths.dim() != 1 or lengths.numel() != batch or lengths.is_floating_point():
            raise ValueError(f"{name}: lengths must be a 1-D integer tensor of {batch} sequence lengths, got "
                             f"{lengths.dtype} of shape {_size(lengths.shape)}")
        lengths = lengths.to(device=torch.device("cpu"), dtype=torch.int64)
        if batch > 0 and (int(lengths.min()) < 1 or int(lengths.max()) > steps):
            raise ValueError(f"{name}: every length must be in [1, {steps}] (the padded sequence length), got "
                             f"min {int(lengths.min())} and max {int(lengths.max())}")
        packed = pack_padded_sequence(input, lengths, batch_first=self.batch_first, enforce_sorted=False)
        out, h, c = self._forward_packed(packed, h0, c0)
        padded, _ = pad_packed_sequence(out, batch_first=self.batch_first, total_length=steps)
        return padded, h, c


def _no_lengths_with_packed(name: str, lengths: Optional[Tensor]) -> None:
    if lengths is not None:
        raise ValueError(f"{name}: lengths must not be given with a PackedSequence input")


class LSTM(_RNNBase, nn.LSTM):
    """Drop-in for torch.nn.LSTM (gates i, f, g, o; proj_size supported)."""

    _type_name = "fusedrnn.LSTM"

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    @overload  # type: ignore[override]
    @torch._jit_internal._overload_method  # noqa: F811
    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None,
                lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:  # noqa: F811
        pass

    @overload
    @torch._jit_internal._overload_method  # noqa: F811
    def forward(self, input: PackedSequence, hx: Optional[Tuple[Tensor, Tensor]] = None,  # noqa: F811
                lengths: Optional[Tensor] = None) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:
        pass

    def forward(self, input, hx=None, lengths=None):  # noqa: F811
        h0: Optional[Tensor] = None
        c0: Optional[Tensor] = None
        if hx is not None:
            if not torch.jit.is_scripting():
                _check_lstm_state_pair(self._type_name, hx, RuntimeError)  # torch.nn.LSTM's type for it
            h0, c0 = hx[0], hx[1]
        if isinstance(input, PackedSequence):
            _no_lengths_with_packed(self._type_name, lengths)
            packed, h, c = self._forward_packed(input, h0, c0)
            assert c is not None
            return packed, (h, c)
        out, h, c = self._forward_tensor(input, h0, c0, lengths)
        assert c is not None
        return out, (h, c)


class GRU(_RNNBase, nn.GRU):
    """Drop-in for torch.nn.GRU (PyTorch's / cuDNN's variant: reset applied after the W_hn matmul)."""

    _type_name = "fusedrnn.GRU"

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)

    @overload  # type: ignore[override]
    @torch._jit_internal._overload_method  # noqa: F811
    def forward(self, input: Tensor, hx: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:  # noqa: F811
        pass

    @overload
    @torch._jit_internal._overload_method  # noqa: F811
    def forward(self, input: PackedSequence, hx: Optional[Tensor] = None,  # noqa: F811
                lengths: Optional[Tensor] = None) -> Tuple[PackedSequence, Tensor]:
        pass

    def forward(self, input, hx=None, lengths=None):  # noqa: F811
        if isinstance(input, PackedSequence):
            _no_lengths_with_packed(self._type_name, lengths)
            packed, h, _ = self._forward_packed(input, hx, None)
            return packed, h
        out, h, _ = self._forward_tensor(input, hx, None, lengths)
        return out, h


class RNN(_RNNBase, nn.RNN):
    """Drop-in for torch.nn.RNN (Elman network, nonlinearity 'tanh' or 'relu')."""

    _type_name = "fusedrnn.RNN"

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

    @overload  # type: ignore[override]
    @torch._jit_internal._overload_method  # noqa: F811
    def forward(self, input: Tensor, hx: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:  # noqa: F811
        pass

    @overload
    @torch._jit_internal._overload_method  # noqa: F811
    def forward(self, input: PackedSequence, hx: Optional[Tensor] = None,  # noqa: F811
                lengths: Optional[Tensor] = None) -> Tuple[PackedSequence, Tensor]:
        pass

    def forward(self, input, hx=None, lengths=None):  # noqa: F811
        if isinstance(input, PackedSequence):
            _no_lengths_with_packed(self._type_name, lengths)
            packed, h, _ = self._forward_packed(input, hx, None)
            return packed, h
        out, h, _ = self._forward_tensor(input, hx, None, lengths)
        return out, h


# ---- cells ------------------------------------------------------------------------------------

class _CellBase(_ModuleInit, nn.RNNCellBase):
    """One time step: runs the layer op over a one-step sequence. A torch.nn.RNNCellBase."""

    __constants__ = ["mode", "input_size", "hidden_size", "bias", "_type_name"]
    _type_name = "fusedrnn.RNNCellBase"

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

    def __prepare_scriptable__(self):
        if not _ops.COMPILED:
            raise RuntimeError(f"{self._type_name}: torch.jit.script needs fusedrnn's compiled operators, which "
                               f"could not be loaded ({_ops.LOAD_ERROR}); torch.jit.trace, torch.compile and "
                               "torch.export work without them")
        return self

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if "bias" in self.__dict__ and self.bias is not True:
            s += ", bias={bias}"
        if "nonlinearity" in self.__dict__ and self.nonlinearity != "tanh":
            s += ", nonlinearity={nonlinearity}"
        return s.format(**self.__dict__)

    def _check_state(self, input: Tensor, state: Tensor, arg: str, batched: bool) -> Tensor:
        if not torch.jit.is_scripting():
            _require_tensor(self._type_name, state, arg)
        if batched:
            expected = [input.shape[0], self.hidden_size]
        else:
            expected = [self.hidden_size]
        _check_state(self._type_name, state, arg, expected, input)
        return state if batched else state.unsqueeze(0)

    def _step(self, input: Tensor, h0: Optional[Tensor], c0: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        if not torch.jit.is_scripting():
            _require_tensor(self._type_name, input, "input")
        _check_input(self._type_name, True, input, [1, 2], "1-D (unbatched) or 2-D (batched)", self.input_size,
                     self.weight_ih)
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        batch = x.shape[0]
        is_lstm = self.mode == "LSTM"
        c: Optional[Tensor] = None
        if h0 is None:
            h = x.new_zeros(batch, self.hidden_size)
            if is_lstm:
                c = x.new_zeros(batch, self.hidden_size)
        else:
            h = self._check_state(input, h0, "h_0" if is_lstm else "hx", batched)
            if c0 is not None:
                c = self._check_state(input, c0, "c_0", batched)
        weights: LayerWeights = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, None)
        batch_sizes = torch.full((1,), batch, dtype=torch.int64)
        _, h, c = functional.layer(self.mode, x, h, c, weights, batch_sizes, False)
        if not batched:
            h = h.squeeze(0)
            if c is not None:
                c = c.squeeze(0)
        return h, c


class LSTMCell(_CellBase, nn.LSTMCell):
    """Drop-in for torch.nn.LSTMCell."""

    _type_name = "fusedrnn.LSTMCell"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__("LSTM", input_size, hidden_size, bias, device, dtype)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        h0: Optional[Tensor] = None
        c0: Optional[Tensor] = None
        if hx is not None:
            if not torch.jit.is_scripting():
                _check_lstm_state_pair(self._type_name, hx, TypeError)  # torch.nn.LSTMCell's type for it
            h0, c0 = hx[0], hx[1]
        h, c = self._step(input, h0, c0)
        assert c is not None
        return h, c


class GRUCell(_CellBase, nn.GRUCell):
    """Drop-in for torch.nn.GRUCell."""

    _type_name = "fusedrnn.GRUCell"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__("GRU", input_size, hidden_size, bias, device, dtype)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        return self._step(input, hx, None)[0]


class RNNCell(_CellBase, nn.RNNCell):
    """Drop-in for torch.nn.RNNCell."""

    _type_name = "fusedrnn.RNNCell"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity: {nonlinearity}. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size, hidden_size, bias,
                         device, dtype)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        return self._step(input, hx, None)[0]


# ---- TorchDynamo: accept our layers, which are nn.LSTM / GRU / RNN instances --------------------

def _accept_ours_in_dynamo(builder_module) -> None:
    """Dynamo's VariableBuilder.wrap_module refuses every nn.RNN / GRU / LSTM instance unless
    torch._dynamo.config.allow_rnn is set. Ours trace to fusedrnn's registered ops (tested with
    fullgraph=True), so for instances of our classes, and only those, the refusal is lifted for
    the duration of that one call; torch.nn's modules meet the check unchanged. Dynamo compiles one
    frame at a time (convert_frame.compile_lock) and reads allow_rnn only in this check, so the
    lifted flag cannot reach another compilation. See the module docstring for why this and not a
    global allow_rnn=True."""
    from torch._dynamo import config

    builder = getattr(builder_module, "VariableBuilder", None)
    refusing = getattr(builder, "wrap_module", None)
    if refusing is None or not hasattr(config, "allow_rnn") or getattr(refusing, "_fusedrnn", False):
        return  # a torch without the refusal (or already wrapped): nothing to lift

    @functools.wraps(refusing)
    def wrap_module(self, value):
        if isinstance(value, _RNNBase) and not config.allow_rnn:
            with config.patch(allow_rnn=True):
                return refusing(self, value)
        return refusing(self, value)

    wrap_module._fusedrnn = True  # type: ignore[attr-defined]
    builder.wrap_module = wrap_module


onnx._after_import("torch._dynamo.variables.builder", _accept_ours_in_dynamo)
