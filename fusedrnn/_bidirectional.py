"""Both directions of a bidirectional layer through one op pair: fusedrnn::bidirectional_forward and
bidirectional_backward (csrc/persistent/persistent_bidirectional.h). On CUDA, where the persistent
path is chosen for the layer and both directions' grids are co-resident, each recurrence (forward,
and backward's reverse-time one) is ONE launch of the persistent kernel for both directions instead
of two launches one after the other; every other case runs each direction exactly as the
one-direction ops do, inside the op. A ragged batch's device-written schedule is built once by the
forward and saved for the backward.

fusedrnn.functional.rnn_packed calls `layer` for every bidirectional layer; it returns None where
the op pair does not serve the call (no compiled op, LSTM projection, forward-mode AD or a functorch
transform, a device or dtype it does not take), and the caller runs the directions one by one as
before. Autograd: the plain backward is the fused backward op; with grad mode on (create_graph=True)
each direction's backward is today's differentiable one (_ops._differentiable_vjp: the fused
one-direction backward op, differentiated through fusedrnn.reference).

On the CPU the ops run the persistent kernels' own source on the CPU kernel runner (exact, slow):
CPU layers take this route only when a test sets RUNNER_ON_CPU.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _ops

KINDS = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}
AVAILABLE = _ops.COMPILED and hasattr(torch.ops.fusedrnn, "bidirectional_forward")
# The dtypes the persistent kernels have on CUDA (the plan sends float64 to the per-step path anyway).
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HIDDEN = 128  # csrc/persistent/persistent_limits.h kMaxHidden; the plan checks it again
# Off: every bidirectional layer runs one direction at a time (benchmarks/bidirectional.py times both).
ENABLED = True
# Tests: route CPU layers through the ops too (the kernel runner; every dtype and size, the C++ plan
# choosing as on CUDA).
RUNNER_ON_CPU = False

LayerOutputs = Tuple[Tensor, Tensor, Optional[Tensor]]


def may_take(x: Tensor) -> bool:
    """The cheap first test: a CUDA layer (or a CPU one under RUNNER_ON_CPU) with the ops compiled."""
    return AVAILABLE and ENABLED and (x.is_cuda or (RUNNER_ON_CPU and x.device.type == "cpu"))


def _takes(x: Tensor, w_hh: Tensor, gates: int, w_hr_f: Optional[Tensor], w_hr_b: Optional[Tensor]) -> bool:
    if not AVAILABLE or w_hr_f is not None or w_hr_b is not None:
        return False
    if x.device.type == "cuda":
        return x.dtype in _CUDA_DTYPES and w_hh.shape[0] // gates <= MAX_HIDDEN
    return x.device.type == "cpu" and RUNNER_ON_CPU


def layer(mode: str, x: Tensor, h0: Tensor, h0_reverse: Tensor, c0: Optional[Tensor], c0_reverse: Optional[Tensor],
          weights, weights_reverse, batch_sizes: Tensor) -> Optional[Tuple[LayerOutputs, LayerOutputs]]:
    """Both directions of one layer (arguments already in their run dtype), or None (see above)."""
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r = weights_reverse
    kind = KINDS[mode]
    if not _takes(x, w_hh, _GATES[kind], w_hr, w_hr_r):
        return None
    tensors = (x, h0, h0_reverse, c0, c0_reverse, w_ih, w_hh, b_ih, b_hh, w_ih_r, w_hh_r, b_ih_r, b_hh_r)
    route = _ops._route(*tensors)
    if route == _ops._REFERENCE or route == _ops._FUNCTORCH:
        return None
    if route == _ops._DISPATCHER and torch.onnx.is_in_onnx_export():
        return None  # fusedrnn/onnx.py translates the one-direction ops to ONNX's operators, not this pair
    args = (kind, *tensors, batch_sizes)
    if route == _ops._NO_GRAD:
        with _ops._below_autograd():
            r = _FORWARD(*args)
    elif route == _ops._EAGER_GRAD:  # the same formula as the dispatcher's, minus torch.library's wrapping
        r = _EAGER(*args)
    else:
        r = torch.ops.fusedrnn.bidirectional_forward(*args)
    lstm = kind == "lstm"
    return (r[0], r[1], r[2] if lstm else None), (r[5], r[6], r[7] if lstm else None)


_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
_FORWARD = None  # the op's C++ entry point (eager calls below autograd)
_EAGER = None  # eager training calls: an autograd.Function with _setup / _backward (_ops._eager_function)


def _fake_forward(cell, input, h0, h0_reverse, c0, c0_reverse, w_ih, w_hh, b_ih, b_hh, w_ih_reverse, w_hh_reverse,
                  b_ih_reverse, b_hh_reverse, batch_sizes):
    _ops._check_like("bidirectional_forward", input, h0=h0, h0_reverse=h0_reverse, c0=c0, c0_reverse=c0_reverse,
                     w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_ih_reverse=w_ih_reverse,
                     w_hh_reverse=w_hh_reverse, b_ih_reverse=b_ih_reverse, b_hh_reverse=b_hh_reverse)
    g = _GATES[cell]
    n, h = input.shape[0], w_hh.shape[0] // g
    out = []
    for state in (h0, h0_reverse):
        out += [input.new_empty(n, h), _ops._fresh(state),
                _ops._fresh(state) if cell == "lstm" else input.new_empty(0),
                input.new_empty(n, g * h) if g > 1 else input.new_empty(0),
                input.new_empty(n, h) if g > 1 else input.new_empty(0)]
    out.append(input.new_empty(2, batch_sizes.shape[0], dtype=torch.long))
    return tuple(out)


def _fake_backward(cell, grad_output, grad_output_reverse, grad_h_n, grad_h_n_reverse, grad_c_n, grad_c_n_reverse,
                   input, h0, h0_reverse, c0, c0_reverse, w_ih, w_hh, w_ih_reverse, w_hh_reverse, batch_sizes,
                   need_grad_input, output, gates, extra, output_reverse, gates_reverse, extra_reverse, schedule):
    out = [_ops._grad_input_like(input, need_grad_input)]
    for state, wi, wh in ((h0, w_ih, w_hh), (h0_reverse, w_ih_reverse, w_hh_reverse)):
        out += [_ops._fresh(state), _ops._fresh(state) if cell == "lstm" else input.new_empty(0), _ops._fresh(wi),
                _ops._fresh(wh), input.new_empty(wh.shape[0]), input.new_empty(wh.shape[0])]
    return tuple(out)


def _setup(ctx, inputs, output):
    (cell, input, h0, h0_r, c0, c0_r, w_ih, w_hh, b_ih, b_hh, w_ih_r, w_hh_r, b_ih_r, b_hh_r, batch_sizes) = inputs
    out, _, c_n, gates, extra, out_r, _, c_n_r, gates_r, extra_r, schedule = output
    ctx.mark_non_differentiable(gates, extra, gates_r, extra_r, schedule)
    if cell != "lstm":
        ctx.mark_non_differentiable(c_n, c_n_r)  # empty placeholders
    ctx.set_materialize_grads(False)  # unused outputs: None, filled by the backward
    ctx.save_for_backward(input, h0, h0_r, c0, c0_r, w_ih, w_hh, b_ih, b_hh, w_ih_r, w_hh_r, b_ih_r, b_hh_r,
                          batch_sizes, out, gates, extra, out_r, gates_r, extra_r, schedule)
    ctx.cell = cell


def _backward(ctx, g_out, g_hn, g_cn, _g_gates, _g_extra, g_out_r, g_hn_r, g_cn_r, _g_gates_r, _g_extra_r, _g_sched):
    (input, h0, h0_r, c0, c0_r, w_ih, w_hh, b_ih, b_hh, w_ih_r, w_hh_r, b_ih_r, b_hh_r, batch_sizes, out, gates,
     extra, out_r, gates_r, extra_r, schedule) = ctx.saved_tensors
    cell, lstm = ctx.cell, ctx.cell == "lstm"
    needs = ctx.needs_input_grad  # cell, input, h0, h0_r, c0, c0_r, w_ih, w_hh, b_ih, b_hh, w_ih_r, ...
    if torch.is_grad_enabled():  # create_graph=True: each direction's differentiable backward, as today
        return _differentiable_backward(ctx, (g_out, g_hn, g_cn), (g_out_r, g_hn_r, g_cn_r))
    grads = _ops._call(
        "bidirectional_backward", cell, _ops._unused_grad(g_out, out), _ops._unused_grad(g_out_r, out_r),
        _ops._unused_grad(g_hn, h0), _ops._unused_grad(g_hn_r, h0_r),
        _ops._unused_grad(g_cn, c0) if lstm else None, _ops._unused_grad(g_cn_r, c0_r) if lstm else None,
        input, h0, h0_r, c0, c0_r, w_ih, w_hh, w_ih_r, w_hh_r, batch_sizes, needs[1], out, gates, extra, out_r,
        gates_r, extra_r, schedule)
    g_input, gh0, gc0, gwih, gwhh, gbih, gbhh, gh0_r, gc0_r, gwih_r, gwhh_r, gbih_r, gbhh_r = grads
    return (None, g_input if needs[1] else None, gh0, gh0_r, gc0 if lstm else None, gc0_r if lstm else None,
            gwih, gwhh, gbih if b_ih is not None else None, gbhh if b_hh is not None else None,
            gwih_r, gwhh_r, gbih_r if b_ih_r is not None else None, gbhh_r if b_hh_r is not None else None, None)


def _differentiable_backward(ctx, grads, grads_r):
    """Double backward: each direction through _ops._differentiable_vjp, the one-direction forward op's
    formula with grad mode on (fusedrnn.reference differentiates the fused first derivatives)."""
    (input, h0, h0_r, c0, c0_r, w_ih, w_hh, b_ih, b_hh, w_ih_r, w_hh_r, b_ih_r, b_hh_r, batch_sizes, out, gates,
     extra, out_r, gates_r, extra_r, _) = ctx.saved_tensors
    cell, needs = ctx.cell, ctx.needs_input_grad
    lstm = cell == "lstm"
    result = [None] * 15
    per_direction = (
        (grads, (input, h0, c0, w_ih, w_hh, b_ih, b_hh), (out, gates, extra), (1, 2, 4, 6, 7, 8, 9), False),
        (grads_r, (input, h0_r, c0_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r), (out_r, gates_r, extra_r),
         (1, 3, 5, 10, 11, 12, 13), True),
    )
    for (g_out, g_hn, g_cn), primals, saved, where, reverse in per_direction:
        x, h, c, wi, wh, bi, bh = primals
        g = [_ops._zeros_like_if_none(g_out, out), _ops._zeros_like_if_none(g_hn, h)]
        if lstm:
            g.append(_ops._zeros_like_if_none(g_cn, c))
            one, one_where, saved_one = (x, h, c, wi, wh, bi, bh, None), where + (None,), saved
        else:
            one, one_where = (x, h, wi, wh, bi, bh), (where[0], where[1]) + where[3:]
            saved_one = saved if cell == "gru" else saved[:1]
        vctx = _ops._VJPContext(reverse, tuple(i is not None and needs[i] for i in one_where))
        r = _ops._differentiable_vjp(vctx, cell, tuple(g), one, batch_sizes, saved_one)
        for i, gi in zip(one_where, r):
            if i is None or gi is None:
                continue
            result[i] = gi if result[i] is None else result[i] + gi
    return tuple(result)


def _reject_double_backward(ctx, *grads):
    raise RuntimeError(
        "fusedrnn.bidirectional_backward: differentiating the backward op itself is not supported (its saved "
        "forward outputs are caches, not free inputs). For double backward, differentiate through "
        "fusedrnn.bidirectional_forward or the fusedrnn layers with create_graph=True")


def _register() -> None:
    global _FORWARD, _EAGER
    lib = "fusedrnn::"
    torch.library.register_fake(lib + "bidirectional_forward")(_fake_forward)
    torch.library.register_fake(lib + "bidirectional_backward")(_fake_backward)
    torch.library.register_autograd(lib + "bidirectional_forward", _backward, setup_context=_setup)
    torch.library.register_autograd(lib + "bidirectional_backward", _reject_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)
    _FORWARD = _ops._raw(torch.ops.fusedrnn.bidirectional_forward.default)

    class FusedRNN_bidirectional_forward:  # the name autograd graphs show
        setup_context = staticmethod(_setup)
        backward = staticmethod(_backward)

    _EAGER = _ops._eager_function(FusedRNN_bidirectional_forward, _FORWARD).apply


if AVAILABLE:
    _register()
