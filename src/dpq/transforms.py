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


_TABLE: dict[str, Rebuild] = {}
_loaded = False


def register(rebuild: Rebuild) -> Rebuild:
    if rebuild.name in _TABLE:
        raise ValueError(f"transform {rebuild.name!r} is registered twice")
    _TABLE[rebuild.name] = rebuild
    return rebuild


def _table() -> dict[str, Rebuild]:
    global _loaded
    if not _loaded:
        _loaded = True
        from . import prune  # noqa: F401  (each registers its rebuild on import)
        from .quant import packed, vocab  # noqa: F401
    return _TABLE


def record(config, name: str) -> None:
    """Note on ``config`` that transform ``name`` (at its registered version) was applied."""
    version = _table()[name].version
    done = [r for r in (getattr(config, "dpq_transforms", None) or []) if r.get("name") != name]
    config.dpq_transforms = done + [{"name": name, "version": version}]


def applied(config) -> list[Rebuild]:
    """The registered transforms whose records ``config`` holds; refuses records this dpq cannot rebuild."""
    table = _table()
    for rec in getattr(config, "dpq_transforms", None) or []:
        known = table.get(rec.get("name"))
        if known is None:
            raise DpqError(f"config.json records transform {rec.get('name')!r}, which this dpq does not know "
                           "(made by a newer dpq or a plugin that is not installed)")
        if rec.get("version", 1) > known.version:
            raise DpqError(f"config.json records {known.name} version {rec['version']}; this dpq reads up to "
                           f"version {known.version} (upgrade dpq)")
    return [r for r in table.values() if getattr(config, r.key, None)]


def rebuild_shapes(model):
    for r in applied(model.config):
        if r.shape is not None:
            model = r.shape(model)
    return model


def weights_reader(config) -> Callable[[Path], dict] | None:
    readers = [r.weights for r in applied(config) if r.weights is not None]
    return (lambda folder: readers[0](Path(folder), config)) if readers else None
