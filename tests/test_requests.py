"""Operator and host requests decided purely against state, with a fake clock."""

from __future__ import annotations

import msgspec
from maintenance_log import HOUR, MIN, Log, node_id

from cluster.control import (
    MaintenanceCancel,
    MaintenanceCheck,
    MaintenanceFinish,
    MaintenanceNext,
    MaintenanceSchedule,
    SessionCreate,
    SessionDelete,
    SessionList,
)
from cluster.master.decision_log import decision_lines
from cluster.master.requests import LOCAL_OPERATOR, MAX_REWARD_PER_UNIT, decide
from cluster.shared.durations import parse_time
from cluster.shared.events import (
    MaintenanceCancelled,
    MaintenanceScheduled,
    NodeRemoved,
    SessionRequested,
)
from cluster.shared.humanize import short_id
from cluster.shared.maintenance_policy import MaintenancePolicy

A, B = node_id(1), node_id(2)


def _run(log: Log, request: object, requester: str) -> tuple[bool, str]:
    d = decide(log.state, request, requester, log.now, log.policy)  # type: ignore[arg-type]
    for ev in d.events:
        log.emit(ev)
    return d.reply.ok, d.reply.message


def test_session_create_validates_and_makes_a_replayable_id() -> None:
    log = Log()
    ok, msg = _run(
        log, SessionCreate(slots=0, memory_per_slot_mb=-1, name="bad name!"), LOCAL_OPERATOR
    )
    assert not ok
    assert "slots must be between 1" in msg and "memory per slot" in msg and "'bad name!'" in msg
    for reward in (-1, MAX_REWARD_PER_UNIT + 1):
        ok, msg = _run(
            log,
            SessionCreate(slots=1, memory_per_slot_mb=1, reward_per_unit=reward),
            LOCAL_OPERATOR,
        )
        assert not ok and f"reward per unit must be between 0 and {MAX_REWARD_PER_UNIT}" in msg
    ok, msg = _run(
        log, SessionCreate(slots=2, memory_per_slot_mb=1024, name="chat"), LOCAL_OPERATOR
    )
    assert ok and msg == "session s1-chat created"
    assert isinstance(log.log[-1].event, SessionRequested)
    assert log.state.sessions["s1-chat"].slots == 2
    listed = decide(log.state, SessionList(), LOCAL_OPERATOR, log.now, log.policy).reply
    assert listed.ok and [s["session_id"] for s in listed.data] == ["s1-chat"]
    ok, msg = _run(log, SessionDelete(session_id="nope"), LOCAL_OPERATOR)
    assert not ok and "no session 'nope'" in msg
    ok, _ = _run(log, SessionDelete(session_id="s1-chat"), LOCAL_OPERATOR)
    assert ok and "s1-chat" not in log.state.sessions


def test_a_worker_cannot_manage_sessions() -> None:
    log = Log()
    log.join(A)
    ok, msg = _run(log, SessionCreate(slots=1, memory_per_slot_mb=1), A)
    assert not ok and "operator" in msg
    assert not log.state.sessions


def test_host_schedules_checks_and_cancels_its_own_window() -> None:
    log = Log()
    log.join(A)
    log.join(B)
    ok, msg = _run(log, MaintenanceCheck(in_ms=2 * HOUR, duration_ms=30 * MIN), A)
    assert ok and "allowed" in msg
    assert not any(isinstance(ie.event, MaintenanceScheduled) for ie in log.log)
    ok, msg = _run(log, MaintenanceSchedule(in_ms=2 * HOUR, duration_ms=30 * MIN), A)
    assert ok and msg.startswith("scheduled window mw-")
    win = log.state.windows[log.state.open_window_by_node[A]]
    assert win.node_id == A and win.start_ms == log.now + 2 * HOUR
    ok, msg = _run(log, MaintenanceNext(), A)
    assert ok and win.window_id in msg
    # A second window while one is pending is refused with its reason.
    ok, msg = _run(log, MaintenanceSchedule(in_ms=5 * HOUR, duration_ms=30 * MIN), A)
    assert not ok and "pending" in msg.lower()
    ok, msg = _run(log, MaintenanceFinish(), A)
    assert not ok and "cannot be finished before it starts" in msg
    ok, msg = _run(log, MaintenanceCancel(), A)
    assert ok and "cancelled" in msg
    assert A not in log.state.open_window_by_node


