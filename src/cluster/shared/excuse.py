"""The one rule that decides whether a node is excused (DESIGN section 5, "Active").

Every penalty path -- missed work, staleness, unexcused disconnect, unfinished work --
asks this function and nothing else, so a node in maintenance can never be punished by a
path that forgot to check.
"""

from __future__ import annotations

from cluster.shared.state import MaintenanceWindow, State, WindowState


def excusing_window(state: State, node_id: str, at_ms: int) -> MaintenanceWindow | None:
    """The maintenance window that excuses `node_id` at `at_ms`, if any.

    A window excuses while it is ACTIVE, and also from its declared start until its end
    when the planner has not yet emitted `MaintenanceStarted` (the host went offline on
    time; the planner's cycle had not come round). A finished, overrun or cancelled window
    excuses nothing.
    """
    win = state.open_window(node_id)
    if win is None:
        return None
    if win.state is WindowState.ACTIVE:
        return win if at_ms < win.end_ms else None
    if win.state in (WindowState.SCHEDULED, WindowState.DRAINING) and (
        win.start_ms <= at_ms < win.end_ms
    ):
        return win
    return None


def is_excused(state: State, node_id: str, at_ms: int) -> bool:
    return excusing_window(state, node_id, at_ms) is not None


def may_take_work(state: State, node_id: str, work_end_ms: int) -> bool:
    """The drain rule: nothing is started on a node that would cross its window's start.

    A node with a SCHEDULED, DRAINING or ACTIVE window may only take work (a devshard, a
    task) whose expected end is at or before that window's start (Slurm/SONM rule).
    """
    win = state.open_window(node_id)
    if win is None:
        return True
    if win.state is WindowState.ACTIVE:
        return False
    return work_end_ms <= win.start_ms
