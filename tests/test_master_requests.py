"""Requests through the master's shell: decided and indexed one at a time.

The pure rule (tests/test_requests.py) says the second request for the last maintenance slot
loses. This checks the shell keeps that true when the requests arrive together: each
decision is made on the state that already holds the earlier one's events, even while the
earlier one is still being written to disk.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from maintenance_log import HOUR, MIN, Log, node_id

from cluster.control import (
    MaintenanceFinish,
    MaintenanceSchedule,
    Reply,
    Request,
    SessionCreate,
    SessionDelete,
    decode_reply,
    encode_message,
)
from cluster.master import service as service_module
from cluster.master.server import Master
from cluster.master.service import MasterService
from cluster.net.identity import load_identity
from cluster.net.membership import Membership
from cluster.shared.events import IndexedEvent, MaintenanceFinished, MaintenanceScheduled
from cluster.shared.maintenance_policy import MaintenancePolicy
from cluster.shared.store import EventStore


@pytest.mark.anyio
async def test_concurrent_requests_for_the_last_slot_exactly_one_wins(tmp_path: Path) -> None:
    policy = MaintenancePolicy(max_concurrent_nodes=1)
    log = Log(policy)
    nodes = [node_id(i) for i in range(1, 5)]
    for n in nodes:
        log.join(n)
    store = EventStore.open(tmp_path / "master")
    store.append(log.log)
    key_pair, _ = load_identity(tmp_path / "master")
    master = Master(store, key_pair, Membership(secret=b"s" * 32), now_ms=lambda: log.now)
    service = MasterService(master, policy)
    replies: dict[str, Reply] = {}

    async def schedule(node: str) -> None:
        request = MaintenanceSchedule(in_ms=2 * HOUR, duration_ms=30 * MIN)
        replies[node] = await service.handle(request, node)

    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for n in nodes:  # all four in flight before any is indexed
                    tg.start_soon(schedule, n)
    finally:
        master.close()
        store.close()
    winners = [n for n, r in replies.items() if r.ok]
    assert len(replies) == 4 and len(winners) == 1, replies
    for n, reply in replies.items():
        if n not in winners:
            assert "max_concurrent_nodes" in reply.message, reply.message
    # The log agrees: exactly one window, for the winner, and the state holds it.
    reopened = EventStore.open(tmp_path / "master")
    try:
        scheduled = [
            ie.event for ie in reopened.read_from(1) if isinstance(ie.event, MaintenanceScheduled)
        ]
        assert [e.node_id for e in scheduled] == winners
        assert set(reopened.state.open_window_by_node) == set(winners)
    finally:
        reopened.close()


@pytest.mark.anyio
async def test_a_decision_is_logged_at_the_time_it_was_made(tmp_path: Path) -> None:
    # The wall clock may step back (NTP) between the decision and its indexing: a finish
    # decided 1 s after the window's start must not be logged 1 s before it, where the
    # reducer ignores it and the log disagrees with the "finished" reply.
    policy = MaintenancePolicy()
    log = Log(policy)
    a = node_id(1)
    log.join(a)
    log.join(node_id(2))
    store = EventStore.open(tmp_path / "master")
    store.append(log.log)
    key_pair, _ = load_identity(tmp_path / "master")
    master = Master(store, key_pair, Membership(secret=b"s" * 32), now_ms=lambda: log.now)
    service = MasterService(master, policy)
    try:
        with anyio.fail_after(30):
            scheduled = await service.handle(
                MaintenanceSchedule(in_ms=20 * MIN, duration_ms=HOUR), a
            )
            assert scheduled.ok and isinstance(scheduled.data, dict), scheduled.message
            start = scheduled.data["start_ms"]
            reads = iter([start + 1_000, start - 1_000])  # the second read: stepped back
            master.now_ms = lambda: next(reads, start - 1_000)
            finished = await service.handle(MaintenanceFinish(), a)
        assert finished.ok, finished.message
        assert a not in master.state.open_window_by_node  # the log holds the finish too
        *_, last = store.read_from(store.last_idx)
        assert isinstance(last.event, MaintenanceFinished) and last.master_time_ms == start + 1_000
    finally:
        master.close()
        store.close()


@pytest.mark.anyio
async def test_deleting_a_deleted_session_says_when_it_was_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It said "no session 's2-chat'", as for an id that never named a session."""
    log = Log()
    log.join(node_id(1))
    store = EventStore.open(tmp_path / "master")
    store.append(log.log)
    key_pair, _ = load_identity(tmp_path / "master")
    master = Master(store, key_pair, Membership(secret=b"s" * 32), now_ms=lambda: log.now)
    service = MasterService(master, log.policy)
    try:
        with anyio.fail_after(30):
            created = await service.handle_local(
                SessionCreate(slots=1, memory_per_slot_mb=1, name="chat")
            )
            sid = created.data["session_id"]
            assert created.ok and sid == f"s{store.last_idx}-chat"
            created_idx = store.last_idx
            assert (await service.handle_local(SessionDelete(session_id=sid))).ok
            deleted_idx = store.last_idx
            again = await service.handle_local(SessionDelete(session_id=sid))
            assert not again.ok
            assert again.message == (
                f"session {sid!r} was already deleted, at index {deleted_idx} (08:00 UTC; "
                f"created at index {created_idx}): nothing to delete"
            )
            # A deletion beyond the bounded scan: still "already deleted", without its index.
            monkeypatch.setattr(service_module, "DELETION_SCAN_EVENTS", 0)
            far = await service.handle_local(SessionDelete(session_id=sid))
            assert far.message == (
                f"session {sid!r} (created at index {created_idx}, 08:00 UTC) was already "
                "deleted: nothing to delete"
            )
            # An id that never named a session is still "no session": one past the log's
            # end, one whose index holds another event, one of another name at that index.
            for never in (f"s{store.last_idx + 5}-chat", "s1", f"s{created_idx}-other", "x"):
                reply = await service.handle_local(SessionDelete(session_id=never))
                assert not reply.ok and reply.message.startswith(f"no session {never!r}"), reply
    finally:
        master.close()
        store.close()


