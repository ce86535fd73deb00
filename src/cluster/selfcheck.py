"""`cluster selfcheck`: a whole cluster lifecycle, in process, on a fake clock.

A master (real `EventStore` on disk in a temporary directory, the real planner, the real
maintenance rules and request handling) and four simulated workers (real runner self-test
with the simulated runner, replicas folded from the master's log) are driven through:

join -> self-test -> epoch -> placement -> catch-up -> work -> settlement ->
maintenance schedule -> drain -> active (offline, unpunished) -> finish on reconnect ->
staleness disconnect -> replay digest.

Each stage checks what an operator would check and prints PASS or FAIL with the reason;
after a failure the remaining stages are skipped. Nothing sleeps: the clock is an integer.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import anyio

from cluster.control import MaintenanceSchedule, Reply, Request, SessionCreate
from cluster.master.config import PlannerConfig
from cluster.master.maintenance import on_reconnect
from cluster.master.planner import Planner
from cluster.master.requests import LOCAL_OPERATOR, decide
from cluster.shared.apply import fold
from cluster.shared.codec import decode_state, state_digest
from cluster.shared.events import (
    MASTER_ORIGIN,
    EpochSettled,
    EpochStarted,
    Event,
    IndexedEvent,
    MaintenanceDrainStarted,
    MaintenanceStarted,
    NodeConnected,
    NodeDisconnected,
    NodeGatheredInfo,
    NodeHeartbeat,
    NodeInfo,
    WorkReported,
)
from cluster.shared.maintenance_policy import MaintenancePolicy
from cluster.shared.state import State, WindowState
from cluster.shared.store import EventStore, load_state
from cluster.worker.runners.registry import make_factory
from cluster.worker.selftest import run_self_test

T0_MS = 1_800_000_000_000
SECOND = 1_000
MINUTE = 60 * SECOND

PLANNER = PlannerConfig(
    plan_interval_ms=SECOND, stale_cycles=3, epoch_length_ms=MINUTE, miss_grace_ms=5 * SECOND
)
POLICY = MaintenancePolicy(
    min_lead_ms=90 * SECOND,
    drain_lead_ms=MINUTE,
    max_duration_ms=10 * MINUTE,
    max_concurrent_nodes=1,
    max_concurrent_capacity_share=0.5,
)
NODES = ("12D3KooSelfcheckNodeA", "12D3KooSelfcheckNodeB", "12D3KooSelfcheckNodeC")
LATE_NODE = "12D3KooSelfcheckNodeD"


class StageFailed(Exception):
    pass


def require(condition: bool, message: str) -> None:
    if not condition:
        raise StageFailed(message)


@dataclass
class SimCluster:
    """The master's bookkeeping around the real pure pieces, with an integer clock."""

    store: EventStore
    now_ms: int = T0_MS
    planner: Planner = field(default_factory=lambda: Planner(PLANNER, policy=POLICY))
    seqs: dict[str, int] = field(default_factory=dict)
    replicas: dict[str, State] = field(default_factory=dict)
    online: set[str] = field(default_factory=set)
    #: Worker processes started per node: each `connect` is a new one (a new boot id).
    boots: dict[str, int] = field(default_factory=dict)
    session_id: str = ""

    @property
    def state(self) -> State:
        return self.store.state

    def index(self, origin: str, events: list[Event]) -> list[IndexedEvent]:
        batch = []
        idx = self.store.last_idx
        for ev in events:
            idx += 1
            seq = self.seqs.get(origin, 0) + 1
            self.seqs[origin] = seq
            batch.append(IndexedEvent(idx, self.now_ms, origin, seq, ev))
        if batch:
            self.store.append(batch)
        return batch

    def request(self, request: Request, requester: str) -> Reply:
        decision = decide(self.state, request, requester, self.now_ms, POLICY)
        self.index(MASTER_ORIGIN, list(decision.events))
        return decision.reply

    def connect(self, node: str) -> None:
        """What the master does when a newly started worker's authenticated connection
        comes up (the connect hook decides on the state before the NodeConnected)."""
        self.online.add(node)
        self.boots[node] = self.boots.get(node, 0) + 1
        boot_id = f"{node}-boot-{self.boots[node]}"
        events: list[Event] = [NodeConnected(node_id=node, boot_id=boot_id)]
        back = on_reconnect(self.state, node, boot_id, self.now_ms)
        if back is not None:
            events.append(back)
        self.index(MASTER_ORIGIN, events)

    def join(self, node: str) -> None:
        self.connect(node)
        info = NodeInfo(hostname=node[-5:], cpu_count=8, slots=2, slot_memory_mb=8192)
        self.index(node, [NodeGatheredInfo(node_id=node, source="host", info=info)])

    def tick(self, work: bool = True) -> list[IndexedEvent]:
        """One plan cycle: every online worker speaks (heartbeat, work), then the planner."""
        self.now_ms += PLANNER.plan_interval_ms
        state = self.state
        for node in sorted(self.online):
            events: list[Event] = [NodeHeartbeat(node_id=node)]
            if work and state.epoch is not None:
                for shard in state.devshards.values():
                    slots = sum(1 for a in shard.assignments if a.node_id == node)
                    if slots and shard.epoch == state.epoch.epoch:
                        events.append(
                            WorkReported(
                                devshard_id=shard.devshard_id,
                                node_id=node,
                                units=slots,
                                epoch=shard.epoch,
                            )
                        )
            self.index(node, events)
        decided = self.index(MASTER_ORIGIN, self.planner(self.state, self.now_ms))
        self.planner.logged()  # durable: the planner keeps its book (as the master does)
        return decided

    def sync_replicas(self) -> None:
        for node, replica in self.replicas.items():
            self.replicas[node] = fold(replica, self.store.read_from(replica.last_applied + 1))

    def until(self, what: str, found: Callable[[IndexedEvent], bool], cycles: int) -> IndexedEvent:
        for _ in range(cycles):
            for ie in self.tick():
                if found(ie):
                    return ie
        raise StageFailed(f"no {what} within {cycles} cycles")


