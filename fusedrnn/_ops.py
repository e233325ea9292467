"""Loads the compiled operator library and registers, for each op, its fake
(meta) kernel and its autograd formula; then exposes one function per cell
type that runs one layer in one direction on the compiled op, or on
fusedrnn.reference when the library could not be loaded.
"""

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import reference

LOAD_ERROR: Optional[str] = None
_C = None
try:
    from . import _C  # type: ignore[no-redef]  # registers torch.ops.fusedrnn.*
except Exception as e:  # ImportError, OSError: missing, or built against another torch
    LOAD_ERROR = f"{type(e).__name__}: {e}"
else:
    _built = getattr(_C, "TORCH_VERSION", "unknown")
    if _built.split("+")[0].split(".")[:2] != torch.__version__.split("+")[0].split(".")[:2]:
        LOAD_ERROR = f"compiled against torch {_built}, but torch {torch.__version__} is installed; reinstall fusedrnn"

COMPILED = LOAD_ERROR is None
if not COMPILED:
    warnings.warn(
        "fusedrnn: the compiled operators could not be loaded, so the slow pure-PyTorch reference "
        f"implementation will run instead ({LOAD_ERROR}). Reinstall with "
        "`pip install --no-build-isolation .` against the installed torch.",
        RuntimeWarning,
        stacklevel=2,
    )

OPS = (
    "lstm_forward", "lstm_backward", "gru_forward", "gru_backward",
    "rnn_tanh_forward", "rnn_tanh_backward", "rnn_relu_forward", "rnn_relu_backward",
)


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
    return torch.zeros_like(like) if grad is None else grad


