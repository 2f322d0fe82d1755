"""Fixtures: ~200-row slices of real SST-2 and tiny random BERT models built in code (milliseconds to run)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def load_benchmark(name: str):
    """A script of ``benchmarks/`` as a module (the folder is no package): its functions are tested like dpq's."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _read_rows(path: Path, n: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    return lines[: n + 1]


def _synthetic_rows(n: int, seed: int) -> list[str]:
    """Stand-in sentiment rows for a checkout without ../shared (the tests then still run, on made-up text).

    Shaped like the real slice: ~1 000 distinct words, 6-14 per sentence, and dev sentences (seed 1) draw on
    words train never uses, as real dev sets do.
    """
    import random

    rng = random.Random(seed)
    good, bad = [f"good{i}" for i in range(40)], [f"bad{i}" for i in range(40)]
    fill = [f"w{i}" for i in range(900 if seed == 0 else 1100)]
    rows = ["sentence\tlabel"]
    for _ in range(n):
        y = rng.randint(0, 1)
        words = rng.sample(fill, rng.randint(5, 13)) + [rng.choice(good if y else bad)]
        rng.shuffle(words)
        rows.append(" ".join(words) + f" \t{y}")
    return rows


@pytest.fixture(scope="session")
def sst2_slice(tmp_path_factory) -> Path:
    """train.tsv (200 rows) and dev.tsv (100 rows) cut from the real SST-2 (never copied into the repo)."""
    folder = tmp_path_factory.mktemp("sst2")
    if (SST2 / "train.tsv").is_file():
        train, dev = _read_rows(SST2 / "train.tsv", 200), _read_rows(SST2 / "dev.tsv", 100)
    else:
        train, dev = _synthetic_rows(200, 0), _synthetic_rows(100, 1)
    (folder / "train.tsv").write_text("\n".join(train) + "\n", encoding="utf-8")
    (folder / "dev.tsv").write_text("\n".join(dev) + "\n", encoding="utf-8")
    return folder


def _vocab(folder: Path) -> list[str]:
    words = set()
    for name in ("train.tsv", "dev.tsv"):
        for line in (folder / name).read_text(encoding="utf-8").splitlines()[1:]:
            words.update(re.findall(r"\w+|[^\w\s]", line.split("\t")[0].lower()))
    return SPECIALS + sorted(words)


def make_tiny(folder: Path, vocab: list[str], *, hidden=32, layers=2, heads=4, ffn=64, seed=0) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 takes the vocabulary itself (a vocab_file= keyword is silently ignored: every word -> [UNK])
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=ffn, max_position_embeddings=128, num_labels=2,
                     id2label={0: "0", 1: "1"}, label2id={"0": 0, "1": 1})
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    assert tok.unk_token_id not in tok(vocab[-1])["input_ids"], "tiny tokenizer lost its vocabulary"
    return folder


@pytest.fixture(scope="session")
def tiny_models(sst2_slice, tmp_path_factory) -> dict[str, Path]:
    """A 2-layer student (hidden 32) and a 4-layer teacher (hidden 48), same tokenizer, same head count."""
    root = tmp_path_factory.mktemp("models")
    vocab = _vocab(sst2_slice)
    return {
        "student": make_tiny(root / "student", vocab, hidden=32, layers=2, heads=4, ffn=64, seed=1),
        "teacher": make_tiny(root / "teacher", vocab, hidden=48, layers=4, heads=4, ffn=96, seed=2),
    }


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DPQ_DATA", raising=False)


def wait_for_step(proc, state: Path, step: int) -> None:
    """Poll a training process's checkpoint ``state.json`` until it reaches ``step``; fail if the process ends first."""
    import json
    import time

    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(state.read_text())["step"] >= step:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before the test could act on it"
