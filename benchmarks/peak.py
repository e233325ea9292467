"""This machine's float32 limit: the FMA peak of its cores, and what a large GEMM reaches.

    python -m benchmarks.peak              # saves under benchmarks/runs/ (git ignores it)
    python -m benchmarks.peak --publish    # replaces benchmarks/results/peak_cpu.{json,md}

Peak: a loop of fused multiply-adds on registers only (no loads or stores), 12 independent
accumulators so that the FMA units never wait for a previous result (latency 4-5 cycles x 2
FMA pipes needs at least 10 in flight), AVX-512, AVX2+FMA or plain C picked at run time from
what the CPU has. It is a tiny C file compiled with the system C compiler and called through
ctypes (no torch headers, so it builds in about a second); ctypes releases the GIL, so N Python
threads run it on N cores at once. FLOPs: 2 per lane per FMA. Reported: the best of several
repetitions (interference only ever lowers it), and the median.

GEMM: torch.mm of two 2048 x 2048 float32 matrices (2 * 2048^3 FLOPs) on 1 thread and on all
threads (BLAS: MKL in the x86 wheels): what a well-tuned large GEMM reaches on this machine.

benchmarks.layers divides its achieved GFLOP/s by the all-threads FMA peak measured here.
"""

import argparse
import ctypes
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, Optional

import torch

from .common import machine, markdown_table, output_base, save

# One function per instruction set, each compiled for its own target, so that the file builds
# with any x86-64 compiler flags and runs on any x86-64 CPU; fma_isa() says which the CPU runs.
_SOURCE = r"""
/* Twelve accumulators in named variables, so that they live in registers: an array of them is
   kept in memory at -O2, and every FMA would then wait for a store and a load. */
#define ACCUMULATORS 12
#define EACH(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

#define FMA_LOOP(VEC, SET1, FMADD, STORE, LANES)                                    \
  VEC a = SET1(0.999999f), b = SET1(1e-7f);                                         \
  EACH(DECLARE)                                                                     \
  for (long i = 0; i < iterations; ++i) { EACH(STEP) }                              \
  float out[LANES];                                                                 \
  double sum = 0;                                                                   \
  EACH(REDUCE)                                                                      \
  return sum;
#define DECLARE(k) VEC acc##k = SET1(0.001f * k);
#define STEP(k) acc##k = FMADD(acc##k, a, b);
#define REDUCE(k) STORE(out, acc##k); for (int j = 0; j < LANES; ++j) sum += out[j];

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

__attribute__((target("avx512f")))
static double loop_avx512(long iterations) {
#define VEC __m512
#define SET1 _mm512_set1_ps
#define FMADD _mm512_fmadd_ps
#define STORE _mm512_storeu_ps
#define LANES 16
  FMA_LOOP(VEC, SET1, FMADD, STORE, LANES)
#undef VEC
#undef SET1
#undef FMADD
#undef STORE
#undef LANES
}

__attribute__((target("avx2,fma")))
static double loop_avx2(long iterations) {
#define VEC __m256
#define SET1 _mm256_set1_ps
#define FMADD _mm256_fmadd_ps
#define STORE _mm256_storeu_ps
#define LANES 8
  FMA_LOOP(VEC, SET1, FMADD, STORE, LANES)
#undef VEC
#undef SET1
#undef FMADD
#undef STORE
#undef LANES
}

int fma_isa(void) {  /* 2: AVX-512F, 1: AVX2+FMA, 0: neither */
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
  return 0;
}
#else
int fma_isa(void) { return 0; }
#endif

/* Any other CPU: 4-lane GCC/Clang vectors, whatever the target makes of them. */
typedef float v4f __attribute__((vector_size(16)));
static v4f set1_v4f(float x) { v4f v = {x, x, x, x}; return v; }
static v4f fmadd_v4f(v4f acc, v4f a, v4f b) { return acc * a + b; }
static void store_v4f(float* out, v4f v) { for (int j = 0; j < 4; ++j) out[j] = v[j]; }

static double loop_portable(long iterations) {
#define VEC v4f
#define SET1 set1_v4f
#define FMADD fmadd_v4f
#define STORE store_v4f
#define LANES 4
  FMA_LOOP(VEC, SET1, FMADD, STORE, LANES)
#undef VEC
#undef SET1
#undef FMADD
#undef STORE
#undef LANES
}

int lanes(int isa) { return isa == 2 ? 16 : isa == 1 ? 8 : 4; }
int accumulators(void) { return ACCUMULATORS; }

/* Runs `iterations` x ACCUMULATORS vector FMAs; returns their sum so nothing is optimised away. */
double fma_loop(int isa, long iterations) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (isa == 2) return loop_avx512(iterations);
  if (isa == 1) return loop_avx2(iterations);
#endif
  return loop_portable(iterations);
}
"""

ISA_NAMES = {2: "AVX-512F", 1: "AVX2+FMA", 0: "portable C (4 lanes, no FMA instructions assumed)"}


class PeakUnavailable(RuntimeError):
    """No C compiler, or the kernel did not build: the peak cannot be measured here."""


