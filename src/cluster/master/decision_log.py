"""What the master's log says of each decision it commits, in words an operator can act on.

The master decides (planner cycles, requests, hellos) and commits events; this module turns
one committed decision -- its events and the State it was decided on -- into log lines:
`(level, message)`, at most one per event. The master shell logs them once the commit is
durable, never before (a refused or failed commit was not done, and is not said to be).

Levels follow docs/operations.md: what is normal operation (joins, planned maintenance,
epochs, placements, settlements) is INFO; what needs a look is a WARNING -- a disconnect, an
overrun window, missed work that is not excused, a session that cannot be placed while no
node is still onboarding.

Large clusters must not flood the log: where one decision holds more than
`SUMMARY_ABOVE` events of a kind (an epoch turn placing 1,000 devshards, a rack of nodes
disconnected at once), that kind is said in ONE summary line at the level its worst event
would have, and each event's own line goes to DEBUG. Lists of nodes are capped
(`LIST_CAP`). A session's "unplaced" is repeated by the planner only when its reason is news
(another kind of obstacle at once, moved counts at most once a minute:
`planner.UNPLACED_RECOUNT_MS`); only the first of a run (after an epoch turn or a placement)
is a WARNING. A line below the lowest level the log takes is never built (`min_level`):
with DEBUG off, an epoch turn's thousands of details cost nothing.

Pure: the caller passes the State the decision was made on and the time it was made at.
Text from events (reasons a worker wrote, session names) is made printable and clipped, so
a newline in a runner's error cannot forge a line of the master's log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Final, NamedTuple

from cluster.master.placement import AWAY_UNTIL_WINDOW
from cluster.shared.events import (
    DevshardFinalized,
    DevshardPlaced,
    EpochSettled,
    EpochStarted,
    Event,
    LateWorkSettled,
    MaintenanceCancelled,
    MaintenanceDrainStarted,
    MaintenanceFinished,
    MaintenanceOverrun,
    MaintenanceScheduled,
    MaintenanceStarted,
    NodeConnected,
    NodeDisconnected,
    NodeRemoved,
    SessionDeleted,
    SessionRequested,
    SessionUnplaced,
    WorkMissed,
)
from cluster.shared.excuse import excusing_window
from cluster.shared.humanize import (
    clip,
    format_count,
    format_duration,
    format_relative,
    format_utc,
    plural,
    printable,
)
from cluster.shared.node_status import Placement, placements_by_node
from cluster.shared.state import State, WindowState

DEBUG: Final = logging.DEBUG
INFO: Final = logging.INFO
WARNING: Final = logging.WARNING

#: More events of one kind than this in one decision are summarized in one line.
SUMMARY_ABOVE: Final = 5
#: Most nodes (or sessions) one line names; the rest are counted ("and 12 more").
LIST_CAP: Final = 5
#: Longest text taken from an event (a reason) into a line.
TEXT_CAP: Final = 300

_MAINTENANCE_HOW: Final = {
    "host": "finished by its host",
    "reconnect": "its worker restarted within the window",
}


class LogLine(NamedTuple):
    #: A stdlib logging level (logging.DEBUG/INFO/WARNING).
    level: int
    message: str


class _Said(NamedTuple):
    """An event's line before its text is built: the level decides whether it is (a line
    below the logger's level is never formatted -- an epoch turn at 10,000 nodes has
    thousands of DEBUG details, and building them cost the master's loop 10-30 ms)."""

    level: int
    text: Callable[[], str]


