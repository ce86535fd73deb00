"""Every onboarding/operating state and its message, from states built with real events."""

from __future__ import annotations

import pytest

from cluster.shared.apply import apply
from cluster.shared.events import (
    MASTER_ORIGIN,
    NO_RUNNERS_DIGEST,
    STOP_REASON_CHARS,
    DevshardPlaced,
    EpochStarted,
    Event,
    IndexedEvent,
    MaintenanceDrainStarted,
    MaintenanceFinished,
    MaintenanceScheduled,
    MaintenanceStarted,
    NodeConnected,
    NodeDisconnected,
    NodeHeartbeat,
    NodeStopping,
    RunnerSelfTestCompleted,
    SessionRequested,
    SlotAssignment,
)
from cluster.shared.humanize import (
    format_count,
    format_duration,
    format_relative,
    format_utc,
    plural,
    short_id,
)
from cluster.shared.node_status import (
    NORMAL_STATES,
    LogLevel,
    NodeState,
    node_status,
    node_statuses,
)
from cluster.shared.state import EMPTY_STATE, State

T0 = 1_709_647_200_000  # 2024-03-05 14:00:00 UTC
MIN = 60_000


class Log:
    """Builds a State by applying real indexed events, as the master and workers do."""

    def __init__(self) -> None:
        self.state: State = EMPTY_STATE
        self.seq: dict[str, int] = {}
        self.events: list[IndexedEvent] = []

    def add(self, origin: str, at_ms: int, event: Event) -> Log:
        seq = self.seq.get(origin, 0) + 1
        self.seq[origin] = seq
        ie = IndexedEvent(self.state.last_applied + 1, at_ms, origin, seq, event)
        self.state = apply(self.state, ie)
        self.events.append(ie)
        return self

    def master(self, at_ms: int, event: Event) -> Log:
        return self.add(MASTER_ORIGIN, at_ms, event)

    def joined(self, node: str, at_ms: int = T0) -> Log:
        return self.add(node, at_ms, NodeHeartbeat(node_id=node))

    def tested(self, node: str, passed: bool = True, reason: str = "", at_ms: int = T0) -> Log:
        ev = RunnerSelfTestCompleted(
            node_id=node, runner_kind="simulated", passed=passed, reason=reason
        )
        return self.add(node, at_ms, ev)

    def epoch(self, n: int, start_ms: int, end_ms: int) -> Log:
        return self.master(
            start_ms, EpochStarted(epoch=n, start_ms=start_ms, end_ms=end_ms, seed=7)
        )

    def placed(self, devshard: str, nodes: list[str], epoch: int, ends_ms: int) -> Log:
        session = f"s-{devshard}"
        self.master(
            T0, SessionRequested(session_id=session, slots=len(nodes), memory_per_slot_mb=512)
        )
        assignments = tuple(SlotAssignment(i, n) for i, n in enumerate(nodes))
        return self.master(
            T0,
            DevshardPlaced(
                devshard_id=devshard,
                session_id=session,
                epoch=epoch,
                assignments=assignments,
                ends_ms=ends_ms,
            ),
        )

    def scheduled(self, node: str, window: str, start_ms: int, duration_ms: int) -> Log:
        return self.master(
            T0,
            MaintenanceScheduled(
                window_id=window,
                node_id=node,
                start_ms=start_ms,
                duration_ms=duration_ms,
                requested_ms=T0,
                credit_spent_ms=duration_ms,
            ),
        )


def ready_node(node: str = "node-a") -> Log:
    return Log().joined(node).tested(node)


def far_future_log() -> Log:
    """What a master under the unbounded settings of old wrote: an epoch ending past int64
    (`epoch_length_ms = 2**63 - 1`), a window of 8e18 ms in progress and one starting in
    year ~285 million. Settings are bounded now; such a log must still render."""
    log = ready_node("node-a").joined("node-b").tested("node-b")
    log.epoch(1, T0, T0 + 2**63 - 1)
    log.scheduled("node-a", "w-1", T0, 8 * 10**18)
    log.master(T0, MaintenanceStarted(window_id="w-1", node_id="node-a"))
    return log.scheduled("node-b", "w-2", 9 * 10**18, MIN)


