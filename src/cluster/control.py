"""Local control socket: how `cluster` commands on a host talk to the process running there.

A master and a worker each listen on a Unix socket in their data directory
(`control.sock`, mode 0600). Who may use it is decided by the operating system: only the
account that owns the data directory can connect. That is the "host" identity for
maintenance commands on a worker and the "operator" identity for session commands on the
master, without a second key to manage.

Wire format: one request per connection, each direction a 4-byte big-endian length and a
JSON document (a tagged msgspec union). Requests are validated (types, and no field the
request does not have: a misspelt option must not be dropped silently); a bad one gets a
refusal naming what was wrong, and the server keeps serving.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec

from cluster.shared.codec import strict_decode

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_FRAME = 1 << 20
_LEN = struct.Struct(">I")


class _Request(
    msgspec.Struct, frozen=True, tag_field="request", kw_only=True, forbid_unknown_fields=True
):
    pass


class StatusRequest(_Request, frozen=True):
    pass


class SessionCreate(_Request, frozen=True):
    slots: int
    memory_per_slot_mb: int
    gpu: bool = False
    name: str = ""
    reward_per_unit: int = 1


class SessionDelete(_Request, frozen=True):
    session_id: str


class SessionList(_Request, frozen=True):
    pass


class NodeRemove(_Request, frozen=True, kw_only=True):
    """Remove a node that is gone for good (`cluster node remove`): operator only."""

    node_id: str
    reason: str = ""


class MaintenanceSchedule(_Request, frozen=True, kw_only=True):
    start_ms: int | None = None
    #: Start relative to the master's clock, in ms (`--in 2h`); exactly one of the two is set.
    in_ms: int | None = None
    duration_ms: int
    #: Filled in by the worker that forwards the request: the node it is for.
    node_id: str = ""


class MaintenanceCheck(_Request, frozen=True, kw_only=True):
    start_ms: int | None = None
    in_ms: int | None = None
    duration_ms: int
    node_id: str = ""


class MaintenanceCancel(_Request, frozen=True, kw_only=True):
    window_id: str = ""
    node_id: str = ""


class MaintenanceFinish(_Request, frozen=True, kw_only=True):
    window_id: str = ""
    node_id: str = ""


class MaintenanceNext(_Request, frozen=True, kw_only=True):
    node_id: str = ""


Request = (
    StatusRequest
    | SessionCreate
    | SessionDelete
    | SessionList
    | NodeRemove
    | MaintenanceSchedule
    | MaintenanceCheck
    | MaintenanceCancel
    | MaintenanceFinish
    | MaintenanceNext
)


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    """`ok` false means refused; `message` says why in words; `data` carries the answer."""

    ok: bool
    message: str = ""
    data: Any = None


_request_decoder = msgspec.json.Decoder(Request)
_reply_decoder = msgspec.json.Decoder(Reply)
_encoder = msgspec.json.Encoder()

Handler = Callable[[Request], Awaitable[Reply]]


class ControlError(Exception):
    """The control socket could not be reached or answered nonsense."""


class SocketInUseError(Exception):
    """Something answers on the control socket `serve` was to bind: another master or worker
    runs with this data directory. The text is one line naming the socket."""


def encode_message(message: Request | Reply) -> bytes:
    return _encoder.encode(message)


def decode_request(data: bytes) -> Request | Reply:
    """A request from JSON, or a refusal `Reply` naming what was wrong with it."""
    try:
        request: Request = strict_decode(_request_decoder.decode, data)
    except msgspec.DecodeError as exc:
        return Reply(ok=False, message=f"bad request: {exc}")
    return request


def check_request(request: object) -> Request:
    """`request` as the control socket would have decoded it, for requests built in Python
    (`MasterNode.request`): raises `TypeError` naming the type of anything that is not a
    request of this module, `ValueError` naming the field whose value has the wrong type
    (``SessionCreate(slots="2", ...)``), where either used to fail deep inside or be
    misread as another request."""
    if not isinstance(request, _Request):
        raise TypeError(
            "expected a request of cluster.control (SessionCreate, MaintenanceSchedule, ...), "
            f"got {type(request).__name__}"
        )
    name = type(request).__name__
    try:
        # The same checks as decoding it from JSON: builtins, then the strict typed union.
        checked: Request = msgspec.convert(msgspec.to_builtins(request), Request)
    except TypeError as exc:  # a field holds something no request could carry
        raise TypeError(f"bad {name}: {exc}") from None
    except msgspec.ValidationError as exc:
        raise ValueError(f"bad {name}: {exc}") from None
    return checked


def decode_reply(data: bytes) -> Reply:
    try:
        reply: Reply = strict_decode(_reply_decoder.decode, data)
    except msgspec.DecodeError as exc:
        raise ControlError(f"the answer is not a reply: {exc}") from exc
    return reply


def socket_path(data_dir: Path) -> Path:
    return data_dir / SOCKET_NAME


class FrameTooLarge(Exception):
    """A control frame announced more than MAX_FRAME bytes."""


async def _read_frame(stream: anyio.abc.ByteStream) -> bytes:
    header = b""
    while len(header) < 4:
        chunk = await stream.receive(4 - len(header))
        header += chunk
    (length,) = _LEN.unpack(header)
    if length > MAX_FRAME:
        raise FrameTooLarge(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    body = bytearray()
    while len(body) < length:
        body += await stream.receive(length - len(body))
    return bytes(body)


async def _write_frame(stream: anyio.abc.ByteStream, payload: bytes) -> None:
    await stream.send(_LEN.pack(len(payload)) + payload)


#: How long a client has to send its whole request.
_REQUEST_TIMEOUT_S = 10


def _why_dropped(exc: Exception) -> str:
    """What happened to a dropped control connection, for its log line. Said for each kind:
    EndOfStream and BrokenResourceError carry no text at all (the line read "dropped: ")."""
    if isinstance(exc, anyio.EndOfStream):
        return "the client closed it before sending a whole request"
    if isinstance(exc, anyio.BrokenResourceError):
        cause = exc.__cause__  # anyio wraps the OSError that says how
        return f"the client went away ({cause or type(exc).__name__})"
    if isinstance(exc, TimeoutError):
        return f"no whole request within {_REQUEST_TIMEOUT_S} s"
    return str(exc) or type(exc).__name__


async def serve(data_dir: Path, handler: Handler, *, task_status: Any = None) -> None:
    """Serve control requests on `data_dir/control.sock` until cancelled."""
    path = socket_path(data_dir)
    await _clear_stale_socket(path, data_dir)
    listener = await anyio.create_unix_listener(path)
    # Which file is ours: on exit only that one is removed. A process that took the path
    # over since (or its replacement after a restart) keeps its socket.
    bound = os.lstat(path)
    os.chmod(path, 0o600)

    async def one(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(_REQUEST_TIMEOUT_S):
                    raw = await _read_frame(stream)
                request = decode_request(raw)
                reply = request if isinstance(request, Reply) else await handler(request)
                payload = _encoder.encode(reply)
                if len(payload) > MAX_FRAME:  # the client would refuse it: say why instead
                    payload = _encoder.encode(
                        Reply(
                            ok=False,
                            message=f"the answer takes {len(payload):,} bytes, over the "
                            f"{MAX_FRAME:,}-byte limit of a control reply; ask for less "
                            "(or use the HTTP API)",
                        )
                    )
                await _write_frame(stream, payload)
            except (
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                TimeoutError,
                FrameTooLarge,
            ) as exc:
                log.info("control connection dropped: %s", _why_dropped(exc))
            except OSError as exc:
                # The disk refused something (a commit: the master stops, after saying so
                # in one line of its own): one line here too, not a traceback.
                log.warning("control request failed: %s", exc)
                with contextlib.suppress(Exception):
                    reply = Reply(ok=False, message=f"the master could not do it: {exc}")
                    await _write_frame(stream, _encoder.encode(reply))
            except Exception:  # the server must keep serving whatever a handler does
                log.exception("control request failed")
                with contextlib.suppress(Exception):
                    await _write_frame(
                        stream, _encoder.encode(Reply(ok=False, message="internal error"))
                    )

    try:
        async with listener:
            if task_status is not None:
                task_status.started(path)
            await listener.serve(one)
    finally:
        _unlink_if_same(path, bound)


#: How long `serve` waits for a connect to an existing socket before deciding that something
#: listens there (a listener too busy to accept is still a listener).
_PROBE_TIMEOUT_S = 2.0


async def _clear_stale_socket(path: Path, data_dir: Path) -> None:
    """Remove what a process that died left at `path`; `SocketInUseError` if a live process
    listens there. Unlinking it unconditionally (as binding used to) took the socket from a
    running master or worker: its `cluster session` / `cluster maintenance` commands then
    found no socket, and its exit removed the newcomer's."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(mode):
        try:
            with anyio.fail_after(_PROBE_TIMEOUT_S):
                stream = await anyio.connect_unix(path)
        except ConnectionRefusedError:
            pass  # nothing listens: left by a process that stopped
        except TimeoutError:
            raise SocketInUseError(_in_use(path, data_dir)) from None
        else:
            await stream.aclose()
            raise SocketInUseError(_in_use(path, data_dir))
    path.unlink(missing_ok=True)


