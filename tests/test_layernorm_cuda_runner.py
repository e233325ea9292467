"""The layer-normalised cells' CUDA per-step kernels' own bodies (csrc/cuda/layernorm_step.h, the source
the `__global__` ln_row_kernel runs) on the CPU kernel runner, every step of a layer.

The driver below is the CUDA host code's loop (csrc/layernorm/layernorm_cuda.cpp) written with torch CPU
ops: the input projection, per step the GEMM W_hh h into the step's rows and ONE kernel launch (one
block per row) on the runner, which checks barriers, shuffles and shared-memory races. Forward: every
output (the saved tensors too) against the CPU op, and the layer's outputs against fusedrnn.reference.
Backward: per step the kernel and the GEMM dh += d(W_hh h) W_hh, then the weight GEMMs and column sums
as the host does; every gradient against autograd through fusedrnn.reference (F.layer_norm).
float64 to 1e-12; float32 as the plain pointwise runner tests (gradients: atol relative to their
scale); float16/bfloat16 forward against the CPU op (same rounding points, so only the order of the
sums differs).
"""

import ctypes
import itertools
import os

import pytest
import torch
from runner_build import ROOT, build_library

import fusedrnn  # noqa: F401  (loads the compiled ops when built)
from fusedrnn import reference

DTYPES = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
KERNELS = {("lstm", False): 0, ("lstm", True): 1, ("gru", False): 2, ("gru", True): 3}
EPS = 1e-5
# (hidden, threads, batch_sizes): threads 0 = the CUDA launcher's block size.
#   H=37: one warp plus a partial one (64 threads, 27 idle lanes in the reductions)
#   H=70 on 32 threads: one warp striding over 3 units per thread
#   H=300: the launcher's 256 threads (8 warps), units strided, ragged packed batch
SHAPES = [(37, 0, [3, 3, 3]), (70, 32, [4, 3, 1]), (300, 0, [5, 2, 2, 1])]
SHAPE_IDS = [f"H{h}-t{t}-bs{'.'.join(map(str, b))}" for h, t, b in SHAPES]


@pytest.fixture(scope="module")
def lib():
    from torch.utils.cpp_extension import include_paths

    flags = [f"-I{p}" for p in include_paths()]
    sources = [os.path.join(ROOT, "csrc", "exec", "cpu_runner.cpp"), os.path.join(ROOT, "tests", "runner_layernorm.cpp")]
    headers = [os.path.join(ROOT, "csrc", "exec", "cpu_runner.h"), os.path.join(ROOT, "csrc", "exec", "cuda_block.h"),
               os.path.join(ROOT, "csrc", "cuda", "layernorm_step.h")]
    headers += [os.path.join(ROOT, "csrc", "cells", f) for f in sorted(os.listdir(os.path.join(ROOT, "csrc", "cells")))]
    return build_library(sources, headers, flags, name="runner_layernorm")


def opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def ptr(t):
    if t is None:
        return ctypes.c_void_p(0)
    assert t.is_contiguous()
    return ctypes.c_void_p(t.data_ptr())


def launch(lib, cell, backward, dtype, rows, hidden, threads, tensors):
    arr = (ctypes.c_void_p * len(tensors))(*[ptr(t) for t in tensors])
    buf = ctypes.create_string_buffer(8192)
    rc = lib.runner_layernorm(KERNELS[(cell, backward)], DTYPES[dtype], ctypes.c_int64(rows), ctypes.c_int64(hidden),
                              ctypes.c_double(EPS), threads, arr, buf, 8192)
    assert rc == 0, f"runner rc {rc}: {buf.value.decode()}"


def schedule(batch_sizes, reverse):
    sizes = [int(b) for b in batch_sizes]
    offsets = [sum(sizes[:t]) for t in range(len(sizes))]
    order = list(range(len(sizes)))
    return sizes, offsets, (order[::-1] if reverse else order)


