"""Recipes: one YAML file with a section per stage, profiles that override it, and strict validation.

Every setting is a dataclass field with a default and a help text; the CLI builds its flags from the
same fields, so a recipe key and a command-line flag can never drift apart.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import DpqError


def _check_list(where: str, values, allowed: tuple) -> None:
    if not isinstance(values, list):
        raise DpqError(f"{where}: expected a list, got {values!r}")
    for v in values:
        if v not in allowed:
            raise DpqError(f"{where}: {v!r} is not one of {', '.join(allowed)}{_did_you_mean(str(v), allowed)}")
    if len(set(values)) != len(values):
        raise DpqError(f"{where}: {values} names one entry twice")


def opt(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DataSettings:
    path: str = opt("nyu-mll/glue:sst2",
                    "folder of train/dev .tsv|.csv|.jsonl, TRAIN,DEV files, or a hub id NAME[:CONFIG]")
    labels: typing.Optional[list] = opt(None,
                                        "class names in label-id order (default: sorted labels of the train split)")
    skip_bad_rows: bool = opt(False, "skip malformed rows (with a count) instead of refusing the file")
    validation_fraction: float = opt(0.1, "share of train set aside to choose checkpoints on, so dev is only "
                                     "reported (0: choose on dev)", min=0, lt=0.5)
    validation_max_samples: int = opt(2000, "at most this many held-out examples", min=1)
    validation_seed: int = opt(0, "seed of the held-out draw (fixed across stages and runs)")
    validation_unit: str = opt("sentence", "what is held out: sentence (rows no other row contains, each with every "
                               "row that is a word span of it, so no phrase of a held-out sentence trains) or row",
                               choices=("sentence", "row"))


PRECISIONS = ("auto", "no", "bf16")  # training's mixed_precision (devices.mixed_precision resolves auto)


@dataclass
class TrainSettings:
    epochs: int = opt(3, "passes over the training data", min=1)
    lr: float = opt(5e-5, "peak learning rate (AdamW, linear warm-up then linear decay)", gt=0)
    batch_size: int = opt(32, "examples per step", min=1)
    max_length: int = opt(128, "longer inputs are truncated to this many tokens (with a warning count)", min=4)
    max_train_samples: typing.Optional[int] = opt(None, "train on a seeded random subset of this size", min=1)
    seed: int = opt(42, "seed for initialisation, data order and dropout")
    warmup_ratio: float = opt(0.06, "fraction of steps spent warming the learning rate up", min=0, lt=1)
    weight_decay: float = opt(0.01, "AdamW weight decay (not applied to biases and norms)", min=0)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables)", min=0)
    eval_every: int = opt(0, "evaluate every N steps as well as after each epoch (0: epochs only)", min=0)
    checkpoint_every: int = opt(100, "on the CPU, write a resumable checkpoint every N steps", min=1)
    checkpoint_minutes: float = opt(10.0, "on a GPU, write a resumable checkpoint every N minutes (and at epoch ends)",
                                    gt=0)
    log_every: int = opt(10, "steps per metrics.jsonl row (the mean loss over them)", min=1)
    mixed_precision: str = opt("auto", "bf16 autocast (fp32 weights and optimizer) or no; auto: bf16 on a GPU and on "
                               "a CPU with bf16 instructions (AVX512-BF16, AMX), where it trained 1.4-1.8x faster "
                               "per step than fp32", choices=PRECISIONS, keyed_if_set=True)


@dataclass
class TeacherSettings(TrainSettings):
    model: str = opt("sentence-transformers/all-mpnet-base-v2", "teacher model: local folder, packaged id, or hub id")
    lr: float = opt(2e-5, "peak learning rate", gt=0)


@dataclass
class BaselineSettings(TrainSettings):
    """The student fine-tuned without distillation, so the report shows what KD added."""

    enabled: bool = opt(True, "train the no-KD baseline")


@dataclass
class KDSettings(TrainSettings):
    """The distillation losses, shared by every stage that trains against the teacher."""

    temperature: float = opt(2.0, "softmax temperature for the soft-label KL (loss scaled by T^2)", gt=0)
    alpha: float = opt(0.5, "weight of the soft-label KD term; 1-alpha weights cross-entropy", min=0, max=1)
    hidden_weight: float = opt(0.0, "weight of the hidden-state MSE (through a learned projection)", min=0)
    attention_weight: float = opt(0.0, "weight of the attention-map KL (needs equal head counts)", min=0)
    layer_map: typing.Optional[list] = opt(None,
                                           "teacher layer (1-based) for each student layer; default evenly spaced")
    loss_weights: str = opt("fixed",
                            "task vs KD balance: fixed (alpha) or gor (two learned scalars, arXiv 2509.20854)",
                            choices=("fixed", "gor"))
    teacher_logits: str = opt("torch", "how the cached teacher logits are computed (logit-only KD): torch (the fp32 "
                              "teacher) or onnx-int8 (its dynamic-int8 ONNX file: 3-4x faster on a CPU)",
                              choices=("torch", "onnx-int8"))
    extra_teachers: list = opt([], "more teachers (EKD): model folders with the data's classes, any architecture and "
                               "tokenizer (a teacher, baseline or distilled output); in a recipe also a stage of the "
                               "run by name (baseline). Logits only, cached like the teacher's; hidden-state and "
                               "attention KD stay with the main teacher", folders=True, keyed_if_set=True,
                               metavar="DIR")
    teacher_combine: str = opt("average", "with extra_teachers: average (one KD term on the mean of the teachers' "
                               "softened distributions) or per-teacher (a KD term each; loss_weights gor learns a "
                               "weight per teacher, fixed shares alpha equally)",
                               choices=("average", "per-teacher"), keyed_if_set=True)

    def __post_init__(self):
        names = self.extra_teachers
        if not all(isinstance(n, str) and n.strip() for n in names):
            raise DpqError(f"extra_teachers: a list of model folders (or, in a recipe, stage names), got {names!r}")
        if len(set(names)) != len(names):
            raise DpqError(f"extra_teachers: {names} names one teacher twice")


@dataclass
class DistillSettings(KDSettings):
    student: str = opt("sentence-transformers/all-MiniLM-L6-v2", "student model: local folder, packaged id, or hub id")
    lr: float = opt(1e-4, "peak learning rate", gt=0)


@dataclass
class PruneSettings(KDSettings):
    """Gradual structured pruning of the distilled student with KD from the teacher, then real removal."""

    enabled: bool = opt(True, "run the pruning stage")
    heads: float = opt(0.4, "fraction of attention heads to remove", min=0, lt=1)
    ffn: float = opt(0.5, "fraction of FFN neurons to remove", min=0, lt=1)
    target_params: typing.Optional[float] = opt(None, "remove this fraction of all parameters instead "
                                                "(heads and FFN alike)", gt=0, lt=1)
    importance: str = opt("combined",
                          "magnitude | kd-gradient | combined (lambda_mag·magnitude + lambda_grad·|W·dL/dW|)",
                          choices=("magnitude", "kd-gradient", "combined"))
    allocation: str = opt("uniform", "uniform (same fraction per layer) | layer-adaptive (one global ranking)",
                          choices=("uniform", "layer-adaptive"))
    schedule: str = opt("cubic", "sparsity schedule between prune_start and prune_end", choices=("cubic",))
    lambda_mag: float = opt(0.5, "weight of the normalised magnitude score", min=0)
    lambda_grad: float = opt(0.5, "weight of the normalised KD-gradient score", min=0)
    prune_start: float = opt(0.0, "fraction of training steps before masking starts", min=0, max=1)
    prune_end: float = opt(0.5, "fraction of training steps at which the target is reached; recovery follows",
                           min=0, max=1)
    update_every: int = opt(10, "steps between mask updates (the importance window)", min=1)
    lr: float = opt(5e-5, "peak learning rate", gt=0)
    epochs: int = opt(2, "passes over the training data (pruning, then recovery)", min=1)


@dataclass
class QuantizeSettings(KDSettings):
    """4/8-bit weights of the pruned (or distilled) student: PTQ (rtn, gptq) and QAT with KD (the KD settings)."""

    enabled: bool = opt(True, "run the quantization stages")
    methods: list = opt(["gptq", "qat"],
                        "recipe only: one quantize stage per method (rtn | gptq | qat | any registered)")
    unpruned_methods: list = opt(["gptq"], "recipe only: also quantize the distilled student, unpruned, with these "
                                 "methods: the report's rows that show what pruning buys and costs")
    bits: int = opt(4, "weight bit width (4 or 8)", choices=(4, 8))
    group_size: int = opt(32, "weights per scale (consecutive input columns of one output row)",
                          choices=(16, 32, 64, 128))
    symmetric: bool = opt(True, "symmetric grid (zero point fixed); --no-symmetric stores a zero point per group "
                                "(PTQ only)")
    embeddings: typing.Optional[str] = opt(None, "embedding tables: 4 | 8 | none (default: the weights' bit width)",
                                           choices=(None, "4", "8", "none"))
    embedding_group_size: typing.Optional[int] = opt(None, "group size for the embedding tables (default: group_size)",
                                                      choices=(None, 16, 32, 64, 128))
    trim_vocab: bool = opt(False, "keep only the embedding rows of tokens the training data uses "
                                  "(others read as [UNK])")
    trim_keep_first: int = opt(0, "with trim_vocab: also keep the first N token ids (the frequent words of "
                                  "frequency-ordered vocabularies such as BERT's)", min=0)
    calibration_samples: int = opt(128, "training examples fed through the model to calibrate GPTQ", min=1)
    ensemble: bool = opt(False, "QAT: distil from the teacher and the fp32 model together (EKD)")
    act_bits: typing.Optional[int] = opt(None, "QAT: fake-quantize linear-layer inputs to this many bits (8)",
                                         choices=(None, 8))
    lr: float = opt(5e-5, "QAT peak learning rate", gt=0)
    epochs: int = opt(1, "QAT passes over the training data", min=1)

    def __post_init__(self):
        from .quant import methods

        super().__post_init__()
        _check_list("quantize.methods", self.methods, methods.choices())
        _check_list("quantize.unpruned_methods", self.unpruned_methods, methods.choices())

    def embedding_bits(self) -> int | None:
        if self.embeddings is None:
            return self.bits
        return None if self.embeddings == "none" else int(self.embeddings)


@dataclass
class ExportSettings:
    enabled: bool = opt(True, "run the export stages")
    precisions: list = opt(["fp32", "int8", "int4"],
                           "recipe only: fp32 and int8 export the fp32 model, int4 each quantized one")
    int4_kernels: str = opt("auto", "int4: nbits = MatMulNBits, int8 = the 4-bit codes expanded to int8 kernels when "
                            "the session loads (same file size), auto = time both on this CPU and keep the faster",
                            choices=("auto", "nbits", "int8"))
    accuracy_level: str = opt("auto", "int4 MatMulNBits: 4 = int8 activations, 0 = fp32 dequantize path, "
                              "auto = time both on this CPU and keep the faster",
                              choices=("auto", "0", "1", "2", "3", "4"))
    int8_embeddings: bool = opt(True, "int8: quantize the embedding tables too (uint8, per tensor; most of the file)")
    int8_weights: str = opt("auto", "int8: s8 (U8S8, reduce_range) | u8 (U8U8) | auto (chosen for this CPU)",
                            choices=("auto", "s8", "u8"))

    unpruned_precisions: list = opt(["int8"], "recipe only: fp32/int8 files of the distilled student too "
                                    "(unpruned; its int4 file comes from quantize.unpruned_methods)")

    def __post_init__(self):
        _check_list("export.precisions", self.precisions, ("fp32", "int8", "int4"))
        _check_list("export.unpruned_precisions", self.unpruned_precisions, ("fp32", "int8"))


@dataclass
class TargetSettings:
    """What a model must meet to be shipped: the report names the most accurate one that does, or says by how much
    the closest misses. Speed-ups are against the fp32 teacher, on the evaluation's CPU threads; unset: no bound."""

    max_size_mb: typing.Optional[float] = opt(None, "largest on-disk size (MB)", gt=0)
    min_speedup_bs1: typing.Optional[float] = opt(None, "at least this many times faster than the teacher at "
                                                  "batch 1", gt=0)
    min_speedup_bs32: typing.Optional[float] = opt(None, "at least this many times faster than the teacher at "
                                                   "batch 32", gt=0)
    min_accuracy: typing.Optional[float] = opt(None, "lowest accuracy on the evaluation split", min=0, max=1)

    def bounds(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass
class EvaluateSettings:
    split: str = opt("dev", "split to measure accuracy on")
    latency_repeats: int = opt(5, "timed runs per model per round (median of all rounds reported)", min=1)
    latency_rounds: int = opt(5, "rounds over all models, interleaved so machine load hits them alike", min=1)
    warmup: int = opt(3, "untimed runs before timing", min=0)
    batch_sizes: list = opt([1, 32], "batch sizes to time")

    def __post_init__(self):
        from .data import SPLIT_NAMES, canonical_split

        if canonical_split(self.split) is None:
            names = [n for aliases in SPLIT_NAMES.values() for n in aliases]
            raise DpqError(f"evaluate.split: {self.split!r} is not a split dpq reads (one of {', '.join(names)})"
                           f"{_did_you_mean(str(self.split), names)}")
        if not self.batch_sizes or not all(type(b) is int and b >= 1 for b in self.batch_sizes):
            raise DpqError(f"evaluate.batch_sizes: a list of integers >= 1 (got {self.batch_sizes!r})")
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise DpqError(f"evaluate.batch_sizes: {self.batch_sizes} names one size twice")


STAGES = {"teacher": TeacherSettings, "baseline": BaselineSettings, "distill": DistillSettings, "prune": PruneSettings,
          "quantize": QuantizeSettings, "export": ExportSettings, "evaluate": EvaluateSettings}


@dataclass
class Recipe:
    name: str = "run"
    device: str = "auto"  # auto | cpu | cuda; --device overrides it
    data: DataSettings = field(default_factory=DataSettings)
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    baseline: BaselineSettings = field(default_factory=BaselineSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    prune: PruneSettings = field(default_factory=PruneSettings)
    quantize: QuantizeSettings = field(default_factory=QuantizeSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    target: TargetSettings = field(default_factory=TargetSettings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- validation


def _did_you_mean(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if value is None:
        raise DpqError(f"{where}: must not be empty")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise DpqError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (
                isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit())):
            raise DpqError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise DpqError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)  # YAML reads 2e-5 as a string
        except (TypeError, ValueError):
            raise DpqError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise DpqError(f"{where}: expected text, got {value!r}")
        return str(value)
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise DpqError(f"{where}: expected a list, got {value!r}")
        return value
    return value


def _check_bounds(obj, where: str) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        m = f.metadata
        name = f"{where}.{f.name}"
        if "choices" in m and v not in m["choices"]:
            shown = [str(c) for c in m["choices"] if c is not None]
            raise DpqError(f"{name}: one of {', '.join(shown)} (got {v!r}){_did_you_mean(str(v), shown)}")
        if v is None or isinstance(v, (bool, list, str)):
            continue
        if "min" in m and v < m["min"]:
            raise DpqError(f"{name}: must be >= {m['min']} (got {v})")
        if "max" in m and v > m["max"]:
            raise DpqError(f"{name}: must be <= {m['max']} (got {v})")
        if "gt" in m and not v > m["gt"]:
            raise DpqError(f"{name}: must be > {m['gt']} (got {v})")
        if "lt" in m and not v < m["lt"]:
            raise DpqError(f"{name}: must be < {m['lt']} (got {v})")


def build(cls, values: dict, where: str):
    """Dataclass ``cls`` from ``values``; unknown keys, wrong types and out-of-range values are DpqErrors."""
    if not isinstance(values, dict):
        raise DpqError(f"{where}: expected a mapping of settings, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise DpqError(f"{where}: unknown setting '{key}'{_did_you_mean(key, names)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    obj = cls(**kwargs)
    _check_bounds(obj, where)
    return obj


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_recipe(path: str | os.PathLike, profile: str | None = None, overrides: dict | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise DpqError(f"{path}: recipe not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise DpqError(f"{path}: not valid YAML{at}") from None
    except UnicodeDecodeError:
        raise DpqError(f"{path}: not UTF-8 text") from None
    if not isinstance(raw, dict):
        raise DpqError(f"{path}: a recipe is a mapping of sections (data, teacher, distill, …)")
    profiles = raw.pop("profiles", {}) or {}
    if profile is not None:
        if profile not in profiles:
            raise DpqError(f"{path}: no profile '{profile}' (has: {', '.join(profiles) or 'none'})")
        raw = _merge(raw, profiles[profile] or {})
    raw = _merge(raw, overrides or {})
    if isinstance(raw.get("data"), str):
        raw["data"] = {"path": raw["data"]}
    sections = {f.name for f in dataclasses.fields(Recipe)}
    for key in raw:
        if key not in sections:
            raise DpqError(f"{path}: unknown section '{key}'{_did_you_mean(key, sections | {'profiles'})}")
    device = raw.get("device", "auto")
    if device not in ("auto", "cpu", "cuda"):
        raise DpqError(f"{path}: device: must be auto, cpu or cuda (got {device!r})")
    recipe = Recipe(name=str(raw.get("name", path.stem)), device=device)
    recipe.data = build(DataSettings, raw.get("data", {}) or {}, "data")
    for name, cls in STAGES.items():
        setattr(recipe, name, build(cls, raw.get(name, {}) or {}, name))
    recipe.target = build(TargetSettings, raw.get("target", {}) or {}, "target")
    check_recipe(recipe)
    return recipe


def check_recipe(r: Recipe) -> None:
    """Mistakes that involve more than one setting: found when the recipe loads, not after hours of training."""
    q, e, p = r.quantize, r.export, r.prune
    qat = q.enabled and "qat" in q.methods + (q.unpruned_methods if p.enabled else [])
    if qat and not q.symmetric:
        raise DpqError("quantize.symmetric: QAT learns symmetric step sizes (LSQ); set symmetric: true "
                       "or drop qat from quantize.methods")
    if qat and q.ensemble and (q.hidden_weight > 0 or q.attention_weight > 0):
        raise DpqError("quantize.ensemble: ensemble distillation uses logits only; "
                       "set quantize.hidden_weight and quantize.attention_weight to 0")
    if e.enabled and "int4" in e.precisions:
        # int4 files store the quantize stages' 4-bit codes: without them the pipeline would export nothing
        if not q.enabled or not q.methods:
            raise DpqError("export.precisions: int4 exports the quantize stages' 4-bit models, but no quantize "
                           "stage runs (enable quantize or drop int4)")
        if q.bits != 4:
            raise DpqError(f"export.precisions: int4 needs quantize.bits: 4 (got {q.bits}); drop int4 or quantize "
                           "to 4 bits")
    for k in r.target.bounds():
        if k.startswith("min_speedup_bs") and int(k.removeprefix("min_speedup_bs")) not in r.evaluate.batch_sizes:
            raise DpqError(f"target.{k}: batch {k.removeprefix('min_speedup_bs')} is not timed "
                           f"(evaluate.batch_sizes: {r.evaluate.batch_sizes})")
    if p.enabled and p.prune_start > p.prune_end:
        raise DpqError(f"prune.prune_start ({p.prune_start}) must not be after prune.prune_end ({p.prune_end})")


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
