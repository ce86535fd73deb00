"""What a peer can make the master hold: counted, not timed.

Most checks drive the master's stream handlers with a stand-in for a libp2p stream that
counts the bytes the master takes from it; one runs over loopback libp2p, to show the peer
reads the refusal (a stream refused at once shows it only a reset).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import msgspec
import pytest
from trio.testing import MockClock, wait_all_tasks_blocked

from cluster.master.server import _STOP_NOTICE_S, Master, MasterConfig, _Submission
from cluster.net import host as nethost
from cluster.net.framing import COMPRESSED, HEADER, READ_CHUNK, FrameDecoder, encode_frame
from cluster.net.identity import key_pair_from_seed, load_identity, peer_id_of
from cluster.net.membership import Membership, new_nonce
from cluster.net.protocol import (
    HELLO_PROTOCOL,
    PROTOCOL_VERSION,
    Ack,
    ControlReplyMsg,
    ControlRequestMsg,
    ErrorMsg,
    Hello,
    Message,
    SeqEvent,
    SubmitBatch,
    Subscribe,
    decode,
    encode,
)
from cluster.shared.apply import apply
from cluster.shared.events import IndexedEvent, NodeHeartbeat
from cluster.shared.store import EventStore

SECRET = b"s" * 32
STRANGER = peer_id_of(key_pair_from_seed(b"\x07" * 32))
MEMBER = peer_id_of(key_pair_from_seed(b"\x08" * 32))
#: A frame header announcing 4 MiB - 1 (the bulk limit), then all of its payload.
FOUR_MIB_FRAME = HEADER.pack((4 << 20) - 1) + b"\x00" * ((4 << 20) - 1)


class FakeStream:
    """A libp2p stream stand-in: serves `data` (then stays silent, as a hung peer), counting
    the bytes the master takes, and keeps what the master writes."""

    def __init__(self, peer: str, data: bytes = b"") -> None:
        self.data = data
        self.taken = 0
        self.written = b""
        self.muxed_conn = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: peer))

    async def read(self, n: int) -> bytes:
        if self.taken >= len(self.data):
            await anyio.sleep_forever()
        chunk = self.data[self.taken : self.taken + n]
        self.taken += len(chunk)
        return chunk

    async def write(self, data: bytes) -> None:
        self.written += data

    async def reset(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def replies(self) -> list[Message]:
        decoder = FrameDecoder()
        decoder.feed(self.written)
        out = []
        while (frame := decoder.next_frame()) is not None:
            out.append(decode(frame))
        return out

    def error(self) -> ErrorMsg:
        (reply,) = self.replies()
        assert isinstance(reply, ErrorMsg), reply
        return reply


def _fs(peer: str, data: bytes = b"") -> tuple[nethost.FramedStream, FakeStream]:
    raw = FakeStream(peer, data)
    return nethost.FramedStream(raw), raw


@asynccontextmanager
async def _master(
    tmp_path: Path, membership: Membership | None = None, **config: Any
) -> AsyncIterator[Master]:
    store = EventStore.open(tmp_path / "m")
    key_pair, _ = load_identity(tmp_path / "m")
    master = Master(
        store, key_pair, membership or Membership(secret=SECRET), MasterConfig(**config)
    )
    try:
        yield master
    finally:
        master.close()
        store.close()


async def _until(check: Any) -> None:
    while not check():
        await anyio.sleep(0.01)


# ------------------------------------------------------------------ hello, strangers
@pytest.mark.anyio
async def test_a_stranger_off_the_allow_list_is_refused_before_its_frame_is_taken(
    tmp_path: Path,
) -> None:
    """The allow-list decides on the peer id alone: a 4 MiB first frame was read whole
    (under the 4 MiB bulk limit) before the stranger was refused, on every hello stream."""
    async with _master(tmp_path, Membership(allowed=frozenset({MEMBER}))) as master:
        fs, raw = _fs(STRANGER, FOUR_MIB_FRAME)
        with anyio.fail_after(10):
            await master._hello(fs)
        err = raw.error()
        assert err.code == "unauthorized" and "not on the cluster allow-list" in err.message
        assert raw.taken <= READ_CHUNK, f"the master took {raw.taken} bytes of a stranger's"
        assert master.members == frozenset()


@pytest.mark.anyio
async def test_a_hello_frame_over_the_handshake_limit_is_refused_at_its_header(
    tmp_path: Path,
) -> None:
    """With a cluster secret only, a peer must send Hello before it can be judged: that
    frame is read under a 4 KiB limit, not the 4 MiB one."""
    async with _master(tmp_path) as master:
        fs, raw = _fs(STRANGER, FOUR_MIB_FRAME)
        with anyio.fail_after(10):
            await master._hello(fs)
        err = raw.error()
        assert err.code == "too-large" and "limit of 4096" in err.message, err
        assert raw.taken <= READ_CHUNK, f"the master took {raw.taken} bytes of a stranger's"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("data", "code", "why"),
    [
        (HEADER.pack(5 | COMPRESSED) + b"hello", "malformed", "is corrupt"),
        # ~1 KiB on the wire, 1 MiB inflated: the handshake limit holds once inflated too.
        (encode_frame(b"\x00" * (1 << 20), compress=True), "too-large", "limit of 4096"),
    ],
)
async def test_a_hello_frame_that_breaks_framing_is_answered_with_why(
    tmp_path: Path, data: bytes, code: str, why: str
) -> None:
    """A first frame that broke framing got a bare reset (FrameError was not caught)."""
    async with _master(tmp_path) as master:
        fs, raw = _fs(STRANGER, data)
        with anyio.fail_after(10):
            await master._hello(fs)
        err = raw.error()
        assert err.code == code and why in err.message, err


@pytest.mark.anyio
@pytest.mark.parametrize("field", ["boot_id", "runner_digest"])
async def test_a_hello_with_an_unprintable_key_is_answered_malformed(
    tmp_path: Path, field: str
) -> None:
    """A member's hello whose boot id or runner digest holds a control character is refused,
    naming the field, before the challenge: nothing is logged and it is no member."""
    hello = {"t": "Hello", "version": PROTOCOL_VERSION, "nonce": new_nonce(), field: "ab\n"}
    async with _master(tmp_path, Membership(allowed=frozenset({MEMBER}))) as master:
        fs, raw = _fs(MEMBER, encode_frame(msgspec.msgpack.encode(hello)))
        with anyio.fail_after(10):
            await master._hello(fs)
        err = raw.error()
        assert err.code == "malformed", err
        assert f"Hello field {field} holds the control or format character '\\n' at 2" in (
            err.message
        ), err
        assert master.members == frozenset() and master.last_idx == 0


@pytest.mark.anyio
async def test_a_silent_hello_ends_at_the_hello_deadline(tmp_path: Path) -> None:
    """A hello stream was held for `peer_timeout` per read (10 s each by default)."""
    async with _master(tmp_path, peer_timeout=600.0, hello_timeout=0.2) as master:
        fs, raw = _fs(STRANGER)
        with anyio.fail_after(10):
            await master._hello(fs)
        err = raw.error()
        assert err.code == "timeout" and "no hello within 0.2 s" in err.message, err


def _known(master: Master, *peers: str) -> None:
    """Make `peers` nodes the master's state knows (members before), as their events do."""
    state = master._state
    for peer in peers:
        ie = IndexedEvent(state.last_applied + 1, 0, peer, 1, NodeHeartbeat(node_id=peer))
        state = apply(state, ie)
    master._state = state


