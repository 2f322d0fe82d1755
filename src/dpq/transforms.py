"""What a transform did to a model, recorded in its config, and how to build that model again.

A transform that changes a model's shapes or the form of its weights (structured pruning, vocabulary trimming,
packed quantization) registers a ``Rebuild``: the config key holding its record, a version, ``shape(model)`` that
gives a freshly built model of the original architecture the recorded shapes, and, for weights that are not a plain
``model.safetensors``, ``weights(folder, config)`` that reads them. ``models`` builds and loads any folder through
this table without knowing one transform. Applying a transform also lists it in ``config.dpq_transforms`` as
``{"name", "version"}``, so a folder made by a newer dpq (or a plugin not installed here) is refused in one line
instead of loading wrong.

Which code rebuilds a record is dpq's to say, never the folder's: a record names a transform, and only dpq's
built-ins (``BUILTIN``) and installed packages that declare one under the entry-point group ``dpq.transforms`` are
imported for it. The ``module`` a record also carries (written for older dpq versions) is never imported, so a
downloaded folder cannot make dpq run a ``payload.py`` beside it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
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
    module: str = ""  # where it registers; written into records for older dpq versions, never read back


_TABLE: dict[str, Rebuild] = {}
ENTRY_POINTS = "dpq.transforms"  # a plugin's transform: ``NAME = "package.module"`` (or a ``Rebuild`` object)
# dpq's own transforms and the module that registers each (imported on demand: loading a plain model stays light)
BUILTIN = {"prune": "dpq.prune", "vocab": "dpq.quant.vocab", "quant-packed": "dpq.quant.packed"}
# folders written before records existed: which transform each config key stands for
_LEGACY = {"dpq_kept_heads": "prune", "dpq_vocab_original": "vocab", "dpq_quant": "quant-packed"}


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
        if not isinstance(recs, list):
            raise DpqError(f"config.json's dpq_transforms is a {type(recs).__name__}, not a list of transform records")
        return recs
    return [{"name": n, "version": 1} for k, n in _LEGACY.items() if getattr(config, k, None)]


def _plugin(name: str):
    """The installed entry point that declares transform ``name``, if any (none is loaded but the one asked for)."""
    found = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINTS) if ep.name == name]
    return found[0] if found else None


def _registered(name) -> Rebuild | None:
    """Transform ``name`` from the table, importing dpq's built-in module or the installed plugin that declares it;
    nothing a config.json names is imported."""
    if not isinstance(name, str):
        return None
    if name not in _TABLE and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _TABLE and (ep := _plugin(name)) is not None:
        try:
            loaded = ep.load()
        except Exception as e:  # the plugin is the user's own install: say whose import failed, in one line
            raise DpqError(f"transform {name!r}: its plugin {ep.value} does not import "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
        if isinstance(loaded, Rebuild) and loaded.name not in _TABLE:
            register(loaded)
    return _TABLE.get(name)


def applied(config) -> list[Rebuild]:
    """The transforms ``config`` records, in the order they were applied. Refuses a record this dpq cannot rebuild,
    by name, importing nothing for it."""
    out = []
    for rec in _records(config):
        if not isinstance(rec, dict) or not isinstance(rec.get("version", 1), int):
            raise DpqError(f"config.json's dpq_transforms holds {str(rec)[:80]!r}, not a transform record "
                           "({\"name\": ..., \"version\": N})")
        name = rec.get("name")
        known = _registered(name)
        if known is None:
            raise DpqError(f"config.json records transform {name!r}, which this dpq does not know: not one of dpq's "
                           f"({', '.join(BUILTIN)}) and no installed package declares it (entry points "
                           f"{ENTRY_POINTS}); nothing was imported for it")
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
