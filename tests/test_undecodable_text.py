"""Text that is not valid UTF-8 is refused like any other malformed input, at every place
that decodes outside input: a peer's frame, a control request, a log record, a snapshot,
an /api/events line, an /api/status body, the worker's own files.

msgspec raises `UnicodeDecodeError` for such text where everything else it refuses is a
`msgspec.DecodeError`, so each of these let it through as an internal error, a reset with
no word, or a traceback (`codec.strict_decode` maps it)."""

from __future__ import annotations

import json
import logging
import struct
import zlib
from pathlib import Path

import anyio
import msgspec
import pytest

from cluster import control
from cluster.master.server import Master, MasterConfig
from cluster.net.identity import load_identity
from cluster.net.membership import Membership
from cluster.net.protocol import (
    PROTOCOL_VERSION,
    Hello,
    ProtocolError,
    SeqEvent,
    SubmitBatch,
    decode,
    encode,
)
from cluster.shared import codec
from cluster.shared.apply import apply
from cluster.shared.eventlog import segment_name
from cluster.shared.events import IndexedEvent, NodeGatheredInfo, NodeHeartbeat, NodeInfo
from cluster.shared.snapshots import SnapshotStore
from cluster.shared.state import EMPTY_STATE
from cluster.shared.status_view import cluster_status, from_json, to_json
from cluster.shared.store import EventDecodeError, EventStore, snapshot_state
from cluster.worker.outbox import Outbox
from cluster.worker.runners.process_groups import RunnerProcessGroups

PEER = "12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
MARK = "ZZZZ"
BAD = b"\xff\xfe\xff\xfe"  # as long as MARK: the encoding's lengths stay right


def _spoil(data: bytes) -> bytes:
    """`data` with MARK (once) replaced by bytes that are not UTF-8."""
    assert data.count(MARK.encode()) == 1
    return data.replace(MARK.encode(), BAD)


def _info_event(node: str = PEER) -> NodeGatheredInfo:
    return NodeGatheredInfo(node_id=node, source="host", info=NodeInfo(hostname=MARK))


def _hello_frame() -> bytes:
    return _spoil(encode(Hello(version=PROTOCOL_VERSION, nonce=b"n" * 32, boot_id=MARK)))


def _submit_frame() -> bytes:
    return _spoil(encode(SubmitBatch(events=[SeqEvent(1, _info_event())])))


@pytest.mark.parametrize("frame", [_hello_frame(), _submit_frame()], ids=["hello", "submit"])
def test_a_frame_with_such_text_is_malformed(frame: bytes) -> None:
    with pytest.raises(ProtocolError, match="not valid UTF-8: byte 0xff") as err:
        decode(frame)
    assert err.value.code == "malformed"


class Feed:
    """A FramedStream stand-in: hands out the given frames, keeps the failure it is given."""

    peer_id = PEER

    def __init__(self, *frames: bytes) -> None:
        self.frames = list(frames)
        self.failed: tuple[str, str] | None = None

    async def recv_frame(self, timeout: float, max_frame: int | None = None) -> bytes:
        if not self.frames:
            raise EOFError
        frame = self.frames.pop(0)
        assert max_frame is None or len(frame) <= max_frame, "the test's frames are small"
        return frame

    async def recv(self, timeout: float, max_frame: int | None = None) -> object:
        return decode(await self.recv_frame(timeout, max_frame))

    async def fail(self, code: str, message: str) -> None:
        self.failed = (code, message)

    async def send(self, msg: object, timeout: float) -> None:
        raise AssertionError(f"nothing but the failure expected, got {msg}")


@pytest.mark.anyio
async def test_the_master_answers_such_a_hello_or_batch_malformed(tmp_path: Path) -> None:
    """The worker must be told it is its content (`malformed`, a content refusal), not see
    a bare reset it takes for a network fault and resends forever."""
    store = EventStore.open(tmp_path / "m")
    key_pair, _ = load_identity(tmp_path / "m")
    master = Master(
        store, key_pair, Membership(secret=b"s" * 32), MasterConfig(data_dir=tmp_path / "m")
    )
    try:
        with anyio.fail_after(10):
            hello = Feed(_hello_frame())
            await master._hello(hello)  # type: ignore[arg-type]
            submit = Feed(_submit_frame())
            await master._serve_submit(submit)  # type: ignore[arg-type]
        for fs in (hello, submit):
            assert fs.failed is not None
            code, message = fs.failed
            assert code == "malformed" and "not valid UTF-8" in message
        assert store.state.last_applied == 0  # nothing logged
    finally:
        store.close()


