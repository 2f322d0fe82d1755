"""Quantization-aware training as two model transforms around the shared training loop.

``prepare_qat`` swaps the PTQ targets (every Linear but the head, and the embedding tables) for LSQ
fake-quantized modules that share the original parameters; the stage then trains with KD. ``convert_qat``
reads each module's exact integer codes and puts plain modules back with the dequantized weights, so the
model that is saved, exported and evaluated is bit-for-bit the grid the training saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .fake import QATEmbedding, QATLinear, QTensor, check_bits
from .ptq import embedding_targets, linear_targets
from .vocab import RemappedEmbedding


@dataclass
class QATConfig:
    bits: int = 4
    group_size: int = 32
    embeddings: int | None = 4
    embedding_group_size: int | None = None  # None: group_size
    act_bits: int | None = None  # 8: fake-quantize Linear inputs as dynamic int8 kernels would

    def __post_init__(self):
        check_bits(self.bits, self.group_size)
        if self.embeddings is not None:
            check_bits(self.embeddings, self.embedding_group_size or self.group_size)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def prepare_qat(model: nn.Module, cfg: QATConfig) -> nn.Module:
    for name, lin in linear_targets(model).items():
        _set(model, name, QATLinear(lin, cfg.bits, cfg.group_size, cfg.act_bits))
    if cfg.embeddings is not None:
        for name, emb in embedding_targets(model).items():
            _set(model, name, QATEmbedding(emb, cfg.embeddings, cfg.embedding_group_size or cfg.group_size))
    return model


@torch.no_grad()
def convert_qat(model: nn.Module) -> dict[str, QTensor]:
    out: dict[str, QTensor] = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QATLinear):
            q = mod.to_qtensor()
            plain = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
            plain.weight = mod.weight
            plain.bias = mod.bias
        elif isinstance(mod, QATEmbedding):
            q = mod.to_qtensor()
            if mod.remap is not None:
                plain = RemappedEmbedding(mod.num_embeddings, mod.embedding_dim, len(mod.remap), mod.padding_idx,
                                          device=mod.weight.device)
                plain.remap.copy_(mod.remap)
            else:
                plain = nn.Embedding(mod.num_embeddings, mod.embedding_dim, padding_idx=mod.padding_idx, device="meta")
            plain.weight = mod.weight
        else:
            continue
        plain.weight.data.copy_(q.dequantize())
        _set(model, name, plain)
        out[f"{name}.weight"] = q
    return out
