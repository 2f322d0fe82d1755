"""``dpq run``: the recipe's stages in order, each skipped when its artifact is complete and its settings
(including everything upstream) are unchanged, and resumed from its checkpoint when it was interrupted."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable

from . import artifacts, devices, locks, registry
from .data import TextData, load_data
from .errors import DpqError
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
        return True, registry.describe_change(manifest.get("settings") or {}, settings)
    return False, "complete, settings unchanged"


def run_stage(name: str, out: Path, settings: dict, runner: Callable[[], Path], *, trains: bool,
              force: bool = False) -> Path:
    """Run ``runner`` unless ``out`` is complete with these settings, holding the folder's lock. A stage that
    ``trains`` runs in every process of a multi-process job; any other runs on the main process alone. The folders
    above ``out`` are made only now, after the caller's checks, and taken away again (when still empty) if the
    stage fails."""
    todo, why = stage_status(out, settings)
    if not todo and not force:
        log.info("%s: %s, skipped (%s)", name, why, out)
        return out
    made = [p for p in reversed(artifacts.followed(out).parents) if not p.exists()]
    try:
        with locks.hold(out):
            todo, why = stage_status(out, settings)  # another process may have finished it while we looked
            if not todo and not force:
                log.info("%s: %s, skipped (%s)", name, why, out)
                return out
            if devices.is_main():
                artifacts.clean_stale(artifacts.followed(out))  # a killed writer's leftovers, now that none can run
            log.info("%s: running (%s)", name, why if not force else "forced")
            if trains or not devices.distributed():
                return runner()
            if devices.is_main():
                runner()
    except BaseException:
        for folder in reversed(made):  # innermost first; one that holds anything (a checkpoint) stays
            try:
                folder.rmdir()
            except OSError:
                break
        raise
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
        self._steps: list[registry.Step] | None = None

    def data(self) -> TextData:
        if self._data is None:
            d = self.recipe.data
            self._data = load_stage_data(d)
            log.info("data %s: %s", d.path, ", ".join(f"{k} {len(v)}" for k, v in self._data.splits.items()))
        return self._data

    def plan(self) -> list[registry.Step]:
        """Planned once: every key holds the content digests of the run's local files."""
        if self._steps is None:
            self._steps = registry.plan(self.recipe, self.run_dir, self.data)
        return self._steps

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
    text = dump_recipe(recipe).encode()
    running = _check_run_outputs(recipe, run_dir, pipe.plan(), text)
    if dry_run:
        steps = pipe.run(dry_run=True)
        width = max(len(name) for name, _, _ in steps)
        for name, todo, why in steps:
            print(f"{name:{width}s}  {'run ' if todo else 'skip'}  {why}")
        return run_dir
    check_writable(run_dir, create=False)
    if running:  # the data is read (and refused, if it must be) before the run folder, its recipe or a lock
        _check_models(recipe, running, pipe.data())
    devices.barrier()  # every process has looked at the run folder before the main one writes into it
    with locks.hold(run_dir, covers_inside=True):
        if devices.is_main():
            _check_run_outputs(recipe, run_dir, pipe.plan(), text)  # again: another process may have written since
            _start_run_folder(run_dir, text)
        pipe.run()
        if not devices.is_main():
            return run_dir
        from .report import write_report

        report = write_report(run_dir)
    log.info("run complete: %s", run_dir)
    print(f"report: {report / 'report.md'}")
    return run_dir


def _external_inputs(recipe: Recipe) -> list[tuple[str, str]]:
    """The folders and files a run reads from outside itself: the run folder must be none of them."""
    inputs = [("teacher.model", recipe.teacher.model), ("distill.student", recipe.distill.student)]
    for section in ("distill", "prune", "quantize"):
        inputs += [(f"{section}.extra_teachers", str(t)) for t in getattr(recipe, section).extra_teachers
                   if t not in registry.MODEL_STEPS]
    return inputs + data_inputs(recipe.data.path)


def data_inputs(spec, flag: str = "data") -> list[tuple[str, str]]:
    """The paths a data spec reads (a folder, or each of TRAIN,DEV), for ``artifacts.check_not_input``."""
    spec = str(spec)
    return [(flag, p) for p in dict.fromkeys([spec, *spec.split(",")])]


