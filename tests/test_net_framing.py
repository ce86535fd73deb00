"""Framing and protocol decoding rules, byte by byte, without a network."""

from __future__ import annotations

import struct
import zlib

import anyio
import msgspec
import pytest

from cluster.net.framing import (
    COMPRESSED,
    FrameDecoder,
    FrameError,
    FrameReader,
    FrameTooLarge,
    TruncatedFrame,
    encode_frame,
    encode_frames,
)
from cluster.net.protocol import (
    MAX_BOOT_ID_CHARS,
    MAX_RUNNER_DIGEST_CHARS,
    Ack,
    ErrorMsg,
    Hello,
    ProtocolError,
    SeqEvent,
    SubmitBatch,
    decode,
    encode,
    expect,
)
from cluster.shared.events import MAX_NODE_SLOTS, NodeGatheredInfo, NodeInfo
from cluster.worker.runners.registry import RunnerSetting


def test_frames_round_trip_when_fed_one_byte_at_a_time() -> None:
    payloads = [b"", b"a", b"x" * 70_000, b"last"]
    data = encode_frames(payloads)
    dec = FrameDecoder()
    out = []
    for i in range(len(data)):
        dec.feed(data[i : i + 1])
        while (frame := dec.next_frame()) is not None:
            out.append(frame)
    assert out == payloads
    dec.check_eof()  # nothing left over


def test_oversized_header_is_refused_before_buffering() -> None:
    dec = FrameDecoder(max_frame=1000)
    dec.feed(struct.pack(">I", 1001))
    with pytest.raises(FrameTooLarge, match="1001 bytes, more than the limit of 1000"):
        dec.next_frame()
    with pytest.raises(FrameTooLarge):
        encode_frame(b"x" * 1001, max_frame=1000)


def test_compressed_frames_round_trip_and_small_ones_stay_plain() -> None:
    bulk = b"12D3KooWsamenodeid" * 500
    small = b"x" * 100
    packed = encode_frame(bulk, compress=True)
    assert len(packed) < len(bulk) // 10
    assert struct.unpack_from(">I", packed)[0] & COMPRESSED
    assert encode_frame(small, compress=True) == encode_frame(small)  # not worth it
    noise = bytes(range(256)) * 8  # incompressible enough: sent as it is
    dec = FrameDecoder()
    data = packed + encode_frame(small, compress=True) + encode_frame(noise, compress=True)
    for i in range(0, len(data), 7):
        dec.feed(data[i : i + 7])
    assert [dec.next_frame(), dec.next_frame(), dec.next_frame(), dec.next_frame()] == [
        bulk,
        small,
        noise,
        None,
    ]
    dec.check_eof()


def _compressed(packed: bytes) -> bytes:
    return struct.pack(">I", len(packed) | COMPRESSED) + packed


@pytest.mark.parametrize(
    ("frame", "error", "message"),
    [
        # A tiny frame that inflates past the limit is refused, not buffered.
        (_compressed(zlib.compress(b"\0" * 5000)), FrameTooLarge, "inflates beyond the limit"),
        (_compressed(b"not zlib at all"), FrameError, "is corrupt"),
        (_compressed(zlib.compress(b"ok")[:-3]), FrameError, "not exactly one zlib stream"),
        (_compressed(zlib.compress(b"ok") + b"junk"), FrameError, "not exactly one zlib stream"),
    ],
)
def test_bad_compressed_frames_are_named(
    frame: bytes, error: type[FrameError], message: str
) -> None:
    dec = FrameDecoder(max_frame=1000)
    dec.feed(frame)
    with pytest.raises(error, match=message):
        dec.next_frame()


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"\x00\x00", "inside a frame header \\(2 of 4"), (struct.pack(">I", 9) + b"abc", "3 of 9")],
)
def test_truncated_stream_is_named(data: bytes, message: str) -> None:
    dec = FrameDecoder()
    dec.feed(data)
    assert dec.next_frame() is None
    with pytest.raises(TruncatedFrame, match=message):
        dec.check_eof()


@pytest.mark.anyio
async def test_reader_distinguishes_clean_end_from_truncation() -> None:
    async def reader_of(chunks: list[bytes]) -> FrameReader:
        it = iter(chunks)

        async def read(n: int) -> bytes:
            await anyio.sleep(0)
            try:
                return next(it)
            except StopIteration:
                raise EOFError from None

        return FrameReader(read)

    r = await reader_of([encode_frame(b"one")[:3], encode_frame(b"one")[3:]])
    assert await r.read_frame() == b"one"
    with pytest.raises(EOFError):
        await r.read_frame()
    r = await reader_of([encode_frame(b"one")[:5]])
    with pytest.raises(TruncatedFrame):
        await r.read_frame()
    assert issubclass(TruncatedFrame, FrameError)


