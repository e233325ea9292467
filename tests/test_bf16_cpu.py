"""bfloat16 / float16 layers on the CPU (csrc/cpu/widened_layer.h): widened to float32 once per call, the
whole layer run by the float32 engine (or per-step loop), the results rounded to the layer's dtype once.
Judged against float64 torch.nn (the error at most 2x torch.nn's in the same dtype, forward and every
gradient) and against the float32 op on the same widened leaves (bitwise, forward)."""

import copy
import zlib

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from conftest import CELLS, flat_state, make_pair
from engine_helpers import lengths_to_batch_sizes, make_args, run_op

T, B, I, H = 30, 8, 16, 32
LENGTHS = [30, 29, 25, 25, 17, 9, 3, 1]  # ragged: rows leave the batch at many steps


def _leaves_and_outputs(module, x, hx, packed):
    """Output, final states, and the gradients of a fixed random projection of them with respect to
    the input, the initial states and every parameter, all as float64."""
    inp = pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False) if packed else x
    out, state = module(inp, hx)
    out = out.data if packed else out
    outs = [out] + flat_state(state)
    g = torch.Generator().manual_seed(7)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outs)
    leaves = [x] + flat_state(hx) + list(module.parameters())
    grads = torch.autograd.grad(loss, leaves)
    return [t.detach().double() for t in outs + list(grads)]


def _fused_twin(module64):
    """The fusedrnn module of torch.nn module64's class and configuration, with its weights."""
    fused_cls = next(f for r, f, _ in CELLS.values() if r is type(module64))
    kwargs = dict(num_layers=module64.num_layers, bidirectional=module64.bidirectional, bias=module64.bias)
    if getattr(module64, "proj_size", 0):
        kwargs["proj_size"] = module64.proj_size
    if hasattr(module64, "nonlinearity"):
        kwargs["nonlinearity"] = module64.nonlinearity
    twin = fused_cls(module64.input_size, module64.hidden_size, dtype=torch.float64, **kwargs)
    twin.load_state_dict(module64.state_dict())
    return twin


def _run_in(dtype, module64, x64, hx64, packed, rounded_to=None):
    """module64 (a copy, converted with .to(dtype)) on the leaves rounded to dtype; with rounded_to,
    the copy's weights and the leaves are rounded to that dtype first (then converted to dtype)."""
    r = (lambda t: t.to(rounded_to).to(dtype)) if rounded_to is not None else (lambda t: t.to(dtype))
    m = copy.deepcopy(module64)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(rounded_to or dtype))
    m = m.to(dtype)
    x = r(x64.detach()).requires_grad_()
    hx = tuple(r(h.detach()).requires_grad_() for h in flat_state(hx64))
    return _leaves_and_outputs(m, x, hx if len(hx) == 2 else hx[0], packed)


