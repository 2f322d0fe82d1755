"""Stages: ``stage(settings, data, out) -> artifact folder``. The CLI and the pipeline only call these.

Each training stage trains through ``train.train`` in a work folder beside its output (checkpoints, the
best weights, the metrics log), then seals the artifact atomically and removes the work folder.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import artifacts, cards, devices, measure, models, prune
from .data import TextData, encode_split, pad_ids
from .distill import KDConfig, KDLoss, check_same_tokens, make_weighting
from .errors import DpqError
from .onnx import runtime
from .recipe import DistillSettings, EvaluateSettings, PruneSettings, TrainSettings
from .teachers import Targets, cached_teacher_logits, check_classes, extra_teacher_logits, require_extra_teachers
from .train import Hook, TrainConfig, set_seed, train

log = logging.getLogger("dpq")


def work_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.work"


def check_writable(out: Path, *, create: bool = True) -> None:
    """Fail before any training if the output folder cannot be written. ``create``: also make the folders above it
    (a stage starting its work); without, only look, as the checks made before any input is read do."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DpqError(f"{out}: exists and is not a folder")
    if out.is_dir() and not os.access(out, os.W_OK):
        raise DpqError(f"{out}: output folder is not writable")
    parent = out.parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())  # what will hold the folders to make
    if not existing.is_dir():
        raise DpqError(f"{existing}: not a folder, so {out} cannot be made")
    if not os.access(existing, os.W_OK):
        raise DpqError(f"{existing}: output folder is not writable")
    if create:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DpqError(f"{parent}: cannot create output folder ({e.strerror})") from None


def require_teacher(teacher_dir: Path) -> None:
    """Input checks, one definition each: the stages call them, and the CLI too before it takes any lock."""
    if not artifacts.is_complete(Path(teacher_dir)):
        raise DpqError(f"{teacher_dir}: no finished teacher here (run `dpq teacher` first)")


def require_model(model_dir: Path, hint: str = "run `dpq distill` or `dpq prune` first") -> None:
    if not (Path(model_dir) / "config.json").is_file():
        raise DpqError(f"{model_dir}: no model folder here ({hint})")


def check_space(out: Path, model: nn.Module, copies: int = 6) -> None:
    """Refuse to start when the output disk cannot hold the stage's files: the artifact, the best weights and
    a checkpoint (weights + two AdamW moments) are about ``copies`` times the fp32 weights, plus slack."""
    need = models.param_count(model) * 4 * copies + (50 << 20)
    parent = Path(out).parent
    free = shutil.disk_usage(parent).free
    if free < need:
        raise DpqError(f"{parent}: {free / 1e6:.0f} MB free, this stage needs about {need / 1e6:.0f} MB "
                       "(checkpoints and the artifact); free space or choose another --out")


def _seal(model, tokenizer, out: Path, work: Path, *, kind: str, settings: dict, metrics: dict) -> Path:
    if devices.is_main():  # the other processes of a job hold the same weights: one writes
        with artifacts.artifact_dir(out, kind=kind, settings=settings) as tmp:
            models.save_classifier(model, tokenizer, tmp)
            artifacts.write_json_atomic(tmp / "metrics.json", metrics)
            if (work / "metrics.jsonl").is_file():
                shutil.copy2(work / "metrics.jsonl", tmp / "metrics.jsonl")
            cards.write(tmp, kind=kind, settings=settings, siblings=out.parent, name=out.name)
        shutil.rmtree(work, ignore_errors=True)
    devices.barrier()
    return out


def _state_cloner(model: nn.Module):
    return lambda: {k: v.detach().clone() for k, v in model.state_dict().items()}


def eval_sets(data: TextData, tok, max_length: int):
    """(selection set, dev set): checkpoints are chosen on the held-out slice of train when the data has one."""
    return (encode_split(data.split(data.selection_split), tok, max_length),
            encode_split(data.split("dev"), tok, max_length))


def reported(selection: dict, dev: dict, data: TextData) -> dict:
    """A stage's metrics: dev accuracy measured once on the chosen model, and the selection that chose it."""
    return dict(dev, selected_on=data.selection_split, selection_accuracy=selection.get("accuracy"))


