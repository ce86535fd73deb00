"""Replay speed of a long event log, beside the speed of merely reading and decoding it.

Run: .venv/bin/python bench/replay_bench.py [--events N] [--nodes N] [--dir PATH]

Writes a log of N (default 1,000,000) realistic events into a temporary directory -- mostly
heartbeats and info from ~1,000 nodes, plus runner status, work, misses, sessions, devshard
placement, epoch starts and settlements -- then measures, in the same run:

- open: `EventLog.open` of the finished log (tail recovery of the last segment);
- decode-only: read every record from disk, verify both CRCs and the index, msgspec-decode it
  to an `IndexedEvent` (`store.decoded_events`, the exact stream replay folds);
- replay: the same stream folded into State (`apply.fold`, what `restore` and
  `cluster replay` do), and for reference the one-event-at-a-time `apply` loop;
- snapshot load: the newest snapshot (at 90% of the log) decoded plus the tail folded.

Target (issue 2): replay >= 40% of decode-only.
"""

from __future__ import annotations

import argparse
import gc
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cluster.shared import codec
from cluster.shared.apply import apply, fold
from cluster.shared.eventlog import EventLog
from cluster.shared.events import (
    MASTER_ORIGIN,
    DevshardFinalized,
    DevshardPlaced,
    EpochSettled,
    EpochStarted,
    Event,
    IndexedEvent,
    NodeConnected,
    NodeGatheredInfo,
    NodeHeartbeat,
    NodeInfo,
    NodePayout,
    RunnerStatus,
    RunnerStatusUpdated,
    SessionRequested,
    SlotAssignment,
    WorkMissed,
    WorkReported,
)
from cluster.shared.snapshots import SnapshotStore
from cluster.shared.state import EMPTY_STATE, State
from cluster.shared.store import Restored, decoded_events, restore

T0_MS = 1_700_000_000_000
CYCLE_MS = 1_000
EPOCH_CYCLES = 120
SESSIONS = 60
BATCH = 5_000


def node_id(i: int) -> str:
    return f"12D3KooWBenchNode{i:05d}"


def cluster_events(nodes: int, rng: random.Random) -> Iterator[tuple[str, Event]]:
    """An endless, plausible stream of (origin, event) for a cluster of `nodes` machines."""
    ids = [node_id(i) for i in range(nodes)]
    for n in ids:
        yield MASTER_ORIGIN, NodeConnected(node_id=n, addr="/ip4/10.0.0.1/tcp/7000")
        info = NodeInfo(
            hostname=f"host-{n[-5:]}",
            cpu_count=64,
            memory_total_mb=512_000,
            disk_total_mb=4_000_000,
            slots=4,
            slot_memory_mb=80_000,
        )
        yield n, NodeGatheredInfo(node_id=n, source="host", info=info)
    for s in range(SESSIONS):
        yield (
            MASTER_ORIGIN,
            SessionRequested(
                session_id=f"sess-{s}", slots=8, memory_per_slot_mb=40_000, name=f"model-{s}"
            ),
        )
    epoch = 0
    shards: list[tuple[str, list[str]]] = []
    cycle = 0
    while True:
        now = T0_MS + cycle * CYCLE_MS
        if cycle % EPOCH_CYCLES == 0:
            for shard_id, _ in shards:
                yield MASTER_ORIGIN, DevshardFinalized(devshard_id=shard_id, epoch=epoch)
            if epoch:
                payouts = tuple(
                    NodePayout(
                        node_id=n,
                        units=rng.randint(0, 500),
                        reward=rng.randint(0, 500),
                        punished=False,
                        credit_earned_ms=60_000,
                    )
                    for n in ids
                )
                yield MASTER_ORIGIN, EpochSettled(epoch=epoch, payouts=payouts)
            epoch += 1
            end = now + EPOCH_CYCLES * CYCLE_MS
            yield (
                MASTER_ORIGIN,
                EpochStarted(epoch=epoch, start_ms=now, end_ms=end, seed=rng.getrandbits(63)),
            )
            shards = []
            for s in range(SESSIONS):
                members = rng.sample(ids, 8)
                shard_id = f"shard-{epoch}-{s}"
                shards.append((shard_id, members))
                yield (
                    MASTER_ORIGIN,
                    DevshardPlaced(
                        devshard_id=shard_id,
                        session_id=f"sess-{s}",
                        epoch=epoch,
                        assignments=tuple(SlotAssignment(k, m) for k, m in enumerate(members)),
                        ends_ms=end,
                    ),
                )
                for k, m in enumerate(members):
                    yield (
                        m,
                        RunnerStatusUpdated(
                            runner_id=f"{shard_id}/{k}",
                            node_id=m,
                            status=RunnerStatus.RUNNING,
                            devshard_id=shard_id,
                            slot=k,
                        ),
                    )
        for i, n in enumerate(ids):
            yield n, NodeHeartbeat(node_id=n)
            if (i + cycle) % 5 == 0:
                info = NodeInfo(
                    cpu_percent=round(rng.uniform(0, 100), 1),
                    memory_available_mb=rng.randint(0, 512_000),
                )
                yield n, NodeGatheredInfo(node_id=n, source="cpu", info=info)
            if (i + cycle) % 30 == 0:
                info = NodeInfo(
                    disk_free_mb=rng.randint(0, 4_000_000),
                    net_bytes_sent=cycle * 10_000 + i,
                    net_bytes_recv=cycle * 20_000 + i,
                )
                yield n, NodeGatheredInfo(node_id=n, source="disk+net", info=info)
        for shard_id, members in shards:
            for m in members:
                if rng.random() < 0.02:
                    yield MASTER_ORIGIN, WorkMissed(devshard_id=shard_id, node_id=m, epoch=epoch)
                else:
                    units = rng.randint(1, 20)
                    yield m, WorkReported(devshard_id=shard_id, node_id=m, units=units, epoch=epoch)
        cycle += 1


