"""The runner manager: desired runners from state (pure), and the lifecycle it drives with the
simulated runner and real subprocesses."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import msgspec
import pytest
from trio.testing import MockClock

from cluster.net.identity import load_identity
from cluster.net.protocol import Events
from cluster.shared.apply import fold
from cluster.shared.events import (
    MASTER_ORIGIN,
    MAX_REASON_CHARS,
    MAX_WORK_UNITS,
    DevshardFinalized,
    DevshardPlaced,
    EpochStarted,
    Event,
    IndexedEvent,
    NodeHeartbeat,
    RunnerStatus,
    RunnerStatusUpdated,
    SessionDeleted,
    SessionRequested,
    SlotAssignment,
    WorkReported,
)
from cluster.shared.state import EMPTY_STATE, State, runner_id_for
from cluster.worker.client import Worker
from cluster.worker.node import WorkerNode, WorkerNodeConfig
from cluster.worker.runner_manager import RunnerManager, desired_runners
from cluster.worker.runners import (
    HEALTHY,
    Health,
    Runner,
    RunnerConfigError,
    RunnerFactory,
    RunnerFailed,
    RunnerSetting,
    RunnerSpec,
    SubprocessRunner,
    load_limit_s,
    make_factory,
)
from cluster.worker.runners.registry import LOAD_LIMIT_MARGIN_S

ME = "node-a"
OTHER = "node-b"
S = RunnerStatus
FULL_LIFE = [S.PENDING, S.LOADING, S.READY, S.RUNNING, S.STOPPING, S.STOPPED]


class Cluster:
    """A master-side log in miniature: master events and the node's events, folded in order."""

    def __init__(self) -> None:
        self.state: State = EMPTY_STATE
        self.seq: dict[str, int] = {}
        self.log: list[IndexedEvent] = []

    def add(self, origin: str, *events: Event) -> State:
        batch: list[IndexedEvent] = []
        for event in events:
            self.seq[origin] = self.seq.get(origin, 0) + 1
            idx = self.state.last_applied + len(batch) + 1
            batch.append(IndexedEvent(idx, 1_000 * idx, origin, self.seq[origin], event))
        self.state = fold(self.state, batch)
        self.log.extend(batch)
        return self.state

    def master(self, *events: Event) -> State:
        return self.add(MASTER_ORIGIN, *events)


class Emitted:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def statuses(self, runner_id: str) -> list[RunnerStatus]:
        return [
            e.status
            for e in self.events
            if isinstance(e, RunnerStatusUpdated) and e.runner_id == runner_id
        ]

    def last(self, runner_id: str) -> RunnerStatusUpdated:
        return [
            e
            for e in self.events
            if isinstance(e, RunnerStatusUpdated) and e.runner_id == runner_id
        ][-1]

    def work(self, devshard_id: str) -> int:
        return sum(
            e.units
            for e in self.events
            if isinstance(e, WorkReported) and e.devshard_id == devshard_id
        )


class Encoded(Emitted):
    """Emitted events, encoded as the outbox encodes them (and raising as it would)."""

    def __call__(self, event: Event) -> None:
        msgspec.msgpack.encode(event)
        super().__call__(event)


async def until(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    with anyio.fail_after(timeout_s):
        while not condition():
            await anyio.sleep(0.005)


def placed(
    devshard_id: str, session_id: str, epoch: int, slots: Sequence[tuple[int, str]]
) -> DevshardPlaced:
    return DevshardPlaced(
        devshard_id=devshard_id,
        session_id=session_id,
        epoch=epoch,
        assignments=tuple(SlotAssignment(slot, node) for slot, node in slots),
        ends_ms=600_000 * (epoch + 1),
    )


def started_cluster() -> Cluster:
    cluster = Cluster()
    cluster.master(
        EpochStarted(epoch=1, start_ms=600_000, end_ms=1_200_000, seed=7),
        SessionRequested(session_id="s1", slots=3, memory_per_slot_mb=2048, gpu=True),
        SessionRequested(session_id="s2", slots=1, memory_per_slot_mb=512),
    )
    return cluster


def manager(
    emitted: Emitted,
    factory: RunnerFactory,
    carry_over_grace_s: float = 0.2,
    restart_limit: int = 0,  # restarts off unless a test is about them
) -> RunnerManager:
    return RunnerManager(
        ME,
        emitted,
        factory,
        work_interval_s=0.02,
        health_interval_s=0.02,
        stop_timeout_s=10,
        carry_over_grace_s=carry_over_grace_s,
        restart_limit=restart_limit,
        restart_backoff_s=0.05,
    )


class Counted:
    """A runner factory that remembers every runner it built."""

    def __init__(self, factory: RunnerFactory) -> None:
        self.factory = factory
        self.built: list[Runner] = []

    def __call__(self, spec: RunnerSpec) -> Runner:
        runner = self.factory(spec)
        self.built.append(runner)
        return runner


def counted_setup(carry_over_grace_s: float) -> tuple[Cluster, Emitted, Counted, RunnerManager]:
    """A started cluster and a manager of simulated runners whose factory counts them."""
    emitted = Emitted()
    factory = Counted(make_factory("simulated", FAST_SIM))
    return started_cluster(), emitted, factory, manager(emitted, factory, carry_over_grace_s)


def epoch_turn(cluster: Cluster, *placements: DevshardPlaced, finalize: str = "d1") -> State:
    """Epoch 1 ends: its devshard is finalized, epoch 2 starts, sessions are placed again --
    one planner decision, as the master indexes it."""
    return cluster.master(
        DevshardFinalized(devshard_id=finalize, epoch=1),
        EpochStarted(epoch=2, start_ms=1_200_000, end_ms=1_800_000, seed=8),
        *placements,
    )


FAST_SIM = {"load_s": 0.01, "request_s": 0, "units_per_s": 200}


# --------------------------------------------------------------------------------------------
# Pure part
# --------------------------------------------------------------------------------------------


def test_desired_runners_are_this_nodes_slots() -> None:
    cluster = started_cluster()
    state = cluster.master(
        placed("d1", "s1", 1, [(0, ME), (1, OTHER), (2, ME)]),
        placed("d2", "s2", 1, [(0, OTHER)]),
    )
    wanted = desired_runners(state, ME)
    assert sorted(wanted) == ["d1/0", "d1/2"]
    assert wanted["d1/2"] == RunnerSpec(
        runner_id="d1/2",
        node_id=ME,
        devshard_id="d1",
        session_id="s1",
        slot=2,
        memory_mb=2048,
        gpu=True,
        epoch=1,
        ends_ms=1_200_000,
    )
    assert sorted(desired_runners(state, OTHER)) == ["d1/1", "d2/0"]
    assert desired_runners(state, "node-z") == {}
    # A deleted session's live devshard still runs (work finishes), with what is known.
    state = cluster.master(SessionDeleted(session_id="s1"))
    assert desired_runners(state, ME)["d1/0"].memory_mb == 0
    assert runner_id_for("d1", 3) == "d1/3"


def test_manager_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="work_interval_s must be > 0"):
        RunnerManager(ME, Emitted(), make_factory("simulated", {}), work_interval_s=0)
    with pytest.raises(ValueError, match="offline_work_interval_s must be > 0"):
        RunnerManager(ME, Emitted(), make_factory("simulated", {}), offline_work_interval_s=-1)
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="restart_limit must be an integer >= 0"):
            RunnerManager(ME, Emitted(), make_factory("simulated", {}), restart_limit=bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Lifecycle with the simulated runner
# --------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_full_lifecycle_and_work_reports() -> None:
    cluster = started_cluster()
    emitted = Emitted()
    mgr = manager(emitted, make_factory("simulated", FAST_SIM))
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME), (1, OTHER), (2, ME)])))
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.RUNNING])
        await until(lambda: emitted.statuses("d1/2")[-1:] == [S.RUNNING])
        await until(lambda: emitted.work("d1") >= 10)
        assert mgr.statuses() == {"d1/0": (S.RUNNING, ""), "d1/2": (S.RUNNING, "")}
        # The node's own events fold into the cluster's state like any others.
        state = cluster.add(ME, *emitted.events)
        assert {r: rec.status for r, rec in state.runners.items()} == {
            "d1/0": S.RUNNING,
            "d1/2": S.RUNNING,
        }
        seen = len(emitted.events)
        mgr.reconcile(state)  # a change that leaves the devshards alone disturbs nothing
        await anyio.sleep(0.05)
        assert emitted.statuses("d1/0") == emitted.statuses("d1/2") == FULL_LIFE[:4]

        mgr.reconcile(cluster.master(DevshardFinalized(devshard_id="d1", epoch=1)))
        await until(
            lambda: emitted.statuses("d1/0")[-1:] == emitted.statuses("d1/2")[-1:] == [S.STOPPED]
        )
        await until(lambda: mgr.statuses() == {})
        tg.cancel_scope.cancel()
    assert emitted.statuses("d1/0") == FULL_LIFE
    assert emitted.statuses("d1/2") == FULL_LIFE
    assert emitted.statuses("d1/1") == []  # another node's slot
    works = [e for e in emitted.events if isinstance(e, WorkReported)]
    assert all(e.epoch == 1 and e.node_id == ME and e.units > 0 for e in works)
    state = cluster.add(ME, *emitted.events[seen:])
    assert dict(state.runners) == {}
    assert state.ledgers[1].nodes[ME].units == emitted.work("d1")