def test_a_request_acts_for_the_node_it_names_when_the_requester_may() -> None:
    log = Log()
    log.join(A)
    log.join(B)
    # B names A: refused (only the node itself or an operator key may), nothing scheduled.
    ok, msg = _run(log, MaintenanceSchedule(in_ms=2 * HOUR, duration_ms=30 * MIN, node_id=A), B)
    assert not ok and f"{B} may not schedule maintenance for node {A}" in msg
    assert not log.state.open_window_by_node
    # Naming no node is about the requester's own.
    ok, _ = _run(log, MaintenanceSchedule(in_ms=2 * HOUR, duration_ms=30 * MIN), B)
    assert ok and B in log.state.open_window_by_node
    # An operator key acts for the node it names, its own window untouched.
    operator = "12D3KooWKGJ9FFG1hRwr25njMwqkie1TmER523ekRHZLbrSrytoD"  # operator_ids are peer ids
    log.policy = msgspec.structs.replace(log.policy, operator_ids=(operator,))
    ok, msg = _run(
        log, MaintenanceSchedule(in_ms=3 * HOUR, duration_ms=30 * MIN, node_id=A), operator
    )
    assert ok, msg
    assert A in log.state.open_window_by_node and operator not in log.state.open_window_by_node
    ok, msg = _run(log, MaintenanceCancel(node_id=A), operator)
    assert ok and A not in log.state.open_window_by_node and B in log.state.open_window_by_node


def test_any_member_may_read_another_nodes_schedule_but_not_check_one_for_it() -> None:
    """Decided (docs/maintenance.md, "Who may act"): `next` is read-only schedule data that
    every member already receives in the log it replicates, so it answers for any node;
    `check` is a request to schedule and is judged as one."""
    log = Log()
    log.join(A)
    log.join(B)
    ok, _ = _run(log, MaintenanceSchedule(in_ms=2 * HOUR, duration_ms=30 * MIN), A)
    assert ok
    window = log.state.open_window_by_node[A]
    ok, msg = _run(log, MaintenanceNext(node_id=A), B)
    assert ok and msg.startswith(f"node {A}: ") and window in msg, msg
    ok, msg = _run(log, MaintenanceCheck(in_ms=5 * HOUR, duration_ms=30 * MIN, node_id=A), B)
    assert not ok and f"{B} may not schedule maintenance for node {A}" in msg, msg


def test_start_times_beyond_what_can_be_shown_are_refused_with_the_field() -> None:
    """Said as the time typed, with the limit as a time: it was refused in milliseconds."""
    log = Log()
    log.join(A)
    for request, says in [
        (
            MaintenanceCheck(start_ms=parse_time("9999-12-31T23:59Z"), duration_ms=HOUR),
            "--at 9999-12-31T23:59:00Z is too far ahead: the latest start this cluster "
            "accepts is 9998-12-30T00:00:00Z",
        ),
        (
            MaintenanceCheck(start_ms=253_402_300_800_000, duration_ms=HOUR),
            "--at 253402300800000 ms since 1970-01-01 UTC (after year 9999) is too far ahead",
        ),
        (
            MaintenanceSchedule(start_ms=-1, duration_ms=HOUR),
            "--at 1969-12-31T23:59:59.999Z is too early: the earliest start this cluster "
            "accepts is 1970-01-01T00:00:00Z",
        ),
        (MaintenanceSchedule(in_ms=2**62, duration_ms=HOUR), "--in is too far ahead"),
    ]:
        ok, msg = _run(log, request, A)
        assert not ok and says in msg, msg
    assert not log.state.open_window_by_node


def test_what_is_not_a_request_is_called_unsupported() -> None:
    """Not "the operator must name the node": that branch was all a non-request reached."""
    log = Log()
    log.join(A)
    for junk in ("junk", None, SessionCreate):
        ok, msg = _run(log, junk, LOCAL_OPERATOR)
        assert not ok and msg == f"unsupported request {type(junk).__name__}"


