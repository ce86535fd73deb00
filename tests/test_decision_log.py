"""What the master's log says of each decision it commits (`cluster.master.decision_log`).

The mapping is pure: each master event, with the State it was decided on, gives one line at
the level docs/operations.md lists; many events of one kind in one decision give one summary
line (their own lines at DEBUG), so an epoch turn at 10,000 nodes does not flood the log.
"""

from __future__ import annotations

import logging

import pytest
from planner_world import World, of_type, quick_config

from cluster.master import decision_log, server
from cluster.master.decision_log import (
    LIST_CAP,
    SUMMARY_ABOVE,
    LogLine,
    decision_lines,
    describe,
)
from cluster.master.planner import Planner
from cluster.shared.apply import apply
from cluster.shared.events import (
    MASTER_ORIGIN,
    NO_RUNNERS_DIGEST,
    DevshardFinalized,
    DevshardPlaced,
    EpochSettled,
    EpochStarted,
    Event,
    IndexedEvent,
    LateWorkSettled,
    MaintenanceCancelled,
    MaintenanceDrainStarted,
    MaintenanceFinished,
    MaintenanceOverrun,
    MaintenanceScheduled,
    MaintenanceStarted,
    NodeConnected,
    NodeDisconnected,
    NodeHeartbeat,
    NodePayout,
    NodeRemoved,
    RunnerSelfTestCompleted,
    SessionDeleted,
    SessionRequested,
    SessionUnplaced,
    SlotAssignment,
    WorkMissed,
    WorkReported,
)
from cluster.shared.state import EMPTY_STATE, State

T0 = 1_709_647_200_000  # 2024-03-05 14:00:00 UTC
MIN = 60_000
HOUR = 60 * MIN
INFO, WARNING, DEBUG = logging.INFO, logging.WARNING, logging.DEBUG


def _fold(*events: tuple[str, Event], at_ms: int = T0) -> State:
    state = EMPTY_STATE
    seqs: dict[str, int] = {}
    for origin, event in events:
        seqs[origin] = seqs.get(origin, 0) + 1
        state = apply(
            state, IndexedEvent(state.last_applied + 1, at_ms, origin, seqs[origin], event)
        )
    return state


def _m(event: Event) -> tuple[str, Event]:
    return (MASTER_ORIGIN, event)


def _ready(node: str) -> list[tuple[str, Event]]:
    """A node connected and self-tested (passed)."""
    test = RunnerSelfTestCompleted(node_id=node, runner_kind="simulated", passed=True)
    return [_m(NodeConnected(node_id=node, boot_id="boot-1")), (node, test)]


def _window(node: str = "node-a", start_ms: int = T0 + HOUR) -> MaintenanceScheduled:
    return MaintenanceScheduled(
        window_id="w-1",
        node_id=node,
        start_ms=start_ms,
        duration_ms=HOUR,
        requested_ms=T0,
        credit_spent_ms=HOUR,
    )


def _line(event: Event, state: State = EMPTY_STATE, now_ms: int = T0) -> LogLine:
    line = describe(event, state, now_ms)
    assert line is not None, event
    return line


# --------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------


def test_a_disconnect_is_a_warning_with_its_reason() -> None:
    state = _fold(*_ready("node-a"))
    line = _line(NodeDisconnected(node_id="node-a", reason="no events for 3 cycles (3s)"), state)
    assert line == LogLine(
        WARNING, "node node-a disconnected: no events for 3 cycles (3s); unexcused"
    )


def test_a_disconnect_says_what_the_node_loses() -> None:
    state = _fold(
        *_ready("node-a"),
        *_ready("node-b"),
        _m(EpochStarted(epoch=2, start_ms=T0, end_ms=T0 + HOUR, seed=1)),
        _m(SessionRequested(session_id="chat", slots=3, memory_per_slot_mb=1)),
        _m(_placed("chat", ["node-a", "node-b", "node-a"])),
    )
    line = _line(NodeDisconnected(node_id="node-a", reason="quiet"), state)
    assert line == LogLine(
        WARNING,
        "node node-a disconnected: quiet; unexcused: it forfeits its reward for epoch 2; "
        "its 2 slots (ds-2-chat) are re-placed",
    )


