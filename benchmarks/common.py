"""Timing and reporting helpers shared by the benchmarks: interleaved runs after warm-up,
medians, CUDA-event timing on the GPU, and a description of the machine."""

import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> Dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads()),
            "torch": torch.__version__, "python": platform.python_version()}
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


def save(name: str, payload: dict, markdown: str, results_dir=None) -> str:
    results_dir = results_dir or RESULTS_DIR
    os.makedirs(results_dir, exist_ok=True)
    base = os.path.join(results_dir, name)
    with open(base + ".json", "w") as f:
        json.dump(payload, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(markdown + "\n")
    return base
