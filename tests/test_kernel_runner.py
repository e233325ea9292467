"""The CPU kernel runner (csrc/exec/cpu_runner.h) on test kernels: a correct one passes with
lane-exact shuffles, and each planted bug (a race of every kind, a barrier not every thread
reaches, barriers at different sites, shared memory out of bounds or never written, a shuffle with
inactive lanes or in a partial warp) is caught with a message that names it.

The test kernels (tests/runner_kernels.cpp) and the runner are compiled here with the system C++
compiler into a small shared library, loaded with ctypes: no torch op is needed, and the runner is
shown to build on its own, without ATen. The real kernels go through the runner in
tests/test_persistent.py (persistent forward and backward) and tests/test_pointwise_runner.py
(per-step steps); the last test here plants bugs in a copy of the persistent backward kernel
(tests/runner_persistent_backward.cpp) and shows the runner reports each.
"""

import ctypes
import os
import re

import pytest
from runner_build import ROOT, build_library

SOURCES = [os.path.join(ROOT, "csrc", "exec", "cpu_runner.cpp"), os.path.join(ROOT, "tests", "runner_kernels.cpp")]
HEADERS = [os.path.join(ROOT, "csrc", "exec", "cpu_runner.h")]


@pytest.fixture(scope="module", params=["asm", "ucontext"])
def lib(request):
    """The runner with its x86-64 stack switch (where it has one) and with the portable ucontext
    fallback that other machines use."""
    if request.param == "ucontext":
        return build_library(SOURCES, HEADERS, ["-DFUSEDRNN_EXEC_UCONTEXT=1"], name="runner_kernels_ucontext")
    return build_library(SOURCES, HEADERS)


MESSAGE = 8192


def planted(lib, name, threads=256, grid=2):
    buf = ctypes.create_string_buffer(MESSAGE)
    rc = lib.runner_planted(name.encode(), ctypes.c_int64(grid), threads, buf, MESSAGE)
    assert rc != 3, f"unknown test kernel {name}"
    return rc, buf.value.decode()