def test_a_disconnect_losing_one_slot_says_it_in_the_singular() -> None:
    state = _fold(
        *_ready("node-a"),
        _m(EpochStarted(epoch=2, start_ms=T0, end_ms=T0 + HOUR, seed=1)),
        _m(SessionRequested(session_id="chat", slots=1, memory_per_slot_mb=1)),
        _m(_placed("chat", ["node-a"])),
    )
    line = _line(NodeDisconnected(node_id="node-a", reason="quiet"), state)
    # It read "its 1 slot (ds-2-chat) are re-placed".
    assert line.message.endswith("; its 1 slot (ds-2-chat) is re-placed"), line.message


def test_a_disconnect_inside_its_maintenance_window_says_excused() -> None:
    """The one excuse rule decides: inside the window's time (here before the planner's
    MaintenanceStarted), the node is offline as planned."""
    state = _fold(*_ready("node-a"), _m(_window(start_ms=T0 - MIN)))
    line = _line(NodeDisconnected(node_id="node-a", reason="no events for 3 cycles"), state)
    assert line.level == WARNING
    assert line.message.endswith("in its maintenance window w-1: excused"), line.message
    # Outside the window's time the same disconnect is not excused.
    later = _line(NodeDisconnected(node_id="node-a", reason="x"), state, T0 + 2 * HOUR)
    assert "maintenance window" not in later.message and "unexcused" in later.message


def test_a_reason_from_the_log_cannot_forge_a_line() -> None:
    forged = "gone\n2024-03-05 14:00:00,000 INFO cluster.master.decisions: all fine"
    line = _line(NodeDisconnected(node_id="node-a", reason=forged), _fold(*_ready("node-a")))
    assert "\n" not in line.message and "\\n" in line.message


def test_a_first_join_a_reconnect_and_a_restart_read_differently() -> None:
    first = _line(NodeConnected(node_id="node-a", boot_id="boot-1"))
    assert first == LogLine(INFO, "node node-a joined the cluster (first connection)")
    state = _fold(*_ready("node-a"))
    redial = _line(NodeConnected(node_id="node-a", boot_id="boot-1"), state)
    assert redial.level == INFO and "dialled again" in redial.message
    restart = _line(NodeConnected(node_id="node-a", boot_id="boot-2"), state)
    assert restart.level == INFO and "its worker restarted" in restart.message
    gone = _fold(*_ready("node-a"), _m(NodeDisconnected(node_id="node-a", reason="quiet")))
    back = _line(NodeConnected(node_id="node-a", boot_id="boot-2"), gone, T0 + 5 * MIN)
    assert back == LogLine(INFO, "node node-a reconnected (5m after it was disconnected)")


def test_worker_events_are_not_narrated() -> None:
    for event in (
        NodeHeartbeat(node_id="node-a"),
        WorkReported(devshard_id="ds-1-s", node_id="node-a", units=3, epoch=1),
        RunnerSelfTestCompleted(node_id="node-a", runner_kind="simulated", passed=True),
    ):
        assert describe(event, EMPTY_STATE, T0) is None


# --------------------------------------------------------------------------------------------
# Maintenance
# --------------------------------------------------------------------------------------------


def test_maintenance_transitions_are_info_and_an_overrun_is_a_warning() -> None:
    state = _fold(*_ready("node-a"), _m(_window()))
    scheduled = _line(_window(), _fold(*_ready("node-a")))
    assert scheduled.level == INFO
    assert scheduled.message == (
        "maintenance scheduled for node node-a: window w-1, 1h 00m from 15:00 UTC "
        "(in 1h 00m) to 16:00 UTC"
    )
    drain = _line(MaintenanceDrainStarted(window_id="w-1", node_id="node-a"), state)
    assert drain.level == INFO and "draining" in drain.message and "15:00 UTC" in drain.message
    started = _line(MaintenanceStarted(window_id="w-1", node_id="node-a"), state, T0 + HOUR)
    assert started == LogLine(
        INFO, "node node-a in maintenance (window w-1) until 16:00 UTC (in 1h 00m): excused"
    )
    finished = _line(MaintenanceFinished(window_id="w-1", node_id="node-a", how="reconnect"))
    assert finished.level == INFO and "its worker restarted within the window" in finished.message
    cancelled = _line(
        MaintenanceCancelled(
            window_id="w-1", node_id="node-a", reason="host asked", credit_refund_ms=HOUR
        )
    )
    assert cancelled == LogLine(
        INFO,
        "maintenance window w-1 of node node-a cancelled: host asked; 1h 00m of credit refunded",
    )
    # Cancelled while draining: less than the window cost comes back, and the line says why.
    draining = _fold(
        *_ready("node-a"),
        _m(_window()),
        _m(MaintenanceDrainStarted(window_id="w-1", node_id="node-a")),
        at_ms=T0 + 50 * MIN,
    )
    cancelled_draining = _line(
        MaintenanceCancelled(
            window_id="w-1", node_id="node-a", reason="host asked", credit_refund_ms=50 * MIN
        ),
        draining,
        T0 + 52 * MIN,
    )
    assert cancelled_draining.message == (
        "maintenance window w-1 of node node-a cancelled: host asked; 50m of the 1h 00m of "
        "credit it cost refunded (its drain period, 10m, is charged)"
    )
    late = T0 + 2 * HOUR + 3 * MIN
    overrun = _line(MaintenanceOverrun(window_id="w-1", node_id="node-a"), state, late)
    assert overrun.level == WARNING
    assert overrun.message.startswith(
        "maintenance window w-1 of node node-a, due to end at 16:00 UTC (3m ago), overran"
    )


