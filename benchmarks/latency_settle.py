"""Why round-robin latency pauses before each model: the same files timed with and without the pause.

    python benchmarks/latency_settle.py runs/sst2-fast/export-int4-quantized-qat runs/sst2-fast/export-int8-pruned

Each folder's ``model.onnx`` runs with every ORT optimizer set the export considers (all on, and the slow fusions
off), and ``--trials`` times the export's own choice (``runtime.pick_fastest``: interleaved, batch 1 and 32, here at
dev's mean length of 25 tokens) runs over all of them: once with ``settle_s`` 0 (each model's block starts straight
after the previous model's) and once with dpq's pause. Per candidate it prints the median over trials and the
spread (min-max) of the trials' medians. A spread that dwarfs the gaps between candidates makes any choice noise.
"""

from __future__ import annotations

import argparse
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
    candidates = {Path(d).name + "".join(f" -{o}" for o in off): (Path(d) / "model.onnx", off)
                  for d in args.folders for off in runtime.session_variants(Path(d) / "model.onnx")}
    print(f"{measure.hardware()['cpu']}, {torch.get_num_threads()} threads; median over {args.trials} trials "
          "(min-max of trials)")
    for settle in (0.0, measure.SETTLE_S):
        trials = [runtime.pick_fastest(candidates, seq=args.seq, settle_s=settle)[1] for _ in range(args.trials)]
        print(f"\nsettle_s = {settle}\n| candidate | bs1 ms | bs32 ms |\n| --- | ---: | ---: |")
        for k in candidates:
            cells = [f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"
                     for v in ([t[k][b] for t in trials] for b in ("bs1", "bs32"))]
            print(f"| {k} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
