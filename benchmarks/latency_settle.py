"""Why round-robin latency pauses before each model: the same files timed with and without the pause.

    python benchmarks/latency_settle.py runs/sst2-fast/export-int4-quantized-qat runs/sst2-fast/export-int8-pruned

Each folder's ``model.onnx`` runs with every ORT optimizer set the export considers (all on, and the slow fusions
off), so the candidates are the ones ``dpq export`` chooses between. ``--trials`` times interleave them all at
batch 1 and 32 (dev's mean length, 25 tokens), once with ``settle_s`` 0 (each model's block starts straight after
the previous model's) and once with dpq's default pause; per candidate it prints the median over trials and the
spread (min-max) of the trials' medians. A spread that dwarfs the gaps between candidates makes any choice noise.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
from pathlib import Path

import torch

from dpq import measure
from dpq.onnx import runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="exported ONNX folders")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--seq", type=int, default=25)
    args = ap.parse_args()
    threads = torch.get_num_threads()
    sessions = {}
    for folder in map(Path, args.folders):
        f = folder / "model.onnx"
        for off in runtime.session_variants(f):
            name = folder.name + "".join(f" -{o}" for o in off)
            sessions[name] = runtime.ort_session(f, threads=threads, disabled_optimizers=off)
    default = inspect.signature(measure.interleaved_latency_ms).parameters["settle_s"].default
    print(f"{measure.hardware()['cpu']}, {threads} threads; median over {args.trials} trials (min-max of trials)")
    for settle in (0.0, default):
        trials = {k: {1: [], 32: []} for k in sessions}
        for _ in range(args.trials):
            for bs in (1, 32):
                ids = torch.randint(5, 100, (bs, args.seq))
                mask = torch.ones_like(ids)
                fns = [{"ms": (lambda s=s: runtime.ort_logits(s, ids, mask))} for s in sessions.values()]
                rows = measure.interleaved_latency_ms(fns, rounds=4, repeats=10 if bs == 1 else 3, warmup=2,
                                                      settle_s=settle)
                for k, r in zip(sessions, rows):
                    trials[k][bs].append(r["ms"])
        print(f"\nsettle_s = {settle}")
        print("| candidate | bs1 ms | bs32 ms |\n| --- | ---: | ---: |")
        for k, t in trials.items():
            cells = [f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" for v in t.values()]
            print(f"| {k} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
