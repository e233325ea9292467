"""ONNX export: fusedrnn's layer ops become the standard ONNX LSTM / GRU / RNN operators.

After `import fusedrnn`, `torch.onnx.export(model, args)` works for models that hold
fusedrnn layers or cells, with both exporters:
- the default (torch.export-based, `dynamo=True`) exporter, through an onnxscript translation
  of each forward op, registered in onnxscript's torchlib registry, which the exporter reads
  when it builds its ONNX registry;
- the TorchScript-based exporter (`dynamo=False`), through `torch.onnx.register_custom_op_symbolic`.

One graph recipe serves both (`_layer_graph`), written against a small emitter interface
(`_OnnxscriptEmitter`, `_TorchScriptEmitter`). Each op is one layer in one direction over packed,
time-major data ([tokens, features] with per-step `batch_sizes`, see csrc/ops.cpp), while ONNX
recurrent operators take a padded [T, B, features] batch and per-sequence lengths. The recipe
gathers the packed rows into the padded layout, derives `sequence_lens` from `batch_sizes`, runs
one ONNX operator with the gates reordered, and compresses the padded output back to packed rows.
For a full batch (the only kind torch.export can capture, as PackedSequence input cannot be
exported, neither with torch.nn nor with fusedrnn) that is a plain permutation, and the graph stays
correct for any `batch_sizes`, e.g. a constant ragged one passed to fusedrnn.functional.

LSTM `proj_size`, which the ONNX LSTM lacks, is decomposed exactly (see `_layer_graph`) into the
ONNX LSTM on the unprojected state plus MatMuls. PackedSequence or `lengths=` input cannot be
exported: a clear error (`reject_variable_lengths`).

Registration is deferred until the exporter's own modules are imported (`_after_import`), so that
`import fusedrnn` does not pay for importing onnxscript (about 0.6 s) when nobody exports.
"""

import importlib.abc
import sys
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import _ops

# torch's gate order -> ONNX's gate order, as indices of torch's gate blocks.
#   LSTM: torch i, f, g, o -> ONNX i, o, f, c.   GRU: torch r, z, n -> ONNX z, r, h.
_GATE_ORDER = {"LSTM": (0, 3, 1, 2), "GRU": (1, 0, 2), "RNN": (0,)}

# fusedrnn forward op -> (ONNX operator, its `activations` attribute or None for the default)
_OPS = {
    "lstm_forward": ("LSTM", None),
    "gru_forward": ("GRU", None),
    # The inference twins (csrc/ops.cpp), which a graph traced without gradients holds.
    "lstm_inference": ("LSTM", None),
    "gru_inference": ("GRU", None),
    "rnn_tanh_forward": ("RNN", "Tanh"),
    "rnn_relu_forward": ("RNN", "Relu"),
}

_ONNX_INT32 = 6  # onnx.TensorProto.INT32: the type of sequence_lens
_ONNX_INT64 = 7

_MIN_OPSET = 13  # Unsqueeze, Squeeze and ReduceSum with axes as an input.


class _Emitter:
    """What the graph recipe needs from an exporter: ONNX nodes, int64 constants, static dims."""

    opset: int

    def op(self, op_type: str, *inputs, outputs: int = 1, **attributes):
        raise NotImplementedError

    def ints(self, values: Sequence[int]):
        raise NotImplementedError

    def scalar(self, value: int):
        raise NotImplementedError

    def static_dim(self, value, axis: int) -> Optional[int]:
        raise NotImplementedError

    def is_none(self, value) -> bool:
        raise NotImplementedError

    def none(self):
        raise NotImplementedError


def _export_error(op: str, message: str) -> RuntimeError:
    return RuntimeError(f"fusedrnn.{op}: cannot export to ONNX: {message}")


