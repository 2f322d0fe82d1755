"""Latency and throughput of model folders in PyTorch fp32, batch 1 and 32, one process, one machine.

    python benchmarks/speed.py runs/sst2-fast/teacher runs/sst2-fast/distilled --data ../shared/data/sst2

Inputs are fixed-shape batches at the dev split's mean token length (as `dpq evaluate` uses); each figure
is the median of --repeats runs after --warmup runs. Ratios are taken against the first folder.
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
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = load_data(args.data, need=("dev",)).split("dev")
    hw = measure.hardware()
    print(f"# {hw['cpu']}, {hw['threads']} threads, torch {hw['torch']}")
    print("| model | params | seq | bs1 ms | bs32 ms | bs32 samples/s | bs1 × vs first | bs32 × vs first |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base = None
    for path in args.models:
        model, tok = load_model(path)
        seq = round(statistics.mean(len(x) for x in encode_split(dev, tok, 512).input_ids))
        b1 = measure.torch_latency_ms(model, 1, seq, warmup=args.warmup, repeats=args.repeats)
        b32 = measure.torch_latency_ms(model, 32, seq, warmup=args.warmup, repeats=args.repeats)
        base = base or (b1, b32)
        print(f"| {path} | {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M | {seq} | {b1:.2f} | {b32:.1f} | "
              f"{32e3 / b32:.0f} | {base[0] / b1:.2f} | {base[1] / b32:.2f} |")


if __name__ == "__main__":
    main()