def test_connecting_when_unknown_to_state() -> None:
    st = node_status(EMPTY_STATE, "node-a", T0)
    assert st.status is NodeState.CONNECTING
    assert st.message.startswith("connecting")


def test_connecting_when_master_saw_the_connection_but_node_has_not_spoken() -> None:
    log = Log().master(T0, NodeConnected(node_id="node-a", addr="/ip4/127.0.0.1/tcp/1"))
    st = node_status(log.state, "node-a", T0)
    assert st.status is NodeState.CONNECTING
    assert st.message == "connecting: connected, waiting for its first event"


def test_catching_up_counts_events_behind() -> None:
    log = ready_node()
    st = node_status(log.state, "node-a", T0, events_behind=1204)
    assert st.status is NodeState.CATCHING_UP
    assert st.message == "catching up: 1,204 events behind"
    # A new worker that has not folded far enough to know itself yet is catching up too.
    st = node_status(EMPTY_STATE, "node-b", T0, events_behind=5000)
    assert st.message == "catching up: 5,000 events behind"


def test_small_lag_is_ordinary_delivery_not_catching_up() -> None:
    st = node_status(ready_node().state, "node-a", T0, events_behind=3)
    assert st.status is NodeState.WAITING_FOR_PLACEMENT


def test_self_testing_until_a_result_arrives() -> None:
    st = node_status(Log().joined("node-a").state, "node-a", T0)
    assert st.status is NodeState.SELF_TESTING
    assert st.message == "self-testing its runner"


def test_self_testing_again_after_a_hello_under_another_runner_setting() -> None:
    """The worker restarted with a changed setting: its passed test was of the old one, so
    it is self-testing (and placed nowhere new) until the new result, its slots still its."""
    log = Log().master(T0, NodeConnected(node_id="node-a", runner_digest="0" * 64))
    log.joined("node-a").add(
        "node-a",
        T0,
        RunnerSelfTestCompleted(
            node_id="node-a", runner_kind="simulated", passed=True, config_digest="0" * 64
        ),
    )
    log.epoch(7, T0, T0 + 10 * MIN).placed("ds-7-chat", ["node-a"], epoch=7, ends_ms=T0 + 10 * MIN)
    assert node_status(log.state, "node-a", T0).status is NodeState.SERVING
    log.master(T0 + MIN, NodeConnected(node_id="node-a", runner_digest="1" * 64))
    log.joined("node-a", T0 + MIN)
    st = node_status(log.state, "node-a", T0 + MIN)
    assert (st.status, st.message, st.slots) == (
        NodeState.SELF_TESTING,
        "self-testing its runner",
        1,
    )


def test_a_worker_without_runners_is_facts_only_not_self_testing() -> None:
    """`cluster worker --no-runners` runs no self-test: "self-testing" would wait forever
    (and count as onboarding). A result filed under its digest changes nothing either."""
    log = Log().master(T0, NodeConnected(node_id="node-a", runner_digest=NO_RUNNERS_DIGEST))
    log.joined("node-a")
    st = node_status(log.state, "node-a", T0)
    assert (st.status, st.message, st.log_level) == (
        NodeState.FACTS_ONLY,
        "facts only (runs no runners)",
        LogLevel.INFO,
    )
    assert NodeState.FACTS_ONLY in NORMAL_STATES
    log.add(
        "node-a",
        T0,
        RunnerSelfTestCompleted(
            node_id="node-a",
            runner_kind="simulated",
            passed=True,
            config_digest=NO_RUNNERS_DIGEST,
        ),
    )
    assert node_status(log.state, "node-a", T0).status is NodeState.FACTS_ONLY