def _reordered(e: _Emitter, tensor, mode: str, hidden_size: int):
    """Rows of a [G*H, ...] weight or [G*H] bias, in ONNX's gate order."""
    order = _GATE_ORDER[mode]
    if order == (0,):
        return tensor
    blocks = [e.op("Slice", tensor, e.ints([i * hidden_size]), e.ints([(i + 1) * hidden_size]), e.ints([0]))
              for i in order]
    return e.op("Concat", *blocks, axis=0)


def _zeros_like(e: _Emitter, tensor):
    # tensor - tensor: zeros of its dtype at any opset (CastLike needs 15); a non-finite bias gives
    # non-finite outputs either way.
    return e.op("Sub", tensor, tensor)


def _unused_output(e: _Emitter, like):
    """An empty tensor standing for an op output that exists only for its backward (LSTM gates and
    cells, GRU gates and W_hn h + b_hn). An exported graph is inference only: nothing reads it, and
    the exporters drop it as dead code."""
    return e.op("Slice", like, e.ints([0]), e.ints([0]), e.ints([0]))


def _layer_graph(e: _Emitter, op_name: str, input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes,
                 reverse: bool) -> Tuple:
    """The ONNX nodes for one fusedrnn forward op; returns its (output, h_n[, c_n])."""
    mode, activation = _OPS[op_name]
    if e.opset < _MIN_OPSET:
        raise _export_error(op_name, f"needs ONNX opset {_MIN_OPSET} or later, got opset_version={e.opset}")
    gate_rows = e.static_dim(w_hh, 0)
    if gate_rows is None:
        raise _export_error(op_name, "the weights' shapes must be static")
    hidden_size = gate_rows // len(_GATE_ORDER[mode])
    projected = w_hr is not None and not e.is_none(w_hr)

    # Packed rows -> padded [T, B, I]. Slot (t, b) holds packed row offsets[t] + b, where
    # offsets = exclusive cumulative sum of batch_sizes; slots past a sequence's end (b >= batch_sizes[t])
    # are clamped to a valid row: the ONNX operator ignores them, given sequence_lens.
    # (Shape + Gather rather than Shape(start, end): the TorchScript exporter's constant folding
    # ignores Shape's start and end.)
    batch = e.op("Gather", e.op("Shape", h0), e.ints([0]))                        # [1]: B
    tokens = e.op("Gather", e.op("Shape", input), e.ints([0]))                    # [1]: N
    rows = e.op("Range", e.scalar(0), e.op("Squeeze", batch, e.ints([0])), e.scalar(1))  # [B]: 0..B-1
    rows_2d = e.op("Unsqueeze", rows, e.ints([0]))                                # [1, B]
    step_sizes = e.op("Unsqueeze", batch_sizes, e.ints([1]))                      # [T, 1]
    offsets = e.op("CumSum", step_sizes, e.scalar(0), exclusive=1)                 # [T, 1]
    last_row = e.op("Sub", tokens, e.ints([1]))
    slot_rows = e.op("Min", e.op("Add", offsets, rows_2d), last_row)             # [T, B]
    x = e.op("Gather", input, slot_rows, axis=0)                                  # [T, B, I]
    active = e.op("Less", rows_2d, step_sizes)                                    # [T, B] bool
    lengths = e.op("ReduceSum", e.op("Cast", active, to=_ONNX_INT64), e.ints([0]), keepdims=0)  # [B]

    # Weights as ONNX wants them: W [1, G*H, I], R [1, G*H, H], B [1, 2*G*H] = [Wb, Rb].
    w = _reordered(e, w_ih, mode, hidden_size)
    r = _reordered(e, w_hh, mode, hidden_size)
    has_b_ih, has_b_hh = not e.is_none(b_ih), not e.is_none(b_hh)
    if has_b_ih or has_b_hh:
        # ONNX takes both biases or neither: a missing one is zeros of the other's size and dtype.
        b_ih_ = _reordered(e, b_ih, mode, hidden_size) if has_b_ih else None
        b_hh_ = _reordered(e, b_hh, mode, hidden_size) if has_b_hh else None
        b_ih_ = b_ih_ if b_ih_ is not None else _zeros_like(e, b_hh_)
        b_hh_ = b_hh_ if b_hh_ is not None else _zeros_like(e, b_ih_)
        bias = e.op("Unsqueeze", e.op("Concat", b_ih_, b_hh_, axis=0), e.ints([0]))
    else:
        bias = e.none()
    initial_h = e.op("Unsqueeze", h0, e.ints([0]))                                # [1, B, H]

    if projected:
        # The ONNX LSTM has no projection (h_t = W_hr (o * tanh(c_t)), of size P < H), but an exact
        # decomposition runs it on the unprojected state u_t = o * tanh(c_t), h_t = W_hr u_t:
        # - recurrence: W_hh h_{t-1} = (W_hh W_hr) u_{t-1}, so R = W_hh W_hr [G*H, H];
        # - the given (projected) initial state h0 enters as an extra input, [x_t, e_t] with
        #   W = [W_ih, W_hh] and e_t = h0 at each sequence's first step (t = 0, or its last step when
        #   reversed), zero elsewhere; the ONNX initial_h is zero, so R u_init adds nothing;
        # - outputs and h_n are projected after the operator: u W_hr^T.
        steps = e.op("Shape", batch_sizes)                                        # [1]: T
        step_index = e.op("Unsqueeze", e.op("Range", e.scalar(0), e.op("Squeeze", steps, e.ints([0])),
                                              e.scalar(1)), e.ints([1]))      # [T, 1]
        first_step = e.op("Sub", lengths, e.ints([1])) if reverse else e.ints([0])  # [B] or [1]
        is_first = e.op("Unsqueeze", e.op("Equal", step_index, e.op("Unsqueeze", first_step, e.ints([0]))),
                        e.ints([2]))                                              # [T, B, 1]
        extra_input = e.op("Where", is_first, initial_h, _zeros_like(e, initial_h))  # [T, B, P]
        x = e.op("Concat", x, extra_input, axis=2)
        w = e.op("Concat", w, r, axis=1)
        r = e.op("MatMul", r, w_hr)
        initial_h = e.none()
        w_hr_t = e.op("Transpose", w_hr, perm=[1, 0])                           # [H, P]

    attributes = {"hidden_size": hidden_size, "direction": "reverse" if reverse else "forward"}
    if mode == "GRU":
        attributes["linear_before_reset"] = 1  # PyTorch's GRU: r * (W_hn h + b_hn)
    if activation is not None:
        attributes["activations"] = [activation]
    sequence_lens = e.op("Cast", lengths, to=_ONNX_INT32)
    inputs = [x, e.op("Unsqueeze", w, e.ints([0])), e.op("Unsqueeze", r, e.ints([0])), bias, sequence_lens,
              initial_h]
    if mode == "LSTM":
        inputs.append(e.op("Unsqueeze", c0, e.ints([0])))
    results = e.op(mode, *inputs, outputs=3 if mode == "LSTM" else 2, **attributes)

    # Y [T, 1, B, H] -> packed [N, H]: keep the active slots, in (t, b) order = packed order.
    y = e.op("Reshape", results[0], e.ints([-1, hidden_size]))
    output = e.op("Compress", y, e.op("Reshape", active, e.ints([-1])), axis=0)
    h_n = e.op("Squeeze", results[1], e.ints([0]))
    if projected:
        output, h_n = e.op("MatMul", output, w_hr_t), e.op("MatMul", h_n, w_hr_t)
    if mode == "LSTM":
        return output, h_n, e.op("Squeeze", results[2], e.ints([0]))
    return output, h_n


