"""Probes of the recent fast paths for silent wrong numbers (issue 14, "Wrong numbers without an error").

Each fast path that landed in benchmarks/NOTES.md entries 22-33 is a new way to return a number that
differs from torch.nn's without a word:
- the weights a call reads (entry 22: no packed copy is kept between calls; a cache keyed on data
  pointers or version counters would go stale): every way user code changes, copies, ties, swaps
  or substitutes a weight between two calls;
- the inference twins (entries 27 / 32), taken when "no gradient can be taken": every way a
  gradient can still be wanted (the input or a state requiring grad, torch.func, checkpointing,
  enable_grad inside no_grad, an autograd.Function around the call);
- the C++ autograd node and need_grad_h0 (entries 24 / 28 / 33): every way the initial states
  reach the graph (one of h0 / c0, non-leaf, expanded, strided, shared, hooked), retain_graph,
  accumulation into .grad, create_graph, and the outputs and gradients the node hands out (their
  storage must be the caller's alone);
- the one-layer one-direction call straight to functional.layer (entry 33): module hooks,
  attributes changed after construction, `_flat_weights` replaced, subclasses.
Every probe runs the same calls on torch.nn and on fusedrnn with the same weights and compares
outputs, final states and every gradient: float64 to 1e-10, float32 at torch.nn's tolerance (the
float32 runs take the CPU engine's small-call and packed paths, float64 the per-step path). Where
torch.nn raises, fusedrnn must raise the same exception type.
"""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import fusedrnn

pytestmark = pytest.mark.skipif(not fusedrnn.backends()["compiled"], reason="compiled operators not loaded: "
                                + str(fusedrnn.backends()["load_error"]))

IN, HID, PROJ = 5, 4, 3
LAYERS = {
    "lstm": (nn.LSTM, fusedrnn.LSTM, {}),
    "lstm_proj": (nn.LSTM, fusedrnn.LSTM, {"proj_size": PROJ}),
    "gru": (nn.GRU, fusedrnn.GRU, {}),
    "rnn_tanh": (nn.RNN, fusedrnn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, fusedrnn.RNN, {"nonlinearity": "relu"}),
}
CELLS = {
    "lstm": (nn.LSTMCell, fusedrnn.LSTMCell, {}),
    "gru": (nn.GRUCell, fusedrnn.GRUCell, {}),
    "rnn_tanh": (nn.RNNCell, fusedrnn.RNNCell, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNNCell, fusedrnn.RNNCell, {"nonlinearity": "relu"}),
}
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
# (dtype, (steps, batch)): float32 3 x 2 takes the CPU engine's small-call path, 6 x 12 its packed path;
# float64 runs the per-step path at any size
PATHS = pytest.mark.parametrize("dtype,shape", [(torch.float64, (3, 2)), (torch.float32, (3, 2)),
                                                (torch.float32, (6, 12))], ids=["f64", "f32_small", "f32_packed"])


def tol(dtype):
    return dict(rtol=0, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)


def close(ours, ref, dtype, what=""):
    """Nested tuples / lists of tensors (or None) equal within the dtype's tolerance."""
    if isinstance(ref, (tuple, list)):
        assert isinstance(ours, (tuple, list)) and len(ours) == len(ref), what
        for i, (a, b) in enumerate(zip(ours, ref)):
            close(a, b, dtype, f"{what}[{i}]")
        return
    if isinstance(ref, nn.utils.rnn.PackedSequence):
        close(tuple(ours), tuple(ref), dtype, what)
        return
    if ref is None or not isinstance(ref, torch.Tensor):
        assert ours == ref, what
        return
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, (what, ours.dtype, ref.dtype, ours.shape, ref.shape)
    if ours.is_floating_point():
        torch.testing.assert_close(ours, ref, msg=what, **tol(dtype))
    else:
        assert torch.equal(ours, ref), what


def _pair(table, kind, dtype, **kwargs):
    """A torch.nn module and fusedrnn's of the same kind, with the same weights."""
    nn_cls, fused_cls, base = table[kind]
    torch.manual_seed(0)
    ref = nn_cls(IN, HID, dtype=dtype, **base, **kwargs)
    ours = fused_cls(IN, HID, dtype=dtype, **base, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def layer_pair(kind, dtype, **kwargs):
    return _pair(LAYERS, kind, dtype, **kwargs)


def cell_pair(kind, dtype, **kwargs):
    return _pair(CELLS, kind, dtype, **kwargs)


def states(kind, module, batch, dtype, layer=True, seed=1):
    """The initial state(s) of a call: (h0,) or (h0, c0), fresh random values."""
    g = torch.Generator().manual_seed(seed)
    if layer:
        d = module.num_layers * (2 if module.bidirectional else 1)
        hsize = PROJ if kind == "lstm_proj" else HID
        h = torch.randn(d, batch, hsize, generator=g, dtype=dtype)
        c = torch.randn(d, batch, HID, generator=g, dtype=dtype)
    else:
        h = torch.randn(batch, HID, generator=g, dtype=dtype)
        c = torch.randn(batch, HID, generator=g, dtype=dtype)
    return (h, c) if kind.startswith("lstm") else (h,)


def hx_of(st):
    return st if len(st) == 2 else st[0]


def seq(steps, batch, dtype, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(steps, batch, IN, generator=g, dtype=dtype)


def _is_ours(module):
    return type(module).__module__.startswith("fusedrnn")


def param_grads(module):
    return [(n, None if p.grad is None else p.grad.clone()) for n, p in module.named_parameters()]


def flat(result):
    """A module call's result as a flat tuple of tensors."""
    out = []
    for r in result if isinstance(result, tuple) else (result,):
        out.extend(flat(r) if isinstance(r, tuple) else [r])
    return tuple(out)


def loss_of(result):
    """A loss that weights every element differently (so a permuted or aliased gradient shows)."""
    total = 0
    for i, t in enumerate(flat(result)):
        w = torch.linspace(-1, 1.5, t.numel(), dtype=t.dtype).reshape(t.shape) + i
        total = total + (t * w).sum()
    return total


def both(ref, ours, scenario, dtype):
    """Run scenario(module) on both modules; compare what it returns, then every parameter's .grad. Where
    torch.nn raises, fusedrnn must raise the same exception type."""
    try:
        expected = scenario(ref)
    except Exception as e:  # torch.nn's behaviour is the reference, errors included
        with pytest.raises(type(e)):
            scenario(ours)
        return
    got = scenario(ours)
    close(got, expected, dtype, "results")
    for (name, a), (_, b) in zip(param_grads(ref), param_grads(ours)):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(b, a, msg=name, **tol(dtype))


# ---- 1. the weights a call reads: changed, copied, tied or swapped between calls (entry 22) -------

def upd_no_grad_in_place(m, x):
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.5).add_(0.01)


def upd_data_copy(m, x):
    for p in m.parameters():
        p.data.copy_(p.data * -0.5 + 0.1)


def upd_data_assign(m, x):
    for p in m.parameters():
        p.data = p.data * 0.7 - 0.02


def upd_load_state_dict(m, x):
    m.load_state_dict({k: v * 0.8 + 0.05 for k, v in m.state_dict().items()})


def upd_load_state_dict_assign(m, x):
    m.load_state_dict({k: (v * 0.8 + 0.05).requires_grad_() for k, v in m.state_dict().items()}, assign=True)


def _optimizer_steps(m, x, make):
    opt = make(m.parameters())
    for _ in range(2):
        opt.zero_grad()
        loss_of(m(x)).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def upd_sgd(m, x):
    _optimizer_steps(m, x, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))


