"""The per-step CUDA pointwise kernels' own body (csrc/cuda/pointwise_step.h, the source the
`__global__` step_kernel runs) on the CPU kernel runner, against fusedrnn.reference.

One step of a layer is the pointwise kernel on x W_ih^T + b_ih and h W_hh^T + b_hh, so the forward
step's outputs must equal the reference layer's at T = 1. The backward step's gate gradients are
read off the reference layer's autograd with x = the identity (then row b of x W_ih^T is column b of
W_ih, and its gradient is the gate gradient of row b). Grids: the launcher's (pointwise_blocks),
several blocks with a partial last one, and a single block that must stride over every element.
"""

import ctypes
import os

import pytest
import torch
from runner_build import ROOT, build_library

from fusedrnn import reference

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
DTYPES = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
# (batch, hidden, grid): one block; 3 blocks with a partial last one; 1 block striding over 630
# elements; H = 1; grid 0 = the CUDA launcher's choice.
SHAPES = [(5, 37, 0), (9, 70, 0), (9, 70, 1), (3, 1, 0)]


@pytest.fixture(scope="module")
def lib():
    from torch.utils.cpp_extension import include_paths

    flags = [f"-I{p}" for p in include_paths()]
    sources = [os.path.join(ROOT, "csrc", "exec", "cpu_runner.cpp"), os.path.join(ROOT, "tests", "runner_pointwise.cpp")]
    headers = [os.path.join(ROOT, "csrc", "exec", "cpu_runner.h"), os.path.join(ROOT, "csrc", "cuda", "pointwise_step.h")]
    headers += [os.path.join(ROOT, "csrc", "cells", f) for f in sorted(os.listdir(os.path.join(ROOT, "csrc", "cells")))]
    lib = build_library(sources, headers, flags, name="runner_pointwise")
    lib.runner_pointwise_blocks.restype = ctypes.c_int64
    return lib


def ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def run(lib, cell, dtype, backward, batch, hidden, grid, tensors):
    for t in tensors:
        assert t is None or t.is_contiguous()
    arr = (ctypes.c_void_p * len(tensors))(*[ptr(t) for t in tensors])
    buf = ctypes.create_string_buffer(8192)
    rc = lib.runner_pointwise(cell.encode(), DTYPES[dtype], int(backward), ctypes.c_int64(batch),
                              ctypes.c_int64(hidden), ctypes.c_int64(grid), arr, buf, 8192)
    assert rc == 0, f"runner rc {rc}: {buf.value.decode()}"


def nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def tol(dtype):
    return {torch.float64: dict(rtol=0, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5),
            torch.float16: dict(rtol=0, atol=5e-3), torch.bfloat16: dict(rtol=0, atol=3e-2)}[dtype]


def make(cell, batch, hidden, dtype, input_size, identity_input=False, seed=0):
    """Inputs rounded to dtype, and the same values in float64 for the reference."""
    g = torch.Generator().manual_seed(seed)
    gh, k = GATES[cell] * hidden, hidden ** -0.5
    rand = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    a = dict(x=torch.eye(batch, dtype=torch.float64) if identity_input else rand(batch, input_size),
             h0=rand(batch, hidden), c0=rand(batch, hidden), w_ih=rand(gh, batch if identity_input else input_size),
             w_hh=rand(gh, hidden, scale=k), b_ih=rand(gh, scale=k), b_hh=rand(gh, scale=k))
    return {n: v.to(dtype).double() for n, v in a.items()}


def reference_layer(cell, a):
    bs = torch.tensor([a["x"].shape[0]])
    if cell == "lstm":
        return reference.lstm_layer(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], None, bs,
                                    False)
    if cell == "gru":
        return (*reference.gru_layer(a["x"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], bs, False), None)
    return (*reference.rnn_layer(cell.split("_")[1], a["x"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], bs,
                                 False), None)


def forward_step(lib, cell, a, dtype, grid, bias_in_step=False):
    """The forward kernel on one step: returns its buffers (gates, h_state, c_state, out, cells, hn).
    bias_in_step: hproj without b_hh, which the kernel adds itself (hproj_bias, the CUDA driver's way)."""
    batch, hidden = a["h0"].shape
    gates = (a["x"] @ a["w_ih"].T + a["b_ih"]).to(dtype).contiguous()
    hproj = (a["h0"] @ a["w_hh"].T + (0 if bias_in_step else a["b_hh"])).to(dtype).contiguous()
    hproj_bias = a["b_hh"].to(dtype).contiguous() if bias_in_step else None
    h_state = a["h0"].to(dtype).clone()
    c_state = a["c0"].to(dtype).clone() if cell == "lstm" else None
    out = nan(batch, hidden, dtype=dtype)
    cells = nan(batch, hidden, dtype=dtype) if cell == "lstm" else None
    hn = nan(batch, hidden, dtype=dtype) if cell == "gru" else None
    run(lib, cell, dtype, False, batch, hidden, grid, [gates, hproj, h_state, c_state, out, cells, hn, hproj_bias])
    return dict(gates=gates, hproj=hproj, h_state=h_state, c_state=c_state, out=out, cells=cells, hn=hn)


def test_launch_grid_is_the_cuda_launchers(lib):
    assert lib.runner_pointwise_threads() == 256
    assert [lib.runner_pointwise_blocks(n) for n in (1, 256, 257, 10 ** 9)] == [1, 1, 2, 4096]


