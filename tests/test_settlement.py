"""Settlement math: misses, punishment, rewards, maintenance credit, late work."""

from __future__ import annotations

import pytest
from planner_world import T0, World, of_type, quick_config

from cluster.master.config import PlannerConfig
from cluster.master.epochs import epoch_record, next_epoch
from cluster.master.liveness import EMPTY_BOOK
from cluster.master.planner import Planner, plan
from cluster.master.settlement import NO_WORK_REASON, late_work, missed_work, settle_epoch
from cluster.shared.events import (
    MASTER_ORIGIN,
    DevshardPlaced,
    EpochSettled,
    EpochStarted,
    Event,
    LateWorkSettled,
    MaintenanceCancelled,
    MaintenanceFinished,
    MaintenanceOverrun,
    MaintenanceStarted,
    NodeDisconnected,
    NodePayout,
    SessionDeleted,
    SlotAssignment,
    WorkMissed,
)
from cluster.shared.maintenance_policy import MaintenancePolicy
from cluster.shared.state import CLOSED_WINDOWS_KEPT_PER_NODE, EMPTY_NODE_LEDGER, EpochRecord

CFG = quick_config()  # miss_threshold=1
POLICY = MaintenancePolicy()  # credit per epoch and cap: the maintenance policy's


def _world(slots: dict[str, list[str]], reward_per_unit: int = 3) -> tuple[World, EpochRecord]:
    """Nodes a, b, c; one devshard per session in `slots` (session -> node per slot)."""
    world = World()
    for node in ("a", "b", "c"):
        world.node(node, slots=4)
    world.tick(1_000)
    start = next_epoch(world.state, world.now, CFG)
    world.master([start])
    for sid, nodes in slots.items():
        world.session(sid, slots=len(nodes), reward_per_unit=reward_per_unit)
        world.master(
            [
                DevshardPlaced(
                    devshard_id=f"ds-1-{sid}",
                    session_id=sid,
                    epoch=1,
                    assignments=tuple(SlotAssignment(i, n) for i, n in enumerate(nodes)),
                    ends_ms=start.end_ms,
                )
            ]
        )
    return world, epoch_record(start)


def _end_of_epoch(
    world: World, epoch: EpochRecord, cfg: PlannerConfig = CFG, policy: MaintenancePolicy = POLICY
) -> list[Event]:
    world.now = epoch.end_ms
    events = plan(world.state, world.now, EMPTY_BOOK, cfg, policy=policy).events
    world.master(events)
    return events


def _payouts(events: list[Event]) -> dict[str, NodePayout]:
    (settled,) = of_type(events, EpochSettled)
    return {p.node_id: p for p in settled.payouts}


def test_unpunished_nodes_are_paid_and_earn_credit() -> None:
    world, epoch = _world({"s": ["a", "b"]})
    world.work("a", "ds-1-s", 5, 1)
    world.work("b", "ds-1-s", 2, 1)
    world.work("a", "ds-1-s", 1, 1)
    events = _end_of_epoch(world, epoch)
    assert of_type(events, WorkMissed) == []
    pay = _payouts(events)
    assert pay["a"] == NodePayout(
        node_id="a", units=6, reward=18, punished=False, credit_earned_ms=POLICY.credit_per_epoch_ms
    )
    assert pay["b"].reward == 6 and not pay["b"].punished
    # c served nothing but stayed connected all epoch: credit, no reward.
    assert pay["c"] == NodePayout(
        node_id="c", units=0, reward=0, punished=False, credit_earned_ms=POLICY.credit_per_epoch_ms
    )
    assert world.state.credit_ms_by_node["a"] == POLICY.credit_per_epoch_ms
    assert world.state.ledgers[1].settled


def test_misses_above_the_threshold_forfeit_the_reward() -> None:
    # b holds two slots of "s" and reports nothing for it: 2 misses > threshold 1.
    world, epoch = _world({"s": ["a", "b", "b"], "t": ["b"]})
    world.work("a", "ds-1-s", 4, 1)
    world.work("b", "ds-1-t", 7, 1)
    events = _end_of_epoch(world, epoch)
    misses = of_type(events, WorkMissed)
    assert misses == [
        WorkMissed(devshard_id="ds-1-s", node_id="b", epoch=1, count=2, reason=NO_WORK_REASON)
    ]
    pay = _payouts(events)
    assert pay["b"].punished and pay["b"].reward == 0 and pay["b"].units == 7
    assert pay["b"].credit_earned_ms == 0
    assert "2 unexcused missed slot(s), above the threshold of 1" in pay["b"].reason
    assert not pay["a"].punished and pay["a"].reward == 12
    assert world.state.ledgers[1].nodes["b"].misses == 2


