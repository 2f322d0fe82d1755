"""Post-training weight quantization: round-to-nearest and GPTQ-style error compensation.

Both are model transforms in the torchao style: ``quantize_model(model, QuantConfig(...), calibration)``
replaces every target weight by its dequantized 4/8-bit value in place and returns the ``QTensor`` of
each, which the packed format and the ONNX int4 export store as integers.

Targets: every ``nn.Linear`` except the classification head (tiny, and the most sensitive), and the word
and position embedding tables (half of MiniLM's parameters) unless ``embeddings`` says otherwise.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DpqError
from . import methods
from .fake import QTensor, check_bits, fp16_grid, group_params, quantize_rtn, with_fp16_scales

log = logging.getLogger("dpq")


@dataclass
class QuantConfig:
    method: str = "rtn"  # a registered post-training method (methods.py): rtn, gptq, …
    bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    embeddings: int | None = 4  # bit width for embedding tables; None keeps them fp32
    embedding_group_size: int | None = None  # None: group_size
    damp: float = 0.01  # GPTQ: fraction of the mean Hessian diagonal added for numerical stability
    block_size: int = 128  # GPTQ: columns processed per lazy-update block

    @property
    def emb_group(self) -> int:
        return self.embedding_group_size or self.group_size

    def __post_init__(self):
        check_bits(self.bits, self.group_size)
        if self.embeddings is not None:
            check_bits(self.embeddings, self.emb_group)
        methods.get(self.method)  # refuses an unknown name, listing the known ones


def linear_targets(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "classifier" not in n}


def embedding_targets(model: nn.Module) -> dict[str, nn.Embedding]:
    # token-type tables (2 rows) are not worth a scale per group
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Embedding) and "token_type" not in n}


# ----------------------------------------------------------------------------- GPTQ


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  damp: float = 0.01, block_size: int = 128) -> QTensor:
    """GPTQ (Frantar et al., 2023) for one weight [rows, cols] with input Hessian H = 2/n·Σ x xᵀ [cols, cols].

    Columns are quantized left to right; each one's rounding error is spread over the columns not yet
    quantized through the inverse Hessian's Cholesky factor, so the layer's output error, not the
    weight error, is minimised. Group scales are fixed when a group is reached, from the weights as
    updated so far (the block size is a multiple of the group size, so a group never spans two blocks).
    """
    rows, cols = w.shape
    W = w.detach().clone().float()
    H = hessian.detach().clone().double()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype, device=H.device)
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    except torch.linalg.LinAlgError:
        raise DpqError("GPTQ: calibration Hessian is not positive definite; raise --calibration-samples") from None
    groups = -(-cols // group_size)
    scales = torch.zeros(rows, groups, device=W.device)
    zeros = torch.zeros(rows, groups, device=W.device)
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    qmax = 2**bits - 1
    bs = max(group_size, block_size // group_size * group_size)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                g = col // group_size
                s, z = group_params(W1[:, i:i + group_size], bits, group_size, symmetric)
                s = fp16_grid(s)  # stored as fp16 (see fake.fp16_grid): GPTQ compensates on the stored grid
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            g = col // group_size
            s, z = scales[:, g], zeros[:, g]
            q = torch.clamp(torch.round(W1[:, i] / s) + z, 0, qmax)
            codes[:, col] = q.to(torch.uint8)
            err = (W1[:, i] - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return QTensor(codes, scales.float(), zeros.to(torch.uint8), bits, group_size)


def _block_of(name: str) -> str:
    m = re.search(r"\.layer\.(\d+)\.", name)
    return f"layer{int(m.group(1)):04d}" if m else "zrest"  # encoder layers in order, then pooler and the rest


@methods.register("gptq", calibrated=True)
@torch.no_grad()
def gptq_linears(model: nn.Module, targets: dict[str, nn.Linear], cfg: QuantConfig,
                 calibration: list[dict] | None) -> dict[str, QTensor]:
    """Layer by layer: inputs to layer k come from layers 0..k-1 already quantized (errors do not pile up)."""
    if not calibration:
        raise DpqError("GPTQ needs calibration batches (set --calibration-samples > 0)")
    out: dict[str, QTensor] = {}
    blocks: dict[str, list[str]] = {}
    for name in targets:
        blocks.setdefault(_block_of(name), []).append(name)
    for block in sorted(blocks):
        names = blocks[block]
        hess = {n: torch.zeros(targets[n].in_features, targets[n].in_features, dtype=torch.float64,
                               device=targets[n].weight.device) for n in names}
        count = {n: 0 for n in names}

        def hook(name):
            def f(mod, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                hess[name] += 2.0 * x.T @ x
                count[name] += x.shape[0]
            return f

        handles = [targets[n].register_forward_pre_hook(hook(n)) for n in names]
        try:
            dev = next(model.parameters()).device
            for batch in calibration:
                model(**{k: v.to(dev) for k, v in batch.items()})
        finally:
            for h in handles:
                h.remove()
        for n in names:
            lin = targets[n]
            q = gptq_quantize(lin.weight, hess[n] / max(1, count[n]), cfg.bits, cfg.group_size, cfg.symmetric,
                              cfg.damp, cfg.block_size)
            lin.weight.data.copy_(q.dequantize())
            out[f"{n}.weight"] = q
    return out


def calibration_batches(train_set, pad_ids: dict, samples: int, batch_size: int = 32, seed: int = 0) -> list[dict]:
    """Padding-aware batches of the first ``samples`` examples of a seeded shuffle (the model sees real lengths)."""
    from ..data import make_loader

    loader = make_loader(train_set, pad_ids, batch_size, shuffle=True, seed=seed)
    out, n = [], 0
    for batch in loader:
        out.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
        n += len(batch["input_ids"])
        if n >= samples:
            break
    return out


@methods.register("rtn")
@torch.no_grad()
def rtn_linears(model: nn.Module, linears: dict[str, nn.Linear], cfg: QuantConfig,
                calibration: list[dict] | None) -> dict[str, QTensor]:
    """Round to nearest, group by group."""
    out = {}
    for n, lin in linears.items():
        q = with_fp16_scales(lin.weight.data, quantize_rtn(lin.weight.data, cfg.bits, cfg.group_size, cfg.symmetric))
        lin.weight.data.copy_(q.dequantize())
        out[f"{n}.weight"] = q
    return out


def quantize_model(model: nn.Module, cfg: QuantConfig, calibration: list[dict] | None = None) -> dict[str, QTensor]:
    """Quantize ``model``'s target weights in place (they become their dequantized values); return the codes."""
    model.eval()
    linears = linear_targets(model)
    if not linears:
        raise DpqError(f"{type(model).__name__}: no linear layers to quantize")
    out = dict(methods.get(cfg.method).quantize(model, linears, cfg, calibration))
    if cfg.embeddings is not None:
        for n, emb in embedding_targets(model).items():
            q = quantize_rtn(emb.weight.data, cfg.embeddings, cfg.emb_group, cfg.symmetric)
            q = with_fp16_scales(emb.weight.data, q)
            emb.weight.data.copy_(q.dequantize())
            out[f"{n}.weight"] = q
    return out
