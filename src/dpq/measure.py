"""Measurements every stage and the report share: accuracy, size, FLOPs, latency.

Latency is the median of repeated runs after warm-up, on fixed-shape inputs at the split's mean token
length, with the thread count recorded, so two models measured in one process compare fairly.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .data import EncodedSplit, make_loader


@torch.no_grad()
def collect_logits(forward, ds: EncodedSplit, pad_ids: dict[str, int], batch_size: int = 64,
                   key: str = "input_ids") -> torch.Tensor:
    """``forward(input_ids, attention_mask) -> logits`` over every example of ``ds``, in dataset order (the
    loader groups examples by length, so its batches come out of order)."""
    prefix = key[: -len("input_ids")]
    out = None
    for batch in make_loader(ds, pad_ids, batch_size, shuffle=False):
        logits = torch.as_tensor(forward(batch[key], batch[f"{prefix}attention_mask"])).float().cpu()
        if out is None:
            out = torch.empty(len(ds), logits.shape[-1])
        out[batch["index"]] = logits
    return out if out is not None else torch.empty(0, 0)


def predict_logits(model, ds: EncodedSplit, pad_ids: dict[str, int], batch_size: int | None = None,
                   key: str = "input_ids") -> torch.Tensor:
    """Logits of a PyTorch model for every example of ``ds``, in dataset order, on the model's device (batches of
    256 on a GPU, 64 on the CPU unless ``batch_size`` says otherwise)."""
    model.eval()
    device = next(model.parameters()).device
    batch_size = batch_size or (256 if device.type == "cuda" else 64)
    return collect_logits(lambda ids, mask: model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits,
                          ds, pad_ids, batch_size, key)


def accuracy_and_loss(logits: torch.Tensor, labels) -> dict:
    y = torch.as_tensor(labels)
    return {"accuracy": (logits.argmax(-1) == y).float().mean().item(), "loss": F.cross_entropy(logits, y).item()}


def evaluate_model(model, ds: EncodedSplit, pad_ids: dict[str, int], batch_size: int | None = None) -> dict:
    return accuracy_and_loss(predict_logits(model, ds, pad_ids, batch_size), ds.labels)


def weights_size_mb(folder: Path) -> float:
    """On-disk size of the weight files (safetensors or ONNX, with external data), in MB (10^6 bytes)."""
    folder = Path(folder)
    files = [p for p in folder.iterdir()
             if p.suffix in (".safetensors", ".onnx", ".data") or p.name.endswith(".onnx_data")]
    return sum(p.stat().st_size for p in files) / 1e6


def dummy_batch(model, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab, (batch_size, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def gflops_per_example(model, seq_len: int) -> float:
    """Forward GFLOPs for one example of ``seq_len`` tokens (matmuls including attention's QK^T and AV).

    Counted under eager attention: fused SDPA kernels on CPU are not all known to the counter.
    """
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**dummy_batch(model, 1, seq_len))
    finally:
        if impl not in (None, "eager") and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(impl)
    return counter.get_total_flops() / 1e9


# seconds every model's block of timed calls waits first, so the threads of the model timed before it park
SETTLE_S = 0.05


@torch.no_grad()
def interleaved_latency_ms(fns: list[dict], *, rounds: int = 6, repeats: int = 5, warmup: int = 3,
                           settle_s: float = SETTLE_S) -> list[dict]:
    """Median ms of each callable in ``fns`` (one dict of named callables per model), timed round-robin.

    Every model is timed in every round, so a change in machine load during the run hits all models alike:
    the ratios stay fair on a shared, noisy machine. Each block of timed calls starts after a ``settle_s`` pause
    and one untimed call: a runtime's worker threads spin-wait for more work after a call (ONNX Runtime's and
    OpenMP's, by default), so a model timed right after another one shared the cores with its threads. Without
    the pause one int4 file's batch-1 median read 2.4 to 6.5 ms from trial to trial (BENCHMARKS.md, issue 13).
    """
    for f in fns:
        for fn in f.values():
            for _ in range(warmup):
                fn()
    samples = [{k: [] for k in f} for f in fns]
    for _ in range(rounds):
        for f, smp in zip(fns, samples):
            for key, fn in f.items():
                if settle_s:
                    time.sleep(settle_s)
                fn()
                for _ in range(repeats):
                    t = time.perf_counter()
                    fn()
                    smp[key].append((time.perf_counter() - t) * 1e3)
    return [{k: statistics.median(v) for k, v in smp.items()} for smp in samples]


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "cores": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
