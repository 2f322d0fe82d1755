"""ONNX export of a (possibly pruned) classifier, and timing it in ONNX Runtime.

The graph takes ``input_ids`` and ``attention_mask`` with dynamic batch and sequence axes, so one file
serves batch 1 and batch 32; pruned layers simply export with their smaller shapes.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import DpqError
from .extras import require

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


def ort_session(path: Path, threads: int | None = None, disabled_optimizers: list[str] | tuple[str, ...] = ()):
    """All graph optimizations but ``disabled_optimizers`` (an export records the ones it measured to be slower
    here in ``export.json``: ``ort_disabled_optimizers``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    extra = {"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"], **extra)


def ort_logits(session, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
    return session.run(["logits"], {"input_ids": input_ids.numpy().astype(np.int64),
                                    "attention_mask": attention_mask.numpy().astype(np.int64)})[0]


def ort_predict_logits(session, ds, pad_ids: dict[str, int], batch_size: int = 64) -> torch.Tensor:
    """Logits of every example of ``ds`` from an ONNX Runtime session, in dataset order."""
    from .measure import collect_logits

    return collect_logits(lambda ids, mask: ort_logits(session, ids, mask), ds, pad_ids, batch_size)


def is_onnx_folder(folder: Path) -> bool:
    return (Path(folder) / "model.onnx").is_file() and (Path(folder) / "export.json").is_file()


def load_onnx_folder(folder: Path, threads: int | None = None):
    """(session, config, tokenizer, export info) of an exported folder; checksums verified when it has a manifest."""
    import json

    from transformers import AutoConfig

    from . import artifacts, models

    folder = Path(folder)
    require("onnx", f"{folder}: running an ONNX export")
    if artifacts.is_complete(folder):
        artifacts.verify(folder, ["model.onnx"])
    info = json.loads((folder / "export.json").read_text())
    config = AutoConfig.from_pretrained(folder)
    tokenizer = models.load_tokenizer(str(folder))
    try:
        session = ort_session(folder / "model.onnx", threads=threads,
                              disabled_optimizers=info.get("ort_disabled_optimizers", ()))
    except Exception as e:  # ORT raises its own types for a corrupt or foreign graph
        raise DpqError(f"{folder / 'model.onnx'}: ONNX Runtime cannot load it "
                       f"({str(e).splitlines()[0][:160]})") from None
    return session, config, tokenizer, info
