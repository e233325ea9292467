"""A bidirectional layer both ways: its two directions through the two-direction op pair
(fusedrnn/_bidirectional.py: on CUDA ONE persistent launch per recurrence for both directions) and
one direction at a time (the one-direction ops, as before), at the sentiment shape (T=100 B=32
I=100 H=128, float32), GRU and LSTM, one layer.

First it confirms the route: the profiler must see, for a training step (forward + backward), one
persistent forward and one persistent backward kernel launch through the op pair where both
directions' grids are co-resident (2 x 32 CTAs <= the SMs; else two of each), and two of each one
direction at a time; a count that differs fails the run (exit 1). Then it times both ways,
interleaved in one process (CUDA events; medians and minima of --reps), training step and
inference, and writes the numbers to --json.

    python -m benchmarks.bidirectional --device cuda --json bidirectional.json

--device cpu is the rehearsal (tests/test_gpu_check.py): a small shape, the op pair on the CPU
kernel runner (persistent_runner_launches counts its launches), CPU thread time.
"""

import argparse
import json
import statistics
import sys
import time

import torch

import fusedrnn
from fusedrnn import _bidirectional

SHAPE = {"cuda": dict(T=100, B=32, I=100, H=128), "cpu": dict(T=4, B=3, I=5, H=8)}
MODULES = {"gru": fusedrnn.GRU, "lstm": fusedrnn.LSTM}


def kernel_counts(fn, device):
    """(persistent forward, persistent backward) kernel launches while fn runs."""
    if device == "cpu":
        before = torch.ops.fusedrnn.persistent_runner_launches()
        fn()
        after = torch.ops.fusedrnn.persistent_runner_launches()
        return after[0] - before[0], after[1] - before[1]
    from benchmarks.gpu_smoke import cuda_kernel_counts_of

    _, kernels = cuda_kernel_counts_of(fn)
    fwd = sum(c for name, c in kernels.items() if "persistent" in name and "forward_kernel" in name)
    bwd = sum(c for name, c in kernels.items() if "persistent" in name and "backward_kernel" in name)
    return fwd, bwd


class Route:
    """The op pair (two_direction=True) or one direction at a time, for the calls inside."""

    def __init__(self, two_direction: bool, device: str):
        self.two_direction, self.device = two_direction, device

    def __enter__(self):
        self.saved = (_bidirectional.ENABLED, _bidirectional.RUNNER_ON_CPU)
        _bidirectional.ENABLED = self.two_direction
        _bidirectional.RUNNER_ON_CPU = self.device == "cpu" and self.two_direction

    def __exit__(self, *exc):
        _bidirectional.ENABLED, _bidirectional.RUNNER_ON_CPU = self.saved


def timer(device):
    if device == "cuda":
        def timed(fn):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop)
        return timed

    def timed_cpu(fn):
        t = time.thread_time()
        fn()
        return (time.thread_time() - t) * 1e3
    return timed_cpu


def bench_cell(cell, device, reps):
    s = SHAPE[device]
    torch.manual_seed(0)
    m = MODULES[cell](s["I"], s["H"], bidirectional=True).to(device)
    x = torch.randn(s["T"], s["B"], s["I"], device=device)

    def train():
        m.zero_grad(set_to_none=True)
        out, _ = m(x)
        out.sum().backward()

    def infer():
        with torch.no_grad():
            m(x)

    seen = {}
    for two in (True, False):
        with Route(two, device):
            train()  # warm-up
            seen["two_direction" if two else "per_direction"] = kernel_counts(train, device)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 132
    one = 1 if 2 * s["B"] <= sms else 2
    want = {"two_direction": (one, one), "per_direction": (2, 2)}
    if device == "cpu":  # the per-direction route on the CPU is the CPU ops, not the runner
        want["per_direction"] = (0, 0)
    timed = timer(device)
    times = {f"{route}_{mode}": [] for route in want for mode in ("train", "infer")}
    for _ in range(reps):  # interleaved: A, B, A, B, ...
        for two in (True, False):
            route = "two_direction" if two else "per_direction"
            with Route(two, device):
                times[f"{route}_train"].append(timed(train))
                times[f"{route}_infer"].append(timed(infer))
    row = {"cell": cell, **s, "kernels_seen": {k: list(v) for k, v in seen.items()},
           "kernels_expected": {k: list(v) for k, v in want.items()},
           "confirmed": all(tuple(seen[k]) == tuple(want[k]) for k in want)}
    for k, v in times.items():
        row[f"{k}_ms_median"] = statistics.median(v)
        row[f"{k}_ms_min"] = min(v)
    for mode in ("train", "infer"):
        row[f"{mode}_speedup_median"] = row[f"per_direction_{mode}_ms_median"] / row[f"two_direction_{mode}_ms_median"]
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--cells", default="gru,lstm")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 1
    if not _bidirectional.AVAILABLE:
        print(f"fusedrnn's bidirectional ops are not loaded: {fusedrnn.backends()['load_error']}", file=sys.stderr)
        return 1
    reps = args.reps or (20 if args.device == "cuda" else 2)
    rows = [bench_cell(c, args.device, reps) for c in args.cells.split(",")]
    for r in rows:
        print(f"{r['cell']}: kernels (fwd, bwd) two-direction {r['kernels_seen']['two_direction']} per-direction "
              f"{r['kernels_seen']['per_direction']} (expected {r['kernels_expected']}); train "
              f"{r['two_direction_train_ms_median']:.3f} vs {r['per_direction_train_ms_median']:.3f} ms "
              f"({r['train_speedup_median']:.2f}x), inference {r['two_direction_infer_ms_median']:.3f} vs "
              f"{r['per_direction_infer_ms_median']:.3f} ms ({r['infer_speedup_median']:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "reps": reps, "rows": rows}, f, indent=1)
    bad = [r["cell"] for r in rows if not r["confirmed"]]
    if bad:
        print(f"FAILED: the kernel launches of {', '.join(bad)} are not the two-direction route's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
