"""One data directory, one process, one role: a master's directory is never a worker's.

Each role's own locks (a master's on its event log, a worker's on its outbox) do not stop a
worker started on a master's directory: it used to load the master's `node.key`, join as a
node with the master's own id (left DISCONNECTED in status for good) and leave an `outbox/`
there; a master on a worker's directory took the worker's id and wrote its log beside the
worker's outbox. What each role leaves in its directory tells them apart: the master's event
log (`log/`), the worker's outbox (`outbox/`). The check runs before anything is created
there (no key, no secret, no log), in `MasterNode` and `Worker`, so `cluster master` /
`cluster worker` and a program that embeds them get it alike.

The check alone left a race: a master and a worker started on one *empty* directory at the
same moment both passed it and both created their files (key, secret, log, outbox) before
one was refused at the control socket. So each process first takes `DataDirLock`, an
exclusive lock on `<data-dir>/LOCK` held for its whole life, and checks the role under it:
a second process on the directory, of either role, is refused before it creates anything.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Final, Literal

from cluster.shared.files import make_dirs_durably, try_lock
from cluster.shared.store import LOG_DIR

log = logging.getLogger(__name__)

Role = Literal["master", "worker"]

#: The data directory's lock file, held by the master or worker that runs there.
LOCK_FILE: Final = "LOCK"

#: What only a worker keeps in its data directory (`Worker.outbox`); a master's mark is its
#: event log, `LOG_DIR`.
OUTBOX_DIR: Final = "outbox"


class DataDirError(ValueError):
    """The data directory belongs to the other role, or another process holds it; the text
    is one line naming it."""


class DataDirInUseError(DataDirError):
    """Another master or worker holds the data directory's lock."""


class DataDirLock:
    """The exclusive lock a master or worker holds on its data directory for its whole life
    (`hold`). `release()` frees it (a second call does nothing); the kernel frees it when
    the process ends, kill -9 included, so a crash never leaves the directory locked."""

    def __init__(self, data_dir: Path, fd: int) -> None:
        self.data_dir = data_dir
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def share(self) -> DataDirLock:
        """A second handle on this lock (a duplicate of its descriptor): the directory stays
        locked until both are released. For a caller that hands the lock to a node, which
        releases it when it closes, and still has work to do in the directory under the lock
        afterwards (`cluster master` removing what a refused start created there)."""
        if self._fd < 0:
            raise ValueError(f"the lock on {self.data_dir} is not held")
        return DataDirLock(self.data_dir, os.dup(self._fd))  # flock: held while one is open

    def release(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)  # releases the flock


def hold(data_dir: Path, role: Role) -> DataDirLock:
    """Lock `data_dir` for this process (creating the directory if missing), then check it is
    this role's (`check_role`, under the lock: no other process can be creating its files
    meanwhile). `DataDirInUseError` if another master or worker holds it; `DataDirError` if
    it is the other role's or cannot be created, with the lock released again."""
    path = data_dir / LOCK_FILE
    if not path.exists():
        # Checked first without the lock too, so that a directory of the other role from
        # before the lock is refused with nothing created there, not even LOCK. (With LOCK
        # there, locking creates nothing, and a process holding it is named as such.)
        check_role(data_dir, role, warn=False)
    try:
        make_dirs_durably(data_dir)
    except OSError as exc:
        raise DataDirError(
            f"data directory {data_dir}: cannot create it: {exc.strerror or exc}"
        ) from None
    try:
        fd = try_lock(path)
    except OSError as exc:
        raise DataDirError(
            f"data directory {data_dir}: cannot lock {path}: {exc.strerror or exc}"
        ) from None
    if fd is None:
        raise DataDirInUseError(
            f"data directory {data_dir} is in use: another master or worker holds it (lock "
            f"{path}); each process needs a data directory of its own"
        )
    lock = DataDirLock(data_dir, fd)
    try:
        check_role(data_dir, role)
    except BaseException:
        lock.release()
        raise
    return lock


def check_role(data_dir: Path, role: Role, *, warn: bool = True) -> None:
    """`DataDirError` if `data_dir` holds what the other role keeps there and not what this
    role keeps. Creates nothing.

    Both marks: the directory is this role's (its own mark proves it), and the other is what
    a process of the other role left when it was once started here by mistake (before this
    check existed, a worker started on a master's directory left an `outbox/` there): a
    WARNING names it as safe to remove (`warn`: once, when several checks run)."""
    other, mark, what = (
        ("worker", OUTBOX_DIR, "a worker's outbox")
        if role == "master"
        else ("master", LOG_DIR, "a master's event log")
    )
    found = data_dir / mark
    if not (found.exists() or found.is_symlink()):
        return
    own = data_dir / (LOG_DIR if role == "master" else OUTBOX_DIR)
    if own.is_dir():
        if warn:
            log.warning(
                "data directory %s holds %s (%s) beside its own %s: left by a %s once started "
                "here by mistake; a %s does not use it, and it may be removed",
                data_dir,
                what,
                found,
                own.name,
                other,
                role,
            )
        return
    raise DataDirError(
        f"data directory {data_dir} holds {what} ({found}): it is a {other}'s, and a "
        f"{role} needs a data directory of its own"
    )