def write_log(directory: Path, count: int, nodes: int) -> float:
    """Write `count` events in group commits of BATCH; returns seconds."""
    rng = random.Random(42)
    seqs: dict[str, int] = {}
    stream = cluster_events(nodes, rng)
    started = time.perf_counter()
    with EventLog.open(directory) as lg:
        idx = 0
        while idx < count:
            batch = []
            for _ in range(min(BATCH, count - idx)):
                origin, ev = next(stream)
                idx += 1
                seqs[origin] = seqs.get(origin, 0) + 1
                ie = IndexedEvent(idx, T0_MS + idx, origin, seqs[origin], ev)
                batch.append((idx, codec.encode_event(ie)))
            lg.append(batch)
    return time.perf_counter() - started


def timed(fn: Callable[[], object]) -> float:
    gc.collect()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--nodes", type=int, default=1_000)
    parser.add_argument("--dir", type=Path, help="where to write the log (default: a temp dir)")
    args = parser.parse_args()
    if args.events < 10 or args.nodes < 8:
        parser.error("--events must be >= 10 and --nodes >= 8")
    root = args.dir or Path(tempfile.mkdtemp(prefix="replay-bench-"))
    log_dir, snap_dir = root / "log", root / "snapshots"
    n = args.events
    try:
        print(f"writing {n:,} events from {args.nodes:,} nodes into {root} ...", flush=True)
        write_s = write_log(log_dir, n, args.nodes)
        size = sum(p.stat().st_size for p in log_dir.glob("*.seg"))
        print(
            f"  written in {write_s:.1f} s ({n / write_s:,.0f} events/s incl. generation), "
            f"{size / 2**20:.0f} MiB, {len(list(log_dir.glob('*.seg')))} segments"
        )

        open_s = timed(lambda: EventLog.open(log_dir).close())
        with EventLog.open(log_dir, readonly=True) as lg:
            count = 0

            def decode_only() -> None:
                nonlocal count
                for _ie in decoded_events(lg, 1, n):
                    count += 1

            decode_s = timed(decode_only)
            assert count == n

            split = n * 9 // 10
            results: dict[str, State] = {}

            def replay() -> None:
                # Folded in two legs only so the state at 90% can be snapshotted afterwards;
                # the second leg seeks through the sparse index.
                results["mid"] = fold(EMPTY_STATE, decoded_events(lg, 1, split))
                results["end"] = fold(results["mid"], decoded_events(lg, split + 1, n))

            replay_s = timed(replay)

            def replay_apply() -> None:
                state = EMPTY_STATE
                for ie in decoded_events(lg, 1, n):
                    state = apply(state, ie)
                results["apply"] = state

            apply_s = timed(replay_apply)
            final = results["end"]
            assert final.last_applied == n
            digest = codec.state_digest(final)
            assert codec.state_digest(results["apply"]) == digest

            snapshots = SnapshotStore(snap_dir)
            save_s = timed(lambda: snapshots.save(split, codec.encode_state(results["mid"])))
            loaded: dict[str, Restored] = {}
            load_s = timed(lambda: loaded.setdefault("r", restore(lg, snapshots)))
            assert loaded["r"].snapshot_idx == split
            assert codec.state_digest(loaded["r"].state) == digest

        decode_rate, replay_rate, apply_rate = n / decode_s, n / replay_s, n / apply_s
        ratio = replay_rate / decode_rate
        print(
            f"state: {len(final.nodes):,} nodes, {len(final.ledgers)} epochs, digest {digest[:16]}"
        )
        print(f"open log:                     {open_s * 1000:8.1f} ms")
        print(f"decode-only (read+CRC+decode): {decode_rate:12,.0f} events/s  ({decode_s:.2f} s)")
        print(f"replay (decode + fold):        {replay_rate:12,.0f} events/s  ({replay_s:.2f} s)")
        print(f"replay (decode + apply each):  {apply_rate:12,.0f} events/s  ({apply_s:.2f} s)")
        print(
            f"replay / decode-only:          {ratio:12.0%}  (target >= 40%: "
            f"{'PASS' if ratio >= 0.40 else 'FAIL'})"
        )
        print(f"apply-each / decode-only:      {apply_rate / decode_rate:12.0%}")
        print(f"snapshot save at {split:,}:     {save_s * 1000:8.1f} ms")
        print(
            f"load = snapshot + {n - split:,} tail: {load_s * 1000:8.1f} ms "
            f"(full refold {replay_s * 1000:,.0f} ms)"
        )
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
