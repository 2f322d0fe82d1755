"""Where one training step's time goes: forward, backward, clipping, AdamW, zeroing (wall clock of each phase).

    python benchmarks/train_step_phases.py runs/sst2-fast/distilled --length 14 --modes fp32 fp32-fused bf16 bf16-fused

A model folder, a batch of 32 random ids of ``--length`` tokens, 2 threads; each mode in its own process (so one
mode's allocator and thread pools never time another's), medians of ``--steps`` steps after ``--warmup``. Modes:
``fp32`` / ``bf16`` (CPU autocast), ``-fused`` (fused AdamW; without it PyTorch's per-tensor loop, its CPU default).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch


def one(path: str, mode: str, length: int, steps: int, warmup: int) -> str:
    from dpq import models

    torch.set_num_threads(2)
    model, _ = models.load_classifier(path)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True if mode.endswith("-fused") else None)
    ids = torch.randint(1000, 15000, (32, length))
    labels = torch.randint(0, 2, (32,))
    times: dict[str, list[float]] = {}
    for i in range(warmup + steps):
        t = [time.perf_counter()]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.startswith("bf16")):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        if i >= warmup:
            for name, a, b in zip(("forward", "backward", "clip", "adamw", "zero"), t, t[1:]):
                times.setdefault(name, []).append(b - a)
            times.setdefault("step", []).append(t[-1] - t[0])
    return " | ".join(f"{statistics.median(v) * 1000:.0f}" for v in times.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--length", type=int, default=14)
    ap.add_argument("--modes", nargs="+", default=["fp32", "fp32-fused", "bf16", "bf16-fused"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(one(args.model, args.one, args.length, args.steps, args.warmup))
        return
    from dpq import measure

    print(f"\n{args.model}, batch 32, {args.length} tokens, 2 threads; ms, median of {args.steps} steps\n")
    print("| mode | forward | backward | clip | AdamW | zero | step |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode in args.modes:
        row = subprocess.run([sys.executable, __file__, args.model, "--one", mode, "--length", str(args.length),
                              "--steps", str(args.steps), "--warmup", str(args.warmup)],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        print(f"| {mode} | {row} |", flush=True)
    print(f"\n{measure.hardware()}")


if __name__ == "__main__":
    main()
