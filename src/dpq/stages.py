"""Stages: ``stage(settings, data, out) -> artifact folder``. The CLI and the pipeline only call these.

Each training stage trains through ``train.train`` in a work folder beside its output (checkpoints, the
best weights, the metrics log), then seals the artifact atomically and removes the work folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import artifacts, measure, models
from .data import TextData, encode_split
from .distill import KDConfig, KDLoss
from .errors import DpqError
from .recipe import DistillSettings, EvaluateSettings, TrainSettings
from .train import TrainConfig, train

log = logging.getLogger("dpq")


def work_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.work"


def check_writable(out: Path) -> None:
    """Fail before any training if the output folder cannot be written."""
    out = Path(out)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DpqError(f"{parent}: cannot create output folder ({e.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise DpqError(f"{parent}: output folder is not writable")
    if out.exists() and not out.is_dir():
        raise DpqError(f"{out}: exists and is not a folder")


def pad_ids(tokenizer, teacher_tokenizer=None) -> dict[str, int]:
    ids = {"input_ids": tokenizer.pad_token_id or 0}
    if teacher_tokenizer is not None:
        ids["teacher_input_ids"] = teacher_tokenizer.pad_token_id or 0
    return ids


def _seal(model, tokenizer, out: Path, work: Path, *, kind: str, settings: dict, metrics: dict) -> Path:
    with artifacts.artifact_dir(out, kind=kind, settings=settings) as tmp:
        models.save_classifier(model, tokenizer, tmp)
        artifacts.write_json_atomic(tmp / "metrics.json", metrics)
        if (work / "metrics.jsonl").is_file():
            shutil.copy2(work / "metrics.jsonl", tmp / "metrics.jsonl")
    shutil.rmtree(work, ignore_errors=True)
    return out


def _state_cloner(model: nn.Module):
    return lambda: {k: v.detach().clone() for k, v in model.state_dict().items()}


def _summary(kind: str, out: Path, metrics: dict) -> None:
    log.info("%s done: dev accuracy %.4f, %d params, %.1f min -> %s", kind, metrics.get("accuracy", float("nan")),
             metrics.get("params", 0), metrics.get("train_seconds", 0) / 60, out)


def finetune_stage(settings: TrainSettings, model_id: str, data: TextData, out: Path, *, kind: str,
                   stage_settings: dict, stop_after_steps: int | None = None) -> Path:
    """Fine-tune ``model_id`` with cross-entropy (the teacher, or the no-KD student baseline)."""
    out = Path(out)
    check_writable(out)
    model, tok = models.load_classifier(model_id, label_names=data.label_names)
    train_split = data.split("train").subset(settings.max_train_samples, settings.seed)
    train_set = encode_split(train_split, tok, settings.max_length)
    dev_set = encode_split(data.split("dev"), tok, settings.max_length)
    pads = pad_ids(tok)

    def loss_fn(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return nn.functional.cross_entropy(logits.float(), batch["labels"]), {}

    work = work_dir_for(out)
    fp = artifacts.settings_hash(dict(stage_settings, train_data=train_split.fingerprint()))
    result = train(model, loss_fn, train_set, pads, TrainConfig.from_settings(dataclasses.asdict(settings)), work,
                   evaluate=lambda: measure.evaluate_model(model, dev_set, pads),
                   best_state=_state_cloner(model), restore_best=model.load_state_dict,
                   fingerprint=fp, stop_after_steps=stop_after_steps, desc=kind)
    metrics = dict(result.best_metrics, params=models.param_count(model), train_examples=len(train_set),
                   train_steps=result.steps, train_seconds=result.seconds, history=result.history)
    _seal(model, tok, out, work, kind=kind, settings=stage_settings, metrics=metrics)
    _summary(kind, out, metrics)
    return out


# ----------------------------------------------------------------------------- distillation


def _teacher_key(teacher_dir: Path, train_fingerprint: str, max_length: int) -> str:
    manifest = artifacts.read_manifest(teacher_dir) or {}
    blob = json.dumps([manifest.get("files"), train_fingerprint, max_length], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cached_teacher_logits(teacher, teacher_dir: Path, train_set, train_fingerprint: str, pads: dict, max_length: int) -> torch.Tensor:
    """Teacher logits for the whole train set, computed once and cached by (teacher files, data, max_length)."""
    path = models.cache_dir() / "teacher-logits" / f"{_teacher_key(teacher_dir, train_fingerprint, max_length)}.safetensors"
    if path.is_file():
        logits = load_file(str(path))["logits"]
        if logits.shape[0] == len(train_set):
            log.info("teacher logits from cache %s", path)
            return logits
    log.info("computing teacher logits for %d training examples (cached for later runs)", len(train_set))
    logits = measure.predict_logits(teacher, train_set, pads, batch_size=64, key="teacher_input_ids")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"logits": logits.contiguous()}, str(tmp))
    os.replace(tmp, path)
    return logits


def distill_stage(settings: DistillSettings, teacher_dir: Path, data: TextData, out: Path, *,
                  stage_settings: dict, stop_after_steps: int | None = None) -> Path:
    out, teacher_dir = Path(out), Path(teacher_dir)
    check_writable(out)
    if not artifacts.is_complete(teacher_dir):
        raise DpqError(f"{teacher_dir}: no finished teacher here (run `dpq teacher` first)")
    kd_cfg = KDConfig(temperature=settings.temperature, alpha=settings.alpha, hidden_weight=settings.hidden_weight,
                      attention_weight=settings.attention_weight, layer_map=settings.layer_map)
    eager = settings.attention_weight > 0
    teacher, t_tok = models.load_classifier(str(teacher_dir), eager_attention=eager)
    teacher_labels = [teacher.config.id2label[i] for i in range(teacher.config.num_labels)]
    if [str(x) for x in teacher_labels] != data.label_names:
        raise DpqError(f"{teacher_dir}: teacher classes {teacher_labels} differ from the data's {data.label_names}")
    teacher.eval().requires_grad_(False)
    student, s_tok = models.load_classifier(settings.student, label_names=data.label_names, eager_attention=eager)
    kd = KDLoss(kd_cfg, student.config, teacher.config)

    train_split = data.split("train").subset(settings.max_train_samples, settings.seed)
    train_set = encode_split(train_split, s_tok, settings.max_length, teacher_tokenizer=t_tok)
    dev_set = encode_split(data.split("dev"), s_tok, settings.max_length)
    pads = pad_ids(s_tok, t_tok)
    cached = None
    if not kd_cfg.needs_teacher_forward:
        cached = cached_teacher_logits(teacher, teacher_dir, train_set, train_split.fingerprint(), pads, settings.max_length)

    trainables = nn.ModuleDict({"student": student, "kd": kd})
    want_h, want_a = kd_cfg.hidden_weight > 0, kd_cfg.attention_weight > 0

    def loss_fn(batch):
        s_out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=want_h, output_attentions=want_a)
        t_out = None
        if cached is not None:
            t_logits = cached[batch["index"].cpu()].to(s_out.logits.device)
        else:
            with torch.no_grad():
                teacher.to(batch["input_ids"].device)
                t_out = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                                output_hidden_states=want_h, output_attentions=want_a)
            t_logits = t_out.logits
        return kd(s_out, batch["labels"], t_logits, t_out, batch["attention_mask"], batch.get("teacher_attention_mask"))

    work = work_dir_for(out)
    fp = artifacts.settings_hash(dict(stage_settings, train_data=train_split.fingerprint()))
    result = train(trainables, loss_fn, train_set, pads, TrainConfig.from_settings(dataclasses.asdict(settings)), work,
                   evaluate=lambda: measure.evaluate_model(student, dev_set, {"input_ids": pads["input_ids"]}),
                   best_state=_state_cloner(student), restore_best=student.load_state_dict,
                   fingerprint=fp, stop_after_steps=stop_after_steps, desc="distill")
    if eager and hasattr(student, "set_attn_implementation"):
        student.set_attn_implementation("sdpa")  # saved model serves with the fast kernel
    metrics = dict(result.best_metrics, params=models.param_count(student), train_examples=len(train_set),
                   train_steps=result.steps, train_seconds=result.seconds, history=result.history,
                   teacher=str(teacher_dir))
    _seal(student, s_tok, out, work, kind="distill", settings=stage_settings, metrics=metrics)
    _summary("distill", out, metrics)
    return out


# ----------------------------------------------------------------------------- evaluation


def evaluate_dirs(dirs: list[Path], data: TextData, settings: EvaluateSettings) -> list[dict]:
    """One row per model: accuracy, loss, params, on-disk size, GFLOPs, latency at each batch size."""
    split = data.split(settings.split)
    rows = []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise DpqError(f"{d}: no such model folder")
        model, tok = models.load_model(d)
        ds = encode_split(split, tok, min(512, getattr(model.config, "max_position_embeddings", 512)))
        pads = pad_ids(tok)
        m = measure.evaluate_model(model, ds, pads)
        seq = max(1, round(ds.mean_length()))
        row = {"model": str(d), "name": d.name, "runtime": "torch-fp32", "split": settings.split, "examples": len(ds),
               **m, "params": models.param_count(model), "size_mb": round(measure.weights_size_mb(d), 3),
               "seq_len": seq, "gflops": round(measure.gflops_per_example(model, seq), 4)}
        for bs in settings.batch_sizes:
            row[f"latency_ms_bs{bs}"] = round(measure.torch_latency_ms(model, bs, seq, warmup=settings.warmup,
                                                                       repeats=settings.latency_repeats), 3)
        row["hardware"] = measure.hardware()
        rows.append(row)
        log.info("evaluated %s: accuracy %.4f, %.1f MB, %s", d, m["accuracy"], row["size_mb"],
                 ", ".join(f"bs{bs} {row[f'latency_ms_bs{bs}']:.1f} ms" for bs in settings.batch_sizes))
    return rows


def format_table(rows: list[dict]) -> str:
    lat = {k for r in rows for k in r if re.fullmatch(r"latency_ms_bs\d+", k)}
    cols = ["name", "runtime", "accuracy", "params", "size_mb", "gflops"] + sorted(lat, key=lambda k: int(k[13:]))
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
