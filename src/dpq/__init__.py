"""dpq — Distill, Prune, Quantize transformer text classifiers."""

from . import _autoregister

__version__ = "0.1.0"

_autoregister.install()  # so AutoModelForSequenceClassification and pipeline load dpq's pruned and 4-bit folders


def load_model(path):
    """Load a dpq model folder (checksums verified) as ``(model, tokenizer)`` in eval mode."""
    from .models import load_model as _load

    return _load(path)


def load(path):
    """A model folder (PyTorch, packed 4-bit or ONNX export) with ``.predict(list_of_texts)``."""
    from .predict import load as _load

    return _load(path)


__all__ = ["load", "load_model", "__version__"]
