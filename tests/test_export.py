import sys

import pytest
import torch

from dpq import models
from dpq.errors import DpqError
from dpq.onnx import export, runtime
from dpq.prune import HeadFfnMasks, PruneConfig, magnitude_scores, remove_masked


@pytest.mark.parametrize("allocation", ["uniform", "layer-adaptive"])
def test_pruned_model_exports_with_smaller_shapes_and_matches(tiny_models, tmp_path, allocation):
    onnx = pytest.importorskip("onnx")
    model, _ = models.load_classifier(str(tiny_models["student"]))
    model.eval()
    full = models.param_count(model)
    masks = HeadFfnMasks.install(model)
    masks.update(magnitude_scores(model), PruneConfig(heads=0.5, ffn=0.5, allocation=allocation))
    remove_masked(model, masks)
    path = export.export_onnx(model, tmp_path / "m.onnx")
    assert not model.training
    stored = sum(int(torch.tensor(list(i.dims)).prod())
                 for i in onnx.load(str(path)).graph.initializer if len(i.dims) == 2)
    pruned = models.param_count(model)
    # the graph holds the smaller matrices, not masked full ones
    assert pruned < full and 0.8 * pruned <= stored <= pruned * 1.02
    session = runtime.ort_session(path)
    for shape in [(1, 5), (4, 23)]:
        ids = torch.randint(5, model.config.vocab_size, shape)
        mask = torch.ones_like(ids)
        mask[0, shape[1] // 2:] = 0  # padding honoured in the exported graph
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).logits.numpy()
        assert abs(runtime.ort_logits(session, ids, mask) - ref).max() < 1e-4


def test_export_without_onnx_names_the_extra(tiny_models, tmp_path, monkeypatch):
    model, _ = models.load_classifier(str(tiny_models["student"]))
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(DpqError, match=r"ONNX export needs onnx, which is not installed: pip install 'dpq\[onnx\]'"):
        export.export_onnx(model, tmp_path / "m.onnx")


def test_only_exporter_failures_are_reported_as_unsupported(tiny_models, tmp_path, monkeypatch):
    from torch.onnx.errors import UnsupportedOperatorError

    model, _ = models.load_classifier(str(tiny_models["student"]))

    def failing(exc):
        def fake_export(*args, **kwargs):
            raise exc
        return fake_export

    monkeypatch.setattr(torch.onnx, "export", failing(UnsupportedOperatorError("aten::foo", 17, None)))
    with pytest.raises(DpqError, match="ONNX export failed for bert: .*aten::foo"):
        export.export_onnx(model, tmp_path / "m.onnx")
    monkeypatch.setattr(torch.onnx, "export", failing(TypeError("a bug, in dpq or below it")))
    with pytest.raises(TypeError):
        export.export_onnx(model, tmp_path / "m.onnx")