def reject_variable_lengths(module_name: str) -> None:
    """Raises inside an ONNX export that traces a PackedSequence or `lengths=` input (the modules call
    this). Neither exporter can capture it: torch.export cannot trace the data-dependent packing
    (nor can it for torch.nn), and the TorchScript exporter pairs packing only with torch.nn's RNN ops."""
    torch_onnx = sys.modules.get("torch.onnx")  # not imported: not exporting
    if torch_onnx is not None and torch_onnx.is_in_onnx_export():
        raise RuntimeError(
            f"{module_name}: a PackedSequence or lengths= input cannot be exported to ONNX; export the model on "
            "a padded batch instead (the ONNX model then runs every sequence for the padded length)")


# ---- the torch.export-based exporter (dynamo=True): onnxscript, traced ---------------------------

class _OnnxscriptEmitter(_Emitter):
    def __init__(self, opset_module):
        self._op = opset_module
        self.opset = opset_module.version

    def op(self, op_type, *inputs, outputs=1, **attributes):
        # The number of outputs follows from the operator's schema.
        return getattr(self._op, op_type)(*inputs, **attributes)

    def ints(self, values):
        return self._op.Constant(value_ints=list(values))

    def scalar(self, value):
        return self._op.Constant(value_int=value)

    def static_dim(self, value, axis):
        shape = value.shape
        if shape is None or not isinstance(shape[axis], int):
            return None
        return int(shape[axis])

    def is_none(self, value):
        return value is None

    def none(self):
        return None