def test_an_overrun_says_disconnected_only_of_a_node_that_is() -> None:
    """An operator review found every overrun line ending "(still silent, it is
    disconnected)", also for a node back online and placed in the same cycle. Two nodes
    overrun in one planner cycle: A silent through its window (liveness disconnects it in
    that cycle), B heartbeating on."""
    cfg = quick_config()
    world = World()
    a, b = "node-a", "node-b"
    world.node(a)
    world.node(b)
    planner = Planner(cfg)
    duration = 10 * cfg.plan_interval_ms
    windows = {
        n: world.window(n, start_ms=world.now, duration_ms=duration, start=True) for n in (a, b)
    }
    end = world.now + duration
    lines: list[str] = []
    while not lines:
        world.tick(cfg.plan_interval_ms)
        world.heartbeat(b)
        before = world.state
        events = planner(before, world.now)
        world.master(events)
        planner.logged()
        if of_type(events, MaintenanceOverrun):
            assert world.now >= end
            lines = [ln.message for ln in decision_lines(events, before, world.now)]
    assert not world.state.nodes[a].connected and world.state.nodes[b].connected
    (over_a,) = [ln for ln in lines if ln.startswith(f"maintenance window {windows[a]} ")]
    (over_b,) = [ln for ln in lines if ln.startswith(f"maintenance window {windows[b]} ")]
    assert over_a.endswith("apply to the node again (still silent, it is disconnected)"), over_a
    assert over_b.endswith("normal liveness and penalties apply to the node again"), over_b
    assert any(ln.startswith(f"node {a} disconnected: no events for ") for ln in lines), lines


# --------------------------------------------------------------------------------------------
# Epochs, placement, settlement
# --------------------------------------------------------------------------------------------


def _placed(
    session: str, nodes: list[str], epoch: int = 2, reason: str = "epoch"
) -> DevshardPlaced:
    return DevshardPlaced(
        devshard_id=f"ds-{epoch}-{session}",
        session_id=session,
        epoch=epoch,
        assignments=tuple(SlotAssignment(i, n) for i, n in enumerate(nodes)),
        ends_ms=T0 + HOUR,
        reason=reason,
    )


def test_an_epoch_start_says_when_it_ends() -> None:
    line = _line(EpochStarted(epoch=4, start_ms=T0, end_ms=T0 + 10 * MIN, seed=1))
    assert line == LogLine(INFO, "epoch 4 started; it ends at 14:10 UTC (in 10m)")


def test_a_placement_names_nodes_with_their_slot_counts_capped() -> None:
    line = _line(_placed("chat", ["node-b", "node-a", "node-a"]))
    assert line == LogLine(
        INFO,
        "placed devshard ds-2-chat of session chat for epoch 2: 3 slots on 2 nodes: "
        "node-a (2), node-b (1)",
    )
    wide = _line(_placed("big", [f"node-{i:03d}" for i in range(40)], reason="replace"))
    assert wide.message.startswith("re-placed devshard ds-2-big")
    assert f"and {40 - LIST_CAP} more" in wide.message
    assert wide.message.count("node-") == LIST_CAP