def _summary(kind: str, out: Path, metrics: dict) -> None:
    log.info("%s done: dev accuracy %.4f, %d params, %.1f min -> %s", kind, metrics.get("accuracy", float("nan")),
             metrics.get("params", 0), metrics.get("train_seconds", 0) / 60, out)


def finetune_stage(settings: TrainSettings, model_id: str, data: TextData, out: Path, *, kind: str,
                   stage_settings: dict, hooks: Sequence[Hook] = ()) -> Path:
    """Fine-tune ``model_id`` with cross-entropy (the teacher, or the no-KD student baseline)."""
    out = Path(out)
    check_writable(out)
    set_seed(settings.seed)  # the new classification head's initialisation belongs to the seed too
    model, tok = models.load_classifier(model_id, label_names=data.label_names)
    models.check_max_length(model, settings.max_length, model_id)
    check_space(out, model)
    train_split = data.split("train").subset(settings.max_train_samples, settings.seed)
    train_set = encode_split(train_split, tok, settings.max_length)
    select_set, dev_set = eval_sets(data, tok, settings.max_length)
    pads = pad_ids(tok)

    def loss_fn(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return nn.functional.cross_entropy(logits.float(), batch["labels"]), {}

    work = work_dir_for(out)
    fp = artifacts.settings_hash(dict(stage_settings, train_data=train_split.fingerprint()))
    result = train(model, loss_fn, train_set, pads, TrainConfig.from_settings(dataclasses.asdict(settings)), work,
                   evaluate=lambda: measure.evaluate_model(model, select_set, pads),
                   best_state=_state_cloner(model), restore_best=model.load_state_dict,
                   fingerprint=fp, hooks=hooks, desc=kind)
    final = reported(result.best_metrics, measure.evaluate_model(model, dev_set, pads), data)
    metrics = dict(final, params=models.param_count(model), train_examples=len(train_set),
                   train_steps=result.steps, train_seconds=result.seconds, history=result.history,
                   mixed_precision=result.mixed_precision)
    _seal(model, tok, out, work, kind=kind, settings=stage_settings, metrics=metrics)
    _summary(kind, out, metrics)
    return out


# ----------------------------------------------------------------------------- distillation


@dataclasses.dataclass
class KDSession:
    """Everything a KD-trained stage shares: teacher, student, data, the loss and the dev evaluation."""

    teacher: nn.Module
    student: nn.Module
    tokenizer: object
    kd: KDLoss
    train_split: object
    train_set: object
    select_set: object
    dev_set: object
    pads: dict
    loss_fn: object
    data: TextData
    targets: Targets
    teachers: list[str]  # every model whose soft labels the student learns from, the main teacher first

    def evaluate(self) -> dict:
        """On the selection split: what training keeps its best checkpoint by."""
        return measure.evaluate_model(self.student, self.select_set, {"input_ids": self.pads["input_ids"]})

    def report(self, selection: dict) -> dict:
        """Dev, measured once on the final model, beside the selection accuracy that chose it."""
        dev = measure.evaluate_model(self.student, self.dev_set, {"input_ids": self.pads["input_ids"]})
        return reported(selection, dev, self.data)

    def teaching(self) -> dict:
        """Who taught the student and how their terms were weighted: for metrics.json and the model card."""
        return dict(teachers=self.teachers, teacher_combine=self.targets.combine, **self.kd.weighting.summary())


def kd_session(settings, kd_cfg: KDConfig, teacher_dir: Path, student_id: str, data: TextData, *,
               weighting: nn.Module | None = None, ensemble_with_student: bool = False,
               prepare_student=None, out: Path | None = None) -> KDSession:
    """Teacher(s), student, encoded data and the KD loss for one stage.

    ``settings.extra_teachers``: more teachers (EKD), each read with its own tokenizer into cached logits and combined
    with the main teacher's by ``settings.teacher_combine``; hidden-state and attention KD use the main teacher only.
    ``ensemble_with_student``: the student as loaded (the fp32 model a QAT run starts from) is one more teacher.
    ``weighting``: the task/KD balance (default: ``settings.loss_weights``, one learned weight per KD term).
    ``prepare_student(model, tokenizer)`` transforms the student before training (QAT swaps in fake-quantized
    modules). ``out``: the stage's output, checked for disk space as soon as the student's size is known, before any
    teacher logits are computed.
    """
    require_teacher(teacher_dir)
    extras = [Path(x) for x in settings.extra_teachers]
    require_extra_teachers(extras, teacher_dir)
    if ensemble_with_student and kd_cfg.needs_teacher_forward:
        raise DpqError("ensemble distillation uses logits only; set hidden_weight and attention_weight to 0")
    eager = kd_cfg.attention_weight > 0
    teacher, t_tok = models.load_classifier(str(teacher_dir), eager_attention=eager)
    check_classes(teacher, teacher_dir, data.label_names)
    teacher.eval().requires_grad_(False)
    set_seed(settings.seed)  # a fresh head (or projections) must not depend on what ran before in this process
    student, s_tok = models.load_classifier(student_id, label_names=data.label_names, eager_attention=eager)
    for model, name in ((teacher, teacher_dir), (student, student_id)):  # both read every sentence at max_length
        models.check_max_length(model, settings.max_length, str(name))
    check_same_tokens(kd_cfg, s_tok, t_tok, data.split("train").texts)
    if out is not None:
        check_space(out, student)
    teachers = [str(teacher_dir), *map(str, extras)] + ([str(student_id)] if ensemble_with_student else [])
    if weighting is None:
        weighting = make_weighting(settings.loss_weights, settings.alpha,
                                   Targets.terms(len(teachers), settings.teacher_combine))
    kd = KDLoss(kd_cfg, student.config, teacher.config, weighting=weighting)

    train_split = data.split("train").subset(settings.max_train_samples, settings.seed)
    train_set = encode_split(train_split, s_tok, settings.max_length, teacher_tokenizer=t_tok)
    select_set, dev_set = eval_sets(data, s_tok, settings.max_length)
    pads = pad_ids(s_tok, t_tok)
    cached = None
    if not kd_cfg.needs_teacher_forward:
        cached = cached_teacher_logits(teacher, teacher_dir, train_set, train_split.fingerprint(), pads,
                                       settings.max_length, runtime=settings.teacher_logits)
    # other teachers' logits are always cached: their tokenizers differ, so no batch carries their inputs
    others = [extra_teacher_logits(x, train_split, settings.max_length, data.label_names, settings.teacher_logits)
              for x in extras]
    if ensemble_with_student:
        others.append(cached_teacher_logits(student, Path(student_id), train_set, train_split.fingerprint(), pads,
                                            settings.max_length, key="input_ids"))
    targets = Targets(cached, others, settings.teacher_combine, kd_cfg.temperature)
    if prepare_student is not None:
        prepare_student(student, s_tok)
    want_h, want_a = kd_cfg.hidden_weight > 0, kd_cfg.attention_weight > 0

    def loss_fn(batch):
        s_out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=want_h, output_attentions=want_a)
        t_out = None
        if targets.main is None:
            with torch.no_grad():
                teacher.to(batch["input_ids"].device)
                t_out = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                                output_hidden_states=want_h, output_attentions=want_a)
        t_logits = targets(batch["index"], s_out.logits.device, None if t_out is None else t_out.logits)
        return kd(s_out, batch["labels"], t_logits, t_out, batch["attention_mask"], batch.get("teacher_attention_mask"))

    return KDSession(teacher, student, s_tok, kd, train_split, train_set, select_set, dev_set, pads, loss_fn, data,
                     targets, teachers)


