"""benchmarks/gpu_check.sh and its Python steps, checked without a GPU: the plan (every step, in
order, each with a time limit, CUDA skips made failures, sanitizers limited to our kernels), a
rehearsal of the script on the CPU kernels (step bookkeeping, report, exit status, what lands in
$OUT), the smoke check and the report on their own, and the FUSEDRNN_REQUIRE_CUDA gate."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import conftest
import fusedrnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
sys.path.insert(0, ROOT)
from benchmarks import gpu_report, gpu_smoke, sanitize_cuda  # noqa: E402

QUICK_STEPS = ["machine", "build", "loaded", "smoke-per_step", "smoke-persistent", "parity-per_step",
               "parity-persistent", "memcheck-per_step", "memcheck-persistent", "racecheck-persistent",
               "initcheck-auto", "bench-float32-per_step", "bench-bfloat16-per_step", "bench-float32-persistent",
               "bench-bfloat16-persistent", "sentiment"]


def run_script(*args, env=None, timeout=600):
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    full_env.pop("OUT", None)
    full_env.update(env or {})
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=ROOT)


def planned_steps(stdout):
    """{step name: its line} from a --dry-run, in order."""
    steps = {}
    for line in stdout.splitlines():
        m = re.match(r"step (\S+)\s+(.*)", line)
        if m:
            steps[m.group(1)] = m.group(2)
    return steps


def test_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_dry_run_plans_every_step_in_order_each_with_a_time_limit(mode):
    result = run_script("--dry-run", *(["--full"] if mode == "full" else []))
    assert result.returncode == 0, result.stderr
    steps = planned_steps(result.stdout)
    full_steps = ["machine", "build", "loaded", "parity-per_step", "parity-persistent"]
    assert list(steps) == (QUICK_STEPS if mode == "quick" else full_steps)
    for name, line in steps.items():
        assert re.match(r"limit +\d+s: ", line), f"{name} has no time limit: {line}"
        assert not re.search(r"benchmarks/\w+\.py", line), f"{name} runs a file, not a module: {line}"
    assert "'setup.py' 'build_ext' '--inplace'" in steps["build"]
    for path in ("per_step", "persistent"):
        parity = steps[f"parity-{path}"]
        assert "'FUSEDRNN_REQUIRE_CUDA=1'" in parity and f"'FUSEDRNN_CUDA_PATH={path}'" in parity
        assert f"'--junitxml=" in parity
        assert ("'-k' 'cuda' 'tests'" in parity) == (mode == "full")
    if mode == "full":
        return
    for path in ("per_step", "persistent"):
        assert f"'--path' '{path}'" in steps[f"smoke-{path}"]
        assert "'--kernel-name' 'kns=fusedrnn'" in steps[f"memcheck-{path}"]
    assert "'--kernel-name' 'kns=fusedrnn'" in steps["racecheck-persistent"]
    assert "'--tool' 'initcheck'" in steps["initcheck-auto"] and "kns=" not in steps["initcheck-auto"]
    assert "'--device' 'cuda'" in steps["sentiment"]


def test_unknown_option_is_a_usage_error():
    result = run_script("--fast")
    assert result.returncode == 64 and "unknown option --fast" in result.stderr


def test_rehearsal_on_cpu_reports_passed_steps_and_a_failed_one(tmp_path):
    """The script end to end on the CPU kernels: a parity run that passes, then one whose test
    selection matches nothing (pytest collects no test: that must fail, not pass silently)."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {"OUT": str(out), "GPU_CHECK_WORK": str(work)}
    result = run_script("--rehearse-on-cpu", "--only", "parity", env=env)
    assert result.returncode == 0, result.stdout[-3000:]
    assert result.stdout.rstrip().splitlines()[-1].startswith("GPU CHECK PASSED")
    report = json.loads((out / "gpu_report.json").read_text())
    assert [(s["step"], s["status"]) for s in report["steps"]] == [("parity-cpu", "ok")]
    counts = report["parity"]["cpu"]
    assert counts["tests"] == counts["passed"] > 0 and counts["skipped"] == 0
    # What comes back from the device tool: at most 8 plain files, none deeper than $OUT.
    names = sorted(os.listdir(out))
    assert names == ["gpu_check.log", "gpu_check_files.tar.gz", "gpu_report.json", "gpu_report.md",
                     "junit_parity_cpu.xml"]
    assert "parity-cpu: ok" in (out / "gpu_check.log").read_text()

    env["GPU_CHECK_PYTEST_K"] = "no_test_has_this_name"
    result = run_script("--rehearse-on-cpu", "--only", "parity", env=env)
    assert result.returncode == 1
    assert "GPU CHECK FAILED: parity-cpu" in result.stdout.splitlines()[-1]


def test_missing_sentiment_data_is_reported_as_incomplete(tmp_path):
    env = {"OUT": str(tmp_path / "out"), "GPU_CHECK_WORK": str(tmp_path / "work"),
           "FUSEDRNN_DATA_DIR": str(tmp_path / "empty")}
    result = run_script("--rehearse-on-cpu", "--only", "sentiment", env=env)
    assert result.returncode == 2
    assert "missing-data" in result.stdout and "--prepare-data" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("GPU CHECK INCOMPLETE")


# --- the report on its own -------------------------------------------------------------------

def write_work(work, steps, junit=None):
    work.mkdir(parents=True, exist_ok=True)
    (work / "steps.tsv").write_text("".join(f"{n}\t{s}\t3\t{d}\n" for n, s, d in steps))
    if junit:
        (work / "junit_parity_per_step.xml").write_text(
            '<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="0" failures="{f}" skipped="{s}" '
            'tests="{t}"></testsuite></testsuites>'.format(**junit))


