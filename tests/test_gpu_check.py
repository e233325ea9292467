"""benchmarks/gpu_check.sh and its Python steps, checked without a GPU: the plan (every step, in
order, each with a time limit, CUDA skips made failures, sanitizers limited to our kernels), a
rehearsal of the script on the CPU kernels (step bookkeeping, report, exit status, what lands in
$OUT), the smoke check and the report on their own, and the FUSEDRNN_REQUIRE_CUDA gate."""

import glob
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

# The order issue 13 asks for: build, smoke of every op on both paths, kernel vs emulation, parity
# subset, the sentiment-shape benchmark of both paths vs cuDNN, then the rest.
QUICK_STEPS = ["machine", "build", "loaded", "smoke-per_step", "smoke-persistent", "kernel-vs-emulation",
               "parity-per_step", "parity-persistent", "bench-sentiment-float32-per_step",
               "bench-sentiment-float32-persistent", "bidirectional-sentiment", "sentiment", "bench-sentiment-bfloat16-per_step",
               "bench-skewed-float32-per_step", "bench-sentiment-bfloat16-persistent",
               "bench-skewed-float32-persistent", "bench-fastrnns-float32-per_step",
               "bench-fastrnns-bfloat16-per_step", "sanitizer-probe", "memcheck-per_step", "memcheck-persistent",
               "racecheck-persistent", "initcheck-auto"]


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
    full_steps = ["machine", "build", "loaded", "kernel-vs-emulation", "parity-per_step", "parity-persistent"]
    assert list(steps) == (QUICK_STEPS if mode == "quick" else full_steps)
    for name, line in steps.items():
        assert re.match(r"limit +\d+s expect +\d+s \[[\w-]+\]: ", line), f"{name} has no time limit: {line}"
        assert not re.search(r"benchmarks/\w+\.py", line), f"{name} runs a file, not a module: {line}"
    assert "'setup.py' 'build_ext' '--inplace'" in steps["build"]
    for path, env_path in (("per_step", "per_step"), ("persistent", "auto")):
        parity = steps[f"parity-{path}"]
        assert "'FUSEDRNN_REQUIRE_CUDA=1'" in parity and f"'FUSEDRNN_CUDA_PATH={env_path}'" in parity
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


NOT_PERSISTENT_CONFIGS = ("fastrnns",)  # benchmarks.layers configs with H > 128


def test_no_step_forces_the_persistent_path_on_a_layer_it_cannot_run():
    """FUSEDRNN_CUDA_PATH=persistent raises on float64, proj_size and H > 128: only benchmark steps
    of H=128 configurations may force it; the smoke, parity and sanitizer steps of the persistent
    path run under auto (or force it per eligible layer, inside the Python step)."""
    steps = planned_steps(run_script("--dry-run").stdout)
    forcing = [name for name, line in steps.items() if "FUSEDRNN_CUDA_PATH=persistent" in line]
    assert forcing and all(name.startswith("bench-") for name in forcing), forcing
    for name in forcing:
        config = re.search(r"'--configs' '([^']*)'", steps[name]).group(1)
        assert config not in NOT_PERSISTENT_CONFIGS, f"{name} forces persistent on {config} (H=512)"
    assert "FUSEDRNN_CUDA_PATH" not in steps["smoke-persistent"] and "'--path' 'persistent'" in steps["smoke-persistent"]
    assert "'FUSEDRNN_CUDA_PATH=auto'" in steps["parity-persistent"]


def test_each_benchmark_step_writes_one_configuration_to_its_own_file():
    """One configuration per process and results file: a configuration that fails (or times
    out) loses no other's rows; the sentiment shape runs first, on both paths."""
    steps = planned_steps(run_script("--dry-run").stdout)
    bench = {n: line for n, line in steps.items() if n.startswith("bench-")}
    outs = [re.search(r"'--out' '([^']*)'", line).group(1) for line in bench.values()]
    assert len(set(outs)) == len(outs) == len(bench)
    for line in bench.values():
        assert "," not in re.search(r"'--configs' '([^']*)'", line).group(1)
    assert list(bench)[:2] == ["bench-sentiment-float32-per_step", "bench-sentiment-float32-persistent"]
    assert "'--configs' 'fastrnns'" in bench["bench-fastrnns-float32-per_step"]


