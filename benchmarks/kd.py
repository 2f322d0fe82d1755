"""Does distillation beat plain fine-tuning of the same student, and by how much over seeds?

    python benchmarks/kd.py --run runs/sst2-fast --data ../shared/data/sst2 [--seeds 42 43 44] [--max-train-samples 8000]

For each seed: the student fine-tuned without KD (the recipe's baseline settings) and distilled from
RUN/teacher with each KD setting in CONFIGS, on the same seeded training subset, 1 epoch. Models go to
RUN/bench-kd/NAME-sSEED (finished ones are skipped). Prints dev accuracy per seed, mean and half-range.
"""  # noqa: E501 (the usage line is printed verbatim by --help)

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
from pathlib import Path

from dpq import models
from dpq.data import load_data
from dpq.pipeline import run_stage
from dpq.recipe import BaselineSettings, DataSettings, DistillSettings
from dpq.registry import stage_key
from dpq.stages import distill_stage, finetune_stage

STUDENT = "sentence-transformers/all-MiniLM-L6-v2"
CONFIGS = {  # name: distill overrides
    "kd-a0.5-T2": {"alpha": 0.5, "temperature": 2.0},
    "kd-a0.9-T2": {"alpha": 0.9, "temperature": 2.0},
    "kd-gor-T2": {"loss_weights": "gor", "temperature": 2.0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--max-train-samples", type=int, default=8000)
    ap.add_argument("--only", nargs="*", help="subset of CONFIGS")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="dpq: %(message)s")
    run, data = Path(args.run), load_data(args.data)
    data_key = dataclasses.asdict(DataSettings(path=args.data))
    bench = run / "bench-kd"
    acc: dict[str, list[float]] = {}
    for seed in args.seeds:
        base = BaselineSettings(epochs=1, lr=1e-4, max_train_samples=args.max_train_samples, seed=seed)
        out = bench / f"no-kd-s{seed}"
        st = stage_key(base, data=data_key, inputs={"model": STUDENT})
        run_stage(out.name, out, st,
                  lambda: finetune_stage(base, STUDENT, data, out, kind="baseline", stage_settings=st), trains=True)
        acc.setdefault("no-kd", []).append(models.read_metrics(out)["accuracy"])
        for name in args.only or list(CONFIGS):
            s = DistillSettings(epochs=1, lr=1e-4, max_train_samples=args.max_train_samples, seed=seed, **CONFIGS[name])
            out_k = bench / f"{name}-s{seed}"
            st_k = stage_key(s, data=data_key, inputs={"teacher": run / "teacher"})
            run_stage(out_k.name, out_k, st_k,
                      lambda s=s, out_k=out_k, st_k=st_k: distill_stage(s, run / "teacher", data, out_k,
                                                                        stage_settings=st_k), trains=True)
            acc.setdefault(name, []).append(models.read_metrics(out_k)["accuracy"])
    print(f"\n| student (MiniLM-L6, {args.max_train_samples} sentences, 1 epoch) | "
          + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | ± half-range |")
    print("| --- |" + " ---: |" * (len(args.seeds) + 2))
    for name, a in acc.items():
        print(f"| {name} | " + " | ".join(f"{x:.4f}" for x in a)
              + f" | {statistics.mean(a):.4f} | {(max(a) - min(a)) / 2:.4f} |")


if __name__ == "__main__":
    main()
