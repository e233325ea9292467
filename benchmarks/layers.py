"""Micro-benchmark: torch.nn against fusedrnn, LSTM / GRU / RNN, inference (no_grad forward)
and training (forward + backward), in one process, interleaved, medians.

    python -m benchmarks.layers                 # CPU, all configurations
    python -m benchmarks.layers --device cuda   # GPU (cuDNN baseline, TF32 off)
    python -m benchmarks.layers --configs sentiment,skewed --cells gru
    python -m benchmarks.layers --publish       # replace the published table the README links

Each row gives the ratio torch.nn time / fusedrnn time (> 1: fusedrnn is faster), the FLOP rate
each side achieves and its fraction of this machine's float32 peak, and the peak memory of one
training step on each side.

FLOPs (GEMM work only; `flops` below): per layer and direction, over the N real tokens, forward
= input projection 2*N*I*G*H + recurrence 2*N*P*G*H (+ LSTM projection 2*N*H*P), with G gates
(LSTM 4, GRU 3, RNN 1) and P the recurrent state's size (proj_size, else H). Backward does twice
the forward's GEMM work (dX and dW_ih; dh and dW_hh), so a training step is 3x forward. The
pointwise work (activations, state updates) is O(N*G*H), under 1/(I+P) of the GEMMs', and not
counted. The peak is the all-threads register-only FMA loop of benchmarks/peak.py, measured at the
start of the run with torch's thread count (or given with --peak-gflops); on the GPU only a
given --peak-gflops is used.

Peak memory: the most memory allocated at once during one training step (forward + backward,
parameter gradients set to None before it), above what was allocated when it started. CUDA:
torch.cuda.max_memory_allocated. CPU: the torch profiler's memory events (profile_memory=True),
which record every allocation through PyTorch's CPU allocator with the running total; memory
that a library allocates on its own (oneDNN or MKL scratch buffers) is not in it.

Streaming (`--configs streaming`): the small calls that streaming, RL and decoding code makes,
each its own row, in microseconds per call: every cell (LSTMCell, GRUCell, RNNCell) and every
one-step layer call (T=1) at B in {1, 8}, H in {64, 128, 256} (input size = H); LSTM/GRU/RNN at
T=20, B=1; a 2-layer GRU one-token step (T=1, B=1); and a generation loop, in which the state and
the output of each call are fed to the next, the way a decoder runs (`generation_loop` below is
the example). Each case runs without gradients (torch.no_grad) and as a training step (forward
+ backward of the output's sum into the parameters' gradients); torch.nn and fusedrnn in one
process, interleaved, medians of --reps runs of a batch of calls. Its table is published under
the CPU's name (layers_streaming_<device>_<dtype>_<cpu>), so each machine keeps its own.

Results: benchmarks/runs/layers_<...>_<time>.{json,md} (ignored by git) unless --publish
(benchmarks/results/) or --results-dir is given; the name says the device, dtype, and the
configurations and cells when not all of them ran, so a partial run never replaces the full table.
"""

import argparse
import json
import os
import sys
import tempfile
from typing import Callable, Dict, Optional

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn

from . import peak
from .common import compare, machine, markdown_table, output_base, save

# name: (T, B, input_size, hidden_size, lengths kind)
CONFIGS = {
    "sentiment": (100, 32, 100, 128, "full"),   # the sentiment model's GRU/LSTM
    "fastrnns": (100, 64, 512, 512, "full"),    # PyTorch's fastrnns default
    "small_batch": (100, 4, 100, 128, "full"),
    "long_seq": (1000, 16, 100, 128, "full"),
    "skewed": (200, 32, 100, 128, "skewed"),    # ragged lengths, mean ~T/4, packed
}
# The streaming configuration (see the module's docstring): its own rows, not a (T, B, I, H).
STREAMING = "streaming"
CELLS = {"lstm": (torch.nn.LSTM, fusedrnn.LSTM), "gru": (torch.nn.GRU, fusedrnn.GRU),
         "rnn": (torch.nn.RNN, fusedrnn.RNN)}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def flops(cell: str, tokens: int, input_size: int, hidden_size: int, proj_size: int = 0,
          training: bool = False) -> int:
    """GEMM FLOPs of one layer in one direction over `tokens` real tokens (see the module's
    docstring): forward 2*N*G*H*(I + P) [+ 2*N*H*P for LSTM's projection]; training 3x forward."""
    gate_rows = GATES[cell] * hidden_size
    state = proj_size or hidden_size
    forward = 2 * tokens * gate_rows * (input_size + state)
    if proj_size:
        forward += 2 * tokens * hidden_size * proj_size
    return 3 * forward if training else forward


