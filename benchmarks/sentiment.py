"""End-to-end benchmark: train a sentiment classifier with torch.nn and with fusedrnn side by
side, from the same initial weights and in the same data order. Two common recipes (`--model`):

    single (default)  Embedding(vocab, 100) -> GRU(100, 128) -> Linear(128, 1)
    bidirectional     Embedding(vocab, 100) -> 2-layer bidirectional LSTM(256)
                      -> Linear(512, 1) on the last layer's final states of both directions

binary cross-entropy, Adam 1e-3, batch 32. `--cell` swaps the recurrent cell in either recipe.
`--cell ln_lstm` (single recipe only) is the layer-normalised LSTM, which torch.nn lacks: its baseline
is the same model written the usual way, a Python loop of nn.Linear + nn.LayerNorm with the same
weights (benchmarks/layernorm.py's LoopLayerNormLSTM, fed the padded batch with its lengths), against
fusedrnn.LayerNormLSTM fed the PackedSequence and fed lengths=. Its packed run packs the token ids and embeds
the packed rows (SentimentClassifier.embed_packed): the same PackedSequence of embeddings, without sorting,
packing and (in backward) unpacking the [batch, steps, 100] float tensor or embedding the padding (NOTES 46).
The bidirectional recipe has no dropout between its layers: torch.nn and fusedrnn draw their
dropout masks differently, and the point is to show equal loss curves.

    python -m benchmarks.sentiment                       # Rotten Tomatoes snippets, CPU
    python -m benchmarks.sentiment --cell lstm           # the same with LSTM (or rnn)
    python -m benchmarks.sentiment --cell ln_lstm        # LayerNormLSTM vs a Python loop of Linear + LayerNorm
    python -m benchmarks.sentiment --model bidirectional # 2-layer bidirectional LSTM(256)
    python -m benchmarks.sentiment --dataset polarity --max-len 100   # long reviews, truncated
    python -m benchmarks.sentiment --dataset imdb --data-dir ~/aclImdb
    python -m benchmarks.sentiment --device cuda
    python -m benchmarks.sentiment --publish             # replace the published results
    torchrun --nproc-per-node 2 -m benchmarks.sentiment  # DistributedDataParallel, one shard per rank

Three runs train in lock-step, one epoch each in turn: torch.nn fed a PackedSequence
(pack_padded_sequence(..., enforce_sorted=False), as users do), fusedrnn fed the same
PackedSequence, and fusedrnn given the padded batch plus `lengths=` (its own path). Each epoch's
time covers the whole training step: embedding, recurrent layer, loss, backward, optimizer.

Results: sentiment_<dataset>_<cell>_<device>.{json,md,png} (cell "bilstm" etc. for the
bidirectional recipe), saved under benchmarks/runs/ with the time in the name (ignored by git),
under benchmarks/results/ with --publish, or in --results-dir.

Distributed (started by torchrun, or anything that sets RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT): every run is wrapped in DistributedDataParallel (gloo on the CPU, NCCL on the GPU);
each epoch's shuffled order is split into one shard per rank, each rank trains on its own shard
with --batch-size examples per step (global batch: ranks x batch size), and gradients are averaged
across ranks. Losses are averaged over the ranks, epoch times are the slowest rank's, tokens/s
counts every rank's tokens; rank 0 evaluates, prints and saves (name suffix _ddp<ranks>).
"""

import argparse
import copy
import json
import os
import sys
import time
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fusedrnn

from . import sentiment_data as data
from .common import machine, markdown_table, output_base
from .layernorm import LoopLayerNormLSTM

RNN_CLASSES = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN, "ln_lstm": fusedrnn.LayerNormLSTM}
RUNS = ("torch.nn packed", "fusedrnn packed", "fusedrnn lengths")
# The layer-normalised cell's runs: the first one is the baseline every other run is compared with.
LN_RUNS = ("python loop", "fusedrnn packed", "fusedrnn lengths")


def runs_of(cell: str):
    return LN_RUNS if cell == "ln_lstm" else RUNS
