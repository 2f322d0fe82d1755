"""Teachers' soft labels: each teacher's logits for the training sentences, computed once and cached; the extra
teachers of multi-teacher distillation (EKD: any dpq classifier folder, any architecture, its own tokenizer); and how
their softened distributions become the KD target(s) of a batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import artifacts, devices, measure, models
from .data import EncodedSplit, file_digest, pad_id, tokenize
from .distill import ensemble_logits
from .errors import DpqError
from .onnx.runtime import is_onnx_folder

log = logging.getLogger("dpq")

COMBINE = ("average", "per-teacher")


# ----------------------------------------------------------------------------- cached logits


# what a plain model folder's identity is made of: weights, config and tokenizer files (vocab.txt, merges, spm)
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")


def teacher_key(teacher_dir: Path, train_fingerprint: str, max_length: int) -> str:
    """What the cached logits depend on: the teacher's files (its manifest's checksums, or for a plain model folder
    the checksums of its weights, config and tokenizer files), the training data and the length they were cut to."""
    manifest = artifacts.read_manifest(teacher_dir)
    if manifest is not None:
        files = manifest.get("files")
    else:
        folder = Path(teacher_dir)
        files = {p.name: file_digest(p) for p in sorted(folder.glob("*"))
                 if p.suffix in MODEL_FILE_SUFFIXES and p.is_file()} if folder.is_dir() else str(folder)
    blob = json.dumps([files, train_fingerprint, max_length], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _read_cached_logits(path: Path, name: str, rows: int) -> torch.Tensor | None:
    """The cached logits if the entry is whole and is the one asked for; else None (one warning, entry dropped)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            key = (f.metadata() or {}).get("key")
            logits = f.get_tensor("logits")
        if key != name or logits.ndim != 2 or logits.shape[0] != rows:
            raise ValueError(f"holds {tuple(logits.shape)} for key {key}, expected {rows} rows for {name}")
        return logits
    except (OSError, ValueError, SafetensorError) as e:
        log.warning("teacher-logits cache entry %s is damaged or stale (%s); recomputing it", path,
                    str(e).splitlines()[0][:100])
        with contextlib.suppress(OSError):  # a read-only cache keeps it; the logits are recomputed all the same
            path.unlink(missing_ok=True)
        return None


def cached_teacher_logits(teacher, teacher_dir: Path, train_set, train_fingerprint: str, pads: dict, max_length: int,
                          key: str = "teacher_input_ids", runtime: str = "torch") -> torch.Tensor:
    """Teacher logits for the whole train set, computed once (on the GPU when there is one) and cached by (teacher
    files, data, max_length). Written under a unique temporary name and renamed, so concurrent runs on the same
    teacher never read half an entry; under several processes the main one computes and the others read."""
    name = (teacher_key(teacher_dir, train_fingerprint, max_length) + ("-own" if key == "input_ids" else "")
            + ("-onnx-int8" if runtime == "onnx-int8" else ""))
    path = models.cache_dir() / "teacher-logits" / f"{name}.safetensors"
    compute = (lambda: _compute_logits(teacher, train_set, pads, key)) if runtime == "torch" else \
        (lambda: _compute_logits_int8(teacher, Path(teacher_dir), train_set, pads, key))
    logits = None
    if devices.is_main():
        logits = _read_cached_logits(path, name, len(train_set))
        if logits is not None:
            log.info("teacher logits from cache %s", path)
        else:
            logits = compute()
            _store_logits(path, name, logits)
    devices.barrier()
    if logits is None:
        logits = _read_cached_logits(path, name, len(train_set))
        if logits is None:  # a cache folder not shared with the main process (another node)
            logits = compute()
    return logits


