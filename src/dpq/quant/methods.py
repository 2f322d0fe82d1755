"""Post-training quantization methods, by name.

A method quantizes the linear layers of a model in place and returns the integer codes of each weight:

    from dpq.quant.methods import register

    @register("mine")                      # `dpq quantize --method mine`, recipe `quantize.methods: [mine]`
    def mine(model, linears, cfg, calibration):
        '''linears: {name: nn.Linear} (every Linear but the head); cfg: QuantConfig; calibration: batches or None'''
        ...                                # set each weight to its dequantized value
        return {f"{name}.weight": qtensor for name in linears}

Everything around it is shared: the embedding tables (round-to-nearest on their own grid), fp16 scales, the packed
checkpoint, the int4 ONNX export and the evaluation. ``calibrated=True`` makes the stage collect
``calibration_samples`` training batches for it. QAT is a training stage of its own (``qat.py``), not a method here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import DpqError


@dataclass(frozen=True)
class Method:
    name: str
    quantize: Callable  # (model, linears, cfg, calibration) -> {weight name: QTensor}
    calibrated: bool


_METHODS: dict[str, Method] = {}
TRAINED = ("qat",)  # quantization that trains: its own stage, listed with the methods for the CLI and recipes


def register(name: str, *, calibrated: bool = False):
    def deco(fn):
        if name in _METHODS or name in TRAINED:
            raise ValueError(f"quantization method {name!r} is registered twice")
        _METHODS[name] = Method(name, fn, calibrated)
        return fn
    return deco


_loaded = False


def _builtins() -> None:
    """Methods of installed packages that declare a ``dpq.quant_methods`` entry point (a module that registers on
    import), so the ``dpq`` command sees them too. dpq's own register when ``dpq.quant`` is imported."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="dpq.quant_methods"):
        ep.load()


def get(name: str) -> Method:
    _builtins()
    if name not in _METHODS:
        raise DpqError(f"quantize method must be one of {', '.join(choices())} (got {name!r})")
    return _METHODS[name]


def post_training() -> tuple[str, ...]:
    _builtins()
    return tuple(_METHODS)


def choices() -> tuple[str, ...]:
    return post_training() + TRAINED
