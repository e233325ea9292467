"""Benchmark of the layer-normalised LSTM / GRU (fusedrnn.LayerNormLSTM / LayerNormGRU) and zoneout.

    python -m benchmarks.layernorm                   # sentiment shape T=100 B=32 I=100 H=128, float32
    python -m benchmarks.layernorm --reps 15 --cells lstm --threads 2

Per cell, in one process, interleaved, after warm-up, medians (and min-max) of --reps runs:
- loop:    the layer written the usual way, a Python loop of nn.Linear + nn.LayerNorm (LoopLayerNormLSTM /
           LoopLayerNormGRU below; tests/test_layernorm.py checks it gives the fused layer's numbers),
           with every step's input projection and its LayerNorm hoisted out of the loop;
- fused:   fusedrnn.LayerNormLSTM / LayerNormGRU;
- zoneout: the same with zoneout=0.1 (training: fresh Bernoulli masks; inference: eval's expectation);
- plain:   fusedrnn.LSTM / GRU (no layer norm), the cost of the normalisation.
Training step: forward + backward of output.sum() into the parameters' gradients (set to None first).
Inference: forward in eval mode under torch.no_grad (before NOTES entry 37 the
models stayed in training mode here, so the zoneout row drew training masks without using a gradient). Ratios printed: loop / fused (goal >= 8x for training),
fused / plain (goal <= 1.3x), zoneout / fused (goal <= 1.10x). Results:
benchmarks/runs/layernorm_cpu_<machine>_<time>.{json,md} (ignored by git), or with --publish
benchmarks/results/layernorm_cpu_<machine>.{json,md}, <machine> as in benchmarks/layers.py (CPU name and ISA).
The load average before and after is in the table: the machine is often shared, and timings then say little.
"""

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List

import torch
from torch import nn

import fusedrnn

from .common import machine, markdown_table, output_base, save, time_once


