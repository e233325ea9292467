"""The nn.Module contract beyond numerical parity: construction, state_dict, convert,
inputs torch.nn accepts or rejects, dropout, determinism, torch.compile, and the fallback."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fusedrnn
from conftest import CELLS, flat_state, make_pair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("cell", list(CELLS))
def test_same_parameters_names_shapes_and_init_as_torch_nn(cell):
    torch_cls, fused_cls, extra = CELLS[cell]
    kwargs = dict(num_layers=2, bidirectional=True, **extra)
    torch.manual_seed(3)
    ref = torch_cls(4, 6, **kwargs)
    torch.manual_seed(3)
    ours = fused_cls(4, 6, **kwargs)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(ref_sd) == list(our_sd)
    for k in ref_sd:
        assert torch.equal(ref_sd[k], our_sd[k]), k
    assert repr(ours).split("(", 1)[1] == repr(ref).split("(", 1)[1]


@pytest.mark.parametrize("cell", list(CELLS))
def test_state_dict_moves_both_ways(cell):
    torch_cls, fused_cls, extra = CELLS[cell]
    ref = torch_cls(4, 6, num_layers=2, bias=False, **extra)
    ours = fused_cls(4, 6, num_layers=2, bias=False, **extra)
    ours.load_state_dict(ref.state_dict())
    back = torch_cls(4, 6, num_layers=2, bias=False, **extra)
    back.load_state_dict(ours.state_dict())
    for a, b in zip(ref.parameters(), back.parameters()):
        assert torch.equal(a, b)


def test_convert_swaps_every_recurrent_module_and_keeps_weights_mode_and_dtype():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.lstm = nn.LSTM(4, 6, batch_first=True, proj_size=2)
            self.stack = nn.Sequential(nn.GRU(2, 3), nn.RNN(3, 3, nonlinearity="relu"))
            self.cells = nn.ModuleList([nn.LSTMCell(3, 3), nn.GRUCell(3, 3), nn.RNNCell(3, 3, bias=False)])

    model = Model().double().eval()
    model.lstm.weight_hh_l0.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = fusedrnn.convert(model)
    assert converted is model
    expected = [fusedrnn.LSTM, fusedrnn.GRU, fusedrnn.RNN, fusedrnn.LSTMCell, fusedrnn.GRUCell, fusedrnn.RNNCell]
    got = [type(m) for m in (model.lstm, model.stack[0], model.stack[1], *model.cells)]
    assert got == expected
    assert model.stack[1].nonlinearity == "relu" and model.lstm.proj_size == 2 and model.lstm.batch_first
    assert not model.lstm.training and not model.lstm.weight_hh_l0.requires_grad
    assert all(p.dtype == torch.float64 for p in model.parameters())
    after = model.state_dict()
    assert list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert type(fusedrnn.convert(nn.GRU(2, 3))) is fusedrnn.GRU
    fusedrnn.revert(model)
    assert type(model.lstm) is nn.LSTM and type(model.cells[0]) is nn.LSTMCell


def test_convert_leaves_subclasses_alone():
    class MyGRU(nn.GRU):
        pass

    m = nn.Sequential(MyGRU(2, 3))
    fusedrnn.convert(m)
    assert type(m[0]) is MyGRU


def test_elman_worked_example_relu():
    """The course notes' worked example: all weights 1, no bias, inputs [1,1], [1,1], [2,2]."""
    rnn = fusedrnn.RNN(2, 2, nonlinearity="relu", bias=False)
    out_layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        for p in list(rnn.parameters()) + list(out_layer.parameters()):
            p.fill_(1.0)
    x = torch.tensor([[1.0, 1.0], [1.0, 1.0], [2.0, 2.0]])
    hidden, h_n = rnn(x)
    assert torch.equal(hidden, torch.tensor([[2.0, 2.0], [6.0, 6.0], [16.0, 16.0]]))
    assert torch.equal(h_n, torch.tensor([[16.0, 16.0]]))
    assert torch.equal(out_layer(hidden), torch.tensor([[4.0, 4.0], [12.0, 12.0], [32.0, 32.0]]))


