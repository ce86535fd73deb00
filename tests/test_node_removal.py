"""Removing a node that is gone for good (`NodeRemoved`, `cluster node remove`), purely.

A decommissioned host (or one whose disk and key were replaced) stayed DISCONNECTED in
status, counts and /metrics forever. The operator now removes it: its record becomes a
tombstone that keeps its slot, so the node marks and gauges indexed by slot are never handed
to a node that joins later.
"""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from maintenance_log import HOUR, MIN, Log, node_id
from msgspec import UNSET

from cluster.control import NodeRemove
from cluster.master.config import PlannerConfig
from cluster.master.decision_log import describe
from cluster.master.requests import LOCAL_OPERATOR, MAX_REMOVE_REASON_CHARS, decide
from cluster.master.settlement import settle_epoch
from cluster.shared import codec
from cluster.shared.apply import apply, fold
from cluster.shared.events import (
    MASTER_ORIGIN,
    NO_RUNNERS_DIGEST,
    Event,
    IndexedEvent,
    NodeConnected,
    NodeDisconnected,
    NodeGatheredInfo,
    NodeHeartbeat,
    NodeInfo,
    NodePayout,
    NodeRemoved,
    NodeStopping,
    WorkReported,
)
from cluster.shared.humanize import short_id
from cluster.shared.state import EMPTY_STATE, RemovedNode, State, WindowState
from cluster.shared.status_view import window_note

A, B, C, D = (node_id(i) for i in range(1, 5))


def _removal(log: Log, node: str, reason: str = "") -> tuple[bool, str]:
    d = decide(
        log.state, NodeRemove(node_id=node, reason=reason), LOCAL_OPERATOR, log.now, log.policy
    )
    for ev in d.events:
        log.emit(ev)
    return d.reply.ok, d.reply.message


def _three_nodes() -> Log:
    log = Log()
    for node in (A, B, C):
        log.join(node)
    return log


# --------------------------------------------------------------------------------------------
# The reducer
# --------------------------------------------------------------------------------------------


def test_a_removed_node_leaves_nodes_and_keeps_its_slot_as_a_tombstone() -> None:
    log = _three_nodes()
    log.disconnect(B)
    log.advance(MIN)
    log.emit(NodeRemoved(node_id=B, reason="decommissioned"))
    ie = log.log[-1]
    state = log.state
    assert B not in state.nodes and set(state.nodes) == {A, C}
    assert dict(state.removed()) == {
        1: RemovedNode(node_id=B, removed_idx=ie.idx, removed_ms=log.now, reason="decommissioned")
    }
    assert state.removed_node(B) == state.removed()[1]
    assert state.next_node_slot() == 3
    # A node joining now takes slot 3, not B's slot 1 (nor len(nodes) == 2, C's slot).
    log.join(D)
    assert log.state.nodes[D].slot == 3
    assert log.state.last_event_index(D) == log.log[-1].idx
    own_last = max(e.idx for e in log.log if e.origin == C)  # its self-test, untouched
    assert log.state.last_event_index(C) == own_last


def test_a_removed_node_that_connects_again_takes_back_its_slot_and_its_marks() -> None:
    """It took a fresh slot, so `last_seq` (by which the master drops the events it already
    logged) started again at 0: events logged but never acknowledged were logged twice."""
    log = _three_nodes()
    log.heartbeat(A)
    last_own = log.log[-1]
    log.disconnect(A)
    log.emit(NodeRemoved(node_id=A))
    assert log.state.last_seq(A) == 0  # out of the cluster
    log.emit(NodeConnected(node_id=A, boot_id="b2", runner_digest=NO_RUNNERS_DIGEST))
    state = log.state
    rec = state.nodes[A]
    assert rec.connected and rec.slot == 0 and rec.self_test is None
    assert (rec.boot_id, rec.runner_digest) == ("b2", NO_RUNNERS_DIGEST)
    assert state.last_seq(A) == last_own.seq and state.last_event_index(A) == last_own.idx
    assert state.removed_node(A) is None
    # No tombstone left: as a log without removals (the field is absent, one digest).
    assert state.removed_nodes is UNSET and state.next_node_slot() == 3
    log.join(D)
    assert log.state.nodes[D].slot == 3
    # Removed again: the same slot again, one tombstone.
    log.disconnect(A)
    log.emit(NodeRemoved(node_id=A))
    assert {s: r.node_id for s, r in log.state.removed().items()} == {0: A}
    assert log.state.removed_node(A) == log.state.removed()[0]


