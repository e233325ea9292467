"""Compatibility with the tools users rely on (issue 9): autocast, torch.func, TorchScript,
torch.nn's exception types, relu's gradient at NaN, and fake kernels that describe the real
outputs. Every test compares with torch.nn or a float64 reference."""

import copy
import io
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import fusedrnn
from conftest import CELLS, DEVICES, flat_state, make_pair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch.func's jvp scripts a helper
@pytest.mark.parametrize("cell", list(CELLS))
def test_torch_func_forward_mode_and_nested_grad_match_torch_nn(cell):
    """jacfwd, hessian and nested grad (issue 14; more in tests/test_higher_order.py): the layers run
    on fusedrnn.reference under forward mode and nested reverse mode, equal to torch.nn's."""
    ref, ours = make_pair(cell, 3, 4)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for transform in (lambda f: torch.func.jacfwd(lambda x: f(x)[0]),
                      lambda f: torch.func.hessian(lambda x: f(x)[0].sin().sum()),
                      lambda f: torch.func.grad(lambda x: torch.func.grad(lambda y: f(y)[0].sin().sum())(x).sum())):
        torch.testing.assert_close(transform(ours)(x), transform(ref)(x), rtol=0, atol=1e-10)


# ---- autocast: one contract on every device (fusedrnn/functional.py) -----------------------------

def _module_pair(cell):
    """(fusedrnn module, input, state) for the three layers and the three cells, float32."""
    torch.manual_seed(0)
    if cell.endswith("_cell"):
        cls = {"lstm_cell": fusedrnn.LSTMCell, "gru_cell": fusedrnn.GRUCell, "rnn_cell": fusedrnn.RNNCell}[cell]
        module, x = cls(6, 8), torch.randn(4, 6)
        h = torch.randn(4, 8)
        return module, x, ((h, h.clone()) if cell == "lstm_cell" else h)
    _, fused_cls, extra = CELLS[cell]
    module = fused_cls(6, 8, num_layers=2, bidirectional=True, **extra)
    x = torch.randn(7, 4, 6)
    real = 3 if cell == "lstm_proj" else 8
    h = torch.randn(4, 4, real)
    return module, x, ((h, torch.randn(4, 4, 8)) if cell.startswith("lstm") else h)


def _to(state, dtype):
    return tuple(s.to(dtype) for s in state) if isinstance(state, tuple) else state.to(dtype)


AUTOCAST_MODULES = list(CELLS) + ["lstm_cell", "gru_cell", "rnn_cell"]


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cell", AUTOCAST_MODULES)
def test_cpu_autocast_runs_in_the_autocast_dtype(cell, input_dtype):
    """Under autocast the module computes exactly what it computes with its input, state and weights
    cast to the autocast dtype beforehand, and the float32 parameters get float32 gradients."""
    module, x, state = _module_pair(cell)
    x = x.to(input_dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x, state)
    outputs = flat_state(out) if cell.endswith("_cell") else [out[0]] + flat_state(out[1])
    assert all(t.dtype == torch.bfloat16 for t in outputs)
    grads = torch.autograd.grad(sum(t.float().square().sum() for t in outputs), [x] + list(module.parameters()))

    cast = type(module)(**{k: getattr(module, k) for k in ("input_size", "hidden_size")},
                        **({} if cell.endswith("_cell") else
                           dict(num_layers=2, bidirectional=True)),
                        **({"proj_size": module.proj_size} if getattr(module, "proj_size", 0) else {}),
                        **({"nonlinearity": module.nonlinearity} if hasattr(module, "nonlinearity") else {}))
    cast.load_state_dict(module.state_dict())
    cast.bfloat16()
    x_cast = x.detach().bfloat16().requires_grad_()
    expected_out = cast(x_cast, _to(state, torch.bfloat16))
    expected = (flat_state(expected_out) if cell.endswith("_cell") else
                [expected_out[0]] + flat_state(expected_out[1]))
    for got, want in zip(outputs, expected):
        assert torch.equal(got, want)
    expected_grads = torch.autograd.grad(sum(t.float().square().sum() for t in expected),
                                         [x_cast] + list(cast.parameters()))
    assert grads[0].dtype == input_dtype
    assert all(g.dtype == torch.float32 for g in grads[1:])
    # Not bitwise: where a tensor feeds several casts (the input of both directions), autocast sums
    # its bfloat16 gradients in float32, the all-bfloat16 module in bfloat16.
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
def test_cpu_autocast_float16_and_mixed_state_dtypes(cell):
    """Any floating input and state dtype is accepted under autocast (here a float32 state with
    bfloat16 input after an nn.Linear, under float16 autocast): all run in float16."""
    module, x, state = _module_pair(cell)
    linear = nn.Linear(6, 6)
    with torch.autocast("cpu", dtype=torch.float16):
        projected = linear(x)
        out, h = module(projected.bfloat16(), state)
    assert out.dtype == torch.float16 and all(t.dtype == torch.float16 for t in flat_state(h))
    module.half()
    expected, _ = module(projected.bfloat16().half(), _to(state, torch.float16))
    assert torch.equal(out, expected)


@pytest.mark.parametrize("cell", ["lstm", "gru_cell"])
def test_autocast_leaves_float64_alone_as_it_does_for_every_op(cell):
    module, x, state = _module_pair(cell)
    module.double()
    x, state = x.double(), _to(state, torch.float64)
    expected = module(x, state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = module(x, state)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
        assert a.dtype == torch.float64 and torch.equal(a, b)
    # float64 input to a float32 module is a dtype mismatch, under autocast as outside it; torch.nn
    # raises RuntimeError for it under autocast (from its op: its own check is off under autocast).
    module.float()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="does not match"):
        module(x)


def test_autocast_is_close_to_float64():
    ref, ours = make_pair("gru", 6, 8, dtype=torch.float32, num_layers=2)
    x = torch.randn(7, 4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = ours(x)
    expected, _ = ref.double()(x.double())
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=0.05)


def test_autocast_under_torch_compile_matches_eager():
    torch._dynamo.reset()
    _, ours = make_pair("lstm", 6, 8, dtype=torch.float32, num_layers=2)
    x = torch.randn(7, 4, 6)

    def f(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, (h, c) = ours(x)
        return out, h, c

    eager = f(x)
    compiled = torch.compile(f, fullgraph=True)(x)
    for a, b in zip(compiled, eager):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02)


# ---- exception types: torch.nn's, for the same mistake -------------------------------------------

def _gru2():
    return make_pair("gru", 3, 5, dtype=torch.float32, num_layers=2)


def _lstm2():
    return make_pair("lstm", 3, 5, dtype=torch.float32, num_layers=2)


def _rnn2():
    return make_pair("rnn_relu", 3, 5, dtype=torch.float32, num_layers=2)


def _cell(name):
    def make():
        ref = getattr(nn, name)(3, 5)
        ours = getattr(fusedrnn, name)(3, 5)
        ours.load_state_dict(ref.state_dict())
        return ref, ours
    return make


def _packed(x, lengths=(4, 2), enforce_sorted=True):
    return nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=enforce_sorted)


def _pair(name, *args, dtype=torch.float32, setup=None, **kwargs):
    """A maker of (torch.nn module, fusedrnn module) of class `name` with the same weights; `setup`
    then runs on both (an attribute changed after construction, a weight replaced)."""
    def make():
        torch.manual_seed(0)
        ref = getattr(nn, name)(*args, **kwargs).to(dtype)
        ours = getattr(fusedrnn, name)(*args, **kwargs).to(dtype)
        ours.load_state_dict(ref.state_dict())
        if setup is not None:
            setup(ref)
            setup(ours)
        return ref, ours
    return make


def _set(**attributes):
    return lambda m: [setattr(m, k, v) for k, v in attributes.items()]


def _sparse(*names):
    return lambda m: [setattr(m, n, nn.Parameter(getattr(m, n).detach().to_sparse())) for n in names]


