"""The layer-normalised LSTM / GRU ops (csrc/layernorm/): fake kernels, autograd, and one function per
cell that runs one layer in one direction on the compiled op or, where it cannot, on
fusedrnn.reference (equations there).

Routing, as fusedrnn._ops does for the plain cells (and through its helpers): eager calls that need no
gradient call the inference twin (ln_*_inference: the forward's outputs without the saved-for-backward
buffers) below autograd; eager training calls go through an old-style autograd.Function twin of the
registered formula; traced calls (torch.compile, export, make_fx, jit.trace) see the registered ops, the
inference twin where no gradient can be taken (no grad mode, or nothing requiring grad).
Double backward (create_graph=True) differentiates fusedrnn.reference recomputed from the saved
inputs; forward-mode AD and torch.func transforms run fusedrnn.reference itself.
"""

import sys
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _ops, reference

OPS = ("ln_lstm_forward", "ln_lstm_backward", "ln_gru_forward", "ln_gru_backward", "ln_lstm_inference",
       "ln_gru_inference")
INFERENCE_OPS = ("ln_lstm_inference", "ln_gru_inference")
AVAILABLE = _ops.COMPILED and all(hasattr(torch.ops.fusedrnn, name) for name in OPS)

# Saved outputs after the main ones (what backward reads; not differentiable).
_LSTM_MAIN, _GRU_MAIN = 3, 2


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _double_backward(ctx, reference_fn, primals, grads, n_args: int):
    """The gradients of the forward op's arguments with a graph (create_graph=True): the vector-Jacobian
    product of fusedrnn.reference recomputed from the saved primals (original tensors, so the result is
    connected to them). Slow (a second forward), and only taken when a graph of the gradients is wanted."""
    want = [i for i, p in enumerate(primals) if isinstance(p, Tensor) and ctx.needs_input_grad[i]]
    result = [None] * n_args
    if not want:
        return tuple(result)
    with torch.enable_grad():
        outputs = reference_fn(*primals)
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None]
        got = torch.autograd.grad([o for o, _ in pairs], [primals[i] for i in want], [g for _, g in pairs],
                                  create_graph=True, allow_unused=True)
    for i, g in zip(want, got):
        result[i] = g
    return tuple(result)