# The two recipes: the recurrent layers' shape, and the cell used unless --cell says otherwise.
MODELS = {
    "single": {"cell": "gru", "hidden": 128, "num_layers": 1, "bidirectional": False},
    "bidirectional": {"cell": "lstm", "hidden": 256, "num_layers": 2, "bidirectional": True},
}


class SentimentClassifier(nn.Module):
    """Embedding -> recurrent layers -> Linear on the last layer's final hidden state (both
    directions' states, concatenated, when bidirectional)."""

    def __init__(self, vocab_size: int, cell: str, embed: int = 100, hidden: int = 128, num_layers: int = 1,
                 bidirectional: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed, padding_idx=data.Vocab.PAD)
        if cell == "ln_lstm" and (num_layers != 1 or bidirectional):
            raise ValueError("--cell ln_lstm: only the single recipe (one layer, one direction); its Python-loop "
                             "baseline has no layers or directions")
        self.rnn = RNN_CLASSES[cell](embed, hidden, num_layers=num_layers, bidirectional=bidirectional,
                                     batch_first=True)
        self.bidirectional = bidirectional
        self.fc = nn.Linear(2 * hidden if bidirectional else hidden, 1)
        self.path = "packed"
        # The packed path packs the token ids and embeds the packed rows instead of packing the embedded batch:
        # the same PackedSequence (an embedding row depends on its token only), the [batch, steps, embed] float
        # tensor never sorted, packed or unpacked in backward, the padding never embedded. The ln_lstm recipe's
        # (make_models): embedding + pack 3.0 -> 1.3 ms (smoke set) / 1.7 -> 0.8 ms (full set) of a 22-30 ms
        # training step of its packed run (NOTES 46).
        self.embed_packed = False

    def use_python_loop(self) -> "SentimentClassifier":
        """Replaces a fusedrnn.LayerNormLSTM by the same layer written as a Python loop of nn.Linear +
        nn.LayerNorm, its weights copied (the baseline of --cell ln_lstm)."""
        rnn = self.rnn
        self.rnn = LoopLayerNormLSTM(rnn.input_size, rnn.hidden_size, dtype=rnn.weight_ih_l0.dtype).load_from(rnn)
        self.rnn.to(rnn.weight_ih_l0.device)
        self.path = "loop"
        return self

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.path == "packed" and self.embed_packed:
            ids = pack_padded_sequence(tokens, lengths, batch_first=True, enforce_sorted=False)
            _, state = self.rnn(PackedSequence(self.embedding(ids.data), ids.batch_sizes, ids.sorted_indices,
                                               ids.unsorted_indices))
            return self.fc(state[0][-1]).squeeze(-1)
        x = self.embedding(tokens)
        if self.path == "loop":
            zeros = x.new_zeros(x.shape[0], self.rnn.ln_c.normalized_shape[0])
            _, h, _ = self.rnn(x.transpose(0, 1), zeros, zeros, lengths)
            return self.fc(h).squeeze(-1)
        if self.path == "packed":
            _, state = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        else:
            _, state = self.rnn(x, lengths=lengths)
        h = state[0] if isinstance(state, tuple) else state
        # h: [layers * directions, batch, hidden]; the last layer's forward and backward states.
        last = torch.cat([h[-2], h[-1]], dim=1) if self.bidirectional else h[-1]
        return self.fc(last).squeeze(-1)


def make_models(base: SentimentClassifier, cell: str) -> Dict[str, SentimentClassifier]:
    """The runs' models, each a copy of `base` (same initial weights): torch.nn's model and fusedrnn's
    (converted) or, for ln_lstm, the Python loop and fusedrnn.LayerNormLSTM; fed packed or lengths=."""
    models = {}
    for name in runs_of(cell):
        m = copy.deepcopy(base)
        if name == "python loop":
            m.use_python_loop()
        elif name.startswith("fusedrnn"):
            if cell != "ln_lstm":
                fusedrnn.convert(m)
            m.path = name.split()[-1]
            m.embed_packed = cell == "ln_lstm"
        models[name] = m
    return models


