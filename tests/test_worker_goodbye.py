"""A worker that stops cleanly says goodbye (`NodeStopping`), and the master says so.

A reviewer found that a clean SIGTERM of a worker logged on the master, 3 cycles later,
exactly what a kill -9 logs ("no events for 3 cycles ...; unexcused ..."): an operator could
not tell a planned stop from a crash, and the node's slots waited K cycles to be re-placed.
Now the worker's last event is a goodbye. It changes the words, not the timing: a node that
said goodbye and is not back within the K stale cycles is disconnected with a reason saying
it was stopped by its operator; one restarted within them (an upgrade) is not disconnected,
as before goodbyes. The excuse rule is unchanged: outside a maintenance window the
disconnect forfeits the epoch, inside it the node is excused.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest
from embedded_nodes import embedded_cluster, until_self_tested
from planner_world import World, of_type, quick_config

from cluster.control import MaintenanceFinish, NodeRemove
from cluster.master.admission import AdmissionError, check_worker_batch, check_worker_event
from cluster.master.decision_log import decision_lines
from cluster.master.liveness import EMPTY_BOOK, check_liveness
from cluster.master.placement import STOPPING
from cluster.master.planner import Planner
from cluster.master.requests import LOCAL_OPERATOR, decide
from cluster.shared.codec import decode_state, encode_state
from cluster.shared.events import (
    DevshardPlaced,
    EpochStarted,
    Event,
    MaintenanceFinished,
    MaintenanceOverrun,
    MaintenanceScheduled,
    MaintenanceStarted,
    NodeConnected,
    NodeDisconnected,
    NodeHeartbeat,
    NodeStopping,
    SessionUnplaced,
)
from cluster.shared.excuse import is_excused
from cluster.shared.maintenance_policy import MaintenancePolicy
from cluster.shared.state import State, WindowState
from cluster.worker.node import goodbye_words

A, B = "12D3KooWnodeA", "12D3KooWnodeB"
BOOT = "boot-1"
CFG = quick_config()
HOUR = 3_600_000


def _world() -> World:
    """Nodes A and B, each connected by a hello of its worker process `BOOT`."""
    world = World()
    for node in (A, B):
        world.node(node)
        world.master([NodeConnected(node_id=node, boot_id=BOOT)])
    return world


def _goodbye(world: World, node: str = A, boot_id: str = BOOT) -> State:
    return world.add(node, NodeStopping(node_id=node, boot_id=boot_id, reason="got SIGTERM"))


# --------------------------------------------------------------------------------------------
# The reducer
# --------------------------------------------------------------------------------------------


def test_a_goodbye_marks_the_node_stopping_until_it_is_disconnected() -> None:
    world = _world()
    state = _goodbye(world)
    rec = state.nodes[A]
    assert rec.connected and rec.stopping_idx == state.last_applied
    assert rec.stopping_reason == "got SIGTERM"
    assert state.last_event_index(A) == state.last_applied  # it is liveness, like any event
    assert decode_state(encode_state(state)) == state  # the mark survives a snapshot
    # A last heartbeat of the same process leaves the mark.
    assert world.add(A, NodeHeartbeat(node_id=A)).nodes[A].stopping_idx == rec.stopping_idx
    # The disconnect clears it: a node that speaks again rejoins unmarked.
    world.master([NodeDisconnected(node_id=A, reason="stopped by its operator")])
    assert world.state.nodes[A].stopping_idx == 0
    state = world.add(A, NodeHeartbeat(node_id=A))
    assert state.nodes[A].connected and state.nodes[A].stopping_idx == 0
    assert state.nodes[A].stopping_reason == ""


def test_a_goodbye_of_another_worker_process_marks_nothing() -> None:
    """A goodbye the master did not acknowledge stays in the outbox and is resent by the
    next worker process, after that process's hello: the node is back, not stopping."""
    world = _world()
    world.master([NodeConnected(node_id=A, boot_id="boot-2")])  # restarted
    assert _goodbye(world, boot_id=BOOT).nodes[A].stopping_idx == 0


