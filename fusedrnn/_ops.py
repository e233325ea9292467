"""Loads the compiled operator library and registers, for each op, its fake
(meta) kernel and its autograd formula; then exposes one function per cell
type that runs one layer in one direction on the compiled op, or on
fusedrnn.reference when the library could not be loaded.
"""

import glob
import importlib.util
import mmap
import os
import warnings
from typing import Dict, List, Optional, Tuple, Type

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

from . import reference

# ---- loading the compiled library ---------------------------------------------------------
# Three ways it can fail, each with its own message, and each falling back to
# fusedrnn.reference with one warning: not built; built against another torch (detected
# from the file, before loading it); present but not loadable.

_BUILD_COMMAND = ("`pip install --no-build-isolation .` (from a checkout: `pip install --no-build-isolation -e .` "
                  "or `python setup.py build_ext --inplace`)")


def _torch_abi(version: str) -> Tuple[str, ...]:
    """The part of a torch version that a compiled extension depends on: major.minor, the
    unit that torch extensions are built and distributed for ('2.14.1+cu130' -> ('2', '14'))."""
    return tuple(version.split("+")[0].split(".")[:2])


def _read_build_info(path: str) -> Optional[Dict[str, str]]:
    """The build facts csrc/build_info.cpp stores in the library, read from the file's bytes
    WITHOUT loading it; None for a library built before they were recorded."""
    start, end = b"fusedrnn-build-info:", b":end"
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            i = data.find(start)
            j = data.find(end, i) if i >= 0 else -1
            if j < 0:
                return None
            fields = data[i + len(start):j].decode("ascii", "replace").split(";")
    except (OSError, ValueError):  # unreadable or empty: leave the verdict to the import
        return None
    return dict(f.split("=", 1) for f in fields if "=" in f)


def _version_mismatch(built_torch: str, built_cuda: Optional[str], kernels: str) -> Optional[str]:
    if _torch_abi(built_torch) != _torch_abi(torch.__version__):
        return (f"fusedrnn._C was compiled against torch {built_torch}, but torch {torch.__version__} is "
                f"installed; rebuild fusedrnn against the installed torch: {_BUILD_COMMAND}")
    if "cuda" in kernels and built_cuda != str(torch.version.cuda):
        return (f"fusedrnn._C was compiled with CUDA kernels for torch built with CUDA {built_cuda}, but the "
                f"installed torch is built with CUDA {torch.version.cuda}; rebuild fusedrnn: {_BUILD_COMMAND}")
    return None


def _load_library():
    """Imports fusedrnn._C (which registers torch.ops.fusedrnn.*); returns (module, None) or
    (None, why it could not be used)."""
    spec = importlib.util.find_spec(__package__ + "._C")
    if spec is None or spec.origin is None:
        here = os.path.dirname(os.path.abspath(__file__))
        others = [os.path.basename(p) for p in glob.glob(os.path.join(here, "_C.*")) if p.endswith((".so", ".pyd"))]
        found = (f" (found only {', '.join(others)}, built for another Python)" if others else "")
        return None, (f"the compiled library fusedrnn._C is not built: there is no _C extension module for this "
                      f"Python in {here}{found}. Build it against the installed torch: {_BUILD_COMMAND}")
    info = _read_build_info(spec.origin)
    if info is not None:
        why = _version_mismatch(info.get("torch", "unknown"), info.get("torch_cuda"), info.get("kernels", "cpu"))
        if why is not None:
            return None, why
    try:
        from . import _C as module  # registers torch.ops.fusedrnn.*
    except Exception as e:  # ImportError, OSError: e.g. undefined symbols from another torch
        return None, (f"fusedrnn._C ({spec.origin}) could not be loaded: {type(e).__name__}: {e}. "
                      f"If it was built against another torch, rebuild it: {_BUILD_COMMAND}")
    # A library built before the build facts were recorded: check what the loaded module says.
    why = _version_mismatch(getattr(module, "TORCH_VERSION", "unknown"), str(torch.version.cuda),
                            "cpu") if info is None else None
    return (None, why) if why else (module, None)


_C, LOAD_ERROR = _load_library()
COMPILED = LOAD_ERROR is None
if not COMPILED:
    warnings.warn(
        f"fusedrnn: {LOAD_ERROR}. Running the pure-PyTorch reference implementation instead, which is "
        "correct but slow.",
        RuntimeWarning,
        stacklevel=2,
    )

OPS = (
    "lstm_forward", "lstm_backward", "gru_forward", "gru_backward",
    "rnn_tanh_forward", "rnn_tanh_backward", "rnn_relu_forward", "rnn_relu_backward",
    "lstm_inference", "gru_inference",
)
# The forward ops' inference twins (csrc/ops.cpp): what a call no gradient will be taken of runs
# (the layer functions at the bottom choose), the same outputs without the saved-for-backward
# buffers. Not differentiable.
INFERENCE_OPS = ("lstm_inference", "gru_inference")


def backends() -> dict:
    """Which implementations are compiled and loaded, and against which torch."""
    info = {
        "compiled": COMPILED,
        "load_error": LOAD_ERROR,
        "torch": torch.__version__,
        "built_against_torch": getattr(_C, "TORCH_VERSION", None),
        "cpu": False,
        "cuda": False,
        "cuda_archs": getattr(_C, "CUDA_ARCHS", None) or None,
        # How the CPU kernels split work across threads (at::parallel_for is compiled into
        # the library): "OpenMP", like torch's own backend, or "none" (everything on one thread).
        "cpu_parallel": getattr(_C, "CPU_PARALLEL", None),
    }
    if _C is not None:
        for key in ("CPU", "CUDA"):
            info[key.lower()] = COMPILED and torch._C._dispatch_has_kernel_for_dispatch_key(
                "fusedrnn::lstm_forward", key)
    # The CUDA forward paths compiled in; csrc/cuda/register_cuda.cpp picks one per call
    # (FUSEDRNN_CUDA_PATH=per_step|persistent|auto forces it).
    paths = getattr(_C, "CUDA_PATHS", "") if info["cuda"] else ""
    info["cuda_paths"] = [p for p in paths.split(",") if p]
    return info


