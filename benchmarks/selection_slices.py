"""Which slice of the training data ranks a run's models the way dev does: the uniform held-out slice that dpq
chooses on today, or slices drawn from the training rows the run never saw.

    PYTHONPATH=src python benchmarks/selection_slices.py --data ../shared/data/sst2 RUN [RUN ...] [--n 2000]

SST-2's training rows are parse-tree phrases (mean 9.4 words), dev's are whole sentences (19.5). For each run folder
(read through its recipe.yaml) this rebuilds the held-out slice and every training subset the run drew (teacher,
student stages, GPTQ calibration), keeps the training rows none of them saw (rows whose text appears in any of them
removed too), and draws N of those twice: uniformly, and length-matched to dev (word counts; a seeded draw without
replacement with weights p_dev(length) / p_unseen(length)). The length-matched rows are also split by whether a row
the run trained on (two words or more) covers at least half of them. Every model folder of the run is then measured
on the held-out slice, the draws and dev (ONNX files one sentence per call, as the evaluation does). Prints each
model's accuracies and, per slice, Kendall's tau-b with dev over the run's models and the mean accuracy gap to dev.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path

import torch
import yaml

from dpq import models
from dpq.data import Split, load_data, sentence_families
from dpq.stages import split_accuracies

STUDENT_STAGES = ("baseline", "distill", "prune", "quantize")
MAX_WORDS = 50  # longer rows share one length bin


def _drawn(n: int | None, seed: int, size: int) -> list[int]:
    """The indices ``Split.subset(n, seed)`` keeps."""
    if n is None or n >= size:
        return list(range(size))
    return sorted(random.Random(seed).sample(range(size), n))


def _words(text: str) -> int:
    return min(max(len(text.split()), 1), MAX_WORDS)


def slices(run: Path, data_path: str, n: int, seed: int) -> tuple[dict[str, Split], dict]:
    r = yaml.safe_load((run / "recipe.yaml").read_text())
    d = r["data"]
    data = load_data(data_path).hold_out(d["validation_fraction"], d["validation_max_samples"], d["validation_seed"],
                                         unit=d.get("validation_unit", "row"))  # runs before it existed: rows
    train = data.split("train")
    seen: set[int] = set()
    for stage in ("teacher", *STUDENT_STAGES):
        s = r.get(stage) or {}
        if s.get("enabled", True) is False:
            continue
        seen.update(_drawn(s.get("max_train_samples"), s.get("seed", 42), len(train)))
    q = r.get("quantize") or {}
    seen.update(_drawn(q.get("calibration_samples"), q.get("seed", 42), len(train)))
    seen_texts = {train.texts[i] for i in seen} | set(data.split("heldout").texts)
    pool = [i for i in range(len(train)) if i not in seen and train.texts[i] not in seen_texts]
    if len(pool) < 2 * n:
        raise SystemExit(f"{run}: only {len(pool)} training rows unseen by the run; need {2 * n}")
    rng = random.Random(seed)
    uniform = rng.sample(pool, n)
    drawn = set(uniform)
    rest = [i for i in pool if i not in drawn]
    dev_hist = Counter(_words(t) for t in data.split("dev").texts)
    pool_hist = Counter(_words(train.texts[i]) for i in rest)
    weight = {b: dev_hist[b] / len(data.split("dev")) / (pool_hist[b] / len(rest)) for b in pool_hist if dev_hist[b]}
    keys = sorted(((rng.random() ** (1.0 / weight[_words(train.texts[i])]), i) for i in rest
                   if _words(train.texts[i]) in weight), reverse=True)
    matched = [i for _, i in keys[:n]]
    take = lambda idx, name: Split([train.texts[i] for i in idx], [train.labels[i] for i in idx], name)
    # a row is rarely new to the run although the row itself was never drawn: its phrases were (the parse tree)
    trained = {" ".join(train.texts[i].split()) for i in seen}
    covered = {i: _trained_share(train.texts[i], trained) >= 0.5 for i in matched}
    return {"heldout": data.split("heldout"), "unseen-uniform": take(uniform, "unseen uniform"),
            "unseen-length-matched": take(matched, "unseen length-matched"),
            "matched, a trained phrase covers half": take([i for i in matched if covered[i]], "covered"),
            "matched, none does": take([i for i in matched if not covered[i]], "not covered"),
            "dev": data.split("dev")}, {
        "unseen": len(pool),
        "dev covered half by a trained phrase": sum(_trained_share(t, trained) >= 0.5 for t in data.split("dev").texts)
        / len(data.split("dev")),
        # the rows no other row contains, over the whole training file (held-out slice included)
        "sentences in train": len((sentence_families(load_data(data_path).split("train").texts, 1 << 62, 1 << 62, 0)
                                   or (set(), set()))[0])}


def _trained_share(text: str, trained: set[str]) -> float:
    """The share of ``text``'s words that its longest trained word span (of two words or more) covers."""
    w = text.split()
    best = max((b - a for a in range(len(w)) for b in range(a + 2, len(w) + 1) if " ".join(w[a:b]) in trained),
               default=0)
    return best / max(1, len(w))


def model_dirs(run: Path) -> list[Path]:
    return sorted(p for p in run.iterdir() if p.is_dir() and (p / "config.json").is_file()
                  and ((p / "model.onnx").is_file() or any((p / w).is_file() for w in models.WEIGHT_FILES)))


def kendall_tau_b(x: list[float], y: list[float]) -> float:
    conc = disc = tx = ty = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            a, b = x[i] - x[j], y[i] - y[j]
            if a == 0 and b == 0:
                continue
            if a == 0:
                tx += 1
            elif b == 0:
                ty += 1
            elif (a > 0) == (b > 0):
                conc += 1
            else:
                disc += 1
    denom = ((conc + disc + tx) * (conc + disc + ty)) ** 0.5
    return (conc - disc) / denom if denom else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    for run in a.runs:
        splits, notes = slices(run, a.data, a.n, a.seed)
        lengths = {k: sum(len(t.split()) for t in s.texts) / len(s) for k, s in splits.items()}
        print(f"\n## {run} ({notes['unseen']} training rows unseen by the run; {notes['sentences in train']} "
              f"sentences in the training file; {100 * notes['dev covered half by a trained phrase']:.1f} % of dev "
              "half covered by a phrase the run trained on)")
        print("| model | " + " | ".join(f"{k} ({len(splits[k])}, {lengths[k]:.1f} words)" for k in splits) + " |")
        print("| --- |" + " ---: |" * len(splits))
        rows = {}
        for d in model_dirs(run):
            rows[d.name] = split_accuracies(d, splits)
            print(f"| {d.name} | " + " | ".join(f"{rows[d.name][k]:.4f}" for k in splits) + " |", flush=True)
        dev = [r["dev"] for r in rows.values()]
        for k in splits:
            if k == "dev":
                continue
            vals = [r[k] for r in rows.values()]
            gap = sum(v - w for v, w in zip(vals, dev)) / len(dev)
            best = max(rows, key=lambda m: rows[m][k])
            print(f"{k}: Kendall tau-b with dev {kendall_tau_b(vals, dev):+.2f}, mean gap to dev {100 * gap:+.2f} pt, "
                  f"picks {best} (dev {rows[best]['dev']:.4f})")


if __name__ == "__main__":
    main()