@pytest.mark.anyio
async def test_a_runner_claiming_absurd_work_is_reported_within_the_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The master refuses a report over MAX_WORK_UNITS, and the outbox would offer it again
    # forever, holding back every later event of the node: the manager caps it instead.
    cluster = started_cluster()
    emitted = Emitted()
    mgr = manager(emitted, make_factory("simulated", {**FAST_SIM, "units_per_s": 1e15}))
    with caplog.at_level(logging.ERROR, logger="cluster.worker.runner_manager"):
        async with anyio.create_task_group() as tg:
            await tg.start(mgr.run)
            mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
            await until(
                lambda: len([e for e in emitted.events if isinstance(e, WorkReported)]) >= 2
            )
            tg.cancel_scope.cancel()
    works = [e.units for e in emitted.events if isinstance(e, WorkReported)]
    assert works and all(0 < units <= MAX_WORK_UNITS for units in works), works
    assert MAX_WORK_UNITS in works
    assert any("over the bound" in r.getMessage() for r in caplog.records)


class _Index:
    """An int-like count, as numpy's integers are (`__index__`)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


class _OddWork(Runner):
    """Serves until stopped; `work_units()` answers the given values in turn, then 0."""

    kind = "odd-work"

    def __init__(self, spec: RunnerSpec, answers: list[object]) -> None:
        super().__init__(spec)
        self.answers = answers

    async def load(self) -> None:
        pass

    async def run(self) -> None:
        await anyio.sleep_forever()

    async def health(self) -> Health:
        return HEALTHY

    async def serve_request(self, payload: bytes) -> bytes:
        return payload

    def work_units(self) -> int:
        return self.answers.pop(0) if self.answers else 0  # type: ignore[return-value]

    async def stop(self) -> None:
        pass


@pytest.mark.anyio
async def test_work_units_that_are_not_ints_are_dropped_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before, WorkReported(units=1.5) was emitted: the master refused the batch as
    # malformed, redialled, was offered it again, and the work around it was lost.
    answers: list[object] = [1.5, True, 2, _Index(3), 2.5, False]
    cluster = started_cluster()
    emitted = Encoded()
    mgr = manager(emitted, lambda spec: _OddWork(spec, answers))
    with caplog.at_level(logging.ERROR, logger="cluster.worker.runner_manager"):
        async with anyio.create_task_group() as tg:
            await tg.start(mgr.run)
            mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
            await until(lambda: not answers or S.FAILED in emitted.statuses("d1/0"))
            tg.cancel_scope.cancel()
    works = [e.units for e in emitted.events if isinstance(e, WorkReported)]
    assert works == [2, 3] and all(type(units) is int for units in works), works
    assert S.FAILED not in emitted.statuses("d1/0")  # it served on
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        "runner d1/0: work_units() must return an int, got 1.5 (float): its reports are "
        "dropped (logged once per runner)"
    ]


@pytest.mark.anyio
async def test_work_is_reported_rarely_while_the_master_is_unreachable() -> None:
    cluster = started_cluster()
    emitted = Emitted()
    online = False
    mgr = RunnerManager(
        ME,
        emitted,
        make_factory("simulated", FAST_SIM),
        work_interval_s=0.02,
        health_interval_s=0.02,
        stop_timeout_s=10,
        offline_work_interval_s=0.25,
        connected=lambda: online,
    )

    def reports() -> list[WorkReported]:
        return [e for e in emitted.events if isinstance(e, WorkReported)]

    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        t0 = anyio.current_time()
        mgr.reconcile(cluster.master(placed("d2", "s2", 1, [(0, ME)])))
        await until(lambda: len(reports()) >= 2)  # offline: one report per 0.25 s at most
        offline = reports()
        elapsed = anyio.current_time() - t0
        # Every 0.02 s would have made elapsed / 0.02 reports; offline makes a handful.
        assert len(offline) <= elapsed / 0.25 + 1, (len(offline), elapsed)
        assert all(e.units > 0 for e in offline)
        online = True  # connected again: a report every work interval
        await until(lambda: len(reports()) >= len(offline) + 10, timeout_s=15)
        tg.cancel_scope.cancel()
    # The fewer, larger offline reports fold into the node's ledger like any others.
    state = cluster.add(ME, *emitted.events)
    assert state.ledgers[1].nodes[ME].units == emitted.work("d2") > 0


@pytest.mark.anyio
async def test_placed_ahead_of_its_epoch_waits_ready() -> None:
    cluster = started_cluster()
    emitted = Emitted()
    mgr = manager(emitted, make_factory("simulated", FAST_SIM))
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        mgr.reconcile(cluster.master(placed("d2", "s2", 2, [(0, ME)])))
        await until(lambda: emitted.statuses("d2/0")[-1:] == [S.READY])
        await anyio.sleep(0.1)  # several health/work cycles: still only ready
        assert emitted.statuses("d2/0") == [S.PENDING, S.LOADING, S.READY]
        mgr.reconcile(
            cluster.master(EpochStarted(epoch=2, start_ms=1_200_000, end_ms=1_800_000, seed=1))
        )
        await until(lambda: emitted.statuses("d2/0")[-1:] == [S.RUNNING])
        tg.cancel_scope.cancel()
    # Shutting the manager down stops its runners.
    assert emitted.statuses("d2/0") == [
        S.PENDING,
        S.LOADING,
        S.READY,
        S.RUNNING,
        S.STOPPING,
        S.STOPPED,
    ]


@pytest.mark.anyio
async def test_state_given_before_run_is_applied_on_start() -> None:
    cluster = started_cluster()
    emitted = Emitted()
    mgr = manager(emitted, make_factory("simulated", FAST_SIM))
    mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
    assert emitted.events == []  # nothing starts without run()
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.RUNNING])
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_megabyte_failure_reason_is_clipped_to_fit_an_event() -> None:
    # Unclipped, the event would exceed the outbox's record limit and stop the worker.
    cluster = started_cluster()
    emitted = Emitted()
    mgr = manager(emitted, make_factory("simulated", {"load_s": 0, "fail_load": "x" * 2**21}))
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.FAILED])
        tg.cancel_scope.cancel()
    (reason,) = [
        e.reason
        for e in emitted.events
        if isinstance(e, RunnerStatusUpdated) and e.status is S.FAILED
    ]
    assert len(reason) == MAX_REASON_CHARS and reason.startswith("load: xxx")
    assert reason.endswith("…")


#: What `os.fsdecode` makes of a file name that is not UTF-8: a lone surrogate.
NOT_UTF8_NAME = os.fsdecode(b"weights-\xff.bin")


@pytest.mark.anyio
async def test_a_failure_reason_that_cannot_be_encoded_is_escaped_not_fatal() -> None:
    # Before, the outbox's UnicodeEncodeError escaped `_supervise`: the manager, with every
    # other runner, and the worker around it ended.
    cluster = started_cluster()
    emitted = Encoded()
    fail_load = f"model file {NOT_UTF8_NAME} is corrupt"
    mgr = manager(emitted, make_factory("simulated", {"load_s": 0, "fail_load": fail_load}))
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            await tg.start(mgr.run)
            mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
            await until(lambda: emitted.statuses("d1/0")[-1:] == [S.FAILED])
            assert emitted.last("d1/0").reason == "load: model file weights-\\udcff.bin is corrupt"
            tg.cancel_scope.cancel()
    assert emitted.statuses("d1/0")[-1] is S.STOPPED


class _OwnTimeout(Runner):
    """A runner whose own step fails at once with a TimeoutError (a socket's ETIMEDOUT)."""

    kind = "own-timeout"

    def __init__(self, spec: RunnerSpec, step: str) -> None:
        super().__init__(spec)
        self.step = step

    async def load(self) -> None:
        if self.step == "load":
            raise TimeoutError(110, "Connection timed out (model hub 10.0.0.9:443)")

    async def run(self) -> None:
        await anyio.sleep_forever()

    async def health(self) -> Health:
        if self.step == "health":
            raise TimeoutError("GET /health: read timed out")
        return HEALTHY

    async def serve_request(self, payload: bytes) -> bytes:
        return payload

    def work_units(self) -> int:
        return 0

    async def stop(self) -> None:
        pass


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("step", "reason"),
    [
        ("load", "load: [Errno 110] Connection timed out (model hub 10.0.0.9:443)"),
        ("health", "serve: health probe: GET /health: read timed out"),
    ],
)
async def test_a_runners_own_timeout_is_its_error_not_the_managers_limit(
    step: str, reason: str
) -> None:
    # Before, it read "load: timed out after 300s" (or "health probe timed out after 5s"),
    # though no limit had run out: the manager took any TimeoutError for its own.
    cluster = started_cluster()
    emitted = Emitted()
    mgr = manager(emitted, lambda spec: _OwnTimeout(spec, step))
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            await tg.start(mgr.run)
            mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
            await until(lambda: emitted.statuses("d1/0")[-1:] == [S.FAILED])
            assert emitted.last("d1/0").reason == reason
            tg.cancel_scope.cancel()


