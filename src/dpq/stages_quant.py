"""Quantize and export stages: ``quantize_stage`` (rtn | gptq | qat) writes a packed 4/8-bit artifact;
``export_stage`` writes an ONNX folder (fp32, int8 dynamic, or int4 from a packed artifact's own codes)
that ``dpq evaluate`` runs in ONNX Runtime."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import artifacts, cards, devices, hf, measure, models, transforms
from .data import TextData, encode_split, pad_ids
from .errors import DpqError
from .onnx import export, int4, int8, runtime
from .quant import methods, packed
from .quant.fake import QTensor
from .quant.methods import TRAINED
from .quant.ptq import QuantConfig, calibration_batches, quantize_model
from .quant.qat import QATConfig, convert_qat, prepare_qat
from .quant.vocab import trim_vocab, used_token_ids
from .recipe import ExportSettings, QuantizeSettings
from .stages import _state_cloner, check_writable, kd_config, kd_session, require_model, work_dir_for
from .train import Hook, TrainConfig, train

log = logging.getLogger("dpq")

PRECISIONS = ("fp32", "int8", "int4")


def _seal_quantized(model, tok, qweights: dict[str, QTensor], out: Path, *, settings: dict, metrics: dict, meta: dict,
                    work: Path | None = None) -> Path:
    if not devices.is_main():  # QAT under several processes: the main one writes
        return out
    with artifacts.artifact_dir(out, kind="quantize", settings=settings) as tmp:
        model.config.dpq_quant = packed.save_packed(model, qweights, tmp, meta)
        transforms.record(model.config, "quant-packed")
        hf.save_config(model.config, tmp)
        tok.save_pretrained(tmp)
        artifacts.write_json_atomic(tmp / "metrics.json", metrics)
        if work is not None and (work / "metrics.jsonl").is_file():
            shutil.copy2(work / "metrics.jsonl", tmp / "metrics.jsonl")
        cards.write(tmp, kind="quantize", settings=settings, siblings=out.parent, name=out.name)
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _trim(model, tok, data: TextData, settings: QuantizeSettings) -> dict:
    keep = used_token_ids(tok, data.split("train").texts, settings.max_length, keep_first=settings.trim_keep_first)
    done = trim_vocab(model, keep, tok.unk_token_id)
    log.info("vocabulary trimmed to %d of %d tokens (the training data's%s)",
             done["kept_tokens"], done["original_tokens"],
             f" and the first {settings.trim_keep_first} ids" if settings.trim_keep_first else "")
    return done


def _check_source(model_dir: Path) -> None:
    require_model(model_dir)
    if (model_dir / packed.FILE).is_file():
        raise DpqError(f"{model_dir}: already quantized; quantize the fp32 model it came from")


def _meta(settings: QuantizeSettings, method: str, model_dir: Path) -> dict:
    return {"method": method, "bits": settings.bits, "group_size": settings.group_size,
            "embeddings": settings.embedding_bits(),
            "embedding_group_size": settings.embedding_group_size or settings.group_size, "source": str(model_dir)}


def quantize_stage(settings: QuantizeSettings, method: str, model_dir: Path, teacher_dir: Path | None, data: TextData,
                   out: Path, *, stage_settings: dict, hooks: Sequence[Hook] = ()) -> Path:
    """``dpq quantize --method M``: QAT trains (its own stage), every other method is post-training."""
    if method in TRAINED:
        return qat_stage(settings, model_dir, teacher_dir, data, out, stage_settings=stage_settings,
                         hooks=hooks)
    return ptq_stage(settings, method, model_dir, data, out, stage_settings=stage_settings)


def ptq_stage(settings: QuantizeSettings, method: str, model_dir: Path, data: TextData, out: Path, *,
              stage_settings: dict) -> Path:
    """A registered post-training method (``quant/methods.py``) on the fp32 model: packed 4/8-bit artifact."""
    out, model_dir = Path(out), Path(model_dir)
    spec = methods.get(method)
    check_writable(out)
    _check_source(model_dir)
    meta = _meta(settings, method, model_dir)
    t0 = time.time()
    model, tok = models.load_classifier(str(model_dir))
    models.check_max_length(model, settings.max_length, str(model_dir))
    model.eval().to(devices.device())  # GPTQ's Hessians and layer passes are the slow part: on the GPU if any
    dev = encode_split(data.split("dev"), tok, settings.max_length)
    before = measure.evaluate_model(model, dev, pad_ids(tok))
    if settings.trim_vocab:
        meta.update(_trim(model, tok, data, settings))
    calib = None
    if spec.calibrated:
        train_split = data.split("train").subset(settings.calibration_samples, settings.seed)
        calib = calibration_batches(encode_split(train_split, tok, settings.max_length), pad_ids(tok),
                                    settings.calibration_samples, seed=settings.seed)
    cfg = QuantConfig(method=method, bits=settings.bits, group_size=settings.group_size,
                      symmetric=settings.symmetric, embeddings=meta["embeddings"],
                      embedding_group_size=settings.embedding_group_size)
    with torch.no_grad():
        q = quantize_model(model, cfg, calib)
    after = measure.evaluate_model(model, dev, pad_ids(tok))
    metrics = dict(after, accuracy_before=before["accuracy"], params=models.param_count(model),
                   kept_tokens=meta.get("kept_tokens"),
                   quantized_tensors=len(q), seconds=time.time() - t0, runtime="torch-dequantized")
    _seal_quantized(model, tok, q, out, settings=stage_settings, metrics=metrics, meta=meta)
    log.info("quantize %s done: dev accuracy %.4f -> %.4f (PyTorch, dequantized weights) -> %s", method,
             before["accuracy"], after["accuracy"], out)
    return out


def qat_stage(settings: QuantizeSettings, model_dir: Path, teacher_dir: Path | None, data: TextData, out: Path, *,
              stage_settings: dict, hooks: Sequence[Hook] = ()) -> Path:
    """Quantization-aware training with KD from the teacher (and, for EKD, from the extra teachers and/or the fp32
    model it starts from)."""
    out, model_dir = Path(out), Path(model_dir)
    check_writable(out)
    _check_source(model_dir)
    if teacher_dir is None:
        raise DpqError("QAT needs --teacher (a finished `dpq teacher` folder) for distillation")
    if not settings.symmetric:
        raise DpqError("QAT learns symmetric step sizes (LSQ); drop --no-symmetric")
    meta = _meta(settings, "qat", model_dir)
    qcfg = QATConfig(bits=settings.bits, group_size=settings.group_size, embeddings=meta["embeddings"],
                     embedding_group_size=settings.embedding_group_size, act_bits=settings.act_bits)

    def prepare(m, tok):
        if settings.trim_vocab:
            meta.update(_trim(m, tok, data, settings))
        prepare_qat(m, qcfg)

    ses = kd_session(settings, kd_config(settings), Path(teacher_dir), str(model_dir), data,
                     ensemble_with_student=settings.ensemble, prepare_student=prepare, out=out)
    student = ses.student
    work = work_dir_for(out)
    fp = artifacts.settings_hash(dict(stage_settings, train_data=ses.train_split.fingerprint()))
    result = train(nn.ModuleDict({"student": student, "kd": ses.kd}), ses.loss_fn, ses.train_set, ses.pads,
                   TrainConfig.from_settings(dataclasses.asdict(settings)), work, evaluate=ses.evaluate,
                   best_state=_state_cloner(student), restore_best=student.load_state_dict,
                   fingerprint=fp, hooks=hooks, desc="quantize-qat")
    q = convert_qat(student)
    final = ses.report(ses.evaluate())  # the converted model (real 4-bit grid), not the fake-quantized one
    metrics = dict(final, best_fake_quant=result.best_metrics, params=models.param_count(student),
                   quantized_tensors=len(q), train_examples=len(ses.train_set), train_steps=result.steps,
                   train_seconds=result.seconds, history=result.history,
                   mixed_precision=result.mixed_precision, teacher=str(teacher_dir),
                   loss_weights=settings.loss_weights, ensemble=settings.ensemble, runtime="torch-dequantized",
                   kept_tokens=meta.get("kept_tokens"), **ses.teaching())
    meta.update(loss_weights=settings.loss_weights, ensemble=settings.ensemble)
    _seal_quantized(student, ses.tokenizer, q, out, settings=stage_settings, metrics=metrics, meta=meta, work=work)
    devices.barrier()
    log.info("quantize qat done: dev accuracy %.4f (PyTorch, dequantized weights), %.1f min -> %s",
             final["accuracy"], result.seconds / 60, out)
    return out


# ----------------------------------------------------------------------------- export


def _int4_files(settings: ExportSettings, fp32: Path, tmp: Path, weights: dict) -> tuple[dict, dict]:
    """The int4 candidates the settings allow: MatMulNBits at each accuracy level, and the same codes on int8
    kernels. ({kind: file}, {kind: what its builder reported})."""
    from .onnx.int4_int8 import int4_int8_kernels_onnx

    files, infos = {}, {}
    if settings.int4_kernels in ("auto", "nbits"):
        levels = (0, 4) if settings.accuracy_level == "auto" else (int(settings.accuracy_level),)
        first = tmp / f"nbits-level{levels[0]}.onnx.tmp"
        made = int4.int4_onnx(fp32, first, weights, accuracy_level=levels[0])
        for lvl in levels:  # same weights: other levels rewrite only the attribute
            key = f"nbits-level{lvl}"
            files[key] = (first if lvl == levels[0]
                          else int4.with_accuracy_level(first, tmp / f"{key}.onnx.tmp", lvl))
            infos[key] = dict(made, kernels="MatMulNBits", accuracy_level=lvl)
    if settings.int4_kernels in ("auto", "int8"):
        files["int8"] = tmp / "int8-kernels.onnx.tmp"
        infos["int8"] = int4_int8_kernels_onnx(fp32, files["int8"], weights, weight_type=settings.int8_weights)
    return files, infos


def _keep_fastest(files: dict[str, Path], final: Path) -> tuple[str, tuple[str, ...], dict]:
    """Times every file under each ORT optimizer set worth trying (``runtime.session_variants``) when there is
    more than one candidate, moves the fastest file to ``final`` and deletes the others.
    (its key, the ORT optimizers to disable with it, the timings)."""

    cands = {}
    for key, f in files.items():
        for off in runtime.session_variants(f):
            cands[key + "".join(f" -{o}" for o in off)] = (key, f, off)
    best, times = next(iter(cands)), {}
    if len(cands) > 1:
        best, times = runtime.pick_fastest({k: (f, off) for k, (_, f, off) in cands.items()})
        log.info("export: %s chosen (%s)", best, "; ".join(
            f"{k} " + ", ".join(f"{b} {ms:.1f} ms" for b, ms in t.items()) for k, t in times.items()))
    key, f, off = cands[best]
    if f != final:
        f.rename(final)
    for other in files.values():
        if other != f:
            other.unlink(missing_ok=True)
    return key, off, times


def export_stage(settings: ExportSettings, precision: str, model_dir: Path, out: Path, *, stage_settings: dict) -> Path:
    """ONNX folder: ``model.onnx`` + config + tokenizer + ``export.json`` (runtime, kernels that run)."""

    out, model_dir = Path(out), Path(model_dir)
    if precision not in PRECISIONS:
        raise DpqError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    check_writable(out)
    require_model(model_dir, "give an fp32 model folder, or a 4-bit one for int4")
    model, tok = models.load_classifier(str(model_dir))
    model.eval()
    qcfg = getattr(model.config, "dpq_quant", None)
    if precision == "int4" and not qcfg:
        raise DpqError(f"{model_dir}: not a 4-bit model; run `dpq quantize` on it first (int4 export stores its codes)")
    if precision == "int4" and qcfg.get("bits") != 4:
        raise DpqError(f"{model_dir}: quantized to {qcfg.get('bits')} bits; int4 export needs a 4-bit model")
    if precision == "int8" and qcfg:
        raise DpqError(f"{model_dir}: already quantized; int8 export quantizes the fp32 model (give that folder)")
    info: dict = {"precision": precision, "runtime": f"onnx-{precision}", "source": str(model_dir)}
    with artifacts.artifact_dir(out, kind="export", settings=stage_settings) as tmp:
        fp32 = tmp / ("model.onnx" if precision == "fp32" else "fp32.onnx.tmp")
        export.export_onnx(model, fp32)
        files, infos = {precision: fp32}, {precision: {}}
        if precision == "int8":
            # head counts are read per layer from the weights (pruned layers differ), not passed in
            files = {"int8": tmp / "int8.onnx.tmp"}
            infos = {"int8": int8.int8_onnx(fp32, files["int8"], weight_type=settings.int8_weights,
                                                  embeddings=settings.int8_embeddings)}
        elif precision == "int4":
            q, _ = packed.load_qtensors(model_dir, qcfg)
            state = model.state_dict()
            files, infos = _int4_files(settings, fp32, tmp, {k: (state[k], v) for k, v in q.items()})
        key, off, times = _keep_fastest(files, tmp / "model.onnx")
        info.update(infos[key], ort_disabled_optimizers=list(off), candidates_ms=times)
        if precision == "int4":
            info.update(int4_kernels=key, method=qcfg.get("method"))
        if precision != "fp32":
            fp32.unlink()
        info["runtime_ops"] = runtime.runtime_ops(tmp / "model.onnx", off)
        model.config.save_pretrained(tmp)  # the base type: ONNX Runtime tools read it, and need no modeling code
        tok.save_pretrained(tmp)
        artifacts.write_json_atomic(tmp / "export.json", info)
        cards.write(tmp, kind="export", settings=stage_settings, siblings=out.parent, name=out.name)
    log.info("export %s done: %.2f MB -> %s", precision, measure.weights_size_mb(out), out)
    return out