def upd_adam_foreach(m, x):
    _optimizer_steps(m, x, lambda ps: torch.optim.Adam(ps, lr=0.05, foreach=True))


def upd_adam_fused(m, x):
    _optimizer_steps(m, x, lambda ps: torch.optim.Adam(ps, lr=0.05, fused=True))


def upd_to_double_and_back(m, x):
    dtype = next(m.parameters()).dtype
    m.double()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(0.9)
    m.to(dtype)


def upd_half_round_trip(m, x):
    dtype = next(m.parameters()).dtype
    m.half()
    m.to(dtype)


def upd_numpy_write(m, x):
    for p in m.parameters():
        p.detach().numpy()[...] *= -1.25  # no version counter bump


def upd_view_of_modified_base(m, x):
    # weight_hh_l0 becomes a view of a larger tensor; the base is then changed in place
    w = m.weight_hh_l0
    base = torch.cat([w.detach(), w.detach()], 0).clone()
    m.weight_hh_l0.data = base[w.shape[0]:]
    base.mul_(0.5).add_(0.03)
    m._base_keepalive = base


def upd_storage_reuse(m, x):
    # free the weights' storage and reallocate same-sized tensors (likely at the same addresses)
    for p in m.parameters():
        shape, numel = p.shape, p.numel()
        p.data = torch.empty(0, dtype=p.dtype)
        p.data = torch.arange(numel, dtype=p.dtype).reshape(shape).sin() * 0.4


def upd_swap_tensors(m, x):
    # .to() with swap_module_params_on_conversion: each Parameter object keeps its identity and gets the
    # converted tensor's contents by torch.utils.swap_tensors (a direct swap of a layer's weight is refused
    # by torch for nn's modules and ours alike: nn.RNNBase holds weakrefs to them)
    dtype = next(m.parameters()).dtype
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        m.double()
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(0.6).add_(0.01)
        m.to(dtype)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


def upd_parametrize(m, x):
    class Scale(nn.Module):
        def forward(self, w):
            return w * 0.5 + 0.02
    nn.utils.parametrize.register_parametrization(m, "weight_hh_l0", Scale())


WEIGHT_UPDATES = [upd_no_grad_in_place, upd_data_copy, upd_data_assign, upd_load_state_dict,
                  upd_load_state_dict_assign, upd_sgd, upd_adam_foreach, upd_adam_fused, upd_to_double_and_back,
                  upd_half_round_trip, upd_numpy_write, upd_view_of_modified_base, upd_storage_reuse,
                  upd_swap_tensors, upd_parametrize]


@pytest.mark.parametrize("update", WEIGHT_UPDATES, ids=lambda f: f.__name__[4:])
@pytest.mark.parametrize("kind", list(LAYERS))
@PATHS
def test_layer_reads_the_weights_as_they_are_now(kind, update, dtype, shape):
    """A call, a change of the weights, calls again (no grad and with grad): torch.nn's numbers after."""
    ref, ours = layer_pair(kind, dtype)
    x = seq(*shape, dtype)
    st = states(kind, ref, shape[1], dtype)

    def scenario(m):
        first = m(x, hx_of(st))
        loss_of(first).backward()
        first = tuple(t.detach() for t in flat(first))  # the graph freed (swap_tensors refuses weights it holds)
        with torch.no_grad():
            m(x)  # an inference call too, before the change
        update(m, x)
        with torch.no_grad():
            after_nograd = m(x, hx_of(st))
        after = m(x)
        loss_of(after).backward()
        return first, after_nograd, after

    both(ref, ours, scenario, dtype)


CELL_UPDATES = [upd_no_grad_in_place, upd_data_copy, upd_data_assign, upd_load_state_dict,
                upd_load_state_dict_assign, upd_sgd, upd_adam_fused, upd_numpy_write, upd_storage_reuse,
                upd_swap_tensors]


@pytest.mark.parametrize("update", CELL_UPDATES, ids=lambda f: f.__name__[4:])
@pytest.mark.parametrize("kind", list(CELLS))
@DTYPES
def test_cell_reads_the_weights_as_they_are_now(kind, update, dtype):
    """A generation loop (state carried) whose weights change between steps."""
    ref, ours = cell_pair(kind, dtype)
    xs = seq(4, 3, dtype)
    st0 = states(kind, ref, 3, dtype, layer=False)

    def scenario(m):
        hx = hx_of(st0)
        outs = []
        for t in range(4):
            with torch.no_grad():
                hx = m(xs[t], hx)
            outs.append(hx)
            if t == 1:
                update(m, xs[t])
        loss_of(m(xs[0], hx)).backward()
        return outs

    both(ref, ours, scenario, dtype)


