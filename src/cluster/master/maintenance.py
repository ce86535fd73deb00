"""Maintenance-window decisions of the master (DESIGN section 5), as pure functions.

The master's request handlers and planner are thin shells around this module: each
function takes State, "now" (the master's clock, read by the shell) and the
`MaintenancePolicy`, and returns either the event to append or a `Rejection` that says
exactly why not. Nothing here reads a clock or mutates anything.

Concurrency races are decided by order: the master handles one request at a time and applies
the resulting event before it decides the next, so two requests for the last slot are
judged against different states and exactly one wins.

Who may act: the node itself (the requester is the peer id the master authenticated), an
operator key listed in `MaintenancePolicy.operator_ids`, or the operator on the master host
(`LOCAL_OPERATOR`, the master's own control socket).

Credit: a node's balance is ``policy.initial_credit_ms + state.credit_ms_by_node[node]``.
The log records only what happened (credit spent by scheduling, refunded by cancelling,
earned at settlement), so the initial grant is a policy offset, not an event. Read balances
through `credit_balance_ms` and earnings through `credit_to_earn_ms`.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from fractions import Fraction
from typing import Final

import msgspec

from cluster.master.liveness import STOPPED_BY_OPERATOR
from cluster.shared.durations import format_duration, format_relative, format_time
from cluster.shared.events import (
    STOP_REASON_CHARS,
    Event,
    MaintenanceCancelled,
    MaintenanceDrainStarted,
    MaintenanceFinished,
    MaintenanceOverrun,
    MaintenanceScheduled,
    MaintenanceStarted,
    NodeDisconnected,
)
from cluster.shared.excuse import is_excused
from cluster.shared.humanize import clip
from cluster.shared.maintenance_policy import MaintenancePolicy
from cluster.shared.state import (
    CLOSED_WINDOWS_KEPT_PER_NODE,
    DevshardRecord,
    MaintenanceWindow,
    State,
    WindowState,
)

#: The requester the master's own control socket speaks for: the operator on the master host,
#: who may act for any node. Not a peer id, so no libp2p peer is ever it.
LOCAL_OPERATOR: Final = "operator:local"


class Code:
    """Stable rejection codes (scripts match on these; messages are for people)."""

    NOT_ALLOWED: Final = "not_allowed"
    UNKNOWN_NODE: Final = "unknown_node"
    DUPLICATE_WINDOW_ID: Final = "duplicate_window_id"
    LEAD_TIME: Final = "lead_time"
    TOO_FAR_AHEAD: Final = "too_far_ahead"
    DURATION_ZERO: Final = "duration_zero"
    DURATION_TOO_LONG: Final = "duration_too_long"
    PENDING_WINDOW: Final = "pending_window"
    NO_CREDIT: Final = "no_credit"
    NODE_CAP: Final = "node_cap"
    CAPACITY_CAP: Final = "capacity_cap"
    COMMITTED_WORK: Final = "committed_work"
    NO_WINDOW: Final = "no_window"
    UNKNOWN_WINDOW: Final = "unknown_window"
    ALREADY_ACTIVE: Final = "already_active"
    ALREADY_CLOSED: Final = "already_closed"
    NOT_STARTED: Final = "not_started"
    WINDOW_ENDED: Final = "window_ended"


#: Rejections that no other start time can cure: the "earliest start" search is skipped.
_TIMELESS: Final = frozenset(
    {
        Code.NOT_ALLOWED,
        Code.UNKNOWN_NODE,
        Code.DUPLICATE_WINDOW_ID,
        Code.DURATION_ZERO,
        Code.DURATION_TOO_LONG,
        Code.PENDING_WINDOW,
        Code.NO_CREDIT,
    }
)


class Rejection(msgspec.Struct, frozen=True):
    code: str
    message: str


class ScheduleDecision(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to "may this node take a window from `start_ms` for `duration_ms`?".

    `reasons` lists every rule that failed (empty when allowed). `earliest_start_ms` is the
    earliest start at or after the requested one (and not before now + min lead) that would
    pass, `start_ms` itself when allowed, or None when only something other than the start
    time can fix it (duration, credit, a pending window, permission).
    """

    node_id: str
    start_ms: int
    duration_ms: int
    now_ms: int
    allowed: bool
    reasons: tuple[Rejection, ...]
    earliest_start_ms: int | None


