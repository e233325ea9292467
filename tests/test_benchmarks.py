"""The benchmarks' own arithmetic and bookkeeping: the FLOP formula (against torch's FLOP counter
on torch.nn), the peak-memory tracker, the FMA peak loop, and where results are saved (a run never
replaces the published tables unless asked to)."""

import json
import os
import shutil
import subprocess

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import common, layers, peak

NN = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}


@pytest.fixture
def result_dirs(tmp_path, monkeypatch):
    """Published and unpublished results in a temporary folder, never in the checkout."""
    published, runs = tmp_path / "results", tmp_path / "runs"
    monkeypatch.setattr(common, "RESULTS_DIR", str(published))
    monkeypatch.setattr(common, "RUNS_DIR", str(runs))
    return published, runs


@pytest.mark.parametrize("cell,proj_size", [("lstm", 0), ("lstm", 2), ("gru", 0), ("rnn", 0)])
@pytest.mark.parametrize("ragged", [False, True])
def test_flop_formula_counts_what_torch_nn_computes(cell, proj_size, ragged):
    # float64 keeps torch.nn on its decomposed path (no oneDNN), whose GEMMs the counter sees.
    I, H, T, B = 7, 5, 6, 3
    kwargs = {"proj_size": proj_size} if proj_size else {}
    m = NN[cell](I, H, dtype=torch.float64, **kwargs)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 2, 4]) if ragged else torch.full((B,), T)
    # Initial states that need gradients: then backward computes dh for every step, as ours does.
    h0 = torch.randn(1, B, proj_size or H, dtype=torch.float64, requires_grad=True)
    hx = (h0, torch.randn(1, B, H, dtype=torch.float64, requires_grad=True)) if cell == "lstm" else h0
    with FlopCounterMode(display=False) as forward:
        out, _ = m(pack_padded_sequence(x, lengths, enforce_sorted=False), hx)
    with FlopCounterMode(display=False) as backward:
        out.data.sum().backward()
    tokens = int(lengths.sum())
    assert layers.flops(cell, tokens, I, H, proj_size) == forward.get_total_flops() > 0
    assert layers.flops(cell, tokens, I, H, proj_size, training=True) == (
        forward.get_total_flops() + backward.get_total_flops())


