"""End-to-end benchmark: train the classic sentiment classifier with torch.nn.GRU and with
fusedrnn.GRU side by side, from the same initial weights and in the same data order.

    Embedding(vocab, 100) -> GRU(100, 128) -> Linear(128, 1), binary cross-entropy, Adam 1e-3, batch 32

    python -m benchmarks.sentiment                       # Rotten Tomatoes snippets, CPU
    python -m benchmarks.sentiment --cell lstm           # the same with LSTM (or rnn)
    python -m benchmarks.sentiment --dataset polarity --max-len 100   # long reviews, truncated
    python -m benchmarks.sentiment --dataset imdb --data-dir ~/aclImdb
    python -m benchmarks.sentiment --device cuda

Three runs train in lock-step, one epoch each in turn: torch.nn fed a PackedSequence
(pack_padded_sequence(..., enforce_sorted=False), as users do), fusedrnn fed the same
PackedSequence, and fusedrnn given the padded batch plus `lengths=` (its own path). Each epoch's
time covers the whole training step: embedding, recurrent layer, loss, backward, optimizer.
Results go to benchmarks/results/sentiment_<dataset>_<cell>_<device>.{json,md,png}.
"""

import argparse
import copy
import json
import os
import sys
import time
from typing import Dict, List

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn

from . import sentiment_data as data
from .common import RESULTS_DIR, machine, markdown_table

RNN_CLASSES = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}
RUNS = ("torch.nn packed", "fusedrnn packed", "fusedrnn lengths")


