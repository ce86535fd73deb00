"""The master's side of the log stream, without a network: a subscriber cut for lagging is
told so (and resubscribes on its connection), and digest.json is auxiliary output."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest

from cluster import digest_writer
from cluster.master.server import Master, MasterConfig, _Broadcast
from cluster.net.identity import load_identity
from cluster.net.membership import Membership
from cluster.net.protocol import ProtocolError, Subscribe, Tick
from cluster.shared.store import EventStore


class Written:
    """A FramedStream stand-in that keeps what the master writes."""

    peer_id = "12D3KooWSubscriber"

    def __init__(self) -> None:
        self.data = b""

    async def send_bytes(self, data: bytes, timeout: float) -> None:
        self.data += data

    async def send(self, msg: Tick, timeout: float) -> None:
        raise AssertionError(f"no keepalive expected, got {msg}")


def _master(tmp_path: Path, **config: object) -> tuple[Master, EventStore]:
    store = EventStore.open(tmp_path / "m")
    key_pair, _ = load_identity(tmp_path / "m")
    config = {"data_dir": tmp_path / "m", **config}
    return Master(store, key_pair, Membership(secret=b"s" * 32), MasterConfig(**config)), store  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_subscriber_cut_for_lagging_gets_what_was_queued_then_lagging(
    tmp_path: Path,
) -> None:
    """Its queue was full, so a 'lagging' marker could never be queued behind it: the
    stream was reset instead, and the worker redialled (a hello and a NodeConnected logged
    each time) rather than resubscribing on its connection."""
    master, store = _master(tmp_path, subscriber_queue=2)
    try:
        send, recv = anyio.create_memory_object_stream[_Broadcast](2)
        master._subscribers[7] = send
        frames = [master._encode_frames([(i, b"")]) for i in (1, 2)]
        master._broadcast(_Broadcast([(1, b"")], frames[0]))
        master._broadcast(_Broadcast([(2, b"")], frames[1]))
        master._broadcast(_Broadcast([(3, b"")], b"never sent"))  # the queue is full: cut
        assert 7 not in master._subscribers
        fs = Written()
        with anyio.fail_after(10), pytest.raises(ProtocolError) as err:
            await master._send_live(fs, recv, 1)  # type: ignore[arg-type]
        assert err.value.code == "lagging" and "resubscribe from 3" in str(err.value)
        assert fs.data == b"".join(frames)  # what was queued went out first
    finally:
        store.close()


@pytest.mark.anyio
async def test_a_digest_json_that_cannot_be_written_does_not_stop_the_master(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """digest.json is auxiliary output: a full disk there killed the whole master."""
    master, store = _master(tmp_path, plan_interval=0.01)
    try:
        (tmp_path / "m" / ".digest.json.tmp").mkdir()  # every write of it fails
        with caplog.at_level(logging.WARNING, logger=digest_writer.__name__), anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                assert master._digests is not None
                tg.start_soon(master._digests.keep_current, master._digest_reading, 0.01)
                while f"could not write {tmp_path / 'm' / 'digest.json'}: " not in caplog.text:
                    await anyio.sleep(0.01)
                (tmp_path / "m" / ".digest.json.tmp").rmdir()  # the disk has room again
                while not (tmp_path / "m" / "digest.json").exists():
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
    finally:
        store.close()


class Leaving(Written):
    """A subscriber's stream that keeps what it is sent until told the worker left."""

    def __init__(self) -> None:
        super().__init__()
        self.gone = False

    async def send_bytes(self, data: bytes, timeout: float) -> None:
        if self.gone:
            raise EOFError("the worker left")
        await super().send_bytes(data, timeout)

    async def send(self, msg: Tick, timeout: float) -> None:
        if self.gone:
            raise EOFError("the worker left")

    async def reset(self) -> None:
        pass


@pytest.mark.anyio
async def test_the_catch_up_lag_of_a_node_goes_with_its_last_subscription(
    tmp_path: Path,
) -> None:
    """/metrics reports a node's catch-up lag while it is served: with one of its two
    subscriptions gone it is still reported, with both gone it is not (a departed node's
    lag stayed in /metrics forever)."""
    master, store = _master(tmp_path, keepalive=0.01)
    first, second = Leaving(), Leaving()
    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for fs in (first, second):
                    tg.start_soon(master._serve_subscription, fs, Subscribe(from_idx=1))  # type: ignore[arg-type]
                while len(master._subscribers) < 2:
                    await anyio.sleep(0.01)
                master._broadcast(_Broadcast([(1, b"")], master._encode_frames([(1, b"")])))
                while not (first.data and second.data):
                    await anyio.sleep(0.01)
                assert Written.peer_id in master.metrics().catch_up_lag_by_node
                first.gone = True
                while len(master._subscribers) > 1:  # its cleanup is done
                    await anyio.sleep(0.01)
                assert Written.peer_id in master.metrics().catch_up_lag_by_node
                second.gone = True
        assert master._subscribers == {}
        assert Written.peer_id not in master.metrics().catch_up_lag_by_node
    finally:
        store.close()
