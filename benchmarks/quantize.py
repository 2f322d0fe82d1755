"""4-bit quantization of the pruned (or distilled) student, every accuracy measured on the exported ONNX file.

    python benchmarks/quantize.py --run runs/sst2-fast --data ../shared/data/sst2 [--source pruned] [--seeds 42 43 44]
        [--out RUN/bench-quant]

Phase 1 makes each variant with dpq's own stages into OUT/NAME (finished ones are skipped, whatever code made
them: give a new --out to measure new code):
int4 RTN, int4 GPTQ, int4 QAT+KD with fixed weights, with GoR, and EKD-GoR (teacher + fp32 student), the QAT
ones once per seed; then exports fp32 and int8 ONNX of the source and int4 ONNX of every quantized model.
Phase 2 is one ``dpq evaluate`` over every ONNX folder in this process: accuracy by ONNX Runtime on the dev
split, on-disk size, latency at batch 1 and 32 timed round-robin. Prints the table, QAT mean ± spread over
seeds, and the kernels each file ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
from pathlib import Path

from dpq.data import load_data
from dpq.pipeline import run_stage
from dpq.quant.methods import TRAINED
from dpq.recipe import DataSettings, EvaluateSettings, ExportSettings, QuantizeSettings
from dpq.registry import stage_key
from dpq.stages import evaluate_dirs
from dpq.stages_quant import export_stage, quantize_stage

VARIANTS = {  # name: (method, settings overrides)
    "int4-rtn": ("rtn", {}),
    "int4-gptq": ("gptq", {}),
    "int4-qat-kd-fixed": ("qat", {"loss_weights": "fixed"}),
    "int4-qat-kd-gor": ("qat", {"loss_weights": "gor"}),
    "int4-ekd-gor": ("qat", {"loss_weights": "gor", "ensemble": True}),
    # vocabulary trimmed to the training data's tokens (reported apart: unseen tokens read as [UNK])
    "int4-gptq-trim": ("gptq", {"trim_vocab": True}),
    "int4-qat-kd-gor-trim": ("qat", {"loss_weights": "gor", "trim_vocab": True}),
    # ... plus the vocabulary's first 15 000 ids (its most frequent words): fewer [UNK]s, still small
    "int4-qat-kd-gor-trim15k": ("qat", {"loss_weights": "gor", "trim_vocab": True, "trim_keep_first": 15000}),
}
SEEDED = {"int4-qat-kd-fixed", "int4-qat-kd-gor"}  # the ablation pair runs on every seed; the rest on the first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run folder holding teacher/ and the source model")
    ap.add_argument("--data", required=True)
    ap.add_argument("--source", default="pruned", help="model folder inside --run to quantize (pruned or distilled)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="seeds for the QAT variants")
    ap.add_argument("--max-train-samples", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--embedding-group-size", type=int, default=128)
    ap.add_argument("--accuracy-level", default="auto", help="MatMulNBits accuracy level: auto (timed here), 0 or 4")
    ap.add_argument("--int4-kernels", default="auto", help="int4 file: auto (timed here), nbits or int8")
    ap.add_argument("--out", help="folder for the variants and their exports (default: RUN/bench-quant)")
    ap.add_argument("--only", nargs="*", help="subset of variants")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="dpq: %(message)s")
    run = Path(args.run)
    bench = Path(args.out) if args.out else run / "bench-quant"
    source = run / args.source
    data = load_data(args.data)

    made: list[tuple[str, Path, int | None]] = []
    for name in args.only or list(VARIANTS):
        method, over = VARIANTS[name]
        seeds = [None] if method != "qat" else args.seeds if name in SEEDED else args.seeds[:1]
        for seed in seeds:
            s = QuantizeSettings(group_size=args.group_size, embedding_group_size=args.embedding_group_size,
                                 max_train_samples=args.max_train_samples,
                                 epochs=args.epochs, **over, **({"seed": seed} if seed is not None else {}))
            label = name + (f"-s{seed}" if seed is not None else "")
            st = stage_key(s, data=dataclasses.asdict(DataSettings(path=args.data)), choice={"method": method},
                           inputs={"teacher": run / "teacher", "model": source})
            out = bench / label
            run_stage(label, out, st, lambda s=s, method=method, out=out, st=st: quantize_stage(
                s, method, source, run / "teacher", data, out, stage_settings=st), trains=method in TRAINED)
            made.append((label, out, seed))

    es = ExportSettings(accuracy_level=args.accuracy_level, int4_kernels=args.int4_kernels)
    onnx_dirs = []
    for prec, label, src in [("fp32", "fp32", source), ("int8", "int8", source)] + [("int4", l, d) for l, d, _ in made]:
        out = bench / f"onnx-{label}"
        st = stage_key(es, choice={"precision": prec}, inputs={"model": src})
        run_stage(f"export {label}", out, st, lambda prec=prec, src=src, out=out, st=st: export_stage(
            es, prec, src, out, stage_settings=st), trains=False)
        onnx_dirs.append(out)

    rows = evaluate_dirs(onnx_dirs, data, EvaluateSettings(latency_rounds=args.rounds, latency_repeats=args.repeats))
    base = rows[0]
    print("\n| model | runtime | dev acc | size MB | × smaller | bs1 ms | bs32 ms | bs32 × vs fp32 | kernels |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        k = ", ".join(f"{a}×{b}" for a, b in sorted(r.get("kernels", {}).items()))
        print(f"| {r['name'].removeprefix('onnx-')} | {r['runtime']} | {r['accuracy']:.4f} | {r['size_mb']:.2f} | "
              f"{base['size_mb'] / r['size_mb']:.1f} | {r['latency_ms_bs1']:.2f} | {r['latency_ms_bs32']:.1f} | "
              f"{base['latency_ms_bs32'] / r['latency_ms_bs32']:.2f} | {k} |")
    by = {}
    for r in rows:
        name = r["name"].removeprefix("onnx-")
        for v in VARIANTS:
            if name.startswith(v + "-s"):
                by.setdefault(v, []).append(r["accuracy"])
    print()
    for v, accs in by.items():
        spread = (max(accs) - min(accs)) / 2
        print(f"{v}: mean {statistics.mean(accs):.4f} ± {spread:.4f} (half-range) over {len(accs)} seed(s): "
              + ", ".join(f"{a:.4f}" for a in accs))
    print(f"\nhardware: {rows[0]['hardware']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
