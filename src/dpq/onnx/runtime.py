"""Running an ONNX file in ONNX Runtime on the CPU: sessions, logits, exported folders, and which optimizer
set and file run fastest here."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..errors import DpqError
from ..extras import require


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
    from ..measure import collect_logits

    return collect_logits(lambda ids, mask: ort_logits(session, ids, mask), ds, pad_ids, batch_size)


def is_onnx_folder(folder: Path) -> bool:
    return (Path(folder) / "model.onnx").is_file() and (Path(folder) / "export.json").is_file()


def load_onnx_folder(folder: Path, threads: int | None = None):
    """(session, config, tokenizer, export info) of an exported folder; every file its manifest lists is verified
    when it has one."""
    from .. import artifacts, models

    folder = Path(folder)
    require("onnx", f"{folder}: running an ONNX export")
    if artifacts.is_complete(folder):
        artifacts.verify(folder)
    info = read_export_info(folder)
    config = models.load_config(str(folder))
    tokenizer = models.load_tokenizer(str(folder))
    models.check_tokenizer(tokenizer, config, str(folder))
    try:
        session = ort_session(folder / "model.onnx", threads=threads,
                              disabled_optimizers=info.get("ort_disabled_optimizers", ()))
    except Exception as e:  # ORT raises its own types for a corrupt or foreign graph
        raise DpqError(f"{folder / 'model.onnx'}: ONNX Runtime cannot load it "
                       f"({str(e).splitlines()[0][:160]})") from None
    return session, config, tokenizer, info


def read_export_info(folder: Path) -> dict:
    """``export.json``, refused in one line when it is cut short or not the mapping an export writes."""
    import json

    path = Path(folder) / "export.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DpqError(f"{path}: not valid JSON ({str(e)[:120]}); the file is damaged or cut short") from None
    if not isinstance(info, dict):
        raise DpqError(f"{path}: holds a JSON {type(info).__name__}, not an export's description (an object)")
    disabled = info.get("ort_disabled_optimizers", [])
    if not isinstance(disabled, list) or not all(isinstance(x, str) for x in disabled):
        raise DpqError(f"{path}: ort_disabled_optimizers is {disabled!r}, not a list of optimizer names")
    if not isinstance(info.get("runtime_ops", {}), dict) or not isinstance(info.get("runtime", ""), str):
        raise DpqError(f"{path}: runtime or runtime_ops is not what an export writes; the file was edited")
    return info


# shapes are known, as in the attention-fused int8 graphs, so the export times the session with it disabled too
SLOW_FUSIONS = ("SkipLayerNormFusion",)


def session_variants(path: Path) -> list[tuple[str, ...]]:
    """Optimizer sets worth timing for this file: none disabled, and the slow fusions when ORT applies them."""
    ops = runtime_ops(path)
    return [()] + ([SLOW_FUSIONS] if ops.get("SkipLayerNormalization") else [])


def pick_fastest(candidates: dict[str, tuple[Path, tuple[str, ...]]], *, seq: int = 32,
                 batches: tuple[int, ...] = (1, 32), settle_s: float | None = None,
                 ) -> tuple[str, dict[str, dict[str, float]]]:
    """The (file, disabled ORT optimizers) candidate that runs fastest here: median ms at each batch x seq
    (interleaved, so load hits all alike), ranked by the geometric mean over the batch sizes.

    Which int4 kernel wins depends on the CPU (ORT #23004): MatMulNBits level 4 quantizes activations to int8
    inside the kernel, level 0 dequantizes the weights to fp32, and the int8-kernel file runs
    DynamicQuantizeMatMul/QAttention on codes expanded at load. Measured, not assumed. ``settle_s``: the pause
    before each block of timed calls (None: ``measure.SETTLE_S``; ``benchmarks/latency_settle.py`` sets 0).
    """
    from .. import measure

    sessions = {k: ort_session(f, threads=torch.get_num_threads(), disabled_optimizers=d)
                for k, (f, d) in candidates.items()}
    times: dict[str, dict[str, float]] = {k: {} for k in sessions}
    for bs in batches:
        ids = torch.randint(5, 100, (bs, seq))
        mask = torch.ones_like(ids)
        fns = [{"ms": (lambda s=s: ort_logits(s, ids, mask))} for s in sessions.values()]
        rows = measure.interleaved_latency_ms(fns, rounds=4, repeats=3 if bs > 8 else 10, warmup=2,
                                              settle_s=measure.SETTLE_S if settle_s is None else settle_s)
        for k, r in zip(sessions, rows):
            times[k][f"bs{bs}"] = round(r["ms"], 3)
    score = {k: float(np.mean(np.log(list(t.values())))) for k, t in times.items()}
    return min(score, key=score.get), times




def runtime_ops(onnx_path: Path, disabled_optimizers: tuple[str, ...] = ()) -> dict[str, int]:
    """Op-type counts of the graph ORT executes on CPU after its own optimizations (ORT_ENABLE_ALL but
    ``disabled_optimizers``)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.intra_op_num_threads = 1
        extra = {"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}
        ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"], **extra)
        graph = onnx.load(opts.optimized_model_filepath).graph
    return dict(Counter(n.op_type for n in graph.node))
