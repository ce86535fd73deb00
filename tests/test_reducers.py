"""Each reducer, driven through the public `apply()` exactly as the log would drive it."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import event_logs

from cluster.shared.apply import REDUCERS, OutOfOrderError, apply, fold
from cluster.shared.codec import decode_state, encode_state
from cluster.shared.events import (
    EVENT_TYPES,
    MASTER_ORIGIN,
    DevshardFinalized,
    DevshardPlaced,
    EpochSettled,
    EpochStarted,
    Event,
    GpuInfo,
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
    NodeGatheredInfo,
    NodeHeartbeat,
    NodeInfo,
    NodePayout,
    RunnerSelfTestCompleted,
    RunnerStatus,
    RunnerStatusUpdated,
    SessionDeleted,
    SessionRequested,
    SessionUnplaced,
    SlotAssignment,
    WorkMissed,
    WorkReported,
)
from cluster.shared.reducers import maintenance as maintenance_reducers
from cluster.shared.state import (
    CLOSED_WINDOWS_KEPT_PER_NODE,
    EMPTY_STATE,
    LEDGER_EPOCHS_KEPT,
    State,
    WindowState,
)

A, B = "nodeA", "nodeB"
#: How `_close_window` may close a window.
CLOSES = ("cancel", "finish", "overrun")


class Log:
    """Builds a log the way the master does: consecutive indices, per-origin sequences."""

    def __init__(self) -> None:
        self.state = EMPTY_STATE
        self.events: list[IndexedEvent] = []
        self._seq: dict[str, int] = {}

    def add(self, origin: str, event: Event, at_ms: int = 1_000) -> State:
        seq = self._seq.get(origin, 0) + 1
        self._seq[origin] = seq
        ie = IndexedEvent(len(self.events) + 1, at_ms, origin, seq, event)
        self.events.append(ie)
        self.state = apply(self.state, ie)
        return self.state


def test_every_event_type_has_exactly_one_reducer() -> None:
    assert set(REDUCERS) == set(EVENT_TYPES)
    assert len(EVENT_TYPES) == len(set(EVENT_TYPES))


def test_out_of_order_index_raises_documented_error() -> None:
    log = Log()
    log.add(A, NodeHeartbeat(node_id=A))
    gap = IndexedEvent(3, 1, A, 2, NodeHeartbeat(node_id=A))
    with pytest.raises(OutOfOrderError) as err:
        apply(log.state, gap)
    assert (err.value.expected, err.value.got) == (2, 3)
    dup = IndexedEvent(1, 1, A, 1, NodeHeartbeat(node_id=A))
    with pytest.raises(OutOfOrderError) as err:
        fold(log.state, [dup])
    assert (err.value.expected, err.value.got) == (2, 1)
    assert log.state.last_applied == 1  # the caller's state is untouched


def test_heartbeat_registers_node_and_advances_its_index() -> None:
    log = Log()
    s = log.add(A, NodeHeartbeat(node_id=A), at_ms=5)
    assert s.nodes[A].connected and s.nodes[A].joined_idx == 1 and s.nodes[A].joined_ms == 5
    assert s.nodes[A].slot == 0  # the first node to join
    assert s.last_event_by_node.get(0) == (1, 1) and s.last_event_index(A) == 1
    log.add(MASTER_ORIGIN, EpochStarted(epoch=1, start_ms=0, end_ms=10, seed=1))
    s = log.add(A, NodeHeartbeat(node_id=A))
    assert s.last_event_by_node.get(0) == (3, 2) and s.last_event_index(A) == 3
    assert s.last_seq(A) == 2 and s.last_seq(MASTER_ORIGIN) == 1 and s.master_seq == 1
    assert MASTER_ORIGIN not in s.nodes
    assert s.last_event_index("unknown") == 0 and s.last_seq("unknown") == 0
    assert s.last_applied == 3


def test_nodes_take_dense_slots_in_join_order_and_keep_them() -> None:
    """A node's slot (where its marks live) is its number in join order, whether it joins by
    its own event or by the master's NodeConnected, and survives a disconnect and rejoin."""
    log = Log()
    log.add(A, NodeHeartbeat(node_id=A))
    log.add(MASTER_ORIGIN, NodeConnected(node_id=B))  # known before it speaks
    log.add(MASTER_ORIGIN, NodeDisconnected(node_id=A, reason="silent"))
    s = log.add(A, NodeHeartbeat(node_id=A))  # rejoins: same slot
    s = log.add("C", NodeHeartbeat(node_id="C"))
    assert [(n, s.nodes[n].slot) for n in (A, B, "C")] == [(A, 0), (B, 1), ("C", 2)]
    assert s.last_event_by_node.pairs() == [(4, 2), (0, 0), (5, 1)]
    assert s.last_event_index(B) == 0 and s.last_seq(B) == 0  # no event of its own yet
    s = log.add(B, NodeHeartbeat(node_id=B))
    assert s.last_event_index(B) == 6 and s.last_event_by_node.get(1) == (6, 1)
    assert fold(EMPTY_STATE, log.events) == s


def test_every_node_originated_event_advances_liveness() -> None:
    log = Log()
    log.add(A, NodeHeartbeat(node_id=A))
    s = log.add(A, RunnerStatusUpdated(runner_id="r", node_id=A, status=RunnerStatus.LOADING))
    assert s.last_event_index(A) == 2
    s = log.add(A, WorkReported(devshard_id="d", node_id=A, units=1, epoch=0))
    assert s.last_event_index(A) == 3


