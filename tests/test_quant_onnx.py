"""ONNX Runtime integer files: int4 from our own codes (MatMulNBits / GatherBlockQuantized) and dynamic int8."""

import numpy as np
import pytest
import torch

from dpq import models
from dpq.onnx import export, runtime
from dpq.prune import HeadFfnMasks, PruneConfig, magnitude_scores, remove_masked
from dpq.quant.fake import quantize_rtn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from dpq.onnx.int4 import int4_onnx  # noqa: E402
from dpq.onnx.int8 import _cpu_flags, int8_onnx  # noqa: E402
from dpq.onnx.runtime import runtime_ops  # noqa: E402

GROUP = 16


@pytest.fixture(scope="module")
def ffn40(tiny_models, tmp_path_factory):
    """The student's shape with intermediate_size 40: the FFN output Linear has in_features = 40 = 16 + 16 + 8."""
    from conftest import make_tiny

    vocab = (tiny_models["student"] / "vocab.txt").read_text().split()
    return make_tiny(tmp_path_factory.mktemp("ffn40") / "m", vocab, hidden=32, layers=2, heads=4, ffn=40, seed=3)


def _quantize(model, group=GROUP):
    """RTN-quantize every encoder/pooler Linear and the word embeddings in place; return {name: (W, q)}."""
    weights = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            linear = isinstance(mod, torch.nn.Linear) and (".encoder." in f".{name}." or ".pooler." in f".{name}.")
            if linear or name.endswith("word_embeddings"):
                q = quantize_rtn(mod.weight, 4, group_size=group)
                mod.weight.copy_(q.dequantize())
                weights[f"{name}.weight"] = (mod.weight.detach().clone(), q)
    return weights