@pytest.mark.parametrize("kind", list(LAYERS))
@DTYPES
def test_copies_and_ties_keep_their_own_weights(kind, dtype):
    """deepcopy, pickle, a weight tied across two modules, functional_call with other tensors."""
    ref, ours = layer_pair(kind, dtype)
    x = seq(3, 2, dtype)

    def scenario(m):
        results = [m(x)]
        twin = copy.deepcopy(m)
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        pickled = pickle.loads(pickle.dumps(m))
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(-0.5)
            for p in pickled.parameters():
                p.add_(0.1)
        results += [m(x), twin(x), loaded(x), pickled(x)]
        # weight tying: a second module sharing m's weight_hh_l0; changed through m, read through the other
        tied = copy.deepcopy(m)
        tied.weight_hh_l0 = m.weight_hh_l0
        with torch.no_grad():
            m.weight_hh_l0.mul_(0.75)
        results += [tied(x), m(x)]
        other = {n: p.detach() * 0.3 + 0.01 for n, p in m.named_parameters()}
        results += [torch.func.functional_call(m, other, (x,)), m(x)]
        results += [torch.func.functional_call(m, {"weight_hh_l0": m.weight_hh_l0[:1].expand_as(m.weight_hh_l0)},
                                                (x,))]
        loss_of(results[-1]).backward()
        return results

    both(ref, ours, scenario, dtype)


@pytest.mark.parametrize("batch", [9])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_two_threads_split_rows_like_one(kind, batch):
    """The engine splits batch rows between threads (an uneven split at 9 rows): inference twin, training
    call and a ragged batch against torch.nn, float32."""
    ref, ours = layer_pair(kind, torch.float32, bidirectional=True)
    x = seq(5, batch, torch.float32)
    lengths = torch.tensor([5 - b % 4 for b in range(batch)])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def scenario(m):
            with torch.no_grad():
                inferred = m(x)
            out = m(x)
            packed = m(nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False))
            loss_of((flat(out), packed[0].data)).backward()
            return inferred, out, packed
        both(ref, ours, scenario, torch.float32)
    finally:
        torch.set_num_threads(threads)


# ---- 2. the inference twins: every way a gradient can still be wanted (entries 27, 32) -------------

def _x_and_states(kind, ref, dtype, shape, grad_x=False, grad_h=False, grad_c=False):
    x = seq(*shape, dtype).requires_grad_(grad_x)
    st = states(kind, ref, shape[1], dtype)
    st[0].requires_grad_(grad_h)
    if len(st) == 2:
        st[1].requires_grad_(grad_c)
    return x, st


def _grads_of(tensors):
    return [None if t.grad is None else t.grad.clone() for t in tensors]


INFERENCE_MODES = ["eval", "no_grad", "inference_mode", "frozen_params_input_grad", "frozen_params_h0_grad",
                   "frozen_params_c0_grad", "enable_grad_in_no_grad", "func_grad_input", "func_jvp",
                   "func_vmap", "checkpoint_reentrant", "checkpoint", "autograd_function", "no_grad_then_grad"]


@pytest.mark.parametrize("how", INFERENCE_MODES)
@pytest.mark.parametrize("kind", list(LAYERS))
@PATHS
def test_layer_calls_that_may_or_may_not_need_a_gradient(kind, how, dtype, shape):
    ref, ours = layer_pair(kind, dtype, num_layers=2, bidirectional=True)

    def scenario(m):
        if how == "eval":
            m.eval()
            x, st = _x_and_states(kind, ref, dtype, shape)
            out = m(x, hx_of(st))
            loss_of(out).backward()
            return out
        if how == "no_grad":
            x, st = _x_and_states(kind, ref, dtype, shape, grad_x=True, grad_h=True)
            with torch.no_grad():
                return m(x, hx_of(st))
        if how == "inference_mode":
            x, st = _x_and_states(kind, ref, dtype, shape)
            with torch.inference_mode():
                return m(x, hx_of(st))
        if how.startswith("frozen_params"):
            m.requires_grad_(False)
            x, st = _x_and_states(kind, ref, dtype, shape, grad_x=how.endswith("input_grad"),
                                  grad_h=how.endswith("h0_grad"), grad_c=how.endswith("c0_grad"))
            if how.endswith("c0_grad") and len(st) == 1:
                st[0].requires_grad_()
            out = m(x, hx_of(st))
            loss_of(out).backward()
            return out, _grads_of((x,) + st)
        if how == "enable_grad_in_no_grad":
            x, st = _x_and_states(kind, ref, dtype, shape, grad_x=True)
            with torch.no_grad():
                with torch.enable_grad():
                    out = m(x, hx_of(st))
            loss_of(out).backward()
            return out, x.grad
        if how == "func_grad_input":
            m.requires_grad_(False)
            x, st = _x_and_states(kind, ref, dtype, shape)
            return torch.func.grad(lambda x: loss_of(m(x, hx_of(st))))(x)
        if how == "func_jvp":
            x, st = _x_and_states(kind, ref, dtype, shape)
            v = torch.ones_like(x) * 0.3
            with torch.backends.mkldnn.flags(enabled=_is_ours(m)):  # nn's oneDNN LSTM has no forward AD
                return torch.func.jvp(lambda x: m(x, hx_of(st))[0], (x,), (v,))
        if how == "func_vmap":
            x, st = _x_and_states(kind, ref, dtype, shape)
            h = tuple(s[:, 0] for s in st)  # unbatched states: vmap over the batch dimension
            call = lambda xb: m(xb, h if len(h) == 2 else h[0])  # noqa: E731
            if not _is_ours(m):  # torch.nn's LSTM / GRU / RNN have no batching rule: a loop is nn's answer
                outs = [call(x[:, b]) for b in range(x.shape[1])]
                return tuple(torch.stack(parts, 1 if i == 0 else 0) for i, parts in enumerate(zip(*map(flat, outs))))
            return flat(torch.func.vmap(call, in_dims=1, out_dims=(1, (0, 0)) if len(h) == 2 else (1, 0))(x))
        if how.startswith("checkpoint"):
            x, st = _x_and_states(kind, ref, dtype, shape, grad_x=True)
            out = torch.utils.checkpoint.checkpoint(lambda x: m(x, hx_of(st))[0], x,
                                                    use_reentrant=how.endswith("reentrant"))
            loss_of(out).backward()
            return out, x.grad
        if how == "autograd_function":
            class Recompute(torch.autograd.Function):
                @staticmethod
                def forward(ctx, x):
                    ctx.save_for_backward(x)
                    return m(x, hx_of(st))[0]

                @staticmethod
                def backward(ctx, g):
                    (x,) = ctx.saved_tensors
                    with torch.enable_grad():
                        x = x.detach().requires_grad_()
                        out = m(x, hx_of(st))[0]
                        return torch.autograd.grad(out, x, g)[0]
            x, st = _x_and_states(kind, ref, dtype, shape, grad_x=True)
            out = Recompute.apply(x)
            loss_of(out).backward()
            return out, x.grad
        if how == "no_grad_then_grad":
            x, st = _x_and_states(kind, ref, dtype, shape, grad_x=True)
            with torch.no_grad():
                first = m(x, hx_of(st))
            out = m(x, hx_of(st))
            loss_of(out).backward()
            return first, out, x.grad
        raise AssertionError(how)

    both(ref, ours, scenario, dtype)


