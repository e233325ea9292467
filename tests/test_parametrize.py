"""Parametrized weights are read as often per forward as torch.nn reads them, so parametrizations
with side effects give torch.nn's numbers.

A parametrization runs on every access of the weight unless cached. Some have side effects:
spectral_norm in training mode runs a power iteration and updates its vectors in place on each
access, so a module that reads the weight a different number of times per forward gets another
normalisation and different outputs. torch.nn's layers read each weight through
`_update_flat_weights` (a `hasattr` and a `getattr` per weight up to the first that changed,
then again for every weight), its cells once per weight. These tests count the reads of
torch.nn and fusedrnn side by side and compare the numbers under spectral_norm.
"""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, parametrizations

import fusedrnn

LAYERS = [(nn.LSTM, fusedrnn.LSTM, {}), (nn.LSTM, fusedrnn.LSTM, {"proj_size": 3}), (nn.GRU, fusedrnn.GRU, {}),
          (nn.RNN, fusedrnn.RNN, {"nonlinearity": "relu"})]
CELLS = [(nn.LSTMCell, fusedrnn.LSTMCell), (nn.GRUCell, fusedrnn.GRUCell), (nn.RNNCell, fusedrnn.RNNCell)]


class CountReads(nn.Module):
    """An identity parametrization that counts how often the weight is computed."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def forward(self, w):
        self.reads += 1
        return w * 1.0


def _reads(module, names, inputs, calls=2):
    counters = {}
    for name in names:
        counters[name] = CountReads()
        parametrize.register_parametrization(module, name, counters[name])
    history = []
    for _ in range(calls):  # the first call after registration and a steady-state one
        for c in counters.values():
            c.reads = 0
        module(*inputs)
        history.append({name: c.reads for name, c in counters.items()})
    return history


def _layer_name_sets(kwargs):
    names = ["weight_ih_l0", "weight_hh_l0", "bias_hh_l0", "weight_ih_l1_reverse", "weight_hh_l1"]
    if kwargs.get("proj_size"):
        names.append("weight_hr_l0")
    # one weight alone, the first weight with later ones, and only later ones: torch.nn's
    # change detection stops at the first weight that changed, so the counts depend on which.
    return [names, names[1:2], names[3:], names[-1:]]


@pytest.mark.parametrize("nn_cls,fused_cls,kwargs", LAYERS, ids=["lstm", "lstm_proj", "gru", "rnn_relu"])
def test_layer_reads_each_parametrized_weight_as_often_as_torch_nn(nn_cls, fused_cls, kwargs):
    for names in _layer_name_sets(kwargs):
        x = torch.randn(3, 2, 4)
        expected = _reads(nn_cls(4, 6, num_layers=2, bidirectional=True, **kwargs), names, (x,))
        got = _reads(fused_cls(4, 6, num_layers=2, bidirectional=True, **kwargs), names, (x,))
        assert got == expected, f"parametrized {names}"


@pytest.mark.parametrize("nn_cls,fused_cls", CELLS, ids=["lstm", "gru", "rnn"])
def test_cell_reads_each_parametrized_weight_as_often_as_torch_nn(nn_cls, fused_cls):
    for names in (["weight_ih", "weight_hh", "bias_ih", "bias_hh"], ["weight_ih"], ["bias_hh"]):
        x = torch.randn(2, 4)
        expected = _reads(nn_cls(4, 6), names, (x,))
        got = _reads(fused_cls(4, 6), names, (x,))
        assert got == expected, f"parametrized {names}"


def _spectral_pair(nn_cls, fused_cls, names, *args, **kwargs):
    torch.manual_seed(0)
    ref = nn_cls(*args, dtype=torch.float64, **kwargs)
    ours = fused_cls(*args, dtype=torch.float64, **kwargs)
    ours.load_state_dict(ref.state_dict())
    for module in (ref, ours):
        for name in names:
            torch.manual_seed(1)  # the power iteration's random start vectors
            parametrizations.spectral_norm(module, name)
    return ref, ours


@pytest.mark.parametrize("nn_cls,fused_cls,kwargs", LAYERS, ids=["lstm", "lstm_proj", "gru", "rnn_relu"])
def test_layer_under_spectral_norm_in_training_matches_torch_nn(nn_cls, fused_cls, kwargs):
    names = ["weight_hh_l0", "weight_ih_l1"]
    ref, ours = _spectral_pair(nn_cls, fused_cls, names, 4, 6, num_layers=2, **kwargs)
    ref.train(), ours.train()
    for step in range(3):  # each forward advances the power iteration as often on both sides
        x = torch.randn(5, 2, 4, dtype=torch.float64)
        out_ref, out_ours = ref(x)[0], ours(x)[0]
        torch.testing.assert_close(out_ours, out_ref, rtol=0, atol=1e-10, msg=f"forward {step}")
    for name in names:
        torch.testing.assert_close(getattr(ours.parametrizations, name)[0]._u,
                                   getattr(ref.parametrizations, name)[0]._u, rtol=0, atol=1e-12)


@pytest.mark.parametrize("nn_cls,fused_cls", CELLS, ids=["lstm", "gru", "rnn"])
def test_cell_under_spectral_norm_in_training_matches_torch_nn(nn_cls, fused_cls):
    ref, ours = _spectral_pair(nn_cls, fused_cls, ["weight_ih", "weight_hh"], 4, 6)
    for step in range(3):
        x = torch.randn(2, 4, dtype=torch.float64)
        out_ref, out_ours = ref(x), ours(x)
        out_ref = out_ref if isinstance(out_ref, tuple) else (out_ref,)
        out_ours = out_ours if isinstance(out_ours, tuple) else (out_ours,)
        for a, b in zip(out_ours, out_ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"step {step}")
