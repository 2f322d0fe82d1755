"""One writer per output folder.

An OS lock (``flock``) on a hidden file beside the folder, held for the stage's (or the run's) life: the kernel
drops it when the process ends, however it ends, so a ``kill -9`` leaves no stale lock behind. A second process
is refused in one line that names the holder, before it writes anything. Under several processes of one job only
the main process writes, so only it takes the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from . import devices
from .errors import DpqError


def lock_path(folder: Path) -> Path:
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def hold(folder: Path) -> Iterator[None]:
    if not devices.is_main():
        yield
        return
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
            raise DpqError(f"{folder}: already being written by {holder}; wait for it to finish or choose "
                           "another output folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} (since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