def test_reducers_that_replace_the_record_keep_its_marks() -> None:
    # apply() marks the origin's record before the reducer runs; a reducer that replaces
    # that record (info, self-test, a disconnect) must carry the marks over.
    log = Log()
    s = log.add(MASTER_ORIGIN, NodeConnected(node_id=A, addr="/ip4/127.0.0.1"))
    assert (s.last_event_index(A), s.last_seq(A)) == (0, 0)  # known, but not spoken yet
    s = log.add(A, NodeGatheredInfo(node_id=A, source="host", info=NodeInfo(hostname="h")))
    assert (s.nodes[A].info.hostname, s.last_event_index(A), s.last_seq(A)) == ("h", 2, 1)
    s = log.add(A, RunnerSelfTestCompleted(node_id=A, runner_kind="k", passed=True, reason=""))
    assert s.nodes[A].self_test is not None and (s.last_event_index(A), s.last_seq(A)) == (3, 2)
    s = log.add(A, NodeDisconnected(node_id=A, reason="shutting down"))
    assert not s.nodes[A].connected and (s.last_event_index(A), s.last_seq(A)) == (4, 3)
    s = log.add(MASTER_ORIGIN, NodeConnected(node_id=A, addr="/ip4/127.0.0.1"))
    assert s.nodes[A].joined_idx == 5 and (s.last_event_index(A), s.last_seq(A)) == (4, 3)


def test_info_merges_partial_sources() -> None:
    log = Log()
    log.add(A, NodeGatheredInfo(node_id=A, source="host", info=NodeInfo(hostname="h", slots=4)))
    gpu = GpuInfo(index=0, name="H100", uuid="u", memory_total_mb=80_000, memory_used_mb=0)
    s = log.add(A, NodeGatheredInfo(node_id=A, source="gpu", info=NodeInfo(gpus=(gpu,))))
    info = s.nodes[A].info
    assert (info.hostname, info.slots, info.gpus) == ("h", 4, (gpu,))
    s = log.add(A, NodeGatheredInfo(node_id=A, source="cpu", info=NodeInfo(cpu_percent=12.5)))
    whole = s.node_info(A)
    assert whole is not None and (whole.hostname, whole.cpu_percent) == ("h", 12.5)
    assert s.node_info("unknown") is None


def test_info_gauges_go_to_the_gauges_table_and_statics_to_the_record() -> None:
    log = Log()
    mem = NodeInfo(memory_total_mb=64_000, memory_available_mb=50_000)
    s1 = log.add(A, NodeGatheredInfo(node_id=A, source="memory", info=mem))
    rec = s1.nodes[A]
    # The record keeps the total; the gauge is in the table, by the node's slot.
    assert rec.info == NodeInfo(memory_total_mb=64_000)
    assert s1.node_gauges.reported(rec.slot) == {"memory_available_mb": 50_000}
    # Same total, new gauge: the record (and the nodes map) are left as they were.
    mem2 = NodeInfo(memory_total_mb=64_000, memory_available_mb=41_000)
    s2 = log.add(A, NodeGatheredInfo(node_id=A, source="memory", info=mem2))
    assert s2.nodes is s1.nodes and s2.node_info(A) == mem2
    # The earlier state still reads its own gauges (the table is persistent).
    assert s1.node_info(A) == mem
    # Every gauge, exactly, including a float percentage and an int64-sized counter.
    big = NodeInfo(
        cpu_percent=0.1 + 0.2,
        disk_free_mb=7,
        net_bytes_sent=2**63 - 1,
        net_bytes_recv=0,
    )
    s3 = log.add(A, NodeGatheredInfo(node_id=A, source="all", info=big))
    whole = s3.node_info(A)
    assert whole is not None and whole.cpu_percent == 0.1 + 0.2
    assert (whole.disk_free_mb, whole.net_bytes_sent, whole.net_bytes_recv) == (7, 2**63 - 1, 0)
    assert whole.memory_available_mb == 41_000  # not in this report: kept


def test_info_about_another_node_and_through_fold() -> None:
    # The reducer path (an event about another node, and `fold`) splits reports the same way.
    log = Log()
    log.add(A, NodeHeartbeat(node_id=A))
    report = NodeInfo(hostname="a", cpu_percent=3.0)
    s = log.add(B, NodeGatheredInfo(node_id=A, source="proxy", info=report))
    assert s.nodes[A].info == NodeInfo(hostname="a") and s.node_info(A) == report
    assert fold(EMPTY_STATE, log.events) == s


def test_disconnect_then_speaking_again_rejoins() -> None:
    log = Log()
    log.add(A, NodeHeartbeat(node_id=A))
    s = log.add(MASTER_ORIGIN, NodeDisconnected(node_id=A, reason="no events for 3 cycles"), 7)
    rec = s.nodes[A]
    assert not rec.connected and rec.disconnected_reason == "no events for 3 cycles"
    assert rec.disconnected_ms == 7
    s = log.add(A, NodeHeartbeat(node_id=A), at_ms=9)
    assert s.nodes[A].connected and s.nodes[A].joined_idx == 3 and s.nodes[A].joined_ms == 9


def test_unexcused_disconnect_is_recorded_against_the_epoch() -> None:
    log = Log()
    log.add(MASTER_ORIGIN, EpochStarted(epoch=4, start_ms=0, end_ms=100, seed=9))
    log.add(A, NodeHeartbeat(node_id=A))
    log.add(B, NodeHeartbeat(node_id=B))
    log.add(MASTER_ORIGIN, NodeDisconnected(node_id=A, reason="killed"))
    s = log.add(MASTER_ORIGIN, NodeDisconnected(node_id=B, reason="maint", excused=True))
    accounts = s.ledgers[4].nodes.items()
    assert {n: a.disconnect for n, a in accounts if a.disconnect is not None} == {A: "killed"}


def test_node_connected_registers_and_self_test_is_recorded() -> None:
    log = Log()
    s = log.add(MASTER_ORIGIN, NodeConnected(node_id=A, addr="/ip4/127.0.0.1"))
    assert s.nodes[A].connected
    s = log.add(
        A,
        RunnerSelfTestCompleted(
            node_id=A, runner_kind="simulated", passed=False, reason="probe timed out", load_ms=3
        ),
        at_ms=50,
    )
    st = s.nodes[A].self_test
    assert st is not None and not st.passed and st.reason == "probe timed out" and st.at_ms == 50


