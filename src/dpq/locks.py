"""One writer per output folder.

An OS lock (``flock``) on a hidden file beside the folder (``.NAME.lock``), held for the stage's (or the run's) life:
the kernel drops it when the process ends, however it ends, so a ``kill -9`` leaves no stale lock behind. A second
process is refused in one line that names the holder, before it writes anything. Under several processes of one job
only the main process writes, so only it takes the lock.

The lock file is never a link (opened with ``O_NOFOLLOW``, refused if it is a link or has other names) and does not
outlive its holder's command: the holder removes it while still holding it. A process that opened the file just
before it was removed holds a lock on a file nobody else will see, so after locking it checks that the path still
names the file it locked, and starts again if not. (A file left by a killed holder is taken over and removed by the
next one.) Keeping the locks beside the folders rather than in dpq's cache means two users, or two machines
sharing a disk, see the same lock.

A folder's lock covers what lies inside it: a run's lock covers its stage folders. Taking a lock, a process also
looks at the locks of the folders above (``dpq teacher --out RUN/teacher`` is refused while ``dpq run`` holds RUN),
and a run, once it holds its own, at the locks below. Each side looks after taking its own lock, so of two that
start together at least one sees the other. The locks this process holds are remembered, since a second ``flock``
on the same file in one process conflicts with the first.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import time
from pathlib import Path
from typing import Iterator

from . import devices
from .errors import DpqError

_held: dict[Path, int] = {}  # folder (resolved) -> fd of its lock file, for the locks this process holds


def _folder(folder: Path) -> Path:
    """One name per folder however it is spelt (relative, through links), so every spelling meets the same lock."""
    return Path(folder).resolve()


def lock_path(folder: Path) -> Path:
    folder = _folder(folder)
    return folder.parent / f".{folder.name}.lock"


def check_free(folder: Path, *, covers_inside: bool = False) -> None:
    """Before any data is read: refuse a lock path that is a link (planted to make dpq write over another file), and
    a folder that another process is writing (itself, a folder above it, or with ``covers_inside`` one inside it).
    Taking the lock later decides; this only says it sooner."""
    path = lock_path(folder)
    if path.is_symlink():
        raise DpqError(f"{path}: is a symbolic link; dpq does not follow links for its lock files: remove it")
    folder = _folder(folder)
    if folder in _held or not devices.is_main():
        return
    if (holder := _busy(path)) is not None:
        raise _written_by(folder, holder)
    _refuse_if_busy(folder, _busy_above(folder) or (_busy_below(folder) if covers_inside else None))


def _refuse_if_busy(folder: Path, busy: tuple[Path, str] | None) -> None:
    if busy is not None:
        inner, holder = busy
        raise DpqError(f"{folder}: {'inside' if inner in folder.parents else 'holds'} {inner}, which is being "
                       f"written by {holder}; wait for it to finish or choose another output folder")


def _open(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DpqError(f"{path}: is a symbolic link; dpq does not follow links for its lock files: remove it") \
                from None
        raise DpqError(f"{path}: cannot create the lock file ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        what = "a hard link to another file" if stat.S_ISREG(st.st_mode) else "not a regular file"
        raise DpqError(f"{path}: not a lock file dpq made ({what}); remove it")
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _written_by(folder: Path, holder: str) -> DpqError:
    return DpqError(f"{folder}: already being written by {holder}; wait for it to finish or choose another output "
                    "folder")


def _holder(fd: int) -> str:
    return os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"


def _acquire(folder: Path) -> int:
    path = lock_path(folder)
    for _ in range(1000):
        fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise _written_by(folder, holder) from None
        if _same_file(fd, path):  # else its holder removed it as we opened it: the lock is on a file no one sees
            return fd
        os.close(fd)
    raise DpqError(f"{path}: the lock file keeps being replaced; is something else removing it?")


def _release(fd: int, folder: Path) -> None:
    path = lock_path(folder)
    try:
        if _same_file(fd, path):  # removed while still held, so no one can lock it in between and lose it
            os.unlink(path)
    finally:
        os.close(fd)  # releases the lock


def _busy(path: Path) -> str | None:
    """The holder of the lock at ``path`` if another process holds it, else None. Never creates the file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # absent (not held), a link (no lock of dpq's), unreadable
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd)
        return None
    finally:
        os.close(fd)


def _busy_above(folder: Path) -> tuple[Path, str] | None:
    for parent in folder.parents:
        if parent in _held or parent.parent == parent:
            continue
        if (holder := _busy(lock_path(parent))) is not None:
            return parent, holder
    return None


def _busy_below(folder: Path) -> tuple[Path, str] | None:
    if not folder.is_dir():
        return None
    for root, dirs, names in os.walk(folder):
        for name in names:
            if name.startswith(".") and name.endswith(".lock"):
                inner = Path(root) / name[1:-len(".lock")]
                if inner not in _held and (holder := _busy(Path(root) / name)) is not None:
                    return inner, holder
    return None


@contextlib.contextmanager
def hold(folder: Path, *, covers_inside: bool = False) -> Iterator[None]:
    """Hold ``folder``'s lock (again a no-op when this process holds it already). ``covers_inside``: also refuse
    while another process holds a lock on something inside ``folder`` (a run, over its stage folders)."""
    if not devices.is_main():
        yield
        return
    folder = _folder(folder)
    if folder in _held:
        yield
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(folder)
    try:
        _refuse_if_busy(folder, _busy_above(folder) or (_busy_below(folder) if covers_inside else None))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} (since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode(), 0)
        _held[folder] = fd
        yield
    finally:
        _held.pop(folder, None)
        _release(fd, folder)
