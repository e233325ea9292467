"""The CPU engine at a hidden size whose packed W_hh leaves L2 and whose unit-block panels leave
L1 (csrc/cpu/engine_forward.h: pack_panels, one contiguous [K][kPanel] panel per micro-kernel
call, benchmarks/NOTES.md entry 43).

tests/test_cpu_engine.py's shapes stop at H = 130 and 32 rows; here H = 520 (no multiple of the
16- or 32-column panels: partial unit blocks and panels), 70 rows (12 row blocks of 6 on AVX2 in
four groups of 3 per step, on one thread), ragged steps (70, 70, 41, 41 and 13 rows), both
directions, the fused input projection (W_ih packed the same way) and the precomputed one,
against fusedrnn.reference in float64; and the results' independence of the thread count.
"""

import pytest
import torch

import fusedrnn
from engine_helpers import (GATES, ISAS, as_float32, engine_isa, lengths_to_batch_sizes, make_args,
                            outputs_and_grads, run_op, run_reference)

pytestmark = pytest.mark.skipif(not fusedrnn.backends()["compiled"], reason="compiled operators not loaded: "
                                + str(fusedrnn.backends()["load_error"]))


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", "1")
    monkeypatch.setenv("FUSEDRNN_CPU_SMALL", "0")
    monkeypatch.setenv("FUSEDRNN_CPU_ISA", request.param)
    assert engine_isa() == request.param
    return request.param


# ragged: 70, 70, 41, 41 and 13 rows in the five steps
LENGTHS = [5] * 13 + [4] * 28 + [2] * 29
HIDDEN = 520


@pytest.mark.parametrize("fuse_input", ["1", "0"], ids=["fused_input", "gemm_input"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell", list(GATES))
def test_large_hidden_matches_float64_reference(cell, reverse, fuse_input, isa, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_FUSE_INPUT", fuse_input)
    args = make_args(cell, HIDDEN, lengths_to_batch_sizes(LENGTHS), input_size=24, seed=5)
    want = outputs_and_grads(run_reference, cell, args, reverse)
    got = outputs_and_grads(run_op, cell, as_float32(args), reverse)
    # float32 sums over K = H + I = 544 terms (4x test_cpu_engine.py's largest), whose rounding
    # error grows with K: measured up to 2.7e-5 off float64 in a weight gradient; a wrong panel,
    # group or row would be off by O(0.1).
    for a, e in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cell", list(GATES))
def test_large_hidden_does_not_depend_on_the_thread_count(cell, threads, isa, monkeypatch):
    """1 thread: 12 row blocks in four groups; 2 threads: about 6 each, in two."""
    args = as_float32(make_args(cell, HIDDEN, lengths_to_batch_sizes(LENGTHS), input_size=24, seed=6))
    results = []
    for n in (1, 2):
        threads(n)
        results.append(outputs_and_grads(run_op, cell, args, False))
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1]))
