"""The window lifecycle after scheduling: time-driven transitions, cancel, finish, reconnect,
the excuse and drain rules, the displayed status, and the cheats around them."""

from __future__ import annotations

import msgspec
from maintenance_log import HOUR, MIN, Log, node_id

from cluster.master import maintenance as mt
from cluster.shared.apply import apply
from cluster.shared.codec import (
    decode_event,
    decode_state,
    encode_event,
    encode_state,
    state_digest,
)
from cluster.shared.events import (
    MaintenanceCancelled,
    MaintenanceDrainStarted,
    MaintenanceFinished,
    MaintenanceOverrun,
    MaintenanceStarted,
)
from cluster.shared.excuse import is_excused, may_take_work
from cluster.shared.maintenance_policy import MaintenancePolicy
from cluster.shared.state import EMPTY_STATE, MaintenanceWindow, State, WindowState

A, B, C = (node_id(n) for n in range(1, 4))
OPERATOR = "12D3KooWKGJ9FFG1hRwr25njMwqkie1TmER523ekRHZLbrSrytoD"  # a real peer id
Status = mt.DisplayStatus


def cluster(policy: MaintenancePolicy | None = None) -> Log:
    log = Log(policy)
    for n in (A, B, C):
        log.join(n)
    return log


def window(log: Log, window_id: str) -> MaintenanceWindow:
    return log.state.windows[window_id]


def test_cycle_walks_the_lifecycle_at_exact_times() -> None:
    log = cluster()
    start = log.now + HOUR
    wid = log.schedule_ok(A, start, 30 * MIN)
    drain_at = start - log.policy.drain_lead_ms
    log.now = drain_at - 1
    assert log.cycle() == []
    log.now = drain_at
    assert log.cycle() == [MaintenanceDrainStarted(window_id=wid, node_id=A)]
    assert window(log, wid).state is WindowState.DRAINING
    assert window(log, wid).drain_started_ms == drain_at
    assert log.cycle() == []  # idempotent: nothing is due twice
    log.now = start - 1
    assert log.cycle() == []
    log.now = start
    assert log.cycle() == [MaintenanceStarted(window_id=wid, node_id=A)]
    assert window(log, wid).state is WindowState.ACTIVE
    log.now = start + 30 * MIN - 1
    assert log.cycle() == []
    log.now = start + 30 * MIN
    assert log.cycle() == [MaintenanceOverrun(window_id=wid, node_id=A)]
    closed = window(log, wid)
    assert (closed.state, closed.outcome, closed.closed_ms) == (
        WindowState.COMPLETED,
        "overrun",
        start + 30 * MIN,
    )
    assert A not in log.state.open_window_by_node
    assert log.cycle() == []


def test_cycle_orders_by_window_id_and_catches_up_after_a_master_pause() -> None:
    log = cluster(MaintenancePolicy(max_concurrent_capacity_share=1.0))
    start = log.now + HOUR
    w_b = log.schedule_ok(B, start, 30 * MIN)
    w_a = log.schedule_ok(A, start, 2 * HOUR)
    log.now = start + HOUR  # the master was down through the drain, the start and B's end
    events = log.cycle()
    expected: list[MaintenanceStarted | MaintenanceOverrun] = [
        MaintenanceStarted(window_id=w_a, node_id=A),
        MaintenanceStarted(window_id=w_b, node_id=B),
        MaintenanceOverrun(window_id=w_b, node_id=B),
    ]
    assert events == sorted(
        expected,
        key=lambda e: (e.window_id, type(e) is MaintenanceOverrun),
    )
    assert window(log, w_a).state is WindowState.ACTIVE
    assert window(log, w_b).outcome == "overrun"


def test_cancel_while_scheduled_refunds_all_credit() -> None:
    log = cluster()
    before = log.credit(A)
    wid = log.schedule_ok(A, log.now + HOUR, 90 * MIN)
    assert log.credit(A) == before - 90 * MIN
    out = log.cancel(A)
    assert out == MaintenanceCancelled(
        window_id=wid, node_id=A, reason="cancelled by host", credit_refund_ms=90 * MIN
    )
    assert log.credit(A) == before
    assert window(log, wid).state is WindowState.CANCELLED
    assert A not in log.state.open_window_by_node
    assert log.check(A, log.now + HOUR, 90 * MIN).allowed  # the node may schedule again