def test_misses_at_the_threshold_are_tolerated() -> None:
    world, epoch = _world({"s": ["a", "b"]})
    world.work("a", "ds-1-s", 1, 1)
    pay = _payouts(_end_of_epoch(world, epoch))
    assert not pay["b"].punished and pay["b"].credit_earned_ms == POLICY.credit_per_epoch_ms


def test_misses_reported_by_runners_count_too() -> None:
    world, epoch = _world({"s": ["a"]})
    world.work("a", "ds-1-s", 3, 1)
    world.add("a", WorkMissed(devshard_id="ds-1-s", node_id="a", epoch=1, count=2, reason="oom"))
    pay = _payouts(_end_of_epoch(world, epoch))
    assert pay["a"].punished and pay["a"].reward == 0


def test_unexcused_disconnect_forfeits_even_after_rejoining() -> None:
    world, epoch = _world({"s": ["a"]})
    world.work("a", "ds-1-s", 3, 1)
    world.master([NodeDisconnected(node_id="a", reason="no events for 3 cycles")])
    world.heartbeat("a")  # back again, still punished for this epoch
    pay = _payouts(_end_of_epoch(world, epoch))
    assert pay["a"].punished and pay["a"].reward == 0 and pay["a"].units == 3
    assert pay["a"].reason == "unexcused disconnect: no events for 3 cycles"


def test_maintenance_excuses_misses_and_offline_time() -> None:
    world, epoch = _world({"s": ["a", "a"]})
    world.window("a", start_ms=world.now, duration_ms=epoch.end_ms - world.now + 60_000, start=True)
    world.master([NodeDisconnected(node_id="a", reason="offline for maintenance", excused=True)])
    events = _end_of_epoch(world, epoch)
    (miss,) = of_type(events, WorkMissed)
    assert miss.node_id == "a" and miss.excused
    pay = _payouts(events)
    # Not punished, no reward, no credit (it did not complete the epoch): nothing to pay.
    assert "a" not in pay
    assert world.state.ledgers[1].node("a").misses == 0


def test_a_node_offline_in_maintenance_all_epoch_earns_no_credit() -> None:
    """A host that powers off in its window stays connected (quiet but excused): that
    epoch is time off, not service, so it earns no credit -- like a host whose worker shut
    down cleanly (test above). b, with no window, earns as before."""
    world, epoch = _world({})
    world.window("a", start_ms=world.now, duration_ms=2 * (epoch.end_ms - world.now), start=True)
    assert world.state.nodes["a"].connected
    pay = _payouts(_end_of_epoch(world, epoch))
    assert "a" not in pay
    assert pay["b"].credit_earned_ms == POLICY.credit_per_epoch_ms
    assert world.state.credit_ms_by_node.get("a", 0) == 0


@pytest.mark.parametrize("how", ["finished", "not-yet-started", "overrun"])
def test_maintenance_during_part_of_the_epoch_earns_no_credit_for_staying(how: str) -> None:
    """A window active for part of the epoch (finished mid-epoch, overrun, or past its start
    with the planner's MaintenanceStarted not yet applied): staying connected earns nothing."""
    world, epoch = _world({})
    world.tick(10_000)
    if how == "not-yet-started":
        world.window("a", start_ms=epoch.end_ms - 5_000, duration_ms=60_000)
    else:
        window_id = world.window("a", start_ms=world.now, duration_ms=5_000, start=True)
        world.tick(5_000)
        closing: Event = (
            MaintenanceFinished(window_id=window_id, node_id="a", how="host")
            if how == "finished"
            else MaintenanceOverrun(window_id=window_id, node_id="a")
        )
        world.master([closing])
    pay = _payouts(_end_of_epoch(world, epoch))
    assert "a" not in pay
    assert pay["c"].credit_earned_ms == POLICY.credit_per_epoch_ms


