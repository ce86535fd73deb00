"""Scheduling rules (DESIGN section 5): every rejection, all reasons at once, the earliest
start that would pass, and the cheating attempts a host might try."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from maintenance_log import HOUR, MIN, T0, Log, node_id

from cluster.master import maintenance as mt
from cluster.shared.durations import format_time
from cluster.shared.events import (
    NO_RUNNERS_DIGEST,
    MaintenanceCancelled,
    MaintenanceScheduled,
    NodeConnected,
    NodeGatheredInfo,
    NodeInfo,
)
from cluster.shared.maintenance_policy import MaintenancePolicy
from cluster.shared.state import CLOSED_WINDOWS_KEPT_PER_NODE

A, B, C, D = (node_id(n) for n in range(1, 5))
OPERATOR = "12D3KooWKGJ9FFG1hRwr25njMwqkie1TmER523ekRHZLbrSrytoD"  # a real peer id


def cluster(*nodes: str, policy: MaintenancePolicy | None = None, slots: int = 4) -> Log:
    log = Log(policy)
    for n in nodes:
        log.join(n, slots=slots)
    return log


def codes(decision: mt.ScheduleDecision) -> list[str]:
    return [r.code for r in decision.reasons]


def test_allowed_window_is_scheduled_with_its_credit_and_a_deterministic_id() -> None:
    log = cluster(A, B, C)
    start = log.now + HOUR
    decision = log.check(A, start, 2 * HOUR)
    assert decision.allowed and decision.reasons == () and decision.earliest_start_ms == start
    out = log.schedule(A, start, 2 * HOUR)
    assert out == MaintenanceScheduled(
        window_id=f"mw-{A[-8:]}-{log.state.last_applied}",
        node_id=A,
        start_ms=start,
        duration_ms=2 * HOUR,
        requested_ms=T0,
        credit_spent_ms=2 * HOUR,
    )
    assert log.state.open_window_by_node[A] == out.window_id
    assert log.credit(A) == log.policy.initial_credit_ms - 2 * HOUR


def test_only_the_node_itself_or_an_operator_may_schedule() -> None:
    log = cluster(A, B, C, policy=MaintenancePolicy(operator_ids=(OPERATOR,)))
    start = log.now + HOUR
    cheat = log.schedule(A, start, HOUR, requester=B)
    assert isinstance(cheat, mt.ScheduleDecision)
    assert codes(cheat) == ["not_allowed"] and cheat.earliest_start_ms is None
    assert "only the node itself or an operator key" in cheat.reasons[0].message
    assert A not in log.state.open_window_by_node
    assert isinstance(log.schedule(A, start, HOUR, requester=OPERATOR), MaintenanceScheduled)


def test_unknown_node_is_refused() -> None:
    log = cluster(A, B)
    d = log.check(C, log.now + HOUR, HOUR)
    assert codes(d) == ["unknown_node"] and d.earliest_start_ms is None


def test_lead_time_gives_the_earliest_start() -> None:
    log = cluster(A, B)
    d = log.check(A, log.now + 5 * MIN, 30 * MIN)
    assert codes(d) == ["lead_time"]
    assert d.earliest_start_ms == log.now + 15 * MIN
    assert "at least 15m ahead (min_lead)" in d.reasons[0].message
    assert log.check(A, log.now + 15 * MIN, 30 * MIN).allowed
    past = log.check(A, log.now - MIN, 30 * MIN)
    assert "is in the past" in past.reasons[0].message


def test_too_far_ahead() -> None:
    log = cluster(A, B)
    d = log.check(A, log.now + 31 * 24 * HOUR, 30 * MIN)
    assert codes(d) == ["too_far_ahead"] and d.earliest_start_ms is None


@pytest.mark.parametrize(
    ("duration", "code"),
    [(0, "duration_zero"), (-MIN, "duration_zero"), (4 * HOUR + 1, "duration_too_long")],
)
def test_duration_zero_or_above_max(duration: int, code: str) -> None:
    log = cluster(A, B, policy=MaintenancePolicy(initial_credit_ms=8 * HOUR))
    d = log.check(A, log.now + HOUR, duration)
    assert codes(d) == [code] and d.earliest_start_ms is None
    assert log.check(A, log.now + HOUR, 4 * HOUR).allowed


def test_one_pending_window_per_node() -> None:
    log = cluster(A, B, C)
    first = log.schedule_ok(A, log.now + HOUR, 30 * MIN)
    d = log.check(A, log.now + 5 * HOUR, 30 * MIN)
    assert codes(d) == ["pending_window"] and d.earliest_start_ms is None
    assert first in d.reasons[0].message and "cancel or finish it first" in d.reasons[0].message


def test_lacking_credit() -> None:
    log = cluster(A, B, policy=MaintenancePolicy(initial_credit_ms=HOUR))
    d = log.check(A, log.now + HOUR, 90 * MIN)
    assert codes(d) == ["no_credit"] and d.earliest_start_ms is None
    assert "needs 1h 30m of maintenance credit, node has 1h 00m" in d.reasons[0].message
    assert log.check(A, log.now + HOUR, HOUR).allowed


def test_credit_is_earned_per_unpunished_epoch_up_to_the_cap() -> None:
    policy = MaintenancePolicy(
        initial_credit_ms=0, credit_per_epoch_ms=25 * MIN, credit_cap_ms=HOUR
    )
    log = cluster(A, B, policy=policy)
    assert log.credit(A) == 0
    earned = [log.earn(A, epoch) for epoch in range(1, 5)]
    assert earned == [25 * MIN, 25 * MIN, 10 * MIN, 0]
    assert log.credit(A) == HOUR
    log.schedule_ok(A, log.now + HOUR, 40 * MIN)
    assert log.credit(A) == 20 * MIN
    assert log.earn(A, 5) == 25 * MIN


def test_committed_devshard_ending_after_start_blocks_and_names_the_way_out() -> None:
    log = cluster(A, B, C)
    log.epoch(1)
    ends = log.now + 40 * MIN
    log.place("ds-1", A, ends_ms=ends)
    d = log.check(A, log.now + 20 * MIN, 30 * MIN)
    assert codes(d) == ["committed_work"]
    assert d.earliest_start_ms == ends
    assert "ds-1" in d.reasons[0].message and format_time(ends) in d.reasons[0].message
    # Other nodes' devshards do not matter, and work ending exactly at the start is fine.
    assert log.check(B, log.now + 20 * MIN, 30 * MIN).allowed
    assert log.check(A, ends, 30 * MIN).allowed
    # Once finalized, nothing is committed any more.
    log.finalize("ds-1")
    assert log.check(A, log.now + 20 * MIN, 30 * MIN).allowed


def test_cheat_window_hidden_inside_a_long_duration_over_committed_work() -> None:
    # The host tries to cover its committed devshard with a long window that starts before
    # the work ends, so the work's misses would be "excused". The devshard rule looks at the
    # start, not at whether the window ends after the work.
    log = cluster(A, B, C)
    log.epoch(1)
    log.place("ds-1", A, ends_ms=log.now + 40 * MIN)
    d = log.check(A, log.now + 15 * MIN, 4 * HOUR)
    assert "committed_work" in codes(d) and not d.allowed
    assert isinstance(log.schedule(A, log.now + 15 * MIN, 2 * HOUR), mt.ScheduleDecision)


def test_all_reasons_are_reported_at_once() -> None:
    log = cluster(A, B, policy=MaintenancePolicy(initial_credit_ms=HOUR))
    log.epoch(1)
    log.place("ds-1", A, ends_ms=log.now + 40 * MIN)
    d = log.check(A, log.now + 5 * MIN, 5 * HOUR, requester=B)
    assert codes(d) == [
        "not_allowed",
        "duration_too_long",
        "no_credit",
        "lead_time",
        "committed_work",
    ]
    assert d.earliest_start_ms is None  # the duration and permission cannot be fixed by waiting
    text = mt.render_decision(d)
    assert "refused for 5 reason(s)" in text and "no later start would pass" in text


def test_timed_reasons_together_give_one_earliest_start() -> None:
    log = cluster(A, B, C)
    log.epoch(1)
    log.place("ds-1", A, ends_ms=log.now + 40 * MIN)
    d = log.check(A, log.now + 5 * MIN, 30 * MIN)
    assert codes(d) == ["lead_time", "committed_work"]
    assert d.earliest_start_ms == log.now + 40 * MIN


def test_one_node_of_a_cluster_of_two_may_always_go_but_not_two() -> None:
    log = cluster(A, B)  # each node is 50% of capacity, over the 25% cap
    start = log.now + HOUR
    assert log.check(A, start, HOUR).allowed
    log.schedule_ok(A, start, HOUR)
    d = log.check(B, start + 30 * MIN, HOUR)
    assert codes(d) == ["capacity_cap"]
    assert "8 of the cluster's 8 slots" in d.reasons[0].message
    # B may drain only once A's window is over: A ends at start+1h, B drains 10m before.
    assert d.earliest_start_ms == start + HOUR + log.policy.drain_lead_ms
    assert log.check(B, d.earliest_start_ms, HOUR).allowed


def test_single_node_cluster_is_bound_by_the_capacity_cap() -> None:
    log = cluster(A)
    d = log.check(A, log.now + HOUR, HOUR)
    assert codes(d) == ["capacity_cap"] and d.earliest_start_ms is None
    solo = cluster(A, policy=MaintenancePolicy(max_concurrent_capacity_share=1.0))
    assert solo.check(A, solo.now + HOUR, HOUR).allowed


def test_drain_period_counts_as_away() -> None:
    log = cluster(A, B)
    start = log.now + HOUR
    log.schedule_ok(A, start, HOUR)
    # B's window starts 5 minutes after A's ends, but B would drain while A is away.
    d = log.check(B, start + HOUR + 5 * MIN, 30 * MIN)
    assert codes(d) == ["capacity_cap"]
    assert log.check(B, start + HOUR + 10 * MIN, 30 * MIN).allowed


def test_node_count_cap_and_earliest_start_across_a_chain_of_windows() -> None:
    policy = MaintenancePolicy(max_concurrent_nodes=1, max_concurrent_capacity_share=1.0)
    log = cluster(A, B, C, D, policy=policy)
    now = log.now
    log.schedule_ok(A, now + HOUR, HOUR)  # away (incl. drain) 0:50 - 2:00
    log.schedule_ok(B, now + 2 * HOUR + 10 * MIN, 50 * MIN)  # away 2:00 - 3:00
    d = log.check(C, now + 90 * MIN, 30 * MIN)
    assert codes(d) == ["node_cap"]
    assert A in d.reasons[0].message and "max_concurrent_nodes=1" in d.reasons[0].message
    # 2:10 would collide with B; the first free start is B's end + drain lead.
    assert d.earliest_start_ms == now + 3 * HOUR + 10 * MIN
    assert log.check(C, d.earliest_start_ms, 30 * MIN).allowed


def test_peaks_are_per_moment_not_the_sum_of_all_overlaps() -> None:
    # A and B are away at different times inside C's window: never two at once.
    policy = MaintenancePolicy(max_concurrent_nodes=2, max_concurrent_capacity_share=1.0)
    log = cluster(A, B, C, D, policy=policy)
    now = log.now
    log.schedule_ok(A, now + HOUR, 20 * MIN)  # away 0:50 - 1:20
    log.schedule_ok(B, now + 2 * HOUR, 20 * MIN)  # away 1:50 - 2:20
    assert log.check(C, now + HOUR, 2 * HOUR).allowed
    log.schedule_ok(C, now + HOUR, 2 * HOUR)
    d = log.check(D, now + HOUR, 2 * HOUR)
    assert codes(d) == ["node_cap"]


def test_the_peak_may_come_late_in_the_window() -> None:
    policy = MaintenancePolicy(max_concurrent_nodes=2, max_concurrent_capacity_share=1.0)
    log = cluster(A, B, C, D, policy=policy)
    now = log.now
    log.schedule_ok(A, now + HOUR, 2 * HOUR)  # away 0:50 - 3:00
    log.schedule_ok(B, now + 2 * HOUR, 20 * MIN)  # away 1:50 - 2:20: two away from 1:50
    d = log.check(C, now + HOUR, 2 * HOUR)
    assert codes(d) == ["node_cap"]
    assert format_time(now + 110 * MIN) in d.reasons[0].message
    assert log.check(C, now + HOUR, 40 * MIN).allowed  # back (1:40) before B drains


def test_capacity_share_counts_slots_not_nodes() -> None:
    policy = MaintenancePolicy(max_concurrent_capacity_share=0.5)
    log = Log(policy)
    log.join(A, slots=6)
    log.join(B, slots=2)
    log.join(C, slots=2)
    log.join(D, slots=10)  # 20 slots in all
    start = log.now + HOUR
    log.schedule_ok(A, start, HOUR)  # 6 of 20
    assert log.check(B, start, HOUR).allowed  # 8 of 20
    d = log.check(D, start, HOUR)  # 16 of 20 > 50%
    assert codes(d) == ["capacity_cap"] and "80%" in d.reasons[0].message


def test_capacity_peak_may_come_late_in_the_window() -> None:
    log = Log(MaintenancePolicy(max_concurrent_capacity_share=0.6))
    for n, slots in ((A, 4), (B, 4), (C, 4), (D, 8)):  # 20 slots; the cap is 12
        log.join(n, slots=slots)
    now = log.now
    log.schedule_ok(A, now + HOUR, 2 * HOUR)  # 4 slots away 0:50 - 3:00
    log.schedule_ok(B, now + 2 * HOUR, 20 * MIN)  # 4 more away 1:50 - 2:20
    d = log.check(D, now + HOUR, 2 * HOUR)  # 4 + 8 = 12 at first, 16 from 1:50
    assert codes(d) == ["capacity_cap"]
    assert "16 of the cluster's 20 slots" in d.reasons[0].message
    assert log.check(D, now + HOUR, 40 * MIN).allowed


def test_disconnected_nodes_without_a_window_are_not_cluster_capacity() -> None:
    log = cluster(A, B, C)
    log.disconnect(C)
    log.schedule_ok(A, log.now + HOUR, HOUR)
    assert codes(log.check(B, log.now + HOUR, HOUR)) == ["capacity_cap"]


def test_windows_of_nodes_offering_no_slots_take_no_capacity_away() -> None:
    # Identities minted with the cluster secret (malicious-member review): each may book a
    # window, but one that offers nothing placeable takes nothing away, so none of them
    # counts against the caps -- an honest node still gets the same window.
    policy = MaintenancePolicy(max_concurrent_nodes=1, max_concurrent_capacity_share=1.0)
    log = cluster(A, B, C, policy=policy)
    facts_only, untested, empty = (node_id(n) for n in (11, 12, 13))
    log.emit(NodeConnected(node_id=facts_only, boot_id="b", runner_digest=NO_RUNNERS_DIGEST))
    info = NodeGatheredInfo(node_id=facts_only, source="test", info=NodeInfo(slots=4))
    log.emit(info, origin=facts_only)
    log.join(untested, slots=4, self_tested=False)
    log.join(empty, slots=0)
    start = log.now + HOUR
    for sybil in (facts_only, untested, empty):
        log.schedule_ok(sybil, start, 2 * HOUR)
    log.schedule_ok(A, start, 2 * HOUR)
    d = log.check(B, start, 2 * HOUR)  # A does take capacity away: the cap still holds
    assert codes(d) == ["node_cap"] and A in d.reasons[0].message
    assert facts_only not in d.reasons[0].message


def test_window_of_a_disconnected_node_counts_only_while_it_excuses_the_node() -> None:
    policy = MaintenancePolicy(max_concurrent_nodes=1, max_concurrent_capacity_share=1.0)
    log = cluster(A, B, C, D, policy=policy)
    start = log.now + HOUR
    log.schedule_ok(D, start, 2 * HOUR)
    log.disconnect(D)  # gone before its window: its capacity is already away
    assert not log.state.nodes[D].connected
    assert log.check(A, start + 30 * MIN, HOUR).allowed
    # Once its window excuses it, the node is away *for* the window: it counts again.
    log.advance(HOUR)
    log.cycle()
    d = log.check(A, log.now + 30 * MIN, HOUR)
    assert codes(d) == ["node_cap"] and D in d.reasons[0].message


def test_race_for_the_last_slot_exactly_one_wins() -> None:
    # Two requests arrive together; the master decides them one at a time, applying the
    # winner's event before judging the next, so the second sees the first.
    log = cluster(A, B, C)
    start = log.now + HOUR
    before = log.state
    first = mt.schedule(before, A, A, start, HOUR, log.now, log.policy)
    second_alone = mt.schedule(before, B, B, start, HOUR, log.now, log.policy)
    assert isinstance(first, MaintenanceScheduled) and isinstance(
        second_alone, MaintenanceScheduled
    )
    log.emit(first)
    second = mt.schedule(log.state, B, B, start, HOUR, log.now, log.policy)
    assert isinstance(second, mt.ScheduleDecision) and codes(second) == ["capacity_cap"]
    assert dict(log.state.open_window_by_node) == {A: first.window_id}


def test_window_ids_are_unique_and_a_reused_one_is_refused() -> None:
    log = cluster(A, B, C, policy=MaintenancePolicy(max_concurrent_capacity_share=1.0))
    wa = log.schedule_ok(A, log.now + HOUR, HOUR)
    wb = log.schedule_ok(B, log.now + HOUR, HOUR)
    assert wa != wb
    dup = mt.schedule(log.state, C, C, log.now + HOUR, HOUR, log.now, log.policy, window_id=wa)
    assert isinstance(dup, mt.ScheduleDecision) and codes(dup) == ["duplicate_window_id"]


def test_a_dropped_windows_id_is_never_given_again() -> None:
    """State keeps only a node's last closed windows, so uniqueness cannot rest on
    `state.windows` alone: the master's ids name the log index, and a caller may not pick
    an id of the master's kind, such as a dropped window's."""
    log = cluster(A, B)
    ids = []
    for _ in range(CLOSED_WINDOWS_KEPT_PER_NODE + 5):
        ids.append(log.schedule_ok(A, log.now + HOUR, HOUR))
        assert isinstance(log.cancel(A), MaintenanceCancelled)
    assert len(set(ids)) == len(ids)
    first = ids[0]
    assert first not in log.state.windows  # dropped: the check below cannot rely on it
    reuse = mt.schedule(log.state, A, A, log.now + HOUR, HOUR, log.now, log.policy, first)
    assert isinstance(reuse, mt.ScheduleDecision) and codes(reuse) == ["duplicate_window_id"]
    assert "reserved for the ids the master makes" in reuse.reasons[0].message
    # A caller's own id is still its own to use.
    own = mt.schedule(log.state, A, A, log.now + HOUR, HOUR, log.now, log.policy, "ticket-7")
    assert isinstance(own, MaintenanceScheduled) and own.window_id == "ticket-7"
    assert log.credit(A) == log.policy.initial_credit_ms


def test_render_decision() -> None:
    log = cluster(A, B)
    ok = log.check(A, log.now + HOUR, 30 * MIN)
    assert mt.render_decision(ok) == (
        f"window for node {A}: start 2027-01-15T09:00:00Z (in 1h 00m), duration 30m\nallowed"
    )
    refused = log.check(A, log.now + 5 * MIN, 30 * MIN)
    text = mt.render_decision(refused)
    assert "refused for 1 reason(s):\n  - lead_time: " in text
    assert text.endswith("earliest start that would pass: 2027-01-15T08:15:00Z (in 15m)")


GRID = 5 * MIN


@settings(max_examples=100, deadline=None)
@given(
    others=st.lists(
        st.tuples(st.integers(3, 40), st.integers(1, 12)), min_size=0, max_size=4
    ),  # (start, duration) of other nodes' windows, in 5-minute steps
    devshard_end=st.integers(0, 20),
    start=st.integers(0, 30),
    duration=st.integers(1, 12),
    max_nodes=st.integers(1, 3),
    share=st.sampled_from([0.2, 0.5, 1.0]),
)
def test_earliest_start_passes_and_nothing_earlier_does(
    others: list[tuple[int, int]],
    devshard_end: int,
    start: int,
    duration: int,
    max_nodes: int,
    share: float,
) -> None:
    policy = MaintenancePolicy(
        max_concurrent_nodes=max_nodes,
        max_concurrent_capacity_share=share,
        initial_credit_ms=4 * HOUR,
        max_lead_ms=24 * HOUR,
    )
    nodes = [node_id(n) for n in range(1, 8)]
    log = cluster(*nodes, policy=policy)
    me = nodes[0]
    for i, (o_start, o_dur) in enumerate(others):
        # Built through the real rules: windows the master would have refused are skipped.
        log.schedule(nodes[i + 1], log.now + o_start * GRID, o_dur * GRID)
    if devshard_end:
        log.epoch(1)
        log.place("ds-me", me, ends_ms=log.now + devshard_end * GRID)
    d = log.check(me, log.now + start * GRID, duration * GRID)
    low = max(d.start_ms, log.now + policy.min_lead_ms)
    if d.allowed:
        assert d.earliest_start_ms == d.start_ms
        return
    assert d.earliest_start_ms is not None  # only timed rules can fail here
    assert log.check(me, d.earliest_start_ms, duration * GRID).allowed
    for t in range(low, d.earliest_start_ms, GRID):
        assert not log.check(me, t, duration * GRID).allowed, f"{t} passes earlier"