@pytest.mark.anyio
async def test_a_members_delete_of_a_deleted_session_is_refused_as_not_its_call(
    tmp_path: Path,
) -> None:
    """A worker's forwarded SessionDelete of a deleted session was told "session ... was
    already deleted" (the operator's answer), after a scan of the log it could repeat."""
    log = Log()
    worker = node_id(1)
    log.join(worker)
    store = EventStore.open(tmp_path / "master")
    store.append(log.log)
    key_pair, _ = load_identity(tmp_path / "master")
    master = Master(store, key_pair, Membership(secret=b"s" * 32), now_ms=lambda: log.now)
    service = MasterService(master, log.policy)
    reads: list[tuple[int, int]] = []
    read_events = master.read_events

    async def counting(from_idx: int, limit: int) -> list[IndexedEvent]:
        reads.append((from_idx, limit))
        return await read_events(from_idx, limit)

    master.read_events = counting  # type: ignore[method-assign]
    try:
        with anyio.fail_after(30):
            created = await service.handle_local(
                SessionCreate(slots=1, memory_per_slot_mb=1, name="chat")
            )
            assert isinstance(created.data, dict)
            sid = created.data["session_id"]
            assert (await service.handle_local(SessionDelete(session_id=sid))).ok
            reads.clear()
            raw = await service.handle_forwarded(
                encode_message(SessionDelete(session_id=sid)), worker
            )
            reply = decode_reply(raw)
            assert not reply.ok
            assert reply.message == "sessions are managed by the operator on the master host"
            assert reads == []  # no log read for a request refused as not the member's call
            # The operator is still told when it was deleted.
            again = await service.handle_local(SessionDelete(session_id=sid))
            assert again.message.startswith(f"session {sid!r} was already deleted, at index")
    finally:
        master.close()
        store.close()


@pytest.mark.anyio
async def test_a_windows_unplaced_sessions_are_found_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding them places every session twice per moment (~120 ms per moment at 10,000
    nodes and 1,000 sessions): it ran inside the decision, on the event loop with the index
    lock held, stalling every worker's submissions. It runs once, in a worker thread, and
    the decision says what it found."""
    import threading

    from cluster.control import MaintenanceCheck
    from cluster.master.window_fit import Shortfall

    threads: list[int] = []

    def found(*args: object) -> tuple[Shortfall, ...]:
        threads.append(threading.get_ident())
        return (Shortfall(session_id="chat", at_ms=HOUR, reason="no room"),)

    monkeypatch.setattr(service_module, "sessions_short", found)
    request = MaintenanceCheck(in_ms=2 * HOUR, duration_ms=30 * MIN)
    reply = await _handled(tmp_path, 4, request, node_id(1))
    assert reply.ok and "session chat from" in reply.message and "no room" in reply.message
    assert isinstance(reply.data, dict)
    assert [s["session_id"] for s in reply.data["unplaced_sessions"]] == ["chat"]
    assert len(threads) == 1 and threads[0] != threading.get_ident(), threads


@pytest.mark.anyio
async def test_a_status_request_is_answered_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building the status (~18 ms at 300 nodes, growing with the cluster) ran on the event
    loop, and any member may ask as often as it likes: a member's loop of requests stalled
    every worker's submissions. It is built in a worker thread, as /api/status is."""
    import threading

    from cluster.control import StatusRequest

    threads: list[int] = []
    from cluster.shared.status_view import cluster_status as real

    def status(*args: object, **kwargs: object) -> object:
        threads.append(threading.get_ident())
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(service_module, "cluster_status", status)
    reply = await _handled(tmp_path, 3, StatusRequest(), node_id(1))
    assert reply.ok and "nodes: 3" in reply.message, reply.message
    assert len(threads) == 1 and threads[0] != threading.get_ident(), threads


async def _handled(tmp_path: Path, nodes: int, request: Request, requester: str) -> Reply:
    """`request` from `requester` answered by a master over a log of `nodes` joined nodes."""
    log = Log(MaintenancePolicy())
    for i in range(1, nodes + 1):
        log.join(node_id(i))
    store = EventStore.open(tmp_path / "master")
    store.append(log.log)
    key_pair, _ = load_identity(tmp_path / "master")
    master = Master(store, key_pair, Membership(secret=b"s" * 32), now_ms=lambda: log.now)
    try:
        with anyio.fail_after(30):
            return await MasterService(master, MaintenancePolicy()).handle(request, requester)
    finally:
        master.close()
        store.close()