_h = torch.randn
MISTAKES = {
    # layers
    "input_size": (_gru2, lambda: (_h(4, 2, 7),)),
    "input_size_lstm": (_lstm2, lambda: (_h(4, 2, 7),)),
    "input_1d": (_gru2, lambda: (_h(4),)),
    "input_4d": (_rnn2, lambda: (_h(4, 2, 3, 1),)),
    "input_int": (_gru2, lambda: (torch.ones(4, 2, 3, dtype=torch.int64),)),
    "input_float64": (_lstm2, lambda: (_h(4, 2, 3, dtype=torch.float64),)),
    "input_not_a_tensor": (_gru2, lambda: ([1.0, 2.0],)),
    "seq_len_0": (_gru2, lambda: (_h(0, 2, 3),)),
    "seq_len_0_unbatched": (_lstm2, lambda: (_h(0, 3),)),
    "hx_shape": (_gru2, lambda: (_h(4, 2, 3), _h(2, 3, 5))),
    "hx_2d_for_3d_input": (_rnn2, lambda: (_h(4, 2, 3), _h(2, 5))),
    "hx_3d_for_2d_input": (_gru2, lambda: (_h(4, 3), _h(2, 1, 5))),
    "hx_dtype": (_gru2, lambda: (_h(4, 2, 3), _h(2, 2, 5, dtype=torch.float64))),
    "hx_device": (_gru2, lambda: (_h(4, 2, 3), _h(2, 2, 5, device="meta"))),
    "hx_not_a_tensor": (_gru2, lambda: (_h(4, 2, 3), 3)),
    "lstm_hx_tensor": (_lstm2, lambda: (_h(4, 2, 3), _h(2, 2, 5))),
    # a single tensor as an LSTM's hx, the commonest hx mistake: nn's hx[1] fails (IndexError) when it
    # has one row (one layer, one direction)
    "lstm_hx_tensor_one_layer": (_pair("LSTM", 3, 5), lambda: (_h(4, 2, 3), _h(1, 2, 5))),
    "packed_lstm_hx_tensor_one_layer": (_pair("LSTM", 3, 5), lambda: (_packed(_h(4, 2, 3)), _h(1, 2, 5))),
    "lstm_hx_three": (_lstm2, lambda: (_h(4, 2, 3), (_h(2, 2, 5),) * 3)),
    "lstm_c0_shape": (_lstm2, lambda: (_h(4, 2, 3), (_h(2, 2, 5), _h(2, 2, 4)))),
    "lstm_c0_dtype": (_lstm2, lambda: (_h(4, 2, 3), (_h(2, 2, 5), _h(2, 2, 5, dtype=torch.float64)))),
    "packed_input_size": (_gru2, lambda: (_packed(_h(4, 2, 7)),)),
    "packed_float64": (_gru2, lambda: (_packed(_h(4, 2, 3, dtype=torch.float64)),)),
    "packed_hx_shape": (_gru2, lambda: (_packed(_h(4, 2, 3)), _h(2, 3, 5))),
    "input_device": (_gru2, lambda: (_h(4, 2, 3, device="meta"),)),
    # cells
    "cell_input_size": (_cell("LSTMCell"), lambda: (_h(2, 4),)),
    "cell_input_3d": (_cell("LSTMCell"), lambda: (_h(2, 3, 1),)),
    "cell_input_int": (_cell("LSTMCell"), lambda: (torch.ones(2, 3, dtype=torch.int64),)),
    "cell_input_float64": (_cell("GRUCell"), lambda: (_h(2, 3, dtype=torch.float64),)),
    "cell_input_not_a_tensor": (_cell("RNNCell"), lambda: ([1.0, 2.0, 3.0],)),
    "cell_hx_batch": (_cell("GRUCell"), lambda: (_h(2, 3), _h(3, 5))),
    "cell_hx_1d_for_2d_input": (_cell("GRUCell"), lambda: (_h(2, 3), _h(5))),
    "cell_hx_2d_for_1d_input": (_cell("RNNCell"), lambda: (_h(3), _h(1, 5))),
    "cell_hx_dtype": (_cell("GRUCell"), lambda: (_h(2, 3), _h(2, 5, dtype=torch.float64))),
    "lstm_cell_hx_tensor": (_cell("LSTMCell"), lambda: (_h(2, 3), _h(2, 5))),
    "lstm_cell_c0_shape": (_cell("LSTMCell"), lambda: (_h(2, 3), (_h(2, 5), _h(3, 5)))),
    # issue 14.5: an LSTM's hx with a None (c_0 was silently ignored, h_0 a bare AssertionError)
    "lstm_hx_none_c0": (_lstm2, lambda: (_h(4, 2, 3), (None, _h(2, 2, 5)))),
    "lstm_hx_h0_none": (_lstm2, lambda: (_h(4, 2, 3), (_h(2, 2, 5), None))),
    "lstm_hx_none_none": (_lstm2, lambda: (_h(4, 2, 3), (None, None))),
    "packed_lstm_hx_none_c0": (_lstm2, lambda: (_packed(_h(4, 2, 3)), (None, _h(2, 2, 5)))),
    "packed_lstm_hx_h0_none": (_lstm2, lambda: (_packed(_h(4, 2, 3)), (_h(2, 2, 5), None))),
    "packed_unsorted_lstm_hx_none_c0": (_lstm2, lambda: (_packed(_h(4, 2, 3), (2, 4), False), (None, _h(2, 2, 5)))),
    "lstm_cell_hx_none_c0": (_cell("LSTMCell"), lambda: (_h(2, 3), (None, _h(2, 5)))),
    "lstm_cell_hx_h0_none": (_cell("LSTMCell"), lambda: (_h(2, 3), (_h(2, 5), None))),
    # the rest of an LSTM's hx
    "lstm_hx_one": (_lstm2, lambda: (_h(4, 2, 3), (_h(2, 2, 5),))),
    "lstm_hx_not_a_tensor": (_lstm2, lambda: (_h(4, 2, 3), 3)),
    "lstm_cell_hx_three": (_cell("LSTMCell"), lambda: (_h(2, 3), (_h(2, 5),) * 3)),
    "lstm_cell_hx_one": (_cell("LSTMCell"), lambda: (_h(2, 3), (_h(2, 5),))),
    "lstm_cell_c0_3d": (_cell("LSTMCell"), lambda: (_h(2, 3), (_h(2, 5), _h(1, 2, 5)))),
    # a cell's state of the wrong rank: nn's ValueError "Expected hidden to be 1D or 2D"
    "cell_hx_0d": (_cell("GRUCell"), lambda: (_h(2, 3), _h(()))),
    "cell_hx_3d": (_cell("RNNCell"), lambda: (_h(2, 3), _h(1, 2, 5))),
    "cell_hx_4d": (_cell("GRUCell"), lambda: (_h(2, 3), _h(1, 1, 2, 5))),
    "lstm_cell_h0_0d": (_cell("LSTMCell"), lambda: (_h(2, 3), (_h(()), _h(2, 5)))),
    # attributes torch.nn reads on every call: of the wrong type, or no longer matching the weights
    "bidirectional_int": (_pair("GRU", 3, 5, bidirectional=1), lambda: (_h(4, 2, 3),)),
    "bidirectional_str": (_pair("LSTM", 3, 5, bidirectional="False"), lambda: (_h(4, 2, 3),)),
    "num_layers_bool": (_pair("RNN", 3, 5, num_layers=True), lambda: (_h(4, 2, 3),)),
    "set_batch_first_str": (_pair("GRU", 3, 5, setup=_set(batch_first="False")), lambda: (_h(4, 2, 3),)),
    "set_bias_str": (_pair("LSTM", 3, 5, setup=_set(bias="yes")), lambda: (_h(4, 2, 3),)),
    "set_bias_false": (_pair("RNN", 3, 5, setup=_set(bias=False)), lambda: (_h(4, 2, 3),)),
    "set_num_layers": (_pair("GRU", 3, 5, num_layers=2, setup=_set(num_layers=1)), lambda: (_h(4, 2, 3),)),
    "set_bidirectional": (_pair("LSTM", 3, 5, setup=_set(bidirectional=True)), lambda: (_h(4, 2, 3),)),
    "set_rnn_mode_lstm": (_pair("RNN", 3, 5, setup=_set(mode="LSTM")), lambda: (_h(4, 2, 3),)),
    "set_rnn_cell_nonlinearity": (_pair("RNNCell", 3, 5, setup=_set(nonlinearity="gelu")), lambda: (_h(2, 3),)),
    "layer_bias_none": (_pair("GRU", 3, 5, setup=_set(bias_ih_l0=None)), lambda: (_h(4, 2, 3),)),
    "cell_weight_hh_none": (_pair("LSTMCell", 3, 5, setup=_set(weight_hh=None)), lambda: (_h(2, 3),)),
    "cell_weight_ih_none": (_pair("GRUCell", 3, 5, setup=_set(weight_ih=None)), lambda: (_h(2, 3),)),
    "rnn_cell_weight_hh_none": (_pair("RNNCell", 3, 5, setup=_set(weight_hh=None)), lambda: (_h(2, 3),)),
    # sparse tensors where torch.nn fails on them
    "layer_sparse_weight_hh": (_pair("LSTM", 3, 5, setup=_sparse("weight_hh_l0")), lambda: (_h(4, 2, 3),)),
    "layer_sparse_bias": (_pair("GRU", 3, 5, setup=_sparse("bias_hh_l0")), lambda: (_h(4, 2, 3),)),
    "cell_sparse_weight": (_pair("LSTMCell", 3, 5, setup=_sparse("weight_ih")), lambda: (_h(2, 3),)),
    "cell_sparse_bias": (_pair("RNNCell", 3, 5, setup=_sparse("bias_hh")), lambda: (_h(2, 3),)),
    "gru_cell_sparse_hx": (_cell("GRUCell"), lambda: (_h(2, 3), _h(2, 5).to_sparse())),
    "lstm_cell_sparse_c0": (_cell("LSTMCell"), lambda: (_h(2, 3), (_h(2, 5), _h(2, 5).to_sparse()))),
    "layer_sparse_input": (_gru2, lambda: (_h(4, 2, 3).to_sparse(),)),
    # PackedSequence: nn.LSTM's packed path raises other types than its padded one
    "packed_lstm_hx_2d": (_lstm2, lambda: (_packed(_h(4, 2, 3)), (_h(2, 5), _h(2, 5)))),
    "packed_lstm_float64": (_lstm2, lambda: (_packed(_h(4, 2, 3, dtype=torch.float64)),)),
    "packed_empty": (_gru2, lambda: (nn.utils.rnn.PackedSequence(_h(0, 3), torch.zeros(0, dtype=torch.int64)),)),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_mistakes_raise_the_exception_type_torch_nn_raises(mistake):
    make, args = MISTAKES[mistake]
    ref, ours = make()
    with pytest.raises(Exception) as expected:
        ref(*args())
    with pytest.raises(Exception) as got:
        ours(*args())
    assert isinstance(got.value, expected.type), (
        f"torch.nn raises {expected.type.__name__}, fusedrnn {got.type.__name__}: {got.value}")
    assert "fusedrnn." in str(got.value)  # our message, not one from deeper down


# Constructor arguments torch.nn refuses, each with the exception type torch.nn raises.
CONSTRUCTOR_MISTAKES = {
    "input_size_0": ("LSTM", (0, 5), {}),
    "input_size_false": ("GRU", (False, 5), {}),
    "hidden_size_false": ("RNN", (3, False), {}),
    "bias_int": ("LSTM", (3, 5), {"bias": 0}),
    "bias_str": ("GRU", (3, 5), {"bias": "False"}),
    "bias_none": ("RNN", (3, 5), {"bias": None}),
    "batch_first_str": ("LSTM", (3, 5), {"batch_first": "False"}),
    "batch_first_int": ("GRU", (3, 5), {"batch_first": 1}),
    "batch_first_positional": ("RNN", (3, 5, 1, "tanh", True, "no"), {}),
    "dropout_none": ("GRU", (3, 5, 2), {"dropout": None}),
}


@pytest.mark.parametrize("mistake", list(CONSTRUCTOR_MISTAKES))
def test_constructor_mistakes_raise_the_exception_type_torch_nn_raises(mistake):
    name, args, kwargs = CONSTRUCTOR_MISTAKES[mistake]
    with pytest.raises(Exception) as expected:
        getattr(nn, name)(*args, **kwargs)
    with pytest.raises(Exception) as got:
        getattr(fusedrnn, name)(*args, **kwargs)
    assert isinstance(got.value, expected.type), (
        f"torch.nn raises {expected.type.__name__}, fusedrnn {got.type.__name__}: {got.value}")
    assert "fusedrnn." in str(got.value)


def test_batch_first_given_as_a_string_is_refused_not_read_as_true():
    """`batch_first="False"` is truthy: before, the module built and read it as batch-first."""
    with pytest.raises(TypeError, match="fusedrnn.LSTM: batch_first should be of type bool, got str 'False'"):
        fusedrnn.LSTM(3, 5, batch_first="False")


# Unusual but legal uses: where torch.nn returns, fusedrnn returns the same (float64, outputs and the
# gradients of every parameter and of the input).
_d = lambda *shape: torch.randn(*shape, dtype=torch.float64)  # noqa: E731
RETURNS = {
    # hidden_size 0: empty states
    "lstm_cell_hidden_size_0": (_pair("LSTMCell", 3, 0, dtype=torch.float64), lambda: (_d(2, 3),)),
    "gru_cell_hidden_size_0_hx": (_pair("GRUCell", 3, 0, dtype=torch.float64), lambda: (_d(2, 3), _d(2, 0))),
    "rnn_cell_sizes_0_unbatched": (_pair("RNNCell", 0, 0, dtype=torch.float64), lambda: (_d(0),)),
    # bools are ints
    "lstm_hidden_size_true": (_pair("LSTM", 3, True, dtype=torch.float64), lambda: (_d(4, 2, 3),)),
    "gru_input_size_true": (_pair("GRU", True, 4, dtype=torch.float64), lambda: (_d(4, 2, 1),)),
    # attributes read on every call
    "rnn_cell_nonlinearity_set_to_relu": (_pair("RNNCell", 3, 5, dtype=torch.float64, setup=_set(nonlinearity="relu")),
                                          lambda: (3 * _d(2, 3),)),
    "rnn_cell_nonlinearity_set_to_tanh": (_pair("RNNCell", 3, 5, nonlinearity="relu", dtype=torch.float64,
                                                setup=_set(nonlinearity="tanh")), lambda: (3 * _d(2, 3),)),
    "cell_input_size_attribute_changed": (_pair("GRUCell", 3, 5, dtype=torch.float64, setup=_set(input_size=7)),
                                          lambda: (_d(2, 3),)),
    # an LSTMCell's c_0 of another real dtype: torch.nn promotes
    "lstm_cell_c0_float32": (_pair("LSTMCell", 3, 5, dtype=torch.float64),
                             lambda: (_d(2, 3), (_d(2, 5), torch.randn(2, 5)))),
    "lstm_cell_c0_int_unbatched": (_pair("LSTMCell", 3, 5, dtype=torch.float64),
                                   lambda: (_d(3), (_d(5), torch.arange(5)))),
    # a float64 LSTM layer's c_0 of another real dtype: torch.nn on the CPU uses it promoted
    "lstm_c0_float32": (_pair("LSTM", 3, 5, dtype=torch.float64),
                        lambda: (_d(4, 2, 3), (_d(1, 2, 5), torch.randn(1, 2, 5)))),
    "lstm_c0_bfloat16_packed_bidirectional_proj": (
        _pair("LSTM", 3, 5, num_layers=2, bidirectional=True, proj_size=2, dtype=torch.float64),
        lambda: (_packed(_d(4, 2, 3)), (_d(4, 2, 2), torch.randn(4, 2, 5).bfloat16()))),
    "lstm_c0_int_unbatched": (_pair("LSTM", 3, 5, dtype=torch.float64),
                              lambda: (_d(4, 3), (_d(1, 5), torch.arange(5).view(1, 5)))),
    # sparse tensors where torch.nn runs them
    "cell_sparse_input": (_pair("GRUCell", 3, 5, dtype=torch.float64), lambda: (_d(2, 3).to_sparse(),)),
    "lstm_cell_sparse_h0": (_pair("LSTMCell", 3, 5, dtype=torch.float64),
                            lambda: (_d(2, 3), (_d(2, 5).to_sparse(), _d(2, 5)))),
    "rnn_cell_sparse_hx": (_pair("RNNCell", 3, 5, dtype=torch.float64), lambda: (_d(2, 3), _d(2, 5).to_sparse())),
    "layer_sparse_weight_ih": (_pair("GRU", 3, 5, num_layers=2, dtype=torch.float64, setup=_sparse("weight_ih_l1")),
                               lambda: (_d(4, 2, 3),)),
    "lstm_sparse_weight_hr": (_pair("LSTM", 3, 5, proj_size=2, dtype=torch.float64, setup=_sparse("weight_hr_l0")),
                              lambda: (_d(4, 2, 3),)),
}


def _dense_leaves(out):
    leaves = [out.data] if isinstance(out, nn.utils.rnn.PackedSequence) else torch.utils._pytree.tree_leaves(out)
    return [t.to_dense() if t.layout != torch.strided else t for t in leaves if t is not None]


@pytest.mark.parametrize("case", list(RETURNS))
def test_where_torch_nn_returns_fusedrnn_returns_the_same(case):
    make, args = RETURNS[case]
    ref, ours = make()
    torch.manual_seed(1)
    inputs = args()
    results = []
    for module in (ref, ours):
        out = _dense_leaves(module(*inputs))
        params = [p for p in module.parameters() if p.layout == torch.strided]
        loss = sum((t.double() * torch.linspace(-1, 1, t.numel(), dtype=torch.float64).view(t.shape)).sum()
                   for t in out if t.numel() > 0)
        grads = torch.autograd.grad(loss, params, allow_unused=True) if torch.is_tensor(loss) else ()
        results.append((out, grads))
    (expected, expected_grads), (got, got_grads) = results
    assert [(t.dtype, t.shape) for t in got] == [(t.dtype, t.shape) for t in expected]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    for a, b in zip(got_grads, expected_grads):
        assert (a is None) == (b is None) or (a is not None and a.numel() == 0) or (b is not None and b.numel() == 0)
        if a is not None and b is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", ["lstm_layer_c0_float32", "lstm_layer_c0_float16_unbatched",
                                  "lstm_cell_hidden_size_0"])
