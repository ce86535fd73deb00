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
    NodeRemoved,
    NodeStopping,
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


Reducer = Callable[[State, IndexedEvent, Any], State]

#: One reducer per event type. A test checks the table covers the whole union.
REDUCERS: dict[type[Any], Reducer] = {
    NodeGatheredInfo: nodes.node_gathered_info,
    NodeHeartbeat: nodes.node_heartbeat,
    NodeConnected: nodes.node_connected,
    NodeDisconnected: nodes.node_disconnected,
    NodeRemoved: nodes.node_removed,
    NodeStopping: nodes.node_stopping,  # worker goodbye
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
    node_map = state.nodes
    try:
        # Subscript, not `.get()`: immutables' get() is a varargs call that builds an
        # argument tuple; the key is missing only once per node (its first event).
        rec: NodeRecord | None = node_map[origin]
    except KeyError:
        rec = None
    if rec is None or not rec.connected:
        # A new or disconnected node (re)joins with its event: before the reducer, which
        # reads whether the node exists and is connected.
        rec = nodes.joined(rec, origin, ie, state)
        if rec is None:
            # A removed node not admitted again (`nodes.joined`): the event changes nothing.
            return _replace(state, last_applied=ie.idx, last_time_ms=ie.master_time_ms)
        node_map = node_map.set(origin, rec)
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
        else:
            node_map = state.nodes
            try:  # subscript, not a varargs `.get()`: see `apply`
                rec: NodeRecord | None = node_map[origin]
            except KeyError:
                rec = None
            if rec is None or not rec.connected:  # (re)joins at once: reducers read that
                rec = nodes.joined(rec, origin, ie, state)
                if rec is None:
                    continue  # a removed node not admitted again: changes nothing
                state = _replace(state, nodes=node_map.set(origin, rec))
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