def test_a_goodbye_with_an_empty_boot_id_marks_nothing() -> None:
    """A hello may carry no boot id (an older or custom worker): "" would match the record
    of the next process of such a worker too, and mark a restarted node as stopping."""
    world = World()
    world.node(A)
    world.master([NodeConnected(node_id=A, boot_id="")])
    assert world.state.nodes[A].boot_id == ""
    assert _goodbye(world, boot_id="").nodes[A].stopping_idx == 0


def test_a_hello_of_another_worker_process_clears_the_mark_and_a_redial_keeps_it() -> None:
    world = _world()
    idx = _goodbye(world).nodes[A].stopping_idx
    # The stopping process dialled again (its goodbye not yet acknowledged): still stopping.
    world.master([NodeConnected(node_id=A, boot_id=BOOT)])
    assert world.state.nodes[A].stopping_idx == idx
    # Restarted before the planner's cycle came round: the new process is not stopping.
    world.master([NodeConnected(node_id=A, boot_id="boot-2")])
    assert world.state.nodes[A].stopping_idx == 0


def test_a_worker_may_say_goodbye_only_for_its_own_node() -> None:
    mine = NodeStopping(node_id=A, boot_id=BOOT, reason="got SIGTERM")
    check_worker_event(A, 1, mine)
    check_worker_batch(A, [(1, NodeHeartbeat(node_id=A)), (2, mine)])
    with pytest.raises(AdmissionError, match=f"peer {B} may not speak for node {A}") as exc:
        check_worker_event(B, 1, mine)
    assert exc.value.code == "forbidden-origin"


# --------------------------------------------------------------------------------------------
# The planner
# --------------------------------------------------------------------------------------------


def _placed_epoch(world: World, planner: Planner) -> None:
    """An epoch with the session placed, A holding some of its slots, A and B live."""
    world.session("chat", slots=2)
    world.cycle(planner)  # the epoch starts, the session is placed
    assert world.state.epoch is not None
    assert any(a.node_id == A for d in world.state.devshards.values() for a in d.assignments)
    world.heartbeat(A, B)
    world.cycle(planner)


def test_a_node_that_said_goodbye_is_disconnected_after_the_stale_cycles_as_stopped() -> None:
    """The goodbye changes the words of the disconnect, not its timing: a node that said
    goodbye and stays silent is disconnected when a silent node would be, K cycles on."""
    world = _world()
    planner = Planner(CFG)
    _placed_epoch(world, planner)
    state = _goodbye(world)
    goodbye_idx = state.last_applied
    events: list[Event] = []
    cycles = 0
    while not of_type(events, NodeDisconnected):
        assert cycles <= CFG.stale_cycles, "not disconnected after the stale cycles"
        world.heartbeat(B)
        decided_on, now = world.state, world.now + CFG.plan_interval_ms
        events = world.cycle(planner)
        cycles += 1
    # One cycle sees the goodbye's index move, then K idle ones: as for a crash, not sooner.
    assert cycles == CFG.stale_cycles + 1, cycles
    (gone,) = of_type(events, NodeDisconnected)
    seconds = CFG.stale_cycles * CFG.plan_interval_ms / 1000
    assert gone.node_id == A and not gone.excused
    assert gone.reason == (
        f"stopped by its operator (got SIGTERM); its worker said goodbye at event index "
        f"{goodbye_idx} and was not back within {CFG.stale_cycles} cycles ({seconds:g}s)"
    )
    # Its slots move off it in the same cycle.
    (moved,) = of_type(events, DevshardPlaced)
    assert moved.reason == "replace" and all(a.node_id != A for a in moved.assignments)
    # The excuse rules are the ones of any disconnect: outside a window, the epoch is lost.
    epoch = world.state.epoch
    assert epoch is not None
    assert world.state.ledgers[epoch.epoch].node(A).disconnect == gone.reason
    # What the master's log says: a planned stop, not a crash.
    (line,) = [
        line.message
        for line in decision_lines(events, decided_on, now)
        if line.message.startswith(f"node {A}")
    ]
    assert line.startswith(f"node {A} disconnected: stopped by its operator (got SIGTERM)"), line
    assert f"unexcused: it forfeits its reward for epoch {epoch.epoch}" in line, line
    assert "(a stop inside the node's maintenance window is excused)" in line, line
    assert "no events for" not in line, line


