"""Collects what benchmarks/gpu_check.sh produced into gpu_report.md and gpu_report.json, and
prints a short table last (the device tool returns the end of the output): every step with its
status, the test counts of each parity run, the sanitizers' error counts, the benchmark ratios
against cuDNN per path, the sentiment benchmark, and one verdict line.

    python -m benchmarks.gpu_report WORK_DIR OUT_DIR [--elapsed S] [--mode quick|full] [--device cuda]
    python -m benchmarks.gpu_report --junit-gate JUNIT.xml   # exit 1 if it ran no test or any skipped

Exit status: 0 every step passed (a CUDA path that is not built counts as absent, and a tool that
refuses this machine, compute-sanitizer in some containers, as unavailable: neither is a failure);
1 a step failed or timed out, or there were no steps; 2 nothing failed but something did not run.
When the time budget cut steps, the line before the verdict is the command that runs just those.
"""

import argparse
import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from typing import Dict, List

FAILED = ("FAILED", "TIMEOUT")
NOT_RUN = ("skipped", "missing-data")
NOT_HERE = ("absent", "unavailable")  # not built; a tool this machine refuses: reported, not failed


def read_steps(work: str) -> List[Dict[str, str]]:
    steps = []
    path = os.path.join(work, "steps.tsv")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 3:
                    steps.append({"step": parts[0], "status": parts[1], "seconds": parts[2],
                                  "detail": parts[3] if len(parts) > 3 else "",
                                  "group": parts[4] if len(parts) > 4 else "",
                                  "limit_s": int(parts[5]) if len(parts) > 5 and parts[5].isdigit() else 0})
    return steps


def junit_counts(path: str) -> Dict[str, int]:
    """Test counts of one JUnit XML file (pytest writes one <testsuite>, possibly under <testsuites>)."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        return {"error": f"{type(e).__name__}: {e}"}  # type: ignore[dict-item]
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def sanitizer_summary(log_path: str) -> str:
    """compute-sanitizer's closing line ('ERROR SUMMARY: N errors', or racecheck's hazard counts)."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [line.strip().lstrip("= ").strip() for line in f if "SUMMARY" in line]
    except OSError:
        return ""
    return "; ".join(lines[-2:])


def load_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def collect(work: str) -> dict:
    report = {"steps": read_steps(work), "parity": {}, "sanitizers": {}, "smoke": {}, "benchmarks": {},
              "sentiment": None}
    for path in sorted(glob.glob(os.path.join(work, "junit_parity_*.xml"))):
        report["parity"][os.path.basename(path)[len("junit_parity_"):-4]] = junit_counts(path)
    for step in report["steps"]:
        if step["step"].split("-")[0] in ("memcheck", "racecheck", "initcheck"):
            report["sanitizers"][step["step"]] = sanitizer_summary(os.path.join(work, step["step"] + ".log"))
    for path in sorted(glob.glob(os.path.join(work, "smoke_*.json"))):
        data = load_json(path)
        if data:
            rows = data.get("rows", [])
            report["smoke"][os.path.basename(path)[len("smoke_"):-5]] = {
                "checks": len(rows), "passed": sum(1 for r in rows if r.get("ok")),
                "worst": {d: max((r["max_rel_error"] for r in rows if r["dtype"] == d), default=None)
                          for d in sorted({r["dtype"] for r in rows})}}
    for path in sorted(glob.glob(os.path.join(work, "gpu_layers_*.json"))):
        data = load_json(path)
        if data:
            report["benchmarks"][os.path.basename(path)[:-5]] = data
    for path in sorted(glob.glob(os.path.join(work, "sentiment_*.json"))):
        data = load_json(path)
        if data:
            report["sentiment"] = data.get("summary")
    return report


def junit_gate(path: str) -> int:
    """0 if the JUnit file records at least one test and no skipped one, else 1 (says why): a
    CUDA test that skips on the GPU machine is a failure, also where tests/conftest.py does not
    recognise it as a CUDA test (tests/test_persistent.py's kernel tests)."""
    c = junit_counts(path)
    if "error" in c:
        print(f"junit gate: {path} unreadable: {c['error']}")
        return 1
    if c["tests"] == 0 or c["skipped"]:
        print(f"junit gate: FAILED, {c['tests']} tests, {c['skipped']} skipped ({path}): on the GPU machine every "
              f"selected test must run")
        return 1
    print(f"junit gate: {c['tests']} tests, none skipped")
    return 0


# Seconds the follow-up call needs on a warm machine besides its steps' own limits (the build
# there is incremental: only what changed recompiles).
FOLLOW_UP_OVERHEAD_S = 90


def follow_up(steps: List[Dict[str, str]]):
    """The command that runs what the time budget cut, or None: (command, timeout_s)."""
    cut = [s for s in steps if s["status"] == "skipped" and "budget" in s["detail"]]
    if not cut:
        return None
    groups = []
    for s in cut:
        group = s.get("group") or s["step"]
        if group not in groups:
            groups.append(group)
    budget = min(540, FOLLOW_UP_OVERHEAD_S + sum(s.get("limit_s", 0) for s in cut))
    command = f"GPU_CHECK_BUDGET_S={budget} bash benchmarks/gpu_check.sh --only build,loaded,{','.join(groups)}"
    return command, budget + 40


def verdict(steps: List[Dict[str, str]]):
    failed = [s["step"] for s in steps if s["status"] in FAILED]
    not_run = [s["step"] for s in steps if s["status"] in NOT_RUN]
    absent = [f"{s['step']} ({s['status']})" for s in steps if s["status"] in NOT_HERE]
    if not steps or failed:
        text = "FAILED: " + (", ".join(failed) if failed else "no step ran")
        return 1, text, absent
    if not_run:
        return 2, "INCOMPLETE (nothing failed; did not run: " + ", ".join(not_run) + ")", absent
    return 0, "PASSED" + (f" (not checked here: {', '.join(absent)})" if absent else ""), absent


