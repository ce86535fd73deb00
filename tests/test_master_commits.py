"""The master's commits and what follows them: snapshots written off the event loop while
commits go on, digest.json on stop, and a commit's I/O error (fail-stop, said first).

Each master here runs for real (`Master.run`, a libp2p host on loopback) with no planner
cycle in the way (`plan_interval` of an hour); events are the master's own.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
from pathlib import Path

import anyio
import pytest
from anyio.abc import TaskStatus
from planner_world import quick_config

from cluster.master import server
from cluster.master.liveness import EMPTY_BOOK
from cluster.master.planner import Planner
from cluster.master.server import Master, MasterConfig
from cluster.net.identity import load_identity
from cluster.net.membership import Membership
from cluster.shared import eventlog
from cluster.shared.codec import state_digest
from cluster.shared.digest_file import read_digest_file
from cluster.shared.eventlog import LogAnchor
from cluster.shared.events import EpochSettled, Event, NodeConnected, NodePayout
from cluster.shared.store import EventStore, restore

#: Bound on every wait: a broken master fails the test instead of hanging it.
WAIT = 10.0


def _joins(start: int, stop: int) -> list[Event]:
    return [NodeConnected(node_id=f"12D3KooWNode{i:04d}") for i in range(start, stop)]


def _master(store: EventStore, data_dir: Path) -> Master:
    key_pair, _ = load_identity(data_dir)
    config = MasterConfig(data_dir=data_dir, plan_interval=3600.0)
    return Master(store, key_pair, Membership(secret=b"s" * 32), config)


class BlockedSave:
    """Stands in for `SnapshotStore.save`: the first call waits until `release` is set (at
    most WAIT seconds, then gives up with a TimeoutError, which is an OSError), later calls
    save at once. Every call that saved puts its index on `saved`."""

    def __init__(self, real_save: object) -> None:
        self.real_save = real_save
        self.entered = threading.Event()
        self.inside = threading.Event()
        self.release = threading.Event()
        self.calls: list[int] = []
        self.saved: queue.Queue[int] = queue.Queue()

    def __call__(self, idx: int, data: bytes, anchor: LogAnchor | None = None) -> Path:
        self.calls.append(idx)
        first = len(self.calls) == 1
        if first:
            self.inside.set()
            self.entered.set()
        try:
            if first and not self.release.wait(WAIT):
                raise TimeoutError("the blocked snapshot write was never released")
            assert callable(self.real_save)
            path: Path = self.real_save(idx, data, anchor)
        finally:
            self.inside.clear()
        self.saved.put(idx)
        return path

    async def wait_entered(self) -> None:
        assert await anyio.to_thread.run_sync(self.entered.wait, WAIT), "no snapshot began"

    async def next_saved(self) -> int:
        return await anyio.to_thread.run_sync(self.saved.get, True, WAIT)


@pytest.mark.anyio
async def test_commits_are_acknowledged_while_a_snapshot_is_being_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encoding and writing a 10,000-node state takes ~60-140 ms; done inside the commit that
    crossed `snapshot_every`, it stalled every stream of the master for that long."""
    data_dir = tmp_path / "m"
    store = EventStore.open(data_dir, snapshot_every=3)
    save = BlockedSave(store.snapshots.save)
    monkeypatch.setattr(store.snapshots, "save", save)
    master = _master(store, data_dir)
    try:
        with anyio.fail_after(3 * WAIT):
            async with anyio.create_task_group() as tg:
                await tg.start(master.run)
                await master.submit_master_events(_joins(0, 3))  # 1..3: a snapshot is due
                await save.wait_entered()
                # Its write is blocked: later commits are durable and acknowledged meanwhile.
                indexed = await master.submit_master_events(_joins(3, 10))  # 4..10
                assert [ie.idx for ie in indexed] == list(range(4, 11))
                assert store.last_idx == 10 and master.last_idx == 10
                assert save.inside.is_set(), "the commits waited for the snapshot"
                assert save.calls == [3]  # one write at a time: the one due at 10 waits
                save.release.set()
                assert await save.next_saved() == 3
                assert await save.next_saved() == 10  # the one that came due meanwhile
                master.stop()
        assert store.snapshots.indices() == [10, 3]
        assert store.latest_snapshot() is not None
    finally:
        store.close()
    with EventStore.open(data_dir) as reopened:
        assert reopened.state == store.state