def test_a_re_placement_that_places_nothing_says_the_devshard_lost_every_slot() -> None:
    state = _fold(
        *_ready("node-a"),
        _m(EpochStarted(epoch=2, start_ms=T0, end_ms=T0 + HOUR, seed=1)),
        _m(SessionRequested(session_id="chat", slots=1, memory_per_slot_mb=1)),
        _m(_placed("chat", ["node-a"])),
    )
    line = _line(_placed("chat", [], reason="replace"), state)
    # It read "re-placed devshard ds-2-chat of session chat for epoch 2: 0 slots".
    assert line == LogLine(
        INFO,
        "devshard ds-2-chat of session chat lost every slot in epoch 2: none could be "
        "re-placed (retried every planner cycle; the session's unplaced line says why)",
    )


def test_a_partial_re_placement_says_how_many_slots_are_left_open() -> None:
    state = _fold(
        *_ready("node-a"),
        _m(EpochStarted(epoch=2, start_ms=T0, end_ms=T0 + HOUR, seed=1)),
        _m(SessionRequested(session_id="chat", slots=3, memory_per_slot_mb=1)),
        _m(_placed("chat", ["node-a", "node-b", "node-c"])),
    )
    line = _line(_placed("chat", ["node-a", "node-a"], reason="replace"), state)
    assert line == LogLine(
        INFO,
        "re-placed devshard ds-2-chat of session chat for epoch 2: 2 slots on 1 node: "
        "node-a (2); 1 of its 3 slots unassigned",
    )


def test_an_unplaced_session_warns_once_then_reports_changes_at_info() -> None:
    state = _fold(
        *_ready("node-a"), _m(SessionRequested(session_id="s", slots=4, memory_per_slot_mb=1))
    )
    event = SessionUnplaced(session_id="s", epoch=3, reason="needs 4 slot(s): 1 eligible node")
    first = _line(event, state)
    assert first.level == WARNING and "session s unplaced in epoch 3: needs 4" in first.message
    said = _fold(
        *_ready("node-a"),
        _m(SessionRequested(session_id="s", slots=4, memory_per_slot_mb=1)),
        _m(event),
    )
    changed = SessionUnplaced(session_id="s", epoch=3, reason="needs 4 slot(s): 2 eligible")
    assert _line(changed, said).level == INFO
    # The next epoch's placement failing again is news again.
    assert _line(SessionUnplaced(session_id="s", epoch=4, reason="r"), said).level == WARNING


def test_an_unplaced_session_kept_out_by_a_window_points_at_it() -> None:
    """Nodes it fits are away on maintenance (the reason names their windows): the room
    comes back when they end, which the WARNING says instead of only "add nodes with room,
    or resize the session"."""
    state = _fold(
        *_ready("node-a"), _m(SessionRequested(session_id="s", slots=6, memory_per_slot_mb=1))
    )
    reason = (
        "needs 6 slot(s) of 1 MiB: 2 eligible node(s) offer 4 free slot(s); 1 node(s) draining, "
        "2 slot(s) away until window mw-node-a-9 of node node-a ends at 2024-03-05T16:00:00Z"
    )
    line = _line(SessionUnplaced(session_id="s", epoch=3, reason=reason), state)
    assert line.level == WARNING
    assert line.message == (
        f"session s unplaced in epoch 3: {reason}; it waits for the maintenance window(s) "
        "named to end, unless nodes with room are added or the session is resized"
    )
    plain = _line(SessionUnplaced(session_id="s", epoch=3, reason="needs 6 slot(s)"), state)
    assert plain.message.endswith("; add nodes with room, or resize the session")


def test_an_unplaced_session_while_nodes_are_still_joining_is_info() -> None:
    """A session created before any node joined (the demo's order) waits for capacity:
    normal onboarding, never a WARNING."""
    session = _m(SessionRequested(session_id="s", slots=2, memory_per_slot_mb=1))
    event = SessionUnplaced(session_id="s", epoch=1, reason="needs 2 slot(s): 0 eligible")
    assert _line(event, _fold(session)).level == INFO  # no node at all
    self_testing = _fold(session, *_ready("node-a"), _m(NodeConnected(node_id="node-b")))
    line = _line(event, self_testing)
    assert line.level == INFO and "nodes are still joining" in line.message