def test_cancel_while_draining_keeps_the_drain() -> None:
    log = cluster()
    before = log.credit(A)
    start = log.now + HOUR
    wid = log.schedule_ok(A, start, 30 * MIN)
    log.now = start - log.policy.drain_lead_ms
    log.cycle()
    log.now += 2 * MIN  # the drain is 10 minutes long whenever the host cancels inside it
    out = log.cancel(A, wid)
    assert isinstance(out, MaintenanceCancelled)
    assert out.credit_refund_ms == 20 * MIN
    assert log.credit(A) == before - 10 * MIN
    assert window(log, wid).credit_refund_ms == 20 * MIN


def test_cancel_due_drain_is_charged_even_before_the_cycle_marks_it() -> None:
    log = cluster()
    start = log.now + HOUR
    log.schedule_ok(A, start, 30 * MIN)
    log.now = start - 5 * MIN  # draining is due; the planner has not emitted it yet
    out = log.cancel(A)
    assert isinstance(out, MaintenanceCancelled) and out.credit_refund_ms == 20 * MIN


def test_cancel_once_active_is_refused_finish_instead() -> None:
    log = cluster()
    start = log.now + HOUR
    wid = log.schedule_ok(A, start, 30 * MIN)
    log.now = start  # even before the cycle marks it ACTIVE, the start time decides
    out = log.cancel(A)
    assert isinstance(out, mt.Rejection) and out.code == "already_active"
    assert "finish it instead" in out.message
    log.cycle()
    refused = log.cancel(A, wid)
    assert isinstance(refused, mt.Rejection) and refused.code == "already_active"
    assert window(log, wid).state is WindowState.ACTIVE


def test_cancel_is_refused_for_another_node_allowed_for_an_operator() -> None:
    log = cluster(MaintenancePolicy(operator_ids=(OPERATOR,)))
    wid = log.schedule_ok(A, log.now + HOUR, 30 * MIN)
    by_other = log.cancel(A, requester=B)
    assert isinstance(by_other, mt.Rejection) and by_other.code == "not_allowed"
    # B naming A's window as its own is refused too.
    wrong = log.cancel(B, wid)
    assert isinstance(wrong, mt.Rejection) and wrong.code == "not_allowed"
    assert A in wrong.message
    ok = log.cancel(A, requester=OPERATOR)
    assert isinstance(ok, MaintenanceCancelled) and ok.reason == f"cancelled by operator {OPERATOR}"


def test_cancel_without_a_window_or_twice() -> None:
    log = cluster()
    none = log.cancel(A)
    assert isinstance(none, mt.Rejection) and none.code == "no_window"
    unknown = log.cancel(A, "mw-nope")
    assert isinstance(unknown, mt.Rejection) and unknown.code == "unknown_window"
    wid = log.schedule_ok(A, log.now + HOUR, 30 * MIN)
    log.cancel(A)
    again = log.cancel(A, wid)
    assert isinstance(again, mt.Rejection) and again.code == "already_closed"
    assert "cancelled" in again.message


def test_finish_before_start_is_refused() -> None:
    log = cluster()
    start = log.now + HOUR
    wid = log.schedule_ok(A, start, 30 * MIN)
    out = log.finish(A)
    assert isinstance(out, mt.Rejection) and out.code == "not_started"
    assert "cancel it instead" in out.message
    log.now = start - 5 * MIN
    log.cycle()  # draining is not started either
    assert isinstance(log.finish(A, wid), mt.Rejection)
    assert window(log, wid).state is WindowState.DRAINING


def test_finish_early_then_double_finish_is_refused() -> None:
    log = cluster()
    start = log.now + HOUR
    wid = log.schedule_ok(A, start, HOUR)
    credit_after_scheduling = log.credit(A)
    log.now = start
    log.cycle()
    log.now = start + 20 * MIN
    out = log.finish(A)
    assert out == MaintenanceFinished(window_id=wid, node_id=A, how="host")
    win = window(log, wid)
    assert (win.state, win.outcome, win.closed_ms) == (
        WindowState.COMPLETED,
        "host",
        start + 20 * MIN,
    )
    assert log.credit(A) == credit_after_scheduling  # the declared window is what it cost
    twice = log.finish(A)
    assert isinstance(twice, mt.Rejection) and twice.code == "no_window"
    named = log.finish(A, wid)
    assert isinstance(named, mt.Rejection) and named.code == "already_closed"
    assert log.cycle() == []  # a finished window never overruns


