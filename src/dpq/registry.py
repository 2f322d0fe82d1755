"""Every stage of a dpq run, declared once: what it is keyed by, where it writes, how it runs, what the report
calls it.

`dpq run`'s plan and `--dry-run`, the report's stage names, and the skip keys of the single-stage commands and the
benchmarks all come from here. A stage's artifact is keyed by ``stage_key()``: its settings, its fan-out choice
(quantization method, export precision), the data, and the identity of each input: the settings hash of the
dpq artifact it reads (the key that made it), or the path or id of a plain model. Equal keys: the artifact is reused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import artifacts
from .quant.methods import TRAINED
from .recipe import Recipe
from .stages import distill_stage, evaluate_run, finetune_stage, prune_stage
from .stages_quant import export_stage, quantize_stage

# settings that list a stage's fan-out (one stage per entry): a single stage is keyed by its own entry instead
FANOUT_LISTS = ("methods", "precisions")


def identity(source) -> str:
    """What an input contributes to a key: a planned stage's key (dict) or a finished artifact gives the hash of
    the key that made it; a plain model folder or hub id gives its name."""
    if isinstance(source, dict):
        return artifacts.settings_hash(source)
    manifest = artifacts.read_manifest(Path(source)) if Path(source).is_dir() else None
    return manifest.get("settings_hash") if manifest else str(source)


def stage_key(settings, *, data: dict | None = None, choice: dict | None = None, inputs: dict | None = None) -> dict:
    key = dataclasses.asdict(settings)
    if choice:
        for f in FANOUT_LISTS:
            key.pop(f, None)
        key.update(choice)
    if data is not None:
        key["data"] = data
    for name, source in (inputs or {}).items():
        key[name] = None if source is None else identity(source)
    return key


@dataclass
class Step:
    """One planned stage: ``run()`` writes ``out``, whose manifest will hold ``key``."""

    name: str  # in logs, --dry-run and the plan
    out: Path
    key: dict
    run: Callable[[], Path]
    label: str  # the report's stage column
    trains: bool  # a training loop: every process of a multi-process job takes part
    measured: bool = True  # evaluated as a PyTorch row (quantized folders are measured through their exports)


@dataclass
class Plan:
    """What the stage planners share: the recipe, the run folder, the data (loaded on first use), the steps so far."""

    recipe: Recipe
    run: Path
    data: Callable[[], object]
    steps: list[Step] = dataclasses.field(default_factory=list)

    def get(self, name: str) -> Step | None:
        return next((s for s in self.steps if s.name == name), None)

    @property
    def data_key(self) -> dict:
        return dataclasses.asdict(self.recipe.data)

    @property
    def source(self) -> Step:
        """The fp32 model the quantize and export stages start from: the pruned student, else the distilled one."""
        return self.get("prune") or self.get("distill")


def _teacher(p: Plan) -> list[Step]:
    r, out = p.recipe, p.run / "teacher"
    key = stage_key(r.teacher, data=p.data_key)
    return [Step("teacher", out, key, lambda: finetune_stage(r.teacher, r.teacher.model, p.data(), out, kind="teacher",
                                                              stage_settings=key), "teacher", trains=True)]


def _baseline(p: Plan) -> list[Step]:
    r, out = p.recipe, p.run / "baseline"
    if not r.baseline.enabled:
        return []
    key = stage_key(r.baseline, data=p.data_key, inputs={"model": r.distill.student})
    return [Step("baseline", out, key, lambda: finetune_stage(r.baseline, r.distill.student, p.data(), out,
                                                               kind="baseline", stage_settings=key),
                 "baseline (no KD)", trains=True)]


def _distill(p: Plan) -> list[Step]:
    r, out, teacher = p.recipe, p.run / "distilled", p.get("teacher")
    key = stage_key(r.distill, data=p.data_key, inputs={"teacher": teacher.key})
    return [Step("distill", out, key, lambda: distill_stage(r.distill, teacher.out, p.data(), out, stage_settings=key),
                 "distill", trains=True)]


def _prune(p: Plan) -> list[Step]:
    r, out, teacher, model = p.recipe, p.run / "pruned", p.get("teacher"), p.get("distill")
    if not r.prune.enabled:
        return []
    key = stage_key(r.prune, data=p.data_key, inputs={"teacher": teacher.key, "model": model.key})
    return [Step("prune", out, key, lambda: prune_stage(r.prune, model.out, teacher.out, p.data(), out,
                                                         stage_settings=key), "prune", trains=True)]


def _quantize(p: Plan) -> list[Step]:
    r, teacher, source = p.recipe, p.get("teacher"), p.source
    if not r.quantize.enabled:
        return []
    steps = []
    for method in r.quantize.methods:
        out = p.run / f"quantized-{method}"
        key = stage_key(r.quantize, data=p.data_key, choice={"method": method},
                        inputs={"teacher": teacher.key, "model": source.key})
        steps.append(Step(f"quantize-{method}", out, key,
                          lambda method=method, out=out, key=key: quantize_stage(
                              r.quantize, method, source.out, teacher.out, p.data(), out, stage_settings=key),
                          f"quantize {method}", trains=method in TRAINED, measured=False))
    return steps


def _export(p: Plan) -> list[Step]:
    r, source = p.recipe, p.source
    if not r.export.enabled:
        return []
    quantized = [s for s in p.steps if s.name.startswith("quantize-")] if r.quantize.bits == 4 else []
    steps = []
    for precision in r.export.precisions:
        # fp32 and int8 files are made from the fp32 model; an int4 file stores a 4-bit model's own codes
        for src in ([source] if precision in ("fp32", "int8") else quantized):
            out = p.run / f"export-{precision}-{src.out.name}"
            key = stage_key(r.export, choice={"precision": precision}, inputs={"model": src.key})
            steps.append(Step(out.name, out, key,
                              lambda precision=precision, src=src, out=out, key=key: export_stage(
                                  r.export, precision, src.out, out, stage_settings=key),
                              f"{src.label} → export {precision}", trains=False))
    return steps


def _evaluate(p: Plan) -> list[Step]:
    rows = [s for s in p.steps if s.measured]
    key = stage_key(p.recipe.evaluate, data=p.data_key)
    key["inputs"] = {s.name: artifacts.settings_hash(s.key) for s in p.steps}
    out = p.run / "evaluation"
    return [Step("evaluate", out, key,
                 lambda: evaluate_run([s.out for s in rows], {s.out.name: s.label for s in rows}, p.data(),
                                      p.recipe.evaluate, out, key),
                 "evaluate", trains=False, measured=False)]


# the stages of a run, in order; each planner sees the steps planned before it
STAGES: list[tuple[str, Callable[[Plan], list[Step]]]] = [
    ("teacher", _teacher), ("baseline", _baseline), ("distill", _distill), ("prune", _prune),
    ("quantize", _quantize), ("export", _export), ("evaluate", _evaluate),
]


def plan(recipe: Recipe, run: Path, data: Callable[[], object]) -> list[Step]:
    p = Plan(recipe, Path(run), data)
    for _, planner in STAGES:
        p.steps += planner(p)
    return p.steps
