"""Weights, inputs and states with any strides a torch.nn call may see give torch.nn's numbers.

A weight can reach the kernels as a view: an expanded (stride-0) tensor from a parametrization
that ties rows, `torch.func.functional_call` with a transposed or sliced tensor, or
`load_state_dict(..., assign=True)` with such tensors. Inputs and initial states arrive expanded
over the batch (`h0.expand(...)`) or as slices. Before the fix, an expanded weight_hh made MKL
reject the GEMM ("Parameter 8 was incorrect on entry to DGEMM") and the gradients were wrong by
0.3-22 in float64. Each case compares the forward outputs, the final states and the gradient of
every leaf (including the leaf behind the view) with torch.nn's, run on the same views.
"""

import pytest
import torch
from torch import nn

import fusedrnn

CONFIGS = {
    "lstm": (nn.LSTM, fusedrnn.LSTM, {}),
    "lstm_proj": (nn.LSTM, fusedrnn.LSTM, {"proj_size": 3}),
    "gru": (nn.GRU, fusedrnn.GRU, {}),
    "rnn_tanh": (nn.RNN, fusedrnn.RNN, {}),
    "rnn_relu": (nn.RNN, fusedrnn.RNN, {"nonlinearity": "relu"}),
}
CELLS = {
    "lstm": (nn.LSTMCell, fusedrnn.LSTMCell, {}),
    "gru": (nn.GRUCell, fusedrnn.GRUCell, {}),
    "rnn_relu": (nn.RNNCell, fusedrnn.RNNCell, {"nonlinearity": "relu"}),
}


def expanded_rows(t):
    """Every row (or element) the same memory: stride 0 along dim 0."""
    return t[:1].expand_as(t)


def column_strided(t):
    """A view with a non-unit last stride."""
    return torch.cat([t, t], -1)[..., ::2]


def transposed_copy(t):
    """Column-major memory: the same values, strides reversed."""
    return t.transpose(0, -1).contiguous().transpose(0, -1)


VIEWS = {"expanded_rows": expanded_rows, "column_strided": column_strided, "transposed": transposed_copy}
TOL = {torch.float64: dict(rtol=0, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def _tolerance(dtype):
    return TOL[dtype]


def _loss(out, states, dtype):
    """A loss that weighs every output element differently, so a wrong row shows."""
    w = torch.arange(out.numel(), dtype=dtype).view_as(out).sin()
    loss = (out * w).sum()
    for s in states:
        loss = loss + (s * s).sum()
    return loss


def _run(module, overrides, args, leaves):
    out, states = torch.func.functional_call(module, overrides, args)
    states = states if isinstance(states, tuple) else (states,)
    loss = _loss(out, states, out.dtype)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [out, *states, *grads]


def _compare(ours, theirs, dtype):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        if b is None:
            assert a is None
            continue
        torch.testing.assert_close(a, b, **_tolerance(dtype))


def _pair(configs, name, dtype, *args, **extra):
    nn_cls, fused_cls, kwargs = configs[name]
    torch.manual_seed(0)
    ref = nn_cls(*args, dtype=dtype, **kwargs, **extra)
    ours = fused_cls(*args, dtype=dtype, **kwargs, **extra)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("view", sorted(VIEWS))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layer_weight_views_match_torch_nn(name, view, dtype):
    ref, ours = _pair(CONFIGS, name, dtype, 5, 20, num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, 5, dtype=dtype)
    for param, value in ref.named_parameters():
        results = []
        for module in (ref, ours):
            leaf = value.detach().clone().requires_grad_()
            xx = x.clone().requires_grad_()
            others = [p for n, p in module.named_parameters() if n != param]
            results.append(_run(module, {param: VIEWS[view](leaf)}, (xx,), [leaf, xx, *others]))
        _compare(results[1], results[0], dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layer_input_and_state_views_match_torch_nn(name, dtype):
    ref, ours = _pair(CONFIGS, name, dtype, 5, 20, num_layers=2, batch_first=True)
    is_lstm = name.startswith("lstm")
    p = 3 if name == "lstm_proj" else 20
    cases = {
        # one sequence and one initial state broadcast over the batch
        "expanded": (torch.randn(1, 6, 5, dtype=dtype), lambda x: x.expand(4, 6, 5),
                     torch.randn(2, 1, p, dtype=dtype), lambda h: h.expand(2, 4, p),
                     torch.randn(2, 1, 20, dtype=dtype), lambda c: c.expand(2, 4, 20)),
        "sliced": (torch.randn(4, 6, 10, dtype=dtype), lambda x: x[..., ::2],
                   torch.randn(2, 4, 2 * p, dtype=dtype), lambda h: h[..., 1::2],
                   torch.randn(2, 4, 40, dtype=dtype), lambda c: c[..., ::2]),
        "time_major_memory": (torch.randn(6, 4, 5, dtype=dtype), lambda x: x.transpose(0, 1),
                              torch.randn(4, 2, p, dtype=dtype), lambda h: h.transpose(0, 1),
                              torch.randn(4, 2, 20, dtype=dtype), lambda c: c.transpose(0, 1)),
    }
    for case, (x0, xv, h0, hv, c0, cv) in cases.items():
        results = []
        for module in (ref, ours):
            leaves = [t.clone().requires_grad_() for t in (x0, h0, c0)]
            x, h, c = xv(leaves[0]), hv(leaves[1]), cv(leaves[2])
            hx = (h, c) if is_lstm else h
            used = leaves if is_lstm else leaves[:2]
            results.append(_run(module, {}, (x, hx), used + list(module.parameters())))
        _compare(results[1], results[0], dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("view", sorted(VIEWS))
@pytest.mark.parametrize("name", sorted(CELLS))
def test_cell_weight_and_state_views_match_torch_nn(name, view, dtype):
    ref, ours = _pair(CELLS, name, dtype, 5, 12)
    x0 = torch.randn(4, 5, dtype=dtype)
    h0 = torch.randn(1, 12, dtype=dtype)
    for param, value in ref.named_parameters():
        results = []
        for module in (ref, ours):
            leaf = value.detach().clone().requires_grad_()
            h_leaf = h0.clone().requires_grad_()
            h = h_leaf.expand(4, 12)
            hx = (h, h * 0.5) if name == "lstm" else h
            out = torch.func.functional_call(module, {param: VIEWS[view](leaf)}, (VIEWS[view](x0), hx))
            out = out if isinstance(out, tuple) else (out,)
            loss = _loss(out[0], out[1:], dtype)
            results.append([*out, *torch.autograd.grad(loss, [leaf, h_leaf])])
        _compare(results[1], results[0], dtype)


def test_load_state_dict_assign_with_expanded_tensors():
    """load_state_dict(assign=True) keeps the given tensors, views included."""
    ref, ours = _pair(CONFIGS, "lstm", torch.float64, 4, 8)
    state = {k: expanded_rows(v) for k, v in ref.state_dict().items()}
    ref.load_state_dict(state, assign=True)
    ours.load_state_dict(state, assign=True)
    assert ours.weight_hh_l0.stride(0) == 0  # the view really is what the kernels get
    x = torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True)
    results = [_run(m, {}, (x,), [x]) for m in (ref, ours)]
    _compare(results[1], results[0], torch.float64)
