"""Eager training calls record a C++ autograd node (csrc/autograd/eager_autograd.cpp) instead of a
Python autograd.Function: what a Python Function gave for free must still hold, each checked against
torch.nn in float64. An in-place change of a saved tensor between forward and backward raises (the
version check); retain_graph and a second backward accumulate like nn's; saved-tensor hooks see the
saved tensors; a gradient of h_n / c_n alone, of the output alone, and a missing bias all give nn's
gradients; input gradients only where asked; create_graph (double backward) through the node.
"""

import pytest
import torch

import fusedrnn
from fusedrnn import _ops

pytestmark = pytest.mark.skipif(not fusedrnn.backends()["compiled"], reason="compiled operators not loaded: "
                                + str(fusedrnn.backends()["load_error"]))

CELLS = {"lstm": (torch.nn.LSTMCell, fusedrnn.LSTMCell), "gru": (torch.nn.GRUCell, fusedrnn.GRUCell),
         "rnn_tanh": (torch.nn.RNNCell, fusedrnn.RNNCell)}
LAYERS = {"lstm": (torch.nn.LSTM, fusedrnn.LSTM), "gru": (torch.nn.GRU, fusedrnn.GRU),
          "rnn_tanh": (torch.nn.RNN, fusedrnn.RNN), "rnn_relu": (torch.nn.RNN, fusedrnn.RNN)}


