"""Tools people apply to models with torch.nn recurrent modules, applied to ours: torch.fx symbolic
tracing, torch.func transforms over a lengths= call, and fusedrnn.convert() of parametrized modules
(weight_norm, spectral_norm, orthogonal). The reference is always torch.nn, float64."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad
from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fusedrnn

LAYERS = [(nn.LSTM, fusedrnn.LSTM), (nn.GRU, fusedrnn.GRU), (nn.RNN, fusedrnn.RNN)]
CELLS = [(nn.LSTMCell, fusedrnn.LSTMCell), (nn.GRUCell, fusedrnn.GRUCell), (nn.RNNCell, fusedrnn.RNNCell)]


def _same_weights(fused: nn.Module, reference: nn.Module) -> None:
    with torch.no_grad():
        for (name, p), (ref_name, q) in zip(fused.named_parameters(), reference.named_parameters()):
            assert name == ref_name
            p.copy_(q)


# ---- torch.fx.symbolic_trace --------------------------------------------------------------------

class _LayerModel(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.rnn = layer
        self.head = nn.Linear(layer.hidden_size * (2 if layer.bidirectional else 1), 3)

    def forward(self, x, h0):
        out, state = self.rnn(x, h0)
        return self.head(out).sum(1), state


class _CellModel(nn.Module):
    def __init__(self, cell: nn.Module):
        super().__init__()
        self.cell = cell

    def forward(self, x, state):
        for t in range(x.shape[0]):
            state = self.cell(x[t], state)
        return state


def _call_module_targets(graph_module: torch.fx.GraphModule):
    return [node.target for node in graph_module.graph.nodes if node.op == "call_module"]


@pytest.mark.parametrize("nn_cls,fused_cls", LAYERS, ids=["lstm", "gru", "rnn"])
def test_symbolic_trace_records_our_layer_as_torch_nn_records_its_own(nn_cls, fused_cls):
    torch.manual_seed(0)
    reference = _LayerModel(nn_cls(5, 7, num_layers=2, bidirectional=True, batch_first=True)).double()
    ours = _LayerModel(fused_cls(5, 7, num_layers=2, bidirectional=True, batch_first=True)).double()
    ours.load_state_dict(reference.state_dict())
    traced_ref, traced = torch.fx.symbolic_trace(reference), torch.fx.symbolic_trace(ours)
    # The same graph as torch.nn's: one leaf call for the recurrent layer, then the head.
    assert _call_module_targets(traced) == _call_module_targets(traced_ref) == ["rnn", "head"]
    assert [n.op for n in traced.graph.nodes] == [n.op for n in traced_ref.graph.nodes]
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    h0 = torch.randn(4, 4, 7, dtype=torch.float64)
    state = (h0, torch.randn_like(h0)) if nn_cls is nn.LSTM else h0
    out, new_state = traced(x, state)
    ref_out, ref_state = reference(x, state)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(new_state, ref_state, rtol=1e-10, atol=1e-10)
    out.pow(2).sum().backward()
    ref_out.pow(2).sum().backward()
    for p, q in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10)


@pytest.mark.filterwarnings("ignore:Was not able to add assertion")  # fx's note on concrete_args
@pytest.mark.parametrize("nn_cls,fused_cls", CELLS, ids=["lstm", "gru", "rnn"])
def test_symbolic_trace_records_our_cell_as_a_leaf_on_every_step(nn_cls, fused_cls):
    torch.manual_seed(0)
    reference, ours = _CellModel(nn_cls(5, 7)).double(), _CellModel(fused_cls(5, 7)).double()
    ours.load_state_dict(reference.state_dict())
    # The loop over time unrolls (x.shape[0] is concrete under concrete_args), one cell call a step.
    concrete = {"x": torch.randn(3, 2, 5, dtype=torch.float64)}
    x = concrete["x"]
    h = torch.randn(2, 7, dtype=torch.float64)
    state = (h, torch.randn_like(h)) if nn_cls is nn.LSTMCell else h
    traced_ref = torch.fx.symbolic_trace(reference, concrete_args={"x": x})
    traced = torch.fx.symbolic_trace(ours, concrete_args={"x": x})
    assert _call_module_targets(traced) == _call_module_targets(traced_ref) == ["cell"] * 3
    torch.testing.assert_close(traced(x, state), reference(x, state), rtol=1e-10, atol=1e-10)


def test_symbolic_trace_passes_lengths_to_the_leaf_call():
    torch.manual_seed(0)

    class WithLengths(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = fusedrnn.GRU(3, 4, batch_first=True)

        def forward(self, x, lengths):
            return self.rnn(x, lengths=lengths)[0]

    model = WithLengths().double()
    traced = torch.fx.symbolic_trace(model)
    x, lengths = torch.randn(3, 5, 3, dtype=torch.float64), torch.tensor([5, 2, 4])
    reference = nn.GRU(3, 4, batch_first=True).double()
    _same_weights(model.rnn, reference)
    expected, _ = pad_packed_sequence(reference(pack_padded_sequence(x, lengths, True, False))[0], True, 0.0, 5)
    torch.testing.assert_close(traced(x, lengths), expected, rtol=1e-10, atol=1e-10)


# ---- torch.func over lengths= -------------------------------------------------------------------

@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
@pytest.mark.parametrize("nn_cls,fused_cls", LAYERS, ids=["lstm", "gru", "rnn"])
def test_torch_func_grad_through_lengths_matches_torch_nn_packed(nn_cls, fused_cls, batch_first):
    """torch.nn's own pad_packed_sequence cannot run under torch.func (its kernel reads data pointers);
    our lengths= pads with tensor ops there. Reference: torch.nn on the packed batch, eager autograd."""
    torch.manual_seed(0)
    reference = nn_cls(4, 6, num_layers=2, bidirectional=True, batch_first=batch_first).double()
    ours = fused_cls(4, 6, num_layers=2, bidirectional=True, batch_first=batch_first).double()
    _same_weights(ours, reference)
    lengths = torch.tensor([5, 2, 4])
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    weight = torch.randn(3, 5, 12, dtype=torch.float64)  # a loss that weighs every output position
    if not batch_first:
        weight = weight.transpose(0, 1)

    def loss(params):
        out = functional_call(ours, params, (x,), {"lengths": lengths})[0]
        return (out * weight).sum()

    params = {name: p.detach() for name, p in ours.named_parameters()}
    grads = grad(loss)(params)
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    ref_out, _ = pad_packed_sequence(reference(packed)[0], batch_first=batch_first, total_length=5)
    torch.testing.assert_close(loss(params), (ref_out * weight).sum(), rtol=1e-10, atol=1e-10)
    ref_grads = torch.autograd.grad((ref_out * weight).sum(), list(reference.parameters()))
    for (name, _), ref_grad in zip(reference.named_parameters(), ref_grads):
        torch.testing.assert_close(grads[name], ref_grad, rtol=1e-9, atol=1e-10)


# ---- convert() of parametrized modules ----------------------------------------------------------

PARAMETRIZATIONS = {
    "spectral_norm": lambda m, name: spectral_norm(m, name),
    "weight_norm": lambda m, name: weight_norm(m, name),
    "orthogonal": lambda m, name: orthogonal(m, name),
}


@pytest.mark.parametrize("how", list(PARAMETRIZATIONS))
@pytest.mark.parametrize("nn_cls,fused_cls", LAYERS + CELLS,
                         ids=["lstm", "gru", "rnn", "lstm_cell", "gru_cell", "rnn_cell"])
def test_convert_swaps_a_parametrized_module_and_keeps_its_parametrization(nn_cls, fused_cls, how):
    cell = nn_cls in (nn.LSTMCell, nn.GRUCell, nn.RNNCell)
    name = "weight_hh" if cell else "weight_hh_l0"

    def build():
        torch.manual_seed(0)
        return PARAMETRIZATIONS[how](nn_cls(4, 6).double(), name)

    model, reference = nn.Sequential(build()), build()
    original_params = list(model[0].parameters())
    fusedrnn.convert(model)
    ours = model[0]
    assert isinstance(ours, fused_cls)
    assert torch.nn.utils.parametrize.is_parametrized(ours, name)
    # The very Parameters (an optimizer built before convert keeps training them) and the same
    # parametrization modules (spectral_norm's u and v are shared, not copied).
    assert [id(p) for p in ours.parameters()] == [id(p) for p in original_params]
    assert ours.parametrizations[name][0] is model[0].parametrizations[name][0]
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    for _ in range(3):  # spectral_norm in training mode steps its power iteration on every read
        if cell:
            out, ref_out = ours(x[0]), reference(x[0])
        else:
            out, ref_out = ours(x)[0], reference(x)[0]
        out = out[0] if isinstance(out, tuple) else out
        ref_out = ref_out[0] if isinstance(ref_out, tuple) else ref_out
        out.pow(2).sum().backward()
        ref_out.pow(2).sum().backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    for (p_name, p), q in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11, msg=p_name)
    back = fusedrnn.revert(nn.Sequential(ours))[0]
    assert type(back).__bases__ == (nn_cls,) and torch.nn.utils.parametrize.is_parametrized(back, name)


# ---- torch.ao.quantization.quantize_dynamic -----------------------------------------------------

@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore:.*torchao.*")
def test_quantize_dynamic_leaves_our_modules_in_float_and_revert_gives_nn_quantization():
    """What the README says: quantize_dynamic matches exact types, so ours stay float (same numbers as
    before); revert() first gives torch.nn's dynamically quantized LSTM."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(4, 8))
    x = torch.randn(6, 2, 4)
    expected = model(x)[0]
    fusedrnn.convert(model)
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.LSTM}, dtype=torch.qint8)
    assert type(quantized[0]) is fusedrnn.LSTM
    torch.testing.assert_close(quantized(x)[0], expected, rtol=1e-5, atol=1e-6)
    reverted = torch.ao.quantization.quantize_dynamic(fusedrnn.revert(model), {nn.LSTM}, dtype=torch.qint8)
    assert type(reverted[0]) is torch.ao.nn.quantized.dynamic.LSTM
    torch.testing.assert_close(reverted(x)[0], expected, rtol=0, atol=0.05)  # int8 weights


