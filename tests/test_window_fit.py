"""A maintenance window the caps allow, but which leaves sessions unplaced while its node is
away, is answered with those sessions: `check` and `schedule` warn, never refuse
(`cluster.master.window_fit`). States are built from real events; nothing here networks."""

from __future__ import annotations

from pathlib import Path

import msgspec
from maintenance_log import HOUR, MIN, Log, node_id

from cluster.control import MaintenanceCheck, MaintenanceSchedule
from cluster.master import window_fit
from cluster.master.maintenance import default_window_id
from cluster.master.requests import decide
from cluster.shared.durations import format_time
from cluster.shared.events import (
    GpuInfo,
    MaintenanceScheduled,
    NodeConnected,
    NodeGatheredInfo,
    NodeInfo,
    RunnerSelfTestCompleted,
    SessionRequested,
)

A, B, C = node_id(1), node_id(2), node_id(3)
GPU = GpuInfo(index=0, name="H100", uuid="GPU-0", memory_total_mb=81_920, memory_used_mb=0)


def _cluster(*sessions: tuple[str, int, bool], gpu_on: str = "") -> Log:
    """Nodes A, B, C of 2 slots of 16 GiB each, connected and self-tested, and the
    sessions (id, slots, gpu) of 1 GiB per slot."""
    log = Log()
    for node in (A, B, C):
        log.emit(NodeConnected(node_id=node, boot_id=f"{node}-boot"))
        info = NodeInfo(slots=2, slot_memory_mb=16_384, gpus=(GPU,) if node == gpu_on else ())
        log.emit(NodeGatheredInfo(node_id=node, source="test", info=info), origin=node)
        test = RunnerSelfTestCompleted(node_id=node, runner_kind="simulated", passed=True)
        log.emit(test, origin=node)
    for session_id, slots, gpu in sessions:
        log.emit(
            SessionRequested(session_id=session_id, slots=slots, memory_per_slot_mb=1024, gpu=gpu)
        )
    return log


def _ask(log: Log, request: object, requester: str = A) -> tuple[bool, str, dict[str, object]]:
    d = decide(log.state, request, requester, log.now, log.policy)  # type: ignore[arg-type]
    for ev in d.events:
        log.emit(ev)
    return d.reply.ok, d.reply.message, d.reply.data


def test_a_window_that_takes_a_sessions_last_slots_is_allowed_with_a_warning() -> None:
    """The operator review's case: 3 nodes of 2 slots and a 6-slot session. The window is
    allowed (one node may always go), but the session would get no slot while the node is
    away (all or nothing): check and schedule say so, naming the session and why."""
    log = _cluster(("chat", 6, False))
    start, duration = log.now + 20 * MIN, 2 * HOUR
    wid = default_window_id(log.state, A)
    drain = start - log.policy.drain_lead_ms
    reason = (
        "needs 6 slot(s) of 1024 MiB: 2 eligible node(s) offer 4 free slot(s); 1 node(s) "
        f"draining, 2 slot(s) away until window {wid} of node {A} ends at "
        f"{format_time(start + duration)}"
    )
    warning = (
        f"warning: 1 session(s) would be unplaced while node {A} is away (new devshards get "
        "all their slots or none); the window is still allowed (one node of a cluster of two "
        "or more may always go): to keep them served, add nodes with room or resize them "
        f"first\n  - session chat from {format_time(drain)} (in 10m): {reason}"
    )
    ok, message, data = _ask(log, MaintenanceCheck(in_ms=20 * MIN, duration_ms=duration))
    assert ok and message.endswith(f"\nallowed\n{warning}"), message
    assert data["allowed"] is True
    assert data["unplaced_sessions"] == [{"session_id": "chat", "at_ms": drain, "reason": reason}]
    ok, message, data = _ask(log, MaintenanceSchedule(in_ms=20 * MIN, duration_ms=duration))
    assert ok and message.startswith(f"scheduled window {wid}: ") and message.endswith(warning)
    assert data["window_id"] == wid and len(data["unplaced_sessions"]) == 1  # type: ignore[arg-type]
    assert isinstance(log.log[-1].event, MaintenanceScheduled)