def test_the_local_operator_acts_for_any_node_without_an_operator_key() -> None:
    log = Log()
    log.join(A)
    log.join(B)
    assert LOCAL_OPERATOR not in log.policy.operator_ids
    ok, msg = _run(
        log, MaintenanceSchedule(in_ms=2 * HOUR, duration_ms=30 * MIN, node_id=A), LOCAL_OPERATOR
    )
    assert ok, msg
    ok, msg = _run(log, MaintenanceCancel(node_id=A), LOCAL_OPERATOR)
    assert ok, msg


def test_a_finish_says_who_finished_the_window() -> None:
    """The host's finish and an operator's are recorded and logged apart, as cancels are."""
    log = Log(MaintenancePolicy(max_concurrent_capacity_share=1.0))
    log.join(A)
    log.join(B)
    for node in (A, B):
        ok, msg = _run(log, MaintenanceSchedule(in_ms=HOUR, duration_ms=HOUR, node_id=node), node)
        assert ok, msg
    log.now += HOUR + MIN
    said: list[str] = []
    for node, requester in ((A, LOCAL_OPERATOR), (B, B)):
        before = log.state
        d = decide(before, MaintenanceFinish(node_id=node), requester, log.now, log.policy)
        assert d.reply.ok, d.reply.message
        said += [line.message for line in decision_lines(d.events, before, log.now)]
        for ev in d.events:
            log.emit(ev)
    wa, wb = (log.state.closed_windows_by_node[n][-1] for n in (A, B))
    assert said == [
        f"node {A} finished maintenance (window {wa}): finished by operator {LOCAL_OPERATOR}; "
        "it takes work again",
        f"node {B} finished maintenance (window {wb}): finished by its host; it takes work again",
    ]
    assert [log.state.windows[w].outcome for w in (wa, wb)] == ["operator", "host"]


def test_session_names_end_where_they_seem_to() -> None:
    ok, msg = _run(
        Log(), SessionCreate(slots=1, memory_per_slot_mb=1, name="web\n"), LOCAL_OPERATOR
    )
    assert not ok and "'web\\n'" in msg


def test_operator_must_name_a_known_node() -> None:
    log = Log()
    log.join(A)
    log.join(B)
    ok, msg = _run(log, MaintenanceSchedule(in_ms=2 * HOUR, duration_ms=30 * MIN), LOCAL_OPERATOR)
    assert not ok and "--node" in msg
    ok, msg = _run(
        log,
        MaintenanceSchedule(in_ms=2 * HOUR, duration_ms=30 * MIN, node_id="ghost"),
        LOCAL_OPERATOR,
    )
    assert not ok and "unknown node ghost" in msg
    ok, _ = _run(
        log, MaintenanceSchedule(in_ms=2 * HOUR, duration_ms=30 * MIN, node_id=A), LOCAL_OPERATOR
    )
    assert ok and A in log.state.open_window_by_node


def test_start_must_be_given_exactly_once() -> None:
    log = Log()
    log.join(A)
    ok, msg = _run(log, MaintenanceSchedule(duration_ms=30 * MIN), A)
    assert not ok and "exactly one" in msg
    ok, msg = _run(log, MaintenanceSchedule(in_ms=HOUR, start_ms=log.now, duration_ms=MIN), A)
    assert not ok and "exactly one" in msg


def test_two_requests_for_the_last_slot_exactly_one_wins() -> None:
    policy = MaintenancePolicy(max_concurrent_nodes=1)
    log = Log(policy)
    for n in (A, B, node_id(3)):
        log.join(n)
    first = _run(log, MaintenanceSchedule(in_ms=2 * HOUR, duration_ms=30 * MIN), A)
    second = _run(log, MaintenanceSchedule(in_ms=2 * HOUR, duration_ms=30 * MIN), B)
    assert [first[0], second[0]] == [True, False]
    assert "earliest start" in second[1]