@pytest.mark.anyio
async def test_hello_streams_are_capped_per_peer_and_overall(tmp_path: Path) -> None:
    """Silent hello streams were held without limit, each able to buffer a 4 MiB frame."""
    other = peer_id_of(key_pair_from_seed(b"\x09" * 32))
    async with _master(tmp_path, max_hellos_per_peer=2, max_hellos=3) as master:
        _known(master, STRANGER, other)
        held = [_fs(STRANGER) for _ in range(2)] + [_fs(other)]
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for fs, _ in held:
                    tg.start_soon(master._hello, fs)
                await _until(lambda: sum(master._hellos.values()) == 3)
                assert master._hellos == collections.Counter({STRANGER: 2, other: 1})

                fs, raw = _fs(STRANGER)  # a third of the same peer
                await master._hello(fs)
                err = raw.error()
                assert err.code == "too-many-streams", err
                assert f"peer {STRANGER} already holds 2 hello streams" in err.message

                fs, raw = _fs(other)  # a second of another peer: over the total
                await master._hello(fs)
                err = raw.error()
                assert err.code == "too-many-streams", err
                assert "3 hellos in progress" in err.message
                assert sum(master._hellos.values()) == 3
                tg.cancel_scope.cancel()
        assert not master._hellos  # released with their streams


