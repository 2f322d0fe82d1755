"""Group-wise integer quantization of weight matrices, 4-bit packing, and LSQ fake quantization for QAT.

Conventions shared by every quantizer, the packed safetensors format and the ONNX int4 export:
- a 2-D weight ``[rows, cols]`` (a Linear's ``[out, in]`` or an embedding table ``[vocab, hidden]``) is
  quantized in groups of ``group_size`` consecutive columns of one row (the reduction axis of a matmul);
  the last group of a row may be shorter when ``cols`` is not a multiple (pruned layers have any width);
- codes are unsigned, ``0 .. 2^bits - 1``; value = (code - zero) * scale, one (scale, zero) per group;
- symmetric: zero = 2^(bits-1) (8 for int4), scale = absmax / (2^(bits-1) - 1);
  asymmetric: scale = (max - min) / (2^bits - 1), zero = round(-min / scale);
- 4-bit codes are packed two per byte along the last axis, the even index in the low nibble (the order
  ONNX Runtime's MatMulNBits and GatherBlockQuantized read).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DpqError

BITS = (4, 8)


def check_bits(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise DpqError(f"bits must be 4 or 8 (got {bits})")
    if group_size < 2:
        raise DpqError(f"group_size must be >= 2 (got {group_size})")


def n_groups(cols: int, group_size: int) -> int:
    return -(-cols // group_size)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[rows, cols] -> [rows, groups, group_size], the short last group padded by repeating its last value
    (padding with a real value never widens the group's range)."""
    rows, cols = w.shape
    pad = n_groups(cols, group_size) * group_size - cols
    if pad:
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
    return w.reshape(rows, -1, group_size)


def _expand(per_group: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    """[rows, groups] -> [rows, cols]."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :cols]


@dataclass
class QTensor:
    """A quantized 2-D weight: codes, per-group scales and zero points."""

    codes: torch.Tensor  # uint8 [rows, cols]
    scales: torch.Tensor  # float32 [rows, groups]
    zeros: torch.Tensor  # uint8 [rows, groups]
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        cols = self.codes.shape[1]
        z = _expand(self.zeros.float(), cols, self.group_size)
        s = _expand(self.scales.float(), cols, self.group_size)
        return (self.codes.float() - z) * s


def group_params(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros) per group of ``w`` [rows, cols] by min/max."""
    g = _grouped(w.detach().float(), group_size)
    qmax = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        scales = g.abs().amax(-1) / (half - 1)
        zeros = torch.full_like(scales, half)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)  # zero must be exactly representable
        scales = (hi - lo) / qmax
        zeros = torch.round(-lo / scales.clamp_min(1e-12)).clamp(0, qmax)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales) * 1e-8)  # an all-zero group
    return scales, zeros


def quantize_with(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                  group_size: int) -> torch.Tensor:
    """Codes of ``w`` on a given grid (round to nearest, clamp)."""
    cols = w.shape[1]
    s = _expand(scales, cols, group_size)
    z = _expand(zeros, cols, group_size)
    return torch.clamp(torch.round(w.float() / s) + z, 0, 2**bits - 1)


def quantize_rtn(w: torch.Tensor, bits: int = 4, group_size: int = 32, symmetric: bool = True) -> QTensor:
    """Round-to-nearest group-wise quantization of a 2-D weight."""
    check_bits(bits, group_size)
    if w.ndim != 2:
        raise DpqError(f"can only quantize 2-D weights (got shape {tuple(w.shape)})")
    scales, zeros = group_params(w, bits, group_size, symmetric)
    codes = quantize_with(w, scales, zeros, bits, group_size)
    return QTensor(codes.to(torch.uint8), scales.float(), zeros.to(torch.uint8), bits, group_size)


FP16_TINY = 2.0**-24  # smallest positive float16: an all-zero group's scale must not round to 0
FP16_MAX = 65504.0


def fp16_grid(scales: torch.Tensor) -> torch.Tensor:
    """Scales rounded to the nearest float16 value (kept as they are where float16 would overflow), never 0.

    Every quantizer stores its scales this way: one scale per group is 1 bit a weight in fp32 and 0.5 in
    fp16, at a relative step change below 5e-4."""
    s = scales.float()
    return torch.where(s.abs() < FP16_MAX, s.half().float(), s).clamp_min(FP16_TINY)


def fp16_step_ste(step: torch.Tensor) -> torch.Tensor:
    """``fp16_grid(step)`` in the forward pass, the identity in the backward one (LSQ keeps learning in fp32)."""
    return step + (fp16_grid(step.detach()) - step.detach())


def with_fp16_scales(w: torch.Tensor, q: QTensor) -> QTensor:
    """The same grid with its scales rounded to float16 and the codes recomputed on them.

    fp16 halves the scale bytes (and the ONNX gather kernel takes fp16 scales); recomputing the codes keeps
    PyTorch and ONNX on one exact grid.
    """
    s = fp16_grid(q.scales)
    codes = quantize_with(w, s, q.zeros.float(), q.bits, q.group_size)
    return QTensor(codes.to(torch.uint8), s, q.zeros, q.bits, q.group_size)


