"""A small cluster built by folding real events through `apply`, with a fake clock.

Shared by the planner's pure tests: nodes announce themselves with the events a worker
sends (info, self-test), the master's decisions are applied exactly as the master would
apply them, and time only moves when a test says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

from cluster.master.config import PlannerConfig
from cluster.master.planner import Planner
from cluster.shared.apply import apply
from cluster.shared.events import (
    MASTER_ORIGIN,
    Event,
    GpuInfo,
    IndexedEvent,
    MaintenanceScheduled,
    MaintenanceStarted,
    NodeGatheredInfo,
    NodeHeartbeat,
    NodeInfo,
    RunnerSelfTestCompleted,
    SessionRequested,
    WorkReported,
)
from cluster.shared.state import EMPTY_STATE, State

T = TypeVar("T")
T0 = 1_700_000_000_000
GPU = GpuInfo(index=0, name="H100", uuid="GPU-0", memory_total_mb=81_920, memory_used_mb=0)


class World:
    def __init__(self, now_ms: int = T0) -> None:
        self.state: State = EMPTY_STATE
        self.now = now_ms
        self.log: list[IndexedEvent] = []
        self._seq: dict[str, int] = {}

    def add(self, origin: str, event: Event) -> State:
        seq = self._seq.get(origin, 0) + 1
        self._seq[origin] = seq
        ie = IndexedEvent(self.state.last_applied + 1, self.now, origin, seq, event)
        self.log.append(ie)
        self.state = apply(self.state, ie)
        return self.state

    def master(self, events: Iterable[Event]) -> State:
        for ev in events:
            self.add(MASTER_ORIGIN, ev)
        return self.state

    def tick(self, ms: int) -> None:
        self.now += ms

    # -- nodes --------------------------------------------------------------------------

    def node(
        self,
        node_id: str,
        *,
        slots: int = 4,
        memory_mb: int = 16_384,
        gpu: bool = False,
        self_test: bool | None = True,
    ) -> State:
        info = NodeInfo(
            hostname=node_id, slots=slots, slot_memory_mb=memory_mb, gpus=(GPU,) if gpu else ()
        )
        self.add(node_id, NodeGatheredInfo(node_id=node_id, source="static", info=info))
        if self_test is not None:
            self.add(
                node_id,
                RunnerSelfTestCompleted(
                    node_id=node_id,
                    runner_kind="simulated",
                    passed=self_test,
                    reason="" if self_test else "health probe timed out",
                ),
            )
        return self.state

    def heartbeat(self, *node_ids: str) -> None:
        for node_id in node_ids:
            self.add(node_id, NodeHeartbeat(node_id=node_id))

    def heartbeat_all(self, *except_: str) -> None:
        """A heartbeat from every known node but `except_`: keeps them live for the planner."""
        self.heartbeat(*(n for n in self.state.nodes if n not in except_))

    def session(
        self,
        session_id: str,
        slots: int = 2,
        memory_mb: int = 8_192,
        *,
        gpu: bool = False,
        reward_per_unit: int = 1,
    ) -> State:
        return self.add(
            MASTER_ORIGIN,
            SessionRequested(
                session_id=session_id,
                slots=slots,
                memory_per_slot_mb=memory_mb,
                gpu=gpu,
                reward_per_unit=reward_per_unit,
            ),
        )

    def window(self, node_id: str, start_ms: int, duration_ms: int, *, start: bool = False) -> str:
        """Schedule (and optionally start) a maintenance window for `node_id`."""
        window_id = f"mw-{node_id}-{self.state.last_applied + 1}"
        self.add(
            node_id,
            MaintenanceScheduled(
                window_id=window_id,
                node_id=node_id,
                start_ms=start_ms,
                duration_ms=duration_ms,
                requested_ms=self.now,
                credit_spent_ms=0,
            ),
        )
        if start:
            self.add(MASTER_ORIGIN, MaintenanceStarted(window_id=window_id, node_id=node_id))
        return window_id

    def work(self, node_id: str, devshard_id: str, units: int, epoch: int) -> State:
        return self.add(
            node_id,
            WorkReported(devshard_id=devshard_id, node_id=node_id, units=units, epoch=epoch),
        )

    # -- planning -----------------------------------------------------------------------

    def cycle(self, planner: Planner, ms: int | None = None) -> list[Event]:
        """Advance the clock one plan interval (or `ms`), plan, apply, return the events."""
        self.tick(planner.cfg.plan_interval_ms if ms is None else ms)
        events = planner(self.state, self.now)
        self.master(events)
        planner.logged()
        return events


def quick_config(**overrides: int) -> PlannerConfig:
    """A config with a 60 s epoch and 1 s cycles, for tests. No restart grace: tests build a
    new Planner on a running cluster's state wherever they like (tests of the grace set it)."""
    values: dict[str, int] = {
        "epoch_length_ms": 60_000,
        "miss_grace_ms": 5_000,
        "restart_grace_ms": 0,
    }
    values.update(overrides)
    return PlannerConfig.from_mapping(values)


def of_type(events: Sequence[Event], kind: type[T]) -> list[T]:
    return [e for e in events if isinstance(e, kind)]