def test_free_schedule_cancel_rounds_do_not_erase_a_window_that_stops_credit() -> None:
    """A node keeps 16 closed windows; cancelling a SCHEDULED one is free. Dropped oldest
    first, 16 schedule/cancel rounds erased the window a finished a moment ago, and the
    epoch it spent partly in maintenance earned credit after all."""
    world, epoch = _world({})
    window_id = world.window("a", start_ms=world.now, duration_ms=5_000, start=True)
    world.tick(5_000)
    world.master([MaintenanceFinished(window_id=window_id, node_id="a", how="host")])
    for _ in range(CLOSED_WINDOWS_KEPT_PER_NODE):
        later = world.window("a", start_ms=epoch.end_ms + 3_600_000, duration_ms=60_000)
        world.master([MaintenanceCancelled(window_id=later, node_id="a")])
    assert window_id in world.state.windows
    pay = _payouts(_end_of_epoch(world, epoch))
    assert "a" not in pay
    assert pay["b"].credit_earned_ms == POLICY.credit_per_epoch_ms


def test_a_window_started_late_by_the_planner_stops_credit_from_its_declared_start() -> None:
    """The excuse rule excuses a node from its window's declared start; a MaintenanceStarted
    logged only after the epoch's end (a restarted master's grace) must not make the epoch
    look maintenance-free."""
    world, epoch = _world({})
    world.window("a", start_ms=epoch.end_ms - 10_000, duration_ms=60_000)
    world.now = epoch.end_ms + 2_000
    (window_id,) = world.state.open_window_by_node.values()
    world.master([MaintenanceStarted(window_id=window_id, node_id="a")])
    assert world.state.windows[window_id].started_ms > epoch.end_ms
    events = plan(world.state, world.now, EMPTY_BOOK, CFG, policy=POLICY).events
    world.master(events)
    pay = _payouts(events)
    assert "a" not in pay and pay["b"].credit_earned_ms == POLICY.credit_per_epoch_ms


def test_cancelled_or_later_windows_do_not_stop_credit() -> None:
    """A window cancelled before it began, or one that begins after the epoch, takes
    nothing from the epoch's credit; a node that served work earns credit whatever."""
    world, epoch = _world({"s": ["b"]})
    cancelled = world.window("a", start_ms=world.now + 20_000, duration_ms=60_000)
    world.master([MaintenanceCancelled(window_id=cancelled, node_id="a")])
    world.window("c", start_ms=epoch.end_ms, duration_ms=60_000)
    world.window("b", start_ms=world.now, duration_ms=5_000, start=True)
    world.work("b", "ds-1-s", 2, 1)
    pay = _payouts(_end_of_epoch(world, epoch))
    assert pay["a"].credit_earned_ms == POLICY.credit_per_epoch_ms
    assert pay["c"].credit_earned_ms == POLICY.credit_per_epoch_ms
    assert pay["b"].credit_earned_ms == POLICY.credit_per_epoch_ms  # served: completed it


def test_devshard_replaced_just_before_the_end_is_not_judged() -> None:
    world, epoch = _world({})
    world.session("late", slots=1)
    world.now = epoch.end_ms - CFG.effective_miss_grace_ms + 1
    world.master(
        [
            DevshardPlaced(
                devshard_id="ds-1-late",
                session_id="late",
                epoch=1,
                assignments=(SlotAssignment(0, "b"),),
                ends_ms=epoch.end_ms,
                reason="replace",
            )
        ]
    )
    assert missed_work(world.state, epoch, epoch.end_ms, CFG) == []


def test_credit_is_capped() -> None:
    cfg = CFG
    policy = MaintenancePolicy(
        credit_per_epoch_ms=360_000, credit_cap_ms=500_000, initial_credit_ms=0
    )
    world, epoch = _world({"s": ["a"]})
    world.work("a", "ds-1-s", 1, 1)
    first = _payouts(_end_of_epoch(world, epoch, cfg, policy))
    assert first["a"].credit_earned_ms == 360_000
    world.tick(1_000)
    epoch2 = world.state.epoch
    assert epoch2 is not None
    world.heartbeat("a", "b", "c")
    second = _payouts(_end_of_epoch(world, epoch2, cfg, policy))
    assert second["a"].credit_earned_ms == 140_000  # up to the cap, not beyond
    assert world.state.credit_ms_by_node["a"] == 500_000
    epoch3 = world.state.epoch
    assert epoch3 is not None
    third = _end_of_epoch(world, epoch3, cfg, policy)
    assert "a" not in _payouts(third)  # nothing earned, nothing to record


def test_this_cycles_disconnect_counts_in_the_settlement() -> None:
    world, epoch = _world({"s": ["a"]})
    world.work("a", "ds-1-s", 3, 1)
    leaving = NodeDisconnected(node_id="a", reason="no events for 3 cycles")
    settled = settle_epoch(world.state, epoch, CFG, new_disconnects=[leaving])
    pay = {p.node_id: p for p in settled.payouts}
    assert pay["a"].punished and pay["a"].reward == 0