def test_a_hello_from_a_connected_node_moves_only_its_hello_index_and_boot_id() -> None:
    log = Log()
    s = log.add(MASTER_ORIGIN, NodeConnected(node_id=A, boot_id="boot-1"), at_ms=10)
    first = s.nodes[A]
    assert (first.joined_idx, first.joined_ms, first.hello_idx, first.boot_id) == (
        1,
        10,
        1,
        "boot-1",
    )
    log.add(A, NodeHeartbeat(node_id=A), at_ms=20)
    # restarted, never gone
    s = log.add(MASTER_ORIGIN, NodeConnected(node_id=A, boot_id="boot-2"), at_ms=30)
    again = s.nodes[A]
    assert (again.joined_idx, again.joined_ms, again.hello_idx, again.boot_id) == (
        1,
        10,
        3,
        "boot-2",
    )
    assert again.connected
    s = log.add(MASTER_ORIGIN, NodeDisconnected(node_id=A, reason="stale"), at_ms=40)
    assert s.nodes[A].boot_id == "boot-2"  # the last hello's, until the next hello
    s = log.add(MASTER_ORIGIN, NodeConnected(node_id=A, boot_id="boot-3"), at_ms=50)
    assert s.nodes[A].connected and s.nodes[A].boot_id == "boot-3"


OLD_SETTING, NEW_SETTING = "d" * 64, "e" * 64


def _tested(log: Log, digest: str, *, passed: bool = True) -> State:
    return log.add(
        A,
        RunnerSelfTestCompleted(
            node_id=A, runner_kind="simulated", passed=passed, config_digest=digest
        ),
    )


def test_a_hello_under_another_runner_setting_drops_the_nodes_self_test() -> None:
    """The test was of a setting the worker no longer runs: the node is not self-tested
    until the new setting's result arrives (a connected node restarted, or a rejoin)."""
    log = Log()
    log.add(MASTER_ORIGIN, NodeConnected(node_id=A, boot_id="b1", runner_digest=OLD_SETTING))
    s = _tested(log, OLD_SETTING)
    assert s.nodes[A].self_test is not None
    s = log.add(MASTER_ORIGIN, NodeConnected(node_id=A, boot_id="b2", runner_digest=NEW_SETTING))
    assert s.nodes[A].self_test is None and s.nodes[A].runner_digest == NEW_SETTING
    s = _tested(log, NEW_SETTING)
    test = s.nodes[A].self_test
    assert test is not None and test.passed and test.config_digest == NEW_SETTING
    # The same after a disconnect: the rejoining hello drops a test of another setting.
    log.add(MASTER_ORIGIN, NodeDisconnected(node_id=A, reason="stale"))
    s = log.add(MASTER_ORIGIN, NodeConnected(node_id=A, boot_id="b3", runner_digest=OLD_SETTING))
    assert s.nodes[A].connected and s.nodes[A].self_test is None


@pytest.mark.parametrize("digest", [OLD_SETTING, ""], ids=["same setting", "no setting"])
def test_a_hello_under_the_same_setting_or_none_keeps_the_self_test(digest: str) -> None:
    """ "" is a worker without runners, or a log written before hellos named the setting:
    such a log folds exactly as it did."""
    log = Log()
    log.add(MASTER_ORIGIN, NodeConnected(node_id=A, boot_id="b1", runner_digest=OLD_SETTING))
    tested = _tested(log, OLD_SETTING, passed=False).nodes[A].self_test
    s = log.add(MASTER_ORIGIN, NodeConnected(node_id=A, boot_id="b2", runner_digest=digest))
    assert s.nodes[A].self_test == tested and s.nodes[A].runner_digest == digest


def test_a_self_test_of_a_setting_the_node_no_longer_runs_is_not_recorded() -> None:
    """An earlier worker process's result, sent from its outbox after the hello of a process
    with another setting, must not make the node eligible on a test of something else."""
    log = Log()
    log.add(MASTER_ORIGIN, NodeConnected(node_id=A, boot_id="b1", runner_digest=OLD_SETTING))
    log.add(MASTER_ORIGIN, NodeConnected(node_id=A, boot_id="b2", runner_digest=NEW_SETTING))
    s = _tested(log, OLD_SETTING)
    assert s.nodes[A].self_test is None
    assert s.last_event_index(A) == 3  # still the node's event: liveness moves
    s = _tested(log, NEW_SETTING)
    assert s.nodes[A].self_test is not None
    # Without a setting named (no runners, an older log), any result is recorded.
    log.add(MASTER_ORIGIN, NodeConnected(node_id=A, boot_id="b3"))
    s = _tested(log, OLD_SETTING, passed=False)
    test = s.nodes[A].self_test
    assert test is not None and test.config_digest == OLD_SETTING and not test.passed


def _on_slot(
    status: RunnerStatus, reason: str = "", node: str = A, slot: int = 0
) -> RunnerStatusUpdated:
    """A report on a slot (0 unless said) of `_placed_session`'s devshard (A holds 0, B 1)."""
    return RunnerStatusUpdated(
        runner_id=f"ds-1-s1/{slot}",
        node_id=node,
        status=status,
        devshard_id="ds-1-s1",
        slot=slot,
        reason=reason,
    )


def test_runner_lifecycle_keeps_live_runners_only() -> None:
    log = Log()
    _placed_session(log)
    s = log.add(A, _on_slot(RunnerStatus.LOADING))
    assert s.runners["ds-1-s1/0"].status is RunnerStatus.LOADING
    s = log.add(A, _on_slot(RunnerStatus.FAILED, "exit code 3"))
    assert s.runners["ds-1-s1/0"].reason == "exit code 3"
    s = log.add(A, _on_slot(RunnerStatus.STOPPED))
    assert "ds-1-s1/0" not in s.runners


def test_only_a_slots_holder_creates_its_runner_record() -> None:
    """Any node could otherwise fill State with records of made-up runners, kept forever."""
    log = Log()
    _placed_session(log)
    made_up = RunnerStatusUpdated(
        runner_id="nowhere/0", node_id=A, status=RunnerStatus.RUNNING, devshard_id="nowhere"
    )
    unlabelled = RunnerStatusUpdated(runner_id="d/0", node_id=A, status=RunnerStatus.RUNNING)
    s = log.add(A, made_up)
    s = log.add(A, unlabelled)
    s = log.add(B, _on_slot(RunnerStatus.RUNNING, node=B))  # slot 0 is A's
    assert dict(s.runners) == {}
    assert s.last_event_index(B) == s.last_applied  # still liveness
    s = log.add(A, _on_slot(RunnerStatus.RUNNING))
    assert list(s.runners) == ["ds-1-s1/0"]