def test_state_gradients_equal_torch_nn_where_it_promotes_or_is_empty(case):
    """The initial states' gradients, which the RETURNS test does not take: c_0 of another real dtype
    into a float64 layer (nn's gradient comes in c_0's dtype), and the empty states of an LSTMCell with
    hidden_size 0 (nn gives each an empty gradient; c_0 fell out of the graph here before)."""
    if case == "lstm_cell_hidden_size_0":
        make, shapes, c_dtype = _pair("LSTMCell", 3, 0, dtype=torch.float64), ((2, 3), (2, 0)), torch.float64
    elif case == "lstm_layer_c0_float32":
        make, shapes, c_dtype = _pair("LSTM", 3, 5, dtype=torch.float64), ((4, 2, 3), (1, 2, 5)), torch.float32
    else:
        make, shapes, c_dtype = _pair("LSTM", 3, 5, dtype=torch.float64), ((4, 3), (1, 5)), torch.float16
    ref, ours = make()
    torch.manual_seed(2)
    x, h0, c0 = _d(*shapes[0]), _d(*shapes[1]), torch.randn(*shapes[1]).to(c_dtype)
    results = []
    for module in (ref, ours):
        states = [t.clone().requires_grad_() for t in (x, h0, c0)]
        out = module(states[0], (states[1], states[2]))
        leaves = torch.utils._pytree.tree_leaves(out)
        loss = sum((t * torch.linspace(-1, 1, t.numel(), dtype=torch.float64).view(t.shape)).sum() for t in leaves)
        grads = torch.autograd.grad(loss, states, allow_unused=True)
        results.append(([t.detach() for t in leaves], grads))
    (expected, expected_grads), (got, got_grads) = results
    assert [(t.dtype, t.shape) for t in got] == [(t.dtype, t.shape) for t in expected]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for a, b in zip(got_grads, expected_grads):
        assert b is not None and a is not None
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12 if a.dtype == torch.float64 else 0)


