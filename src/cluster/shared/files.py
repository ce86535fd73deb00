"""Files replaced whole: written beside their path, then renamed over it, so a reader (or a
restart after a crash) never sees one half-written; directories created durably; and the
operator's small input files (config, secret, allow-list) read with a size limit."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Final

KiB: Final = 1024
MiB: Final = 1024 * KiB

#: Input limits, by kind. Each is far above any real file of its kind and far below what
#: hurts a process holding it in memory (a whole file is parsed at once): a mistyped path
#: (`/dev/zero`, a log, a disk image) is refused in a line instead of eating the memory.
#: A TOML config or runner file is a few dozen lines: 1 MiB is thousands of times that.
CONFIG_FILE_LIMIT: Final = 1 * MiB
#: A secret or token is one line (a 64-character hex secret, a ~43-character token).
SECRET_FILE_LIMIT: Final = 64 * KiB
#: An allow-list holds one 52-character peer id a line: 16 MiB is some 300,000 peers.
LIST_FILE_LIMIT: Final = 16 * MiB
#: A master address file (`master.addr`) holds one multiaddr of about 100 characters.
ADDR_FILE_LIMIT: Final = 64 * KiB


class InputFileError(ValueError):
    """An input file that cannot be read or is refused; the message names the problem, not
    the path or the setting: the caller says which file it was."""


def write_text_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path` (not
    synced: for files a crash may take back, such as master.addr or digest.json).

    An `OSError` names `path` (its `filename`; see `_replace`), and leaves no temporary
    file behind."""
    _replace(path, text.encode("utf-8"), 0o666, sync=False)  # 0o666: the umask applies


def fsync_dir(directory: Path) -> None:
    """Make a created, renamed or removed directory entry durable. An `OSError` names
    `directory` (an fsync's names no file)."""
    with _naming(directory):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An `OSError` raised inside names `path` (`filename`, and so its message): a write or
    fsync on a descriptor names no file, and an open or rename names the temporary one
    beside it. "[Errno 28] No space left on device", the error as raised, left the operator
    to guess which file of which disk. The exception stays the one raised (its type and
    errno unchanged): callers that test either still work."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:  # not the kernel's: its message would read "[Errno None] ..."
            raise
        if exc.filename2 is None:
            exc.filename = str(path)
            raise
        # A rename's ('.x.tmp' -> 'x'): once set, a second name cannot be taken back.
        named = type(exc)(exc.errno, exc.strerror, str(path))
        raise named.with_traceback(exc.__traceback__) from None


def _replace(path: Path, data: bytes, mode: int, *, sync: bool) -> None:
    """Write `data` to `.<name>.tmp` beside `path` (fsynced if `sync`), then rename it over
    `path`. On any failure the temporary file is removed (a full disk left a 0-byte
    `.master.addr.tmp` behind) and the `OSError` names `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with _naming(path):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            try:
                write_all(fd, data)
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


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


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of `data` to `fd`: a write(2) may take less than it was given (a file
    system with room for only part of it, a signal) without an error, and the rest must
    follow or fail (the next write then reports the error, ENOSPC say)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_bytes_durably(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data`, on disk before the rename, and the rename on disk before
    returning: after a crash the file holds either the old bytes or the new ones, never a
    prefix or nothing, and a later write the caller makes (truncating the records an ack
    watermark covers, say) cannot survive a power loss that the new file did not.

    An `OSError` names `path` (or, from the directory's fsync, its directory), and leaves no
    temporary file behind."""
    _replace(path, data, mode, sync=True)
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


def _kind_of(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return f"a special file (mode {stat.S_IFMT(mode):#o})"


def read_input_file(path: Path, limit: int) -> bytes:
    """The bytes of the regular file at `path` (symlinks followed), at most `limit` of them.

    Anything else is refused with `InputFileError` naming what it is (a directory, a named
    pipe, a device), without reading it: a pipe would block the caller until some writer
    came, a device such as /dev/zero never ends. A file over `limit` is refused too, after
    reading at most `limit + 1` bytes (a file in /proc says size 0 and holds more; one
    may grow while read). An `OSError` (missing, no permission) becomes `InputFileError`."""
    try:
        # Checked before opening: opening some devices acts on them (a tape rewinds).
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise InputFileError(f"is {_kind_of(mode)}, not a regular file")
        # O_NONBLOCK: if a pipe was swapped in since the stat, open does not wait for a writer
        # (fstat refuses it next); on a regular file it changes nothing.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise InputFileError(exc.strerror or str(exc)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputFileError(f"is {_kind_of(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise InputFileError(_too_large(st.st_size, limit))
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise InputFileError(exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if size > limit:
        raise InputFileError(_too_large(None, limit))
    return b"".join(chunks)


def _too_large(size: int | None, limit: int) -> str:
    most = _bytes_text(limit)
    held = f"holds {size:,} bytes" if size is not None else f"holds more than {most}"
    return f"{held}; at most {most} accepted (is this the right file?)"


def _bytes_text(n: int) -> str:
    if n % MiB == 0:
        return f"{n // MiB} MiB"
    if n % KiB == 0:
        return f"{n // KiB} KiB"
    return f"{n:,} bytes"
