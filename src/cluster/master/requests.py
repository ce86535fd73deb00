"""Deciding operator and host requests: request + state + now -> reply and events. Pure.

The master shell decides requests one at a time and indexes (and applies) each accepted
request's events before it decides the next, so two requests racing for the last
maintenance slot are judged against different states and exactly one wins.

Who asks: a worker forwards its host's requests over its authenticated libp2p connection,
so `requester` is that node's peer id; the master's own control socket speaks for the local
operator (`LOCAL_OPERATOR`), who may act for any node.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

import msgspec

from cluster.control import (
    MaintenanceCancel,
    MaintenanceCheck,
    MaintenanceFinish,
    MaintenanceNext,
    MaintenanceSchedule,
    NodeRemove,
    Reply,
    Request,
    SessionCreate,
    SessionDelete,
    SessionList,
    StatusRequest,
)
from cluster.master import maintenance, window_fit
from cluster.master.maintenance import LOCAL_OPERATOR as LOCAL_OPERATOR
from cluster.shared.codec import to_builtins
from cluster.shared.durations import (
    DAY_MS,
    MAX_DURATION_MS,
    MAX_LEAD_MS,
    format_duration,
    format_relative,
    format_time,
)
from cluster.shared.events import (
    Event,
    MaintenanceScheduled,
    NodeRemoved,
    SessionDeleted,
    SessionRequested,
)
from cluster.shared.maintenance_policy import MaintenancePolicy
from cluster.shared.node_names import Unresolved, resolve_node
from cluster.shared.state import State, WindowState

MAX_SLOTS = 4096
#: Start times a maintenance request may name: every later message renders them as a date
#: (years 1970..9999), and a window ending past year 9999 could not be shown at all.
LATEST_START_MS: Final = 253_402_214_400_000 - MAX_DURATION_MS  # 9999-12-31 less a year
MAX_MEMORY_PER_SLOT_MB = 16 * 1024 * 1024
#: With events.MAX_WORK_UNITS, one work report's reward stays under 2**60.
MAX_REWARD_PER_UNIT = 2**20
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # fullmatch: `$` allows a final "\n"
#: Longest reason an operator may give for removing a node: it is logged forever.
MAX_REMOVE_REASON_CHARS: Final = 200


_MaintenanceRequest = (
    MaintenanceSchedule | MaintenanceCheck | MaintenanceCancel | MaintenanceFinish | MaintenanceNext
)


class Decision(msgspec.Struct, frozen=True):
    reply: Reply
    events: tuple[Event, ...] = ()


def _refuse(message: str) -> Decision:
    return Decision(Reply(ok=False, message=message))


def _target_node(state: State, requester: str, node_id: str) -> str | Unresolved:
    """The node a maintenance request is about: the one it names (`resolve_node`: an id,
    short form or prefix), else the requester's own (the operator on the master host must
    name one). Whether the requester may act for that node is the maintenance rules'
    `may_act_for`: operator keys may act for any node."""
    if node_id:
        return resolve_node(state, node_id)
    if requester == LOCAL_OPERATOR:
        return Unresolved("the operator must name the node (--node NODE)")
    return requester


#: What finds the sessions a window would leave unplaced (`window_fit.sessions_short`, or
#: a shell's stand-in that answers from a result it computed off the event loop).
ShortfallFinder = Callable[
    [State, MaintenanceScheduled, int, MaintenancePolicy], tuple[window_fit.Shortfall, ...]
]


def decide(
    state: State,
    request: Request,
    requester: str,
    now_ms: int,
    policy: MaintenancePolicy,
    *,
    find_shortfalls: ShortfallFinder = window_fit.sessions_short,
) -> Decision:
    """The answer to one request and the events that carry it out (none when refused)."""
    if isinstance(request, SessionCreate | SessionDelete) and requester != LOCAL_OPERATOR:
        return _refuse("sessions are managed by the operator on the master host")
    if isinstance(request, SessionCreate):
        return _session_create(state, request)
    if isinstance(request, SessionDelete):
        if request.session_id not in state.sessions:
            return _refuse(f"no session {request.session_id!r} (see `cluster session list`)")
        return Decision(
            Reply(ok=True, message=f"session {request.session_id} deleted"),
            (SessionDeleted(session_id=request.session_id),),
        )
    if isinstance(request, NodeRemove):
        if requester != LOCAL_OPERATOR:
            return _refuse("nodes are removed by the operator on the master host")
        return _node_remove(state, request)
    if isinstance(request, SessionList):
        sessions = [to_builtins(s) for _, s in sorted(state.sessions.items())]
        return Decision(Reply(ok=True, data=sessions))
    if isinstance(request, StatusRequest):
        return _refuse("status is answered by the master shell, not by decide()")
    if isinstance(request, _MaintenanceRequest):
        return _maintenance(state, request, requester, now_ms, policy, find_shortfalls)
    # Only a request built in Python gets here (the control socket decodes the union).
    return _refuse(f"unsupported request {type(request).__name__}")


def _session_create(state: State, req: SessionCreate) -> Decision:
    problems = []
    if not 1 <= req.slots <= MAX_SLOTS:
        problems.append(f"slots must be between 1 and {MAX_SLOTS}, not {req.slots}")
    if not 1 <= req.memory_per_slot_mb <= MAX_MEMORY_PER_SLOT_MB:
        problems.append(
            f"memory per slot must be between 1 and {MAX_MEMORY_PER_SLOT_MB} MiB, "
            f"not {req.memory_per_slot_mb}"
        )
    if not 0 <= req.reward_per_unit <= MAX_REWARD_PER_UNIT:
        problems.append(
            f"reward per unit must be between 0 and {MAX_REWARD_PER_UNIT}, "
            f"not {req.reward_per_unit}"
        )
    if req.name and not _NAME.fullmatch(req.name):
        problems.append(
            f"name {req.name!r} must be 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if problems:
        return _refuse("; ".join(problems))
    # The id names the log index of the event that creates it: unique and replayable.
    session_id = f"s{state.last_applied + 1}" + (f"-{req.name}" if req.name else "")
    event = SessionRequested(
        session_id=session_id,
        slots=req.slots,
        memory_per_slot_mb=req.memory_per_slot_mb,
        gpu=req.gpu,
        name=req.name,
        reward_per_unit=req.reward_per_unit,
    )
    return Decision(
        Reply(ok=True, message=f"session {session_id} created", data={"session_id": session_id}),
        (event,),
    )


def _node_remove(state: State, req: NodeRemove) -> Decision:
    """Remove a node that is gone for good. Only a node that is not connected: a connected
    one is still speaking (or, in an active maintenance window, excused from speaking), and
    one that connects again after its removal simply joins again (its old slot, nothing it
    had earned). There is no --force: the
    master disconnects a node that goes quiet within a few plan cycles, so waiting is all
    forcing would save."""
    if not req.node_id:
        return _refuse(
            "name the node to remove: its full id, or the short form `cluster status` shows"
        )
    if len(req.reason) > MAX_REMOVE_REASON_CHARS:
        return _refuse(
            f"the reason is {len(req.reason)} characters long: at most "
            f"{MAX_REMOVE_REASON_CHARS} (it is kept in the log forever)"
        )
    # From here on the full id: the reply, the event and the decision log all say it.
    node_id = resolve_node(state, req.node_id)
    if isinstance(node_id, Unresolved):
        return _refuse(node_id.message)
    rec = state.nodes.get(node_id)
    if rec is None:
        gone = state.removed_node(node_id)
        if gone is not None:
            why = f" ({gone.reason})" if gone.reason else ""
            return _refuse(
                f"node {node_id} is already removed: since {format_time(gone.removed_ms)}"
                f" (event {gone.removed_idx}){why}"
            )
        # Not reached: resolve_node names only live and removed nodes.
        return _refuse(f"unknown node {node_id}: it has never joined this cluster")
    window = state.open_window(node_id)
    if rec.connected and window is not None and window.state is WindowState.ACTIVE:
        finish = f"`cluster maintenance finish --node {node_id}`"
        if rec.stopping_idx:
            # Its worker said goodbye inside the window: the finish disconnects it, excused.
            return _refuse(
                f"node {node_id} is in maintenance (window {window.window_id}): offline for "
                "maintenance is not gone. Its worker stopped inside the window; if it is not "
                f"coming back, finish the window ({finish}): that marks it disconnected at "
                "once, excused (a stop inside its window is), and then remove it"
            )
        return _refuse(
            f"node {node_id} is in maintenance (window {window.window_id}): offline for "
            f"maintenance is not gone. If it is not coming back, finish the window ({finish}); "
            "once the master marks it disconnected (a few quiet plan cycles), remove it"
        )
    if rec.connected and rec.stopping_idx:
        # Its worker has stopped already: telling the operator to stop it would mislead.
        return _refuse(
            f"node {node_id} is stopping: its worker said goodbye at event {rec.stopping_idx}; "
            "the master marks it disconnected after a few quiet plan cycles (unless it is "
            "back by then): remove it once it is"
        )
    if rec.connected:
        return _refuse(
            f"node {node_id} is connected: stop its worker first, and once the master marks it "
            "disconnected (a few quiet plan cycles) remove it; to take it out for a while "
            f"instead, schedule a maintenance window (`cluster maintenance schedule --node "
            f"{node_id} ...`)"
        )
    closed = f"; its maintenance window {window.window_id} is closed" if window else ""
    return Decision(
        Reply(
            ok=True,
            message=f"node {node_id} removed{closed}. Should it connect again it rejoins "
            "afresh (a self-test to come, the initial maintenance credit): to keep it out, take "
            "it off the allow-list or change the cluster secret",
        ),
        (NodeRemoved(node_id=node_id, reason=req.reason),),
    )


def _start(now_ms: int, start_ms: int | None, in_ms: int | None) -> int | str:
    if (start_ms is None) == (in_ms is None):
        return "give exactly one of a start time (--at) or a lead time (--in)"
    if in_ms is not None:
        if in_ms < 0:
            return f"--in cannot be negative ({in_ms} ms)"
        if in_ms > MAX_LEAD_MS:
            return f"--in is too far ahead ({in_ms} ms): at most {MAX_LEAD_MS // DAY_MS} days"
        return now_ms + in_ms
    assert start_ms is not None
    # Said as a time (format_time never raises), not as ms: the operator typed a date.
    if start_ms > LATEST_START_MS:
        return (
            f"--at {format_time(start_ms)} is too far ahead: the latest start this cluster "
            f"accepts is {format_time(LATEST_START_MS)} (a window must end by year 9999)"
        )
    if start_ms < 0:
        return (
            f"--at {format_time(start_ms)} is too early: the earliest start this cluster "
            f"accepts is {format_time(0)}"
        )
    return start_ms


def _maintenance(
    state: State,
    request: _MaintenanceRequest,
    requester: str,
    now_ms: int,
    policy: MaintenancePolicy,
    find_shortfalls: ShortfallFinder,
) -> Decision:
    node = _target_node(state, requester, request.node_id)
    if isinstance(node, Unresolved):
        return _refuse(node.message)
    if node not in state.nodes:
        gone = state.removed_node(node)
        if gone is not None:
            return _refuse(
                f"node {node} is removed from this cluster: since {format_time(gone.removed_ms)}"
                f" (event {gone.removed_idx}); it has no maintenance to schedule or show"
            )
        return _refuse(f"unknown node {node}: it has never joined this cluster")
    if isinstance(request, MaintenanceCheck | MaintenanceSchedule):
        start = _start(now_ms, request.start_ms, request.in_ms)
        if isinstance(start, str):
            return _refuse(start)
        result = maintenance.schedule(
            state, node, requester, start, request.duration_ms, now_ms, policy
        )
        # Sessions the window would leave unplaced: said, never refused (window_fit).
        short = (
            find_shortfalls(state, result, now_ms, policy)
            if isinstance(result, MaintenanceScheduled)
            else ()
        )
        warning = window_fit.render_shortfalls(short, node, now_ms)
        unplaced = {"unplaced_sessions": to_builtins(list(short))}
        if isinstance(request, MaintenanceCheck):
            decision = maintenance.check_schedule(
                state, node, requester, start, request.duration_ms, now_ms, policy
            )
            message = maintenance.render_decision(decision)
            return Decision(
                Reply(
                    ok=decision.allowed,
                    message=f"{message}\n{warning}" if warning else message,
                    data={**to_builtins(decision), **unplaced},
                )
            )
        if isinstance(result, maintenance.ScheduleDecision):
            return Decision(
                Reply(
                    ok=False,
                    message=maintenance.render_decision(result),
                    data=to_builtins(result),
                )
            )
        scheduled = (
            f"scheduled window {result.window_id}: starts {format_time(start)} "
            f"({format_relative(start, now_ms)}) for {format_duration(request.duration_ms)}"
        )
        return Decision(
            Reply(
                ok=True,
                message=f"{scheduled}\n{warning}" if warning else scheduled,
                data={"window_id": result.window_id, "start_ms": start, **unplaced},
            ),
            (result,),
        )
    if isinstance(request, MaintenanceCancel):
        outcome = maintenance.cancel(
            state, node, requester, request.window_id or None, now_ms, policy
        )
        if isinstance(outcome, maintenance.Rejection):
            return _refuse(maintenance.render_rejection(outcome))
        window = state.windows[outcome.window_id]
        due, given = maintenance.cancel_refund_ms(state, window, now_ms, policy)
        capped = (
            f" of {format_duration(due)} due (the balance is capped at "
            f"{format_duration(policy.credit_cap_ms)})"
            if given < due
            else ""
        )
        # Said, or a refund short of what the window cost reads like a miscount.
        charge = maintenance.drain_charge_ms(window, now_ms, policy)
        charged = (
            f"; its drain period ({format_duration(charge)}) is charged, not refunded: "
            "draining had begun, and from then no work crossing the window's start was "
            "placed on the node"
            if charge
            else ""
        )
        return Decision(
            Reply(
                ok=True,
                message=f"cancelled window {outcome.window_id}; "
                f"credit refunded: {format_duration(given)}{capped}{charged}",
            ),
            (outcome,),
        )
    if isinstance(request, MaintenanceFinish):
        done = maintenance.finish(state, node, requester, request.window_id or None, now_ms, policy)
        if isinstance(done, maintenance.Rejection):
            return _refuse(maintenance.render_rejection(done))
        stopped = maintenance.stopped_in_window(state, done)
        if stopped is None:
            return Decision(Reply(ok=True, message=f"finished window {done.window_id}"), (done,))
        # Disconnected first, while the window still excuses it (the log reads so too).
        return Decision(
            Reply(
                ok=True,
                message=f"finished window {done.window_id}; node {node}'s worker stopped inside "
                "it and is not back: disconnected, excused (a stop inside its window is); "
                "should it not come back, it can be removed now (cluster node remove)",
            ),
            (stopped, done),
        )
    return Decision(Reply(ok=True, message=maintenance.render_next(state, node, now_ms, policy)))
