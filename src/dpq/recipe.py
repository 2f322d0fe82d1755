"""Recipes: one YAML file with a section per stage, profiles that override it, and strict validation.

Every setting is a dataclass field with a default and a help text; the CLI builds its flags from the
same fields, so a recipe key and a command-line flag can never drift apart.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import DpqError

# Upper bounds: far beyond any real run, yet small enough that a typo (an extra digit or ten) is refused when the
# recipe loads rather than overflowing, allocating terabytes or planning a run of centuries hours into training.
MAX_EPOCHS = 1000
MAX_BATCH = 65_536
MAX_TOKENS = 8192  # max_length: the longest position tables of common encoders (ModernBERT, NomicBERT)
MAX_EXAMPLES = 10**9  # sample counts
MAX_STEPS = 10**9  # every-N-steps settings
MAX_SEED = 2**32 - 1  # numpy's seeds are 0..2**32-1 (torch takes more, but one seed must mean one thing in both)
MAX_REPEATS = 1000  # latency repeats, rounds, warm-up runs
MAX_VOCAB = 10**7
MAX_LAYERS = 1000


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
    validation_max_samples: int = opt(2000, "at most this many held-out examples", min=1, max=MAX_EXAMPLES)
    validation_seed: int = opt(0, "seed of the held-out draw (fixed across stages and runs)", min=0, max=MAX_SEED)
    validation_unit: str = opt("sentence", "what is held out: sentence (rows no other row contains, each with every "
                               "row that is a word span of it, so no phrase of a held-out sentence trains) or row",
                               choices=("sentence", "row"))

    def __post_init__(self):
        labels = self.labels
        if labels is None:
            return
        if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in labels):
            raise DpqError(f"data.labels: class names are text or integers, got {_short(labels)}")
        if len({str(v) for v in labels}) != len(labels):
            raise DpqError(f"data.labels: {_short(labels)} names one class twice")


PRECISIONS = ("auto", "no", "bf16")  # training's mixed_precision (devices.mixed_precision resolves auto)


@dataclass
class TrainSettings:
    epochs: int = opt(3, "passes over the training data", min=1, max=MAX_EPOCHS)
    lr: float = opt(5e-5, "peak learning rate (AdamW, linear warm-up then linear decay)", gt=0, max=1)
    batch_size: int = opt(32, "examples per step", min=1, max=MAX_BATCH)
    max_length: int = opt(128, "longer inputs are truncated to this many tokens (with a warning count)", min=4,
                          max=MAX_TOKENS)
    max_train_samples: typing.Optional[int] = opt(None, "train on a seeded random subset of this size", min=1,
                                                  max=MAX_EXAMPLES)
    seed: int = opt(42, "seed for initialisation, data order and dropout", min=0, max=MAX_SEED)
    warmup_ratio: float = opt(0.06, "fraction of steps spent warming the learning rate up", min=0, lt=1)
    weight_decay: float = opt(0.01, "AdamW weight decay (not applied to biases and norms)", min=0)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables)", min=0)
    eval_every: int = opt(0, "evaluate every N steps as well as after each epoch (0: epochs only)", min=0,
                          max=MAX_STEPS)
    checkpoint_every: int = opt(100, "on the CPU, write a resumable checkpoint every N steps", min=1, max=MAX_STEPS)
    checkpoint_minutes: float = opt(10.0, "on a GPU, write a resumable checkpoint every N minutes (and at epoch ends)",
                                    gt=0, max=7 * 24 * 60)
    log_every: int = opt(10, "steps per metrics.jsonl row (the mean loss over them)", min=1, max=MAX_STEPS)
    mixed_precision: str = opt("auto", "bf16 autocast (fp32 weights and optimizer) or no; auto: bf16 on a GPU and on "
                               "a CPU with bf16 instructions (AVX512-BF16, AMX), where it trained 1.4-1.8x faster "
                               "per step than fp32", choices=PRECISIONS, keyed_if_set=True)


@dataclass
class TeacherSettings(TrainSettings):
    model: str = opt("sentence-transformers/all-mpnet-base-v2", "teacher model: local folder, packaged id, or hub id")
    lr: float = opt(2e-5, "peak learning rate", gt=0, max=1)


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
        lm = self.layer_map
        if lm is not None and not (lm and all(type(j) is int and 1 <= j <= MAX_LAYERS for j in lm)):
            raise DpqError(f"layer_map: a list of teacher layers, integers 1 to {MAX_LAYERS} (got {_short(lm)})")
        names = self.extra_teachers
        if not all(isinstance(n, str) and n.strip() for n in names):
            raise DpqError(f"extra_teachers: a list of model folders (or, in a recipe, stage names), got {names!r}")
        if len(set(names)) != len(names):
            raise DpqError(f"extra_teachers: {names} names one teacher twice")


@dataclass
class DistillSettings(KDSettings):
    student: str = opt("sentence-transformers/all-MiniLM-L6-v2", "student model: local folder, packaged id, or hub id")
    lr: float = opt(1e-4, "peak learning rate", gt=0, max=1)


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
    update_every: int = opt(10, "steps between mask updates (the importance window)", min=1, max=MAX_STEPS)
    lr: float = opt(5e-5, "peak learning rate", gt=0, max=1)
    epochs: int = opt(2, "passes over the training data (pruning, then recovery)", min=1, max=MAX_EPOCHS)


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
                                  "frequency-ordered vocabularies such as BERT's)", min=0, max=MAX_VOCAB)
    calibration_samples: int = opt(128, "training examples fed through the model to calibrate GPTQ", min=1,
                                   max=MAX_EXAMPLES)
    ensemble: bool = opt(False, "QAT: distil from the teacher and the fp32 model together (EKD)")
    act_bits: typing.Optional[int] = opt(None, "QAT: fake-quantize linear-layer inputs to this many bits (8)",
                                         choices=(None, 8))
    lr: float = opt(5e-5, "QAT peak learning rate", gt=0, max=1)
    epochs: int = opt(1, "QAT passes over the training data", min=1, max=MAX_EPOCHS)

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
    latency_repeats: int = opt(5, "timed runs per model per round (median of all rounds reported)", min=1,
                               max=MAX_REPEATS)
    latency_rounds: int = opt(5, "rounds over all models, interleaved so machine load hits them alike", min=1,
                              max=MAX_REPEATS)
    warmup: int = opt(3, "untimed runs before timing", min=0, max=MAX_REPEATS)
    batch_sizes: list = opt([1, 32], "batch sizes to time")

    def __post_init__(self):
        from .data import SPLIT_NAMES, canonical_split

        if canonical_split(self.split) is None:
            names = [n for aliases in SPLIT_NAMES.values() for n in aliases]
            raise DpqError(f"evaluate.split: {self.split!r} is not a split dpq reads (one of {', '.join(names)})"
                           f"{_did_you_mean(str(self.split), names)}")
        if not self.batch_sizes or not all(type(b) is int and 1 <= b <= MAX_BATCH for b in self.batch_sizes):
            raise DpqError(f"evaluate.batch_sizes: a list of integers >= 1 and <= {MAX_BATCH} "
                           f"(got {_short(self.batch_sizes)})")
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


def _short(value, limit: int = 80) -> str:
    """``repr(value)`` cut to one short line: a message quotes what it refuses, not the whole file."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