def test_a_removed_node_that_connects_again_has_none_of_its_old_gauges() -> None:
    """Its slot came back with the gauges last reported there (CPU %, memory, ...), shown as
    the rejoined node's until it reported new ones: nothing but its marks comes back."""
    log = _three_nodes()
    gauges = NodeInfo(
        cpu_percent=97.0,
        memory_available_mb=512,
        disk_free_mb=10,
        net_bytes_sent=1,
        net_bytes_recv=2,
        hostname="old-host",
    )
    for node in (A, B):
        log.emit(NodeGatheredInfo(node_id=node, source="cpu", info=gauges), origin=node)
    b_before = log.state.node_info(B)
    log.disconnect(A)
    log.emit(NodeRemoved(node_id=A))
    log.emit(NodeConnected(node_id=A, boot_id="b2"))
    state = log.state
    info = state.node_info(A)
    assert info is not None and state.nodes[A].slot == 0
    assert info == NodeInfo(), info  # no gauge, no hostname: nothing reported yet
    assert state.node_gauges.reported(0) == {}
    assert state.node_info(B) == b_before  # another slot's gauges are untouched
    # The state is the one a fold of the same log makes, and survives a snapshot.
    assert fold(EMPTY_STATE, log.log) == state
    assert codec.decode_state(codec.encode_state(state)) == state
    # What it reports now is what it shows.
    log.emit(NodeGatheredInfo(node_id=A, source="cpu", info=NodeInfo(cpu_percent=3.0)), origin=A)
    assert log.state.node_info(A) == NodeInfo(cpu_percent=3.0)


def test_a_removed_nodes_own_event_without_a_hello_changes_nothing() -> None:
    """It re-created the node as a bare record (no boot id, no runner setting): a facts-only
    node shown self-testing, a runner node never placeable. The master drops a removed
    node's streams, so only a log can say it; the event is ignored."""
    log = _three_nodes()
    log.heartbeat(A)
    log.disconnect(A)
    log.emit(NodeRemoved(node_id=A))
    before = log.state
    for state in (apply(before, _next(before, A)), fold(before, [_next(before, A)])):
        assert state == msgspec.structs.replace(
            before, last_applied=before.last_applied + 1, last_time_ms=log.now + 1
        )
        assert A not in state.nodes and state.removed_node(A) is not None


def _next(state: State, origin: str) -> IndexedEvent:
    return IndexedEvent(
        state.last_applied + 1,
        state.last_time_ms + 1,
        origin,
        99,
        WorkReported(devshard_id="ds", node_id=origin, units=4, epoch=1),
    )


def test_removal_closes_open_windows_drops_credit_and_keeps_ledgers() -> None:
    log = _three_nodes()
    log.epoch(1)
    log.place("ds", B, ends_ms=log.now + 10 * MIN)
    log.emit(WorkReported(devshard_id="ds", node_id=B, units=4, epoch=1), origin=B)
    win = log.schedule_ok(C, log.now + 2 * HOUR, HOUR)
    assert C in log.state.credit_ms_by_node
    log.disconnect(B)
    log.disconnect(C)
    log.emit(NodeRemoved(node_id=B))
    log.emit(NodeRemoved(node_id=C))
    state = log.state
    closed = state.windows[win]
    assert closed.state is WindowState.CANCELLED and closed.outcome == "removed"
    assert closed.credit_refund_ms == 0
    assert C not in state.open_window_by_node and state.closed_windows_by_node[C] == (win,)
    assert C not in state.credit_ms_by_node and B not in state.credit_ms_by_node
    # History stays: B's work this epoch is still in its ledger, to be settled as any node's.
    assert state.ledgers[1].node(B).units == 4