def test_a_tested_node_restarted_without_runners_is_facts_only_and_loses_its_test() -> None:
    """Its passed test was of a runner it no longer runs: kept, the node stayed "serving" and
    placeable while nothing there served its slots."""
    log = Log().master(T0, NodeConnected(node_id="node-a", runner_digest="0" * 64))
    log.joined("node-a").add(
        "node-a",
        T0,
        RunnerSelfTestCompleted(
            node_id="node-a", runner_kind="simulated", passed=True, config_digest="0" * 64
        ),
    )
    log.epoch(7, T0, T0 + 10 * MIN).placed("ds-7-chat", ["node-a"], epoch=7, ends_ms=T0 + 10 * MIN)
    assert node_status(log.state, "node-a", T0).status is NodeState.SERVING
    log.master(T0 + MIN, NodeConnected(node_id="node-a", runner_digest=NO_RUNNERS_DIGEST))
    log.joined("node-a", T0 + MIN)
    assert log.state.nodes["node-a"].self_test is None
    st = node_status(log.state, "node-a", T0 + MIN)
    assert (st.status, st.slots) == (NodeState.FACTS_ONLY, 1)  # until the planner moves it


def test_test_failed_names_runner_and_reason() -> None:
    log = (
        Log()
        .joined("node-a")
        .tested("node-a", passed=False, reason="health probe timed out after 5s")
    )
    st = node_status(log.state, "node-a", T0)
    assert st.status is NodeState.TEST_FAILED
    assert st.message == "self-test of runner 'simulated' failed: health probe timed out after 5s"
    assert st.log_level is LogLevel.ERROR


def test_waiting_for_placement_says_when_the_next_epoch_starts() -> None:
    log = ready_node().epoch(1, T0, T0 + 10 * MIN)
    st = node_status(log.state, "node-a", T0 + 10 * MIN - (4 * MIN + 12_000))
    assert st.status is NodeState.WAITING_FOR_PLACEMENT
    assert st.message == "waiting for placement: next epoch in 4m 12s — safe to restart until then"


def test_waiting_before_any_epoch() -> None:
    st = node_status(ready_node().state, "node-a", T0)
    assert st.status is NodeState.WAITING_FOR_PLACEMENT
    assert "no epoch has started yet" in st.message


def test_serving_counts_slots_and_names_devshard() -> None:
    log = ready_node().epoch(7, T0, T0 + 10 * MIN)
    log.placed("ds-7-chat", ["node-a", "node-a"], epoch=7, ends_ms=T0 + 10 * MIN)
    st = node_status(log.state, "node-a", T0 + MIN)
    assert st.status is NodeState.SERVING
    assert st.message == "serving 2 slots of devshard ds-7-chat"
    assert st.slots == 2
    assert st.devshards == ("ds-7-chat",)


def test_serving_mentions_a_scheduled_window() -> None:
    log = ready_node().epoch(7, T0, T0 + 10 * MIN)
    log.placed("ds-1", ["node-a"], epoch=7, ends_ms=T0 + 10 * MIN)
    log.scheduled("node-a", "w-1", T0 + 125 * MIN, 30 * MIN)
    st = node_status(log.state, "node-a", T0)
    assert st.status is NodeState.SERVING
    assert st.message == (
        "serving 1 slot of devshard ds-1; maintenance scheduled at 16:05 UTC (in 2h 05m)"
    )
    assert st.window_id == "w-1"


def test_draining_counts_devshards_left_and_time_to_start() -> None:
    log = ready_node().epoch(7, T0, T0 + 10 * MIN)
    log.placed("ds-1", ["node-a"], epoch=7, ends_ms=T0 + 10 * MIN)
    log.placed("ds-2", ["node-a", "node-b"], epoch=7, ends_ms=T0 + 10 * MIN)
    log.scheduled("node-a", "w-1", T0 + 65 * MIN, 30 * MIN)
    log.master(T0, MaintenanceDrainStarted(window_id="w-1", node_id="node-a"))
    st = node_status(log.state, "node-a", T0)
    assert st.status is NodeState.DRAINING
    assert st.message == "draining: 2 devshards left, maintenance starts in 1h 05m"