@pytest.mark.anyio
async def test_stop_waits_for_the_snapshot_being_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "m"
    store = EventStore.open(data_dir, snapshot_every=3)
    save = BlockedSave(store.snapshots.save)
    monkeypatch.setattr(store.snapshots, "save", save)
    master = _master(store, data_dir)
    finished = anyio.Event()

    async def watch() -> None:
        await master.wait_finished()
        finished.set()

    try:
        with anyio.fail_after(3 * WAIT):
            async with anyio.create_task_group() as tg:
                await tg.start(master.run)
                tg.start_soon(watch)
                await master.submit_master_events(_joins(0, 3))
                await save.wait_entered()
                master.stop()
                await anyio.wait_all_tasks_blocked()  # all that could run without it has
                assert not finished.is_set(), "stopped with a snapshot half written"
                save.release.set()
                await finished.wait()
        assert save.saved.get_nowait() == 3
        assert store.snapshots.indices() == [3]
        assert not list((data_dir / "snapshots").glob(".*.tmp"))
    finally:
        store.close()


async def _stop_with_a_snapshot_due(master: Master, save: BlockedSave) -> None:
    """Run `master` until a snapshot comes due while the one before is being written
    (blocked in `save`), commit once more, then stop it; the blocked write is released once
    the stop has begun (so the snapshotter cannot take the due one any more)."""
    async with anyio.create_task_group() as tg:
        await tg.start(master.run)
        await master.submit_master_events(_joins(0, 3))  # 1..3: due, taken, blocked
        await save.wait_entered()
        await master.submit_master_events(_joins(3, 7))  # 4..7: due, waiting behind it
        await master.submit_master_events(_joins(7, 8))  # 8: not due again
        master.stop()
        await anyio.wait_all_tasks_blocked()  # the stop has cancelled the snapshotter
        save.release.set()