def make(cell, hidden, batch_sizes, dtype, zoneout, bias=True, seed=0):
    """Inputs rounded to dtype (as float64 copies for the reference) and the zoneout keep-weights."""
    g = torch.Generator().manual_seed(seed)
    G, B, N, I = (4 if cell == "lstm" else 3) * hidden, batch_sizes[0], sum(batch_sizes), 5
    rand = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    k = hidden ** -0.5
    a = dict(input=rand(N, I), h0=rand(B, hidden), c0=rand(B, hidden), w_ih=rand(G, I, scale=k),
             w_hh=rand(G, hidden, scale=k), b_ih=rand(G, scale=k) if bias else None,
             b_hh=rand(G, scale=k) if bias else None, ln_ih_w=1 + 0.3 * rand(G), ln_hh_w=1 + 0.3 * rand(G),
             ln_c_w=1 + 0.3 * rand(hidden), ln_c_b=0.2 * rand(hidden) if bias else None)
    if zoneout == "mask":  # training: Bernoulli(0.3) keep-masks
        a["zoneout_h"] = (torch.rand(N, hidden, generator=g) < 0.3).double()
        a["zoneout_c"] = (torch.rand(N, hidden, generator=g) < 0.3).double()
    elif zoneout == "eval":  # eval: the constant p
        a["zoneout_h"] = torch.full((N, hidden), 0.25, dtype=torch.float64)
        a["zoneout_c"] = torch.full((N, hidden), 0.1, dtype=torch.float64)
    else:
        a["zoneout_h"] = a["zoneout_c"] = None
    if cell == "gru":
        del a["c0"], a["ln_c_w"], a["ln_c_b"], a["zoneout_c"]
    return {n: (None if v is None else v.to(dtype).double()) for n, v in a.items()}


def cast(a, dtype):
    return {n: (None if v is None else v.to(dtype).contiguous()) for n, v in a.items()}


def acc_vector(t, n, dtype):
    return torch.zeros(n, dtype=opmath(dtype)) if t is None else t.to(opmath(dtype)).contiguous()


# ---- the host loop of layernorm_cuda.cpp, on the runner ------------------------------------------

def lstm_forward(lib, a, batch_sizes, reverse, dtype, threads):
    s = cast(a, dtype)
    N, H = s["input"].shape[0], s["h0"].shape[1]
    G = 4 * H
    norm_x = (s["input"] @ s["w_ih"].T).contiguous()
    norm_h, gates = nan(N, G, dtype=dtype), nan(N, G, dtype=dtype)
    out, cells, norm_c = (nan(N, H, dtype=dtype) for _ in range(3))
    rstd = nan(N, 3, dtype=opmath(dtype))
    h, c = s["h0"].clone(), s["c0"].clone()
    vec = dict(gx=acc_vector(s["ln_ih_w"], G, dtype), gh=acc_vector(s["ln_hh_w"], G, dtype),
               b=acc_vector(s["b_ih"], G, dtype) + acc_vector(s["b_hh"], G, dtype),
               gc=acc_vector(s["ln_c_w"], H, dtype), bc=acc_vector(s["ln_c_b"], H, dtype))
    sizes, offsets, order = schedule(batch_sizes, reverse)
    for t in order:
        bs, off = sizes[t], offsets[t]
        r = slice(off, off + bs)
        norm_h[r] = h[:bs] @ s["w_hh"].T
        zh = None if s["zoneout_h"] is None else s["zoneout_h"][r]
        zc = None if s["zoneout_c"] is None else s["zoneout_c"][r]
        launch(lib, "lstm", False, dtype, bs, H, threads,
               [norm_x[r], norm_h[r], gates[r], h, c, out[r], cells[r], norm_c[r], rstd[r], zh, zc, vec["gx"],
                vec["gh"], vec["b"], vec["gc"], vec["bc"]])
    return out, h, c, norm_x, norm_h, gates, cells, norm_c, rstd


