"""Resources of every CUDA kernel, from the compiler, without a GPU.

Compiles each csrc/cuda/*.cu for sm_90 with `nvcc -Xptxas -v` (device code only) and fails on
register spills, a stack frame (a register array indexed at run time, or spills), or resources
beyond what the host launches: the persistent kernels' registers above kMaxRegisters (512 threads
on one SM), any static shared memory (their shared memory is all dynamic, sized by the plan), or a
plan that does not fit the device limit at one row per CTA. The limits are read from
csrc/persistent/persistent_limits.h, the header the kernels and the plan are compiled with.
"""

import concurrent.futures
import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

import fusedrnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMITS_HEADER = os.path.join(ROOT, "csrc", "persistent", "persistent_limits.h")
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def find_nvcc():
    """The real toolkit's nvcc, found as setup.py finds it (a wrapper script on PATH is followed)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:
            with open(nvcc, "r", errors="ignore") as f:
                candidates += [os.path.dirname(os.path.dirname(w)) for w in f.read(4096).split()
                               if w.startswith("/") and w.endswith("/bin/nvcc")]
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and os.access(os.path.join(c, "bin", "nvcc"), os.X_OK) and os.path.isfile(os.path.join(c, "bin", "ptxas")):
            return os.path.join(c, "bin", "nvcc")
    return None


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="no CUDA toolkit (nvcc) found: set CUDA_HOME to check kernel "
                                "resources")


def limits():
    """Every `constexpr int kName = N;` of the limits header."""
    with open(LIMITS_HEADER) as f:
        return {m.group(1): int(m.group(2)) for m in re.finditer(r"constexpr int (k\w+) = (\d+);", f.read())}


def compile_resources(cu):
    """{kernel symbol: {registers, stack, spill_stores, spill_loads, smem}} from ptxas -v, device code only."""
    from torch.utils.cpp_extension import include_paths

    # The flags setup.py (torch's CUDAExtension) compiles with, device code only.
    cmd = [NVCC, "-cubin", "-arch=sm_90", "-O3", "--expt-relaxed-constexpr", "-std=c++20", "-Xptxas", "-v",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-D__CUDA_NO_HALF2_OPERATORS__", "-I", os.path.join(ROOT, "csrc"), "-o", os.devnull, cu]
    for inc in include_paths():
        cmd += ["-I", inc]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed on {cu}:\n{proc.stderr[-4000:]}"
    kernels, current = {}, None
    for line in proc.stderr.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?(\w+)'?", line)
        if m:
            current = kernels.setdefault(m.group(1), {})
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current is not None:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(s.group(1)) if s else 0
    return kernels


@pytest.fixture(scope="module")
def resources():
    # Two at a time: the CI machine has 2 cores.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(CU_FILES, pool.map(compile_resources, CU_FILES)))
    report = []
    for cu, kernels in results.items():
        for name, r in kernels.items():
            report.append(f"{os.path.basename(cu)} {name}: {r}")
    print("\n".join(report))
    return results


def test_every_cuda_file_has_kernels(resources):
    for cu, kernels in resources.items():
        assert kernels, f"ptxas reported no kernel for {cu}"
        for name, r in kernels.items():
            assert {"registers", "stack", "spill_stores", "spill_loads"} <= set(r), (cu, name, r)


def test_no_kernel_spills_or_has_a_stack_frame(resources):
    bad = [(os.path.basename(cu), name, r) for cu, kernels in resources.items() for name, r in kernels.items()
           if r["stack"] or r["spill_stores"] or r["spill_loads"]]
    assert not bad, f"kernels with spills or a stack frame: {bad}"


def test_persistent_kernels_fit_what_the_plan_launches(resources):
    lim = limits()
    persistent = {name: r for cu, kernels in resources.items() if os.path.basename(cu).startswith("persistent_")
                  for name, r in kernels.items()}
    # 4 cells x 3 dtypes (float32, float16, bfloat16), forward and backward.
    assert len(persistent) == 24, sorted(persistent)
    assert sum("backward_kernel" in name for name in persistent) == 12, sorted(persistent)
    for name, r in persistent.items():
        assert r["registers"] <= lim["kMaxRegisters"], (name, r)
        assert r["registers"] * lim["kThreads"] <= 65536, (name, r)
        assert r["smem"] == 0, f"{name}: static shared memory {r['smem']} is not in the plan's budget"
    # The plan with the header's shared-memory limit and the registers ptxas reported: it must
    # accept the sentiment shape (one row per CTA) for every cell and dtype.
    if not fusedrnn.backends()["compiled"]:
        pytest.skip("compiled operators not loaded: cannot run the plan")
    for kind, plan in (("forward", torch.ops.fusedrnn.persistent_plan),
                       ("backward", torch.ops.fusedrnn.persistent_plan_backward)):
        worst = max(r["registers"] for name, r in persistent.items() if f"{kind}_kernel" in name)
        for cell in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                ok, rows, grid, shared = plan(cell, lim["kMaxHidden"], 32, dtype, False, 132, lim["kMaxSharedBytes"],
                                              65536, worst, lim["kThreads"])
                assert ok and rows == 1 and shared <= lim["kMaxSharedBytes"], (kind, cell, dtype, shared)
