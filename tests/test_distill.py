import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dpq.distill import KDConfig, KDLoss, attention_kl, default_layer_map, hidden_mse, soft_label_kd
from dpq.errors import DpqError


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_soft_label_kd_matches_hand_computation():
    s, t, T = [1.0, 2.0, -0.5], [3.0, 1.0, 0.0], 2.0
    ps, pt = softmax([x / T for x in s]), softmax([x / T for x in t])
    expected = T * T * sum(a * math.log(a / b) for a, b in zip(pt, ps))
    got = soft_label_kd(torch.tensor([s]), torch.tensor([t]), T)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # batchmean: two copies of the same row give the same value
    got2 = soft_label_kd(torch.tensor([s, s]), torch.tensor([t, t]), T)
    assert got2.item() == pytest.approx(expected, rel=1e-5)
    assert soft_label_kd(torch.tensor([t]), torch.tensor([t]), T).item() == pytest.approx(0.0, abs=1e-6)


def test_default_layer_map():
    assert default_layer_map(6, 12) == [2, 4, 6, 8, 10, 12]
    assert default_layer_map(2, 4) == [2, 4]


def test_hidden_mse_hand_value_and_padding_ignored():
    proj = nn.ModuleList([nn.Identity()])
    s = (torch.zeros(1, 3, 2), torch.zeros(1, 3, 2))
    t = (torch.zeros(1, 3, 2), torch.tensor([[[1.0, 3.0], [2.0, 2.0], [100.0, 100.0]]]))
    mask = torch.tensor([[1, 1, 0]])
    # positions 0 and 1 only: mean over dims (5, 4) then mean over positions = 4.5
    assert hidden_mse(s, t, proj, [1], mask, mask).item() == pytest.approx(4.5)


def test_attention_kl_zero_when_equal_positive_otherwise():
    a = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    b = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    mask = torch.ones(2, 5, dtype=torch.long)
    assert attention_kl((a,), (a,), [1], mask, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_kl((a,), (b,), [1], mask, mask).item() > 0


def _cfg(**kw):
    base = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4)
    base.update(kw)
    return SimpleNamespace(**base)


def test_kd_loss_mix_is_alpha_weighted():
    loss = KDLoss(KDConfig(temperature=3.0, alpha=0.25), _cfg(), _cfg(num_hidden_layers=4, hidden_size=48))
    s_logits, t_logits, y = torch.randn(4, 2), torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    total, logs = loss(SimpleNamespace(logits=s_logits), y, t_logits)
    ce = nn.functional.cross_entropy(s_logits, y)
    kd = soft_label_kd(s_logits, t_logits, 3.0)
    assert total.item() == pytest.approx((0.75 * ce + 0.25 * kd).item(), rel=1e-6)
    assert logs["ce"].item() == pytest.approx(ce.item())


def test_projection_shapes_and_attention_head_check():
    loss = KDLoss(KDConfig(hidden_weight=1.0), _cfg(), _cfg(num_hidden_layers=4, hidden_size=48))
    assert len(loss.projections) == 2 and loss.projections[0].weight.shape == (48, 32)
    assert loss.layer_map == [2, 4]
    with pytest.raises(DpqError, match="equal head counts"):
        KDLoss(KDConfig(attention_weight=1.0), _cfg(), _cfg(num_attention_heads=8))
    with pytest.raises(DpqError, match="layer_map"):
        KDLoss(KDConfig(hidden_weight=1.0, layer_map=[1, 9]), _cfg(), _cfg(num_hidden_layers=4))


@pytest.mark.parametrize("bad", [dict(temperature=0), dict(alpha=1.5), dict(hidden_weight=-1)])
def test_bad_kd_settings(bad):
    with pytest.raises(DpqError):
        KDConfig(**bad)


def test_one_distillation_step_lowers_the_loss(tiny_models):
    from dpq import models

    teacher, tok = models.load_classifier(str(tiny_models["teacher"]), eager_attention=True)
    student, _ = models.load_classifier(str(tiny_models["student"]), eager_attention=True)
    teacher.eval()
    kd = KDLoss(KDConfig(hidden_weight=1.0, attention_weight=1.0), student.config, teacher.config)
    params = list(student.parameters()) + list(kd.parameters())
    opt = torch.optim.SGD(params, lr=0.05)
    batch = tok(["a charming and affecting journey", "bleak and desperate", "it is good"], padding=True,
                return_tensors="pt")
    y = torch.tensor([1, 0, 1])
    student.train()
    torch.manual_seed(0)

    def step():
        s = student(**batch, output_hidden_states=True, output_attentions=True)
        with torch.no_grad():
            t = teacher(**batch, output_hidden_states=True, output_attentions=True)
        return kd(s, y, t.logits, t, batch["attention_mask"], batch["attention_mask"])

    student.eval()  # no dropout: the comparison is of the same function
    before, logs = step()
    assert {"ce", "kd", "hidden", "attention"} <= set(logs)
    before.backward()
    opt.step()
    opt.zero_grad()
    after, _ = step()
    assert after.item() < before.item()
