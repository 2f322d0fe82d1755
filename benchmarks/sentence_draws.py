"""Which training sentences a sample takes: any dpq command, with ``max_train_samples`` drawn another way.

dpq draws a seeded uniform sample. SST-2's training set is mostly short phrases cut from its sentences (mean 9.4
words; dev: 19.5), so two other draws are worth measuring at the same sentence count: ``longest`` (the N longest,
2.3x the tokens) and ``length-weighted`` (a seeded draw without replacement, each phrase's chance proportional to its
length). The BENCHMARKS issue-13 table "Which sentences" was measured with it:

    PYTHONPATH=src python benchmarks/sentence_draws.py longest distill --teacher runs/sst2-fast/teacher \\
        --out D --data ../shared/data/sst2 --max-train-samples 16000 --epochs 1 --teacher-logits onnx-int8

``uniform`` runs the command unchanged. The held-out slice is drawn before the sample, so it is the same for every draw.
"""

from __future__ import annotations

import random
import sys

from dpq import data
from dpq.cli import main

DRAWS = ("uniform", "longest", "length-weighted")


def patched_subset(draw: str):
    uniform = data.Split.subset

    def subset(self, n, seed):
        if draw == "uniform" or n is None or n >= len(self):
            return uniform(self, n, seed)
        words = [max(len(t.split()), 1) for t in self.texts]
        if draw == "longest":
            rank = sorted(range(len(self)), key=lambda i: (-words[i], i))
        else:  # Efraimidis-Spirakis: keys u^(1/w), the n largest are a weighted draw without replacement
            rng = random.Random(seed)
            keys = [rng.random() ** (1.0 / w) for w in words]
            rank = sorted(range(len(self)), key=lambda i: -keys[i])
        idx = sorted(rank[:n])
        return data.Split([self.texts[i] for i in idx], [self.labels[i] for i in idx],
                          f"{self.source}[{draw} {n} of {len(self)}]")

    return subset


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in DRAWS:
        sys.exit(f"usage: sentence_draws.py {{{','.join(DRAWS)}}} DPQ-COMMAND [ARGS...]")
    data.Split.subset = patched_subset(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