def test_in_maintenance_until_end() -> None:
    log = ready_node().scheduled("node-a", "w-1", T0 + 5 * MIN, 25 * MIN)
    log.master(T0 + 5 * MIN, MaintenanceStarted(window_id="w-1", node_id="node-a"))
    st = node_status(log.state, "node-a", T0 + 5 * MIN)
    assert st.status is NodeState.MAINTENANCE
    assert st.message == "in maintenance until 14:30 UTC (in 25m)"


def test_in_maintenance_from_declared_start_even_before_planner_marks_it() -> None:
    # The one excuse rule: from start to end the node is in maintenance, planner or not.
    log = ready_node().scheduled("node-a", "w-1", T0 + 5 * MIN, 25 * MIN)
    st = node_status(log.state, "node-a", T0 + 6 * MIN)
    assert st.status is NodeState.MAINTENANCE


def test_quiet_node_in_maintenance_is_not_disconnected() -> None:
    log = ready_node().scheduled("node-a", "w-1", T0 + 5 * MIN, 25 * MIN)
    log.master(T0 + 5 * MIN, MaintenanceStarted(window_id="w-1", node_id="node-a"))
    log.master(T0 + 6 * MIN, NodeDisconnected(node_id="node-a", reason="no events", excused=True))
    st = node_status(log.state, "node-a", T0 + 10 * MIN)
    assert st.status is NodeState.MAINTENANCE
    assert st.log_level is LogLevel.INFO


def test_overrun_window_warns() -> None:
    log = ready_node().scheduled("node-a", "w-1", T0 + 5 * MIN, 25 * MIN)
    log.master(T0 + 5 * MIN, MaintenanceStarted(window_id="w-1", node_id="node-a"))
    st = node_status(log.state, "node-a", T0 + 33 * MIN)
    assert st.status is NodeState.MAINTENANCE_OVERRUN
    assert "14:30 UTC (3m ago)" in st.message
    assert st.log_level is LogLevel.WARNING


def test_finished_window_returns_to_normal() -> None:
    log = ready_node().scheduled("node-a", "w-1", T0 + 5 * MIN, 25 * MIN)
    log.master(T0 + 5 * MIN, MaintenanceStarted(window_id="w-1", node_id="node-a"))
    log.master(T0 + 20 * MIN, MaintenanceFinished(window_id="w-1", node_id="node-a", how="host"))
    st = node_status(log.state, "node-a", T0 + 21 * MIN)
    assert st.status is NodeState.WAITING_FOR_PLACEMENT
    assert st.window_id == ""


def test_disconnected_says_since_when_and_why() -> None:
    log = ready_node().master(
        T0, NodeDisconnected(node_id="node-a", reason="no events for 3 cycles")
    )
    st = node_status(log.state, "node-a", T0 + 3 * MIN)
    assert st.status is NodeState.DISCONNECTED
    assert st.message == "disconnected 3m ago: no events for 3 cycles"
    assert st.log_level is LogLevel.WARNING


def test_a_disconnected_node_that_speaks_again_rejoins() -> None:
    log = ready_node().master(T0, NodeDisconnected(node_id="node-a", reason="no events"))
    log.joined("node-a", T0 + MIN)
    assert node_status(log.state, "node-a", T0 + MIN).status is NodeState.WAITING_FOR_PLACEMENT


def stopping_node(placed: bool, reason: str = "cluster worker got SIGTERM") -> Log:
    """node-a joined under worker process b1, tested, maybe placed, then said goodbye (with
    the reason `cluster worker` gives by default)."""
    log = Log().master(T0, NodeConnected(node_id="node-a", boot_id="b1"))
    log.joined("node-a").tested("node-a").epoch(1, T0, T0 + 10 * MIN)
    if placed:
        log.placed("ds-1", ["node-a"], epoch=1, ends_ms=T0 + 10 * MIN)
    return log.add("node-a", T0, NodeStopping(node_id="node-a", boot_id="b1", reason=reason))


