"""Latency and throughput of model folders in PyTorch fp32, batch 1 and 32, one process, one machine.

    python benchmarks/speed.py runs/sst2-fast/teacher runs/sst2-fast/distilled --data ../shared/data/sst2

Inputs are fixed-shape batches at the dev split's mean token length (as `dpq evaluate` uses); each figure
is the median of --rounds × --repeats runs after --warmup runs, the models interleaved round by round.
Ratios are taken against the first folder.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from dpq import load_model, measure
from dpq.data import encode_split, load_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", default=os.environ.get("DPQ_DATA", "nyu-mll/glue:sst2"))
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per model per round")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds over all models")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = load_data(args.data, need=("dev",)).split("dev")
    hw = measure.hardware()
    print(f"# {hw['cpu']}, {hw['threads']} threads, torch {hw['torch']}")
    print("| model | params | seq | bs1 ms | bs32 ms | bs32 samples/s | bs1 × vs first | bs32 × vs first |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows, fns = [], []
    for path in args.models:
        model, tok = load_model(path)
        seq = round(statistics.mean(len(x) for x in encode_split(dev, tok, 512).input_ids))
        batches = {bs: measure.dummy_batch(model, bs, seq) for bs in (1, 32)}
        fns.append({f"bs{bs}": (lambda m=model, x=x: m(**x)) for bs, x in batches.items()})
        rows.append((path, sum(p.numel() for p in model.parameters()), seq))
    lat = measure.interleaved_latency_ms(fns, rounds=args.rounds, repeats=args.repeats, warmup=args.warmup)
    b1, b32 = lat[0]["bs1"], lat[0]["bs32"]
    for (path, params, seq), t in zip(rows, lat):
        print(f"| {path} | {params / 1e6:.1f} M | {seq} | {t['bs1']:.2f} | {t['bs32']:.1f} | {32e3 / t['bs32']:.0f} | "
              f"{b1 / t['bs1']:.2f} | {b32 / t['bs32']:.2f} |")


if __name__ == "__main__":
    main()
