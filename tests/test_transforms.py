"""Transforms record themselves in the saved config and register how to rebuild the model: loading needs no
knowledge of pruning or quantization, and a record this dpq cannot rebuild is refused in one line."""

import json

import pytest
import torch

from dpq import models, transforms
from dpq.errors import DpqError
from dpq.prune import HeadFfnMasks, PruneConfig, magnitude_scores, remove_masked
from dpq.quant.vocab import trim_vocab


def pruned_trimmed(tiny_models, tmp_path):
    model, tok = models.load_classifier(str(tiny_models["student"]))
    masks = HeadFfnMasks.install(model)
    masks.update(magnitude_scores(model), PruneConfig(heads=0.5, ffn=0.5))
    remove_masked(model, masks)
    trim_vocab(model, sorted(set(tok.all_special_ids) | set(range(5, 80))), tok.unk_token_id)
    folder = tmp_path / "m"
    models.save_classifier(model, tok, folder)
    return model.eval(), tok, folder


def test_transforms_record_themselves_and_the_folder_rebuilds(tiny_models, tmp_path):
    model, tok, folder = pruned_trimmed(tiny_models, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["dpq_transforms"] == [{"name": "prune", "version": 1, "module": "dpq.prune"},
                                     {"name": "vocab", "version": 1, "module": "dpq.quant.vocab"}]
    x = tok(["a charming journey", "bleak"], padding=True, return_tensors="pt")
    again, _ = models.load_model(folder)
    with torch.no_grad():
        torch.testing.assert_close(again(**x).logits, model(**x).logits)
    del cfg["dpq_transforms"]  # a folder written before records existed: rebuilt from its keys
    (folder / "config.json").write_text(json.dumps(cfg))
    older, _ = models.load_model(folder)
    with torch.no_grad():
        torch.testing.assert_close(older(**x).logits, model(**x).logits)


@pytest.mark.parametrize("record, message", [
    ({"name": "prune", "version": 2}, "prune version 2; this dpq reads up to version 1"),
    ({"name": "sparsify", "version": 1, "module": "dpq_sparsify"},
     "transform 'sparsify', which this dpq does not know"),
])
def test_a_record_this_dpq_cannot_rebuild_is_refused(tiny_models, tmp_path, record, message):
    _, _, folder = pruned_trimmed(tiny_models, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["dpq_transforms"].append(record)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DpqError, match=message):
        models.load_model(folder)


def test_a_registered_rebuild_is_applied_by_the_loader(tiny_models):
    seen = []
    toy = transforms.register(transforms.Rebuild("toy", 1, "dpq_toy", shape=lambda m: seen.append(m) or m))
    try:
        model, _ = models.load_classifier(str(tiny_models["student"]))
        model.config.dpq_toy = {"anything": 1}
        transforms.record(model.config, "toy")
        built = models.build_classifier(model.config)
        assert seen == [built]
    finally:
        transforms._TABLE.pop(toy.name)
