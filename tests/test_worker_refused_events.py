"""Events the master refuses are set aside once, and never stop the events after them.

A refused batch used to be resent forever: the master reset the stream, the worker took that
for a network fault, redialled and sent the same batch again (a NodeConnected in the log for
every round). Now the worker finds the refused events, writes them to its outbox's
refused.jsonl with an ERROR, and delivers everything else.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path

import anyio
import msgspec
import pytest
from embedded_nodes import fast_master

import cluster.worker.client as client_module
from cluster.master.node import MasterNode
from cluster.net.identity import load_identity
from cluster.shared.events import (
    MAX_HOSTNAME_CHARS,
    MAX_REASON_CHARS,
    MAX_WORK_UNITS,
    Event,
    NodeConnected,
    NodeGatheredInfo,
    NodeHeartbeat,
    NodeInfo,
    RunnerStatus,
    RunnerStatusUpdated,
    WorkReported,
)
from cluster.worker.client import BatchRefused, Worker, WorkerConfig
from cluster.worker.outbox import Outbox


def _worker(tmp_path: Path, addr: str, secret: bytes) -> Worker:
    config = WorkerConfig(
        secret=secret, heartbeats=False, write_digest=False, backoff_initial=0.05, backoff_max=0.2
    )
    return Worker(tmp_path / "worker", addr, config)


async def _deliver(master: MasterNode, tmp_path: Path, secret: bytes, emit: list[Event]) -> Worker:
    """Start a worker holding `emit` in its outbox (one batch when it connects); return it
    once the master has acknowledged or the worker has set aside every one of them."""
    async with anyio.create_task_group() as tg:
        started = await tg.start(master.run)
        worker = _worker(tmp_path, started.addrs[0], secret)
        for event in emit:
            worker.emit(event)
        await tg.start(worker.run)
        while worker.outbox.acked < worker.outbox.last_seq:
            await anyio.sleep(0.02)
        worker.stop()
        await worker.wait_finished()
        master.stop()
    return worker


@pytest.mark.anyio
async def test_refused_events_are_set_aside_and_the_rest_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = secrets.token_bytes(32)
    master = fast_master(tmp_path / "master", secret)
    worker: Worker | None = None
    try:
        _, me = load_identity(tmp_path / "worker")  # the worker's id, for its events

        def info(percent: float) -> NodeGatheredInfo:
            return NodeGatheredInfo(node_id=me, source="cpu", info=NodeInfo(cpu_percent=percent))

        too_much = WorkReported(devshard_id="ds-x", node_id=me, units=MAX_WORK_UNITS + 1, epoch=1)
        not_mine = NodeHeartbeat(node_id="12D3KooWSomebodyElse")
        emitted: list[Event] = [info(1), info(2), too_much, info(3), not_mine, info(4)]
        with caplog.at_level(logging.INFO, logger="cluster.worker.client"), anyio.fail_after(60):
            worker = await _deliver(master, tmp_path, secret, emitted)

        logged = [ie for ie in master.store.read_from(1) if ie.origin == me]
        got = [ie.event for ie in logged if not isinstance(ie.event, NodeConnected)]
        assert got == [info(1), info(2), info(3), info(4)]
        # Each refusal costs one redial: per refused event, one per halving of the range
        # bisected (at most 3 for 6 events) and its own as a lone event.
        hellos = [ie for ie in master.store.read_from(1) if isinstance(ie.event, NodeConnected)]
        assert 1 <= len(hellos) <= 1 + 2 * (3 + 1)
        # Each hello of this worker process (one per redial) logs its one boot id.
        assert {ie.event.boot_id for ie in hellos if isinstance(ie.event, NodeConnected)} == {
            worker.boot_id
        }
        refused = [json.loads(line) for line in worker.outbox.refused_path.read_text().splitlines()]
        assert [(r["seq"], r["code"], r["event"]["type"]) for r in refused] == [
            (3, "bad-units", "WorkReported"),
            (5, "forbidden-origin", "NodeHeartbeat"),
        ]
        assert all(r["reason"] for r in refused)
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("seq 3 (WorkReported)" in m and "set aside" in m for m in errors)
        assert not any("unreachable" in r.getMessage() for r in caplog.records)
    finally:
        if worker is not None:
            worker.close()
        master.close()


@pytest.mark.anyio
async def test_over_long_text_is_set_aside_and_nothing_else_lost(tmp_path: Path) -> None:
    """Text beyond the master's bounds (which honest workers never reach: they clip) is
    refused as content: the worker sets that event aside and delivers every other one."""
    secret = secrets.token_bytes(32)
    master = fast_master(tmp_path / "master", secret)
    worker: Worker | None = None
    try:
        _, me = load_identity(tmp_path / "worker")
        failed = RunnerStatusUpdated(
            runner_id="ds-x/0", node_id=me, status=RunnerStatus.FAILED, devshard_id="ds-x"
        )
        long_reason = msgspec.structs.replace(failed, reason="x" * (MAX_REASON_CHARS + 1))
        long_host = NodeGatheredInfo(
            node_id=me, source="host", info=NodeInfo(hostname="h" * (MAX_HOSTNAME_CHARS + 1))
        )
        fine = NodeGatheredInfo(node_id=me, source="host", info=NodeInfo(hostname="h1"))
        emitted: list[Event] = [fine, long_reason, failed, long_host, fine]
        with anyio.fail_after(60):
            worker = await _deliver(master, tmp_path, secret, emitted)
        logged = [ie.event for ie in master.store.read_from(1) if ie.origin == me]
        assert [e for e in logged if not isinstance(e, NodeConnected)] == [fine, failed, fine]
        refused = [json.loads(line) for line in worker.outbox.refused_path.read_text().splitlines()]
        assert [(r["seq"], r["code"]) for r in refused] == [
            (2, "forbidden-event"),
            (4, "forbidden-event"),
        ]
        assert f"field reason holds {MAX_REASON_CHARS + 1} characters" in refused[0]["reason"]
        assert "field info.hostname holds" in refused[1]["reason"]
    finally:
        if worker is not None:
            worker.close()
        master.close()


@pytest.mark.anyio
async def test_a_backlog_larger_than_a_frame_leaves_in_smaller_batches(tmp_path: Path) -> None:
    secret = secrets.token_bytes(32)
    master = fast_master(tmp_path / "master", secret)
    worker: Worker | None = None
    try:
        _, me = load_identity(tmp_path / "worker")  # the worker's id, for its events
        # 2,000 reports of ~4 KB: ~8 MB in the outbox, twice a frame's 4 MiB limit.
        emitted: list[Event] = [
            RunnerStatusUpdated(
                runner_id="ds-1/0",
                node_id=me,
                status=RunnerStatus.FAILED if i % 2 else RunnerStatus.READY,
                reason=secrets.token_hex(2000),
            )
            for i in range(2000)
        ]
        with anyio.fail_after(120):
            worker = await _deliver(master, tmp_path, secret, emitted)
        got = [ie.event for ie in master.store.read_from(1) if ie.origin == me]
        assert [e for e in got if not isinstance(e, NodeConnected)] == emitted
        assert not worker.outbox.refused_path.exists()
    finally:
        if worker is not None:
            worker.close()
        master.close()


def test_a_set_aside_event_stays_set_aside_after_a_crash(tmp_path: Path) -> None:
    """The watermark is written at once: reopened after a kill -9, the outbox must not offer
    the refused event again (it would be refused again, and filed twice)."""
    box = Outbox.open(tmp_path)
    for _ in range(3):
        box.append(NodeHeartbeat(node_id="n"))
    box.ack(1)
    assert box.set_aside(2, "bad-units", "too much") == NodeHeartbeat(node_id="n")
    os.close(box._fd)  # no close(): what a crash leaves
    os.close(box._lock_fd)
    again = Outbox.open(tmp_path)
    assert (again.acked, again.pending_after(0, 10)[0][0]) == (2, 3)
    assert len(again.refused_path.read_text().splitlines()) == 1
    again.close()


def test_a_refusal_of_events_acknowledged_meanwhile_sets_nothing_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Our own events seen on the subscribe stream acknowledge them too: one acknowledged
    after the refusal arrived was accepted, so it is neither set aside nor resent singly."""
    _, master_id = load_identity(tmp_path / "master")
    worker = _worker(tmp_path, f"/ip4/127.0.0.1/tcp/1/p2p/{master_id}", b"s" * 32)
    try:
        for _ in range(3):
            worker.emit(NodeHeartbeat(node_id=worker.node_id))
        worker.outbox.ack(2)
        with caplog.at_level(logging.ERROR, logger="cluster.worker.client"):
            worker._after_refusal(BatchRefused("malformed", "?", first=2, last=2, batch_ends=(2,)))
        assert not worker.outbox.refused_path.exists()
        assert worker.outbox.acked == 2
        assert "none of our events was in flight" in caplog.text
    finally:
        worker.close()