def test_a_quick_restart_after_a_goodbye_is_not_disconnected() -> None:
    """A worker stopped to be upgraded and back within the stale cycles keeps its epoch, as
    it did before workers said goodbye: its new process's hello clears the mark, and nothing
    is decided -- no disconnect, no forfeit, its slots stay."""
    world = _world()
    planner = Planner(CFG)
    _placed_epoch(world, planner)
    held = {d.devshard_id for d in world.state.devshards.values() for a in d.assignments}
    _goodbye(world)
    events: list[Event] = []
    for _ in range(CFG.stale_cycles):  # gone for all but the last of its K + 1 cycles
        world.heartbeat(B)
        events += world.cycle(planner)
    world.master([NodeConnected(node_id=A, boot_id="boot-2")])  # the upgraded worker
    assert world.state.nodes[A].stopping_idx == 0
    for _ in range(3 * CFG.stale_cycles):
        world.heartbeat(A, B)
        events += world.cycle(planner)
    assert of_type(events, NodeDisconnected) == [], events
    assert of_type(events, DevshardPlaced) == [], events
    rec = world.state.nodes[A]
    assert rec.connected and rec.boot_id == "boot-2"
    epoch = world.state.epoch
    assert epoch is not None
    assert world.state.ledgers[epoch.epoch].node(A).disconnect is None
    assert {d.devshard_id for d in world.state.devshards.values() for a in d.assignments} == held


def test_a_node_that_said_goodbye_keeps_its_slots_but_takes_no_new_ones() -> None:
    """Between its goodbye and its disconnect (or its new process's hello) a node keeps what
    it holds -- a quick restart loses nothing -- but nothing new is placed there: it was
    drawn like any fresh node, and a session placed on it in those cycles started on a node
    whose worker was gone."""
    world = _world()
    planner = Planner(CFG)
    _placed_epoch(world, planner)
    held = {(d.devshard_id, a.slot) for d in world.state.devshards.values() for a in d.assignments}
    _goodbye(world)
    for _ in range(2):
        world.heartbeat(B)
        world.cycle(planner)
    # Idle for a third cycle, A is no longer fresh either (and not yet disconnected): the
    # reason still says why it takes nothing.
    assert CFG.fresh_idle_cycles < 2 < CFG.stale_cycles
    world.session("late", slots=6)  # more than B's room (4 slots, one held): A is needed
    world.heartbeat(B)
    events = world.cycle(planner)
    assert of_type(events, DevshardPlaced) == [], events
    (unplaced,) = of_type(events, SessionUnplaced)
    assert f"1 node(s) {STOPPING}" in unplaced.reason, unplaced.reason
    assert {
        (d.devshard_id, a.slot) for d in world.state.devshards.values() for a in d.assignments
    } == held  # A kept its slot of "chat"
    world.master([NodeConnected(node_id=A, boot_id="boot-2")])  # back: eligible again
    world.heartbeat(A, B)
    world.cycle(planner)
    assert any(
        a.node_id == A
        for d in world.state.devshards.values()
        if d.session_id == "late"
        for a in d.assignments
    )