def _reject_double_backward(name: str):
    """Autograd for a backward op: differentiating a gradient again is not
    implemented, so say so instead of silently returning zeros."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(
            f"fusedrnn.{name}: double backward (differentiating through a gradient computed with "
            "create_graph=True) is not supported by fusedrnn's fused kernels")

    torch.library.register_autograd(f"fusedrnn::{name}", backward, setup_context=setup_context)


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
    return torch.empty_like(input) if needed else input.new_empty(0)


def _register():
    lib = "fusedrnn::"

    # ---- fake kernels: shapes only ------------------------------------------------------
    @torch.library.register_fake(lib + "lstm_forward")
    def _lstm_fwd_fake(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse):
        _check_like("lstm_forward", input, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_hr=w_hr)
        n, h = input.shape[0], w_hh.shape[0] // 4
        return (input.new_empty(n, h0.shape[1]), torch.empty_like(h0), torch.empty_like(c0),
                input.new_empty(n, 4 * h), input.new_empty(n, h))

    @torch.library.register_fake(lib + "lstm_backward")
    def _lstm_bwd_fake(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr, batch_sizes,
                       reverse, need_grad_input, output, gates, cells):
        g = w_hh.shape[0]
        return (_grad_input_like(input, need_grad_input), torch.empty_like(h0), torch.empty_like(c0), torch.empty_like(w_ih),
                torch.empty_like(w_hh), input.new_empty(g), input.new_empty(g),
                torch.empty_like(w_hr) if w_hr is not None else input.new_empty(0))

    @torch.library.register_fake(lib + "gru_forward")
    def _gru_fwd_fake(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse):
        _check_like("gru_forward", input, h0=h0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
        n, h = input.shape[0], w_hh.shape[0] // 3
        return input.new_empty(n, h), torch.empty_like(h0), input.new_empty(n, 3 * h), input.new_empty(n, h)

    def _simple_bwd_fake(grad_output, grad_h_n, input, h0, w_ih, w_hh, batch_sizes, reverse, need_grad_input,
                         output, *saved):
        g = w_hh.shape[0]
        return (_grad_input_like(input, need_grad_input), torch.empty_like(h0), torch.empty_like(w_ih), torch.empty_like(w_hh),
                input.new_empty(g), input.new_empty(g))

    torch.library.register_fake(lib + "gru_backward", _simple_bwd_fake)

    def _rnn_fwd_fake(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse):
        _check_like("rnn_forward", input, h0=h0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
        return input.new_empty(input.shape[0], w_hh.shape[0]), torch.empty_like(h0)

    for act in ("tanh", "relu"):
        torch.library.register_fake(f"{lib}rnn_{act}_forward", _rnn_fwd_fake)
        torch.library.register_fake(f"{lib}rnn_{act}_backward", _simple_bwd_fake)

    # ---- autograd -------------------------------------------------------------------------
    def _bias_grads(ctx, g_b_ih, g_b_hh):
        return (g_b_ih if ctx.has_b_ih else None), (g_b_hh if ctx.has_b_hh else None)

    def _lstm_setup(ctx, inputs, output):
        input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse = inputs
        out, _, _, gates, cells = output
        ctx.mark_non_differentiable(gates, cells)
        ctx.save_for_backward(input, h0, c0, w_ih, w_hh, w_hr, batch_sizes, out, gates, cells)
        ctx.reverse, ctx.has_b_ih, ctx.has_b_hh = reverse, b_ih is not None, b_hh is not None

    def _lstm_backward(ctx, g_out, g_hn, g_cn, _g_gates, _g_cells):
        input, h0, c0, w_ih, w_hh, w_hr, batch_sizes, out, gates, cells = ctx.saved_tensors
        gi, gh0, gc0, gwih, gwhh, gbih, gbhh, gwhr = torch.ops.fusedrnn.lstm_backward(
            _zeros_like_if_none(g_out, out), _zeros_like_if_none(g_hn, h0), _zeros_like_if_none(g_cn, c0),
            input, h0, c0, w_ih, w_hh, w_hr, batch_sizes, ctx.reverse, ctx.needs_input_grad[0], out, gates, cells)
        gbih, gbhh = _bias_grads(ctx, gbih, gbhh)
        return (gi if ctx.needs_input_grad[0] else None), gh0, gc0, gwih, gwhh, gbih, gbhh, (gwhr if w_hr is not None else None), None, None

    torch.library.register_autograd(lib + "lstm_forward", _lstm_backward, setup_context=_lstm_setup)

    def _gru_setup(ctx, inputs, output):
        input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse = inputs
        out, _, gates, hn = output
        ctx.mark_non_differentiable(gates, hn)
        ctx.save_for_backward(input, h0, w_ih, w_hh, batch_sizes, out, gates, hn)
        ctx.reverse, ctx.has_b_ih, ctx.has_b_hh = reverse, b_ih is not None, b_hh is not None

    def _gru_backward(ctx, g_out, g_hn, _g_gates, _g_hn_pre):
        input, h0, w_ih, w_hh, batch_sizes, out, gates, hn = ctx.saved_tensors
        gi, gh0, gwih, gwhh, gbih, gbhh = torch.ops.fusedrnn.gru_backward(
            _zeros_like_if_none(g_out, out), _zeros_like_if_none(g_hn, h0), input, h0, w_ih, w_hh,
            batch_sizes, ctx.reverse, ctx.needs_input_grad[0], out, gates, hn)
        gbih, gbhh = _bias_grads(ctx, gbih, gbhh)
        return (gi if ctx.needs_input_grad[0] else None), gh0, gwih, gwhh, gbih, gbhh, None, None

    torch.library.register_autograd(lib + "gru_forward", _gru_backward, setup_context=_gru_setup)

    def _rnn_autograd(act):
        backward_op = getattr(torch.ops.fusedrnn, f"rnn_{act}_backward")

        def setup(ctx, inputs, output):
            input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse = inputs
            ctx.save_for_backward(input, h0, w_ih, w_hh, batch_sizes, output[0])
            ctx.reverse, ctx.has_b_ih, ctx.has_b_hh = reverse, b_ih is not None, b_hh is not None

        def backward(ctx, g_out, g_hn):
            input, h0, w_ih, w_hh, batch_sizes, out = ctx.saved_tensors
            gi, gh0, gwih, gwhh, gbih, gbhh = backward_op(
                _zeros_like_if_none(g_out, out), _zeros_like_if_none(g_hn, h0), input, h0, w_ih, w_hh,
                batch_sizes, ctx.reverse, ctx.needs_input_grad[0], out)
            gbih, gbhh = _bias_grads(ctx, gbih, gbhh)
            return (gi if ctx.needs_input_grad[0] else None), gh0, gwih, gwhh, gbih, gbhh, None, None

        torch.library.register_autograd(f"{lib}rnn_{act}_forward", backward, setup_context=setup)

    for act in ("tanh", "relu"):
        _rnn_autograd(act)
    for name in OPS:
        if name.endswith("_backward"):
            _reject_double_backward(name)


if COMPILED:
    _register()


# ---- one layer, one direction: the compiled op, or the reference ----------------------------

def lstm_layer(input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
               b_hh: Optional[Tensor], w_hr: Optional[Tensor], batch_sizes: Tensor,
               reverse: bool) -> Tuple[Tensor, Tensor, Tensor]:
    if not COMPILED:
        return reference.lstm_layer(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse)
    out, h, c, _, _ = torch.ops.fusedrnn.lstm_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes,
                                                      reverse)
    return out, h, c


def gru_layer(input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
              b_hh: Optional[Tensor], batch_sizes: Tensor, reverse: bool) -> Tuple[Tensor, Tensor]:
    if not COMPILED:
        return reference.gru_layer(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)
    out, h, _, _ = torch.ops.fusedrnn.gru_forward(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)
    return out, h


def rnn_layer(nonlinearity: str, input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
              b_hh: Optional[Tensor], batch_sizes: Tensor, reverse: bool) -> Tuple[Tensor, Tensor]:
    if not COMPILED:
        return reference.rnn_layer(nonlinearity, input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)
    op = torch.ops.fusedrnn.rnn_tanh_forward if nonlinearity == "tanh" else torch.ops.fusedrnn.rnn_relu_forward
    return op(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)