def test_a_finalized_devshard_takes_its_runner_records_with_it() -> None:
    """A runner whose node died never reports STOPPED: its record must not outlive its
    devshard (nor must a lost slot's old holder's)."""
    log = Log()
    _placed_session(log)
    log.add(A, _on_slot(RunnerStatus.RUNNING))
    log.add(B, _on_slot(RunnerStatus.FAILED, node=B, slot=1))
    # Slot 1 is lost and left unfilled; B's record of it stays until the devshard ends.
    s = _place(log, "ds-1-s1", 1, A, reason="replace")
    assert sorted(s.runners) == ["ds-1-s1/0", "ds-1-s1/1"]
    s = log.add(MASTER_ORIGIN, DevshardFinalized(devshard_id="ds-1-s1", epoch=1))
    assert dict(s.runners) == {}
    # A late report on the finalized devshard's runner does not bring its record back.
    s = log.add(A, _on_slot(RunnerStatus.STOPPING))
    assert dict(s.runners) == {}


def test_a_repeated_runner_report_keeps_when_the_status_changed() -> None:
    # updated_ms is when the status last changed: the planner's grace for a failed slot
    # counts from it, so a report repeated later must not restart that count.
    log = Log()
    _placed_session(log)
    failed = _on_slot(RunnerStatus.FAILED, "exit code 3")
    first = log.add(A, failed, at_ms=1_000)
    again = log.add(A, failed, at_ms=9_000)
    assert again.runners["ds-1-s1/0"] is first.runners["ds-1-s1/0"]
    assert again.runners["ds-1-s1/0"].updated_ms == 1_000
    # Any difference is a change: another reason moves it.
    s = log.add(A, msgspec.structs.replace(failed, reason="exit code 4"), at_ms=12_000)
    assert (s.runners["ds-1-s1/0"].reason, s.runners["ds-1-s1/0"].updated_ms) == (
        "exit code 4",
        12_000,
    )
    # The repeat still counts as the node's liveness (every node event does).
    assert s.last_event_index(A) == s.last_applied


def test_a_slots_former_holder_cannot_touch_the_new_holders_runner() -> None:
    log = Log()
    _placed_session(log)  # ds-1-s1: slot 0 on A, slot 1 on B
    rid = "ds-1-s1/1"

    def report(node: str, status: RunnerStatus) -> State:
        return log.add(
            node,
            RunnerStatusUpdated(
                runner_id=rid, node_id=node, status=status, devshard_id="ds-1-s1", slot=1
            ),
        )

    report(B, RunnerStatus.RUNNING)
    # B is lost; slot 1 moves to A and keeps its runner id.
    log.add(
        MASTER_ORIGIN,
        DevshardPlaced(
            devshard_id="ds-1-s1",
            session_id="s1",
            epoch=1,
            assignments=(SlotAssignment(0, A), SlotAssignment(1, A)),
            ends_ms=1_000,
            reason="replace",
        ),
    )
    s = report(A, RunnerStatus.LOADING)  # the new holder takes the record over
    assert (s.runners[rid].node_id, s.runners[rid].status) == (A, RunnerStatus.LOADING)
    # B comes back and stops its own copy: A's record stays as it is.
    s = report(B, RunnerStatus.STOPPING)
    s = report(B, RunnerStatus.STOPPED)
    assert (s.runners[rid].node_id, s.runners[rid].status) == (A, RunnerStatus.LOADING)
    # The holder's own reports still count, its STOPPED included.
    s = report(A, RunnerStatus.STOPPED)
    assert rid not in s.runners


def test_a_node_cannot_take_over_another_slots_runner_by_quoting_its_own_slot() -> None:
    log = Log()
    _placed_session(log)  # ds-1-s1: slot 0 on A, slot 1 on B
    a_runner = "ds-1-s1/0"
    log.add(
        A,
        RunnerStatusUpdated(
            runner_id=a_runner,
            node_id=A,
            status=RunnerStatus.FAILED,
            devshard_id="ds-1-s1",
            slot=0,
            reason="exit code 3",
        ),
    )
    # B holds slot 1 and quotes it, but names slot 0's runner: neither a take-over nor a
    # delete may touch A's record (the planner re-places slot 0 from it).
    for status in (RunnerStatus.RUNNING, RunnerStatus.STOPPED):
        s = log.add(
            B,
            RunnerStatusUpdated(
                runner_id=a_runner, node_id=B, status=status, devshard_id="ds-1-s1", slot=1
            ),
        )
        held = s.runners[a_runner]
        assert (held.node_id, held.status, held.slot) == (A, RunnerStatus.FAILED, 0)


def _placed_session(log: Log) -> None:
    log.add(MASTER_ORIGIN, EpochStarted(epoch=1, start_ms=0, end_ms=1_000, seed=5))
    log.add(
        MASTER_ORIGIN,
        SessionRequested(session_id="s1", slots=2, memory_per_slot_mb=1024, reward_per_unit=3),
    )
    log.add(
        MASTER_ORIGIN,
        DevshardPlaced(
            devshard_id="ds-1-s1",
            session_id="s1",
            epoch=1,
            assignments=(SlotAssignment(0, A), SlotAssignment(1, B)),
            ends_ms=1_000,
        ),
    )


def _place(log: Log, devshard_id: str, epoch: int, *holders: str, reason: str = "epoch") -> State:
    """Place `devshard_id` in `epoch` with slot i on `holders[i]` (session "s1", rate 1,
    requested if it is not yet): the placement that lets their work count."""
    if "s1" not in log.state.sessions:
        log.add(MASTER_ORIGIN, SessionRequested(session_id="s1", slots=8, memory_per_slot_mb=1))
    return log.add(
        MASTER_ORIGIN,
        DevshardPlaced(
            devshard_id=devshard_id,
            session_id="s1",
            epoch=epoch,
            assignments=tuple(SlotAssignment(slot, n) for slot, n in enumerate(holders)),
            ends_ms=1_000,
            reason=reason,
        ),
    )