def decision_lines(
    events: Sequence[Event], state: State, now_ms: int, *, min_level: int = DEBUG
) -> list[LogLine]:
    """The lines to log for one committed decision, in the order of its events (a kind that
    is summarized is said where its first event stands, its details following at DEBUG).

    `state` is the State the decision was made on (before its events), `now_ms` the time it
    was made at (its events' master time). Lines below `min_level` are left out without
    being built: the caller passes the lowest level its logger is enabled for.
    """
    ctx = _Context(state, now_ms, events)
    own = [(event, _said(event, ctx)) for event in events]
    by_kind: dict[type, list[tuple[Event, _Said | None]]] = {}
    for item in own:
        by_kind.setdefault(type(item[0]), []).append(item)
    details = min_level <= DEBUG
    lines: list[LogLine] = []
    summarized: set[type] = set()
    for event, said in own:
        kind = type(event)
        summary = _SUMMARIES.get(kind)
        of_kind = by_kind[kind]
        if summary is None or len(of_kind) <= SUMMARY_ABOVE:
            if said is not None and said.level >= min_level:
                lines.append(LogLine(said.level, said.text()))
            continue
        if kind not in summarized:
            summarized.add(kind)
            worst = max((s.level for _, s in of_kind if s is not None), default=INFO)
            if worst >= min_level:
                lines.append(LogLine(worst, summary([e for e, _ in of_kind], ctx)))
        if said is not None and details:
            lines.append(LogLine(DEBUG, said.text()))
    return lines


def describe(
    event: Event, state: State, now_ms: int, ctx: _Context | None = None
) -> LogLine | None:
    """The line for one master event decided on `state` at `now_ms`; None for events the
    master's log does not narrate (what workers report: info, heartbeats, runner status,
    work)."""
    said = _said(event, ctx if ctx is not None else _Context(state, now_ms))
    return None if said is None else LogLine(said.level, said.text())


def _said(event: Event, c: _Context) -> _Said | None:
    """`describe`, with the text left to build (only its level is worked out here)."""
    if isinstance(event, DevshardPlaced):
        return _Said(INFO, partial(_placed, event, c))
    if isinstance(event, DevshardFinalized):
        return _Said(DEBUG, partial(_finalized, event))
    if isinstance(event, NodeConnected):
        return _Said(INFO, partial(_connected, event, c))
    if isinstance(event, NodeDisconnected):
        return _Said(WARNING, partial(_disconnected, event, c))
    if isinstance(event, NodeRemoved):
        return _Said(INFO, partial(_removed, event, c))
    if isinstance(event, MaintenanceScheduled):
        return _Said(INFO, partial(_scheduled, event, c))
    if isinstance(event, MaintenanceCancelled):
        return _Said(INFO, partial(_cancelled, event, c))
    if isinstance(event, MaintenanceDrainStarted):
        return _Said(INFO, partial(_drain_started, event, c))
    if isinstance(event, MaintenanceStarted):
        return _Said(INFO, partial(_maintenance_started, event, c))
    if isinstance(event, MaintenanceFinished):
        return _Said(INFO, partial(_maintenance_finished, event))
    if isinstance(event, MaintenanceOverrun):
        return _Said(WARNING, partial(_overrun, event, c))
    if isinstance(event, EpochStarted):
        return _Said(INFO, partial(_epoch_started, event, c))
    if isinstance(event, SessionUnplaced):
        return _unplaced(event, c)
    if isinstance(event, WorkMissed):
        return _Said(INFO if event.excused else WARNING, partial(_missed, event))
    if isinstance(event, EpochSettled):
        return _Said(INFO, partial(_settled, event))
    if isinstance(event, LateWorkSettled):
        return _Said(INFO, partial(_late, event))
    if isinstance(event, SessionRequested):
        return _Said(INFO, partial(_requested, event))
    if isinstance(event, SessionDeleted):
        return _Said(INFO, partial(_deleted, event))
    return None


# --------------------------------------------------------------------------------------------
# One event
# --------------------------------------------------------------------------------------------