@pytest.mark.parametrize("layer", [True, False], ids=["layer", "cell"])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_first_call_under_inference_mode_then_more_calls(kind, layer, monkeypatch):
    """A serving loop: the first call of a shape under torch.inference_mode, then more calls of it (each
    shape's batch_sizes tensor is cached between calls: it must not be an inference tensor)."""
    monkeypatch.setattr(fusedrnn.functional, "_BATCH_SIZES", {})  # this shape's first call is the one below
    ref, ours = (layer_pair if layer else cell_pair)(kind, torch.float64)
    x = seq(3, 2, torch.float64) if layer else seq(1, 2, torch.float64)[0]

    def scenario(m):
        with torch.inference_mode():
            first = m(x)
        with torch.inference_mode():
            second = m(x * 0.5)
        with torch.no_grad():
            third = m(x * 2)
        out = m(x)
        loss_of(out).backward()
        return first, second, third, out

    both(ref, ours, scenario, torch.float64)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_eval_turns_inter_layer_dropout_off(kind):
    ref, ours = layer_pair(kind, torch.float64, num_layers=3, dropout=0.5)
    x = seq(4, 3, torch.float64)

    def scenario(m):
        m.eval()
        out = m(x)
        loss_of(out).backward()
        with torch.no_grad():
            return out, m(x * 0.5)

    both(ref, ours, scenario, torch.float64)


@pytest.mark.parametrize("how", ["no_grad", "frozen_input_grad", "frozen_h0_grad", "func_grad_input", "func_jvp",
                                 "enable_grad_in_no_grad"])
@pytest.mark.parametrize("kind", list(CELLS))
@DTYPES
def test_cell_calls_that_may_or_may_not_need_a_gradient(kind, how, dtype):
    ref, ours = cell_pair(kind, dtype)
    x0 = seq(1, 3, dtype)[0]

    def scenario(m):
        x = x0.clone()
        st = states(kind, m, 3, dtype, layer=False)
        if how == "no_grad":
            with torch.no_grad():
                return m(x, hx_of(st))
        if how.startswith("frozen"):
            m.requires_grad_(False)
            (x if how == "frozen_input_grad" else st[0]).requires_grad_()
            out = m(x, hx_of(st))
            loss_of(out).backward()
            return out, _grads_of((x,) + st)
        if how == "func_grad_input":
            return torch.func.grad(lambda x: loss_of(m(x, hx_of(st))))(x)
        if how == "func_jvp":
            return torch.func.jvp(lambda h: m(x, (h, st[1]) if len(st) == 2 else h), (st[0],),
                                  (torch.ones_like(st[0]),))
        if how == "enable_grad_in_no_grad":
            x.requires_grad_()
            with torch.no_grad():
                with torch.enable_grad():
                    out = m(x, hx_of(st))
            loss_of(out).backward()
            return out, x.grad
        raise AssertionError(how)

    both(ref, ours, scenario, dtype)


# ---- 3. the C++ autograd node and need_grad_h0 (entries 24, 28, 33) --------------------------------

STATE_CASES = ["h0_only", "c0_only", "no_state_grad", "non_leaf", "expanded", "strided", "shared_two_calls",
               "retain_graph_twice", "accumulate_across_calls", "hook_on_h0", "create_graph", "grad_of_h_n_only",
               "chained_calls", "truncated_bptt"]


def _make_state(case, kind, m, batch, dtype, layer=True):
    """(the states to pass, the leaves whose gradients to compare)."""
    st = states(kind, m, batch, dtype, layer=layer)
    if case == "h0_only":
        return st, [st[0].requires_grad_()]
    if case == "c0_only":
        if len(st) == 1:
            return st, []
        return st, [st[1].requires_grad_()]
    if case == "no_state_grad":
        return st, []
    if case == "non_leaf":
        leaves = [s.requires_grad_() for s in st]
        return tuple(s * 1.5 - 0.1 for s in leaves), leaves
    if case == "expanded":
        leaves = [s.select(-2, 0).unsqueeze(-2).clone().requires_grad_() for s in st]
        return tuple(v.expand_as(s) for v, s in zip(leaves, st)), leaves
    if case == "strided":
        leaves = [torch.cat([s, s * 2], -1).clone().requires_grad_() for s in st]
        return tuple(v[..., ::2] for v in leaves), leaves
    leaves = [s.requires_grad_() for s in st]
    return tuple(leaves), leaves


