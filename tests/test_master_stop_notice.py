"""A master that stops says so on its workers' streams, and its workers log it truly.

A clean master stop closes every subscriber's queue, which the subscribe stream took for a
cut for lagging: every caught-up worker logged "resubscribing: subscriber fell more than
4096 batches behind" (or, when the host closed first, that the stream ended and it
resubscribed). A worker batch being committed when the stop came was refused as "internal:
indexing failed: cancelled ..." with a WARNING in the master's log. Now both streams end
with "stopping", and the worker logs that the master is stopping and that it reconnects.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anyio
import pytest
from embedded_nodes import embedded_cluster

from cluster.master.server import Master, _Submission

CLIENT = "cluster.worker.client"
#: What the worker's connection loop logs when the master stopped, or could not be reached.
STOPPING = "is stopping; reconnecting"
UNREACHABLE = "unreachable ("


def _worker_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == CLIENT]


async def _stop_master_and_read_the_worker(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    before_stop: anyio.Event | None = None,
) -> list[str]:
    """Run a master and a worker; once the worker is caught up (and `before_stop` is set,
    if given) stop the master and return what the worker logged up to its first line of
    the connection loop after the stop."""
    caplog.set_level(logging.INFO, logger=CLIENT)
    caplog.set_level(logging.DEBUG, logger="cluster.master")
    async with embedded_cluster(tmp_path) as cluster:
        master, worker = cluster.master, cluster.worker
        while worker.worker.phase != "connected":
            await anyio.sleep(0.05)
        if before_stop is not None:
            await before_stop.wait()
        seen = len(_worker_lines(caplog))
        master.stop()
        while not any(STOPPING in m or UNREACHABLE in m for m in _worker_lines(caplog)[seen:]):
            await anyio.sleep(0.05)
        worker.stop()
    return _worker_lines(caplog)[seen:]


def _assert_told_stopping(after_stop: list[str]) -> None:
    first = next(m for m in after_stop if STOPPING in m or UNREACHABLE in m)
    assert STOPPING in first, after_stop
    assert not [m for m in after_stop if "behind" in m or "resubscrib" in m], after_stop


@pytest.mark.anyio
async def test_a_master_stop_is_not_reported_as_the_worker_falling_behind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _assert_told_stopping(await _stop_master_and_read_the_worker(tmp_path, caplog))


@pytest.mark.anyio
async def test_a_worker_batch_committing_at_the_stop_is_refused_as_stopping_not_a_fault(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The indexer is cancelled by the stop while it commits a worker's batch (held here
    until the stop): no WARNING in the master's log, and the worker is told "stopping"."""
    index = Master._index
    holding = anyio.Event()

    async def hold_worker_batches(self: Master, batch: list[_Submission], *args: Any) -> None:
        if any(sub.seqs is not None for sub in batch):
            holding.set()
            await anyio.sleep_forever()
        await index(self, batch, *args)

    monkeypatch.setattr(Master, "_index", hold_worker_batches)
    after_stop = await _stop_master_and_read_the_worker(tmp_path, caplog, holding)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, [r.getMessage() for r in loud]
    _assert_told_stopping(after_stop)