def test_a_node_whose_worker_said_goodbye_is_stopping_not_serving() -> None:
    # Its runners have stopped: "serving 1 slot" was false, and the slot goes at the disconnect.
    log = stopping_node(placed=True)
    idx = log.state.nodes["node-a"].stopping_idx
    st = node_status(log.state, "node-a", T0 + MIN)
    assert st.status is NodeState.STOPPING
    assert st.message == (
        f"stopping: its worker said goodbye at event index {idx} (cluster worker got SIGTERM); "
        "disconnected"
        " (unexcused) unless back within a few plan cycles; then its 1 slot (ds-1) is re-placed"
    )
    assert st.log_level is LogLevel.INFO
    assert (st.slots, st.devshards) == (1, ("ds-1",))  # still held on paper until then


def test_an_idle_node_whose_worker_said_goodbye_is_not_told_it_is_safe_to_restart() -> None:
    # "waiting for placement ... safe to restart" was wrong: it gets nothing new and forfeits
    # its epoch's reward unless back in time.
    st = node_status(stopping_node(placed=False).state, "node-a", T0 + MIN)
    assert st.status is NodeState.STOPPING
    assert "safe to restart" not in st.message
    assert st.message.endswith("unless back within a few plan cycles")


def test_a_stopping_nodes_status_quotes_its_workers_reason_clipped() -> None:
    # A worker may send a 4096-character reason: the status quoted all of it (a 77-line
    # `cluster status`), where the disconnect reason clips it to STOP_REASON_CHARS.
    st = node_status(stopping_node(placed=False, reason="y" * 4096).state, "node-a", T0 + MIN)
    assert st.status is NodeState.STOPPING
    assert "y" * STOP_REASON_CHARS not in st.message
    assert len(st.message) < STOP_REASON_CHARS + 200, len(st.message)


def test_a_stopping_node_in_its_maintenance_window_is_in_maintenance() -> None:
    log = stopping_node(placed=False).scheduled("node-a", "w-1", T0, 25 * MIN)
    log.master(T0, MaintenanceStarted(window_id="w-1", node_id="node-a"))
    assert node_status(log.state, "node-a", T0 + MIN).status is NodeState.MAINTENANCE


def test_a_stopping_node_back_or_disconnected_is_no_longer_stopping() -> None:
    back = stopping_node(placed=True)
    back.master(T0, NodeConnected(node_id="node-a", boot_id="b2"))  # a quick restart
    back.joined("node-a")
    assert node_status(back.state, "node-a", T0 + MIN).status is NodeState.SERVING
    gone = stopping_node(placed=True)
    gone.master(T0, NodeDisconnected(node_id="node-a", reason="stopped by its operator"))
    assert node_status(gone.state, "node-a", T0 + MIN).status is NodeState.DISCONNECTED


def test_only_failures_are_outside_the_normal_states() -> None:
    abnormal = {NodeState.TEST_FAILED, NodeState.DISCONNECTED, NodeState.MAINTENANCE_OVERRUN}
    assert abnormal | NORMAL_STATES == set(NodeState)
    assert abnormal.isdisjoint(NORMAL_STATES)


def test_every_normal_state_reached_above_is_info() -> None:
    """Walk a node through a normal join; every status on the way is INFO."""
    seen: list[tuple[NodeState, LogLevel]] = []
    log = Log().master(T0, NodeConnected(node_id="n"))
    seen.append(_level(log.state, T0))
    seen.append(_level(log.state, T0, behind=900))
    log.joined("n")
    seen.append(_level(log.state, T0))
    log.tested("n").epoch(1, T0, T0 + 10 * MIN)
    seen.append(_level(log.state, T0))
    log.placed("ds-1", ["n"], epoch=1, ends_ms=T0 + 10 * MIN)
    seen.append(_level(log.state, T0))
    log.scheduled("n", "w", T0 + 20 * MIN, 10 * MIN)
    log.master(T0, MaintenanceDrainStarted(window_id="w", node_id="n"))
    seen.append(_level(log.state, T0))
    log.master(T0 + 20 * MIN, MaintenanceStarted(window_id="w", node_id="n"))
    seen.append(_level(log.state, T0 + 20 * MIN))
    states = [s for s, _ in seen]
    assert states == [
        NodeState.CONNECTING,
        NodeState.CATCHING_UP,
        NodeState.SELF_TESTING,
        NodeState.WAITING_FOR_PLACEMENT,
        NodeState.SERVING,
        NodeState.DRAINING,
        NodeState.MAINTENANCE,
    ]
    assert all(level is LogLevel.INFO for _, level in seen)