def _check_run_outputs(recipe: Recipe, run_dir: Path, steps: list[registry.Step], text: bytes) -> set[str]:
    """Refuse, before anything is read or written, a run that would replace what dpq did not write: a run folder dpq
    did not make (or one of the run's inputs), a stage folder that is not that stage's earlier artifact, a report or
    evaluation folder it did not write, a recipe.yaml edited since. Returns the names of the stages to run."""
    locks.check_free(run_dir, covers_inside=True)
    artifacts.check_run_folder(run_dir)
    artifacts.check_not_input(run_dir, _external_inputs(recipe))
    running = {step.name for step in steps if stage_status(step.out, step.key)[0]}
    for step in steps:
        if step.name in running:
            artifacts.check_replaceable(step.out, step.kind)
            locks.check_free(step.out)
    artifacts.check_replaceable(run_dir / "report", "report")
    _check_recipe_copy(run_dir, text)
    if running:  # a local model folder that is none is said now; hub ids and packaged models are fetched when used
        from .models import resolve

        for model in (recipe.teacher.model, recipe.distill.student):
            if Path(model).expanduser().is_dir():
                resolve(model)
    return running


# which recipe sections' stages read which models: (section, the models their max_length must fit, KD)
_MODEL_READERS = (("teacher", ("teacher",), False), ("baseline", ("student",), False),
                  ("distill", ("teacher", "student"), True), ("prune", ("teacher", "student"), True),
                  ("quantize", ("teacher", "student"), True))


def _check_models(recipe: Recipe, running: set[str], data: TextData) -> None:
    """What a later stage would otherwise find only after the stages before it trained: a ``max_length`` above a
    model's position limit, hidden-state or attention KD between models whose tokenizers differ. Checked for the
    local and packaged models (a hub id is fetched by its own stage, and checked there)."""
    from . import models
    from .distill import KDConfig, check_same_tokens
    from .quant import methods
    from .stages import kd_config

    ids = {"teacher": recipe.teacher.model, "student": recipe.distill.student}
    local = {k: src for k, v in ids.items() if Path(src := models.resolve(v)).is_dir()}
    meta = {k: models.meta_model(ids[k], src) for k, src in local.items()}
    hidden_kd = False
    for section, readers, kd in _MODEL_READERS:
        names = [n for n in running if n == section or n.startswith(section + "-")]
        if not names:
            continue
        if section == "quantize" and not any(n.split("-")[1] in methods.TRAINED for n in names):
            readers, kd = ("student",), False  # post-training methods read the student alone
        settings = getattr(recipe, section)
        for who in (w for w in readers if w in meta):
            models.check_max_length(meta[who], settings.max_length, ids[who], setting=f"{section}.max_length")
        hidden_kd = hidden_kd or (kd and kd_config(settings).needs_teacher_forward)
    if hidden_kd and local.keys() >= {"teacher", "student"}:  # one pair of tokenizers for every KD stage
        check_same_tokens(KDConfig(hidden_weight=1.0), models.load_tokenizer(ids["student"]),
                          models.load_tokenizer(ids["teacher"]), data.split("train").texts)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_recipe_copy(run_dir: Path, text: bytes) -> None:
    """The run's recipe.yaml is rewritten only when dpq wrote what is there (the marker holds its hash; a run made
    before the marker existed has no hash, and its recipe.yaml is taken for dpq's)."""
    path = run_dir / "recipe.yaml"
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_file():
        raise DpqError(f"{path}: not a file dpq wrote (a link, or not a file); dpq will not replace it: move it away")
    marker = artifacts.run_marker(run_dir)
    current = artifacts.sha256_file(path)
    if marker is None or current == _sha256(text) or current in (marker.get("recipe_sha256") or []):
        return
    raise DpqError(f"{path}: edited since dpq wrote it; dpq will not overwrite the edit: copy it elsewhere and run "
                   "that copy, or move it away")


def _start_run_folder(run_dir: Path, text: bytes) -> None:
    """Make the run folder dpq's before anything else is in it, then write its recipe.yaml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "recipe.yaml"
    there = [artifacts.sha256_file(path)] if path.is_file() else []
    artifacts.mark_run_folder(run_dir, list(dict.fromkeys([_sha256(text), *there])))
    artifacts.write_bytes_atomic(path, text)

