"""Reducers for the maintenance-window lifecycle (DESIGN section 5).

SCHEDULED -> DRAINING -> ACTIVE -> COMPLETED, or SCHEDULED/DRAINING -> CANCELLED. A
transition that the window's current state does not allow leaves state unchanged. A node
keeps CLOSED_WINDOWS_KEPT_PER_NODE closed windows; beyond that, its cancelled ones leave State
first, then its oldest.
"""

from __future__ import annotations

import msgspec

from cluster.shared.events import (
    IndexedEvent,
    MaintenanceCancelled,
    MaintenanceDrainStarted,
    MaintenanceFinished,
    MaintenanceOverrun,
    MaintenanceScheduled,
    MaintenanceStarted,
)
from cluster.shared.state import (
    CLOSED_WINDOWS_KEPT_PER_NODE,
    MaintenanceWindow,
    State,
    WindowState,
)

OPEN_STATES = (WindowState.SCHEDULED, WindowState.DRAINING, WindowState.ACTIVE)

_replace = msgspec.structs.replace


def _put(state: State, win: MaintenanceWindow) -> State:
    return _replace(state, windows=state.windows.set(win.window_id, win))


def close_window(state: State, win: MaintenanceWindow) -> State:
    """Files the closed window and drops its node's closed ones beyond the cap: cancelled
    ones first, oldest first (see CLOSED_WINDOWS_KEPT_PER_NODE)."""
    windows = state.windows.set(win.window_id, win)
    closed = (*state.closed_windows_by_node.get(win.node_id, ()), win.window_id)
    # Possibly more than one: a state folded under a larger cap comes down to this one.
    excess = len(closed) - CLOSED_WINDOWS_KEPT_PER_NODE
    if excess > 0:
        older = closed[:-1]  # never the window closing now
        cancelled = [w for w in older if windows[w].state is WindowState.CANCELLED]
        dropped = set(cancelled[:excess])
        dropped.update([w for w in older if w not in dropped][: excess - len(dropped)])
        closed = tuple(w for w in closed if w not in dropped)
        for window_id in sorted(dropped):  # sorted: one order on every machine
            windows = windows.delete(window_id)
    open_by_node = state.open_window_by_node
    if open_by_node.get(win.node_id) == win.window_id:
        open_by_node = open_by_node.delete(win.node_id)
    return _replace(
        state,
        windows=windows,
        open_window_by_node=open_by_node,
        closed_windows_by_node=state.closed_windows_by_node.set(win.node_id, closed),
    )


def _open(
    state: State, window_id: str, node_id: str, *allowed: WindowState
) -> MaintenanceWindow | None:
    win = state.windows.get(window_id)
    if win is None or win.node_id != node_id or win.state not in allowed:
        return None
    return win


def maintenance_scheduled(state: State, ie: IndexedEvent, ev: MaintenanceScheduled) -> State:
    if ev.window_id in state.windows or ev.node_id in state.open_window_by_node:
        return state
    win = MaintenanceWindow(
        window_id=ev.window_id,
        node_id=ev.node_id,
        start_ms=ev.start_ms,
        duration_ms=ev.duration_ms,
        requested_ms=ev.requested_ms,
        credit_spent_ms=ev.credit_spent_ms,
        state=WindowState.SCHEDULED,
    )
    credit = state.credit_ms_by_node.get(ev.node_id, 0) - ev.credit_spent_ms
    state = _put(state, win)
    return _replace(
        state,
        open_window_by_node=state.open_window_by_node.set(ev.node_id, ev.window_id),
        credit_ms_by_node=state.credit_ms_by_node.set(ev.node_id, credit),
    )


def maintenance_cancelled(state: State, ie: IndexedEvent, ev: MaintenanceCancelled) -> State:
    win = _open(state, ev.window_id, ev.node_id, WindowState.SCHEDULED, WindowState.DRAINING)
    if win is None:
        return state
    win = _replace(
        win,
        state=WindowState.CANCELLED,
        closed_ms=ie.master_time_ms,
        outcome="cancelled",
        credit_refund_ms=ev.credit_refund_ms,
    )
    state = close_window(state, win)
    if ev.credit_refund_ms:
        credit = state.credit_ms_by_node.get(ev.node_id, 0) + ev.credit_refund_ms
        state = _replace(state, credit_ms_by_node=state.credit_ms_by_node.set(ev.node_id, credit))
    return state


def maintenance_drain_started(state: State, ie: IndexedEvent, ev: MaintenanceDrainStarted) -> State:
    win = _open(state, ev.window_id, ev.node_id, WindowState.SCHEDULED)
    if win is None:
        return state
    return _put(
        state, _replace(win, state=WindowState.DRAINING, drain_started_ms=ie.master_time_ms)
    )


def maintenance_started(state: State, ie: IndexedEvent, ev: MaintenanceStarted) -> State:
    win = _open(state, ev.window_id, ev.node_id, WindowState.SCHEDULED, WindowState.DRAINING)
    if win is None:
        return state
    return _put(state, _replace(win, state=WindowState.ACTIVE, started_ms=ie.master_time_ms))


def maintenance_finished(state: State, ie: IndexedEvent, ev: MaintenanceFinished) -> State:
    win = _open(state, ev.window_id, ev.node_id, *OPEN_STATES)
    if win is None:
        return state
    if win.state is not WindowState.ACTIVE:
        # Finishing is allowed once the start time has passed, even if the planner's cycle
        # has not yet emitted MaintenanceStarted (a reboot quicker than one cycle).
        if ie.master_time_ms < win.start_ms:
            return state
        win = _replace(win, started_ms=win.start_ms)
    win = _replace(win, state=WindowState.COMPLETED, closed_ms=ie.master_time_ms, outcome=ev.how)
    return close_window(state, win)


def maintenance_overrun(state: State, ie: IndexedEvent, ev: MaintenanceOverrun) -> State:
    win = _open(state, ev.window_id, ev.node_id, WindowState.ACTIVE)
    if win is None:
        return state
    win = _replace(win, state=WindowState.COMPLETED, closed_ms=ie.master_time_ms, outcome="overrun")
    return close_window(state, win)