def make_batches(encoded: List[List[int]], labels: List[int], batch_size: int, order: List[int], device: str):
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        lengths = torch.tensor([len(encoded[i]) for i in idx], dtype=torch.int64)
        tokens = torch.zeros(len(idx), int(lengths.max()), dtype=torch.int64)
        for row, i in enumerate(idx):
            tokens[row, : len(encoded[i])] = torch.tensor(encoded[i])
        y = torch.tensor([float(labels[i]) for i in idx])
        batches.append((tokens.to(device), lengths, y.to(device)))
    return batches


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_epoch(model, optimizer, batches, device, progress) -> Dict[str, float]:
    model.train()
    loss_fn = nn.BCEWithLogitsLoss()
    total, losses = 0.0, []
    sync(device)
    t0 = time.perf_counter()
    for tokens, lengths, y in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(tokens, lengths), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        progress.update(1)
    sync(device)
    seconds = time.perf_counter() - t0
    losses_f = [float(v) for v in losses]
    total = sum(losses_f) / max(1, len(losses_f))
    return {"seconds": seconds, "loss": total, "batch_losses": losses_f}


def warm_up(models, batches, device) -> None:
    """A few untimed steps of each run on throw-away copies (the real models and optimizers are
    untouched), so that first-call costs (allocator, BLAS/oneDNN set-up) stay out of epoch 1.
    Measured without it: torch.nn's first epoch on the polarity set took 21.7 s, later ones ~4.3 s."""
    for model in models.values():
        clone = copy.deepcopy(model)
        train_epoch(clone, torch.optim.Adam(clone.parameters(), lr=1e-3), batches, device, _NoBar())


@torch.no_grad()
def accuracy(model, batches) -> float:
    model.eval()
    correct = count = 0
    for tokens, lengths, y in batches:
        pred = (model(tokens, lengths) > 0).float()
        correct += int((pred == y).sum())
        count += len(y)
    return correct / max(1, count)