class _Context:
    """What the lines of one decision share: its State and time, the nodes it disconnects,
    and what is costly to work out and asked at most once (whether any node is still
    onboarding)."""

    def __init__(self, state: State, now_ms: int, events: Sequence[Event] = ()) -> None:
        self.state = state
        self.now_ms = now_ms
        #: Nodes this decision disconnects (liveness judges a node silent through its window
        #: in the very cycle that closes the window as overrun).
        self.disconnecting = frozenset(e.node_id for e in events if isinstance(e, NodeDisconnected))
        self._onboarding: bool | None = None
        self._placements: Mapping[str, tuple[Placement, ...]] | None = None

    @property
    def placements(self) -> Mapping[str, tuple[Placement, ...]]:
        """The slots each node holds in live devshards (indexed once per decision)."""
        if self._placements is None:
            self._placements = placements_by_node(self.state)
        return self._placements

    @property
    def onboarding(self) -> bool:
        """A connected node has a self-test still to come, or no node has ever joined (a
        session created before the first worker, the demo's order): capacity is still
        arriving, so a session waiting for it is no cause for alarm. Disconnected nodes are
        not joining, nor are facts-only ones (no test will ever come): a cluster of those
        alone must not turn every unplaced session's WARNING into INFO for good. Nor are
        removed ones: a cluster whose every node was removed has had nodes join."""
        if self._onboarding is None:
            nodes = self.state.nodes
            never_joined = not nodes and not self.state.removed()
            self._onboarding = never_joined or any(
                rec.connected and rec.self_test is None and not rec.facts_only
                for rec in nodes.values()
            )
        return self._onboarding


def _text(text: str) -> str:
    return clip(printable(text), TEXT_CAP)


def _capped(items: Sequence[str]) -> str:
    shown = ", ".join(items[:LIST_CAP])
    more = len(items) - LIST_CAP
    return f"{shown} and {format_count(more)} more" if more > 0 else shown


def _connected(event: NodeConnected, c: _Context) -> str:
    rec = c.state.nodes.get(event.node_id)
    node = event.node_id
    if rec is None:
        if c.state.removed_node(node) is not None:
            # Its slot (marks, sequence numbers) comes back; nothing it had earned does.
            return (
                f"node {node} joined the cluster again after its removal: a self-test to "
                "come, maintenance credit from the initial grant"
            )
        return f"node {node} joined the cluster (first connection)"
    if not rec.connected:
        ago = format_duration(c.now_ms - rec.disconnected_ms)
        return f"node {node} reconnected ({ago} after it was disconnected)"
    if event.boot_id and rec.boot_id and event.boot_id != rec.boot_id:
        return f"node {node} reconnected: its worker restarted"
    return f"node {node} reconnected (same worker process, dialled again)"


def _disconnected(event: NodeDisconnected, c: _Context) -> str:
    message = f"node {event.node_id} disconnected: {_text(event.reason)}"
    window = excusing_window(c.state, event.node_id, c.now_ms)
    if window is not None:
        return message + f"; in its maintenance window {window.window_id}: excused"
    if event.excused:
        return message + "; excused"
    epoch = c.state.epoch
    message += "; unexcused" + (
        f": it forfeits its reward for epoch {epoch.epoch}" if epoch is not None else ""
    )
    rec = c.state.nodes.get(event.node_id)
    if rec is not None and rec.stopping_idx:
        # A planned stop, not a crash (the reason says so): say how to make one free -- or,
        # stopped inside a window that ran out first, why this one was not.
        window = c.state.open_window(event.node_id)
        if window is not None and window.state is WindowState.ACTIVE:
            end = window.end_ms
            message += (
                f" (its maintenance window {window.window_id} ended at "
                f"{format_utc(end, c.now_ms)} before it was back: a stop is excused only "
                "inside its window)"
            )
        elif epoch is not None:
            message += " (a stop inside the node's maintenance window is excused)"
    held = c.placements.get(event.node_id, ())
    if held:
        count = sum(p.slots for p in held)
        verb = "is" if count == 1 else "are"
        devshards = _capped([p.devshard_id for p in held])
        message += f"; its {plural(count, 'slot')} ({devshards}) {verb} re-placed"
    return message


