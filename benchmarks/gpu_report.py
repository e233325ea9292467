"""Collects what benchmarks/gpu_check.sh produced into gpu_report.{md,json} and prints a short
table last: the step results, then the GPU benchmark ratios against cuDNN."""

import json
import os
import sys


def main(results_dir: str) -> int:
    steps = []
    steps_file = os.path.join(results_dir, "gpu_check_steps.txt")
    if os.path.exists(steps_file):
        with open(steps_file) as f:
            steps = [line.strip() for line in f if line.strip()]
    benches = {}
    for name in sorted(os.listdir(results_dir)):
        if name.startswith("gpu_layers_") and name.endswith(".json"):
            with open(os.path.join(results_dir, name)) as f:
                benches[name[:-5]] = json.load(f)
    lines = ["# fusedrnn GPU check", ""]
    machine = next(iter(benches.values()))["machine"] if benches else {}
    if machine:
        lines += ["Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), ""]
    lines += ["## Steps", ""] + [f"- {s}" for s in steps] + [""]
    short = ["| bench | cell | config | infer ratio | train ratio | train us/step (fusedrnn) |", "|---|---|---|---|---|---|"]
    for bench, payload in benches.items():
        for r in payload["rows"]:
            short.append(f"| {payload['dtype']} | {r['cell']} | {r['config']} | {r['infer_ratio']:.2f}x | "
                         f"{r['train_ratio']:.2f}x | {r['train_fused_us_per_step']:.1f} |")
    lines += ["## Benchmarks (ratio = cuDNN time / fusedrnn time)", ""] + short
    text = "\n".join(lines)
    with open(os.path.join(results_dir, "gpu_report.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(results_dir, "gpu_report.json"), "w") as f:
        json.dump({"steps": steps, "benchmarks": benches}, f, indent=2)
    print(text)
    return 0 if steps and all(s.split(": ", 1)[1].startswith("ok") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results")))
