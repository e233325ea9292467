"""The CPU recurrent engine (csrc/cpu/engine_forward.h, engine_backward.h, compiled per instruction
set: engine_avx2.cpp, engine_avx512.cpp): float32 layers on a CPU with AVX2+FMA or AVX-512F.

Against fusedrnn.reference in float64 over the shapes where a blocked kernel goes wrong: partial
row blocks (the micro-tile is 6 rows for AVX2, 8 for AVX-512) and partial unit blocks (AVX2: 8 or
16 units, AVX-512: 16 or 32), one row, one unit, ragged batches in both directions, one and two
threads; and bitwise reproducibility, which by construction does not depend on the thread count
either. Each test that runs the engine runs on every instruction set this CPU has
(FUSEDRNN_CPU_ISA caps the engine's choice; the AVX-512 cases skip, with the reason, elsewhere).
The engine is the default for float32; FUSEDRNN_CPU_ENGINE=0 leaves the per-step path to compare
with; both switches are read on every call.
"""

import re
import subprocess
import sys

import pytest
import torch

import fusedrnn
from engine_helpers import (GATES, ISAS, as_float32, cpu_has_avx2_fma, cpu_has_avx512f, engine_fuses_input, engine_isa,
                            lengths_to_batch_sizes, make_args, outputs_and_grads, run_op, run_reference)

pytestmark = pytest.mark.skipif(not fusedrnn.backends()["compiled"], reason="compiled operators not loaded: "
                                + str(fusedrnn.backends()["load_error"]))



requires_avx2 = pytest.mark.skipif(not cpu_has_avx2_fma(), reason="the engine needs AVX2+FMA; this CPU runs "
                                   "the per-step path, which the other test files cover")
requires_avx512 = pytest.mark.skipif(not cpu_has_avx512f(), reason="this CPU has no AVX-512F: only the AVX2 "
                                     "engine runs here")


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Runs the test on the engine's kernels for this instruction set."""
    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", "1")
    monkeypatch.setenv("FUSEDRNN_CPU_ISA", request.param)
    assert engine_isa() == request.param
    return request.param


# (hidden, per-sequence lengths): partial and whole unit blocks (LSTM one vector of units, GRU/RNN
# two: 8 and 16 on AVX2, 16 and 32 on AVX-512), row counts around the micro-tiles (6 rows on
# AVX2, 8 on AVX-512), one row, ragged batches.
SHAPES = [
    (1, [3]),
    (5, [4, 4, 4]),
    (8, [5] * 6),
    (13, [6] * 7),
    (16, [3] * 13),
    (17, [7, 7, 5, 5, 5, 4, 2, 1]),
    (37, [9, 8, 8, 6, 3, 3, 3, 2, 1, 1, 1, 1, 1]),
    (128, [6] * 32),
    (130, [5, 4, 4, 1]),
    (31, [5] * 9),
    (33, [4] * 17),
]


# The input projection: computed inside the engine's tiles ("fused") or by one large GEMM
# before it; the engine picks by weight size (cpu_engine.h), FUSEDRNN_CPU_FUSE_INPUT forces it.
@pytest.mark.parametrize("fuse_input", ["1", "0"], ids=["fused_input", "gemm_input"])
@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("hidden,lengths", SHAPES)
@pytest.mark.parametrize("cell", list(GATES))
def test_engine_matches_float64_reference(cell, hidden, lengths, reverse, nthreads, fuse_input, threads, isa,
                                          monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_FUSE_INPUT", fuse_input)
    threads(nthreads)
    args = make_args(cell, hidden, lengths_to_batch_sizes(lengths))
    want = outputs_and_grads(run_reference, cell, args, reverse)
    got = outputs_and_grads(run_op, cell, as_float32(args), reverse)
    for a, e in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=2e-5)


def test_input_projection_rule_follows_the_l2_cache(monkeypatch):
    """Where the engine fuses the input projection (cpu_engine.h): weights within half the L2, or
    W_hh alone beyond it (fastrnns, H = 512: measured 1.2-1.4x faster fused, NOTES entries 12 and 54)
    up to 16 MB of weights; the switch overrides it both ways."""
    monkeypatch.delenv("FUSEDRNN_CPU_FUSE_INPUT", raising=False)
    try:  # glibc's sysconf(_SC_LEVEL2_CACHE_SIZE), which the engine reads (Python's os.sysconf lacks the name)
        l2 = int(subprocess.run(["getconf", "LEVEL2_CACHE_SIZE"], capture_output=True, text=True).stdout.strip() or 0)
    except (OSError, ValueError):
        l2 = 0
    l2 = l2 if l2 > 0 else 512 * 1024
    for gates, i, h in [(1, 100, 128), (3, 100, 128), (4, 100, 128), (4, 512, 128), (3, 256, 256), (4, 512, 512),
                        (3, 512, 512), (4, 768, 768), (4, 1024, 1024), (3, 1024, 1024)]:
        weights, hh = 4 * gates * h * (i + h), 4 * gates * h * h
        want = 2 * weights <= l2 or (2 * hh > l2 and weights <= 16 << 20)
        assert engine_fuses_input(gates, i, h) == want, (gates, i, h, l2)
    if l2 < 8 << 20:  # the fastrnns LSTM's 8 MB of weights: fused on every CPU with an L2 under 8 MB
        assert engine_fuses_input(4, 512, 512)
    assert not engine_fuses_input(4, 1024, 1024)  # 32 MB of weights: the separate projection
    for force in ("0", "1"):
        monkeypatch.setenv("FUSEDRNN_CPU_FUSE_INPUT", force)
        assert engine_fuses_input(4, 512, 512) == (force == "1") and engine_fuses_input(1, 8, 8) == (force == "1")


