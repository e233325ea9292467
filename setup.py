"""Build of fusedrnn and its compiled operator library, fusedrnn._C.

The CPU sources are always built. The CUDA sources (csrc/cuda/) are built too
when a CUDA toolkit is found and the installed torch is a CUDA build, decided
from the toolkit and NOT from torch.cuda.is_available(), so a machine without
a GPU still compiles (and so checks) the CUDA code.

Environment switches:
  FUSEDRNN_CUDA=0|1|auto   skip, force or auto-detect the CUDA build (default auto)
  FUSEDRNN_CUDA_ARCHS      compute capabilities to build for, e.g. "9.0" or "8.0;9.0" (default "9.0+PTX":
                           sm_90 machine code plus compute_90 PTX, which newer GPUs (Blackwell)
                           JIT-compile at load instead of failing at the first launch; older
                           GPUs cannot run compute_90 PTX: name them, e.g. "8.0;9.0+PTX")
  CUDA_HOME                the toolkit folder; found from nvcc or /usr/local/cuda* otherwise
  MAX_JOBS                 parallel compile jobs for ninja

The library must be compiled against the torch that will load it, so build with the
installed torch (`pip install --no-build-isolation .`); an isolated build would fetch and
build against another torch. The sdist needs no torch: it ships every file under csrc/
(MANIFEST.in), whatever this machine can compile.
"""

import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# The oldest supported torch: the release the GPU machines run (CI runs 2.14.1). Newer releases
# are expected to work once fusedrnn is rebuilt against them.
TORCH_MIN = (2, 11)
# Commands that compile. The others (sdist, egg_info, dist_info, ...) only describe or pack the
# sources, so they never import torch and their output cannot depend on this machine.
BUILD_COMMANDS = {"build", "build_ext", "bdist", "bdist_wheel", "bdist_egg", "editable_wheel", "install", "develop"}


def package_version():
    """fusedrnn.__version__, read without importing fusedrnn (which needs torch and _C)."""
    with open(os.path.join(ROOT, "fusedrnn", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def import_build_torch():
    """The installed torch, checked to be one we support; None for a command that does not compile."""
    if BUILD_COMMANDS.isdisjoint(sys.argv[1:]):
        return None
    try:
        import torch
    except ImportError:
        sys.exit("fusedrnn: the build cannot import torch. The compiled library must be built against the "
                 "torch that will import it: install torch, then build with `pip install --no-build-isolation .` "
                 "(pip's default build isolation hides the installed torch).")
    version = tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2])
    if version < TORCH_MIN:
        sys.exit(f"fusedrnn: torch {torch.__version__} is older than the oldest supported release, "
                 f"{'.'.join(map(str, TORCH_MIN))}; upgrade torch, then rebuild")
    return torch


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and (
        glob.glob(os.path.join(path, "lib64", "libcudart.so*")) or glob.glob(os.path.join(path, "lib", "libcudart.so*"))
    )


