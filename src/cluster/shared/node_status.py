"""Where a node stands, in plain words: derived from State and "now", never stored twice.

A node is always in exactly one `NodeState`, each with a one-line message an operator can act
on ("waiting for placement: next epoch in 4m 12s — safe to restart until then"). The normal
onboarding and operating states log at INFO; only a failed self-test, a disconnect and an
overrun maintenance window are worth a WARNING or ERROR (DESIGN section 8).

Pure: the caller passes `now_ms` and the one number State cannot know -- how far behind the
log a node is (the master knows it from acknowledgements, a worker from its own fold) -- so
the same inputs give the same message on every machine.

Precedence, first match wins, and why:
  1. in maintenance (the one excuse rule, `excusing_window`): quiet or not, it is planned;
  2. unknown to State: catching up if known to be behind, else connecting;
  3. maintenance overran (ACTIVE past its end, before the planner closes it): warn;
  4. disconnected;
  5. stopping: its worker said goodbye (`NodeRecord.stopping_idx`), so its runners have
     stopped whatever it still holds on paper, nothing new is placed on it, and the planner
     disconnects it (unexcused) unless it is back within `stale_cycles` plan cycles -- not
     "serving", not "waiting ... safe to restart". A node in its window is excused (1.);
  6. catching up (behind by at least `catch_up_threshold` events);
  7. connected but not yet heard from since (re)joining: connecting;
  8. draining (its window says so, whatever else it does);
  9. facts only: its worker runs no runners, so no test will come and nothing is placed;
 10. self-testing, then test failed;
 11. serving when it holds slots of live devshards, else waiting for placement.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Final

import msgspec

from cluster.shared.events import STOP_REASON_CHARS
from cluster.shared.excuse import excusing_window
from cluster.shared.humanize import (
    clip,
    format_duration,
    format_relative,
    format_utc,
    plural,
)
from cluster.shared.state import MaintenanceWindow, NodeRecord, State, WindowState

#: A node this many events (or more) behind the log head shows as catching up. Below it the
#: lag is ordinary in-flight delivery, not something an operator should see.
DEFAULT_CATCH_UP_THRESHOLD: Final = 50


class NodeState(StrEnum):
    CONNECTING = "connecting"
    CATCHING_UP = "catching_up"
    FACTS_ONLY = "facts_only"
    SELF_TESTING = "self_testing"
    TEST_FAILED = "test_failed"
    WAITING_FOR_PLACEMENT = "waiting_for_placement"
    SERVING = "serving"
    DRAINING = "draining"
    MAINTENANCE = "maintenance"
    MAINTENANCE_OVERRUN = "maintenance_overrun"
    DISCONNECTED = "disconnected"
    STOPPING = "stopping"


class LogLevel(StrEnum):
    """Names match the stdlib `logging` level names; `.number` is the stdlib level."""

    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"

    @property
    def number(self) -> int:
        return _LOGGING_NUMBERS[self]


_LOGGING_NUMBERS: Final[Mapping[LogLevel, int]] = {
    LogLevel.INFO: logging.INFO,
    LogLevel.WARNING: logging.WARNING,
    LogLevel.ERROR: logging.ERROR,
}

#: Onboarding and operating states that are business as usual: logged at INFO, never higher.
NORMAL_STATES: Final = frozenset(
    {
        NodeState.CONNECTING,
        NodeState.CATCHING_UP,
        NodeState.FACTS_ONLY,
        NodeState.SELF_TESTING,
        NodeState.WAITING_FOR_PLACEMENT,
        NodeState.SERVING,
        NodeState.DRAINING,
        NodeState.MAINTENANCE,
        # Its operator stopped it: the disconnect that may follow is the one that warns.
        NodeState.STOPPING,
    }
)

_LEVELS: Final[Mapping[NodeState, LogLevel]] = {
    **{s: LogLevel.INFO for s in NORMAL_STATES},
    NodeState.TEST_FAILED: LogLevel.ERROR,
    NodeState.DISCONNECTED: LogLevel.WARNING,
    NodeState.MAINTENANCE_OVERRUN: LogLevel.WARNING,
}


class NodeStatus(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    status: NodeState
    message: str
    log_level: LogLevel
    #: Runner slots the node holds in live devshards, and which devshards (sorted).
    slots: int = 0
    devshards: tuple[str, ...] = ()
    #: The node's open maintenance window, if any.
    window_id: str = ""


class Placement(msgspec.Struct, frozen=True):
    """The slots one node holds in one live devshard."""

    devshard_id: str
    slots: int


def placements_by_node(state: State) -> dict[str, tuple[Placement, ...]]:
    """Index live devshards by node, once, so a status of every node costs O(nodes + slots)."""
    per_node: dict[str, dict[str, int]] = {}
    for shard in state.devshards.values():
        for a in shard.assignments:
            held = per_node.setdefault(a.node_id, {})
            held[shard.devshard_id] = held.get(shard.devshard_id, 0) + 1
    return {
        node_id: tuple(Placement(d, n) for d, n in sorted(held.items()))
        for node_id, held in per_node.items()
    }


def node_status(
    state: State,
    node_id: str,
    now_ms: int,
    *,
    events_behind: int | None = None,
    catch_up_threshold: int = DEFAULT_CATCH_UP_THRESHOLD,
    placements: Mapping[str, tuple[Placement, ...]] | None = None,
) -> NodeStatus:
    """The status of one node at `now_ms`.

    `events_behind`: how many indexed events the node has not yet applied, when the caller
    knows (None: unknown, treated as caught up). `placements`: a precomputed
    `placements_by_node(state)` when asking about many nodes.
    """
    if placements is None:
        placements = placements_by_node(state)
    behind = events_behind is not None and events_behind >= catch_up_threshold
    held = placements.get(node_id, ())
    rec = state.nodes.get(node_id)
    window = state.open_window(node_id)
    window_id = window.window_id if window is not None else ""

    def status(s: NodeState, message: str) -> NodeStatus:
        return NodeStatus(
            node_id=node_id,
            status=s,
            message=message,
            log_level=_LEVELS[s],
            slots=sum(p.slots for p in held),
            devshards=tuple(p.devshard_id for p in held),
            window_id=window_id,
        )

    excusing = excusing_window(state, node_id, now_ms)
    if excusing is not None:
        return status(NodeState.MAINTENANCE, _maintenance_message(excusing, now_ms))
    if rec is None:
        if behind:
            return status(NodeState.CATCHING_UP, _catching_up_message(events_behind or 0))
        return status(NodeState.CONNECTING, "connecting: waiting for its first event in the log")
    if window is not None and window.state is WindowState.ACTIVE and now_ms >= window.end_ms:
        return status(
            NodeState.MAINTENANCE_OVERRUN,
            f"maintenance overran: window was due to end at {format_utc(window.end_ms, now_ms)}"
            f" ({format_relative(window.end_ms, now_ms)}); finish it or it closes as overrun",
        )
    if not rec.connected:
        return status(NodeState.DISCONNECTED, _disconnected_message(rec, now_ms))
    if rec.stopping_idx:
        return status(NodeState.STOPPING, _stopping_message(rec, held))
    if behind:
        return status(NodeState.CATCHING_UP, _catching_up_message(events_behind or 0))
    if state.last_event_index(node_id) < rec.joined_idx:
        return status(NodeState.CONNECTING, "connecting: connected, waiting for its first event")
    if window is not None and window.state is WindowState.DRAINING:
        return status(NodeState.DRAINING, _draining_message(window, len(held), now_ms))
    if rec.facts_only:
        # Before the self-test: none will come (a forged or late result changes nothing).
        return status(NodeState.FACTS_ONLY, "facts only (runs no runners)")
    test = rec.self_test
    if test is None:
        return status(NodeState.SELF_TESTING, "self-testing its runner")
    if not test.passed:
        why = test.reason or "no reason given"
        return status(
            NodeState.TEST_FAILED, f"self-test of runner '{test.runner_kind}' failed: {why}"
        )
    note = _scheduled_note(window, now_ms)
    if held:
        return status(NodeState.SERVING, _serving_message(held) + note)
    return status(NodeState.WAITING_FOR_PLACEMENT, _waiting_message(state, now_ms) + note)


def node_statuses(
    state: State,
    now_ms: int,
    *,
    events_behind: Mapping[str, int] | None = None,
    catch_up_threshold: int = DEFAULT_CATCH_UP_THRESHOLD,
    extra_node_ids: Iterable[str] = (),
) -> tuple[NodeStatus, ...]:
    """The status of every node in State (plus `extra_node_ids` the caller sees connecting
    but the log does not know yet), sorted by node id."""
    lag = events_behind or {}
    placements = placements_by_node(state)
    ids = sorted(set(state.nodes.keys()) | set(extra_node_ids))
    return tuple(
        node_status(
            state,
            node_id,
            now_ms,
            events_behind=lag.get(node_id),
            catch_up_threshold=catch_up_threshold,
            placements=placements,
        )
        for node_id in ids
    )


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


def _maintenance_message(window: MaintenanceWindow, now_ms: int) -> str:
    end = window.end_ms
    return f"in maintenance until {format_utc(end, now_ms)} ({format_relative(end, now_ms)})"


def _catching_up_message(events_behind: int) -> str:
    return f"catching up: {plural(events_behind, 'event')} behind"


def _disconnected_message(rec: NodeRecord, now_ms: int) -> str:
    ago = format_duration(now_ms - rec.disconnected_ms)
    message = f"disconnected {ago} ago"
    if rec.disconnected_reason:
        message += f": {rec.disconnected_reason}"
    return message


def _stopping_message(rec: NodeRecord, held: tuple[Placement, ...]) -> str:
    # K (`stale_cycles`) is the planner's setting, which State does not carry: no number.
    # Clipped as the disconnect reason clips it: a worker may send 4096 characters.
    said = clip(rec.stopping_reason, STOP_REASON_CHARS)
    why = f" ({said})" if said else ""
    message = (
        f"stopping: its worker said goodbye at event index {rec.stopping_idx}{why}; disconnected"
        " (unexcused) unless back within a few plan cycles"
    )
    if held:
        n = sum(p.slots for p in held)
        shards = ", ".join(p.devshard_id for p in held)
        verb = "is" if n == 1 else "are"
        message += f"; then its {plural(n, 'slot')} ({shards}) {verb} re-placed"
    return message


def _draining_message(window: MaintenanceWindow, devshards_left: int, now_ms: int) -> str:
    left = plural(devshards_left, "devshard") if devshards_left else "no devshards"
    start = window.start_ms
    when = "now" if start <= now_ms else f"in {format_duration(start - now_ms)}"
    return f"draining: {left} left, maintenance starts {when}"


def _serving_message(held: tuple[Placement, ...]) -> str:
    slots = sum(p.slots for p in held)
    noun = "devshard" if len(held) == 1 else "devshards"
    return f"serving {plural(slots, 'slot')} of {noun} {', '.join(p.devshard_id for p in held)}"


def _waiting_message(state: State, now_ms: int) -> str:
    epoch = state.epoch
    if epoch is None:
        when = "no epoch has started yet"
    elif epoch.end_ms > now_ms:
        when = f"next epoch in {format_duration(epoch.end_ms - now_ms)}"
    else:
        when = "next epoch is starting"
    return f"waiting for placement: {when} — safe to restart until then"


def _scheduled_note(window: MaintenanceWindow | None, now_ms: int) -> str:
    if window is None or window.state is not WindowState.SCHEDULED:
        return ""
    start = window.start_ms
    return (
        f"; maintenance scheduled at {format_utc(start, now_ms)} ({format_relative(start, now_ms)})"
    )