def _state_scenario(case, kind, x0, dtype, layer):
    """One STATE_CASES case of a layer (layer=True) or cell call: the outputs, what hooks saw, and the
    gradients of the input and of the state leaves."""
    def scenario(m):
        x = x0.clone().requires_grad_()
        st, leaves = _make_state(case, kind, m, x0.shape[-2], dtype, layer=layer)
        results = []
        if case == "hook_on_h0":
            seen = []
            st[0].register_hook(lambda g: seen.append(g.clone()) or g * 3)
        out = m(x, hx_of(st))
        state_out = out[1] if layer else out  # what the next call takes
        results.append(out)
        if case == "shared_two_calls":
            out2 = m(x.flip(0), hx_of(st))
            results.append(out2)
            loss_of((out, out2)).backward()
        elif case == "retain_graph_twice":
            loss_of(out).backward(retain_graph=True)
            loss_of(out).backward()
        elif case == "accumulate_across_calls":
            loss_of(out).backward()
            out2 = m(x * 0.5, hx_of(st))
            results.append(out2)
            loss_of(out2).backward()
        elif case == "create_graph":
            grads = torch.autograd.grad(loss_of(out), [x] + leaves + list(m.parameters()), create_graph=True)
            sum((g ** 2).sum() for g in grads).backward()
            results.append(grads)
        elif case == "grad_of_h_n_only":
            loss_of(flat(state_out)[0]).backward()
        elif case in ("chained_calls", "truncated_bptt"):
            carried = state_out if case == "chained_calls" else tuple(t.detach() for t in flat(state_out))
            if isinstance(carried, tuple) and len(st) == 1:
                carried = carried[0]
            out2 = m(x * 0.7, carried)
            results.append(out2)
            loss_of((out, out2)).backward()
        else:
            loss_of(out).backward()
        if case == "hook_on_h0":
            results.append(seen)
        results.append(_grads_of([x] + leaves))
        return results
    return scenario


@pytest.mark.parametrize("case", STATE_CASES)
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("dtype,layers", [(torch.float64, 1), (torch.float64, 2), (torch.float32, 2)],
                         ids=["f64_1layer", "f64_2layers_bidir", "f32_2layers_bidir"])
def test_layer_state_gradients(kind, case, dtype, layers):
    kwargs = {} if layers == 1 else {"num_layers": 2, "bidirectional": True}
    ref, ours = layer_pair(kind, dtype, **kwargs)
    both(ref, ours, _state_scenario(case, kind, seq(3, 2, dtype), dtype, True), dtype)


@pytest.mark.parametrize("case", ["h0_only", "c0_only", "no_state_grad", "both", "expanded"])
@pytest.mark.parametrize("kind", list(LAYERS))
@PATHS
def test_ragged_batch_state_gradients(kind, case, dtype, shape):
    """need_grad_h0 on a ragged batch: in the reverse direction each sequence starts from h0 at its own last
    step, so the step whose dh product is skipped differs per row."""
    ref, ours = layer_pair(kind, dtype, num_layers=2, bidirectional=True)
    steps, batch = shape[0] + 1, shape[1] + 1
    x0 = seq(steps, batch, dtype)
    lengths = torch.tensor([steps - (b * 5) % steps for b in range(batch)])

    def scenario(m):
        x = x0.clone().requires_grad_()
        st, leaves = _make_state("non_leaf" if case == "both" else case, kind, m, batch, dtype)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        out = m(packed, hx_of(st))
        loss_of((out[0].data,) + flat(out[1])).backward()
        return out, _grads_of([x] + leaves)

    both(ref, ours, scenario, dtype)


@pytest.mark.parametrize("case", STATE_CASES)
@pytest.mark.parametrize("kind", list(CELLS))
@DTYPES
def test_cell_state_gradients(kind, case, dtype):
    ref, ours = cell_pair(kind, dtype)
    both(ref, ours, _state_scenario(case, kind, seq(1, 2, dtype)[0], dtype, False), dtype)