def find_cuda_home():
    """The real toolkit folder. A wrapper script for nvcc in a generic bin folder
    (e.g. /usr/local/bin/nvcc) makes torch guess /usr/local, where libcudart is
    missing, so check each candidate for the runtime library."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script: read the path it execs
            with open(nvcc, "r", errors="ignore") as f:
                for word in f.read(4096).split():
                    if word.endswith("/bin/nvcc") and word.startswith("/"):
                        candidates.append(os.path.dirname(os.path.dirname(word)))
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    candidates.extend(sorted(glob.glob("/usr/local/cuda-*"), reverse=True))
    for c in candidates:
        if _is_toolkit(c):
            return os.path.realpath(c)
    return None


def cuda_wanted():
    mode = os.environ.get("FUSEDRNN_CUDA", "auto").lower()
    if mode in ("0", "false", "no", "off"):
        return False, None, "FUSEDRNN_CUDA=0"
    home = find_cuda_home()
    import torch

    if torch.version.cuda is None:
        if mode in ("1", "true", "yes", "on"):
            sys.exit("fusedrnn: FUSEDRNN_CUDA=1 but the installed torch is not a CUDA build")
        return False, None, "torch is a CPU-only build"
    if home is None:
        if mode in ("1", "true", "yes", "on"):
            sys.exit("fusedrnn: FUSEDRNN_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME")
        return False, None, "no CUDA toolkit found (set CUDA_HOME)"
    return True, home, "CUDA toolkit at " + home


def cpu_flags():
    """SIMD flags for the CPU kernels. The pointwise loops are written to vectorise;
    AVX2+FMA doubles their width over the SSE2 baseline. Used when the build machine
    has them (a source build runs where it is built); FUSEDRNN_CPU_FLAGS overrides,
    e.g. FUSEDRNN_CPU_FLAGS="" for a portable build."""
    if "FUSEDRNN_CPU_FLAGS" in os.environ:
        return os.environ["FUSEDRNN_CPU_FLAGS"].split()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if "avx2" in flags and "fma" in flags else []


def build_extension():
    if import_build_torch() is None:
        return [], {}
    with_cuda, cuda_home, why = cuda_wanted()
    if with_cuda:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("FUSEDRNN_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
    import torch
    from torch.utils import cpp_extension

    print(f"fusedrnn: building CPU{' + CUDA' if with_cuda else ''} operators ({why}; CPU flags {cpu_flags()})",
          flush=True)
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/exec/*.cpp"))
    # Layer-normalised LSTM / GRU and zoneout (their own TORCH_LIBRARY_FRAGMENT; CPU only so far).
    sources += sorted(glob.glob("csrc/layernorm/*.cpp"))
    # C++ autograd for eager training calls (their own TORCH_LIBRARY_FRAGMENT; device-independent).
    sources += sorted(glob.glob("csrc/autograd/*.cpp"))
    define_macros = [("FUSEDRNN_TORCH_VERSION", '"' + torch.__version__ + '"')]
    # -fopenmp: at::parallel_for is an inline header (ATen/ParallelOpenMP.h) whose
    # `#pragma omp parallel` is compiled into OUR objects; without the flag every
    # parallel_for in csrc/ silently runs on one thread. Linking it with GCC on Linux
    # resolves libgomp.so.1 to the copy torch has already loaded (same soname), so there
    # is one OpenMP runtime and one thread pool in the process. Only where torch itself
    # runs on OpenMP and on Linux (Apple clang has no -fopenmp; another OpenMP runtime
    # beside torch's would ignore torch.set_num_threads); FUSEDRNN_OPENMP=0 opts out.
    openmp = (os.environ.get("FUSEDRNN_OPENMP", "1") != "0" and sys.platform.startswith("linux")
              and "ATen parallel backend: OpenMP" in torch.__config__.parallel_info())
    cxx_flags = ["-O3", "-fopenmp" if openmp else "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math"]
    cxx_flags += cpu_flags()
    extra = {"cxx": cxx_flags}
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        sources += sorted(glob.glob("csrc/layernorm/*.cu"))  # the LN cells' kernels (host code: layernorm_cuda.cpp)
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        define_macros += [("FUSEDRNN_WITH_CUDA", None), ("FUSEDRNN_CUDA_ARCHS", '"' + archs + '"')]
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        # ATen's CUDA headers include cuBLAS/cuSPARSE headers that a bare toolkit may lack;
        # torch's own CUDA dependency ships them.
        try:
            import nvidia

            for base in nvidia.__path__:
                for inc in glob.glob(os.path.join(base, "cu*", "include")) + glob.glob(
                    os.path.join(base, "*", "include")
                ):
                    if os.path.isfile(os.path.join(inc, "cublas_v2.h")) and inc not in include_dirs:
                        include_dirs.append(inc)
        except ImportError:
            pass
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension

    # What the library is built against, readable without loading it (csrc/build_info.cpp).
    sources.append("csrc/build_info.cpp")
    define_macros.append(("FUSEDRNN_TORCH_CUDA_VERSION", '"' + str(torch.version.cuda or "none") + '"'))
    ext = ext_cls(
        name="fusedrnn._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"] if openmp else [],
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = build_extension()

setup(
    name="fusedrnn",
    version=package_version(),
    description="Fused LSTM/GRU/RNN layers for PyTorch: drop-in replacements for torch.nn, CPU and CUDA",
    packages=["fusedrnn"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",  # as torch 2.11
    install_requires=["torch>=" + ".".join(map(str, TORCH_MIN))],
    # The README's test command installs these (and the bench extras, for the benchmark smoke test).
    extras_require={"test": ["pytest", "build", "onnx", "onnxruntime", "onnxscript"], "bench": ["tqdm", "matplotlib"]},
)
