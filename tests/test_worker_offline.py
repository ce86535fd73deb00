"""A worker whose master is unreachable keeps what matters and nothing that goes stale."""

from __future__ import annotations

import socket
from pathlib import Path

import anyio
import anyio.to_thread
import msgspec
import pytest
from cluster_procs import read_log, start_master

from cluster.net.identity import load_identity
from cluster.net.membership import create_secret_file
from cluster.shared.events import Event, NodeGatheredInfo, NodeHeartbeat, NodeInfo, WorkReported
from cluster.worker.client import Worker, WorkerConfig


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.anyio
async def test_no_heartbeats_pile_up_while_the_master_is_unreachable(tmp_path: Path) -> None:
    _, master_id = load_identity(tmp_path / "master")  # a valid peer id nobody listens as
    addr = f"/ip4/127.0.0.1/tcp/{_unused_port()}/p2p/{master_id}"
    config = WorkerConfig(
        heartbeat_interval=0.01, connect_timeout=0.5, backoff_initial=0.01, backoff_max=0.05
    )
    worker = Worker(tmp_path / "worker", addr, config)
    info = NodeGatheredInfo(node_id=worker.node_id, source="cpu", info=NodeInfo(cpu_count=8))
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            worker.emit(info)
            # Dozens of heartbeat cycles while every dial fails.
            await anyio.sleep(0.5)
            assert worker.phase == "connecting"
            worker.stop()
    worker.close()
    queued = [
        msgspec.msgpack.decode(payload, type=Event)
        for _, payload in worker.outbox.pending_after(0, 1_000)
    ]
    assert queued == [info]  # the fact is kept for the master; no stale "alive now"
    assert not any(isinstance(e, NodeHeartbeat) for e in queued)


@pytest.mark.anyio
async def test_info_readings_made_offline_reach_the_master_as_the_latest_per_source(
    tmp_path: Path,
) -> None:
    mdir, logs = tmp_path / "master", tmp_path / "logs"
    logs.mkdir()
    _, master_id = load_identity(mdir)  # the master started below takes this identity
    secret = create_secret_file(mdir / "cluster.secret")  # ... and this secret
    port = _unused_port()
    config = WorkerConfig(
        secret=secret,
        heartbeat_interval=0.05,
        connect_timeout=2,
        backoff_initial=0.05,
        backoff_max=0.2,
    )
    worker = Worker(tmp_path / "worker", f"/ip4/127.0.0.1/tcp/{port}/p2p/{master_id}", config)
    node = worker.node_id

    def cpu(percent: float) -> NodeGatheredInfo:
        return NodeGatheredInfo(node_id=node, source="cpu", info=NodeInfo(cpu_percent=percent))

    memory = NodeGatheredInfo(node_id=node, source="memory", info=NodeInfo(memory_total_mb=4096))
    work = WorkReported(devshard_id="ds-0", node_id=node, units=3, epoch=0)
    master = None
    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                await tg.start(worker.run)
                for percent in (10.0, 20.0, 30.0):  # the gatherer, reading while offline
                    worker.emit_info(cpu(percent))
                worker.emit_info(memory)
                worker.emit(work)  # a fact, not a reading: queued at once
                queued = [
                    msgspec.msgpack.decode(p, type=Event)
                    for _, p in worker.outbox.pending_after(0, 1_000)
                ]
                assert queued == [work]
                master, _ = await anyio.to_thread.run_sync(
                    lambda: start_master(mdir, logs, listen=f"/ip4/127.0.0.1/tcp/{port}")
                )
                while worker.phase != "connected":
                    await anyio.sleep(0.05)
                worker.emit_info(cpu(40.0))  # connected: straight to the outbox
                while worker.outbox.acked < worker.outbox.last_seq:
                    await anyio.sleep(0.05)
                worker.stop()
    finally:
        worker.close()
        if master is not None:
            assert master.stop() == 0
    from_node = [ie.event for ie in read_log(mdir) if ie.origin == node]
    readings = [e for e in from_node if isinstance(e, NodeGatheredInfo)]
    # The work first (queued first), then one held reading per source, then the live one.
    assert readings == [cpu(30.0), memory, cpu(40.0)], readings
    assert from_node.index(work) < from_node.index(readings[0])