def _zeros_like_if_none(grad: Optional[Tensor], like: Tensor) -> Tensor:
    """The gradient of an output that was not used: a broadcast zero, which allocates nothing
    (the backward ops read their gradients through .contiguous() or copy them)."""
    return like.new_zeros(()).expand_as(like) if grad is None else grad


# Python autograd.Functions twinning each op's registered autograd, used inside the functorch
# transforms (torch.func.grad, vjp, jacrev, vmap). Filled by _register_autograd.
_FUNCTORCH_FUNCTIONS: Dict[str, Type[torch.autograd.Function]] = {}


def _register_autograd(name: str, backward, setup_context) -> None:
    """Registers `backward` / `setup_context` as the op's autograd formula twice, from one source:

    - with torch.library.register_autograd, for autograd through the dispatcher (eager, torch.compile,
      torch.export, TorchScript, direct torch.ops calls);
    - as a new-style torch.autograd.Function, which the layer functions below call while a functorch
      transform is active. The dispatcher's formula cannot serve torch.func: it is an autograd.Function
      whose forward takes `ctx` (torch.func refuses it: "must override the setup_context staticmethod"),
      and it runs inside the Autograd dispatch key, below the functorch layers that would have to see it.

    `generate_vmap_rule` lets vmap run forward and backward over batched tensors; the ops themselves
    are vmapped by a loop (_register_vmap_loop): correct, not fast.

    Higher derivatives: `backward` runs the fused backward op as it is when grad mode is off (a
    plain backward), and through _FirstOrderGrads when it is on (create_graph=True, torch.func.grad),
    whose own backward differentiates fusedrnn.reference; see there. The ops have no forward-mode
    formula (jvp): under forward-mode AD (dual tensors, torch.func.jvp / jacfwd / hessian) and
    nested torch.func.grad / jacrev, the layer functions at the bottom run fusedrnn.reference
    instead of the ops (_forward_mode).
    """
    torch.library.register_autograd(f"fusedrnn::{name}", backward, setup_context=setup_context)
    op = getattr(torch.ops.fusedrnn, name).default

    class Function(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(*args):
            return op(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup_context(ctx, inputs, output)

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    Function.__name__ = Function.__qualname__ = f"FusedRNN_{name}"
    _FUNCTORCH_FUNCTIONS[name] = Function


def _functorch_active() -> bool:
    return torch._C._functorch.maybe_current_level() is not None


def _call(name: str, *args):
    """Runs op `name`, through its autograd.Function twin while a functorch transform is active.
    A plain backward (grad mode off, eager, nothing traced) calls it below autograd: what its
    autograd kernel would do after a Python round trip (see _route)."""
    if _functorch_active():
        return _FUNCTORCH_FUNCTIONS[name].apply(*args)
    if not torch.is_grad_enabled() and _untraced():
        raw = _RAW_OPS.get(name)
        if raw is None:  # an op registered elsewhere (fusedrnn/_layernorm_ops.py): fill in on first use
            raw = _RAW_OPS[name] = getattr(torch.ops.fusedrnn, name).default._op
        with torch._C._AutoDispatchBelowAutograd():
            return raw(*args)
    return getattr(torch.ops.fusedrnn, name)(*args)


# name -> the op's C++ entry point (OpOverload.default's `_op`: the same call without OpOverload.__call__'s
# Python frame, ~1 us of a ~10 us small call). Eager, untraced calls only; filled after registration.
_RAW_OPS: Dict[str, object] = {}


def _raw(overload):
    return getattr(overload, "_op", overload)


_ZERO_SCALARS: Dict[Tuple[torch.dtype, torch.device], Tensor] = {}


def _unused_grad(grad: Optional[Tensor], like: Tensor) -> Tensor:
    """_zeros_like_if_none for a plain backward's op call: in eager, untraced code a shared 0-d zero per
    dtype and device (never written: the backward ops copy their gradients before writing), instead of
    an allocation and a fill per call."""
    if grad is not None:
        return grad
    if _functorch_level() is None and not _is_compiling() and not _is_tracing() and _dispatch_modes() == 0:
        key = (like.dtype, like.device)
        zero = _ZERO_SCALARS.get(key)
        if zero is None:
            with torch.inference_mode(False):  # cached: never an inference tensor (see functional.full_batch_sizes)
                zero = _ZERO_SCALARS[key] = like.new_zeros(())
        return zero.expand_as(like)
    return like.new_zeros(()).expand_as(like)


def _untraced() -> bool:
    """Eager and nothing looking: not compiling or exporting, not under torch.jit.trace (which the
    TorchScript ONNX exporter uses: a Python autograd.Function would be recorded as a PythonOp instead
    of the op), no dispatch mode (make_fx, FakeTensorMode, AOTAutograd's tracing), no forward-AD level
    (dual tensors go through the autograd key)."""
    return (not torch.compiler.is_compiling() and not torch._C._is_tracing()
            and torch._C._len_torch_dispatch_stack() == 0 and torch.autograd.forward_ad._current_level < 0)


def _register_vmap_loop(name: str) -> None:
    """vmap over op `name`: one call per batch element, outputs stacked along dim 0. This is what
    torch's batching fallback does, minus its warning that asks users to report a missing rule to
    PyTorch. (Folding the vmapped dimension into the recurrent batch would be faster, but not for
    the weight gradients, which vmap wants per element.)"""
    op = getattr(torch.ops.fusedrnn, name).default

    def rule(info, in_dims, *args):
        results = []
        for i in range(info.batch_size):
            results.append(op(*[a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)]))
        stacked = tuple(torch.stack(outputs) for outputs in zip(*results))
        return stacked, (0,) * len(stacked)

    torch.library.register_vmap(f"fusedrnn::{name}", rule)


def _reject_double_backward(name: str):
    """Autograd for a backward op called directly: its derivative is not implemented, so say so
    instead of silently returning zeros. (Double backward through the forward ops and the layers
    works: their backward differentiates fusedrnn.reference, _FirstOrderGrads, and never records
    the backward op.)"""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(
            f"fusedrnn.{name}: differentiating the backward op itself is not supported (its saved "
            f"forward outputs are caches, not free inputs). For double backward, differentiate "
            f"through fusedrnn.{name.replace('_backward', '_forward')} or the fusedrnn layers and cells "
            "with create_graph=True, or nest torch.func.grad / jacrev")

    _register_autograd(name, backward, setup_context)


def _reject_inference_backward(name: str) -> None:
    """Autograd for an inference op reached with inputs that require grad (only by calling it
    directly: the layers choose it only when no gradient will be taken): it saved nothing for a
    backward, so say so instead of returning no gradient."""
    forward = name.replace("_inference", "_forward")

    def backward(ctx, *grads):
        raise RuntimeError(
            f"fusedrnn.{name}: this op is the forward of calls no gradient is taken of and saves nothing "
            f"for backward; to differentiate, call fusedrnn.{forward} (the fusedrnn layers and cells do "
            "whenever grad mode is on and an input or weight requires grad)")

    torch.library.register_autograd(f"fusedrnn::{name}", backward, setup_context=lambda ctx, inputs, output: None)


# ---- higher derivatives ------------------------------------------------------------------------
# A forward op's vector-Jacobian product, G(g, theta) = J(theta)^T g, is the fused backward op.
# When grad mode is on during backward (create_graph=True; always inside torch.func.grad), the
# backward formulas call _FirstOrderGrads instead of the op: its forward is the same fused op (the
# first derivatives are the fused kernel's, bitwise), and its backward, which runs only when G
# itself is differentiated, is G's vector-Jacobian product through fusedrnn.reference (plain torch
# ops) recomputed from the saved inputs, by torch.autograd.grad (or, inside torch.func transforms,
# torch.func.vjp). That backward is again made of torch ops, so third and higher derivatives
# follow. Nothing of this runs in a plain backward (grad mode off): that calls the fused backward
# op exactly as before. Every step is a torch op or a dispatcher call, so it runs on whatever
# device the tensors are on (no device branches).

class _VJPSpec:
    """What _FirstOrderGrads needs besides tensors: which op, its direction, how many output
    gradients lead its tensor arguments, and which primals' gradients it returns. (No tensors: a
    tensor kept outside the arguments would escape the functorch levels it was wrapped for.)"""

    def __init__(self, kind: str, reverse: bool, n_grads: int, mask):
        self.kind, self.reverse, self.n_grads, self.mask = kind, reverse, n_grads, mask

    def fused(self, grads, primals, batch_sizes, saved):
        """The fused backward op: the gradients of primals[self.mask]."""
        need_grad_input, need_grad_h0 = 0 in self.mask, 1 in self.mask
        if self.kind == "lstm":
            input, h0, c0, w_ih, w_hh, _, _, w_hr = primals
            result = _call("lstm_backward", *grads, input, h0, c0, w_ih, w_hh, w_hr, batch_sizes,
                           self.reverse, need_grad_input, *saved, need_grad_h0)
        else:
            input, h0, w_ih, w_hh, _, _ = primals
            result = _call(f"{self.kind}_backward", *grads, input, h0, w_ih, w_hh, batch_sizes,
                           self.reverse, need_grad_input, *saved, need_grad_h0)
        return tuple(result[i] for i in self.mask)

    def reference(self, primals, batch_sizes):
        """The forward op's differentiable outputs, by fusedrnn.reference, in the op's shapes: a
        [T, B, I] input and [1, B, *] states (csrc/ops.cpp) run as rows and come back as given."""
        primals = list(primals)
        input, h0 = primals[0], primals[1]
        n_states = 2 if self.kind == "lstm" else 1
        if input.dim() == 3:
            primals[0] = input.reshape(-1, input.shape[-1])
        if h0.dim() == 3:
            for i in range(1, 1 + n_states):
                primals[i] = primals[i][0]
        if self.kind == "lstm":
            outputs = reference.lstm_layer(*primals, batch_sizes, self.reverse)
        elif self.kind == "gru":
            outputs = reference.gru_layer(*primals, batch_sizes, self.reverse)
        else:
            outputs = reference.rnn_layer(self.kind[4:], *primals, batch_sizes, self.reverse)
        out, states = outputs[0], list(outputs[1:])
        if input.dim() == 3:
            out = out.view(input.shape[0], input.shape[1], out.shape[-1])
        if h0.dim() == 3:
            states = [s.unsqueeze(0) for s in states]
        return (out, *states)


class _FirstOrderGrads(torch.autograd.Function):
    """apply(spec, *grads, *primals, batch_sizes, *saved) -> the gradients of primals[spec.mask]:
    the fused backward op, differentiable (with respect to grads and primals) through
    fusedrnn.reference. `saved` (the forward op's extra outputs) are caches of the primals: no
    gradient flows to them."""

    generate_vmap_rule = True

    @staticmethod
    def forward(spec, *tensors):
        n_saved = _N_SAVED[spec.kind]
        grads, primals = tensors[:spec.n_grads], tensors[spec.n_grads:-n_saved - 1]
        return spec.fused(grads, primals, tensors[-n_saved - 1], tensors[-n_saved:])

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, tensors = inputs[0], inputs[1:]
        ctx.spec, ctx.n_tensors = spec, len(tensors)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors[:len(tensors) - _N_SAVED[spec.kind]])

    @staticmethod
    def backward(ctx, *cotangents):
        *args, batch_sizes = ctx.saved_tensors  # grads, then primals (absent ones None)
        present = [i for i, t in enumerate(args) if t is not None]
        # Inside torch.func transforms tensors cannot be made to require grad: torch.func.vjp there.
        second_order = _functorch_second_order if _functorch_active() else _eager_second_order
        result = [None] * ctx.n_tensors
        for i, g in zip(present, second_order(ctx.spec, args, present, batch_sizes, cotangents)):
            result[i] = g
        return (None, *result)