@pytest.mark.anyio
async def test_a_snapshot_due_at_stop_is_written_before_the_master_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot that came due but had not begun to be written was dropped at stop: the
    next start refolded every event since the one before (up to `snapshot_every`)."""
    data_dir = tmp_path / "m"
    store = EventStore.open(data_dir, snapshot_every=3)
    save = BlockedSave(store.snapshots.save)
    monkeypatch.setattr(store.snapshots, "save", save)
    master = _master(store, data_dir)
    try:
        with anyio.fail_after(3 * WAIT):
            await _stop_with_a_snapshot_due(master, save)
        # The due one (at 7) is written at the final index: it covers it.
        assert store.snapshots.indices() == [8, 3]
    finally:
        store.close()
    with EventStore.open(data_dir) as reopened:
        assert reopened.state == store.state
        loaded = restore(reopened.log, reopened.snapshots)
        assert loaded.snapshot_idx == 8, "the next start refolds events a snapshot held"


@pytest.mark.anyio
async def test_a_snapshot_at_stop_that_hangs_does_not_hold_the_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Bounded by `stop_snapshot_timeout`, then abandoned with a WARNING; the master ends
    cleanly all the same (digest.json written), as a failed snapshot never stops it."""
    data_dir = tmp_path / "m"
    store = EventStore.open(data_dir, snapshot_every=3)
    save = BlockedSave(store.snapshots.save)
    hang = threading.Event()

    def save_or_hang(idx: int, data: bytes, anchor: LogAnchor | None = None) -> Path:
        if idx == 8 and not hang.wait(WAIT):
            raise TimeoutError("the hanging snapshot write was never released")
        return save(idx, data, anchor)

    monkeypatch.setattr(store.snapshots, "save", save_or_hang)
    key_pair, _ = load_identity(data_dir)
    config = MasterConfig(data_dir=data_dir, plan_interval=3600.0, stop_snapshot_timeout=0.2)
    master = Master(store, key_pair, Membership(secret=b"s" * 32), config)
    try:
        with anyio.fail_after(3 * WAIT), caplog.at_level(logging.WARNING):
            await _stop_with_a_snapshot_due(master, save)
        assert "snapshot at index 8 was not written within 0.2 s of stopping" in caplog.text
        assert store.snapshots.indices() == [3]
        written = read_digest_file(data_dir)
        assert written is not None and written["idx"] == 8
    finally:
        hang.set()  # the abandoned write finishes (the log is not its concern)
        assert await save.next_saved() == 3
        assert await save.next_saved() == 8
        store.close()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("error", "level"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), logging.WARNING),
        (RuntimeError("bug"), logging.ERROR),
    ],
)
async def test_a_snapshot_that_cannot_be_saved_does_not_stop_the_master(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
    level: int,
) -> None:
    """A snapshot only shortens the next load: the events are durable already. (Any error
    but an OSError from the save used to escape the commit and end the master.)"""
    data_dir = tmp_path / "m"
    store = EventStore.open(data_dir, snapshot_every=3)
    tried = threading.Event()

    def failing_save(idx: int, data: bytes, anchor: LogAnchor | None = None) -> Path:
        tried.set()
        raise error

    monkeypatch.setattr(store.snapshots, "save", failing_save)
    master = _master(store, data_dir)
    try:
        with anyio.fail_after(3 * WAIT), caplog.at_level(logging.WARNING):
            async with anyio.create_task_group() as tg:
                await tg.start(master.run)
                await master.submit_master_events(_joins(0, 3))
                assert await anyio.to_thread.run_sync(tried.wait, WAIT)
                indexed = await master.submit_master_events(_joins(3, 4))
                assert indexed[-1].idx == 4
                master.stop()
        assert store.snapshots.indices() == []
        failed = [r for r in caplog.records if "could not save a snapshot at index 3" in r.message]
        assert [r.levelno for r in failed] == [level], caplog.text
    finally:
        store.close()


@pytest.mark.anyio
async def test_stop_writes_digest_json_at_the_last_index(tmp_path: Path) -> None:
    """The cycle writes digest.json once a plan interval; a clean stop after later commits
    left it naming an older index than the log holds (here: none at all)."""
    data_dir = tmp_path / "m"
    store = EventStore.open(data_dir)
    master = _master(store, data_dir)
    try:
        with anyio.fail_after(3 * WAIT):
            async with anyio.create_task_group() as tg:
                await tg.start(master.run)
                await master.submit_master_events(_joins(0, 5))
                master.stop()
        assert read_digest_file(data_dir) == {
            "idx": 5,
            "digest": state_digest(store.state),
            "role": "master",
        }
    finally:
        store.close()


@pytest.mark.anyio
async def test_a_digest_json_that_cannot_be_written_at_stop_is_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "m"
    store = EventStore.open(data_dir)
    master = _master(store, data_dir)
    try:
        (data_dir / ".digest.json.tmp").mkdir()  # every write of it fails
        with anyio.fail_after(3 * WAIT), caplog.at_level(logging.WARNING):
            async with anyio.create_task_group() as tg:
                await tg.start(master.run)
                await master.submit_master_events(_joins(0, 2))
                master.stop()
        assert f"could not write {data_dir / 'digest.json'} (stopping): " in caplog.text
        assert read_digest_file(data_dir) is None
    finally:
        store.close()