def _removed(event: NodeRemoved, c: _Context) -> str:
    rec = c.state.nodes.get(event.node_id)
    host = rec.info.hostname if rec is not None else None
    message = f"node {event.node_id}" + (f" ({_text(host)})" if host else "")
    message += " removed by the operator" + (f": {_text(event.reason)}" if event.reason else "")
    window = c.state.open_window(event.node_id)
    if window is not None:
        message += f"; its maintenance window {window.window_id} is closed"
    return message + "; it no longer counts as a node of the cluster"


def _moment(at_ms: int, c: _Context) -> str:
    """A time in a decision line: "14:00 UTC (in 1h 00m)", as the decision saw it."""
    return f"{format_utc(at_ms, c.now_ms)} ({format_relative(at_ms, c.now_ms)})"


def _scheduled(event: MaintenanceScheduled, c: _Context) -> str:
    start, end = event.start_ms, event.start_ms + event.duration_ms
    return (
        f"maintenance scheduled for node {event.node_id}: window {event.window_id}, "
        f"{format_duration(event.duration_ms)} from {_moment(start, c)} to "
        f"{format_utc(end, c.now_ms)}"
    )


def _cancelled(event: MaintenanceCancelled, c: _Context) -> str:
    why = f": {_text(event.reason)}" if event.reason else ""
    refund = (
        f"; {format_duration(event.credit_refund_ms)} of credit refunded"
        if event.credit_refund_ms
        else ""
    )
    window = c.state.windows.get(event.window_id)
    if window is not None and event.credit_refund_ms < window.credit_spent_ms:
        # Less than the window cost came back: say so, and why when the state shows it (a
        # refund capped at the credit cap needs the policy, which the log does not hold).
        given, spent = event.credit_refund_ms, window.credit_spent_ms
        refund = (
            f"; {format_duration(given)} of the {format_duration(spent)} of credit it cost refunded"
            if given
            else f"; none of the {format_duration(spent)} of credit it cost refunded"
        )
        if window.state is WindowState.DRAINING and window.drain_started_ms:
            charge = min(spent, max(0, window.start_ms - window.drain_started_ms))
            refund += f" (its drain period, {format_duration(charge)}, is charged)"
    return f"maintenance window {event.window_id} of node {event.node_id} cancelled{why}{refund}"


def _drain_started(event: MaintenanceDrainStarted, c: _Context) -> str:
    window = c.state.windows.get(event.window_id)
    when = f" at {_moment(window.start_ms, c)}" if window is not None else ""
    return (
        f"node {event.node_id} draining for maintenance window {event.window_id}, which "
        f"starts{when}: no work that would cross the start is placed there"
    )


def _maintenance_started(event: MaintenanceStarted, c: _Context) -> str:
    window = c.state.windows.get(event.window_id)
    until = f" until {_moment(window.end_ms, c)}" if window is not None else ""
    return f"node {event.node_id} in maintenance (window {event.window_id}){until}: excused"


def _overrun(event: MaintenanceOverrun, c: _Context) -> str:
    window = c.state.windows.get(event.window_id)
    due = f", due to end at {_moment(window.end_ms, c)}," if window is not None else ""
    message = (
        f"maintenance window {event.window_id} of node {event.node_id}{due} overran: closed "
        "as overrun; normal liveness and penalties apply to the node again"
    )
    # Only when it is so: a node back online and serving through its window is not
    # disconnected by the overrun (it said so of every node).
    rec = c.state.nodes.get(event.node_id)
    if event.node_id in c.disconnecting or (rec is not None and not rec.connected):
        message += " (still silent, it is disconnected)"
    return message


def _maintenance_finished(event: MaintenanceFinished) -> str:
    if event.how == "operator":
        how = f"finished by operator {_text(event.by)}" if event.by else "finished by an operator"
    else:
        how = _MAINTENANCE_HOW.get(event.how, _text(event.how))
    return (
        f"node {event.node_id} finished maintenance (window {event.window_id}): {how}; "
        "it takes work again"
    )


def _epoch_started(event: EpochStarted, c: _Context) -> str:
    return (
        f"epoch {event.epoch} started; it ends at {format_utc(event.end_ms, c.now_ms)} "
        f"(in {format_duration(event.end_ms - c.now_ms)})"
    )


