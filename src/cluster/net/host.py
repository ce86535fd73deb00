"""The one place that builds and drives a py-libp2p host, with its pitfalls handled.

- Noise only: libp2p's default also accepts plaintext, TLS and secio.
- `max_connections_per_peer=1`: the default of 3 makes every connect wait >= 250 ms.
- mDNS off; loopback (or given) addresses exchanged explicitly.
- Every redial unblocks the peer first (a failed dial blocks redials for 60 s).
- Every connect, new_stream and read that waits on a peer has a deadline (hung peers are
  invisible to libp2p itself).
- `host.close()` before leaving `host.run()` (leaving run does not close connections).
- An inbound connection gives back its slot when it closes (`_free_inbound_slots_on_close`):
  py-libp2p 0.8.1 holds each one until the whole host stops, so after 300 connections in a
  master's lifetime -- workers redialling, restarting -- it refused every new one.
- Connection caps far above any cluster (`MAX_CONNECTIONS`): the defaults (300) pruned a
  master's connections down to the low watermark once more than 300 workers were connected.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from contextvars import ContextVar
from typing import Any, Final

import anyio
import multiaddr
from libp2p import new_host
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.network.exceptions import SwarmDialAllFailedError
from libp2p.network.stream.exceptions import StreamReset
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.exceptions import MuxedStreamReset
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from cluster.net.framing import DEFAULT_MAX_FRAME, FrameError, FrameReader, encode_frame
from cluster.net.protocol import ErrorMsg, Message, Msg, ProtocolError, decode, encode
from cluster.shared.humanize import error_text

log = logging.getLogger(__name__)

# Yamux's receiver by default answers nearly every read with a WINDOW_UPDATE frame: one more
# encrypted write and one more read per message, each costing ~0.1 ms of Python on this
# kind of machine. Off, it sends them once half the window is consumed (go-yamux's rule).
os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")

#: Allocations between young-generation collections in a node process (CPython: 700).
GC_YOUNG_THRESHOLD = 50_000

StreamHandler = Callable[["FramedStream"], Awaitable[None]]


class AddressError(ValueError):
    """A multiaddr given on the command line or in a file is not usable."""


class NotLibp2pPort(Exception):
    """The dialled port answered, but as an HTTP server does, not as a libp2p peer."""


#: An HTTP server's answer as py-libp2p's multistream parser reports it: the status line's
#: first byte ("H") read as a length prefix (`msg_bytes`=b'TTP/1.1 400 Bad Request...'),
#: or a part of the HTML error page that came with it.
_HTTP_ANSWER = re.compile(r"TTP/\d|<?!doctype html|<html", re.IGNORECASE)


def tune_gc() -> None:
    """Garbage-collector settings for a node process that streams events (idempotent).

    Decoding a frame allocates thousands of objects, so CPython's default (a collection
    every 700 allocations, each older one walking the whole heap) spent about as long
    collecting as decoding. The startup heap (libp2p and its dependencies, the loaded
    state) is frozen out of collections, and young collections run 70x less often; memory
    stays bounded because collections still run, just in larger steps.
    """
    if gc.get_threshold()[0] < GC_YOUNG_THRESHOLD:
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 100)


def parse_multiaddr(text: str, *, need_peer: bool = False) -> Any:
    try:
        addr = multiaddr.Multiaddr(text.strip())
    except Exception as exc:
        raise AddressError(f"{text!r} is not a valid multiaddr: {exc}") from exc
    if need_peer:
        try:
            info_from_p2p_addr(addr)
        except Exception as exc:
            raise AddressError(
                f"{text!r} does not end in /p2p/<peer id> (the master's full address "
                "as it prints it on start)"
            ) from exc
    return addr


def names_a_protocol(text: str) -> bool:
    """Does `text` start like a multiaddr (/ip4/..., /dns/...), not like a file path?"""
    first = text.strip().lstrip("/").split("/", 1)[0]
    try:
        multiaddr.protocols.protocol_with_name(first)
    except Exception:
        return False
    return True


#: Protocols that name a host to resolve. py-libp2p listens on every interface for them (its
#: TCP listener finds no IP in the address), whatever the name resolves to.
_NAME_PROTOCOLS = frozenset({"dns", "dns4", "dns6", "dnsaddr"})

#: The shapes a listen address may have: an interface address and a TCP port, nothing more.
_LISTEN_SHAPES = (["ip4", "tcp"], ["ip6", "tcp"])


def parse_listen_multiaddr(text: str) -> Any:
    """A multiaddr to listen on: /ip4/ADDR/tcp/PORT or /ip6/ADDR/tcp/PORT, nothing else.

    TCP is the only transport the hosts run (libp2p would only log a warning for another
    and listen on nothing). A host name (/dns4/localhost/...) made py-libp2p listen on every
    interface, past the port check, and a /p2p/ part was ignored; any other trailing part
    (/ws, /tls) is ignored or refused by py-libp2p with only a log line.
    """
    addr = parse_multiaddr(text)
    shown = text.strip()
    names = [p.name for p in addr.protocols()]
    named = next((n for n in names if n in _NAME_PROTOCOLS), None)
    if named is not None:
        raise AddressError(
            f"cannot listen on {shown}: /{named} names a host, but a listen address names an "
            "interface: use /ip4/ADDR or /ip6/ADDR (e.g. /ip4/127.0.0.1/tcp/7400, or "
            "/ip4/0.0.0.0/tcp/7400 for every interface)"
        )
    if "p2p" in names:
        raise AddressError(
            f"cannot listen on {shown}: a listen address takes no /p2p part: the peer id "
            "comes from the node key (node.key in the data directory)"
        )
    if "tcp" not in names:
        raise AddressError(
            f"cannot listen on {shown}: not a TCP address (e.g. /ip4/0.0.0.0/tcp/7400)"
        )
    if names not in _LISTEN_SHAPES:
        raise AddressError(
            f"cannot listen on {shown}: expected /ip4/ADDR/tcp/PORT or /ip6/ADDR/tcp/PORT "
            "(e.g. /ip4/0.0.0.0/tcp/7400)"
        )
    return addr


def _check_can_listen(addr: Any) -> None:
    """Raise AddressError, saying why, if `addr` (from `parse_listen_multiaddr`) cannot be
    listened on: a fixed port taken, an address no interface of this machine has.

    py-libp2p only logs why a listen failed. And it binds with SO_REUSEPORT, so a second
    master on a taken port would share it silently. Port 0 (any free port) is probed too:
    its bind fails as py-libp2p's would for an address that is not this machine's.
    """
    family = socket.AF_INET6 if addr.protocols()[0].name == "ip6" else socket.AF_INET
    host = addr.value_for_protocol("ip6" if family == socket.AF_INET6 else "ip4")
    port = int(addr.value_for_protocol("tcp"))
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR (not REUSEPORT): a port only in TIME_WAIT is free, a listening one not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRNOTAVAIL:
            reason += f" (no interface of this machine has the address {host})"
        raise AddressError(f"cannot listen on {addr}: {reason}") from None
    finally:
        probe.close()


def peer_of(addr: Any) -> Any:
    """The libp2p peer ID named by a full /p2p/ multiaddr."""
    return info_from_p2p_addr(addr).peer_id


#: Connections a host holds at most, and above which py-libp2p's pruner starts closing them
#: (its defaults: 300 each, below the 10,000 workers a master is built for). The bound that
#: counts is the process's open-file limit (`ulimit -n`): a socket per worker.
MAX_CONNECTIONS: Final = 1_000_000


def build_host(key_pair: Any) -> Any:
    muxers: Any = {YAMUX_PROTOCOL_ID: Yamux}
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt=muxers,
        # One connection per peer (the default 3 costs >= 250 ms per connect); no background
        # auto-dialling to keep a minimum of connections: the master never dials workers.
        connection_config=ConnectionConfig(
            max_connections_per_peer=1,
            min_connections=0,
            low_watermark=0,
            high_watermark=MAX_CONNECTIONS,
            max_connections=MAX_CONNECTIONS,
        ),
        enable_mDNS=False,
        enable_upnp=False,
    )
    _free_inbound_slots_on_close(host.get_network())
    return host


class _InboundConnectionClosed(Exception):
    """Ends py-libp2p's handler of an inbound connection once that connection has closed."""