def test_an_active_window_closes_as_completed_for_the_time_it_excused() -> None:
    log = _three_nodes()
    win = log.schedule_ok(A, log.now + 2 * HOUR, HOUR)
    log.advance(2 * HOUR)
    log.cycle()  # starts the window
    assert log.state.windows[win].state is WindowState.ACTIVE
    log.emit(NodeRemoved(node_id=A))
    closed = log.state.windows[win]
    assert closed.state is WindowState.COMPLETED and closed.outcome == "removed"
    assert closed.closed_ms == log.now
    # `cluster status` says why it closed (it read "finished (removed)").
    assert window_note(closed, log.now).startswith("finished (node removed) ")


def test_removing_an_unknown_node_changes_nothing() -> None:
    log = _three_nodes()
    before = log.state
    log.emit(NodeRemoved(node_id=D))
    assert (
        msgspec.structs.replace(
            log.state,
            last_applied=before.last_applied,
            last_time_ms=before.last_time_ms,
            master_seq=before.master_seq,
        )
        == before
    )


# --------------------------------------------------------------------------------------------
# Slots stay monotonic: no two nodes ever share marks
# --------------------------------------------------------------------------------------------

_NODES = (A, B, C, D)
_steps = st.lists(
    st.tuples(
        st.sampled_from(["speak", "connect", "disconnect", "remove"]), st.sampled_from(_NODES)
    ),
    max_size=60,
)


def _log_of(steps: list[tuple[str, str]]) -> list[IndexedEvent]:
    events: list[tuple[str, Event]] = []
    for action, node in steps:
        if action == "speak":
            events.append((node, NodeHeartbeat(node_id=node)))
        elif action == "connect":
            events.append((MASTER_ORIGIN, NodeConnected(node_id=node)))
        elif action == "disconnect":
            events.append((MASTER_ORIGIN, NodeDisconnected(node_id=node, reason="quiet")))
        else:
            events.append((MASTER_ORIGIN, NodeRemoved(node_id=node)))
    seqs: dict[str, int] = {}
    log = []
    for idx, (origin, ev) in enumerate(events, start=1):
        seqs[origin] = seqs.get(origin, 0) + 1
        log.append(IndexedEvent(idx, 1_000 * idx, origin, seqs[origin], ev))
    return log


@settings(max_examples=200, deadline=None)
@given(steps=_steps, cut=st.integers(0, 60))
def test_removals_never_hand_a_slot_or_its_marks_to_another_node(
    steps: list[tuple[str, str]], cut: int
) -> None:
    log = _log_of(steps)
    state: State = EMPTY_STATE
    live: set[str] = set()
    removed: set[str] = set()
    last_own: dict[str, IndexedEvent] = {}  # node -> its last own event the state took
    slot_of: dict[str, int] = {}  # node -> the slot it first took: its own for good
    for ie in log:
        state = apply(state, ie)
        ev = ie.event
        if isinstance(ev, NodeConnected):
            live.add(ev.node_id)
            removed.discard(ev.node_id)
        elif isinstance(ev, NodeRemoved):
            if ev.node_id in live:
                live.remove(ev.node_id)
                removed.add(ev.node_id)
        elif ie.origin != MASTER_ORIGIN and ie.origin not in removed:
            # A removed node's own event without a new hello changes nothing.
            live.add(ie.origin)
            last_own[ie.origin] = ie
        tombstones = state.removed()
        assert set(state.nodes) == live
        assert sorted(t.node_id for t in tombstones.values()) == sorted(removed)
        slots = {rec.slot for rec in state.nodes.values()}
        assert len(slots) == len(state.nodes)  # no two live nodes share a slot
        assert not slots & set(tombstones)  # nor a live node a removed one's
        assert slots | set(tombstones) == set(range(state.next_node_slot()))  # dense
        held = [(rec.node_id, rec.slot) for rec in state.nodes.values()]
        held += [(t.node_id, slot) for slot, t in tombstones.items()]
        for node, slot in held:
            assert slot_of.setdefault(node, slot) == slot  # a node keeps its slot for good
        for node in state.nodes:
            # Its marks carry over a removal: the master's duplicate check reads them.
            own = last_own.get(node)
            assert state.last_event_index(node) == (own.idx if own else 0)
            assert state.last_seq(node) == (own.seq if own else 0)
    # Batched folding and a snapshot round trip agree.
    cut = min(cut, len(log))
    assert fold(fold(EMPTY_STATE, log[:cut]), log[cut:]) == state
    assert codec.decode_state(codec.encode_state(state)) == state


