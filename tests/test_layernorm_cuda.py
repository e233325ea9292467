"""The layer-normalised LSTM / GRU ops on CUDA (csrc/layernorm/layernorm_cuda.cpp and the kernels of
csrc/cuda/layernorm_step.h) against the CPU op (csrc/layernorm/layernorm_cpu.cpp) and fusedrnn.reference.

Op level: every output of the forward (the saved tensors too: they are the op's contract with its
backward) and every gradient of the backward, each device's backward fed with its own forward's saved
tensors. float64 to 1e-12 against the CPU op, float32 with TF32 off (rtol 1e-4, atol 1e-5);
float16/bfloat16 no worse than twice the CPU op's error against float64 (DESIGN.md's rule), plus a
small floor for the GEMMs' different summation order. Module level: fusedrnn.LayerNormLSTM / GRU on
CUDA against the same module on the CPU (float64, 2 layers, bidirectional, packed, zoneout in eval).
Skipped, saying why, without a GPU and the CUDA build; benchmarks/gpu_check.sh runs them.
"""

import pytest
import torch

import fusedrnn
from conftest import CUDA
from fusedrnn import reference

pytestmark = pytest.mark.skipif(
    not CUDA, reason="needs an NVIDIA GPU and the CUDA build of fusedrnn (run benchmarks/gpu_check.sh on one)")

EPS = 1e-5
LSTM_ARGS = ("input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "ln_ih_w", "ln_hh_w", "ln_c_w", "ln_c_b",
             "zoneout_h", "zoneout_c")
GRU_ARGS = ("input", "h0", "w_ih", "w_hh", "b_ih", "b_hh", "ln_ih_w", "ln_hh_w", "zoneout_h")
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (hidden, batch_sizes): one partial warp; 256 threads striding over units with a ragged batch.
SHAPES = [(37, [3, 3, 3]), (300, [5, 2, 2, 1])]


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def make(cell, hidden, batch_sizes, zoneout, seed=0):
    g = torch.Generator().manual_seed(seed)
    G, B, N, I = (4 if cell == "lstm" else 3) * hidden, batch_sizes[0], sum(batch_sizes), 7
    rand = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    k = hidden ** -0.5
    a = dict(input=rand(N, I), h0=rand(B, hidden), c0=rand(B, hidden), w_ih=rand(G, I, scale=k),
             w_hh=rand(G, hidden, scale=k), b_ih=rand(G, scale=k), b_hh=rand(G, scale=k),
             ln_ih_w=1 + 0.3 * rand(G), ln_hh_w=1 + 0.3 * rand(G), ln_c_w=1 + 0.3 * rand(hidden),
             ln_c_b=0.2 * rand(hidden), zoneout_h=None, zoneout_c=None)
    if zoneout:
        a["zoneout_h"] = (torch.rand(N, hidden, generator=g) < 0.3).double()
        a["zoneout_c"] = (torch.rand(N, hidden, generator=g) < 0.3).double()
    return a


def args(cell, a, dtype, device):
    names = LSTM_ARGS if cell == "lstm" else GRU_ARGS
    return [None if a[n] is None else a[n].to(dtype).to(device) for n in names]


def forward(cell, a, batch_sizes, reverse, dtype, device):
    op = torch.ops.fusedrnn.ln_lstm_forward if cell == "lstm" else torch.ops.fusedrnn.ln_gru_forward
    return op(*args(cell, a, dtype, device), torch.tensor(batch_sizes), reverse, EPS)


def backward(cell, a, fwd, grads, batch_sizes, reverse, dtype, device):
    x = args(cell, a, dtype, device)
    grads = [g.to(dtype).to(device) for g in grads]
    bs = torch.tensor(batch_sizes)
    if cell == "lstm":
        input, h0, c0, w_ih, w_hh, _, _, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b, zh, zc = x
        return torch.ops.fusedrnn.ln_lstm_backward(*grads, input, h0, c0, w_ih, w_hh, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b,
                                                   zh, zc, bs, reverse, True, fwd[0], *fwd[3:])
    input, h0, w_ih, w_hh, _, b_hh, ln_ih_w, ln_hh_w, zh = x
    return torch.ops.fusedrnn.ln_gru_backward(*grads, input, h0, w_ih, w_hh, b_hh, ln_ih_w, ln_hh_w, zh, bs, reverse,
                                              True, fwd[0], *fwd[2:])


