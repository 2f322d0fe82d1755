"""Structured pruning on the distilled student: accuracy, size, GFLOPs, PyTorch and ONNX Runtime latency.

    python benchmarks/prune.py --run runs/sst2-fast --data ../shared/data/sst2 [--max-train-samples 8000 --epochs 1]

Phase 1 prunes (with KD recovery) into RUN/bench-prune/NAME, skipping finished ones; phase 2 measures every
model, the unpruned student first, in this one process, so the ratios compare like with like. Latency: median
of --rounds × --repeats runs after warm-up, the models interleaved round by round, fixed-shape batches at the
dev split's mean token length; ONNX Runtime runs the fp32 export with all graph optimizations.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
from pathlib import Path

import torch

from dpq import load_model, measure
from dpq.data import encode_split, load_data, pad_ids
from dpq.onnx import export, runtime
from dpq.pipeline import run_stage
from dpq.recipe import DataSettings, PruneSettings
from dpq.registry import stage_key
from dpq.stages import prune_stage

CONFIGS = {  # name: (heads, ffn, importance, allocation)
    "h30-f30": (0.3, 0.3, "combined", "uniform"),
    "h50-f50": (0.5, 0.5, "combined", "uniform"),
    "h40-f50": (0.4, 0.5, "combined", "uniform"),
    "h40-f50-magnitude": (0.4, 0.5, "magnitude", "uniform"),
    "h40-f50-kd-gradient": (0.4, 0.5, "kd-gradient", "uniform"),
    "h40-f50-layer-adaptive": (0.4, 0.5, "combined", "layer-adaptive"),
}


def timers(model, seq: int, tmp: Path, name: str) -> dict:
    """One zero-argument callable per (runtime, batch size), built once: sessions and inputs outside the timing."""
    session = runtime.ort_session(export.export_onnx(model, tmp / f"{name}.onnx"), threads=torch.get_num_threads())
    out = {}
    for bs in (1, 32):
        x = measure.dummy_batch(model, bs, seq)
        out[f"torch_bs{bs}_ms"] = lambda x=x: model(**x)
        out[f"ort_bs{bs}_ms"] = lambda x=x: runtime.ort_logits(session, x["input_ids"], x["attention_mask"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run folder holding teacher/ and distilled/")
    ap.add_argument("--data", required=True)
    ap.add_argument("--max-train-samples", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per model per round")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds over all models")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--only", nargs="*", help="subset of configs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="dpq: %(message)s")
    run = Path(args.run)
    data = load_data(args.data)
    names = args.only or list(CONFIGS)
    for name in names:
        heads, ffn, imp, alloc = CONFIGS[name]
        s = PruneSettings(heads=heads, ffn=ffn, importance=imp, allocation=alloc,
                          max_train_samples=args.max_train_samples, epochs=args.epochs)
        settings = stage_key(s, data=dataclasses.asdict(DataSettings(path=args.data)),
                             inputs={"teacher": run / "teacher", "model": run / "distilled"})
        out = run / "bench-prune" / name
        run_stage(name, out, settings, lambda: prune_stage(s, run / "distilled", run / "teacher", data, out,
                                                           stage_settings=settings), trains=True)

    rows, fns = [], []
    dev = data.split("dev")
    hw = measure.hardware()
    tmp = Path(tempfile.mkdtemp())
    for name, folder in [("distilled (unpruned)", run / "distilled")] + [(n, run / "bench-prune" / n) for n in names]:
        model, tok = load_model(folder)
        ds = encode_split(dev, tok, 128)
        seq = round(ds.mean_length())
        acc = measure.evaluate_model(model, ds, pad_ids(tok))["accuracy"]
        rows.append({"name": name, "accuracy": acc, "params": measure_params(model),
                     "size_mb": measure.weights_size_mb(folder), "gflops": measure.gflops_per_example(model, seq)})
        fns.append(timers(model, seq, tmp, str(len(fns))))
    for row, lat in zip(rows, measure.interleaved_latency_ms(fns, rounds=args.rounds, repeats=args.repeats,
                                                            warmup=args.warmup)):
        row.update(lat)
    base = rows[0]
    print(f"# {hw['cpu']}, {hw['threads']} threads, torch {hw['torch']}; seq {seq} tokens (dev mean); "
          f"median of {args.rounds}x{args.repeats} interleaved runs")
    print("| model | dev acc | Δ acc | params | size MB | GFLOPs | "
          "torch bs1 ms | torch bs32 ms | ORT bs1 ms | ORT bs32 ms | torch bs32 × | ORT bs32 × |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['accuracy']:.4f} | {100 * (r['accuracy'] - base['accuracy']):+.1f} pt | "
              f"{r['params'] / 1e6:.2f} M | {r['size_mb']:.1f} | {r['gflops']:.3f} | {r['torch_bs1_ms']:.2f} | "
              f"{r['torch_bs32_ms']:.1f} | {r['ort_bs1_ms']:.2f} | {r['ort_bs32_ms']:.1f} | "
              f"{base['torch_bs32_ms'] / r['torch_bs32_ms']:.2f} | {base['ort_bs32_ms'] / r['ort_bs32_ms']:.2f} |")
    (run / "bench-prune").mkdir(exist_ok=True)
    (run / "bench-prune" / "results.json").write_text(json.dumps({"hardware": hw, "rows": rows}, indent=2))


def measure_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    main()