NAMES = ["output", "h_n", "c_n"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_proj"])
def test_error_at_most_twice_torch_nn_forward_and_every_gradient(cell, packed, bias, dtype):
    """Both directions (so reverse), ragged or full batch, with and without bias, h0 / c0 given and
    differentiated: every output and every gradient of ours is within 2x torch.nn's own error in the
    same dtype, both measured against torch.nn in float64 (the error of a tensor: the norm of its
    difference). One layer: with two, the first layer's rounded output moves the second's
    pre-activations, and at relu's kink a few elements of either side's gradients then jump by O(1)
    (their max differences were 10x apart either way between seeds, for nn as for us)."""
    torch.manual_seed(zlib.crc32(f"{cell}{packed}{bias}".encode()))
    ref64, _ = make_pair(cell, I, H, dtype=torch.float64, num_layers=1, bidirectional=True, bias=bias)
    x64 = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    real = ref64.proj_size or H
    h0 = torch.randn(2, B, real, dtype=torch.float64, requires_grad=True)
    hx64 = (h0, torch.randn(2, B, H, dtype=torch.float64, requires_grad=True)) if cell.startswith("lstm") else h0
    # The float64 reference runs on the same rounded weights and leaves as both low-precision runs, so
    # that what is compared is each one's arithmetic, not the rounding of their common inputs (which
    # would dominate both errors equally and hide a factor of 2).
    exact = _run_in(torch.float64, ref64, x64, hx64, packed, rounded_to=dtype)
    theirs = _run_in(dtype, ref64, x64, hx64, packed)
    ours = _run_in(dtype, _fused_twin(ref64), x64, hx64, packed)
    n_out = 1 + len(flat_state(hx64))
    names = NAMES[:n_out] + ["grad_x", "grad_h0", "grad_c0"][:n_out] + \
        [f"grad_{n}" for n, _ in ref64.named_parameters()]
    for name, e, t, o in zip(names, exact, theirs, ours):
        err_nn = (t - e).norm().item()
        err_ours = (o - e).norm().item()
        assert err_ours <= 2 * err_nn, (name, err_ours, err_nn)


@pytest.mark.parametrize("engine", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_half_op_is_the_float32_op_on_the_widened_leaves(cell, reverse, dtype, engine, monkeypatch):
    """The default path computes in float32 (on the engine, or with FUSEDRNN_CPU_ENGINE=0 on the float32
    per-step loop): its outputs are bitwise the float32 op's on the same (half-precision) leaves, rounded
    once; FUSEDRNN_CPU_HALF=per_step is the old path in the layer's own dtype, which rounds every step
    (so differs), and whose error against float64 is no smaller."""
    monkeypatch.delenv("FUSEDRNN_CPU_HALF", raising=False)
    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", engine)
    args = make_args(cell, 24, lengths_to_batch_sizes([9, 9, 7, 4, 4, 1]), input_size=6, bias=cell != "gru")
    half = [a.detach().to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    widened = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in half]
    got = run_op(cell, half, reverse)
    want = [o.to(dtype) for o in run_op(cell, widened, reverse)]
    assert all(g.dtype == dtype for g in got)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    monkeypatch.setenv("FUSEDRNN_CPU_HALF", "per_step")
    old = run_op(cell, half, reverse)
    assert not all(torch.equal(g, o) for g, o in zip(got, old))
    exact = run_op(cell, [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in half],
                   reverse)
    for g, o, e in zip(got, old, exact):
        assert (g.double() - e).abs().max() <= (o.double() - e).abs().max()


def test_half_gradients_match_the_float32_op_within_one_rounding():
    """Backward widens the saved half-precision tensors: the gradients are the float32 op's on the same
    leaves to within the rounding of the saved tensors (not bitwise: forward rounded them once)."""
    args = make_args("lstm", 24, lengths_to_batch_sizes([9, 9, 7, 4, 4, 1]), input_size=6)
    half = [a.detach().bfloat16().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args]
    widened = [a.detach().float().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
               for a in half]

    def grads(leaves):
        outs = run_op("lstm", leaves, False)
        g = torch.Generator().manual_seed(3)
        loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
        return torch.autograd.grad(loss, [a for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad])

    for g_half, g_float in zip(grads(half), grads(widened)):
        assert g_half.dtype == torch.bfloat16
        torch.testing.assert_close(g_half.float(), g_float, rtol=2e-2, atol=2e-2)


def test_half_layers_are_bitwise_reproducible(threads):
    threads(2)
    args = make_args("gru", 40, lengths_to_batch_sizes([12] * 10 + [5] * 6), input_size=8)
    half = [a.detach().bfloat16().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args]

    def once():
        outs = run_op("gru", half, True)
        loss = sum((o.float() * (1 + torch.arange(o.numel()).reshape(o.shape) % 7)).sum() for o in outs)
        return [o.detach() for o in outs] + list(torch.autograd.grad(loss, [a for a in half if
                                                                          isinstance(a, torch.Tensor) and
                                                                          a.requires_grad]))

    first = once()
    assert all(torch.equal(a, b) for a, b in zip(first, once()))


def test_bad_half_path_setting_is_an_error(monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_HALF", "amx")
    args = [a.detach().bfloat16() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in make_args("rnn_tanh", 4, lengths_to_batch_sizes([2]))]
    with pytest.raises(RuntimeError, match="FUSEDRNN_CPU_HALF must be float32 or per_step"):
        run_op("rnn_tanh", args, False)
