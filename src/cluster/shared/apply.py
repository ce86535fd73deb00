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
    """Apply a run of consecutive events."""
    for ie in events:
        state = apply(state, ie)
    return state