def _register_onnxscript(registration) -> None:
    """Adds a translation of every forward op to onnxscript's torchlib registry (the `registration`
    module), which torch.onnx's ONNXRegistry.from_torchlib() reads at each export."""
    from onnxscript.onnx_opset import opset18

    emitter = _OnnxscriptEmitter(opset18)

    # The parameters mirror the ops' schemas (csrc/ops.cpp), by which the exporter binds arguments;
    # batch_sizes has a default only because it follows optional ones.
    def lstm_forward(input, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, batch_sizes=None,
                     reverse: bool = False):
        output, h_n, c_n = _layer_graph(emitter, "lstm_forward", input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                        batch_sizes, reverse)
        return output, h_n, c_n, _unused_output(emitter, input), _unused_output(emitter, input)

    def gru_forward(input, h0, w_ih, w_hh, b_ih=None, b_hh=None, batch_sizes=None, reverse: bool = False):
        output, h_n = _layer_graph(emitter, "gru_forward", input, h0, None, w_ih, w_hh, b_ih, b_hh, None,
                                   batch_sizes, reverse)
        return output, h_n, _unused_output(emitter, input), _unused_output(emitter, input)

    def lstm_inference(input, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, batch_sizes=None,
                       reverse: bool = False):
        return _layer_graph(emitter, "lstm_inference", input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes,
                            reverse)

    def gru_inference(input, h0, w_ih, w_hh, b_ih=None, b_hh=None, batch_sizes=None, reverse: bool = False):
        return _layer_graph(emitter, "gru_inference", input, h0, None, w_ih, w_hh, b_ih, b_hh, None, batch_sizes,
                            reverse)

    def rnn_forward(op_name):
        def forward(input, h0, w_ih, w_hh, b_ih=None, b_hh=None, batch_sizes=None, reverse: bool = False):
            return _layer_graph(emitter, op_name, input, h0, None, w_ih, w_hh, b_ih, b_hh, None, batch_sizes,
                                reverse)
        forward.__name__ = op_name
        return forward

    for name, fn in (("lstm_forward", lstm_forward), ("gru_forward", gru_forward),
                     ("lstm_inference", lstm_inference), ("gru_inference", gru_inference),
                     ("rnn_tanh_forward", rnn_forward("rnn_tanh_forward")),
                     ("rnn_relu_forward", rnn_forward("rnn_relu_forward"))):
        qualified = f"fusedrnn::{name}"
        if qualified not in registration.default_registry:
            registration.torch_op(qualified, trace_only=True)(fn)


# ---- the TorchScript-based exporter (dynamo=False): symbolic functions --------------------------