def test_facts_only_and_disconnected_nodes_are_not_still_joining() -> None:
    """Onboarding is a connected node with a self-test still to come. A facts-only node
    (`--no-runners`) never tests and a disconnected one is not joining: counted as joining,
    either turned every unplaced session's WARNING into INFO, the first for good."""
    session = _m(SessionRequested(session_id="s", slots=2, memory_per_slot_mb=1))
    event = SessionUnplaced(session_id="s", epoch=1, reason="needs 2 slot(s): 0 eligible")
    facts_only = _m(NodeConnected(node_id="node-b", runner_digest=NO_RUNNERS_DIGEST))
    for state in (
        _fold(session, facts_only),
        _fold(session, *_ready("node-a"), facts_only),
        _fold(
            session,
            _m(NodeConnected(node_id="node-a")),  # untested, then gone
            _m(NodeDisconnected(node_id="node-a", reason="no events for 3 cycles")),
        ),
        # Every node removed: nodes have joined, so no node at all is not onboarding then
        # (it said "(nodes are still joining)" at INFO for good).
        _fold(
            session,
            _m(NodeConnected(node_id="node-a")),
            _m(NodeDisconnected(node_id="node-a", reason="no events for 3 cycles")),
            _m(NodeRemoved(node_id="node-a")),
        ),
    ):
        line = _line(event, state)
        assert line.level == WARNING, line
        assert "still joining" not in line.message
    # A node with its test still to come, beside those, is onboarding.
    joining = _fold(session, facts_only, _m(NodeConnected(node_id="node-c")))
    assert _line(event, joining).level == INFO


def test_missed_work_is_a_warning_unless_excused() -> None:
    missed = WorkMissed(devshard_id="ds-2-s", node_id="node-a", epoch=2, count=2, reason="none")
    line = _line(missed)
    assert line == LogLine(
        WARNING, "node node-a missed work on devshard ds-2-s (epoch 2, 2 slots): none"
    )
    excused = WorkMissed(devshard_id="ds-2-s", node_id="node-a", epoch=2, excused=True)
    assert _line(excused).level == INFO


def test_a_settlement_counts_paid_and_punished_nodes() -> None:
    settled = EpochSettled(
        epoch=5,
        payouts=(
            NodePayout(node_id="node-a", units=10, reward=100, punished=False),
            NodePayout(node_id="node-b", units=5, reward=50, punished=False),
            NodePayout(node_id="node-c", units=0, reward=0, punished=True, reason="gone"),
        ),
    )
    assert _line(settled) == LogLine(
        INFO, "epoch 5 settled: 2 nodes paid 150 in all, 1 punished: node-c (gone)"
    )


def test_sessions_and_late_work_are_info() -> None:
    created = _line(SessionRequested(session_id="s", slots=2, memory_per_slot_mb=512, gpu=True))
    assert created.level == INFO and "session s created: 2 slots of 512 MiB with a GPU" in (
        created.message
    )
    assert _line(SessionDeleted(session_id="s")).level == INFO
    late = _line(LateWorkSettled(epoch=3, node_id="node-a", units=4, reward=40))
    assert late.level == INFO and "epoch 3" in late.message


# --------------------------------------------------------------------------------------------
# One decision: summaries
# --------------------------------------------------------------------------------------------


def test_an_epoch_turn_placing_many_devshards_is_one_info_line_with_details_at_debug() -> None:
    n = 1000
    events: list[Event] = [DevshardFinalized(devshard_id=f"ds-1-s{i}", epoch=1) for i in range(n)]
    events.append(EpochSettled(epoch=1, payouts=()))
    events.append(EpochStarted(epoch=2, start_ms=T0, end_ms=T0 + HOUR, seed=1))
    events += [_placed(f"s{i}", [f"node-{i % 50}"]) for i in range(n)]
    lines = decision_lines(events, EMPTY_STATE, T0)
    loud = [ln for ln in lines if ln.level >= INFO]
    assert [ln.message.split(":")[0] for ln in loud] == [
        "epoch 1 settled",
        "epoch 2 started; it ends at 15",
        "placed 1,000 devshards for epoch 2",
    ]
    assert "1,000 slots on 50 nodes" in loud[-1].message
    assert sum(ln.level == DEBUG and "placed devshard" in ln.message for ln in lines) == n


def test_a_few_placements_are_each_said_at_info() -> None:
    events: list[Event] = [_placed(f"s{i}", ["node-a"]) for i in range(SUMMARY_ABOVE)]
    lines = decision_lines(events, EMPTY_STATE, T0)
    assert [ln.level for ln in lines] == [INFO] * SUMMARY_ABOVE


