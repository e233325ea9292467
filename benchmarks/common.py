"""Timing and reporting helpers shared by the benchmarks: interleaved runs after warm-up,
medians, CUDA-event timing on the GPU, a description of the machine, and where results go.

Where results go: the tables under benchmarks/results/ are the published ones (the README links
them), so a benchmark replaces them only when asked to (`--publish`). Any other run is saved
under benchmarks/runs/ (which git ignores) with the time of the run in its name, so that a quick
run of one configuration never overwrites the full table.
"""

import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")  # published
RUNS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs")  # everything else, ignored


def output_base(name: str, results_dir: Optional[str] = None, publish: bool = False) -> str:
    """The path, without extension, under which a benchmark saves this run's results.

    - `results_dir` given: `results_dir/name` (the caller chose the folder, e.g. the GPU check's $OUT).
    - `publish`: `benchmarks/results/name`, replacing the published results of that name.
    - otherwise: `benchmarks/runs/name_<UTC time>`, a new file in a folder git ignores.
    """
    if results_dir or publish:
        directory = results_dir or RESULTS_DIR
        os.makedirs(directory, exist_ok=True)
        return os.path.join(directory, name)
    os.makedirs(RUNS_DIR, exist_ok=True)
    ignore = os.path.join(RUNS_DIR, ".gitignore")
    if not os.path.exists(ignore):  # the folder ignores itself, as pytest's cache does
        with open(ignore, "w") as f:
            f.write("# Unpublished benchmark runs (benchmarks/common.py: output_base).\n*\n")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = os.path.join(RUNS_DIR, f"{name}_{stamp}")
    n = 2
    while os.path.exists(base + ".json"):  # two runs within a second
        base = os.path.join(RUNS_DIR, f"{name}_{stamp}_{n}")
        n += 1
    return base


def machine() -> Dict[str, str]:
    cpu = platform.processor() or platform.machine()
    flags: List[str] = []
    family = model = ""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
        flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
        # Family and model: virtual machines often name only "AMD EPYC" for CPUs as different as a Zen 4
        # (family 25) and a Zen 5 (family 26, twice the Zen 4's AVX-512 FMA rate).
        family = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("cpu family")), "")
        model = next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == "model"), "")
    except OSError:
        pass
    # The instruction sets that decide which kernels run (ours and oneDNN's): torch's own verdict,
    # and the vector/matrix extensions the CPU reports.
    extensions = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16") if f in flags]
    isa = torch.backends.cpu.get_cpu_capability() + (f" ({' '.join(extensions)})" if extensions else "")
    info = {"cpu": cpu, "isa": isa, "cores": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads()),
            "torch": torch.__version__, "python": platform.python_version()}
    if family:
        info["cpu_family"], info["cpu_model"] = family, model
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = str(torch.version.cuda)
        info["cudnn"] = str(torch.backends.cudnn.version())
    return info


def time_once(fn: Callable[[], None], device: str) -> float:
    """Seconds for one call; CUDA-event timing on the GPU."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(fns: Dict[str, Callable[[], None]], device: str, warmup: int = 2, reps: int = 7) -> Dict[str, float]:
    """Median seconds of each function, run interleaved (a, b, a, b, ...) after warm-up so
    that drifting clocks and caches affect all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(time_once(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def markdown_table(headers: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save(base: str, payload: dict, markdown: str) -> str:
    """Write `base`.json and `base`.md (`base` from output_base)."""
    with open(base + ".json", "w") as f:
        json.dump(payload, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(markdown + "\n")
    return base