class SentimentClassifier(nn.Module):
    def __init__(self, vocab_size: int, cell: str, embed: int = 100, hidden: int = 128):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed, padding_idx=data.Vocab.PAD)
        self.rnn = RNN_CLASSES[cell](embed, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 1)
        self.path = "packed"

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        if self.path == "packed":
            _, state = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        else:
            _, state = self.rnn(x, lengths=lengths)
        h = state[0] if isinstance(state, tuple) else state
        return self.fc(h[-1]).squeeze(-1)


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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="rt", choices=["rt", "polarity", "imdb"])
    parser.add_argument("--data-dir", default=None, help="aclImdb folder (imdb) or where to cache downloads")
    parser.add_argument("--cell", default="gru", choices=list(RNN_CLASSES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--epochs", type=int, default=None, help="default: 5 (rt), 10 (polarity), 3 (imdb)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=None, help="truncate reviews to this many tokens")
    parser.add_argument("--min-freq", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a few hundred examples, one epoch (for CI)")
    parser.add_argument("--results-dir", default=RESULTS_DIR)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fusedrnn sentiment: --device cuda, but torch sees no CUDA device")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    epochs = args.epochs or (1 if args.smoke else {"rt": 5, "polarity": 10, "imdb": 3}[args.dataset])

    train, test = data.load(args.dataset, args.data_dir, seed=args.seed)
    if args.smoke:
        train, test = train[:384], test[:192]
    vocab = data.Vocab([t for t, _ in train], min_freq=args.min_freq)
    enc_train = [vocab.encode(t, args.max_len) for t, _ in train]
    enc_test = [vocab.encode(t, args.max_len) for t, _ in test]
    y_train, y_test = [y for _, y in train], [y for _, y in test]
    tokens_per_epoch = sum(len(e) for e in enc_train)
    print(f"{args.dataset}: {len(train)} train / {len(test)} test reviews, vocabulary {len(vocab)}, "
          f"{tokens_per_epoch / len(train):.1f} tokens per review on average (max "
          f"{max(len(e) for e in enc_train)}); cell {args.cell}, device {args.device}, {epochs} epochs", flush=True)

    torch.manual_seed(args.seed)
    base = SentimentClassifier(len(vocab), args.cell).to(args.device)
    models = {}
    for name in RUNS:
        m = copy.deepcopy(base)
        if name.startswith("fusedrnn"):
            fusedrnn.convert(m)
            m.path = name.split()[-1]
        models[name] = m
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in models.items()}
    test_batches = make_batches(enc_test, y_test, 256, list(range(len(enc_test))), args.device)

    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a nicety, not a requirement
        tqdm = None
    history: Dict[str, List[dict]] = {name: [] for name in RUNS}
    warm_up(models, make_batches(enc_train, y_train, args.batch_size, list(range(min(len(enc_train), 8 * args.batch_size))),
                                 args.device), args.device)
    order_gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(epochs):
        order = torch.randperm(len(enc_train), generator=order_gen).tolist()
        batches = make_batches(enc_train, y_train, args.batch_size, order, args.device)
        for name in RUNS:
            desc = f"epoch {epoch + 1}/{epochs} {name:17s}"
            bar = (tqdm(total=len(batches), desc=desc, leave=False, disable=args.no_progress or None)
                   if tqdm else _NoBar())
            result = train_epoch(models[name], optimizers[name], batches, args.device, bar)
            bar.close()
            result["test_accuracy"] = accuracy(models[name], test_batches)
            result["tokens_per_s"] = tokens_per_epoch / result["seconds"]
            history[name].append(result)
            print(f"{desc}  {result['seconds']:7.2f} s  {result['tokens_per_s']:9.0f} tok/s  "
                  f"loss {result['loss']:.5f}  test acc {result['test_accuracy']:.4f}", flush=True)

    summary = summarize(history, args, epochs, len(train), len(test), len(vocab), tokens_per_epoch)
    write_outputs(summary, history, args)
    return summary


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def summarize(history, args, epochs, n_train, n_test, vocab_size, tokens_per_epoch) -> dict:
    ref = history["torch.nn packed"]
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
    return {"dataset": args.dataset, "cell": args.cell, "device": args.device, "epochs": epochs,
            "batch_size": args.batch_size, "max_len": args.max_len, "seed": args.seed, "smoke": args.smoke,
            "train_examples": n_train, "test_examples": n_test, "vocab": vocab_size, "machine": machine(),
            "runs": runs}


def write_outputs(summary: dict, history, args) -> None:
    os.makedirs(args.results_dir, exist_ok=True)
    name = f"sentiment_{args.dataset}_{args.cell}_{args.device}" + ("_smoke" if args.smoke else "")
    base = os.path.join(args.results_dir, name)
    rows = [[n, f"{r['total_seconds']:.2f}", f"{r['tokens_per_s']:.0f}", f"**{r['speedup_vs_torch_nn']:.2f}x**",
             f"{r['final_loss']:.5f}", f"{r['max_epoch_loss_diff_vs_torch_nn']:.2e}",
             f"{r['final_test_accuracy']:.4f}"] for n, r in summary["runs"].items()]
    table = markdown_table(["run", "train time (s)", "tokens/s", "speed-up", "final loss",
                            "max epoch-loss diff vs torch.nn", "test accuracy"], rows)
    per_epoch = markdown_table(
        ["epoch"] + [f"{n} s" for n in history] + [f"{n} loss" for n in history],
        [[str(e + 1)] + [f"{history[n][e]['seconds']:.2f}" for n in history]
         + [f"{history[n][e]['loss']:.5f}" for n in history] for e in range(summary["epochs"])])
    m = summary["machine"]
    md = "\n".join([
        f"# Sentiment benchmark: {summary['dataset']}, {summary['cell'].upper()}, {summary['device']}", "",
        f"{summary['train_examples']} train / {summary['test_examples']} test reviews, vocabulary "
        f"{summary['vocab']}, batch {summary['batch_size']}, {summary['epochs']} epochs, seed {summary['seed']}"
        + (f", max length {summary['max_len']}" if summary["max_len"] else "") + ".",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in m.items()), "",
        table, "", "Per epoch:", "", per_epoch, "", f"![loss and time per epoch]({name}.png)"])
    with open(base + ".json", "w") as f:
        json.dump({"summary": summary,
                   "batch_losses": {n: [e["batch_losses"] for e in eps] for n, eps in history.items()}}, f)
    with open(base + ".md", "w") as f:
        f.write(md + "\n")
    plot(base + ".png", history, f"{summary['cell'].upper()} on {summary['dataset']} ({summary['device']})")
    print()
    print(md)
    print(f"\nsaved {base}.json, .md and .png")


if __name__ == "__main__":
    main()
    sys.exit(0)