def test_rnn_cell_reads_nonlinearity_on_every_call():
    """torch.nn.RNNCell reads `nonlinearity` in forward; the fused cell chose its kernel at construction,
    so setting it afterwards changed nothing (relu results from a tanh cell: silently wrong numbers)."""
    ref, ours = _pair("RNNCell", 3, 5, dtype=torch.float64)()
    x = 3 * torch.randn(4, 3, dtype=torch.float64)
    for nonlinearity in ("relu", "tanh", "relu"):
        ref.nonlinearity = ours.nonlinearity = nonlinearity
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-12)
    ours.nonlinearity = "gelu"
    with pytest.raises(RuntimeError, match="fusedrnn.RNNCell: Unknown nonlinearity 'gelu'"):
        ours(x)


def test_lstm_refuses_an_hx_with_none_instead_of_ignoring_c0():
    """(None, c_0) ran from zero states, dropping the caller's c_0 without a word."""
    lstm = fusedrnn.LSTM(3, 5)
    x, h0, c0 = torch.randn(4, 2, 3), torch.randn(1, 2, 5), torch.randn(1, 2, 5)
    for hx in ((None, c0), (h0, None)):
        with pytest.raises(TypeError, match=r"fusedrnn.LSTM: hx must be a tuple \(h_0, c_0\) of two tensors"):
            lstm(x, hx)
    with pytest.raises(AttributeError):  # what torch.nn raises for it
        fusedrnn.LSTMCell(3, 5)(x[0], (None, c0[0]))


# ---- input_size=0 (issue 14.2): the input projection with K = 0 is b_ih (or 0) ------------------

def _rnn_op(impl, nonlinearity):
    return lambda *a: impl.rnn_layer(nonlinearity, *a)


def _lstm_op(impl):
    return lambda *a: impl.lstm_layer(*a[:7], None, *a[7:])  # no projection