def test_late_work_is_paid_to_unpunished_nodes_once() -> None:
    world, epoch = _world({"s": ["a", "b", "b"]})
    world.work("a", "ds-1-s", 1, 1)
    _end_of_epoch(world, epoch)  # b punished (2 misses), a not
    world.add(MASTER_ORIGIN, SessionDeleted(session_id="s"))
    world.work("a", "ds-1-s", 4, 1)  # late: priced at the devshard's rate (3)
    world.work("b", "ds-1-s", 2, 1)
    late = late_work(world.state, CFG)
    assert late == [
        LateWorkSettled(epoch=1, node_id="a", units=4, reward=12),
        LateWorkSettled(epoch=1, node_id="b", units=2, reward=0),
    ]
    world.master(late)
    ledger = world.state.ledgers[1]
    assert ledger.nodes["a"].late_paid == 12 and ledger.node("b").late_paid == 0
    assert late_work(world.state, CFG) == []  # decided once
    world.work("a", "ds-1-s", 1, 1)
    assert late_work(world.state, CFG) == [LateWorkSettled(epoch=1, node_id="a", units=1, reward=3)]


def test_late_work_through_the_planner_and_when_not_paid() -> None:
    world, epoch = _world({"s": ["a"]})
    world.work("a", "ds-1-s", 1, 1)
    _end_of_epoch(world, epoch)
    world.work("a", "ds-1-s", 2, 1)
    world.tick(1_000)
    events = plan(world.state, world.now, EMPTY_BOOK, CFG).events
    assert of_type(events, LateWorkSettled) == [
        LateWorkSettled(epoch=1, node_id="a", units=2, reward=6)
    ]
    unpaid = quick_config(pay_late_work=False)
    assert late_work(world.state, unpaid) == [
        LateWorkSettled(epoch=1, node_id="a", units=2, reward=0)
    ]


def test_late_work_forfeited_once_is_not_paid_by_a_later_decision() -> None:
    """Late work decided unpaid (pay_late_work off, say, then the master restarted with it
    on) stays forfeited: the next decision pays only the late work that came after."""
    world, epoch = _world({"s": ["a"]})
    world.work("a", "ds-1-s", 1, 1)
    _end_of_epoch(world, epoch)
    world.work("a", "ds-1-s", 5, 1)  # late, 15 at the devshard's rate (3)
    unpaid = quick_config(pay_late_work=False)
    forfeited = late_work(world.state, unpaid)
    assert forfeited == [LateWorkSettled(epoch=1, node_id="a", units=5, reward=0)]
    world.master(forfeited)
    assert late_work(world.state, CFG) == []  # decided: nothing pending to pay
    world.work("a", "ds-1-s", 1, 1)
    later = late_work(world.state, CFG)
    assert later == [LateWorkSettled(epoch=1, node_id="a", units=1, reward=3)]
    world.master(later)
    account = world.state.ledgers[1].node("a")
    assert (account.late_units, account.late_reward, account.late_paid) == (6, 18, 3)
    assert account.late_decided_reward == 18 and late_work(world.state, CFG) == []


def test_a_late_replacement_exempts_only_the_nodes_it_gives_slots_to() -> None:
    # a keeps slot 0; b holds slot 1 since the start and is given slot 2 just before the end.
    world, epoch = _world({"s": ["a", "b", "c"]})
    world.work("a", "ds-1-s", 1, 1)
    world.now = epoch.end_ms - CFG.effective_miss_grace_ms + 1
    late = ("a", "b", "b")
    world.master(
        [
            DevshardPlaced(
                devshard_id="ds-1-s",
                session_id="s",
                epoch=1,
                assignments=tuple(SlotAssignment(i, n) for i, n in enumerate(late)),
                ends_ms=epoch.end_ms,
                reason="replace",
            )
        ]
    )
    # Only b's early slot is judged; its new one may still be loading.
    assert missed_work(world.state, epoch, epoch.end_ms, CFG) == [
        WorkMissed(devshard_id="ds-1-s", node_id="b", epoch=1, count=1, reason=NO_WORK_REASON)
    ]
    assert world.state.devshards["ds-1-s"].assigned_ms == (T0 + 1_000, T0 + 1_000, world.now)


def _two_nodes_two_slots_each() -> tuple[World, Planner, EpochStarted, DevshardPlaced]:
    """Nodes A and B with two slots each, and a four-slot session placed on them in epoch 1."""
    world = World()
    world.node("A", slots=2)
    world.node("B", slots=2)
    world.session("s", slots=4)
    planner = Planner(CFG)
    events = world.cycle(planner)
    (started,) = of_type(events, EpochStarted)
    (placed,) = of_type(events, DevshardPlaced)
    return world, planner, started, placed