def _events(batch: list[IndexedEvent], kind: type) -> list[IndexedEvent]:
    return [ie for ie in batch if isinstance(ie.event, kind)]


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def stage_join(c: SimCluster) -> str:
    for node in NODES:
        c.join(node)
    connected = [n for n in NODES if (rec := c.state.nodes.get(n)) and rec.connected]
    require(len(connected) == len(NODES), f"connected {connected}, expected {list(NODES)}")
    return f"{len(NODES)} workers joined and speak"


async def _self_test(c: SimCluster, node: str) -> None:
    config = {"load_s": 0.0, "request_s": 0.0}
    result = await run_self_test(
        "simulated", make_factory("simulated", config), config, node_id=node
    )
    c.index(node, [result])


def stage_self_test(c: SimCluster) -> str:
    async def all_nodes() -> None:
        for node in NODES:
            await _self_test(c, node)

    anyio.run(all_nodes, backend="trio")
    bad = [
        f"{n}: {st.reason if st else 'no result'}"
        for n in NODES
        if not (st := c.state.nodes[n].self_test) or not st.passed
    ]
    require(not bad, "self-test failed: " + "; ".join(bad))
    return "simulated runner loaded, probed and answered a request on every node"


def stage_epoch(c: SimCluster) -> str:
    reply = c.request(SessionCreate(slots=3, memory_per_slot_mb=4096, name="chat"), LOCAL_OPERATOR)
    require(reply.ok, f"session refused: {reply.message}")
    c.session_id = reply.data["session_id"]
    ie = c.until("EpochStarted", lambda ie: isinstance(ie.event, EpochStarted), 3)
    epoch = c.state.epoch
    require(
        epoch is not None and epoch.end_ms - epoch.start_ms == PLANNER.epoch_length_ms,
        f"epoch record {epoch} does not match the configured length",
    )
    assert isinstance(ie.event, EpochStarted)
    return f"epoch {ie.event.epoch} started, ends in {PLANNER.epoch_length_ms // SECOND}s"


