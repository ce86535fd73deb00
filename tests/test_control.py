"""The local control socket: requests round-trip, bad input is refused, the server keeps serving."""

from __future__ import annotations

import struct
from pathlib import Path

import anyio
import pytest

from cluster.control import (
    ControlError,
    Reply,
    Request,
    SessionCreate,
    StatusRequest,
    call,
    decode_request,
    serve,
    socket_path,
)


async def _handler(request: Request) -> Reply:
    if isinstance(request, SessionCreate):
        return Reply(ok=True, message="created", data={"slots": request.slots})
    if isinstance(request, StatusRequest):
        raise RuntimeError("boom")  # a failing handler must not take the server down
    return Reply(ok=False, message=f"unsupported: {type(request).__name__}")


async def _raw(path: Path, payload: bytes) -> bytes:
    async with await anyio.connect_unix(path) as stream:
        await stream.send(payload)
        data = b""
        try:
            while True:
                data += await stream.receive()
        except anyio.EndOfStream:
            return data


@pytest.mark.anyio
async def test_control_round_trip_and_bad_input(tmp_path: Path) -> None:
    async with anyio.create_task_group() as tg:
        path = await tg.start(serve, tmp_path, _handler)
        assert path == socket_path(tmp_path)
        assert (path.stat().st_mode & 0o777) == 0o600
        with anyio.fail_after(10):
            reply = await call(tmp_path, SessionCreate(slots=2, memory_per_slot_mb=512))
            assert reply.ok and reply.data == {"slots": 2}
            # Malformed JSON, a wrong type and an unknown request tag are all refused by name.
            body = b'{"request": "SessionCreate", "slots": "two", "memory_per_slot_mb": 1}'
            raw = await _raw(path, struct.pack(">I", len(body)) + body)
            assert b"bad request" in raw and b"slots" in raw
            body = b'{"request": "Reboot"}'
            raw = await _raw(path, struct.pack(">I", len(body)) + body)
            assert b"bad request" in raw
            # An oversized frame is dropped without an answer; the handler error gives a reply.
            assert await _raw(path, struct.pack(">I", 1 << 30)) == b""
            reply = await call(tmp_path, StatusRequest())
            assert not reply.ok and reply.message == "internal error"
            # ...and the server still serves.
            reply = await call(tmp_path, SessionCreate(slots=1, memory_per_slot_mb=1))
            assert reply.ok
        tg.cancel_scope.cancel()
    assert not socket_path(tmp_path).exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"request":"SessionCreate","slots":2,"memory_per_slot_mb":1,"gpus":true}', "gpus"),
        (b'{"request":"MaintenanceSchedule","in_ms":0,"duration_ms":1,"node":"x"}', "node"),
        (b'{"request":"StatusRequest","verbose":1}', "verbose"),
    ],
)
def test_an_unknown_field_is_refused_by_name(body: bytes, field: str) -> None:
    """A misspelt option was dropped silently: `gpus` made a session without GPUs."""
    reply = decode_request(body)
    assert isinstance(reply, Reply) and not reply.ok
    assert reply.message == f"bad request: Object contains unknown field `{field}`"


@pytest.mark.anyio
async def test_call_without_server_names_the_socket(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="no control socket"):
        await call(tmp_path, StatusRequest())


@pytest.mark.anyio
async def test_an_answer_too_large_to_send_is_a_refusal_that_says_so(tmp_path: Path) -> None:
    async def handler(request: Request) -> Reply:
        if isinstance(request, SessionCreate):
            return Reply(ok=True, message="listed", data=["s" * 60] * request.slots)
        raise ValueError("a handler bug, not a dropped connection")

    async with anyio.create_task_group() as tg:
        await tg.start(serve, tmp_path, handler)
        with anyio.fail_after(10):
            reply = await call(tmp_path, SessionCreate(slots=30_000, memory_per_slot_mb=1))
            assert not reply.ok and "over the 1,048,576-byte limit" in reply.message
            reply = await call(tmp_path, SessionCreate(slots=3, memory_per_slot_mb=1))
            assert reply.ok and reply.data == ["s" * 60] * 3
            # A handler's ValueError is a failed request, answered, not a dropped connection.
            reply = await call(tmp_path, StatusRequest())
            assert not reply.ok and reply.message == "internal error"
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_an_oversized_answer_from_a_server_is_a_control_error(tmp_path: Path) -> None:
    async def oversized(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.receive()
            await stream.send(struct.pack(">I", (1 << 20) + 1))

    listener = await anyio.create_unix_listener(socket_path(tmp_path))
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, oversized)
        with anyio.fail_after(10), pytest.raises(ControlError, match="exceeds the"):
            await call(tmp_path, StatusRequest())
        tg.cancel_scope.cancel()