@pytest.mark.parametrize(
    ("make", "level", "head"),
    [
        (
            lambda i: WorkMissed(devshard_id=f"ds-1-s{i}", node_id=f"node-{i}", epoch=1),
            WARNING,
            "work missed: 20 slots on 20 nodes: node-0, node-1",
        ),
        (
            lambda i: NodeDisconnected(node_id=f"node-{i:02d}", reason="no events for 3 cycles"),
            WARNING,
            "20 nodes disconnected at once: node-00, node-01",
        ),
        (
            lambda i: SessionUnplaced(session_id=f"s{i:02d}", epoch=1, reason="no room"),
            WARNING,
            "20 sessions unplaced in epoch 1: s00, s01",
        ),
        (
            lambda i: LateWorkSettled(epoch=1, node_id=f"node-{i}", units=2, reward=2),
            INFO,
            "late work settled for 20 nodes: 40 units",
        ),
    ],
)
def test_many_events_of_a_kind_are_summarized_at_the_worst_level(
    make: object, level: int, head: str
) -> None:
    assert callable(make)
    # Nodes connected and tested: an unplaced session is then a real shortage.
    state = _fold(*_ready("node-x"))
    lines = decision_lines([make(i) for i in range(20)], state, T0)
    assert lines[0].level == level and lines[0].message.startswith(head), lines[0]
    assert "and 15 more" in lines[0].message or "units" in lines[0].message
    assert all(ln.level == DEBUG for ln in lines[1:]) and len(lines) == 21


def test_excused_misses_alone_summarize_at_info() -> None:
    events: list[Event] = [
        WorkMissed(devshard_id="ds-1-s", node_id=f"node-{i}", epoch=1, excused=True)
        for i in range(SUMMARY_ABOVE + 1)
    ]
    lines = decision_lines(events, EMPTY_STATE, T0)
    assert lines[0].level == INFO and "(6 excused)" in lines[0].message


# --------------------------------------------------------------------------------------------
# Lines below the log's level are not built
# --------------------------------------------------------------------------------------------


def _mixed_decision() -> list[Event]:
    """An epoch turn's kinds, some summarized (details at DEBUG), some not."""
    events: list[Event] = [DevshardFinalized(devshard_id=f"ds-1-s{i}", epoch=1) for i in range(3)]
    events += [WorkMissed(devshard_id=f"ds-1-s{i}", node_id=f"node-{i}", epoch=1) for i in range(8)]
    events.append(EpochStarted(epoch=2, start_ms=T0, end_ms=T0 + HOUR, seed=1))
    events += [_placed(f"s{i}", [f"node-{i % 7}"]) for i in range(40)]
    events.append(NodeDisconnected(node_id="node-z", reason="silent"))
    return events


@pytest.mark.parametrize("floor", [INFO, WARNING, logging.ERROR])
def test_a_floor_leaves_out_exactly_the_lines_below_it(floor: int) -> None:
    events = _mixed_decision()
    everything = decision_lines(events, EMPTY_STATE, T0)
    assert {ln.level for ln in everything} == {DEBUG, INFO, WARNING}
    kept = decision_lines(events, EMPTY_STATE, T0, min_level=floor)
    assert kept == [ln for ln in everything if ln.level >= floor]


def test_with_debug_off_an_epoch_turn_builds_no_detail_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An epoch turn at 10,000 nodes built every devshard's DEBUG line even with DEBUG off
    (10-30 ms of the master's loop): the master's log now builds only what it takes."""
    built: list[str] = []
    real = decision_log._placed

    def counting(event: DevshardPlaced, c: decision_log._Context) -> str:
        built.append(event.devshard_id)
        return real(event, c)

    monkeypatch.setattr(decision_log, "_placed", counting)
    n = 200
    events: list[Event] = [_placed(f"s{i}", [f"node-{i % 9}"]) for i in range(n)]
    decisions = "cluster.master.decisions"

    caplog.set_level(INFO, logger=decisions)
    server._log_decision(events, EMPTY_STATE, T0)
    said = [r for r in caplog.records if r.name == decisions]
    assert [(r.levelno, r.getMessage().split(":")[0]) for r in said] == [
        (INFO, "placed 200 devshards for epoch 2")
    ]
    assert built == []

    caplog.clear()
    caplog.set_level(DEBUG, logger=decisions)
    server._log_decision(events, EMPTY_STATE, T0)
    said = [r for r in caplog.records if r.name == decisions]
    assert len(built) == n
    assert sum(r.levelno == DEBUG and "placed devshard" in r.getMessage() for r in said) == n
