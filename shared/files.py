"""Atomic, durable file writes: the one way SynPref replaces a file that readers may open.

A reader sees either the old file or the whole new one, never a part, and after a crash
(process or machine) the rename has reached the disk: the data is fsynced before the
rename and the folder (which holds the name) after it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new name in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
