"""Event-index staleness: exactly K idle cycles disconnect, any event of the node resets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from planner_world import World

from cluster.master.config import PlannerConfig
from cluster.master.liveness import (
    EMPTY_BOOK,
    LivenessBook,
    check_liveness,
)
from cluster.shared.events import (
    MASTER_ORIGIN,
    Event,
    MaintenanceFinished,
    MaintenanceOverrun,
    NodeConnected,
    NodeGatheredInfo,
    NodeHeartbeat,
    NodeInfo,
    RunnerStatus,
    RunnerStatusUpdated,
    WorkReported,
)

A, B = "12D3KooWnodeA", "12D3KooWnodeB"


def _cycle(world: World, book: LivenessBook, cfg: PlannerConfig) -> tuple[list[str], LivenessBook]:
    """Advance one interval, run liveness, apply its events; return who was disconnected."""
    world.tick(cfg.plan_interval_ms)
    events, book = check_liveness(world.state, book, world.now, cfg)
    world.master(events)
    return [e.node_id for e in events], book


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_fires_exactly_on_the_kth_idle_cycle(k: int) -> None:
    cfg = PlannerConfig(stale_cycles=k, fresh_idle_cycles=0)
    world = World()
    world.node(A)
    gone, book = _cycle(world, EMPTY_BOOK, cfg)  # first observation: never idle
    assert gone == []
    for idle in range(1, k):
        gone, book = _cycle(world, book, cfg)
        assert gone == [], f"disconnected after only {idle} idle cycle(s)"
        assert book.idle_cycles(A) == idle
    world.tick(cfg.plan_interval_ms)
    events, book = check_liveness(world.state, book, world.now, cfg)
    assert [e.node_id for e in events] == [A]
    assert not events[0].excused
    assert events[0].reason.startswith(f"no events for {k} cycles")
    world.master(events)
    assert not world.state.nodes[A].connected
    # A disconnected node is not judged again while it stays silent.
    for _ in range(k + 1):
        gone, book = _cycle(world, book, cfg)
        assert gone == []


_KINDS = ["silent", "heartbeat", "info", "runner", "work"]


def _speak(world: World, node_id: str, kind: str) -> None:
    events: dict[str, Event] = {
        "heartbeat": NodeHeartbeat(node_id=node_id),
        "info": NodeGatheredInfo(node_id=node_id, source="cpu", info=NodeInfo(cpu_percent=3.5)),
        "runner": RunnerStatusUpdated(
            runner_id=f"{node_id}-r0", node_id=node_id, status=RunnerStatus.RUNNING
        ),
        "work": WorkReported(devshard_id="ds-1-s", node_id=node_id, units=1, epoch=1),
    }
    world.add(node_id, events[kind])


@settings(max_examples=150, deadline=None)
@given(
    k=st.integers(min_value=1, max_value=4),
    script=st.lists(st.sampled_from(_KINDS), min_size=1, max_size=25),
)
def test_disconnect_iff_k_silent_cycles_and_any_event_counts(k: int, script: list[str]) -> None:
    """A model check: any kind of event resets the count; only K silent cycles disconnect.

    Node B chats every cycle, so the log's global index moves even when A is silent: only
    A's own events may count for A.
    """
    cfg = PlannerConfig(stale_cycles=k, fresh_idle_cycles=0)
    world = World()
    world.node(A)
    world.node(B)
    _, book = _cycle(world, EMPTY_BOOK, cfg)
    silent = 0
    for kind in script:
        world.heartbeat(B)
        if kind != "silent":
            _speak(world, A, kind)
        was_connected = world.state.nodes[A].connected
        gone, book = _cycle(world, book, cfg)
        assert B not in gone
        if not was_connected:
            # A silent disconnected node stays out; one that spoke has rejoined.
            assert world.state.nodes[A].connected == (kind != "silent")
            silent = 0
            continue
        silent = silent + 1 if kind == "silent" else 0
        if silent == k:
            assert gone == [A], f"not disconnected after {k} silent cycles"
        else:
            assert gone == [], f"disconnected after {silent} silent cycle(s) (K={k})"


def test_node_in_maintenance_going_quiet_is_not_disconnected_until_the_window_closes() -> None:
    cfg = PlannerConfig()
    k = cfg.stale_cycles
    world = World()
    world.node(A)
    world.node(B)
    duration = 20 * cfg.plan_interval_ms
    window_id = world.window(A, start_ms=world.now, duration_ms=duration, start=True)
    book = EMPTY_BOOK
    # Offline for maintenance: silent for many times K cycles, never disconnected, not fresh.
    for _ in range(4 * k):
        world.add(B, NodeHeartbeat(node_id=B))
        gone, book = _cycle(world, book, cfg)
        assert gone == []
    assert world.state.nodes[A].connected and not book.is_fresh(A)
    assert book.idle_cycles(A) == 4 * k - 1  # still counted (the first cycle observes)
    # The window overruns while A is still silent: the next cycle disconnects it as usual,
    # a failure (not excused), saying how long it was silent.
    world.tick(duration)
    world.master([MaintenanceOverrun(window_id=window_id, node_id=A)])
    world.add(B, NodeHeartbeat(node_id=B))
    events, book = check_liveness(world.state, book, world.now, cfg)
    assert [e.node_id for e in events] == [A]
    assert not events[0].excused and events[0].reason.startswith(f"no events for {4 * k} cycles")


def test_a_hello_after_a_silent_maintenance_gives_k_fresh_cycles() -> None:
    # The worker restarts inside its window: its hello (NodeConnected) finishes the window,
    # and the planner may run before the worker's first own event is indexed. The hello is
    # progress: no disconnect for its silence while it was away.
    cfg = PlannerConfig()
    k = cfg.stale_cycles
    world = World()
    world.node(A)
    window_id = world.window(A, start_ms=world.now, duration_ms=3_600_000, start=True)
    book = EMPTY_BOOK
    for _ in range(3 * k):
        gone, book = _cycle(world, book, cfg)
        assert gone == []
    world.master(
        [
            NodeConnected(node_id=A),
            MaintenanceFinished(window_id=window_id, node_id=A, how="reconnect"),
        ]
    )
    for idle in range(k):
        gone, book = _cycle(world, book, cfg)
        assert gone == [], f"disconnected {idle} cycle(s) after its hello"
    gone, book = _cycle(world, book, cfg)  # ... but it must speak within K cycles of it
    assert gone == [A]


def test_rejoined_node_gets_k_fresh_cycles() -> None:
    cfg = PlannerConfig(stale_cycles=2, fresh_idle_cycles=0)
    world = World()
    world.node(A)
    _, book = _cycle(world, EMPTY_BOOK, cfg)
    _, book = _cycle(world, book, cfg)
    gone, book = _cycle(world, book, cfg)
    assert gone == [A]
    world.heartbeat(A)  # speaks again: the reducer reconnects it
    assert world.state.nodes[A].connected
    gone, book = _cycle(world, book, cfg)
    assert gone == [] and book.idle_cycles(A) == 0
    gone, book = _cycle(world, book, cfg)
    assert gone == []
    gone, book = _cycle(world, book, cfg)
    assert gone == [A]


def test_master_connect_event_counts_as_progress() -> None:
    """A node the master reconnects (NodeConnected) has not spoken yet but is not stale."""
    cfg = PlannerConfig(stale_cycles=2, fresh_idle_cycles=0)
    world = World()
    world.node(A)
    _, book = _cycle(world, EMPTY_BOOK, cfg)
    _, book = _cycle(world, book, cfg)
    gone, book = _cycle(world, book, cfg)
    assert gone == [A]
    world.add(MASTER_ORIGIN, NodeConnected(node_id=A))
    gone, book = _cycle(world, book, cfg)
    assert gone == [] and world.state.nodes[A].connected


def test_restarted_master_starts_with_an_empty_book() -> None:
    """The book is ephemeral: after a restart every node gets K full cycles again."""
    cfg = PlannerConfig(stale_cycles=3, fresh_idle_cycles=0)
    world = World()
    world.node(A)
    _, book = _cycle(world, EMPTY_BOOK, cfg)
    _, book = _cycle(world, book, cfg)
    _, book = _cycle(world, book, cfg)
    assert book.idle_cycles(A) == 2
    book = EMPTY_BOOK  # master restart
    for _ in range(3):
        gone, book = _cycle(world, book, cfg)
        assert gone == []
    gone, book = _cycle(world, book, cfg)
    assert gone == [A]


def test_freshness_tracks_idle_cycles() -> None:
    cfg = PlannerConfig(stale_cycles=4, fresh_idle_cycles=1)
    world = World()
    world.node(A)
    _, book = _cycle(world, EMPTY_BOOK, cfg)
    assert book.is_fresh(A)
    _, book = _cycle(world, book, cfg)
    assert book.is_fresh(A)  # one idle cycle is tolerated
    _, book = _cycle(world, book, cfg)
    assert not book.is_fresh(A) and A in book.not_fresh
    world.heartbeat(A)
    _, book = _cycle(world, book, cfg)
    assert book.is_fresh(A)