# --------------------------------------------------------------------------------------------
# Credit
# --------------------------------------------------------------------------------------------


def credit_balance_ms(state: State, node_id: str, policy: MaintenancePolicy) -> int:
    """Maintenance credit the node may spend now (initial grant + earned - spent)."""
    return policy.initial_credit_ms + state.credit_ms_by_node.get(node_id, 0)


def credit_to_earn_ms(state: State, node_id: str, policy: MaintenancePolicy) -> int:
    """Credit an epoch completed unpunished earns the node: the per-epoch rate, but never
    past the cap (settlement puts this in `NodePayout.credit_earned_ms`)."""
    return credits_to_earn_ms(state, (node_id,), policy)[node_id]


def in_maintenance_during(state: State, start_ms: int, end_ms: int) -> set[str]:
    """Nodes that were in maintenance at some moment of [start_ms, end_ms): a window of
    theirs was ACTIVE then, or an open window's start had passed (the one excuse rule
    excuses a node from its window's start even before `MaintenanceStarted`). Such a node
    did not complete that time in service, so staying connected through it earns no credit:
    otherwise time off would pay for more time off, and a host that powers off in its
    window (connected, quiet, excused) would earn what one that shut its worker down cleanly
    (disconnected, excused) does not. Only nodes with windows are looked at."""
    out: set[str] = set()
    for win in state.windows.values():
        if win.state is WindowState.CANCELLED:
            continue  # never active: a DRAINING window cancelled kept serving
        # From its declared start, as the excuse rule says, even if MaintenanceStarted came
        # later (a restarted master's grace, a slow cycle).
        if win.state is WindowState.COMPLETED:
            began, ended = min(win.start_ms, win.started_ms), win.closed_ms
        elif win.state is WindowState.ACTIVE:
            began, ended = min(win.start_ms, win.started_ms), end_ms
        else:  # SCHEDULED or DRAINING: in maintenance from its start, by the excuse rule
            began, ended = win.start_ms, end_ms
        if began < end_ms and ended > start_ms:
            out.add(win.node_id)
    return out


def credits_to_earn_ms(
    state: State, node_ids: Iterable[str], policy: MaintenancePolicy
) -> dict[str, int]:
    """`credit_to_earn_ms` for many nodes at once: settlement pays every node each epoch."""
    balance_of = state.credit_ms_by_node.get
    room_at_zero = policy.credit_cap_ms - policy.initial_credit_ms
    rate = policy.credit_per_epoch_ms
    out: dict[str, int] = {}
    # max(0, min(rate, room)) without the two calls: this runs for every node each epoch.
    for n in node_ids:
        room = room_at_zero - balance_of(n, 0)
        out[n] = rate if room >= rate else room if room > 0 else 0
    return out


# --------------------------------------------------------------------------------------------
# Schedule / check
# --------------------------------------------------------------------------------------------


def may_act_for(requester: str, node_id: str, policy: MaintenancePolicy) -> bool:
    """A node manages its own windows; operator keys and the local operator anyone's."""
    return requester in (node_id, LOCAL_OPERATOR) or requester in policy.operator_ids


def check_schedule(
    state: State,
    node_id: str,
    requester: str,
    start_ms: int,
    duration_ms: int,
    now_ms: int,
    policy: MaintenancePolicy,
) -> ScheduleDecision:
    """Every rule of DESIGN section 5 for a new window, with all reasons and a way out."""
    reasons = _timeless_rules(state, node_id, requester, duration_ms, policy)
    known = node_id in state.nodes
    if known:
        reasons += _timed_rules(state, node_id, start_ms, duration_ms, now_ms, policy)
    if not reasons:
        earliest: int | None = start_ms
    elif any(r.code in _TIMELESS for r in reasons):
        earliest = None
    else:
        earliest = _earliest_start(state, node_id, start_ms, duration_ms, now_ms, policy)
    return ScheduleDecision(
        node_id=node_id,
        start_ms=start_ms,
        duration_ms=duration_ms,
        now_ms=now_ms,
        allowed=not reasons,
        reasons=tuple(reasons),
        earliest_start_ms=earliest,
    )


