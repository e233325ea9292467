"""bfloat16 layers on bf16 dot products (csrc/cpu/engine_avx512_bf16.cpp, engine_forward.h: forward_tile
on Bf16 operands), and the packed-weight cache of the widened half-type layers (cpu_engine.h: PackCache).

On a CPU with AVX512_BF16 the engine's no-grad forward of a bfloat16 LSTM or GRU multiplies on vdpbf16ps
(training forwards keep float32 products, and the RNN's forward op serves both); the weights
and the input are bf16 values already, h_{t-1} is rounded to bf16 for the product each step, the sums,
the running state and the cell stay float32. The function it computes is therefore known exactly: the
float64 recurrence with h_{t-1} rounded to bf16 where it enters a product (`_reference` below). These
tests check that function against float64, that the path runs where it should (and not where it should
not), that the cache changes no number, and the backward's bf16 GEMMs. The accuracy against torch.nn's
own bf16 (at most 2x its error, every output and gradient) is tests/test_bf16_cpu.py's."""

import ctypes

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
from fusedrnn import _ops


def _lib():
    lib = ctypes.CDLL(_ops._C.__file__)
    lib.fusedrnn_cpu_bf16_forward_calls.restype = ctypes.c_int64
    lib.fusedrnn_cpu_bf16_dot_products.restype = ctypes.c_int
    return lib


def bf16_dot_calls():
    return _lib().fusedrnn_cpu_bf16_forward_calls()


def cpu_has_bf16_dot():
    return _lib().fusedrnn_cpu_bf16_dot_products() == 1


requires_bf16_dot = pytest.mark.skipif(
    not cpu_has_bf16_dot(),
    reason="this CPU has no AVX512_BF16 (vdpbf16ps), or the engine is off: the bf16 dot-product forward "
           "cannot run here (bfloat16 layers run on float32 products, which tests/test_bf16_cpu.py checks)")

MODULES = {"lstm": fusedrnn.LSTM, "gru": fusedrnn.GRU, "rnn_tanh": fusedrnn.RNN, "rnn_relu": fusedrnn.RNN}


