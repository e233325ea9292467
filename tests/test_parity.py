"""fusedrnn modules against torch.nn with identical weights: outputs, final states and the
gradients of the input, the initial states and every parameter, over the configuration matrix."""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from conftest import CELLS, DEVICES, flat_state, make_pair, requires_cuda, tolerances

T, B, I, H = 5, 3, 3, 5
LENGTHS = [4, 5, 2]  # unsorted on purpose: enforce_sorted=False must sort and unsort
INPUTS = ["padded", "padded_hx", "packed", "packed_hx", "unbatched", "unbatched_hx"]


def _run(module, x, hx, kind, batch_first):
    """Forward + backward with fixed random output gradients; returns every tensor to compare."""
    inp = x
    if kind.startswith("packed"):
        inp = pack_padded_sequence(x, torch.tensor(LENGTHS), batch_first=batch_first, enforce_sorted=False)
    out, state = module(inp, hx) if hx is not None else module(inp)
    out_data = out.data if isinstance(out, PackedSequence) else out
    states = flat_state(state)
    gen = torch.Generator().manual_seed(1234)
    loss = (out_data * torch.randn(out_data.shape, generator=gen, dtype=x.dtype).to(x.device)).sum()
    for s in states:
        loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=x.dtype).to(x.device)).sum()
    leaves = [x] + (flat_state(hx) if hx is not None else []) + list(module.parameters())
    grads = torch.autograd.grad(loss, leaves)
    return [out_data] + states + list(grads)


MATRIX = list(itertools.product(CELLS, [1, 3], [False, True], [False, True], [True, False], INPUTS,
                                [torch.float64, torch.float32], ["train", "eval"]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell,num_layers,bidirectional,batch_first,bias,kind,dtype,mode", MATRIX)
def test_module_matches_torch_nn(cell, num_layers, bidirectional, batch_first, bias, kind, dtype, mode, device,
                                 monkeypatch):
    torch.manual_seed(hash((cell, num_layers, bidirectional, batch_first, bias, kind)) % 2**31)
    ref, ours = make_pair(cell, I, H, dtype=dtype, device=device, num_layers=num_layers,
                          bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    ref.train(mode == "train")
    ours.train(mode == "train")
    shape = (T, I) if kind.startswith("unbatched") else ((B, T, I) if batch_first else (T, B, I))
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    hx = None
    if kind.endswith("_hx"):
        d = (2 if bidirectional else 1) * num_layers
        real = ours.proj_size or H
        batch_shape = () if kind.startswith("unbatched") else (B,)
        h = torch.randn((d, *batch_shape, real), dtype=dtype, device=device, requires_grad=True)
        if cell.startswith("lstm"):
            hx = (h, torch.randn((d, *batch_shape, H), dtype=dtype, device=device, requires_grad=True))
        else:
            hx = h
    expected = _run(ref, x, hx, kind, batch_first)
    # float32 on the CPU has three paths: the recurrent engine (the default) with the input
    # projection inside its tiles or as one GEMM before it (chosen by weight size; forced here),
    # and the per-step loop (FUSEDRNN_CPU_ENGINE=0, also what other dtypes run): all must match.
    paths = [("1", "1"), ("1", "0"), ("0", "0")] if device == "cpu" and dtype == torch.float32 else [None]
    for path in paths:
        if path is not None:
            monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", path[0])
            monkeypatch.setenv("FUSEDRNN_CPU_FUSE_INPUT", path[1])
        actual = _run(ours, x, hx, kind, batch_first)
        assert len(expected) == len(actual)
        for k, (e, a) in enumerate(zip(expected, actual)):
            assert a.shape == e.shape, f"tensor {k}"
            torch.testing.assert_close(a, e, **tolerances(dtype), msg=lambda m: f"path {path} tensor {k}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batched,given_hx", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("bias", [True, False])
def test_cell_matches_torch_nn(cell, dtype, batched, given_hx, bias, device):
    import fusedrnn

    torch_cls = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell, "rnn_tanh": torch.nn.RNNCell,
                 "rnn_relu": torch.nn.RNNCell}[cell]
    fused_cls = {"lstm": fusedrnn.LSTMCell, "gru": fusedrnn.GRUCell, "rnn_tanh": fusedrnn.RNNCell,
                 "rnn_relu": fusedrnn.RNNCell}[cell]
    kwargs = {"nonlinearity": cell.split("_")[1]} if cell.startswith("rnn") else {}
    torch.manual_seed(7)
    ref = torch_cls(I, H, bias=bias, dtype=dtype, device=device, **kwargs)
    ours = fused_cls(I, H, bias=bias, dtype=dtype, device=device, **kwargs)
    ours.load_state_dict(ref.state_dict())
    batch = (B,) if batched else ()
    x = torch.randn(*batch, I, dtype=dtype, device=device, requires_grad=True)
    hx = None
    if given_hx:
        hx = torch.randn(*batch, H, dtype=dtype, device=device, requires_grad=True)
        if cell == "lstm":
            hx = (hx, torch.randn(*batch, H, dtype=dtype, device=device, requires_grad=True))

    def run(m):
        out = flat_state(m(x, hx) if hx is not None else m(x))
        loss = sum((o * (k + 1.5)).sum() for k, o in enumerate(out))
        leaves = [x] + (flat_state(hx) if hx is not None else []) + list(m.parameters())
        return out + list(torch.autograd.grad(loss, leaves))

    for e, a in zip(run(ref), run(ours)):
        torch.testing.assert_close(a, e, **tolerances(dtype))


HALF_CASES = [("cpu", torch.bfloat16)] + [pytest.param("cuda", dt, marks=requires_cuda)
                                        for dt in (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("device,dtype", HALF_CASES)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_half_precision_error_at_most_twice_torch_nn(cell, device, dtype):
    """DESIGN.md: in float16/bfloat16 our error against a float64 reference is at most 2x the
    error of torch.nn in the same dtype (cell math accumulates in float32)."""
    torch.manual_seed(0)
    ref64, _ = make_pair(cell, 32, 64, dtype=torch.float64, device=device, num_layers=2)
    ref_lp, ours_lp = make_pair(cell, 32, 64, dtype=dtype, device=device, num_layers=2)
    ref_lp.load_state_dict(ref64.state_dict())
    ours_lp.load_state_dict(ref64.state_dict())
    x = torch.randn(50, 16, 32, dtype=torch.float64, device=device)
    exact = ref64(x)[0]
    err_nn = (ref_lp(x.to(dtype))[0].double() - exact).abs().max().item()
    err_ours = (ours_lp(x.to(dtype))[0].double() - exact).abs().max().item()
    assert err_ours <= 2 * err_nn, (err_ours, err_nn)
