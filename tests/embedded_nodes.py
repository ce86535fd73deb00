"""An in-process master and worker on loopback, with the short cycles tests want."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import TaskGroup

from cluster.master.config import PlannerConfig
from cluster.master.node import MasterNode, MasterNodeConfig
from cluster.net.membership import Membership
from cluster.shared.events import RunnerStatus
from cluster.shared.state import NodeRecord
from cluster.worker.client import WorkerConfig
from cluster.worker.gpu import NvmlGpuProbe
from cluster.worker.info import InfoConfig
from cluster.worker.node import WorkerNode, WorkerNodeConfig
from cluster.worker.runners.registry import RunnerSetting


def fast_master(data_dir: Path, secret: bytes, *, epoch_length_ms: int = 600_000) -> MasterNode:
    """A master planning every 100 ms; start it with `task_group.start(master.run)`."""
    planner = PlannerConfig(plan_interval_ms=100, epoch_length_ms=epoch_length_ms)
    return MasterNode(data_dir, Membership(secret=secret), MasterNodeConfig(planner=planner))


def fast_worker(
    data_dir: Path,
    master_addr: str,
    secret: bytes,
    *,
    runner: RunnerSetting | None = None,
    no_runners: bool = False,
    gpu_probe: NvmlGpuProbe | None = None,
) -> WorkerNode:
    """A worker offering one 1 GiB slot, heartbeating every 100 ms (default runner kind unless
    `runner` is given; none at all with `no_runners`, as `cluster worker --no-runners`)."""
    config = WorkerNodeConfig(
        client=WorkerConfig(secret=secret, heartbeat_interval=0.1),
        info=InfoConfig(data_dir=data_dir, slots=1, slot_memory_mb=1024),
        runner=None if no_runners else runner if runner is not None else RunnerSetting(),
    )
    return WorkerNode(data_dir, master_addr, config, gpu_probe=gpu_probe)


async def until_self_tested(master: MasterNode, node_id: str) -> NodeRecord:
    """Wait until the master's state holds a self-test result for `node_id`, and return the
    node's record then (bound the wait with the caller's `anyio.fail_after`)."""
    while (rec := master.state.nodes.get(node_id)) is None or rec.self_test is None:
        await anyio.sleep(0.05)
    return rec


def serving(master: MasterNode, node_id: str) -> bool:
    """Whether the master's state holds a RUNNING runner of `node_id`."""
    return any(
        r.node_id == node_id and r.status is RunnerStatus.RUNNING
        for r in master.state.runners.values()
    )


async def until_serving(master: MasterNode, node_id: str) -> None:
    """Wait until `node_id` runs a runner, as the master's state says (bound the wait with
    the caller's `anyio.fail_after`)."""
    while not serving(master, node_id):
        await anyio.sleep(0.05)


@dataclass
class EmbeddedCluster:
    """What `embedded_cluster` started: a master on loopback (`addr`), sharing `secret`
    with its `workers` (each made by `new_worker`, in that order)."""

    master: MasterNode
    secret: bytes
    addr: str
    workers: list[WorkerNode]
    _dir: Path
    _tg: TaskGroup
    _running: list[WorkerNode] = field(default_factory=list)

    @property
    def worker(self) -> WorkerNode:
        """The first worker."""
        return self.workers[0]

    def new_worker(
        self,
        *,
        runner: RunnerSetting | None = None,
        no_runners: bool = False,
        gpu_probe: NvmlGpuProbe | None = None,
    ) -> WorkerNode:
        """A `fast_worker` of this master (data dir w1, w2, ...), not started yet: a test
        may patch it first. It is closed when the cluster is."""
        worker = fast_worker(
            self._dir / f"w{len(self.workers) + 1}",
            self.addr,
            self.secret,
            runner=runner,
            no_runners=no_runners,
            gpu_probe=gpu_probe,
        )
        self.workers.append(worker)
        return worker

    async def start(self, worker: WorkerNode) -> None:
        """Run `worker` until the cluster stops (or the test stops it)."""
        await self._tg.start(worker.run)
        self._running.append(worker)


@asynccontextmanager
async def embedded_cluster(
    tmp_path: Path,
    *,
    workers: int = 1,
    wait: float = 60.0,
    epoch_length_ms: int = 600_000,
    runner: RunnerSetting | None = None,
    no_runners: bool = False,
    gpu_probe: NvmlGpuProbe | None = None,
) -> AsyncIterator[EmbeddedCluster]:
    """A `fast_master` (data dir `tmp_path / "master"`) and `workers` started workers of it
    (`runner`, `no_runners` and `gpu_probe` as for `fast_worker`), on 127.0.0.1 with a fresh
    secret.

    Everything, the body and the stop included, is bounded by `wait` seconds: a broken
    node fails the test instead of hanging it. On the way out the workers still running
    stop (each says goodbye to the live master) and finish, then the master stops; a body
    that stops them itself, in another order, keeps its order (a second stop does nothing).
    Last, whatever happened, every worker and the master are closed.
    """
    if gpu_probe is not None and workers > 1:
        raise ValueError(f"one gpu_probe for {workers} workers: each worker closes its own")
    secret = secrets.token_bytes(32)
    master = fast_master(tmp_path / "master", secret, epoch_length_ms=epoch_length_ms)
    made: list[WorkerNode] = []
    try:
        with anyio.fail_after(wait):
            async with anyio.create_task_group() as tg:
                started = await tg.start(master.run)
                cluster = EmbeddedCluster(master, secret, started.addrs[0], made, tmp_path, tg)
                for _ in range(workers):
                    worker = cluster.new_worker(
                        runner=runner, no_runners=no_runners, gpu_probe=gpu_probe
                    )
                    await cluster.start(worker)
                yield cluster
                for worker in cluster._running:
                    worker.stop()
                for worker in cluster._running:
                    await worker.worker.wait_finished()
                master.stop()
    finally:
        try:
            for worker in made:
                worker.close()
        finally:
            master.close()
