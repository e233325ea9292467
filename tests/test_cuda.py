"""CUDA-only checks (the CPU/CUDA parity matrix, gradcheck and opcheck run on CUDA through the
`device` parameter of test_parity.py and test_ops.py). Skipped, saying why, without a GPU;
benchmarks/gpu_check.sh runs them on one."""

import pytest
import torch

import fusedrnn
from conftest import CELLS, flat_state, make_pair, requires_cuda

pytestmark = requires_cuda


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("packed", [False, True])
def test_cuda_equals_cpu_in_float64(cell, packed):
    from torch.nn.utils.rnn import pack_padded_sequence

    _, cpu_model = make_pair(cell, 6, 8, num_layers=2, bidirectional=True)
    cuda_model = CELLS[cell][1](6, 8, num_layers=2, bidirectional=True, dtype=torch.float64, device="cuda",
                                **CELLS[cell][2])
    cuda_model.load_state_dict(cpu_model.state_dict())
    x = torch.randn(7, 5, 6, dtype=torch.float64)

    def run(model, device):
        xd = x.to(device).requires_grad_(True)
        inp = pack_padded_sequence(xd, torch.tensor([7, 3, 5, 1, 6]), enforce_sorted=False) if packed else xd
        out, state = model(inp)
        data = out.data if packed else out
        loss = data.square().sum() + sum(s.sum() for s in flat_state(state))
        grads = torch.autograd.grad(loss, [xd] + list(model.parameters()))
        return [t.cpu() for t in [data] + flat_state(state) + list(grads)]

    for a, e in zip(run(cuda_model, "cuda"), run(cpu_model, "cpu")):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10)


def test_autocast_runs_in_the_autocast_dtype_like_torch_nn():
    ref, ours = make_pair("lstm", 16, 32, dtype=torch.float32, device="cuda")
    x = torch.randn(20, 4, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_ref, _ = ref(x)
        out, (h, c) = ours(x)
    assert out.dtype == out_ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=0.05, atol=0.02)


def test_non_default_stream():
    ref, ours = make_pair("gru", 16, 32, dtype=torch.float32, device="cuda", num_layers=2)
    x = torch.randn(30, 8, 16, device="cuda")
    expected = ref(x)[0]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = ours(x)[0]
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_torch_compile_on_cuda_matches_eager(mode):
    torch._dynamo.reset()
    rnn = fusedrnn.LSTM(8, 16, num_layers=2, batch_first=True, device="cuda")
    x = torch.randn(4, 10, 8, device="cuda")

    def f(inp):
        out, (h, _) = rnn(inp)
        return out.sum() + h.sum()

    eager = f(x)
    compiled = torch.compile(f, fullgraph=True, mode=mode)
    for _ in range(3):  # reduce-overhead records a CUDA graph after warm-up runs, then replays it
        out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_cuda_graph_capture_and_replay(cell):
    """The ops launch on the current stream and read their schedule on the host, so a captured
    forward + backward replays correctly on new data."""
    _, ours = make_pair(cell, 8, 16, dtype=torch.float32, device="cuda", num_layers=2, bidirectional=True)
    static_x = torch.randn(12, 4, 8, device="cuda", requires_grad=True)

    def step():
        out, _ = ours(static_x)
        (grad_x,) = torch.autograd.grad(out.square().sum(), static_x)
        return out, grad_x

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_grad = step()
    new_x = torch.randn(12, 4, 8, device="cuda")
    static_x.data.copy_(new_x)
    graph.replay()
    x = new_x.clone().requires_grad_(True)
    out, _ = ours(x)
    (grad_x,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(static_out, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(static_grad, grad_x, rtol=1e-5, atol=1e-6)


def test_ragged_batch_on_cuda_matches_torch_nn_packed():
    from torch.nn.utils.rnn import pack_padded_sequence

    ref, ours = make_pair("gru", 8, 16, dtype=torch.float64, device="cuda", bidirectional=True)
    x = torch.randn(40, 6, 8, dtype=torch.float64, device="cuda")
    packed = pack_padded_sequence(x, torch.tensor([40, 1, 17, 3, 39, 8]), enforce_sorted=False)
    (o1, h1), (o2, h2) = ref(packed), ours(packed)
    torch.testing.assert_close(o2.data, o1.data, rtol=0, atol=1e-10)
    torch.testing.assert_close(h2, h1, rtol=0, atol=1e-10)