def markdown(report: dict, code: int, text: str, absent: List[str]) -> List[str]:
    lines = ["# fusedrnn GPU check", ""]
    machine = next((b.get("machine") for b in report["benchmarks"].values() if b.get("machine")), None)
    if machine:
        lines += ["Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), ""]
    lines += [f"Mode {report.get('mode')}, device {report.get('device')}, {report.get('elapsed_s')} s in all. "
              f"**{text}**", ""]
    if absent:
        lines += [f"Not built or not available here, so not checked: {', '.join(absent)}.", ""]
    if report.get("follow_up"):
        lines += [f"The time budget cut steps; to run them (device tool timeout_s {report['follow_up'][1]}): "
                  f"`{report['follow_up'][0]}`", ""]
    lines += ["| step | status | s | detail |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['detail'].replace('|', '/')} |"
              for s in report["steps"]]
    if report["parity"]:
        lines += ["", "| parity run | tests | passed | failed | errors | skipped |", "|---|---|---|---|---|---|"]
        for path, c in report["parity"].items():
            if "error" in c:
                lines.append(f"| {path} | unreadable JUnit: {c['error']} | | | | |")
            else:
                lines.append(f"| {path} | {c['tests']} | {c['passed']} | {c['failures']} | {c['errors']} | "
                             f"{c['skipped']} |")
    if report["smoke"]:
        lines += ["", "| smoke | op checks passed | worst relative error per dtype |", "|---|---|---|"]
        for path, s in report["smoke"].items():
            worst = ", ".join(f"{d} {e:.1e}" for d, e in s["worst"].items() if e is not None)
            lines.append(f"| {path} | {s['passed']}/{s['checks']} | {worst} |")
    if report["sanitizers"]:
        lines += ["", "| sanitizer | summary |", "|---|---|"]
        lines += [f"| {k} | {v or 'no summary line (see its log)'} |" for k, v in report["sanitizers"].items()]
    if report["benchmarks"]:
        lines += ["", "Benchmarks (ratio = cuDNN time / fusedrnn time, above 1: fusedrnn faster; medians):", "",
                  "| run | cell | config | infer ratio | train ratio | train us/step (fusedrnn) |",
                  "|---|---|---|---|---|---|"]
        for name, payload in report["benchmarks"].items():
            for r in payload.get("rows", []):
                lines.append(f"| {name[len('gpu_layers_'):]} | {r['cell']} | {r['config']} | "
                             f"{r['infer_ratio']:.2f}x | {r['train_ratio']:.2f}x | "
                             f"{r['train_fused_us_per_step']:.1f} |")
    s = report["sentiment"]
    if s:
        lines += ["", f"Sentiment ({s.get('dataset')}, {s.get('cell')}, {s.get('device')}, {s.get('epochs')} epochs):",
                  "", "| run | train s | speed-up vs torch.nn | final loss | test accuracy |", "|---|---|---|---|---|"]
        for name, r in s.get("runs", {}).items():
            lines.append(f"| {name} | {r['total_seconds']:.2f} | {r['speedup_vs_torch_nn']:.2f}x | "
                         f"{r['final_loss']:.5f} | {r['final_test_accuracy']:.4f} |")
    return lines


def short_table(report: dict, text: str) -> List[str]:
    """The last lines printed: one per step, the headline numbers, the verdict."""
    lines = ["", "=" * 78]
    for s in report["steps"]:
        lines.append(f"{s['step']:26s} {s['status']:12s} {s['seconds']:>5s} s  {s['detail'][:90]}")
    for path, c in report["parity"].items():
        if "error" not in c:
            lines.append(f"parity {path:19s} {c['passed']} passed, {c['failures'] + c['errors']} failed, "
                         f"{c['skipped']} skipped of {c['tests']}")
    for name, payload in report["benchmarks"].items():
        ratios = " ".join(f"{r['cell']}/{r['config']} {r['train_ratio']:.2f}x" for r in payload.get("rows", []))
        lines.append(f"{name[len('gpu_layers_'):]:26s} train {ratios}")
    if report["sentiment"]:
        runs = report["sentiment"].get("runs", {})
        lines.append("sentiment                  " + "  ".join(
            f"{n} {r['speedup_vs_torch_nn']:.2f}x" for n, r in runs.items()))
    if report.get("follow_up"):
        command, timeout_s = report["follow_up"]
        lines.append(f"FOLLOW-UP (what the budget cut; device tool timeout_s {timeout_s}): {command}")
    lines.append(f"GPU CHECK {text} ({report.get('elapsed_s')} s)")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", nargs="?", default=None)
    parser.add_argument("out", nargs="?", default=None)
    parser.add_argument("--junit-gate", default=None, metavar="JUNIT_XML",
                        help="only check that this JUnit file ran tests and skipped none")
    parser.add_argument("--elapsed", type=int, default=None)
    parser.add_argument("--mode", default="quick")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if args.junit_gate:
        return junit_gate(args.junit_gate)
    if args.work is None:
        parser.error("WORK_DIR is required")
    out = args.out or args.work
    report = collect(args.work)
    report.update({"mode": args.mode, "device": args.device, "elapsed_s": args.elapsed,
                   "follow_up": follow_up(report["steps"])})
    code, text, absent = verdict(report["steps"])
    report["verdict"] = {"exit_status": code, "text": text, "absent": absent}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_report.md"), "w") as f:
        f.write("\n".join(markdown(report, code, text, absent)) + "\n")
    with open(os.path.join(out, "gpu_report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    print("\n".join(short_table(report, text)))
    return code


if __name__ == "__main__":
    sys.exit(main())