class _BareTrueHealth(_OwnTimeout):
    """A plugin whose health() returns a bare True instead of a Health."""

    async def health(self) -> Health:
        return True  # type: ignore[return-value]


@pytest.mark.anyio
async def test_a_health_that_is_not_a_health_fails_the_runner_naming_it() -> None:
    # It failed with "serve: AttributeError: 'bool' object has no attribute 'ok'".
    cluster = started_cluster()
    emitted = Emitted()
    mgr = manager(emitted, lambda spec: _BareTrueHealth(spec, "none"))
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            await tg.start(mgr.run)
            mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
            await until(lambda: emitted.statuses("d1/0")[-1:] == [S.FAILED])
            reason = emitted.last("d1/0").reason
            assert reason == "serve: health probe: health() returned True, not a Health"
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_load_failure_is_reported_then_stopped_when_unassigned() -> None:
    cluster = started_cluster()
    emitted = Emitted()
    mgr = manager(emitted, make_factory("simulated", {"load_s": 0, "fail_load": "weights corrupt"}))
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.FAILED])
        assert emitted.last("d1/0").reason == "load: weights corrupt"
        assert mgr.statuses() == {"d1/0": (S.FAILED, "load: weights corrupt")}
        await anyio.sleep(0.1)  # restarts are off here: it stays failed
        assert emitted.statuses("d1/0") == [S.PENDING, S.LOADING, S.FAILED]
        # Its FAILED record, with the reason, is what the cluster sees.
        state = cluster.add(ME, *emitted.events)
        assert state.runners["d1/0"].reason == "load: weights corrupt"

        mgr.reconcile(cluster.master(DevshardFinalized(devshard_id="d1", epoch=1)))
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.STOPPED])
        tg.cancel_scope.cancel()
    assert emitted.statuses("d1/0") == [S.PENDING, S.LOADING, S.FAILED, S.STOPPED]