def test_sessions_devshards_and_stickiness() -> None:
    log = Log()
    _placed_session(log)
    s = log.state
    assert s.devshard_by_session["s1"] == "ds-1-s1"
    assert s.devshards["ds-1-s1"].assignments[1].node_id == B
    s = log.add(
        MASTER_ORIGIN,
        DevshardPlaced(
            devshard_id="ds-1-s1",
            session_id="s1",
            epoch=1,
            assignments=(SlotAssignment(0, A), SlotAssignment(1, A)),
            ends_ms=1_000,
            reason="replace",
        ),
    )
    assert s.devshards["ds-1-s1"].reason == "replace"
    s = log.add(MASTER_ORIGIN, DevshardFinalized(devshard_id="ds-1-s1", epoch=1))
    assert "ds-1-s1" not in s.devshards and "s1" not in s.devshard_by_session
    # The node of each slot, not the set of nodes: A keeps both slots next epoch.
    assert s.last_nodes_by_session["s1"] == (A, A)
    s = log.add(
        MASTER_ORIGIN, SessionUnplaced(session_id="s1", epoch=2, reason="no room"), at_ms=5_000
    )
    unplaced = s.sessions["s1"]
    # When it was said, too: the planner restates counts alone at most once a minute.
    assert (unplaced.unplaced_reason, unplaced.unplaced_epoch, unplaced.unplaced_ms) == (
        "no room",
        2,
        5_000,
    )
    s = log.add(
        MASTER_ORIGIN,
        DevshardPlaced(
            devshard_id="ds-2-s1",
            session_id="s1",
            epoch=2,
            assignments=(SlotAssignment(0, A), SlotAssignment(1, A)),
            ends_ms=2_000,
        ),
    )
    placed = s.sessions["s1"]
    assert (placed.unplaced_reason, placed.unplaced_epoch, placed.unplaced_ms) == ("", -1, 0)
    s = log.add(MASTER_ORIGIN, SessionDeleted(session_id="s1"))
    assert "s1" not in s.sessions and "s1" not in s.last_nodes_by_session


def test_work_accrues_to_the_epoch_ledger_and_settles_at_the_end() -> None:
    log = Log()
    _placed_session(log)
    log.add(A, WorkReported(devshard_id="ds-1-s1", node_id=A, units=4, epoch=1))
    log.add(B, WorkReported(devshard_id="ds-1-s1", node_id=B, units=1, epoch=1))
    s = log.add(MASTER_ORIGIN, WorkMissed(devshard_id="ds-1-s1", node_id=B, epoch=1, count=2))
    log.add(MASTER_ORIGIN, WorkMissed(devshard_id="ds-1-s1", node_id=A, epoch=1, excused=True))
    ledger = log.state.ledgers[1]
    accounts = ledger.nodes
    assert {n: a.units for n, a in accounts.items() if a.units} == {A: 4, B: 1}
    assert {n: a.reward for n, a in accounts.items() if a.reward} == {A: 12, B: 3}  # rate 3
    # the excused miss is not counted
    assert {n: a.misses for n, a in accounts.items() if a.misses} == {B: 2}
    assert dict(accounts[A].units_by_devshard) == {"ds-1-s1": 4}
    assert dict(accounts[B].units_by_devshard) == {"ds-1-s1": 1}
    assert s.credit_ms_by_node.get(A) is None
    payouts = (
        NodePayout(node_id=A, units=4, reward=12, punished=False, credit_earned_ms=600),
        NodePayout(node_id=B, units=1, reward=0, punished=True, reason="2 misses"),
    )
    s = log.add(MASTER_ORIGIN, EpochSettled(epoch=1, payouts=payouts))
    payout = s.ledgers[1].nodes[B].payout
    assert s.ledgers[1].settled and payout is not None and payout.punished
    assert s.credit_ms_by_node[A] == 600
    # Work that arrives after settlement counts toward that epoch as late work.
    s = log.add(A, WorkReported(devshard_id="ds-1-s1", node_id=A, units=2, epoch=1))
    assert s.ledgers[1].nodes[A].late_units == 2 and s.ledgers[1].nodes[A].units == 4
    assert s.ledgers[1].nodes[A].late_reward == 6
    assert dict(s.ledgers[1].late_pending) == {A: 2}  # undecided until LateWorkSettled
    s = log.add(MASTER_ORIGIN, LateWorkSettled(epoch=1, node_id=A, units=2, reward=6))
    assert s.ledgers[1].nodes[A].late_paid == 6
    assert s.ledgers[1].nodes[A].late_settled_units == 2
    assert s.ledgers[1].nodes[A].late_decided_reward == 6
    assert dict(s.ledgers[1].late_pending) == {}
    # A decision covering fewer units than are pending (never one of the planner's, which
    # follow the state they read) marks its share of their worth decided, forfeited here.
    s = log.add(A, WorkReported(devshard_id="ds-1-s1", node_id=A, units=4, epoch=1))
    s = log.add(MASTER_ORIGIN, LateWorkSettled(epoch=1, node_id=A, units=1, reward=0))
    account = s.ledgers[1].nodes[A]
    assert (account.late_reward, account.late_paid, account.late_decided_reward) == (18, 6, 9)
    assert account.late_undecided == 3 and account.late_undecided_reward == 9
    s = log.add(MASTER_ORIGIN, LateWorkSettled(epoch=1, node_id=A, units=3, reward=9))
    assert s.ledgers[1].nodes[A].late_decided_reward == 18
    assert dict(s.ledgers[1].late_pending) == {}
    # Settling twice changes nothing.
    again = log.add(MASTER_ORIGIN, EpochSettled(epoch=1, payouts=()))
    assert again.ledgers[1] == s.ledgers[1]