_LAYER_OPS = {  # (the compiled op, fusedrnn.reference's, gates), with the arguments of gru_layer
    "lstm": (_lstm_op(fusedrnn._ops), _lstm_op(fusedrnn.reference), 4),
    "gru": (fusedrnn._ops.gru_layer, fusedrnn.reference.gru_layer, 3),
    "rnn_tanh": (_rnn_op(fusedrnn._ops, "tanh"), _rnn_op(fusedrnn.reference, "tanh"), 1),
    "rnn_relu": (_rnn_op(fusedrnn._ops, "relu"), _rnn_op(fusedrnn.reference, "relu"), 1),
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cell", list(_LAYER_OPS))
def test_layer_ops_with_input_size_0_equal_the_reference(cell, bias, monkeypatch):
    """The op itself at input_size 0 over a ragged packed sequence, both directions, on the CPU engine
    with and without the input projection in its tiles, float32 and float64: outputs (every buffer
    starts as NaN: an element never written shows) and gradients equal fusedrnn.reference's. The
    engine read the empty input's nullptr as "projection precomputed" and added uninitialised memory."""
    op, reference_op, gates = _LAYER_OPS[cell]
    hidden, batch_sizes = 5, torch.tensor([3, 3, 2, 1])
    for fuse in ("1", "0"):
        monkeypatch.setenv("FUSEDRNN_CPU_FUSE_INPUT", fuse)
        for dtype in (torch.float32, torch.float64):
            torch.manual_seed(0)
            x = torch.randn(int(batch_sizes.sum()), 0, dtype=dtype, requires_grad=True)
            h0 = torch.randn(3, hidden, dtype=dtype, requires_grad=True)
            c0 = torch.randn(3, hidden, dtype=dtype, requires_grad=True)
            w_ih = torch.randn(gates * hidden, 0, dtype=dtype, requires_grad=True)
            w_hh = (0.5 * torch.randn(gates * hidden, hidden, dtype=dtype)).requires_grad_()
            b_ih = torch.randn(gates * hidden, dtype=dtype, requires_grad=True) if bias else None
            b_hh = torch.randn(gates * hidden, dtype=dtype, requires_grad=True) if bias else None
            states = [h0, c0] if cell == "lstm" else [h0]
            leaves = [x] + states + [w_ih, w_hh] + ([b_ih, b_hh] if bias else [])
            for reverse in (False, True):
                got = op(x, *states, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)
                expected = reference_op(x, *states, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)
                tol = dict(rtol=0, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
                for a, b in zip(got, expected):
                    torch.testing.assert_close(a, b, **tol, msg=f"fuse={fuse} {dtype} reverse={reverse}")
                grads = [torch.autograd.grad(sum(t.sin().sum() for t in outs), leaves) for outs in (got, expected)]
                for a, b in zip(*grads):
                    torch.testing.assert_close(a, b, **tol, msg=f"fuse={fuse} {dtype} reverse={reverse}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_with_input_size_0_equal_torch_nn(name, batched, device):
    """nn.LSTMCell(0, 4) is legal; the float32 fused cells returned uninitialised memory for it."""
    ref, ours = _pair(name, 0, 4, setup=lambda m: m.to(device))()
    x = torch.randn(3, 0, device=device) if batched else torch.randn(0, device=device)
    for _ in range(2):  # the same numbers every call
        expected, got = ref(x), ours(x)
        for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="fusedrnn.LSTM: input_size must be greater than zero, got 0"):
        fusedrnn.LSTM(0, 4)  # as torch.nn's layers


def test_not_a_tensor_error_is_both_type_error_and_attribute_error():
    """torch.nn raises AttributeError ('list' object has no attribute 'dim') for a non-tensor."""
    with pytest.raises(TypeError, match="input must be a Tensor, got list"):
        fusedrnn.GRU(3, 5)([1.0])
    with pytest.raises(AttributeError):
        fusedrnn.GRU(3, 5)([1.0])


# ---- TorchScript ---------------------------------------------------------------------------------
# As with torch.nn's recurrent modules (whose forward is overloaded for Tensor and PackedSequence
# input), a model that contains them is scripted, and calls them with typed arguments.

class _ScriptedLSTMUser(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, lengths: torch.Tensor):
        a, (h1, c1) = self.rnn(x)
        b, (h2, c2) = self.rnn(x, (h, c))
        packed, (h3, c3) = self.rnn(nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False), (h, c))
        d, (h4, c4) = self.rnn(x, (h, c), lengths)
        e, (h5, c5) = self.rnn(x[:, 0])  # unbatched
        return [a, h1, c1, b, h2, c2, packed.data, h3, c3, d, h4, c4, e, h5, c5]


class _ScriptedSingleStateUser(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, lengths: torch.Tensor):
        a, h1 = self.rnn(x)
        b, h2 = self.rnn(x, h)
        packed, h3 = self.rnn(nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False), h)
        d, h4 = self.rnn(x, h, lengths=lengths)
        return [a, h1, b, h2, packed.data, h3, d, h4]


class _ScriptedCellUser(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, lengths: torch.Tensor):
        return [self.cell(x[0]), self.cell(x[0], h[0]), self.cell(x[0, 0], h[0, 0])]


class _ScriptedLSTMCellUser(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, lengths: torch.Tensor):
        h1, c1 = self.cell(x[0])
        h2, c2 = self.cell(x[0], (h[0], c[0]))
        return [h1, c1, h2, c2]


SCRIPTED = {
    "lstm": lambda: _ScriptedLSTMUser(fusedrnn.LSTM(3, 4, num_layers=2, bidirectional=True)),
    "lstm_proj": lambda: _ScriptedLSTMUser(fusedrnn.LSTM(3, 4, proj_size=2)),
    "gru": lambda: _ScriptedSingleStateUser(fusedrnn.GRU(3, 4, num_layers=2, bias=False)),
    "rnn_relu": lambda: _ScriptedSingleStateUser(fusedrnn.RNN(3, 4, nonlinearity="relu", bidirectional=True)),
    "lstm_cell": lambda: _ScriptedLSTMCellUser(fusedrnn.LSTMCell(3, 4)),
    "gru_cell": lambda: _ScriptedCellUser(fusedrnn.GRUCell(3, 4)),
    "rnn_cell": lambda: _ScriptedCellUser(fusedrnn.RNNCell(3, 4, bias=False)),
}


def _script_inputs(model):
    rnn = getattr(model, "rnn", None)
    directions = 2 if getattr(rnn, "bidirectional", False) else 1
    layers = getattr(rnn, "num_layers", 1) * directions
    real = 2 if getattr(rnn, "proj_size", 0) else 4
    x = torch.randn(5, 2, 3)
    return x, torch.randn(layers, 2, real), torch.randn(layers, 2, 4), torch.tensor([3, 5])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated", "ignore:`torch.jit.load` is deprecated")
@pytest.mark.parametrize("kind", list(SCRIPTED))
def test_torch_jit_script_equals_eager_forward_backward_and_after_save_load(kind, tmp_path):
    torch.manual_seed(0)
    model = SCRIPTED[kind]()
    inputs = _script_inputs(model)
    eager = model(*inputs)
    scripted = torch.jit.script(model)
    got = scripted(*inputs)
    assert len(got) == len(eager) and all(torch.equal(a, b) for a, b in zip(got, eager))

    # Gradients through the scripted model (the ops' autograd is in the dispatcher).
    def grads(m):
        x = inputs[0].clone().requires_grad_()
        outputs = m(x, *inputs[1:])
        return torch.autograd.grad(sum(o.square().sum() for o in outputs), [x] + list(model.parameters()))

    assert all(torch.equal(a, b) for a, b in zip(grads(scripted), grads(model)))

    # Saved and loaded, then given new weights in place.
    path = str(tmp_path / "model.pt")
    scripted.save(path)
    loaded = torch.jit.load(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded(*inputs), eager))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    loaded.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(loaded(*inputs), model(*inputs)))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_a_scripted_model_still_scripts_after_convert_and_matches_torch_nn():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 6)
            self.lstm = nn.LSTM(6, 8, num_layers=2, bidirectional=True, batch_first=True)
            self.cell = nn.GRUCell(16, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            out, (h, _) = self.lstm(self.emb(tokens))
            return self.head(self.cell(out[:, -1]))

    torch.manual_seed(0)
    model = Tagger().double()
    tokens = torch.randint(0, 20, (4, 9))
    expected = torch.jit.script(model)(tokens)
    fusedrnn.convert(model)
    assert type(model.lstm) is fusedrnn.LSTM and type(model.cell) is fusedrnn.GRUCell
    got = torch.jit.script(model)(tokens)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_scripted_modules_check_their_input():
    scripted = torch.jit.script(_ScriptedSingleStateUser(fusedrnn.GRU(3, 4)))
    x, h, c, lengths = _script_inputs(scripted)
    with pytest.raises(Exception, match="fusedrnn.GRU: expected hx of size \\(1, 2, 4\\), got \\(1, 3, 4\\)"):
        scripted(x, torch.randn(1, 3, 4), c, lengths)
    with pytest.raises(Exception, match="fusedrnn.GRU: input.size\\(-1\\) must be equal to input_size"):
        scripted(torch.randn(5, 2, 7), h, c, lengths)


def test_torch_jit_script_without_the_compiled_library_names_the_alternatives():
    """The reference fallback is plain PyTorch, which TorchScript could not compile into the same
    module; scripting says so and names what works instead."""
    code = (
        "import sys, warnings\n"
        "sys.modules['fusedrnn._C'] = None  # makes `from . import _C` fail\n"
        "warnings.simplefilter('ignore')\n"
        "import torch, fusedrnn\n"
        "model = torch.nn.Sequential(fusedrnn.GRU(3, 4))\n"
        "try:\n"
        "    torch.jit.script(model)\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "refused: fusedrnn.GRU: torch.jit.script needs fusedrnn's compiled operators" in result.stdout
    assert "torch.jit.trace, torch.compile and torch.export work without them" in result.stdout


# ---- the rest of nn.RNNBase's surface: methods users override or read, and ways a module is moved,
# ---- copied, hooked, reparametrized or built (issue 14 "no silent wrong numbers"), each against torch.nn

SURFACE_LAYERS = ["lstm", "lstm_proj", "gru", "rnn_relu"]
SURFACE_DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])


