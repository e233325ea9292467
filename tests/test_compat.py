"""Compatibility with the tools users rely on (issue 9): autocast, torch.func, TorchScript,
torch.nn's exception types, relu's gradient at NaN, and fake kernels that describe the real
outputs. Every test compares with torch.nn or a float64 reference."""

import pytest
import torch
from torch import nn

import fusedrnn
from conftest import CELLS, flat_state, make_pair


# ---- relu RNN: the gradient passes through a NaN pre-activation, as torch.relu's does ----------

@pytest.mark.parametrize("cell", ["rnn_relu", "rnn_tanh"])
def test_gradients_with_nan_input_equal_torch_nn(cell):
    """torch.relu's backward is threshold_backward(grad, result, 0): `result <= 0 ? 0 : grad`, so a
    NaN pre-activation passes the gradient on. The bias gradients are finite here and differ by
    exactly that gradient when the cell zeroes it instead."""
    ref, ours = make_pair(cell, 3, 5, num_layers=2)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    x[2, 1, 0] = float("nan")
    grads = [torch.autograd.grad(m(x)[0][:3].sum(), list(m.parameters())) for m in (ref, ours)]
    for (name, _), expected, got in zip(ref.named_parameters(), *grads):
        assert torch.equal(expected.isnan(), got.isnan()), name
        torch.testing.assert_close(got.nan_to_num(0.0), expected.nan_to_num(0.0), rtol=0, atol=1e-10, msg=name)
    if cell == "rnn_relu":
        assert grads[1][2].isfinite().all()  # bias_ih_l0: where zeroing the gradient would show


# ---- fake kernels describe the real outputs, strides included ----------------------------------

def _op_args(cell, dtype=torch.float64):
    """Arguments of one forward op with a permuted (non-contiguous) initial state."""
    steps, batch, inp, hidden = 3, 2, 3, 5
    gates = {"lstm": 4, "gru": 3}.get(cell, 1)
    x = torch.randn(steps * batch, inp, dtype=dtype)
    h0 = torch.randn(hidden, batch, dtype=dtype).t()
    assert not h0.is_contiguous()
    w_ih, w_hh = torch.randn(gates * hidden, inp, dtype=dtype), torch.randn(gates * hidden, hidden, dtype=dtype)
    b_ih, b_hh = torch.randn(gates * hidden, dtype=dtype), torch.randn(gates * hidden, dtype=dtype)
    batch_sizes = torch.full((steps,), batch, dtype=torch.int64)
    if cell == "lstm":
        c0 = torch.randn(hidden, batch, dtype=dtype).t()
        return (x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, batch_sizes, False)
    return (x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, False)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_fake_kernels_give_the_real_outputs_shapes_and_strides(cell):
    from torch._subclasses.fake_tensor import FakeTensorMode

    forward = getattr(torch.ops.fusedrnn, f"{cell}_forward")
    args = _op_args(cell)
    real = forward(*args)
    with FakeTensorMode() as mode:
        fake = forward(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert [(r.shape, r.stride()) for r in real] == [(f.shape, f.stride()) for f in fake]

    # The backward op, from the forward's outputs, with permuted states again.
    backward = getattr(torch.ops.fusedrnn, f"{cell}_backward")
    x, h0 = args[0], args[1]
    grad_out = torch.randn_like(real[0])
    if cell == "lstm":
        bargs = (grad_out, torch.randn(5, 2, dtype=x.dtype).t(), torch.randn(5, 2, dtype=x.dtype).t(), x, h0,
                 args[2], args[3], args[4], None, args[8], False, True, real[0], real[3], real[4])
    else:
        bargs = (grad_out, torch.randn(5, 2, dtype=x.dtype).t(), x, h0, args[2], args[3], args[6], False, True,
                 *([real[0]] + list(real[2:])))
    real_grads = backward(*bargs)
    with FakeTensorMode() as mode:
        fake_grads = backward(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in bargs])
    assert [(r.shape, r.stride()) for r in real_grads] == [(f.shape, f.stride()) for f in fake_grads]


# ---- torch.func ----------------------------------------------------------------------------------

def _loss(module):
    def loss(params, x):
        out, state = torch.func.functional_call(module, params, (x,))
        return out.square().sum() + sum(s.sin().sum() for s in flat_state(state))
    return loss


@pytest.mark.parametrize("cell", list(CELLS))
def test_torch_func_grad_and_jacrev_match_torch_nn(cell):
    ref, ours = make_pair(cell, 3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    expected = torch.func.grad(_loss(ref), argnums=(0, 1))(dict(ref.named_parameters()), x)
    got = torch.func.grad(_loss(ours), argnums=(0, 1))(dict(ours.named_parameters()), x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    jac_ref = torch.func.jacrev(lambda x: ref(x)[0])(x)
    jac = torch.func.jacrev(lambda x: ours(x)[0])(x)
    torch.testing.assert_close(jac, jac_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cell", ["lstm_proj", "gru", "rnn_relu"])
def test_torch_func_vmap_of_grad_equals_a_loop(cell):
    """Per-sample gradients. torch.nn cannot do this one (its RNN ops have no batching rule)."""
    _, ours = make_pair(cell, 3, 4, num_layers=2)
    params = dict(ours.named_parameters())
    xs = torch.randn(3, 5, 2, 3, dtype=torch.float64)
    batched = torch.func.vmap(torch.func.grad(_loss(ours)), in_dims=(None, 0))(params, xs)
    for name in params:
        looped = torch.stack([torch.func.grad(_loss(ours))(params, x)[name] for x in xs])
        torch.testing.assert_close(batched[name], looped, rtol=0, atol=1e-12, msg=name)


def test_torch_func_vmap_over_parameters_equals_a_loop():
    """An ensemble of two models in one call: the weights themselves are batched."""
    _, ours = make_pair("lstm", 3, 4, bidirectional=True)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    ensemble = {k: torch.stack([v, 0.5 * v]) for k, v in ours.named_parameters()}
    batched = torch.func.vmap(lambda p: torch.func.functional_call(ours, p, (x,))[0])(ensemble)
    looped = torch.stack([torch.func.functional_call(ours, {k: v[i] for k, v in ensemble.items()}, (x,))[0]
                          for i in range(2)])
    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-12)


def test_torch_func_forward_mode_and_nested_grad_raise_instead_of_returning_zeros():
    """No forward-mode formula (jvp) and no double backward: both say so. (torch.nn's CPU RNNs are
    composite ops, so jacfwd and hessian work there.)"""
    _, ours = make_pair("gru", 3, 4)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="jvp"):
        torch.func.jacfwd(lambda x: ours(x)[0])(x)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.func.grad(lambda x: torch.func.grad(lambda y: ours(y)[0].sum())(x).sum())(x)