def _store_logits(path: Path, name: str, logits: torch.Tensor) -> None:
    """Cache ``logits`` under a unique name, renamed into place. A cache that cannot take them (full, over quota,
    read-only, not a folder) costs one warning, not the stage: the logits are in memory, a later run recomputes."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        save_file({"logits": logits.contiguous()}, tmp, metadata={"key": name})
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:100]
        log.warning("teacher logits not cached in %s (%s); using them from memory ($DPQ_CACHE sets the cache)",
                    path.parent, why)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)


def _compute_logits(teacher, train_set, pads: dict, key: str) -> torch.Tensor:
    log.info("computing teacher logits for %d training examples (cached for later runs)", len(train_set))
    home = next(teacher.parameters()).device
    dev = devices.device()
    teacher.to(dev)
    try:
        return measure.predict_logits(teacher, train_set, pads, key=key)
    finally:
        teacher.to(home)


def _compute_logits_int8(teacher, teacher_dir: Path, train_set, pads: dict, key: str) -> torch.Tensor:
    """The teacher's logits from its dynamic-int8 ONNX file in ONNX Runtime: on a CPU 3-4x the PyTorch fp32
    throughput (BENCHMARKS.md, issue 13), so a CPU run can distil on several times more sentences. The file is built
    once per teacher (keyed by its files) and kept in the cache."""
    from .extras import require
    from .onnx import export, int8, runtime

    require("onnx", "teacher_logits: onnx-int8")

    def build(folder: Path, path: Path) -> None:
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            fp32 = export.export_onnx(teacher.cpu().eval(), Path(tmp) / "fp32.onnx")
            int8.int8_onnx(fp32, Path(tmp) / "int8.onnx")
            os.replace(Path(tmp) / "int8.onnx", path)

    folder = models.cache_dir() / "teacher-onnx"
    path = folder / f"{teacher_key(teacher_dir, '', 0)}-int8.onnx"
    try:
        if not path.is_file():
            log.info("building the teacher's int8 ONNX file for its logits (once per teacher) -> %s", path)
            folder.mkdir(parents=True, exist_ok=True)
            build(folder, path)
        session = runtime.ort_session(path, threads=torch.get_num_threads())
    except OSError as e:  # a cache that cannot take the file: build it in the system's temporary folder, once
        log.warning("teacher's int8 ONNX file not cached in %s (%s); building it in a temporary folder",
                    folder, e.strerror or e)
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp), Path(tmp) / "int8.onnx")
            session = runtime.ort_session(Path(tmp) / "int8.onnx", threads=torch.get_num_threads())
    log.info("computing teacher logits for %d training examples with the int8 ONNX teacher (cached for later runs)",
             len(train_set))
    return measure.collect_logits(lambda ids, mask: runtime.ort_logits(session, ids, mask), train_set, pads,
                                  batch_size=64, key=key)


# ----------------------------------------------------------------------------- extra teachers


def class_names(folder: Path) -> list[str] | None:
    """The classes a model folder's config.json names, in label-id order (None when it names none or has none)."""
    try:
        id2label = json.loads((Path(folder) / "config.json").read_text()).get("id2label") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return [str(id2label.get(str(i), id2label.get(i))) for i in range(len(id2label))] or None


def check_classes(model, folder: Path, label_names: list[str], what: str = "teacher") -> None:
    got = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    if got != list(label_names):
        raise DpqError(f"{folder}: {what} classes {got} differ from the data's {list(label_names)}")


def require_extra_teachers(folders: Sequence, teacher_dir: Path | None = None) -> None:
    """Each extra teacher is a PyTorch model folder with the main teacher's classes. Read from config files only, so
    a command says what is wrong in one line before it loads a model, reads the data or takes a lock."""
    want = class_names(teacher_dir) if teacher_dir is not None else None
    for f in map(Path, folders):
        if not f.is_dir():
            raise DpqError(f"extra_teachers: {f}: no such folder")
        if not (f / "config.json").is_file():
            raise DpqError(f"extra_teachers: {f}: not a model folder (no config.json); give a teacher, baseline or "
                           "distilled folder")
        if is_onnx_folder(f):
            raise DpqError(f"extra_teachers: {f}: an ONNX export; give the model folder it was exported from")
        if teacher_dir is not None and f.resolve() == Path(teacher_dir).resolve():
            raise DpqError(f"extra_teachers: {f} is the main teacher already")
        got = class_names(f)
        if want is not None and got != want:
            raise DpqError(f"extra_teachers: {f}: classes {got} differ from the teacher's {want}")


def extra_teacher_logits(folder: Path, train_split, max_length: int, label_names: list[str],
                         runtime: str = "torch") -> torch.Tensor:
    """An extra teacher's logits for the training sentences, tokenized by its own tokenizer. Keyed as a main
    teacher's are, so a folder that is the main teacher of another run shares the cache entry."""
    model, tok = models.load_classifier(str(folder))
    check_classes(model, folder, label_names, "extra teacher")
    models.check_max_length(model, max_length, f"extra teacher {folder}")
    ids, _ = tokenize(tok, train_split.texts, max_length)
    own = EncodedSplit(ids, list(train_split.labels), {"teacher_input_ids": ids})
    return cached_teacher_logits(model.eval().requires_grad_(False), Path(folder), own, train_split.fingerprint(),
                                 {"teacher_input_ids": pad_id(tok)}, max_length, runtime=runtime)


class Targets:
    """The KD target(s) of a batch, from the main teacher's logits (cached, or ``live`` when hidden-state or
    attention KD runs the teacher anyway) and the other teachers' cached logits.

    ``average``: one target whose softened distribution is the mean of the teachers' (``ensemble_logits``); with the
    main teacher cached it is the same every epoch, so it is combined once here. ``per-teacher``: one target per
    teacher, each its own KD term.
    """

    def __init__(self, main: torch.Tensor | None, others: list[torch.Tensor], combine: str, temperature: float):
        if combine not in COMBINE:
            raise DpqError(f"teacher_combine must be one of {', '.join(COMBINE)} (got {combine!r})")
        if main is not None and others and combine == "average":
            main, others = ensemble_logits([main, *others], temperature), []
        self.main, self.others, self.combine, self.temperature = main, others, combine, temperature

    @staticmethod
    def terms(teachers: int, combine: str) -> int:
        """How many KD terms the loss has: what a learned weighting needs one weight for."""
        return teachers if combine == "per-teacher" else 1

    def __call__(self, index: torch.Tensor, device, live: torch.Tensor | None = None):
        rows = index.cpu()
        main = (live if self.main is None else self.main[rows]).to(device)
        if not self.others:
            return main
        others = [o[rows].to(device) for o in self.others]
        if self.combine == "average":
            return ensemble_logits([main, *others], self.temperature)
        return [main, *others]