def test_a_node_silent_all_epoch_is_judged_despite_a_late_replacement_beside_it() -> None:
    """A and B hold two slots each; B never works. A goes silent just before the end and its
    slots move to C: C is exempt (its runners may be loading), B is still punished."""
    world, planner, started, placed = _two_nodes_two_slots_each()
    assert sorted(a.node_id for a in placed.assignments) == ["A", "A", "B", "B"]
    world.node("C", slots=2)  # room for A's slots, joined after the placement
    world.work("A", placed.devshard_id, 100, 1)
    silent_from = started.end_ms - CFG.effective_miss_grace_ms + 1
    settled: list[EpochSettled] = []
    moved: list[tuple[int, DevshardPlaced]] = []
    misses: list[WorkMissed] = []
    while not settled:
        world.heartbeat_all(*(("A",) if world.now >= silent_from else ()))
        events = world.cycle(planner)
        moved += [(world.now, p) for p in of_type(events, DevshardPlaced) if p.reason == "replace"]
        misses += of_type(events, WorkMissed)
        settled += of_type(events, EpochSettled)
    ((moved_ms, replace),) = moved
    assert started.end_ms - moved_ms < CFG.effective_miss_grace_ms
    assert sorted(a.node_id for a in replace.assignments) == ["B", "B", "C", "C"]
    assert [(m.node_id, m.count, m.excused) for m in misses] == [("B", 2, False)]
    pay = {p.node_id: p for p in settled[0].payouts}
    assert pay["B"].punished and "2 unexcused missed slot(s)" in pay["B"].reason
    assert not pay["C"].punished


def test_a_window_starting_at_the_epoch_end_does_not_excuse_the_epoch_before_it() -> None:
    """B books a window that starts when its devshard ends (the drain rule allows it, the
    master's earliest start suggests it), then does no work in that last epoch."""
    world, planner, started, placed = _two_nodes_two_slots_each()
    world.window("B", start_ms=placed.ends_ms, duration_ms=30 * 60_000)
    world.work("A", placed.devshard_id, 100, 1)
    while world.now < started.end_ms:
        world.heartbeat_all()
        events = world.cycle(planner)
    assert [(m.node_id, m.count, m.excused) for m in of_type(events, WorkMissed)] == [
        ("B", 2, False)
    ]
    pay = _payouts(events)
    assert pay["B"].punished and pay["B"].reward == 0


@pytest.mark.parametrize(
    ("starts_before_end_ms", "duration_ms"),
    [(10_000, 60_000), (20_000, 20_000)],
    ids=["begins-inside-the-epoch", "ends-exactly-at-the-epoch-end"],
)
def test_a_window_covering_the_epoch_end_excuses_its_misses(
    starts_before_end_ms: int, duration_ms: int
) -> None:
    world, epoch = _world({"s": ["a", "b", "b"]})
    world.work("a", "ds-1-s", 1, 1)
    world.now = epoch.end_ms - starts_before_end_ms
    world.window("b", start_ms=world.now, duration_ms=duration_ms, start=True)
    events = _end_of_epoch(world, epoch)
    (miss,) = of_type(events, WorkMissed)
    assert (miss.node_id, miss.count, miss.excused) == ("b", 2, True)
    # Not punished (a punished node is listed), and no credit: part of it was maintenance.
    assert "b" not in _payouts(events)


# --------------------------------------------------------------------------------------------
# Work counts only on a devshard the node held a slot of in the epoch it names
# --------------------------------------------------------------------------------------------


def _replace_slots(world: World, devshard_id: str, epoch: int, nodes: list[str]) -> None:
    """Re-place `devshard_id` (session "s") with slot i on `nodes[i]`, as the planner does
    when slots move off a lost node."""
    world.master(
        [
            DevshardPlaced(
                devshard_id=devshard_id,
                session_id="s",
                epoch=epoch,
                assignments=tuple(SlotAssignment(i, n) for i, n in enumerate(nodes)),
                ends_ms=world.state.epoch.end_ms if world.state.epoch else 0,
                reason="replace",
            )
        ]
    )


