"""Atomic, durable file writes: the one way SynPref replaces a file that readers may open.

A reader sees either the old file or the whole new one, never a part, and after a crash
(process or machine) the rename has reached the disk: the data is fsynced before the
rename and the folder (which holds the name) after it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)
LOCK_WAIT_LOG_EVERY_S = 30.0


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new name in `folder` durable (any path: a file's data too)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, and `folder`: its contents reach the disk before a rename
    publishes it (a folder renamed into place after a power loss could otherwise hold empty files)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_folder(Path(root, name))
        fsync_folder(Path(root))


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename `tmp` (a file, folder or link in the same folder) over `path`, then fsync the folder."""
    os.replace(tmp, path)
    fsync_folder(path.parent)


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` writes the content to a temp file next to `path`; it then replaces `path`.

    The temp name is unique per call, so threads and processes writing the same path do not
    write into each other's temp file; the last rename wins. Temp names match `.*.tmp`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (see `write_atomic`)."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


class FileLock:
    """An exclusive lock (flock) on `path`, for one author of a folder across processes and pods.

    The kernel drops it when its holder exits, however it exits: a writer pod that is force-deleted
    while its replacement starts hands the lock over once its container is gone. The holder's host
    and pid are written into the file for the waiters' logs. `timeout_s` None waits for as long as
    it takes (a pod's replacement); a number raises TimeoutError after that long. A second lock on
    the same path in the same process raises at once instead of waiting for itself.
    """

    def __init__(self, path: Path, timeout_s: float | None = None) -> None:
        me = f"{socket.gethostname()} pid {os.getpid()}"
        fh: TextIO = open(path, "a+", encoding="utf-8")  # noqa: SIM115 -- held until release()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        next_log = time.monotonic()
        try:
            while True:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    fh.seek(0)
                    holder = fh.read().strip() or "an unknown process"
                    if holder == me:
                        raise RuntimeError(f"{path} is already held by this process: release it first") from None
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        raise TimeoutError(f"{path} is held by {holder} (waited {timeout_s:.0f}s)") from None
                    if now >= next_log:
                        log.warning("waiting for %s, held by %s", path, holder)
                        next_log = now + LOCK_WAIT_LOG_EVERY_S
                    time.sleep(0.2)
        except BaseException:
            fh.close()
            raise
        fh.seek(0)
        fh.truncate()
        fh.write(me)
        fh.flush()
        self._fh: TextIO | None = fh

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._fh is not None

    def release(self) -> None:
        """Give the lock up (closing the file drops the flock); a second call does nothing."""
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()
