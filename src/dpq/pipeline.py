"""``dpq run``: the recipe's stages in order, each skipped when its artifact is complete and its settings
(including everything upstream) are unchanged, and resumed from its checkpoint when it was interrupted."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Callable

from . import artifacts, devices, locks
from .data import TextData, load_data
from .errors import DpqError
from .extras import require
from .recipe import Recipe, dump_recipe, load_recipe
from .stages import check_writable, distill_stage, prune_stage, evaluate_dirs, finetune_stage, format_table, work_dir_for
from .stages_quant import export_stage, quantize_stage

log = logging.getLogger("dpq")


def stage_status(out: Path, settings: dict) -> tuple[bool, str]:
    """(needs to run, why)."""
    manifest = artifacts.read_manifest(out)
    if manifest is None:
        if (work_dir_for(out) / "checkpoint").is_dir():
            return True, "interrupted earlier: resumes from its checkpoint"
        return True, "not run yet"
    if manifest.get("settings_hash") != artifacts.settings_hash(settings):
        old = manifest.get("settings", {})
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        return True, f"settings changed: {', '.join(changed) or 'format'}"
    return False, "complete, settings unchanged"


# stages whose work is a training loop: every process of a multi-process job takes part; the others run on the
# main process alone while the rest wait
TRAINING = ("teacher", "baseline", "distill", "prune", "quantize-qat")


def run_stage(name: str, out: Path, settings: dict, runner: Callable[[], Path], *, force: bool = False) -> Path:
    todo, why = stage_status(out, settings)
    if not todo and not force:
        log.info("%s: %s, skipped (%s)", name, why, out)
        return out
    with locks.hold(out):
        todo, why = stage_status(out, settings)  # another process may have finished it while we looked
        if not todo and not force:
            log.info("%s: %s, skipped (%s)", name, why, out)
            return out
        log.info("%s: running (%s)", name, why if not force else "forced")
        if name in TRAINING or not devices.distributed():
            return runner()
        if devices.is_main():
            runner()
    devices.barrier()
    return out


def data_settings(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe.data)


class Pipeline:
    def __init__(self, recipe: Recipe, run_dir: Path):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self._data: TextData | None = None

    @property
    def data(self) -> TextData:
        if self._data is None:
            d = self.recipe.data
            self._data = load_data(d.path, labels=d.labels, skip_bad_rows=d.skip_bad_rows)
            log.info("data %s: %s", d.path, ", ".join(f"{k} {len(v)}" for k, v in self._data.splits.items()))
        return self._data

    def plan(self) -> list[tuple[str, Path, dict, Callable[[], Path]]]:
        r, run = self.recipe, self.run_dir
        data = data_settings(r)
        plan = []
        teacher_s = dict(dataclasses.asdict(r.teacher), data=data)
        plan.append(("teacher", run / "teacher", teacher_s,
                     lambda: finetune_stage(r.teacher, r.teacher.model, self.data, run / "teacher", kind="teacher",
                                            stage_settings=teacher_s)))
        if r.baseline.enabled:
            base_s = dict(dataclasses.asdict(r.baseline), model=r.distill.student, data=data)
            plan.append(("baseline", run / "baseline", base_s,
                         lambda: finetune_stage(r.baseline, r.distill.student, self.data, run / "baseline",
                                                kind="baseline", stage_settings=base_s)))
        distill_s = dict(dataclasses.asdict(r.distill), data=data, teacher=artifacts.settings_hash(teacher_s))
        plan.append(("distill", run / "distilled", distill_s,
                     lambda: distill_stage(r.distill, run / "teacher", self.data, run / "distilled",
                                           stage_settings=distill_s)))
        if r.prune.enabled:
            prune_s = dict(dataclasses.asdict(r.prune), data=data, teacher=artifacts.settings_hash(teacher_s),
                           model=artifacts.settings_hash(distill_s))
            plan.append(("prune", run / "pruned", prune_s,
                         lambda: prune_stage(r.prune, run / "distilled", run / "teacher", self.data, run / "pruned",
                                             stage_settings=prune_s)))
        source, source_s = (run / "pruned", prune_s) if r.prune.enabled else (run / "distilled", distill_s)
        quantized = []
        if r.quantize.enabled:
            for method in r.quantize.methods:
                q_s = dict(dataclasses.asdict(r.quantize), method=method, data=data,
                           teacher=artifacts.settings_hash(teacher_s), model=artifacts.settings_hash(source_s))
                q_s.pop("methods")
                q_out = run / f"quantized-{method}"
                plan.append((f"quantize-{method}", q_out, q_s,
                             lambda method=method, q_out=q_out, q_s=q_s: quantize_stage(
                                 r.quantize, method, source, run / "teacher", self.data, q_out, stage_settings=q_s)))
                quantized.append((method, q_out, q_s))
        exports = []
        if r.export.enabled:
            for precision in r.export.precisions:
                targets = ([(source.name, source, source_s)] if precision in ("fp32", "int8")
                           else [(f"quantized-{m}", d, s_) for m, d, s_ in quantized if r.quantize.bits == 4])
                for label, src, src_s in targets:
                    e_s = dict(dataclasses.asdict(r.export), precision=precision, model=artifacts.settings_hash(src_s))
                    e_s.pop("precisions")
                    e_out = run / f"export-{precision}-{label}"
                    plan.append((f"export-{precision}-{label}", e_out, e_s,
                                 lambda precision=precision, src=src, e_out=e_out, e_s=e_s: export_stage(
                                     r.export, precision, src, e_out, stage_settings=e_s)))
                    exports.append(e_out)
        # quantized folders are measured through their exports (the integer file itself), not as torch rows
        models_in = [p for name, p, _, _ in plan if not name.startswith(("quantize-", "export-"))] + exports
        eval_s = dict(dataclasses.asdict(r.evaluate), data=data,
                      inputs={name: artifacts.settings_hash(s) for name, _, s, _ in plan})
        plan.append(("evaluate", run / "evaluation", eval_s, lambda: self._evaluate(models_in, eval_s)))
        return plan

    def _evaluate(self, dirs: list[Path], settings: dict) -> Path:
        rows = evaluate_dirs(dirs, self.data, self.recipe.evaluate)
        teacher = rows[0]
        latency = [k for k in teacher if re.fullmatch(r"latency_ms_bs\d+", k)]
        for row in rows:
            for k in ("size_mb", "params", "gflops", *latency):
                if teacher.get(k) and row.get(k):
                    row[f"{k}_vs_teacher"] = round(row[k] / teacher[k], 4)
        out = self.run_dir / "evaluation"
        with artifacts.artifact_dir(out, kind="evaluation", settings=settings) as tmp:
            artifacts.write_json_atomic(tmp / "results.json", rows)
            (tmp / "results.md").write_text(format_table(rows) + "\n")
        print(format_table(rows))
        return out

    def run(self, *, dry_run: bool = False) -> list[tuple[str, bool, str]]:
        steps = []
        for name, out, settings, runner in self.plan():
            todo, why = stage_status(out, settings)
            steps.append((name, todo, why))
            if dry_run:
                continue
            run_stage(name, out, settings, runner)
        return steps


def run_recipe(path: str, *, profile: str | None, out: str | None, data: str | None, dry_run: bool = False,
               device: str | None = None) -> Path:
    recipe = load_recipe(path, profile)
    devices.set_choice(device or recipe.device)
    # the last stages need the optional extras: a missing one is said now, not after hours of training
    if recipe.export.enabled and recipe.export.precisions:
        require("onnx", "the recipe's export stages (export.precisions)")
    require("report", "the run's report")
    data = data or os.environ.get("DPQ_DATA")
    if data:
        recipe.data.path = data
    run_dir = Path(out) if out else Path("runs") / (recipe.name + (f"-{profile}" if profile else ""))
    pipe = Pipeline(recipe, run_dir)
    if dry_run:
        steps = pipe.run(dry_run=True)
        width = max(len(name) for name, _, _ in steps)
        for name, todo, why in steps:
            print(f"{name:{width}s}  {'run ' if todo else 'skip'}  {why}")
        return run_dir
    check_writable(run_dir)
    with locks.hold(run_dir):
        if devices.is_main():
            run_dir.mkdir(exist_ok=True)
            _write_text_atomic(run_dir / "recipe.yaml", dump_recipe(recipe))
        pipe.run()
        if not devices.is_main():
            return run_dir
        from .report import write_report

        report = write_report(run_dir)
    log.info("run complete: %s", run_dir)
    print(f"report: {report / 'report.md'}")
    return run_dir


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