def previous(all_rows, init, batch_sizes, reverse):
    """Each token's previous state (gather_previous_states)."""
    sizes, offsets, order = schedule(batch_sizes, reverse)
    prev = torch.empty_like(all_rows)
    last = None
    for t in order:
        bs, off = sizes[t], offsets[t]
        carried = 0 if last is None else min(bs, sizes[last])
        if carried:
            prev[off:off + carried] = all_rows[offsets[last]:offsets[last] + carried]
        prev[off + carried:off + bs] = init[carried:bs]
        last = t
    return prev


def lstm_backward(lib, a, fwd, grads, batch_sizes, reverse, dtype, threads):
    s = cast(a, dtype)
    out, _, _, norm_x, norm_h, gates, cells, norm_c, rstd = fwd
    N, H = s["input"].shape[0], s["h0"].shape[1]
    G = 4 * H
    go, dh, dc = (g.to(dtype).contiguous().clone() for g in grads)
    cprev = previous(cells, s["c0"], batch_sizes, reverse).contiguous()
    hprev = previous(out, s["h0"], batch_sizes, reverse).contiguous()
    dgate, dy = nan(N, G, dtype=opmath(dtype)), nan(N, H, dtype=opmath(dtype))
    dxp, dhp = nan(N, G, dtype=dtype), nan(N, G, dtype=dtype)
    vec = [acc_vector(s["ln_ih_w"], G, dtype), acc_vector(s["ln_hh_w"], G, dtype), acc_vector(s["ln_c_w"], H, dtype),
           acc_vector(s["ln_c_b"], H, dtype)]
    sizes, offsets, order = schedule(batch_sizes, reverse)
    for t in order[::-1]:
        bs, off = sizes[t], offsets[t]
        r = slice(off, off + bs)
        zh = None if s["zoneout_h"] is None else s["zoneout_h"][r]
        zc = None if s["zoneout_c"] is None else s["zoneout_c"][r]
        launch(lib, "lstm", True, dtype, bs, H, threads,
               [go[r], dh, dc, gates[r], norm_c[r], cprev[r], norm_x[r], norm_h[r], rstd[r], zh, zc, *vec, dgate[r],
                dy[r], dxp[r], dhp[r]])
        dh[:bs] += dhp[r] @ s["w_hh"]
    acc = opmath(dtype)
    return dict(input=dxp @ s["w_ih"], h0=dh, c0=dc, w_ih=dxp.T @ s["input"], w_hh=dhp.T @ hprev,
                b_ih=dgate.sum(0), b_hh=dgate.sum(0), ln_ih_w=(dgate * norm_x.to(acc)).sum(0),
                ln_hh_w=(dgate * norm_h.to(acc)).sum(0), ln_c_w=(dy * norm_c.to(acc)).sum(0), ln_c_b=dy.sum(0))


def gru_forward(lib, a, batch_sizes, reverse, dtype, threads):
    s = cast(a, dtype)
    N, H = s["input"].shape[0], s["h0"].shape[1]
    G = 3 * H
    norm_x = (s["input"] @ s["w_ih"].T).contiguous()
    norm_h, gates = nan(N, G, dtype=dtype), nan(N, G, dtype=dtype)
    out = nan(N, H, dtype=dtype)
    rstd = nan(N, 2, dtype=opmath(dtype))
    h = s["h0"].clone()
    vec = [acc_vector(s[n], G, dtype) for n in ("ln_ih_w", "ln_hh_w", "b_ih", "b_hh")]
    sizes, offsets, order = schedule(batch_sizes, reverse)
    for t in order:
        bs, off = sizes[t], offsets[t]
        r = slice(off, off + bs)
        norm_h[r] = h[:bs] @ s["w_hh"].T
        zh = None if s["zoneout_h"] is None else s["zoneout_h"][r]
        launch(lib, "gru", False, dtype, bs, H, threads, [norm_x[r], norm_h[r], gates[r], h, out[r], rstd[r], zh, *vec])
    return out, h, norm_x, norm_h, gates, rstd