def test_a_cancel_refund_tops_the_credit_up_to_the_cap_and_no_further() -> None:
    """Credit earned while a window waited refills the balance; the refund then gives only
    what fits under credit_cap_ms, the event records that figure and the reply says so."""
    policy = MaintenancePolicy(credit_per_epoch_ms=10 * MIN)
    log = Log(policy)
    log.join(A)
    log.join(B)
    epoch = 1
    while log.credit(A) < policy.credit_cap_ms:
        log.earn(A, epoch)
        epoch += 1
    ok, _ = _run(log, MaintenanceSchedule(in_ms=10 * 24 * HOUR, duration_ms=4 * HOUR), A)
    assert ok and log.credit(A) == policy.credit_cap_ms - 4 * HOUR
    for _ in range(3 * 6):  # three hours of service earned back while it waits
        log.earn(A, epoch)
        epoch += 1
    assert log.credit(A) == policy.credit_cap_ms - HOUR
    ok, msg = _run(log, MaintenanceCancel(), A)
    assert ok and msg.endswith(
        "credit refunded: 1h 00m of 4h 00m due (the balance is capped at 8h 00m)"
    )
    (cancelled,) = [ie.event for ie in log.log if isinstance(ie.event, MaintenanceCancelled)]
    assert cancelled.credit_refund_ms == HOUR
    assert log.credit(A) == policy.credit_cap_ms
    # Below the cap the whole credit comes back, and the reply says no more than that.
    ok, _ = _run(log, MaintenanceSchedule(in_ms=10 * 24 * HOUR, duration_ms=4 * HOUR), A)
    ok, msg = _run(log, MaintenanceCancel(), A)
    assert ok and msg.endswith("credit refunded: 4h 00m")
    assert log.credit(A) == policy.credit_cap_ms


def test_a_cancel_while_draining_says_the_drain_period_is_charged() -> None:
    """The reply said only "credit refunded: 20m" for a 30m window, as if 10m went missing."""
    log = Log()
    log.join(A)
    log.join(B)
    ok, _ = _run(log, MaintenanceSchedule(in_ms=HOUR, duration_ms=30 * MIN), A)
    assert ok
    log.advance(HOUR - log.policy.drain_lead_ms)
    log.cycle()  # DRAINING
    log.advance(2 * MIN)  # the whole drain is charged, however little of it has passed
    ok, msg = _run(log, MaintenanceCancel(), A)
    assert ok and msg.endswith(
        "credit refunded: 20m; its drain period (10m) is charged, not refunded: draining had "
        "begun, and from then no work crossing the window's start was placed on the node"
    ), msg
    # A window cancelled while merely scheduled is refunded whole, with nothing more said.
    ok, _ = _run(log, MaintenanceSchedule(in_ms=HOUR, duration_ms=30 * MIN), A)
    ok, msg = _run(log, MaintenanceCancel(), A)
    assert ok and msg.endswith("credit refunded: 30m"), msg


def test_the_operator_names_a_node_for_maintenance_as_status_shows_it() -> None:
    log = Log()
    log.join(A)
    log.join(B)
    shown = short_id(A)
    assert shown != A
    for typed in (shown, shown.replace("…", "..."), A[:-2]):
        ok, msg = _run(log, MaintenanceNext(node_id=typed), LOCAL_OPERATOR)
        assert ok and msg.startswith(f"node {A}: "), msg
    ok, msg = _run(
        log,
        MaintenanceSchedule(in_ms=2 * HOUR, duration_ms=30 * MIN, node_id=shown),
        LOCAL_OPERATOR,
    )
    assert ok, msg
    assert A in log.state.open_window_by_node and B not in log.state.open_window_by_node
    scheduled = log.log[-1].event
    assert isinstance(scheduled, MaintenanceScheduled) and scheduled.node_id == A
    ok, msg = _run(log, MaintenanceCancel(node_id=shown), LOCAL_OPERATOR)
    assert ok and A not in log.state.open_window_by_node
    # Ambiguous: refused with the candidates, nothing scheduled.
    ok, msg = _run(
        log,
        MaintenanceSchedule(in_ms=2 * HOUR, duration_ms=30 * MIN, node_id="12D3KooWTestNode"),
        LOCAL_OPERATOR,
    )
    assert not ok and msg.startswith("node name 12D3KooWTestNode is ambiguous: it matches 2")
    assert not log.state.open_window_by_node


def test_a_removed_node_has_no_maintenance_and_is_told_so() -> None:
    log = Log()
    log.join(A)
    log.disconnect(A)
    log.emit(NodeRemoved(node_id=A, reason="gone"))
    ok, msg = _run(log, MaintenanceNext(node_id=A), LOCAL_OPERATOR)
    assert not ok and msg.startswith(f"node {A} is removed from this cluster: since ")
