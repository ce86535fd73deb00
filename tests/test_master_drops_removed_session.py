"""A node the operator removes while its streams are still open must say hello again.

The master never pruned its members at a removal: a hung worker the master had marked
disconnected, then removed, kept its submit and subscribe streams, and its next event
re-created the node in the log with no boot id, no runner setting and no self-test (a
facts-only node shown self-testing, a runner node never placeable, no "joined again" line).
Now the master drops the removed node's session: its streams fail with code `removed`, the
worker logs why in one line and says hello again, which logs a NodeConnected with its worker
process and runner setting, under its old slot.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import anyio
import pytest
from embedded_nodes import embedded_cluster
from maintenance_log import Log, node_id

from cluster.master.server import Master, _Submission
from cluster.net.framing import FrameDecoder, encode_frame
from cluster.net.host import FramedStream
from cluster.net.identity import load_identity
from cluster.net.membership import Membership
from cluster.net.protocol import (
    PROTOCOL_VERSION,
    REMOVED,
    REMOVED_MESSAGE,
    ErrorMsg,
    Hello,
    Message,
    ProtocolError,
    Tick,
    decode,
    encode,
)
from cluster.shared.events import (
    Event,
    NodeConnected,
    NodeDisconnected,
    NodeHeartbeat,
    NodeRemoved,
)
from cluster.shared.state import State
from cluster.shared.store import EventStore

CLIENT = "cluster.worker.client"
DROPPED = "the master dropped this node's session: removed from the cluster by the operator"


@pytest.mark.anyio
async def test_a_removed_nodes_open_streams_are_dropped_and_it_rejoins_with_a_hello(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CLIENT)
    async with embedded_cluster(tmp_path, no_runners=True) as cluster:
        master, worker = cluster.master, cluster.worker
        client = worker.worker
        node = client.node_id
        with anyio.fail_after(30):
            while client.phase != "connected" or node not in master.master.state.nodes:
                await anyio.sleep(0.05)
        slot = master.master.state.nodes[node].slot

        # Marked disconnected (as for a hung worker) and removed in one decision: its
        # streams stay open, and it heartbeats every 100 ms.
        def remove(state: State, now_ms: int) -> list[Event]:
            return [NodeDisconnected(node_id=node, reason="quiet"), NodeRemoved(node_id=node)]

        removal = await master.master.index_decision(remove)
        removed_idx = removal[-1].idx
        # It rejoins by a new hello, having said why it was dropped (checked below).
        with anyio.fail_after(20):
            while not (
                node in master.master.state.nodes and master.master.state.nodes[node].connected
            ):
                await anyio.sleep(0.05)
        after = list(master.store.read_from(removed_idx + 1))
        worker.stop()
        master.master.stop()
    # Whichever stream it read the cut on first, it read why: the master finishes the frame
    # it is writing before it says so, and half-closes the stream before resetting it.
    dropped = [r for r in caplog.records if r.name == CLIENT and DROPPED in r.getMessage()]
    assert len(dropped) == 1 and dropped[0].levelno == logging.WARNING, dropped
    assert "saying hello again to rejoin" in dropped[0].getMessage()
    # Not first read as a network fault (a frame cut short, a stream reset without a word).
    until_dropped = caplog.records[: caplog.records.index(dropped[0])]
    faults = ("unreachable", "ended the subscribe stream")
    assert not [
        r for r in until_dropped if r.name == CLIENT and any(f in r.getMessage() for f in faults)
    ]
    # After the removal the node's first word in the log is the master's NodeConnected for
    # its hello: nothing of its own before (no bare record), its process and setting named.
    first = next(ie for ie in after if node in (ie.origin, getattr(ie.event, "node_id", None)))
    assert isinstance(first.event, NodeConnected), first
    assert first.event.boot_id == client.boot_id
    assert first.event.runner_digest == client.runner_digest != ""
    rec = master.master.state.nodes[node]
    assert rec.slot == slot and rec.boot_id == client.boot_id and rec.facts_only


@pytest.mark.anyio
async def test_a_batch_queued_before_its_nodes_removal_is_refused_until_a_new_hello(
    tmp_path: Path,
) -> None:
    """A worker batch waiting for the indexer when the removal commits is not indexed: it
    would speak for a node out of the cluster. After a new hello its batches are again."""
    log = Log()
    node = node_id(1)
    log.join(node)
    log.disconnect(node)
    store = EventStore.open(tmp_path / "master")
    store.append(log.log)
    key_pair, _ = load_identity(tmp_path / "master")
    master = Master(store, key_pair, Membership(secret=b"s" * 32), now_ms=lambda: log.now)
    master._members.add(node)  # its hello was long ago; its streams are open
    seq = master.state.last_seq(node)
    try:
        with anyio.fail_after(30):
            await master.index_decision(lambda state, now: [NodeRemoved(node_id=node)])
            assert node not in master.members
            queued = _Submission(node, [NodeHeartbeat(node_id=node)], [seq + 1])
            last = master.last_idx
            await master._index([queued])
            assert isinstance(queued.error, ProtocolError) and queued.error.code == "removed"
            assert master.last_idx == last and node not in master.state.nodes
            # Its hello readmits it (the NodeConnected decision adds it back to the members).
            hello = Hello(version=PROTOCOL_VERSION, nonce=b"n" * 16, boot_id="b2")
            await master._join(_Quiet(node), hello)  # type: ignore[arg-type]
            assert node in master.members and master.state.nodes[node].boot_id == "b2"
            again = _Submission(node, [NodeHeartbeat(node_id=node)], [seq + 1])
            await master._index([again])
            assert again.error is None and master.state.last_seq(node) == seq + 1
    finally:
        master.close()
        store.close()


class _Quiet:
    """A hello stream that takes the Welcome and closes."""

    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id

    async def send(self, msg: object, timeout: float) -> None:
        pass

    async def close(self) -> None:
        pass


class _HeldWire:
    """The master's end of a stream: what it writes, and a first write held halfway (as a
    yamux write of a large frame waits for the peer's window between its DATA frames)."""

    def __init__(self, peer_id: str) -> None:
        self.muxed_conn = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: peer_id))
        self.sent = bytearray()
        #: What went out after the data: "FIN" (half-close), "RST" (reset).
        self.ends: list[str] = []
        self.halfway = anyio.Event()
        self.go_on = anyio.Event()

    async def write(self, data: bytes) -> None:
        if not self.halfway.is_set():
            self.sent += data[: len(data) // 2]
            self.halfway.set()
            await self.go_on.wait()
            self.sent += data[len(data) // 2 :]
        else:
            self.sent += data

    async def read(self, n: int) -> bytes:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def close_write(self) -> None:
        self.ends.append("FIN")

    async def reset(self) -> None:
        self.ends.append("RST")


def _messages(wire: bytes) -> list[Message]:
    decoder = FrameDecoder()
    decoder.feed(wire)
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(decode(frame))
    decoder.check_eof()  # no frame cut short
    return out


@pytest.mark.anyio
async def test_a_removal_during_a_write_cuts_the_stream_after_that_frame(tmp_path: Path) -> None:
    """The removal cancelled a member stream's task wherever it was: in the middle of a
    frame's write, the `removed` message then followed half a frame, and the worker read the
    two as one frame cut short -- as a network fault, redialling without saying why (seen on
    subscribe streams, whose frames are large). And the reset sent right behind the message
    could reach the worker before it had read it (yamux then drops it). Now the frame being
    written is finished first, and the message is followed by a half-close, then the reset."""
    store = EventStore.open(tmp_path / "master")
    key_pair, _ = load_identity(tmp_path / "master")
    master = Master(store, key_pair, Membership(secret=b"s" * 32))
    node = node_id(1)
    master._members.add(node)
    wire = _HeldWire(node)
    fs = FramedStream(wire)
    tick = Tick(last_idx=7)
    frame = encode_frame(encode(tick))

    async def serve(fs: FramedStream) -> None:
        await fs.send_bytes(frame, 10.0)
        await fs.send_bytes(frame, 10.0)  # never: the cut comes between the two
        await anyio.sleep_forever()

    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(master._as_member, fs, serve)
                await wire.halfway.wait()
                master._drop_member(node)
                await anyio.wait_all_tasks_blocked()  # a cancellation, if any, lands now
                wire.go_on.set()
        assert _messages(bytes(wire.sent)) == [
            tick,
            ErrorMsg(code=REMOVED, message=REMOVED_MESSAGE),
        ]
        assert wire.ends == ["FIN", "RST"]
        assert node not in master.members
    finally:
        master.close()
        store.close()