@pytest.mark.parametrize("fuse_input", ["1", "0"], ids=["fused_input", "gemm_input"])
@pytest.mark.parametrize("cell", list(GATES))
def test_engine_without_bias_matches_reference(cell, fuse_input, isa, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_FUSE_INPUT", fuse_input)
    args = make_args(cell, 21, lengths_to_batch_sizes([5, 5, 3, 3, 3, 3, 3, 2]), bias=False)
    want = outputs_and_grads(run_reference, cell, args, True)
    got = outputs_and_grads(run_op, cell, as_float32(args), True)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("cell", list(GATES))
def test_engine_agrees_with_per_step_path(cell, isa, monkeypatch):
    """The two float32 paths differ only in summation order."""
    args = as_float32(make_args(cell, 64, lengths_to_batch_sizes([12] * 9 + [7] * 9 + [2] * 3)))
    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", "1")
    engine = outputs_and_grads(run_op, cell, args, False)
    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", "0")
    per_step = outputs_and_grads(run_op, cell, args, False)
    for a, e in zip(engine, per_step):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


@requires_avx2
@pytest.mark.parametrize("cell", list(GATES))
def test_engine_runs_where_the_cpu_has_avx2(cell, isa, monkeypatch):
    """The engine really ran (the other tests would also pass on the per-step path): its sums
    run in another order than MKL's, so some float32 results differ in the last bits."""
    args = as_float32(make_args(cell, 128, lengths_to_batch_sizes([20] * 16)))
    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", "1")
    engine = outputs_and_grads(run_op, cell, args, False)
    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", "0")
    per_step = outputs_and_grads(run_op, cell, args, False)
    assert not all(torch.equal(a, b) for a, b in zip(engine, per_step))


@pytest.mark.parametrize("cell", list(GATES))
def test_engine_is_bitwise_reproducible_for_any_thread_count(cell, threads, isa, monkeypatch):
    """Each element is computed by the same operations whatever the row split."""
    args = as_float32(make_args(cell, 40, lengths_to_batch_sizes([9] * 10 + [6] * 7 + [1] * 2), seed=3))
    results = []
    for n in (1, 2, 2, 1):
        threads(n)
        results.append(outputs_and_grads(run_op, cell, args, False))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_float64_and_bfloat16_still_run_beside_the_engine(monkeypatch):
    """float64 keeps the per-step path beside the engine; bfloat16 is widened to float32 (test_bf16_cpu.py)."""
    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", "1")
    args = make_args("lstm", 19, lengths_to_batch_sizes([4, 4, 3]))
    want = run_reference("lstm", args, False)
    got = run_op("lstm", args, False)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10)
    bf16 = [a.detach().bfloat16() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    for a, e in zip(run_op("lstm", bf16, False), want):
        torch.testing.assert_close(a.double(), e.detach(), rtol=0, atol=0.1)


@pytest.mark.parametrize("cell", ["lstm", "rnn_tanh"])
def test_engine_is_the_default(cell, monkeypatch):
    """Without FUSEDRNN_CPU_ENGINE the engine runs (bitwise what =1 gives, and not what =0 gives),
    since it measured faster than the per-step path for every cell (benchmarks/NOTES.md, entry 11)."""
    args = as_float32(make_args(cell, 128, lengths_to_batch_sizes([20] * 16)))
    monkeypatch.delenv("FUSEDRNN_CPU_ENGINE", raising=False)
    default = outputs_and_grads(run_op, cell, args, False)
    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", "1")
    engine = outputs_and_grads(run_op, cell, args, False)
    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", "0")
    per_step = outputs_and_grads(run_op, cell, args, False)
    assert all(torch.equal(a, b) for a, b in zip(default, engine))
    assert not all(torch.equal(a, b) for a, b in zip(default, per_step))


def test_library_splits_work_across_threads_like_torch():
    # at::parallel_for is an inline ATen header: its `#pragma omp parallel` is compiled into
    # fusedrnn's own objects, so a build without -fopenmp silently ran every thread split of
    # the CPU kernels (the engine's batch split included) on one thread.
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's CPU parallel backend is not OpenMP: " + torch.__config__.parallel_info().splitlines()[-1])
    if not sys.platform.startswith("linux"):
        pytest.skip("setup.py builds with OpenMP on Linux only")
    assert fusedrnn.backends()["cpu_parallel"] == "OpenMP"
    # ... and with torch's runtime, not a second one that torch.set_num_threads would not govern.
    with open("/proc/self/maps") as f:
        runtimes = {line.split()[-1] for line in f if re.search(r"lib(g|i|)omp[^/]*\.so", line.split()[-1])}
    assert len(runtimes) == 1, runtimes


@pytest.mark.parametrize("fuse_input", ["1", "0"], ids=["fused_input", "gemm_input"])
@pytest.mark.parametrize("input_size", [1, 2, 40])
@pytest.mark.parametrize("cell", list(GATES))
def test_engine_input_sizes_and_strided_tensors(cell, input_size, fuse_input, isa, monkeypatch):
    # The input projection's K dimension (1, 2 and more than a micro-kernel's usual depth) and
    # inputs / weights that arrive as non-contiguous views.
    monkeypatch.setenv("FUSEDRNN_CPU_FUSE_INPUT", fuse_input)
    args = make_args(cell, 23, lengths_to_batch_sizes([6, 6, 5, 3, 3, 3, 2, 1]), input_size=input_size)
    want = outputs_and_grads(run_reference, cell, args, False)
    strided = [a.detach().float().t().contiguous().t() if isinstance(a, torch.Tensor) and a.dim() == 2 else
               (a.detach().float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a) for a in args]
    assert not strided[0].is_contiguous() or strided[0].size(1) == 1
    for a in strided:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a.requires_grad_()
    got = outputs_and_grads(run_op, cell, strided, False)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=2e-5)