def test_no_warning_when_the_sessions_fit_without_the_node_or_never_fit() -> None:
    """A session the other nodes hold is not named, nor one unplaced with or without the
    window (the window is not what keeps it out)."""
    log = _cluster(("fits", 4, False), ("huge", 8, False))
    ok, message, data = _ask(log, MaintenanceCheck(in_ms=20 * MIN, duration_ms=HOUR))
    assert ok and message.endswith("\nallowed") and data["unplaced_sessions"] == []
    ok, message, data = _ask(log, MaintenanceSchedule(in_ms=20 * MIN, duration_ms=HOUR))
    assert ok and "warning" not in message and data["unplaced_sessions"] == []


def test_sessions_competing_for_the_room_left_are_placed_together() -> None:
    """Three 2-slot sessions each fit the 4 slots left alone, not all together: placement
    decides, as the planner would, so one is named."""
    log = _cluster(("s1", 2, False), ("s2", 2, False), ("s3", 2, False))
    window = MaintenanceScheduled(
        window_id="w",
        node_id=A,
        start_ms=log.now + 20 * MIN,
        duration_ms=HOUR,
        requested_ms=log.now,
        credit_spent_ms=HOUR,
    )
    short = window_fit.sessions_short(log.state, window, log.now, log.policy)
    assert len(short) == 1 and "needs 2 slot(s) of 1024 MiB" in short[0].reason


def test_gpu_fit_counts_not_just_slots() -> None:
    """Only A has a GPU: its window leaves the GPU session without a node it fits, though
    4 slots stay free; B's window leaves it alone."""
    log = _cluster(("gpu", 1, True), gpu_on=A)

    def short(node: str) -> tuple[window_fit.Shortfall, ...]:
        window = MaintenanceScheduled(
            window_id="w",
            node_id=node,
            start_ms=log.now + 20 * MIN,
            duration_ms=HOUR,
            requested_ms=log.now,
            credit_spent_ms=HOUR,
        )
        return window_fit.sessions_short(log.state, window, log.now, log.policy)

    (only,) = short(A)
    assert only.session_id == "gpu" and "with a GPU: 0 eligible node(s)" in only.reason
    assert short(B) == ()


def test_the_moment_another_window_joins_is_checked() -> None:
    """A 4-slot session fits while A alone is away; from the moment B's window (already
    scheduled, starting inside A's) drains too, it does not: named from that moment."""
    log = _cluster(("chat", 4, False))
    log.schedule_ok(B, log.now + 2 * HOUR, 30 * MIN)
    window = MaintenanceScheduled(
        window_id="w",
        node_id=A,
        start_ms=log.now + 20 * MIN,
        duration_ms=3 * HOUR,
        requested_ms=log.now,
        credit_spent_ms=3 * HOUR,
    )
    (only,) = window_fit.sessions_short(log.state, window, log.now, log.policy)
    assert only.at_ms == log.now + 2 * HOUR - log.policy.drain_lead_ms
    assert "needs 4 slot(s) of 1024 MiB: 1 eligible node(s) offer 2 free slot(s)" in only.reason
    # Alone (B's window ends before A's drains) it fits.
    later = msgspec.structs.replace(window, start_ms=log.now + 3 * HOUR)
    assert window_fit.sessions_short(log.state, later, log.now, log.policy) == ()


def test_the_maintenance_guide_shows_the_warning_word_for_word() -> None:
    doc = (Path(__file__).parents[1] / "docs" / "maintenance.md").read_text()
    start = doc.index("\nwindow for node 12D3KooWTestNode0001xyz: start 2027-01-15T08:20") + 1
    sample = doc[start : doc.index("```", start)]
    log = _cluster(("chat", 6, False))
    _, message, _ = _ask(log, MaintenanceCheck(in_ms=20 * MIN, duration_ms=2 * HOUR))
    assert sample == message + "\n"