def reference_grads(cell, a, grads, batch_sizes, reverse):
    """Outputs and gradients of the float64 oracle, in the ops' output orders."""
    names = LSTM_ARGS if cell == "lstm" else GRU_ARGS
    leaves = {n: a[n].clone().requires_grad_(True) for n in names if a[n] is not None and not n.startswith("zone")}
    x = [leaves.get(n, a[n]) for n in names]
    fn = reference.ln_lstm_layer if cell == "lstm" else reference.ln_gru_layer
    outs = fn(*x, torch.tensor(batch_sizes), reverse, EPS)
    torch.autograd.backward(outs, grads)
    order = (["input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "ln_ih_w", "ln_hh_w", "ln_c_w", "ln_c_b"]
             if cell == "lstm" else ["input", "h0", "w_ih", "w_hh", "b_ih", "b_hh", "ln_ih_w", "ln_hh_w"])
    return [o.detach() for o in outs], [leaves[n].grad for n in order]


def check(got, want, dtype, what, ref=None, cpu=None):
    """float64/float32: got (CUDA) close to want (CPU op). Half types: CUDA's error against the float64
    reference at most twice the CPU op's, plus a floor."""
    assert not got.isnan().any(), f"{what}: NaN (an element the kernel never wrote?)"
    if dtype in (torch.float64, torch.float32):
        t = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.cpu().double(), want.double(), **t, msg=lambda m: f"{what}: {m}")
        return
    if ref is None:  # a saved tensor: no float64 oracle of its own; against the CPU op loosely
        torch.testing.assert_close(got.cpu().double(), want.double(), rtol=0,
                                   atol=2e-2 if dtype == torch.float16 else 1e-1, msg=lambda m: f"{what}: {m}")
        return
    err_cuda = (got.cpu().double() - ref).abs().max().item()
    err_cpu = (want.double() - ref).abs().max().item()
    floor = 2e-3 if dtype == torch.float16 else 2e-2
    assert err_cuda <= 2 * err_cpu + floor, f"{what}: CUDA error {err_cuda:.3g} vs the CPU op's {err_cpu:.3g}"


@pytest.mark.parametrize("zoneout", [False, True], ids=["plain", "zoneout"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("hidden,batch_sizes", SHAPES, ids=[f"H{h}" for h, _ in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32", "f16", "bf16"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("device", ["cuda"])
def test_ln_op_on_cuda_matches_the_cpu_op(device, cell, dtype, hidden, batch_sizes, reverse, zoneout):
    a = make(cell, hidden, batch_sizes, zoneout)
    g = torch.Generator().manual_seed(1)
    N, B = sum(batch_sizes), batch_sizes[0]
    grads = [torch.randn(N, hidden, generator=g, dtype=torch.float64)]
    grads += [torch.randn(B, hidden, generator=g, dtype=torch.float64) for _ in range(2 if cell == "lstm" else 1)]
    grads = [x.to(dtype).double() for x in grads]
    a = {n: (None if v is None else v.to(dtype).double()) for n, v in a.items()}
    fwd_cuda = forward(cell, a, batch_sizes, reverse, dtype, device)
    fwd_cpu = forward(cell, a, batch_sizes, reverse, dtype, "cpu")
    assert all(t.device.type == device for t in fwd_cuda)
    ref_outs, ref_grads = reference_grads(cell, a, grads, batch_sizes, reverse)
    main = 3 if cell == "lstm" else 2
    for i, (x, y) in enumerate(zip(fwd_cuda, fwd_cpu)):
        check(x, y, dtype, f"forward output {i}", ref_outs[i] if i < main else None)
    bwd_cuda = backward(cell, a, fwd_cuda, grads, batch_sizes, reverse, dtype, device)
    bwd_cpu = backward(cell, a, fwd_cpu, grads, batch_sizes, reverse, dtype, "cpu")
    for i, (x, y) in enumerate(zip(bwd_cuda, bwd_cpu)):
        check(x, y, dtype, f"backward output {i}", ref_grads[i])


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("device", ["cuda"])
def test_ln_module_on_cuda_matches_the_cpu_module(device, mode):
    torch.manual_seed(0)
    cls = fusedrnn.LayerNormLSTM if mode == "LSTM" else fusedrnn.LayerNormGRU
    cpu = cls(6, 40, num_layers=2, bidirectional=True, zoneout=0.2, dtype=torch.float64).eval()
    gpu = cls(6, 40, num_layers=2, bidirectional=True, zoneout=0.2, dtype=torch.float64, device=device).eval()
    gpu.load_state_dict(cpu.state_dict())
    lengths = torch.tensor([5, 3, 3, 1])
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
    out_cpu, _ = cpu(packed)
    out_gpu, _ = gpu(packed.to(device))
    torch.testing.assert_close(out_gpu.data.cpu(), out_cpu.data, rtol=0, atol=1e-10)
    out_cpu.data.square().sum().backward()
    out_gpu.data.square().sum().backward()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=0, atol=1e-10, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("zoneout", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("device", ["cuda"])
def test_ln_inference_op_on_cuda_is_bitwise_the_forward(device, cell, dtype, zoneout):
    a = make(cell, 37, [3, 3, 2], zoneout)
    op = torch.ops.fusedrnn.ln_lstm_inference if cell == "lstm" else torch.ops.fusedrnn.ln_gru_inference
    got = op(*args(cell, a, dtype, device), torch.tensor([3, 3, 2]), False, EPS)
    expected = forward(cell, a, [3, 3, 2], False, dtype, device)
    for g, e in zip(got, expected):
        assert g.device.type == device and torch.equal(g, e)


@pytest.mark.parametrize("device", ["cuda"])
def test_zoneout_masks_on_cuda_have_rate_p(device):
    torch.manual_seed(0)
    mask = fusedrnn.layernorm.zoneout_weights(0.3, 4000, 64, torch.empty(0, device=device), True)
    assert mask.device.type == device and set(mask.unique().tolist()) == {0.0, 1.0}
    assert abs(mask.double().mean().item() - 0.3) < 0.005