#: Ids the master makes start with this; a caller may not choose one (see `schedule`).
MASTER_WINDOW_ID_PREFIX: Final = "mw-"


def default_window_id(state: State, node_id: str) -> str:
    """The id the master gives a window: unique because it names the log index of the
    `MaintenanceScheduled` that creates it (the next index), deterministic for replay. The
    index never repeats, so neither does the id, even once State has dropped the record.
    Peer ids share their first characters, so the node's tail is used."""
    return f"{MASTER_WINDOW_ID_PREFIX}{node_id[-8:]}-{state.last_applied + 1}"


def schedule(
    state: State,
    node_id: str,
    requester: str,
    start_ms: int,
    duration_ms: int,
    now_ms: int,
    policy: MaintenancePolicy,
    window_id: str | None = None,
) -> MaintenanceScheduled | ScheduleDecision:
    """The event that schedules the window, or the rejected decision saying why not.

    A caller-chosen `window_id` may not take the master's prefix: State drops old closed
    windows, so the check against `state.windows` alone would let it take the id of a
    dropped master window, or of one the master makes later. Its own ids the caller must
    not repeat: a dropped one is no longer known here."""
    decision = check_schedule(state, node_id, requester, start_ms, duration_ms, now_ms, policy)
    wid = window_id if window_id is not None else default_window_id(state, node_id)
    dup: Rejection | None = None
    if wid in state.windows:
        dup = Rejection(Code.DUPLICATE_WINDOW_ID, f"window id {wid!r} is already used")
    elif window_id is not None and window_id.startswith(MASTER_WINDOW_ID_PREFIX):
        dup = Rejection(
            Code.DUPLICATE_WINDOW_ID,
            f"window id {wid!r} starts with {MASTER_WINDOW_ID_PREFIX!r}, reserved for the ids the "
            "master makes",
        )
    if dup is not None:
        decision = msgspec.structs.replace(
            decision, allowed=False, reasons=(*decision.reasons, dup), earliest_start_ms=None
        )
    if not decision.allowed:
        return decision
    return MaintenanceScheduled(
        window_id=wid,
        node_id=node_id,
        start_ms=start_ms,
        duration_ms=duration_ms,
        requested_ms=now_ms,
        credit_spent_ms=duration_ms,
    )


def _timeless_rules(
    state: State, node_id: str, requester: str, duration_ms: int, policy: MaintenancePolicy
) -> list[Rejection]:
    reasons: list[Rejection] = []
    if not may_act_for(requester, node_id, policy):
        reasons.append(
            Rejection(
                Code.NOT_ALLOWED,
                f"{requester} may not schedule maintenance for node {node_id}: only the node "
                "itself or an operator key (policy operator_ids) may",
            )
        )
    if node_id not in state.nodes:
        reasons.append(Rejection(Code.UNKNOWN_NODE, f"node {node_id} is not known to the cluster"))
    if duration_ms <= 0:
        reasons.append(
            Rejection(Code.DURATION_ZERO, "duration must be longer than zero, e.g. --duration 30m")
        )
    elif duration_ms > policy.max_duration_ms:
        reasons.append(
            Rejection(
                Code.DURATION_TOO_LONG,
                f"duration {format_duration(duration_ms)} is above the maximum of "
                f"{format_duration(policy.max_duration_ms)} (max_duration); split the work "
                "or shorten the window",
            )
        )
    pending = state.open_window(node_id)
    if pending is not None:
        reasons.append(
            Rejection(
                Code.PENDING_WINDOW,
                f"node already has window {pending.window_id} ({pending.state.value}, starts "
                f"{format_time(pending.start_ms)}); cancel or finish it first",
            )
        )
    balance = credit_balance_ms(state, node_id, policy)
    if duration_ms > 0 and balance < duration_ms:
        reasons.append(
            Rejection(
                Code.NO_CREDIT,
                f"window needs {format_duration(duration_ms)} of maintenance credit, node has "
                f"{format_duration(max(balance, 0))}; credit is earned at "
                f"{format_duration(policy.credit_per_epoch_ms)} per epoch completed unpunished",
            )
        )
    return reasons