def _level(state: State, now: int, behind: int | None = None) -> tuple[NodeState, LogLevel]:
    st = node_status(state, "n", now, events_behind=behind)
    return st.status, st.log_level


def test_node_statuses_covers_every_node_and_extra_ids_sorted() -> None:
    log = ready_node("node-b").joined("node-a")
    statuses = node_statuses(log.state, T0, extra_node_ids=["node-c"])
    assert [s.node_id for s in statuses] == ["node-a", "node-b", "node-c"]
    assert [s.status for s in statuses] == [
        NodeState.SELF_TESTING,
        NodeState.WAITING_FOR_PLACEMENT,
        NodeState.CONNECTING,
    ]


def test_format_times() -> None:
    assert format_utc(T0 + 30 * MIN, T0) == "14:30 UTC"
    assert format_utc(T0 + 30 * MIN + 15_000, T0) == "14:30:15 UTC"
    assert format_utc(T0 + 24 * 60 * MIN, T0) == "2024-03-06 14:00 UTC"
    assert format_count(1204) == "1,204"
    assert plural(1, "slot") == "1 slot"
    assert plural(2, "slot") == "2 slots"
    assert short_id("12D3KooWAbCdEfGhIjKlMnOpQrStUv") == "12D3Ko…QrStUv"
    assert short_id("node-a") == "node-a"


def test_times_no_date_can_show_are_shown_as_numbers() -> None:
    state = far_future_log().state
    a, b = node_statuses(state, T0 + MIN)
    assert a.status is NodeState.MAINTENANCE
    assert f"in maintenance until {T0 + 8 * 10**18} ms since 1970-01-01 UTC" in a.message
    assert "maintenance scheduled at 9000000000000000000 ms since 1970-01-01 UTC" in b.message


def test_format_utc_never_raises() -> None:
    """Times outside years 1..9999 (a log written under unbounded settings holds them) are
    shown as their number of ms, not a ValueError that takes status and metrics down."""
    far = "9000000000000000000 ms since 1970-01-01 UTC (after year 9999)"
    assert format_utc(9 * 10**18, T0) == far
    assert format_utc(-(2**63), T0).endswith("(before year 1)")
    assert format_utc(T0, 2**63 - 1) == "2024-03-05 14:00 UTC"  # "now" out of range too
    assert format_utc(253_402_300_799_999, T0) == "9999-12-31 23:59:59 UTC"
    assert format_utc(-62_135_596_800_000, T0) == "0001-01-01 00:00 UTC"


def test_log_level_maps_to_stdlib_logging() -> None:
    import logging

    assert LogLevel.INFO.number == logging.INFO
    assert LogLevel.WARNING.number == logging.WARNING
    assert LogLevel.ERROR.number == logging.ERROR


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0s"),
        (12_000, "12s"),
        (252_000, "4m 12s"),
        (245_000, "4m 05s"),
        (25 * MIN, "25m"),
        (65 * MIN, "1h 05m"),
        (27 * 60 * MIN, "1d 03h"),
        (-5, "0s"),
    ],
)
def test_format_duration(ms: int, text: str) -> None:
    assert format_duration(ms) == text


def test_format_relative() -> None:
    assert format_relative(T0 + MIN, T0) == "in 1m"
    assert format_relative(T0 - MIN, T0) == "1m ago"
    assert format_relative(T0 + 100, T0) == "now"
