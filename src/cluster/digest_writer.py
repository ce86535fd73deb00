"""Keeping `<data-dir>/digest.json` current in a running master or worker (shell code).

The file's format and one-shot writer are `cluster.shared.digest_file`; this module adds
the when and where: a worker thread, and a time share.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Final

import anyio

from cluster.shared.digest_file import DIGEST_FILE, write_digest_file
from cluster.shared.state import State

#: The largest share of a process's time that keeping digest.json current may take.
MAX_TIME_SHARE: Final = 0.05

log = logging.getLogger(__name__)


#: What a process writes: its state now, and the record's other fields.
Reading = tuple[State, dict[str, object]]


class DigestFileWriter:
    """Keeps digest.json current for a running process without stalling it.

    A digest is a canonical encoding of the whole state: ~0.2 s at 10,000 nodes on a
    2-core machine. Done on the event loop every cycle, as it was, it held up every stream
    of the master -- and of each worker -- that long each second. So the digest is computed
    on a worker thread (the state is immutable), and after a write that took `t` seconds
    the next waits at least `t / MAX_TIME_SHARE`: at most 5% of the time, however large
    the state (a small cluster's, a millisecond, is still written every cycle). A failure
    (a full disk) is retried later, never fatal: it is auxiliary output. It is one WARNING
    naming the file while the writes keep failing the same way, and an INFO once one works
    again: a master idle on a full disk logged the same WARNING every second.
    """

    def __init__(self, data_dir: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.data_dir = data_dir
        self._clock = clock
        self._written_idx = -1
        self._next_at = float("-inf")
        #: While writes keep failing, the errno of the failure warned of (-1: it had none).
        self._failing: int | None = None

    @property
    def path(self) -> Path:
        return self.data_dir / DIGEST_FILE

    async def keep_current(self, read: Callable[[], Reading], interval: float) -> None:
        """Every `interval` seconds, `update` with what `read()` gives; until cancelled."""
        while True:
            await anyio.sleep(interval)
            state, extra = read()
            await self.update(state, **extra)

    async def update(self, state: State, **extra: object) -> bool:
        """Write digest.json for `state` on a worker thread if it advanced and the time
        share allows; True if written."""
        if state.last_applied == self._written_idx or self._clock() < self._next_at:
            return False
        started = self._clock()
        try:
            write = partial(write_digest_file, self.data_dir, state, **extra)
            await anyio.to_thread.run_sync(write)
        except OSError as exc:
            failure = exc.errno if exc.errno is not None else -1
            if failure != self._failing:  # the first failure, or another kind than before
                log.warning(
                    "could not write %s: %s (retried quietly until it works)",
                    exc.filename or self.path,
                    exc.strerror or exc,
                )
                self._failing = failure
            return False
        finally:
            ended = self._clock()
            self._next_at = ended + (ended - started) / MAX_TIME_SHARE
        if self._failing is not None:
            log.info("wrote %s again (at index %d)", self.path, state.last_applied)
            self._failing = None
        self._written_idx = state.last_applied
        return True

    def write_now(self, state: State, **extra: object) -> None:
        """Write digest.json for `state` now, if it advanced (on a clean stop: the last
        index, whatever the time share)."""
        if state.last_applied == self._written_idx:
            return
        try:
            write_digest_file(self.data_dir, state, **extra)
        except OSError as exc:
            log.warning(
                "could not write %s (stopping): %s", exc.filename or self.path, exc.strerror or exc
            )
            return
        self._written_idx = state.last_applied