def _timed_rules(
    state: State,
    node_id: str,
    start_ms: int,
    duration_ms: int,
    now_ms: int,
    policy: MaintenancePolicy,
) -> list[Rejection]:
    """The rules a different start time could satisfy."""
    reasons: list[Rejection] = []
    earliest_by_lead = now_ms + policy.min_lead_ms
    if start_ms < earliest_by_lead:
        reasons.append(
            Rejection(
                Code.LEAD_TIME,
                f"start {format_time(start_ms)} is {_lead_words(start_ms, now_ms)}; a window "
                f"must be scheduled at least {format_duration(policy.min_lead_ms)} ahead "
                f"(min_lead): start at or after {format_time(earliest_by_lead)}",
            )
        )
    latest = now_ms + policy.max_lead_ms
    if start_ms > latest:
        reasons.append(
            Rejection(
                Code.TOO_FAR_AHEAD,
                f"start {format_time(start_ms)} is more than "
                f"{format_duration(policy.max_lead_ms)} ahead (max_lead): start at or before "
                f"{format_time(latest)}",
            )
        )
    blocking = [d for d in _devshards_on(state, node_id) if d.ends_ms > start_ms]
    if blocking:
        last = max(blocking, key=lambda d: (d.ends_ms, d.devshard_id))
        names = ", ".join(sorted(d.devshard_id for d in blocking))
        reasons.append(
            Rejection(
                Code.COMMITTED_WORK,
                f"node holds committed devshard(s) {names} until {format_time(last.ends_ms)}, "
                f"after the window start: start at or after {format_time(last.ends_ms)}",
            )
        )
    if duration_ms > 0:
        reasons += _cap_rules(state, node_id, start_ms, duration_ms, now_ms, policy)
    return reasons


def _lead_words(start_ms: int, now_ms: int) -> str:
    return "in the past" if start_ms < now_ms else format_relative(start_ms, now_ms)


def _devshards_on(state: State, node_id: str) -> list[DevshardRecord]:
    return [d for d in state.devshards.values() if any(a.node_id == node_id for a in d.assignments)]


def _node_slots(state: State, node_id: str) -> int:
    """The slots the node offers the cluster: 0 for one nothing could be placed on however
    free it were (facts-only, never self-tested or failed, no slots) -- such a node's window
    takes no capacity away."""
    rec = state.nodes.get(node_id)
    if rec is None or rec.facts_only or rec.self_test is None or not rec.self_test.passed:
        return 0
    return max(rec.info.slots or 0, 0)


def _takes_capacity(state: State, node_id: str, now_ms: int) -> bool:
    """Whether the node's window counts against the caps now: it offers slots and is here
    to take them away -- connected, or excused by its window (a host powered off in its
    window is away *for* it). A disconnected node outside its excuse is already gone: its
    window takes nothing more away, so it neither counts as away nor as cluster capacity.
    Without this, identities minted with the cluster secret could book windows and vanish,
    filling max_concurrent_nodes for everyone (malicious-member review)."""
    rec = state.nodes.get(node_id)
    if rec is None or _node_slots(state, node_id) <= 0:
        return False
    return rec.connected or is_excused(state, node_id, now_ms)


def busy_interval(win: MaintenanceWindow, policy: MaintenancePolicy) -> tuple[int, int]:
    """When a window keeps its node out of new work: from its drain start to its end."""
    begin = win.start_ms - policy.drain_lead_ms
    if win.drain_started_ms:
        begin = min(begin, win.drain_started_ms)
    return begin, win.end_ms


class _Peak(msgspec.Struct, frozen=True):
    at_ms: int
    nodes: tuple[str, ...]
    slots: int


def _peaks(
    state: State, node_id: str, begin: int, end: int, now_ms: int, policy: MaintenancePolicy
) -> tuple[_Peak | None, _Peak | None]:
    """The moments in [begin, end) with the most other nodes, and the most other slots,
    draining or in maintenance (only windows whose node takes capacity away)."""
    busy: list[tuple[int, int, str]] = []
    for other, window_id in state.open_window_by_node.items():
        if other == node_id or not _takes_capacity(state, other, now_ms):
            continue
        b, e = busy_interval(state.windows[window_id], policy)
        if b < end and e > begin:
            busy.append((b, e, other))
    if not busy:
        return None, None
    most_nodes: _Peak | None = None
    most_slots: _Peak | None = None
    # The overlap count only rises where an interval begins, so those points hold the peaks.
    for t in sorted({max(b, begin) for b, _, _ in busy}):
        there = tuple(sorted(n for b, e, n in busy if b <= t < e))
        peak = _Peak(t, there, sum(_node_slots(state, n) for n in there))
        if most_nodes is None or len(there) > len(most_nodes.nodes):
            most_nodes = peak
        if most_slots is None or peak.slots > most_slots.slots:
            most_slots = peak
    return most_nodes, most_slots