@pytest.mark.anyio
async def test_runner_failing_while_serving() -> None:
    cluster = started_cluster()
    emitted = Emitted()
    mgr = manager(emitted, make_factory("simulated", {**FAST_SIM, "fail_after_s": 0.05}))
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.FAILED])
        tg.cancel_scope.cancel()
    assert emitted.statuses("d1/0") == [
        S.PENDING,
        S.LOADING,
        S.READY,
        S.RUNNING,
        S.FAILED,
        S.STOPPED,
    ]
    reason = [e for e in emitted.events if isinstance(e, RunnerStatusUpdated)][-2].reason
    assert reason in (
        "serve: simulated failure after 0.05s",
        "serve: health probe: simulated failure after 0.05s",
    )


@pytest.mark.anyio
async def test_a_reconcile_that_failed_is_tried_again_on_the_same_devshards() -> None:
    cluster = started_cluster()
    emitted = Emitted()
    mgr = manager(emitted, make_factory("simulated", FAST_SIM))
    calls = 0
    real = mgr._predecessor

    def flaky(spec: RunnerSpec, wanted: dict[str, RunnerSpec]) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in the middle of reconciling")
        return real(spec, wanted)

    mgr._predecessor = flaky  # type: ignore[method-assign, assignment]
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        state = cluster.master(placed("d1", "s1", 1, [(0, ME)]))
        with pytest.raises(RuntimeError, match="a bug in the middle"):
            mgr.reconcile(state)
        mgr.reconcile(cluster.add(ME, NodeHeartbeat(node_id=ME)))  # same devshards and epoch
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.RUNNING])
        tg.cancel_scope.cancel()