def _holders(event: DevshardPlaced) -> list[str]:
    """'node (slots)' for each node of a devshard, most slots first (then by node id)."""
    slots: dict[str, int] = {}
    for a in event.assignments:
        slots[a.node_id] = slots.get(a.node_id, 0) + 1
    ranked = sorted(slots.items(), key=lambda kv: (-kv[1], kv[0]))
    return [f"{node} ({n})" for node, n in ranked]


def _placed(event: DevshardPlaced, c: _Context) -> str:
    if not event.assignments:
        # A re-placement that found a node for none of the slots it lost: it used to read
        # "re-placed devshard ...: 0 slots", as if something had been placed.
        return (
            f"devshard {event.devshard_id} of session {event.session_id} lost every slot in "
            f"epoch {event.epoch}: none could be re-placed (retried every planner cycle; the "
            "session's unplaced line says why)"
        )
    holders = _holders(event)
    slots = plural(len(event.assignments), "slot")
    on = f" on {plural(len(holders), 'node')}: {_capped(holders)}"
    verb = "re-placed" if event.reason == "replace" else "placed"
    session = c.state.sessions.get(event.session_id)
    open_slots = ""
    if session is not None and session.slots > len(event.assignments):
        short = session.slots - len(event.assignments)
        open_slots = f"; {short} of its {session.slots} slots unassigned"
    return (
        f"{verb} devshard {event.devshard_id} of session {event.session_id} for epoch "
        f"{event.epoch}: {slots}{on}{open_slots}"
    )


def _unplaced(event: SessionUnplaced, c: _Context) -> _Said:
    session = c.state.sessions.get(event.session_id)
    # The planner repeats an unplaced session only when its reason is news: the first of a
    # run (since the epoch turned or it was last placed) is the news, the rest progress.
    first = session is None or session.unplaced_epoch != event.epoch
    if c.onboarding:
        return _Said(INFO, partial(_unplaced_text, event, " (nodes are still joining)"))
    if not first:
        return _Said(INFO, partial(_unplaced_text, event, " (still unplaced; retried every cycle)"))
    if AWAY_UNTIL_WINDOW in event.reason:
        # Nodes it fits are away on maintenance: their room comes back when the windows
        # end, which the operator may prefer to adding nodes or resizing the session.
        return _Said(
            WARNING,
            partial(
                _unplaced_text,
                event,
                "; it waits for the maintenance window(s) named to end, unless nodes with "
                "room are added or the session is resized",
            ),
        )
    return _Said(
        WARNING, partial(_unplaced_text, event, "; add nodes with room, or resize the session")
    )


def _unplaced_text(event: SessionUnplaced, tail: str) -> str:
    return (
        f"session {event.session_id} unplaced in epoch {event.epoch}: {_text(event.reason)}" + tail
    )


def _missed(event: WorkMissed) -> str:
    slots = plural(event.count, "slot")
    message = (
        f"node {event.node_id} missed work on devshard {event.devshard_id} "
        f"(epoch {event.epoch}, {slots}): {_text(event.reason)}"
    )
    return message + "; excused (maintenance)" if event.excused else message


def _settled(event: EpochSettled) -> str:
    paid = [p for p in event.payouts if p.reward > 0 and not p.punished]
    punished = [p for p in event.payouts if p.punished]
    total = sum(p.reward for p in paid)
    # A large settlement comes in parts (settlement.split_settlement): each says its share.
    what = "settled" if event.final else "settling (part)"
    message = (
        f"epoch {event.epoch} {what}: {plural(len(paid), 'node')} paid "
        f"{format_count(total)} in all, {format_count(len(punished))} punished"
    )
    if punished:
        named = [f"{p.node_id} ({_text(p.reason)})" if p.reason else p.node_id for p in punished]
        message += f": {_capped(named)}"
    return message


