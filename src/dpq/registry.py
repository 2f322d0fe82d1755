"""Every stage of a dpq run, declared once: what it is keyed by, where it writes, how it runs, what the report
calls it.

`dpq run`'s plan and `--dry-run`, the single-stage subcommands (their flags, inputs and checks), the report's stage
names, and the skip keys of the commands and the benchmarks all come from here. A stage's artifact is keyed by
``stage_key()``: its settings, its fan-out choice (quantization method, export precision), the data, and the
identity of each input: the settings hash of the dpq artifact it reads (the key that made it), or the path or id of
a plain model. Its ``contents`` hold what a path cannot say: the sha256 of each local data file and the hash of each
local plain model folder's weights and config, so a file edited or replaced in place re-runs what read it (hub ids
are keyed by id). Equal keys: the artifact is reused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import artifacts
from .data import data_content
from .errors import DpqError
from .quant import methods
from .recipe import (
    DistillSettings,
    ExportSettings,
    PruneSettings,
    QuantizeSettings,
    Recipe,
    TeacherSettings,
)
from .stages import distill_stage, evaluate_run, finetune_stage, prune_stage, require_model, require_teacher
from .stages_quant import PRECISIONS, export_stage, quantize_stage
from .teachers import require_extra_teachers, teacher_key

# settings that list a stage's fan-out (one stage per entry): a single stage is keyed by its own entry instead
FANOUT_LISTS = ("methods", "precisions", "unpruned_methods", "unpruned_precisions")
# settings that name the model a stage starts from (teacher.model, distill.student): a local folder, by its files
MODEL_SETTINGS = ("model", "student")


def identity(source, *, contents: bool = False) -> str:
    """What an input contributes to a key: a planned stage's key (dict) or a finished artifact gives the hash of
    the key that made it; a plain model folder or hub id gives its name, or with ``contents`` a folder gives the
    hash of its weights and config (as the teacher-logits cache keys it)."""
    if isinstance(source, dict):
        return artifacts.settings_hash(source)
    manifest = artifacts.read_manifest(Path(source)) if Path(source).is_dir() else None
    if manifest:
        return manifest.get("settings_hash")
    return teacher_key(Path(source), "", 0) if contents and Path(source).is_dir() else str(source)


def model_content(source) -> str | None:
    """The hash of a local model folder's weights and config (``teacher_key``, as the teacher-logits cache keys it),
    else None: a hub or packaged id is keyed by its name, a planned stage by its key."""
    if source is None or isinstance(source, dict):
        return None
    path = Path(str(source)).expanduser()
    return teacher_key(path, "", 0) if path.is_dir() else None


def stage_key(settings, *, data: dict | None = None, choice: dict | None = None, inputs: dict | None = None) -> dict:
    """``inputs``: each input folder's source; for a list-of-folders setting (``folders`` in its metadata, e.g.
    ``extra_teachers``) the sources of its entries, by default the entries themselves. ``data``: the data section
    (its local files' content is added to ``contents``)."""
    key = dataclasses.asdict(settings)
    inputs = dict(inputs or {})
    for f in dataclasses.fields(settings):
        sources = inputs.pop(f.name, key[f.name]) if f.metadata.get("folders") else None
        if f.metadata.get("keyed_if_set") and key[f.name] == (
                f.default_factory() if f.default is dataclasses.MISSING else f.default):
            # absent at its default, so artifacts sealed before the setting existed keep their keys (not re-run)
            del key[f.name]
        elif sources is not None:
            key[f.name] = [identity(s, contents=True) for s in sources]
    if choice:
        for f in FANOUT_LISTS:
            key.pop(f, None)
        key.update(choice)
    contents = {}
    if data is not None:
        key["data"] = data
        files = data_content(data["path"]) if data.get("path") else None
        if files is not None:
            contents["data"] = files
    for name in MODEL_SETTINGS:
        if name in key and name not in inputs and (c := model_content(key[name])) is not None:
            contents[name] = c
    for name, source in inputs.items():
        key[name] = None if source is None else identity(source)
        if key[name] == str(source) and (c := model_content(source)) is not None:  # a plain folder, no manifest
            contents[name] = c
    if contents:  # absent when nothing is local, so keys of hub data and hub models stay as they were
        key["contents"] = contents
    return key


def describe_change(old: dict, new: dict) -> str:
    """Why a stage whose key changed from ``old`` to ``new`` runs again: "data changed" or "model changed" when the
    content of a file it reads differs (the same path), then the settings that differ."""
    was, now = old.get("contents") or {}, new.get("contents") or {}
    reasons = ["data changed"] if was.get("data") != now.get("data") else []
    models = sorted(k for k in set(was) | set(now) if k != "data" and was.get(k) != now.get(k))
    if models:
        reasons.append("model changed" + (f" ({', '.join(models)})" if models != ["model"] else ""))
    if now and "contents" not in old:  # sealed by a dpq that keyed files by their path: nothing is known changed
        reasons = ["keyed by the content of its data and model files now (was by their path)"]
    changed = sorted(k for k in set(old) | set(new) if k != "contents" and old.get(k) != new.get(k))
    if changed or not reasons:
        reasons.append(f"settings changed: {', '.join(changed) or 'format'}")
    return "; ".join(reasons)


def always(choice: dict) -> bool:
    return True


@dataclass(frozen=True)
class Input:
    """A folder a stage reads: ``--NAME DIR`` on its command, ``NAME`` in its key."""

    name: str
    help: str
    check: Callable[[Path], None]
    needed: Callable[[dict], bool] = always  # given the fan-out choice, must it be given?


@dataclass(frozen=True)
class Fanout:
    """The setting a recipe lists (``methods``, ``precisions``) and a single stage takes one of (``--method``)."""

    name: str
    choices: Callable[[], list[str]]
    help: str


@dataclass(frozen=True)
class Stage:
    """One stage kind, declared once: its settings (the recipe section and the command's flags), its inputs, its
    fan-out, and how it runs. ``dpq NAME`` is generated from this, and the run's planners call ``run`` too."""

    name: str
    help: str
    settings: type
    run: Callable[..., Path]  # (settings, choice, inputs, data, out, key) -> out
    inputs: tuple[Input, ...] = ()
    fanout: Fanout | None = None
    data: bool = True  # reads the labelled data (and so is keyed by it)
    skip: tuple[str, ...] = ("enabled",)  # settings that are recipe-only (no flag)
    trains: Callable[[dict], bool] = always
    flags: tuple[tuple[str, dict], ...] = ()  # command-only flags that change nothing in the artifact

    def key(self, settings, *, data: dict | None, choice: dict, inputs: dict) -> dict:
        return stage_key(settings, data=data if self.data else None, choice=choice or None, inputs=inputs)

    def check(self, choice: dict, inputs: dict, settings=None) -> None:
        """The input checks, before any lock is taken or data loaded: the input folders, and the extra teachers a
        KD stage's settings name."""
        for i in self.inputs:
            if inputs.get(i.name) is not None:
                i.check(Path(inputs[i.name]))
            elif i.needed(choice):
                said = " ".join(f"--{k} {v}" for k, v in choice.items())
                raise DpqError(f"{said or self.name} needs a {i.name}: give --{i.name} DIR ({i.help})")
        if getattr(settings, "extra_teachers", None):
            require_extra_teachers(settings.extra_teachers, inputs.get("teacher"))


def _quantize_runner(settings, choice, inputs, data, out, key):
    return quantize_stage(settings, choice["method"], inputs["model"], inputs.get("teacher"), data, out,
                          stage_settings=key)


TEACHER_INPUT = Input("teacher", "teacher artifact folder (from `dpq teacher`)", require_teacher)
COMMANDS: dict[str, Stage] = {s.name: s for s in (
    Stage("teacher", "fine-tune a model on the labelled data (the teacher, or any baseline)", TeacherSettings,
          lambda s, c, i, data, out, key: finetune_stage(s, s.model, data, out, kind="teacher", stage_settings=key),
          skip=()),
    Stage("distill", "distil a fine-tuned teacher into a student", DistillSettings,
          lambda s, c, i, data, out, key: distill_stage(s, i["teacher"], data, out, stage_settings=key),
          inputs=(TEACHER_INPUT,), skip=()),
    Stage("prune", "remove attention heads and FFN neurons (gradual, with KD recovery)", PruneSettings,
          lambda s, c, i, data, out, key: prune_stage(s, i["model"], i["teacher"], data, out, stage_settings=key),
          inputs=(Input("model", "model folder to prune (from `dpq distill`, or an earlier prune)",
                        lambda p: require_model(p, "run `dpq distill` first")),
                  Input("teacher", "teacher artifact folder for KD during pruning and recovery", require_teacher))),
    Stage("quantize", "4/8-bit weights: PTQ (rtn, gptq) or QAT with KD (fixed or GoR loss weights)",
          QuantizeSettings, _quantize_runner,
          inputs=(Input("model", "fp32 model folder (from `dpq distill` or `dpq prune`)", require_model),
                  Input("teacher", "teacher artifact folder (QAT: distil from it)", require_teacher,
                        needed=lambda c: c["method"] in methods.TRAINED)),
          fanout=Fanout("method", methods.choices,
                        "round-to-nearest, GPTQ, QAT with KD, or a method registered in dpq.quant.methods"),
          skip=("enabled", "methods"), trains=lambda c: c["method"] in methods.TRAINED),
    Stage("export", "ONNX export: fp32, int8 (dynamic) or int4 (MatMulNBits, the model's own codes)", ExportSettings,
          lambda s, c, i, data, out, key: export_stage(s, c["precision"], i["model"], out, stage_settings=key),
          inputs=(Input("model", "model folder (int4: a 4-bit `dpq quantize` folder)",
                        lambda p: require_model(p, "give an fp32 model folder, or a 4-bit one for int4")),),
          fanout=Fanout("precision", lambda: list(PRECISIONS), "weight precision in the file"),
          data=False, skip=("enabled", "precisions"), trains=lambda c: False,
          flags=(("--format", dict(default="onnx", choices=("onnx",), help="export format")),)),
)}


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

    @property
    def kind(self) -> str:
        """The kind its artifact's manifest says: the stage's name up to the fan-out (quantize-rtn, export-int8-…)."""
        return {"evaluate": "evaluation"}.get(self.name, self.name.split("-")[0])


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
    return [Step("teacher", out, key, lambda: COMMANDS["teacher"].run(r.teacher, {}, {}, p.data(), out, key),
                 "teacher", trains=True)]


def _baseline(p: Plan) -> list[Step]:
    r, out = p.recipe, p.run / "baseline"
    if not r.baseline.enabled:
        return []
    key = stage_key(r.baseline, data=p.data_key, inputs={"model": r.distill.student})
    return [Step("baseline", out, key, lambda: finetune_stage(r.baseline, r.distill.student, p.data(), out,
                                                               kind="baseline", stage_settings=key),
                 "baseline (no KD)", trains=True)]


# stages of a run whose folder holds a model another stage can learn from, by the name `extra_teachers` gives them
MODEL_STEPS = ("baseline", "distill", "prune")


def _extra_teachers(p: Plan, section: str, settings):
    """(settings with every extra teacher a folder, the source each is keyed by). A stage of this run named in
    ``extra_teachers`` is read from its folder and keyed by its planned key, so when that stage's output changes so
    does the key of every stage that learnt from it; it runs first because it is planned earlier. Paths are
    checked now, before any stage runs."""
    folders, sources = [], []
    for name in settings.extra_teachers:
        if name == "teacher":
            raise DpqError(f"{section}.extra_teachers: teacher is the main teacher already")
        if name in MODEL_STEPS:
            step = p.get(name)
            if step is None:
                off = f" (is {name}.enabled false?)" if name in ("baseline", "prune") else ""
                raise DpqError(f"{section}.extra_teachers: {name} does not run before {section} in this recipe{off}; "
                               "name an earlier stage or give a folder")
            folders.append(str(step.out))
            sources.append(step.key)
        else:
            require_extra_teachers([name])
            folders.append(name)
            sources.append(name)
    return dataclasses.replace(settings, extra_teachers=folders), sources


def _distill(p: Plan) -> list[Step]:
    r, out, teacher = p.recipe, p.run / "distilled", p.get("teacher")
    settings, extras = _extra_teachers(p, "distill", r.distill)
    key = stage_key(r.distill, data=p.data_key, inputs={"teacher": teacher.key, "extra_teachers": extras})
    return [Step("distill", out, key,
                 lambda: COMMANDS["distill"].run(settings, {}, {"teacher": teacher.out}, p.data(), out, key),
                 "distill", trains=True)]


def _prune(p: Plan) -> list[Step]:
    r, out, teacher, model = p.recipe, p.run / "pruned", p.get("teacher"), p.get("distill")
    if not r.prune.enabled:
        return []
    settings, extras = _extra_teachers(p, "prune", r.prune)
    key = stage_key(r.prune, data=p.data_key,
                    inputs={"teacher": teacher.key, "model": model.key, "extra_teachers": extras})
    inputs = {"model": model.out, "teacher": teacher.out}
    return [Step("prune", out, key, lambda: COMMANDS["prune"].run(settings, {}, inputs, p.data(), out, key),
                 "prune", trains=True)]


def _quantize(p: Plan) -> list[Step]:
    r, teacher, source = p.recipe, p.get("teacher"), p.source
    if not r.quantize.enabled:
        return []
    settings, extras = _extra_teachers(p, "quantize", r.quantize)
    # the pruned student with every method; the distilled one too (unpruned) when pruning ran, so the report shows
    # what pruning buys at the same precision
    todo = [(m, source, "") for m in r.quantize.methods]
    if p.get("prune") is not None:
        todo += [(m, p.get("distill"), "-unpruned") for m in r.quantize.unpruned_methods]
    steps = []
    for method, src, suffix in todo:
        out = p.run / f"quantized-{method}{suffix}"
        key = stage_key(r.quantize, data=p.data_key, choice={"method": method},
                        inputs={"teacher": teacher.key, "model": src.key, "extra_teachers": extras})
        steps.append(Step(f"quantize-{method}{suffix}", out, key,
                          lambda method=method, src=src, out=out, key=key: _quantize_runner(
                              settings, {"method": method}, {"model": src.out, "teacher": teacher.out},
                              p.data(), out, key),
                          f"quantize {method}" + (" (unpruned)" if suffix else ""),
                          trains=method in methods.TRAINED, measured=False))
    return steps


def _export(p: Plan) -> list[Step]:
    r, source = p.recipe, p.source
    if not r.export.enabled:
        return []
    quantized = [s for s in p.steps if s.name.startswith("quantize-")] if r.quantize.bits == 4 else []
    unpruned = p.get("distill") if p.get("prune") is not None else None
    steps = []
    for precision in r.export.precisions:
        # fp32 and int8 files are made from the fp32 model; an int4 file stores a 4-bit model's own codes
        if precision in ("fp32", "int8"):
            sources = [source] + ([unpruned] if unpruned and precision in r.export.unpruned_precisions else [])
        else:
            sources = quantized
        for src in sources:
            out = p.run / f"export-{precision}-{src.out.name}"
            key = stage_key(r.export, choice={"precision": precision}, inputs={"model": src.key})
            steps.append(Step(out.name, out, key,
                              lambda precision=precision, src=src, out=out, key=key: COMMANDS["export"].run(
                                  r.export, {"precision": precision}, {"model": src.out}, None, out, key),
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