@pytest.mark.parametrize("subset", ["w_hh", "x", "h0", "bias_hh", "last_param", "frozen_w_ih", "frozen_biases",
                                    "backward_inputs_h0"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("dtype,shape", [(torch.float64, (3, 2)), (torch.float32, (3, 2))], ids=["f64", "f32_small"])
def test_gradients_of_a_subset_of_the_arguments(kind, subset, bias, dtype, shape):
    """autograd.grad / backward(inputs=) over some of the call's arguments, and partly frozen parameters: the
    C++ node maps its edges to arguments (an absent bias has no edge) and computes only what is asked."""
    if subset == "bias_hh" and not bias:
        subset = "w_hh"
    ref, ours = layer_pair(kind, dtype, bias=bias)
    x0 = seq(*shape, dtype)

    def scenario(m):
        x = x0.clone().requires_grad_()
        st = tuple(s.requires_grad_() for s in states(kind, m, shape[1], dtype))
        params = dict(m.named_parameters())
        if subset == "frozen_w_ih":
            m.weight_ih_l0.requires_grad_(False)
        if subset == "frozen_biases":
            for n, p in params.items():
                if n.startswith("bias"):
                    p.requires_grad_(False)
        out = m(x, hx_of(st))
        loss = loss_of(out)
        wanted = {"w_hh": [params["weight_hh_l0"]], "x": [x], "h0": [st[0]],
                  "bias_hh": [params.get("bias_hh_l0")], "last_param": [list(params.values())[-1]]}
        if subset in wanted:
            return out, torch.autograd.grad(loss, wanted[subset])
        if subset == "backward_inputs_h0":
            loss.backward(inputs=list(st))
            return out, _grads_of(st + (x,))
        loss.backward()
        return out, _grads_of(st + (x,))

    both(ref, ours, scenario, dtype)


@pytest.mark.parametrize("kind", list(LAYERS))
@PATHS
def test_layer_outputs_and_gradients_are_the_callers_alone(kind, dtype, shape):
    """What a call returns (output, h_n, c_n) and the gradients it leaves in .grad share no storage with
    each other, with the call's arguments, or with anything a later call writes: changing one in place
    changes nothing else (a workspace or a cached buffer handed out would show here)."""
    ref, ours = layer_pair(kind, dtype)
    x0 = seq(*shape, dtype)

    def scenario(m):
        x = x0.clone().requires_grad_()
        st = states(kind, m, shape[1], dtype)
        st_kept = [s.clone() for s in st]
        with torch.no_grad():
            inferred = m(x, hx_of(st))
        out = m(x, hx_of(st))
        loss_of(out).backward()
        results = [tuple(t.detach().clone() for t in flat(r)) for r in (inferred, out)]
        for r in (inferred, out):
            parts = [t.detach() for t in flat(r)]
            for i in range(len(parts)):
                kept = [t.clone() for t in parts]
                parts[i].fill_(7.0)
                assert all(torch.equal(a, b) for j, (a, b) in enumerate(zip(parts, kept)) if j != i), i
        assert all(torch.equal(a, b) for a, b in zip(st, st_kept)) and torch.equal(x.detach(), x0)
        first = [p.grad for p in m.parameters()]
        first_values = [g.clone() for g in first]
        m.zero_grad(set_to_none=True)
        with torch.no_grad():
            m(x * 2, hx_of(st))
        loss_of(m(x * -1, hx_of(st))).backward()
        assert all(torch.equal(a, b) for a, b in zip(first, first_values)), "a .grad of the first call changed"
        return results, x.grad

    both(ref, ours, scenario, dtype)


def _in_place_scenario(kind, what, dtype, x0, layer):
    def scenario(m):
        x = x0.clone().requires_grad_()
        xi = x * 1.0  # a non-leaf input that may be changed in place
        st = tuple(s.requires_grad_() for s in states(kind, m, 2, dtype, layer=layer))
        hi = tuple(s * 1.0 for s in st)
        out = m(xi, hx_of(hi))
        parts = list(flat(out))
        if what in ("output", "h_n", "h"):
            i = 1 if what == "h_n" else 0
            if _is_ours(m) or what == "output":
                parts[i].mul_(2)
            else:
                # torch.nn's RNNCell raises on the in-place form (its Tanh / Relu node saved h); the same
                # numbers written out of place are what the in-place form means
                parts[i] = parts[i] * 2
        else:
            {"input": xi, "h0": hi[0]}[what].mul_(2)
        loss_of(tuple(parts)).backward()
        return tuple(parts), x.grad, _grads_of(st)
    return scenario


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("what", ["h_n", "input", "h0"])
@DTYPES
def test_in_place_change_between_forward_and_backward(kind, what, dtype):
    """h_n, the input or h0 changed in place after the forward: nn's gradients, or nn's error."""
    ref, ours = layer_pair(kind, dtype)
    both(ref, ours, _in_place_scenario(kind, what, dtype, seq(3, 2, dtype), True), dtype)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_in_place_change_of_the_output_between_forward_and_backward(kind):
    """The returned output changed in place before backward: torch.nn's layers (float64, and float32 GRU /
    RNN) return the gradients of the changed values; so does the C++ autograd node, which then runs its
    forward again for the output's original values (csrc/autograd/eager_autograd.cpp: saved_output)."""
    ref, ours = layer_pair(kind, torch.float64)
    both(ref, ours, _in_place_scenario(kind, "output", torch.float64, seq(3, 2, torch.float64), True), torch.float64)


@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize("what", ["h", "input", "h0"])
@DTYPES
def test_cell_in_place_change_between_forward_and_backward(kind, what, dtype):
    """The returned h changed in place: the gradients of the changed values (torch.nn's RNNCell raises
    there, its LSTMCell / GRUCell give them); the input or h0 changed: nn's gradients or nn's error."""
    ref, ours = cell_pair(kind, dtype)
    both(ref, ours, _in_place_scenario(kind, what, dtype, seq(1, 2, dtype)[0], False), dtype)


# ---- 4. the one-layer call straight to functional.layer (entry 33) ---------------------------------

MODULE_CASES = ["pre_hook", "forward_hook", "batch_first_after_init", "bidirectional_after_init",
                "num_layers_after_init", "hidden_size_after_init", "dropout_after_init", "proj_size_after_init",
                "weight_attribute_replaced", "unbatched", "packed_unsorted", "expanded_input", "transposed_input",
                "mode_after_init", "nonlinearity_after_init"]


@pytest.mark.parametrize("case", MODULE_CASES)
@pytest.mark.parametrize("kind", list(LAYERS))
@DTYPES
def test_one_layer_module_call(kind, case, dtype):
    ref, ours = layer_pair(kind, dtype)
    x0 = seq(3, 2, dtype)

    def scenario(m):
        x = x0.clone().requires_grad_()
        st = states(kind, m, 2, dtype)
        if case == "pre_hook":
            m.register_forward_pre_hook(lambda mod, args: (args[0] * 2,) + tuple(args[1:]))
        elif case == "forward_hook":
            m.register_forward_hook(lambda mod, args, out: (out[0] + 1, out[1]))
        elif case == "batch_first_after_init":
            m.batch_first = True
        elif case == "bidirectional_after_init":
            m.bidirectional = True
        elif case == "num_layers_after_init":
            m.num_layers = 2
        elif case == "hidden_size_after_init":
            m.hidden_size = HID + 1
        elif case == "dropout_after_init":
            m.dropout = 0.5  # one layer: no dropout is applied, in training or not
        elif case == "proj_size_after_init":
            m.proj_size = 0 if kind == "lstm_proj" else 2
        elif case == "weight_attribute_replaced":
            m.weight_hh_l0 = nn.Parameter(m.weight_hh_l0.detach() * -0.5)
        elif case == "mode_after_init":
            m.mode = "RNN_RELU" if m.mode == "RNN_TANH" else ("RNN_TANH" if m.mode == "RNN_RELU" else m.mode)
        elif case == "nonlinearity_after_init":
            if hasattr(m, "nonlinearity"):
                m.nonlinearity = "relu" if m.nonlinearity == "tanh" else "tanh"
        if case == "unbatched":
            out = m(x[:, 0], tuple(s[:, 0] for s in st) if len(st) == 2 else st[0][:, 0])
        elif case == "expanded_input":
            out = m(x[:, :1].expand(-1, 2, -1), hx_of(st))
        elif case == "transposed_input":
            m.batch_first = True
            out = m(x.transpose(0, 1), hx_of(st))
        elif case == "packed_unsorted":
            lengths = torch.tensor([2, 3])
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
            out = m(packed, hx_of(st))
        elif case.endswith("_after_init"):
            out = m(x)  # zeros of the shapes the changed attributes say, as nn makes them
        else:
            out = m(x, hx_of(st))
        loss_of(out[0].data if isinstance(out[0], nn.utils.rnn.PackedSequence) else out[0]).backward()
        return out, x.grad

    if case == "hidden_size_after_init" and dtype == torch.float32 and kind.startswith("lstm"):
        # torch.nn's oneDNN float32 LSTM reads past its weights here: an output of the new hidden size, then
        # a segmentation fault in backward (torch 2.14.1); fusedrnn refuses the call
        with pytest.raises(RuntimeError, match="[hc]0 must have shape"):
            scenario(ours)
        return
    both(ref, ours, scenario, dtype)


FLAT_WEIGHTS_CASES = ["list_assigned", "entry_replaced_after_a_call", "then_attribute_assigned",
                      "attribute_deleted_after_a_call", "functional_call_then_a_call",
                      "parameters_entry_swapped_after_a_call", "parameters_entry_swapped_and_restored"]


@pytest.mark.parametrize("case", FLAT_WEIGHTS_CASES)
@pytest.mark.parametrize("kind", list(LAYERS))
@PATHS
def test_flat_weights_replaced(kind, case, dtype, shape):
    """torch.nn's forward runs with `self._flat_weights`, re-read from the attributes only when an attribute
    is no longer the tensor of its last read (_weights_have_changed: its weakrefs): a list user code put
    there runs (gradients reach the Parameters it was computed from), on a first call and after a call that
    filled fusedrnn's kept weight list; an attribute assigned afterwards makes both re-read every weight; a
    deleted one (None) is no change for nn."""
    ref, ours = layer_pair(kind, dtype)
    x = seq(*shape, dtype)

    def scenario(m):
        if case == "list_assigned":
            m._flat_weights = [w * 0.5 for w in m._flat_weights]
        elif case == "entry_replaced_after_a_call":
            m(x)
            m._flat_weights[1] = m._flat_weights[1] * -0.5  # no attribute assignment: only the list changes
        elif case == "then_attribute_assigned":
            m._flat_weights = [w * 0.5 for w in m._flat_weights]
            m(x)
            m.weight_ih_l0 = nn.Parameter(m.weight_ih_l0.detach() * 0.75)
        elif case == "attribute_deleted_after_a_call":
            m(x)
            w = m.weight_hh_l0
            del m.weight_hh_l0  # nn keeps running with the weight in _flat_weights
            m._keep = w
        elif case == "functional_call_then_a_call":
            other = {n: p.detach() * 0.9 for n, p in m.named_parameters()}
            torch.func.functional_call(m, other, (x,))
        elif case.startswith("parameters_entry_swapped"):
            # a write to _parameters (no __setattr__, as torch.func's stateless swap may do): nn's weakref
            # test sees it, so must fusedrnn's kept weight list
            m(x)
            original = m._parameters["weight_hh_l0"]
            m._parameters["weight_hh_l0"] = nn.Parameter(original.detach() * -0.5)
            if case.endswith("restored"):
                m(x)
                m._parameters["weight_hh_l0"] = original
        out = m(x)
        loss_of(out).backward()
        return out, [None if w is None else w.detach().clone() for w in m._flat_weights]

    both(ref, ours, scenario, dtype)


def _summary(value):
    """An argument of a recorded call, comparable across modules: tensors by value, containers by entry."""
    if isinstance(value, (tuple, list)):
        return tuple(_summary(v) for v in value)
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, torch.Size):
        return tuple(value)
    return value


def _recording(base):
    """base with every method torch.nn's layer forward calls overridden to record its arguments and then do
    what base's does."""
    class Recording(base):
        def note(self, name, *args):
            self.__dict__.setdefault("calls", []).append((name, _summary(args)))

        def permute_hidden(self, hx, permutation):
            self.note("permute_hidden", hx, permutation)
            return super().permute_hidden(hx, permutation)

        def check_forward_args(self, input, hidden, batch_sizes):
            self.note("check_forward_args", input, hidden, batch_sizes)
            return super().check_forward_args(input, hidden, batch_sizes)

        def check_input(self, input, batch_sizes):
            self.note("check_input", input, batch_sizes)
            return super().check_input(input, batch_sizes)

        def get_expected_hidden_size(self, input, batch_sizes):
            self.note("get_expected_hidden_size", input, batch_sizes)
            return super().get_expected_hidden_size(input, batch_sizes)

        def check_hidden_size(self, hx, expected_hidden_size, msg="Expected hidden size {}, got {}"):
            self.note("check_hidden_size", hx, expected_hidden_size, msg)
            return super().check_hidden_size(hx, expected_hidden_size, msg)

        def _weights_have_changed(self):
            self.note("_weights_have_changed")
            return super()._weights_have_changed()

        def _update_flat_weights(self):
            self.note("_update_flat_weights")
            return super()._update_flat_weights()

        if base in (nn.LSTM, fusedrnn.LSTM):
            def get_expected_cell_size(self, input, batch_sizes):
                self.note("get_expected_cell_size", input, batch_sizes)
                return super().get_expected_cell_size(input, batch_sizes)
    return Recording


def _subclass(base, override):
    if override == "recording":
        return _recording(base)

    class Sub(base):
        if override == "permute_hidden":
            def permute_hidden(self, hx, permutation):  # the caller's states taken in the sorted order
                return hx
        elif override == "check_forward_args":
            def check_forward_args(self, input, hidden, batch_sizes):  # a stricter check of its own
                raise ValueError("Sub refuses every call")
        elif override == "check_hidden_size":
            def check_hidden_size(self, hx, expected_hidden_size, msg="Expected hidden size {}, got {}"):
                raise KeyError("Sub refuses every state")
        elif override == "get_expected_hidden_size":
            def get_expected_hidden_size(self, input, batch_sizes):  # a wrong expectation: nn's check fails
                size = super().get_expected_hidden_size(input, batch_sizes)
                return (size[0], size[1] + 1, size[2])
        elif override == "check_input":
            def check_input(self, input, batch_sizes):
                if input.dim() == 3 and input.shape[0] > 2:
                    raise OverflowError("Sub takes at most two steps")
                return super().check_input(input, batch_sizes)
        elif override == "_weights_have_changed":
            def _weights_have_changed(self):  # always re-read: a replaced _flat_weights is dropped
                return True
    return Sub


CALLS = {"padded_with_state": lambda m, x, st: m(x, hx_of(st)),
         "padded_no_state": lambda m, x, st: m(x),
         "unbatched_with_state": lambda m, x, st: m(x[:, 0], tuple(s[:, 0] for s in st) if len(st) == 2 else st[0][:, 0]),
         "batch_first_with_state": lambda m, x, st: m(x.transpose(0, 1), hx_of(st)),
         "packed_unsorted_with_state": lambda m, x, st: m(
             nn.utils.rnn.pack_padded_sequence(x, torch.tensor([2, 3, 1]), enforce_sorted=False), hx_of(st)),
         "packed_unsorted_no_state": lambda m, x, st: m(
             nn.utils.rnn.pack_padded_sequence(x, torch.tensor([2, 3, 1]), enforce_sorted=False)),
         "packed_sorted_with_state": lambda m, x, st: m(
             nn.utils.rnn.pack_padded_sequence(x, torch.tensor([3, 2, 1])), hx_of(st))}
OVERRIDES = ["recording", "permute_hidden", "check_forward_args", "check_hidden_size", "get_expected_hidden_size",
             "check_input", "_weights_have_changed"]


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("override", OVERRIDES)
@pytest.mark.parametrize("kind", list(LAYERS))
@DTYPES
def test_subclass_overriding_forward_pieces(kind, override, call, dtype):
    """A subclass overriding a method torch.nn's forward calls (permute_hidden, check_forward_args and the
    checks it calls, _update_flat_weights / _weights_have_changed): the same calls, with the same arguments,
    in the same order as torch.nn's forward makes them ("recording"), and nn's numbers or nn's exception type
    where the override changes the outcome."""
    nn_cls, fused_cls, base = LAYERS[kind]
    torch.manual_seed(0)
    ref = _subclass(nn_cls, override)(IN, HID, dtype=dtype, **base)
    ours = _subclass(fused_cls, override)(IN, HID, dtype=dtype, **base)
    ours.load_state_dict(ref.state_dict())
    x0 = seq(3, 3, dtype)
    st = states(kind, ref, 3, dtype)

    def scenario(m):
        x = x0.clone().requires_grad_()
        if call == "batch_first_with_state":
            m.batch_first = True
        if override == "_weights_have_changed":
            m._flat_weights = [w * 0.5 for w in m._flat_weights]  # re-read by the override, so not run
        out = CALLS[call](m, x, st)
        loss_of(out[0].data if isinstance(out[0], nn.utils.rnn.PackedSequence) else out[0]).backward()
        return out, x.grad, m.__dict__.pop("calls", None)

    both(ref, ours, scenario, dtype)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_relu"])
def test_a_method_set_on_an_instance_is_called_as_torch_nn_calls_it(kind):
    """`m.permute_hidden = f` on an instance: torch.nn's forward calls f (an instance attribute), so does
    fusedrnn's."""
    ref, ours = layer_pair(kind, torch.float64)
    x = seq(3, 3, torch.float64)
    st = states(kind, ref, 3, torch.float64)
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([2, 3, 1]), enforce_sorted=False)

    def scenario(m):
        m.permute_hidden = lambda hx, permutation: hx  # no permutation: the states in the sorted order
        return m(packed, hx_of(st))

    both(ref, ours, scenario, torch.float64)