def _register() -> None:
    lib = "fusedrnn::"

    @torch.library.register_fake(lib + "ln_lstm_forward")
    def _lstm_fwd_fake(input, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b, zoneout_h, zoneout_c,
                       batch_sizes, reverse, eps):
        _ops._check_like("ln_lstm_forward", input, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh,
                         ln_ih_w=ln_ih_w, ln_hh_w=ln_hh_w, ln_c_w=ln_c_w, ln_c_b=ln_c_b, zoneout_h=zoneout_h,
                         zoneout_c=zoneout_c)
        n, g, h = input.shape[0], w_hh.shape[0], w_hh.shape[1]
        return (input.new_empty(n, h), _ops._fresh(h0), _ops._fresh(c0), input.new_empty(n, g),
                input.new_empty(n, g), input.new_empty(n, g), input.new_empty(n, h), input.new_empty(n, h),
                input.new_empty(n, 3, dtype=_opmath(input.dtype)))

    @torch.library.register_fake(lib + "ln_lstm_inference")
    def _lstm_inference_fake(input, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b, zoneout_h,
                             zoneout_c, batch_sizes, reverse, eps):
        _ops._check_like("ln_lstm_inference", input, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh,
                         ln_ih_w=ln_ih_w, ln_hh_w=ln_hh_w, ln_c_w=ln_c_w, ln_c_b=ln_c_b, zoneout_h=zoneout_h,
                         zoneout_c=zoneout_c)
        return input.new_empty(input.shape[0], w_hh.shape[1]), _ops._fresh(h0), _ops._fresh(c0)

    @torch.library.register_fake(lib + "ln_gru_inference")
    def _gru_inference_fake(input, h0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w, zoneout_h, batch_sizes, reverse,
                            eps):
        _ops._check_like("ln_gru_inference", input, h0=h0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh,
                         ln_ih_w=ln_ih_w, ln_hh_w=ln_hh_w, zoneout_h=zoneout_h)
        return input.new_empty(input.shape[0], w_hh.shape[1]), _ops._fresh(h0)

    @torch.library.register_fake(lib + "ln_lstm_backward")
    def _lstm_bwd_fake(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b,
                       zoneout_h, zoneout_c, batch_sizes, reverse, need_grad_input, output, norm_x, norm_h, gates,
                       cells, norm_c, rstd):
        g, h = w_hh.shape[0], w_hh.shape[1]
        return (_ops._grad_input_like(input, need_grad_input), _ops._fresh(h0), _ops._fresh(c0), _ops._fresh(w_ih),
                _ops._fresh(w_hh), input.new_empty(g), input.new_empty(g), input.new_empty(g), input.new_empty(g),
                input.new_empty(h), input.new_empty(h))

    @torch.library.register_fake(lib + "ln_gru_forward")
    def _gru_fwd_fake(input, h0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w, zoneout_h, batch_sizes, reverse, eps):
        _ops._check_like("ln_gru_forward", input, h0=h0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh,
                         ln_ih_w=ln_ih_w, ln_hh_w=ln_hh_w, zoneout_h=zoneout_h)
        n, g, h = input.shape[0], w_hh.shape[0], w_hh.shape[1]
        return (input.new_empty(n, h), _ops._fresh(h0), input.new_empty(n, g), input.new_empty(n, g),
                input.new_empty(n, g), input.new_empty(n, 2, dtype=_opmath(input.dtype)))

    @torch.library.register_fake(lib + "ln_gru_backward")
    def _gru_bwd_fake(grad_output, grad_h_n, input, h0, w_ih, w_hh, b_hh, ln_ih_w, ln_hh_w, zoneout_h, batch_sizes,
                      reverse, need_grad_input, output, norm_x, norm_h, gates, rstd):
        g = w_hh.shape[0]
        return (_ops._grad_input_like(input, need_grad_input), _ops._fresh(h0), _ops._fresh(w_ih), _ops._fresh(w_hh),
                input.new_empty(g), input.new_empty(g), input.new_empty(g), input.new_empty(g))

    # ---- autograd ----------------------------------------------------------------------------
    def _lstm_setup(ctx, inputs, output):
        (input, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b, zoneout_h, zoneout_c, batch_sizes,
         reverse, eps) = inputs
        ctx.mark_non_differentiable(*output[_LSTM_MAIN:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b, zoneout_h,
                              zoneout_c, batch_sizes, output[0], *output[_LSTM_MAIN:])
        ctx.reverse, ctx.eps = reverse, eps

    def _lstm_backward(ctx, g_out, g_hn, g_cn, *_saved_grads):
        (input, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b, zoneout_h, zoneout_c, batch_sizes,
         out, norm_x, norm_h, gates, cells, norm_c, rstd) = ctx.saved_tensors
        grads = (_ops._zeros_like_if_none(g_out, out), _ops._zeros_like_if_none(g_hn, h0),
                 _ops._zeros_like_if_none(g_cn, c0))
        if torch.is_grad_enabled():  # create_graph=True: a differentiable result
            def ref(*p):
                return reference.ln_lstm_layer(*p[:13], batch_sizes, ctx.reverse, ctx.eps)
            primals = (input, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b, zoneout_h, zoneout_c)
            return _double_backward(ctx, ref, primals, grads, 16)
        need_input = ctx.needs_input_grad[0]
        gi, gh0, gc0, gwih, gwhh, gbih, gbhh, glnih, glnhh, glncw, glncb = _ops._call(
            "ln_lstm_backward", *grads, input, h0, c0, w_ih, w_hh, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b, zoneout_h,
            zoneout_c, batch_sizes, ctx.reverse, need_input, out, norm_x, norm_h, gates, cells, norm_c, rstd)
        return ((gi if need_input else None), gh0, gc0, gwih, gwhh, (gbih if b_ih is not None else None),
                (gbhh if b_hh is not None else None), glnih, glnhh, glncw, (glncb if ln_c_b is not None else None),
                None, None, None, None, None)

    _ops._register_autograd("ln_lstm_forward", _lstm_backward, _lstm_setup)

    def _gru_setup(ctx, inputs, output):
        input, h0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w, zoneout_h, batch_sizes, reverse, eps = inputs
        ctx.mark_non_differentiable(*output[_GRU_MAIN:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(input, h0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w, zoneout_h, batch_sizes, output[0],
                              *output[_GRU_MAIN:])
        ctx.reverse, ctx.eps = reverse, eps

    def _gru_backward(ctx, g_out, g_hn, *_saved_grads):
        (input, h0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w, zoneout_h, batch_sizes, out, norm_x, norm_h, gates,
         rstd) = ctx.saved_tensors
        grads = (_ops._zeros_like_if_none(g_out, out), _ops._zeros_like_if_none(g_hn, h0))
        if torch.is_grad_enabled():
            def ref(*p):
                return reference.ln_gru_layer(*p[:9], batch_sizes, ctx.reverse, ctx.eps)
            primals = (input, h0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w, zoneout_h)
            return _double_backward(ctx, ref, primals, grads, 12)
        need_input = ctx.needs_input_grad[0]
        gi, gh0, gwih, gwhh, gbih, gbhh, glnih, glnhh = _ops._call(
            "ln_gru_backward", *grads, input, h0, w_ih, w_hh, b_hh, ln_ih_w, ln_hh_w, zoneout_h, batch_sizes,
            ctx.reverse, need_input, out, norm_x, norm_h, gates, rstd)
        return ((gi if need_input else None), gh0, gwih, gwhh, (gbih if b_ih is not None else None),
                (gbhh if b_hh is not None else None), glnih, glnhh, None, None, None, None)

    _ops._register_autograd("ln_gru_forward", _gru_backward, _gru_setup)
    for name in INFERENCE_OPS:
        _ops._reject_inference_backward(name)
    for name in OPS:
        if name.endswith("_backward"):
            _ops._reject_double_backward(name)
        _ops._register_vmap_loop(name)


def _register_onnxscript(registration) -> None:
    """The torch.export-based ONNX exporter (dynamo=True) captures the ops themselves, before any Python
    could route to the reference: a translation that says so and names the exporter that works."""

    def refuse(op_name):
        def translation(*args, **kwargs):
            raise RuntimeError(
                f"fusedrnn.{op_name}: the torch.export-based ONNX exporter (dynamo=True) has no translation of the "
                "layer-normalised layers (ONNX has no such operator); export with torch.onnx.export(..., "
                "dynamo=False), which records them as standard ONNX ops (MatMul, LayerNormalization, Sigmoid, "
                "Tanh, ...) unrolled over the traced time steps")
        translation.__name__ = op_name
        return translation

    for name in ("ln_lstm_forward", "ln_gru_forward") + INFERENCE_OPS:
        qualified = f"fusedrnn::{name}"
        if qualified not in registration.default_registry:
            registration.torch_op(qualified, trace_only=True)(refuse(name))


if AVAILABLE:
    _register()
    from . import onnx as _onnx

    _onnx._after_import("onnxscript.function_libs.torch_lib.registration", _register_onnxscript)
    _EAGER_LSTM = _ops._eager_function(_ops._FUNCTORCH_FUNCTIONS["ln_lstm_forward"],
                                       torch.ops.fusedrnn.ln_lstm_forward.default)
    _EAGER_GRU = _ops._eager_function(_ops._FUNCTORCH_FUNCTIONS["ln_gru_forward"],
                                      torch.ops.fusedrnn.ln_gru_forward.default)
    _LSTM_INFERENCE = _ops._raw(torch.ops.fusedrnn.ln_lstm_inference.default)
    _GRU_INFERENCE = _ops._raw(torch.ops.fusedrnn.ln_gru_inference.default)


def _in_onnx_export() -> bool:
    """Inside torch.onnx.export: the layer is then traced as fusedrnn.reference's plain torch ops (MatMul,
    LayerNormalization, Sigmoid, Tanh, ... unrolled over the traced time steps), since ONNX has no
    layer-normalised recurrent operator. torch.onnx is only looked up, never imported here."""
    torch_onnx = sys.modules.get("torch.onnx")
    return torch_onnx is not None and torch_onnx.is_in_onnx_export()


def _use_reference(*tensors) -> bool:
    return not AVAILABLE or _ops._functorch_active() or _ops._forward_mode(*tensors) or _in_onnx_export()


def ln_lstm_layer(input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                  b_hh: Optional[Tensor], ln_ih_w: Tensor, ln_hh_w: Tensor, ln_c_w: Tensor, ln_c_b: Optional[Tensor],
                  zoneout_h: Optional[Tensor], zoneout_c: Optional[Tensor], batch_sizes: Tensor, reverse: bool,
                  eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """One layer-normalised LSTM layer, one direction (fusedrnn.reference.ln_lstm_layer's contract)."""
    args = (input, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b, zoneout_h, zoneout_c)
    if _use_reference(*args):
        return reference.ln_lstm_layer(*args, batch_sizes, reverse, eps)
    route = _ops._route(*args)
    if route == _ops._NO_GRAD:
        with _ops._below_autograd():
            result = _LSTM_INFERENCE(*args, batch_sizes, reverse, eps)
    elif route == _ops._EAGER_GRAD:
        result = _EAGER_LSTM.apply(*args, batch_sizes, reverse, eps)
    elif route == _ops._DISPATCHER and not _ops._grad_possible(list(args)):
        # Traced (torch.compile, export, make_fx, jit.trace): the graph gets the inference op.
        result = torch.ops.fusedrnn.ln_lstm_inference(*args, batch_sizes, reverse, eps)
    else:
        result = torch.ops.fusedrnn.ln_lstm_forward(*args, batch_sizes, reverse, eps)
    return result[0], result[1], result[2]


def ln_gru_layer(input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                 b_hh: Optional[Tensor], ln_ih_w: Tensor, ln_hh_w: Tensor, zoneout_h: Optional[Tensor],
                 batch_sizes: Tensor, reverse: bool, eps: float) -> Tuple[Tensor, Tensor]:
    """One layer-normalised GRU layer, one direction (fusedrnn.reference.ln_gru_layer's contract)."""
    args = (input, h0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w, zoneout_h)
    if _use_reference(*args):
        return reference.ln_gru_layer(*args, batch_sizes, reverse, eps)
    route = _ops._route(*args)
    if route == _ops._NO_GRAD:
        with _ops._below_autograd():
            result = _GRU_INFERENCE(*args, batch_sizes, reverse, eps)
    elif route == _ops._EAGER_GRAD:
        result = _EAGER_GRU.apply(*args, batch_sizes, reverse, eps)
    elif route == _ops._DISPATCHER and not _ops._grad_possible(list(args)):
        result = torch.ops.fusedrnn.ln_gru_inference(*args, batch_sizes, reverse, eps)
    else:
        result = torch.ops.fusedrnn.ln_gru_forward(*args, batch_sizes, reverse, eps)
    return result[0], result[1]