def test_a_stopping_node_inside_its_window_stays_excused() -> None:
    world = _world()
    duration = 20 * CFG.plan_interval_ms
    window_id = world.window(A, start_ms=world.now, duration_ms=duration, start=True)
    _goodbye(world)
    book = EMPTY_BOOK
    for _ in range(2 * CFG.stale_cycles):
        world.tick(CFG.plan_interval_ms)
        world.heartbeat(B)
        events, book = check_liveness(world.state, book, world.now, CFG)
        assert events == [], "a node stopped inside its window was disconnected"
        world.master(events)
    assert world.state.nodes[A].connected
    # Once the window is over (here: overrun) the stop is judged as any other: its silent
    # cycles counted on through the window, so at once, and with the goodbye's words.
    world.tick(duration)
    # The log's line for it, decided with the overrun in one cycle (the window is still open
    # in the state decided on): the hint says the window ran out, not "stop inside one".
    events, _ = check_liveness(world.state, book, world.now, CFG)
    [line] = [
        ln.message
        for ln in decision_lines([*events], world.state, world.now)
        if ln.message.startswith(f"node {A} disconnected")
    ]
    assert f"(its maintenance window {window_id} ended at " in line, line
    assert "before it was back: a stop is excused only inside its window)" in line, line
    world.master([MaintenanceOverrun(window_id=window_id, node_id=A)])
    events, book = check_liveness(world.state, book, world.now, CFG)
    assert [(e.node_id, e.excused) for e in events] == [(A, False)]
    assert events[0].reason.startswith("stopped by its operator (got SIGTERM)")
    assert "no events for" not in events[0].reason


def test_finishing_the_window_of_a_node_stopped_in_it_disconnects_it_excused() -> None:
    """An operator review followed the removal advice: a worker stopped in its window,
    `cluster node remove` refused ("finish the window"), `cluster maintenance finish --node`;
    the next cycle disconnected the node unexcused, "it forfeits its reward for epoch 13 (a
    stop inside the node's maintenance window is excused)". It did stop inside its window:
    the finish now disconnects it in the same decision, excused, and it can be removed."""
    world = _world()
    world.master([EpochStarted(epoch=13, start_ms=world.now, end_ms=world.now + HOUR, seed=1)])
    window_id = world.window(A, start_ms=world.now, duration_ms=HOUR, start=True)
    _goodbye(world)
    book = EMPTY_BOOK
    for _ in range(2 * CFG.stale_cycles):
        world.tick(CFG.plan_interval_ms)
        world.heartbeat(B)
        events, book = check_liveness(world.state, book, world.now, CFG)
        assert events == []
    policy = MaintenancePolicy()

    def ask(request: object) -> tuple[bool, str, tuple[Event, ...]]:
        d = decide(world.state, request, LOCAL_OPERATOR, world.now, policy)  # type: ignore[arg-type]
        return d.reply.ok, d.reply.message, tuple(d.events)

    ok, msg, _ = ask(NodeRemove(node_id=A))
    assert not ok and "Its worker stopped inside the window" in msg, msg
    assert "marks it disconnected at once, excused" in msg, msg
    ok, msg, decided = ask(MaintenanceFinish(node_id=A))
    assert ok and "disconnected, excused" in msg, msg
    stopped, finished = decided
    assert isinstance(stopped, NodeDisconnected) and stopped.excused, stopped
    assert stopped.reason == (
        f"stopped by its operator (got SIGTERM); its worker said goodbye at event index "
        f"{world.state.nodes[A].stopping_idx} and was not back when operator {LOCAL_OPERATOR} "
        f"finished its maintenance window {window_id}"
    )
    assert finished == MaintenanceFinished(
        window_id=window_id, node_id=A, how="operator", by=LOCAL_OPERATOR
    )
    lines = [ln.message for ln in decision_lines(decided, world.state, world.now)]
    said = [ln for ln in lines if ln.startswith(f"node {A} disconnected: ")]
    assert len(said) == 1 and f"in its maintenance window {window_id}: excused" in said[0]
    assert not any("unexcused" in ln or "forfeits" in ln for ln in lines), lines
    world.master(decided)
    rec = world.state.nodes[A]
    assert not rec.connected and rec.disconnect_excused and rec.stopping_idx == 0
    # Nothing left for liveness to judge, no punishment in epoch 13's ledger.
    world.tick(CFG.plan_interval_ms)
    world.heartbeat(B)
    assert check_liveness(world.state, book, world.now, CFG).events == []
    ledger = world.state.ledgers.get(13)
    assert ledger is None or ledger.node(A).disconnect is None
    ok, msg, _ = ask(NodeRemove(node_id=A))
    assert ok, msg


