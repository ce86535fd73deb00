"""A tiny in-memory master for maintenance tests: every state is built by applying real
events through `apply`, and every decision comes from `cluster.master.maintenance`.

The clock is a plain integer the test moves; nothing here sleeps or reads real time.
"""

from __future__ import annotations

from cluster.master import maintenance as mt
from cluster.shared.apply import apply
from cluster.shared.events import (
    MASTER_ORIGIN,
    DevshardFinalized,
    DevshardPlaced,
    EpochSettled,
    EpochStarted,
    Event,
    IndexedEvent,
    MaintenanceCancelled,
    MaintenanceFinished,
    MaintenanceScheduled,
    NodeConnected,
    NodeDisconnected,
    NodeGatheredInfo,
    NodeHeartbeat,
    NodeInfo,
    NodePayout,
    RunnerSelfTestCompleted,
    SessionRequested,
    SlotAssignment,
)
from cluster.shared.excuse import is_excused
from cluster.shared.maintenance_policy import MaintenancePolicy
from cluster.shared.state import EMPTY_STATE, State

MIN = 60_000
HOUR = 60 * MIN
T0 = 1_800_000_000_000  # 2027-01-15T08:00:00Z: a fixed, readable origin for the fake clock


def node_id(n: int) -> str:
    """Peer-id-like ids that share a long prefix, as real libp2p Ed25519 ids do."""
    return f"12D3KooWTestNode{n:04d}xyz"


class Log:
    def __init__(self, policy: MaintenancePolicy | None = None, now_ms: int = T0) -> None:
        self.policy = policy or MaintenancePolicy()
        self.now = now_ms
        self.state: State = EMPTY_STATE
        self.log: list[IndexedEvent] = []
        self._seq: dict[str, int] = {}
        #: Worker processes started per node: each has its own boot id (`boot_id`).
        self._boots: dict[str, int] = {}
        #: state.windows after every applied event, for history comparisons.
        self.window_history: list[object] = []

    # -- raw appends -------------------------------------------------------------------------

    def emit(self, event: Event, origin: str = MASTER_ORIGIN) -> IndexedEvent:
        seq = self._seq.get(origin, 0) + 1
        self._seq[origin] = seq
        ie = IndexedEvent(
            idx=self.state.last_applied + 1,
            master_time_ms=self.now,
            origin=origin,
            seq=seq,
            event=event,
        )
        self.state = apply(self.state, ie)
        self.log.append(ie)
        self.window_history.append(self.state.windows)
        return ie

    def advance(self, ms: int) -> None:
        self.now += ms

    # -- cluster facts ---------------------------------------------------------------------

    def boot_id(self, node: str) -> str:
        """The boot id of the node's current worker process."""
        return f"{node}-boot-{self._boots.get(node, 0)}"

    def join(self, node: str, slots: int = 4, *, self_tested: bool = True) -> None:
        """A node that connects and offers `slots`; its runners pass their self-test unless
        `self_tested` is False (a node nothing could be placed on yet)."""
        self._boots[node] = 1
        self.emit(NodeConnected(node_id=node, boot_id=self.boot_id(node)))
        self.emit(
            NodeGatheredInfo(node_id=node, source="test", info=NodeInfo(slots=slots)), origin=node
        )
        if self_tested:
            test = RunnerSelfTestCompleted(node_id=node, runner_kind="simulated", passed=True)
            self.emit(test, origin=node)

    def heartbeat(self, node: str) -> None:
        self.emit(NodeHeartbeat(node_id=node), origin=node)

    def disconnect(self, node: str, reason: str = "stale") -> NodeDisconnected:
        ev = NodeDisconnected(
            node_id=node, reason=reason, excused=is_excused(self.state, node, self.now)
        )
        self.emit(ev)
        return ev

    def reconnect(self, node: str, *, restarted: bool) -> MaintenanceFinished | None:
        """What the master shell does on a worker's hello: decide on the state before it
        whether the worker's return finishes its window, then record both. `restarted`: the
        hello comes from a new worker process (a new boot id), not the same one re-dialling."""
        if restarted:
            self._boots[node] = self._boots.get(node, 0) + 1
        boot_id = self.boot_id(node)
        done = mt.on_reconnect(self.state, node, boot_id, self.now)
        self.emit(NodeConnected(node_id=node, boot_id=boot_id))
        if done is not None:
            self.emit(done)
        return done

    def epoch(self, epoch: int, length_ms: int = 10 * MIN) -> None:
        self.emit(
            EpochStarted(epoch=epoch, start_ms=self.now, end_ms=self.now + length_ms, seed=epoch)
        )

    def place(self, devshard_id: str, node: str, ends_ms: int, epoch: int = 1) -> None:
        session = f"s-{devshard_id}"
        if session not in self.state.sessions:
            self.emit(SessionRequested(session_id=session, slots=1, memory_per_slot_mb=1))
        self.emit(
            DevshardPlaced(
                devshard_id=devshard_id,
                session_id=session,
                epoch=epoch,
                assignments=(SlotAssignment(0, node),),
                ends_ms=ends_ms,
            )
        )

    def finalize(self, devshard_id: str, epoch: int = 1) -> None:
        self.emit(DevshardFinalized(devshard_id=devshard_id, epoch=epoch))

    def earn(self, node: str, epoch: int) -> int:
        """Settle an epoch in which `node` was unpunished, crediting it per the policy."""
        credit = mt.credit_to_earn_ms(self.state, node, self.policy)
        payout = NodePayout(
            node_id=node, units=0, reward=0, punished=False, credit_earned_ms=credit
        )
        self.emit(EpochSettled(epoch=epoch, payouts=(payout,)))
        return credit

    # -- maintenance requests, the way the master handles them -----------------------------

    def check(
        self, node: str, start_ms: int, duration_ms: int, requester: str | None = None
    ) -> mt.ScheduleDecision:
        return mt.check_schedule(
            self.state, node, requester or node, start_ms, duration_ms, self.now, self.policy
        )

    def schedule(
        self, node: str, start_ms: int, duration_ms: int, requester: str | None = None
    ) -> MaintenanceScheduled | mt.ScheduleDecision:
        out = mt.schedule(
            self.state, node, requester or node, start_ms, duration_ms, self.now, self.policy
        )
        if isinstance(out, MaintenanceScheduled):
            self.emit(out)
        return out

    def schedule_ok(self, node: str, start_ms: int, duration_ms: int) -> str:
        out = self.schedule(node, start_ms, duration_ms)
        assert isinstance(out, MaintenanceScheduled), mt.render_decision(out)
        return out.window_id

    def cancel(
        self, node: str, window_id: str | None = None, requester: str | None = None
    ) -> MaintenanceCancelled | mt.Rejection:
        out = mt.cancel(self.state, node, requester or node, window_id, self.now, self.policy)
        if not isinstance(out, mt.Rejection):
            self.emit(out)
        return out

    def finish(
        self, node: str, window_id: str | None = None, requester: str | None = None
    ) -> MaintenanceFinished | mt.Rejection:
        out = mt.finish(self.state, node, requester or node, window_id, self.now, self.policy)
        if not isinstance(out, mt.Rejection):
            self.emit(out)
        return out

    def cycle(self) -> list[Event]:
        events = mt.maintenance_cycle(self.state, self.now, self.policy)
        for ev in events:
            self.emit(ev)
        return events

    def credit(self, node: str) -> int:
        return mt.credit_balance_ms(self.state, node, self.policy)