@pytest.mark.anyio
async def test_a_refused_event_in_a_large_batch_is_found_by_bisection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One refused event among 256 sent in one batch: found in O(log n) submissions. It was
    found by resending every event of the batch alone: 256 submissions, and since the
    refused one came late, 200-odd round trips before the events after it moved on."""
    secret = secrets.token_bytes(32)
    master = fast_master(tmp_path / "master", secret)
    worker: Worker | None = None
    submitted: list[list[int]] = []  # the seqs of each batch submitted
    real_payload = client_module._submit_payload

    def counted(batch: list[tuple[int, bytes]]) -> bytes:
        submitted.append([seq for seq, _ in batch])
        return real_payload(batch)

    monkeypatch.setattr(client_module, "_submit_payload", counted)
    try:
        _, me = load_identity(tmp_path / "worker")
        n, bad_at = 256, 201

        def event(i: int) -> Event:
            if i == bad_at:
                return WorkReported(
                    devshard_id="ds-x", node_id=me, units=MAX_WORK_UNITS + 1, epoch=1
                )
            return NodeGatheredInfo(node_id=me, source="cpu", info=NodeInfo(cpu_percent=i % 100))

        emitted = [event(i) for i in range(1, n + 1)]
        with anyio.fail_after(60):
            worker = await _deliver(master, tmp_path, secret, emitted)
        got = [ie.event for ie in master.store.read_from(1) if ie.origin == me]
        assert [e for e in got if not isinstance(e, NodeConnected)] == [
            e for i, e in enumerate(emitted, 1) if i != bad_at
        ]
        refused = [json.loads(line) for line in worker.outbox.refused_path.read_text().splitlines()]
        assert [(r["seq"], r["code"]) for r in refused] == [(bad_at, "bad-units")]
        assert submitted[0] == list(range(1, n + 1))  # all in one batch at first
        # The whole batch, then at most two probes per halving (log2 256 = 8), then the rest.
        assert len(submitted) <= 1 + 2 * 8 + 1, submitted
        hellos = [ie for ie in master.store.read_from(1) if isinstance(ie.event, NodeConnected)]
        assert len(hellos) <= 1 + 8 + 1  # a redial per refusal: at most one per halving
    finally:
        if worker is not None:
            worker.close()
        master.close()