def _in_use(path: Path, data_dir: Path) -> str:
    return (
        f"{path} answers: another master or worker is running with --data-dir {data_dir} "
        "(each process needs a data directory of its own)"
    )


def _unlink_if_same(path: Path, bound: os.stat_result) -> None:
    try:
        now = path.lstat()
    except FileNotFoundError:
        return
    if (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            # A disk gone read-only: a stop must still end (the next start clears a socket
            # nothing listens on, `_clear_stale_socket`).
            log.warning("could not remove control socket %s: %s", path, exc.strerror or exc)


async def call(data_dir: Path, request: Request, *, timeout: float = 30.0) -> Reply:
    """Send one request to the process whose data directory is `data_dir`.

    Every way it can fail is a ControlError whose text is one line naming the socket.
    """
    path = socket_path(data_dir)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:  # a --data-dir that is a file, or not readable
        raise ControlError(f"cannot use {path}: {exc.strerror or exc}") from exc
    if mode is None:
        raise ControlError(
            f"no control socket at {path}: "
            f"is a master or worker running with --data-dir {data_dir}?"
        )
    if not stat.S_ISSOCK(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a file"
        raise ControlError(not_a_control_socket(path, f"it is {kind}, not a socket"))
    try:
        with anyio.fail_after(timeout):
            async with await anyio.connect_unix(path) as stream:
                await _write_frame(stream, _encoder.encode(request))
                raw = await _read_frame(stream)
    except TimeoutError as exc:
        raise ControlError(f"{path} did not answer within {timeout:.0f}s") from exc
    except ConnectionRefusedError as exc:
        raise ControlError(
            f"nothing listens on {path} (left by a process that stopped?): "
            f"is a master or worker running with --data-dir {data_dir}?"
        ) from exc
    except anyio.EndOfStream as exc:
        raise ControlError(
            not_a_control_socket(path, "it closed the connection without answering")
        ) from exc
    except FrameTooLarge as exc:
        raise ControlError(
            not_a_control_socket(path, f"its answer is not a control frame ({exc})")
        ) from exc
    except anyio.BrokenResourceError as exc:  # reset or closed, reading or writing
        raise ControlError(
            not_a_control_socket(path, "it dropped the connection without answering")
        ) from exc
    except OSError as exc:
        raise ControlError(f"cannot talk to {path}: {exc.strerror or exc}") from exc
    try:
        return decode_reply(raw)
    except ControlError as exc:
        raise ControlError(not_a_control_socket(path, str(exc))) from exc


def not_a_control_socket(path: Path, why: str) -> str:
    """The one line for a `control.sock` where something else than our server answers."""
    return f"{path} is not a cluster control socket: {why}"


def call_sync(data_dir: Path, request: Request, *, timeout: float = 30.0) -> Reply:
    """Blocking form for CLI commands."""
    result: list[Reply] = []

    async def main() -> None:
        result.append(await call(data_dir, request, timeout=timeout))

    anyio.run(main, backend="trio")
    return result[0]
