"""The local control socket: requests round-trip, bad input is refused, the server keeps serving."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import anyio
import msgspec
import pytest
from socket_servers import serving

from cluster import cli
from cluster.control import (
    ControlError,
    Reply,
    Request,
    SessionCreate,
    SessionList,
    SocketInUseError,
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


async def _logged(caplog: pytest.LogCaptureFixture, start: str) -> str:
    """The first log line starting with `start`, once the server has written it."""
    with anyio.fail_after(10):
        while True:
            lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]
            if lines:
                return lines[0]
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_a_dropped_connection_is_logged_saying_what_happened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It logged "control connection dropped: " and nothing more: an EndOfStream has no text."""
    caplog.set_level("INFO", logger="cluster.control")
    async with anyio.create_task_group() as tg:
        path = await tg.start(serve, tmp_path, _handler)
        async with await anyio.connect_unix(path) as stream:
            await stream.send(b"\x00\x00")  # half a header, then gone
        line = await _logged(caplog, "control connection dropped")
        assert line == (
            "control connection dropped: the client closed it before sending a whole request"
        )
        tg.cancel_scope.cancel()


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


# --------------------------------------------------------------------------------------------
# `cluster session/maintenance` at a control.sock that is not ours: one line naming it, exit 2
# --------------------------------------------------------------------------------------------


