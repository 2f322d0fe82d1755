"""Optional extras (``pip install 'dpq[onnx]'``, ``'dpq[report]'``): what needs one says so in one line."""

from __future__ import annotations

import importlib

from .errors import DpqError

# onnxscript is in the onnx extra for torch's dynamo exporter; dpq exports with the TorchScript one and never imports it
EXTRAS = {"onnx": ("onnx", "onnxruntime"), "report": ("matplotlib",)}


def require(extra: str, what: str) -> None:
    """DpqError naming the extra to install unless every module of ``extra`` imports; ``what`` needs it."""
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            raise DpqError(f"{what} needs {module}, which is not installed: pip install 'dpq[{extra}]'") from None
