"""A worker whose master is unreachable keeps what matters and nothing that goes stale."""

from __future__ import annotations

import socket
from pathlib import Path

import anyio
import msgspec
import pytest

from cluster.net.identity import load_identity
from cluster.shared.events import Event, NodeGatheredInfo, NodeHeartbeat, NodeInfo
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
