"""ONNX export of a (possibly pruned) classifier.

The graph takes ``input_ids`` and ``attention_mask`` with dynamic batch and sequence axes, so one file
serves batch 1 and batch 32; pruned layers simply export with their smaller shapes.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from ..errors import DpqError
from ..extras import require

log = logging.getLogger("dpq")


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def export_onnx(model, path: Path, *, opset: int = 17) -> Path:
    """fp32 ONNX with dynamic batch/sequence axes (TorchScript-based exporter: stable graph, no onnxscript needed)."""
    require("onnx", "ONNX export")
    from torch.onnx.errors import OnnxExporterError

    path = Path(path)
    model = model.eval()
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == "sdpa" and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")  # plain matmuls export everywhere and ORT fuses them itself
    ids = torch.randint(5, model.config.vocab_size, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # a padded row: an all-ones example mask lets the tracer drop masking from the graph
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # the wrapper must be in eval mode too: the exporter restores the wrapper's mode onto the model
            torch.onnx.export(_LogitsOnly(model).eval(), (ids, mask), str(path),
                              input_names=["input_ids", "attention_mask"],
                              output_names=["logits"], opset_version=opset, dynamo=False,
                              dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                            "attention_mask": {0: "batch", 1: "seq"},
                                            "logits": {0: "batch"}})
    except OnnxExporterError as e:  # an operator or construct of this architecture the exporter cannot express
        raise DpqError(f"ONNX export failed for {model.config.model_type}: {str(e).splitlines()[0][:200]}") from None
    finally:
        if impl == "sdpa" and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(impl)
    return path