def test_an_operators_finish_is_recorded_as_the_operators() -> None:
    """An operator review found a finish from the master's control socket recorded and
    logged as "finished by its host"; a cancel tells the two apart."""
    log = cluster()
    start = log.now + HOUR
    wid = log.schedule_ok(A, start, HOUR)
    log.now = start + MIN
    out = log.finish(A, requester=mt.LOCAL_OPERATOR)
    assert out == MaintenanceFinished(
        window_id=wid, node_id=A, how="operator", by=mt.LOCAL_OPERATOR
    )
    assert window(log, wid).outcome == "operator"


#: A MaintenanceFinished record (index 7) as logged before `by` existed.
OLD_FINISHED = (
    b"\x95\x07\xcf\x00\x00\x01\x8e\x0f \xed\x80\xa6master\x05\x84\xa4type"
    b"\xb3MaintenanceFinished\xa9window_id\xa3w-1\xa7node_id\xa6node-a\xa3how\xa4host"
)


def test_a_finish_recorded_before_by_existed_reads_and_encodes_as_then() -> None:
    ie = decode_event(OLD_FINISHED)
    assert ie.event == MaintenanceFinished(window_id="w-1", node_id="node-a", how="host")
    assert encode_event(ie) == OLD_FINISHED
    # A host's finish now is written exactly so; an operator's carries who.
    by_operator = msgspec.structs.replace(
        ie, event=MaintenanceFinished(window_id="w-1", node_id="node-a", how="operator", by="x")
    )
    assert decode_event(encode_event(by_operator)) == by_operator
    assert b"\xa2by\xa1x" in encode_event(by_operator)


def test_finish_before_the_cycle_marks_the_start() -> None:
    log = cluster()
    start = log.now + HOUR
    wid = log.schedule_ok(A, start, HOUR)
    log.now = start + MIN
    assert isinstance(log.finish(A), MaintenanceFinished)
    win = window(log, wid)
    assert win.state is WindowState.COMPLETED and win.started_ms == start


def test_finish_after_the_end_is_an_overrun() -> None:
    log = cluster()
    start = log.now + HOUR
    wid = log.schedule_ok(A, start, HOUR)
    log.now = start
    log.cycle()
    log.now = start + HOUR
    late = log.finish(A)
    assert isinstance(late, mt.Rejection) and late.code == "window_ended"
    assert log.cycle() == [MaintenanceOverrun(window_id=wid, node_id=A)]


def test_finish_for_another_node_is_refused() -> None:
    log = cluster()
    start = log.now + HOUR
    log.schedule_ok(A, start, HOUR)
    log.now = start
    log.cycle()
    out = log.finish(A, requester=B)
    assert isinstance(out, mt.Rejection) and out.code == "not_allowed"


def test_restarted_worker_finishes_its_window_by_reconnecting() -> None:
    log = cluster()
    log.epoch(1, length_ms=24 * HOUR)
    start = log.now + HOUR
    wid = log.schedule_ok(A, start, HOUR)
    # before the start: nothing to finish, even for a restarted worker
    assert mt.on_reconnect(log.state, A, "a-new-boot", log.now) is None
    log.now = start
    log.cycle()
    log.now += 5 * MIN
    gone = log.disconnect(A, reason="no events for 3 cycles")
    assert gone.excused  # offline for maintenance, not a failure
    assert mt.node_display_status(log.state, A, log.now) is Status.MAINTENANCE
    log.now += 10 * MIN
    log.reconnect(A, restarted=True)
    win = window(log, wid)
    assert (win.state, win.outcome) == (WindowState.COMPLETED, "reconnect")
    assert mt.node_display_status(log.state, A, log.now) is Status.ACTIVE
    assert may_take_work(log.state, A, log.now + HOUR)
    assert mt.on_reconnect(log.state, A, "a-new-boot", log.now) is None  # nothing left to finish
    # not punished for the planned absence
    assert log.state.ledgers[1].node(A).disconnect is None


def test_reconnect_after_the_end_does_not_finish() -> None:
    log = cluster()
    start = log.now + HOUR
    log.schedule_ok(A, start, HOUR)
    log.now = start + HOUR
    assert mt.on_reconnect(log.state, A, "a-new-boot", log.now) is None