def _library() -> ctypes.CDLL:
    """Compile the FMA loop once per source text and compiler, cached next to the data cache."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        raise PeakUnavailable("no C compiler found (set CC)")
    key = hashlib.sha256((_SOURCE + compiler).encode()).hexdigest()[:16]
    cache = os.environ.get("FUSEDRNN_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache", "fusedrnn"))
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"peak_fma_{key}.so")
    if not os.path.exists(path):
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "peak_fma.c")
            with open(src, "w") as f:
                f.write(_SOURCE)
            built = os.path.join(tmp, "peak_fma.so")
            # -O2 without -ffast-math: the compiler must keep every FMA of the dependent chains.
            cmd = [compiler, "-O2", "-shared", "-fPIC", src, "-o", built]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise PeakUnavailable(f"{' '.join(cmd)} failed:\n{proc.stderr.strip()}")
            os.replace(built, path)  # atomic: concurrent runs never load a half-written file
    lib = ctypes.CDLL(path)
    lib.fma_loop.argtypes = [ctypes.c_int, ctypes.c_long]
    lib.fma_loop.restype = ctypes.c_double
    lib.fma_isa.restype = ctypes.c_int
    lib.lanes.argtypes = [ctypes.c_int]
    return lib


def flops_per_iteration(lib: ctypes.CDLL, isa: int) -> int:
    """Each iteration: `accumulators` vector FMAs of `lanes` floats, 2 FLOPs per lane."""
    return 2 * lib.lanes(isa) * lib.accumulators()


def fma_peak(threads: int, seconds: float = 0.25, reps: int = 5, lib: Optional[ctypes.CDLL] = None) -> Dict:
    """GFLOP/s of `threads` threads running the register-only FMA loop at the same time."""
    lib = lib or _library()
    isa = lib.fma_isa()
    per_iter = flops_per_iteration(lib, isa)
    # Size the loop to about `seconds` on one thread.
    iterations = 1 << 16
    while True:
        t0 = time.perf_counter()
        lib.fma_loop(isa, iterations)
        dt = time.perf_counter() - t0
        if dt > 0.02:
            break
        iterations *= 4
    iterations = max(1, int(iterations * seconds / dt))

    def run_all() -> float:
        start = threading.Barrier(threads + 1)
        workers = [threading.Thread(target=lambda: (start.wait(), lib.fma_loop(isa, iterations)))
                   for _ in range(threads)]
        for w in workers:
            w.start()
        start.wait()
        t0, cpu0 = time.perf_counter(), time.process_time()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t0
        return wall, (time.process_time() - cpu0) / (wall * threads)

    rates, shares = [], []
    for _ in range(reps):
        wall, share = run_all()
        rates.append(threads * iterations * per_iter / wall / 1e9)
        shares.append(share)
    # The share of the cores' time the loop got: well below 1, other processes were running and
    # the figure is not this machine's peak.
    return {"threads": threads, "isa": ISA_NAMES[isa], "gflops_best": max(rates),
            "gflops_median": statistics.median(rates), "reps": reps, "cpu_share": statistics.median(shares)}


def mm_rate(threads: int, n: int = 2048, reps: int = 5) -> Dict:
    """GFLOP/s of torch.mm on two n x n float32 matrices with `threads` torch threads."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)  # warm-up: BLAS start-up and thread pool
        rates = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            rates.append(2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    finally:
        torch.set_num_threads(saved)
    return {"threads": threads, "n": n, "gflops_best": max(rates), "gflops_median": statistics.median(rates),
            "reps": reps}


def all_threads() -> int:
    """The cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def measure(reps: int = 5, gemm_size: int = 2048) -> Dict:
    n_all = all_threads()
    counts = [1] if n_all == 1 else [1, n_all]
    lib = _library()
    return {"fma": [fma_peak(t, reps=reps, lib=lib) for t in counts],
            "mm": [mm_rate(t, gemm_size, reps=reps) for t in counts]}


def markdown(result: Dict, info: Dict) -> str:
    rows = []
    for fma, mm in zip(result["fma"], result["mm"]):
        rows.append([str(fma["threads"]), f"{fma['gflops_best']:.1f}", f"{fma['gflops_median']:.1f}",
                     f"{mm['gflops_best']:.1f}", f"{mm['gflops_median']:.1f}",
                     f"{mm['gflops_best'] / fma['gflops_best']:.0%}"])
    n = result["mm"][0]["n"]
    return "\n".join([
        "# float32 peak of this machine", "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
        f"FMA peak: register-only loop of {result['fma'][0]['isa']} FMAs, 12 independent accumulators. "
        f"GEMM: torch.mm {n} x {n} x {n}. Best and median of {result['fma'][0]['reps']} repetitions.", "",
        markdown_table(["threads", "FMA peak GFLOP/s (best)", "FMA peak (median)", f"torch.mm {n} GFLOP/s (best)",
                        "torch.mm (median)", "GEMM / peak"], rows)] + busy_warning(result))


def busy_warning(result: Dict) -> list:
    share = min(f["cpu_share"] for f in result["fma"])
    if share >= 0.9:
        return []
    return ["", f"**Not this machine's peak**: the FMA loop got only {share:.0%} of its cores' time "
            "(other processes were running). Measure again on a quiet machine."]


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--gemm-size", type=int, default=2048)
    parser.add_argument("--publish", action="store_true",
                        help="replace the published benchmarks/results/peak_cpu.{json,md}")
    parser.add_argument("--results-dir", default=None, help="save here instead (default: benchmarks/runs/)")
    args = parser.parse_args(argv)
    try:
        result = measure(args.reps, args.gemm_size)
    except PeakUnavailable as e:
        raise SystemExit(f"fusedrnn peak: cannot measure the FMA peak: {e}")
    info = machine()
    md = markdown(result, info)
    print(md)
    base = save(output_base("peak_cpu", args.results_dir, args.publish), {"machine": info, **result}, md)
    print(f"\nsaved {base}.json and {base}.md")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
