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
from cluster.shared.state import State

_replace = msgspec.structs.replace


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
    if origin != MASTER_ORIGIN:
        # Every node-originated event is liveness (DESIGN rule 6) and (re)joins the node.
        state = nodes.ensure_node(state, origin, ie)
        state = REDUCERS[type(ie.event)](state, ie, ie.event)
        return _replace(
            state,
            last_applied=ie.idx,
            last_time_ms=ie.master_time_ms,
            last_event_index_by_node=state.last_event_index_by_node.set(origin, ie.idx),
            last_seq_by_origin=state.last_seq_by_origin.set(origin, ie.seq),
        )
    state = REDUCERS[type(ie.event)](state, ie, ie.event)
    return _replace(
        state,
        last_applied=ie.idx,
        last_time_ms=ie.master_time_ms,
        last_seq_by_origin=state.last_seq_by_origin.set(origin, ie.seq),
    )


def fold(state: State, events: Iterable[IndexedEvent]) -> State:
    """Apply a run of consecutive events; equal to calling `apply` on each in turn.

    Replay and catch-up spend most of their time here, so the per-event bookkeeping that
    every event touches (`last_event_index_by_node`, `last_seq_by_origin`, `last_applied`,
    `last_time_ms`) is accumulated in HAMT mutations and written once at the end. That is
    sound because reducers read index and time from the event they are given, never from
    those four fields (a property test checks `fold` == repeated `apply`). Heartbeats from
    connected nodes touch nothing else, so their reducer call is skipped.

    On `OutOfOrderError` nothing is returned: the caller still holds the state it passed in.
    """
    idx_by_node = state.last_event_index_by_node.mutate()
    seq_by_origin = state.last_seq_by_origin.mutate()
    last_idx = state.last_applied
    last_ms = state.last_time_ms
    reducers = REDUCERS
    heartbeat = nodes.node_heartbeat
    for ie in events:
        if ie.idx != last_idx + 1:
            raise OutOfOrderError(last_idx + 1, ie.idx)
        origin = ie.origin
        if origin != MASTER_ORIGIN:
            rec = state.nodes.get(origin)
            if rec is None or not rec.connected:
                state = nodes.ensure_node(state, origin, ie)
            idx_by_node[origin] = ie.idx
        event = ie.event
        reducer = reducers[type(event)]
        if reducer is not heartbeat:
            state = reducer(state, ie, event)
        seq_by_origin[origin] = ie.seq
        last_idx = ie.idx
        last_ms = ie.master_time_ms
    return _replace(
        state,
        last_applied=last_idx,
        last_time_ms=last_ms,
        last_event_index_by_node=idx_by_node.finish(),
        last_seq_by_origin=seq_by_origin.finish(),
    )
