"""Files replaced whole: written beside their path, then renamed over it, so a reader (or a
restart after a crash) never sees one half-written."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_text_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def fsync_dir(directory: Path) -> None:
    """Make a created, renamed or removed directory entry durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durably(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data`, on disk before the rename, and the rename on disk before
    returning: after a crash the file holds either the old bytes or the new ones, never a
    prefix or nothing, and a later write the caller makes (truncating the records an ack
    watermark covers, say) cannot survive a power loss that the new file did not."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