def test_quick_run_compares_the_real_kernel_with_the_emulation_and_gates_skips():
    steps = planned_steps(run_script("--dry-run").stdout)
    line = steps["kernel-vs-emulation"]
    assert "'tests/test_persistent.py'" in line and "'-k' 'cuda'" in line
    assert "'FUSEDRNN_REQUIRE_CUDA=1'" in line and "'--gated-pytest'" in line
    order = list(steps)
    assert order.index("smoke-persistent") < order.index("kernel-vs-emulation") < order.index("parity-per_step")


def test_rehearsal_kernel_vs_emulation_passes_and_fails_when_a_selected_test_skips(tmp_path):
    """tests/conftest.py does not count test_persistent.py's kernel tests as CUDA tests, so the
    step itself must fail when one skips (here: a CUDA-only test on a machine without CUDA)."""
    env = {"OUT": str(tmp_path / "out"), "GPU_CHECK_WORK": str(tmp_path / "work")}
    result = run_script("--rehearse-on-cpu", "--only", "emulation", env=env)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "junit gate: 24 tests, none skipped" in result.stdout
    env["GPU_CHECK_EMULATION_K"] = "test_cuda_path_switch_errors"
    result = run_script("--rehearse-on-cpu", "--only", "emulation", env=env)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "junit gate: FAILED, 1 tests, 1 skipped" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("GPU CHECK FAILED: kernel-vs-emulation")


REFUSING_SANITIZER = """#!/usr/bin/env bash
# What compute-sanitizer said under gVisor: it refuses the device, the program fails at its first allocation.
echo "========= COMPUTE-SANITIZER"
echo "========= Error: Device not supported"
echo "========= Error: CUDA error 999 at the first allocation"
exit 1
"""

# Runs the probe (and the option probe, `true`) for real; records every other command line and
# reports a finding in the persistent path's memcheck when FIND is set.
RECORDING_SANITIZER = """#!/usr/bin/env bash
echo "$*" >> "$SANITIZER_LOG"
args=("$@")
while [ $# -gt 0 ]; do
  case $1 in --tool|--kernel-name|--filter|--print-limit|--error-exitcode|--racecheck-report) shift 2 ;; -*) shift ;; *) break ;; esac
done
case " ${args[*]} " in
  *" --probe "*|*" true ") "$@"; exit $? ;;
  *"--tool memcheck"*"--path persistent"*) if [ -n "${FIND:-}" ]; then echo "========= Invalid __global__ write of size 4"; echo "========= ERROR SUMMARY: 1 error"; exit 1; fi ;;
esac
echo "========= ERROR SUMMARY: 0 errors"
"""


def stub_sanitizer(tmp_path, text):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "compute-sanitizer").write_text(text)
    (bin_dir / "compute-sanitizer").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
            "GPU_CHECK_WORK": str(tmp_path / "work"), "SANITIZER_LOG": str(tmp_path / "sanitizer.log")}


