"""``dpq run``: the recipe's stages in order, each skipped when its artifact is complete and its settings
(including everything upstream) are unchanged, and resumed from its checkpoint when it was interrupted."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from . import artifacts, devices, locks, registry
from .data import TextData, load_data
from .extras import require
from .recipe import DataSettings, Recipe, dump_recipe, load_recipe
from .stages import check_writable, work_dir_for

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


def run_stage(name: str, out: Path, settings: dict, runner: Callable[[], Path], *, trains: bool,
              force: bool = False) -> Path:
    """Run ``runner`` unless ``out`` is complete with these settings, holding the folder's lock. A stage that
    ``trains`` runs in every process of a multi-process job; any other runs on the main process alone."""
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
        if trains or not devices.distributed():
            return runner()
        if devices.is_main():
            runner()
    devices.barrier()
    return out


def load_stage_data(d: DataSettings, need=("train", "dev")) -> TextData:
    """The data a training stage sees, the same for `dpq run` and a single-stage command: the recipe's data
    section loaded, with its held-out selection slice taken out of train."""
    data = load_data(d.path, labels=d.labels, skip_bad_rows=d.skip_bad_rows, need=need)
    return data.hold_out(d.validation_fraction, d.validation_max_samples, d.validation_seed, unit=d.validation_unit)


class Pipeline:
    def __init__(self, recipe: Recipe, run_dir: Path):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self._data: TextData | None = None

    def data(self) -> TextData:
        if self._data is None:
            d = self.recipe.data
            self._data = load_stage_data(d)
            log.info("data %s: %s", d.path, ", ".join(f"{k} {len(v)}" for k, v in self._data.splits.items()))
        return self._data

    def plan(self) -> list[registry.Step]:
        return registry.plan(self.recipe, self.run_dir, self.data)

    def run(self, *, dry_run: bool = False) -> list[tuple[str, bool, str]]:
        steps = []
        for step in self.plan():
            todo, why = stage_status(step.out, step.key)
            steps.append((step.name, todo, why))
            if not dry_run:
                run_stage(step.name, step.out, step.key, step.run, trains=step.trains)
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
