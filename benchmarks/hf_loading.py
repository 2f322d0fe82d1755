"""dpq's own loader against transformers' (registered classes, and trust_remote_code where dpq cannot be imported)
on real model folders: the largest |logit difference| over dev sentences, one sentence at a time as a pipeline runs.

    python benchmarks/hf_loading.py runs/sst2-fast/pruned runs/sst2-fast/quantized-qat --data ../shared/data/sst2

Each folder is copied to a temporary folder first and never changed. A folder written before dpq saved its Hugging
Face classes (``model_type`` ``bert`` with dpq's transform records) gets, in the copy only, the config and modeling
file dpq writes today, exactly as ``dpq.hf.save_config`` would have written them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CHILD = """
import json, os, sys, time
sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "dpq"))]
try:
    import dpq  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("dpq is still importable")
from transformers import AutoConfig, pipeline
folder, texts = sys.argv[1], json.loads(sys.stdin.read())
cfg = AutoConfig.from_pretrained(folder, trust_remote_code=True)
labels = [cfg.id2label[i] for i in range(cfg.num_labels)]
t0 = time.perf_counter()
clf = pipeline("text-classification", model=folder, trust_remote_code=True)
load = time.perf_counter() - t0
out = clf(texts, function_to_apply="none", top_k=None)
print(json.dumps({"load_s": load, "logits": [[{d["label"]: d["score"] for d in r}[n] for n in labels] for r in out]}))
"""


def _copy(folder: Path, tmp: Path) -> Path:
    from dpq import hf, models

    out = tmp / folder.name
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("manifest.json", "metrics.jsonl"))
    cfg = json.loads((out / "config.json").read_text())
    if not cfg["model_type"].startswith("dpq-"):
        model, _ = models.load_model(folder)  # checksums verified on the original
        hf.save_config(model.config, out)
    return out


def _logits(clf, texts: list[str], labels: list[str]) -> list[list[float]]:
    return [[{d["label"]: d["score"] for d in r}[n] for n in labels]
            for r in clf(texts, function_to_apply="none", top_k=None)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", default=os.environ.get("DPQ_DATA", "nyu-mll/glue:sst2"))
    ap.add_argument("--n", type=int, default=200, help="dev sentences (the first N)")
    args = ap.parse_args()

    from transformers import pipeline

    import dpq
    from dpq.data import load_data

    texts = load_data(args.data, need=("dev",)).split("dev").texts[: args.n]
    print(f"{len(texts)} dev sentences of {args.data}, one at a time; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| folder | model_type | vs dpq.load: pipeline (import dpq) | pipeline (trust_remote_code, no dpq) | "
          "same labels | pipeline load s (dpq / remote) |")
    print("|---|---|---:|---:|---:|---:|")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with tempfile.TemporaryDirectory() as tmp:
        env["HF_MODULES_CACHE"] = str(Path(tmp) / "modules")
        for path in args.models:
            folder = _copy(Path(path), Path(tmp))
            model, tok = dpq.load_model(folder)
            labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
            with torch.no_grad():
                ref = torch.tensor([model(**tok(t, return_tensors="pt")).logits[0].tolist() for t in texts])
            t0 = time.perf_counter()
            clf = pipeline("text-classification", model=str(folder))
            load = time.perf_counter() - t0
            mine = torch.tensor(_logits(clf, texts, labels))
            r = subprocess.run([sys.executable, "-c", CHILD, str(folder)], input=json.dumps(texts), env=env,
                               cwd=tmp, capture_output=True, text=True, check=False)
            if r.returncode:
                raise SystemExit(r.stderr[-2000:])
            child = json.loads(r.stdout.strip().splitlines()[-1])
            remote = torch.tensor(child["logits"])
            same = bool((mine.argmax(-1) == ref.argmax(-1)).all() and (remote.argmax(-1) == ref.argmax(-1)).all())
            mt = json.loads((folder / "config.json").read_text())["model_type"]
            print(f"| {Path(path).name} | {mt} | {(mine - ref).abs().max():.2e} | {(remote - ref).abs().max():.2e} | "
                  f"{same} | {load:.2f} / {child['load_s']:.2f} |")


if __name__ == "__main__":
    main()