def _cluster_slots(state: State, node_id: str, now_ms: int) -> tuple[int, int]:
    """(nodes, slots) of the cluster: the nodes offering slots that are connected or away
    on their window, and this one."""
    members = {n for n in state.nodes if _takes_capacity(state, n, now_ms)}
    members.add(node_id)
    return len(members), sum(_node_slots(state, n) for n in members)


def _cap_rules(
    state: State,
    node_id: str,
    start_ms: int,
    duration_ms: int,
    now_ms: int,
    policy: MaintenancePolicy,
) -> list[Rejection]:
    begin = start_ms - policy.drain_lead_ms
    end = start_ms + duration_ms
    most_nodes, most_slots = _peaks(state, node_id, begin, end, now_ms, policy)
    cluster_nodes, cluster_slots = _cluster_slots(state, node_id, now_ms)
    if most_nodes is None and cluster_nodes >= 2:
        return []  # one node of a cluster of two or more may always go
    reasons: list[Rejection] = []
    if most_nodes is not None and len(most_nodes.nodes) + 1 > policy.max_concurrent_nodes:
        reasons.append(
            Rejection(
                Code.NODE_CAP,
                f"at {format_time(most_nodes.at_ms)} {len(most_nodes.nodes)} other node(s) are "
                f"draining or in maintenance ({', '.join(most_nodes.nodes)}); with this one "
                f"that is over max_concurrent_nodes={policy.max_concurrent_nodes}",
            )
        )
    mine = _node_slots(state, node_id)
    others = most_slots.slots if most_slots is not None else 0
    cap = Fraction(policy.max_concurrent_capacity_share).limit_denominator(1_000_000)
    if cluster_slots > 0 and Fraction(others + mine, cluster_slots) > cap:
        at = f"at {format_time(most_slots.at_ms)} " if most_slots is not None else ""
        share = 100 * (others + mine) / cluster_slots
        reasons.append(
            Rejection(
                Code.CAPACITY_CAP,
                f"{at}{others + mine} of the cluster's {cluster_slots} slots would be draining "
                f"or in maintenance ({share:.0f}%, this node has {mine}), over "
                f"max_concurrent_capacity_share={float(cap):.0%}",
            )
        )
    return reasons


def _earliest_start(
    state: State,
    node_id: str,
    start_ms: int,
    duration_ms: int,
    now_ms: int,
    policy: MaintenancePolicy,
) -> int | None:
    """The earliest start >= max(requested, now + min_lead) passing every timed rule.

    Moving the start later only helps when a blocker ends: another window's busy period
    (then our drain may begin at its end, so start = its end + drain_lead) or a devshard
    of ours. Those points, plus the lower bound, are the only candidates: bounded by the
    number of open windows and devshards.
    """
    low = max(start_ms, now_ms + policy.min_lead_ms)
    candidates = {low}
    for other, window_id in state.open_window_by_node.items():
        if other != node_id:
            candidates.add(state.windows[window_id].end_ms + policy.drain_lead_ms)
    candidates.update(d.ends_ms for d in _devshards_on(state, node_id))
    latest = now_ms + policy.max_lead_ms
    for t in sorted(c for c in candidates if c >= low):
        if t > latest:
            break
        if not _timed_rules(state, node_id, t, duration_ms, now_ms, policy):
            return t
    return None


# --------------------------------------------------------------------------------------------
# Cancel / finish / reconnect
# --------------------------------------------------------------------------------------------