@pytest.mark.anyio
@pytest.mark.parametrize("allow_list", [True, False])
async def test_strangers_cannot_take_the_hello_slots_nodes_reconnect_with(
    tmp_path: Path, allow_list: bool
) -> None:
    """New peer ids cost nothing: silent hellos of strangers filled every slot, and every
    node that reconnected was refused 'too-many-streams'. Off the allow-list a stranger is
    refused before it takes a slot; with a cluster secret only (it must be heard before it
    can be judged) peers new to the cluster share half of the slots."""
    strangers = [peer_id_of(key_pair_from_seed(bytes([k]) * 32)) for k in range(10, 20)]
    membership = Membership(allowed=frozenset({MEMBER})) if allow_list else None
    async with _master(tmp_path, membership, max_hellos_per_peer=2, max_hellos=8) as master:
        _known(master, MEMBER)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for peer in strangers:  # 20 silent hello streams
                    for _ in range(2):
                        tg.start_soon(master._hello, _fs(peer)[0])
                await wait_all_tasks_blocked()
                assert sum(master._hellos.values()) == (0 if allow_list else 4)
                # A node the log knows still finds a slot.
                tg.start_soon(master._hello, _fs(MEMBER)[0])
                await _until(lambda: master._hellos[MEMBER] == 1)
                if not allow_list:  # one more stranger: its share is full, said so
                    fs, raw = _fs(peer_id_of(key_pair_from_seed(b"\x30" * 32)))
                    await master._hello(fs)
                    err = raw.error()
                    assert err.code == "too-many-streams", err
                    assert "4 hellos of peers new to the cluster in progress" in err.message
                tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_refused_hello_is_told_why_over_the_network(tmp_path: Path) -> None:
    """Over loopback libp2p: a hello stream beyond the cap reads 'too-many-streams' (the
    master takes its first frame before refusing, so the peer's write is not reset)."""
    kp = key_pair_from_seed(b"\x07" * 32)
    async with _master(tmp_path, max_hellos_per_peer=0) as master, anyio.create_task_group() as tg:
        addrs = await tg.start(master.run)
        with anyio.fail_after(30):
            async with nethost.running_host(kp, []) as host:
                addr = nethost.parse_multiaddr(addrs[0], need_peer=True)
                peer = await nethost.dial(host, addr, 10)
                for _ in range(3):
                    fs = await nethost.open_stream(host, peer, HELLO_PROTOCOL, 10)
                    await fs.send(Hello(version=PROTOCOL_VERSION, nonce=new_nonce()), 10)
                    reply = await fs.recv(10)
                    assert isinstance(reply, ErrorMsg), reply
                    assert reply.code == "too-many-streams", reply
                    await fs.close()
        master.stop()


