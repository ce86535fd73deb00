"""A master whose data directory's ``snapshots/`` cannot be used starts all the same.

A snapshot only shortens a load; the log is the truth. A ``snapshots`` that is a file, or a
directory the master may not read, failed the master's start (naming the path) while
`cluster replay` of the same directory warned and refolded. Now the master warns (naming the
path and what is wrong), folds from the log, serves, and a snapshot it cannot write later is
a WARNING too: the events are durable without it.

Each master runs for real (`MasterNode.run`: libp2p host and control socket on loopback),
with no planner cycle in the way (`plan_interval_ms` of an hour).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from cluster.control import SessionCreate
from cluster.master.config import PlannerConfig
from cluster.master.node import MasterNode, MasterNodeConfig
from cluster.net.membership import Membership
from cluster.shared import codec
from cluster.shared.digest_file import read_digest_file
from cluster.shared.eventlog import EventLog
from cluster.shared.events import SessionRequested
from cluster.shared.store import decode_record, load_state

#: Bound on every wait: a broken master fails the test instead of hanging it.
WAIT = 10.0


def _node(data_dir: Path, snapshot_every: int = 100_000) -> MasterNode:
    hour = 3_600_000
    config = MasterNodeConfig(
        planner=PlannerConfig(plan_interval_ms=hour, epoch_length_ms=hour),
        snapshot_every=snapshot_every,
    )
    return MasterNode(data_dir, Membership(secret=b"s" * 32), config)


async def _serve_one_request(node: MasterNode, name: str) -> None:
    """Run `node`, have one session created through it, stop it."""
    with anyio.fail_after(3 * WAIT):
        async with anyio.create_task_group() as tg:
            await tg.start(node.run)
            reply = await node.request(SessionCreate(slots=1, memory_per_slot_mb=1024, name=name))
            assert reply.ok, reply.message
            node.stop()


def _refolded_digest(data_dir: Path) -> str:
    """The digest of the log refolded from event 1, no snapshot involved."""
    with EventLog.open(data_dir / "log", readonly=True) as event_log:
        return codec.state_digest(load_state(event_log, None))


def _file_instead(snap_dir: Path) -> str:
    shutil.rmtree(snap_dir)
    snap_dir.write_text("not a directory\n")
    return "Not a directory"


def _unreadable(snap_dir: Path) -> str:
    snap_dir.chmod(0)
    return "Permission denied"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "spoil",
    [
        _file_instead,
        pytest.param(
            _unreadable,
            marks=pytest.mark.skipif(os.geteuid() == 0, reason="root can read any directory"),
        ),
    ],
)
async def test_a_master_over_an_unusable_snapshot_directory_refolds_and_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, spoil: Callable[[Path], str]
) -> None:
    data_dir = tmp_path / "m"
    snap_dir = data_dir / "snapshots"
    node = _node(data_dir)
    try:
        await _serve_one_request(node, "before")
        assert node.store.write_snapshot(node.state)  # a snapshot the reopened master cannot use
    finally:
        node.close()
    assert snap_dir.is_dir() and any(snap_dir.iterdir())
    why = spoil(snap_dir)
    try:
        with caplog.at_level(logging.WARNING):
            # Used to raise, naming the path. A snapshot comes due at every commit.
            node = _node(data_dir, snapshot_every=1)
            try:
                assert node.state.last_applied == node.store.last_idx > 0
                assert codec.state_digest(node.state) == _refolded_digest(data_dir)
                opened = caplog.text
                reopened_at = node.state.last_applied
                assert not node.store.write_snapshot(node.state)
                # The snapshots that come due while it serves cannot be written: WARNINGs.
                await _serve_one_request(node, "after")
            finally:
                node.close()
    finally:
        if snap_dir.is_dir():
            snap_dir.chmod(0o755)
    # The master said why it refolded, naming the path and what was wrong.
    assert f"snapshots in {snap_dir} cannot be used ({why}): refolding from the log" in opened
    assert f"could not save a snapshot at index {reopened_at}:" in caplog.text
    assert f"could not save a snapshot at index {node.state.last_applied}:" in caplog.text
    # The events after the reopen are durable, and what the master held is what the log folds to.
    with EventLog.open(data_dir / "log", readonly=True) as event_log:
        logged = [decode_record(idx, payload).event for idx, payload in event_log.read_from(1)]
    assert sum(isinstance(e, SessionRequested) for e in logged) == 2
    assert codec.state_digest(node.state) == _refolded_digest(data_dir)
    written = read_digest_file(data_dir)
    assert written is not None and written["idx"] == node.state.last_applied
    assert written["digest"] == codec.state_digest(node.state)
