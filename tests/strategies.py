"""Hypothesis strategies for valid random event logs covering EVERY event type.

Ids come from small pools (a handful of nodes, windows, sessions, devshards, runners) so that
generated sequences hit existing records: windows get scheduled and then drained, started,
finished; devshards are placed for sessions that exist and then finalized; work lands in
ledgers that later settle. Node-originated events carry the node as `origin`, decisions carry
`MASTER_ORIGIN`; indices are consecutive, master times non-decreasing, and each origin's
`seq` counts up, as the master would write them.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from cluster.shared.events import (
    EVENT_TYPES,
    MASTER_ORIGIN,
    DevshardFinalized,
    DevshardPlaced,
    EpochSettled,
    EpochStarted,
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
    NodeRemoved,
    NodeStopping,
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
from cluster.shared.state import runner_id_for

NODE_IDS = tuple(f"12D3KooWTestNode{i}" for i in range(6))
WINDOW_IDS = tuple(f"win-{i}" for i in range(4))
SESSION_IDS = tuple(f"sess-{i}" for i in range(3))
DEVSHARD_IDS = tuple(f"shard-{i}" for i in range(4))
RUNNER_IDS = tuple(f"runner-{i}" for i in range(4))
T0_MS = 1_700_000_000_000

node_ids = st.sampled_from(NODE_IDS)
window_ids = st.sampled_from(WINDOW_IDS)
session_ids = st.sampled_from(SESSION_IDS)
devshard_ids = st.sampled_from(DEVSHARD_IDS)
runner_ids = st.sampled_from(RUNNER_IDS)
epochs = st.integers(1, 4)
small = st.integers(0, 50)
times = st.integers(T0_MS, T0_MS + 3_600_000)
durations = st.integers(1, 7_200_000)
words = st.text(alphabet="abcdefghij -_", max_size=12)
optional_int = st.none() | st.integers(0, 1 << 40)
#: NodeInfo's gauges take any int64 >= 0 (State keeps them in int64 cells).
optional_gauge = st.none() | st.integers(0, 2**63 - 1)

gpu_infos = st.builds(
    GpuInfo,
    index=st.integers(0, 7),
    name=st.sampled_from(["H100", "A100", "L4"]),
    uuid=st.uuids().map(str),
    memory_total_mb=st.integers(1, 200_000),
    memory_used_mb=st.integers(0, 200_000),
    utilization_pct=st.none() | st.integers(0, 100),
    temperature_c=st.none() | st.integers(0, 110),
)

node_infos = st.builds(
    NodeInfo,
    hostname=st.none() | words,
    cpu_count=st.none() | st.integers(1, 256),
    cpu_percent=st.none() | st.floats(0.0, 100.0, allow_nan=False),
    memory_total_mb=optional_int,
    memory_available_mb=optional_gauge,
    disk_total_mb=optional_int,
    disk_free_mb=optional_gauge,
    net_bytes_sent=optional_gauge,
    net_bytes_recv=optional_gauge,
    gpus=st.none() | st.lists(gpu_infos, max_size=2).map(tuple),
    slots=st.none() | st.integers(0, 8),
    slot_memory_mb=st.none() | st.integers(0, 80_000),
)

assignments = st.lists(
    st.builds(SlotAssignment, slot=st.integers(0, 7), node_id=node_ids), min_size=1, max_size=4
).map(tuple)

payouts = st.lists(
    st.builds(
        NodePayout,
        node_id=node_ids,
        units=small,
        reward=small,
        punished=st.booleans(),
        reason=words,
        credit_earned_ms=st.integers(0, 600_000),
    ),
    max_size=4,
    unique_by=lambda p: p.node_id,
).map(tuple)

#: Worker process boot ids ("" as in logs from before boot ids): few, so that a goodbye
#: often names the process of the node's latest hello, and sometimes another.
boot_ids = st.sampled_from(["", "boot-1", "boot-2"])

#: Events a node says about itself: `origin` is that node.
NODE_EVENTS: dict[type[Any], st.SearchStrategy[Any]] = {
    NodeGatheredInfo: st.builds(
        NodeGatheredInfo,
        node_id=node_ids,
        source=st.sampled_from(["cpu", "memory", "disk", "net", "gpu", "slots"]),
        info=node_infos,
    ),
    NodeHeartbeat: st.builds(NodeHeartbeat, node_id=node_ids),
    # A goodbye from the node's current worker process (its boot id) or from another one.
    NodeStopping: st.builds(NodeStopping, node_id=node_ids, boot_id=boot_ids, reason=words),
    # Mostly the slot's own runner id (only a slot's holder creates a runner record), and
    # sometimes one that does not match, which the reducer must ignore.
    RunnerStatusUpdated: st.tuples(
        st.just("") | devshard_ids, st.integers(-1, 7), st.integers(0, 9), runner_ids
    ).flatmap(
        lambda t: st.builds(
            RunnerStatusUpdated,
            runner_id=st.just(runner_id_for(t[0], t[1]) if t[2] else t[3]),
            node_id=node_ids,
            status=st.sampled_from(RunnerStatus),
            devshard_id=st.just(t[0]),
            slot=st.just(t[1]),
            reason=words,
        )
    ),
    RunnerSelfTestCompleted: st.builds(
        RunnerSelfTestCompleted,
        node_id=node_ids,
        runner_kind=st.sampled_from(["echo", "llm"]),
        passed=st.booleans(),
        reason=words,
        load_ms=small,
        probe_ms=small,
        request_ms=small,
        config_digest=words,
    ),
    WorkReported: st.builds(
        WorkReported,
        devshard_id=devshard_ids,
        node_id=node_ids,
        units=st.integers(-1, 20),
        epoch=epochs,
    ),
}

#: Decisions and facts the master records: `origin` is MASTER_ORIGIN.
MASTER_EVENTS: dict[type[Any], st.SearchStrategy[Any]] = {
    NodeConnected: st.builds(
        NodeConnected, node_id=node_ids, addr=st.just("/ip4/127.0.0.1/tcp/1"), boot_id=boot_ids
    ),
    NodeDisconnected: st.builds(
        NodeDisconnected, node_id=node_ids, reason=words, excused=st.booleans()
    ),
    NodeRemoved: st.builds(NodeRemoved, node_id=node_ids, reason=words),
    WorkMissed: st.builds(
        WorkMissed,
        devshard_id=devshard_ids,
        node_id=node_ids,
        epoch=epochs,
        count=st.integers(0, 3),
        reason=words,
        excused=st.booleans(),
    ),
    MaintenanceScheduled: st.builds(
        MaintenanceScheduled,
        window_id=window_ids,
        node_id=node_ids,
        start_ms=times,
        duration_ms=durations,
        requested_ms=times,
        credit_spent_ms=durations,
    ),
    MaintenanceCancelled: st.builds(
        MaintenanceCancelled,
        window_id=window_ids,
        node_id=node_ids,
        reason=words,
        credit_refund_ms=st.integers(0, 7_200_000),
    ),
    MaintenanceDrainStarted: st.builds(
        MaintenanceDrainStarted, window_id=window_ids, node_id=node_ids
    ),
    MaintenanceStarted: st.builds(MaintenanceStarted, window_id=window_ids, node_id=node_ids),
    MaintenanceFinished: st.builds(
        MaintenanceFinished,
        window_id=window_ids,
        node_id=node_ids,
        how=st.sampled_from(["host", "reconnect"]),
    )
    | st.builds(
        MaintenanceFinished,
        window_id=window_ids,
        node_id=node_ids,
        how=st.just("operator"),
        by=st.sampled_from(["operator:local", "12D3KooWoperator"]),
    ),
    MaintenanceOverrun: st.builds(MaintenanceOverrun, window_id=window_ids, node_id=node_ids),
    EpochStarted: st.builds(
        EpochStarted, epoch=epochs, start_ms=times, end_ms=times, seed=st.integers(0, (1 << 63) - 1)
    ),
    SessionRequested: st.builds(
        SessionRequested,
        session_id=session_ids,
        slots=st.integers(1, 8),
        memory_per_slot_mb=st.integers(1, 80_000),
        gpu=st.booleans(),
        name=words,
        reward_per_unit=st.integers(1, 5),
    ),
    SessionDeleted: st.builds(SessionDeleted, session_id=session_ids),
    DevshardPlaced: st.builds(
        DevshardPlaced,
        devshard_id=devshard_ids,
        session_id=session_ids,
        epoch=epochs,
        assignments=assignments,
        ends_ms=times,
        reason=st.sampled_from(["epoch", "replace"]),
    ),
    SessionUnplaced: st.builds(SessionUnplaced, session_id=session_ids, epoch=epochs, reason=words),
    DevshardFinalized: st.builds(DevshardFinalized, devshard_id=devshard_ids, epoch=epochs),
    EpochSettled: st.builds(EpochSettled, epoch=epochs, payouts=payouts),
    LateWorkSettled: st.builds(
        LateWorkSettled, epoch=epochs, node_id=node_ids, units=small, reward=small
    ),
}

if set(NODE_EVENTS) | set(MASTER_EVENTS) != set(EVENT_TYPES):  # keep up with the catalogue
    missing = set(EVENT_TYPES) - set(NODE_EVENTS) - set(MASTER_EVENTS)
    raise RuntimeError(
        f"tests/strategies.py has no strategy for {sorted(t.__name__ for t in missing)}"
    )

#: Operator decisions that take records out of State (`NodeRemoved`): drawn only by
#: `with_removals`, so the default mix keeps building the records the other events act on.
_REMOVALS = (NodeRemoved,)

#: (origin, event) pairs of every type but `_REMOVALS`, each type about equally likely.
origin_and_event: st.SearchStrategy[tuple[str, Any]] = st.one_of(
    *(s.map(lambda ev: (ev.node_id, ev)) for s in NODE_EVENTS.values()),
    *(
        s.map(lambda ev: (MASTER_ORIGIN, ev))
        for t, s in MASTER_EVENTS.items()
        if t not in _REMOVALS
    ),
)

#: (origin, event) pairs of every type, removals included (a removed node that connects
#: again takes back its slot; its own events before that are ignored): what the fold and
#: replay properties draw.
with_removals: st.SearchStrategy[tuple[str, Any]] = st.one_of(
    origin_and_event, *(MASTER_EVENTS[t].map(lambda ev: (MASTER_ORIGIN, ev)) for t in _REMOVALS)
)


@st.composite
def event_logs(
    draw: st.DrawFn,
    *,
    min_size: int = 0,
    max_size: int = 80,
    start_idx: int = 1,
    pairs: st.SearchStrategy[tuple[str, Any]] = origin_and_event,
) -> list[IndexedEvent]:
    """A valid log: consecutive indices from `start_idx`, non-decreasing master time,
    per-origin sequence numbers counting up. `pairs` draws each (origin, event)."""
    steps = draw(st.lists(pairs, min_size=min_size, max_size=max_size))
    gaps = draw(st.lists(st.integers(0, 5_000), min_size=len(steps), max_size=len(steps)))
    now = T0_MS
    seqs: dict[str, int] = {}
    out = []
    for i, ((origin, event), gap) in enumerate(zip(steps, gaps, strict=True)):
        now += gap
        seqs[origin] = seqs.get(origin, 0) + 1
        out.append(
            IndexedEvent(
                idx=start_idx + i, master_time_ms=now, origin=origin, seq=seqs[origin], event=event
            )
        )
    return out