# --------------------------------------------------------------------------------------------
# Encoding: logs without removals encode (and digest) as before
# --------------------------------------------------------------------------------------------


def test_a_state_without_removals_encodes_without_the_tombstones_field() -> None:
    log = _three_nodes()
    assert b"removed_nodes" not in codec.encode_state(log.state)
    log.disconnect(A)
    log.emit(NodeRemoved(node_id=A))
    data = codec.encode_state(log.state)
    assert b"removed_nodes" in data
    assert codec.decode_state(data) == log.state


def test_a_snapshot_whose_live_node_holds_a_tombstones_slot_is_refused() -> None:
    log = _three_nodes()
    log.disconnect(A)
    log.emit(NodeRemoved(node_id=A))
    bad = msgspec.structs.replace(
        log.state,
        removed_nodes=log.state.removed().set(
            1, RemovedNode(node_id="x", removed_idx=1, removed_ms=0)
        ),
    )
    with pytest.raises(
        msgspec.ValidationError, match=f"node '{B}' holds slot 1, kept by removed node 'x'"
    ):
        codec.decode_state(codec.encode_state(bad))


def test_a_snapshot_whose_node_is_both_live_and_removed_or_removed_twice_is_refused() -> None:
    """A node keeps one slot for good (it takes back its tombstone's when it rejoins)."""
    log = _three_nodes()
    log.disconnect(A)
    log.emit(NodeRemoved(node_id=A))
    log.join(D)
    tomb = log.state.removed()[0]
    # A's tombstone under D's slot 3 too, D's record gone: slots stay dense, A is twice.
    twice = msgspec.structs.replace(
        log.state, nodes=log.state.nodes.delete(D), removed_nodes=log.state.removed().set(3, tomb)
    )
    with pytest.raises(msgspec.ValidationError, match=f"'{A}' has two tombstones, slots 0 and 3"):
        codec.decode_state(codec.encode_state(twice))
    # B's record filed as A's, beside A's tombstone.
    rec = log.state.nodes[B]
    both = msgspec.structs.replace(
        log.state,
        nodes=log.state.nodes.delete(B).set(A, msgspec.structs.replace(rec, node_id=A)),
    )
    with pytest.raises(
        msgspec.ValidationError, match=f"node '{A}' is both live \\(slot 1\\) and removed"
    ):
        codec.decode_state(codec.encode_state(both))


# --------------------------------------------------------------------------------------------
# The operator's request
# --------------------------------------------------------------------------------------------


def test_only_a_disconnected_node_known_to_the_cluster_is_removed() -> None:
    log = _three_nodes()
    ok, msg = _removal(log, D)
    assert not ok and msg.startswith(f"unknown node {D}: it has never joined this cluster")
    ok, msg = _removal(log, "")
    assert not ok and "name the node to remove" in msg
    ok, msg = _removal(log, A)
    assert not ok and msg.startswith(f"node {A} is connected: stop its worker first")
    # A worker already stopped is not told to stop: it said goodbye, the disconnect follows.
    bye = log.emit(NodeStopping(node_id=C, boot_id=log.boot_id(C), reason="SIGTERM"), origin=C)
    ok, msg = _removal(log, C)
    assert not ok and msg.startswith(
        f"node {C} is stopping: its worker said goodbye at event {bye.idx}; the master marks it "
        "disconnected after a few quiet plan cycles"
    )
    ok, msg = _removal(log, B, "x" * (MAX_REMOVE_REASON_CHARS + 1))
    assert not ok and f"at most {MAX_REMOVE_REASON_CHARS}" in msg
    log.disconnect(B)
    before = len(log.log)
    ok, msg = _removal(log, B, "disk replaced")
    assert ok and msg.startswith(
        f"node {B} removed. Should it connect again it rejoins afresh (a self-test to come"
    )
    assert [ie.event for ie in log.log[before:]] == [NodeRemoved(node_id=B, reason="disk replaced")]
    ok, msg = _removal(log, B)
    assert not ok and msg.startswith(f"node {B} is already removed: since ")
    assert "(disk replaced)" in msg