# ------------------------------------------------------------------ other streams
@pytest.mark.anyio
async def test_a_non_members_submit_stream_is_refused_without_taking_its_frame(
    tmp_path: Path,
) -> None:
    async with _master(tmp_path) as master:
        fs, raw = _fs(STRANGER, FOUR_MIB_FRAME)
        with anyio.fail_after(10):
            await master._submit(fs)
        err = raw.error()
        assert err.code == "unauthorized" and "submit refused" in err.message, err
        assert raw.taken <= READ_CHUNK, f"the master took {raw.taken} bytes of a stranger's"


@pytest.mark.parametrize("handler", ["_submit", "_request", "_subscribe", "_hello"])
def test_refused_streams_held_for_their_first_frame_are_capped_over_all_protocols(
    tmp_path: Path, handler: str
) -> None:
    """A non-member's stream was held up to a second for its first frame (so that it reads
    why) with no cap on how many at once, unlike a refused hello: strangers opening
    thousands of silent submit streams held as many. Now all refusals share
    `max_refusals`; beyond, a stream is refused at once. On a virtual clock standing still,
    so that no held stream's second runs out during the test."""
    cap = 3

    async def main() -> None:
        membership = Membership(allowed=frozenset({MEMBER}))
        async with _master(tmp_path, membership, max_refusals=cap) as master:
            silent = [_fs(STRANGER) for _ in range(cap + 2)]
            async with anyio.create_task_group() as tg:
                for fs, _ in silent:
                    tg.start_soon(getattr(master, handler), fs)
                await wait_all_tasks_blocked()
                answered = [raw for _, raw in silent if raw.written]
                assert len(answered) == 2, f"{len(answered)} of {len(silent)} answered"
                for raw in answered:
                    err = raw.error()
                    assert err.code == "unauthorized" and STRANGER in err.message, err
                assert master._refusals == cap
                tg.cancel_scope.cancel()
            assert master._refusals == 0  # released with their streams

    anyio.run(main, backend="trio", backend_options={"clock": MockClock()})


@pytest.mark.anyio
async def test_a_members_request_streams_are_capped(tmp_path: Path) -> None:
    """Each open request stream can hold a 4 MiB frame: any number were served at once."""
    release = anyio.Event()

    async def slow_handler(payload: bytes, peer: str) -> bytes:
        await release.wait()
        return b'{"ok":true}'

    async with _master(tmp_path, max_request_streams_per_peer=2) as master:
        master.request_handler = slow_handler
        master._members.add(MEMBER)
        request = encode_frame(encode(ControlRequestMsg(payload=b"{}")))
        held = [_fs(MEMBER, request) for _ in range(2)]
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for fs, _ in held:
                    tg.start_soon(master._request, fs)
                await _until(lambda: master._requests[MEMBER] == 2)
                fs, raw = _fs(MEMBER, request)
                await master._request(fs)
                err = raw.error()
                assert err.code == "too-many-streams", err
                assert "2 request streams" in err.message
                release.set()
        for _, raw in held:  # the two held were answered
            assert isinstance(raw.replies()[0], ControlReplyMsg)
        assert not master._requests


def test_a_stop_does_not_wait_on_a_subscription_that_ended_in_an_unexpected_error(
    tmp_path: Path,
) -> None:
    """A stopping master closes its subscribers' queues and waits up to `_STOP_NOTICE_S` for
    their streams to say "stopping". The last one to end released that wait only if it
    ended normally: one ended by an unexpected error (here raised as its queue closes) held
    every stop for the whole second. On a virtual clock that jumps ahead whenever all tasks
    wait, so a wait left to time out takes exactly `_STOP_NOTICE_S`."""

    async def main() -> None:
        async with _master(tmp_path) as master:

            async def broken_live(fs: nethost.FramedStream, recv: Any, cursor: int) -> None:
                with contextlib.suppress(anyio.EndOfStream):
                    await recv.receive()  # until the stop closes the queue
                raise RuntimeError("unexpected")

            master._send_live = broken_live  # type: ignore[method-assign]
            master._members.add(MEMBER)
            fs, _ = _fs(MEMBER, encode_frame(encode(Subscribe(from_idx=1))))
            handler = nethost.safe_handler(master._subscribe, "subscribe")  # as the host runs it

            async def serve() -> None:
                await handler(fs.stream)

            async with anyio.create_task_group() as tg:
                tg.start_soon(serve)
                await _until(lambda: master._subscriptions[MEMBER] == 1)
                master.stop()
                start = anyio.current_time()
                await master._let_subscribers_hear_the_stop()
                assert anyio.current_time() - start < _STOP_NOTICE_S
            assert not master._subscriptions

    anyio.run(main, backend="trio", backend_options={"clock": MockClock(autojump_threshold=0)})