def stage_placement(c: SimCluster) -> str:
    for _ in range(3):
        if c.session_id in c.state.devshard_by_session:
            break
        c.tick()
    shard_id = c.state.devshard_by_session.get(c.session_id)
    session = c.state.sessions[c.session_id]
    require(shard_id is not None, f"session not placed: {session.unplaced_reason or 'no reason'}")
    assert shard_id is not None
    shard = c.state.devshards[shard_id]
    nodes = sorted({a.node_id for a in shard.assignments})
    require(len(shard.assignments) == 3, f"{len(shard.assignments)} slots placed, expected 3")
    require(set(nodes) <= set(NODES), f"placed on unknown nodes {nodes}")
    require(len(nodes) >= 2, f"3 slots all on {nodes}: not spread across nodes")
    return f"devshard {shard_id}: 3 slots on {len(nodes)} nodes"


def stage_catch_up(c: SimCluster) -> str:
    c.store.snapshot()
    for _ in range(5):
        c.tick()
    snap = c.store.latest_snapshot()
    require(snap is not None, "the master wrote no snapshot")
    assert snap is not None
    snap_idx, data = snap
    replica = fold(decode_state(data), c.store.read_from(snap_idx + 1))
    behind = c.store.last_idx - snap_idx
    require(state_digest(replica) == state_digest(c.state), "replica digest differs from master")
    c.replicas[LATE_NODE] = replica
    c.join(LATE_NODE)
    anyio.run(_self_test, c, LATE_NODE, backend="trio")
    return f"late node caught up from snapshot at {snap_idx} + {behind} events, same digest"


def stage_work(c: SimCluster) -> str:
    epoch = c.state.epoch
    assert epoch is not None
    while c.now_ms + PLANNER.plan_interval_ms < epoch.end_ms:
        c.tick()
    ledger = c.state.ledgers[epoch.epoch]
    units = sum(account.units for account in ledger.nodes.values())
    require(units > 0, "no work reached the epoch ledger")
    return f"{units} work units in epoch {epoch.epoch}'s ledger"


def stage_settlement(c: SimCluster) -> str:
    epoch = c.state.epoch
    assert epoch is not None
    # The final part: a large settlement comes in several (`split_settlement`), so the
    # payouts are read from the settled ledger, not from one event.
    c.until("EpochSettled", lambda ie: isinstance(ie.event, EpochSettled) and ie.event.final, 3)
    ledger = c.state.ledgers[epoch.epoch]
    payouts = {n: a.payout for n, a in ledger.nodes.items() if a.payout is not None}
    punished = [n for n, p in payouts.items() if p.punished]
    require(not punished, f"nodes punished in a clean epoch: {punished}")
    paid = sum(p.reward for p in payouts.values())
    require(paid > 0, "nothing was paid for the epoch's work")
    require(c.state.ledgers[epoch.epoch].settled, "ledger not marked settled")
    return f"epoch {epoch.epoch} settled: {paid} paid to {len(payouts)} nodes, none punished"


