"""Micro-benchmark: torch.nn against fusedrnn, LSTM / GRU / RNN, inference (no_grad forward)
and training (forward + backward), in one process, interleaved, medians.

    python -m benchmarks.layers                 # CPU, all configurations
    python -m benchmarks.layers --device cuda   # GPU (cuDNN baseline, TF32 off)
    python -m benchmarks.layers --configs sentiment,skewed --cells gru

Prints a table with the ratio torch.nn time / fusedrnn time (> 1: fusedrnn is faster) and
saves it as JSON and Markdown under benchmarks/results/ with the machine's description.
"""

import argparse
import sys

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn

from .common import compare, machine, markdown_table, save

# name: (T, B, input_size, hidden_size, lengths kind)
CONFIGS = {
    "sentiment": (100, 32, 100, 128, "full"),   # the sentiment model's GRU/LSTM
    "fastrnns": (100, 64, 512, 512, "full"),    # PyTorch's fastrnns default
    "small_batch": (100, 4, 100, 128, "full"),
    "long_seq": (1000, 16, 100, 128, "full"),
    "skewed": (200, 32, 100, 128, "skewed"),    # ragged lengths, mean ~T/4, packed
}
CELLS = {"lstm": (torch.nn.LSTM, fusedrnn.LSTM), "gru": (torch.nn.GRU, fusedrnn.GRU),
         "rnn": (torch.nn.RNN, fusedrnn.RNN)}


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

    row = {"cell": cell, "config": config, "T": T, "B": B, "I": I, "H": H,
           "tokens": int(lengths.sum()) if lengths is not None else T * B}
    for mode, make in (("infer", infer), ("train", train)):
        t = compare({"torch.nn": make(ref), "fusedrnn": make(ours)}, device, reps=reps)
        row[f"{mode}_nn_ms"] = t["torch.nn"] * 1e3
        row[f"{mode}_fused_ms"] = t["fusedrnn"] * 1e3
        row[f"{mode}_ratio"] = t["torch.nn"] / t["fusedrnn"]
        row[f"{mode}_fused_us_per_step"] = t["fusedrnn"] * 1e6 / T
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--cells", default="lstm,gru,rnn")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=None, help="results file name (default layers_<device>_<dtype>)")
    parser.add_argument("--results-dir", default=None, help="where to save (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for config in args.configs.split(","):
        for cell in args.cells.split(","):
            row = bench_one(cell, config, args.device, dtype, args.reps, gen)
            rows.append(row)
            print(f"{cell:5s} {config:12s} infer {row['infer_nn_ms']:8.2f} / {row['infer_fused_ms']:8.2f} ms "
                  f"= {row['infer_ratio']:.2f}x   train {row['train_nn_ms']:8.2f} / {row['train_fused_ms']:8.2f} ms "
                  f"= {row['train_ratio']:.2f}x", flush=True)
    proportional = []
    if "skewed" in args.configs.split(","):
        for cell in args.cells.split(","):
            # Its own seed: the same lengths whichever configurations ran before.
            proportional.append(proportional_cost(cell, args.device, dtype, args.reps,
                                                  torch.Generator().manual_seed(1)))
    info = machine()
    headers = ["cell", "config (T, B, I, H)", "infer torch.nn ms", "infer fusedrnn ms", "infer ratio",
               "train torch.nn ms", "train fusedrnn ms", "train ratio"]
    table = [[r["cell"], f"{r['config']} ({r['T']}, {r['B']}, {r['I']}, {r['H']})", f"{r['infer_nn_ms']:.2f}",
              f"{r['infer_fused_ms']:.2f}", f"**{r['infer_ratio']:.2f}x**", f"{r['train_nn_ms']:.2f}",
              f"{r['train_fused_ms']:.2f}", f"**{r['train_ratio']:.2f}x**"] for r in rows]
    md = [f"# fusedrnn layer benchmark ({args.device}, {args.dtype})", "",
          "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
          "Ratio = torch.nn time / fusedrnn time (above 1: fusedrnn is faster). Medians of "
          f"{args.reps} interleaved runs after warm-up.", "", markdown_table(headers, table)]
    if proportional:
        md += ["", "Variable lengths (skewed config, fusedrnn training): time of the ragged batch relative to "
               "the same batch at full length.", "",
               markdown_table(["cell", "real tokens / (B x T)", "time ragged / time full"],
                              [[p["cell"], f"{p['token_fraction']:.2f}", f"{p['time_fraction']:.2f}"]
                               for p in proportional])]
    markdown = "\n".join(md)
    print()
    print(markdown)
    name = args.out or f"layers_{args.device}_{args.dtype}"
    base = save(name, {"machine": info, "device": args.device, "dtype": args.dtype, "rows": rows,
                       "proportional_cost": proportional}, markdown, args.results_dir)
    print(f"\nsaved {base}.json and {base}.md")
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
