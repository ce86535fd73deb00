"""Files replaced whole: written beside their path, then renamed over it, so a reader (or a
restart after a crash) never sees one half-written; and directories created durably."""

from __future__ import annotations

import contextlib
import errno
import fcntl
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


def make_dirs_durably(directory: Path) -> None:
    """Create `directory` and any missing parents (like ``mkdir -p``), each entry on disk
    before returning: the parent of every level created is fsynced, so a power loss cannot
    take back a new directory, and with it the files later written durably inside it.

    The levels that exist already have their parents fsynced too, up to the first parent this
    process may not write (no level in it can be ours): an earlier call killed between its
    mkdir and that fsync left a directory whose entry may not be on disk, and finding it
    present proves nothing. An fsync of a directory with nothing to write is cheap.
    `FileExistsError` if a level is a file."""
    missing: list[Path] = []
    level = Path(directory).absolute()
    while not level.is_dir() and level.parent != level:
        missing.append(level)
        level = level.parent
    for new in reversed(missing):
        try:
            os.mkdir(new)
        except FileExistsError:
            if not new.is_dir():
                raise
        fsync_dir(new.parent)
    while level.parent != level and os.access(level.parent, os.W_OK):
        try:
            fsync_dir(level.parent)
        except OSError as exc:
            # A level that existed before this call on a filesystem that cannot sync a
            # directory (EINVAL: some network and FUSE filesystems) or is read-only: nothing
            # there can be made durable, and refusing to start over it helps no one.
            if exc.errno in _CANNOT_SYNC:
                return
            raise
        level = level.parent


#: fsync errors that mean the filesystem cannot sync this directory at all.
_CANNOT_SYNC = frozenset({errno.EINVAL, errno.EROFS, errno.ENOTSUP, errno.EOPNOTSUPP})


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


def try_lock(path: Path, mode: int = 0o600) -> int | None:
    """An exclusive flock on `path` (created if missing): its descriptor, or None when another
    process holds it. Closing the descriptor releases it, and so does the process ending
    (kill -9 included), so a lock never outlives its holder."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
