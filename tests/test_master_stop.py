"""The master's stop is orderly: once it begins, requests are refused ("master is stopping");
one already committing completes first; digest.json written at stop is the log's digest.

Each master runs for real (`MasterNode.run`: libp2p host and control socket on loopback),
with no planner cycle in the way (`plan_interval_ms` of an hour).
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from cluster.cli import main
from cluster.control import Reply, SessionCreate
from cluster.master.config import PlannerConfig
from cluster.master.node import MasterNode, MasterNodeConfig
from cluster.net.membership import Membership
from cluster.shared.digest_file import read_digest_file
from cluster.shared.events import SessionRequested

#: Bound on every wait: a broken master fails the test instead of hanging it.
WAIT = 10.0

CREATE = SessionCreate(slots=1, memory_per_slot_mb=1024, name="s")


def _node(data_dir: Path) -> MasterNode:
    hour = 3_600_000
    config = MasterNodeConfig(planner=PlannerConfig(plan_interval_ms=hour, epoch_length_ms=hour))
    return MasterNode(data_dir, Membership(secret=b"s" * 32), config)


def _replayed_digest(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """What `cluster replay DATA_DIR --digest` prints (the log refolded from scratch)."""
    capsys.readouterr()
    assert main(["replay", str(data_dir), "--digest", "--no-snapshot"]) == 0
    return capsys.readouterr().out.strip()


def _sessions_in_log(node: MasterNode) -> int:
    return sum(isinstance(ie.event, SessionRequested) for ie in node.store.read_from(1))


@pytest.mark.anyio
async def test_a_request_once_stop_began_is_refused_and_digest_json_matches_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`Master.run` returned (digest.json written) while the control socket was still served
    until `MasterNode.run` cancelled it: a request then was committed and acknowledged after
    the final digest, so digest.json named an older index than the log."""
    data_dir = tmp_path / "m"
    node = _node(data_dir)
    try:
        with anyio.fail_after(3 * WAIT):
            async with anyio.create_task_group() as tg:
                await tg.start(node.run)
                first = await node.request(CREATE)
                assert first.ok, first.message
                node.stop()
                await node.master.wait_finished()  # the master's stop path has run
                late = await node.request(CREATE)
        assert late == Reply(ok=False, message="master is stopping")
        assert _sessions_in_log(node) == 1
        assert node.store.last_idx == node.state.last_applied
    finally:
        node.close()
    written = read_digest_file(data_dir)
    assert written is not None
    assert written["idx"] == node.state.last_applied
    assert written["digest"] == _replayed_digest(data_dir, capsys)


@pytest.mark.anyio
async def test_a_request_committing_when_stop_begins_completes_and_is_in_the_digest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A request past its decision, waiting for the log (here: behind a catch-up read that
    holds it), is acknowledged only once durable, and the stop waits for it: its events are
    in the digest.json written at stop."""
    data_dir = tmp_path / "m"
    node = _node(data_dir)
    replies: list[Reply] = []

    async def request() -> None:
        replies.append(await node.request(CREATE))

    try:
        with anyio.fail_after(3 * WAIT):
            async with anyio.create_task_group() as tg:
                await tg.start(node.run)
                store_lock = node.master._store_lock
                await store_lock.acquire()  # as a subscriber's catch-up read does
                tg.start_soon(request)
                await anyio.wait_all_tasks_blocked()  # decided; waiting to commit
                assert store_lock.statistics().tasks_waiting == 1
                node.stop()
                await anyio.wait_all_tasks_blocked()  # the stop path runs as far as it can
                store_lock.release()
        assert replies == [replies[0]] and replies[0].ok, replies
        assert _sessions_in_log(node) == 1
    finally:
        node.close()
    written = read_digest_file(data_dir)
    assert written is not None
    assert written["idx"] == node.store.last_idx == node.state.last_applied
    assert written["digest"] == _replayed_digest(data_dir, capsys)
