"""Compatibility with the tools users rely on (issue 9): autocast, torch.func, TorchScript,
torch.nn's exception types, relu's gradient at NaN, and fake kernels that describe the real
outputs. Every test compares with torch.nn or a float64 reference."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

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
    return [t.to_dense() if t.layout != torch.strided else t for t in leaves]


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
