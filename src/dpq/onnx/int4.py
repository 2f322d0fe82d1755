"""A real 4-bit ONNX file built from dpq's own codes (``MatMulNBits`` / ``GatherBlockQuantized``).

Why: the ops get *our* codes, scales and zero points (PTQ/QAT chose them; ORT's quantizer would re-round the
weights). Initializers are found by value: the TorchScript exporter renames and transposes them. Without
``accuracy_level=4`` MatMulNBits dequantizes to fp32 and runs an fp32 GEMM, which is why it is far slower than
dynamic int8 (ORT issue #23004); 4 quantizes activations to int8 inside it.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..quant.fake import QTensor, has_fp16_scales, is_symmetric, pack_int4

log = logging.getLogger("dpq")

MS_DOMAIN = "com.microsoft"


def _key(a: np.ndarray) -> tuple:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return a.shape, hashlib.blake2b(a.tobytes(), digest_size=16).digest()


def _pow2_block(group_size: int) -> bool:
    return group_size >= 16 and group_size & (group_size - 1) == 0


def _matmul_nbits_tensors(q: QTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Our [N, K] codes as MatMulNBits reads them.

    B uint8 [N, k_blocks, bs/2], scales float32 [N, k_blocks], zero points uint8 [N, ceil(k_blocks/2)];
    4-bit values two per byte, the even index in the low nibble.
    """
    n, k = q.shape
    bs = q.group_size
    k_blocks = -(-k // bs)
    codes = q.codes.to(torch.uint8)
    if k_blocks * bs != k:  # short last block: pad with the zero code so the padding is an exact 0 weight
        pad = q.zeros[:, -1:].to(torch.uint8).expand(n, k_blocks * bs - k)
        codes = torch.cat([codes, pad], dim=1)
    b = pack_int4(codes.reshape(n, k_blocks, bs))
    return b.numpy(), q.scales.float().numpy(), pack_int4(q.zeros.to(torch.uint8)).numpy()


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def int4_onnx(fp32_onnx: Path, out: Path, weights: dict[str, tuple[torch.Tensor, QTensor]], *,
              accuracy_level: int = 4) -> dict:
    """Rewrite the fp32 export so the given weights are stored as their 4-bit codes.

    ``weights``: name -> (W, q), W [rows, cols] as in PyTorch and equal to ``q.dequantize()``. MatMul (B = W.T)
    and Gemm (A·Wᵀ + bias) become MatMulNBits, Gather on an embedding table becomes GatherBlockQuantized
    (uint8 data with bits=4). Anything else is left fp32 and listed in ``left_fp32`` as "name: why".
    The graph is not attention-fused first: fused into MultiHeadAttention it measured slower on this project's CPU
    (pruned MiniLM, batch 32 x 25, 2 threads: 33-36 ms against 27-29 ms; BENCHMARKS.md, ONNX kernels).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(fp32_onnx))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    alias = {}  # the exporter dedups equal tensors through Identity nodes
    for node in g.node:
        if node.op_type == "Identity" and (node.input[0] in inits or node.input[0] in alias):
            alias[node.output[0]] = alias.get(node.input[0], node.input[0])
    consumers: dict[str, list] = {}
    for node in g.node:
        for i, x in enumerate(node.input):
            src = alias.get(x, x)
            if src in inits and node.op_type != "Identity":
                consumers.setdefault(src, []).append((node, i))
    by_value: dict[tuple, list[str]] = {}
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT and len(t.dims) == 2:
            by_value.setdefault(_key(numpy_helper.to_array(t)), []).append(t.name)

    def find(a: np.ndarray) -> list[str]:
        return [n for n in by_value.get(_key(a), []) if np.array_equal(numpy_helper.to_array(inits[n]), a)]

    def one_d(name: str, n: int) -> bool:
        t = inits.get(alias.get(name, name))
        return t is not None and list(t.dims) == [n]

    new_nodes: dict[int, object] = {}  # id(old node) -> replacement
    new_inits, left, touched = [], [], set()
    counts = Counter()
    for wname, (w, q) in weights.items():
        w = w.detach().float().cpu()
        tag = wname.replace("/", ".")
        if q.bits != 4 or tuple(w.shape) != q.shape or w.ndim != 2:
            left.append(f"{wname}: not a 4-bit 2-D QTensor of the weight's shape")
            continue
        deq = q.dequantize()
        if not torch.allclose(deq, w, rtol=1e-5, atol=1e-6 * float(w.abs().max()) + 1e-12):
            left.append(f"{wname}: W is not q.dequantize(), the codes would change the model")
            continue
        wn = w.numpy()
        as_b = find(wn.T)  # MatMul's B / Gemm with transB=0 hold [in, out]
        as_w = find(wn)  # Gather's table / Gemm with transB=1 hold [rows, cols] as in PyTorch
        sites = [(n, i, init, True) for init in as_b for n, i in consumers.get(init, [])]
        sites += [(n, i, init, False) for init in as_w for n, i in consumers.get(init, [])]
        if not sites:
            left.append(f"{wname}: no initializer in the graph equals it")
            continue
        rows, cols = q.shape
        for node, idx, init, transposed in sites:
            if id(node) in new_nodes:
                continue
            op = node.op_type
            mm = op == "MatMul" and idx == 1 and transposed
            gemm = False
            if op == "Gemm" and idx == 1:
                at = _attrs(node)
                no_bias = len(node.input) < 3 or not node.input[2]
                gemm = (at.get("transA", 0) == 0 and at.get("alpha", 1.0) == 1.0
                        and bool(at.get("transB", 0)) != transposed  # A @ W.T either way
                        and (no_bias or (at.get("beta", 1.0) == 1.0 and one_d(node.input[2], rows))))
            if mm or gemm:
                if not _pow2_block(q.group_size):
                    left.append(f"{wname}: {op} kept fp32, MatMulNBits needs a power-of-2 block >= 16 "
                                f"(group {q.group_size})")
                    continue
                b, s, z = _matmul_nbits_tensors(q)
                # a symmetric grid's zero point is the kernel's default (8): storing it would cost 1/8 bit a weight
                names = [f"{tag}.q4", f"{tag}.scales"] + ([] if is_symmetric(q) else [f"{tag}.zero_points"])
                if names[0] not in touched:
                    new_inits += [numpy_helper.from_array(a, nm) for a, nm in zip((b, s, z), names)]
                    touched.add(names[0])
                ins = [node.input[0], *names]
                if gemm and len(node.input) > 2 and node.input[2]:
                    ins += [""] * (4 - len(names)) + [node.input[2]]  # no zero points / g_idx, then the bias
                attrs = dict(K=cols, N=rows, bits=4, block_size=q.group_size)
                if accuracy_level:
                    attrs["accuracy_level"] = accuracy_level
                new_nodes[id(node)] = helper.make_node("MatMulNBits", ins, list(node.output),
                                                       name=f"{node.name or tag}_Q4", domain=MS_DOMAIN, **attrs)
                counts["matmul_nbits"] += 1
            elif op == "Gather" and idx == 0 and not transposed and _attrs(node).get("axis", 0) == 0:
                if not _pow2_block(q.group_size) or cols % 2:
                    left.append(f"{wname}: Gather kept fp32, GatherBlockQuantized needs a power-of-2 block >= 16 "
                                f"and an even row width (group {q.group_size}, width {cols})")
                    continue
                # fp16 scales (exact for our tables, see fake.with_fp16_scales) halve the per-group bytes; the
                # kernel then returns fp16 rows, cast back to fp32 for the rest of the graph
                half = has_fp16_scales(q)
                names = [f"{tag}.q4", f"{tag}.scales"] + ([] if is_symmetric(q) else [f"{tag}.zero_points"])
                if names[0] not in touched:
                    arrays = (pack_int4(q.codes).numpy(), (q.scales.half() if half else q.scales.float()).numpy(),
                              pack_int4(q.zeros).numpy())
                    new_inits += [numpy_helper.from_array(a, nm) for a, nm in zip(arrays, names)]
                    touched.add(names[0])
                rows_out = f"{node.output[0]}_fp16" if half else node.output[0]
                new_nodes[id(node)] = [helper.make_node(
                    "GatherBlockQuantized", [names[0], node.input[1], *names[1:]], [rows_out],
                    name=f"{node.name or tag}_Q4", domain=MS_DOMAIN, gather_axis=0, quantize_axis=1,
                    block_size=q.group_size, bits=4)]
                if half:
                    new_nodes[id(node)].append(helper.make_node(
                        "Cast", [rows_out], [node.output[0]], name=f"{node.name or tag}_Q4_cast", to=TensorProto.FLOAT))
                counts["gather_block_quantized"] += 1
            else:
                how = "Gemm with transA/alpha/beta/bias it cannot express" if op == "Gemm" else f"input {idx} of {op}"
                left.append(f"{wname}: kept fp32, used as {how}")

    nodes = []
    for n in g.node:
        rep = new_nodes.get(id(n), n)
        nodes += rep if isinstance(rep, list) else [rep]
    # drop the fp32 tensors (and their Identity aliases) nothing reads any more
    while True:
        used = {x for n in nodes for x in n.input} | {o.name for o in g.output}
        dead = [n for n in nodes if n.op_type == "Identity" and n.output[0] not in used]
        if not dead:
            break
        nodes = [n for n in nodes if not (n.op_type == "Identity" and n.output[0] not in used)]
    del g.node[:]
    g.node.extend(nodes)
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return {"matmul_nbits": counts["matmul_nbits"], "gather_block_quantized": counts["gather_block_quantized"],
            "left_fp32": left, "accuracy_level": accuracy_level}



def with_accuracy_level(src: Path, dst: Path, level: int) -> Path:
    """A copy of an int4 file whose MatMulNBits nodes run at ``level`` (the weights are the same bytes)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept + ([helper.make_attribute("accuracy_level", level)] if level else []))
    onnx.save(model, str(dst))
    return Path(dst)


# ORT 1.32's CPU SkipLayerNormalization kernel measured ~7x slower than the Add + LayerNormalization it replaces
# (pruned MiniLM int8, batch 32 x 25, 2 threads: 7.7 ms vs 1.1 ms of 11-19 ms); it is only fused where the graph's
