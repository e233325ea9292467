"""CUDA-only checks (the CPU/CUDA parity matrix, gradcheck and opcheck run on CUDA through the
`device` parameter of test_parity.py and test_ops.py). Skipped, saying why, without a GPU;
benchmarks/gpu_check.sh runs them on one, where a skip counts as a failure. The CUDA kernels'
argument checks need only the compiled library and run everywhere it is built with CUDA."""

import copy

import pytest
import torch

import fusedrnn
from conftest import CELLS, flat_state, make_pair, requires_cuda

@requires_cuda
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


@requires_cuda
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float64])
def test_autocast_contract_of_each_side(autocast_dtype, input_dtype):
    """Under torch.autocast("cuda") the two sides differ, each as documented: torch.nn's
    CUDA RNNs cast float32 work to float16 whatever the autocast dtype (the `_cudnn_rnn`
    autocast rule casts to half); fusedrnn runs float32 work in the autocast dtype, as on every
    device (fusedrnn/functional.py). Both leave float64 alone, as autocast does. Both stay close
    to float64, and the parameters get gradients of their own dtype."""
    ref, ours = make_pair("lstm", 16, 32, dtype=input_dtype, device="cuda")
    x = torch.randn(20, 4, 16, device="cuda", dtype=input_dtype)
    with torch.no_grad():
        expected = copy.deepcopy(ref).double()(x.double())[0]
    with torch.autocast("cuda", dtype=autocast_dtype):
        out_ref, _ = ref(x)
        out, (h, c) = ours(x)
    assert out_ref.dtype == (torch.float16 if input_dtype == torch.float32 else torch.float64)
    assert out.dtype == h.dtype == c.dtype == (autocast_dtype if input_dtype == torch.float32 else torch.float64)
    tol = dict(rtol=0.05, atol=0.02) if autocast_dtype == torch.bfloat16 else dict(rtol=0.01, atol=0.005)
    torch.testing.assert_close(out.double(), expected, **tol)
    torch.testing.assert_close(out_ref.double(), expected, rtol=0.01, atol=0.005)
    (out.float().square().sum() + h.float().sum()).backward()
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.dtype == input_dtype and torch.isfinite(p.grad).all(), name


@requires_cuda
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


@requires_cuda
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


@requires_cuda
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_cuda_graph_capture_and_replay(cell):
    """The ops launch on the current stream (the per-step path reads its schedule on the host when
    launching, the persistent path's is written on the device from kernel parameters), so a
    captured forward + backward replays correctly on new data."""
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


@requires_cuda
def test_ragged_batch_on_cuda_matches_torch_nn_packed():
    from torch.nn.utils.rnn import pack_padded_sequence

    ref, ours = make_pair("gru", 8, 16, dtype=torch.float64, device="cuda", bidirectional=True)
    x = torch.randn(40, 6, 8, dtype=torch.float64, device="cuda")
    packed = pack_padded_sequence(x, torch.tensor([40, 1, 17, 3, 39, 8]), enforce_sorted=False)
    (o1, h1), (o2, h2) = ref(packed), ours(packed)
    torch.testing.assert_close(o2.data, o1.data, rtol=0, atol=1e-10)
    torch.testing.assert_close(h2, h1, rtol=0, atol=1e-10)


def _gru_forward_args(device_of, dtype_of=lambda name: torch.float32):
    """gru_forward's arguments (3 steps of batch 2, input 3, hidden 4), each tensor on the device
    and of the dtype the two functions name for it; batch_sizes stays on the CPU."""
    shapes = {"input": (6, 3), "h0": (2, 4), "w_ih": (12, 3), "w_hh": (12, 4), "b_ih": (12,), "b_hh": (12,)}
    t = {k: torch.randn(shape, dtype=dtype_of(k)).to(device_of(k)) for k, shape in shapes.items()}
    return [t["input"], t["h0"], t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], torch.tensor([2, 2, 2]), False]