def has_fp16_scales(q: QTensor) -> bool:
    return bool(torch.equal(q.scales.half().float(), q.scales.float()))


def is_symmetric(q: QTensor) -> bool:
    return bool((q.zeros == 2 ** (q.bits - 1)).all())


# ----------------------------------------------------------------------------- packing


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15], [..., n] -> [..., ceil(n/2)] bytes, even index in the low nibble."""
    if codes.numel() and int(codes.max()) > 15:
        raise DpqError("pack_int4: codes must be in [0, 15]")
    c = codes.to(torch.uint8)
    if c.shape[-1] % 2:
        c = F.pad(c, (0, 1))
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack_int4``: [..., ceil(n/2)] -> [..., n]."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)[..., :n]


# ----------------------------------------------------------------------------- LSQ fake quantization


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (torch.round(x) - x).detach() + x


def _grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Forward: x. Backward: gradient times ``scale`` (LSQ's step-size gradient normalisation)."""
    return (x - x * scale).detach() + x * scale


def lsq_fake_quant(w: torch.Tensor, step: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Symmetric LSQ (Esser et al., 2020): ŵ = clamp(round(w/s), -2^(b-1), 2^(b-1)-1)·s per group.

    Straight-through rounding; ``s`` gets LSQ's gradient, scaled by 1/sqrt(group_size · Q_p).
    """
    rows, cols = w.shape
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = _grad_scale(step, 1.0 / math.sqrt(group_size * qp))
    s = _expand(s, cols, group_size)
    return _round_ste(torch.clamp(w / s, qn, qp)) * s


@torch.no_grad()
def lsq_qtensor(w: torch.Tensor, step: torch.Tensor, bits: int, group_size: int) -> QTensor:
    """The integer codes an LSQ-quantized weight stands for (exactly what ``lsq_fake_quant`` computes with)."""
    step = fp16_grid(step.clamp_min(1e-8))  # the grid the forward pass trained on (fp16_step_ste)
    zeros = torch.full_like(step, 2 ** (bits - 1))
    codes = quantize_with(w, step, zeros, bits, group_size)
    return QTensor(codes.to(torch.uint8), step.clone(), zeros.to(torch.uint8), bits, group_size)


def fake_quant_activation(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic per-tensor asymmetric fake quantization (what ONNX Runtime's dynamic int8 kernels do), STE."""
    lo, hi = x.detach().amin().clamp(max=0), x.detach().amax().clamp(min=0)
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    zero = torch.round(-lo / scale)
    return (torch.clamp(_round_ste(x / scale) + zero, 0, qmax) - zero) * scale


class QATLinear(nn.Module):
    """A Linear whose weight is LSQ-fake-quantized in the forward pass; ``to_qtensor`` gives the exact codes."""

    def __init__(self, linear: nn.Linear, bits: int = 4, group_size: int = 32, act_bits: int | None = None):
        super().__init__()
        check_bits(bits, group_size)
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size, self.act_bits = bits, group_size, act_bits
        scales, _ = group_params(linear.weight, bits, group_size, symmetric=True)
        self.step = nn.Parameter(scales.clone())
        self.step._dpq_no_decay = True  # a step size is not a weight to shrink

    def quantized_weight(self) -> torch.Tensor:
        return lsq_fake_quant(self.weight, fp16_step_ste(self.step.clamp_min(1e-8)), self.bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits:
            x = fake_quant_activation(x, self.act_bits)
        return F.linear(x, self.quantized_weight(), self.bias)

    def to_qtensor(self) -> QTensor:
        return lsq_qtensor(self.weight, self.step, self.bits, self.group_size)


class QATEmbedding(nn.Module):
    """An embedding table fake-quantized per row group with LSQ steps (the table is half of MiniLM)."""

    def __init__(self, emb: nn.Embedding, bits: int = 4, group_size: int = 32):
        super().__init__()
        check_bits(bits, group_size)
        self.weight = emb.weight
        self.padding_idx = emb.padding_idx
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.bits, self.group_size = bits, group_size
        scales, _ = group_params(emb.weight, bits, group_size, symmetric=True)
        self.step = nn.Parameter(scales.clone())
        self.step._dpq_no_decay = True
        remap = getattr(emb, "remap", None)  # a trimmed vocabulary's id -> row table (vocab.py)
        if remap is not None:
            self.register_buffer("remap", remap.clone())
        else:
            self.remap = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.remap is not None:
            ids = self.remap[ids].long()
        # only the looked-up rows are quantized: the full table would cost a vocabulary-sized op per step.
        # index_select, not weight[flat]: on the CPU the backward of advanced indexing adds the rows of repeated ids
        # in a thread-dependent order, so two QAT runs with one seed ended apart (BENCHMARKS.md, issue 13)
        flat = ids.reshape(-1)
        step = fp16_step_ste(self.step.clamp_min(1e-8)).index_select(0, flat)
        rows = lsq_fake_quant(self.weight.index_select(0, flat), step, self.bits, self.group_size)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def to_qtensor(self) -> QTensor:
        return lsq_qtensor(self.weight, self.step, self.bits, self.group_size)