@pytest.mark.anyio
async def test_a_control_request_with_such_text_is_a_bad_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    body = b'{"request":"SessionDelete","session_id":"\xff\xfe"}'
    reply = control.decode_request(body)
    assert isinstance(reply, control.Reply) and not reply.ok
    assert reply.message == "bad request: text is not valid UTF-8: byte 0xff in a string " + (
        "(invalid start byte)"
    )

    async def handler(request: control.Request) -> control.Reply:
        raise AssertionError(f"not for the handler: {request}")

    async with anyio.create_task_group() as tg:
        path = await tg.start(control.serve, tmp_path, handler)
        with anyio.fail_after(10):
            async with await anyio.connect_unix(path) as stream:
                await stream.send(struct.pack(">I", len(body)) + body)
                answer = b""
                with pytest.raises(anyio.EndOfStream):
                    while True:
                        answer += await stream.receive()
        tg.cancel_scope.cancel()
    assert json.loads(answer[4:])["message"].startswith("bad request: text is not valid UTF-8")
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_a_log_record_with_such_text_names_its_index(tmp_path: Path) -> None:
    with EventStore.open(tmp_path) as store:
        store.append([IndexedEvent(1, 1, PEER, 1, NodeHeartbeat(node_id=PEER))])
        record = codec.encode_event(IndexedEvent(2, 2, PEER, 2, _info_event()))
        store.log.append([(2, _spoil(record))])  # CRC-valid: the log writes it as given
    with pytest.raises(EventDecodeError) as err:
        EventStore.open(tmp_path)
    assert err.value.idx == 2
    assert err.value.why.startswith("text is not valid UTF-8")
    assert str(err.value).startswith(  # and where it is
        f"event log record 2 is not a valid event: {tmp_path / 'log' / segment_name(1)} offset "
    )


def test_a_snapshot_with_such_text_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = apply(EMPTY_STATE, IndexedEvent(1, 1, PEER, 1, _info_event()))
    with pytest.raises(msgspec.DecodeError, match="not valid UTF-8"):
        codec.decode_state(_spoil(codec.encode_state(state)))
    snapshots = SnapshotStore(tmp_path / "snaps")
    snapshots.save(1, _spoil(codec.encode_state(state)))
    with caplog.at_level(logging.WARNING):
        assert snapshot_state(snapshots, 1) is None
    assert "snapshot at index 1 is unusable (text is not valid UTF-8" in caplog.text


def test_json_readers_raise_decode_errors_as_promised() -> None:
    ie = IndexedEvent(1, 1, PEER, 1, _info_event())
    with pytest.raises(msgspec.DecodeError, match="byte 0xff"):
        codec.event_from_json(_spoil(codec.event_json(ie)))
    # Text given as str can hold a lone surrogate, which no UTF-8 can carry.
    text = codec.event_json(ie).decode().replace(MARK, "\udcff")
    with pytest.raises(msgspec.DecodeError, match="not valid UTF-8"):
        codec.event_from_json(text)
    state = apply(EMPTY_STATE, ie)  # its hostname is MARK
    with pytest.raises(msgspec.DecodeError, match="not valid UTF-8"):
        from_json(_spoil(to_json(cluster_status(state, 0))))


def _outbox_record(seq: int, payload: bytes) -> bytes:
    """An outbox record as its documented layout has it: [len u32][seq u64][crc32 u32][payload],
    the CRC over seq and payload."""
    crc = zlib.crc32(payload, zlib.crc32(struct.pack(">Q", seq)))
    return struct.pack(">IQI", len(payload), seq, crc) + payload


def test_a_refused_outbox_event_with_such_text_is_set_aside_as_bytes(tmp_path: Path) -> None:
    payload = _spoil(msgspec.msgpack.encode(_info_event()))
    (tmp_path / "events.log").write_bytes(_outbox_record(1, payload))
    box = Outbox.open(tmp_path)
    try:
        assert box.set_aside(1, "malformed", "the master could not read it") is None
    finally:
        box.close()
    (line,) = box.refused_path.read_text().splitlines()
    assert json.loads(line)["event"] == {"undecodable_msgpack_hex": payload.hex()}


@pytest.mark.anyio
async def test_a_runner_record_with_such_text_is_removed_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    groups = RunnerProcessGroups(tmp_path)
    bad = tmp_path / f"{'0' * 32}.json"
    bad.write_bytes(_spoil(b'{"runner_id":"ZZZZ","grace_s":1.0}'))
    with caplog.at_level(logging.WARNING), anyio.fail_after(10):
        await groups.reap_leftovers()
    assert not bad.exists()
    assert "unreadable runner record" in caplog.text and "not valid UTF-8" in caplog.text
