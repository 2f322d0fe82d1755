"""What a transform did to a model, recorded in its config, and how to build that model again.

A transform that changes a model's shapes or the form of its weights (structured pruning, vocabulary trimming,
packed quantization) registers a ``Rebuild``: the config key holding its record, a version, ``shape(model)`` that
gives a freshly built model of the original architecture the recorded shapes, and, for weights that are not a plain
``model.safetensors``, ``weights(folder, config)`` that reads them. ``models`` builds and loads any folder through
this table without knowing one transform. Applying a transform also lists it in ``config.dpq_transforms`` as
``{"name", "version"}``, so a folder made by a newer dpq (or a plugin not installed here) is refused in one line
instead of loading wrong.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import DpqError


@dataclass(frozen=True)
class Rebuild:
    name: str
    version: int
    key: str  # the config attribute that holds the transform's record
    shape: Callable | None = None  # (model) -> model with the recorded shapes
    weights: Callable | None = None  # (folder, config) -> state dict, when not a plain model.safetensors
    module: str = ""  # where it registers: a loader imports it by name when a record asks for it


_TABLE: dict[str, Rebuild] = {}
# folders written before records existed: which module rebuilds each key (names, not imports: loaded on demand)
_LEGACY = {"dpq_kept_heads": ("prune", "dpq.prune"), "dpq_vocab_original": ("vocab", "dpq.quant.vocab"),
           "dpq_quant": ("quant-packed", "dpq.quant.packed")}


def register(rebuild: Rebuild) -> Rebuild:
    if rebuild.name in _TABLE:
        raise ValueError(f"transform {rebuild.name!r} is registered twice")
    _TABLE[rebuild.name] = rebuild
    return rebuild


def record(config, name: str) -> None:
    """Note on ``config`` that transform ``name`` (registered, at its version) was applied."""
    r = _TABLE[name]
    done = [x for x in (getattr(config, "dpq_transforms", None) or []) if x.get("name") != name]
    config.dpq_transforms = done + [{"name": name, "version": r.version, "module": r.module}]


def _records(config) -> list[dict]:
    recs = getattr(config, "dpq_transforms", None)
    if recs is not None:
        return recs
    return [{"name": n, "version": 1, "module": m} for k, (n, m) in _LEGACY.items() if getattr(config, k, None)]


def applied(config) -> list[Rebuild]:
    """The transforms ``config`` records, in the order they were applied; their modules are imported on demand.
    Refuses a record this dpq cannot rebuild."""
    out = []
    for rec in _records(config):
        name = rec.get("name")
        if name not in _TABLE and rec.get("module"):
            try:
                importlib.import_module(rec["module"])
            except ImportError:
                pass
        known = _TABLE.get(name)
        if known is None:
            raise DpqError(f"config.json records transform {name!r}, which this dpq does not know "
                           "(made by a newer dpq or a plugin that is not installed)")
        if rec.get("version", 1) > known.version:
            raise DpqError(f"config.json records {known.name} version {rec['version']}; this dpq reads up to "
                           f"version {known.version} (upgrade dpq)")
        out.append(known)
    return out


def rebuild_shapes(model):
    for r in applied(model.config):
        if r.shape is not None:
            model = r.shape(model)
    return model


def weights_reader(config) -> Callable[[Path], dict] | None:
    readers = [r.weights for r in applied(config) if r.weights is not None]
    return (lambda folder: readers[0](Path(folder), config)) if readers else None
