"""A worker restarted with a changed runner setting self-tests it before its runners start,
and the master counts the node as not self-tested from its hello until that result."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from embedded_nodes import fast_master, fast_worker, serving

from cluster.control import SessionCreate
from cluster.master.node import MasterNode
from cluster.shared.apply import apply
from cluster.shared.events import (
    MASTER_ORIGIN,
    NO_RUNNERS_DIGEST,
    NodeConnected,
    RunnerSelfTestCompleted,
    RunnerStatusUpdated,
)
from cluster.shared.node_status import NodeState, node_status, placements_by_node
from cluster.shared.state import EMPTY_STATE
from cluster.worker.node import WorkerNode
from cluster.worker.runners import RunnerSetting

OLD = RunnerSetting(kind="simulated", config={"load_s": 0.05})
NEW = RunnerSetting(kind="simulated", config={"load_s": 0.1})


def node_events(master: MasterNode, node: str) -> list[object]:
    return [ie.event for ie in master.store.read_from(1) if ie.origin == node]


async def run_until(worker: WorkerNode, done: Callable[[], bool]) -> None:
    """Run `worker` until `done()` holds, then stop it (cleanly)."""
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        while not done():
            await anyio.sleep(0.05)
        worker.stop()


@pytest.mark.anyio
async def test_a_changed_runner_setting_is_self_tested_before_any_runner_starts(
    tmp_path: Path,
) -> None:
    # Side by side, the self-test's runner and the slot's real one would load two models on
    # one GPU; and a setting that fails its test should not serve a slot meanwhile.
    secret = secrets.token_bytes(32)
    master = fast_master(tmp_path / "master", secret, epoch_length_ms=60_000)
    workers: list[WorkerNode] = []
    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                started = await tg.start(master.run)
                addr = started.addrs[0]
                first = fast_worker(tmp_path / "w1", addr, secret, runner=OLD)
                workers.append(first)
                node = first.node_id
                async with anyio.create_task_group() as worker_tg:
                    await worker_tg.start(first.run)
                    reply = await master.request(
                        SessionCreate(slots=1, memory_per_slot_mb=512, name="s")
                    )
                    assert reply.ok, reply.message
                    while not serving(master, node):
                        await anyio.sleep(0.05)
                    first.stop()  # a clean stop: its runner stops, its STOPPED is delivered
                first.close()  # the outbox's lock: one worker process per data dir
                workers.remove(first)
                before = len(node_events(master, node))

                # The same node (data dir) restarts with another runner setting.
                second = fast_worker(tmp_path / "w1", addr, secret, runner=NEW)
                workers.append(second)

                def tested_and_serving() -> bool:
                    rec = master.state.nodes[node]
                    test = rec.self_test
                    return (
                        test is not None
                        and test.config_digest == NEW.digest()
                        and serving(master, node)
                    )

                await run_until(second, tested_and_serving)
                master.stop()
        after = node_events(master, node)[before:]
        order = [
            "test" if isinstance(e, RunnerSelfTestCompleted) else e.status.value
            for e in after
            if isinstance(e, RunnerSelfTestCompleted | RunnerStatusUpdated)
        ]
        assert order[0] == "test", order  # the test ended before any runner was created
        [result] = [e for e in after if isinstance(e, RunnerSelfTestCompleted)]
        assert result.passed and result.config_digest == NEW.digest()
        assert_untested_from_the_new_hello_to_its_result(master, node)
    finally:
        for worker in workers:
            worker.close()
        master.close()


@pytest.mark.anyio
async def test_a_tested_node_restarted_without_runners_is_facts_only_and_its_slot_moves(
    tmp_path: Path,
) -> None:
    # `cluster worker --no-runners` on the data dir of a worker that passed its test: its
    # hello said "" (no setting), the master kept the test, the node stayed "serving" and
    # missed its slot every epoch. Its hello now says it runs no runners.
    secret = secrets.token_bytes(32)
    master = fast_master(tmp_path / "master", secret, epoch_length_ms=600_000)
    workers: list[WorkerNode] = []
    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                started = await tg.start(master.run)
                addr = started.addrs[0]
                first = fast_worker(tmp_path / "w1", addr, secret, runner=OLD)
                workers.append(first)
                node = first.node_id
                async with anyio.create_task_group() as worker_tg:
                    await worker_tg.start(first.run)
                    reply = await master.request(
                        SessionCreate(slots=1, memory_per_slot_mb=512, name="s")
                    )
                    assert reply.ok, reply.message
                    while not serving(master, node):
                        await anyio.sleep(0.05)
                    first.stop()
                first.close()
                workers.remove(first)

                second = fast_worker(tmp_path / "w1", addr, secret, no_runners=True)
                workers.append(second)

                def facts_only_and_unplaced() -> bool:
                    # Judged while the worker runs: its clean stop below says goodbye, and
                    # the master then shows the node disconnected.
                    rec = master.state.nodes[node]
                    st = node_status(master.state, node, rec.joined_ms)
                    return (
                        rec.runner_digest == NO_RUNNERS_DIGEST
                        and node not in placements_by_node(master.state)
                        and st.status is NodeState.FACTS_ONLY
                        and st.slots == 0
                    )

                with anyio.fail_after(20):  # a few hundred plan cycles: never, unfixed
                    await run_until(second, facts_only_and_unplaced)
                master.stop()
        rec = master.state.nodes[node]
        assert rec.self_test is None and rec.facts_only
    finally:
        for worker in workers:
            worker.close()
        master.close()


def assert_untested_from_the_new_hello_to_its_result(master: MasterNode, node: str) -> None:
    """Each hello names the setting; from the restarted worker's hello until its own result,
    the master's state (its log folded, event by event) holds no self-test for the node, so
    nothing is placed there on the strength of the old setting's test."""
    state = EMPTY_STATE
    hellos: list[str] = []
    tested_new = False
    for ie in master.store.read_from(1):
        state = apply(state, ie)
        ev = ie.event
        if isinstance(ev, NodeConnected) and ev.node_id == node:
            assert ie.origin == MASTER_ORIGIN
            hellos.append(ev.runner_digest)
        if isinstance(ev, RunnerSelfTestCompleted) and ev.config_digest == NEW.digest():
            tested_new = True
        if node not in state.nodes or not hellos:
            continue
        test = state.nodes[node].self_test
        if hellos[-1] == OLD.digest():
            # The first worker's stretch: its own test, once it arrived.
            assert test is None or test.config_digest == OLD.digest()
        elif not tested_new:
            assert test is None, (ie.idx, test)  # between the new hello and its result
        else:
            assert test is not None and test.passed and test.config_digest == NEW.digest()
    assert hellos[0] == OLD.digest() and hellos[-1] == NEW.digest() and tested_new
    assert state == master.state