def active_window_with_worker_up(log: Log) -> str:
    """A's window is ACTIVE for 2 h while its worker process stays up and keeps speaking
    (the operator has not rebooted yet)."""
    log.epoch(1, length_ms=24 * HOUR)
    start = log.now + HOUR
    wid = log.schedule_ok(A, start, 2 * HOUR)
    log.now = start
    log.cycle()
    for _ in range(5):
        log.now += MIN
        log.heartbeat(A)
    assert window(log, wid).state is WindowState.ACTIVE
    return wid


def assert_still_in_maintenance(log: Log, wid: str) -> None:
    assert window(log, wid).state is WindowState.ACTIVE
    assert mt.node_display_status(log.state, A, log.now) is Status.MAINTENANCE
    assert is_excused(log.state, A, log.now)
    assert not may_take_work(log.state, A, log.now + MIN)  # no slots while the host is away


def test_same_worker_redialling_during_its_window_does_not_finish_it() -> None:
    # A network blip: the same worker process says hello again. Its host may still be
    # in maintenance, so the window stays open and A's reboot later stays excused.
    log = cluster()
    wid = active_window_with_worker_up(log)
    log.now += MIN
    assert log.reconnect(A, restarted=False) is None
    assert_still_in_maintenance(log, wid)
    log.now += 10 * MIN
    gone = log.disconnect(A, reason="no events for 3 cycles")  # the planned reboot
    assert gone.excused
    # The host comes back: a new worker process, whose hello finishes the window.
    log.now += 10 * MIN
    done = log.reconnect(A, restarted=True)
    assert done == MaintenanceFinished(window_id=wid, node_id=A, how="reconnect")
    win = window(log, wid)
    assert (win.state, win.outcome) == (WindowState.COMPLETED, "reconnect")
    assert mt.node_display_status(log.state, A, log.now) is Status.ACTIVE
    assert log.state.ledgers[1].node(A).disconnect is None


def test_restarted_worker_that_never_went_quiet_finishes_its_window() -> None:
    # A worker restarted quickly enough that liveness never noticed: still a new process.
    log = cluster()
    wid = active_window_with_worker_up(log)
    assert log.reconnect(A, restarted=True) is not None
    assert (window(log, wid).state, window(log, wid).outcome) == (
        WindowState.COMPLETED,
        "reconnect",
    )


def test_master_restart_during_a_window_does_not_finish_it() -> None:
    # The master restarts: it rebuilds State from its log (a snapshot plus the tail), and
    # every worker, still the same process, says hello again.
    log = cluster()
    wid = active_window_with_worker_up(log)
    replayed: State = EMPTY_STATE
    for ie in log.log:
        replayed = apply(replayed, ie)
    from_snapshot = decode_state(encode_state(replayed))
    assert state_digest(from_snapshot) == state_digest(log.state)
    log.now += MIN
    for restarted_master_state in (replayed, from_snapshot):
        assert mt.on_reconnect(restarted_master_state, A, log.boot_id(A), log.now) is None
    for n in (A, B, C):
        log.reconnect(n, restarted=False)
    assert_still_in_maintenance(log, wid)
    # ... and the boot id the restarted master saw is still the one to compare against.
    assert mt.on_reconnect(log.state, A, "a-new-boot", log.now) is not None


def test_overrun_then_silence_is_penalised_as_usual() -> None:
    log = cluster()
    log.epoch(1, length_ms=24 * HOUR)
    start = log.now + HOUR
    log.schedule_ok(A, start, HOUR)
    log.now = start
    log.cycle()
    log.now += 30 * MIN
    assert is_excused(log.state, A, log.now)
    log.now = start + HOUR
    log.cycle()  # overrun
    assert not is_excused(log.state, A, log.now)
    log.now += MIN
    gone = log.disconnect(A)
    assert not gone.excused
    assert log.state.ledgers[1].nodes[A].disconnect == "stale"
    assert mt.node_display_status(log.state, A, log.now) is Status.DISCONNECTED


def test_excused_only_inside_the_window() -> None:
    log = cluster()
    start = log.now + HOUR
    log.schedule_ok(A, start, HOUR)
    assert not is_excused(log.state, A, start - 1)
    assert is_excused(log.state, A, start)  # even before the cycle emits MaintenanceStarted
    assert is_excused(log.state, A, start + HOUR - 1)
    assert not is_excused(log.state, A, start + HOUR)
    assert not is_excused(log.state, B, start)