def _target_window(
    state: State, node_id: str, requester: str, window_id: str | None, policy: MaintenancePolicy
) -> MaintenanceWindow | Rejection:
    """The window a cancel/finish addresses (the node's open one when no id is given)."""
    if not may_act_for(requester, node_id, policy):
        return Rejection(
            Code.NOT_ALLOWED,
            f"{requester} may not change maintenance of node {node_id}: only the node itself "
            "or an operator key (policy operator_ids) may",
        )
    if window_id is None:
        win = state.open_window(node_id)
        if win is None:
            return Rejection(Code.NO_WINDOW, f"node {node_id} has no open maintenance window")
        return win
    found = state.windows.get(window_id)
    if found is None:
        return Rejection(
            Code.UNKNOWN_WINDOW,
            f"there is no maintenance window {window_id!r} (a node's closed windows are kept "
            f"only for its last {CLOSED_WINDOWS_KEPT_PER_NODE})",
        )
    if found.node_id != node_id:
        return Rejection(
            Code.NOT_ALLOWED, f"window {window_id} belongs to node {found.node_id}, not {node_id}"
        )
    if found.state in (WindowState.COMPLETED, WindowState.CANCELLED):
        how = f" ({found.outcome})" if found.outcome else ""
        return Rejection(
            Code.ALREADY_CLOSED,
            f"window {window_id} is already {found.state.value}{how} since "
            f"{format_time(found.closed_ms)}",
        )
    return found


def _has_started(win: MaintenanceWindow, now_ms: int) -> bool:
    # The planner's cycle may lag the clock by one cycle: the start time decides.
    return win.state is WindowState.ACTIVE or now_ms >= win.start_ms


def drain_charge_ms(win: MaintenanceWindow, now_ms: int, policy: MaintenancePolicy) -> int:
    """Credit a cancel does not refund: the whole drain period, once draining has begun.

    From the drain start the planner no longer places the epoch that crosses the window
    start on this node, so that capacity is already lost to the cluster whether or not the
    window then happens. Charging the full drain (start - drain start, capped at what the
    window cost) makes cancel-and-reschedule loops that dodge placement use up credit.
    Zero while the window is merely SCHEDULED.
    """
    if win.state is WindowState.DRAINING and win.drain_started_ms:
        drain_from = win.drain_started_ms
    elif now_ms >= win.start_ms - policy.drain_lead_ms:
        drain_from = win.start_ms - policy.drain_lead_ms
    else:
        return 0
    return min(win.credit_spent_ms, max(0, win.start_ms - drain_from))


def cancel(
    state: State,
    node_id: str,
    requester: str,
    window_id: str | None,
    now_ms: int,
    policy: MaintenancePolicy,
) -> MaintenanceCancelled | Rejection:
    """Cancel a SCHEDULED window (full refund) or DRAINING one (drain not refunded)."""
    win = _target_window(state, node_id, requester, window_id, policy)
    if isinstance(win, Rejection):
        return win
    if _has_started(win, now_ms):
        return Rejection(
            Code.ALREADY_ACTIVE,
            f"window {win.window_id} started at {format_time(win.start_ms)}; an active window "
            "cannot be cancelled, finish it instead (cluster maintenance finish)",
        )
    _, refund = cancel_refund_ms(state, win, now_ms, policy)
    who = "host" if requester == node_id else f"operator {requester}"
    return MaintenanceCancelled(
        window_id=win.window_id,
        node_id=node_id,
        reason=f"cancelled by {who}",
        credit_refund_ms=refund,
    )


def cancel_refund_ms(
    state: State, win: MaintenanceWindow, now_ms: int, policy: MaintenancePolicy
) -> tuple[int, int]:
    """(due, given) if `win` is cancelled at `now_ms`: due is the window's credit less the
    drain charge; given is what fits under `credit_cap_ms`. Credit earned while the window
    waited may have refilled the balance, and a refund on top of it would bank more than
    the cap allows (earning stops at the cap too). The event records what is given, so
    replay needs no policy."""
    due = win.credit_spent_ms - drain_charge_ms(win, now_ms, policy)
    room = policy.credit_cap_ms - credit_balance_ms(state, win.node_id, policy)
    return due, max(0, min(due, room))