def test_malformed_and_wrongly_typed_messages_are_protocol_errors() -> None:
    assert decode(encode(Ack(seq=3))) == Ack(seq=3)
    with pytest.raises(ProtocolError, match="undecodable") as bad:
        decode(b"\xc1")
    assert bad.value.code == "malformed"
    with pytest.raises(ProtocolError, match="invalid message"):
        decode(encode(Ack(seq=3)).replace(b"Ack", b"Nop"))
    with pytest.raises(ProtocolError, match="expected SubmitBatch, got Ack"):
        expect(Ack(seq=1), SubmitBatch)
    with pytest.raises(ProtocolError, match="peer reported lagging: slow") as err:
        expect(ErrorMsg(code="lagging", message="slow"), SubmitBatch)
    assert err.value.code == "lagging"


def test_a_hello_with_an_oversized_boot_id_is_refused_at_decode() -> None:
    """The boot id is logged and kept in State: a 4 MiB one made a log record no frame could
    carry to the replicas (every catch-up past it failed)."""
    ok = Hello(version=1, nonce=b"n", boot_id="b" * MAX_BOOT_ID_CHARS)
    assert decode(encode(ok)) == ok
    with pytest.raises(ProtocolError, match="boot_id") as err:
        decode(encode(Hello(version=1, nonce=b"n", boot_id="b" * (MAX_BOOT_ID_CHARS + 1))))
    assert err.value.code == "malformed"


def test_a_hellos_runner_digest_is_bounded_at_decode_and_optional() -> None:
    """Logged in NodeConnected and kept in State like the boot id; a hello without it (a
    worker without runners) decodes with "", which drops no self-test."""
    ok = Hello(version=1, nonce=b"n", runner_digest="d" * MAX_RUNNER_DIGEST_CHARS)
    assert decode(encode(ok)) == ok
    too_long = "d" * (MAX_RUNNER_DIGEST_CHARS + 1)
    with pytest.raises(ProtocolError, match="runner_digest") as err:
        decode(encode(Hello(version=1, nonce=b"n", runner_digest=too_long)))
    assert err.value.code == "malformed"
    assert decode(encode(Hello(version=1, nonce=b"n"))) == Hello(
        version=1, nonce=b"n", runner_digest=""
    )
    assert len(RunnerSetting(kind="subprocess", config={"command": ["x"]}).digest()) <= (
        MAX_RUNNER_DIGEST_CHARS
    )


def _hello_frame(**fields: object) -> bytes:
    """A Hello as a worker could send it, not built through `Hello` (which checks it)."""
    return msgspec.msgpack.encode({"t": "Hello", "version": 1, "nonce": b"n", **fields})


@pytest.mark.parametrize("field", ["boot_id", "runner_digest"])
@pytest.mark.parametrize(("key", "char", "at"), [("ab\ncd", "'\\n'", 2), ("\x1b[2J", "'\\x1b'", 0)])
def test_a_hellos_keys_must_be_printable(field: str, key: str, char: str, at: int) -> None:
    """Both are logged in NodeConnected and kept in State, like the same keys of a worker's
    events (`NodeStopping.boot_id`, a self-test's `config_digest`), which admission refuses
    unprintable: the hello only bounded their length, so a newline or an escape code went
    into the log and every node record. Refused at decode, as one too long is."""
    assert decode(_hello_frame(**{field: "0123abcd"})) == Hello(
        version=1, nonce=b"n", **{field: "0123abcd"}
    )
    facts_only = expect(decode(_hello_frame(runner_digest="no-runners")), Hello)
    assert facts_only.runner_digest == "no-runners"
    with pytest.raises(ProtocolError) as err:
        decode(_hello_frame(**{field: key}))
    assert err.value.code == "malformed"
    assert str(err.value) == (
        f"invalid message: Hello field {field} holds the control or format character {char} "
        f"at {at}: a key must be printable"
    )
    with pytest.raises(ValueError, match=f"field {field}"):  # nor can a worker build one
        Hello(version=1, nonce=b"n", **{field: key})


@pytest.mark.parametrize(
    ("info", "field"),
    [
        (NodeInfo(slots=-1000), "slots"),
        (NodeInfo(slots=MAX_NODE_SLOTS + 1), "slots"),
        (NodeInfo(slots=2**64 - 1), "slots"),
        (NodeInfo(slot_memory_mb=-1), "slot_memory_mb"),
        (NodeInfo(cpu_count=-2), "cpu_count"),
    ],
)
def test_node_facts_out_of_range_are_refused_at_decode(info: NodeInfo, field: str) -> None:
    # The maintenance caps weigh nodes by their slots: one node's claim of -1000 or 2**64-1
    # slots would cancel, or swamp, the rest of the cluster's capacity.
    def batch(info: NodeInfo) -> bytes:
        event = NodeGatheredInfo(node_id="n", source="host", info=info)
        return encode(SubmitBatch(events=[SeqEvent(seq=1, event=event)]))

    assert decode(batch(NodeInfo(slots=MAX_NODE_SLOTS, slot_memory_mb=2**63 - 1)))
    with pytest.raises(ProtocolError, match=rf"invalid message: .*\.info\.{field}`") as err:
        decode(batch(info))
    assert err.value.code == "malformed"