@pytest.mark.skipif(not fusedrnn.backends()["cuda"], reason="fusedrnn was built without its CUDA kernels")
def test_cuda_kernel_checks_its_arguments_before_selecting_the_device():
    """The CUDA kernel runs whenever any argument is on CUDA, so it must check before it guards
    the input's device: called here directly (no GPU needed) with CPU tensors, it must fail with
    fusedrnn's message about the argument, not c10's about a CPU device given to a CUDA guard."""
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    args = _gru_forward_args(lambda name: "cpu", lambda name: torch.float64 if name == "w_ih" else torch.float32)
    with pytest.raises(RuntimeError, match=r"fusedrnn\.gru_forward: w_ih must have the dtype of input"):
        torch.ops.fusedrnn.gru_forward.default.redispatch(cuda_only, *args)
    args = _gru_forward_args(lambda name: "cpu")
    args[6] = torch.tensor([2, 2])  # sums to 4 rows, input has 6
    with pytest.raises(RuntimeError, match=r"fusedrnn\.gru_forward: batch_sizes must sum to the number of rows"):
        torch.ops.fusedrnn.gru_forward.default.redispatch(cuda_only, *args)


@requires_cuda
@pytest.mark.parametrize("on_cuda", ["weights", "input", "batch_sizes"])
def test_mixed_devices_name_the_argument(on_cuda):
    def device_of(name):
        if on_cuda == "weights":
            return "cuda" if name.startswith(("w_", "b_")) else "cpu"
        return "cuda" if on_cuda == "input" and name == "input" else "cpu"

    args = _gru_forward_args(device_of)
    if on_cuda == "batch_sizes":
        args[6] = args[6].cuda()
        expected = r"fusedrnn\.gru_forward: batch_sizes must be a CPU tensor"
    elif on_cuda == "weights":
        expected = r"fusedrnn\.gru_forward: w_ih must be on the device of input \(cpu\), got cuda"
    else:
        expected = r"fusedrnn\.gru_forward: h0 must be on the device of input \(cuda:0\), got cpu"
    with pytest.raises(RuntimeError, match=expected):
        torch.ops.fusedrnn.gru_forward(*args)


@requires_cuda
@pytest.mark.parametrize("cudnn_tf32,matmul_tf32", [(True, False), (False, True)])
def test_float32_math_follows_the_cudnn_rnn_flag_like_torch_nn(cudnn_tf32, matmul_tf32):
    """torch.nn's CUDA RNNs (cuDNN) may use TF32 for float32 when torch.backends.cudnn.allow_tf32
    allows it (the default); ATen's own GEMMs follow torch.backends.cuda.matmul.allow_tf32 (off by
    default). fusedrnn follows the cuDNN flag in every GEMM (input projection, recurrent product,
    input and weight gradients), so each output and gradient shows TF32's error (about 1e-4
    relative) exactly when the cuDNN flag is on, whatever the matmul flag says."""
    torch.manual_seed(0)
    ref, ours = make_pair("lstm", 256, 256, dtype=torch.float32, device="cuda")
    ref64 = copy.deepcopy(ref).double()
    x = torch.randn(8, 16, 256, device="cuda")
    weight = torch.randn(8, 16, 256, device="cuda", dtype=torch.float64)

    def run(model, inp):
        inp = inp.clone().requires_grad_(True)
        out, _ = model(inp)
        grads = torch.autograd.grad((out.double() * weight).sum(), [inp] + list(model.parameters()))
        return [out] + list(grads)

    def relative_errors(results, expected):
        return [float((a.double() - e).norm() / e.norm()) for a, e in zip(results, expected)]

    expected = run(ref64, x.double())
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn_tf32, matmul_tf32
        ours_err = relative_errors(run(ours, x), expected)
        nn_err = relative_errors(run(ref, x), expected)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    names = ["output", "grad input"] + [n for n, _ in ours.named_parameters()]
    if cudnn_tf32:
        assert min(ours_err) > 5e-5, f"a GEMM did not use TF32: {dict(zip(names, ours_err))}"
        assert max(ours_err) < 5e-3 and max(nn_err) < 5e-3, (ours_err, nn_err)
    else:
        assert max(ours_err) < 1e-5, f"a GEMM used TF32: {dict(zip(names, ours_err))}"
        assert max(nn_err) < 1e-5, nn_err