def kd_config(settings) -> KDConfig:
    return KDConfig(temperature=settings.temperature, alpha=settings.alpha, hidden_weight=settings.hidden_weight,
                    attention_weight=settings.attention_weight, layer_map=settings.layer_map)


def distill_stage(settings: DistillSettings, teacher_dir: Path, data: TextData, out: Path, *,
                  stage_settings: dict, hooks: Sequence[Hook] = ()) -> Path:
    out, teacher_dir = Path(out), Path(teacher_dir)
    check_writable(out)
    kd_cfg = kd_config(settings)
    ses = kd_session(settings, kd_cfg, teacher_dir, settings.student, data, out=out)
    student = ses.student
    work = work_dir_for(out)
    fp = artifacts.settings_hash(dict(stage_settings, train_data=ses.train_split.fingerprint()))
    result = train(nn.ModuleDict({"student": student, "kd": ses.kd}), ses.loss_fn, ses.train_set, ses.pads,
                   TrainConfig.from_settings(dataclasses.asdict(settings)), work, evaluate=ses.evaluate,
                   best_state=_state_cloner(student), restore_best=student.load_state_dict,
                   fingerprint=fp, hooks=hooks, desc="distill")
    if kd_cfg.attention_weight > 0 and hasattr(student, "set_attn_implementation"):
        student.set_attn_implementation("sdpa")  # saved model serves with the fast kernel
    metrics = dict(ses.report(result.best_metrics), params=models.param_count(student),
                   train_examples=len(ses.train_set),
                   train_steps=result.steps, train_seconds=result.seconds, history=result.history,
                   mixed_precision=result.mixed_precision,
                   teacher=str(teacher_dir), **ses.teaching())
    _seal(student, ses.tokenizer, out, work, kind="distill", settings=stage_settings, metrics=metrics)
    _summary("distill", out, metrics)
    return out


