"""Teacher logits for KD: the fp32 PyTorch teacher against its dynamic-int8 ONNX file in ONNX Runtime.

Prints sentences/s of each (medians of ``--repeats`` passes after a warm-up pass), their ratio, the argmax agreement
and largest logit difference on the training sentences, and both teachers' dev accuracy. This is what
``teacher_logits: onnx-int8`` trades: its speed for its rounding.

    PYTHONPATH=src python benchmarks/teacher_logits.py runs/sst2-fast/teacher --data ../shared/data/sst2 --n 2000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dpq import measure, models
from dpq.data import encode_split, load_data, pad_ids
from dpq.onnx import export, int8, runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher", help="fine-tuned teacher folder")
    ap.add_argument("--data", required=True, help="folder with train and dev files")
    ap.add_argument("--n", type=int, default=2000, help="training sentences to score")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per teacher")
    args = ap.parse_args()

    data = load_data(args.data)
    model, tok = models.load_classifier(args.teacher)
    model.eval()
    train = encode_split(data.split("train").subset(args.n, 1), tok, 128)
    dev = encode_split(data.split("dev"), tok, 128)
    pads = pad_ids(tok)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fp32 = export.export_onnx(model, Path(tmp) / "fp32.onnx")
        info = int8.int8_onnx(fp32, Path(tmp) / "int8.onnx")
        build = time.perf_counter() - t0
        session = runtime.ort_session(Path(tmp) / "int8.onnx", threads=torch.get_num_threads())
        runs = {"torch-fp32": lambda: measure.predict_logits(model, train, pads),
                "onnx-int8": lambda: runtime.ort_predict_logits(session, train, pads)}
        rate, logits = {}, {}
        for name, fn in runs.items():
            logits[name] = fn()  # warm-up
        for _ in range(args.repeats):  # interleaved, so load on the machine hits both alike
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                rate.setdefault(name, []).append(len(train) / (time.perf_counter() - t0))
        acc = {"torch-fp32": measure.evaluate_model(model, dev, pads)["accuracy"],
               "onnx-int8": measure.accuracy_and_loss(runtime.ort_predict_logits(session, dev, pads),
                                                      dev.labels)["accuracy"]}
    a, b = logits["torch-fp32"], logits["onnx-int8"]
    print(f"int8 file built in {build:.0f} s (attention fused: {info['fused_attention']}); "
          f"{torch.get_num_threads()} threads, {len(train)} training sentences")
    for name in runs:
        print(f"{name:10s} {statistics.median(rate[name]):7.1f} sentences/s   dev accuracy {acc[name]:.4f}")
    print(f"speed-up {statistics.median(rate['onnx-int8']) / statistics.median(rate['torch-fp32']):.2f}x   "
          f"argmax agreement {(a.argmax(-1) == b.argmax(-1)).float().mean().item():.4f}   "
          f"max |logit difference| {(a - b).abs().max().item():.3f}")


if __name__ == "__main__":
    main()
