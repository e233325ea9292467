"""The CPU's large float32 GEMM (csrc/cpu/large_gemm.h, blocked around the engine's micro-kernel)
against float64 torch.mm: odd shapes (M, N, K not multiples of the tiles or blocks), transposed and
strided operands, bias and accumulate, small blocks that run every edge of the loops, both
instruction sets where the CPU has them; bitwise the same across blockings, thread counts and
instruction sets; and the layers with it (the default) and with FUSEDRNN_CPU_GEMM=mkl against
torch.nn in float64."""

import ctypes

import pytest
import torch

from conftest import make_pair, tolerances
from engine_helpers import ISAS, cpu_has_avx2_fma, cpu_has_avx512f
from fusedrnn import _ops

pytestmark = pytest.mark.skipif(not cpu_has_avx2_fma(), reason="the large GEMM runs on the engine's CPUs (AVX2+FMA)")

_LIB = ctypes.CDLL(_ops._C.__file__)
_LIB.fusedrnn_large_gemm.restype = ctypes.c_int
_LIB.fusedrnn_large_gemm.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] * 2 + [
    ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
_LIB.fusedrnn_large_gemm_calls.restype = ctypes.c_int64
# The same GEMM on bf16 dot products (large_gemm::run_bf16; tests/test_bf16_dot.py).
_LIB.fusedrnn_large_gemm_bf16.restype = ctypes.c_int
_LIB.fusedrnn_large_gemm_bf16.argtypes = _LIB.fusedrnn_large_gemm.argtypes


def large_gemm(a, b, bias=None, out=None, accumulate=False, mc=0, kc=0, bf16=False):
    """out = a @ b (+ bias) (+ out) through the library's large GEMM, a and b read through their strides;
    bf16: its form on bf16 dot products (both operands rounded to bf16)."""
    m, k = a.shape
    n = b.shape[1]
    if out is None:
        out = torch.full((m, n), float("nan"))  # every element must be written
    assert out.stride(1) == 1
    run = _LIB.fusedrnn_large_gemm_bf16 if bf16 else _LIB.fusedrnn_large_gemm
    rc = run(m, n, k, a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(), b.stride(0), b.stride(1),
             None if bias is None else bias.data_ptr(), int(accumulate), out.data_ptr(), out.stride(0), mc, kc)
    assert rc == 0
    return out


def check_close(got, a, b, bias=None, start=None):
    """|got - exact| within float32's bound for a K-term sum (2 K u (|a| |b| + |start|)), exact in float64."""
    a64, b64 = a.double(), b.double()
    exact = a64 @ b64
    scale = a64.abs() @ b64.abs()
    for s in (bias, start):
        if s is not None:
            exact = exact + s.double()
            scale = scale + s.double().abs()
    k = a.shape[1]
    bound = 2 * max(k, 1) * 2.0 ** -24 * scale + 1e-30
    err = (got.double() - exact).abs()
    assert torch.isfinite(got).all()
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"


def operand(rows, cols, layout, gen):
    """A [rows, cols] float32 operand: row-major, transposed (a column-major view), a row-strided view
    of a wider matrix, or strided in both dimensions."""
    if layout == "row":
        return torch.randn(rows, cols, generator=gen)
    if layout == "t":
        return torch.randn(cols, rows, generator=gen).t()
    if layout == "wide":
        return torch.randn(rows, cols + 5, generator=gen)[:, 2:2 + cols]
    return torch.randn(2 * rows, 3 * cols, generator=gen)[::2, ::3]


SHAPES = [(1, 1, 1), (7, 17, 5), (17, 7, 33), (13, 40, 9), (64, 100, 128), (129, 513, 7), (300, 33, 300),
          (513, 48, 257)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("a_layout,b_layout", [("row", "row"), ("row", "t"), ("t", "row"), ("t", "t"),
                                               ("wide", "grid"), ("grid", "wide")])
def test_against_float64(isa, m, n, k, a_layout, b_layout, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    a, b = operand(m, k, a_layout, gen), operand(k, n, b_layout, gen)
    bias = torch.randn(n, generator=gen)
    check_close(large_gemm(a, b), a, b)
    check_close(large_gemm(a, b, bias), a, b, bias=bias)
    start = torch.randn(m, n, generator=gen)
    check_close(large_gemm(a, b, out=start.clone(), accumulate=True), a, b, start=start)
    # bias is ignored when accumulating (as addmm_ and blas_matmul)
    check_close(large_gemm(a, b, bias, out=start.clone(), accumulate=True), a, b, start=start)
    # small blocks: several row blocks, k blocks (the accumulators stored and reloaded) and tails
    small = large_gemm(a, b, bias, mc=7, kc=5)
    check_close(small, a, b, bias=bias)
    assert torch.equal(small, large_gemm(a, b, bias)), "the result depends on the blocking"


def test_output_row_stride_and_untouched_neighbours():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(37, 19, generator=gen), torch.randn(19, 41, generator=gen)
    big = torch.full((37, 50), 7.0)
    out = big[:, 4:45]
    large_gemm(a, b, out=out, mc=6, kc=8)
    check_close(out, a, b)
    assert (big[:, :4] == 7).all() and (big[:, 45:] == 7).all(), "wrote outside the output's columns"


def test_zero_depth_writes_bias_or_zeros():
    a, b = torch.empty(5, 0), torch.empty(0, 9)
    bias = torch.arange(9.0)
    assert torch.equal(large_gemm(a, b), torch.zeros(5, 9))
    assert torch.equal(large_gemm(a, b, bias), bias.expand(5, 9))
    start = torch.randn(5, 9)
    assert torch.equal(large_gemm(a, b, bias, out=start.clone(), accumulate=True), start)


def test_bitwise_across_threads_and_isas(threads, monkeypatch):
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(700, 300, generator=gen).t(), torch.randn(700, 130, generator=gen)  # dG^T X, like dW
    x, w = torch.randn(333, 100, generator=gen), torch.randn(520, 100, generator=gen)  # x W^T + bias
    bias = torch.randn(520, generator=gen)
    results = []
    for isa in ["avx2"] + (["avx512"] if cpu_has_avx512f() else []):
        monkeypatch.setenv("FUSEDRNN_CPU_ISA", isa)
        for n in (1, 2):
            threads(n)
            results.append((large_gemm(a, b), large_gemm(x, w.t(), bias)))
    for r in results[1:]:
        assert torch.equal(r[0], results[0][0]) and torch.equal(r[1], results[0][1])


def test_bad_switch_is_an_error(monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_GEMM", "openblas")
    # The input projection unfused whatever the L2 size (the rule fuses these 0.5 MB of weights where
    # L2 holds twice them, as on a 2 MB-L2 Zen 5): 200 tokens, one large-GEMM projection.
    monkeypatch.setenv("FUSEDRNN_CPU_FUSE_INPUT", "0")
    ref, ours = make_pair("lstm", 128, 128, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="FUSEDRNN_CPU_GEMM must be own or mkl"):
        ours(torch.randn(40, 5, 128))


# The layers: enough tokens (T x B >= 128) that their input projection and weight-gradient products
# take the large GEMM (large_gemm::worth), ragged, bidirectional, two layers; float32 against torch.nn in
# float64 with the float32 tolerances, with the GEMM on (the default) and FUSEDRNN_CPU_GEMM=mkl.
@pytest.mark.parametrize("gemm", ["own", "mkl"])
@pytest.mark.parametrize("cell", ["lstm", "lstm_proj", "gru", "rnn_tanh"])
def test_layers_against_torch_nn(cell, gemm, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_GEMM", gemm)
    torch.manual_seed(0)
    T, B, I, H = 40, 6, 19, 24
    ref, ours = make_pair(cell, I, H, dtype=torch.float64, num_layers=2, bidirectional=True)
    ours = ours.float()
    lengths = torch.tensor([40, 37, 33, 30, 22, 21])
    x = torch.randn(T, B, I, dtype=torch.float64)
    pack = torch.nn.utils.rnn.pack_padded_sequence

    def run(module, inp):
        inp = inp.detach().requires_grad_()
        out, _ = module(pack(inp, lengths))
        g = torch.Generator().manual_seed(1)
        weights = torch.randn(out.data.shape, generator=g, dtype=torch.float64)  # the same draw for both dtypes
        loss = (out.data * weights.to(out.data.dtype)).sum()
        grads = torch.autograd.grad(loss, [inp] + list(module.parameters()))
        return [out.data] + list(grads)

    before = _LIB.fusedrnn_large_gemm_calls()
    got = run(ours, x.float())
    calls = _LIB.fusedrnn_large_gemm_calls() - before
    want = run(ref, x)
    if gemm == "own":
        assert calls > 0, "no product of the layer took the large GEMM"
    else:
        assert calls == 0, "FUSEDRNN_CPU_GEMM=mkl still ran the large GEMM"
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_.double(), w_, **tolerances(torch.float32))