def prune_fractions(settings: PruneSettings, model) -> tuple[float, float]:
    """(heads, ffn) fractions; ``target_params`` removes that share of all parameters, heads and FFN alike."""
    if settings.target_params is None:
        return settings.heads, settings.ffn
    ls = prune.layers(model)
    prunable = sum(l.q.weight.numel() * 4 + l.q.bias.numel() * 3 + l.ffn_in.weight.numel() * 2 + l.ffn_in.bias.numel()
                   for l in ls)
    f = settings.target_params * models.param_count(model) / prunable
    if f >= 1:
        raise DpqError(f"prune.target_params: at most {prunable / models.param_count(model):.2f} of this model's "
                       f"parameters are in attention heads and FFN neurons (got {settings.target_params})")
    return f, f


def prune_stage(settings: PruneSettings, model_dir: Path, teacher_dir: Path, data: TextData, out: Path, *,
                stage_settings: dict, hooks: Sequence[Hook] = ()) -> Path:
    """Gradual structured pruning under KD (cubic schedule, masks), recovery training, then real removal."""
    out, model_dir, teacher_dir = Path(out), Path(model_dir), Path(teacher_dir)
    check_writable(out)
    require_model(model_dir, "run `dpq distill` first")
    if settings.prune_start > settings.prune_end:
        raise DpqError(f"prune.prune_start ({settings.prune_start}) must not be after prune_end ({settings.prune_end})")
    ses = kd_session(settings, kd_config(settings), teacher_dir, str(model_dir), data, out=out)
    student = ses.student
    params_before = models.param_count(student)
    heads, ffn = prune_fractions(settings, student)
    cfg = prune.PruneConfig(heads=heads, ffn=ffn, importance=settings.importance, allocation=settings.allocation,
                            lambda_mag=settings.lambda_mag, lambda_grad=settings.lambda_grad)
    masks = prune.HeadFfnMasks.install(student)
    sens = prune.GradientSensitivity(student)
    tcfg = TrainConfig.from_settings(dataclasses.asdict(settings))
    steps_per_epoch = -(-len(ses.train_set) // tcfg.batch_size)
    total = steps_per_epoch * tcfg.epochs
    start, end = int(settings.prune_start * total), max(1, int(settings.prune_end * total))
    schedule = prune.PruneSchedule(student, masks, sens, cfg, start, end, settings.update_every)
    work = work_dir_for(out)
    fp = artifacts.settings_hash(dict(stage_settings, train_data=ses.train_split.fingerprint()))
    result = train(nn.ModuleDict({"student": student, "kd": ses.kd, "masks": masks, "sens": sens}), ses.loss_fn,
                   ses.train_set, ses.pads, tcfg, work, evaluate=ses.evaluate,
                   best_state=_state_cloner(student), restore_best=student.load_state_dict,
                   fingerprint=fp, hooks=(schedule, *hooks), desc="prune", best_after_step=end)
    got = masks.fractions()
    if got[0] + 1e-6 < heads * 0.99 or got[1] + 1e-6 < ffn * 0.99:  # schedule ended early: reach the target now
        masks.update(prune.importance(student, sens.scores(), cfg), cfg, 1.0)
    structure = prune.remove_masked(student, masks)
    final = ses.report(ses.evaluate())  # the removed model: selection and dev accuracy of what is saved
    removed_h, removed_f = masks.fractions()
    metrics = dict(final, best_masked=result.best_metrics, params=models.param_count(student),
                   params_before=params_before,
                   heads_removed=removed_h, ffn_removed=removed_f, train_examples=len(ses.train_set),
                   train_steps=result.steps, train_seconds=result.seconds, history=result.history,
                   mixed_precision=result.mixed_precision,
                   structure=structure, teacher=str(teacher_dir), source=str(model_dir), **ses.teaching())
    _seal(student, ses.tokenizer, out, work, kind="prune", settings=stage_settings, metrics=metrics)
    log.info("prune done: heads -%.0f%%, FFN -%.0f%%, %d -> %d params, dev accuracy %.4f -> %s",
             100 * removed_h, 100 * removed_f, params_before, metrics["params"], final["accuracy"], out)
    return out


# ----------------------------------------------------------------------------- evaluation


def _artifact(d: Path) -> str | None:
    """Which version of a dpq artifact was measured (its settings hash): a model card takes only its own rows."""
    manifest = artifacts.read_manifest(d)
    return manifest.get("settings_hash") if manifest else None


def _encoded(split, tok, config):
    return encode_split(split, tok, min(512, getattr(config, "max_position_embeddings", 512)))


def _measured(logits_of, split, held_out, tok, config) -> tuple:
    """(the encoded evaluation split, its accuracy and loss, plus ``heldout_accuracy`` when there is a held-out
    slice): one path for PyTorch and ONNX models, whatever computes their logits."""
    ds = _encoded(split, tok, config)
    m = measure.accuracy_and_loss(logits_of(ds), ds.labels)
    if held_out is not None:
        ho = _encoded(held_out, tok, config)
        m["heldout_accuracy"] = measure.accuracy_and_loss(logits_of(ho), ho.labels)["accuracy"]
    return ds, m


def _torch_logits(model, tok):
    return lambda enc: measure.predict_logits(model, enc, pad_ids(tok))


def _onnx_logits(d: Path, session, config, tok):
    """One sentence per call: see ``_evaluate_onnx``."""
    def logits_of(enc):
        logits = runtime.ort_predict_logits(session, enc, pad_ids(tok), batch_size=1)
        if logits.shape[-1] != config.num_labels:
            raise DpqError(f"{d / 'model.onnx'}: gives {logits.shape[-1]} classes, "
                           f"its config.json says {config.num_labels}")
        return logits

    return logits_of


def split_accuracies(d: Path, splits: dict) -> dict[str, float]:
    """A model folder's accuracy on each named split, computed as the evaluation computes it, loading it once."""
    if runtime.is_onnx_folder(d):
        session, config, tok, _ = runtime.load_onnx_folder(d, threads=torch.get_num_threads())
        logits_of = _onnx_logits(d, session, config, tok)
    else:
        model, tok = models.load_model(d)
        config = model.to(devices.device()).config
        logits_of = _torch_logits(model, tok)
    out = {}
    for name, split in splits.items():
        enc = _encoded(split, tok, config)
        out[name] = measure.accuracy_and_loss(logits_of(enc), enc.labels)["accuracy"]
    return out


def _evaluate_torch(d: Path, split, settings: EvaluateSettings, held_out=None) -> tuple[dict, dict]:
    model, tok = models.load_model(d)
    model.to(devices.device())
    ds, m = _measured(_torch_logits(model, tok), split, held_out, tok, model.config)
    model.to("cpu")  # latency describes CPU serving, the deployment target, wherever the run trained
    seq = max(1, round(ds.mean_length()))
    quant = getattr(model.config, "dpq_quant", None)
    # a packed checkpoint runs here as its dequantized fp32 weights: say so, its integer form is the ONNX export
    runtime = f"torch-dequantized-int{quant['bits']}" if quant else "torch-fp32"
    row = {"model": str(d), "name": d.name, "artifact": _artifact(d), "runtime": runtime, "split": settings.split,
           "examples": len(ds), **m,
           "params": models.param_count(model), "size_mb": round(measure.weights_size_mb(d), 3), "seq_len": seq,
           "gflops": round(measure.gflops_per_example(model, seq), 4)}
    batches = {bs: measure.dummy_batch(model, bs, seq) for bs in settings.batch_sizes}
    return row, {f"latency_ms_bs{bs}": (lambda m=model, x=x: m(**x)) for bs, x in batches.items()}


def _evaluate_onnx(d: Path, split, settings: EvaluateSettings, held_out=None) -> tuple[dict, dict]:
    """An exported folder runs in ONNX Runtime: its accuracy is the exported file's own, one sentence per call.

    Dynamic int8 kernels take one activation scale per tensor, padding and the other sentences of a batch included,
    so a sentence's prediction moves with its batch (SST-2 dev, one int4 file: 0.8716 / 0.8739 / 0.8761 at batch
    1 / 8 / 32). Batch 1 is what a request served alone gets, and it does not depend on how dev is batched."""
    session, config, tok, info = runtime.load_onnx_folder(d, threads=torch.get_num_threads())
    skeleton = models.build_classifier(config).eval()  # parameter and FLOP counts of the same structure
    ds, m = _measured(_onnx_logits(d, session, config, tok), split, held_out, tok, config)
    seq = max(1, round(ds.mean_length()))
    row = {"model": str(d), "name": d.name, "artifact": _artifact(d), "runtime": info.get("runtime", "onnx"),
           "split": settings.split, "examples": len(ds), **m, "params": models.param_count(skeleton),
           "size_mb": round(measure.weights_size_mb(d), 3), "seq_len": seq,
           "gflops": round(measure.gflops_per_example(skeleton, seq), 4),
           "kernels": {k: v for k, v in info.get("runtime_ops", {}).items()
                       if k in ("MatMulNBits", "GatherBlockQuantized", "MatMulInteger", "DynamicQuantizeMatMul",
                                "QAttention", "Attention", "MatMul", "FusedMatMul", "Gemm")}}
    timer = {}
    for bs in settings.batch_sizes:
        x = measure.dummy_batch(skeleton, bs, seq)
        timer[f"latency_ms_bs{bs}"] = lambda x=x: runtime.ort_logits(session, x["input_ids"], x["attention_mask"])
    return row, timer


def evaluate_dirs(dirs: list[Path], data: TextData, settings: EvaluateSettings) -> list[dict]:
    """One row per model: accuracy, loss, params, on-disk size, GFLOPs, latency at each batch size.

    Latency is timed after every model is loaded, round-robin across models, so the ratios between them
    are taken under the same machine load.
    """
    split = data.split(settings.split)
    # the report recommends a model by its held-out accuracy, so that dev stays a measurement and not a choice
    held_out = data.splits.get("heldout") if settings.split != "heldout" else None
    rows, timers = [], []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise DpqError(f"{d}: no such model folder")
        if runtime.is_onnx_folder(d):
            row, timer = _evaluate_onnx(d, split, settings, held_out)
        else:
            row, timer = _evaluate_torch(d, split, settings, held_out)
        rows.append(row)
        timers.append(timer)
    with torch.no_grad():
        lat = measure.interleaved_latency_ms(timers, rounds=settings.latency_rounds, repeats=settings.latency_repeats,
                                             warmup=settings.warmup)
    hw = measure.hardware()
    for row, t in zip(rows, lat):
        row.update({k: round(v, 3) for k, v in t.items()}, hardware=hw)
        log.info("evaluated %s: accuracy %.4f, %.1f MB, %s", row["model"], row["accuracy"], row["size_mb"],
                 ", ".join(f"{k[11:]} {v:.1f} ms" for k, v in t.items()))
    return rows


def evaluate_run(dirs: list[Path], labels: dict[str, str], data: TextData, settings, out: Path, key: dict) -> Path:
    """Every model of a run measured in one pass (ratios within one run), with the report's stage names."""
    rows = evaluate_dirs(dirs, data, settings)
    for row in rows:
        row["stage"] = labels.get(Path(row["model"]).name, row["name"])
    with artifacts.artifact_dir(out, kind="evaluation", settings=key) as tmp:
        artifacts.write_json_atomic(tmp / "results.json", rows)
        (tmp / "results.md").write_text(format_table(rows) + "\n")
    print(format_table(rows))
    return out


def format_table(rows: list[dict]) -> str:
    lat = {k for r in rows for k in r if re.fullmatch(r"latency_ms_bs\d+", k)}
    held = ["heldout_accuracy"] if any("heldout_accuracy" in r for r in rows) else []
    cols = (["name", "runtime", "accuracy", *held, "params", "size_mb", "gflops"]
            + sorted(lat, key=lambda k: int(k[13:])))
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