#: Set in the task that handles one inbound connection (`_free_inbound_slots_on_close`).
_HANDLING_INBOUND: ContextVar[bool] = ContextVar("_HANDLING_INBOUND", default=False)


def _free_inbound_slots_on_close(swarm: Any) -> None:
    """Make py-libp2p's inbound-connection handler end when its connection closes.

    The handler takes a slot of the swarm's inbound limiter, upgrades the connection, then
    waits for the whole swarm to stop before it gives the slot back: every connection a
    master ever accepted kept a slot (and its handler task), and once the 300 were taken
    it refused everyone, members and strangers alike. Here the upgrade, when the handler
    calls it, waits for the connection to close and then raises: the handler's own error
    path closes the (closed) raw connection, and its `finally` gives the slot back. Other
    callers of the upgrade (none in this project) are left as they were."""
    handle = swarm._do_handle_inbound_connection
    upgrade = swarm.upgrade_inbound_raw_conn

    async def handle_inbound(*args: Any, **kwargs: Any) -> Any:
        _HANDLING_INBOUND.set(True)  # this task's context only (trio copies it per task)
        return await handle(*args, **kwargs)

    async def upgrade_then_wait_for_close(raw_conn: Any, maddr: Any) -> Any:
        muxed = await upgrade(raw_conn, maddr)
        closed = getattr(muxed, "event_closed", None)
        if not _HANDLING_INBOUND.get() or closed is None:
            return muxed
        await closed.wait()
        raise _InboundConnectionClosed()

    swarm._do_handle_inbound_connection = handle_inbound
    swarm.upgrade_inbound_raw_conn = upgrade_then_wait_for_close


