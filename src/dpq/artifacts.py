"""Artifact folders that are complete or absent, never half-written.

A stage writes into a hidden temporary sibling folder, fsyncs every file, writes ``manifest.json``
(SHA-256 of every file, the settings that made it) last, and renames the folder into place. A folder
without a manifest is therefore never taken for a finished artifact, and a checksum mismatch on load
names the file that changed.

One file is left out of the checksums: the model card (``README.md``). It describes the weights rather than being
part of them, and ``dpq report`` rewrites it with the run's evaluation after the folder is sealed; listing it would
make every evaluated folder look altered, while the settings hash that stage skipping reads never depended on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import DpqError

MANIFEST = "manifest.json"
CARD = "README.md"  # the model card: rewritten after sealing, never checksummed


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    with contextlib.suppress(OSError):
        fd = os.open(root, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; an artifact is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def settings_hash(settings: dict) -> str:
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@contextlib.contextmanager
def artifact_dir(final: Path, *, kind: str, settings: dict | None = None) -> Iterator[Path]:
    """Yield a temporary folder; on clean exit, seal it with a manifest and rename it to ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for p in tmp.rglob("*"):  # some writers (safetensors) create 0600 files; an artifact is meant to be shared
            if p.is_file():
                os.chmod(p, 0o666 & ~_umask())
        files = {
            str(p.relative_to(tmp)): sha256_file(p)
            for p in sorted(tmp.rglob("*"))
            if p.is_file() and p.name != MANIFEST and p.relative_to(tmp) != Path(CARD)
        }
        manifest = {
            "kind": kind,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "settings": settings or {},
            "settings_hash": settings_hash(settings or {}),
            "files": files,
        }
        # the manifest is the completion marker: written after everything else, inside the temp folder
        write_json_atomic(tmp / MANIFEST, manifest)
        _fsync_tree(tmp)
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DpqError(f"{path}: manifest is not valid JSON ({e})") from None


def is_complete(folder: Path) -> bool:
    return read_manifest(folder) is not None


def verify(folder: Path, names: list[str] | None = None) -> dict:
    """Check the SHA-256 of the artifact's files (all, or ``names``); raise naming the first bad file."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise DpqError(f"{folder}: not a finished dpq artifact (no {MANIFEST}); was its stage interrupted?")
    for name, digest in manifest["files"].items():
        if names is not None and name not in names:
            continue
        path = folder / name
        if not path.is_file():
            raise DpqError(f"{path}: listed in {MANIFEST} but missing")
        if sha256_file(path) != digest:
            raise DpqError(f"{path}: checksum does not match {MANIFEST} (file altered or truncated)")
    return manifest
