"""An in-process master and worker on loopback, with the short cycles tests want."""

from __future__ import annotations

from pathlib import Path

import anyio

from cluster.master.config import PlannerConfig
from cluster.master.node import MasterNode, MasterNodeConfig
from cluster.net.membership import Membership
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
