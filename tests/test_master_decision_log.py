"""The master's log says what it decided, once the decision is durable.

An operator found nothing in the master's log when a worker was killed: not the disconnect
(only a libp2p stream reset at INFO), nor drains, epochs or placements. Each committed
decision is now logged by `cluster.master.decisions` (lines from `decision_log`), and only
after its commit: a commit that failed is not said to be done.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import anyio
import pytest
from anyio.abc import TaskStatus
from embedded_nodes import embedded_cluster, until_self_tested

from cluster.master.server import Master, MasterConfig
from cluster.net.identity import load_identity
from cluster.net.membership import Membership
from cluster.shared import eventlog
from cluster.shared.events import NodeConnected, NodeDisconnected
from cluster.shared.store import EventStore

DECISIONS = "cluster.master.decisions"
#: Bound on every wait: a broken master fails the test instead of hanging it.
WAIT = 60.0


def _decisions(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == DECISIONS]


@pytest.mark.anyio
async def test_a_worker_that_goes_silent_is_logged_as_disconnected_at_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=DECISIONS)
    async with embedded_cluster(tmp_path, wait=WAIT) as cluster:
        master, worker = cluster.master, cluster.worker
        me = worker.node_id
        await until_self_tested(master, me)
        # Joining and self-testing are normal onboarding: nothing above INFO.
        joined = [r.getMessage() for r in _decisions(caplog)]
        assert f"node {me} joined the cluster (first connection)" in joined
        assert not [r for r in _decisions(caplog) if r.levelno > logging.INFO]
        # The connection part ends without a goodbye (as after a crash): silent from
        # now on, liveness disconnects it. (`worker.stop()` would say goodbye.)
        worker.worker.stop()
        while master.state.nodes[me].connected:
            await anyio.sleep(0.05)
    warnings = [r for r in _decisions(caplog) if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    line = warnings[0].getMessage()
    reason = master.state.nodes[me].disconnected_reason
    assert line.startswith(f"node {me} disconnected: {reason}"), line
    assert "no events for" in line and "unexcused" in line, line


def _fail_fdatasync(fd: int) -> None:
    raise OSError(errno.EIO, "Input/output error")


@pytest.mark.anyio
async def test_a_decision_whose_commit_failed_is_not_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=DECISIONS)
    data_dir = tmp_path / "m"
    store = EventStore.open(data_dir)
    key_pair, _ = load_identity(data_dir)
    config = MasterConfig(data_dir=data_dir, plan_interval=3600.0)
    master = Master(store, key_pair, Membership(secret=b"s" * 32), config)

    async def run_master(*, task_status: TaskStatus[list[str]]) -> None:
        with pytest.raises(OSError):
            await master.run(task_status=task_status)

    try:
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                await tg.start(run_master)
                await master.index_decision(lambda state, now: [NodeConnected(node_id="node-a")])
                said = [r.getMessage() for r in _decisions(caplog)]
                assert said == ["node node-a joined the cluster (first connection)"]
                monkeypatch.setattr(eventlog, "_fdatasync", _fail_fdatasync)
                gone = NodeDisconnected(node_id="node-a", reason="no events for 3 cycles")
                with pytest.raises(OSError, match="Input/output error"):
                    await master.index_decision(lambda state, now: [gone])
                await master.wait_finished()
        assert [r.getMessage() for r in _decisions(caplog)] == said
        assert master.state.nodes["node-a"].connected
    finally:
        store.close()
