"""One data directory, one role: a master's directory is never a worker's, nor the reverse.

Each role locks only its own files (a master its event log, a worker its outbox), so those
locks do not stop a worker started on a master's directory: it used to load the master's
`node.key`, join as a node with the master's own id (left DISCONNECTED in status for good)
and leave an `outbox/` there; a master on a worker's directory took the worker's id and wrote
its log beside the worker's outbox. What each role leaves in its directory tells them apart:
the master's event log (`log/`), the worker's outbox (`outbox/`). The check runs before
anything is created there (no key, no secret, no log), in `MasterNode` and `Worker`, so
`cluster master` / `cluster worker` and a program that embeds them get it alike.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final, Literal

from cluster.shared.store import LOG_DIR

log = logging.getLogger(__name__)

Role = Literal["master", "worker"]

#: What only a worker keeps in its data directory (`Worker.outbox`); a master's mark is its
#: event log, `LOG_DIR`.
OUTBOX_DIR: Final = "outbox"


class DataDirError(ValueError):
    """The data directory belongs to the other role; the text is one line naming it."""


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
