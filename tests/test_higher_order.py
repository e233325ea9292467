"""Higher-order gradients (issue 14): double backward (create_graph=True: gradient penalties, MAML,
Hessian-vector products), nested torch.func.grad / jacrev, and forward-mode AD (torch.func.jvp,
jacfwd, hessian, torch.autograd.forward_ad dual tensors) through every layer and cell, checked with
gradgradcheck in float64 and against torch.nn's derivatives; and a plain forward + backward still
runs only the fused ops (fusedrnn/_ops.py: _FirstOrderGrads, _forward_mode)."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fusedrnn
from conftest import CELLS, DEVICES, flat_state, make_pair
from fusedrnn import _ops

pytestmark = pytest.mark.skipif(not fusedrnn.backends()["compiled"], reason="compiled operators not loaded "
                                "(without them everything runs on fusedrnn.reference, which torch differentiates): "
                                + str(fusedrnn.backends()["load_error"]))

F64 = torch.float64
LENGTHS = [3, 1, 2]  # ragged, unsorted: pack_padded_sequence(enforce_sorted=False) sorts them
# Layer configurations: constructor kwargs and how the input is given.
LAYER_CONFIGS = {
    "2layers_bidir": (dict(num_layers=2, bidirectional=True), "tensor"),
    "hx": (dict(), "tensor_hx"),
    "packed": (dict(bidirectional=True), "packed"),
    "lengths": (dict(batch_first=True), "lengths"),
    "bias_false": (dict(bias=False), "tensor_hx"),
    "unbatched": (dict(num_layers=2), "unbatched"),
}
CELL_CLASSES = {"lstm": (nn.LSTMCell, fusedrnn.LSTMCell, {}), "gru": (nn.GRUCell, fusedrnn.GRUCell, {}),
                "rnn_tanh": (nn.RNNCell, fusedrnn.RNNCell, {"nonlinearity": "tanh"}),
                "rnn_relu": (nn.RNNCell, fusedrnn.RNNCell, {"nonlinearity": "relu"})}
CELL_CONFIGS = {"batched": (dict(), True, False), "hx": (dict(), True, True),
                "bias_false": (dict(bias=False), True, True), "unbatched": (dict(), False, True)}


def _layer_case(cell, config, device, input_size=2, hidden_size=3):
    """(torch.nn module, fusedrnn module, inputs, run): run(module, *inputs) -> flat tuple of outputs."""
    kwargs, how = LAYER_CONFIGS[config]
    if cell == "lstm_proj":
        kwargs = {**kwargs, "proj_size": 2}
    torch.manual_seed(0)
    ref, ours = make_pair(cell, input_size, hidden_size, device=device, **kwargs)
    is_lstm = cell.startswith("lstm")
    d = 2 if ours.bidirectional else 1
    real = ours.proj_size or hidden_size
    steps, batch = 3, 3

    def rand(*shape):
        return torch.randn(*shape, dtype=F64, device=device)

    def states(batch_shape):
        h = rand(ours.num_layers * d, *batch_shape, real)
        return [h, rand(ours.num_layers * d, *batch_shape, hidden_size)] if is_lstm else [h]

    def hx_of(s):
        return tuple(s) if is_lstm else s[0]

    if how == "tensor":
        inputs = [rand(steps, batch, input_size)]

        def run(m, x):
            out, st = m(x)
            return (out, *flat_state(st))
    elif how in ("tensor_hx", "unbatched"):
        shape = (batch,) if how == "tensor_hx" else ()
        inputs = [rand(steps, *shape, input_size), *states(shape)]

        def run(m, x, *s):
            out, st = m(x, hx_of(s))
            return (out, *flat_state(st))
    elif how == "packed":
        inputs = [rand(max(LENGTHS), batch, input_size), *states((batch,))]

        def run(m, x, *s):
            packed = pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False)
            out, st = m(packed, hx_of(s))
            return (out.data, *flat_state(st))
    else:  # lengths=: fusedrnn only; torch.nn gets the same batch packed
        inputs = [rand(batch, max(LENGTHS), input_size), *states((batch,))]

        def run(m, x, *s):
            lengths = torch.tensor(LENGTHS)
            if isinstance(m, nn.RNNBase):
                packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
                out, st = m(packed, hx_of(s))
                out = pad_packed_sequence(out, batch_first=True)[0]
            else:
                out, st = m(x, hx_of(s), lengths=lengths)
            mask = (torch.arange(max(LENGTHS)) < lengths[:, None]).to(device)
            return (out * mask[..., None], *flat_state(st))
    return ref, ours, inputs, run


def _cell_case(cell, config, device, input_size=2, hidden_size=3):
    torch_cls, fused_cls, extra = CELL_CLASSES[cell]
    kwargs, batched, with_hx = CELL_CONFIGS[config]
    torch.manual_seed(0)
    ref = torch_cls(input_size, hidden_size, dtype=F64, device=device, **extra, **kwargs)
    ours = fused_cls(input_size, hidden_size, dtype=F64, device=device, **extra, **kwargs)
    ours.load_state_dict(ref.state_dict())
    shape = (3,) if batched else ()
    inputs = [torch.randn(*shape, input_size, dtype=F64, device=device)]
    n_states = 2 if cell == "lstm" else 1
    if with_hx:
        inputs += [torch.randn(*shape, hidden_size, dtype=F64, device=device) for _ in range(n_states)]

    def run(m, x, *s):
        hx = (tuple(s) if cell == "lstm" else s[0]) if s else None
        return tuple(flat_state(m(x, hx)))
    return ref, ours, inputs, run


LAYER_CASES = [(c, k) for c in CELLS for k in LAYER_CONFIGS]
CELL_CASES = [(c, k) for c in CELL_CLASSES for k in CELL_CONFIGS]


def _case(kind, cell, config, device):
    return (_layer_case if kind == "layer" else _cell_case)(cell, config, device)


class _Run(nn.Module):
    """module + how it is called, as one module: torch.func.functional_call then swaps its weights."""

    def __init__(self, module, run):
        super().__init__()
        self.m, self.run = module, run

    def forward(self, *inputs):
        return self.run(self.m, *inputs)


def _as_function(module, run, n_inputs):
    """f(*inputs, *parameters) -> the outputs, differentiable in all of them."""
    wrapped = _Run(module, run)
    names = [n for n, _ in wrapped.named_parameters()]

    def f(*args):
        return torch.func.functional_call(wrapped, dict(zip(names, args[n_inputs:])), tuple(args[:n_inputs]))
    return f


ALL_CASES = [("layer", c, k) for c, k in LAYER_CASES] + [("cell", c, k) for c, k in CELL_CASES]


# ---- gradgradcheck: the second derivatives are those of the function, in float64 -------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,cell,config", ALL_CASES)
def test_gradgradcheck(kind, cell, config, device):
    _, ours, inputs, run = _case(kind, cell, config, device)
    args = [t.requires_grad_() for t in inputs] + [p.detach().clone().requires_grad_() for p in ours.parameters()]
    f = _as_function(ours, run, len(inputs))
    assert torch.autograd.gradgradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


# ---- double backward equals torch.nn's (float64, 1e-10) --------------------------------------------

def _scalar(outputs):
    """A loss that uses every output nonlinearly, so that no second derivative is trivially zero."""
    return sum((o.sin() * (k + 1)).sum() for k, o in enumerate(outputs))


def _penalty_gradients(module, run, inputs, create_graph=False):
    """Gradient penalty: d/d(inputs, parameters) of the sum of squared first gradients."""
    leaves = [*inputs, *module.parameters()]
    first = torch.autograd.grad(_scalar(run(module, *inputs)), leaves, create_graph=True)
    return torch.autograd.grad(sum(g.square().sum() for g in first), leaves, create_graph=create_graph)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,cell,config", ALL_CASES)
def test_double_backward_equals_torch_nn(kind, cell, config, device):
    ref, ours, inputs, run = _case(kind, cell, config, device)
    inputs = [t.requires_grad_() for t in inputs]
    expected = _penalty_gradients(ref, run, inputs)
    got = _penalty_gradients(ours, run, inputs)
    names = [f"input{i}" for i in range(len(inputs))] + [n for n, _ in ours.named_parameters()]
    for name, e, g in zip(names, expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("cell", list(CELLS))
def test_third_derivative_equals_torch_nn(cell):
    """The double-backward formula is itself made of torch ops: a third backward works."""
    ref, ours, inputs, run = _layer_case(cell, "2layers_bidir", "cpu")
    x = inputs[0].requires_grad_()
    results = []
    for m in (ref, ours):
        second = _penalty_gradients(m, run, [x], create_graph=True)
        results.append(torch.autograd.grad(sum(g.sin().sum() for g in second), [x, *m.parameters()]))
    for e, g in zip(*results):  # third derivatives reach the thousands: relative 1e-10 too
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cell", ["lstm_proj", "gru", "rnn_relu"])
def test_hessian_vector_product_equals_torch_nn(cell):
    ref, ours, inputs, run = _layer_case(cell, "2layers_bidir", "cpu")
    vs = [torch.randn_like(p) for p in ours.parameters()]
    results = []
    for m in (ref, ours):
        params = list(m.parameters())
        grads = torch.autograd.grad(_scalar(run(m, *inputs)), params, create_graph=True)
        results.append(torch.autograd.grad(grads, params, vs))
    for e, g in zip(*results):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)


# ---- torch.func: forward mode, nested reverse mode, MAML --------------------------------------------

def _func_loss(module, run, inputs):
    """loss(params, x) for torch.func, x the first input (the others fixed)."""
    wrapped = _Run(module, run)

    def loss(params, x):
        return _scalar(torch.func.functional_call(wrapped, {"m." + k: v for k, v in params.items()},
                                                  (x, *inputs[1:])))
    return loss


def _first_weight(grads):
    return grads["weight_hh_l0"] if "weight_hh_l0" in grads else grads["weight_hh"]


def _assert_trees_close(got, expected):
    got, spec = torch.utils._pytree.tree_flatten(got)
    expected, expected_spec = torch.utils._pytree.tree_flatten(expected)
    assert spec == expected_spec
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)


TRANSFORMS = {
    # forward mode
    "jvp": lambda f, p, x: torch.func.jvp(lambda x: f(p, x), (x,), (torch.ones_like(x),)),
    "jvp_params": lambda f, p, x: torch.func.jvp(lambda p: f(p, x), (p,), ({k: v.cos() for k, v in p.items()},)),
    "jacfwd": lambda f, p, x: torch.func.jacfwd(f, argnums=(0, 1))(p, x),
    "hessian": lambda f, p, x: torch.func.hessian(f, argnums=1)(p, x),
    "hessian_params": lambda f, p, x: torch.func.hessian(f)(p, x),
    "jvp_of_grad": lambda f, p, x: torch.func.jvp(lambda x: torch.func.grad(f, argnums=1)(p, x), (x,),
                                                  (torch.ones_like(x),)),
    # reverse over reverse
    "jacrev_jacrev": lambda f, p, x: torch.func.jacrev(torch.func.jacrev(f, argnums=1), argnums=(0, 1))(p, x),
    "grad_grad": lambda f, p, x: torch.func.grad(lambda p, x: _first_weight(torch.func.grad(f)(p, x)).square().sum(),
                                                 argnums=(0, 1))(p, x),
    "vmap_grad_grad": lambda f, p, x: torch.func.vmap(
        torch.func.grad(lambda x: torch.func.grad(f, argnums=1)(p, x).square().sum()))(torch.stack([x, 2 * x])),
}


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch.func's jvp scripts a helper
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("kind,cell,config", [("layer", c, "hx") for c in CELLS] + [("layer", "gru", "unbatched")]
                         + [("cell", c, "hx") for c in CELL_CLASSES])
def test_torch_func_equals_torch_nn(transform, kind, cell, config):
    ref, ours, inputs, run = _case(kind, cell, config, "cpu")
    results = []
    for m in (ref, ours):
        params = {k: v.detach() for k, v in m.named_parameters()}
        f = _func_loss(m, run, inputs)
        if transform == "vmap_grad_grad" and m is ref:  # torch.nn's RNNs have no batching rule: a loop
            one = lambda x: torch.func.grad(lambda x: torch.func.grad(f, argnums=1)(params, x).square().sum())(x)
            results.append(torch.stack([one(inputs[0]), one(2 * inputs[0])]))
        else:
            results.append(TRANSFORMS[transform](f, params, inputs[0]))
    _assert_trees_close(results[1], results[0])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch.func's jvp scripts a helper
@pytest.mark.parametrize("cell", list(CELLS))
def test_forward_mode_on_packed_input_equals_reverse_mode(cell):
    """torch.nn cannot run packed input under torch.func (and torch's pack_padded_sequence has no
    forward-mode formula: tangents of the weights only; `lengths=` cannot run under torch.func at
    all, as torch's pad_packed_sequence cannot, first order included), so here jacfwd
    (fusedrnn.reference) is compared with jacrev (the fused ops, equal to torch.nn's by the tests
    above), and the hessian with eager double backward (fused first, reference second derivatives)."""
    _, ours, inputs, run = _layer_case(cell, "packed", "cpu")
    f = _func_loss(ours, run, inputs)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    _assert_trees_close(torch.func.jacfwd(f)(params, inputs[0]), torch.func.jacrev(f)(params, inputs[0]))
    w = params["weight_hh_l0"].clone().requires_grad_()
    (g,) = torch.autograd.grad(f({**params, "weight_hh_l0": w}, inputs[0]), w, create_graph=True)
    rows = [torch.autograd.grad(g.flatten()[i], w, retain_graph=True)[0] for i in range(g.numel())]
    hessian = torch.func.hessian(lambda w: f({**params, "weight_hh_l0": w}, inputs[0]))(params["weight_hh_l0"])
    torch.testing.assert_close(hessian, torch.stack(rows).view(*w.shape, *w.shape), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind,cell,config", [("layer", c, "2layers_bidir") for c in CELLS]
                         + [("cell", c, "hx") for c in CELL_CLASSES])
def test_dual_tensors_equal_torch_nn(kind, cell, config):
    """torch.autograd.forward_ad: tangents of the input and of a weight, through outputs and states."""
    ref, ours, inputs, run = _case(kind, cell, config, "cpu")
    tangents = [torch.randn_like(t) for t in inputs]
    results = []
    for m in (ref, ours):
        name, weight = next(iter(m.named_parameters()))
        with fwAD.dual_level():
            duals = [fwAD.make_dual(t, v) for t, v in zip(inputs, tangents)]
            dual_weight = fwAD.make_dual(weight.detach(), weight.detach().cos())
            outputs = torch.func.functional_call(_Run(m, run), {"m." + name: dual_weight}, tuple(duals))
            results.append([fwAD.unpack_dual(o) for o in outputs])
    for (ep, et), (gp, gt) in zip(*results):
        torch.testing.assert_close(gp, ep, rtol=0, atol=1e-10)
        torch.testing.assert_close(gt, et, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cell", list(CELLS))
def test_maml_inner_step_by_torch_func_grad_equals_torch_nn(cell):
    """One torch.func.grad inner step, then eager backward through it to the initial weights."""
    ref, ours, inputs, run = _layer_case(cell, "hx", "cpu")
    results = []
    for m in (ref, ours):
        loss = _func_loss(m, run, inputs)
        params = {k: v for k, v in m.named_parameters()}
        inner = torch.func.grad(loss)(params, inputs[0])
        adapted = {k: v - 0.1 * inner[k] for k, v in params.items()}
        results.append(torch.autograd.grad(loss(adapted, inputs[0] + 1), list(params.values())))
    for e, g in zip(*results):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cell", list(CELLS))
def test_torch_func_grad_of_an_eager_gradient_penalty_equals_torch_nn(cell):
    """torch.func.grad around torch.autograd.grad(create_graph=True): the second derivative is then
    taken inside a torch.func transform (fusedrnn/_ops.py: _functorch_second_order)."""
    ref, ours, inputs, run = _layer_case(cell, "hx", "cpu")
    results = []
    for m in (ref, ours):
        def penalty(x):
            (g,) = torch.autograd.grad(_scalar(run(m, x, *inputs[1:])), x, create_graph=True)
            return g.square().sum()
        results.append(torch.func.grad(penalty)(inputs[0]))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-10)


# ---- the first-order path is untouched -----------------------------------------------------------

FIRST_ORDER_CASES = [("layer", c, "2layers_bidir") for c in CELLS] + [("layer", "gru", "packed")] + \
    [("cell", c, "hx") for c in CELL_CLASSES]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,cell,config", FIRST_ORDER_CASES)
def test_first_order_training_runs_only_the_fused_ops(kind, cell, config, device, monkeypatch):
    """A plain forward + backward (and one torch.func.grad) calls neither fusedrnn.reference nor
    the differentiable backward, runs one fused backward op per layer and direction, and gives
    torch.nn's gradients; create_graph=True gives the same first gradients, bitwise."""
    ref, ours, inputs, run = _case(kind, cell, config, device)
    used = []
    for name in ("lstm_layer", "gru_layer", "rnn_layer"):
        monkeypatch.setattr(fusedrnn.reference, name, lambda *a, name=name: used.append(name))
    backward_of_backward, differentiable_vjp = _ops._FirstOrderGrads.backward, _ops._differentiable_vjp
    monkeypatch.setattr(_ops._FirstOrderGrads, "backward",
                        staticmethod(lambda *a: used.append("_FirstOrderGrads.backward") or backward_of_backward(*a)))
    monkeypatch.setattr(_ops, "_differentiable_vjp", lambda *a: used.append("vjp") or differentiable_vjp(*a))
    inputs = [t.requires_grad_() for t in inputs]
    leaves = [*inputs, *ours.parameters()]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = torch.autograd.grad(_scalar(run(ours, *inputs)), leaves)
    assert used == []
    ops = [e.name for e in prof.events()]
    layers = 1 if kind == "cell" else ours.num_layers * (2 if ours.bidirectional else 1)
    assert sum(name.startswith("fusedrnn::") and name.endswith("_backward") for name in ops) == layers
    assert not any(name in ops for name in ("aten::sigmoid", "aten::tanh", "aten::relu")), sorted(set(ops))
    expected = torch.autograd.grad(_scalar(run(ref, *inputs)), [*inputs, *ref.parameters()])
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)
    with_graph = torch.autograd.grad(_scalar(run(ours, *inputs)), leaves, create_graph=True)
    for g, h in zip(got, with_graph):
        assert torch.equal(g, h.detach())
    params = {k: v.detach() for k, v in ours.named_parameters()}
    torch.func.grad(_func_loss(ours, run, inputs))(params, inputs[0].detach())
    assert set(used) == {"vjp"}  # the fused backward op through _FirstOrderGrads, never differentiated