def test_dropout_zeroes_fraction_p_between_layers_and_is_reproducible(monkeypatch):
    seen = []
    real_dropout = fusedrnn.functional.F.dropout

    def recording_dropout(x, p, training):
        y = real_dropout(x, p=p, training=training)
        seen.append(((y == 0) & (x != 0)).double().mean().item())
        return y

    monkeypatch.setattr(fusedrnn.functional.F, "dropout", recording_dropout)
    m = fusedrnn.LSTM(8, 64, num_layers=3, dropout=0.3)
    x = torch.randn(50, 16, 8)
    torch.manual_seed(0)
    a, _ = m(x)
    assert len(seen) == 2  # between layers 0-1 and 1-2, not after the last
    assert all(abs(f - 0.3) < 0.02 for f in seen), seen
    torch.manual_seed(0)
    b, _ = m(x)
    assert torch.equal(a, b)
    torch.manual_seed(1)
    c, _ = m(x)
    assert not torch.equal(a, c)
    m.eval()
    seen.clear()
    ref = nn.LSTM(8, 64, num_layers=3, dropout=0.3).eval()
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x)[0], ref(x)[0], rtol=1e-4, atol=1e-5)
    assert seen == []


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_cpu_results_are_bitwise_reproducible(cell):
    # Large enough that the pointwise steps and GEMMs run on several threads.
    _, m = make_pair(cell, 32, 64, dtype=torch.float32, num_layers=2, bidirectional=True)
    x = torch.randn(20, 600, 32, requires_grad=True)

    def run():
        out, state = m(x)
        grads = torch.autograd.grad(out.square().sum(), [x] + list(m.parameters()))
        return [out] + flat_state(state) + list(grads)

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_non_contiguous_input_matches_torch_nn():
    ref, ours = make_pair("gru", 3, 5, batch_first=True)
    x = torch.randn(3, 7, 4, dtype=torch.float64).permute(1, 2, 0)  # (B=7, T=4, I=3), non-contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_empty_batch_behaves_like_torch_nn(cell):
    ref, ours = make_pair(cell, 3, 5, num_layers=2)
    x = torch.randn(4, 0, 3, dtype=torch.float64, requires_grad=True)
    (o1, s1), (o2, s2) = ref(x), ours(x)
    assert o1.shape == o2.shape and [t.shape for t in flat_state(s1)] == [t.shape for t in flat_state(s2)]
    o2.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("cell", list(CELLS))
def test_nan_in_input_propagates_like_torch_nn(cell):
    ref, ours = make_pair(cell, 3, 5)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    x[2, 1, 0] = float("nan")
    o1, o2 = ref(x)[0], ours(x)[0]
    assert torch.equal(o1.isnan(), o2.isnan())
    assert o2.isnan().any()


def test_parametrized_weights_match_torch_nn():
    """The modules look their weights up on every call (TorchScript alone gets a fixed list), so a
    parametrization such as weight_norm takes effect, and its parameters get gradients."""
    from torch.nn.utils.parametrizations import weight_norm

    ref, ours = make_pair("gru", 3, 5, num_layers=2)
    for m in (ref, ours):
        weight_norm(m, "weight_hh_l1")
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    expected, got = ref(x)[0], ours(x)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    g_ref = torch.autograd.grad(expected.sum(), list(ref.parametrizations.weight_hh_l1.parameters()))
    g_ours = torch.autograd.grad(got.sum(), list(ours.parametrizations.weight_hh_l1.parameters()))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_lengths_keyword_matches_packing_by_hand():
    ref, ours = make_pair("gru", 3, 5, batch_first=True, num_layers=2, bidirectional=True)
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    lengths = torch.tensor([2, 6, 1, 4])
    out, h = ours(x, lengths=lengths)
    packed_out, h_ref = ref(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    expected, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=6)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-10)



@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lengths_keyword_on_an_empty_batch_is_the_plain_empty_call(cell):
    # No tokens: the output and state of the plain call on the empty batch (torch.nn's), not an
    # IndexError from building an empty packing.
    ref, ours = make_pair(cell, 3, 5, num_layers=2, bidirectional=True)
    x = torch.randn(4, 0, 3, dtype=torch.float64)
    got = ours(x, lengths=torch.zeros(0, dtype=torch.int64))
    expected = ref(x)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)


def _lstm():
    return fusedrnn.LSTM(3, 5, num_layers=2)


def _gru():
    return fusedrnn.GRU(3, 5, num_layers=2)


def _lstm_cell():
    return fusedrnn.LSTMCell(3, 5)