def test_finishing_the_window_of_a_node_that_did_not_stop_only_finishes_it() -> None:
    world = _world()
    world.window(A, start_ms=world.now, duration_ms=HOUR, start=True)
    d = decide(
        world.state, MaintenanceFinish(node_id=A), LOCAL_OPERATOR, world.now, MaintenancePolicy()
    )
    assert [type(e) for e in d.events] == [MaintenanceFinished]
    assert d.reply.message.startswith("finished window ") and "disconnected" not in d.reply.message


def test_a_silent_node_without_a_goodbye_still_waits_k_cycles() -> None:
    """The crash path is unchanged: no goodbye, K silent cycles, the same reason as ever."""
    world = _world()
    book = EMPTY_BOOK
    gone: list[NodeDisconnected] = []
    cycles = 0
    while not gone:
        world.tick(CFG.plan_interval_ms)
        world.heartbeat(B)
        gone, book = check_liveness(world.state, book, world.now, CFG)
        world.master(gone)
        cycles += 1
    assert cycles == CFG.stale_cycles + 1  # one cycle to observe, then K idle ones
    assert [e.node_id for e in gone] == [A]
    assert gone[0].reason.startswith(f"no events for {CFG.stale_cycles} cycles")


def test_the_workers_goodbye_words_say_offline_for_maintenance_inside_its_window() -> None:
    """An operator review found a worker stopped inside its own window logging that it "is
    disconnected as stopped by its operator" unless back within the stale cycles, while the
    master keeps it in maintenance, excused. The worker's replica tells, by the one rule."""
    world = _world()
    outside = goodbye_words(world.state, A, world.now, True, 2.0)
    assert outside == (
        "said goodbye: unless this node is back within the master's stale cycles, it is "
        "disconnected as stopped by its operator"
    )
    window_id = world.window(A, start_ms=world.now + HOUR, duration_ms=HOUR)
    assert goodbye_words(world.state, A, world.now, True, 2.0) == outside  # not started yet
    assert "after its stale cycles" in goodbye_words(world.state, A, world.now, False, 2.0)
    # From its start (even before MaintenanceStarted, as the master's rule says).
    world.tick(HOUR + 60_000)
    inside = goodbye_words(world.state, A, world.now, True, 2.0)
    end = "2023-11-15 00:13:20 UTC (in 59m)"
    assert inside == (
        f"said goodbye inside maintenance window {window_id}: this node is offline for "
        f"maintenance until {end}, excused; not back by then, it is disconnected as stopped by "
        "its operator"
    )
    unacked = goodbye_words(world.state, A, world.now, False, 2.0)
    assert unacked.startswith("stopping (the master did not acknowledge our goodbye) inside ")
    assert "offline for maintenance until" in unacked
    assert goodbye_words(world.state, B, world.now, True, 2.0) == outside  # another node's


# --------------------------------------------------------------------------------------------
# A real master and worker
# --------------------------------------------------------------------------------------------

DECISIONS = "cluster.master.decisions"
#: Bound on every wait: a broken master fails the test instead of hanging it.
WAIT = 60.0


