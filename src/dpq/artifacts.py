"""Artifact folders that are complete or absent, never half-written.

A stage writes into a hidden temporary sibling folder, fsyncs every file, writes ``manifest.json``
(SHA-256 of every file, the settings that made it) last, and renames the folder into place. A folder
without a manifest is therefore never taken for a finished artifact, and a checksum mismatch on load
names the file that changed.

One file is left out of the checksums: the model card (``README.md``). It describes the weights rather than being
part of them, and ``dpq report`` rewrites it with the run's evaluation after the folder is sealed; listing it would
make every evaluated folder look altered, while the settings hash that stage skipping reads never depended on it.

dpq replaces only what it wrote: an existing output folder is replaced only when it is empty or a sealed artifact of
the same kind holding nothing its manifest does not list (``check_replaceable``), and a run folder is one dpq marked
as its own (``RUN_MARKER``). The temporary and set-aside folders carry the writer's pid, so the next writer removes
those of a process that died (``clean_stale``) instead of leaving them forever.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import DpqError

MANIFEST = "manifest.json"
CARD = "README.md"  # the model card: rewritten after sealing, never checksummed
RUN_MARKER = ".dpq-run.json"  # "dpq made this run folder": written when the run folder is created


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


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` under a unique temporary name, fsync it, and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; an artifact is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def settings_hash(settings: dict) -> str:
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@contextlib.contextmanager
def artifact_dir(final: Path, *, kind: str, settings: dict | None = None) -> Iterator[Path]:
    """Yield a temporary folder; on clean exit, seal it with a manifest and rename it to ``final``.

    ``final`` must be new, empty, or an earlier ``kind`` artifact holding only its own files (``check_replaceable``,
    asked again just before the swap). A ``final`` that is a link is followed: the folder it points to is replaced
    and the link keeps pointing at the new one, so no link is ever renamed aside and left behind."""
    check_replaceable(final, kind)
    final = followed(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{_temp_prefix(final)}{os.getpid()}-"))
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
        check_replaceable(final, kind)  # a file put into the old folder while this one was made is not deleted
        if final.exists():
            old = final.parent / f"{_old_prefix(final)}{os.getpid()}"
            if old.exists():  # set aside by this very process earlier and not removed (an error in rmtree)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def followed(folder: Path) -> Path:
    """``folder``, or the folder it links to: what is written is the target, the link stays as the user made it."""
    folder = Path(folder)
    return folder.resolve() if folder.is_symlink() else folder


def _temp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def _old_prefix(final: Path) -> str:
    return f".{final.name}.old-"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale(final: Path) -> None:
    """Remove what a killed writer of ``final`` left beside it: its temporary folders, and a previous version it
    had set aside (put back when ``final`` itself is missing, as after a kill between the two renames). Only names
    that carry a pid no process has any more are touched; leftovers from before pids were in the names, and those
    of live processes, are left alone."""
    final = Path(final)
    parent = final.parent
    if not parent.is_dir():
        return
    tmp_name = re.compile(re.escape(_temp_prefix(final)) + r"(\d+)-[^/]*")
    old_name = re.compile(re.escape(_old_prefix(final)) + r"(\d+)")
    for entry in os.scandir(parent):
        if (m := tmp_name.fullmatch(entry.name)) and not _pid_alive(int(m.group(1))):
            _remove(Path(entry.path))
        elif (m := old_name.fullmatch(entry.name)) and not _pid_alive(int(m.group(1))):
            if entry.is_dir(follow_symlinks=False) and not final.exists() and not final.is_symlink():
                os.replace(entry.path, final)
            else:
                _remove(Path(entry.path))


def _remove(path: Path) -> None:
    """A link is removed itself (never what it points to), a folder with what it holds."""
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _json_or_none(path: Path):
    """The file's JSON, or None when it is absent, unreadable or not JSON (so it marks nothing as dpq's)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def dpq_manifest(folder: Path) -> dict | None:
    """``folder``'s manifest when it is a dpq one (a mapping with a kind, its files and a settings hash), else None:
    a ``manifest.json`` of some other tool, or one cut short, never makes a folder dpq's."""
    m = _json_or_none(Path(folder) / MANIFEST)
    ok = isinstance(m, dict) and isinstance(m.get("kind"), str) and isinstance(m.get("files"), dict)
    return m if ok and "settings_hash" in m else None


# a card rewrite cut short (cards.write's temporary file): dpq's own, not the user's
_CARD_TEMP = re.compile(re.escape(f".{CARD}.") + r".+\.tmp")


def foreign_files(folder: Path, manifest: dict) -> list[str]:
    """Files (and links, and special files) under ``folder`` that its manifest does not list: not dpq's."""
    folder = Path(folder)
    listed = set(manifest["files"]) | {MANIFEST, CARD}
    found = []
    for root, dirs, names in os.walk(folder):  # a link to a folder is an entry here, never walked into
        rel = Path(root).relative_to(folder)
        entries = names + [d for d in dirs if os.path.islink(os.path.join(root, d))]
        for name in sorted(entries):
            path = (rel / name).as_posix()
            if path not in listed and not (rel == Path(".") and _CARD_TEMP.fullmatch(name)):
                found.append(path)
    return found


def _first_entry(folder: Path) -> str:
    return min(p.name for p in Path(folder).iterdir())


def _inside_an_artifact(folder: Path) -> tuple[Path, dict] | None:
    for parent in Path(folder).resolve().parents:
        if (m := dpq_manifest(parent)) is not None:
            return parent, m
    return None