def test_drain_rule_nothing_crosses_the_start() -> None:
    log = cluster()
    start = log.now + HOUR
    log.schedule_ok(A, start, HOUR)
    assert may_take_work(log.state, A, start)  # an epoch ending exactly at the start is fine
    assert not may_take_work(log.state, A, start + 1)
    assert may_take_work(log.state, B, start + HOUR)
    log.now = start
    log.cycle()
    assert not may_take_work(log.state, A, log.now + 1)
    log.now += MIN
    log.finish(A)
    assert may_take_work(log.state, A, log.now + HOUR)


def test_displayed_status_follows_the_window() -> None:
    log = cluster()
    start = log.now + HOUR
    log.schedule_ok(A, start, HOUR)
    assert mt.node_display_status(log.state, A, log.now) is Status.ACTIVE
    log.now = start - 5 * MIN
    log.cycle()
    assert mt.node_display_status(log.state, A, log.now) is Status.DRAINING
    log.now = start
    log.cycle()
    assert mt.node_display_status(log.state, A, log.now) is Status.MAINTENANCE
    log.disconnect(B)
    assert mt.node_display_status(log.state, B, log.now) is Status.DISCONNECTED
    try:
        mt.node_display_status(log.state, "12D3KooWNobody", log.now)
    except KeyError as exc:
        assert "not known" in str(exc)
    else:
        raise AssertionError("an unknown node has no status")


def test_cheat_cancel_and_reschedule_loop_to_dodge_placement_runs_out_of_credit() -> None:
    # Each round the host schedules a window that crosses the next epoch, lets draining
    # start (the planner then skips it), and cancels before the start. Every round costs the
    # whole drain, so the dodge stops when the credit is gone.
    policy = MaintenancePolicy(min_lead_ms=10 * MIN, credit_per_epoch_ms=0)
    log = cluster(policy)
    rounds = 0
    for _ in range(100):  # bounded; the credit must stop it long before
        start = log.now + 15 * MIN
        out = log.schedule(A, start, 30 * MIN)
        if isinstance(out, mt.ScheduleDecision):
            assert [r.code for r in out.reasons] == ["no_credit"]
            break
        log.now = start - policy.drain_lead_ms
        log.cycle()
        assert not may_take_work(log.state, A, log.now + 10 * MIN + 1)  # the epoch is dodged
        log.now += MIN
        cancelled = log.cancel(A)
        assert isinstance(cancelled, MaintenanceCancelled)
        assert cancelled.credit_refund_ms == 20 * MIN
        rounds += 1
        log.now += 10 * MIN
    else:
        raise AssertionError("the loop never ran out of credit")
    # 2h of initial credit, 10 minutes per round, a 30-minute window needs 30 minutes left.
    assert rounds == 10
    assert log.credit(A) == 20 * MIN


def test_scheduled_only_cancels_are_free_but_do_not_dodge_placement() -> None:
    log = cluster()
    before = log.credit(A)
    for _ in range(20):
        start = log.now + 2 * HOUR
        log.schedule_ok(A, start, 30 * MIN)
        # Well before draining, the next epoch (ending in 10 minutes) is still placed here.
        assert may_take_work(log.state, A, log.now + 10 * MIN)
        log.cancel(A)
        log.now += 10 * MIN
    assert log.credit(A) == before


def test_render_window_and_next() -> None:
    log = cluster()
    assert mt.render_next(log.state, A, log.now, log.policy) == (
        f"node {A}: no maintenance window scheduled; maintenance credit: 2h 00m"
    )
    start = log.now + HOUR
    wid = log.schedule_ok(A, start, 30 * MIN)
    assert mt.render_next(log.state, A, log.now, log.policy) == (
        f"node {A}: window {wid} (scheduled): 2027-01-15T09:00:00Z to 2027-01-15T09:30:00Z"
        " (30m), starts in 1h 00m; maintenance credit: 1h 30m"
    )
    log.now = start
    log.cycle()
    assert "(active)" in mt.render_next(log.state, A, log.now, log.policy)
    assert "ends in 30m" in mt.render_next(log.state, A, log.now, log.policy)
    log.finish(A)
    assert mt.render_window(window(log, wid), log.now).endswith(
        "closed (host) at 2027-01-15T09:00:00Z"
    )
    assert [w.window_id for w in mt.windows_of(log.state, A)] == [wid]
    assert mt.render_rejection(mt.Rejection("no_window", "x")) == "refused (no_window): x"
