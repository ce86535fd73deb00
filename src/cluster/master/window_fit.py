"""Which sessions a maintenance window would leave unplaced: a warning, never a refusal.

The caps (`maintenance._cap_rules`) judge a window by the cluster's capacity share alone, and
one node of a cluster of two or more may always go. Placement gives a new devshard all its
slots or none (placement rule 3), so a window the caps allow can still leave a session with
no slots for every epoch it covers: 3 nodes of 2 slots and a 6-slot session lose all 6
when one node goes. `check` and `schedule` answer with such sessions, so the operator can
add room or resize them first; the rules stay as they are (the design lets the node go).

Pure, and placement's own rules decide: the window is folded into a scratch State with
what the clock will have done by then (`maintenance_cycle`), and the sessions are placed as
at an epoch turn (`place_sessions`, room made as at a turn) against the pool the planner
would build. A session counts only when the window is what leaves it out: it is placed at
the same moment without the window. Nodes are taken as they are now (connected, tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import msgspec

from cluster.master.maintenance import busy_interval, maintenance_cycle
from cluster.master.placement import PlacementPool, place_sessions
from cluster.shared.apply import fold
from cluster.shared.durations import format_relative, format_time
from cluster.shared.events import (
    MASTER_ORIGIN,
    Event,
    IndexedEvent,
    MaintenanceScheduled,
    SessionUnplaced,
)
from cluster.shared.maintenance_policy import MaintenancePolicy
from cluster.shared.state import EpochRecord, State

#: The most moments of a window's away period that are placed (each costs two placements of
#: every session): its drain start, then each later moment another window's away period
#: begins, in time order.
MAX_MOMENTS: Final = 8


class Shortfall(msgspec.Struct, frozen=True, kw_only=True):
    """A session the window leaves unplaced, from the first moment it would be."""

    session_id: str
    at_ms: int
    #: Placement's unplaced reason at that moment (what the planner would log).
    reason: str


def sessions_short(
    state: State, window: MaintenanceScheduled, now_ms: int, policy: MaintenancePolicy
) -> tuple[Shortfall, ...]:
    """The sessions `window` (not yet in `state`) would leave unplaced while its node is
    away (drain start to end), each with the first such moment, by session id."""
    if not state.sessions or window.node_id not in state.nodes:
        return ()
    begin = window.start_ms - policy.drain_lead_ms
    end = window.start_ms + window.duration_ms
    moments = {begin}
    for other, window_id in state.open_window_by_node.items():
        if other != window.node_id:
            b, _ = busy_interval(state.windows[window_id], policy)
            if begin < b < end:
                moments.add(b)
    with_window = _fold_at(state, [window], now_ms)
    found: dict[str, Shortfall] = {}
    for at in sorted(moments)[:MAX_MOMENTS]:
        without = _unplaced_at(state, at, policy)
        for ev in _unplaced_at(with_window, at, policy).values():
            if ev.session_id not in without and ev.session_id not in found:
                found[ev.session_id] = Shortfall(
                    session_id=ev.session_id, at_ms=at, reason=ev.reason
                )
    return tuple(found[sid] for sid in sorted(found))


def _fold_at(state: State, events: Sequence[Event], at_ms: int) -> State:
    """Scratch: `state` with `events` applied as the master would index them."""
    if not events:
        return state
    first, seq = state.last_applied + 1, state.master_seq + 1
    return fold(
        state,
        [
            IndexedEvent(first + i, at_ms, MASTER_ORIGIN, seq + i, event)
            for i, event in enumerate(events)
        ],
    )


def _unplaced_at(state: State, at_ms: int, policy: MaintenancePolicy) -> dict[str, SessionUnplaced]:
    """The sessions an epoch turn at `at_ms` would leave unplaced."""
    then = _fold_at(state, maintenance_cycle(state, at_ms, policy), at_ms)
    current = then.epoch
    epoch = EpochRecord(
        epoch=current.epoch + 1 if current is not None else 1,
        start_ms=at_ms,
        end_ms=at_ms + policy.drain_lead_ms,
        seed=current.seed if current is not None else 0,
    )
    # A node draining at `at_ms` (its away period has begun: start - drain_lead <= at_ms)
    # is one whose window starts before this work's end, as the planner's drain rule asks.
    pool = PlacementPool(then, now_ms=at_ms, work_end_ms=at_ms + policy.drain_lead_ms + 1, used={})
    sessions = [then.sessions[sid] for sid in sorted(then.sessions.keys())]
    preferred: dict[str, Sequence[str]] = {}
    for session in sessions:
        sid = session.session_id
        live = then.devshards.get(then.devshard_by_session.get(sid, ""))
        preferred[sid] = (
            live.holders() if live is not None else then.last_nodes_by_session.get(sid, ())
        )
    placed = place_sessions(sessions, epoch, pool, preferred, make_room=True)
    return {ev.session_id: ev for ev in placed if isinstance(ev, SessionUnplaced)}


def render_shortfalls(shortfalls: Sequence[Shortfall], node_id: str, now_ms: int) -> str:
    """The warning `check` and `schedule` add to an allowed window ("" when none)."""
    if not shortfalls:
        return ""
    lines = [
        f"warning: {len(shortfalls)} session(s) would be unplaced while node {node_id} is away "
        "(new devshards get all their slots or none); the window is still allowed (one node "
        "of a cluster of two or more may always go): to keep them served, add nodes with "
        "room or resize them first"
    ]
    lines += [
        f"  - session {s.session_id} from {format_time(s.at_ms)} "
        f"({format_relative(s.at_ms, now_ms)}): {s.reason}"
        for s in shortfalls
    ]
    return "\n".join(lines)
