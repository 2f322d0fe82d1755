"""Integer ONNX files for ONNX Runtime (CPU): dynamic int8, and a real 4-bit file built from our own codes.

Why it is done this way:
- int4: ``MatMulNBits`` / ``GatherBlockQuantized`` get *our* codes, scales and zero points (PTQ/QAT chose them;
  ORT's quantizer would re-round the weights). Initializers are found by value: the TorchScript exporter renames
  and transposes them. Without ``accuracy_level=4`` MatMulNBits dequantizes to fp32 and runs an fp32 GEMM,
  which is why it is far slower than dynamic int8 (ORT issue #23004); 4 quantizes activations to int8 inside it.
- int8: attention is fused before quantizing (ORT's transformer optimizer), so QAttention replaces the fp32
  attention glue. Signed weights (U8S8) use 7-bit ``reduce_range``: without VNNI the U8S8 kernel's int16 pair
  sums can saturate, and without VNNI int8 gains little anyway (ORT issue #6695).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..errors import DpqError
from .fake import QTensor, has_fp16_scales, is_symmetric, pack_int4

log = logging.getLogger("dpq")

MS_DOMAIN = "com.microsoft"
INT8_OPS = ("Attention", "QAttention", "MatMulInteger", "DynamicQuantizeMatMul", "MatMul")


# ----------------------------------------------------------------------------- int4


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


# ----------------------------------------------------------------------------- int8


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


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
# shapes are known, as in the attention-fused int8 graphs, so the export times the session with it disabled too
SLOW_FUSIONS = ("SkipLayerNormFusion",)


def session_variants(path: Path) -> list[tuple[str, ...]]:
    """Optimizer sets worth timing for this file: none disabled, and the slow fusions when ORT applies them."""
    ops = runtime_ops(path)
    return [()] + ([SLOW_FUSIONS] if ops.get("SkipLayerNormalization") else [])


def pick_fastest(candidates: dict[str, tuple[Path, tuple[str, ...]]], *, seq: int = 32,
                 batches: tuple[int, ...] = (1, 32)) -> tuple[str, dict[str, dict[str, float]]]:
    """The (file, disabled ORT optimizers) candidate that runs fastest here: median ms at each batch x seq
    (interleaved, so load hits all alike), ranked by the geometric mean over the batch sizes.

    Which int4 kernel wins depends on the CPU (ORT #23004): MatMulNBits level 4 quantizes activations to int8
    inside the kernel, level 0 dequantizes the weights to fp32, and the int8-kernel file runs
    DynamicQuantizeMatMul/QAttention on codes expanded at load. Measured, not assumed.
    """
    from .. import export, measure

    sessions = {k: export.ort_session(f, threads=torch.get_num_threads(), disabled_optimizers=d)
                for k, (f, d) in candidates.items()}
    times: dict[str, dict[str, float]] = {k: {} for k in sessions}
    for bs in batches:
        ids = torch.randint(5, 100, (bs, seq))
        mask = torch.ones_like(ids)
        fns = [{"ms": (lambda s=s: export.ort_logits(s, ids, mask))} for s in sessions.values()]
        rows = measure.interleaved_latency_ms(fns, rounds=4, repeats=3 if bs > 8 else 10, warmup=2)
        for k, r in zip(sessions, rows):
            times[k][f"bs{bs}"] = round(r["ms"], 3)
    score = {k: float(np.mean(np.log(list(t.values())))) for k, t in times.items()}
    return min(score, key=score.get), times


def auto_weight_type() -> tuple[str, str]:
    """("s8" | "u8", why).

    Measured on a 2-core AVX512-VNNI box (MiniLM-sized random BERT, batch 32 x 25, 2 threads, fused attention):
    s8 ~130 ms, u8 ~178 ms, fp32 ~180 ms, so U8U8 buys nothing there. Without VNNI, u8 is the untimed safe default.
    """
    vnni = sorted(_cpu_flags() & {"avx512_vnni", "avx_vnni"})
    if vnni:
        return "s8", f"CPU has {vnni[0]}: U8S8 measured ~1.4x faster than U8U8 on a VNNI CPU"
    return "u8", "no VNNI on this CPU: U8U8 avoids the U8S8 int16 saturation path"


def _explicit_heads(model) -> int:
    """Write each layer's head count into its Q/K/V Reshape: the exporter writes (batch, seq, -1, head_dim), from
    which the fusion cannot tell the heads, and one ``num_heads`` is wrong for pruned layers of uneven widths."""
    from onnx import numpy_helper

    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}

    def const(name):
        n = prod.get(name)
        if n is not None and n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            return numpy_helper.to_array(n.attribute[0].t)
        return numpy_helper.to_array(inits[name]) if name in inits else None

    patched = 0
    for node in g.node:
        if node.op_type != "Reshape" or node.input[1] not in prod or prod[node.input[1]].op_type != "Concat":
            continue
        concat, src = prod[node.input[1]], prod.get(node.input[0])
        if src is not None and src.op_type == "Add":  # the bias of the projection
            src = next((prod[x] for x in src.input if x in prod and prod[x].op_type == "MatMul"), None)
        if len(concat.input) != 4 or src is None or src.op_type != "MatMul" or src.input[1] not in inits:
            continue
        minus1, head_dim = const(concat.input[2]), const(concat.input[3])
        width = inits[src.input[1]].dims[-1]
        if minus1 is None or head_dim is None or minus1.size != 1 or head_dim.size != 1 or int(minus1[0]) != -1:
            continue
        if int(head_dim[0]) <= 0 or width % int(head_dim[0]):
            continue
        name = f"{concat.name or node.name}_heads"
        g.initializer.append(numpy_helper.from_array(np.array([width // int(head_dim[0])], dtype=np.int64), name))
        concat.input[2] = name
        patched += 1
    used = {x for n in g.node for x in n.input}
    orphans = [n for n in g.node if n.op_type == "Constant" and n.output[0] not in used]
    for n in orphans:  # the -1 constants: ORT would warn about each one
        g.node.remove(n)
    return patched


def _agree(a: Path, b: Path) -> bool:
    """Same fp32 logits on a padded random batch (a fusion that misread a layer's heads would not be)."""
    import onnx
    import onnxruntime as ort

    g = onnx.load(str(a)).graph
    tables = {n.input[0] for n in g.node if n.op_type == "Gather" and n.input[1] == "input_ids"}
    vocab = min((t.dims[0] for t in g.initializer if t.name in tables), default=6)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, vocab, size=(3, 19)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    outs = []
    for p in (a, b):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        s = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
        outs.append(s.run(None, {"input_ids": ids, "attention_mask": mask})[0])
    return bool(np.abs(outs[0] - outs[1]).max() <= 1e-3 * max(1.0, float(np.abs(outs[0]).max())))


def int8_onnx(fp32_onnx: Path, out: Path, *, weight_type: str = "auto", embeddings: bool = True,
              fuse_embeddings: bool = True, keep_source: Path | None = None) -> dict:
    """Dynamic int8 (per-channel weights, activations quantized at run time) of MatMul/Attention weights.

    Attention is fused first, each layer's heads read from its weights, so pruned layers with different head
    counts fuse too. A fused graph that does not reproduce the fp32 logits is dropped.
    ``fuse_embeddings=False`` keeps the embedding lookups as Gathers; ``keep_source`` receives a copy of the fp32
    graph that was quantized (its initializer ``X`` became ``X_quantized``).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    why = f"asked for {weight_type}"
    if weight_type == "auto":
        weight_type, why = auto_weight_type()
    if weight_type not in ("s8", "u8"):
        raise DpqError(f"weight_type must be auto, s8 or u8 (got {weight_type})")
    # 7-bit weights only where U8S8 can saturate: CPUs without VNNI (measured: no speed cost either way with VNNI)
    reduce_range = weight_type == "s8" and not (_cpu_flags() & {"avx512_vnni", "avx_vnni"})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fused = False
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(fp32_onnx)
        try:
            from onnxruntime.transformers.optimizer import optimize_model

            model = onnx.load(str(src))
            _explicit_heads(model)
            onnx.save(model, str(Path(tmp) / "heads.onnx"))
            # level 1 only: level 2 adds CPU-specific fusions (FusedMatMul, ...) the quantizer cannot handle
            from onnxruntime.transformers.fusion_options import FusionOptions

            opts = FusionOptions("bert")
            opts.enable_embed_layer_norm = fuse_embeddings
            opts.enable_skip_layer_norm = False  # see SLOW_FUSIONS: the session decides, by timing
            opt = optimize_model(str(Path(tmp) / "heads.onnx"), model_type="bert", num_heads=0,
                                 hidden_size=0, opt_level=1, use_gpu=False, optimization_options=opts)
            fused_path = Path(tmp) / "fused.onnx"
            opt.save_model_to_file(str(fused_path))
            if not _agree(src, fused_path):
                raise RuntimeError("the fused graph does not reproduce the fp32 logits")
            fused = any(n.op_type == "Attention" for n in opt.model.graph.node)
            src = fused_path
        except Exception as e:  # quantize the unfused graph rather than fail or ship a wrong fusion
            log.warning("attention fusion dropped (%s), quantizing the unfused graph", str(e).splitlines()[0][:160])
            src, fused = Path(fp32_onnx), False
        # contrib ops from the fusion have no ONNX type inference: their outputs are fp32 in this graph
        # embeddings too (uint8 table, dequantized after the lookup): otherwise they are 3/4 of the int8 file
        ops = ["MatMul", "Attention"] + (["Gather", "EmbedLayerNormalization"] if embeddings else [])
        quantize_dynamic(str(src), str(out), op_types_to_quantize=ops, per_channel=True,
                         reduce_range=reduce_range,
                         weight_type=QuantType.QInt8 if weight_type == "s8" else QuantType.QUInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        if keep_source is not None:
            shutil.copyfile(src, keep_source)
    ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    return {"weight_type": weight_type, "reduce_range": reduce_range, "why": why, "fused_attention": fused,
            "embeddings_int8": embeddings,
            "ops": {k: ops.get(k, 0) for k in INT8_OPS}}


# ----------------------------------------------------------------------------- what runs


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