class FailingFirst:
    """Simulated runners whose first `failures` loads fail."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.built = 0

    def __call__(self, spec: RunnerSpec) -> Runner:
        self.built += 1
        broken = {"fail_load": f"out of memory (attempt {self.built})"}
        config = {**FAST_SIM, **broken} if self.built <= self.failures else FAST_SIM
        return make_factory("simulated", config)(spec)


@pytest.mark.anyio
async def test_a_failed_runner_is_restarted_while_its_slot_stays_assigned() -> None:
    cluster = started_cluster()
    emitted = Emitted()
    factory = FailingFirst(failures=2)
    mgr = manager(emitted, factory, restart_limit=3)
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.RUNNING])
        tg.cancel_scope.cancel()
    attempt = [S.PENDING, S.LOADING, S.FAILED]
    assert emitted.statuses("d1/0") == [*attempt, *attempt, *FULL_LIFE]
    reasons = [
        e.reason
        for e in emitted.events
        if isinstance(e, RunnerStatusUpdated) and e.status is S.FAILED
    ]
    assert reasons == ["load: out of memory (attempt 1)", "load: out of memory (attempt 2)"]
    assert factory.built == 3


@pytest.mark.anyio
async def test_restarts_stop_at_the_limit_and_the_failure_stays_visible() -> None:
    cluster = started_cluster()
    emitted = Emitted()
    factory = FailingFirst(failures=99)
    mgr = manager(emitted, factory, restart_limit=2)
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
        await until(lambda: emitted.statuses("d1/0").count(S.FAILED) == 3)
        await anyio.sleep(0.3)  # longer than the next back-off (0.2 s): no fourth attempt
        assert factory.built == 3
        assert mgr.statuses() == {"d1/0": (S.FAILED, "load: out of memory (attempt 3)")}
        mgr.reconcile(cluster.master(DevshardFinalized(devshard_id="d1", epoch=1)))
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.STOPPED])
        tg.cancel_scope.cancel()
    assert emitted.statuses("d1/0") == [*[S.PENDING, S.LOADING, S.FAILED] * 3, S.STOPPED]


@pytest.mark.anyio
async def test_bad_runner_config_fails_at_create() -> None:
    cluster = started_cluster()
    emitted = Emitted()
    mgr = manager(emitted, make_factory("simulated", {"speed": 3}))
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.FAILED])
        tg.cancel_scope.cancel()
    assert emitted.last("d1/0").status is S.STOPPED
    failed = [
        e for e in emitted.events if isinstance(e, RunnerStatusUpdated) and e.status is S.FAILED
    ]
    assert failed[0].reason.startswith("create: runner 'simulated' config:")
    assert "speed" in failed[0].reason


@pytest.mark.anyio
async def test_a_slot_staying_carries_over_and_a_slot_moving_away_stops() -> None:
    cluster = started_cluster()
    emitted = Emitted()
    mgr = manager(emitted, make_factory("simulated", FAST_SIM))
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME), (1, ME)])))
        await until(lambda: emitted.statuses("d1/1")[-1:] == [S.RUNNING])
        # Re-placement: slot 1 moves to another node; slot 0 stays.
        mgr.reconcile(cluster.master(placed("d1b", "s1", 1, [(0, ME), (1, OTHER)])))
        await until(lambda: emitted.statuses("d1b/0")[-1:] == [S.RUNNING])
        await until(
            lambda: emitted.statuses("d1/1")[-1:] == emitted.statuses("d1/0")[-1:] == [S.STOPPED]
        )
        assert set(mgr.statuses()) == {"d1b/0"}
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_epoch_turn_carries_loaded_runners_over_without_a_reload() -> None:
    cluster, emitted, factory, mgr = counted_setup(carry_over_grace_s=30)
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME), (1, OTHER), (2, ME)])))
        await until(
            lambda: emitted.statuses("d1/0")[-1:] == emitted.statuses("d1/2")[-1:] == [S.RUNNING]
        )
        await until(lambda: emitted.work("d1") > 0)
        # Sticky placement: the session keeps both slots here in epoch 2 (slots renumbered).
        mgr.reconcile(epoch_turn(cluster, placed("d2", "s1", 2, [(0, ME), (1, ME), (2, OTHER)])))
        await until(
            lambda: emitted.statuses("d2/0")[-1:] == emitted.statuses("d2/1")[-1:] == [S.RUNNING]
        )
        await until(lambda: emitted.work("d2") > 0)
        assert set(mgr.statuses()) == {"d2/0", "d2/1"}
        tg.cancel_scope.cancel()
    assert len(factory.built) == 2  # loaded once each, never again
    for old in ("d1/0", "d1/2"):
        assert emitted.statuses(old) == [S.PENDING, S.LOADING, S.READY, S.RUNNING, S.STOPPED]
    # The same slot number is preferred: d1/0 -> d2/0, and d1/2 takes the other one.
    assert emitted.last("d1/0").reason == "carried over to d2/0 (loaded, not restarted)"
    assert emitted.last("d1/2").reason == "carried over to d2/1 (loaded, not restarted)"
    assert emitted.statuses("d2/0")[:2] == [S.READY, S.RUNNING]
    assert [r.spec.devshard_id for r in factory.built] == ["d2", "d2"]
    # Work before the switch went to epoch 1's devshard, after it to epoch 2's.
    works = [e for e in emitted.events if isinstance(e, WorkReported)]
    assert {(e.devshard_id, e.epoch) for e in works} == {("d1", 1), ("d2", 2)}
    state = cluster.add(ME, *emitted.events)
    assert state.ledgers[1].nodes[ME].units == emitted.work("d1")
    assert state.ledgers[2].nodes[ME].units == emitted.work("d2")


@pytest.mark.anyio
async def test_a_restarting_worker_runs_only_what_the_state_it_caught_up_to_assigns(
    tmp_path: Path,
) -> None:
    """A (re)starting worker folds the log it missed a frame at a time: the states on the
    way are history. Its runner manager follows only caught-up states, so no runner starts
    for a placement that the log already finalized."""
    cluster, emitted, factory, mgr = counted_setup(carry_over_grace_s=0.2)
    cluster.master(placed("d1", "s1", 1, [(0, ME)]))
    epoch_turn(cluster, placed("d2", "s2", 2, [(0, ME)]))
    _, master_id = load_identity(tmp_path / "master")
    worker = Worker(tmp_path / "worker", f"/ip4/127.0.0.1/tcp/1/p2p/{master_id}")
    worker.add_listener(mgr.reconcile, live_only=True)  # as WorkerNode.run wires it
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(mgr.run)
            # What the worker does after a restart's hello and Subscribe, without a network.
            worker.phase = "catching up"
            worker.master_last_idx = cluster.state.last_applied
            for ie in cluster.log:
                worker._apply_events(Events(events=[ie]))
                await anyio.sleep(0.01)  # room for the manager to act between frames
            assert worker.phase == "connected"
            await until(lambda: emitted.statuses("d2/0")[-1:] == [S.RUNNING])
            tg.cancel_scope.cancel()
    finally:
        worker.close()
    assert [r.spec.devshard_id for r in factory.built] == ["d2"]
    assert emitted.statuses("d1/0") == []


@pytest.mark.anyio
async def test_carry_over_waits_for_a_successor_placed_in_a_later_frame() -> None:
    cluster, emitted, factory, mgr = counted_setup(carry_over_grace_s=30)
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.RUNNING])
        # The decision arrives in two frames: the devshard ends first, parked loaded...
        mgr.reconcile(epoch_turn(cluster))
        await anyio.sleep(0.1)
        assert emitted.statuses("d1/0")[-1:] == [S.RUNNING]
        # ...then its successor takes it over.
        mgr.reconcile(cluster.master(placed("d2", "s1", 2, [(0, ME)])))
        await until(lambda: emitted.statuses("d2/0")[-1:] == [S.RUNNING])
        tg.cancel_scope.cancel()
    assert len(factory.built) == 1
    assert emitted.statuses("d1/0")[-1:] == [S.STOPPED]


@pytest.mark.anyio
async def test_no_carry_over_without_a_successor_a_live_session_or_the_same_size() -> None:
    cluster, emitted, factory, mgr = counted_setup(carry_over_grace_s=0.2)
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        mgr.reconcile(
            cluster.master(placed("d1", "s1", 1, [(0, ME)]), placed("e1", "s2", 1, [(0, ME)]))
        )
        await until(
            lambda: emitted.statuses("d1/0")[-1:] == emitted.statuses("e1/0")[-1:] == [S.RUNNING]
        )
        # s2 is deleted and its devshard ends: no session to carry over for, stopped at once.
        mgr.reconcile(
            cluster.master(
                SessionDeleted(session_id="s2"),
                DevshardFinalized(devshard_id="e1", epoch=1),
                SessionRequested(session_id="s3", slots=1, memory_per_slot_mb=2048, gpu=True),
            )
        )
        # s1 gets no slot here in epoch 2: parked, then stopped after the grace. The slot
        # placed here is another session's (s3, even of the same size): loaded afresh.
        mgr.reconcile(epoch_turn(cluster, placed("f2", "s3", 2, [(0, ME)])))
        await until(lambda: emitted.statuses("e1/0")[-1:] == [S.STOPPED])
        assert emitted.statuses("d1/0")[-1:] == [S.RUNNING]  # parked, waiting for a successor
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.STOPPED])
        await until(lambda: emitted.statuses("f2/0")[-1:] == [S.RUNNING])
        tg.cancel_scope.cancel()
    assert emitted.statuses("d1/0") == FULL_LIFE
    assert emitted.statuses("e1/0") == FULL_LIFE
    assert emitted.statuses("f2/0")[:3] == [S.PENDING, S.LOADING, S.READY]
    assert len(factory.built) == 3


# --------------------------------------------------------------------------------------------
# Restarts, parking and plugin runners that misbehave
# --------------------------------------------------------------------------------------------


class Plugin(Runner):
    """A plugin runner kind: loads at once, serves until `crash` is set, then fails."""

    kind = "plugin"

    def __init__(self, spec: RunnerSpec) -> None:
        super().__init__(spec)
        self.crash = anyio.Event()
        self.stopped = False

    async def load(self) -> None:
        pass

    async def run(self) -> None:
        await self.crash.wait()
        raise RunnerFailed(f"crashed serving {self.spec.runner_id}")

    async def health(self) -> Health:
        return HEALTHY

    async def serve_request(self, payload: bytes) -> bytes:
        return payload

    def work_units(self) -> int:
        return 0

    async def stop(self) -> None:
        self.stopped = True


class Plugins:
    """A factory of `kind` runners that remembers every one it built."""

    def __init__(self, kind: type[Plugin] = Plugin) -> None:
        self.kind = kind
        self.built: list[Plugin] = []

    def __call__(self, spec: RunnerSpec) -> Runner:
        runner = self.kind(spec)
        self.built.append(runner)
        return runner


@pytest.mark.anyio
async def test_restarts_are_counted_per_devshard_a_carry_over_starts_afresh() -> None:
    cluster, emitted, factory = started_cluster(), Emitted(), Plugins()
    mgr = manager(emitted, factory, carry_over_grace_s=30, restart_limit=1)
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.RUNNING])
        factory.built[0].crash.set()  # d1's one restart is used up
        await until(lambda: len(factory.built) == 2)
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.RUNNING])
        mgr.reconcile(epoch_turn(cluster, placed("d2", "s1", 2, [(0, ME)])))
        await until(lambda: emitted.statuses("d2/0")[-1:] == [S.RUNNING])
        factory.built[1].crash.set()  # d2's first failure: d2 has a restart of its own
        await until(lambda: len(factory.built) == 3)
        await until(lambda: emitted.statuses("d2/0")[-1:] == [S.RUNNING])
        tg.cancel_scope.cancel()
    assert emitted.statuses("d2/0") == [
        *[S.READY, S.RUNNING, S.FAILED],
        *FULL_LIFE,
    ]


@pytest.mark.anyio
async def test_a_parked_runner_that_fails_is_stopped_not_restarted() -> None:
    # Restarted for its finalized devshard, it would still be loading when the successor's
    # placement arrives: not portable then, so a second runner would load for the slot.
    cluster, emitted, factory = started_cluster(), Emitted(), Plugins()
    mgr = manager(emitted, factory, carry_over_grace_s=30, restart_limit=3)
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.RUNNING])
        mgr.reconcile(epoch_turn(cluster))  # parked, waiting for a successor
        factory.built[0].crash.set()
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.STOPPED], timeout_s=5)
        assert mgr.statuses() == {}
        mgr.reconcile(cluster.master(placed("d2", "s1", 2, [(0, ME)])))
        await until(lambda: emitted.statuses("d2/0")[-1:] == [S.RUNNING])
        tg.cancel_scope.cancel()
    assert emitted.statuses("d1/0") == [*FULL_LIFE[:4], S.FAILED, S.STOPPED]
    assert len(factory.built) == 2  # the failed one, and the successor's


class EndsCleanly(Plugin):
    """Serves until `crash` is set, then returns from `run()`: ends by itself, no error."""

    async def run(self) -> None:
        await self.crash.wait()


@pytest.mark.anyio
async def test_a_runner_ending_cleanly_while_its_slot_is_assigned_fails_without_a_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Its slot would otherwise stay unserved for the rest of the epoch with nobody told: a
    # STOPPED runner is not moved by the planner. It is not restarted either: a launcher
    # that daemonizes (`docker run -d`) exits 0 at once, and every restart left one more
    # daemon running out of the worker's reach (1 + restart_limit of them per slot).
    cluster, emitted, factory = started_cluster(), Emitted(), Plugins(EndsCleanly)
    mgr = manager(emitted, factory, restart_limit=3)
    with caplog.at_level(logging.WARNING, logger="cluster.worker.runner_manager"):
        async with anyio.create_task_group() as tg:
            await tg.start(mgr.run)
            mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
            await until(lambda: emitted.statuses("d1/0")[-1:] == [S.RUNNING])
            factory.built[0].crash.set()
            await until(lambda: emitted.statuses("d1/0")[-1:] == [S.FAILED])
            reason = emitted.last("d1/0").reason
            assert reason.startswith("serve: ended on its own while its slot was still assigned")
            assert "must stay in the foreground" in reason
            await anyio.sleep(0.3)  # longer than the first back-off (0.05 s): no restart
            assert len(factory.built) == 1
            assert mgr.statuses() == {"d1/0": (S.FAILED, reason)}
            # The cluster sees a FAILED runner: the planner's failed-slot grace applies to it.
            assert cluster.add(ME, *emitted.events).runners["d1/0"].status is S.FAILED
            mgr.reconcile(cluster.master(DevshardFinalized(devshard_id="d1", epoch=1)))
            await until(lambda: emitted.statuses("d1/0")[-1:] == [S.STOPPED])
            tg.cancel_scope.cancel()
    assert emitted.statuses("d1/0") == [*FULL_LIFE[:4], S.FAILED, S.STOPPED]
    assert factory.built[0].stopped
    assert "runner d1/0: not restarted: it ended cleanly by itself" in caplog.text


@pytest.mark.anyio
async def test_a_parked_runner_ending_cleanly_is_stopped_not_failed() -> None:
    # Its devshard is over: ending now leaves no slot unserved.
    cluster, emitted, factory = started_cluster(), Emitted(), Plugins(EndsCleanly)
    mgr = manager(emitted, factory, carry_over_grace_s=30, restart_limit=3)
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.RUNNING])
        mgr.reconcile(epoch_turn(cluster))  # parked, waiting for a successor
        factory.built[0].crash.set()
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.STOPPED], timeout_s=5)
        assert emitted.last("d1/0").reason == "the runner ended by itself"
        # Forgotten at once, not listed STOPPED for the rest of its 30 s carry-over grace:
        # nothing is left to carry over.
        await until(lambda: mgr.statuses() == {}, timeout_s=5)
        mgr.reconcile(cluster.master(placed("d2", "s1", 2, [(0, ME)])))
        await until(lambda: emitted.statuses("d2/0")[-1:] == [S.RUNNING])
        tg.cancel_scope.cancel()
    assert emitted.statuses("d1/0") == FULL_LIFE  # no FAILED
    assert len(factory.built) == 2  # the one that ended, and the successor's fresh one


class BrokenCarryOver(Plugin):
    def carry_over(self, spec: RunnerSpec) -> None:
        raise RuntimeError("plugin bug in carry_over")


class BrokenCanCarryOver(Plugin):
    def can_carry_over(self) -> bool:
        raise RuntimeError("plugin bug in can_carry_over")


@pytest.mark.anyio
async def test_a_carry_over_that_raises_stops_the_old_runner_and_loads_a_new_one() -> None:
    cluster, emitted, factory = started_cluster(), Emitted(), Plugins(BrokenCarryOver)
    mgr = manager(emitted, factory, carry_over_grace_s=30)
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.RUNNING])
        mgr.reconcile(epoch_turn(cluster, placed("d2", "s1", 2, [(0, ME)])))  # does not raise
        await until(lambda: emitted.statuses("d2/0")[-1:] == [S.RUNNING])
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.STOPPED])
        old, new = factory.built
        assert old.stopped and not new.stopped
        assert set(mgr.statuses()) == {"d2/0"}
        tg.cancel_scope.cancel()  # shutting down after it is clean too
    assert emitted.statuses("d1/0") == FULL_LIFE
    assert emitted.statuses("d2/0") == FULL_LIFE
    assert new.stopped


@pytest.mark.anyio
async def test_a_can_carry_over_that_raises_means_no_carry_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cluster, emitted, factory = started_cluster(), Emitted(), Plugins(BrokenCanCarryOver)
    mgr = manager(emitted, factory, carry_over_grace_s=30)
    with caplog.at_level(logging.WARNING, logger="cluster.worker.runner_manager"):
        async with anyio.create_task_group() as tg:
            await tg.start(mgr.run)
            mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
            await until(lambda: emitted.statuses("d1/0")[-1:] == [S.RUNNING])
            # Neither carried over nor parked: stopped, and the new slot loads afresh.
            mgr.reconcile(epoch_turn(cluster, placed("d2", "s1", 2, [(0, ME)])))
            await until(lambda: emitted.statuses("d2/0")[-1:] == [S.RUNNING])
            await until(lambda: emitted.statuses("d1/0")[-1:] == [S.STOPPED])
            tg.cancel_scope.cancel()
    assert emitted.statuses("d1/0") == FULL_LIFE
    assert len(factory.built) == 2
    warnings = [r.getMessage() for r in caplog.records if "can_carry_over" in r.getMessage()]
    assert len(warnings) == 1 and "d1/0" in warnings[0], warnings  # once per runner


@pytest.mark.anyio
async def test_a_parked_runner_stops_at_once_when_its_session_is_deleted() -> None:
    cluster, emitted, factory, mgr = counted_setup(carry_over_grace_s=30)
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.RUNNING])
        mgr.reconcile(epoch_turn(cluster))  # parked for 30 s...
        await anyio.sleep(0.1)
        assert emitted.statuses("d1/0")[-1:] == [S.RUNNING]
        mgr.reconcile(cluster.master(SessionDeleted(session_id="s1")))  # ...or until this
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.STOPPED], timeout_s=5)
        tg.cancel_scope.cancel()
    assert emitted.statuses("d1/0") == FULL_LIFE
    assert len(factory.built) == 1


def test_a_runner_parked_again_gets_its_own_grace() -> None:
    """Parked, carried over and parked again: the first parking's timer must not stop it.
    On a virtual clock (trio's MockClock) so that the graces are exact."""
    cluster, emitted, factory = started_cluster(), Emitted(), Plugins()
    mgr = manager(emitted, factory, carry_over_grace_s=10)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(mgr.run)
            mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
            await until(lambda: emitted.statuses("d1/0")[-1:] == [S.RUNNING])
            mgr.reconcile(epoch_turn(cluster))  # parked at t, its grace ends at t + 10
            await anyio.sleep(6)
            mgr.reconcile(cluster.master(placed("d2", "s1", 2, [(0, ME)])))
            await until(lambda: emitted.statuses("d2/0")[-1:] == [S.RUNNING])
            # d2 is replaced at once: parked again at t + 6, until t + 16.
            mgr.reconcile(cluster.master(DevshardFinalized(devshard_id="d2", epoch=2)))
            await anyio.sleep(6)  # t + 12
            assert emitted.statuses("d2/0")[-1:] == [S.RUNNING]
            mgr.reconcile(cluster.master(placed("d3", "s1", 2, [(0, ME)])))
            await until(lambda: emitted.statuses("d3/0")[-1:] == [S.RUNNING])
            tg.cancel_scope.cancel()

    anyio.run(main, backend="trio", backend_options={"clock": MockClock(autojump_threshold=0)})
    assert len(factory.built) == 1
    assert emitted.last("d2/0").reason == "carried over to d3/0 (loaded, not restarted)"


def test_a_worker_node_allows_a_load_as_long_as_its_runner_config_does(tmp_path: Path) -> None:
    """The manager's fixed 300 s would fail a model load the config gives 900 s, every time."""
    config = {"command": "serve", "wait_ready": True, "load_timeout_s": 900}
    assert load_limit_s(config, 300) == 900 + LOAD_LIMIT_MARGIN_S
    assert load_limit_s({"command": "serve"}, 300) == 300
    assert load_limit_s(config, 1_000) == 1_000  # the longer one wins
    _, master_id = load_identity(tmp_path / "master")
    node = WorkerNode(
        tmp_path / "worker",
        f"/ip4/127.0.0.1/tcp/1/p2p/{master_id}",
        WorkerNodeConfig(runner=RunnerSetting(kind="subprocess", config=config)),
    )
    try:
        assert node.manager is not None
        assert node.manager._load_timeout_s == 900 + LOAD_LIMIT_MARGIN_S
    finally:
        node.close()


# --------------------------------------------------------------------------------------------
# Real subprocess runners
# --------------------------------------------------------------------------------------------

WORKER_SCRIPT = r"""
import os, signal, sys, time
# SIGTERM is blocked and polled/waited for: a Python handler races with time.sleep (a signal
# landing just before a sleep starts is only handled once the sleep ends).
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
pid_file = os.path.join(os.environ["PIDS"], os.environ["CLUSTER_SLOT"])
with open(pid_file + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(pid_file + ".tmp", pid_file)  # atomic: a reader never sees it half-written
for i in range(int(os.environ["ROUNDS"])):
    print("WORK", int(os.environ["CLUSTER_SLOT"]) + 1, flush=True)
    if signal.sigtimedwait({signal.SIGTERM}, 0.01) is not None:
        sys.exit(0)
if os.environ.get("FAIL"):
    sys.stderr.write("fatal: device lost\n")
    sys.exit(4)
signal.sigwait({signal.SIGTERM})
sys.exit(0)
"""


def subprocess_factory(
    pids: Path, rounds: int, fail: bool = False, carry_over: bool = True
) -> RunnerFactory:
    config = {
        "command": [sys.executable, "-c", WORKER_SCRIPT],
        "env": {"PIDS": str(pids), "ROUNDS": str(rounds), "FAIL": "1" if fail else ""},
        "grace_s": 5,
        "carry_over": carry_over,
    }
    return make_factory("subprocess", config)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.anyio
async def test_subprocess_runners_report_work_and_are_stopped(tmp_path: Path) -> None:
    cluster = started_cluster()
    emitted = Emitted()
    mgr = manager(emitted, subprocess_factory(tmp_path, rounds=10))
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME), (1, ME), (2, OTHER)])))
        # slot 0 prints 10 x "WORK 1", slot 1 prints 10 x "WORK 2": 30 units in all.
        await until(lambda: emitted.work("d1") == 30)
        pids = [int((tmp_path / str(slot)).read_text()) for slot in (0, 1)]
        assert all(_alive(pid) for pid in pids)
        mgr.reconcile(cluster.master(DevshardFinalized(devshard_id="d1", epoch=1)))
        await until(lambda: mgr.statuses() == {})
        tg.cancel_scope.cancel()
    assert not any(_alive(pid) for pid in pids)
    assert emitted.statuses("d1/0") == FULL_LIFE
    assert emitted.statuses("d1/1") == FULL_LIFE
    assert emitted.work("d1") == 30