def _pair(kind, layer=True, **kwargs):
    torch.manual_seed(0)
    nn_cls, fused_cls = (LAYERS if layer else CELLS)[kind]
    if kind == "rnn_relu":
        kwargs["nonlinearity"] = "relu"
    ref = nn_cls(3, 4, dtype=torch.double, **kwargs)
    ours = fused_cls(3, 4, dtype=torch.double, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _grads(module):
    return [p.grad.clone() if p.grad is not None else None for p in module.parameters()]


def _assert_same_grads(ref, ours):
    for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_training_calls_use_the_cpp_node():
    """The eager training route is the C++ one (a library without it would fall back silently)."""
    assert _ops._CPP_AUTOGRAD
    _, ours = _pair("gru", layer=False)
    h = ours(torch.randn(2, 3, dtype=torch.double))
    assert type(h.grad_fn).__name__ == "CppFunction"


@pytest.mark.parametrize("kind", list(LAYERS))
def test_in_place_change_of_a_saved_weight_raises(kind):
    ref, ours = _pair(kind)
    x = torch.randn(2, 1, 3, dtype=torch.double)
    for m in (ref, ours):
        out = m(x)[0]
        with torch.no_grad():
            m.weight_hh_l0.mul_(1.0)  # bumps the version counter
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


@pytest.mark.parametrize("kind", list(LAYERS))
def test_retain_graph_and_second_backward_accumulate_like_nn(kind):
    ref, ours = _pair(kind)
    x = torch.randn(3, 2, 3, dtype=torch.double)
    for m in (ref, ours):
        out = m(x)[0].pow(2).sum()
        out.backward(retain_graph=True)
        out.backward()
    _assert_same_grads(ref, ours)
    # Without retain_graph the second backward fails, as nn's does.
    out = ours(x)[0].sum()
    out.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.backward()


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("use", ["output", "h_n", "c_n", "both"])
@pytest.mark.parametrize("bias", [True, False])
def test_partial_output_gradients_and_no_bias_match_nn(kind, use, bias):
    if use == "c_n" and kind != "lstm":
        pytest.skip("only LSTM has c_n")
    ref, ours = _pair(kind, bias=bias)
    x = torch.randn(3, 2, 3, dtype=torch.double, requires_grad=True)
    h0 = torch.randn(1, 2, 4, dtype=torch.double, requires_grad=True)
    grads = []
    for m in (ref, ours):
        hx = (h0, h0 * 0.5) if kind == "lstm" else h0
        out, state = m(x, hx)
        h_n = state[0] if kind == "lstm" else state
        loss = {"output": out.sum(), "h_n": h_n.pow(2).sum(), "both": out.sum() + h_n.pow(2).sum(),
                "c_n": state[1].pow(2).sum() if kind == "lstm" else None}[use]
        grads.append(torch.autograd.grad(loss, [x, h0] + list(m.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("kind", list(CELLS))
def test_input_gradient_only_where_asked(kind):
    ref, ours = _pair(kind, layer=False)
    x = torch.randn(2, 3, dtype=torch.double)
    for m in (ref, ours):
        out = m(x)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
    assert x.grad is None
    _assert_same_grads(ref, ours)
    x.requires_grad_()
    gx = []
    for m in (ref, ours):
        out = m(x)
        gx.append(torch.autograd.grad((out[0] if isinstance(out, tuple) else out).sum(), x)[0])
    torch.testing.assert_close(gx[1], gx[0])


def test_saved_tensor_hooks_see_the_saved_tensors():
    _, ours = _pair("lstm")
    x = torch.randn(2, 1, 3, dtype=torch.double)
    packed, unpacked = [], []

    def pack(t):
        packed.append(t.shape)
        return t

    def unpack(t):
        unpacked.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = ours(x)[0]
    out.sum().backward()
    # The input as the module passes it to the op: [T, B, I] (one layer, eager: the op's full-batch form).
    assert torch.Size([2, 1, 3]) in packed
    assert len(unpacked) == len(packed) and len(packed) > 0


@pytest.mark.parametrize("kind", list(CELLS))
def test_double_backward_through_the_cpp_node_matches_nn(kind):
    ref, ours = _pair(kind, layer=False)
    x = torch.randn(2, 3, dtype=torch.double, requires_grad=True)
    results = []
    for m in (ref, ours):
        out = m(x)
        out = out[0] if isinstance(out, tuple) else out
        first = torch.autograd.grad(out.pow(2).sum(), [x] + list(m.parameters()), create_graph=True)
        penalty = sum(g.pow(2).sum() for g in first)
        results.append(torch.autograd.grad(penalty, [x] + list(m.parameters())))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("shape", ["scalar", "row", "transposed", "zero"])
@pytest.mark.parametrize("batch", [1, 3])
def test_expanded_and_strided_output_gradients_match_nn(kind, shape, batch):
    """The backward ops fill a gradient that is one value expanded to the whole shape (the gradient of a
    sum, an unused output's zero) instead of copying it, and copy anything else: each form of gradient,
    for the output and the final states at once, against torch.nn in float64."""
    ref, ours = _pair(kind)
    x = torch.randn(2, batch, 3, dtype=torch.double, requires_grad=True)
    h0 = torch.randn(1, batch, 4, dtype=torch.double, requires_grad=True)
    row = torch.randn(4, dtype=torch.double)

    def grad_like(t):
        if shape == "scalar":
            return torch.tensor(2.5, dtype=torch.double).expand_as(t)
        if shape == "zero":
            return torch.zeros((), dtype=torch.double).expand_as(t)
        if shape == "row":  # one row expanded over the batch (and time): not a single value
            return row.expand_as(t)
        return torch.randn(t.shape[::-1], dtype=torch.double).transpose(0, -1)  # not contiguous

    grads, seed = [], torch.seed()
    for m in (ref, ours):
        torch.manual_seed(seed)
        hx = (h0, h0 * 0.5) if kind == "lstm" else h0
        out, state = m(x, hx)
        outputs = [out] + (list(state) if kind == "lstm" else [state])
        cotangents = [grad_like(t) for t in outputs]
        grads.append(torch.autograd.grad(outputs, [x, h0] + list(m.parameters()), cotangents))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize("batch", [1, 5, 8])
def test_small_call_weight_gradients_accumulate_like_nn(kind, batch):
    """The small-call weight gradients (N <= 8 rows) write the first token's product instead of adding it
    to a zero fill: gradients of a few steps, accumulated over two backward calls, against torch.nn."""
    ref, ours = _pair(kind, layer=False)
    for _ in range(2):
        x = torch.randn(batch, 3, dtype=torch.double)
        for m in (ref, ours):
            h = m(x)
            h = h[0] if kind == "lstm" else h
            (h * torch.arange(4, dtype=torch.double)).sum().backward()
    _assert_same_grads(ref, ours)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("state", ["none", "detached", "h0", "c0", "both"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_initial_state_gradient_only_where_needed(kind, state, packed, dtype):
    """The backward ops skip dh0's product with W_hh when h0 needs no gradient (need_grad_h0): every
    combination of h0 / c0 requiring grad or not (no state, a detached one, h0 only, c0 only, both),
    2 bidirectional layers, packed ragged input, against torch.nn in float64 (float32: the CPU engine)."""
    if state in ("c0", "both") and kind != "lstm":
        pytest.skip("only LSTM has c0")
    ref, ours = _pair(kind, num_layers=2, bidirectional=True)
    ours.to(dtype)
    x = torch.randn(3, 3, 3, dtype=torch.double, requires_grad=True)
    h0 = torch.randn(4, 3, 4, dtype=torch.double, requires_grad=state in ("h0", "both"))
    c0 = torch.randn(4, 3, 4, dtype=torch.double, requires_grad=state in ("c0", "both"))
    leaves = [x] + [t for t in (h0, c0) if t.requires_grad]
    grads = []
    for m, t in ((ref, torch.double), (ours, dtype)):
        xs, hs, cs = x.to(t), h0.to(t), c0.to(t)
        if packed:
            xs = torch.nn.utils.rnn.pack_padded_sequence(xs, [3, 2, 1])
        hx = None if state == "none" else (hs, cs) if kind == "lstm" else hs
        out, hn = m(xs, hx)
        out = torch.nn.utils.rnn.pad_packed_sequence(out)[0] if packed else out
        h_n = hn[0] if kind == "lstm" else hn
        loss = out.pow(2).sum() + h_n.sum() + (hn[1].pow(2).sum() if kind == "lstm" else 0)
        grads.append(torch.autograd.grad(loss, leaves + list(m.parameters())))
    tol = {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for a, b in zip(*grads):
        torch.testing.assert_close(b.double(), a, **tol)


@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize("state_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cell_state_gradient_only_where_needed(kind, state_grad, dtype):
    """A cell call from a state that needs no gradient (the usual training step) and from one that
    does: weight, input and state gradients against torch.nn in float64."""
    ref, ours = _pair(kind, layer=False)
    ours.to(dtype)
    x = torch.randn(2, 3, dtype=torch.double, requires_grad=True)
    h = torch.randn(2, 4, dtype=torch.double, requires_grad=state_grad)
    c = torch.randn(2, 4, dtype=torch.double, requires_grad=state_grad)
    leaves = [x] + ([h, c] if state_grad and kind == "lstm" else [h] if state_grad else [])
    grads = []
    for m, t in ((ref, torch.double), (ours, dtype)):
        out = m(x.to(t), (h.to(t), c.to(t)) if kind == "lstm" else h.to(t))
        loss = out[0].pow(2).sum() + out[1].sum() if kind == "lstm" else out.pow(2).sum()
        grads.append(torch.autograd.grad(loss, leaves + list(m.parameters())))
    tol = {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for a, b in zip(*grads):
        torch.testing.assert_close(b.double(), a, **tol)


@pytest.mark.parametrize("kind", list(CELLS))
def test_torch_func_and_double_backward_with_a_state_that_needs_no_gradient(kind):
    """torch.func.grad with respect to the weights only (h0 a plain input), jacrev with respect to h0,
    and a gradient penalty (create_graph) from a detached state: each against torch.nn in float64."""
    ref, ours = _pair(kind, layer=False)
    x = torch.randn(2, 3, dtype=torch.double)
    h = torch.randn(2, 4, dtype=torch.double)
    state = (h, h * 0.5) if kind == "lstm" else h

    def loss(m, params, hx):
        out = torch.func.functional_call(m, params, (x, hx))
        return (out[0] if kind == "lstm" else out).pow(2).sum()

    def first_state(m, h_):
        return torch.func.functional_call(m, dict(m.named_parameters()), (x, (h_, h * 0.5) if kind == "lstm"
                                                                           else h_))

    results = []
    for m in (ref, ours):
        params = {k: v.detach() for k, v in m.named_parameters()}
        g = torch.func.grad(loss, argnums=1)(m, params, state)
        jac = torch.func.jacrev(lambda h_: first_state(m, h_)[0] if kind == "lstm" else first_state(m, h_))(h)
        first = torch.autograd.grad(loss(m, dict(m.named_parameters()), state), list(m.parameters()),
                                    create_graph=True)
        penalty = torch.autograd.grad(sum(t.pow(2).sum() for t in first), list(m.parameters()))
        results.append([g[k] for k in sorted(g)] + [jac] + list(penalty))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layer", [False, True])
def test_small_call_weight_gradients_split_across_threads(kind, batch, layer):
    """Large enough small-call weight gradients (csrc/layer/layer_backward.h: small_weight_grads, H = 128)
    are split by rows across threads: torch.nn's gradients, and bitwise the one-thread ones (each row is
    computed by one thread in the same order whatever the split)."""
    hidden = 128
    torch.manual_seed(0)
    nn_cls, fused_cls = (LAYERS if layer else CELLS)[kind]
    ref = nn_cls(hidden, hidden, dtype=torch.double)
    ours = fused_cls(hidden, hidden, dtype=torch.double)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(*((2, batch) if layer else (batch,)), hidden, dtype=torch.double)
    h0 = torch.randn(*((1, batch) if layer else (batch,)), hidden, dtype=torch.double)
    state = (h0, h0.clone()) if kind == "lstm" else h0
    weight = torch.randn(x.shape[:-1] + (hidden,), dtype=torch.double)

    def grads_of(m):
        m.zero_grad(set_to_none=True)
        out = m(x, state)
        out = out[0] if isinstance(out, tuple) else out
        (out * weight).sum().backward()
        return [p.grad.clone() for p in m.parameters()]

    before = torch.get_num_threads()
    try:
        by_threads = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            by_threads[threads] = grads_of(ours)
    finally:
        torch.set_num_threads(before)
    expected = grads_of(ref)
    for one, two, want in zip(by_threads[1], by_threads[2], expected):
        assert torch.equal(one, two)
        torch.testing.assert_close(two, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", [fusedrnn.LSTM, fusedrnn.GRU, fusedrnn.RNN])
def test_the_node_holds_no_reference_to_the_output_past_saved_tensor_hooks(cls):
    """The C++ node watches the output's version counter (to survive an in-place change of the output,
    tests/test_probe_fast_paths.py) through an empty tensor that shares the counter, not an alias of the
    output: an alias would keep the whole output's storage alive whatever the saved-tensor hooks do, so
    activation checkpointing and save_on_cpu would free nothing for it."""
    torch.manual_seed(0)
    m = cls(3, 4)
    x = torch.randn(5, 2, 3, requires_grad=True)
    packed = []

    def pack(t):
        packed.append(t.clone())
        return len(packed) - 1

    with torch.autograd.graph.saved_tensors_hooks(pack, packed.__getitem__):
        out, _ = m(x)
    assert out._base is None  # a one-layer call returns the op's output itself
    plain = torch.randn(3)
    # Every reference to the storage: the tensor itself and the wrapper untyped_storage() returns.
    baseline = torch._C._storage_Use_Count(plain.untyped_storage()._cdata)
    assert torch._C._storage_Use_Count(out.untyped_storage()._cdata) == baseline
    # ...and the gradients still come back right after an in-place change of the output.
    ref = getattr(torch.nn, cls.__name__)(3, 4).double()
    ref.load_state_dict(m.state_dict())
    out.mul_(2)
    out.sum().backward()
    x64 = x.detach().double().requires_grad_()
    ref(x64)[0].mul(2).sum().backward()
    torch.testing.assert_close(x.grad, x64.grad.float(), atol=1e-5, rtol=1e-4)
