"""benchmarks/mean_pooling.py: the patched head reads the masked mean of the sequence, for BERT and MPNet."""


import pytest
import torch
from conftest import load_benchmark
from transformers import MPNetConfig, MPNetForSequenceClassification

from dpq import models


@pytest.fixture(scope="module")
def mean_pooling():
    return load_benchmark("mean_pooling")


def _mpnet():
    torch.manual_seed(0)
    return MPNetForSequenceClassification(MPNetConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                      num_attention_heads=4, intermediate_size=64, num_labels=2))


def _bert(folder):
    return models.load_classifier(str(folder))[0]


@pytest.mark.parametrize("arch", ["bert", "mpnet"])
def test_head_reads_the_masked_mean_and_ignores_padding(mean_pooling, tiny_models, arch):
    model = (_bert(tiny_models["student"]) if arch == "bert" else _mpnet()).eval()
    ids = torch.tensor([[2, 7, 9, 11, 3]])
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        mean_pooling.read_mean(model)
        alone = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        padded_ids = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
        padded = model(input_ids=padded_ids, attention_mask=(padded_ids != 0).long()).logits
        hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states[-1]
    pooled = hidden.mean(1)
    if arch == "bert":
        want = model.classifier(torch.tanh(model.bert.pooler.dense(pooled)))
    else:
        want = model.classifier.out_proj(torch.tanh(model.classifier.dense(pooled)))
    assert torch.allclose(alone, want, atol=1e-5)
    assert not torch.allclose(alone, first, atol=1e-3)  # it is not the first token any more
    assert torch.allclose(padded, alone, atol=1e-5)  # padded positions are left out of the mean


def test_only_models_whose_id_matches_are_patched(mean_pooling, tiny_models, monkeypatch):
    ids = torch.tensor([[2, 7, 9, 3]])
    with torch.no_grad():
        before = {k: models.load_classifier(str(f))[0].eval()(input_ids=ids).logits for k, f in tiny_models.items()}
    monkeypatch.setattr(models, "load_classifier", models.load_classifier)  # undone after the test
    mean_pooling.patch("student")
    student, _ = models.load_classifier(str(tiny_models["student"]))
    teacher, _ = models.load_classifier(str(tiny_models["teacher"]))
    with torch.no_grad():  # what the patch changes is what the model computes, not only which function it calls
        assert not torch.allclose(student.eval()(input_ids=ids).logits, before["student"], atol=1e-4)
        assert torch.equal(teacher.eval()(input_ids=ids).logits, before["teacher"])
    assert student.bert.pooler.forward.__name__ == "<lambda>"
    assert teacher.bert.pooler.forward.__name__ == "forward"
    with torch.no_grad():
        assert student.eval()(input_ids=ids).logits.shape == (1, 2)  # no mask given: the plain mean