def finish(
    state: State,
    node_id: str,
    requester: str,
    window_id: str | None,
    now_ms: int,
    policy: MaintenancePolicy,
) -> MaintenanceFinished | Rejection:
    """The host (how="host") or an operator (how="operator", `by` the requester) ends the
    node's active window early. Unused time is not refunded: the cluster held the declared
    window's capacity and concurrency slot for it."""
    win = _target_window(state, node_id, requester, window_id, policy)
    if isinstance(win, Rejection):
        return win
    if not _has_started(win, now_ms):
        return Rejection(
            Code.NOT_STARTED,
            f"window {win.window_id} starts at {format_time(win.start_ms)} "
            f"({format_relative(win.start_ms, now_ms)}); it cannot be finished before it "
            "starts, cancel it instead (cluster maintenance cancel)",
        )
    if now_ms >= win.end_ms:
        return Rejection(
            Code.WINDOW_ENDED,
            f"window {win.window_id} ended at {format_time(win.end_ms)} without a finish; it "
            "closes as overrun",
        )
    if requester == node_id:
        return MaintenanceFinished(window_id=win.window_id, node_id=node_id, how="host")
    # Said apart from the host's, as a cancel is ("cancelled by operator operator:local").
    return MaintenanceFinished(
        window_id=win.window_id, node_id=node_id, how="operator", by=requester
    )


def stopped_in_window(state: State, finished: MaintenanceFinished) -> NodeDisconnected | None:
    """The excused disconnect that goes with finishing the window of a node whose worker
    stopped in it and is not back (its goodbye, `NodeRecord.stopping_idx`, stands), or None.

    Such a node went quiet inside its window, where a stop is excused; the finish (an
    operator ending the window early, typically to remove a node that is not coming back, as
    `cluster node remove` advises) must not turn that silence into an unexcused disconnect a
    few cycles later. So the same decision disconnects it, excused, while its window still
    excuses it: no forfeited epoch, and it can be removed at once. A node that is silent
    without a goodbye (powered off) is judged by liveness as ever: only the goodbye tells,
    from State, that its worker is gone."""
    rec = state.nodes.get(finished.node_id)
    if rec is None or not rec.connected or not rec.stopping_idx:
        return None
    who = f"operator {finished.by}" if finished.how == "operator" else "its host"
    said = clip(rec.stopping_reason, STOP_REASON_CHARS)
    return NodeDisconnected(
        node_id=finished.node_id,
        reason=f"{STOPPED_BY_OPERATOR}"
        + (f" ({said})" if said else "")
        + f"; its worker said goodbye at event index {rec.stopping_idx} and was not back "
        f"when {who} finished its maintenance window {finished.window_id}",
        excused=True,
    )


def on_reconnect(
    state: State, node_id: str, boot_id: str, now_ms: int
) -> MaintenanceFinished | None:
    """A worker that restarts during its own window (its host rebooted) has come back: the
    hello of its new process (`boot_id`) finishes the window, with no separate command.
    None when there is nothing to finish.

    `state` is the state before this hello's NodeConnected, so the node record still holds
    the boot id of the previous hello. The same boot id is the same process re-dialling (the
    master restarted, the connection blipped): its host may still be in maintenance, so the
    window stays open."""
    win = state.open_window(node_id)
    if win is None or not _has_started(win, now_ms) or now_ms >= win.end_ms:
        return None
    rec = state.nodes.get(node_id)
    if rec is not None and rec.boot_id == boot_id:
        return None
    return MaintenanceFinished(window_id=win.window_id, node_id=node_id, how="reconnect")


# --------------------------------------------------------------------------------------------
# Time-driven transitions (the planner calls this once per cycle)
# --------------------------------------------------------------------------------------------


def maintenance_cycle(state: State, now_ms: int, policy: MaintenancePolicy) -> list[Event]:
    """Transitions due at `now_ms`, in window-id order: SCHEDULED -> DRAINING at start -
    drain_lead, -> ACTIVE at start, ACTIVE -> overrun at start + duration. A window late
    by several steps (master was down) gets each due event, in lifecycle order."""
    events: list[Event] = []
    for window_id in sorted(state.open_window_by_node.values()):
        win = state.windows[window_id]
        node_id = win.node_id
        current = win.state
        if current is WindowState.SCHEDULED and (
            win.start_ms - policy.drain_lead_ms <= now_ms < win.start_ms
        ):
            events.append(MaintenanceDrainStarted(window_id=window_id, node_id=node_id))
        if current in (WindowState.SCHEDULED, WindowState.DRAINING) and now_ms >= win.start_ms:
            events.append(MaintenanceStarted(window_id=window_id, node_id=node_id))
            current = WindowState.ACTIVE
        if current is WindowState.ACTIVE and now_ms >= win.end_ms:
            events.append(MaintenanceOverrun(window_id=window_id, node_id=node_id))
    return events