@pytest.mark.anyio
async def test_subprocess_exit_code_is_a_failure_with_reason(tmp_path: Path) -> None:
    cluster = started_cluster()
    emitted = Emitted()
    mgr = manager(emitted, subprocess_factory(tmp_path, rounds=3, fail=True))
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.FAILED])
        reason = emitted.last("d1/0").reason
        assert reason.startswith("serve: ")
        assert "exited with code 4: fatal: device lost" in reason
        await until(lambda: emitted.work("d1") == 3)  # work done before the crash still counts
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_command_exiting_0_while_its_slot_is_assigned_fails_naming_the_exit() -> None:
    # A launcher that daemonizes (`docker run -d`, `nohup ... &`) exits 0 at once.
    launcher = "import sys; sys.stderr.write('started daemon 4242\\n'); sys.exit(0)"
    cluster = started_cluster()
    emitted = Emitted()
    mgr = manager(
        emitted, make_factory("subprocess", {"command": [sys.executable, "-c", launcher]})
    )
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.FAILED])
        tg.cancel_scope.cancel()
    assert emitted.statuses("d1/0") == [*FULL_LIFE[:4], S.FAILED, S.STOPPED]
    failed = [
        e for e in emitted.events if isinstance(e, RunnerStatusUpdated) and e.status is S.FAILED
    ]
    assert failed[0].reason == (
        "serve: ended on its own while its slot was still assigned (a runner must serve "
        "until it is stopped: a command must stay in the foreground): exited with code 0: "
        "started daemon 4242"
    )


