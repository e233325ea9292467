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
from conftest import CELLS, flat_state, make_pair

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


def _packed(x, lengths=(4, 2)):
    return nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths))


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