@asynccontextmanager
async def running_host(key_pair: Any, listen: list[str] | None = None) -> AsyncIterator[Any]:
    """A started host (listening on `listen`, or on nothing for a pure dialer).

    Raises AddressError when a listen address cannot be had: libp2p only logs that, and it
    binds with SO_REUSEPORT, so a second master on a taken port would share it silently
    (the kernel spreading workers' connections between the two).
    """
    host = build_host(key_pair)
    addrs = [parse_listen_multiaddr(a) for a in (listen or [])]
    for addr in addrs:
        _check_can_listen(addr)
    async with host.run(listen_addrs=addrs):
        if addrs and not host.get_addrs():
            raise AddressError(f"cannot listen on {', '.join(map(str, addrs))}")
        # The swarm's auto-connector redials any peer in the peerstore to keep a minimum of
        # connections; in a star where workers dial and the master never does, it only adds
        # surprise dials, so it is stopped.
        auto_connector = getattr(host.get_network(), "auto_connector", None)
        if auto_connector is not None:
            await auto_connector.stop()
        try:
            yield host
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await host.close()


def peer_id_str(stream: Any) -> str:
    return str(stream.muxed_conn.peer_id.to_base58())


def full_addrs(host: Any) -> list[str]:
    return [str(a) for a in host.get_addrs()]


async def dial(host: Any, addr: Any, timeout: float) -> Any:
    """Connect to the peer at a full /p2p/ multiaddr; returns its peer id (libp2p ID)."""
    info = info_from_p2p_addr(addr)
    network = host.get_network()
    if hasattr(network, "unblock_peer"):
        network.unblock_peer(info.peer_id)
    if not network.get_connections(info.peer_id):
        # py-libp2p dials one TCP address per peer, the first its peerstore knows: an
        # address dialled before (the master's old port) would be tried forever, never
        # the one given now (the master restarted on a new port).
        host.get_peerstore().clear_addrs(info.peer_id)
    with anyio.fail_after(timeout):
        await host.connect(info)
    return info.peer_id


def dial_failure(exc: BaseException) -> BaseException:
    """What a failed dial comes down to: for py-libp2p's "unable to connect to <peer>, no
    addresses established a successful connection", the innermost cause of its last attempt
    (`ConnectionRefusedError: [Errno 111] ...`, or `PeerIDMismatchesPubkey: ...` when the
    multiaddr names the wrong peer id); any other error as it is, except an answer that
    reads like an HTTP server's: `NotLibp2pPort`, saying so. The logs say that instead of
    py-libp2p's own ERROR lines per attempt, which the commands hide."""
    if not isinstance(exc, SwarmDialAllFailedError):
        return exc
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        errors = getattr(exc, "errors", None)  # libp2p's MultiError: one per address tried
        if isinstance(errors, list | tuple) and errors and isinstance(errors[-1], BaseException):
            exc = errors[-1]
        elif isinstance(exc, BaseExceptionGroup):  # trio's "all attempts to connect failed"
            exc = exc.exceptions[-1]
        elif exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            break
    if _HTTP_ANSWER.search(str(exc)):
        return NotLibp2pPort(
            "it answers like an HTTP server, not a libp2p port: is it the master's --http "
            "port? the worker needs the address `cluster master` prints, or its master.addr"
        )
    return exc


async def open_stream(host: Any, peer_id: Any, protocol: str, timeout: float) -> FramedStream:
    with anyio.fail_after(timeout):
        stream = await host.new_stream(peer_id, [protocol])
    return FramedStream(stream)