def _late(event: LateWorkSettled) -> str:
    return (
        f"late work of node {event.node_id} settled to epoch {event.epoch}: "
        f"{plural(event.units, 'unit')}, reward {format_count(event.reward)}"
    )


def _finalized(event: DevshardFinalized) -> str:
    return f"devshard {event.devshard_id} of epoch {event.epoch} finalized"


def _requested(event: SessionRequested) -> str:
    gpu = " with a GPU" if event.gpu else ""
    name = f" ({_text(event.name)})" if event.name else ""
    return (
        f"session {event.session_id}{name} created: {plural(event.slots, 'slot')} of "
        f"{format_count(event.memory_per_slot_mb)} MiB{gpu}; placed from the next "
        "planner cycle"
    )


def _deleted(event: SessionDeleted) -> str:
    return f"session {event.session_id} deleted: its devshard stops"


# --------------------------------------------------------------------------------------------
# Summaries: many events of one kind in one decision
# --------------------------------------------------------------------------------------------


def _summarize_placed(events: Sequence[Event], c: _Context) -> str:
    placed = [e for e in events if isinstance(e, DevshardPlaced)]
    nodes = {a.node_id for e in placed for a in e.assignments}
    slots = sum(len(e.assignments) for e in placed)
    epochs = sorted({e.epoch for e in placed})
    replaced = sum(e.reason == "replace" for e in placed)
    again = f" ({format_count(replaced)} re-placed)" if replaced else ""
    return (
        f"placed {plural(len(placed), 'devshard')}{again} for epoch "
        f"{', '.join(map(str, epochs))}: {plural(slots, 'slot')} on "
        f"{plural(len(nodes), 'node')} (each at DEBUG)"
    )


def _summarize_unplaced(events: Sequence[Event], c: _Context) -> str:
    unplaced = [e for e in events if isinstance(e, SessionUnplaced)]
    ids = [e.session_id for e in unplaced]
    example = unplaced[0]
    return (
        f"{plural(len(unplaced), 'session')} unplaced in epoch {example.epoch}: "
        f"{_capped(ids)}; e.g. {example.session_id}: {_text(example.reason)} (each at DEBUG)"
    )


def _summarize_missed(events: Sequence[Event], c: _Context) -> str:
    missed = [e for e in events if isinstance(e, WorkMissed)]
    slots = sum(e.count for e in missed)
    nodes = sorted({e.node_id for e in missed})
    excused = sum(e.count for e in missed if e.excused)
    of_excused = f" ({format_count(excused)} excused)" if excused else ""
    return (
        f"work missed: {plural(slots, 'slot')}{of_excused} on {plural(len(nodes), 'node')}: "
        f"{_capped(nodes)} (each at DEBUG)"
    )


def _summarize_disconnected(events: Sequence[Event], c: _Context) -> str:
    gone = [e for e in events if isinstance(e, NodeDisconnected)]
    ids = [e.node_id for e in gone]
    return (
        f"{plural(len(gone), 'node')} disconnected at once: {_capped(ids)}; e.g. "
        f"{gone[0].node_id}: {_text(gone[0].reason)} (each at DEBUG)"
    )


def _summarize_late(events: Sequence[Event], c: _Context) -> str:
    late = [e for e in events if isinstance(e, LateWorkSettled)]
    units = sum(e.units for e in late)
    return (
        f"late work settled for {plural(len(late), 'node')}: {plural(units, 'unit')} "
        "(each at DEBUG)"
    )


def _summarize_finalized(events: Sequence[Event], c: _Context) -> str:
    return f"{plural(len(events), 'devshard')} finalized"


_SUMMARIES: Final[dict[type, Callable[[Sequence[Event], _Context], str]]] = {
    DevshardPlaced: _summarize_placed,
    SessionUnplaced: _summarize_unplaced,
    WorkMissed: _summarize_missed,
    NodeDisconnected: _summarize_disconnected,
    LateWorkSettled: _summarize_late,
    DevshardFinalized: _summarize_finalized,
}