def _tol(dtype):
    return dict(rtol=0, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)


def _run_and_grads(module, x, hx=None):
    """Outputs of a call and the gradients of a loss that weights every element differently, by name."""
    out = module(x) if hx is None else module(x, hx)
    leaves = torch.utils._pytree.tree_leaves(out)
    loss = sum((t * torch.linspace(-1, 1.5, t.numel(), dtype=t.dtype).view(t.shape)).sum() for t in leaves)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return [t.detach() for t in leaves], dict(zip([n for n, _ in named], grads))


def _same_run(ref, ours, x, dtype, hx=None):
    (out_r, g_r), (out_o, g_o) = _run_and_grads(ref, x, hx), _run_and_grads(ours, x, hx)
    assert len(out_o) == len(out_r)
    for a, b in zip(out_o, out_r):
        torch.testing.assert_close(a, b, **_tol(dtype))
    assert g_o.keys() == g_r.keys()
    for name in g_r:
        assert (g_o[name] is None) == (g_r[name] is None), name
        if g_r[name] is not None:
            torch.testing.assert_close(g_o[name], g_r[name], msg=name, **_tol(dtype))


def _counting_flatten(base):
    class Counting(base):
        def flatten_parameters(self):
            self.__dict__["flattened"] = self.__dict__.get("flattened", 0) + 1
            return super().flatten_parameters()
    return Counting


@pytest.mark.parametrize("cell", SURFACE_LAYERS)
def test_an_overridden_flatten_parameters_is_called_where_torch_nn_calls_it(cell):
    """nn.RNNBase calls flatten_parameters from _init_flat_weights: at construction, after _apply (.to,
    .double, to_empty) and in a forward after a weight's object changed; not in a forward otherwise."""
    torch_cls, fused_cls, extra = CELLS[cell]
    counts = []
    for cls in (_counting_flatten(torch_cls), _counting_flatten(fused_cls)):
        torch.manual_seed(0)
        m = cls(3, 5, num_layers=2, **extra)
        seen = [m.flattened]
        x = torch.randn(4, 2, 3)
        m(x)
        m(x)
        seen.append(m.flattened)
        m.double()
        seen.append(m.flattened)
        m.weight_hh_l1 = nn.Parameter(m.weight_hh_l1.detach() * 2)
        m(x.double())
        seen.append(m.flattened)
        torch.func.functional_call(m, {"weight_ih_l0": m.weight_ih_l0 * 1.0}, (x.double(),))
        m(x.double())
        seen.append(m.flattened)
        m.to_empty(device="cpu")
        seen.append(m.flattened)
        counts.append(seen)
    assert counts[1] == counts[0]


@pytest.mark.parametrize("kwargs", [{}, {"num_layers": 2, "bias": False}, {"batch_first": True, "dropout": 0.5,
                                                                            "num_layers": 3},
                                    {"bidirectional": True, "proj_size": 2}])
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_repr_and_weight_bookkeeping_equal_torch_nns(name, kwargs):
    """repr (extra_repr), _flat_weights_names, _all_weights, all_weights (the attributes' objects) and
    _flat_weights as torch.nn has them."""
    if name != "LSTM" and "proj_size" in kwargs:
        kwargs = {k: v for k, v in kwargs.items() if k != "proj_size"}
    ref, ours = getattr(nn, name)(3, 5, **kwargs), getattr(fusedrnn, name)(3, 5, **kwargs)
    assert repr(ours) == repr(ref)
    assert ours._flat_weights_names == ref._flat_weights_names
    assert ours._all_weights == ref._all_weights
    assert [[w.shape for w in ws] for ws in ours.all_weights] == [[w.shape for w in ws] for ws in ref.all_weights]
    assert all(w is getattr(ours, n) for ws, ns in zip(ours.all_weights, ours._all_weights) for w, n in zip(ws, ns))
    assert all(w is getattr(ours, n) for w, n in zip(ours._flat_weights, ours._flat_weights_names))
    assert [type(r) for r in ours._flat_weight_refs] == [type(r) for r in ref._flat_weight_refs]
    assert ours._weights_have_changed() is ref._weights_have_changed() is False
    ours.weight_hh_l0, ref.weight_hh_l0 = (nn.Parameter(m.weight_hh_l0.detach().clone()) for m in (ours, ref))
    assert ours._weights_have_changed() is ref._weights_have_changed() is True


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_repr_equals_torch_nns(name):
    for kwargs in ({}, {"bias": False}, {"nonlinearity": "relu"} if name == "RNNCell" else {"bias": True}):
        assert repr(getattr(fusedrnn, name)(3, 5, **kwargs)) == repr(getattr(nn, name)(3, 5, **kwargs))


def _very_old_state(module):
    """module's pickled state as PyTorch before 1.8 wrote it: no proj_size, no _flat_weights or
    _flat_weights_names, and `all_weights` holding the weights themselves, not their names."""
    state = module.__getstate__()
    state = {k: v for k, v in state.items() if k not in ("proj_size", "_flat_weights", "_flat_weights_names",
                                                        "_all_weights")}
    state["all_weights"] = [[getattr(module, n) for n in names] for names in module._all_weights]
    return state


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
@pytest.mark.parametrize("age", ["before_1_8", "no_proj_size"])
def test_old_pickled_state_loads_as_in_torch_nn(cell, age):
    """nn.RNNBase.__setstate__ rebuilds the names of a pickle from before PyTorch 1.8 and sets proj_size
    where it is missing; fusedrnn's layers load the same states and run them with nn's numbers."""
    ref, ours = make_pair(cell, num_layers=2, bidirectional=True)
    if age == "before_1_8":
        state = _very_old_state(ref)
    else:
        state = {k: v for k, v in ref.__getstate__().items() if k != "proj_size"}
    loaded = []
    for cls in (type(ref), type(ours)):
        m = cls.__new__(cls)
        m.__setstate__(dict(state))
        loaded.append(m)
    assert loaded[1].proj_size == loaded[0].proj_size == 0
    assert loaded[1]._flat_weights_names == loaded[0]._flat_weights_names
    _same_run(loaded[0], loaded[1], torch.randn(4, 2, 3, dtype=torch.float64), torch.float64)


class _Encoder(nn.Module):
    def __init__(self, cell, **kwargs):
        super().__init__()
        torch_cls, _, extra = CELLS[cell]
        self.proj = nn.Linear(3, 4)
        self.rnn = torch_cls(4, 5, num_layers=2, bidirectional=True, **{**extra, **kwargs})
        self.step = nn.GRUCell(4, 5)

    def forward(self, x):
        out = self.rnn(self.proj(x))[0]
        return out.sum(-1, keepdim=True) + self.step(self.proj(x[0])).sum()