@pytest.mark.anyio
async def test_a_clean_stop_of_a_worker_is_logged_as_stopped_by_its_operator(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=DECISIONS)
    async with embedded_cluster(tmp_path, wait=WAIT) as cluster:
        master, worker = cluster.master, cluster.worker
        me = worker.node_id
        await until_self_tested(master, me)
        worker.stop("got SIGTERM")
        while master.state.nodes[me].connected:
            await anyio.sleep(0.05)
        log = list(master.store.read_from(1))
    rec = master.state.nodes[me]
    assert rec.disconnected_reason.startswith("stopped by its operator (got SIGTERM); "), rec
    assert not rec.disconnect_excused and rec.stopping_idx == 0
    # The goodbye went into the log under the worker's own name, and the disconnect (after
    # the stale cycles, as for silence) says so.
    (goodbye,) = [ie for ie in log if isinstance(ie.event, NodeStopping)]
    assert isinstance(goodbye.event, NodeStopping)  # (for mypy)
    assert goodbye.origin == me and goodbye.event.reason == "got SIGTERM"
    said_at = f"goodbye at event index {goodbye.idx} and was not back within "
    assert said_at in rec.disconnected_reason, rec
    lines = [r.getMessage() for r in caplog.records if r.name == DECISIONS]
    said = [line for line in lines if line.startswith(f"node {me} disconnected: ")]
    assert len(said) == 1 and "stopped by its operator (got SIGTERM)" in said[0], lines
    assert "no events for" not in said[0], said


@pytest.mark.anyio
async def test_the_goodbye_is_the_workers_last_event_even_while_it_waits_for_the_ack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reviewer found the worker heartbeating on while its goodbye waited for the ack:
    heartbeats after `NodeStopping` in the outbox. Here the ack is slow (the goodbye's flush
    first waits, for up to 10 heartbeat intervals, for anything emitted after it)."""
    emitted: list[Event] = []
    async with embedded_cluster(tmp_path, workers=0, wait=WAIT) as cluster:
        master, worker = cluster.master, cluster.new_worker()
        client = worker.worker
        append, flush = client.outbox.append, client.flush

        def recording_append(event: Event) -> int:
            emitted.append(event)
            return append(event)

        async def slow_goodbye_flush(timeout: float) -> bool:
            if emitted and isinstance(emitted[-1], NodeStopping):
                goodbye_seq = client.outbox.last_seq
                with anyio.move_on_after(10 * client.config.heartbeat_interval):
                    while client.outbox.last_seq == goodbye_seq:
                        await anyio.sleep(0.01)
            return await flush(timeout)

        monkeypatch.setattr(client.outbox, "append", recording_append)
        monkeypatch.setattr(client, "flush", slow_goodbye_flush)
        await cluster.start(worker)
        me = worker.node_id
        await until_self_tested(master, me)
        worker.stop("got SIGTERM")
        while master.state.nodes[me].connected:
            await anyio.sleep(0.05)
    assert any(isinstance(e, NodeHeartbeat) for e in emitted)  # it did heartbeat before
    assert isinstance(emitted[-1], NodeStopping), [type(e).__name__ for e in emitted[-5:]]
    assert sum(isinstance(e, NodeStopping) for e in emitted) == 1


@pytest.mark.anyio
async def test_a_worker_stopped_inside_its_window_says_offline_for_maintenance(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cluster.worker.node")
    async with embedded_cluster(tmp_path, wait=WAIT) as cluster:
        master, worker = cluster.master, cluster.worker
        me = worker.node_id
        await until_self_tested(master, me)

        def window(state: State, now_ms: int) -> list[Event]:
            scheduled = MaintenanceScheduled(
                window_id="w-1",
                node_id=me,
                start_ms=now_ms,
                duration_ms=HOUR,
                requested_ms=now_ms,
                credit_spent_ms=HOUR,
            )
            return [scheduled, MaintenanceStarted(window_id="w-1", node_id=me)]

        await master.master.index_decision(window)
        while (w := worker.worker.state.windows.get("w-1")) is None or (
            w.state is not WindowState.ACTIVE
        ):
            await anyio.sleep(0.05)
        worker.stop("got SIGTERM")
        await worker.worker.wait_finished()
        while not master.state.nodes[me].stopping_idx:
            await anyio.sleep(0.05)
        state = master.state
    said = [r.getMessage() for r in caplog.records if "goodbye" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith(
        "said goodbye inside maintenance window w-1: this node is offline for maintenance until "
    ), said
    assert "disconnected as stopped by its operator" in said[0]
    assert state.nodes[me].connected and is_excused(state, me, state.last_time_ms)
