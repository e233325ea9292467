"""DistributedDataParallel: two processes on this machine (gloo, localhost only) train with
fusedrnn exactly as they do with torch.nn, and the sentiment benchmark's torchrun mode runs.

Each test starts two processes (spawn) once and does all its work in them: process start-up
(importing torch) is most of the cost."""

import copy
import json
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch build has no torch.distributed with gloo")

WORLD = 2
STEPS = 3
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
I, H, T, B = 3, 4, 5, 8  # B: the global batch, B / WORLD rows per rank


class Classifier(nn.Module):
    """A 2-layer bidirectional recurrent layer on a packed ragged batch, and a linear head on the
    last layer's final states: every parameter kind DDP has to reduce."""

    def __init__(self, cell: str):
        super().__init__()
        self.rnn = CELLS[cell](I, H, num_layers=2, bidirectional=True, batch_first=True, dtype=torch.float64)
        self.fc = nn.Linear(2 * H, 1, dtype=torch.float64)

    def forward(self, x, lengths):
        _, state = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        h = state[0] if isinstance(state, tuple) else state
        return self.fc(torch.cat([h[-2], h[-1]], dim=1)).squeeze(-1)


def global_batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, I, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    y = torch.randint(0, 2, (B,), generator=gen).double()
    return x, lengths, y


def train(model: nn.Module, forward, x, lengths, y) -> dict:
    """STEPS of Adam on one batch; the trained weights."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(forward(x, lengths), y).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on a small machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=300))
    try:
        x, lengths, y = global_batch()
        rows = slice(rank, None, WORLD)  # this rank's shard
        weights = {}
        for cell in CELLS:
            torch.manual_seed(0)
            reference = Classifier(cell)
            ours = fusedrnn.convert(copy.deepcopy(reference))
            for name, model in (("torch.nn", reference), ("fusedrnn", ours)):
                weights[cell, name] = train(model, DistributedDataParallel(model), x[rows], lengths[rows], y[rows])
        torch.save(weights, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_training_with_fusedrnn_equals_ddp_with_torch_nn(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x, lengths, y = global_batch()
    for cell in CELLS:
        # Independent reference: one process, torch.nn, the whole batch. DDP averages the ranks'
        # gradients of their shard means, which is the gradient of the whole batch's mean.
        torch.manual_seed(0)
        single = Classifier(cell)
        expected = train(single, single, x, lengths, y)
        torch.manual_seed(0)
        untrained = Classifier(cell).state_dict()
        for r, weights in enumerate(ranks):
            for name in ("torch.nn", "fusedrnn"):
                got = weights[cell, name]
                assert got.keys() == expected.keys()
                for k in expected:
                    torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-10,
                                               msg=f"{cell} {name} rank {r}: {k}")
        assert all((expected[k] - untrained[k]).abs().max() > 1e-3 for k in expected)  # every weight trained


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sentiment_worker(rank: int, port: int, out_dir: str) -> None:
    # What torchrun sets for each process.
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    from benchmarks import sentiment

    summary = sentiment.main(["--smoke", "--no-progress", "--model", "bidirectional", "--hidden", "8",
                              "--results-dir", out_dir])
    assert (summary is None) == (rank != 0)  # rank 0 reports, the others only train


def test_sentiment_benchmark_runs_under_two_ranks(tmp_path):
    from benchmarks.common import machine
    from benchmarks.layers import cpu_slug

    mp.spawn(_sentiment_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    name = f"sentiment_rt_bilstm8_cpu_{cpu_slug(dict(machine(), device='cpu'))}_ddp{WORLD}_smoke"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}{ext}" for ext in (".json", ".md", ".png")]
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    summary = saved["summary"]
    assert summary["ranks"] == WORLD and summary["bidirectional"] and summary["num_layers"] == 2
    # Each rank took half of the 384 examples' steps: 192 / 32 = 6 per epoch.
    assert [len(epoch) for epoch in saved["batch_losses"]["torch.nn packed"]] == [6]
    for name in ("fusedrnn packed", "fusedrnn lengths"):
        assert summary["runs"][name]["max_epoch_loss_diff_vs_torch_nn"] < 1e-5
        assert summary["runs"][name]["test_accuracy_diff_vs_torch_nn"] <= 0.01
    assert 0.3 < summary["runs"]["torch.nn packed"]["final_loss"] < 0.8