def result_name(device: str, dtype: str, configs, cells) -> str:
    """layers_<device>_<dtype>, plus the configurations and cells when a run has not all of them."""
    name = f"layers_{device}_{dtype}"
    if list(configs) != list(CONFIGS):
        name += "_" + "-".join(configs)
    if list(cells) != list(CELLS):
        name += "_" + "-".join(cells)
    return name


def _cpu_peak_bytes(step: Callable[[], None]) -> int:
    """Peak bytes allocated through PyTorch's CPU allocator during `step`, above the level at
    its start: the running total ("Total Allocated") of the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    finally:
        os.remove(path)
    events = sorted((e for e in trace["traceEvents"] if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                    key=lambda e: e["ts"])
    if not events:
        return 0
    before = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in events) - before


def peak_step_memory(module: torch.nn.Module, step: Callable[[], None], x: torch.Tensor, device: str) -> int:
    """Peak bytes of one training step (see the module's docstring), gradients cleared first."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    return _cpu_peak_bytes(step)


def skewed_lengths(T: int, B: int, gen: torch.Generator) -> torch.Tensor:
    """Mostly short sequences, a few long ones (mean about T/4), one of full length."""
    lengths = (-torch.log(torch.rand(B, generator=gen)) * T / 4).clamp(1, T).long()  # exponential
    lengths[0] = T
    return lengths


def make_input(config: str, device: str, dtype, gen: torch.Generator):
    T, B, I, _, kind = CONFIGS[config]
    x = torch.randn(T, B, I, generator=gen, dtype=dtype).to(device)
    if kind == "skewed":
        lengths = skewed_lengths(T, B, gen)
        return x, lengths
    return x, None


def bench_one(cell: str, config: str, device: str, dtype, reps: int, gen: torch.Generator) -> dict:
    T, B, I, H, kind = CONFIGS[config]
    torch_cls, fused_cls = CELLS[cell]
    ref = torch_cls(I, H, device=device, dtype=dtype)
    ours = fused_cls(I, H, device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    x, lengths = make_input(config, device, dtype, gen)
    x.requires_grad_(True)

    def inputs():
        if lengths is None:
            return x
        return pack_padded_sequence(x, lengths, enforce_sorted=False)

    def infer(m):
        def run():
            with torch.no_grad():
                m(inputs())
        return run

    def train(m):
        def run():
            out, _ = m(inputs())
            data = out.data if hasattr(out, "batch_sizes") else out
            data.sum().backward()
        return run

    tokens = int(lengths.sum()) if lengths is not None else T * B
    row = {"cell": cell, "config": config, "T": T, "B": B, "I": I, "H": H, "tokens": tokens}
    for mode, make in (("infer", infer), ("train", train)):
        t = compare({"torch.nn": make(ref), "fusedrnn": make(ours)}, device, reps=reps)
        row[f"{mode}_nn_ms"] = t["torch.nn"] * 1e3
        row[f"{mode}_fused_ms"] = t["fusedrnn"] * 1e3
        row[f"{mode}_ratio"] = t["torch.nn"] / t["fusedrnn"]
        row[f"{mode}_fused_us_per_step"] = t["fusedrnn"] * 1e6 / T
        work = flops(cell, tokens, I, H, training=mode == "train")
        row[f"{mode}_gflop"] = work / 1e9
        row[f"{mode}_nn_gflops"] = work / t["torch.nn"] / 1e9
        row[f"{mode}_fused_gflops"] = work / t["fusedrnn"] / 1e9
    row["train_nn_peak_mb"] = peak_step_memory(ref, train(ref), x, device) / 2**20
    row["train_fused_peak_mb"] = peak_step_memory(ours, train(ours), x, device) / 2**20
    return row


def proportional_cost(cell: str, device: str, dtype, reps: int, gen: torch.Generator) -> dict:
    """fusedrnn on the skewed batch against the same batch at full length: the ratio of times
    should follow the ratio of tokens (DESIGN.md: cost in proportion to real tokens)."""
    T, B, I, H, _ = CONFIGS["skewed"]
    _, fused_cls = CELLS[cell]
    m = fused_cls(I, H, device=device, dtype=dtype)
    x = torch.randn(T, B, I, generator=gen, dtype=dtype).to(device)
    lengths = skewed_lengths(T, B, gen)

    def full():
        m(x)[0].sum().backward()

    def ragged():
        m(pack_padded_sequence(x, lengths, enforce_sorted=False))[0].data.sum().backward()

    t = compare({"full": full, "ragged": ragged}, device, reps=reps)
    return {"cell": cell, "token_fraction": float(lengths.sum()) / (T * B), "time_fraction": t["ragged"] / t["full"]}


# ---- streaming: small calls --------------------------------------------------------------------

CELL_MODULES = {"lstm": (torch.nn.LSTMCell, fusedrnn.LSTMCell), "gru": (torch.nn.GRUCell, fusedrnn.GRUCell),
                "rnn": (torch.nn.RNNCell, fusedrnn.RNNCell)}


def streaming_cases(cells):
    """(kind, cell, B, H, T, layers) of every streaming row, in table order."""
    cases = []
    for kind in ("cell", "layer"):
        for cell in cells:
            for batch in (1, 8):
                for hidden in (64, 128, 256):
                    cases.append((kind, cell, batch, hidden, 1, 1))
    for cell in cells:
        for hidden in (64, 128, 256):
            cases.append(("layer", cell, 1, hidden, 20, 1))
    if "gru" in cells:
        for hidden in (128, 256):
            cases.append(("layer", "gru", 1, hidden, 1, 2))
            cases.append(("generate", "gru", 1, hidden, 16, 2))
    return cases


def generation_loop(model: torch.nn.Module, token: torch.Tensor, steps: int) -> torch.Tensor:
    """The example of a decoding loop over a recurrent model (fusedrnn or torch.nn, the same code):
    one token per call, the state carried from call to call, each output fed back as the next
    input. `token` is [1, B, H] (input size = hidden size here, standing in for an embedding of the
    sampled token)."""
    state = None
    outputs = []
    for _ in range(steps):
        out, state = model(token, state)
        token = out  # the next input: here the output itself (a real decoder samples and embeds)
        outputs.append(out)
    return torch.cat(outputs)


def _streaming_call(kind: str, module: torch.nn.Module, x: torch.Tensor, steps: int):
    if kind == "cell":
        return lambda: module(x)
    if kind == "generate":
        return lambda: generation_loop(module, x, steps)
    return lambda: module(x)


def _first_tensor(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def bench_streaming(cells, device: str, dtype, reps: int, calls: int, gen: torch.Generator):
    """One row per streaming case: us per call (per token for the generation loop), torch.nn and
    fusedrnn interleaved in this process, no-grad and training."""
    rows = []
    for kind, cell, batch, hidden, steps, layers in streaming_cases(cells):
        torch.manual_seed(0)
        if kind == "cell":
            torch_cls, fused_cls = CELL_MODULES[cell]
            ref = torch_cls(hidden, hidden, device=device, dtype=dtype)
            ours = fused_cls(hidden, hidden, device=device, dtype=dtype)
            x = torch.randn(batch, hidden, generator=gen, dtype=dtype).to(device)
        else:
            torch_cls, fused_cls = CELLS[cell]
            ref = torch_cls(hidden, hidden, num_layers=layers, device=device, dtype=dtype)
            ours = fused_cls(hidden, hidden, num_layers=layers, device=device, dtype=dtype)
            x = torch.randn(1 if kind == "generate" else steps, batch, hidden, generator=gen, dtype=dtype).to(device)
        ours.load_state_dict(ref.state_dict())
        row = {"kind": kind, "cell": cell, "B": batch, "H": hidden, "T": steps, "layers": layers}
        per = steps if kind == "generate" else 1
        for mode in ("infer", "train"):
            def make(m):
                call = _streaming_call(kind, m, x, steps)
                if mode == "infer":
                    def run():
                        with torch.no_grad():
                            for _ in range(calls):
                                call()
                else:
                    def run():
                        for _ in range(calls):
                            _first_tensor(call()).sum().backward()
                return run
            t = compare({"torch.nn": make(ref), "fusedrnn": make(ours)}, device, reps=reps)
            row[f"{mode}_nn_us"] = t["torch.nn"] * 1e6 / (calls * per)
            row[f"{mode}_fused_us"] = t["fusedrnn"] * 1e6 / (calls * per)
            row[f"{mode}_ratio"] = t["torch.nn"] / t["fusedrnn"]
        rows.append(row)
        print(f"{kind:8s} {cell:4s} B={batch} H={hidden:3d} T={steps:2d} L={layers}  no-grad "
              f"{row['infer_nn_us']:7.1f} / {row['infer_fused_us']:7.1f} us = {row['infer_ratio']:.2f}x   training "
              f"{row['train_nn_us']:7.1f} / {row['train_fused_us']:7.1f} us = {row['train_ratio']:.2f}x", flush=True)
    return rows


def streaming_goal(row) -> float:
    """The issue's goal for a row: >= 2x at T=20 B=1, >= 1.5x for every other small call."""
    return 2.0 if row["kind"] == "layer" and row["T"] == 20 else 1.5


def streaming_markdown(rows, info: Dict, args) -> str:
    names = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}

    def what(r):
        if r["kind"] == "cell":
            return f"{names[r['cell']]}Cell"
        if r["kind"] == "generate":
            return f"{names[r['cell']]} {r['layers']} layers, generation loop of {r['T']} tokens (per token)"
        return f"{names[r['cell']]}" + (f" {r['layers']} layers" if r["layers"] > 1 else "") + f", T={r['T']}"

    def mark(r, mode):
        ok = r[f"{mode}_ratio"] >= streaming_goal(r)
        return f"**{r[f'{mode}_ratio']:.2f}x**" + ("" if ok else " (below goal)")

    headers = ["call", "B", "H", "goal", "no-grad torch.nn us", "no-grad fusedrnn us", "no-grad ratio",
               "training torch.nn us", "training fusedrnn us", "training ratio"]
    table = [[what(r), r["B"], r["H"], f"{streaming_goal(r):.1f}x", f"{r['infer_nn_us']:.1f}",
              f"{r['infer_fused_us']:.1f}", mark(r, "infer"), f"{r['train_nn_us']:.1f}", f"{r['train_fused_us']:.1f}",
              mark(r, "train")] for r in rows]
    met = sum(r[f"{m}_ratio"] >= streaming_goal(r) for r in rows for m in ("infer", "train"))
    return "\n".join([
        f"# fusedrnn streaming benchmark: small calls ({args.device}, {args.dtype})", "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
        "Microseconds per call (the generation loop: per token), torch.nn and fusedrnn in one process, interleaved, "
        f"medians of {args.reps} runs of {args.calls} calls after warm-up. Ratio = torch.nn time / fusedrnn time. "
        "No-grad: under torch.no_grad. Training: forward + backward of the output's sum (parameters' gradients "
        "accumulate). Input size = hidden size. Goal (issue 14): >= 1.5x for every cell and T=1 call, >= 2x at "
        f"T=20, B=1. Met: {met} of {2 * len(rows)}.", "", markdown_table(headers, table)])


def amd_generation(info: Dict) -> str:
    """'zen5' (and 'familyN' past it) for an AMD CPU of family 26 or later, else '': the Zen 3 and Zen 4
    (family 25) that this project first measured differ by ISA already (AVX2 against AVX-512), and their
    published file names stay as they were; a Zen 5 has the Zen 4's ISA at twice its FMA rate."""
    try:
        family = int(str(info.get("cpu_family", "")))
    except ValueError:
        return ""
    if not str(info.get("cpu", "")).startswith("AMD") or family < 26:
        return ""
    return "zen5" if family == 26 else f"family{family}"


def cpu_slug(info: Dict) -> str:
    """The machine as a file-name part: the GPU's name on CUDA, else the CPU's name and torch's ISA
    level ('AMD EPYC 7B13', 'AVX2 (...)' -> 'amd-epyc-7b13-avx2'). Virtual machines often report
    only 'AMD EPYC' for CPUs as different as an AVX2-only Zen 3 and an AVX-512 Zen 4: the ISA keeps
    their results apart, and the AMD generation a Zen 5's from a Zen 4's ('amd-epyc-zen5-avx512')."""
    if info.get("gpu") and info.get("device") == "cuda":
        name = info["gpu"]
    else:
        name = f"{info.get('cpu', 'cpu')} {amd_generation(info)} {str(info.get('isa', '')).split(' ')[0]}"
    return "-".join("".join(c if c.isalnum() else " " for c in str(name).lower()).split()) or "unknown"


def measured_peak(device: str, given: Optional[float]) -> Dict:
    """The float32 peak that rows are judged against: given, or measured now on the CPU."""
    if given:
        return {"gflops": given, "source": "--peak-gflops"}
    if device != "cpu":
        return {"gflops": None, "source": "not measured on this device (give --peak-gflops)"}
    threads = torch.get_num_threads()
    try:
        fma = peak.fma_peak(threads)
    except peak.PeakUnavailable as e:
        return {"gflops": None, "source": f"not measured: {e}"}
    return {"gflops": fma["gflops_best"], "cpu_share": fma["cpu_share"],
            "source": f"benchmarks.peak FMA loop ({fma['isa']}, {threads} threads)"}


def _pair(a: float, b: float, fmt: str) -> str:
    return f"{a:{fmt}} / {b:{fmt}}"


def markdown(rows, proportional, info: Dict, peak_info: Dict, args) -> str:
    p = peak_info["gflops"]

    def fraction(mode, r):
        return _pair(100 * r[f"{mode}_nn_gflops"] / p, 100 * r[f"{mode}_fused_gflops"] / p, ".0f") if p else "n/a"

    headers = ["cell", "config (T, B, I, H)", "infer torch.nn ms", "infer fusedrnn ms", "infer ratio",
               "infer GFLOP/s nn / fused", "infer % of peak nn / fused", "train torch.nn ms", "train fusedrnn ms",
               "train ratio", "train GFLOP/s nn / fused", "train % of peak nn / fused", "train peak MB nn / fused"]
    table = [[r["cell"], f"{r['config']} ({r['T']}, {r['B']}, {r['I']}, {r['H']})",
              f"{r['infer_nn_ms']:.2f}", f"{r['infer_fused_ms']:.2f}", f"**{r['infer_ratio']:.2f}x**",
              _pair(r["infer_nn_gflops"], r["infer_fused_gflops"], ".1f"), fraction("infer", r),
              f"{r['train_nn_ms']:.2f}", f"{r['train_fused_ms']:.2f}", f"**{r['train_ratio']:.2f}x**",
              _pair(r["train_nn_gflops"], r["train_fused_gflops"], ".1f"), fraction("train", r),
              _pair(r["train_nn_peak_mb"], r["train_fused_peak_mb"], ".1f")] for r in rows]
    memory_how = ("torch.cuda.max_memory_allocated" if args.device == "cuda" else
                  "torch profiler memory events: PyTorch's CPU allocator, not oneDNN/MKL scratch")
    peak_text = (f"{p:.1f} GFLOP/s, {peak_info['source']}" if p else peak_info["source"])
    md = [f"# fusedrnn layer benchmark ({args.device}, {args.dtype})", "",
          "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
          "Ratio = torch.nn time / fusedrnn time (above 1: fusedrnn is faster). Medians of "
          f"{args.reps} interleaved runs after warm-up. GFLOP/s: GEMM FLOPs per layer call "
          "(forward 2*N*G*H*(I+H) over N real tokens, G gates; training 3x forward) / median time. "
          f"Peak: {peak_text}. Peak MB: most memory allocated at once in one training step, above "
          f"its start ({memory_how}).", "", markdown_table(headers, table)]
    if p and peak_info.get("cpu_share", 1.0) < 0.9:
        md += ["", f"**The peak was measured on a busy machine** (the FMA loop got {peak_info['cpu_share']:.0%} "
               "of its cores' time): the fractions of peak are overstated."]
    if proportional:
        md += ["", "Variable lengths (skewed config, fusedrnn training): time of the ragged batch relative to "
               "the same batch at full length.", "",
               markdown_table(["cell", "real tokens / (B x T)", "time ragged / time full"],
                              [[q["cell"], f"{q['token_fraction']:.2f}", f"{q['time_fraction']:.2f}"]
                               for q in proportional])]
    return "\n".join(md)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="comma-separated, from: " + ", ".join(CONFIGS) + f" (and {STREAMING}, run alone)")
    parser.add_argument("--cells", default=",".join(CELLS), help="comma-separated, from: " + ", ".join(CELLS))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20,
                        help="streaming: calls per timed run (small calls are timed in batches)")
    parser.add_argument("--peak-gflops", type=float, default=None,
                        help="the peak to divide by (default: measured now on the CPU, none on the GPU)")
    parser.add_argument("--publish", action="store_true",
                        help="save under benchmarks/results/, replacing the published table of this name")
    parser.add_argument("--out", default=None, help="results file name (default: from device, dtype, configs, cells)")
    parser.add_argument("--results-dir", default=None,
                        help="where to save (default: benchmarks/runs/, ignored by git; --publish: benchmarks/results/)")
    args = parser.parse_args(argv)
    args.configs, args.cells = args.configs.split(","), args.cells.split(",")
    if STREAMING in args.configs and args.configs != [STREAMING]:
        parser.error(f"{STREAMING} runs alone (its own table): --configs {STREAMING}")
    for kind, names, known in (("configuration", [c for c in args.configs if c != STREAMING], CONFIGS),
                               ("cell", args.cells, CELLS)):
        unknown = [n for n in names if n not in known]
        if unknown:
            parser.error(f"unknown {kind} {', '.join(unknown)}; choose from {', '.join(known)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    if args.configs == [STREAMING]:
        return streaming_main(args, dtype)
    peak_info = measured_peak(args.device, args.peak_gflops)  # first, before torch's threads are busy
    gen = torch.Generator().manual_seed(0)
    rows = []
    for config in args.configs:
        for cell in args.cells:
            row = bench_one(cell, config, args.device, dtype, args.reps, gen)
            rows.append(row)
            print(f"{cell:5s} {config:12s} infer {row['infer_nn_ms']:8.2f} / {row['infer_fused_ms']:8.2f} ms "
                  f"= {row['infer_ratio']:.2f}x   train {row['train_nn_ms']:8.2f} / {row['train_fused_ms']:8.2f} ms "
                  f"= {row['train_ratio']:.2f}x  ({row['train_fused_gflops']:.1f} GFLOP/s)", flush=True)
    proportional = []
    if "skewed" in args.configs:
        for cell in args.cells:
            # Its own seed: the same lengths whichever configurations ran before.
            proportional.append(proportional_cost(cell, args.device, dtype, args.reps,
                                                  torch.Generator().manual_seed(1)))
    info = machine()
    text = markdown(rows, proportional, info, peak_info, args)
    print()
    print(text)
    name = args.out or result_name(args.device, args.dtype, args.configs, args.cells)
    base = save(output_base(name, args.results_dir, args.publish),
                {"machine": info, "device": args.device, "dtype": args.dtype, "peak": peak_info,
                 "flops": "GEMM work: forward 2*N*G*H*(I+H), training 3x forward", "rows": rows,
                 "proportional_cost": proportional}, text)
    print(f"\nsaved {base}.json and {base}.md")
    return rows


def streaming_main(args, dtype):
    rows = bench_streaming(args.cells, args.device, dtype, args.reps, args.calls, torch.Generator().manual_seed(0))
    info = machine()
    text = streaming_markdown(rows, info, args)
    print()
    print(text)
    name = args.out or f"layers_streaming_{args.device}_{args.dtype}_{cpu_slug(dict(info, device=args.device))}"
    if list(args.cells) != list(CELLS):
        name += "_" + "-".join(args.cells)
    base = save(output_base(name, args.results_dir, args.publish),
                {"machine": info, "device": args.device, "dtype": args.dtype, "reps": args.reps,
                 "calls": args.calls, "rows": rows}, text)
    print(f"\nsaved {base}.json and {base}.md")
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