class FramedStream:
    """A libp2p stream speaking our framed messages."""

    def __init__(self, stream: Any, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self._reader = FrameReader(stream.read, max_frame)
        self.peer_id = peer_id_str(stream)
        #: Writes in progress, and the scopes `cancel_between_frames` is to cancel once they
        #: have ended.
        self._writing = 0
        self._cancel_after_write: list[anyio.CancelScope] = []

    async def recv(self, timeout: float, max_frame: int | None = None) -> Message:
        """Next message; TimeoutError when the peer is silent, EOFError at its end.
        `max_frame` lowers the frame limit for this message (FrameTooLarge beyond it)."""
        with anyio.fail_after(timeout):
            frame = await self._reader.read_frame(max_frame)
        return decode(frame)

    async def recv_frame(self, timeout: float, max_frame: int | None = None) -> bytes:
        with anyio.fail_after(timeout):
            return await self._reader.read_frame(max_frame)

    async def send(self, msg: Msg, timeout: float) -> None:
        await self.send_bytes(encode_frame(encode(msg), self.max_frame), timeout)

    async def send_bytes(self, data: bytes, timeout: float) -> None:
        # A cancellation `cancel_between_frames` made after the last write lands here,
        # before any byte of this one is written.
        await anyio.lowlevel.checkpoint_if_cancelled()
        self._writing += 1
        try:
            with anyio.fail_after(timeout):
                await self.stream.write(data)
        finally:
            self._writing -= 1
            if not self._writing:
                scopes, self._cancel_after_write = self._cancel_after_write, []
                for scope in scopes:
                    scope.cancel()

    def cancel_between_frames(self, scope: anyio.CancelScope) -> None:
        """Cancel `scope` (one this stream's writer runs in) now if no write is in
        progress, else as soon as the write in progress has ended (bounded by its timeout).

        A write cancelled midway leaves part of a frame on the stream, and the peer reads
        what comes next -- the `ErrorMsg` saying why the stream ends -- as the rest of it:
        a frame cut short, which it can only take for a network fault."""
        if self._writing:
            self._cancel_after_write.append(scope)
        else:
            scope.cancel()

    async def fail(self, code: str, message: str) -> None:
        """Tell the peer what was wrong, then reset the stream. Never raises.

        The message is followed by a half-close (FIN) before the reset: py-libp2p's yamux
        drops the data a peer has not read yet when a reset arrives, unless a FIN came
        before it, so a reset right behind the message could take the message with it."""
        with anyio.CancelScope(shield=True):
            with suppress(Exception):
                await self.send(ErrorMsg(code=code, message=message), timeout=1.0)
                with anyio.move_on_after(1.0):
                    await self.stream.close_write()
            await self.reset()

    async def reset(self) -> None:
        with anyio.CancelScope(shield=True):
            try:
                with anyio.move_on_after(1.0):
                    await self.stream.reset()
            except Exception:
                pass

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            try:
                with anyio.move_on_after(1.0):
                    await self.stream.close()
            except Exception:
                pass


def ended_by_peer(exc: BaseException) -> bool:
    """Did the stream end under us, reset or closed by the peer, with no message saying why
    (rather than a timeout or bad input)? Also what a dead connection's streams raise."""
    return isinstance(exc, (StreamReset, MuxedStreamReset, EOFError))


def error_of(exc: BaseException, waiting_for: str = "", timeout: float = 0.0) -> tuple[str, str]:
    """(code, message) to send to a peer whose input raised `exc`.

    For a `TimeoutError`, `waiting_for` and `timeout` say what did not arrive in time.
    """
    if isinstance(exc, TimeoutError):
        return "timeout", f"no {waiting_for or 'answer'} within {timeout:g} s"
    if isinstance(exc, ProtocolError):
        return exc.code, str(exc)
    if isinstance(exc, FrameError):
        code = type(exc).__name__
        return {"FrameTooLarge": "too-large", "TruncatedFrame": "truncated"}.get(
            code, "malformed"
        ), str(exc)
    return "internal", error_text(exc)


def safe_handler(handler: StreamHandler, name: str) -> Callable[[Any], Awaitable[None]]:
    """Wrap a handler so nothing escapes into libp2p (an escaping error kills the host)."""

    async def run(stream: Any) -> None:
        framed: FramedStream | None = None
        try:
            framed = FramedStream(stream)
            await handler(framed)
        except anyio.get_cancelled_exc_class():
            if framed is not None:
                await framed.reset()
            raise
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            # A peer that goes away mid-stream is ordinary churn, not a fault of ours.
            level = logging.INFO if _is_disconnect(exc) else logging.WARNING
            log.log(level, "%s handler ended: %s", name, error_text(exc))
            if framed is not None:
                await framed.reset()

    return run


def _is_disconnect(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_disconnect(e) for e in exc.exceptions)
    return isinstance(exc, EOFError | TimeoutError) or type(exc).__name__ in {
        "StreamReset",
        "StreamEOF",
        "StreamClosed",
        "StreamError",
        "MuxedStreamError",
        "MuxedStreamReset",
        "MuxedStreamEOF",
    }
