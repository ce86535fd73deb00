"""`apply(state, indexed_event) -> state`: the one pure function every node folds the log with.

Pure means: no clock, randomness, environment, I/O or configuration -- the same log gives
the same state on every machine and under every PYTHONHASHSEED (DESIGN rule 1). Ordering is
explicit: an event whose index is not `last_applied + 1` raises `OutOfOrderError`, which
the caller handles (buffer it, fetch the gap); it is never an assert (DESIGN rule 5).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from cluster.shared.events import (
    EVENT_TYPES,
    MASTER_ORIGIN,
    DevshardFinalized,
    DevshardPlaced,
    EpochSettled,
    EpochStarted,
    IndexedEvent,
    LateWorkSettled,
    MaintenanceCancelled,
    MaintenanceDrainStarted,
    MaintenanceFinished,
    MaintenanceOverrun,
    MaintenanceScheduled,
    MaintenanceStarted,
    NodeConnected,
    NodeDisconnected,
    NodeGatheredInfo,
    NodeHeartbeat,
    RunnerSelfTestCompleted,
    RunnerStatusUpdated,
    SessionDeleted,
    SessionRequested,
    SessionUnplaced,
    WorkMissed,
    WorkReported,
)
from cluster.shared.reducers import epochs, maintenance, nodes, runners
from cluster.shared.state import NodeRecord, State

_replace = msgspec.structs.replace
_heartbeat = nodes.node_heartbeat


class OutOfOrderError(Exception):
    """`apply` was given an event that is not the next one in the log.

    `expected` is `last_applied + 1`; `got` is the event's index. A caller that sees
    `got > expected` has a gap to fetch; `got < expected` is a duplicate it may drop.
    """

    def __init__(self, expected: int, got: int) -> None:
        super().__init__(f"event index {got} is out of order: expected {expected}")
        self.expected = expected
        self.got = got


class OriginSlotError(ValueError):
    """A record's `origin_slot` contradicts its origin: the state gives that node another slot.

    The master stamps a node's slot from its own state, and a slot never changes once
    assigned, so this means a log that the master did not write as it is (or a bug): folding
    it further would credit one node's events to another.
    """

    def __init__(self, ie: IndexedEvent, slot: int) -> None:
        super().__init__(
            f"event {ie.idx}: origin {ie.origin!r} carries slot {ie.origin_slot}, "
            f"but that node's slot is {slot}"
        )
        self.idx = ie.idx
        self.origin = ie.origin
        self.origin_slot = ie.origin_slot
        self.slot = slot


def _checked_slot(ie: IndexedEvent, rec: NodeRecord | None, node_count: int) -> None:
    """Raise `OriginSlotError` if `ie` names a slot other than the one its origin has (or,
    new, is about to take)."""
    if ie.origin_slot >= 0:
        slot = node_count if rec is None else rec.slot
        if ie.origin_slot != slot:
            raise OriginSlotError(ie, slot)


Reducer = Callable[[State, IndexedEvent, Any], State]

#: One reducer per event type. A test checks the table covers the whole union.
REDUCERS: dict[type[Any], Reducer] = {
    NodeGatheredInfo: nodes.node_gathered_info,
    NodeHeartbeat: nodes.node_heartbeat,
    NodeConnected: nodes.node_connected,
    NodeDisconnected: nodes.node_disconnected,
    RunnerSelfTestCompleted: nodes.runner_self_test_completed,
    RunnerStatusUpdated: runners.runner_status_updated,
    WorkReported: runners.work_reported,
    WorkMissed: runners.work_missed,
    MaintenanceScheduled: maintenance.maintenance_scheduled,
    MaintenanceCancelled: maintenance.maintenance_cancelled,
    MaintenanceDrainStarted: maintenance.maintenance_drain_started,
    MaintenanceStarted: maintenance.maintenance_started,
    MaintenanceFinished: maintenance.maintenance_finished,
    MaintenanceOverrun: maintenance.maintenance_overrun,
    EpochStarted: epochs.epoch_started,
    SessionRequested: epochs.session_requested,
    SessionDeleted: epochs.session_deleted,
    DevshardPlaced: epochs.devshard_placed,
    SessionUnplaced: epochs.session_unplaced,
    DevshardFinalized: epochs.devshard_finalized,
    EpochSettled: epochs.epoch_settled,
    LateWorkSettled: epochs.late_work_settled,
}
if set(REDUCERS) != set(EVENT_TYPES):  # a definition error, caught at import
    raise RuntimeError("every event type needs exactly one reducer")


def apply(state: State, ie: IndexedEvent) -> State:
    """Fold one indexed event into state, returning the new state."""
    expected = state.last_applied + 1
    if ie.idx != expected:
        raise OutOfOrderError(expected, ie.idx)
    origin = ie.origin
    event = ie.event
    reducer = REDUCERS[type(event)]
    if origin == MASTER_ORIGIN:
        state = reducer(state, ie, event)
        return _replace(
            state, last_applied=ie.idx, last_time_ms=ie.master_time_ms, master_seq=ie.seq
        )
    # Every node-originated event is liveness (DESIGN rule 6): it advances the node's marks.
    # The index and time are set before the reducer runs (reducers read them from the event,
    # never from state), so most events cost one State copy.
    marks = state.last_event_by_node.advance(ie.origin_slot, ie.idx, ie.seq)
    if marks is not None:
        # A connected node's event, found by the slot the master stamped on it: its record
        # is not read (NodeMarks.advance says why), unless a reducer needs it.
        if reducer is _heartbeat:  # the commonest event: nothing else to do
            return _replace(
                state, last_event_by_node=marks, last_applied=ie.idx, last_time_ms=ie.master_time_ms
            )
        if type(event) is NodeGatheredInfo and event.node_id == origin:
            # As below, with the record in hand; its slot is checked as it is read anyway.
            node_map = state.nodes
            known = node_map.get(origin)
            if known is None or known.slot != ie.origin_slot:
                raise OriginSlotError(ie, len(node_map) if known is None else known.slot)
            updated, gauges = nodes.info_update(known, state.node_gauges, event.info)
            return _replace(
                state,
                nodes=node_map if updated is known else node_map.set(origin, updated),
                node_gauges=gauges,
                last_event_by_node=marks,
                last_applied=ie.idx,
                last_time_ms=ie.master_time_ms,
            )
        state = _replace(
            state, last_event_by_node=marks, last_applied=ie.idx, last_time_ms=ie.master_time_ms
        )
        return reducer(state, ie, event)
    node_map = state.nodes
    try:
        # Subscript, not `.get()`: immutables' get() is a varargs call that builds an
        # argument tuple; the key is missing only once per node (its first event).
        rec: NodeRecord | None = node_map[origin]
    except KeyError:
        rec = None
    _checked_slot(ie, rec, len(node_map))
    if rec is None or not rec.connected:
        # A new or disconnected node (re)joins with its event: before the reducer, which
        # reads whether the node exists and is connected.
        rec = nodes.joined(rec, origin, ie, len(node_map))
        node_map = node_map.set(origin, rec)
        state = _replace(
            state, last_event_by_node=state.last_event_by_node.with_connected(rec.slot, True)
        )
    elif reducer is _heartbeat:  # the commonest event: nothing else to do
        return _replace(
            state,
            last_event_by_node=state.last_event_by_node.set_at(
                rec.marks_mid, rec.marks_leaf, rec.marks_offset, ie.idx, ie.seq
            ),
            last_applied=ie.idx,
            last_time_ms=ie.master_time_ms,
        )
    elif type(event) is NodeGatheredInfo and event.node_id == origin:
        # A node reporting its own info, the commonest write: done here with the record in
        # hand, in one State copy. Mostly gauges, which leave the record and the map alone.
        updated, gauges = nodes.info_update(rec, state.node_gauges, event.info)
        return _replace(
            state,
            nodes=node_map if updated is rec else node_map.set(origin, updated),
            node_gauges=gauges,
            last_event_by_node=state.last_event_by_node.set_at(
                rec.marks_mid, rec.marks_leaf, rec.marks_offset, ie.idx, ie.seq
            ),
            last_applied=ie.idx,
            last_time_ms=ie.master_time_ms,
        )
    state = _replace(
        state,
        nodes=node_map,
        last_event_by_node=state.last_event_by_node.set_at(
            rec.marks_mid, rec.marks_leaf, rec.marks_offset, ie.idx, ie.seq
        ),
        last_applied=ie.idx,
        last_time_ms=ie.master_time_ms,
    )
    return state if reducer is _heartbeat else reducer(state, ie, event)


def fold(state: State, events: Iterable[IndexedEvent]) -> State:
    """Apply a run of consecutive events; equal to calling `apply` on each in turn.

    Replay and catch-up spend most of their time here, so what every event touches is
    written once per batch: each speaking node's marks (`State.last_event_by_node`, from its
    last event in the batch) in one `NodeMarks.set_many` at the end, and `last_applied`,
    `last_time_ms`, `master_seq`. That is sound because reducers read index, time and
    sequence from the event they are given, never from those fields; what they do read --
    whether the node exists and is connected -- is updated at once, as `apply` does.
    Heartbeats touch nothing else, so their reducer call is skipped. A property test checks
    `fold` == repeated `apply`.

    On `OutOfOrderError` nothing is returned: the caller still holds the state it passed in.
    """
    last_by_slot: dict[int, IndexedEvent] = {}
    last_idx = state.last_applied
    ie: IndexedEvent | None = None  # after the loop: the batch's last event
    master_seq = state.master_seq
    reducers = REDUCERS
    for ie in events:
        if ie.idx != last_idx + 1:
            raise OutOfOrderError(last_idx + 1, ie.idx)
        last_idx += 1
        origin = ie.origin
        if origin == MASTER_ORIGIN:
            master_seq = ie.seq
        elif (
            state.last_event_by_node.is_connected(ie.origin_slot)
            and type(ie.event) is not NodeGatheredInfo  # reads the record: checked, as in apply
        ):
            last_by_slot[ie.origin_slot] = ie  # a connected node, found by its slot: see apply
        else:
            node_map = state.nodes
            try:  # subscript, not a varargs `.get()`: see `apply`
                rec: NodeRecord | None = node_map[origin]
            except KeyError:
                rec = None
            _checked_slot(ie, rec, len(node_map))
            if rec is None or not rec.connected:  # (re)joins at once: reducers read that
                rec = nodes.joined(rec, origin, ie, len(node_map))
                state = _replace(
                    state,
                    nodes=node_map.set(origin, rec),
                    last_event_by_node=state.last_event_by_node.with_connected(rec.slot, True),
                )
            last_by_slot[rec.slot] = ie
        event = ie.event
        reducer = reducers[type(event)]
        if reducer is not _heartbeat:
            state = reducer(state, ie, event)
    if ie is None:
        return state
    marks = state.last_event_by_node
    if last_by_slot:
        marks = marks.set_many((slot, e.idx, e.seq) for slot, e in last_by_slot.items())
    return _replace(
        state,
        last_event_by_node=marks,
        last_applied=last_idx,
        last_time_ms=ie.master_time_ms,
        master_seq=master_seq,
    )