INTEGER = re.compile(r"[+-]?[0-9]{1,30}")  # ASCII digits only: int() also reads "١٢" and would pass "²" to fail


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
                isinstance(value, int) or (isinstance(value, str) and INTEGER.fullmatch(value.strip()))):
            raise DpqError(f"{where}: expected an integer, got {_short(value)}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise DpqError(f"{where}: expected a number, got {_short(value)}")
        try:
            number = float(value)  # YAML reads 2e-5 as a string
        except (ValueError, OverflowError):
            raise DpqError(f"{where}: expected a number, got {_short(value)}") from None
        if not math.isfinite(number):  # NaN passes every bound (its comparisons are all false): refuse it here
            raise DpqError(f"{where}: expected a finite number, got {_short(value)}")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise DpqError(f"{where}: expected text, got {_short(value)}")
        return str(value)
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise DpqError(f"{where}: expected a list, got {_short(value)}")
        return value
    return value


def _check_bounds(obj, where: str) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        m = f.metadata
        name = f"{where}.{f.name}"
        if "choices" in m and v not in m["choices"]:
            shown = [str(c) for c in m["choices"] if c is not None]
            raise DpqError(f"{name}: one of {', '.join(shown)} (got {_short(v)}){_did_you_mean(str(v), shown)}")
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
        raise DpqError(f"{where}: expected a mapping of settings, got {_short(values)}")
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


MAX_RECIPE_BYTES = 256 << 10  # a recipe is a page or two of settings (the shipped ones: 1-5 KB)
MAX_YAML_NODES = 100_000  # values after aliases are expanded: a 1 KB "billion laughs" file expands to 10^9
MAX_YAML_DEPTH = 32
MERGE_TAG = "tag:yaml.org,2002:merge"


def _expanded(node, depth: int, seen: dict, open_: set) -> tuple[int, int]:
    """(values, depth) of ``node`` with every alias expanded, counted on the node graph (each node once) so a file
    whose expansion is huge is measured without building it; a DpqError once a limit is passed."""
    at = f"line {node.start_mark.line + 1}"
    if id(node) in open_:
        raise DpqError(f"{at}: an alias refers to the value that contains it")
    if id(node) in seen:
        count, height = seen[id(node)]
    else:
        if depth > MAX_YAML_DEPTH:
            raise DpqError(f"{at}: nested deeper than {MAX_YAML_DEPTH} levels")
        open_.add(id(node))
        count, height = 1, 0
        children = []
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if not (isinstance(key, yaml.ScalarNode) and key.tag in ("tag:yaml.org,2002:str", MERGE_TAG)):
                    shown = _short(key.value) if isinstance(key, yaml.ScalarNode) else \
                        "a " + type(key).__name__.removesuffix("Node").lower()
                    raise DpqError(f"line {key.start_mark.line + 1}: {shown} is not a name "
                                   "(keys are section and setting names: text)")
                children.append(value)
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        for child in children:
            c, h = _expanded(child, depth + 1, seen, open_)
            count, height = count + c, max(height, h + 1)
            if count > MAX_YAML_NODES:
                raise DpqError(f"{at}: holds more than {MAX_YAML_NODES} values once its YAML aliases are expanded; "
                               "a recipe is a page of settings")
        open_.discard(id(node))
        seen[id(node)] = count, height
    if depth + height > MAX_YAML_DEPTH:
        raise DpqError(f"{at}: nested deeper than {MAX_YAML_DEPTH} levels")
    return count, height


class _BoundedLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser when built with it
    """PyYAML's safe loader, measuring the document before building it: aliases share one object per anchor, and
    ``str()``, ``repr()``, ``asdict`` and the settings hash would each expand a small file into gigabytes."""

    def construct_document(self, node):
        _expanded(node, 0, {}, set())
        return super().construct_document(node)


def read_yaml(path: Path):
    """A YAML file read within bounds of size, expansion and depth; every problem is one DpqError naming ``path``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise DpqError(f"{path}: {size} bytes; a recipe is at most {MAX_RECIPE_BYTES} bytes")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DpqError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise DpqError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        return yaml.load(text, Loader=_BoundedLoader)
    except DpqError as e:
        raise DpqError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise DpqError(f"{path}: not valid YAML{at}") from None
    except RecursionError:  # nesting the composer itself cannot follow, before any limit of ours is checked
        raise DpqError(f"{path}: nested deeper than {MAX_YAML_DEPTH} levels") from None
    except (ValueError, OverflowError, TypeError) as e:  # a value YAML cannot build, e.g. the date 2024-13-01
        raise DpqError(f"{path}: not valid YAML ({str(e).splitlines()[0][:100] if str(e) else type(e).__name__})") \
            from None


def plain_name(value, where: str) -> str:
    """``value`` if it can name a folder by itself: run folders are made from it, so no path may hide in it."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DpqError(f"{where}: expected a plain name, got {_short(value)}")
    name = str(value)
    bad = ("is empty" if not name.strip() else
           "holds a path separator" if "/" in name or "\\" in name or (os.altsep and os.altsep in name) else
           "starts with a dot (hidden, or a path: . and ..)" if name.startswith(".") else
           "holds a control character" if any(ord(c) < 32 or ord(c) == 127 for c in name) else
           "has spaces at its ends" if name != name.strip() else
           "is longer than 100 characters" if len(name) > 100 else None)
    if bad:
        raise DpqError(f"{where}: {_short(name)} {bad}; give a plain name such as sst2-fast")
    return name


def load_recipe(path: str | os.PathLike, profile: str | None = None, overrides: dict | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise DpqError(f"{path}: recipe not found")
    raw = read_yaml(path)
    if raw is None or raw == {}:  # an empty file would silently plan the whole default chain
        raise DpqError(f"{path}: holds no settings; it would run the whole default chain (write at least its "
                       "data: section)")
    if not isinstance(raw, dict):
        raise DpqError(f"{path}: a recipe is a mapping of sections (data, teacher, distill, …)")
    profiles = raw.pop("profiles", {}) or {}
    if not isinstance(profiles, dict):
        raise DpqError(f"{path}: profiles: a mapping of profile names to sections, got {_short(profiles)}")
    if profile is not None:
        if profile not in profiles:
            raise DpqError(f"{path}: no profile '{profile}' (has: {', '.join(profiles) or 'none'})")
        plain_name(profile, f"{path}: profile")  # it names the run folder too
        chosen = profiles[profile] or {}
        if not isinstance(chosen, dict):
            raise DpqError(f"{path}: profiles.{profile}: expected a mapping of sections, got {_short(chosen)}")
        raw = _merge(raw, chosen)
    raw = _merge(raw, overrides or {})
    if isinstance(raw.get("data"), str):
        raw["data"] = {"path": raw["data"]}
    sections = {f.name for f in dataclasses.fields(Recipe)}
    for key in raw:
        if key not in sections:
            raise DpqError(f"{path}: unknown section '{key}'{_did_you_mean(key, sections | {'profiles'})}")
    device = raw.get("device", "auto")
    if device not in ("auto", "cpu", "cuda"):
        raise DpqError(f"{path}: device: must be auto, cpu or cuda (got {_short(device)})")
    name = plain_name(raw["name"], f"{path}: name") if "name" in raw else \
        plain_name(path.stem, f"{path}: name (from the file name; set name: in the recipe)")
    recipe = Recipe(name=name, device=device)
    try:
        recipe.data = build(DataSettings, raw.get("data", {}) or {}, "data")
        for name, cls in STAGES.items():
            setattr(recipe, name, build(cls, raw.get(name, {}) or {}, name))
        recipe.target = build(TargetSettings, raw.get("target", {}) or {}, "target")
        check_recipe(recipe)
    except DpqError as e:  # which file, as for every other mistake in it
        raise DpqError(f"{path}: {e}") from None
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