@pytest.mark.anyio
async def test_manager_shutdown_stops_every_process(tmp_path: Path) -> None:
    cluster = started_cluster()
    emitted = Emitted()
    mgr = manager(emitted, subprocess_factory(tmp_path, rounds=1))
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME), (1, ME), (2, ME)])))
        await until(lambda: all(emitted.statuses(f"d1/{s}")[-1:] == [S.RUNNING] for s in range(3)))
        await until(lambda: all((tmp_path / str(s)).exists() for s in range(3)))
        pids = [int((tmp_path / str(s)).read_text()) for s in range(3)]
        tg.cancel_scope.cancel()
    assert not any(_alive(pid) for pid in pids)
    for s in range(3):
        assert emitted.statuses(f"d1/{s}")[-2:] == [S.STOPPING, S.STOPPED]


class SlowStop(Plugin):
    """Serves until stopped; its stop takes a while, and it says so (`stop_time_s`)."""

    def stop_time_s(self) -> float:
        return 60.0

    async def stop(self) -> None:
        await anyio.sleep(0.5)  # far past the manager's own stop timeout, well within 60 s
        self.stopped = True


@pytest.mark.anyio
async def test_a_runner_needing_a_longer_stop_gets_it() -> None:
    # A subprocess runner's grace period may exceed the manager's stop timeout: cutting its
    # stop short would leave the command's children running.
    cluster = started_cluster()
    emitted = Emitted()
    runners = Counted(SlowStop)
    mgr = RunnerManager(ME, emitted, runners, health_interval_s=0.02, stop_timeout_s=0.05)
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
        await until(lambda: emitted.statuses("d1/0")[-1:] == [S.RUNNING])
        tg.cancel_scope.cancel()
    [runner] = runners.built
    assert isinstance(runner, SlowStop) and runner.stopped