class LoopLayerNormLSTM(nn.Module):
    """A layer-normalised LSTM written the usual way: nn.Linear + nn.LayerNorm in a Python loop (the
    LayerNorms' biases play fusedrnn's b_ih, b_hh). One layer, one direction, [T, B, I] input."""

    def __init__(self, input_size: int, hidden_size: int, dtype=None):
        super().__init__()
        g = 4 * hidden_size
        self.ih = nn.Linear(input_size, g, bias=False, dtype=dtype)
        self.hh = nn.Linear(hidden_size, g, bias=False, dtype=dtype)
        self.ln_ih, self.ln_hh = nn.LayerNorm(g, dtype=dtype), nn.LayerNorm(g, dtype=dtype)
        self.ln_c = nn.LayerNorm(hidden_size, dtype=dtype)

    def load_from(self, fused: nn.Module, suffix: str = "_l0") -> "LoopLayerNormLSTM":
        """fused's weights (a fusedrnn.LayerNormLSTM layer `suffix`, or a cell with suffix '')."""
        with torch.no_grad():
            for dst, src in ((self.ih.weight, "weight_ih"), (self.hh.weight, "weight_hh"),
                             (self.ln_ih.weight, "weight_ln_ih"), (self.ln_ih.bias, "bias_ih"),
                             (self.ln_hh.weight, "weight_ln_hh"), (self.ln_hh.bias, "bias_hh"),
                             (self.ln_c.weight, "weight_ln_c"), (self.ln_c.bias, "bias_ln_c")):
                dst.copy_(getattr(fused, src + suffix))
        return self

    def forward(self, x, h, c, lengths=None):
        """x [T, B, I]; with `lengths` [B] (padded batch), a sequence's states stop changing after its
        last step, as users write it (torch.where on a mask), so h, c are each sequence's final states."""
        x_proj = self.ln_ih(self.ih(x))  # every step's input projection at once, as a careful user would
        alive = None if lengths is None else torch.arange(x.shape[0])[:, None] < lengths[None, :]  # [T, B]
        outs = []
        for t in range(x.shape[0]):
            i, f, g, o = (x_proj[t] + self.ln_hh(self.hh(h))).chunk(4, 1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(self.ln_c(c_new))
            if alive is None:
                h, c = h_new, c_new
            else:
                keep = alive[t].to(x.device)[:, None]
                h, c = torch.where(keep, h_new, h), torch.where(keep, c_new, c)
            outs.append(h)
        return torch.stack(outs), h, c


class LoopLayerNormGRU(nn.Module):
    """A layer-normalised GRU (torch.nn.GRU's gate equations) written the usual way."""

    def __init__(self, input_size: int, hidden_size: int, dtype=None):
        super().__init__()
        g = 3 * hidden_size
        self.ih = nn.Linear(input_size, g, bias=False, dtype=dtype)
        self.hh = nn.Linear(hidden_size, g, bias=False, dtype=dtype)
        self.ln_ih, self.ln_hh = nn.LayerNorm(g, dtype=dtype), nn.LayerNorm(g, dtype=dtype)

    def load_from(self, fused: nn.Module, suffix: str = "_l0") -> "LoopLayerNormGRU":
        with torch.no_grad():
            for dst, src in ((self.ih.weight, "weight_ih"), (self.hh.weight, "weight_hh"),
                             (self.ln_ih.weight, "weight_ln_ih"), (self.ln_ih.bias, "bias_ih"),
                             (self.ln_hh.weight, "weight_ln_hh"), (self.ln_hh.bias, "bias_hh")):
                dst.copy_(getattr(fused, src + suffix))
        return self

    def forward(self, x, h):
        x_proj = self.ln_ih(self.ih(x))
        outs = []
        for t in range(x.shape[0]):
            xr, xz, xn = x_proj[t].chunk(3, 1)
            hr, hz, hn = self.ln_hh(self.hh(h)).chunk(3, 1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            h = (1 - z) * n + z * h
            outs.append(h)
        return torch.stack(outs), h


def _models(cell: str, I: int, H: int):
    if cell == "lstm":
        fused = fusedrnn.LayerNormLSTM(I, H)
        zoneout = fusedrnn.LayerNormLSTM(I, H, zoneout=0.1)
        loop = LoopLayerNormLSTM(I, H).load_from(fused)
        plain = fusedrnn.LSTM(I, H)
    else:
        fused = fusedrnn.LayerNormGRU(I, H)
        zoneout = fusedrnn.LayerNormGRU(I, H, zoneout=0.1)
        loop = LoopLayerNormGRU(I, H).load_from(fused)
        plain = fusedrnn.GRU(I, H)
    zoneout.load_state_dict(fused.state_dict())
    return {"loop": loop, "fused": fused, "zoneout": zoneout, "plain": plain}


def _call(cell: str, name: str, model: nn.Module, x, h0, c0):
    if name == "loop":
        return model(x, h0[0], c0[0])[0] if cell == "lstm" else model(x, h0[0])[0]
    return model(x, (h0, c0))[0] if cell == "lstm" else model(x, h0)[0]


def _step_fns(cell: str, models: Dict[str, nn.Module], x, h0, c0, training: bool) -> Dict[str, Callable[[], None]]:
    fns = {}
    for name, model in models.items():
        def fn(name=name, model=model):
            if training:
                for p in model.parameters():
                    p.grad = None
                _call(cell, name, model, x, h0, c0).sum().backward()
            else:
                with torch.no_grad():
                    _call(cell, name, model, x, h0, c0)
        fns[name] = fn
    return fns


def _cpu_seconds(fn: Callable[[], None]) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def measure(fns: Dict[str, Callable[[], None]], reps: int, warmup: int = 2,
            cpu_time: bool = False) -> Dict[str, List[float]]:
    """Seconds of each run of each function, interleaved (a, b, c, a, b, c, ...) after warm-up: wall-clock,
    or with cpu_time the process's CPU seconds (the work done, whatever else runs on a shared machine;
    meaningful with one thread, where no thread waits for another)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(_cpu_seconds(fn) if cpu_time else time_once(fn, "cpu"))
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default="lstm,gru")
    parser.add_argument("--shape", default="100,32,100,128", help="T,B,I,H")
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--publish", action="store_true", help="save under benchmarks/results/, replacing it")
    parser.add_argument("--results-dir", default=None)
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by the process's CPU seconds, not wall-clock (for a shared machine, with --threads 1)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    T, B, I, H = (int(v) for v in args.shape.split(","))
    info = machine()
    load_before = os.getloadavg()[0]
    print(f"machine: {info}; load average {load_before:.1f}")
    clock = "process CPU time" if args.cpu_time else "wall-clock"
    print(f"shape T={T} B={B} I={I} H={H}, float32, {torch.get_num_threads()} threads, {args.reps} reps, {clock}")
    rows, payload = [], {"machine": info, "shape": [T, B, I, H], "threads": torch.get_num_threads(), "results": {}}
    for cell in args.cells.split(","):
        torch.manual_seed(0)
        models = _models(cell, I, H)
        x = torch.randn(T, B, I)
        h0, c0 = torch.randn(1, B, H), torch.randn(1, B, H)
        for mode in ("train", "infer"):
            for m in models.values():
                m.train(mode == "train")
            times = measure(_step_fns(cell, models, x, h0, c0, mode == "train"), args.reps, cpu_time=args.cpu_time)
            med = {k: statistics.median(v) for k, v in times.items()}
            payload["results"][f"{cell}_{mode}"] = {k: v for k, v in times.items()}
            spread = {k: f"{1e3 * min(v):.2f}-{1e3 * max(v):.2f}" for k, v in times.items()}
            rows.append([cell, mode] + [f"{1e3 * med[k]:.2f} ({spread[k]})" for k in ("loop", "fused", "zoneout",
                                                                                    "plain")]
                        + [f"**{med['loop'] / med['fused']:.2f}x**", f"{med['fused'] / med['plain']:.2f}x",
                           f"{med['zoneout'] / med['fused']:.3f}x"])
            print(" | ".join(rows[-1]), flush=True)
    headers = ["cell", "step", "loop ms (min-max)", "fused ms", "fused+zoneout ms", "plain fusedrnn ms",
               "loop / fused (goal >= 8x train)", "fused / plain (goal <= 1.3x)", "zoneout / fused (goal <= 1.10x)"]
    table = markdown_table(headers, rows)
    load_after = os.getloadavg()[0]
    payload["load_average"] = [load_before, load_after]
    payload["clock"] = clock
    markdown = (f"# fusedrnn layer-norm benchmark (cpu, float32)\n\nMachine: {info}\n\nShape T={T} B={B} I={I} "
                f"H={H}, {torch.get_num_threads()} threads; {clock}, medians (min-max) of {args.reps} interleaved runs "
                f"after warm-up; load average {load_before:.1f} before, {load_after:.1f} after (on {os.cpu_count()} CPUs).\n\n"
                + table)
    print(table)
    from .layers import cpu_slug

    name = f"layernorm_cpu_{cpu_slug(info)}"
    print("saved", save(output_base(name, args.results_dir, args.publish), payload, markdown))


if __name__ == "__main__":
    main()
