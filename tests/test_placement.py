"""Devshard placement: deterministic, capacity-weighted, balanced, sticky, eligible-only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from planner_world import World, of_type, quick_config

from cluster.master.epochs import epoch_record, next_epoch
from cluster.master.liveness import EMPTY_BOOK
from cluster.master.placement import (
    DISCONNECTED,
    DRAINING,
    FULL,
    IN_MAINTENANCE,
    NO_SLOTS,
    NOT_SELF_TESTED,
    RUNS_NO_RUNNERS,
    SELF_TEST_FAILED,
    STALE,
    STOPPING,
    PlacementPool,
    place_session,
    place_sessions,
)
from cluster.master.planner import Planner, plan
from cluster.shared.durations import format_time
from cluster.shared.events import (
    NO_RUNNERS_DIGEST,
    DevshardFinalized,
    DevshardPlaced,
    Event,
    NodeConnected,
    NodeDisconnected,
    NodeGatheredInfo,
    NodeInfo,
    NodeStopping,
    RunnerSelfTestCompleted,
    SessionUnplaced,
    SlotAssignment,
)
from cluster.shared.node_status import NodeState, node_status
from cluster.shared.state import EpochRecord, SessionRecord, State

CFG = quick_config()


def _epoch(world: World) -> EpochRecord:
    """Start epoch 1 in `world` (applied) and return its record."""
    ev = next_epoch(world.state, world.now, CFG)
    world.master([ev])
    return epoch_record(ev)


def _pool(state: State, epoch: EpochRecord, **kw: object) -> PlacementPool:
    return PlacementPool(state, now_ms=epoch.start_ms, work_end_ms=epoch.end_ms, used={}, **kw)  # type: ignore[arg-type]


def _sessions(state: State) -> list[SessionRecord]:
    return [state.sessions[s] for s in sorted(state.sessions.keys())]


def _load(events: list[DevshardPlaced | SessionUnplaced]) -> Counter[str]:
    return Counter(a.node_id for ev in of_type(events, DevshardPlaced) for a in ev.assignments)


# --------------------------------------------------------------------------------------------
# Properties over random clusters
# --------------------------------------------------------------------------------------------

_node = st.tuples(
    st.integers(min_value=0, max_value=6),  # slots
    st.sampled_from([4_096, 8_192, 16_384]),  # memory per slot
    st.booleans(),  # gpu
    st.sampled_from([True, True, True, False, None]),  # self-test
)
_session = st.tuples(
    st.integers(min_value=1, max_value=5),
    st.sampled_from([2_048, 8_192, 16_384]),
    st.sampled_from([False, False, True]),
)


def _random_world(
    nodes: list[tuple[int, int, bool, bool | None]], sessions: list[tuple[int, int, bool]]
) -> World:
    world = World()
    for i, (slots, memory, gpu, tested) in enumerate(nodes):
        world.node(f"n{i:02d}", slots=slots, memory_mb=memory, gpu=gpu, self_test=tested)
    for i, (slots, memory, gpu) in enumerate(sessions):
        world.session(f"s{i:02d}", slots, memory, gpu=gpu)
    return world


@settings(max_examples=80, deadline=None)
@given(
    nodes=st.lists(_node, min_size=0, max_size=12),
    sessions=st.lists(_session, min_size=1, max_size=10),
)
def test_placement_is_deterministic_and_honours_capacity_and_fit(
    nodes: list[tuple[int, int, bool, bool | None]], sessions: list[tuple[int, int, bool]]
) -> None:
    world = _random_world(nodes, sessions)
    epoch = _epoch(world)
    state = world.state
    first = place_sessions(_sessions(state), epoch, _pool(state, epoch), {})
    again = place_sessions(_sessions(state), epoch, _pool(state, epoch), {})
    assert first == again

    used: Counter[str] = Counter()
    for ev, session in zip(first, _sessions(state), strict=True):
        fitting = [
            n
            for n, rec in state.nodes.items()
            if rec.self_test is not None
            and rec.self_test.passed
            and (rec.info.slots or 0) > 0
            and (rec.info.slot_memory_mb or 0) >= session.memory_per_slot_mb
            and (not session.gpu or bool(rec.info.gpus))
        ]
        if isinstance(ev, DevshardPlaced):
            # All or nothing, every slot numbered once, only on fitting nodes with room.
            assert sorted(a.slot for a in ev.assignments) == list(range(session.slots))
            for a in ev.assignments:
                assert a.node_id in fitting
                used[a.node_id] += 1
                assert used[a.node_id] <= (state.nodes[a.node_id].info.slots or 0)
            # Spread: distinct nodes whenever enough fitting nodes had room.
            per_node = Counter(a.node_id for a in ev.assignments)
            if max(per_node.values()) > 1:
                # A node was reused: every other fitting node must be full by now.
                others = [n for n in fitting if n not in per_node]
                assert all(used[n] >= (state.nodes[n].info.slots or 0) for n in others)
        else:
            # Unplaced only when the fitting nodes really lacked room at that point.
            free = sum((state.nodes[n].info.slots or 0) - used[n] for n in fitting)
            assert free < session.slots
            assert ev.reason.startswith(f"needs {session.slots} slot(s) of ")
            assert f"offer {free} free slot(s)" in ev.reason


# Few slots per node, all self-tested: room is tight, so a move can take room a session needs.
_tight_node = st.tuples(
    st.integers(min_value=1, max_value=3),
    st.sampled_from([4_096, 8_192, 16_384]),
    st.booleans(),
    st.just(True),
)


def _placed_without_moves(
    sessions: list[SessionRecord],
    epoch: EpochRecord,
    pool: PlacementPool,
    preferred: dict[str, list[str]],
) -> set[str]:
    """The sessions stickiness and plain draws place when no kept slot ever moves (the
    placement before kept slots were spread and evened out)."""
    kept: dict[str, list[str]] = {}
    for session in sessions:
        kept[session.session_id] = []
        for node_id in preferred[session.session_id][: session.slots]:
            if node_id and pool.fits(node_id, session) and pool.free[node_id] > 0:
                pool.take(node_id)
                kept[session.session_id].append(node_id)
    placed: set[str] = set()
    for session in sessions:
        mine = kept[session.session_id]
        missing = session.slots - len(mine)
        if missing and pool.room_for(session)[1] < missing:
            for node_id in mine:
                pool.release(node_id)
            continue
        pool.draw(session, epoch.seed, missing, avoid=mine)
        placed.add(session.session_id)
    return placed


@settings(max_examples=300, deadline=None)
@given(
    nodes=st.lists(_tight_node, min_size=1, max_size=5),
    sessions=st.lists(_session, min_size=1, max_size=6),
    make_room=st.booleans(),
    data=st.data(),
)
def test_moving_kept_slots_never_costs_a_session_its_place(
    nodes: list[tuple[int, int, bool, bool | None]],
    sessions: list[tuple[int, int, bool]],
    make_room: bool,
    data: st.DataObject,
) -> None:
    """Whatever each slot held last epoch, the kept slots' moves (spread, even out, room
    made) use only room the cycle's draws left: every session placed with no move is still
    placed, on fitting nodes within their capacity. Making room (the turn) leaves no session
    out that fits once other sessions' slots move off its nodes onto nodes it does not fit."""
    world = _random_world(nodes, sessions)
    epoch = _epoch(world)
    state = world.state
    names = ["", *sorted(state.nodes)]
    preferred = {
        s.session_id: data.draw(st.lists(st.sampled_from(names), max_size=s.slots))
        for s in _sessions(state)
    }
    events = place_sessions(
        _sessions(state), epoch, _pool(state, epoch), preferred, make_room=make_room
    )
    assert events == place_sessions(
        _sessions(state), epoch, _pool(state, epoch), preferred, make_room=make_room
    )
    placed = {ev.session_id: ev for ev in of_type(events, DevshardPlaced)}
    assert set(placed) >= _placed_without_moves(
        _sessions(state), epoch, _pool(state, epoch), preferred
    )
    pool = _pool(state, epoch)
    for sid, ev in placed.items():
        assert sorted(a.slot for a in ev.assignments) == list(range(state.sessions[sid].slots))
        assert all(pool.fits(a.node_id, state.sessions[sid]) for a in ev.assignments)
    load = _load(events)
    for node_id, n in load.items():
        assert n <= (state.nodes[node_id].info.slots or 0)
    if not make_room:
        return
    # No session is left out that moving other sessions' slots off nodes it fits, straight
    # onto nodes with room it does not fit, would have given room.
    for out in of_type(events, SessionUnplaced):
        session = state.sessions[out.session_id]
        free = {n: (pool.capacity[n] - load[n]) for n in pool.capacity}
        own = sum(f for n, f in free.items() if pool.fits(n, session))
        movable = [
            state.sessions[other.session_id]
            for other in of_type(events, DevshardPlaced)
            for a in other.assignments
            if pool.fits(a.node_id, session)
        ]
        homes = [n for n, f in free.items() if not pool.fits(n, session) for _ in range(f)]
        assert own + _most_moves(movable, homes, pool) < session.slots, out.reason


