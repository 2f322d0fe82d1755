import pytest
import torch
from torch import nn

from dpq import models
from dpq.distill import GoRWeighting, ensemble_logits, soft_label_kd
from dpq.errors import DpqError
from dpq.quant.fake import (
    QATEmbedding,
    QATLinear,
    has_fp16_scales,
    lsq_fake_quant,
    pack_int4,
    quantize_rtn,
    unpack_int4,
)
from dpq.quant.packed import FILE, dequantized_state, load_qtensors, save_packed
from dpq.quant.ptq import QuantConfig, gptq_quantize, quantize_model
from dpq.quant.qat import QATConfig, convert_qat, prepare_qat


@pytest.mark.parametrize("group", [16, 32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_within_half_a_step_per_group(group, symmetric):
    torch.manual_seed(0)
    w = torch.randn(24, 200) * torch.rand(24, 1)  # 200 is not a multiple of any group: short last group
    q = quantize_rtn(w, 4, group, symmetric)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 15
    err = (w - q.dequantize()).abs()
    step = q.scales.repeat_interleave(group, dim=1)[:, :200]
    assert bool((err <= step / 2 + 1e-6).all())  # round-to-nearest: never more than half a step off
    assert q.scales.shape == (24, -(-200 // group))


def test_rtn_8bit_much_finer_than_4bit():
    w = torch.randn(64, 128)
    e4 = (w - quantize_rtn(w, 4, 32).dequantize()).pow(2).mean()
    e8 = (w - quantize_rtn(w, 8, 32).dequantize()).pow(2).mean()
    assert e8 < e4 / 100


def test_bad_bits_refused():
    with pytest.raises(DpqError, match="bits must be 4 or 8"):
        quantize_rtn(torch.randn(4, 8), 3, 4)


def test_pack_unpack_bit_exact_odd_length():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (7, 33), generator=g, dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (7, 17) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, 33), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)  # even index in the low nibble


def test_gptq_beats_rtn_on_output_error():
    torch.manual_seed(0)
    x = torch.randn(512, 64) @ torch.randn(64, 64)  # correlated inputs: where error compensation pays
    w = torch.randn(32, 64)
    h = 2 * x.T @ x / len(x)
    rtn = quantize_rtn(w, 4, 16)
    gq = gptq_quantize(w, h, 4, 16, symmetric=True)
    out_err = lambda q: ((x @ (w - q.dequantize()).T) ** 2).mean().item()
    assert out_err(gq) < 0.8 * out_err(rtn)


def test_lsq_gradients_reach_weights_and_steps():
    torch.manual_seed(0)
    lin = QATLinear(nn.Linear(40, 8), bits=4, group_size=16, act_bits=8)  # 40: short last group
    lin(torch.randn(5, 40)).pow(2).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    assert lin.step.grad is not None and lin.step.grad.abs().sum() > 0
    # the codes it reports are exactly what its forward used
    assert torch.allclose(lin.to_qtensor().dequantize(), lin.quantized_weight(), atol=1e-6)


def test_lsq_matches_rtn_at_initialisation():
    w = torch.randn(8, 64)
    rtn = quantize_rtn(w, 4, 32, symmetric=True)
    assert torch.allclose(lsq_fake_quant(w, rtn.scales, 4, 32), rtn.dequantize(), atol=1e-6)


def test_qat_embedding_quantizes_looked_up_rows():
    emb = QATEmbedding(nn.Embedding(100, 32), bits=4, group_size=16)
    ids = torch.tensor([[1, 5, 99]])
    ref = emb.to_qtensor().dequantize()[ids]
    assert torch.allclose(emb(ids), ref, rtol=2e-3, atol=1e-6)  # stored scales are fp16-rounded steps


def test_qat_embedding_gradients_are_the_same_every_time():
    """Frequent tokens repeat within a batch: their rows' gradients must add up in a fixed order, or one seed gives
    a different model each run (advanced indexing's CPU backward did not: QAT codes of two runs differed)."""
    torch.manual_seed(0)
    emb = QATEmbedding(nn.Embedding(20000, 384), bits=4, group_size=32)
    ids = torch.randint(0, 2000, (40, 32))
    g = torch.randn(40, 32, 384)

    def grads():
        emb.zero_grad(set_to_none=True)
        emb(ids).backward(g)
        return emb.weight.grad.clone(), emb.step.grad.clone()

    w0, s0 = grads()
    for _ in range(10):
        w, s = grads()
        assert torch.equal(w, w0) and torch.equal(s, s0)


def test_gor_parameters_get_gradients_and_weights_stay_positive():
    gor = GoRWeighting()
    opt = torch.optim.SGD(gor.parameters(), lr=1.0)
    for _ in range(50):  # a large KD loss pushes its weight down; a tiny task loss would push its weight to
        total, logs = gor(torch.tensor(1e-4), torch.tensor(20.0))  # 1e4 unclamped, so the clamp is what holds it
        opt.zero_grad()
        total.backward()
        assert gor.s_task.grad is not None and gor.s_kd.grad is not None
        opt.step()
    wt, wk = gor.weights()
    assert 0 < wk < 1 < wt and torch.isfinite(wt) and torch.isfinite(wk)
    assert wt <= torch.exp(torch.tensor(gor.s_max)) + 1e-4  # clamped range
    assert set(logs) == {"gor_w_task", "gor_w_kd"}


def test_gor_optimum_is_inverse_loss():
    # d/ds [exp(-s)·L + s] = 0  at  exp(-s) = 1/L
    gor = GoRWeighting()
    opt = torch.optim.Adam(gor.parameters(), lr=0.05)
    for _ in range(800):
        total, _ = gor(torch.tensor(0.5), torch.tensor(2.0))
        opt.zero_grad()
        total.backward()
        opt.step()
    wt, wk = gor.weights()
    assert abs(wt.item() - 2.0) < 0.05 and abs(wk.item() - 0.5) < 0.02


def test_ensemble_logits_average_the_softened_distributions():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    t = 2.0
    e = ensemble_logits([a, b], t)
    want = (torch.softmax(a / t, -1) + torch.softmax(b / t, -1)) / 2
    assert torch.allclose(torch.softmax(e / t, -1), want, atol=1e-6)
    assert soft_label_kd(a, ensemble_logits([a], t), t).abs() < 1e-5  # one teacher: plain KD


def _tiny(tiny_models):
    model, tok = models.load_classifier(str(tiny_models["student"]))
    return model.eval(), tok


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_ptq_packed_roundtrip_reloads_identical_logits(tiny_models, tmp_path, method):
    model, tok = _tiny(tiny_models)
    calib = [{"input_ids": torch.randint(5, model.config.vocab_size, (8, 12)),
              "attention_mask": torch.ones(8, 12, dtype=torch.long)} for _ in range(4)]
    cfg = QuantConfig(method=method, bits=4, group_size=16, embeddings=4)
    q = quantize_model(model, cfg, calib)
    assert all(has_fp16_scales(t) for t in q.values())  # half the scale bytes, on the grid the codes were made on
    n_linear = sum(isinstance(m, nn.Linear) for n, m in model.named_modules() if "classifier" not in n)
    assert len(q) == n_linear + 2  # + word and position embeddings
    out = tmp_path / "q"
    out.mkdir()
    model.config.dpq_quant = save_packed(model, q, out, {"method": method})
    model.config.save_pretrained(out)
    tok.save_pretrained(out)
    again, _ = models.load_classifier(str(out))
    ids = torch.randint(5, model.config.vocab_size, (3, 9))
    with torch.no_grad():
        assert torch.equal(again.eval()(input_ids=ids).logits, model(input_ids=ids).logits)
    # packed int4 is ~1/8 of fp32 for the quantized tensors
    qt, rest = load_qtensors(out, model.config.dpq_quant)
    assert all(torch.equal(qt[k].codes, q[k].codes) for k in q)
    fp32_bytes = sum(v.numel() * 4 for v in model.state_dict().values())
    assert (out / FILE).stat().st_size < 0.35 * fp32_bytes


def test_packed_file_not_matching_config_is_refused(tiny_models, tmp_path):
    model, tok = _tiny(tiny_models)
    q = quantize_model(model, QuantConfig(method="rtn", group_size=16))
    meta = save_packed(model, q, tmp_path, {"method": "rtn"})
    name = next(iter(meta["tensors"]))
    meta["tensors"][name]["shape"][1] += 16
    with pytest.raises(DpqError, match="config"):
        dequantized_state(tmp_path, meta)


def test_qat_prepare_convert_keeps_forward(tiny_models):
    model, _ = _tiny(tiny_models)
    prepare_qat(model, QATConfig(bits=4, group_size=16, embeddings=4))
    ids = torch.randint(5, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        fake = model(input_ids=ids).logits
    q = convert_qat(model)
    assert not any(isinstance(m, (QATLinear, QATEmbedding)) for m in model.modules())
    with torch.no_grad():
        # the forward pass trained on the fp16-rounded steps it stores, so the converted model is the same function
        assert torch.allclose(model(input_ids=ids).logits, fake, rtol=0, atol=1e-6)
    assert all(int(t.codes.max()) <= 15 for t in q.values())
    assert all(has_fp16_scales(t) for t in q.values())
