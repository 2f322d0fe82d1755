"""Dynamic int8 ONNX files for ONNX Runtime (CPU).

Why: attention is fused before quantizing (ORT's transformer optimizer), so QAttention replaces the fp32
attention glue. Signed weights (U8S8) use 7-bit ``reduce_range``: without VNNI the U8S8 kernel's int16 pair
sums can saturate, and without VNNI int8 gains little anyway (ORT issue #6695).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import DpqError

log = logging.getLogger("dpq")

INT8_OPS = ("Attention", "QAttention", "MatMulInteger", "DynamicQuantizeMatMul", "MatMul")


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()



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


@contextlib.contextmanager
def _root_logging_at(level: int):
    root = logging.getLogger()
    before = root.level
    root.setLevel(max(level, before))
    try:
        yield
    finally:
        root.setLevel(before)


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
        with _root_logging_at(logging.ERROR):  # the quantizer logs a line per tensor (and a hint) on the root logger
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
