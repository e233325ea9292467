"""Resources of the layer-normalised cells' CUDA kernels (csrc/layernorm/*.cu, bodies in
csrc/cuda/layernorm_step.h), from the compiler, without a GPU: `nvcc -Xptxas -v` with the flags setup.py
uses (tests/test_ptxas.py's compile_resources), failing on register spills, a stack frame, static shared
memory (theirs is all dynamic, sized by the launcher) or more registers than a block of
lncuda::kMaxThreads (the __launch_bounds__) can get on one SM.
"""

import concurrent.futures
import glob
import os
import re

import pytest
from test_ptxas import NVCC, ROOT, compile_resources

pytestmark = pytest.mark.skipif(NVCC is None, reason="no CUDA toolkit (nvcc) found: set CUDA_HOME to check kernel "
                                "resources")

CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "layernorm", "*.cu")))
STEP_HEADER = os.path.join(ROOT, "csrc", "cuda", "layernorm_step.h")


def max_threads():
    with open(STEP_HEADER) as f:
        return int(re.search(r"constexpr int kMaxThreads = (\d+);", f.read()).group(1))


@pytest.fixture(scope="module")
def resources():
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(CU_FILES, pool.map(compile_resources, CU_FILES)))
    print("\n".join(f"{os.path.basename(cu)} {name}: {r}" for cu, k in results.items() for name, r in k.items()))
    return results


def test_every_ln_kernel_is_compiled_for_every_dtype(resources):
    # LSTM / GRU x forward / backward, one file each; float64, float32, float16, bfloat16 each.
    assert [os.path.basename(cu) for cu in CU_FILES] == ["ln_gru_backward.cu", "ln_gru_forward.cu",
                                                         "ln_lstm_backward.cu", "ln_lstm_forward.cu"]
    for cu, kernels in resources.items():
        assert len(kernels) == 4, (cu, sorted(kernels))
        for name, r in kernels.items():
            assert "ln_row_kernel" in name, name
            assert {"registers", "stack", "spill_stores", "spill_loads", "smem"} <= set(r), (cu, name, r)


def test_no_ln_kernel_spills_has_a_stack_or_static_shared_memory(resources):
    bad = [(os.path.basename(cu), name, r) for cu, kernels in resources.items() for name, r in kernels.items()
           if r["stack"] or r["spill_stores"] or r["spill_loads"] or r["smem"]]
    assert not bad, f"kernels with spills, a stack frame or static shared memory: {bad}"


def test_ln_kernels_fit_a_full_block_on_one_sm(resources):
    threads = max_threads()
    for cu, kernels in resources.items():
        for name, r in kernels.items():
            assert r["registers"] * threads <= 65536, (os.path.basename(cu), name, r, threads)