@pytest.mark.parametrize("statuses,code,verdict", [
    (["ok", "ok", "absent"], 0, "PASSED"),
    (["ok", "FAILED", "ok"], 1, "FAILED: b"),
    (["ok", "TIMEOUT", "skipped"], 1, "FAILED: b"),
    (["ok", "ok", "missing-data"], 2, "INCOMPLETE"),
    (["ok", "skipped", "ok"], 2, "INCOMPLETE"),
    ([], 1, "FAILED: no step ran"),
])
def test_report_verdict_and_exit_status(tmp_path, capsys, statuses, code, verdict):
    write_work(tmp_path / "w", [(n, s, "why") for n, s in zip("abc", statuses)],
               junit={"t": 10, "f": 1, "s": 2})
    assert gpu_report.main([str(tmp_path / "w"), str(tmp_path / "o"), "--elapsed", "7"]) == code
    printed = capsys.readouterr().out.rstrip().splitlines()
    assert printed[-1].startswith("GPU CHECK " + verdict)
    report = json.loads((tmp_path / "o" / "gpu_report.json").read_text())
    assert report["verdict"]["exit_status"] == code
    assert report["parity"]["per_step"] == {"tests": 10, "failures": 1, "errors": 0, "skipped": 2, "passed": 7}
    md = (tmp_path / "o" / "gpu_report.md").read_text()
    assert "| per_step | 10 | 7 | 1 | 0 | 2 |" in md


# --- the smoke check and the sanitizer workload on their own ---------------------------------

@pytest.mark.parametrize("info,paths", [
    ({"cuda": True}, ["per_step"]),
    ({"cuda": False}, []),
    ({"cuda": True, "cuda_paths": ["per_step", "persistent"]}, ["per_step", "persistent"]),
    ({"cuda": True, "cuda_paths": "per_step,persistent"}, ["per_step", "persistent"]),
    ({"cuda": True, "cuda_paths": {"per_step": True, "persistent": True}}, ["per_step", "persistent"]),
])
def test_smoke_knows_which_cuda_paths_are_built(info, paths):
    assert gpu_smoke.available_cuda_paths(info) == paths


@pytest.mark.skipif(not fusedrnn.backends()["compiled"], reason="compiled operators not loaded")
def test_smoke_passes_on_the_cpu_kernels_and_fails_a_wrong_op(tmp_path, monkeypatch, capsys):
    assert gpu_smoke.main(["--device", "cpu", "--dtypes", "float64", "--json", str(tmp_path / "s.json")]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert len(rows) == 2 * len(gpu_smoke.GATES) * len(gpu_smoke.SIZES) and all(r["ok"] for r in rows)
    # A forward op that is off by a little in one output must be caught.
    real = gpu_smoke.reference_forward
    monkeypatch.setattr(gpu_smoke, "reference_forward",
                        lambda cell, args, reverse: [t * (1 + 1e-6) for t in real(cell, args, reverse)])
    assert gpu_smoke.main(["--device", "cpu", "--dtypes", "float64"]) == gpu_smoke.EXIT_WRONG


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a GPU")
def test_smoke_and_sanitizer_workload_say_why_cuda_cannot_run(capsys):
    assert gpu_smoke.main(["--device", "cuda"]) == gpu_smoke.EXIT_NO_CUDA
    assert "CUDA cannot run: torch.cuda.is_available() is False" in capsys.readouterr().out
    assert sanitize_cuda.main(["--device", "cuda"]) == 2
    assert "CUDA cannot run" in capsys.readouterr().out


# --- FUSEDRNN_REQUIRE_CUDA: a CUDA test that skips is a failure ------------------------------

@pytest.mark.skipif(conftest.CUDA, reason="checks what happens where CUDA cannot run")
def test_require_cuda_stops_the_session_where_cuda_cannot_run():
    env = {**os.environ, "FUSEDRNN_REQUIRE_CUDA": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/test_cuda.py::test_non_default_stream"], capture_output=True, text=True,
                            timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 3, result.stdout[-2000:]
    assert "FUSEDRNN_REQUIRE_CUDA=1 but CUDA cannot run" in result.stdout + result.stderr


def _report_of(outcome, nodeid, longrepr, wasxfail=None):
    report = pytest.TestReport(nodeid, ("f.py", 1, "t"), {}, outcome, longrepr, "setup")
    if wasxfail is not None:
        report.wasxfail = wasxfail
    return report


@pytest.mark.parametrize("nodeid,require,outcome", [
    ("tests/test_parity.py::test_x[lstm-cuda]", True, "failed"),
    ("tests/test_cuda.py::test_non_default_stream", True, "failed"),
    ("tests/test_parity.py::test_x[lstm-cpu]", True, "skipped"),
    ("tests/test_ops.py::test_x[cuda-lstm]", True, "failed"),
    ("tests/test_gpu_check.py::test_smoke_and_sanitizer_workload_say_why_cuda_cannot_run", True, "skipped"),
    ("tests/test_parity.py::test_x[lstm-cuda]", False, "skipped"),
])
def test_require_cuda_turns_a_cuda_skip_into_a_failure(monkeypatch, nodeid, require, outcome):
    monkeypatch.setattr(conftest, "REQUIRE_CUDA", require)
    report = _report_of("skipped", nodeid, ("f.py", 1, "Skipped: needs an NVIDIA GPU"))

    class Item:
        pass

    item = Item()
    item.nodeid = nodeid
    hook = conftest.pytest_runtest_makereport(item, None)
    next(hook)

    class Outcome:
        def get_result(self):
            return report

    with pytest.raises(StopIteration):
        hook.send(Outcome())
    assert report.outcome == outcome
    if outcome == "failed":
        assert "Skipped: needs an NVIDIA GPU" in str(report.longrepr)