# ---- torch.fx.symbolic_trace of the layer-normalised modules ------------------------------------

@pytest.mark.filterwarnings("ignore:Was not able to add assertion")
@pytest.mark.parametrize("cls", ["LayerNormLSTM", "LayerNormGRU", "LayerNormLSTMCell", "LayerNormGRUCell"])
def test_symbolic_trace_records_layer_normalised_modules_as_leaves(cls):
    """No torch.nn twin exists; the reference is the module called directly (itself checked against
    fusedrnn.reference in tests/test_layernorm.py)."""
    torch.manual_seed(0)
    module = getattr(fusedrnn, cls)(5, 7).double()
    cell = cls.endswith("Cell")

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = module

        def forward(self, x, state):
            return self.rnn(x, state)

    x = torch.randn(2, 5, dtype=torch.float64) if cell else torch.randn(4, 2, 5, dtype=torch.float64)
    h = torch.randn(2, 7, dtype=torch.float64) if cell else torch.randn(1, 2, 7, dtype=torch.float64)
    state = (h, torch.randn_like(h)) if "LSTM" in cls else h
    traced = torch.fx.symbolic_trace(Model())
    assert _call_module_targets(traced) == ["rnn"]
    torch.testing.assert_close(traced(x, state), module(x, state), rtol=0, atol=0)
