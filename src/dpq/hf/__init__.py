"""dpq folders in the Hugging Face ecosystem: the config a transformed model is saved with, and its classes.

A model that a dpq transform changed (pruned, vocabulary-trimmed, packed) is saved with ``model_type``
``dpq-<base>``, an ``auto_map`` and a copy of ``modeling_dpq.py``: ``from_pretrained`` and ``pipeline`` load it
through the classes ``import dpq`` registers, or with ``trust_remote_code=True`` where dpq is not installed.
Inside dpq the same model is handled at its base type (``bert``, ``mpnet``, …), so pruning, quantization, export and
measurement see the architecture they know; ``base_config`` turns one config into the other.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from . import modeling_dpq

CODE_FILE = Path(modeling_dpq.__file__).name
log = logging.getLogger("dpq")


def register() -> None:
    """Register the classes with transformers' Auto classes (idempotent; importing this package does it)."""
    modeling_dpq.register()


register()


def is_transformed(config) -> bool:
    from .. import transforms

    return bool(transforms.applied(config))


def save_config(config, folder: Path) -> None:
    """Write ``config.json`` (and, for a transformed model, ``modeling_dpq.py``) into ``folder``.

    ``config`` is a base-type config carrying dpq's transform records; an untransformed model is saved as it is,
    an ordinary folder of its own architecture.
    """
    folder = Path(folder)
    if not is_transformed(config):
        config.save_pretrained(folder)
        return
    base = modeling_dpq.base_type(config)
    try:
        config_cls, model_cls = modeling_dpq.classes(base)
    except modeling_dpq.UnsupportedArchitecture as e:  # the model is fine; only the Hugging Face classes are missing
        log.warning("%s: saved for dpq.load only, not from_pretrained (%s)", folder, e)
        config.save_pretrained(folder)
        return
    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "auto_map", "architectures")}
    out = config_cls.from_dict(fields)
    out.architectures = [model_cls.__name__]
    out.auto_map = modeling_dpq.auto_map(base)
    out.save_pretrained(folder)
    shutil.copyfile(modeling_dpq.__file__, folder / CODE_FILE)


def base_config(config):
    """The base architecture's config of a ``dpq-<base>`` config (the same fields and records); others as they are."""
    if not config.model_type.startswith(modeling_dpq.PREFIX):
        return config
    from transformers import AutoConfig

    base = modeling_dpq.base_type(config)
    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "auto_map", "architectures")}
    out = AutoConfig.for_model(base, **fields)
    out.architectures = [modeling_dpq.base_names(base)[1]]
    return out