@pytest.mark.parametrize("threads", [32, 256, 1024])
@pytest.mark.parametrize("lane_mask", [1, 5, 16, 31])
def test_correct_kernel_passes_and_shuffles_are_lane_exact(lib, threads, lane_mask):
    grid = 3
    out = (ctypes.c_int64 * grid)(*([-1] * grid))
    lanes = (ctypes.c_int64 * (grid * threads))(*([-1] * (grid * threads)))
    buf = ctypes.create_string_buffer(MESSAGE)
    rc = lib.runner_reduce(ctypes.c_int64(grid), threads, lane_mask, out, lanes, buf, MESSAGE)
    assert rc == 0, buf.value.decode()
    # The block reduction (shared memory, barriers, then a warp's xor-shuffle tree) of 1..threads.
    assert list(out) == [threads * (threads + 1) // 2] * grid
    # Each lane got exactly the value of lane ^ lane_mask in its own warp, in its own block.
    want = [1000 * b + (t ^ lane_mask) for b in range(grid) for t in range(threads)]
    assert list(lanes) == want


@pytest.mark.parametrize("name", ["halves_ok", "many_readers_ok"])
def test_no_false_alarm(lib, name):
    """Neighbouring halves in one 4-byte word, and many readers then a writer after a barrier,
    are not races."""
    rc, message = planted(lib, name)
    assert rc == 0, message


# (test kernel, threads, what the message must say)
PLANTED = [
    ("race_read_after_write", 256, r"race: read of a value another thread wrote since the last barrier: block 0, "
     r"thread 1 .*offset 0 .*other thread 0, after barrier 1 \(\S*runner_kernels.cpp:\d+\)"),
    ("race_write_after_read", 256, r"race: write of a value another thread read since the last barrier: block 0, "
     r"thread 1 .*offset 4 .*other thread 0"),
    ("race_write_after_write", 256, r"race: write of a value another thread wrote since the last barrier: "
     r"block 0, thread 1 .*other thread 0, before the first barrier"),
    ("race_many_readers", 256, r"race: write of a value another thread read since the last barrier: block 0, "
     r"thread 255 .*read by several other threads"),
    ("missed_barrier", 256, r"barrier at \S*runner_kernels.cpp:\d+ in block 0 is not reached by every thread: "
     r"threads 0-127 wait there, threads 128-255 returned"),
    ("divergent_barriers", 256, r"threads wait at different barriers in block 0: thread 0 at "
     r"\S*runner_kernels.cpp:\d+, thread 1 at \S*runner_kernels.cpp:\d+"),
    ("out_of_bounds_read", 256, r"shared memory read out of bounds: block 0, thread 255 .* 4 bytes at offset 1024 "
     r"of a 1024-byte block"),
    ("out_of_bounds_write", 256, r"shared memory write out of bounds: block 0, thread 0 .* 8 bytes at offset -8 "),
    ("uninitialised_read", 256, r"read of bytes no thread has written \(poisoned\): block 0, thread 4 .*offset 20 "),
    ("inactive_lane_shuffle", 256, r"warp shuffle over inactive lanes in block 0, warp 0 at "
     r"\S*runner_kernels.cpp:\d+: lanes 16-31 are not active \(16-31 returned\)"),
    ("partial_warp_shuffle", 48, r"warp shuffle over inactive lanes in block 0, warp 1 .*the warp has only 16 lanes"),
]


@pytest.mark.parametrize("name,threads,message", PLANTED, ids=[p[0] for p in PLANTED])
def test_planted_bug_is_caught(lib, name, threads, message):
    rc, got = planted(lib, name, threads)
    assert rc == 1, f"{name}: the runner did not report the planted bug (rc {rc}): {got}"
    assert re.search(message, got), got


@pytest.mark.parametrize("workers", ["1", "3", "8"])
def test_the_lowest_failing_block_is_reported_whatever_the_os_threads(lib, workers, monkeypatch):
    """Blocks run on several OS threads (FUSEDRNN_RUNNER_THREADS); the error is still the first
    failing block's, so a message does not depend on the machine."""
    monkeypatch.setenv("FUSEDRNN_RUNNER_THREADS", workers)
    rc, got = planted(lib, "fails_in_blocks_3_and_5", threads=64, grid=8)
    assert rc == 1 and re.search(r"write out of bounds: block 3, thread 0 .*offset 256 of a 256-byte block", got), got


# The real persistent backward kernel with one planted bug each: (text in
# csrc/persistent/persistent_backward.h, its replacement, what the runner must say).
BACKWARD_MUTATIONS = {
    "no_barrier_between_cells_and_product": (
        "      }\n      ctx.sync();\n      for (int64_t r = 0; r < p.rows_per_cta; ++r) {\n        if (!K::row_active",
        "      }\n      for (int64_t r = 0; r < p.rows_per_cta; ++r) {\n        if (!K::row_active",
        "race: write of a value another thread read since the last barrier"),
    "no_barrier_before_store_final": (
        "    ctx.sync();\n    store_final(p, s, cta, tid);",
        "    store_final(p, s, cta, tid);",
        "race: read of a value another thread wrote since the last barrier"),
    "dg_single_buffered": (
        "      parity = 1 - parity;\n    }\n    ctx.sync();",
        "    }\n    ctx.sync();",
        "race: write of a value another thread read since the last barrier"),
}


@pytest.mark.parametrize("mutation", [None] + list(BACKWARD_MUTATIONS))
def test_runner_catches_a_planted_bug_in_the_persistent_backward_kernel(tmp_path, mutation):
    """The kernel's own headers copied beside the test's source, one bug planted in the copy: the
    unchanged kernel passes every check, each mutation is reported as the race it is."""
    import shutil

    src_root = tmp_path / "src"
    for sub in ("cells", "exec", "persistent"):
        shutil.copytree(os.path.join(ROOT, "csrc", sub), src_root / sub)
    shutil.copy(os.path.join(ROOT, "tests", "runner_persistent_backward.cpp"), src_root)
    header = src_root / "persistent" / "persistent_backward.h"
    if mutation is not None:
        old, new, _ = BACKWARD_MUTATIONS[mutation]
        text = header.read_text()
        assert text.count(old) == 1, f"the mutation {mutation} no longer matches the kernel's source"
        header.write_text(text.replace(old, new))
    headers = [str(p) for p in sorted(src_root.rglob("*.h"))]
    sources = [str(src_root / "exec" / "cpu_runner.cpp"), str(src_root / "runner_persistent_backward.cpp")]
    lib = build_library(sources, headers, name=f"runner_persistent_backward_{mutation or 'ok'}")
    buf = ctypes.create_string_buffer(MESSAGE)
    rc = lib.runner_persistent_backward(buf, MESSAGE)
    if mutation is None:
        assert rc == 0, buf.value.decode()
    else:
        assert rc == 1, f"the runner missed the planted bug {mutation}"
        assert BACKWARD_MUTATIONS[mutation][2] in buf.value.decode(), buf.value.decode()
        assert "persistent_backward.h" in buf.value.decode()


def test_both_directions_in_one_backward_launch_give_each_directions_own_results(tmp_path):
    """The persistent backward kernel over both directions of a layer in one launch (blocks split
    by direction, persistent_directions.h), on the runner: each direction's gate gradients, dL/dh0
    and dL/dc0 are bitwise those of its own launch (the kernel's source, unmodified)."""
    import shutil

    src_root = tmp_path / "src"
    for sub in ("cells", "exec", "persistent"):
        shutil.copytree(os.path.join(ROOT, "csrc", sub), src_root / sub)
    shutil.copy(os.path.join(ROOT, "tests", "runner_persistent_backward.cpp"), src_root)
    headers = [str(p) for p in sorted(src_root.rglob("*.h"))]
    sources = [str(src_root / "exec" / "cpu_runner.cpp"), str(src_root / "runner_persistent_backward.cpp")]
    lib = build_library(sources, headers, name="runner_persistent_backward_ok")
    buf = ctypes.create_string_buffer(MESSAGE)
    rc = lib.runner_persistent_backward_two_directions(buf, MESSAGE)
    assert rc == 0, buf.value.decode()