def _functorch_second_order(spec, args, present, batch_sizes, cotangents):
    """_FirstOrderGrads.backward by torch.func.vjp (of torch.func.vjp), which composes with the
    torch.func transforms around it: the gradients of args[present]."""

    def first_order(*tensors):
        full = list(args)
        for i, t in zip(present, tensors):
            full[i] = t
        g, p = full[:spec.n_grads], full[spec.n_grads:]
        p_present = [i for i, t in enumerate(p) if t is not None]

        def forward(*ts):
            q = list(p)
            for i, t in zip(p_present, ts):
                q[i] = t
            return tuple(spec.reference(q, batch_sizes))

        _, vjp = torch.func.vjp(forward, *[p[i] for i in p_present])
        result = vjp(tuple(g))
        return tuple(result[p_present.index(i)] for i in spec.mask)

    _, vjp2 = torch.func.vjp(first_order, *[args[i] for i in present])
    primals = args[spec.n_grads:]
    return vjp2(tuple(torch.zeros_like(primals[i]) if v is None else v for i, v in zip(spec.mask, cotangents)))


def _eager_second_order(spec, args, present, batch_sizes, cotangents):
    """_FirstOrderGrads.backward by torch.autograd.grad, outside torch.func (measured 10-25% faster
    than torch.func.vjp there): recompute, first gradients with a graph, then their vector-Jacobian
    product (with a graph again when grad mode is on: third order). The gradients of args[present]."""
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        # Fresh handles, distinct even where one tensor is passed twice (h0 is c0): with a graph to
        # the original tensors when a higher derivative is being built, detached otherwise.
        leaves = [args[i].view_as(args[i]) if create and args[i].requires_grad else args[i].detach().requires_grad_()
                  for i in present]
        full = list(args)
        for i, t in zip(present, leaves):
            full[i] = t
        grads, primals = full[:spec.n_grads], full[spec.n_grads:]
        outputs = spec.reference(primals, batch_sizes)
        first = torch.autograd.grad(outputs, [primals[i] for i in spec.mask], grads, create_graph=True,
                                    allow_unused=True)
        pairs = [(f, v) for f, v in zip(first, cotangents) if f is not None and v is not None and f.requires_grad]
        if not pairs:
            return [None] * len(leaves)
        return torch.autograd.grad([f for f, _ in pairs], leaves, [v for _, v in pairs], create_graph=create,
                                   allow_unused=True)