def _module(cell, I, H, **kw):
    if cell.startswith("rnn"):
        kw["nonlinearity"] = cell[4:]
    torch.manual_seed(0)
    m = MODULES[cell](I, H, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(2.0)  # larger pre-activations: the rounding of h matters more, the test sees it better
    return m.bfloat16()


def _bf(t):
    return t.bfloat16().double()


def _reference(cell, m, x, lengths, reverse=False):
    """float64 recurrence of one direction of bf16 module m on x ([T, B, I] bf16, batch sorted by
    decreasing length) with h_{t-1} rounded to bf16 wherever it is multiplied by W_hh: the function the
    bf16 dot-product forward computes. Returns the outputs [T, B, H] (zeros past each length)."""
    sfx = "_reverse" if reverse else ""
    w_ih, w_hh = (getattr(m, f"weight_{n}_l0{sfx}").double() for n in ("ih", "hh"))
    b_ih, b_hh = (getattr(m, f"bias_{n}_l0{sfx}").double() for n in ("ih", "hh"))
    T, B, _ = x.shape
    H = w_hh.shape[1]
    h = torch.zeros(B, H, dtype=torch.float64)
    c = torch.zeros(B, H, dtype=torch.float64)
    out = torch.zeros(T, B, H, dtype=torch.float64)
    steps = range(T - 1, -1, -1) if reverse else range(T)
    for t in steps:
        live = torch.tensor([t < n for n in lengths])
        gi = x[t].double() @ w_ih.T + b_ih
        gh = _bf(h) @ w_hh.T + b_hh
        if cell == "lstm":
            i, f, g, o = (gi + gh).chunk(4, 1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            c = torch.where(live[:, None], c_new, c)
        elif cell == "gru":
            ir, iz, in_ = gi.chunk(3, 1)
            hr, hz, hn = gh.chunk(3, 1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            h_new = (1 - z) * torch.tanh(in_ + r * hn) + z * h
        else:
            h_new = torch.tanh(gi + gh)
        h = torch.where(live[:, None], h_new, h)
        out[t] = torch.where(live[:, None], h_new, torch.zeros_like(h_new))
    return out


def _ours(m, x, lengths, monkeypatch, dot):
    monkeypatch.setenv("FUSEDRNN_CPU_BF16_DOT", dot)
    inp = pack_padded_sequence(x, torch.tensor(lengths)) if len(set(lengths)) > 1 else x
    before = bf16_dot_calls()
    with torch.no_grad():
        y, _ = m(inp)
    if not isinstance(y, torch.Tensor):
        y, _ = torch.nn.utils.rnn.pad_packed_sequence(y, total_length=x.shape[0])
    return y.double(), bf16_dot_calls() - before


@requires_bf16_dot
@pytest.mark.parametrize("fuse_input", ["1", "0"])
@pytest.mark.parametrize("shape", [(37, 45, [6, 6, 5, 3, 3, 1, 1]), (16, 32, [7] * 12)])
@pytest.mark.parametrize("cell", ["lstm", "gru"])  # the RNN never asks for bf16 products
def test_bf16_dot_forward_is_the_recurrence_with_h_rounded_for_the_product(cell, shape, fuse_input, threads,
                                                                         monkeypatch):
    """Both directions, a ragged batch with odd sizes (the k pairs' zero padding of I and H) and a uniform
    one of 12 rows (6 per thread: the batch split, not the unit split), the input projection fused into
    the tiles and apart: the bf16 dot-product forward is within float32 rounding of the float64 recurrence
    with h_{t-1} rounded to bf16 for the product, and much nearer to it than the float32-product path
    (FUSEDRNN_CPU_BF16_DOT=0, which does not round h) is, so the test sees which function ran."""
    threads(2)
    monkeypatch.setenv("FUSEDRNN_CPU_FUSE_INPUT", fuse_input)
    I, H, lengths = shape
    m = _module(cell, I, H, bidirectional=True)
    torch.manual_seed(1)
    x = torch.randn(max(lengths), len(lengths), I).bfloat16()
    ref = torch.cat([_reference(cell, m, x, lengths), _reference(cell, m, x, lengths, reverse=True)], dim=2)
    dot, calls = _ours(m, x, lengths, monkeypatch, "1")
    f32, f32_calls = _ours(m, x, lengths, monkeypatch, "0")
    assert calls == 2 and f32_calls == 0  # one call per direction on bf16 products; none when switched off
    # The outputs are bf16, so compare with the reference rounded to bf16: the float32 sums' last bits may
    # tip an element's rounding (one bf16 unit), or a later step's bf16(h) by one unit; nothing more.
    want = _bf(ref)
    err_dot, err_f32 = (dot - want).abs(), (f32 - want).abs()
    assert err_dot.max().item() <= 2 ** -7 * want.abs().max().item()
    assert (err_dot > 0).double().mean().item() <= 0.5 * (err_f32 > 0).double().mean().item()


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_which_calls_take_bf16_dot_products(cell, threads, monkeypatch):
    """On bf16 dot products: a bfloat16 LSTM's or GRU's no-grad forward, where the CPU has them. Not: a
    training forward, the RNN (its forward op serves training too), float16, float32, small calls (at most
    8 rows and 32 tokens: the small path), uniform batches of at most 4 rows per thread (the unit split's,
    on float32 products), FUSEDRNN_CPU_BF16_DOT=0. On a CPU without AVX512_BF16 never."""
    threads(2)
    monkeypatch.delenv("FUSEDRNN_CPU_BF16_DOT", raising=False)
    monkeypatch.delenv("FUSEDRNN_CPU_UNIT_SPLIT", raising=False)
    m = _module(cell, 8, 64)  # two or more unit blocks for every cell, so that the unit split may run

    def calls(dtype=torch.bfloat16, T=12, B=10, train=False):
        mm = m.to(dtype)
        x = torch.randn(T, B, 8, dtype=dtype, requires_grad=train)
        before = bf16_dot_calls()
        if train:
            mm(x)[0].float().sum().backward()
        else:
            with torch.no_grad():
                mm(x)
        return bf16_dot_calls() - before

    # The RNN's forward op is also its no-grad op (it saves only its output), so it never asks for them.
    expected = 1 if cpu_has_bf16_dot() and cell in ("lstm", "gru") else 0
    assert calls() == expected
    assert calls(train=True) == 0  # training forwards keep float32 products
    assert calls(torch.float16) == 0
    assert calls(torch.float32) == 0
    assert calls(B=8) == 0        # 4 rows per thread: the unit split's rule
    threads(1)                    # (no unit split on one thread)
    assert calls(B=8) == expected
    assert calls(T=3, B=8) == 0   # the small path
    threads(2)
    monkeypatch.setenv("FUSEDRNN_CPU_BF16_DOT", "0")
    assert calls() == 0


@requires_bf16_dot
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_bf16_products_are_chosen_for_the_whole_call(cell, threads, monkeypatch):
    """bf16 products only for a call no gradient is taken of, and then for all of it: a ragged no-grad
    call runs whole on them (the RNN's forward, its own no-grad op that saves its output, never does); a
    training call, in chunks of 24 rows whose last ones are small calls by their own size, runs every chunk
    on float32 products (its gradients must be those of a float32-accurate forward: benchmarks/NOTES.md
    entry 57), bitwise the FUSEDRNN_CPU_BF16_DOT=0 call's output."""
    threads(2)
    monkeypatch.setenv("FUSEDRNN_CPU_HALF_CHUNK_ROWS", "24")
    m = _module(cell, 8, 64)
    lengths = torch.tensor([40] * 4 + [9] * 4 + [3] * 4)
    x = torch.randn(40, 12, 8).bfloat16()
    before = bf16_dot_calls()
    with torch.no_grad():
        m(pack_padded_sequence(x, lengths))
    assert bf16_dot_calls() - before == (0 if cell == "rnn_tanh" else 1)

    def train(dot):
        monkeypatch.setenv("FUSEDRNN_CPU_BF16_DOT", dot)
        return m(pack_padded_sequence(x.clone().requires_grad_(), lengths))[0].data

    before = bf16_dot_calls()
    y_train = train("1")
    assert bf16_dot_calls() == before
    assert torch.equal(y_train, train("0"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_pack_cache_changes_no_number(cell, dtype, threads, monkeypatch):
    """A half-type training call in chunks of steps (here 3 rows: many chunks, ragged) packs its weights
    once and its chunks reuse them; FUSEDRNN_CPU_PACK_CACHE=0 packs them per chunk as before. Output,
    states and every gradient bitwise equal both ways; and after an optimizer step (weights changed in
    place) the next call sees the new weights (a fresh module with them gives the same numbers)."""
    threads(2)
    monkeypatch.setenv("FUSEDRNN_CPU_HALF_CHUNK_ROWS", "40")
    m = _module(cell, 6, 20, bidirectional=True).to(dtype)
    torch.manual_seed(2)
    # 12 rows (not the small path, not the unit split's), ragged, in chunks of up to 40 rows: the packed
    # forward's panels (and the backward's) are the cached ones from the second chunk on.
    x = torch.randn(20, 12, 6, dtype=dtype)
    lengths = torch.tensor([20] * 3 + [17] * 3 + [9] * 3 + [2] * 3)

    def step(mod):
        mod.zero_grad()
        xx = x.clone().requires_grad_()
        y, h = mod(pack_padded_sequence(xx, lengths), None)
        flat = [y.data] + (list(h) if isinstance(h, tuple) else [h])
        sum((t.float() * (1 + i)).sum() for i, t in enumerate(flat)).backward()
        return [t.detach().clone() for t in flat] + [xx.grad] + [p.grad.clone() for p in mod.parameters()]

    monkeypatch.setenv("FUSEDRNN_CPU_PACK_CACHE", "0")
    uncached = step(m)
    monkeypatch.setenv("FUSEDRNN_CPU_PACK_CACHE", "1")
    cached = step(m)
    assert all(torch.equal(a, b) for a, b in zip(cached, uncached))
    torch.optim.SGD(m.parameters(), lr=0.5).step()
    after = step(m)
    fresh = MODULES[cell](6, 20, bidirectional=True, **({"nonlinearity": "tanh"} if cell == "rnn_tanh" else {}))
    fresh = fresh.to(dtype)
    fresh.load_state_dict(m.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(after, step(fresh)))
    assert not torch.equal(after[0], cached[0])


@pytest.mark.parametrize("variable, value, message", [
    ("FUSEDRNN_CPU_BF16_DOT", "yes", "FUSEDRNN_CPU_BF16_DOT must be 0"),
    ("FUSEDRNN_CPU_PACK_CACHE", "2", "FUSEDRNN_CPU_PACK_CACHE must be 0"),
])
def test_bad_bf16_switch_is_an_error(variable, value, message, monkeypatch):
    m = _module("gru", 4, 8)
    monkeypatch.setenv(variable, value)
    with pytest.raises(RuntimeError, match=message):
        with torch.no_grad():
            m(torch.randn(12, 10, 4).bfloat16())


@requires_bf16_dot
def test_bf16_backward_gemms_change_only_the_gradients(threads, monkeypatch):
    """A bfloat16 layer's backward GEMMs (dX, dW) run on bf16 dot products (cpu_device.h: gemm, also for
    a product too small in rows for the large GEMM's float32 rule, as here): the RNN's forward never runs on
    bf16 products, so with and without bf16 dot products its output is bitwise the same while its
    gradients, from dG rounded to bf16, are not; torch.nn's bf16 error bound on them is
    tests/test_bf16_cpu.py's (which covers this shape)."""
    threads(2)
    # dW_ih = dG^T X: [64, 240] x [240, 64], too few rows for the large GEMM (M < 128), 983 K multiply-adds.
    m = _module("rnn_relu", 64, 64)
    x = torch.randn(30, 8, 64).bfloat16()

    def run(dot):
        monkeypatch.setenv("FUSEDRNN_CPU_BF16_DOT", dot)
        m.zero_grad()
        xx = x.clone().requires_grad_()
        y, _ = m(xx)
        y.float().sum().backward()
        return y.detach(), m.weight_ih_l0.grad.clone()

    y1, dw1 = run("1")
    y0, dw0 = run("0")
    assert torch.equal(y1, y0)
    assert not torch.equal(dw1, dw0)
    torch.testing.assert_close(dw1.float(), dw0.float(), rtol=2 ** -5, atol=2 ** -5 * dw0.float().abs().max().item())


@requires_bf16_dot
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_bf16_gemm_gradients_at_most_twice_torch_nn_error(cell, threads, monkeypatch):
    """Chunks of 40 rows (4 steps of 10), I = H = 64: every backward GEMM of every chunk on bf16 products
    (the large GEMM's bf16 form; the training forward on float32 products). Every output and gradient within 2x torch.nn's own bf16 error, both against float64 on the
    same rounded weights and leaves (tests/test_bf16_cpu.py's measure)."""
    from conftest import flat_state, make_pair
    from test_bf16_cpu import _fused_twin, _run_in

    threads(2)
    monkeypatch.setenv("FUSEDRNN_CPU_HALF_CHUNK_ROWS", "40")
    torch.manual_seed(3)
    ref64, _ = make_pair(cell, 64, 64, dtype=torch.float64, num_layers=1, bidirectional=True, bias=True)
    x64 = torch.randn(20, 10, 64, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 10, 64, dtype=torch.float64, requires_grad=True)
    hx64 = (h0, torch.randn(2, 10, 64, dtype=torch.float64, requires_grad=True)) if cell == "lstm" else h0
    exact = _run_in(torch.float64, ref64, x64, hx64, False, rounded_to=torch.bfloat16)
    theirs = _run_in(torch.bfloat16, ref64, x64, hx64, False)
    ours = _run_in(torch.bfloat16, _fused_twin(ref64), x64, hx64, False)
    n_out = 1 + len(flat_state(hx64))
    assert len(exact) == len(ours) == len(theirs) > 2 * n_out
    for i, (e, t, o) in enumerate(zip(exact, theirs, ours)):
        assert (o - e).norm().item() <= 2 * (t - e).norm().item(), i


def large_gemm_bf16(a, b, **kwargs):
    from test_large_gemm import large_gemm
    return large_gemm(a, b, bf16=True, **kwargs)


@requires_bf16_dot
@pytest.mark.parametrize("mc,kc", [(0, 0), (8, 5), (24, 2)])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (7, 17, 5), (17, 7, 33), (64, 100, 128), (129, 513, 7), (300, 33, 301)])
@pytest.mark.parametrize("a_t,b_t", [(False, False), (True, False), (False, True)])
def test_large_gemm_on_bf16_is_the_product_of_the_rounded_operands(m, n, k, a_t, b_t, mc, kc, threads):
    """large_gemm::run_bf16 (the large GEMM's loops around the bf16 micro-kernel, the operands rounded to
    bf16 as they are packed): the float64 product of the bf16-rounded operands to within float32's bound
    for a K-term sum (the products are exact), bias, accumulate, transposed operands, odd depths and depth
    blocks (the k pairs' zero padding); bitwise the same on 1 and 2 threads."""
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    a = torch.randn(k, m, generator=gen).t() if a_t else torch.randn(m, k, generator=gen)
    b = torch.randn(n, k, generator=gen).t() if b_t else torch.randn(k, n, generator=gen)
    bias = torch.randn(n, generator=gen)
    start = torch.randn(m, n, generator=gen)
    a64, b64 = a.bfloat16().double(), b.bfloat16().double()
    scale = a64.abs() @ b64.abs()
    bound = 2 * max(k, 1) * 2.0 ** -24 * (scale + start.double().abs() + bias.double().abs()) + 1e-30
    threads(2)
    with_bias = large_gemm_bf16(a, b, bias=bias, mc=mc, kc=kc)
    accumulated = large_gemm_bf16(a, b, out=start.clone(), accumulate=True, mc=mc, kc=kc)
    assert ((with_bias.double() - (a64 @ b64 + bias.double())).abs() <= bound).all()
    assert ((accumulated.double() - (a64 @ b64 + start.double())).abs() <= bound).all()
    threads(1)
    assert torch.equal(large_gemm_bf16(a, b, bias=bias, mc=mc, kc=kc), with_bias)


@requires_bf16_dot
def test_large_gemm_on_bf16_keeps_nan_and_inf_where_they_are():
    """A NaN or an infinity in A reaches only its row of C, in B only its column: the zero padding of an
    odd depth multiplies zeros (0 x 0), never a NaN by a padded zero."""
    a = torch.randn(20, 7)
    b = torch.randn(7, 40)
    a[3, 6] = float("nan")   # the last k of an odd depth: next to the padding
    a[5, 0] = float("inf")
    b[6, 11] = float("nan")
    got = large_gemm_bf16(a, b)
    want = a.bfloat16().double() @ b.bfloat16().double()
    assert torch.isnan(got[3]).all() and torch.isnan(got[:, 11]).all()
    assert torch.isinf(got[5, torch.arange(40) != 11]).all() or torch.isnan(got[5]).any()
    clean = torch.ones(20, 40, dtype=torch.bool)
    clean[3], clean[5], clean[:, 11] = False, False, False
    assert torch.isfinite(got[clean]).all()
    torch.testing.assert_close(got[clean].double(), want[clean], rtol=1e-5, atol=1e-5)