def test_a_sanitizer_that_refuses_the_device_is_unavailable_not_failed(tmp_path):
    result = run_script("--rehearse-on-cpu", "--only", "sanitizers", env=stub_sanitizer(tmp_path, REFUSING_SANITIZER))
    assert result.returncode == 0, result.stdout[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_report.json").read_text())
    assert [(s["step"], s["status"]) for s in report["steps"]] == [
        (n, "unavailable") for n in ("memcheck-per_step", "memcheck-persistent", "racecheck-persistent",
                                     "initcheck-auto")]
    assert "Error: Device not supported" in report["steps"][0]["detail"]
    assert result.stdout.splitlines()[-1].startswith("GPU CHECK PASSED (not checked here: memcheck-per_step")


@pytest.mark.parametrize("finding", [False, True])
def test_sanitizer_steps_run_our_workload_on_each_path_and_fail_on_a_finding(tmp_path, finding):
    env = stub_sanitizer(tmp_path, RECORDING_SANITIZER)
    if finding:
        env["FIND"] = "1"
    result = run_script("--rehearse-on-cpu", "--only", "sanitizers", env=env)
    assert result.returncode == (1 if finding else 0), result.stdout[-3000:]
    statuses = {s["step"]: s["status"] for s in json.loads((tmp_path / "out" / "gpu_report.json").read_text())["steps"]}
    assert statuses == {"memcheck-per_step": "ok", "memcheck-persistent": "FAILED" if finding else "ok",
                        "racecheck-persistent": "ok", "initcheck-auto": "ok"}
    runs = [line for line in (tmp_path / "sanitizer.log").read_text().splitlines() if "--path" in line]
    assert len(runs) == 4
    for tool, path, ours in (("memcheck", "per_step", True), ("memcheck", "persistent", True),
                             ("racecheck", "persistent", True), ("initcheck", "auto", False)):
        line = next(r for r in runs if f"--tool {tool}" in r and r.endswith(f"--path {path}"))
        assert "-m benchmarks.sanitize_cuda --device cpu" in line
        assert ("--kernel-name kns=fusedrnn" in line) == ours


def test_the_budget_cuts_whole_steps_and_prints_the_follow_up_command(tmp_path):
    # 39 s less the 20 s report reserve: the machine step (expects 10 s) starts; after it at most 19 s
    # are left (bash's SECONDS counts whole seconds, so even a step under 1 s leaves no more), so the
    # rehearsal bench (expects 20 s) is cut before it starts, however fast the machine is (with 45 s
    # it started on a quiet machine and finished inside the cut limit).
    env = {"OUT": str(tmp_path / "out"), "GPU_CHECK_WORK": str(tmp_path / "work"), "GPU_CHECK_BUDGET_S": "39"}
    result = run_script("--rehearse-on-cpu", "--only", "machine,emulation,bench", env=env)
    assert result.returncode == 2, result.stdout[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_report.json").read_text())
    assert [(s["step"], s["status"]) for s in report["steps"]] == [
        ("machine", "ok"), ("kernel-vs-emulation", "skipped"), ("bench-sentiment-float32-cpu", "skipped"),
        ("bidirectional-sentiment", "skipped")]
    last = result.stdout.rstrip().splitlines()
    assert last[-1].startswith("GPU CHECK INCOMPLETE")
    assert last[-2].startswith("FOLLOW-UP (what the budget cut; device tool timeout_s ")
    assert last[-2].endswith("bash benchmarks/gpu_check.sh --only build,loaded,emulation,bench")
    budget = int(re.search(r"GPU_CHECK_BUDGET_S=(\d+)", last[-2]).group(1))
    assert budget == gpu_report.FOLLOW_UP_OVERHEAD_S + 150 + 120 + 120  # the three cut steps' own limits


@pytest.mark.parametrize("inherited,ours,want", [("3.5;5.0", None, "9.0"), ("3.5;5.0", "8.0;9.0", "8.0;9.0")])
def test_the_check_builds_for_its_own_arch_list_whatever_the_image_sets(tmp_path, inherited, ours, want):
    env = {"OUT": str(tmp_path / "out"), "GPU_CHECK_WORK": str(tmp_path / "work"), "TORCH_CUDA_ARCH_LIST": inherited}
    if ours:
        env["FUSEDRNN_CUDA_ARCHS"] = ours
    result = run_script("--rehearse-on-cpu", "--only", "machine", env=env)
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"build for: FUSEDRNN_CUDA_ARCHS={want} TORCH_CUDA_ARCH_LIST={want}" in result.stdout


def _cuda_toolkit():
    return next((d for d in [os.environ.get("CUDA_HOME", "")] + sorted(glob.glob("/usr/local/cuda*"))
                 if d and os.path.isfile(os.path.join(d, "bin", "nvcc"))), None)


@pytest.mark.skipif(_cuda_toolkit() is None, reason="setup.py plans the CUDA build only where a CUDA toolkit is")
@pytest.mark.parametrize("inherited,ours,want", [("7.0;7.5", "9.0", "9.0"), ("7.0;7.5", None, "7.0;7.5"),
                                                 (None, None, "9.0+PTX")])
def test_setup_lets_fusedrnn_cuda_archs_win_over_an_inherited_torch_cuda_arch_list(inherited, ours, want):
    """setup.py, run with setuptools.setup replaced: the arch list its CUDA extension is built for."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "FUSEDRNN_CUDA_ARCHS")}
    env.update({"FUSEDRNN_CUDA": "1", "CUDA_HOME": _cuda_toolkit()})
    env.update({k: v for k, v in (("TORCH_CUDA_ARCH_LIST", inherited), ("FUSEDRNN_CUDA_ARCHS", ours)) if v})
    code = ("import runpy, sys, setuptools; kw = {}; setuptools.setup = lambda **k: kw.update(k); "
            "sys.argv = ['setup.py', 'build_ext']; runpy.run_path('setup.py', run_name='__main__'); "
            "print('ARCHS', dict(kw['ext_modules'][0].define_macros)['FUSEDRNN_CUDA_ARCHS'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f'ARCHS "{want}"' in result.stdout


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
    (["ok", "ok", "absent"], 0, "PASSED (not checked here: c (absent))"),
    (["ok", "unavailable", "ok"], 0, "PASSED (not checked here: b (unavailable))"),
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


@pytest.mark.parametrize("cell,size,dtype,eligible", [
    ("gru", "h128", torch.float32, True), ("lstm", "tiny", torch.bfloat16, True),
    ("lstm_proj", "h128", torch.float32, False), ("rnn_tanh", "tiny", torch.float64, False),
])
def test_smoke_knows_which_layers_the_persistent_kernel_can_run(cell, size, dtype, eligible):
    assert gpu_smoke.persistent_eligible(cell, size, dtype) is eligible


def test_smoke_tells_the_forward_path_from_the_kernel_names():
    persistent = "void fusedrnn::persistent::forward_kernel<fusedrnn::GruCell, float>(fusedrnn::persistent::ForwardParams<float>)"
    per_step = "void fusedrnn::step_kernel<fusedrnn::ForwardStep<fusedrnn::GruCell, float> >(...)"
    assert gpu_smoke.forward_path_of([per_step, persistent, "ampere_sgemm_32x32"]) == "persistent"
    assert gpu_smoke.forward_path_of([per_step, "ampere_sgemm_32x32"]) == "per_step"
    assert gpu_smoke.forward_path_of([]) == "unknown"
    backward = "void fusedrnn::persistent::backward_kernel<fusedrnn::GruCell, float>(...)"
    assert gpu_smoke.backward_path_of([persistent, backward, per_step]) == "persistent"
    assert gpu_smoke.backward_path_of([persistent, per_step]) == "per_step"
    assert gpu_smoke.backward_path_of([]) == "unknown"
    fill = "fusedrnn::persistent::fill_schedule_kernel(fusedrnn::persistent::ScheduleChunk)"
    assert gpu_smoke.schedule_on_device([persistent, fill]) and not gpu_smoke.schedule_on_device([persistent])


PERSISTENT_GRU = {"fusedrnn::persistent::forward_kernel<G>", "fusedrnn::persistent::backward_kernel<G>",
                  "fusedrnn::persistent::fill_schedule_kernel(C)"}


@pytest.mark.parametrize("cell,dtype,kernels,error", [
    ("gru", torch.float32, PERSISTENT_GRU, None),
    ("gru", torch.float32, {"fusedrnn::step_kernel<G>"}, "auto should run persistent here"),
    ("gru", torch.float32, PERSISTENT_GRU - {"fusedrnn::persistent::backward_kernel<G>"},
     "auto should run persistent here (eligible for the persistent kernel), it ran forward persistent, backward "
     "per_step"),
    ("gru", torch.float32, PERSISTENT_GRU - {"fusedrnn::persistent::fill_schedule_kernel(C)"},
     "schedule was not written by the schedule kernel"),
    ("lstm_proj", torch.float32, {"fusedrnn::step_kernel<L>"}, None),
    ("gru", torch.float64, {"fusedrnn::step_kernel<G>"}, None),
    ("lstm_proj", torch.float32, {"fusedrnn::persistent::forward_kernel<L>"}, "auto should run per_step here"),
])
def test_smoke_persistent_runs_under_auto_and_checks_the_path_taken(monkeypatch, cell, dtype, kernels, error):
    """--path persistent never forces the path (that raises on float64 and proj_size): every
    check runs under auto, and the kernels that ran must be the persistent forward and backward
    (with the ragged schedule written on the device) exactly where the persistent kernels can run."""
    seen = []
    monkeypatch.setattr(gpu_smoke, "check_one", lambda *a: seen.append(os.environ["FUSEDRNN_CUDA_PATH"]) or 1e-7)
    monkeypatch.setattr(gpu_smoke, "cuda_kernels_of", lambda fn: (fn(), kernels))
    monkeypatch.delenv("FUSEDRNN_CUDA_PATH", raising=False)
    err, taken, path_error = gpu_smoke.run_config(cell, "h128", dtype, False, "cuda", "persistent", None)
    assert seen == ["auto"] and err == 1e-7
    assert (path_error is None) if error is None else error in path_error


def test_smoke_persistent_forces_eligible_layers_when_the_profiler_sees_no_kernel(monkeypatch):
    seen = []
    monkeypatch.setattr(gpu_smoke, "check_one", lambda *a: seen.append(os.environ["FUSEDRNN_CUDA_PATH"]) or 1e-7)
    monkeypatch.setattr(gpu_smoke, "cuda_kernels_of", lambda fn: (fn(), set()))
    monkeypatch.delenv("FUSEDRNN_CUDA_PATH", raising=False)
    _, taken, path_error = gpu_smoke.run_config("gru", "h128", torch.float32, False, "cuda", "persistent", None)
    assert seen == ["auto", "persistent"] and path_error is None and taken.startswith("persistent (forced")
    seen.clear()
    _, taken, path_error = gpu_smoke.run_config("gru", "h128", torch.float64, False, "cuda", "persistent", None)
    assert seen == ["auto"] and path_error is None


def test_sanitizer_workload_forces_persistent_only_where_it_can_run(monkeypatch):
    """The persistent path's sanitizer runs: the proj_size module under auto (forcing raises)."""
    monkeypatch.setattr(sanitize_cuda, "CELLS", [(fusedrnn.LSTM, {}), (fusedrnn.LSTM, {"proj_size": 5})])
    monkeypatch.setattr(sanitize_cuda, "HIDDEN_SIZES", (6,))
    monkeypatch.delenv("FUSEDRNN_CUDA_PATH", raising=False)
    per_dtype = ["persistent"] * 2 + ["auto"] * 2 + ["persistent"]
    assert sanitize_cuda.run("cpu", "persistent") == per_dtype * 2
    assert sanitize_cuda.run("cpu", "per_step") == ["per_step"] * 10
    assert sanitize_cuda.layer_path("persistent", {}, 256, torch.float32) == "auto"
    assert sanitize_cuda.main(["--device", "cpu", "--probe"]) == 0


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


@pytest.mark.skipif(not fusedrnn.backends()["compiled"], reason="compiled operators not loaded")
def test_smoke_two_direction_check_runs_both_ops_and_counts_their_kernels(monkeypatch):
    """The smoke's two-direction check, on the CPU (the test-only ops' runner implementations, the
    profiler replaced by made-up kernel counts): the forward's saved tensors feed the backward op,
    and the counts are read per kernel kind."""
    calls = []

    def fake_counts(fn):
        calls.append(fn())
        if len(calls) == 1:
            return calls[-1], {"fusedrnn::persistent::forward_kernel<G>": 1, "ampere_sgemm": 2}
        return calls[-1], {"fusedrnn::persistent::backward_kernel<G>": 2}

    monkeypatch.setattr(gpu_smoke, "cuda_kernel_counts_of", fake_counts)
    seen, want = gpu_smoke.two_direction_launches(torch.Generator().manual_seed(0), device="cpu", sm_count=132)
    assert seen == (1, 2) and want == (1, 1)
    assert len(calls) == 2 and len(calls[0]) == 10 and len(calls[1]) == 6
    assert all(torch.isfinite(t).all() for t in calls[1])
    assert gpu_smoke.two_direction_launches(torch.Generator().manual_seed(0), device="cpu", sm_count=60)[1] == (2, 2)


def test_bidirectional_step_confirms_the_two_direction_route_and_times_both_ways(tmp_path, monkeypatch):
    """benchmarks.bidirectional (the bench group's bidirectional-sentiment step) on the CPU: the op
    pair on the kernel runner, whose launches it counts (one forward and one backward kernel for both
    directions), timed against one direction at a time; a count that is not the two-direction
    route's fails it. On a GPU it counts the profiler's kernels at the sentiment shape."""
    from benchmarks import bidirectional

    steps = planned_steps(run_script("--dry-run").stdout)
    assert "'-m' 'benchmarks.bidirectional' '--device' 'cuda'" in steps["bidirectional-sentiment"]
    out = tmp_path / "bidirectional.json"
    assert bidirectional.main(["--device", "cpu", "--cells", "gru,lstm", "--reps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["cell"] for r in rows] == ["gru", "lstm"]
    for r in rows:
        assert r["confirmed"] and r["kernels_seen"]["two_direction"] == [1, 1], r
        assert r["two_direction_train_ms_median"] > 0 and r["per_direction_train_ms_median"] > 0
    monkeypatch.setattr(bidirectional, "kernel_counts", lambda fn, device: (fn(), (2, 2))[1])
    assert bidirectional.main(["--device", "cpu", "--cells", "gru", "--reps", "1"]) == 1