def gru_backward(lib, a, fwd, grads, batch_sizes, reverse, dtype, threads):
    s = cast(a, dtype)
    out, _, norm_x, norm_h, gates, rstd = fwd
    N, H = s["input"].shape[0], s["h0"].shape[1]
    G = 3 * H
    go, dh = (g.to(dtype).contiguous().clone() for g in grads)
    hprev = previous(out, s["h0"], batch_sizes, reverse).contiguous()
    dgx, dgh = nan(N, G, dtype=opmath(dtype)), nan(N, G, dtype=opmath(dtype))
    dxp, dhp = nan(N, G, dtype=dtype), nan(N, G, dtype=dtype)
    vec = [acc_vector(s[n], G, dtype) for n in ("ln_ih_w", "ln_hh_w", "b_hh")]
    sizes, offsets, order = schedule(batch_sizes, reverse)
    for t in order[::-1]:
        bs, off = sizes[t], offsets[t]
        r = slice(off, off + bs)
        zh = None if s["zoneout_h"] is None else s["zoneout_h"][r]
        launch(lib, "gru", True, dtype, bs, H, threads,
               [go[r], dh, gates[r], hprev[r], norm_x[r], norm_h[r], rstd[r], zh, *vec, dgx[r], dgh[r], dxp[r],
                dhp[r]])
        dh[:bs] += dhp[r] @ s["w_hh"]
    acc = opmath(dtype)
    return dict(input=dxp @ s["w_ih"], h0=dh, w_ih=dxp.T @ s["input"], w_hh=dhp.T @ hprev, b_ih=dgx.sum(0),
                b_hh=dgh.sum(0), ln_ih_w=(dgx * norm_x.to(acc)).sum(0), ln_hh_w=(dgh * norm_h.to(acc)).sum(0))


# ---- oracles -----------------------------------------------------------------------------------

LSTM_ARGS = ("input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "ln_ih_w", "ln_hh_w", "ln_c_w", "ln_c_b",
             "zoneout_h", "zoneout_c")
GRU_ARGS = ("input", "h0", "w_ih", "w_hh", "b_ih", "b_hh", "ln_ih_w", "ln_hh_w", "zoneout_h")


def args_of(cell, a):
    return [a[n] for n in (LSTM_ARGS if cell == "lstm" else GRU_ARGS)]


def reference_layer(cell, a, batch_sizes, reverse):
    fn = reference.ln_lstm_layer if cell == "lstm" else reference.ln_gru_layer
    return fn(*args_of(cell, a), torch.tensor(batch_sizes), reverse, EPS)


def cpu_op(cell):
    name = f"ln_{cell}_forward"
    if not hasattr(torch.ops.fusedrnn, name):
        pytest.skip("the compiled fusedrnn ops are not loaded: build with `python setup.py build_ext --inplace` to "
                    "compare with the CPU op")
    return getattr(torch.ops.fusedrnn, name)


def tol(dtype):
    return {torch.float64: dict(rtol=0, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5),
            torch.float16: dict(rtol=0, atol=5e-3), torch.bfloat16: dict(rtol=0, atol=3e-2)}[dtype]


def test_block_size_is_whole_warps_capped_at_256(lib):
    assert [lib.runner_layernorm_threads(ctypes.c_int64(h)) for h in (1, 32, 33, 70, 256, 257, 4096)] == \
        [32, 32, 64, 96, 256, 256, 256]


def cases(dtypes, zoneouts, biases, keep):
    """The cartesian product of the parameters, the cases `keep` accepts, with readable ids."""
    out = []
    for cell, dtype, (h, t, bs), reverse, zoneout, bias in itertools.product(
            ["lstm", "gru"], dtypes, SHAPES, [False, True], zoneouts, biases):
        if keep(dtype, h, zoneout, bias):
            dname = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
            name = f"{cell}-{dname}-H{h}-t{t}-bs{'.'.join(map(str, bs))}-{'rev' if reverse else 'fwd'}-{zoneout}"
            out.append(pytest.param(cell, dtype, h, t, bs, reverse, zoneout, bias,
                                    id=name + ("" if bias else "-nobias")))
    return out