def _check_location(folder: Path, what: str) -> Path:
    """The folder that will be written (a link followed); refused when it is a dangling link, not a folder, or
    inside a sealed artifact (whose files are exactly those its manifest lists)."""
    folder = Path(folder)
    if folder.is_symlink() and not folder.exists():
        raise DpqError(f"{folder}: a symbolic link to nothing ({os.readlink(folder)}); remove it or choose another "
                       f"{what}")
    target = followed(folder)
    if (inside := _inside_an_artifact(target)) is not None:
        raise DpqError(f"{folder}: inside {inside[0]}, a dpq {inside[1]['kind']} folder, which holds only its own "
                       f"files; choose a {what} outside it")
    if target.exists() and not target.is_dir():
        raise DpqError(f"{folder}: exists and is not a folder")
    return target


def _entries(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in Path(folder).iterdir())
    except OSError as e:
        raise DpqError(f"{folder}: cannot read the folder ({e.strerror})") from None


def check_replaceable(final: Path, kind: str) -> None:
    """Refuse in one line, before any work, an output folder dpq may not replace: anything but a new or empty folder
    or an earlier ``kind`` artifact that holds nothing its manifest does not list."""
    target = _check_location(final, "output folder")
    if not target.exists() or not _entries(target):
        return
    manifest = dpq_manifest(target)
    if manifest is None:
        what = ("a dpq run folder" if is_run_folder(target)
                else f"a folder of files dpq did not write ({_first_entry(target)}, …)")
        raise DpqError(f"{final}: {what}; dpq replaces only an earlier {kind} folder it wrote itself: choose a new "
                       "or empty output folder")
    if manifest["kind"] != kind:
        raise DpqError(f"{final}: a dpq {manifest['kind']} folder, not an earlier {kind} one; dpq will not replace "
                       "it: choose another output folder")
    if foreign := foreign_files(target, manifest):
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise DpqError(f"{Path(final) / foreign[0]}{more}: not written by dpq (not in the folder's {MANIFEST}); dpq "
                       "will not replace a folder holding files it did not write: move them away or choose another "
                       "output folder")


def check_not_input(out: Path, inputs: list[tuple[str, object]]) -> None:
    """Refuse an output folder that is, holds, or lies inside an input of the same command (``inputs``: pairs of the
    flag or recipe key and the path; hub ids and other names that are no local path are passed over)."""
    target = followed(Path(out)).resolve()
    for label, source in inputs:
        if source is None or not str(source) or not Path(str(source)).exists():
            continue
        path = Path(str(source)).resolve()
        if path == target:
            how = "is"
        elif path in target.parents:
            how = "is inside"
        elif target in path.parents:
            how = "holds"
        else:
            continue
        raise DpqError(f"{out}: the output folder {how} this command's input ({label} {source}); dpq never writes "
                       "over what it reads: choose another output folder")


def run_marker(folder: Path) -> dict | None:
    m = _json_or_none(Path(folder) / RUN_MARKER)
    return m if isinstance(m, dict) and m.get("kind") == "run" else None


def is_legacy_run(folder: Path) -> bool:
    """A run folder of a dpq from before the marker: its recipe.yaml beside at least one sealed dpq artifact."""
    folder = Path(folder)
    return (folder / "recipe.yaml").is_file() and any(
        d.is_dir() and not d.is_symlink() and dpq_manifest(d) is not None for d in folder.iterdir())


# what dpq keeps beside a folder it writes: its lock, its work folder (checkpoints), its temporary and set-aside copies
_DPQ_SIBLING = re.compile(r"\..+\.(lock|work|tmp-\d+-.*|old-\d+)")


def _holds_only_dpqs(folder: Path) -> bool:
    """Every entry a sealed dpq artifact or what dpq keeps beside one (e.g. stages run alone into the folder)."""
    return all(_DPQ_SIBLING.fullmatch(p.name) or (p.is_dir() and not p.is_symlink() and dpq_manifest(p) is not None)
               for p in Path(folder).iterdir())


def is_run_folder(folder: Path) -> bool:
    return run_marker(folder) is not None or is_legacy_run(folder)


def check_run_folder(run: Path) -> None:
    """Refuse in one line a run folder dpq did not make: only a new or empty folder, one marked as a dpq run (or a
    run of a dpq from before the marker), or one holding nothing but dpq's artifacts, is written into. What else a
    run folder holds is never touched."""
    target = _check_location(run, "run folder")
    if not target.exists() or not _entries(target) or is_run_folder(target):
        return
    if (m := dpq_manifest(target)) is None and _holds_only_dpqs(target):
        return
    if m is not None:
        raise DpqError(f"{run}: a dpq {m['kind']} folder, not a run folder; choose another --out")
    raise DpqError(f"{run}: holds files dpq did not write ({_first_entry(target)}, …) and is not a dpq run folder; "
                   "dpq run writes only into a new or empty folder or one of its own runs: choose another --out")


def mark_run_folder(run: Path, recipe_sha256: list[str]) -> None:
    """Write (atomically) the marker that says dpq made ``run``. ``recipe_sha256``: the recipe.yaml about to be
    written and the one there now, so a kill between this and the recipe's own write disowns neither."""
    created = (run_marker(run) or {}).get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json_atomic(Path(run) / RUN_MARKER, {"kind": "run", "created": created, "recipe_sha256": recipe_sha256})


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