@pytest.mark.parametrize("bias_in_step", [False, True], ids=["bias-in-gemm", "bias-in-step"])
@pytest.mark.parametrize("batch,hidden,grid", SHAPES, ids=[f"B{b}-H{h}-grid{g}" for b, h, g in SHAPES])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=["f64", "f32", "f16", "bf16"])
@pytest.mark.parametrize("cell", list(GATES))
def test_forward_step_kernel_matches_reference(lib, cell, dtype, batch, hidden, grid, bias_in_step):
    a = make(cell, batch, hidden, dtype, input_size=4)
    k = forward_step(lib, cell, a, dtype, grid, bias_in_step)
    ref_out, ref_h, ref_c = reference_layer(cell, a)
    t = tol(dtype)
    torch.testing.assert_close(k["out"].double(), ref_out, **t)
    torch.testing.assert_close(k["h_state"].double(), ref_h, **t)
    if cell == "lstm":
        torch.testing.assert_close(k["c_state"].double(), ref_c, **t)
        torch.testing.assert_close(k["cells"].double(), ref_c, **t)
    if cell == "gru":  # saved for backward: W_hn h + b_hn, b_hn added in the accumulation type
        want_hn = (k["hproj"][:, 2 * hidden:].to(torch.float64 if dtype == torch.float64 else torch.float32)
                   + (a["b_hh"][2 * hidden:].to(dtype) if bias_in_step else 0)).to(dtype)
        torch.testing.assert_close(k["hn"], want_hn, rtol=0, atol=0)
    if cell == "rnn_tanh" or cell == "rnn_relu":  # the RNN step leaves its input projection as it was
        torch.testing.assert_close(k["gates"].double(), (a["x"] @ a["w_ih"].T + a["b_ih"]).to(dtype).double(),
                                   rtol=0, atol=0)
    if cell in ("lstm", "gru"):  # activated gates saved for backward
        pre = (a["x"] @ a["w_ih"].T + a["b_ih"]) + (a["h0"] @ a["w_hh"].T + a["b_hh"])
        H = hidden
        if cell == "lstm":
            want = torch.cat([pre[:, :2 * H].sigmoid(), pre[:, 2 * H:3 * H].tanh(), pre[:, 3 * H:].sigmoid()], 1)
        else:
            r, z = pre[:, :H].sigmoid(), pre[:, H:2 * H].sigmoid()
            n = ((a["x"] @ a["w_ih"].T + a["b_ih"])[:, 2 * H:] + r * (a["h0"] @ a["w_hh"].T + a["b_hh"])[:, 2 * H:]).tanh()
            want = torch.cat([r, z, n], 1)
        torch.testing.assert_close(k["gates"].double(), want, **t)


@pytest.mark.parametrize("batch,hidden,grid", SHAPES, ids=[f"B{b}-H{h}-grid{g}" for b, h, g in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell", list(GATES))
def test_backward_step_kernel_matches_reference_autograd(lib, cell, dtype, batch, hidden, grid):
    a = make(cell, batch, hidden, dtype, input_size=None, identity_input=True)
    g = torch.Generator().manual_seed(1)
    go, gh, gc = (torch.randn(batch, hidden, generator=g, dtype=torch.float64).to(dtype).double() for _ in range(3))
    leaves = {n: a[n].clone().requires_grad_(True) for n in ("w_ih", "h0", "c0", "b_hh")}
    out, h_n, c_n = reference_layer(cell, dict(a, **leaves))
    loss = (out * go).sum() + (h_n * gh).sum() + ((c_n * gc).sum() if cell == "lstm" else 0)
    loss.backward()
    dgates_ref = leaves["w_ih"].grad.T  # [batch, G*H]: the pre-activation gradient of each row

    fwd = forward_step(lib, cell, a, dtype, 0)
    G, H = GATES[cell], hidden
    grad_out = go.to(dtype).contiguous()
    grad_h_state = gh.to(dtype).clone()
    grad_c_state = gc.to(dtype).clone() if cell == "lstm" else None
    grad_gates = nan(batch, G * H, dtype=dtype)
    grad_gates_h = nan(batch, G * H, dtype=dtype) if cell == "gru" else None
    h_prev = a["h0"].to(dtype).contiguous()
    c_prev = a["c0"].to(dtype).contiguous() if cell == "lstm" else None
    run(lib, cell, dtype, True, batch, hidden, grid,
        [fwd["gates"], grad_out, grad_h_state, grad_c_state, fwd["cells"], c_prev, h_prev, fwd["hn"], fwd["out"],
         grad_gates, grad_gates_h, None])
    t = tol(dtype)
    torch.testing.assert_close(grad_gates.double(), dgates_ref, **t)
    if cell == "lstm":
        torch.testing.assert_close(grad_c_state.double(), leaves["c0"].grad, **t)
    if cell == "gru":
        # The hidden-side gradient: r and z as the input side, and it (with the direct path
        # z * dh left in grad_h_state) must give the reference's h0 and b_hh gradients.
        torch.testing.assert_close(grad_gates_h[:, :2 * H], grad_gates[:, :2 * H], rtol=0, atol=0)
        dh0 = grad_h_state.double() + grad_gates_h.double() @ a["w_hh"]
        torch.testing.assert_close(dh0, leaves["h0"].grad, **t)
        torch.testing.assert_close(grad_gates_h.double().sum(0), leaves["b_hh"].grad, **t)
