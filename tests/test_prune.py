import json

import pytest
import torch

from dpq import artifacts, load_model, models
from dpq.errors import DpqError
from dpq.prune import (
    GradientSensitivity,
    HeadFfnMasks,
    PruneConfig,
    cubic_fraction,
    importance,
    layers,
    magnitude_scores,
    remove_masked,
)


def tiny(tiny_models):
    model, tok = models.load_classifier(str(tiny_models["student"]))  # 2 layers, 4 heads of 8, FFN 64
    return model.eval(), tok


def batch(tok):
    return tok(["a charming and often affecting journey", "bleak", "it is not good at all"], padding=True,
               return_tensors="pt")


def test_planted_weak_head_and_neuron_rank_last(tiny_models):
    model, _ = tiny(tiny_models)
    l = layers(model)[1]
    with torch.no_grad():
        for lin in (l.q, l.k, l.v):
            lin.weight[2 * 8:3 * 8] *= 0.01  # head 2 of layer 1
        l.o.weight[:, 2 * 8:3 * 8] *= 0.01
        l.ffn_in.weight[17] *= 0.01
        l.ffn_out.weight[:, 17] *= 0.01
    s = magnitude_scores(model)
    assert int(torch.argmin(s["heads"][1])) == 2
    assert int(torch.argmin(s["ffn"][1])) == 17
    masks = HeadFfnMasks.install(model)
    masks.update(s, PruneConfig(heads=0.25, ffn=1 / 64, allocation="uniform"))
    assert masks.head[1].tolist() == [1, 1, 0, 1] and masks.ffn[1][17] == 0


def test_gradient_sensitivity_finds_an_unused_head(tiny_models, sst2_slice):
    model, tok = tiny(tiny_models)
    l = layers(model)[0]
    with torch.no_grad():  # head 1 of layer 0 contributes nothing: its output columns are zero
        l.o.weight[:, 8:16] = 0
    sens = GradientSensitivity(model)
    for _ in range(2):
        out = model(**batch(tok), labels=torch.tensor([1, 0, 0]))
        out.loss.backward()
        sens.accumulate()
        model.zero_grad()
    s = sens.scores()
    assert int(sens.steps) == 2 and s["heads"][0][1] == 0 and (s["heads"][0][[0, 2, 3]] > 0).all()
    combined = importance(model, s, PruneConfig(importance="combined"))
    assert int(torch.argmin(combined["heads"][0])) == 1


def test_removal_matches_masked_logits_and_counts(tiny_models):
    model, tok = tiny(tiny_models)
    n0 = models.param_count(model)
    masks = HeadFfnMasks.install(model)
    masks.update(magnitude_scores(model), PruneConfig(heads=0.5, ffn=0.5, allocation="layer-adaptive"))
    with torch.no_grad():
        masked = model(**batch(tok)).logits
    info = remove_masked(model, masks)
    with torch.no_grad():
        pruned = model(**batch(tok)).logits
    torch.testing.assert_close(pruned, masked, rtol=1e-5, atol=1e-6)
    heads_left = sum(len(h) for h in info["kept_heads"])
    ffn_left = sum(info["ffn_sizes"])
    assert heads_left == 4 and ffn_left == 64
    # per head: Q,K,V rows (3*(32*8+8)) + O columns (8*32); per neuron: in row (32+1) + out column (32)
    removed = (8 - heads_left) * (3 * (32 * 8 + 8) + 8 * 32) + (128 - ffn_left) * (32 + 1 + 32)
    assert models.param_count(model) == n0 - removed


def test_pruned_model_saves_and_reloads_identically(tiny_models, tmp_path):
    model, tok = tiny(tiny_models)
    masks = HeadFfnMasks.install(model)
    masks.update(magnitude_scores(model), PruneConfig(heads=0.3, ffn=0.4, allocation="layer-adaptive"))
    remove_masked(model, masks)
    with artifacts.artifact_dir(tmp_path / "p", kind="prune") as tmp:
        models.save_classifier(model, tok, tmp)
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert len(cfg["dpq_kept_heads"]) == 2 and len(cfg["dpq_ffn_sizes"]) == 2
    loaded, _ = load_model(tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch(tok)).logits, model(**batch(tok)).logits, rtol=0, atol=0)
    assert models.param_count(loaded) == models.param_count(model)


def test_pruning_an_already_pruned_model(tiny_models):
    model, tok = tiny(tiny_models)
    for frac in (0.25, 0.5):
        masks = HeadFfnMasks.install(model)
        masks.update(magnitude_scores(model), PruneConfig(heads=frac, ffn=frac))
        remove_masked(model, masks)
    # 4 heads -> 3 -> 3 - round(1.5) = 1 per layer; kept indices refer to the original heads
    assert [len(h) for h in model.config.dpq_kept_heads] == [1, 1]
    assert all(set(h) <= {0, 1, 2, 3} for h in model.config.dpq_kept_heads)
    assert model.config.dpq_ffn_sizes == [24, 24]
    with torch.no_grad():
        assert torch.isfinite(model(**batch(tok)).logits).all()