def plot(path: str, history: Dict[str, List[dict]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name, epochs in history.items():
        losses = [v for e in epochs for v in e["batch_losses"]]
        window = max(1, len(losses) // 50)
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        ax_loss.plot(smooth, label=name, linestyle="--" if "fusedrnn" in name else "-", alpha=0.85)
    ax_loss.set_xlabel("training step")
    ax_loss.set_ylabel(f"training loss (running mean of {max(1, window)})")
    ax_loss.legend()
    n_epochs = len(next(iter(history.values())))
    width = 0.8 / len(history)
    for k, (name, epochs) in enumerate(history.items()):
        ax_time.bar([e + k * width for e in range(n_epochs)], [e["seconds"] for e in epochs], width, label=name)
    ax_time.set_xticks([e + width * (len(history) - 1) / 2 for e in range(n_epochs)])
    ax_time.set_xticklabels([str(e + 1) for e in range(n_epochs)])
    ax_time.set_xlabel("epoch")
    ax_time.set_ylabel("training time per epoch (s)")
    ax_time.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Distributed:
    """This process's place in a torchrun job (None outside one): its rank, the number of ranks,
    and collectives over plain Python numbers."""

    def __init__(self, device: str):
        import torch.distributed as dist

        self.dist = dist
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = device

    @classmethod
    def from_environment(cls, device: str) -> "Optional[Distributed]":
        return cls(device) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None

    def _reduce(self, values: List[float], op) -> List[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t, op=op)
        return t.tolist()

    def mean(self, values: List[float]) -> List[float]:
        return [v / self.world for v in self._reduce(values, self.dist.ReduceOp.SUM)]

    def total(self, value: float) -> float:
        return self._reduce([value], self.dist.ReduceOp.SUM)[0]

    def slowest(self, value: float) -> float:
        return self._reduce([value], self.dist.ReduceOp.MAX)[0]

    def barrier(self) -> None:
        self.dist.barrier()

    def close(self) -> None:
        self.dist.destroy_process_group()


def shard(order: List[int], distributed: "Optional[Distributed]") -> List[int]:
    """This rank's examples of the epoch: every world-th one from its rank on, all shards the same
    length (the last few examples are dropped), so that every rank takes the same number of steps."""
    if distributed is None:
        return order
    per_rank = len(order) // distributed.world
    return order[distributed.rank::distributed.world][:per_rank]


def result_name(args, info: Optional[Dict] = None) -> str:
    """sentiment_<dataset>_<cell>_<device>_<machine>: the cell as "bilstm" etc. for the bidirectional
    recipe, the hidden size when it is not the recipe's, the machine as benchmarks.layers names it
    (CPU name and ISA, or the GPU's name; `info` is common.machine()'s, measured now when not given),
    so that one machine's published results never replace another's, the number of ranks when
    distributed. (Results published before the machine was in the name, e.g. sentiment_rt_gru_cpu,
    are the AVX2 EPYC's; their .md says so.)"""
    from .layers import cpu_slug

    cell = ("bi" if MODELS[args.model]["bidirectional"] else "") + args.cell
    if args.hidden != MODELS[args.model]["hidden"]:
        cell += f"{args.hidden}"
    info = machine() if info is None else info
    name = f"sentiment_{args.dataset}_{cell}_{args.device}_{cpu_slug(dict(info, device=args.device))}"
    if args.world > 1:
        name += f"_ddp{args.world}"
    return name + ("_smoke" if args.smoke else "")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="rt", choices=["rt", "polarity", "imdb"])
    parser.add_argument("--data-dir", default=None, help="aclImdb folder (imdb) or where to cache downloads")
    parser.add_argument("--model", default="single", choices=list(MODELS),
                        help="single: one GRU(128) layer; bidirectional: 2-layer bidirectional LSTM(256)")
    parser.add_argument("--cell", default=None, choices=list(RNN_CLASSES),
                        help="the recurrent cell (default: gru for single, lstm for bidirectional)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default: the recipe's, 128 or 256)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--epochs", type=int, default=None, help="default: 5 (rt), 10 (polarity), 3 (imdb)")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank when distributed")
    parser.add_argument("--max-len", type=int, default=None, help="truncate reviews to this many tokens")
    parser.add_argument("--min-freq", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a few hundred examples, one epoch (for CI)")
    parser.add_argument("--publish", action="store_true",
                        help="save under benchmarks/results/, replacing the published results of this name")
    parser.add_argument("--results-dir", default=None,
                        help="where to save (default: benchmarks/runs/, ignored by git; --publish: benchmarks/results/)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.cell = args.cell or MODELS[args.model]["cell"]
    if args.cell == "ln_lstm" and args.model != "single":
        parser.error("--cell ln_lstm runs in the single recipe only (its Python-loop baseline is one layer, "
                     "one direction)")
    args.hidden = args.hidden or MODELS[args.model]["hidden"]
    args.world = int(os.environ.get("WORLD_SIZE", "1"))
    return args


def main(argv=None) -> Optional[dict]:
    """Runs the benchmark; returns its summary (on rank 0 only when distributed)."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fusedrnn sentiment: --device cuda, but torch sees no CUDA device")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    distributed = Distributed.from_environment(args.device)
    try:
        return run(args, distributed)
    finally:
        if distributed is not None:
            distributed.close()


def run(args, distributed: "Optional[Distributed]") -> Optional[dict]:
    lead = distributed is None or distributed.rank == 0
    epochs = args.epochs or (1 if args.smoke else {"rt": 5, "polarity": 10, "imdb": 3}[args.dataset])

    if distributed is not None and not lead:
        distributed.barrier()  # rank 0 downloads and caches the data first: one download, no race
    train, test = data.load(args.dataset, args.data_dir, seed=args.seed)
    if distributed is not None and lead:
        distributed.barrier()
    if args.smoke:
        train, test = train[:384], test[:192]
    vocab = data.Vocab([t for t, _ in train], min_freq=args.min_freq)
    enc_train = [vocab.encode(t, args.max_len) for t, _ in train]
    enc_test = [vocab.encode(t, args.max_len) for t, _ in test]
    y_train, y_test = [y for _, y in train], [y for _, y in test]
    shape = MODELS[args.model]
    if lead:
        print(f"{args.dataset}: {len(train)} train / {len(test)} test reviews, vocabulary {len(vocab)}, "
              f"{sum(len(e) for e in enc_train) / len(train):.1f} tokens per review on average (max "
              f"{max(len(e) for e in enc_train)}); {shape['num_layers']}-layer"
              f"{' bidirectional' if shape['bidirectional'] else ''} {args.cell} {args.hidden}, device "
              f"{args.device}, {epochs} epochs"
              + (f", {distributed.world} ranks x batch {args.batch_size}" if distributed else ""), flush=True)

    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    base = SentimentClassifier(len(vocab), args.cell, hidden=args.hidden, num_layers=shape["num_layers"],
                               bidirectional=shape["bidirectional"]).to(args.device)
    models = make_models(base, args.cell)
    trainers = models
    if distributed is not None:
        from torch.nn.parallel import DistributedDataParallel

        trainers = {name: DistributedDataParallel(m) for name, m in models.items()}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in models.items()}
    test_batches = make_batches(enc_test, y_test, 256, list(range(len(enc_test))), args.device)

    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a nicety, not a requirement
        tqdm = None
    history: Dict[str, List[dict]] = {name: [] for name in models}
    # Untimed and local (no collectives): each rank warms up on its own throw-away copies.
    warm_up(models, make_batches(enc_train, y_train, args.batch_size, list(range(min(len(enc_train), 8 * args.batch_size))),
                                 args.device), args.device)
    order_gen = torch.Generator().manual_seed(args.seed)
    tokens_per_epoch = 0.0
    for epoch in range(epochs):
        order = shard(torch.randperm(len(enc_train), generator=order_gen).tolist(), distributed)
        batches = make_batches(enc_train, y_train, args.batch_size, order, args.device)
        tokens_per_epoch = float(sum(len(enc_train[i]) for i in order))
        if distributed is not None:
            tokens_per_epoch = distributed.total(tokens_per_epoch)
        for name in models:
            desc = f"epoch {epoch + 1}/{epochs} {name:17s}"
            bar = (tqdm(total=len(batches), desc=desc, leave=False, disable=args.no_progress or None)
                   if tqdm and lead else _NoBar())
            result = train_epoch(trainers[name], optimizers[name], batches, args.device, bar)
            bar.close()
            if distributed is not None:
                result["seconds"] = distributed.slowest(result["seconds"])
                result["batch_losses"] = distributed.mean(result["batch_losses"])
                result["loss"] = sum(result["batch_losses"]) / max(1, len(result["batch_losses"]))
            result["test_accuracy"] = accuracy(models[name], test_batches) if lead else float("nan")
            result["tokens_per_s"] = tokens_per_epoch / result["seconds"]
            history[name].append(result)
            if lead:
                print(f"{desc}  {result['seconds']:7.2f} s  {result['tokens_per_s']:9.0f} tok/s  "
                      f"loss {result['loss']:.5f}  test acc {result['test_accuracy']:.4f}", flush=True)

    summary = None
    if lead:
        summary = summarize(history, args, epochs, len(train), len(test), len(vocab), tokens_per_epoch)
        write_outputs(summary, history, args)
    if distributed is not None:
        # Every rank leaves together: a rank that tore its process group down while rank 0 (which
        # hosts the TCPStore) was still writing the reports once aborted at exit in CI ("terminate
        # called without an active exception", rank 1; not reproduced in 10 runs since).
        distributed.barrier()
    return summary


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def summarize(history, args, epochs, n_train, n_test, vocab_size, tokens_per_epoch) -> dict:
    baseline = next(iter(history))  # torch.nn's model, or the Python loop for ln_lstm
    ref = history[baseline]
    runs = {}
    for name, eps in history.items():
        total = sum(e["seconds"] for e in eps)
        runs[name] = {
            "total_seconds": total,
            "tokens_per_s": tokens_per_epoch * len(eps) / total,
            "speedup_vs_torch_nn": sum(e["seconds"] for e in ref) / total,
            "final_loss": eps[-1]["loss"],
            "final_test_accuracy": eps[-1]["test_accuracy"],
            "max_epoch_loss_diff_vs_torch_nn": max(abs(a["loss"] - b["loss"]) for a, b in zip(eps, ref)),
            "test_accuracy_diff_vs_torch_nn": abs(eps[-1]["test_accuracy"] - ref[-1]["test_accuracy"]),
            "epochs": [{k: v for k, v in e.items() if k != "batch_losses"} for e in eps],
        }
    shape = MODELS[args.model]
    return {"dataset": args.dataset, "model": args.model, "cell": args.cell, "hidden": args.hidden,
            "num_layers": shape["num_layers"], "bidirectional": shape["bidirectional"], "ranks": args.world,
            "baseline": baseline, "device": args.device, "epochs": epochs, "batch_size": args.batch_size, "max_len": args.max_len, "seed": args.seed, "smoke": args.smoke,
            "train_examples": n_train, "test_examples": n_test, "vocab": vocab_size, "machine": machine(),
            "runs": runs}


def write_outputs(summary: dict, history, args) -> None:
    base = output_base(result_name(args), args.results_dir, args.publish)
    name = os.path.basename(base)
    rows = [[n, f"{r['total_seconds']:.2f}", f"{r['tokens_per_s']:.0f}", f"**{r['speedup_vs_torch_nn']:.2f}x**",
             f"{r['final_loss']:.5f}", f"{r['max_epoch_loss_diff_vs_torch_nn']:.2e}",
             f"{r['final_test_accuracy']:.4f}"] for n, r in summary["runs"].items()]
    # The summary's keys say "torch_nn" for the baseline run: torch.nn's layer, or for ln_lstm the Python loop
    # of torch.nn modules.
    baseline = summary.get("baseline", RUNS[0])
    table = markdown_table(["run", "train time (s)", "tokens/s", f"speed-up vs {baseline}", "final loss",
                            f"max epoch-loss diff vs {baseline}", "test accuracy"], rows)
    per_epoch = markdown_table(
        ["epoch"] + [f"{n} s" for n in history] + [f"{n} loss" for n in history],
        [[str(e + 1)] + [f"{history[n][e]['seconds']:.2f}" for n in history]
         + [f"{history[n][e]['loss']:.5f}" for n in history] for e in range(summary["epochs"])])
    m = summary["machine"]
    layer = (f"{summary['num_layers']}-layer {'bidirectional ' if summary['bidirectional'] else ''}"
             f"{summary['cell'].upper()} {summary['hidden']}")
    ranks = summary["ranks"]
    md = "\n".join([
        f"# Sentiment benchmark: {summary['dataset']}, {layer}, {summary['device']}"
        + (f", {ranks} ranks (DDP)" if ranks > 1 else ""), "",
        f"{summary['train_examples']} train / {summary['test_examples']} test reviews, vocabulary "
        f"{summary['vocab']}, batch {summary['batch_size']}" + (f" per rank x {ranks} ranks" if ranks > 1 else "")
        + f", {summary['epochs']} epochs, seed {summary['seed']}"
        + (f", max length {summary['max_len']}" if summary["max_len"] else "") + ".",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in m.items()), "",
        table, "", "Per epoch:", "", per_epoch, "", f"![loss and time per epoch]({name}.png)"])
    with open(base + ".json", "w") as f:
        json.dump({"summary": summary,
                   "batch_losses": {n: [e["batch_losses"] for e in eps] for n, eps in history.items()}}, f)
    with open(base + ".md", "w") as f:
        f.write(md + "\n")
    plot(base + ".png", history, f"{layer} on {summary['dataset']} ({summary['device']})")
    print()
    print(md)
    print(f"\nsaved {base}.json, .md and .png")


if __name__ == "__main__":
    main()
    sys.exit(0)