class _TorchScriptEmitter(_Emitter):
    def __init__(self, g, symbolic_helper):
        self._g = g
        self._helper = symbolic_helper
        self.opset = g.opset

    def op(self, op_type, *inputs, outputs=1, **attributes):
        # GraphContext.op wants each attribute's kind as a suffix: _i int(s), _s string(s).
        typed = {}
        for name, value in attributes.items():
            sample = value[0] if isinstance(value, list) else value
            typed[f"{name}_{'s' if isinstance(sample, str) else 'i'}"] = value
        return self._g.op(op_type, *inputs, outputs=outputs, **typed)

    def ints(self, values):
        return self._g.op("Constant", value_t=torch.tensor(list(values), dtype=torch.int64))

    def scalar(self, value):
        return self._g.op("Constant", value_t=torch.tensor(value, dtype=torch.int64))

    def static_dim(self, value, axis):
        sizes = self._helper._get_tensor_sizes(value)
        if sizes is None or sizes[axis] is None:
            return None
        return int(sizes[axis])

    def is_none(self, value):
        return self._helper._is_none(value)

    def none(self):
        missing = self._g.op("prim::Constant")
        missing.setType(torch._C.OptionalType.ofTensor())  # an absent optional input, as torch's own RNN symbolics do
        return missing


def _register_torchscript(torch_onnx) -> None:
    """Registers a symbolic function for every forward op with the TorchScript-based exporter.
    (symbolic_helper's _-prefixed functions are the ones torch's own symbolics use.)"""
    from torch.onnx import symbolic_helper

    def symbolic(op_name: str, has_cell: bool, extra_outputs: int) -> Callable:
        def fn(g, input, h0, *args):
            if has_cell:
                c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse = args
            else:
                (w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse), c0, w_hr = args, None, None
            emitter = _TorchScriptEmitter(g, symbolic_helper)
            results = _layer_graph(emitter, op_name, input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes,
                                   bool(symbolic_helper._maybe_get_const(reverse, "b")))
            return (*results, *[_unused_output(emitter, input) for _ in range(extra_outputs)])
        return fn

    for op_name, (mode, _) in _OPS.items():
        lstm = mode == "LSTM"
        extra = 2 if op_name in ("lstm_forward", "gru_forward") else 0  # their saved-for-backward outputs
        # Registered for every opset the exporter accepts, so that an opset below _MIN_OPSET gets
        # our message rather than "unrecognized namespace fusedrnn".
        torch_onnx.register_custom_op_symbolic(f"fusedrnn::{op_name}", symbolic(op_name, lstm, extra), 9)


# ---- deferred registration -------------------------------------------------------------------

class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs callbacks right after a module is first imported (a post-import hook), so that the
    exporters' modules, and onnxscript with them, load only when an export needs them."""

    def __init__(self) -> None:
        self.callbacks: Dict[str, List[Callable]] = {}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.callbacks:
            return None
        for finder in sys.meta_path:  # the finder that would have found it without us
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _CallbackLoader(spec.loader, self.callbacks.pop(fullname))
                return spec
            if spec is not None:  # a loader without exec_module (none in CPython today): no hook
                return spec
        return None


class _CallbackLoader(importlib.abc.Loader):
    def __init__(self, loader, callbacks: List[Callable]) -> None:
        self._loader = loader
        self._callbacks = callbacks

    def __getattr__(self, name):  # everything else (get_source, is_package, ...) is the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        for callback in self._callbacks:
            callback(module)


_hook = _AfterImport()
_lock = threading.Lock()


def _after_import(module_name: str, callback: Callable) -> None:
    """callback(module) now if module_name is imported already, else right after its import."""
    with _lock:
        module = sys.modules.get(module_name)
        if module is None:
            _hook.callbacks.setdefault(module_name, []).append(callback)
            if _hook not in sys.meta_path:
                sys.meta_path.insert(0, _hook)
            return
    callback(module)


def _register() -> None:
    _after_import("onnxscript.function_libs.torch_lib.registration", _register_onnxscript)
    _after_import("torch.onnx", _register_torchscript)


if _ops.COMPILED:  # without the compiled ops, the reference implementation exports as plain torch ops
    _register()