def test_every_layer_keeps_a_head(tiny_models):
    model, _ = tiny(tiny_models)
    masks = HeadFfnMasks.install(model)
    masks.update(magnitude_scores(model), PruneConfig(heads=0.99, ffn=0.99, allocation="layer-adaptive"))
    assert all(m.sum() >= 1 for m in masks.head) and all(m.sum() >= 1 for m in masks.ffn)


@pytest.mark.parametrize("bad", [dict(heads=1.0), dict(ffn=-0.1), dict(importance="random"), dict(allocation="x")])
def test_bad_prune_config(bad):
    with pytest.raises(DpqError):
        PruneConfig(**bad)


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    m = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(DpqError, match="not 'gpt2'"):
        layers(m)


def test_cubic_schedule_values():
    assert cubic_fraction(0, 10, 110) == 0.0 and cubic_fraction(10, 10, 110) == 0.0
    assert cubic_fraction(60, 10, 110) == pytest.approx(1 - 0.5 ** 3)
    assert cubic_fraction(110, 10, 110) == 1.0 and cubic_fraction(500, 10, 110) == 1.0
    vals = [cubic_fraction(s, 0, 100) for s in range(0, 101, 10)]
    assert vals == sorted(vals)
    assert vals[1] - vals[0] > vals[-1] - vals[-2]  # fast early, slow late


def test_interrupted_pruning_run_resumes_to_the_same_model(tiny_models, sst2_slice, tmp_path):
    """Masks and the importance window live in the checkpoint, so a killed pruning run resumes exactly."""
    import dataclasses

    from dpq.data import load_data
    from dpq.recipe import PruneSettings, TeacherSettings
    from dpq.stages import finetune_stage, prune_stage
    from dpq.train import StopAt, _StopForTest

    data = load_data(sst2_slice)
    t = finetune_stage(TeacherSettings(epochs=1, max_train_samples=32, batch_size=16), str(tiny_models["teacher"]),
                       data, tmp_path / "teacher", kind="teacher", stage_settings={})
    s = PruneSettings(heads=0.5, ffn=0.5, epochs=2, max_train_samples=64, batch_size=16, update_every=1,
                      prune_end=0.5, checkpoint_every=2, importance="combined")
    settings = dataclasses.asdict(s)
    a = prune_stage(s, tiny_models["student"], t, data, tmp_path / "a", stage_settings=settings)
    with pytest.raises(_StopForTest):
        prune_stage(s, tiny_models["student"], t, data, tmp_path / "b", stage_settings=settings, hooks=[StopAt(5)])
    assert not (tmp_path / "b").exists()  # a killed stage leaves no folder that looks complete
    b = prune_stage(s, tiny_models["student"], t, data, tmp_path / "b", stage_settings=settings)
    ma, mb = json.loads((a / "metrics.json").read_text()), json.loads((b / "metrics.json").read_text())
    assert ma["structure"] == mb["structure"]
    ra, _ = load_model(a)
    rb, _ = load_model(b)
    for (k, va), vb in zip(ra.state_dict().items(), rb.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6, msg=k)


def _arch(name):
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        MPNetConfig,
        MPNetForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    torch.manual_seed(0)
    if name == "mpnet":
        return MPNetForSequenceClassification(MPNetConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=64))
    if name == "distilbert":
        return DistilBertForSequenceClassification(DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4,
                                                                    hidden_dim=64))
    return RobertaForSequenceClassification(RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=64))


@pytest.mark.parametrize("arch", ["mpnet", "distilbert", "roberta"])
def test_other_encoders_prune_reload_and_match(arch, tmp_path):
    model = _arch(arch).eval()
    ids = torch.randint(5, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    masks = HeadFfnMasks.install(model)
    # layer-adaptive: layers keep different head sets, which MPNet's shared position bias must follow
    masks.update(magnitude_scores(model), PruneConfig(heads=0.5, ffn=0.5, allocation="layer-adaptive"))
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=mask).logits
    n0 = models.param_count(model)
    remove_masked(model, masks)
    assert models.param_count(model) < n0
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, masked, rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("")  # no tokenizer needed for this check
    from transformers import AutoConfig

    from dpq.models import _load_built

    reloaded = _load_built(str(tmp_path), AutoConfig.from_pretrained(tmp_path), False).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, masked, rtol=1e-5, atol=1e-6)
