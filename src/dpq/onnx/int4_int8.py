"""A 4-bit ONNX file that runs on int8 kernels: 4-bit on disk, int8 speed in ONNX Runtime.

Why: on CPUs like this project's (AVX-512 VNNI), ``MatMulNBits`` is never faster than fp32 (ORT #23004; figures
in ``benchmarks/onnx_kernels.py``), while dynamic int8 (``DynamicQuantizeMatMul`` / ``QAttention``) is about 2x
faster than fp32 on the pruned student (BENCHMARKS.md, issue 4) but twice the size. This file stores each weight
as its packed 4-bit codes and group scales, plus a small constant subgraph (BitShift/Sub unpack, scale, re-grid
onto the int8 per-channel grid) that turns them into the int8 tensor the int8 kernels read. Every input of that
subgraph is an initializer, so ORT's constant folding runs it once when the session is created; ``runtime_ops``
shows none of it is left at run time.

The int8 codes are the ones ``quantize_dynamic`` derives from the dequantized 4-bit weights, reproduced
exactly (the export checks it), so this file computes the same logits as the int8 file of the 4-bit model.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..quant.fake import QTensor, has_fp16_scales, is_symmetric, pack_int4
from .int4 import _key, int4_onnx
from .int8 import int8_onnx

log = logging.getLogger("dpq")


class _Builder:
    """Collects the constant subgraph's nodes and initializers; small constants are shared, names kept short
    (hundreds of nodes: their names are part of the file size)."""

    def __init__(self):
        self.nodes, self.inits = [], []
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def name(self, stem: str) -> str:
        self._n += 1
        return f"w4/{stem}{self._n}"

    def const(self, stem: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        array = np.asarray(array)
        small = array.size <= 8
        key = (array.dtype.str, array.shape, array.tobytes())
        if small and key in self._consts:
            return self._consts[key]
        nm = self.name(stem)
        self.inits.append(numpy_helper.from_array(array, nm))
        if small:
            self._consts[key] = nm
        return nm

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        from onnx import helper

        out = out or self.name("")  # intermediate names are never read: a counter keeps them short
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def first_cols(self, x: str, n: int) -> str:
        """x[:, :n]."""
        ints = [self.const("i", np.array([v], np.int64)) for v in (0, n, 1)]
        return self.op("Slice", [x, *ints])

    def unpack(self, packed: str, rows: int, n: int) -> str:
        """uint8 [rows, ceil(n/2)] (two 4-bit codes a byte, even index low, as ``pack_int4``) -> uint8 [rows, n]."""
        # BitShift and Sub only (opset 11): BitwiseAnd would need opset 18, which changes other ops' signatures
        four = self.const("s4", np.array(4, np.uint8))
        hi = self.op("BitShift", [packed, four], direction="RIGHT")
        lo = self.op("Sub", [packed, self.op("BitShift", [hi, four], direction="LEFT")])
        axes = self.const("ax", np.array([-1], np.int64))
        pair = self.op("Concat", [self.op("Unsqueeze", [lo, axes]), self.op("Unsqueeze", [hi, axes])], axis=-1)
        out = self.op("Reshape", [pair, self.const("shape", np.array([rows, n + n % 2], np.int64))])
        return self.first_cols(out, n) if n % 2 else out


def _dequantized_block(b: _Builder, q: QTensor, stem: str) -> str:
    """fp32 [rows, cols] = (code - zero) * scale, from 4-bit initializers; the padded codes are sliced off."""
    from onnx import TensorProto

    rows, cols = q.shape
    gs = q.group_size
    groups = q.scales.shape[1]
    codes = q.codes.to(torch.uint8)
    if groups * gs != cols:  # pad to whole groups with the zero code: padded weights are exact zeros
        codes = torch.cat([codes, q.zeros[:, -1:].to(torch.uint8).expand(rows, groups * gs - cols)], dim=1)
    c = b.unpack(b.const(f"{stem}_q4", pack_int4(codes).numpy()), rows, groups * gs)
    c = b.op("Reshape", [c, b.const("shape", np.array([rows, groups, gs], np.int64))])
    c = b.op("Cast", [c], to=TensorProto.FLOAT)
    if is_symmetric(q):
        zero = b.const("zero", np.array(2 ** (q.bits - 1), np.float32))
    else:
        z = b.unpack(b.const(f"{stem}_zeros", pack_int4(q.zeros.to(torch.uint8)).numpy()), rows, groups)
        z = b.op("Cast", [z], to=TensorProto.FLOAT)
        zero = b.op("Unsqueeze", [z, b.const("ax", np.array([-1], np.int64))])
    # fp16 scales are exact for most grids (see fake.with_fp16_scales) and halve the per-group bytes
    if has_fp16_scales(q):
        scale = b.op("Cast", [b.const(f"{stem}_scales", q.scales.half().numpy()[..., None])], to=TensorProto.FLOAT)
    else:
        scale = b.const(f"{stem}_scales", q.scales.float().numpy()[..., None])
    w = b.op("Mul", [b.op("Sub", [c, zero]), scale])
    w = b.op("Reshape", [w, b.const("shape", np.array([rows, groups * gs], np.int64))])
    return b.first_cols(w, cols) if groups * gs != cols else w


def _int8_codes(b: _Builder, blocks: list[tuple[str, QTensor]], scale: str, zero_point: np.ndarray, out: str) -> None:
    """The int8 tensor [in, out] ``out`` as ``quantize_dynamic`` computes it: round(w / scale) + zp, clipped."""
    from onnx import TensorProto

    ws = [_dequantized_block(b, q, name.replace("/", ".").replace(".", "_")) for name, q in blocks]
    w = ws[0] if len(ws) == 1 else b.op("Concat", ws, axis=0)
    w = b.op("Transpose", [w], perm=[1, 0])
    r = b.op("Round", [b.op("Div", [w, scale])])
    r = b.op("Add", [r, b.const("zp", zero_point.astype(np.float32))])
    info = np.iinfo(zero_point.dtype)
    r = b.op("Clip", [r, b.const("lo", np.array(info.min, np.float32)), b.const("hi", np.array(info.max, np.float32))])
    to = TensorProto.INT8 if zero_point.dtype == np.int8 else TensorProto.UINT8
    b.op("Cast", [r], out=out, to=to)


def _numpy_int8(blocks: list[QTensor], scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """What the subgraph computes, in numpy (to check it against quantize_dynamic's tensor at export)."""
    w = torch.cat([q.dequantize() for q in blocks]).numpy().T
    r = np.round(w / scale.astype(np.float32)) + zero_point.astype(np.float32)
    info = np.iinfo(zero_point.dtype)
    return np.clip(r, info.min, info.max).astype(zero_point.dtype)


def int4_int8_kernels_onnx(fp32_onnx: Path, out: Path, weights: dict[str, tuple[torch.Tensor, QTensor]], *,
                           weight_type: str = "auto") -> dict:
    """``fp32_onnx``: the export of the 4-bit model (weights equal to their ``q.dequantize()``); ``weights``: name ->
    (W, q) as for ``int4_onnx``. Linear weights (fused Q/K/V included) are stored as 4-bit codes expanded to int8 at
    session creation; embedding tables become GatherBlockQuantized as in the MatMulNBits file. A weight whose codes
    cannot be matched stays int8 (or fp32) and is listed in ``left``."""
    import onnx
    from onnx import numpy_helper

    by_value: dict[tuple, list[tuple[str, torch.Tensor, QTensor]]] = {}
    for name, (w, q) in weights.items():
        if q.bits == 4 and w.ndim == 2:
            w = w.detach().float().cpu()
            by_value.setdefault(_key(w.numpy()), []).append((name, w, q))

    def match(b: np.ndarray) -> list[tuple[str, QTensor]] | None:
        """The 4-bit weights whose transposes, side by side, are ``b`` [in, out] (1 Linear, or fused Q|K|V)."""
        for parts in (1, 3):
            if b.shape[1] % parts:
                continue
            found = []
            for col in np.split(b, parts, axis=1):
                wt = np.ascontiguousarray(col.T)
                hit = next(((n, q) for n, w, q in by_value.get(_key(wt), []) if np.array_equal(w.numpy(), wt)), None)
                if hit is None:
                    break
                found.append(hit)
            if len(found) == parts:
                return found
        return None

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "quantized_from.onnx"
        info = int8_onnx(fp32_onnx, tmp / "int8.onnx", weight_type=weight_type, embeddings=False,
                         fuse_embeddings=False, keep_source=source)
        # embeddings: 4-bit GatherBlockQuantized; the Linear weights are int8 by now, so only the tables match
        gathers = int4_onnx(tmp / "int8.onnx", tmp / "gathers.onnx", weights, accuracy_level=0)
        fp32_inits = {t.name: t for t in onnx.load(str(source)).graph.initializer}
        model = onnx.load(str(tmp / "gathers.onnx"))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    b = _Builder()
    stored, replaced, left = [], set(), []
    for t in list(g.initializer):
        base = t.name[: -len("_quantized")] if t.name.endswith("_quantized") else None
        if base in fp32_inits:
            b_fp32 = numpy_helper.to_array(fp32_inits[base])
        elif base and base.endswith("_Transposed") and base[: -len("_Transposed")] in fp32_inits:
            b_fp32 = numpy_helper.to_array(fp32_inits[base[: -len("_Transposed")]]).T  # a Gemm (transB=1) made MatMul
        else:
            continue
        blocks = match(b_fp32)
        if blocks is None:
            left.append(f"{base}: stays int8, no 4-bit weight equals it")
            continue
        scale, zp = f"{base}_scale", numpy_helper.to_array(inits[f"{base}_zero_point"])
        if zp.ndim not in (0, 1):
            left.append(f"{base}: stays int8, zero point of shape {zp.shape}")
            continue
        want = numpy_helper.to_array(t)
        got = _numpy_int8([q for _, q in blocks], numpy_helper.to_array(inits[scale]), zp)
        if not np.array_equal(got, want):
            left.append(f"{base}: stays int8, {int((got != want).sum())} codes would differ from the int8 file's")
            continue
        _int8_codes(b, blocks, scale, zp, t.name)
        replaced.add(t.name)
        stored += [n for n, _ in blocks]
    keep = [t for t in g.initializer if t.name not in replaced]
    del g.initializer[:]
    g.initializer.extend(keep + b.inits)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(b.nodes + nodes)  # the constant subgraph first: ONNX wants nodes in topological order
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    # tables (GatherBlockQuantized) and any Gemm the int8 pass left fp32 (MatMulNBits) were rewritten there
    rewritten = set(weights) - {x.split(":")[0] for x in gathers["left_fp32"]}
    missing = [f"{n}: not stored in 4 bits" for n in sorted(set(weights) - rewritten - set(stored))]
    return {"kernels": "int8", "accuracy_level": None, "weight_type": info["weight_type"],
            "reduce_range": info["reduce_range"], "why": info["why"], "fused_attention": info["fused_attention"],
            "int4_stored_int8_run": len(stored),
            "gather_block_quantized": gathers["gather_block_quantized"],
            "matmul_nbits": gathers["matmul_nbits"], "left": left + missing}