def _inputs(vocab_size, shape=(4, 23)):
    ids = torch.randint(5, vocab_size, shape)
    mask = torch.ones_like(ids)
    mask[0, shape[1] // 2:] = 0  # a padded row, as in test_export
    return ids, mask


def _ref(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.numpy()


def _packed_bytes(q, gather: bool) -> int:
    rows, cols = q.shape
    groups = -(-cols // q.group_size)
    data = rows * (-(-cols // 2) if gather else groups * q.group_size // 2)
    return data + rows * groups * 4 + rows * -(-groups // 2)  # codes, fp32 scales, packed zero points


def _init_bytes(path) -> int:
    return sum(t.ByteSize() for t in onnx.load(str(path)).graph.initializer)


@pytest.mark.parametrize("which", ["student", "ffn40"])
@pytest.mark.parametrize("accuracy_level,tol", [(0, 1e-4), (4, 0.05)])
def test_int4_runs_our_codes(tiny_models, ffn40, tmp_path, which, accuracy_level, tol):
    torch.manual_seed(0)
    folder = tiny_models["student"] if which == "student" else ffn40
    model, _ = models.load_classifier(str(folder))
    model.eval()
    weights = _quantize(model)
    n_linear = sum(1 for k in weights if "embeddings" not in k)
    assert n_linear == 2 * 6 + 1  # q, k, v, o, ffn in, ffn out per layer, and the pooler (a Gemm)
    fp32 = export.export_onnx(model, tmp_path / "fp32.onnx")
    report = int4_onnx(fp32, tmp_path / "int4.onnx", weights, accuracy_level=accuracy_level)
    assert report == {"matmul_nbits": n_linear, "gather_block_quantized": 1, "left_fp32": [],
                      "accuracy_level": accuracy_level}

    session = runtime.ort_session(tmp_path / "int4.onnx")
    for shape in [(1, 5), (4, 23)]:
        ids, mask = _inputs(model.config.vocab_size, shape)
        ref = _ref(model, ids, mask)
        diff = np.abs(runtime.ort_logits(session, ids, mask) - ref).max()
        # level 0: fp32 math on the exact dequantized weights; level 4: int8 activations, judged relative to the
        # logits (a random tiny model's logits are ~0.02, so an absolute bound would say nothing)
        bound = tol if accuracy_level == 0 else tol * np.abs(ref).max()
        assert diff <= bound, (diff, bound)

    if which == "student" and accuracy_level == 4:
        graph = onnx.load(str(tmp_path / "int4.onnx")).graph
        nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
        assert {a.name: onnx.helper.get_attribute_value(a) for a in nbits[0].attribute}["block_size"] == GROUP
        assert not any(t.data_type == onnx.TensorProto.FLOAT and tuple(t.dims) in {w.shape, w.T.shape}
                       for t in graph.initializer for w, _ in weights.values())  # the fp32 copies are gone
        # tiny model: graph structure and position embeddings are most of the file, so bound it exactly
        q_bytes = sum(_packed_bytes(q, "embeddings" in k) for k, (_, q) in weights.items())
        fp32_bytes = sum(4 * w.numel() for w, _ in weights.values())
        size, fp32_size = (tmp_path / "int4.onnx").stat().st_size, fp32.stat().st_size
        assert size <= fp32_size - fp32_bytes + q_bytes + 8192  # 8 KiB: names of the new tensors and nodes
        assert _init_bytes(tmp_path / "int4.onnx") <= 0.35 * _init_bytes(fp32)
        assert q_bytes <= 0.2 * fp32_bytes  # 4-bit codes + fp32 scale per 16: 0.78 bytes a weight


def _quantized_student(tiny_models):
    torch.manual_seed(0)
    model, _ = models.load_classifier(str(tiny_models["student"]))
    model.eval()
    return model, _quantize(model)


def test_int4_leaves_what_it_cannot_express_fp32(tiny_models, tmp_path):
    model, weights = _quantized_student(tiny_models)
    query = "bert.encoder.layer.0.attention.self.query.weight"
    w = model.bert.encoder.layer[0].attention.self.query.weight
    with torch.no_grad():
        q24 = quantize_rtn(w, 4, group_size=24)  # MatMulNBits blocks must be powers of 2
        w.copy_(q24.dequantize())
    weights[query] = (w.detach().clone(), q24)
    weights["not.in.graph.weight"] = (torch.ones(3, 32), quantize_rtn(torch.ones(3, 32), 4, group_size=16))
    fp32 = export.export_onnx(model, tmp_path / "fp32.onnx")
    report = int4_onnx(fp32, tmp_path / "int4.onnx", weights)
    assert report["matmul_nbits"] == 12 and report["gather_block_quantized"] == 1
    left = "\n".join(report["left_fp32"])
    assert len(report["left_fp32"]) == 2 and query in left and "power-of-2" in left and "not.in.graph" in left
    ids, mask = _inputs(model.config.vocab_size)
    out = runtime.ort_logits(runtime.ort_session(tmp_path / "int4.onnx"), ids, mask)
    ref = _ref(model, ids, mask)
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("pruned", [False, True])
def test_int8_dynamic_fuses_attention_and_stays_close(tiny_models, tmp_path, pruned):
    torch.manual_seed(0)
    model, _ = models.load_classifier(str(tiny_models["student"]))
    model.eval()
    if pruned:  # layer-adaptive: the layers keep different head counts, one num_heads cannot describe them
        masks = HeadFfnMasks.install(model)
        masks.update(magnitude_scores(model), PruneConfig(heads=0.5, ffn=0.5, allocation="layer-adaptive"))
        kept = remove_masked(model, masks)["kept_heads"]
        assert len({len(k) for k in kept}) > 1
    fp32 = export.export_onnx(model, tmp_path / "fp32.onnx")
    report = int8_onnx(fp32, tmp_path / "int8.onnx", weight_type="s8")
    vnni = bool(_cpu_flags() & {"avx512_vnni", "avx_vnni"})
    assert report["weight_type"] == "s8" and report["reduce_range"] is (not vnni)  # 7-bit only where U8S8 saturates
    assert report["fused_attention"] is True and report["ops"]["QAttention"] == 2
    assert report["ops"]["MatMulInteger"] + report["ops"]["DynamicQuantizeMatMul"] > 0
    session = runtime.ort_session(tmp_path / "int8.onnx")
    for shape in [(1, 5), (4, 23)]:
        ids, mask = _inputs(model.config.vocab_size, shape)
        ref = _ref(model, ids, mask)
        # per-channel weights, per-tensor dynamic activations: up to ~5% of these tiny logits (4 seeds)
        assert np.abs(runtime.ort_logits(session, ids, mask) - ref).max() <= 0.1 * np.abs(ref).max()


def test_int8_falls_back_to_the_unfused_graph_when_fusion_fails(tiny_models, tmp_path, monkeypatch):
    import onnxruntime.transformers.optimizer as optimizer

    def broken(*args, **kwargs):
        raise RuntimeError("fusion crashed")

    monkeypatch.setattr(optimizer, "optimize_model", broken)  # quantizes the unfused graph
    model, _ = models.load_classifier(str(tiny_models["student"]))
    fp32 = export.export_onnx(model.eval(), tmp_path / "fp32.onnx")
    report = int8_onnx(fp32, tmp_path / "int8.onnx")
    assert report["weight_type"] in ("s8", "u8") and report["why"]
    assert report["reduce_range"] == (report["weight_type"] == "s8"
                                      and not (_cpu_flags() & {"avx512_vnni", "avx_vnni"}))
    assert report["fused_attention"] is False and report["ops"]["QAttention"] == 0
    # the 12 encoder Linears, plus the pooler and classifier Gemms (the quantizer rewrites Gemm as MatMul + Add)
    assert report["ops"]["MatMulInteger"] == 2 * 6 + 2
    ids, mask = _inputs(model.config.vocab_size)
    ref = _ref(model, ids, mask)
    out = runtime.ort_logits(runtime.ort_session(tmp_path / "int8.onnx"), ids, mask)
    assert np.abs(out - ref).max() <= 0.1 * np.abs(ref).max()


def test_runtime_ops_name_the_kernels_that_run(tiny_models, tmp_path):
    model, _ = models.load_classifier(str(tiny_models["student"]))
    model.eval()
    weights = _quantize(model)
    fp32 = export.export_onnx(model, tmp_path / "fp32.onnx")
    int4_onnx(fp32, tmp_path / "int4.onnx", weights)
    ops = runtime_ops(tmp_path / "int4.onnx")
    assert ops["MatMulNBits"] == 13 and ops["GatherBlockQuantized"] == 1
    assert runtime_ops(fp32).get("MatMulNBits", 0) == 0
    int8_onnx(fp32, tmp_path / "int8.onnx", weight_type="u8")
    ops8 = runtime_ops(tmp_path / "int8.onnx")
    assert ops8.get("QAttention") == 2 and ops8.get("DynamicQuantizeMatMul", 0) > 0  # ORT fuses MatMulInteger


@pytest.mark.parametrize("weight_type", ["s8", "u8"])
@pytest.mark.parametrize("case", ["student-g16", "pruned-g24", "ffn40-asym"])
def test_int4_codes_on_int8_kernels_reproduce_the_int8_file(tiny_models, ffn40, tmp_path, case, weight_type):
    """4-bit on disk, expanded to int8 at load: the same logits as the int8 file of the same 4-bit model,
    nothing of the unpacking left at run time, and the file as small as the MatMulNBits one."""
    from dpq.onnx.int4_int8 import int4_int8_kernels_onnx

    torch.manual_seed(0)
    model, _ = models.load_classifier(str(ffn40 if case.startswith("ffn40") else tiny_models["student"]))
    model.eval()
    if case.startswith("pruned"):  # uneven heads per layer: QAttention weights of different widths
        masks = HeadFfnMasks.install(model)
        masks.update(magnitude_scores(model), PruneConfig(heads=0.5, ffn=0.5, allocation="layer-adaptive"))
        assert len({len(k) for k in remove_masked(model, masks)["kept_heads"]}) > 1
    group = 24 if case.endswith("g24") else GROUP  # 24: no MatMulNBits block, the int8 path takes any group
    weights = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if (isinstance(mod, torch.nn.Linear) and "classifier" not in name) or name.endswith("word_embeddings"):
                q = quantize_rtn(mod.weight, 4, group_size=GROUP if "embeddings" in name else group,
                                 symmetric=not case.endswith("asym"))
                mod.weight.copy_(q.dequantize())
                weights[f"{name}.weight"] = (mod.weight.detach().clone(), q)
    fp32 = export.export_onnx(model, tmp_path / "fp32.onnx")
    report = int4_int8_kernels_onnx(fp32, tmp_path / "w4.onnx", weights, weight_type=weight_type)
    assert report["int4_stored_int8_run"] == 2 * 6 + 1 and report["gather_block_quantized"] == 1  # + the pooler
    assert report["fused_attention"] is True and report["weight_type"] == weight_type
    assert report["left"] == ["model.classifier.weight_Transposed: stays int8, no 4-bit weight equals it"]

    ops = runtime_ops(tmp_path / "w4.onnx")
    assert ops.get("QAttention") == 2 and ops.get("DynamicQuantizeMatMul", 0) + ops.get("MatMulInteger", 0) > 0
    assert not {"BitShift", "Round", "Transpose"} & set(ops)  # the unpacking ran once, at session creation

    int8_onnx(fp32, tmp_path / "int8.onnx", weight_type=weight_type, embeddings=False, fuse_embeddings=False)
    w4, i8 = runtime.ort_session(tmp_path / "w4.onnx"), runtime.ort_session(tmp_path / "int8.onnx")
    for shape in [(1, 5), (4, 23)]:
        ids, mask = _inputs(model.config.vocab_size, shape)
        out = runtime.ort_logits(w4, ids, mask)
        np.testing.assert_allclose(out, runtime.ort_logits(i8, ids, mask), rtol=0, atol=1e-6)  # same int8 weights
        ref = _ref(model, ids, mask)
        assert np.abs(out - ref).max() <= 0.1 * np.abs(ref).max()  # int8 activations, as in the int8 test

    fp32_bytes = sum(4 * w.numel() for w, _ in weights.values())
    q_bytes = sum(_packed_bytes(q, "embeddings" in k) for k, (_, q) in weights.items())
    extra = (tmp_path / "w4.onnx").stat().st_size - (fp32.stat().st_size - fp32_bytes)
    channels = sum(w.shape[0] for k, (w, _) in weights.items() if "embeddings" not in k)
    # codes + scales, the int8 per-channel fp32 scale and zero point, and ~300 unpacking nodes (measured 38-52 KB
    # against 47-51 KB of codes and scales)
    assert extra <= q_bytes + 5 * channels + 16 * 1024, (extra, q_bytes)
    assert (tmp_path / "w4.onnx").stat().st_size < 0.7 * (tmp_path / "int8.onnx").stat().st_size


def test_int4_on_int8_kernels_keeps_int8_what_it_cannot_match(tiny_models, tmp_path):
    from dpq.onnx.int4_int8 import int4_int8_kernels_onnx

    model, weights = _quantized_student(tiny_models)
    query = "bert.encoder.layer.0.attention.self.query.weight"
    w, q = weights[query]
    weights[query] = (w + 1e-3, q)  # not the model's weight any more: its codes must not replace it
    fp32 = export.export_onnx(model, tmp_path / "fp32.onnx")
    report = int4_int8_kernels_onnx(fp32, tmp_path / "w4.onnx", weights)
    assert report["int4_stored_int8_run"] == 2 * 6 + 1 - 3  # layer 0's fused Q|K|V stays int8 as a whole
    assert sum("stays int8, no 4-bit weight" in x for x in report["left"]) == 2  # that and the classifier
    assert f"{query}: not stored in 4 bits" in report["left"]
    ids, mask = _inputs(model.config.vocab_size)
    ref = _ref(model, ids, mask)
    out = runtime.ort_logits(runtime.ort_session(tmp_path / "w4.onnx"), ids, mask)
    assert np.abs(out - ref).max() <= 0.1 * np.abs(ref).max()


def test_int8_can_run_without_the_skip_layer_norm_fusion(tiny_models, tmp_path, monkeypatch):
    """The int8 file keeps Add + LayerNormalization; ORT fuses them into SkipLayerNormalization at load unless the
    session disables that fusion. Both give the same logits; the export times both and records its choice, and
    every dpq session on the folder honours it."""
    from dpq.onnx.runtime import SLOW_FUSIONS, session_variants

    model, _ = models.load_classifier(str(tiny_models["student"]))
    fp32 = export.export_onnx(model.eval(), tmp_path / "fp32.onnx")
    int8_onnx(fp32, tmp_path / "int8.onnx", weight_type="s8")
    assert not any(n.op_type == "SkipLayerNormalization" for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node)
    fused, plain = runtime_ops(tmp_path / "int8.onnx"), runtime_ops(tmp_path / "int8.onnx", SLOW_FUSIONS)
    assert fused.get("SkipLayerNormalization") == 4 and not plain.get("SkipLayerNormalization")
    assert plain["LayerNormalization"] == fused.get("LayerNormalization", 0) + 4 and plain.get("QAttention") == 2
    assert session_variants(tmp_path / "int8.onnx") == [(), SLOW_FUSIONS]
    assert session_variants(fp32) == [()]  # nothing to gain where ORT does not fuse it
    ids, mask = _inputs(model.config.vocab_size)
    a = runtime.ort_logits(runtime.ort_session(tmp_path / "int8.onnx"), ids, mask)
    b = runtime.ort_logits(runtime.ort_session(tmp_path / "int8.onnx", disabled_optimizers=SLOW_FUSIONS), ids, mask)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)

    seen = []
    real = runtime.ort_session
    monkeypatch.setattr(runtime, "ort_session", lambda *a, **k: seen.append(k) or real(*a, **k))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "model.onnx").write_bytes((tmp_path / "int8.onnx").read_bytes())
    (folder / "export.json").write_text('{"runtime": "onnx-int8", "ort_disabled_optimizers": ["SkipLayerNormFusion"]}')
    model.config.save_pretrained(folder)
    models.load_tokenizer(str(tiny_models["student"])).save_pretrained(folder)
    runtime.load_onnx_folder(folder)
    assert seen[-1]["disabled_optimizers"] == ["SkipLayerNormFusion"]