# Exception types are torch.nn's for the same mistake (tests/test_compat.py checks that against
# torch.nn itself); this table checks our messages.
BAD_INPUTS = [
    (_lstm_cell, lambda: (torch.randn(2, 4),), RuntimeError, "input.size\\(-1\\) must be equal to input_size"),
    (_lstm_cell, lambda: (torch.randn(2, 3, 1),), ValueError, "1-D \\(unbatched\\) or 2-D \\(batched\\), got 3-D"),
    (_lstm_cell, lambda: (torch.ones(2, 3, dtype=torch.int64),), RuntimeError,
     "input dtype \\(torch.int64\\) does not match the module's parameters' dtype \\(torch.float32\\)"),
    (_lstm_cell, lambda: (torch.randn(2, 3), torch.randn(2, 5)), TypeError, "hx must be a tuple \\(h_0, c_0\\)"),
    (_lstm_cell, lambda: (torch.randn(2, 3), (torch.randn(2, 5), torch.randn(3, 5))), RuntimeError,
     "expected c_0 of size \\(2, 5\\), got \\(3, 5\\)"),
    (_lstm_cell, lambda: (torch.randn(2, 3), (torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5))),
     RuntimeError, "h_0 must have the dtype of input"),
    (_lstm_cell, lambda: ([1.0, 2.0, 3.0],), TypeError, "input must be a Tensor, got list"),
    (_gru, lambda: (torch.randn(4, 2, 7),), RuntimeError, "input.size\\(-1\\) must be equal to input_size"),
    (_gru, lambda: (torch.randn(4),), ValueError, "2-D \\(unbatched\\) or 3-D \\(batched\\), got 1-D"),
    (_gru, lambda: (torch.randn(4, 2, 3, 1),), ValueError, "got 4-D"),
    (_gru, lambda: (torch.ones(4, 2, 3, dtype=torch.int64),), ValueError,
     "input dtype \\(torch.int64\\) does not match"),
    (_gru, lambda: (torch.randn(4, 2, 3, dtype=torch.float64),), ValueError, "input.to\\(torch.float32\\)"),
    (_gru, lambda: (torch.randn(4, 2, 3), torch.randn(2, 3, 5)), RuntimeError,
     "expected hx of size \\(2, 2, 5\\), got \\(2, 3, 5\\)"),
    (_gru, lambda: (torch.randn(4, 2, 3), torch.randn(2, 5)), RuntimeError, "hx should also be 3-D"),
    (_gru, lambda: (torch.randn(4, 3), torch.randn(2, 1, 5)), RuntimeError, "hx should also be 2-D"),
    (_gru, lambda: (torch.randn(4, 2, 3), torch.randn(2, 2, 5, dtype=torch.float64)), RuntimeError,
     "hx must have the dtype of input"),
    (_gru, lambda: (torch.randn(4, 2, 3), torch.randn(2, 2, 5, device="meta")), RuntimeError,
     "hx must be on the device of input"),
    (_gru, lambda: (torch.randn(0, 2, 3),), RuntimeError, "sequence length to be larger than 0"),
    (_gru, lambda: (torch.randn(4, 2, 3), 3), TypeError, "hx must be a Tensor, got int"),
    (_lstm, lambda: (torch.randn(4, 2, 3), torch.randn(2, 2, 5)), RuntimeError, "hx must be a tuple \\(h_0, c_0\\)"),
    (_lstm, lambda: (torch.randn(4, 2, 3), (torch.randn(2, 2, 5), torch.randn(2, 2, 4))), RuntimeError,
     "expected c_0 of size \\(2, 2, 5\\)"),
]


@pytest.mark.parametrize("make,args,exc,message", BAD_INPUTS)
def test_bad_input_raises_clear_error(make, args, exc, message):
    with pytest.raises(exc, match=message):
        make()(*args())


@pytest.mark.parametrize("lengths,message", [([3, 0], "every length must be in \\[1, 4\\]"),
                                             ([5, 2], "every length must be in \\[1, 4\\]"),
                                             ([2, 2, 2], "lengths must be a 1-D integer tensor of 2")])
def test_bad_lengths_raise_clear_error(lengths, message):
    with pytest.raises(ValueError, match=message):
        _gru()(torch.randn(4, 2, 3), lengths=torch.tensor(lengths))