def test_a_node_in_an_active_window_is_refused_with_what_to_do() -> None:
    log = _three_nodes()
    win = log.schedule_ok(A, log.now + 2 * HOUR, HOUR)
    log.advance(2 * HOUR)
    log.cycle()
    ok, msg = _removal(log, A)
    assert not ok and f"node {A} is in maintenance (window {win})" in msg
    assert f"cluster maintenance finish --node {A}" in msg


def test_a_disconnected_node_with_a_pending_window_is_removed_and_told() -> None:
    log = _three_nodes()
    win = log.schedule_ok(A, log.now + 2 * HOUR, HOUR)
    log.disconnect(A)
    ok, msg = _removal(log, A)
    assert ok and f"its maintenance window {win} is closed" in msg


def test_a_worker_cannot_remove_nodes() -> None:
    log = _three_nodes()
    log.disconnect(B)
    d = decide(log.state, NodeRemove(node_id=B), A, log.now, log.policy)
    assert (
        not d.reply.ok and d.reply.message == "nodes are removed by the operator on the master host"
    )
    assert d.events == ()


def test_the_decision_log_says_a_removal_at_info() -> None:
    log = _three_nodes()
    log.disconnect(B)
    line = describe(NodeRemoved(node_id=B, reason="decommissioned"), log.state, log.now)
    assert line is not None and line.level == 20
    assert line.message == (
        f"node {B} removed by the operator: decommissioned; "
        "it no longer counts as a node of the cluster"
    )


def test_a_removed_node_is_paid_for_its_work_but_earns_no_credit() -> None:
    log = _three_nodes()
    log.epoch(1)
    epoch = log.state.epoch
    assert epoch is not None
    log.place("ds", B, ends_ms=epoch.end_ms)
    log.emit(WorkReported(devshard_id="ds", node_id=B, units=4, epoch=1), origin=B)
    # Excused (an older log's disconnect in maintenance): B's work stays payable.
    log.emit(NodeDisconnected(node_id=B, reason="maintenance", excused=True))
    log.emit(NodeRemoved(node_id=B))
    log.now = epoch.end_ms
    settled = settle_epoch(log.state, epoch, PlannerConfig(), policy=log.policy)
    pay = {p.node_id: p for p in settled.payouts}
    assert pay[B] == NodePayout(node_id=B, units=4, reward=4, punished=False, credit_earned_ms=0)
    assert pay[A].credit_earned_ms == log.policy.credit_per_epoch_ms
    log.emit(settled)
    assert B not in log.state.credit_ms_by_node


def test_the_decision_log_says_a_removed_node_that_returns_joins_again() -> None:
    log = _three_nodes()
    log.disconnect(B)
    log.emit(NodeRemoved(node_id=B))
    line = describe(NodeConnected(node_id=B), log.state, log.now)
    assert line is not None
    assert line.message == (
        f"node {B} joined the cluster again after its removal: a self-test to come, "
        "maintenance credit from the initial grant"
    )


def test_a_node_is_removed_by_the_short_form_status_shows_and_told_by_its_full_id() -> None:
    log = _three_nodes()
    log.disconnect(B)
    shown = short_id(B)
    assert shown != B
    before = len(log.log)
    ok, msg = _removal(log, shown, "decommissioned")
    assert ok and msg.startswith(f"node {B} removed.")
    # The event (and so the decision log) names the full id, never what was typed.
    assert [ie.event for ie in log.log[before:]] == [
        NodeRemoved(node_id=B, reason="decommissioned")
    ]
    # Its short form names no node now (the refusal says it was removed and gives its full
    # id); its full id still finds the tombstone.
    ok, msg = _removal(log, shown)
    assert not ok and msg.startswith(f"node {shown} is no node of this cluster: that node "), msg
    assert f"removed -- {B}, removed " in msg and msg.endswith("named by its full id only"), msg
    ok, msg = _removal(log, B)
    assert not ok and msg.startswith(f"node {B} is already removed: since ")
    # A name that fits two nodes removes neither.
    log.disconnect(C)
    ok, msg = _removal(log, "12D3KooWTestNode")
    assert not ok and "is ambiguous: it matches 2 nodes" in msg
    assert C in log.state.nodes and len(log.log) == before + 2
