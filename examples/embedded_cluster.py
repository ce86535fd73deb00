"""Embed a master and two workers in one program, then check every replica against the log.

    .venv/bin/python examples/embedded_cluster.py [--data-dir DIR] [--seconds 5]

What it shows (docs/embedding.md walks through it):

1. `MasterNode` and `WorkerNode` run in your own trio task group, on 127.0.0.1;
2. requests (here: a session) go through `MasterNode.request`, as the local operator;
3. each worker keeps a replica of the state, and `apply`/`fold` over the master's log gives
   that same state at the same index -- the event-sourcing contract, checked by digest.

Prints one line per replica (`replica <node> at <index>: <digest> matches the log`) and exits 0,
or names the replica that disagrees and exits 1. tests/test_embedding.py runs it.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
from pathlib import Path

import anyio

from cluster.control import SessionCreate
from cluster.master.config import PlannerConfig
from cluster.master.node import MasterNode, MasterNodeConfig
from cluster.net.membership import Membership
from cluster.shared.apply import fold
from cluster.shared.codec import state_digest
from cluster.shared.events import RunnerStatus
from cluster.shared.state import EMPTY_STATE, State
from cluster.worker.client import WorkerConfig
from cluster.worker.info import InfoConfig
from cluster.worker.node import WorkerNode, WorkerNodeConfig

SLOTS = 3


def running(state: State) -> int:
    return sum(r.status is RunnerStatus.RUNNING for r in state.runners.values())


async def run_cluster(root: Path, seconds: float) -> list[tuple[str, int, str, str]]:
    """Run the cluster under `root`; (node, index, replica digest, log digest) per worker."""
    secret = secrets.token_bytes(32)
    master = MasterNode(
        root / "master",
        Membership(secret=secret),
        MasterNodeConfig(planner=PlannerConfig(plan_interval_ms=200, epoch_length_ms=30_000)),
    )
    workers: list[WorkerNode] = []
    try:
        async with anyio.create_task_group() as tg:
            started = await tg.start(master.run)
            for name in ("w1", "w2"):
                config = WorkerNodeConfig(
                    client=WorkerConfig(secret=secret, heartbeat_interval=0.1),
                    info=InfoConfig(data_dir=root / name, slots=2, slot_memory_mb=1024),
                )
                workers.append(WorkerNode(root / name, started.addrs[0], config))
                await tg.start(workers[-1].run)
            reply = await master.request(
                SessionCreate(slots=SLOTS, memory_per_slot_mb=512, name="embedded")
            )
            if not reply.ok:
                raise RuntimeError(f"session refused: {reply.message}")
            print(reply.message, flush=True)
            # Both workers self-test, join the first epoch and start their runners.
            while running(master.state) < SLOTS:
                await anyio.sleep(0.1)
            print(f"{SLOTS} runners running; serving for {seconds:g}s", flush=True)
            await anyio.sleep(seconds)
            # Workers first: each stops its runners and waits (bounded) until the master has
            # acknowledged their last events, then disconnects.
            async with anyio.create_task_group() as stopping:
                for worker in workers:
                    worker.stop()
                    stopping.start_soon(worker.worker.wait_finished)
            master.stop()
        # Every replica is the fold of the log up to its index.
        log = list(master.store.read_from(1))
        out = []
        for worker in workers:
            replica = worker.state
            refolded = fold(EMPTY_STATE, log[: replica.last_applied])
            out.append(
                (
                    worker.node_id,
                    replica.last_applied,
                    state_digest(replica),
                    state_digest(refolded),
                )
            )
        return out
    finally:
        for worker in workers:
            worker.close()
        master.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="keep the data here (default: a temp dir)")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long to serve")
    args = parser.parse_args(argv)
    if not args.seconds >= 0:
        parser.error("--seconds must be >= 0")

    async def go() -> list[tuple[str, int, str, str]]:
        # Bounded: a cluster that never starts its runners fails here instead of hanging.
        with anyio.fail_after(args.seconds + 60):
            if args.data_dir is not None:
                return await run_cluster(args.data_dir, args.seconds)
            with tempfile.TemporaryDirectory() as tmp:
                return await run_cluster(Path(tmp), args.seconds)

    results = anyio.run(go, backend="trio")
    ok = True
    for node, idx, replica, log in results:
        agrees = replica == log
        ok &= agrees
        verdict = "matches the log" if agrees else f"DIFFERS from the log ({log})"
        print(f"replica {node} at {idx}: {replica} {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