# --------------------------------------------------------------------------------------------
# Displayed status
# --------------------------------------------------------------------------------------------


class DisplayStatus(StrEnum):
    """The node status DESIGN section 5 derives from its window (ACTIVE means serving).

    `cluster.shared.node_status` gives the detailed onboarding view; this is the four-way
    maintenance view, with the same precedence (maintenance, disconnected, draining).
    """

    ACTIVE = "active"
    DRAINING = "draining"
    MAINTENANCE = "maintenance"
    DISCONNECTED = "disconnected"


def node_display_status(state: State, node_id: str, now_ms: int) -> DisplayStatus:
    """MAINTENANCE while excused (online or offline: planned absence is not a failure),
    else DISCONNECTED when gone, DRAINING while its window drains, else ACTIVE."""
    rec = state.nodes.get(node_id)
    if rec is None:
        raise KeyError(f"node {node_id} is not known to the cluster")
    if is_excused(state, node_id, now_ms):
        return DisplayStatus.MAINTENANCE
    if not rec.connected:
        return DisplayStatus.DISCONNECTED
    win = state.open_window(node_id)
    if win is not None and win.state is WindowState.DRAINING:
        return DisplayStatus.DRAINING
    return DisplayStatus.ACTIVE


# --------------------------------------------------------------------------------------------
# Rendering for the CLI
# --------------------------------------------------------------------------------------------


def render_rejection(rejection: Rejection) -> str:
    return f"refused ({rejection.code}): {rejection.message}"


def render_decision(decision: ScheduleDecision) -> str:
    """The human answer to `cluster maintenance check|schedule`."""
    now = decision.now_ms
    head = (
        f"window for node {decision.node_id}: start {format_time(decision.start_ms)} "
        f"({format_relative(decision.start_ms, now)}), duration "
        f"{format_duration(decision.duration_ms)}"
    )
    if decision.allowed:
        return f"{head}\nallowed"
    lines = [head, f"refused for {len(decision.reasons)} reason(s):"]
    lines += [f"  - {r.code}: {r.message}" for r in decision.reasons]
    if decision.earliest_start_ms is not None:
        at = decision.earliest_start_ms
        lines.append(
            f"earliest start that would pass: {format_time(at)} ({format_relative(at, now)})"
        )
    else:
        lines.append("no later start would pass: fix the reasons above")
    return "\n".join(lines)


def render_window(win: MaintenanceWindow, now_ms: int) -> str:
    """One window for `cluster maintenance next`."""
    start, end = win.start_ms, win.end_ms
    text = (
        f"window {win.window_id} ({win.state.value}): {format_time(start)} to {format_time(end)}"
        f" ({format_duration(win.duration_ms)})"
    )
    if win.state in (WindowState.SCHEDULED, WindowState.DRAINING):
        text += f", starts {format_relative(start, now_ms)}"
    elif win.state is WindowState.ACTIVE:
        text += f", ends {format_relative(end, now_ms)}"
    elif win.outcome:
        text += f", closed ({win.outcome}) at {format_time(win.closed_ms)}"
    return text


def render_next(state: State, node_id: str, now_ms: int, policy: MaintenancePolicy) -> str:
    """`cluster maintenance next`: the node's open window (if any) and its credit."""
    credit = (
        f"maintenance credit: {format_duration(max(0, credit_balance_ms(state, node_id, policy)))}"
    )
    win = state.open_window(node_id)
    if win is None:
        return f"node {node_id}: no maintenance window scheduled; {credit}"
    return f"node {node_id}: {render_window(win, now_ms)}; {credit}"


def windows_of(state: State, node_id: str) -> Iterable[MaintenanceWindow]:
    """The node's windows State holds (its open one and its last closed ones, see
    CLOSED_WINDOWS_KEPT_PER_NODE), oldest request first: its recent history."""
    return sorted(
        (w for w in state.windows.values() if w.node_id == node_id),
        key=lambda w: (w.requested_ms, w.start_ms, w.window_id),
    )