# ------------------------------------------------------------------ submissions
def _batches(peer: str, n: int, size: int) -> list[bytes]:
    """`n` compressed SubmitBatch frames of `size` heartbeats each, seqs from 1."""
    return [
        encode_frame(
            encode(
                SubmitBatch(
                    events=[
                        SeqEvent(b * size + i + 1, NodeHeartbeat(node_id=peer)) for i in range(size)
                    ]
                )
            ),
            compress=True,
        )
        for b in range(n)
    ]


def _inflated(frame: bytes) -> int:
    decoder = FrameDecoder()
    decoder.feed(frame)
    payload = decoder.next_frame()
    assert payload is not None
    return len(payload)


def _queued(master: Master) -> int:
    return master._inbox_recv.statistics().current_buffer_used


@pytest.mark.anyio
async def test_what_one_peer_has_waiting_for_the_indexer_is_bounded_in_bytes(
    tmp_path: Path,
) -> None:
    """Counted in submissions (a 64-deep acker queue per stream, a 1024-deep inbox), one
    member's compressed frames, each inflating to 4 MiB, took gigabytes. Now its streams read
    no further frame while it has `max_pending_bytes_per_peer` waiting; other peers are not
    held up by it; and all of it is indexed and acknowledged once the indexer runs."""
    other = peer_id_of(key_pair_from_seed(b"\x09" * 32))
    frames = _batches(MEMBER, 10, 100)
    limit = _inflated(frames[0]) * 5 // 2  # room for 3 frames: held < limit when each is read
    async with _master(tmp_path, peer_timeout=600.0, max_pending_bytes_per_peer=limit) as master:
        master._members |= {MEMBER, other}
        fs, raw = _fs(MEMBER, b"".join(frames))
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(master._serve_submit, fs)
                await _until(lambda: _queued(master) == 3)
                await wait_all_tasks_blocked()
                assert _queued(master) == 3, "the peer's frames kept being taken"
                assert master._pending.held[MEMBER] == sum(map(_inflated, frames[:3]))

                other_fs, _ = _fs(other, _batches(other, 1, 100)[0])
                tg.start_soon(master._serve_submit, other_fs)
                await _until(lambda: _queued(master) == 4)  # not held up by the first peer

                tg.start_soon(master._indexer)
                await _until(lambda: master.last_idx == 1100)
                await _until(
                    lambda: any(isinstance(r, Ack) and r.seq == 1000 for r in raw.replies())
                )
                assert not master._pending.held  # all released once indexed
                tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_group_commit_stops_filling_at_commit_events(tmp_path: Path) -> None:
    """The indexer took everything waiting into one commit: millions of events in one."""
    async with _master(tmp_path, commit_events=250) as master:
        subs = []
        for b in range(6):
            seqs = list(range(b * 100 + 1, b * 100 + 101))
            sub = _Submission(MEMBER, [NodeHeartbeat(node_id=MEMBER)] * 100, seqs)
            master._inbox_send.send_nowait(sub)
            subs.append(sub)
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(master._indexer)
                await subs[-1].done.wait()
                tg.cancel_scope.cancel()
        assert master.last_idx == 600
        # 100 + 100 + 100 reaches 250: each commit took three submissions, not all six.
        assert master.stats["commits"] == 2
        assert [sub.ack for sub in subs] == [100, 200, 300, 400, 500, 600]