def stage_maintenance(c: SimCluster) -> str:
    node = NODES[0]
    reply = c.request(MaintenanceSchedule(in_ms=2 * MINUTE, duration_ms=3 * MINUTE), node)
    require(reply.ok, f"schedule refused: {reply.message}")
    window_id = c.state.open_window_by_node[node]
    start = c.state.windows[window_id].start_ms
    c.until(
        "MaintenanceDrainStarted", lambda ie: isinstance(ie.event, MaintenanceDrainStarted), 120
    )
    # While draining, no devshard may hold the node past the window start.
    while c.now_ms < start - PLANNER.plan_interval_ms:
        c.tick()
        for shard in c.state.devshards.values():
            if shard.ends_ms > start:
                require(
                    all(a.node_id != node for a in shard.assignments),
                    f"{shard.devshard_id} placed on a draining node past the window start",
                )
    c.until("MaintenanceStarted", lambda ie: isinstance(ie.event, MaintenanceStarted), 5)
    c.online.discard(node)  # the host goes offline for its work
    for _ in range(PLANNER.stale_cycles * 3):
        for ie in c.tick():
            ev = ie.event
            gone = isinstance(ev, NodeDisconnected) and ev.node_id == node
            require(not gone, "a node offline for maintenance was disconnected")
    epoch = c.state.epoch
    assert epoch is not None
    account = c.state.ledgers[epoch.epoch].node(node)
    require(
        account.disconnect is None, "node in maintenance was recorded as an unexcused disconnect"
    )
    c.connect(node)  # the worker restarts and reconnects within its window
    win = c.state.windows[window_id]
    require(
        win.state is WindowState.COMPLETED and win.outcome == "reconnect",
        f"window is {win.state.value} ({win.outcome or 'open'}) after the reconnect",
    )
    # Back in service: a second session needs every free slot, the returning node's too.
    reply = c.request(SessionCreate(slots=5, memory_per_slot_mb=4096, name="batch"), LOCAL_OPERATOR)
    require(reply.ok, f"second session refused: {reply.message}")
    c.until(
        "next EpochStarted",
        lambda ie: isinstance(ie.event, EpochStarted) and ie.event.epoch > epoch.epoch,
        PLANNER.epoch_length_ms // PLANNER.plan_interval_ms + 2,
    )
    holders = {a.node_id for shard in c.state.devshards.values() for a in shard.assignments}
    require(node in holders, f"node not placed again after its window: holders {sorted(holders)}")
    return (
        f"window {window_id}: scheduled, drained, active offline unpunished, finished on reconnect"
    )


def stage_staleness(c: SimCluster) -> str:
    node = NODES[2]
    c.online.discard(node)  # the process dies: its events stop
    for cycle in range(1, PLANNER.stale_cycles + 2):
        for ie in c.tick():
            ev = ie.event
            if isinstance(ev, NodeDisconnected) and ev.node_id == node:
                require(not ev.excused, "a plain failure was excused")
                require(cycle <= PLANNER.stale_cycles + 1, f"disconnected after {cycle} cycles")
                return f"silent node disconnected after {cycle} idle cycles: {ev.reason}"
    raise StageFailed(f"silent node still connected after {PLANNER.stale_cycles + 1} cycles")


def stage_replay(c: SimCluster) -> str:
    c.sync_replicas()
    replayed = load_state(c.store.log, None)
    master = state_digest(c.state)
    require(state_digest(replayed) == master, "replay of the log on disk differs from the master")
    for node, replica in c.replicas.items():
        require(state_digest(replica) == master, f"replica of {node} differs from the master")
    return f"{c.store.last_idx} events replayed from disk: digest {master[:16]}... on all"


STAGES: list[tuple[str, Callable[[SimCluster], str]]] = [
    ("join", stage_join),
    ("self-test", stage_self_test),
    ("epoch", stage_epoch),
    ("placement", stage_placement),
    ("catch-up", stage_catch_up),
    ("work", stage_work),
    ("settlement", stage_settlement),
    ("maintenance", stage_maintenance),
    ("staleness", stage_staleness),
    ("replay", stage_replay),
]


def run_selfcheck(out: TextIO | None = None, data_dir: Path | None = None) -> bool:
    """Run every stage; print PASS/FAIL per stage; True when all passed."""
    out = out if out is not None else sys.stdout
    with tempfile.TemporaryDirectory(prefix="cluster-selfcheck-") as tmp:
        store = EventStore.open(data_dir or Path(tmp), snapshot_every=1_000_000)
        cluster = SimCluster(store)
        failed: str | None = None
        try:
            for name, stage in STAGES:
                if failed is not None:
                    print(f"SKIP  {name:<12} (after {failed} failed)", file=out)
                    continue
                try:
                    detail = stage(cluster)
                except StageFailed as exc:
                    failed = name
                    print(f"FAIL  {name:<12} {exc}", file=out)
                except Exception as exc:  # a crash in a stage is a failure of that stage
                    failed = name
                    print(f"FAIL  {name:<12} crashed: {type(exc).__name__}: {exc}", file=out)
                else:
                    print(f"PASS  {name:<12} {detail}", file=out)
        finally:
            store.close()
    print("selfcheck:", "all stages passed" if failed is None else f"FAILED at {failed}", file=out)
    return failed is None