@pytest.mark.parametrize("cell", SURFACE_LAYERS)
def test_state_dicts_move_between_torch_nn_and_converted_models_both_ways(cell):
    torch.manual_seed(0)
    reference = _Encoder(cell).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    expected = reference(x)
    converted = fusedrnn.convert(copy.deepcopy(reference))
    assert isinstance(converted.rnn, fusedrnn.modules._RNNBase)
    sd = converted.state_dict()
    assert list(sd) == list(reference.state_dict())
    fresh_nn = _Encoder(cell).double()
    fresh_nn.load_state_dict(sd)  # converted -> torch.nn
    fresh_ours = fusedrnn.convert(_Encoder(cell).double())
    fresh_ours.load_state_dict(reference.state_dict())  # torch.nn -> converted
    reverted = fusedrnn.revert(copy.deepcopy(fresh_ours))
    assert type(reverted.rnn) is type(reference.rnn)
    for model in (converted, fresh_nn, fresh_ours, reverted):
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-10)
    assert list(reverted.state_dict()) == list(sd)


def _train_steps(model, opt, xs):
    for x in xs:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch_save"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_converted_model_copied_mid_training_continues_as_torch_nn(cell, how):
    """deepcopy / pickle / torch.save of a converted model (and its optimizer) between two training steps:
    the copy goes on with torch.nn's numbers, and the original is not tied to it."""
    torch.manual_seed(0)
    ref = _Encoder(cell, dropout=0.0).double()
    ours = fusedrnn.convert(copy.deepcopy(ref))
    xs = [torch.randn(4, 2, 3, dtype=torch.float64) for _ in range(4)]
    opt_ref, opt_ours = (torch.optim.Adam(m.parameters(), lr=0.01) for m in (ref, ours))
    _train_steps(ref, opt_ref, xs[:2])
    _train_steps(ours, opt_ours, xs[:2])

    def copied(obj):
        if how == "deepcopy":
            return copy.deepcopy(obj)
        if how == "pickle":
            return pickle.loads(pickle.dumps(obj))
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    ref_copy, ours_copy = copied((ref, opt_ref)), copied((ours, opt_ours))
    for model, opt in (ref_copy, ours_copy):
        assert all(p.grad is None or p.grad.abs().sum() >= 0 for p in model.parameters())
    _train_steps(*ref_copy, xs[2:])
    _train_steps(*ours_copy, xs[2:])
    torch.testing.assert_close(ours_copy[0](xs[0]), ref_copy[0](xs[0]), rtol=0, atol=1e-10)
    torch.testing.assert_close(ours(xs[0]), ref(xs[0]), rtol=0, atol=1e-10)  # the originals did not move
    assert not torch.equal(ours(xs[0]), ours_copy[0](xs[0]))


@pytest.mark.parametrize("cell", SURFACE_LAYERS)
@SURFACE_DTYPES
def test_full_backward_hooks_see_what_torch_nns_see(cell, dtype):
    """register_full_backward_pre_hook scaling grad_output and register_full_backward_hook recording
    grad_input / grad_output: the same tensors reach the hooks, the same gradients come out."""
    ref, ours = make_pair(cell, dtype=dtype, num_layers=2)
    seen = {}
    for name, m in (("ref", ref), ("ours", ours)):
        seen[name] = []
        m.register_full_backward_pre_hook(lambda mod, grad_output: tuple(
            None if g is None else g * 3 for g in grad_output))
        m.register_full_backward_hook(lambda mod, grad_input, grad_output, log=seen[name]: log.append(
            [None if g is None else g.clone() for g in tuple(grad_input) + tuple(grad_output)]))
    x = torch.randn(4, 2, 3, dtype=dtype, requires_grad=True)
    grads = []
    for m in (ref, ours):
        x.grad = None
        out = m(x)
        (out[0] * torch.linspace(-1, 1, out[0].numel(), dtype=dtype).view(out[0].shape)).sum().backward()
        grads.append((x.grad.clone(), [p.grad.clone() for p in m.parameters()]))
    assert len(seen["ours"]) == len(seen["ref"]) == 1
    for a, b in zip(seen["ours"][0], seen["ref"][0]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **_tol(dtype))
    torch.testing.assert_close(grads[1], grads[0], **_tol(dtype))