def test_old_settled_ledgers_leave_state() -> None:
    """One ledger per epoch, kept forever, grew State by one per epoch (144 a day with
    10-minute epochs): only the last LEDGER_EPOCHS_KEPT epochs' settled ledgers stay."""
    log = Log()
    _placed_session(log)  # epoch 1, A and B hold ds-1-s1
    log.add(A, WorkReported(devshard_id="ds-1-s1", node_id=A, units=4, epoch=1))
    log.add(MASTER_ORIGIN, EpochSettled(epoch=1, payouts=()))
    for epoch in range(2, 101):
        log.add(
            MASTER_ORIGIN,
            EpochStarted(epoch=epoch, start_ms=1_000 * epoch, end_ms=1_000 * (epoch + 1), seed=1),
        )
        if epoch != 50:  # one epoch is never settled: its ledger stays
            log.add(MASTER_ORIGIN, EpochSettled(epoch=epoch, payouts=()))
        assert len(log.state.ledgers) <= LEDGER_EPOCHS_KEPT + 1
    assert sorted(log.state.ledgers) == [50, *range(101 - LEDGER_EPOCHS_KEPT, 101)]
    # Work naming a dropped epoch counts nowhere (its ledger is not brought back).
    s = log.add(A, WorkReported(devshard_id="ds-1-s1", node_id=A, units=4, epoch=1))
    assert 1 not in s.ledgers
    assert s.credit_ms_by_node == log.state.credit_ms_by_node


def test_work_and_misses_count_only_against_an_epoch_that_started() -> None:
    # A worker names the epoch itself: one naming a future epoch (2, before it starts) or
    # one that never will be (10**12) must not open a ledger -- the status view lists the
    # highest epochs, and work for the next epoch would be paid when it settles.
    log = Log()
    _placed_session(log)  # epoch 1 started
    before = log.state.ledgers
    for epoch in (0, 2, 10**12, 2**64 - 1):
        log.add(A, WorkReported(devshard_id="ds-1-s1", node_id=A, units=5, epoch=epoch))
        s = log.add(A, WorkMissed(devshard_id="ds-1-s1", node_id=B, epoch=epoch, count=3))
        assert s.ledgers == before
    s = log.add(MASTER_ORIGIN, EpochStarted(epoch=2, start_ms=1_000, end_ms=2_000, seed=6))
    assert s.ledgers[2].nodes.get(A) is None  # nothing was held back for epoch 2
    _place(log, "ds-2-s1", 2, A, B)
    s = log.add(A, WorkReported(devshard_id="ds-2-s1", node_id=A, units=5, epoch=2))
    s = log.add(MASTER_ORIGIN, WorkMissed(devshard_id="ds-2-s1", node_id=B, epoch=2, count=3))
    assert (s.ledgers[2].nodes[A].units, s.ledgers[2].nodes[B].misses) == (5, 3)
    # The epoch before stays open to late work.
    s = log.add(A, WorkReported(devshard_id="ds-1-s1", node_id=A, units=1, epoch=1))
    assert s.ledgers[1].nodes[A].units == 1


def test_work_counts_only_from_a_node_that_held_a_slot_of_the_devshard() -> None:
    C = "nodeC"
    log = Log()
    _placed_session(log)  # "ds-1-s1" of epoch 1: slot 0 on A, slot 1 on B
    before = log.state.ledgers
    for node_id, devshard_id in ((C, "ds-1-s1"), (C, "made-up"), (A, "made-up")):
        s = log.add(
            node_id, WorkReported(devshard_id=devshard_id, node_id=node_id, units=9, epoch=1)
        )
        assert s.ledgers == before, (node_id, devshard_id)
    # B's slot moves to C: both have held it this epoch, and both are paid for their work.
    s = _place(log, "ds-1-s1", 1, A, C, reason="replace")
    held = {node: dict(devshards) for node, devshards in s.ledgers[1].held_devshards.items()}
    assert held == {A: {"ds-1-s1": 1_000}, B: {"ds-1-s1": 1_000}, C: {"ds-1-s1": 1_000}}
    log.add(B, WorkReported(devshard_id="ds-1-s1", node_id=B, units=2, epoch=1))
    s = log.add(C, WorkReported(devshard_id="ds-1-s1", node_id=C, units=3, epoch=1))
    assert {n: (a.units, a.reward) for n, a in s.ledgers[1].nodes.items()} == {
        B: (2, 6),
        C: (3, 9),
    }
    # Holding a slot of epoch 1's devshard gives no claim on another epoch.
    s = log.add(MASTER_ORIGIN, EpochStarted(epoch=2, start_ms=1_000, end_ms=2_000, seed=6))
    s = log.add(A, WorkReported(devshard_id="ds-1-s1", node_id=A, units=9, epoch=2))
    assert s.ledgers[2].nodes.get(A) is None


def _schedule(log: Log, window_id: str = "w1", credit: int = 60_000) -> State:
    return log.add(
        A,
        MaintenanceScheduled(
            window_id=window_id,
            node_id=A,
            start_ms=10_000,
            duration_ms=60_000,
            requested_ms=1_000,
            credit_spent_ms=credit,
        ),
    )


def test_window_lifecycle_finish() -> None:
    log = Log()
    s = _schedule(log)
    assert s.windows["w1"].state is WindowState.SCHEDULED and s.open_window_by_node[A] == "w1"
    assert s.credit_ms_by_node[A] == -60_000
    s = log.add(MASTER_ORIGIN, MaintenanceDrainStarted(window_id="w1", node_id=A), at_ms=5_000)
    assert (
        s.windows["w1"].state is WindowState.DRAINING and s.windows["w1"].drain_started_ms == 5_000
    )
    s = log.add(MASTER_ORIGIN, MaintenanceStarted(window_id="w1", node_id=A), at_ms=10_000)
    assert s.windows["w1"].state is WindowState.ACTIVE
    # Cancel once active is ignored (the master refuses it before it reaches the log).
    s2 = log.add(A, MaintenanceCancelled(window_id="w1", node_id=A))
    assert s2.windows["w1"].state is WindowState.ACTIVE
    s = log.add(A, MaintenanceFinished(window_id="w1", node_id=A, how="reconnect"), at_ms=20_000)
    win = s.windows["w1"]
    assert (win.state, win.outcome, win.closed_ms) == (WindowState.COMPLETED, "reconnect", 20_000)
    assert A not in s.open_window_by_node