_N_SAVED = {"lstm": 3, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}  # out, gates, cells / out, gates, hn / out


def _differentiable_vjp(ctx, kind: str, grads, primals, batch_sizes: Tensor, saved):
    """The forward op's backward result when grad mode is on: one entry per forward argument."""
    mask = [i for i, p in enumerate(primals) if p is not None and ctx.needs_input_grad[i]]
    n_args = len(primals) + 2  # + batch_sizes, reverse
    if not mask:
        return (None,) * n_args
    spec = _VJPSpec(kind, ctx.reverse, len(grads), mask)
    result = [None] * n_args
    for i, g in zip(mask, _FirstOrderGrads.apply(spec, *grads, *primals, batch_sizes, *saved)):
        result[i] = g
    return tuple(result)


def _forward_mode(*tensors) -> bool:
    """Whether the layer must run on fusedrnn.reference because the ops cannot serve the transforms
    around it: forward-mode AD (a torch.func.jvp / jacfwd / hessian transform anywhere on the
    functorch stack, or dual tensors of torch.autograd.forward_ad among `tensors`: the ops have no
    forward-mode formula), or torch.func.grad / vjp / jacrev nested twice or more (jacrev(jacrev),
    grad(grad)): functorch cannot run the ops' vmap loop under the outer levels there.
    A single torch.func.grad, vmap, and eager autograd of any order run the fused ops."""
    if _functorch_active():
        grads = 0
        for interpreter in torch._C._functorch.get_interpreter_stack():
            key = interpreter.key()
            if key == torch._C._functorch.TransformType.Jvp:
                return True
            grads += key == torch._C._functorch.TransformType.Grad
        if grads > 1:
            return True
    if _forward_ad._current_level < 0:  # no dual_level() context: the cheap, usual answer
        return False
    return any(t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _check_like(op: str, input: Tensor, **tensors) -> None:
    """The fake kernels' share of the C++ checks (dtype and device agreement), so that
    tracing and mixed meta/real calls fail as the real kernels would."""
    for name, t in tensors.items():
        if t is None:
            continue
        torch._check(t.dtype == input.dtype,
                     lambda: f"fusedrnn.{op}: {name} must have the dtype of input ({input.dtype}), got {t.dtype}")
        torch._check(t.device == input.device,
                     lambda: f"fusedrnn.{op}: {name} must be on the device of input ({input.device}), got {t.device}")


def _grad_input_like(input: Tensor, needed: bool) -> Tensor:
    # The backward ops skip the input-gradient GEMM when it is not needed and return an empty tensor.
    return _fresh(input) if needed else input.new_empty(0)


def _grad_h0_like(h0: Tensor, needed: bool) -> Tensor:
    # Likewise for h0: without need_grad_h0 the first step's dh_{t-1} = dgates W_hh is skipped.
    return _fresh(h0) if needed else h0.new_empty(0)


def _fresh(like: Tensor) -> Tensor:
    """A new contiguous tensor of like's shape: the real ops allocate every output afresh, so a
    fake output must not inherit a permuted argument's strides as torch.empty_like would."""
    return like.new_empty(like.shape)


def _tokens(input: Tensor):
    """Rows of the op's sequence: input is [tokens, I], or [T, B, I] for a full-length batch (csrc/ops.cpp)."""
    return input.shape[0] * input.shape[1] if input.dim() == 3 else input.shape[0]


def _sequence_like(input: Tensor, features) -> Tensor:
    """An output of the sequence: [tokens, features], or [T, B, features] for a 3-D input."""
    return input.new_empty(*input.shape[:-1], features)


def _register():
    lib = "fusedrnn::"

    # ---- fake kernels: shapes only ------------------------------------------------------
    @torch.library.register_fake(lib + "lstm_forward")
    def _lstm_fwd_fake(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse):
        _check_like("lstm_forward", input, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_hr=w_hr)
        n, h = _tokens(input), w_hh.shape[0] // 4
        return (_sequence_like(input, h0.shape[-1]), _fresh(h0), _fresh(c0),
                input.new_empty(n, 4 * h), input.new_empty(n, h))

    @torch.library.register_fake(lib + "lstm_backward")
    def _lstm_bwd_fake(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr, batch_sizes,
                       reverse, need_grad_input, output, gates, cells, need_grad_h0=True):
        g = w_hh.shape[0]
        return (_grad_input_like(input, need_grad_input), _grad_h0_like(h0, need_grad_h0), _fresh(c0), _fresh(w_ih),
                _fresh(w_hh), input.new_empty(g), input.new_empty(g),
                _fresh(w_hr) if w_hr is not None else input.new_empty(0))

    @torch.library.register_fake(lib + "gru_forward")
    def _gru_fwd_fake(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse):
        _check_like("gru_forward", input, h0=h0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
        n, h = _tokens(input), w_hh.shape[0] // 3
        return _sequence_like(input, h), _fresh(h0), input.new_empty(n, 3 * h), input.new_empty(n, h)

    def _simple_bwd_fake(input, h0, w_ih, w_hh, need_grad_input, need_grad_h0):
        g = w_hh.shape[0]
        return (_grad_input_like(input, need_grad_input), _grad_h0_like(h0, need_grad_h0), _fresh(w_ih), _fresh(w_hh),
                input.new_empty(g), input.new_empty(g))

    @torch.library.register_fake(lib + "gru_backward")
    def _gru_bwd_fake(grad_output, grad_h_n, input, h0, w_ih, w_hh, batch_sizes, reverse, need_grad_input,
                      output, gates, hn, need_grad_h0=True):
        return _simple_bwd_fake(input, h0, w_ih, w_hh, need_grad_input, need_grad_h0)

    def _rnn_bwd_fake(grad_output, grad_h_n, input, h0, w_ih, w_hh, batch_sizes, reverse, need_grad_input,
                      output, need_grad_h0=True):
        return _simple_bwd_fake(input, h0, w_ih, w_hh, need_grad_input, need_grad_h0)

    @torch.library.register_fake(lib + "lstm_inference")
    def _lstm_inference_fake(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse):
        _check_like("lstm_inference", input, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_hr=w_hr)
        return _sequence_like(input, h0.shape[-1]), _fresh(h0), _fresh(c0)

    @torch.library.register_fake(lib + "gru_inference")
    def _gru_inference_fake(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse):
        _check_like("gru_inference", input, h0=h0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
        return _sequence_like(input, w_hh.shape[0] // 3), _fresh(h0)

    def _rnn_fwd_fake(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse):
        _check_like("rnn_forward", input, h0=h0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
        return _sequence_like(input, w_hh.shape[0]), _fresh(h0)

    for act in ("tanh", "relu"):
        torch.library.register_fake(f"{lib}rnn_{act}_forward", _rnn_fwd_fake)
        torch.library.register_fake(f"{lib}rnn_{act}_backward", _rnn_bwd_fake)

    # ---- autograd -------------------------------------------------------------------------
    def _bias_grads(ctx, g_b_ih, g_b_hh):
        return (g_b_ih if ctx.has_b_ih else None), (g_b_hh if ctx.has_b_hh else None)

    def _lstm_setup(ctx, inputs, output):
        input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse = inputs
        out, _, _, gates, cells = output
        ctx.mark_non_differentiable(gates, cells)
        ctx.set_materialize_grads(False)  # no zero-filled [N, 4H] + [N, H] grads for gates and cells
        # The biases only for double backward (_differentiable_vjp): saving them copies nothing.
        ctx.save_for_backward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, out, gates, cells)
        ctx.reverse, ctx.has_b_ih, ctx.has_b_hh = reverse, b_ih is not None, b_hh is not None

    def _lstm_backward(ctx, g_out, g_hn, g_cn, _g_gates, _g_cells):
        input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, out, gates, cells = ctx.saved_tensors
        # At one step, w_hr reaches only out and h_n (c_n does not depend on it): with neither of their
        # gradients, torch.nn's graph gives w_hr none (None), and optimizers skip it.
        one_step = isinstance(batch_sizes.shape[0], int) and batch_sizes.shape[0] == 1
        w_hr_reached = g_out is not None or g_hn is not None or not one_step
        if torch.is_grad_enabled():  # create_graph=True, or torch.func.grad: differentiable
            grads = (_zeros_like_if_none(g_out, out), _zeros_like_if_none(g_hn, h0), _zeros_like_if_none(g_cn, c0))
            result = _differentiable_vjp(ctx, "lstm", grads, (input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr),
                                         batch_sizes, (out, gates, cells))
            return result if w_hr_reached else (*result[:7], None, *result[8:])
        gi, gh0, gc0, gwih, gwhh, gbih, gbhh, gwhr = _call(
            "lstm_backward",
            _unused_grad(g_out, out), _unused_grad(g_hn, h0), _unused_grad(g_cn, c0),
            input, h0, c0, w_ih, w_hh, w_hr, batch_sizes, ctx.reverse, ctx.needs_input_grad[0], out, gates, cells,
            ctx.needs_input_grad[1])
        gbih, gbhh = _bias_grads(ctx, gbih, gbhh)
        return (gi if ctx.needs_input_grad[0] else None), (gh0 if ctx.needs_input_grad[1] else None), gc0, gwih, gwhh, gbih, gbhh, (gwhr if w_hr is not None and w_hr_reached else None), None, None

    _register_autograd("lstm_forward", _lstm_backward, _lstm_setup)

    def _gru_setup(ctx, inputs, output):
        input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse = inputs
        out, _, gates, hn = output
        ctx.mark_non_differentiable(gates, hn)
        ctx.set_materialize_grads(False)  # no zero-filled [N, 3H] + [N, H] grads for gates and hn
        ctx.save_for_backward(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, out, gates, hn)
        ctx.reverse, ctx.has_b_ih, ctx.has_b_hh = reverse, b_ih is not None, b_hh is not None

    def _gru_backward(ctx, g_out, g_hn, _g_gates, _g_hn_pre):
        input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, out, gates, hn = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True, or torch.func.grad: differentiable
            grads = (_zeros_like_if_none(g_out, out), _zeros_like_if_none(g_hn, h0))
            return _differentiable_vjp(ctx, "gru", grads, (input, h0, w_ih, w_hh, b_ih, b_hh), batch_sizes,
                                       (out, gates, hn))
        gi, gh0, gwih, gwhh, gbih, gbhh = _call(
            "gru_backward",
            _unused_grad(g_out, out), _unused_grad(g_hn, h0), input, h0, w_ih, w_hh,
            batch_sizes, ctx.reverse, ctx.needs_input_grad[0], out, gates, hn, ctx.needs_input_grad[1])
        gbih, gbhh = _bias_grads(ctx, gbih, gbhh)
        return (gi if ctx.needs_input_grad[0] else None), (gh0 if ctx.needs_input_grad[1] else None), gwih, gwhh, gbih, gbhh, None, None

    _register_autograd("gru_forward", _gru_backward, _gru_setup)

    def _rnn_autograd(act):

        def setup(ctx, inputs, output):
            input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse = inputs
            ctx.set_materialize_grads(False)  # an unused h_n or output: None, filled by the backward
            ctx.save_for_backward(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, output[0])
            ctx.reverse, ctx.has_b_ih, ctx.has_b_hh = reverse, b_ih is not None, b_hh is not None

        def backward(ctx, g_out, g_hn):
            input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, out = ctx.saved_tensors
            if torch.is_grad_enabled():  # create_graph=True, or torch.func.grad: differentiable
                grads = (_zeros_like_if_none(g_out, out), _zeros_like_if_none(g_hn, h0))
                return _differentiable_vjp(ctx, f"rnn_{act}", grads, (input, h0, w_ih, w_hh, b_ih, b_hh),
                                           batch_sizes, (out,))
            gi, gh0, gwih, gwhh, gbih, gbhh = _call(
                f"rnn_{act}_backward",
                _unused_grad(g_out, out), _unused_grad(g_hn, h0), input, h0, w_ih, w_hh,
                batch_sizes, ctx.reverse, ctx.needs_input_grad[0], out, ctx.needs_input_grad[1])
            gbih, gbhh = _bias_grads(ctx, gbih, gbhh)
            return (gi if ctx.needs_input_grad[0] else None), (gh0 if ctx.needs_input_grad[1] else None), gwih, gwhh, gbih, gbhh, None, None

        _register_autograd(f"rnn_{act}_forward", backward, setup)

    for act in ("tanh", "relu"):
        _rnn_autograd(act)
    for name in INFERENCE_OPS:
        _reject_inference_backward(name)
    for name in OPS:
        if name.endswith("_backward"):
            _reject_double_backward(name)
        _register_vmap_loop(name)


if COMPILED:
    _register()


# ---- one layer, one direction: the compiled op, or the reference ----------------------------
# TorchScript compiles only the torch.ops calls: torch.jit.is_scripting() is a compile-time
# constant there, so the eager-only branches (reference fallback, functorch) are never compiled.
#
# Calls that need no gradient (torch.no_grad, inference_mode, or no argument requiring grad)
# skip the op's autograd kernel: torch.library's is a Python function that the dispatcher calls
# back into only to find that no gradient is needed and redispatch below autograd (a Python
# round trip of ~10-20 us, as much as a whole small cell; benchmarks/NOTES.md, entry 15). Here
# the op is called below autograd directly, which is what that kernel would have done. Not
# while tracing (torch.compile, torch.export: they see the op as before) nor inside a
# forward-mode AD level (tangents go through the autograd key).
_below_autograd = torch._C._AutoDispatchBelowAutograd
_any_requires_grad = torch._C._any_requires_grad
_forward_ad = torch.autograd.forward_ad


#
# Calls that need a gradient, eager and untraced, go through the op's autograd.Function twin with
# its forward called below autograd (_EAGER_FUNCTIONS): the same formula (setup_context, backward,
# higher derivatives: _register_autograd) as torch.library's kernel, minus its Python wrapping
# (argument defaults filled from the schema, a metadata object, the redispatch) on every call:
# LSTMCell B=1 H=128 training step 8-9% faster, entry 15. Traced calls keep the registered
# kernel, which is what torch.compile / export / make_fx see.
_NO_GRAD, _EAGER_GRAD, _DISPATCHER, _FUNCTORCH, _REFERENCE = 0, 1, 2, 3, 4
_functorch_level = torch._C._functorch.maybe_current_level
_is_tracing = torch._C._is_tracing
_dispatch_modes = torch._C._len_torch_dispatch_stack
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled


def plain_eager() -> bool:
    """The usual eager call that _route's first test recognises: compiled ops, no functorch level, no
    forward-AD level, not compiling or tracing, no dispatch mode; such a call runs the op itself (below
    autograd or through the eager autograd node), never fusedrnn.reference or the functorch twins."""
    return (_functorch_level() is None and _forward_ad._current_level < 0 and COMPILED and not _is_compiling()
            and not _is_tracing() and _dispatch_modes() == 0)


def _route(*tensors) -> int:
    """How a layer call runs (see above): on fusedrnn.reference (_forward_mode), through the op's
    functorch twin, below autograd (_NO_GRAD), through the eager Function (_EAGER_GRAD), or through
    the dispatcher. The usual eager call is decided by the first test, a few C calls: a small call's
    whole budget is ~10-20 us (benchmarks/NOTES.md, entries 15 and 16)."""
    if _functorch_level() is None and _forward_ad._current_level < 0 and COMPILED:
        if _is_compiling() or _is_tracing() or _dispatch_modes() != 0:
            return _DISPATCHER
        if not _grad_enabled() or not _any_requires_grad(*tensors):
            return _NO_GRAD
        return _EAGER_GRAD
    if not COMPILED or _forward_mode(*tensors):
        return _REFERENCE
    if _functorch_active():
        return _FUNCTORCH
    if not _untraced():
        return _DISPATCHER
    if not torch.is_grad_enabled() or not _any_requires_grad(*tensors):
        return _NO_GRAD
    return _EAGER_GRAD


_EAGER_FUNCTIONS: Dict[str, Type[torch.autograd.Function]] = {}


def _make_eager_functions() -> None:
    for name in ("lstm_forward", "gru_forward", "rnn_tanh_forward", "rnn_relu_forward"):
        twin = _FUNCTORCH_FUNCTIONS[name]
        op = _RAW_OPS[name]

        _EAGER_FUNCTIONS[name] = _eager_function(twin, op)


def _eager_function(twin: Type[torch.autograd.Function], op) -> Type[torch.autograd.Function]:
    """twin's formula as an old-style Function (forward takes ctx and runs twin's setup_context
    itself, as torch.library's does): a new-style one has torch bind its forward's signature with
    inspect on every apply, a few us."""

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            with _below_autograd():
                output = op(*args)
            twin.setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return twin.backward(ctx, *grads)

    Eager.__name__ = Eager.__qualname__ = twin.__name__
    return Eager


class _VJPContext:
    """What _differentiable_vjp reads from an autograd context, for the C++ Functions' calls."""
    __slots__ = ("reverse", "needs_input_grad")

    def __init__(self, reverse: bool, needs_input_grad):
        self.reverse, self.needs_input_grad = reverse, needs_input_grad


def _eager_differentiable_vjp(kind: str, reverse: bool, grads, primals, needs_grad, batch_sizes: Tensor, saved):
    """fusedrnn::eager_differentiable_vjp: the C++ autograd Functions' backward with grad mode on
    (create_graph=True) is the Python formulas' (_differentiable_vjp: _FirstOrderGrads), so double
    and higher backward are one code path for both. Returns the gradients of the primals that are
    present and need one, in order (csrc/autograd/eager_autograd.cpp maps them back)."""
    result = _differentiable_vjp(_VJPContext(reverse, tuple(needs_grad)), kind, tuple(grads), tuple(primals),
                                 batch_sizes, tuple(saved))
    return [g for g in result[:len(primals)] if g is not None]


# Eager training calls (_EAGER_GRAD): the forward ops wrapped in C++ autograd Functions
# (csrc/autograd/eager_autograd.cpp), whose plain backward calls the backward op without entering
# Python (benchmarks/NOTES.md, "C++ autograd for the small training calls"). A library built before
# them: the Python Functions above (_EAGER_FUNCTIONS), the same formulas.
_CPP_AUTOGRAD = COMPILED and hasattr(torch.ops.fusedrnn, "eager_lstm_forward")
_LIB = None
if _CPP_AUTOGRAD:
    _LIB = torch.library.Library("fusedrnn", "IMPL")
    _LIB.impl("eager_differentiable_vjp", _eager_differentiable_vjp, "CompositeImplicitAutograd")

if COMPILED:
    _RAW_OPS.update({name: _raw(getattr(torch.ops.fusedrnn, name).default) for name in OPS})
    _LSTM_INFERENCE = _RAW_OPS["lstm_inference"]
    _GRU_INFERENCE = _RAW_OPS["gru_inference"]
    _RNN_FORWARD = {"tanh": _RAW_OPS["rnn_tanh_forward"], "relu": _RAW_OPS["rnn_relu_forward"]}
    _make_eager_functions()
    if _CPP_AUTOGRAD:
        _TRAIN_LSTM = _raw(torch.ops.fusedrnn.eager_lstm_forward.default)
        _TRAIN_GRU = _raw(torch.ops.fusedrnn.eager_gru_forward.default)
        _TRAIN_RNN = {"tanh": _raw(torch.ops.fusedrnn.eager_rnn_tanh_forward.default),
                      "relu": _raw(torch.ops.fusedrnn.eager_rnn_relu_forward.default)}
    else:
        _TRAIN_LSTM = _EAGER_FUNCTIONS["lstm_forward"].apply
        _TRAIN_GRU = _EAGER_FUNCTIONS["gru_forward"].apply
        _TRAIN_RNN = {act: _EAGER_FUNCTIONS[f"rnn_{act}_forward"].apply for act in ("tanh", "relu")}

def _grad_possible(tensors: List[Optional[Tensor]]) -> bool:
    """Whether autograd could take a gradient of a call on these tensors: grad mode on and one of
    them requiring grad. Plain Python that dynamo, torch.export and TorchScript can all follow
    (torch._C._any_requires_grad is opaque to dynamo)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def lstm_layer(input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
               b_hh: Optional[Tensor], w_hr: Optional[Tensor], batch_sizes: Tensor,
               reverse: bool) -> Tuple[Tensor, Tensor, Tensor]:
    if not torch.jit.is_scripting():
        route = _route(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
        if route == _REFERENCE:
            return reference.lstm_layer(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse)
        if route == _FUNCTORCH:
            out, h, c, _, _ = _FUNCTORCH_FUNCTIONS["lstm_forward"].apply(input, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                                                         w_hr, batch_sizes, reverse)
            return out, h, c
        if route == _NO_GRAD:
            with _below_autograd():
                out, h, c = _LSTM_INFERENCE(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse)
            return out, h, c
        if route == _EAGER_GRAD:
            out, h, c, _, _ = _TRAIN_LSTM(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse)
            return out, h, c
    # Traced (torch.compile, torch.export, make_fx, jit.trace) or TorchScript: the graph gets the
    # inference op when no gradient can be taken here.
    if not _grad_possible([input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr]):
        out, h, c = torch.ops.fusedrnn.lstm_inference(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes,
                                                      reverse)
        return out, h, c
    out, h, c, _, _ = torch.ops.fusedrnn.lstm_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes,
                                                      reverse)
    return out, h, c


def gru_layer(input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
              b_hh: Optional[Tensor], batch_sizes: Tensor, reverse: bool) -> Tuple[Tensor, Tensor]:
    if not torch.jit.is_scripting():
        route = _route(input, h0, w_ih, w_hh, b_ih, b_hh)
        if route == _REFERENCE:
            return reference.gru_layer(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)
        if route == _FUNCTORCH:
            out, h, _, _ = _FUNCTORCH_FUNCTIONS["gru_forward"].apply(input, h0, w_ih, w_hh, b_ih, b_hh,
                                                                     batch_sizes, reverse)
            return out, h
        if route == _NO_GRAD:
            with _below_autograd():
                out, h = _GRU_INFERENCE(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)
            return out, h
        if route == _EAGER_GRAD:
            out, h, _, _ = _TRAIN_GRU(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)
            return out, h
    if not _grad_possible([input, h0, w_ih, w_hh, b_ih, b_hh]):
        out, h = torch.ops.fusedrnn.gru_inference(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)
        return out, h
    out, h, _, _ = torch.ops.fusedrnn.gru_forward(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)
    return out, h


def rnn_layer(nonlinearity: str, input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
              b_hh: Optional[Tensor], batch_sizes: Tensor, reverse: bool) -> Tuple[Tensor, Tensor]:
    if not torch.jit.is_scripting():
        route = _route(input, h0, w_ih, w_hh, b_ih, b_hh)
        if route == _REFERENCE:
            return reference.rnn_layer(nonlinearity, input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)
        if route == _FUNCTORCH:
            out, h = _FUNCTORCH_FUNCTIONS[f"rnn_{nonlinearity}_forward"].apply(input, h0, w_ih, w_hh, b_ih, b_hh,
                                                                               batch_sizes, reverse)
            return out, h
        if route == _NO_GRAD:
            with _below_autograd():
                out, h = _RNN_FORWARD[nonlinearity](input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)
            return out, h
        if route == _EAGER_GRAD:
            out, h = _TRAIN_RNN[nonlinearity](input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)
            return out, h
    if nonlinearity == "tanh":
        return torch.ops.fusedrnn.rnn_tanh_forward(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)
    return torch.ops.fusedrnn.rnn_relu_forward(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)
