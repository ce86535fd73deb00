"""Catch-up benchmark: a fresh worker joins a master whose log holds 1,000,000 events.

Builds the log (heartbeats and info from 1,000 nodes) with the master's own EventStore,
snapshotting every 95,000 events so the newest snapshot is behind the end and the worker
gets snapshot + a real tail; starts the real `cluster master` on it; then times a fresh
in-process Worker from start to a replica at the master's last index, and checks that its
digest equals the master's (the target: under 10 s on this machine).

Usage: python bench/catchup_bench.py [--events 1000000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_log(data_dir: Path, events: int, nodes: int, snapshot_every: int) -> None:
    from cluster.shared.events import IndexedEvent, NodeGatheredInfo, NodeHeartbeat, NodeInfo
    from cluster.shared.store import EventStore

    ids = [f"12D3KooWbench{n:06d}" for n in range(nodes)]
    seqs = dict.fromkeys(ids, 0)
    store = EventStore.open(data_dir, snapshot_every=snapshot_every)
    t0 = 1_700_000_000_000
    idx = 0
    batch: list[IndexedEvent] = []
    while idx < events:
        idx += 1
        node = ids[idx % nodes]
        seqs[node] += 1
        if idx % 10 == 0:
            ev: object = NodeGatheredInfo(
                node_id=node, source="cpu", info=NodeInfo(cpu_percent=float(idx % 100))
            )
        else:
            ev = NodeHeartbeat(node_id=node)
        batch.append(IndexedEvent(idx, t0 + idx, node, seqs[node], ev))  # type: ignore[arg-type]
        if len(batch) == 1000:  # small batches: snapshots land at multiples of snapshot_every
            store.append(batch)
            batch = []
    if batch:
        store.append(batch)
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--snapshot-every", type=int, default=95_000)
    args = parser.parse_args()

    import anyio

    from cluster.shared.codec import state_digest
    from cluster.shared.eventlog import EventLog
    from cluster.shared.snapshots import SnapshotStore
    from cluster.shared.store import load_state
    from cluster.worker.client import Worker, WorkerConfig

    root = Path(tempfile.mkdtemp(prefix="catchup-bench-"))
    mdir = root / "master"
    t = time.perf_counter()
    build_log(mdir, args.events, args.nodes, args.snapshot_every)
    print(
        f"built a log of {args.events:,} events from {args.nodes} nodes in "
        f"{time.perf_counter() - t:.1f} s ({root})"
    )

    master = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster",
            "master",
            "--data-dir",
            str(mdir),
            "--log-level",
            "WARNING",
            "--snapshot-every",
            str(args.snapshot_every),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (mdir / "master.addr").exists():
            if time.monotonic() > deadline or master.poll() is not None:
                raise SystemExit("master did not start")
            time.sleep(0.05)
        addr = (mdir / "master.addr").read_text().strip()
        secret = (mdir / "cluster.secret").read_bytes().strip()

        result: dict[str, float | str | int] = {}

        async def join() -> None:
            worker = Worker(
                root / "fresh-worker",
                addr,
                WorkerConfig(secret=secret, heartbeats=False, write_digest=False),
            )
            snap_at: list[float] = []
            worker.add_listener(
                lambda s: snap_at.append(time.perf_counter()) if not snap_at else None
            )
            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                await tg.start(worker.run)
                with anyio.fail_after(120):
                    while worker.phase != "connected":
                        await anyio.sleep(0.005)
                result["seconds"] = time.perf_counter() - start
                result["first_state_s"] = snap_at[0] - start if snap_at else -1.0
                result["idx"] = worker.state.last_applied
                result["digest"] = state_digest(worker.state)
                worker.stop()
            worker.close()

        anyio.run(join, backend="trio")
        # The running master's planner keeps indexing (e.g. the 1,000 silent synthetic nodes
        # are disconnected), so compare with the master's log replayed to the worker's index.
        log = EventLog.open(mdir / "log", readonly=True)
        try:
            expected = state_digest(
                load_state(log, SnapshotStore(mdir / "snapshots"), int(result["idx"]))
            )
        finally:
            log.close()
        same = expected == result["digest"]
        print(
            f"fresh worker caught up to index {result['idx']:,} in {result['seconds']:.2f} s "
            f"(first state after {result['first_state_s']:.2f} s; snapshot every "
            f"{args.snapshot_every:,}, so the tail was up to that many events)"
        )
        print(f"digest equal to the master's: {same} ({result['digest']})")
        ok = same and float(result["seconds"]) < 10
        print(f"target: under 10 s -> {'PASS' if ok else 'FAIL'}")
    finally:
        master.terminate()
        master.wait(timeout=30)


if __name__ == "__main__":
    main()