@requires_avx2
def test_isa_switch(monkeypatch):
    """The widest instruction set by default, FUSEDRNN_CPU_ISA caps it (read on every call), a cap
    above the CPU's changes nothing, and a value that names no instruction set is an error."""
    monkeypatch.delenv("FUSEDRNN_CPU_ENGINE", raising=False)
    monkeypatch.delenv("FUSEDRNN_CPU_ISA", raising=False)
    widest = "avx512" if cpu_has_avx512f() else "avx2"
    assert engine_isa() == widest
    monkeypatch.setenv("FUSEDRNN_CPU_ISA", "avx2")
    assert engine_isa() == "avx2"
    monkeypatch.setenv("FUSEDRNN_CPU_ISA", "avx512")
    assert engine_isa() == widest
    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", "0")
    assert engine_isa() == "none"
    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", "1")
    monkeypatch.setenv("FUSEDRNN_CPU_ISA", "sse9")
    args = as_float32(make_args("gru", 8, lengths_to_batch_sizes([3, 2])))
    with pytest.raises(RuntimeError, match="FUSEDRNN_CPU_ISA must be avx2 or avx512.*got 'sse9'"):
        run_op("gru", args, False)


@requires_avx512
@pytest.mark.parametrize("cell", list(GATES))
def test_instruction_sets_agree_bitwise_on_the_packed_path(cell, threads, monkeypatch):
    """Every output element is the same chain of operations at 8 and 16 lanes (engine_common.h),
    so the packed path (forward and backward) gives bitwise the same results on both."""
    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", "1")
    monkeypatch.setenv("FUSEDRNN_CPU_SMALL", "0")
    threads(2)
    args = as_float32(make_args(cell, 45, lengths_to_batch_sizes([9] * 11 + [6] * 7 + [1] * 2), seed=5))
    results = {}
    for isa in ("avx2", "avx512"):
        monkeypatch.setenv("FUSEDRNN_CPU_ISA", isa)
        results[isa] = outputs_and_grads(run_op, cell, args, True)
    assert all(torch.equal(a, b) for a, b in zip(results["avx2"], results["avx512"]))


@requires_avx512
@pytest.mark.parametrize("cell", list(GATES))
def test_avx512_kernels_really_run(cell, monkeypatch):
    """The small-call path reduces its dot products in registers in an order that depends on the
    vector width, so its float32 results differ in the last bits between the two instruction sets:
    the AVX-512 kernels ran when FUSEDRNN_CPU_ISA allowed them (both are checked against float64
    by the tests above)."""
    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", "1")
    monkeypatch.setenv("FUSEDRNN_CPU_SMALL", "1")
    args = as_float32(make_args(cell, 96, lengths_to_batch_sizes([6, 6, 5, 4]), input_size=40, seed=2))
    results = {}
    for isa in ("avx2", "avx512"):
        monkeypatch.setenv("FUSEDRNN_CPU_ISA", isa)
        results[isa] = outputs_and_grads(run_op, cell, args, False)
    assert not all(torch.equal(a, b) for a, b in zip(results["avx2"], results["avx512"]))