def test_work_on_a_devshard_the_node_never_held_is_not_paid() -> None:
    """A node that failed its self-test holds no slot, yet reports work on a real devshard
    and on a made-up one (admission only bounds the units): neither is paid, and the nodes
    that held the slots are paid as before."""
    world = World()
    world.node("a", slots=2)
    world.node("b", slots=2)
    world.node("c", slots=2, self_test=False)  # never eligible: holds no slot
    world.session("s", slots=2, reward_per_unit=1_000)
    planner = Planner(quick_config())
    (placed,) = of_type(world.cycle(planner), DevshardPlaced)
    assert {a.node_id for a in placed.assignments} == {"a", "b"}
    world.work("c", placed.devshard_id, 50, 1)
    world.work("c", "made-up", 2**40, 1)
    world.work("a", placed.devshard_id, 10, 1)
    world.work("b", placed.devshard_id, 10, 1)
    assert world.state.ledgers[1].node("c") == EMPTY_NODE_LEDGER
    settled: list[EpochSettled] = []
    while not settled:
        world.heartbeat_all()
        settled = of_type(world.cycle(planner), EpochSettled)
    pay = {p.node_id: p for p in settled[0].payouts}
    assert (pay["a"].units, pay["a"].reward) == (pay["b"].units, pay["b"].reward) == (10, 10_000)
    assert (pay["c"].units, pay["c"].reward) == (0, 0)  # only credit: it stayed connected


def test_late_work_counts_only_on_a_devshard_the_node_held_in_that_epoch() -> None:
    world, epoch = _world({"s": ["a"]})
    world.work("a", "ds-1-s", 1, 1)
    _end_of_epoch(world, epoch)  # epoch 1 settled; epoch 2 placed "ds-2-s"
    _replace_slots(world, "ds-2-s", 2, ["c"])
    # c held nothing in epoch 1: neither epoch 1's devshard nor its own epoch-2 devshard
    # (not placed in epoch 1) books late work there.
    world.work("c", "ds-1-s", 5, 1)
    world.work("c", "ds-2-s", 5, 1)
    world.work("a", "ds-1-s", 2, 1)  # a's own late work still counts
    c = world.state.ledgers[1].node("c")  # settled: credit, no units
    assert (c.units, c.late_units, c.late_reward) == (0, 0, 0)
    assert late_work(world.state, CFG) == [LateWorkSettled(epoch=1, node_id="a", units=2, reward=6)]
    world.work("c", "ds-2-s", 5, 2)  # on time, where it holds the slot
    assert world.state.ledgers[2].node("c").units == 5


def test_a_moved_slot_still_pays_its_old_holder_for_the_work_before_the_move() -> None:
    world, epoch = _world({"s": ["a", "b"]})
    _replace_slots(world, "ds-1-s", 1, ["a", "c"])  # b is lost: its slot moves to c
    world.work("b", "ds-1-s", 4, 1)  # done before the move, reported after (reconnected)
    world.work("c", "ds-1-s", 3, 1)
    world.work("a", "ds-1-s", 1, 1)
    pay = _payouts(_end_of_epoch(world, epoch))
    assert {n: (p.units, p.reward) for n, p in pay.items()} == {
        "a": (1, 3),
        "b": (4, 12),
        "c": (3, 9),
    }
    world.work("b", "ds-1-s", 1, 1)  # and late, after the devshard was finalized
    assert late_work(world.state, CFG) == [LateWorkSettled(epoch=1, node_id="b", units=1, reward=3)]


def test_a_carried_over_runner_is_paid_for_both_devshards() -> None:
    """At an epoch turn a loaded runner moves from the finalized devshard to its successor;
    its last report names the old devshard and epoch (late), later ones the new."""
    world = World()
    world.node("a", slots=1)
    world.session("s", slots=1, reward_per_unit=2)
    planner = Planner(quick_config())
    (first,) = of_type(world.cycle(planner), DevshardPlaced)
    world.work("a", first.devshard_id, 3, 1)
    second: list[DevshardPlaced] = []
    while not second:
        world.heartbeat_all()
        second = of_type(world.cycle(planner), DevshardPlaced)
    assert second[0].epoch == 2 and first.devshard_id not in world.state.devshards
    world.work("a", first.devshard_id, 4, 1)  # reported on the switch, after settlement
    world.work("a", second[0].devshard_id, 5, 2)
    ledgers = world.state.ledgers
    assert (ledgers[1].node("a").units, ledgers[1].node("a").late_units) == (3, 4)
    assert (ledgers[2].node("a").units, ledgers[2].node("a").reward) == (5, 10)
    assert late_work(world.state, CFG) == [LateWorkSettled(epoch=1, node_id="a", units=4, reward=8)]