# Half types run the mask and no-zoneout cases (eval's constant p is float64/float32's).
FORWARD_CASES = cases(list(DTYPES), ["none", "mask", "eval"], [True],
                      lambda dtype, h, zoneout, bias: dtype in (torch.float64, torch.float32) or zoneout != "eval")
# bias=False on the two smaller shapes without zoneout.
BACKWARD_CASES = cases([torch.float64, torch.float32], ["none", "mask", "eval"], [True, False],
                       lambda dtype, h, zoneout, bias: bias or (zoneout == "none" and h != 300))
CASE_ARGS = "cell,dtype,hidden,threads,batch_sizes,reverse,zoneout,bias"


@pytest.mark.parametrize(CASE_ARGS, FORWARD_CASES)
def test_forward_kernel_matches_cpu_op_and_reference(lib, cell, dtype, hidden, threads, batch_sizes, reverse,
                                                     zoneout, bias):
    a = make(cell, hidden, batch_sizes, dtype, zoneout)
    run = lstm_forward if cell == "lstm" else gru_forward
    got = run(lib, a, batch_sizes, reverse, dtype, threads)
    t = tol(dtype)
    want = cpu_op(cell)(*[None if v is None else v.to(dtype) for v in args_of(cell, a)],
                        torch.tensor(batch_sizes), reverse, EPS)
    for i, (g, w) in enumerate(zip(got, want)):
        assert not g.isnan().any(), f"output {i} has elements the kernel never wrote"
        torch.testing.assert_close(g.double(), w.double(), **t, msg=lambda m: f"output {i} vs the CPU op: {m}")
    if dtype in (torch.float64, torch.float32):
        for i, w in enumerate(reference_layer(cell, a, batch_sizes, reverse)):
            torch.testing.assert_close(got[i].double(), w, **t, msg=lambda m: f"output {i} vs reference: {m}")


@pytest.mark.parametrize(CASE_ARGS, BACKWARD_CASES)
def test_backward_kernel_matches_reference_autograd(lib, cell, dtype, hidden, threads, batch_sizes, reverse, zoneout,
                                                    bias):
    a = make(cell, hidden, batch_sizes, dtype, zoneout, bias=bias)
    g = torch.Generator().manual_seed(1)
    N, B = sum(batch_sizes), batch_sizes[0]
    grads = [torch.randn(N, hidden, generator=g, dtype=torch.float64).to(dtype).double()]
    grads += [torch.randn(B, hidden, generator=g, dtype=torch.float64).to(dtype).double()
              for _ in range(2 if cell == "lstm" else 1)]
    fwd = (lstm_forward if cell == "lstm" else gru_forward)(lib, a, batch_sizes, reverse, dtype, threads)
    got = (lstm_backward if cell == "lstm" else gru_backward)(lib, a, fwd, grads, batch_sizes, reverse, dtype, threads)

    leaves = {n: v.clone().requires_grad_(True) for n, v in a.items() if v is not None and not n.startswith("zone")}
    outs = reference_layer(cell, {**a, **leaves}, batch_sizes, reverse)
    torch.autograd.backward(outs, grads)
    for name, leaf in leaves.items():
        assert not got[name].isnan().any(), f"grad {name} has elements the kernel never wrote"
        t = tol(dtype)
        if dtype == torch.float32:
            # The weight gradients sum over tokens and the LN backward over the row (G up to 1200): float32
            # rounds in proportion to the gradient's scale (measured: up to ~1e-6 of its largest element).
            t["atol"] *= max(1.0, leaf.grad.abs().max().item())
        torch.testing.assert_close(got[name].double(), leaf.grad, **t, msg=lambda m: f"grad {name}: {m}")