def _most_moves(slots: list[SessionRecord], homes: list[str], pool: PlacementPool) -> int:
    """The most of `slots` (each named by its session) that can move at once, each to its
    own free slot among `homes` (a node per free slot) that its session fits: a maximum
    bipartite matching, by augmenting paths."""
    owner: dict[int, int] = {}  # home index -> slot index

    def augment(i: int, seen: set[int]) -> bool:
        for j, node_id in enumerate(homes):
            if j in seen or not pool.fits(node_id, slots[i]):
                continue
            seen.add(j)
            if j not in owner or augment(owner[j], seen):
                owner[j] = i
                return True
        return False

    return sum(augment(i, set()) for i in range(len(slots)))


@settings(max_examples=150, deadline=None)
@given(
    nodes=st.lists(_tight_node, min_size=1, max_size=6),
    sessions=st.lists(_session, min_size=1, max_size=6),
    data=st.data(),
)
def test_kept_slots_settle_within_a_few_epochs(
    nodes: list[tuple[int, int, bool, bool | None]],
    sessions: list[tuple[int, int, bool]],
    data: st.DataObject,
) -> None:
    """From any last placement (doubled, lopsided), turn after turn with the same nodes and
    sessions -- each with a new seed, room made as at a real turn -- the placement stops
    changing after a few turns: no slot moves back and forth."""
    world = _random_world(nodes, sessions)
    epoch = _epoch(world)
    state = world.state
    names = ["", *sorted(state.nodes)]
    held = {
        s.session_id: data.draw(st.lists(st.sampled_from(names), max_size=s.slots))
        for s in _sessions(state)
    }
    for turn in range(6):
        turned = msgspec.structs.replace(epoch, seed=epoch.seed + turn)
        events = place_sessions(
            _sessions(state), turned, _pool(state, turned), held, make_room=True
        )
        now: dict[str, list[str]] = {}
        for ev in of_type(events, DevshardPlaced):
            now[ev.session_id] = [a.node_id for a in ev.assignments]
        if turn and now == held:
            return
        held = now
    raise AssertionError(f"still moving after 6 turns: {held}")