def unix_server(
    path: Path, answer: Callable[[socket.socket], None]
) -> contextlib.AbstractContextManager[None]:
    """A Unix-socket server at `path` handling each connection with `answer`."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    return serving(server, lambda conn, _done: answer(conn))


def _read_frame_sync(conn: socket.socket) -> None:
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk


def _http_answer(conn: socket.socket) -> None:
    _read_frame_sync(conn)
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")


def _not_json(conn: socket.socket) -> None:
    _read_frame_sync(conn)
    conn.sendall(struct.pack(">I", 8) + b"\x1b[2Jhi\n!")


def _json_not_a_reply(conn: socket.socket) -> None:
    _read_frame_sync(conn)
    conn.sendall(struct.pack(">I", 7) + b'{"a":1}')


def _close_at_once(conn: socket.socket) -> None:
    pass


def _close_after_request(conn: socket.socket) -> None:
    _read_frame_sync(conn)


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (_http_answer, "its answer is not a control frame (frame of 1213486160 bytes"),
        (_not_json, "the answer is not a reply: JSON is malformed"),
        (_json_not_a_reply, "the answer is not a reply: Object missing required field `ok`"),
        (_close_at_once, "it "),  # dropped or closed, depending on when the close lands
        (_close_after_request, "it closed the connection without answering"),
    ],
)
@pytest.mark.parametrize("argv", [["session", "list"], ["maintenance", "next"]])
def test_a_control_socket_that_is_not_ours_is_one_line(
    answer: Callable[[socket.socket], None],
    why: str,
    argv: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = socket_path(tmp_path)
    with unix_server(path, answer):
        assert cli.main([argv[0], "--data-dir", str(tmp_path), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"cluster {argv[0]}: {path} is not a cluster control socket: {why}"), err
    assert "\x1b" not in err


def test_a_control_socket_path_that_is_no_socket_or_a_dead_one_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = socket_path(tmp_path)
    path.mkdir()
    assert cli.main(["session", "--data-dir", str(tmp_path), "list"]) == 2
    assert capsys.readouterr().err == (
        f"cluster session: {path} is not a cluster control socket: it is a directory, not a "
        "socket\n"
    )
    path.rmdir()
    path.write_text("")
    assert cli.main(["session", "--data-dir", str(tmp_path), "list"]) == 2
    assert capsys.readouterr().err == (
        f"cluster session: {path} is not a cluster control socket: it is a file, not a socket\n"
    )
    path.unlink()
    with socket.socket(socket.AF_UNIX) as dead:  # bound, never listening: a stopped process's
        dead.bind(str(path))
        assert cli.main(["maintenance", "--data-dir", str(tmp_path), "next"]) == 2
    assert capsys.readouterr().err == (
        f"cluster maintenance: nothing listens on {path} (left by a process that stopped?): "
        f"is a master or worker running with --data-dir {tmp_path}?\n"
    )
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert cli.main(["session", "--data-dir", str(not_a_dir), "list"]) == 2
    assert capsys.readouterr().err == (
        f"cluster session: cannot use {not_a_dir}/control.sock: Not a directory\n"
    )


def _refusal(message: str) -> Callable[[socket.socket], None]:
    def answer(conn: socket.socket) -> None:
        _read_frame_sync(conn)
        body = msgspec.json.encode(Reply(ok=False, message=message))
        conn.sendall(struct.pack(">I", len(body)) + body)

    return answer


@pytest.mark.parametrize(
    ("argv", "message", "err"),
    [
        (
            ["maintenance", "cancel"],
            "no window to cancel",
            "cluster maintenance: no window to cancel",
        ),
        (["session", "delete", "s-1"], "no session s-1", "cluster session: no session s-1"),
        (["session", "list"], "", "cluster session: refused (the master gave no reason)"),
    ],
)
def test_a_refusal_is_printed_as_the_commands_error(
    argv: list[str], message: str, err: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A master's refusal reads like every other error of the command (it was printed bare,
    so a script grepping `cluster maintenance:` missed it); an empty one still says refused."""
    with unix_server(socket_path(tmp_path), _refusal(message)):
        assert cli.main([argv[0], "--data-dir", str(tmp_path), *argv[1:]]) == 1
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", err + "\n")


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["session", "create", "--slots", "1", "--memory-mb", "10", "--name"], "--name"),
        (["session", "delete"], "session_id"),
        (["node", "remove", "n1", "--reason"], "--reason"),
        (["maintenance", "cancel", "--window"], "--window"),
    ],
)
def test_text_that_is_not_utf8_never_reaches_the_master(
    argv: list[str], name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a master listening, `--name $'\\xff'` ended in a traceback: the request could
    not be encoded (`surrogates not allowed`). Refused by name as it is parsed, exit 2."""
    with (
        unix_server(socket_path(tmp_path), _refusal("unreachable")),
        pytest.raises(SystemExit) as exc,
    ):
        cli.main([argv[0], "--data-dir", str(tmp_path), *argv[1:], "\udcff"])
    assert exc.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.endswith(f"error: argument {name}: not valid UTF-8: b'\\xff'"), last


@pytest.mark.anyio
async def test_serve_refuses_a_socket_another_process_serves_and_keeps_it(
    tmp_path: Path,
) -> None:
    """A second `serve` on the same data directory (a worker started with a running master's
    `--data-dir`) unlinked the first one's socket and took its place: the first process's
    commands then found no socket. It is refused instead, naming the socket, and the first
    server keeps serving on it."""
    path = socket_path(tmp_path)
    async with anyio.create_task_group() as tg:
        await tg.start(serve, tmp_path, _handler)
        first = path.lstat()
        with anyio.fail_after(10), pytest.raises(SocketInUseError) as refused:
            await serve(tmp_path, _handler)
        assert str(refused.value) == (
            f"{path} answers: another master or worker is running with --data-dir {tmp_path} "
            "(each process needs a data directory of its own)"
        )
        assert (path.lstat().st_ino, path.lstat().st_dev) == (first.st_ino, first.st_dev)
        with anyio.fail_after(10):
            reply = await call(tmp_path, SessionCreate(slots=1, memory_per_slot_mb=1))
        assert reply.ok, reply
        tg.cancel_scope.cancel()
    assert not path.exists()  # the first server removes its own socket on exit


@pytest.mark.anyio
async def test_serve_replaces_a_dead_socket_and_removes_only_its_own(tmp_path: Path) -> None:
    """A socket nothing listens on (a process that was killed) is replaced, as before. On
    exit a server removed whatever was at the path, even a socket another process bound
    there since: now only the one it bound itself."""
    path = socket_path(tmp_path)
    with socket.socket(socket.AF_UNIX) as dead:  # bound, never listening
        dead.bind(str(path))
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            await tg.start(serve, tmp_path, _handler)
            reply = await call(tmp_path, SessionList())
        assert reply.message == "unsupported: SessionList"
        # Someone else's socket takes the path (as a process that ignored the check would).
        path.unlink()
        other = socket.socket(socket.AF_UNIX)
        other.bind(str(path))
        theirs = path.lstat()
        tg.cancel_scope.cancel()
    try:
        assert path.lstat().st_ino == theirs.st_ino, "serve removed a socket it did not bind"
    finally:
        other.close()


def test_session_list_says_as_of_when_an_unplaced_reason_was_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reason's counts are as of the planner's last SessionUnplaced (restated at most once
    a minute when only they move): the list says when, as `cluster status` does."""
    sessions = [
        {
            "session_id": "s1",
            "slots": 2,
            "memory_per_slot_mb": 512,
            "gpu": False,
            "unplaced_reason": (
                "needs 2 slot(s) of 512 MiB: 1 eligible node(s) offer 1 free slot(s)"
            ),
            "unplaced_ms": 1_709_647_200_000,
        },
        {
            "session_id": "s2",
            "slots": 1,
            "memory_per_slot_mb": 256,
            "gpu": True,
            "unplaced_reason": "",
            "unplaced_ms": 0,
        },
    ]

    def answer(conn: socket.socket) -> None:
        _read_frame_sync(conn)
        body = msgspec.json.encode(Reply(ok=True, data=sessions))
        conn.sendall(struct.pack(">I", len(body)) + body)

    with unix_server(socket_path(tmp_path), answer):
        assert cli.main(["session", "--data-dir", str(tmp_path), "list"]) == 0
    assert capsys.readouterr().out == (
        "s1: 2 slots x 512 MiB  unplaced (as of 2024-03-05 14:00 UTC): needs 2 slot(s) of "
        "512 MiB: 1 eligible node(s) offer 1 free slot(s)\n"
        "s2: 1 slot x 256 MiB, gpu\n"  # it said "1 slots"
    )
