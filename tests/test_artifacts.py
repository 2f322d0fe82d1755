import json

import pytest

from dpq import artifacts
from dpq.errors import DpqError


def test_sealed_folder_has_manifest_with_checksums(tmp_path):
    out = tmp_path / "a"
    with artifacts.artifact_dir(out, kind="k", settings={"x": 1}) as tmp:
        (tmp / "w.bin").write_bytes(b"abc")
        assert not out.exists()  # nothing visible until sealed
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "k" and m["settings"] == {"x": 1}
    assert m["files"]["w.bin"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert artifacts.is_complete(out)
    artifacts.verify(out)


def test_failure_inside_leaves_no_folder_and_keeps_the_old_one(tmp_path):
    out = tmp_path / "a"
    with artifacts.artifact_dir(out, kind="k") as tmp:
        (tmp / "w.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with artifacts.artifact_dir(out, kind="k") as tmp:
            (tmp / "w.bin").write_bytes(b"half-written")
            raise RuntimeError("killed")
    assert (out / "w.bin").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temp folder left behind


def test_replacing_an_artifact(tmp_path):
    out = tmp_path / "a"
    for content in (b"one", b"two"):
        with artifacts.artifact_dir(out, kind="k") as tmp:
            (tmp / "w.bin").write_bytes(content)
    assert (out / "w.bin").read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_folder_without_manifest_is_not_complete(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"x")
    assert not artifacts.is_complete(tmp_path)
    with pytest.raises(DpqError, match="not a finished dpq artifact"):
        artifacts.verify(tmp_path)


def test_altered_and_missing_files_named(tmp_path):
    out = tmp_path / "a"
    with artifacts.artifact_dir(out, kind="k") as tmp:
        (tmp / "w.bin").write_bytes(b"abc")
        (tmp / "c.json").write_text("{}")
    (out / "w.bin").write_bytes(b"abd")
    with pytest.raises(DpqError, match=r"w.bin: checksum does not match"):
        artifacts.verify(out)
    artifacts.verify(out, ["c.json"])  # only the named files
    (out / "c.json").unlink()
    with pytest.raises(DpqError, match="c.json: listed in manifest.json but missing"):
        artifacts.verify(out, ["c.json"])


def test_sealed_files_are_readable_by_others_as_the_umask_allows(tmp_path):
    import os

    import torch
    from safetensors.torch import save_file

    out = tmp_path / "a"
    with artifacts.artifact_dir(out, kind="k") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors writes 0600
        (tmp / "private.bin").write_bytes(b"x")
        os.chmod(tmp / "private.bin", 0o600)
    mask = os.umask(0)
    os.umask(mask)
    for name in ("model.safetensors", "private.bin", "manifest.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