def test_peak_memory_tracker_sees_the_high_water_mark_not_the_sum():
    mib = 1 << 20

    def step():
        a = torch.empty(mib // 4)        # 1 MiB of float32
        b = torch.empty(2 * mib // 4)    # 2 MiB: 3 MiB live
        del a, b
        c = torch.empty(mib // 4)        # 1 MiB, after both were freed
        del c

    peak_bytes = layers._cpu_peak_bytes(step)
    assert 3 * mib <= peak_bytes < 3 * mib + 64 * 1024  # small tensors of the profiler itself aside


def test_peak_step_memory_grows_with_the_sequence():
    gru = torch.nn.GRU(8, 16)

    def measure(T):
        x = torch.randn(T, 4, 8, requires_grad=True)
        return layers.peak_step_memory(gru, lambda: gru(x)[0].sum().backward(), x, "cpu")

    short, long = measure(10), measure(200)
    # At least what torch.nn keeps for backward: the output, 200 x 4 x 16 floats.
    assert long > short and long - short >= 190 * 4 * 16 * 4


def test_result_names_of_partial_runs_differ_from_the_full_table():
    assert layers.result_name("cpu", "float32", list(layers.CONFIGS), list(layers.CELLS)) == "layers_cpu_float32"
    assert layers.result_name("cpu", "float32", ["sentiment"], list(layers.CELLS)) == "layers_cpu_float32_sentiment"
    assert layers.result_name("cuda", "bfloat16", ["skewed"], ["gru"]) == "layers_cuda_bfloat16_skewed_gru"


def test_a_run_goes_to_an_ignored_folder_under_a_new_name(result_dirs):
    published, runs = result_dirs
    first = common.output_base("layers_cpu_float32")
    common.save(first, {"run": 1}, "one")
    second = common.output_base("layers_cpu_float32")
    common.save(second, {"run": 2}, "two")
    assert os.path.dirname(first) == os.path.dirname(second) == str(runs)
    assert first != second and os.path.basename(first).startswith("layers_cpu_float32_")
    assert json.loads(open(first + ".json").read()) == {"run": 1}
    assert not published.exists()
    if shutil.which("git"):  # git itself must ignore the folder, wherever it sits in a checkout
        subprocess.run(["git", "init", "-q", str(runs.parent)], check=True)
        status = subprocess.run(["git", "-C", str(runs.parent), "status", "--porcelain", "--untracked-files=all"],
                                capture_output=True, text=True, check=True).stdout
        assert "runs/" not in status


def test_publish_and_an_explicit_folder_use_the_plain_name(result_dirs, tmp_path):
    published, _ = result_dirs
    assert common.output_base("peak_cpu", publish=True) == str(published / "peak_cpu")
    assert common.output_base("gpu_layers_float32", str(tmp_path / "out")) == str(tmp_path / "out" / "gpu_layers_float32")


def test_partial_layers_run_leaves_the_published_table_alone(result_dirs, monkeypatch):
    published, runs = result_dirs
    published.mkdir()
    (published / "layers_cpu_float32.md").write_text("the full table")
    monkeypatch.setitem(layers.CONFIGS, "tiny", (4, 2, 3, 5, "full"))
    rows = layers.main(["--configs", "tiny", "--cells", "gru", "--reps", "1", "--peak-gflops", "100"])
    assert (published / "layers_cpu_float32.md").read_text() == "the full table"
    [saved] = [p for p in runs.iterdir() if p.name.endswith(".json")]
    assert saved.name.startswith("layers_cpu_float32_tiny_gru_")
    row = json.loads(saved.read_text())["rows"][0]
    assert row == pytest.approx(rows[0])
    work = layers.flops("gru", 4 * 2, 3, 5, training=True)
    assert row["train_fused_gflops"] == pytest.approx(work / (row["train_fused_ms"] * 1e-3) / 1e9)
    assert row["train_nn_peak_mb"] > 0 and row["train_fused_peak_mb"] > 0
    assert "% of peak" in (runs / saved.name.replace(".json", ".md")).read_text()


def test_unknown_configuration_is_refused():
    with pytest.raises(SystemExit):
        layers.parse_args(["--configs", "sentimental"])


def _fma_library():
    try:
        return peak._library()
    except peak.PeakUnavailable as e:
        pytest.skip(f"no C compiler to build the FMA loop: {e}")


def test_fma_loop_runs_every_iteration():
    # The loop's result is the recurrence acc <- acc * 0.999999 + 1e-7 from acc_k = 0.001 k, summed
    # over 12 accumulators and every lane: a loop the compiler cut short would give another sum.
    lib = _fma_library()
    isa = lib.fma_isa()
    n = 5000
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # the constants as the loop holds them
    a, b = f32(0.999999), f32(1e-7)
    acc = [f32(0.001 * k) for k in range(12)]
    for _ in range(n):
        acc = [v * a + b for v in acc]  # in float64: the loop's float32 rounding stays far below 1e-4
    expected = sum(acc) * lib.lanes(isa)
    assert lib.fma_loop(isa, n) == pytest.approx(expected, rel=1e-4)
    # 10% fewer iterations moves the sum by about 1.5%.
    assert lib.fma_loop(isa, n - 500) != pytest.approx(expected, rel=1e-3)
    assert peak.flops_per_iteration(lib, isa) == 2 * 12 * {2: 16, 1: 8, 0: 4}[isa]


def test_peak_benchmark_saves_its_tables(tmp_path):
    _fma_library()
    result = peak.main(["--reps", "1", "--gemm-size", "64", "--results-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "peak_cpu.json").read_text())
    assert [f["threads"] for f in saved["fma"]] == [f["threads"] for f in result["fma"]]
    assert saved["fma"][0]["threads"] == 1 and all(f["gflops_best"] > 0 for f in saved["fma"])
    assert saved["mm"][0]["n"] == 64 and saved["machine"]["torch"] == torch.__version__
    assert "FMA peak" in (tmp_path / "peak_cpu.md").read_text()