_SCRIPT = """
import sys, json
sys.path.insert(0, {tests!r})
from planner_world import World, quick_config
from cluster.master.planner import Planner
from cluster.shared.codec import to_builtins
w = World()
for i in range(30):
    w.node(f"node-{{i}}", slots=1 + i % 4, memory_mb=8192 * (1 + i % 3), gpu=i % 5 == 0)
for i in range(12):
    w.session(f"sess-{{i}}", 1 + i % 4, 8192 * (1 + i % 2), gpu=i % 6 == 0)
print(json.dumps(to_builtins(w.cycle(Planner(quick_config())))))
"""


def test_placement_is_identical_under_different_hash_seeds() -> None:
    """Placement never depends on Python's salted hash() or map iteration order."""
    tests_dir = str(Path(__file__).parent)
    outputs = []
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run(
            [sys.executable, "-c", _SCRIPT.format(tests=tests_dir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        outputs.append(json.loads(proc.stdout))
    assert outputs[0] == outputs[1] == outputs[2]
    assert any(e["type"] == "DevshardPlaced" for e in outputs[0])


# --------------------------------------------------------------------------------------------
# Spreading, weighting, balancing
# --------------------------------------------------------------------------------------------


def test_devshard_slots_spread_over_distinct_nodes_and_load_balances() -> None:
    world = World()
    for i in range(20):
        world.node(f"n{i:02d}", slots=10)
    for i in range(40):
        world.session(f"s{i:02d}", slots=2)
    epoch = _epoch(world)
    events = place_sessions(_sessions(world.state), epoch, _pool(world.state, epoch), {})
    placed = of_type(events, DevshardPlaced)
    assert len(placed) == 40
    for ev in placed:
        assert len({a.node_id for a in ev.assignments}) == 2
    load = _load(events)
    # 80 slots over 20 equal nodes: the average is 4; power-of-two choices keeps the busiest
    # node close to it (plain random choice would typically reach 8 or more).
    assert max(load.values()) <= 6
    assert len(load) >= 18


def test_capacity_weights_the_choice() -> None:
    world = World()
    world.node("big", slots=40)
    for i in range(4):
        world.node(f"small{i}", slots=2)
    for i in range(10):
        world.session(f"s{i}", slots=1)
    epoch = _epoch(world)
    load = _load(place_sessions(_sessions(world.state), epoch, _pool(world.state, epoch), {}))
    assert load["big"] >= 6
    assert all(load[f"small{i}"] <= 2 for i in range(4))


def test_a_node_repeats_in_a_devshard_only_when_no_other_has_room() -> None:
    world = World()
    world.node("a", slots=4)
    world.node("b", slots=1)
    world.session("s", slots=4)
    epoch = _epoch(world)
    ev = place_session(world.state.sessions["s"], epoch, _pool(world.state, epoch))
    assert isinstance(ev, DevshardPlaced)
    assert Counter(a.node_id for a in ev.assignments) == {"a": 3, "b": 1}


# --------------------------------------------------------------------------------------------
# Eligibility: each reason keeps a node out, and the unplaced reason counts it
# --------------------------------------------------------------------------------------------


def _bad_node(world: World, reason: str) -> frozenset[str]:
    """Make node "x" (attractive: many slots, sticky) ineligible for `reason`; return stale set."""
    not_fresh: frozenset[str] = frozenset()
    if reason == SELF_TEST_FAILED:
        world.node("x", slots=50, self_test=False)
    elif reason == NOT_SELF_TESTED:
        world.node("x", slots=50, self_test=None)
    elif reason == NO_SLOTS:
        world.node("x", slots=0)
    else:
        world.node("x", slots=50)
    if reason == DISCONNECTED:
        world.master([NodeDisconnected(node_id="x", reason="test")])
    elif reason == STALE:
        not_fresh = frozenset({"x"})
    elif reason == IN_MAINTENANCE:
        world.window("x", start_ms=world.now, duration_ms=3_600_000, start=True)
    elif reason == DRAINING:
        # The window starts before the epoch ends: no devshard may cross it.
        world.window("x", start_ms=world.now + CFG.epoch_length_ms // 2, duration_ms=60_000)
    return not_fresh


@pytest.mark.parametrize(
    "reason",
    [DISCONNECTED, STALE, IN_MAINTENANCE, DRAINING, SELF_TEST_FAILED, NOT_SELF_TESTED, NO_SLOTS],
)
def test_never_places_on_an_ineligible_node(reason: str) -> None:
    world = World()
    world.node("ok", slots=4)
    not_fresh = _bad_node(world, reason)
    for i in range(4):
        world.session(f"s{i}", slots=1)
    world.session("too-big", slots=5)
    epoch = _epoch(world)
    pool = _pool(world.state, epoch, not_fresh=not_fresh)
    sticky = {f"s{i}": ["x"] for i in range(4)} | {"too-big": ["x"] * 5}
    events = place_sessions(_sessions(world.state), epoch, pool, sticky)
    assert _load(events) == {"ok": 4}
    (unplaced,) = of_type(events, SessionUnplaced)
    assert unplaced.session_id == "too-big"
    assert f"1 node(s) {reason}" in unplaced.reason


def test_a_node_stopped_inside_its_window_is_counted_in_maintenance_as_status_shows_it() -> None:
    """An operator review found the unplaced reason calling a node in its active window
    "stopping (its worker said goodbye)" or "stale" while `cluster status` says maintenance:
    placement checked those before the excuse. Its order is node_status's now."""
    world = World()
    world.node("ok", slots=4)
    world.master([NodeConnected(node_id="x", boot_id="b1")])
    world.node("x", slots=50)
    planner = Planner(CFG)
    world.cycle(planner)  # the first epoch starts
    world.window("x", start_ms=world.now, duration_ms=3_600_000, start=True)
    world.add("x", NodeStopping(node_id="x", boot_id="b1", reason="got SIGTERM"))
    world.session("big", slots=5)
    unplaced: list[SessionUnplaced] = []
    for _ in range(2 * CFG.stale_cycles):  # x stays silent: stopping, and not fresh
        world.heartbeat("ok")
        unplaced += of_type(world.cycle(planner), SessionUnplaced)
    rec = world.state.nodes["x"]
    assert rec.connected and rec.stopping_idx
    assert node_status(world.state, "x", world.now).status is NodeState.MAINTENANCE
    assert unplaced
    for said in unplaced:  # the first (x just stopped) and any restated (x stale too)
        assert f"1 node(s) {IN_MAINTENANCE}" in said.reason, said.reason
        assert STOPPING not in said.reason and STALE not in said.reason, said.reason


def test_a_node_restarted_with_another_runner_setting_gets_nothing_until_it_passes_that_test() -> (
    None
):
    """Its passed test was of the old setting: placing on it would serve a setting no test
    has passed (if the new one fails, those slots fail, move and charge the node misses)."""
    old, new = "0" * 64, "1" * 64
    world = World()

    def tested(digest: str) -> None:
        world.add(
            "x",
            RunnerSelfTestCompleted(
                node_id="x", runner_kind="simulated", passed=True, config_digest=digest
            ),
        )

    world.master([NodeConnected(node_id="x", boot_id="b1", runner_digest=old)])
    info = NodeInfo(hostname="x", slots=4, slot_memory_mb=16_384)
    world.add("x", NodeGatheredInfo(node_id="x", source="static", info=info))
    tested(old)
    planner = Planner(CFG)
    world.cycle(planner)  # the first epoch starts
    # The worker restarts with another setting: its hello names it.
    world.master([NodeConnected(node_id="x", boot_id="b2", runner_digest=new)])
    world.session("s", slots=1)
    world.heartbeat_all()
    events = world.cycle(planner)
    assert of_type(events, DevshardPlaced) == []
    (unplaced,) = of_type(events, SessionUnplaced)
    assert f"1 node(s) {NOT_SELF_TESTED}" in unplaced.reason
    # The old process's result, delivered late from its outbox, changes nothing.
    tested(old)
    for _ in range(3):
        world.heartbeat_all()
        assert of_type(world.cycle(planner), DevshardPlaced) == []
    tested(new)
    world.heartbeat_all()
    (placed,) = of_type(world.cycle(planner), DevshardPlaced)
    assert placed.assignments == (SlotAssignment(0, "x"),)


def test_a_node_restarted_without_runners_loses_its_slots_at_once_and_gets_no_more() -> None:
    """`cluster worker --no-runners` on a node that passed its test: nothing serves its slots
    now, so they are re-placed in the next cycle (not missed until the epoch ends), and no
    test -- even one filed under its digest -- makes it eligible again."""
    world = World()
    world.node("x")
    world.node("y", slots=2)
    world.session("s", slots=2)
    planner = Planner(CFG)
    # The first epoch starts: "s" takes a slot on each node.
    assert _load(of_type(world.cycle(planner), DevshardPlaced)) == {"x": 1, "y": 1}
    world.master([NodeConnected(node_id="x", boot_id="b2", runner_digest=NO_RUNNERS_DIGEST)])
    world.add(
        "x",
        RunnerSelfTestCompleted(
            node_id="x", runner_kind="simulated", passed=True, config_digest=NO_RUNNERS_DIGEST
        ),
    )
    world.heartbeat_all()
    (moved,) = of_type(world.cycle(planner), DevshardPlaced)
    assert moved.reason == "replace"
    assert _load([moved]) == {"y": 2}
    world.session("t", slots=1)
    world.heartbeat_all()
    (unplaced,) = of_type(world.cycle(planner), SessionUnplaced)
    assert f"1 node(s) {RUNS_NO_RUNNERS}" in unplaced.reason
    assert f"{NOT_SELF_TESTED}" not in unplaced.reason


def test_full_memory_and_gpu_reasons_are_counted() -> None:
    world = World()
    world.node("gpu-node", slots=2, memory_mb=16_384, gpu=True)
    world.node("cpu-node", slots=8, memory_mb=16_384)
    world.node("small", slots=8, memory_mb=4_096)
    world.session("a-fill", slots=2, memory_mb=8_192, gpu=True)
    world.session("b-gpu", slots=1, memory_mb=8_192, gpu=True)
    epoch = _epoch(world)
    # Mid-epoch view: "a-fill" already holds the GPU node's two slots.
    used = {"gpu-node": 2}
    pool = PlacementPool(world.state, now_ms=world.now, work_end_ms=epoch.end_ms, used=used)
    ev = place_session(world.state.sessions["b-gpu"], epoch, pool)
    assert isinstance(ev, SessionUnplaced)
    assert ev.reason == (
        "needs 1 slot(s) of 8192 MiB with a GPU: 0 eligible node(s) offer 0 free slot(s); "
        f"1 node(s) with less than 8192 MiB per slot, 1 node(s) without a GPU, 1 node(s) {FULL}"
    )


def test_unplaced_reason_reads_like_the_operator_needs_it() -> None:
    world = World()
    world.node("a", slots=2, memory_mb=16_384)
    world.node("b", slots=1, memory_mb=16_384)
    world.node("c", slots=4, self_test=None)
    world.node("d", slots=4, self_test=None)
    world.node("e", slots=4)
    wid = world.window("e", start_ms=world.now + 10_000, duration_ms=60_000)
    world.session("big", slots=4, memory_mb=16_384)
    epoch = _epoch(world)
    ev = place_session(world.state.sessions["big"], epoch, _pool(world.state, epoch))
    assert isinstance(ev, SessionUnplaced)
    assert ev.reason == (
        "needs 4 slot(s) of 16384 MiB: 2 eligible node(s) offer 3 free slot(s); "
        "1 node(s) draining, 2 node(s) not self-tested, "
        f"4 slot(s) away until window {wid} of node e ends at "
        f"{format_time(world.now + 70_000)}"
    )


# --------------------------------------------------------------------------------------------
# Through the planner: stickiness across epochs, re-placement after a loss
# --------------------------------------------------------------------------------------------


def _busy_world(nodes: int = 12, sessions: int = 6) -> tuple[World, Planner]:
    world = World()
    for i in range(nodes):
        world.node(f"n{i:02d}", slots=4)
    for i in range(sessions):
        world.session(f"s{i}", slots=3)
    return world, Planner(quick_config())


def _assignments(world: World) -> dict[str, tuple[SlotAssignment, ...]]:
    return {
        world.state.devshards[ds].session_id: world.state.devshards[ds].assignments
        for ds in world.state.devshards
    }


def test_devshards_stick_to_last_epochs_nodes() -> None:
    world, planner = _busy_world()
    world.cycle(planner)
    before = _assignments(world)
    assert len(before) == 6
    for _ in range(CFG.epoch_length_ms // CFG.plan_interval_ms):
        world.heartbeat_all()
        world.cycle(planner)
    assert world.state.epoch is not None and world.state.epoch.epoch == 2
    assert _assignments(world) == before  # a new seed, yet no needless reloads


def _placed_by_hand(world: World, assignments: list[tuple[int, str]]) -> DevshardPlaced:
    """Nodes a, b, c (4 slots each), epoch 1, session "s" of 3 slots placed as given."""
    for node in ("a", "b", "c"):
        world.node(node, slots=4)
    epoch = _epoch(world)
    world.session("s", slots=3)
    placed = DevshardPlaced(
        devshard_id="ds-1-s",
        session_id="s",
        epoch=1,
        assignments=tuple(SlotAssignment(slot, node) for slot, node in assignments),
        ends_ms=epoch.end_ms,
    )
    world.master([placed])
    return placed


def test_an_unfilled_slot_does_not_shift_the_others_at_the_epoch_turn() -> None:
    """Slot 1 lost its node and found no room: at the turn, slot 2 stays slot 2 on c (it
    was handed over as the second node, so slot 1, before)."""
    world = World()
    placed = _placed_by_hand(world, [(0, "a"), (2, "c")])
    world.now = placed.ends_ms
    events = plan(world.state, world.now, EMPTY_BOOK, CFG).events
    (turned,) = [ev for ev in of_type(events, DevshardPlaced) if ev.epoch == 2]
    by_slot = {a.slot: a.node_id for a in turned.assignments}
    assert (by_slot[0], by_slot[2]) == ("a", "c")


def _doubled_on_a(world: World) -> tuple[SessionRecord, EpochRecord]:
    """Session "s" held slots 0 and 1 on a and 2 on b in epoch 1; epoch 2 has started."""
    _placed_by_hand(world, [(0, "a"), (1, "a"), (2, "b")])
    world.master([DevshardFinalized(devshard_id="ds-1-s", epoch=1)])
    assert world.state.last_nodes_by_session["s"] == ("a", "a", "b")
    world.tick(CFG.epoch_length_ms)
    return world.state.sessions["s"], _epoch(world)


def test_a_node_keeps_as_many_slots_as_it_held_after_its_devshard_is_finalized() -> None:
    """a held two slots of the session and no other node has room (c is full): what
    stickiness remembers gives it both back, rather than one (the remembered set of nodes
    did) and a draw that loads a runner on another node while one of a's is stopped."""
    world = World()
    session, epoch2 = _doubled_on_a(world)
    pool = PlacementPool(
        world.state, now_ms=epoch2.start_ms, work_end_ms=epoch2.end_ms, used={"c": 4}
    )
    (placed,) = of_type([place_session(session, epoch2, pool, ("a", "a", "b"))], DevshardPlaced)
    assert [(a.slot, a.node_id) for a in placed.assignments] == [(0, "a"), (1, "a"), (2, "b")]


def test_a_doubled_node_gives_its_extra_slot_to_a_node_with_room() -> None:
    """a held two slots only because c had no room then: now c has room, so a keeps its
    first slot and the second goes to c (one slot per node while others have room); b's
    slot stays put."""
    world = World()
    session, epoch2 = _doubled_on_a(world)
    (placed,) = of_type(
        [place_session(session, epoch2, _pool(world.state, epoch2), ("a", "a", "b"))],
        DevshardPlaced,
    )
    assert [(a.slot, a.node_id) for a in placed.assignments] == [(0, "a"), (1, "c"), (2, "b")]


@pytest.mark.parametrize("gpu", [False, True], ids=["memory", "gpu"])
def test_a_kept_slot_never_moves_onto_the_only_node_a_new_session_fits(gpu: bool) -> None:
    """s0 held two slots on a; b is the only node s1 fits (its memory per slot, or its GPU).
    Spreading s0's second slot onto b would leave s1 unplaced -- for good, as stickiness
    would keep it there every epoch: s0 keeps a twice and s1 gets b."""
    world = World()
    if gpu:
        world.node("a", slots=2, memory_mb=16_384)
        world.node("b", slots=1, memory_mb=16_384, gpu=True)
        world.session("s0", slots=2, memory_mb=2_048)
        world.session("s1", slots=1, memory_mb=2_048, gpu=True)
    else:
        world.node("a", slots=2, memory_mb=4_096)
        world.node("b", slots=1, memory_mb=16_384)
        world.session("s0", slots=2, memory_mb=2_048)
        world.session("s1", slots=1, memory_mb=16_384)
    epoch = _epoch(world)
    events = place_sessions(
        _sessions(world.state), epoch, _pool(world.state, epoch), {"s0": ["a", "a"]}
    )
    assert of_type(events, SessionUnplaced) == []
    placed = {ev.session_id: ev.assignments for ev in of_type(events, DevshardPlaced)}
    assert placed == {
        "s0": (SlotAssignment(0, "a"), SlotAssignment(1, "a")),
        "s1": (SlotAssignment(0, "b"),),
    }


def test_a_session_that_only_fits_where_a_kept_slot_moved_from_is_placed_in_the_same_cycle() -> (
    None
):
    """s0 held both slots of big; its second moves to small (which s1 does not fit), which
    frees the big slot s1 needs: s1, unplaced by the draws, is placed after the move."""
    world = World()
    world.node("big", slots=2, memory_mb=16_384)
    world.node("small", slots=1, memory_mb=4_096)
    world.session("s0", slots=2, memory_mb=2_048)
    world.session("s1", slots=1, memory_mb=16_384)
    epoch = _epoch(world)
    events = place_sessions(
        _sessions(world.state), epoch, _pool(world.state, epoch), {"s0": ["big", "big"]}
    )
    placed = {ev.session_id: ev.assignments for ev in of_type(events, DevshardPlaced)}
    assert placed == {
        "s0": (SlotAssignment(0, "big"), SlotAssignment(1, "small")),
        "s1": (SlotAssignment(0, "big"),),
    }


def _cycle_epoch(world: World, planner: Planner) -> list[Event]:
    """Run the cycles up to and including the next epoch turn; return their events."""
    events: list[Event] = []
    for _ in range(CFG.epoch_length_ms // CFG.plan_interval_ms):
        world.heartbeat_all()
        events += world.cycle(planner)
    return events


@pytest.mark.parametrize("gpu", [False, True], ids=["memory", "gpu"])
def test_a_session_that_fits_only_where_another_sticks_gets_room_at_the_turn(gpu: bool) -> None:
    """s0 was placed on a and b before s1 existed; s1 fits only b (its memory per slot, or
    its GPU). Mid-epoch nothing moves and s1 waits; at the turn s0's slot moves from b to a
    (which has room s1 cannot use) and s1 gets b -- not unplaced for good by stickiness. At
    the next turn both keep their nodes."""
    world = World()
    if gpu:
        world.node("a", slots=2, memory_mb=16_384)
        world.node("b", slots=1, memory_mb=16_384, gpu=True)
    else:
        world.node("a", slots=2, memory_mb=4_096)
        world.node("b", slots=1, memory_mb=16_384)
    world.session("s0", slots=2, memory_mb=2_048)
    planner = Planner(CFG)
    world.cycle(planner)
    assert _assignments(world) == {"s0": (SlotAssignment(0, "a"), SlotAssignment(1, "b"))} or (
        _assignments(world) == {"s0": (SlotAssignment(0, "b"), SlotAssignment(1, "a"))}
    )
    held = _assignments(world)["s0"]
    world.session("s1", slots=1, memory_mb=2_048 if gpu else 16_384, gpu=gpu)
    world.heartbeat_all()
    (waiting,) = of_type(world.cycle(planner), SessionUnplaced)
    assert waiting.session_id == "s1"
    mid = _cycle_epoch(world, planner)
    # Mid-epoch s0's devshard never moved for s1.
    assert [ev for ev in of_type(mid, DevshardPlaced) if ev.epoch == 1] == []
    turned = {ev.session_id: ev.assignments for ev in of_type(mid, DevshardPlaced)}
    kept = next(a for a in held if a.node_id == "a")
    assert turned == {
        "s0": tuple(sorted([kept, SlotAssignment(1 - kept.slot, "a")], key=lambda a: a.slot)),
        "s1": (SlotAssignment(0, "b"),),
    }
    assert world.state.epoch is not None and world.state.epoch.epoch == 2
    # Settled: the next turn keeps both where they are.
    _cycle_epoch(world, planner)
    assert world.state.epoch.epoch == 3
    assert _assignments(world) == turned


def test_no_room_is_made_when_the_other_sessions_slots_have_no_other_home() -> None:
    """s1 fits b and c, held by s0 and s2 (a GPU session, which fits only c). The one free
    slot is on d, too small for s0's slot on b (and a, s0's other node, is full with its
    other slot): moving it would leave s0 short. Nothing moves and s1 stays unplaced, with
    the counts behind it."""
    world = World()
    world.node("a", slots=1, memory_mb=4_096)
    world.node("b", slots=1, memory_mb=16_384)
    world.node("c", slots=2, memory_mb=16_384, gpu=True)
    world.node("d", slots=1, memory_mb=1_024)
    world.session("s0", slots=2, memory_mb=2_048)
    world.session("s1", slots=1, memory_mb=16_384)
    world.session("s2", slots=2, memory_mb=8_192, gpu=True)
    epoch = _epoch(world)
    preferred = {"s0": ["a", "b"], "s2": ["c", "c"]}
    events = place_sessions(
        _sessions(world.state), epoch, _pool(world.state, epoch), preferred, make_room=True
    )
    placed = {ev.session_id: ev.assignments for ev in of_type(events, DevshardPlaced)}
    assert placed == {
        "s0": (SlotAssignment(0, "a"), SlotAssignment(1, "b")),
        "s2": (SlotAssignment(0, "c"), SlotAssignment(1, "c")),
    }
    (unplaced,) = of_type(events, SessionUnplaced)
    assert unplaced.session_id == "s1"
    assert unplaced.reason == (
        "needs 1 slot(s) of 16384 MiB: 2 eligible node(s) offer 0 free slot(s); "
        "2 node(s) with less than 16384 MiB per slot"
    )


def test_room_is_made_by_sending_each_slot_where_only_it_fits() -> None:
    """big needs both of b's slots, held by t1 and t2 (a GPU session). c (16 GiB, no GPU)
    and d (4 GiB, a GPU) have a slot free each: t1 fits both, t2 only d. Sending t1 to d
    (the smaller node, or the first by id) would strand t2; the classes' flow sends t1 to
    c and t2 to d."""
    world = World()
    world.node("b", slots=2, memory_mb=32_768, gpu=True)
    world.node("c", slots=1, memory_mb=16_384)
    world.node("d", slots=1, memory_mb=4_096, gpu=True)
    world.session("big", slots=2, memory_mb=32_768)
    world.session("t1", slots=1, memory_mb=2_048)
    world.session("t2", slots=1, memory_mb=2_048, gpu=True)
    epoch = _epoch(world)
    preferred = {"t1": ["b"], "t2": ["b"]}
    events = place_sessions(
        _sessions(world.state), epoch, _pool(world.state, epoch), preferred, make_room=True
    )
    assert of_type(events, SessionUnplaced) == []
    placed = {ev.session_id: ev.assignments for ev in of_type(events, DevshardPlaced)}
    assert placed == {
        "big": (SlotAssignment(0, "b"), SlotAssignment(1, "b")),
        "t1": (SlotAssignment(0, "c"),),
        "t2": (SlotAssignment(0, "d"),),
    }
    # Without make_room (mid-epoch) nothing moves for big.
    events = place_sessions(_sessions(world.state), epoch, _pool(world.state, epoch), preferred)
    assert [ev.session_id for ev in of_type(events, SessionUnplaced)] == ["big"]


def test_sticky_placement_moves_only_slots_of_a_node_that_is_now_draining() -> None:
    world, planner = _busy_world()
    world.cycle(planner)
    before = _assignments(world)
    _, slots = next(iter(sorted(before.items())))
    leaving = slots[0].node_id
    epoch = world.state.epoch
    assert epoch is not None
    world.window(leaving, start_ms=epoch.end_ms + 1_000, duration_ms=60_000)
    for _ in range(CFG.epoch_length_ms // CFG.plan_interval_ms):
        world.heartbeat_all()
        world.cycle(planner)
    after = _assignments(world)
    for sid, old in before.items():
        for old_a, new_a in zip(old, after[sid], strict=True):
            if old_a.node_id == leaving:
                assert new_a.node_id != leaving
            else:
                assert new_a == old_a


def test_lost_node_slots_are_replaced_and_only_those_move() -> None:
    world, planner = _busy_world()
    world.cycle(planner)
    before = _assignments(world)
    victim = before["s0"][0].node_id
    replaced: list[DevshardPlaced] = []
    for _ in range(CFG.stale_cycles + 1):
        world.heartbeat_all(victim)
        replaced += [
            e for e in of_type(world.cycle(planner), DevshardPlaced) if e.reason == "replace"
        ]
    assert not world.state.nodes[victim].connected
    hit = {sid for sid, a in before.items() if any(x.node_id == victim for x in a)}
    assert {e.session_id for e in replaced} == hit
    after = _assignments(world)
    used: Counter[str] = Counter()
    for sid, old in before.items():
        for old_a, new_a in zip(old, after[sid], strict=True):
            assert new_a.slot == old_a.slot
            if old_a.node_id == victim:
                assert new_a.node_id != victim
            else:
                assert new_a == old_a
            used[new_a.node_id] += 1
        assert world.state.devshards[f"ds-1-{sid}"].epoch == 1
    assert max(used.values()) <= 4


def test_node_entering_maintenance_loses_its_slots() -> None:
    world, planner = _busy_world()
    world.cycle(planner)
    victim = _assignments(world)["s0"][0].node_id
    world.window(victim, start_ms=world.now + 1, duration_ms=600_000)
    world.heartbeat_all()
    events = world.cycle(planner)
    moved = [e for e in of_type(events, DevshardPlaced) if e.reason == "replace"]
    assert moved and all(a.node_id != victim for e in moved for a in e.assignments)


def test_replacement_without_room_keeps_survivors_and_fills_the_gap_later() -> None:
    world = World()
    for name in ("a", "b", "c"):
        world.node(name, slots=1)
    world.session("s", slots=3)
    planner = Planner(quick_config())
    world.cycle(planner)
    assert len(world.state.devshards["ds-1-s"].assignments) == 3
    for _ in range(CFG.stale_cycles + 1):
        world.heartbeat_all("c")
        events = world.cycle(planner)
    shard = world.state.devshards["ds-1-s"]
    assert sorted(a.node_id for a in shard.assignments) == ["a", "b"]
    reason = world.state.sessions["s"].unplaced_reason
    assert reason.startswith("devshard ds-1-s has 1 of 3 slot(s) unassigned: needs 1 slot(s)")
    # The reason is not repeated every cycle while nothing changes.
    world.heartbeat_all("c")
    assert world.cycle(planner) == []
    # A new node with room appears: the gap is filled in the next cycle.
    world.node("d", slots=2)
    world.heartbeat_all("c")
    events = world.cycle(planner)
    (placed,) = of_type(events, DevshardPlaced)
    assert placed.reason == "replace"
    (gap,) = {0, 1, 2} - {a.slot for a in shard.assignments}
    assert {a.slot: a.node_id for a in placed.assignments} == {
        **{a.slot: a.node_id for a in shard.assignments},
        gap: "d",
    }
    assert world.state.sessions["s"].unplaced_reason == ""


def test_a_node_back_from_maintenance_gets_its_share_again_and_then_nothing_moves() -> None:
    """a's slots went to b and c while a was in maintenance; stickiness must not keep them
    there for good: at a later turn a gets slots back until no node is more than one slot
    above its share, and from then on the turn moves nothing (no needless reloads)."""
    world = World()
    for name in ("a", "b", "c"):
        world.node(name, slots=4)
    for i in range(4):
        world.session(f"s{i}", slots=2)
    planner = Planner(quick_config())
    world.cycle(planner)
    first = world.state.epoch
    assert first is not None
    # The window starts 30 s into epoch 2, so epoch 2 is placed without a.
    world.window("a", first.end_ms + 30_000, 70_000)

    def load() -> Counter[str]:
        return Counter(a.node_id for d in world.state.devshards.values() for a in d.assignments)

    def run_epoch() -> None:
        for _ in range(CFG.epoch_length_ms // CFG.plan_interval_ms):
            world.heartbeat_all()
            world.cycle(planner)

    run_epoch()
    assert world.state.epoch is not None and world.state.epoch.epoch == 2
    assert load() == {"b": 4, "c": 4}
    for _ in range(3):
        run_epoch()
    (window,) = world.state.windows.values()
    assert window.outcome == "overrun"
    assert sorted(load().values()) == [2, 3, 3]
    settled = _assignments(world)
    run_epoch()
    assert _assignments(world) == settled


def test_sessions_that_fit_the_same_nodes_share_one_failed_attempt_to_make_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whether room can be made depends only on which nodes a session fits. The memo of
    failed attempts was keyed on the memory asked per slot, so blocked sessions asking
    40,000, 40,001, ... MiB each paid a full attempt: 400 of them took 1 s at 10,000 nodes.
    Here the big GPU nodes are held by sessions that fit nowhere else: one attempt fails,
    and the other blocked sessions, fitting the same nodes, are not tried again."""
    import cluster.master.placement as placement

    world = World()
    for k in range(4):
        world.node(f"s{k}", slots=4, memory_mb=4_096)
    for k in range(2):
        world.node(f"b{k}", slots=1, memory_mb=81_920, gpu=True)
        world.session(f"h{k}", slots=1, memory_mb=60_000, gpu=True)
    for k in range(6):
        world.session(f"z{k}", slots=1, memory_mb=40_000 + k, gpu=True)
    epoch = _epoch(world)
    calls: list[str] = []
    real = placement._make_room

    def counted(session: SessionRecord, *args: object) -> bool:
        calls.append(session.session_id)
        return real(session, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(placement, "_make_room", counted)
    preferred = {"h0": ["b0"], "h1": ["b1"]}
    events = place_sessions(
        _sessions(world.state), epoch, _pool(world.state, epoch), preferred, make_room=True
    )
    assert sorted(ev.session_id for ev in of_type(events, SessionUnplaced)) == [
        f"z{k}" for k in range(6)
    ]
    assert calls == ["z0"]