def test_factory_output_is_checked() -> None:
    factory = make_factory("subprocess", {"command": "true"})
    runner: Runner = factory(desired_spec())
    assert isinstance(runner, SubprocessRunner)
    with pytest.raises(RunnerConfigError):
        make_factory("subprocess", {"command": ""})(desired_spec())


def desired_spec() -> RunnerSpec:
    state = started_cluster().master(placed("d1", "s1", 1, [(0, ME)]))
    return desired_runners(state, ME)["d1/0"]


@pytest.mark.anyio
@pytest.mark.parametrize("carry_over", [True, False])
async def test_subprocess_runner_kept_across_epochs_unless_configured_not_to(
    tmp_path: Path, carry_over: bool
) -> None:
    cluster = started_cluster()
    emitted = Emitted()
    mgr = manager(emitted, subprocess_factory(tmp_path, rounds=3, carry_over=carry_over), 30)
    async with anyio.create_task_group() as tg:
        await tg.start(mgr.run)
        mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
        await until(lambda: emitted.work("d1") == 3)
        first = int((tmp_path / "0").read_text())
        (tmp_path / "0").unlink()
        mgr.reconcile(epoch_turn(cluster, placed("d2", "s1", 2, [(0, ME)])))
        await until(lambda: emitted.statuses("d2/0")[-1:] == [S.RUNNING])
        if carry_over:
            assert emitted.statuses("d1/0")[-1:] == [S.STOPPED] and _alive(first)
            assert not (tmp_path / "0").exists()  # no second process was started
        else:
            await until(lambda: (tmp_path / "0").exists() and emitted.work("d2") == 3)
            assert int((tmp_path / "0").read_text()) != first
            assert emitted.statuses("d1/0") == FULL_LIFE
        assert set(mgr.statuses()) == {"d2/0"}
        tg.cancel_scope.cancel()
    assert not _alive(first)


@pytest.mark.anyio
async def test_a_status_line_without_a_reason_ends_at_the_status(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`runner d1/0: stopping ` ended in a space where a status had no reason."""
    cluster, emitted, _, mgr = counted_setup(carry_over_grace_s=30)
    with caplog.at_level(logging.INFO, logger="cluster.worker.runner_manager"):
        async with anyio.create_task_group() as tg:
            await tg.start(mgr.run)
            mgr.reconcile(cluster.master(placed("d1", "s1", 1, [(0, ME)])))
            await until(lambda: emitted.statuses("d1/0")[-1:] == [S.RUNNING])
            mgr.reconcile(epoch_turn(cluster))  # parked...
            mgr.reconcile(cluster.master(SessionDeleted(session_id="s1")))  # ...then stopped
            await until(lambda: emitted.statuses("d1/0")[-1:] == [S.STOPPED], timeout_s=5)
            tg.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("runner d1/0")]
    assert "runner d1/0: stopping" in lines and "runner d1/0: stopped" in lines, lines
    assert not [line for line in lines if line != line.rstrip()], lines