def test_only_an_overridden_forward_method_leaves_the_fast_path():
    """The class-level test that decides whether forward calls the module's nn methods: false for fusedrnn's
    classes, their subclasses that override other things (forward, extra_repr), a parametrized module's
    generated class and the layer-normalised layers; true for a subclass overriding one of them."""
    class OwnForward(fusedrnn.GRU):
        def forward(self, input, hx=None):
            return super().forward(input * 2, hx)

    class OwnCheck(fusedrnn.GRU):
        def check_input(self, input, batch_sizes):
            pass

    parametrized = fusedrnn.LSTM(3, 4)
    nn.utils.parametrize.register_parametrization(parametrized, "weight_hh_l0", nn.Identity())
    for cls in (fusedrnn.LSTM, fusedrnn.GRU, fusedrnn.RNN, OwnForward, type(parametrized), fusedrnn.LayerNormLSTM,
                fusedrnn.LayerNormGRU):
        assert cls._calls_nn_methods is False, cls
    assert OwnCheck._calls_nn_methods is True
    m = fusedrnn.GRU(3, 4)
    assert m._calls_nn_methods is False
    m.permute_hidden = lambda hx, permutation: hx
    assert m._calls_nn_methods is True and type(m)._calls_nn_methods is False


@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize("case", ["pre_hook", "nonlinearity_after_init", "hidden_size_after_init",
                                  "weight_attribute_replaced", "unbatched", "no_state"])
@DTYPES
def test_cell_module_call(kind, case, dtype):
    ref, ours = cell_pair(kind, dtype)
    x0 = seq(1, 2, dtype)[0]

    def scenario(m):
        x = x0.clone().requires_grad_()
        st = states(kind, m, 2, dtype, layer=False)
        if case == "pre_hook":
            m.register_forward_pre_hook(lambda mod, args: (args[0] * 2,) + tuple(args[1:]))
        elif case == "nonlinearity_after_init" and hasattr(m, "nonlinearity"):
            m.nonlinearity = "relu" if m.nonlinearity == "tanh" else "tanh"
        elif case == "hidden_size_after_init":
            m.hidden_size = HID + 1
        elif case == "weight_attribute_replaced":
            m.weight_hh = nn.Parameter(m.weight_hh.detach() * -0.5)
        if case == "unbatched":
            out = m(x[0], tuple(s[0] for s in st) if len(st) == 2 else st[0][0])
        elif case == "no_state":
            out = m(x)
        else:
            out = m(x, hx_of(st))
        loss_of(out).backward()
        return out, x.grad

    both(ref, ours, scenario, dtype)