def test_window_overrun_and_cancel_refund() -> None:
    log = Log()
    _schedule(log)
    log.add(MASTER_ORIGIN, MaintenanceStarted(window_id="w1", node_id=A))
    s = log.add(MASTER_ORIGIN, MaintenanceOverrun(window_id="w1", node_id=A), at_ms=70_000)
    assert s.windows["w1"].outcome == "overrun" and A not in s.open_window_by_node
    s = _schedule(log, "w2", credit=1_000)
    assert s.credit_ms_by_node[A] == -61_000
    s = log.add(A, MaintenanceCancelled(window_id="w2", node_id=A, credit_refund_ms=1_000))
    assert s.windows["w2"].state is WindowState.CANCELLED
    assert s.credit_ms_by_node[A] == -60_000
    # Finishing a cancelled window, or another node's window, changes nothing.
    before = s.windows
    s = log.add(B, MaintenanceFinished(window_id="w2", node_id=B, how="host"))
    assert s.windows == before


def test_second_pending_window_for_a_node_is_ignored() -> None:
    log = Log()
    _schedule(log, "w1")
    s = _schedule(log, "w2")
    assert "w2" not in s.windows and s.open_window_by_node[A] == "w1"


def _close_window(log: Log, node: str, window_id: str, how: str) -> State:
    """Schedule `window_id` for `node` (60 s of credit) and close it: "cancel" refunds all
    of it, "finish" and "overrun" keep it."""
    log.add(
        node,
        MaintenanceScheduled(
            window_id=window_id,
            node_id=node,
            start_ms=10_000,
            duration_ms=60_000,
            requested_ms=1_000,
            credit_spent_ms=60_000,
        ),
    )
    if how == "cancel":
        return log.add(
            node, MaintenanceCancelled(window_id=window_id, node_id=node, credit_refund_ms=60_000)
        )
    log.add(MASTER_ORIGIN, MaintenanceStarted(window_id=window_id, node_id=node), at_ms=10_000)
    if how == "finish":
        return log.add(
            node, MaintenanceFinished(window_id=window_id, node_id=node, how="host"), at_ms=20_000
        )
    return log.add(MASTER_ORIGIN, MaintenanceOverrun(window_id=window_id, node_id=node))


def _held_closed(state: State, node: str) -> list[str]:
    return sorted(
        w.window_id
        for w in state.windows.values()
        if w.node_id == node and w.state in (WindowState.COMPLETED, WindowState.CANCELLED)
    )


def _kept(closes: list[tuple[str, str]], cap: int) -> list[str]:
    """The closed windows a node keeps, by the rule written out plainly: after each close,
    while over the cap, drop the oldest cancelled window but the one just closed, else the
    oldest."""
    kept: list[tuple[str, str]] = []
    for window_id, how in closes:
        kept.append((window_id, how))
        while len(kept) > cap:
            older = kept[:-1]
            victim = next((k for k in older if k[1] == "cancel"), older[0])
            kept.remove(victim)
    return [window_id for window_id, _ in kept]