def test_constructor_errors_match_torch_nn():
    with pytest.raises(ValueError, match="proj_size has to be smaller than hidden_size"):
        fusedrnn.LSTM(3, 4, proj_size=4)
    with pytest.raises(ValueError, match="only supported for LSTM"):
        fusedrnn.GRU(3, 4, proj_size=2)
    with pytest.raises(ValueError, match="dropout should be a number in range"):
        fusedrnn.GRU(3, 4, dropout=1.5)
    with pytest.raises(ValueError, match="Unknown nonlinearity"):
        fusedrnn.RNN(3, 4, nonlinearity="gelu")
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        fusedrnn.GRU(3, 4, dropout=0.5)
    assert fusedrnn.RNN(3, 4, 2, "relu").nonlinearity == "relu"  # torch.nn.RNN's positional order
    fusedrnn.GRU(3, 4).flatten_parameters()  # harmless no-op


class _Classifier(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(5 * (2 if getattr(rnn, "bidirectional", False) else 1), 1)

    def forward(self, x):
        out, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state
        return self.head(out[:, -1]).sum() + h.sum()


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
def test_torch_compile_fullgraph_matches_eager(cell):
    torch._dynamo.reset()
    _, fused_cls, extra = CELLS[cell]
    torch.manual_seed(0)
    model = _Classifier(fused_cls(3, 5, num_layers=2, bidirectional=True, batch_first=True, **extra))
    x = torch.randn(4, 6, 3, requires_grad=True)
    eager = model(x)
    eager_grads = torch.autograd.grad(eager, [x] + list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out, [x] + list(model.parameters()))
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, e in zip(grads, eager_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_torch_nn_gru_cannot_compile_fullgraph():
    """The advantage the test above protects: dynamo refuses torch.nn's recurrent modules."""
    torch._dynamo.reset()
    model = _Classifier(nn.GRU(3, 5, batch_first=True))
    with pytest.raises(Exception, match="(?i)rnn|gru|lstm"):
        torch.compile(model, fullgraph=True)(torch.randn(2, 4, 3))


def test_falls_back_to_reference_with_one_warning_when_library_cannot_load():
    code = (
        "import sys, warnings\n"
        "sys.modules['fusedrnn._C'] = None  # makes `from . import _C` fail\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, fusedrnn\n"
        "msgs = [str(x.message) for x in w if 'fusedrnn' in str(x.message)]\n"
        "assert len(msgs) == 1 and 'reference implementation' in msgs[0], msgs\n"
        "info = fusedrnn.backends()\n"
        "assert info['compiled'] is False and 'fusedrnn._C' in info['load_error'], info\n"
        "torch.manual_seed(0)\n"
        "ref = torch.nn.GRU(3, 4, bidirectional=True).double()\n"
        "ours = fusedrnn.GRU(3, 4, bidirectional=True).double()\n"
        "ours.load_state_dict(ref.state_dict())\n"
        "x = torch.randn(5, 2, 3, dtype=torch.float64)\n"
        "assert (ours(x)[0] - ref(x)[0]).abs().max() < 1e-12\n"
        "print('fallback ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


def test_backends_reports_compiled_library():
    info = fusedrnn.backends()
    assert info["compiled"] and info["cpu"], info
    assert info["built_against_torch"] == torch.__version__


# hidden_size (or proj_size) 1 makes W_hh^T a [1, G*H] view whose row stride torch leaves at 1
# (a size-1 dimension's stride is arbitrary); the per-step BLAS call once passed that as the
# leading dimension, MKL rejected it ("Parameter 8 was incorrect") and the outputs were garbage.
@pytest.mark.parametrize("engine", ["0", "1"], ids=["per_step", "engine"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("batch", [1, 2, 16])
@pytest.mark.parametrize("cell,hidden,extra", [("lstm", 1, {}), ("gru", 1, {}), ("rnn_tanh", 1, {}),
                                               ("lstm", 2, {"proj_size": 1})],
                         ids=["lstm", "gru", "rnn", "lstm_proj1"])
def test_size_one_state_matches_torch_nn(monkeypatch, engine, dtype, batch, cell, hidden, extra):
    from conftest import tolerances

    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", engine)
    torch.manual_seed(0)
    ref, ours = make_pair(cell, hidden_size=hidden, dtype=dtype, **extra)
    x = torch.randn(5, batch, 3, dtype=dtype)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, _ = ref(xr)
    out_o, _ = ours(xo)
    torch.testing.assert_close(out_o, out_r, **tolerances(dtype))
    g = torch.randn_like(out_r)
    out_r.backward(g)
    out_o.backward(g)
    torch.testing.assert_close(xo.grad, xr.grad, **tolerances(dtype))
    for (name, p_r), p_o in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p_o.grad, p_r.grad, **tolerances(dtype), msg=name)


# ---- the one-layer eager call through the ops' full-batch form, and the kept weight list -------------
# (benchmarks/NOTES.md entry 38: the module passes [T, B, I] and [1, B, *] to the op and keeps its
# checked weight list while the weights are the same objects).

@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("steps,batch", [(1, 1), (1, 4), (5, 2)])
@pytest.mark.parametrize("given_state", [False, True])
def test_one_layer_full_batch_call_matches_torch_nn(cell, batch_first, steps, batch, given_state):
    ref, ours = make_pair(cell, batch_first=batch_first)
    g = torch.Generator().manual_seed(steps * 10 + batch)
    shape = (batch, steps, 3) if batch_first else (steps, batch, 3)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    state = None
    if given_state:
        h_size = 3 if cell == "lstm_proj" else 5
        h0 = torch.randn(1, batch, h_size, generator=g, dtype=torch.float64)
        state = (h0, torch.randn(1, batch, 5, generator=g, dtype=torch.float64)) if cell.startswith("lstm") else h0
    with torch.no_grad():
        (o1, s1), (o2, s2) = ref(x, state), ours(x, state)
    assert o2.shape == o1.shape
    torch.testing.assert_close(o2, o1, rtol=0, atol=1e-10)
    for a, b in zip(flat_state(s2), flat_state(s1)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    # Training: gradients of input, states and weights, and double backward, against torch.nn.
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    states = [None, None]
    if given_state:
        states = [tuple(t.clone().requires_grad_() for t in flat_state(state)) for _ in range(2)]
        if not cell.startswith("lstm"):
            states = [s[0] for s in states]
    results = []
    for m, xi, si in ((ref, xs[0], states[0]), (ours, xs[1], states[1])):
        out, s = m(xi, si)
        loss = (out ** 2).sum() + sum((t ** 3).sum() for t in flat_state(s))
        leaves = [xi] + (flat_state(si) if si is not None else []) + list(m.parameters())
        first = torch.autograd.grad(loss, leaves, create_graph=True)
        second = torch.autograd.grad(sum((f ** 2).sum() for f in first), leaves)
        results.append((first, second))
    for want, got in zip(*[[t for pair in r for t in pair] for r in results]):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


def test_kept_weight_list_follows_every_change_of_the_weights_and_attributes():
    ref, ours = make_pair("gru")
    x = torch.randn(2, 3, 3, dtype=torch.float64)

    def same():
        with torch.no_grad():
            torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=0, atol=1e-10)

    same()
    same()  # the kept list
    with torch.no_grad():  # in place: the same objects, new values
        ref.weight_hh_l0.mul_(0.5)
        ours.weight_hh_l0.mul_(0.5)
    same()
    new = torch.randn_like(ref.weight_ih_l0)  # a new Parameter object
    ref.weight_ih_l0 = nn.Parameter(new.clone())
    ours.weight_ih_l0 = nn.Parameter(new.clone())
    same()
    ours._parameters["bias_hh_l0"] = nn.Parameter(ref.bias_hh_l0.detach() * 0 + 1)  # behind __setattr__'s back
    with torch.no_grad():
        ref.bias_hh_l0.fill_(1)
    same()
    with torch.no_grad():  # .data swapped for another tensor
        ref.bias_ih_l0.data = ref.bias_ih_l0.data * 2
        ours.bias_ih_l0.data = ours.bias_ih_l0.data * 2
    same()
    # An attribute that the checks read: torch.nn's error, not the kept list.
    ours.bias = False
    with pytest.raises(RuntimeError, match="bias=False"):
        ours(x)
    ours.bias = True
    same()
    ours.num_layers = 2
    with pytest.raises(RuntimeError, match="num_layers=2"):
        ours(x)
    ours.num_layers = 1
    same()
    # A copy and a pickled copy carry no list of the original's weights.
    import copy
    import pickle
    for twin in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        with torch.no_grad():
            for p in twin.parameters():
                p.add_(1)
            for p in ref.parameters():
                p.add_(1)
        with torch.no_grad():
            torch.testing.assert_close(twin(x)[0], ref(x)[0], rtol=0, atol=1e-10)
        with torch.no_grad():
            for p in ref.parameters():
                p.sub_(1)
    same()