@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_full_backward_hook_sees_what_torch_nns_sees(cell):
    torch.manual_seed(0)
    ref = getattr(nn, cell)(3, 5, dtype=torch.float64)
    ours = getattr(fusedrnn, cell)(3, 5, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    seen = []
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    for m in (ref, ours):
        log = []
        m.register_full_backward_hook(lambda mod, gi, go, log=log: log.append([g for g in gi + go if g is not None]))
        out = m(x)
        h = out[0] if isinstance(out, tuple) else out
        (h * torch.arange(h.numel(), dtype=h.dtype).view(h.shape)).sum().backward()
        seen.append(log)
    assert len(seen[0]) == len(seen[1]) == 1 and len(seen[0][0]) == len(seen[1][0])
    for a, b in zip(seen[1][0], seen[0][0]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def _old_style(fn):
    def apply(m, name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated
            fn(m, name)
    return apply


REPARAMETRIZATIONS = {
    "weight_norm": lambda m, name: nn.utils.parametrizations.weight_norm(m, name),
    "spectral_norm": lambda m, name: nn.utils.parametrizations.spectral_norm(m, name),
    "orthogonal": lambda m, name: nn.utils.parametrizations.orthogonal(m, name),
    "old_weight_norm": _old_style(nn.utils.weight_norm),
    "old_spectral_norm": _old_style(nn.utils.spectral_norm),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("how", list(REPARAMETRIZATIONS))
@pytest.mark.parametrize("cell", ["lstm", "lstm_proj", "gru", "rnn_relu"])
def test_reparametrized_weights_give_torch_nns_numbers_in_train_and_eval(cell, how, mode):
    """parametrize-based and old hook-based weight_norm / spectral_norm (and orthogonal) on a recurrent and
    a second-layer input weight: three steps of forward, backward and SGD, in training and in eval mode
    (spectral_norm's power iteration runs only in training)."""
    names = ["weight_hh_l0", "weight_ih_l1"] + (["weight_hr_l0"] if cell == "lstm_proj" else [])
    ref, ours = make_pair(cell, num_layers=2)
    for m in (ref, ours):
        for name in names:
            torch.manual_seed(1)
            REPARAMETRIZATIONS[how](m, name)
        getattr(m, mode)()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, ours)]
    for step in range(3):
        x = torch.randn(4, 2, 3, dtype=torch.float64)
        _same_run(ref, ours, x, torch.float64)
        for m, opt in zip((ref, ours), opts):
            opt.zero_grad()
            m(x)[0].pow(2).sum().backward()
            opt.step()
    for (n, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=n)


@pytest.mark.parametrize("cell", SURFACE_LAYERS)
@SURFACE_DTYPES
def test_single_weights_frozen_with_requires_grad_false(cell, dtype):
    ref, ours = make_pair(cell, dtype=dtype, num_layers=2, bidirectional=True)
    frozen = ["weight_hh_l0", "bias_ih_l1_reverse", "weight_ih_l1"] + (["weight_hr_l1"] if cell == "lstm_proj" else [])
    for m in (ref, ours):
        for name in frozen:
            getattr(m, name).requires_grad_(False)
    _same_run(ref, ours, torch.randn(4, 2, 3, dtype=dtype), dtype)
    ref.weight_hh_l0.requires_grad_(True), ours.weight_hh_l0.requires_grad_(True)  # and back
    _same_run(ref, ours, torch.randn(4, 2, 3, dtype=dtype), dtype)


MOVES = {
    "half_then_float": lambda m: m.half().float(),
    "bfloat16_then_float": lambda m: m.bfloat16().float(),
    "double_then_float": lambda m: m.double().float(),
    "channels_last": lambda m: m.to(memory_format=torch.channels_last),
    "to_same": lambda m: m.to("cpu", torch.float32),
}


@pytest.mark.parametrize("move", list(MOVES))
@pytest.mark.parametrize("cell", SURFACE_LAYERS)
def test_moved_modules_run_with_the_moved_weights(cell, move):
    """The conversions of Module.to / half / bfloat16 round trips (each replaces or keeps the weights'
    objects through nn.RNNBase._apply) give torch.nn's numbers, after a call made before the move."""
    ref, ours = make_pair(cell, dtype=torch.float32, num_layers=2)
    x = torch.randn(4, 2, 3)
    for m in (ref, ours):
        m(x)
        assert MOVES[move](m) is m
    _same_run(ref, ours, x, torch.float32)
    assert all(w is getattr(ours, n) for w, n in zip(ours._flat_weights, ours._flat_weights_names))


@pytest.mark.parametrize("cell", SURFACE_LAYERS)
@pytest.mark.parametrize("how", ["to_empty_then_load", "meta_then_assign", "meta_context_then_assign",
                                 "meta_then_to_empty_then_load"])
def test_modules_built_without_weights_then_loaded(cell, how):
    """Construction on the meta device (argument or `with torch.device("meta")`) then
    load_state_dict(assign=True), or to_empty then load_state_dict: torch.nn's numbers, and the weights
    the module runs with are the loaded ones."""
    torch_cls, fused_cls, extra = CELLS[cell]
    torch.manual_seed(0)
    source = torch_cls(3, 5, num_layers=2, dtype=torch.float64, **extra)
    sd = source.state_dict()
    built = []
    for cls in (torch_cls, fused_cls):
        if how == "to_empty_then_load":
            m = cls(3, 5, num_layers=2, dtype=torch.float64, **extra)
            m(torch.randn(4, 2, 3, dtype=torch.float64))
            m.to_empty(device="cpu")
            m.load_state_dict(sd)
        elif how == "meta_then_to_empty_then_load":
            m = cls(3, 5, num_layers=2, dtype=torch.float64, device="meta", **extra)
            m.to_empty(device="cpu")
            m.load_state_dict(sd)
        else:
            if how == "meta_context_then_assign":
                with torch.device("meta"):
                    m = cls(3, 5, num_layers=2, dtype=torch.float64, **extra)
            else:
                m = cls(3, 5, num_layers=2, dtype=torch.float64, device="meta", **extra)
            assert m.weight_ih_l0.is_meta
            m.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)
        built.append(m)
    _same_run(built[0], built[1], torch.randn(4, 2, 3, dtype=torch.float64), torch.float64)
    _same_run(source, built[1], torch.randn(4, 2, 3, dtype=torch.float64), torch.float64)


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_built_on_meta_then_assigned(name):
    torch.manual_seed(0)
    source = getattr(nn, name)(3, 5, dtype=torch.float64)
    ours = getattr(fusedrnn, name)(3, 5, dtype=torch.float64, device="meta")
    ours.load_state_dict(source.state_dict(), assign=True)
    x = torch.randn(2, 3, dtype=torch.float64)
    for a, b in zip(torch.utils._pytree.tree_leaves(ours(x)), torch.utils._pytree.tree_leaves(source(x))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def _pruned(m, x):
    prune.l1_unstructured(m, "weight_hh_l0", amount=0.5)  # an old-style pre-hook recomputes it
    first = m(x)
    prune.remove(m, "weight_hh_l0")
    return first, m(x * 2)


def _cached_parametrization(m, x):
    nn.utils.parametrize.register_parametrization(m, "weight_hh_l1", nn.Identity())
    with nn.utils.parametrize.cached():
        return m(x), m(x * 2)


def _weight_made_a_buffer(m, x):
    m(x)
    del m.weight_hh_l0
    m.register_buffer("weight_hh_l0", torch.full(m.weight_hh_l1.shape, 0.1, dtype=x.dtype))
    return m(x)


def _pre_hook_with_kwargs(m, x):
    m.register_forward_pre_hook(lambda mod, args, kwargs: ((args[0] * 2,) + args[1:], kwargs), with_kwargs=True)
    return m(x)


def _data_parallel_replica(m, x):
    m(x)
    return m._replicate_for_data_parallel()(x)


MORE_USES = {"pruned_then_removed": _pruned, "parametrize_cached": _cached_parametrization,
             "weight_made_a_buffer": _weight_made_a_buffer, "pre_hook_with_kwargs": _pre_hook_with_kwargs,
             "data_parallel_replica": _data_parallel_replica}


@pytest.mark.parametrize("use", list(MORE_USES))
@pytest.mark.parametrize("cell", SURFACE_LAYERS)
@SURFACE_DTYPES
def test_more_uses_of_a_layer_give_torch_nns_numbers(cell, use, dtype):
    """torch.nn.utils.prune (a mask applied by a forward pre-hook, then removed), parametrize.cached(), a
    weight re-registered as a buffer, a pre-hook with kwargs, a DataParallel replica: outputs and the
    gradients of every parameter as torch.nn's."""
    ref, ours = make_pair(cell, dtype=dtype, num_layers=2)
    x = torch.randn(4, 2, 3, dtype=dtype)
    results = []
    for m in (ref, ours):
        leaves = torch.utils._pytree.tree_leaves(MORE_USES[use](m, x))
        sum((t * torch.linspace(-1, 1, t.numel(), dtype=dtype).view(t.shape)).sum() for t in leaves).backward()
        results.append(([t.detach() for t in leaves], [(n, p.grad) for n, p in m.named_parameters()]))
    (out_r, g_r), (out_o, g_o) = results
    torch.testing.assert_close(out_o, out_r, **_tol(dtype))
    assert [n for n, _ in g_o] == [n for n, _ in g_r]
    for (n, a), (_, b) in zip(g_o, g_r):
        assert (a is None) == (b is None), n
        if b is not None:
            torch.testing.assert_close(a, b, msg=n, **_tol(dtype))


@pytest.mark.parametrize("create_graph", [False, True], ids=["first_order", "create_graph"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "python_autograd"])
@pytest.mark.parametrize("steps", [1, 3])
def test_weight_hr_gets_no_gradient_where_torch_nn_gives_none(steps, compiled, create_graph, monkeypatch):
    """At one step, w_hr reaches only the output and h_n (c_n = f c_0 + i g does not depend on it): a
    loss on c_n alone gives torch.nn's w_hr no gradient (None), and an optimizer with weight decay skips
    it. fusedrnn's one node returned zeros, so AdamW decayed the weight and the numbers parted after a
    step. Two layers: the lower layer's w_hr reaches the top layer's c_n through its input."""
    if compiled:  # the Python autograd formulas (what torch.compile traces) instead of the C++ node
        monkeypatch.setattr(fusedrnn._ops, "_TRAIN_LSTM", fusedrnn._ops._EAGER_FUNCTIONS["lstm_forward"].apply)
    ref, ours = _pair("LSTM", 3, 4, num_layers=2, proj_size=2, dtype=torch.float64)()
    x = _d(steps, 2, 3)
    results = []
    for module in (ref, ours):
        opt = torch.optim.AdamW(module.parameters(), lr=0.1, weight_decay=0.5)
        _, (_, c_n) = module(x)
        # create_graph: the double-backward formulas (gradient penalties, MAML) must give None too
        (c_n[1] * torch.linspace(-1, 1, 8, dtype=torch.float64).view(2, 4)).sum().backward(create_graph=create_graph)
        grads = {n: p.grad for n, p in module.named_parameters()}
        opt.step()
        results.append((grads, {n: p.detach().clone() for n, p in module.named_parameters()}))
    (expected, expected_after), (got, got_after) = results
    assert {n for n, g in got.items() if g is None} == {n for n, g in expected.items() if g is None}
    if steps == 1:
        assert expected["weight_hr_l1"] is None
    for n in expected:
        if expected[n] is not None:
            torch.testing.assert_close(got[n], expected[n], rtol=0, atol=1e-12)
        torch.testing.assert_close(got_after[n], expected_after[n], rtol=0, atol=1e-12)