def _fail_fdatasync(fd: int) -> None:
    raise OSError(errno.EIO, "Input/output error")


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["indexer", "decision"])
async def test_a_commit_io_error_is_logged_once_then_the_master_stops(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    """Fail-stop, but said first: one ERROR line with the segment file and the OS error.
    A commit of a decision (a hello, a control request) whose caller carries on after the
    error stops the master as well: it used to keep serving until the next commit."""
    data_dir = tmp_path / "m"
    store = EventStore.open(data_dir)
    master = _master(store, data_dir)
    ended: list[BaseException] = []

    async def run_master(*, task_status: TaskStatus[list[str]]) -> None:
        try:
            await master.run(task_status=task_status)
        except Exception as exc:
            ended.append(exc)

    segment = data_dir / "log" / eventlog.segment_name(1)
    try:
        with anyio.fail_after(3 * WAIT), caplog.at_level(logging.WARNING):
            async with anyio.create_task_group() as tg:
                await tg.start(run_master)
                await master.submit_master_events(_joins(0, 2))
                monkeypatch.setattr(eventlog, "_fdatasync", _fail_fdatasync)
                with pytest.raises(OSError, match="Input/output error") as raised:
                    if path == "indexer":
                        await master.submit_master_events(_joins(2, 3))
                    else:
                        await master.index_decision(lambda state, now: _joins(2, 3))
                assert raised.value.filename == str(segment)
                await master.wait_finished()  # as the caller carries on
        assert len(ended) == 1, "the master did not end with the error"
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and errors[0].name == server.__name__, caplog.text
        line = errors[0].getMessage()
        assert str(segment) in line and "Input/output error" in line, line
        assert "index 2" in line, line  # the last acknowledged
        assert store.last_idx == 2 and master.last_idx == 2
    finally:
        store.close()


def _settlement_too_large_for_a_frame() -> EpochSettled:
    """An EpochSettled whose record is over 4 MiB: ~23,000 punished payouts with reasons."""
    payouts = tuple(
        NodePayout(
            node_id=f"12D3KooWD6FXdxPeu8Y7TL4snPwAnK2Pc7BuReewmry{i:010d}",
            units=0,
            reward=0,
            punished=True,
            reason="unexcused disconnect: no events for 3 cycles (3s); last event index 1",
        )
        for i in range(23_000)
    )
    return EpochSettled(epoch=7, payouts=payouts)


@pytest.mark.anyio
async def test_a_master_event_no_frame_could_carry_is_refused_before_it_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It was committed, then building the replicas' frames raised FrameTooLarge: the
    planner's cycle ended the master, and no catch-up could ever pass that index. Refused,
    it is one ERROR that names what else the decision held, not one every cycle, and the
    planner keeps no bookkeeping of the decision that never happened."""
    data_dir = tmp_path / "m"
    store = EventStore.open(data_dir)
    big = _settlement_too_large_for_a_frame()
    key_pair, _ = load_identity(data_dir)
    config = MasterConfig(data_dir=data_dir, plan_interval=0.01)
    master = Master(store, key_pair, Membership(secret=b"s" * 32), config)
    hook_events: list[Event] = [big]
    planner = Planner(quick_config(), maintenance_cycle=lambda state, now: list(hook_events))
    master.planner = planner
    try:
        await master.index_decision(lambda state, now: _joins(0, 2))
        with caplog.at_level(logging.DEBUG, logger=server.__name__), anyio.fail_after(WAIT):
            with pytest.raises(server.MasterEventTooLarge, match="EpochSettled of"):
                await master.index_decision(lambda state, now: [big])
            async with anyio.create_task_group() as tg:
                tg.start_soon(master._cycle)  # the planner decides it each cycle: not fatal
                while caplog.text.count("a decision was refused again: EpochSettled") < 3:
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
        assert store.last_idx == master.last_idx == 2  # nothing of it in the log
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, errors  # once, not once per cycle
        assert "one Events frame could not carry it" in errors[0]
        assert master.stats["refused_decisions"] >= 4
        # The planner's cycle held more than the settlement: said, not silently dropped.
        assert "nor the rest of its decision (1 EpochStarted)" in caplog.text
        # Its liveness book stayed as it was: the refused cycles never happened.
        assert planner.book is EMPTY_BOOK
        master._encode_frames(master._read_raw(1, 10))  # the log still streams to replicas
        hook_events.clear()
        with anyio.fail_after(WAIT):
            await master.index_decision(planner, on_durable=planner.logged)
        assert store.last_idx == 3  # its EpochStarted, once loggable
        assert set(planner.book.seen) == {"12D3KooWNode0000", "12D3KooWNode0001"}
    finally:
        master.close()
        store.close()
