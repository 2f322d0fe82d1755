"""``import dpq`` registers dpq's Hugging Face classes without importing transformers itself.

Registering means importing transformers and its modeling code, which the ``dpq`` command does not need for ``--help``,
a dry run or a recipe check: ``dpq --help`` took 1.9-2.1 s as it is and 5.3-7.1 s registering at import (2 shared
cores). So: if transformers is already imported, register now; otherwise register the moment it finishes importing,
by wrapping the loader that imports it. Either way ``import dpq; pipeline(..., model=DIR)`` finds the classes.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

TARGET = "transformers"


def _register() -> None:
    if "dpq.hf" in sys.modules:  # registered by its own import, which may be the one importing transformers now
        return
    try:
        importlib.import_module("dpq.hf")
    except Exception as e:  # an import hook must never break the import it rides on: say why and go on
        warnings.warn(f"dpq could not register its Hugging Face classes ({type(e).__name__}: {e}); load dpq folders "
                      "with trust_remote_code=True or dpq.load(DIR)", stacklevel=2)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _register()

    def __getattr__(self, name):  # resource readers, get_source, …: the real loader's
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        uninstall()  # once: the real finders locate transformers, we only wrap its loader
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


_FINDER = _Finder()


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    if TARGET in sys.modules:
        _register()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