def test_a_schedule_cancel_loop_keeps_only_the_nodes_newest_closed_windows() -> None:
    """Cancelling a SCHEDULED window is free, so a loop of them must not grow State: a node
    keeps CLOSED_WINDOWS_KEPT_PER_NODE closed windows, its cancelled ones dropped first."""
    cap = CLOSED_WINDOWS_KEPT_PER_NODE
    log = Log()
    _close_window(log, B, "b-old", "cancel")
    rounds = 1_000
    closes: list[tuple[str, str]] = []
    for i in range(rounds):
        closes.append((f"w{i:04d}", "finish" if i % 10 == 0 else "cancel"))
        s = _close_window(log, A, *closes[-1])
        assert len(_held_closed(s, A)) == min(i + 1, cap)
    kept = _kept(closes, cap)
    assert s.closed_windows_by_node[A] == tuple(kept)
    assert _held_closed(s, A) == sorted(kept)
    # The newest completed ones and the cancelled one just closed.
    assert kept == [f"w{i:04d}" for i in range(850, 1_000, 10)] + ["w0999"]
    assert s.windows["w0990"].state is WindowState.COMPLETED
    assert s.windows["w0999"].state is WindowState.CANCELLED
    assert "w0000" not in s.windows
    # Another node's windows and every credit are untouched by the drops: only the 100
    # finished windows kept their credit.
    assert _held_closed(s, B) == ["b-old"]
    assert s.credit_ms_by_node[A] == -60_000 * (rounds // 10)
    assert s.credit_ms_by_node[B] == 0
    # An open window is never dropped, and the loop can go on from here.
    s = _schedule(log, "w-open")
    assert s.open_window_by_node[A] == "w-open" and len(s.windows) == cap + 2
    assert fold(EMPTY_STATE, log.events) == s
    assert decode_state(encode_state(s)) == s


@settings(max_examples=100, deadline=None)
@given(closes=st.lists(st.tuples(st.sampled_from([A, B]), st.sampled_from(CLOSES)), max_size=24))
def test_closed_windows_stay_indexed_and_capped(closes: list[tuple[str, str]]) -> None:
    """Under a small cap, after any mix of closes: each node holds exactly the closed windows
    the rule keeps (`_kept`), the index lists them in closing order, it encodes and decodes
    (the decoder checks the index), and `fold` agrees with `apply`."""
    cap = 3
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(maintenance_reducers, "CLOSED_WINDOWS_KEPT_PER_NODE", cap)
        log = Log()
        s = EMPTY_STATE
        closed: dict[str, list[tuple[str, str]]] = {A: [], B: []}
        for i, (node, how) in enumerate(closes):
            s = _close_window(log, node, f"w{i}", how)
            closed[node].append((f"w{i}", how))
        for node, windows in closed.items():
            assert s.closed_windows_by_node.get(node, ()) == tuple(_kept(windows, cap))
            assert _held_closed(s, node) == sorted(_kept(windows, cap))
        assert len(s.windows) == sum(min(len(ids), cap) for ids in closed.values())
        assert decode_state(encode_state(s)) == s
        assert fold(EMPTY_STATE, log.events) == s


def test_unexcused_disconnect_with_an_empty_reason_still_counts() -> None:
    log = Log()
    log.add(MASTER_ORIGIN, EpochStarted(epoch=4, start_ms=0, end_ms=100, seed=9))
    log.add(A, NodeHeartbeat(node_id=A))
    s = log.add(MASTER_ORIGIN, NodeDisconnected(node_id=A, reason=""))
    assert s.ledgers[4].nodes[A].disconnect == ""
    log.add(A, NodeHeartbeat(node_id=A))
    s = log.add(MASTER_ORIGIN, NodeDisconnected(node_id=A, reason="later"))
    assert s.ledgers[4].nodes[A].disconnect == ""  # the first one is kept


_ledger_nodes = st.sampled_from([A, B, "nodeC"])
_ledger_epochs = st.integers(1, 2)
#: Only the events that touch ledgers, so late work (after settlement) is frequent. Work
#: counts only on a devshard its node held: placements of session "s1" give it some.
_ledger_events = st.one_of(
    st.builds(
        DevshardPlaced,
        devshard_id=st.sampled_from(["d1", "d2"]),
        session_id=st.just("s1"),
        epoch=_ledger_epochs,
        assignments=st.lists(
            st.builds(SlotAssignment, slot=st.integers(0, 2), node_id=_ledger_nodes),
            min_size=1,
            max_size=3,
        ).map(tuple),
        ends_ms=st.just(1_000),
    ),
    st.builds(EpochSettled, epoch=_ledger_epochs, payouts=st.just(())),
    st.builds(
        WorkReported,
        devshard_id=st.sampled_from(["d1", "d2"]),
        node_id=_ledger_nodes,
        units=st.integers(-1, 9),
        epoch=_ledger_epochs,
    ),
    st.builds(
        LateWorkSettled,
        epoch=_ledger_epochs,
        node_id=_ledger_nodes,
        units=st.integers(0, 9),
        reward=st.integers(0, 9),
    ),
    st.builds(
        WorkMissed,
        devshard_id=st.just("d1"),
        node_id=_ledger_nodes,
        epoch=_ledger_epochs,
        count=st.integers(0, 3),
    ),
)


@settings(max_examples=200, deadline=None)
@given(events=st.lists(_ledger_events, max_size=40), log=event_logs(max_size=60))
def test_late_work_index_matches_the_node_accounts(
    events: list[Event], log: list[IndexedEvent]
) -> None:
    """`late_pending` lists exactly the nodes with undecided late units, after every event."""
    ledger_log = Log()
    session = SessionRequested(session_id="s1", slots=3, memory_per_slot_mb=1)
    states = [ledger_log.add(MASTER_ORIGIN, ev) for ev in (session, *events)]
    state = EMPTY_STATE
    for ie in log:
        state = apply(state, ie)
        states.append(state)
    for state in states:
        for ledger in state.ledgers.values():
            undecided = {
                n: a.late_undecided for n, a in ledger.nodes.items() if a.late_undecided > 0
            }
            assert dict(ledger.late_pending) == undecided


def test_late_work_index_follows_reports_and_decisions() -> None:
    log = Log()
    _place(log, "d1", 1, A)
    for ev in (
        EpochSettled(epoch=1, payouts=()),
        WorkReported(devshard_id="d1", node_id=A, units=3, epoch=1),
    ):
        s = log.add(MASTER_ORIGIN, ev)
    assert dict(s.ledgers[1].late_pending) == {A: 3}
    s = log.add(MASTER_ORIGIN, LateWorkSettled(epoch=1, node_id=A, units=1, reward=0))
    assert dict(s.ledgers[1].late_pending) == {A: 2}
    s = log.add(MASTER_ORIGIN, LateWorkSettled(epoch=1, node_id=A, units=4, reward=0))
    assert dict(s.ledgers[1].late_pending) == {}
    s = log.add(MASTER_ORIGIN, WorkReported(devshard_id="d1", node_id=A, units=3, epoch=1))
    assert dict(s.ledgers[1].late_pending) == {A: 1}  # 6 late units, 5 decided


def test_ledger_sums_saturate_so_state_stays_encodable() -> None:
    """A log may hold work amounts the master would refuse today (an older build, another
    writer): the ledger's sums stop at INT64_MAX instead of growing past what State can encode."""
    from cluster.shared.codec import decode_state, encode_state
    from cluster.shared.events import INT64_MAX

    log = Log()
    log.add(MASTER_ORIGIN, EpochStarted(epoch=1, start_ms=0, end_ms=10, seed=1))
    _place(log, "d", 1, A)
    huge = 2**64 - 1  # the largest int msgpack carries
    for _ in range(2):
        log.add(A, WorkReported(devshard_id="d", node_id=A, units=huge, epoch=1))
        log.add(A, WorkMissed(devshard_id="d", node_id=A, epoch=1, count=huge))
    account = log.state.ledgers[1].nodes[A]
    assert (account.units, account.reward, account.misses) == (INT64_MAX,) * 3
    assert dict(account.units_by_devshard) == {"d": INT64_MAX}
    log.add(MASTER_ORIGIN, EpochSettled(epoch=1, payouts=()))
    log.add(A, WorkReported(devshard_id="d", node_id=A, units=huge, epoch=1))
    log.add(A, WorkReported(devshard_id="d", node_id=A, units=3, epoch=1))
    late = log.state.ledgers[1].nodes[A]
    assert (late.late_units, late.late_reward) == (INT64_MAX, INT64_MAX)
    assert decode_state(encode_state(log.state)) == log.state
    # Below the cap nothing changes: the sums are exact.
    small = Log()
    small.add(MASTER_ORIGIN, EpochStarted(epoch=2, start_ms=0, end_ms=10, seed=1))
    _place(small, "d", 2, A)
    small.add(A, WorkReported(devshard_id="d", node_id=A, units=2**62, epoch=2))
    small.add(A, WorkReported(devshard_id="d", node_id=A, units=2**62 - 1, epoch=2))
    assert small.state.ledgers[2].nodes[A].units == INT64_MAX
