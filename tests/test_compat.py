"""Compatibility with the tools users rely on (issue 9): autocast, torch.func, TorchScript,
torch.nn's exception types, relu's gradient at NaN, and fake kernels that describe the real
outputs. Every test compares with torch.nn or a float64 reference."""

import pytest
import torch
from torch import nn

import fusedrnn
from conftest import CELLS, flat_state, make_pair


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
