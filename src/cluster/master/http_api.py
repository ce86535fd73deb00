"""The master's read-only HTTP API: state, status, a live event stream, metrics, dashboard.

    GET /              the dashboard (one self-contained page)
    GET /api/state     State as JSON (`codec.state_to_json`: maps as objects with sorted
                       keys, node marks keyed by node id)
    GET /api/status    `ClusterStatus` as JSON (what `cluster status` renders)
    GET /api/events    server-sent events: indexed events as JSON from ?from=N, then live
    GET /metrics       Prometheus text format

HTTP/1.1 parsing is h11's (a sans-IO parser already installed with libp2p): it enforces
header size limits and rejects malformed framing, so this module only routes and answers.
One request per connection (`Connection: close`): clients are a dashboard and scrapers, and
it keeps the server free of idle keep-alive connections. HEAD is answered like GET, headers
only (what a monitor probing the API expects): the body is built and dropped, so a HEAD gets
the status and Content-Length a GET would (RFC 9110 9.3.2), a 500 included.

Safety: it binds 127.0.0.1 by default and then needs no token (but checks the Host header,
so a web page cannot reach it through DNS rebinding). Binding any other address requires a
token, refused at startup otherwise; with a token every request must carry it as
``Authorization: Bearer <token>`` or ``?token=<token>`` (EventSource cannot set headers).
Nothing a client sends can crash the server: every connection is handled in its own task
that catches and logs, and is bounded in time and memory. A client has `request_timeout_s`
(3 s) to send its request head and may hold at most `max_connections_per_client` of the
`max_connections` at once, so one slow or greedy client cannot lock the others out; and a
connection arriving at the cap closes the one that has waited longest for its request head
(`_evict_slowest`), so slow clients from many addresses cannot lock them out either. The
bodies it builds, held until a (possibly slow) client has read them, share one budget
(`body_budget_bytes`, see `body_budget`): past it a request waits a little, then gets 503. An
internal error is answered `500` with a one-line reason (and logged once, with its
traceback) while the response has not started.

The API reads the cluster through `ClusterView`, a small Protocol the master shell
(`server.Master`) implements and tests fake in memory. A program embedding a `MasterNode` gets
its API from `MasterNode.http_api`, which passes the master and its policy's credit grant.
"""

from __future__ import annotations

import ast
import errno
import hmac
import importlib.resources
import ipaddress
import logging
import math
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final, Protocol
from urllib.parse import parse_qs

import anyio
import h11
from anyio.abc import SocketAttribute, SocketStream, TaskStatus

from cluster.master.body_budget import BodyBudget, BudgetFull, Hold
from cluster.master.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from cluster.master.metrics import MasterMetrics, render_prometheus
from cluster.shared.codec import event_json, state_to_json
from cluster.shared.events import IndexedEvent
from cluster.shared.humanize import clip, error_text, printable
from cluster.shared.node_status import DEFAULT_CATCH_UP_THRESHOLD, node_statuses
from cluster.shared.state import State
from cluster.shared.status_view import cluster_status, to_json

log = logging.getLogger(__name__)

#: The port `cluster master` serves the API on unless told otherwise (and `cluster status`
#: asks by default).
DEFAULT_PORT: Final = 8470
#: Shortest token accepted: anything shorter is guessable.
MIN_TOKEN_LENGTH: Final = 16


class ClusterView(Protocol):
    """What the HTTP API needs from the master (and what a test fakes in memory)."""

    @property
    def state(self) -> State:
        """The current folded state (immutable, so safe to read from a worker thread)."""
        ...

    def now_ms(self) -> int:
        """The master's clock, for "in 4m 12s" messages."""
        ...

    async def wait_for_index(self, idx: int) -> None:
        """Return once the log's last index is at least `idx`."""
        ...

    async def read_events(self, from_idx: int, limit: int) -> Sequence[IndexedEvent]:
        """Up to `limit` consecutive indexed events starting at `from_idx` (fewer, or none,
        at the end of the log)."""
        ...

    def metrics(self) -> MasterMetrics:
        """The master's own measurements (log size, plan cycle time, catch-up lag...)."""
        ...


#: What `HttpApi` reads of its view (checked at construction: a wrong object, such as a
#: `MasterNode` instead of its `master`, answered every /api/status with 500).
_VIEW_MEMBERS: Final = ("state", "now_ms", "wait_for_index", "read_events", "metrics")


def check_view(view: object) -> None:
    """Refuse an object that is not a `ClusterView`, naming what it lacks."""
    missing = [name for name in _VIEW_MEMBERS if not hasattr(view, name)]
    if missing:
        raise TypeError(
            f"HttpApi needs a ClusterView ({', '.join(_VIEW_MEMBERS)}); a "
            f"{type(view).__name__} has no {', '.join(missing)}: for a MasterNode use "
            "`node.http_api(config)` (or serve it with `MasterNodeConfig(http=...)`)"
        )


class HttpApiConfigError(ValueError):
    """The HTTP API cannot start with this configuration; the text says why and what to do,
    naming `HttpApiConfig` fields (what a program embedding the API sets).
    `command_line` says the same naming `cluster master` flags, for the CLI to print: a
    program was told to use `--http 127.0.0.1:0`, which it has no way to pass."""

    def __init__(self, message: str, command_line: str | None = None) -> None:
        super().__init__(message)
        self.command_line = command_line if command_line is not None else message


@dataclass(frozen=True)
class HttpApiConfig:
    host: str = "127.0.0.1"
    #: 0 picks a free port (reported by `HttpApi.serve` through task_status).
    port: int = 0
    #: Required when `host` is not a loopback address; then required on every request.
    token: str | None = None
    #: Connections open at once. A new one beyond it closes the connection that has waited
    #: longest for its request head (408), or gets 503 if every connection is being answered.
    max_connections: int = 64
    #: Connections open at once from one client address (more get 503): one client cannot
    #: take every connection. Above `max_subscribers` by 8, so that with every event stream
    #: held from one address (on the default bind every local client shares 127.0.0.1:
    #: the dashboard's tabs, an ssh tunnel, Prometheus) /api/status and /metrics are still
    #: served. Behind a proxy every client shares the proxy's address.
    max_connections_per_client: int = 24
    #: Open /api/events streams at most; more get 503.
    max_subscribers: int = 16
    #: Bodies of /api/state, /api/status and /metrics built at once, each in a worker thread
    #: of the API's own (more wait their turn). Pure Python that holds the GIL, so more
    #: threads would not finish them sooner; and not anyio's default threads, which the
    #: master commits and reads its log on (40 requests held them all).
    max_renders: int = 2
    #: Bytes of those bodies held at once, from before each is built until its client has
    #: taken it all (`BodyBudget`: one path at most half of it). A slow reader holds its body
    #: for up to `send_timeout_s`: without a bound 64 of them held ~450 MB of /api/state at
    #: 10,000 nodes.
    body_budget_bytes: int = 64 * 2**20
    #: Time a request waits for room in `body_budget_bytes` before it gets 503.
    body_wait_s: float = 5.0
    #: Request line + headers, in bytes (h11 answers 431 beyond it).
    max_header_bytes: int = 16 * 1024
    #: Time a client has to send its whole request (a request line and headers, a few
    #: hundred bytes: 3 s is plenty), counted from the connection; a client that trickles
    #: it ties up a connection no longer than this.
    request_timeout_s: float = 3.0
    #: Time a client has to accept each write.
    send_timeout_s: float = 10.0
    #: An idle event stream gets a comment line this often (detects dead clients).
    keepalive_s: float = 15.0
    #: Events read and sent per batch: what one subscriber holds in memory at most.
    batch_events: int = 256
    catch_up_threshold: int = DEFAULT_CATCH_UP_THRESHOLD


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_config(config: HttpApiConfig) -> None:
    """Refuse a configuration that would expose the API or cannot work, with a clear reason."""
    if not 0 <= config.port <= 65535:
        raise HttpApiConfigError(f"HTTP API port {config.port} is not in 0..65535")
    if config.token is not None:
        if len(config.token) < MIN_TOKEN_LENGTH:
            raise HttpApiConfigError(
                f"HTTP API token is {len(config.token)} characters; use at least "
                f"{MIN_TOKEN_LENGTH}, e.g. from "
                "`python -c 'import secrets; print(secrets.token_urlsafe())'`"
            )
        if not config.token.isascii() or not config.token.isprintable() or " " in config.token:
            raise HttpApiConfigError("HTTP API token must be printable ASCII without spaces")
    elif not is_loopback(config.host):
        exposed = f"binding the HTTP API to {config.host!r} exposes it beyond this machine"
        clients = "clients then send `Authorization: Bearer <token>` or `?token=<token>`"
        raise HttpApiConfigError(
            f"{exposed}: set a token (`HttpApiConfig.token`; {clients}), or bind "
            "`host='127.0.0.1'`",
            f"{exposed}: set a token (`cluster master --http-token-file FILE`; {clients}), or "
            "bind 127.0.0.1",
        )
    for name in (
        "max_connections",
        "max_connections_per_client",
        "max_subscribers",
        "max_renders",
        "body_budget_bytes",
        "max_header_bytes",
        "batch_events",
    ):
        if getattr(config, name) < 1:
            raise HttpApiConfigError(f"HTTP API {name} must be at least 1")
    # Durations: NaN passes every comparison and anyio takes a negative one as "already
    # past", so a typo would answer every request with 408 or 503 instead of being named.
    for name, zero_ok in (
        ("request_timeout_s", False),
        ("send_timeout_s", False),
        ("keepalive_s", False),
        ("body_wait_s", True),  # 0: no wait for room, 503 at once
    ):
        value = getattr(config, name)
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            least = "0 or more" if zero_ok else "above 0"
            raise HttpApiConfigError(
                f"HTTP API {name} is {value!r}: use a number of seconds {least}"
            )


def load_dashboard() -> bytes:
    """The dashboard page, shipped as package data next to this module."""
    resource = importlib.resources.files("cluster.master").joinpath("dashboard.html")
    try:
        return resource.read_bytes()
    except FileNotFoundError:
        raise HttpApiConfigError(
            "cluster/master/dashboard.html is missing from the installed package"
        ) from None


class _ClientStalled(Exception):
    """The client did not accept a write within `send_timeout_s`. Its own type, not the
    `TimeoutError` the deadline raises: a `TimeoutError` from the master's side (a read that
    timed out, say) is an internal error like any other, answered 500 and logged."""


def _client_gone(exc: BaseException) -> bool:
    """The client hung up or stalled (possibly reported from inside a task group): normal
    for HTTP, so not worth an error in the log."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_client_gone(e) for e in exc.exceptions)
    return isinstance(exc, anyio.BrokenResourceError | anyio.ClosedResourceError | _ClientStalled)


class _Reject(Exception):
    """Answer the request with this status and message, then close."""

    def __init__(self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = tuple(headers)


_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

#: path -> query parameters it accepts (besides `token`).
_ROUTES: Final[dict[str, frozenset[str]]] = {
    "/": frozenset(),
    "/api/state": frozenset(),
    "/api/status": frozenset(),
    "/api/events": frozenset({"from"}),
    "/metrics": frozenset(),
}


def _is_event_index(text: str) -> bool:
    """ASCII digits only (`str.isdigit` also accepts "²" and other Unicode digits, which `int`
    refuses), and short enough to be an int64 index."""
    return text.isascii() and text.isdigit() and len(text) <= 18


#: Request headers the API reads that hold one value (Host is h11's to check), by their
#: lower-case name: a request carrying one twice is refused.
_SINGLE_VALUED: Final = {"authorization": "Authorization", "last-event-id": "Last-Event-ID"}

#: A refused request's body read and dropped before closing, at most (`HttpApi._linger`).
_LINGER_BYTES: Final = 1024 * 1024
_LINGER_S: Final = 2.0

#: Methods served; HEAD is GET without the body.
_METHODS: Final = ("GET", "HEAD")
_ALLOW: Final = ", ".join(_METHODS)


class _Request:
    __slots__ = ("headers", "path", "query")

    def __init__(self, path: str, query: dict[str, str], headers: dict[str, str]) -> None:
        self.path = path
        self.query = query
        self.headers = headers


class _Exchange:
    """One connection's parser and socket, and whether its request is a HEAD (whose every
    answer, an error included, must carry headers only: h11 refuses a body). While its
    request head is awaited, `waiting` is the scope that reads it (cancelled to evict it)."""

    __slots__ = ("conn", "evicted", "head", "since", "stream", "waiting")

    def __init__(self, conn: h11.Connection, stream: SocketStream) -> None:
        self.conn = conn
        self.stream = stream
        self.head = False
        self.since = anyio.current_time()
        self.waiting: anyio.CancelScope | None = None
        self.evicted = False


def _client_address(stream: SocketStream) -> str:
    """The client's IP address ("?" if the socket cannot say: one already reset by the
    client fails `getpeername`, and nothing here may raise outside the handler's guard)."""
    try:
        address = stream.extra(SocketAttribute.remote_address)
    except (anyio.TypedAttributeLookupError, OSError):
        return "?"
    return str(address[0]) if isinstance(address, tuple) else str(address)


#: A bytes literal as h11 quotes what it refused: `bytearray(b'GARBAGE')` or `b'X-A B'`.
_BYTES_REPR: Final = re.compile(
    r"""bytearray\((b'(?:[^'\\]|\\.)*'|b"(?:[^"\\]|\\.)*")\)|(b'(?:[^'\\]|\\.)*'|b"(?:[^"\\]|\\.)*")"""
)
#: The most characters of refused request text a 400 quotes.
_QUOTE_WIDTH: Final = 80


def _protocol_error(exc: h11.RemoteProtocolError) -> str:
    """h11's complaint with the bytes it quotes shown as text, printable and clipped: the
    body read "illegal request line: bytearray(b'GARBAGE')", a Python repr."""

    def as_text(match: re.Match[str]) -> str:
        literal = match.group(1) or match.group(2)
        try:
            raw = ast.literal_eval(literal)
        except (ValueError, SyntaxError):  # not a literal after all: leave it as h11 wrote it
            return match.group(0)
        # Latin-1: the bytes as the request sent them, one character each (as headers are read).
        return "'" + printable(clip(bytes(raw).decode("latin-1"), _QUOTE_WIDTH)) + "'"

    return _BYTES_REPR.sub(as_text, str(exc))


def _one_line(exc: BaseException, width: int = 200) -> str:
    """An error as one short line for a 500's body: its type and its message."""
    return clip(" ".join(error_text(exc).split()), width)


def _headers(content_type: str, length: int | None) -> list[tuple[str, str]]:
    """The headers of every answer but an event stream (Content-Length when known)."""
    return [
        ("Content-Type", content_type),
        *([("Content-Length", str(length))] if length is not None else []),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        ("Connection", "close"),
    ]


class HttpApi:
    """Serve the API for one `ClusterView`: ``port = await task_group.start(api.serve)``."""

    def __init__(
        self,
        view: ClusterView,
        config: HttpApiConfig | None = None,
        *,
        initial_credit_ms: int,
    ) -> None:
        """`initial_credit_ms`: the master's `MaintenancePolicy.initial_credit_ms`, which
        every node's credit balance in /api/status starts from. Required: a default of 0
        showed a fresh node with no credit where the master grants it 2 h."""
        check_view(view)
        self.view = view
        self.config = config or HttpApiConfig()
        #: The maintenance policy's starting grant, for each node's credit balance in status.
        self.initial_credit_ms = initial_credit_ms
        check_config(self.config)
        self._dashboard = load_dashboard()
        self.port = 0
        self._connections = 0
        #: Open connections by client address (entries dropped at zero).
        self._by_client: dict[str, int] = {}
        #: Connections still waiting for their request head, oldest first (a dict keeps
        #: insertion order): the ones `_evict_slowest` may close.
        self._awaiting_head: dict[_Exchange, None] = {}
        self.subscribers = 0
        self._renders = anyio.CapacityLimiter(self.config.max_renders)
        self.bodies = BodyBudget(self.config.body_budget_bytes)
        #: Status code -> responses sent (exported at /metrics).
        self.responses: dict[str, int] = {}

    async def serve(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        try:
            listener = await anyio.create_tcp_listener(local_host=cfg.host, local_port=cfg.port)
        except OSError as exc:
            failed = f"cannot listen for HTTP on {cfg.host}:{cfg.port}: {exc.strerror or exc}"
            if exc.errno != errno.EADDRINUSE:
                raise HttpApiConfigError(failed) from exc
            # Another master's, or a demo's.
            raise HttpApiConfigError(
                f"{failed}; `HttpApiConfig(port=0)` picks a free port (`HttpApi.serve` reports "
                "it, as `MasterNode.run` does in `Started.http_port`), `MasterNodeConfig(http="
                "None)` runs without the API",
                f"{failed}; `--http 127.0.0.1:0` picks a free port (written to "
                "<data-dir>/http.url), `--http off` runs without it",
            ) from exc
        async with listener:
            self.port = listener.extra(SocketAttribute.local_port)
            log.info("HTTP API listening on http://%s:%d/", cfg.host, self.port)
            task_status.started(self.port)
            await listener.serve(self._handle)

    # ------------------------------------------------------------------ connection
    async def _handle(self, stream: SocketStream) -> None:
        client = _client_address(stream)
        self._connections += 1
        self._by_client[client] = self._by_client.get(client, 0) + 1
        try:
            async with stream:
                await self._handle_connection(stream, client)
        except Exception as exc:
            if not _client_gone(exc):
                log.exception("HTTP API: unexpected error while serving a request")
        finally:
            self._connections -= 1
            left = self._by_client[client] - 1
            if left:
                self._by_client[client] = left
            else:
                del self._by_client[client]

    async def _handle_connection(self, stream: SocketStream, client: str) -> None:
        cfg = self.config
        ex = _Exchange(
            h11.Connection(h11.SERVER, max_incomplete_event_size=cfg.max_header_bytes), stream
        )
        target = "?"
        try:
            # The per-client cap first: a client over it must not close another's connection.
            if self._by_client[client] > cfg.max_connections_per_client:
                raise _Reject(
                    503,
                    f"too many connections from {client} "
                    f"(max {cfg.max_connections_per_client} per client)",
                )
            if self._connections > cfg.max_connections and not self._evict_slowest():
                raise _Reject(
                    503,
                    f"too many connections (max {cfg.max_connections}), "
                    "none waiting for its request",
                )
            request: _Request | None = None
            try:
                with anyio.move_on_after(cfg.request_timeout_s) as deadline:
                    ex.waiting = deadline
                    self._awaiting_head[ex] = None
                    try:
                        request = await self._read_request(ex)
                    finally:
                        self._awaiting_head.pop(ex, None)
                        ex.waiting = None
            except h11.RemoteProtocolError as exc:
                raise _Reject(
                    exc.error_status_hint, f"malformed request: {_protocol_error(exc)}"
                ) from None
            if ex.evicted:
                raise _Reject(
                    408,
                    f"request not complete after {anyio.current_time() - ex.since:.1f} s "
                    f"with the server at its connection cap ({cfg.max_connections}): the "
                    "connection that waited longest is closed to serve a new one",
                )
            if deadline.cancelled_caught:
                raise _Reject(
                    408, f"request not received in time (within {cfg.request_timeout_s:g} s)"
                )
            if request is None:
                return
            target = request.path
            await self._route(ex, request)
        except _Reject as rej:
            await self._answer(ex, rej.status, rej.message, rej.headers)
            await self._linger(ex)
        except Exception as exc:
            if _client_gone(exc):
                raise
            # A bug or a state nothing can render: say so to the client, which would
            # otherwise see the connection close without a word, and keep serving.
            log.exception("HTTP API: internal error answering %s", target)
            await self._answer(ex, 500, f"internal error ({_one_line(exc)})")

    def _evict_slowest(self) -> bool:
        """At the connection cap, close the connection that has waited longest for its
        request head, so a new one is served; False if none is waiting (all are answering).

        Why the oldest waiter: a real client sends its head as soon as it connects, so a
        connection still without one after the others is the likeliest to be a slow or
        silent client, and it has the least of its `request_timeout_s` left anyway. A new
        connection then lasts until `max_connections` later arrivals (if all of them are
        waiters) -- far longer than a client on any network takes to send its head -- so
        slow clients from many addresses, reconnecting as fast as they are closed, cannot
        keep an operator's `cluster status` out, as they could for 3 s at a time by holding
        every connection. Connections already being answered (an event stream, a response
        being written) are never closed for a newcomer."""
        oldest = next(iter(self._awaiting_head), None)
        if oldest is None:
            return False
        del self._awaiting_head[oldest]
        oldest.evicted = True
        if oldest.waiting is not None:
            oldest.waiting.cancel()  # its task answers 408 and closes
        return True

    async def _answer(
        self, ex: _Exchange, status: int, message: str, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        """A plain-text answer naming the problem, if the response has not started."""
        if ex.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = f"{status} {_REASONS.get(status, '')}: {message}\n".encode()
            await self._respond(ex, status, body, "text/plain; charset=utf-8", headers)

    @staticmethod
    async def _linger(ex: _Exchange) -> None:
        """After refusing a request whose body is still coming (a POST's, say), end the answer
        and drop up to `_LINGER_BYTES` of that body before closing: a socket closed with
        unread data sends a reset, and the client saw "connection reset" (or its upload
        fail) instead of the answer. Bounded in bytes and time, so it cannot hold the
        connection; a bigger body still gets the reset, after the answer."""
        if ex.conn.their_state is not h11.SEND_BODY:
            return
        with anyio.move_on_after(_LINGER_S):
            await ex.stream.send_eof()  # the client sees the answer end at once
            drained = 0
            while drained < _LINGER_BYTES:
                try:
                    drained += len(await ex.stream.receive(65536))
                except anyio.EndOfStream:
                    return

    async def _read_request(self, ex: _Exchange) -> _Request | None:
        """Read and validate one request; None if the client closed without sending one."""
        conn, stream = ex.conn, ex.stream
        received = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive(65536)
                except anyio.EndOfStream:
                    data = b""
                received += len(data)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                return None
            assert isinstance(event, h11.Request)  # h11: the first event of a request
            break
        # A HEAD is answered without a body, refusals included (a body sent on a HEAD
        # answer is h11's error): known before anything below may refuse it.
        ex.head = event.method == b"HEAD"
        # h11's limit bounds only a request still incomplete in its buffer: one that arrived
        # whole in a single read passes it at any size. What h11 has not consumed yet is not
        # part of this request's head.
        head_bytes = received - len(conn.trailing_data[0])
        if head_bytes > self.config.max_header_bytes:
            raise _Reject(
                431,
                f"request line and headers take {head_bytes} bytes, over the limit of "
                f"{self.config.max_header_bytes}",
            )
        headers: dict[str, str] = {}
        for k, v in event.headers:  # names come lower-cased from h11
            name = k.decode("latin-1")
            if name in headers and name in _SINGLE_VALUED:
                # Which one counts is a guess (a proxy in front may check the first): refuse.
                count = sum(1 for other, _ in event.headers if other == k)
                raise _Reject(400, f"header {_SINGLE_VALUED[name]} given {count} times")
            headers[name] = v.decode("latin-1")
        method = event.method.decode("ascii", "replace")
        if method not in _METHODS:
            raise _Reject(
                405,
                f"method {method} not allowed; this API is read-only ({_ALLOW})",
                [("Allow", _ALLOW)],
            )
        # h11 checked Content-Length is digits (one value): "00" is no body either.
        if int(headers.get("content-length", "0")) != 0 or "transfer-encoding" in headers:
            raise _Reject(400, f"a {method} request carries no body")
        target = event.target.decode("ascii", "replace")
        if not target.startswith("/"):
            raise _Reject(400, f"request target {target!r} must be a path starting with '/'")
        # Split by hand: a request target is a path and a query (RFC 9112 3.2.1). `urlsplit`
        # parses a URL, taking "//host/api/status" for a host and the path /api/status, and
        # dropping a "#fragment": both were served as another path than the one asked for.
        path, _, query_text = target.partition("?")
        try:
            raw = parse_qs(query_text, keep_blank_values=True, strict_parsing=bool(query_text))
        except ValueError as exc:
            raise _Reject(400, f"malformed query string: {exc}") from None
        query: dict[str, str] = {}
        for key, values in raw.items():
            if len(values) != 1:
                raise _Reject(400, f"query parameter {key!r} given {len(values)} times")
            query[key] = values[0]
        return _Request(path, query, headers)

    # ------------------------------------------------------------------ routing
    async def _route(self, ex: _Exchange, req: _Request) -> None:
        self._authorize(req)
        allowed = _ROUTES.get(req.path)
        if allowed is None:
            raise _Reject(
                404,
                f"no such path {req.path!r}; try /, /api/state, /api/status, "
                "/api/events?from=N or /metrics",
            )
        unknown = sorted(set(req.query) - allowed - {"token"})
        if unknown:
            raise _Reject(400, f"unknown query parameter {unknown[0]!r} for {req.path}")
        # A HEAD builds the body as a GET does (and `_respond` drops it): skipping it answered
        # 200 where GET would fail with 500, so a monitor probing with HEAD saw a healthy API.
        if req.path == "/":
            await self._respond(ex, 200, self._dashboard, "text/html; charset=utf-8")
        elif req.path == "/api/state":
            async with self._body_room(req.path) as hold:
                body = await anyio.to_thread.run_sync(
                    state_to_json, self.view.state, limiter=self._renders
                )
                hold.resize(len(body))
                await self._respond(ex, 200, body, "application/json")
        elif req.path == "/api/status":
            async with self._body_room(req.path) as hold:
                # Read the view here, in the event loop; derive and encode in a worker thread
                # (State is immutable), so a large cluster does not stall other clients.
                view = self.view
                body = await anyio.to_thread.run_sync(
                    self._status_json,
                    view.state,
                    view.now_ms(),
                    view.metrics(),
                    limiter=self._renders,
                )
                hold.resize(len(body))
                await self._respond(ex, 200, body, "application/json")
        elif req.path == "/metrics":
            async with self._body_room(req.path) as hold:
                view = self.view
                body = await anyio.to_thread.run_sync(
                    self._metrics_text,
                    view.state,
                    view.now_ms(),
                    view.metrics(),
                    limiter=self._renders,
                )
                hold.resize(len(body))
                await self._respond(ex, 200, body, METRICS_CONTENT_TYPE)
        else:
            await self._events(ex, req)

    @asynccontextmanager
    async def _body_room(self, path: str) -> AsyncIterator[Hold]:
        """Room in the body budget for one body of `path`, from before it is built until it
        is written (the dashboard is one shared constant, and errors are a line: neither
        needs room). No room within `body_wait_s`: 503, retry once slow readers have had
        their `send_timeout_s`."""
        cfg = self.config
        try:
            hold = await self.bodies.reserve(path, cfg.body_wait_s)
        except BudgetFull as exc:
            retry = str(math.ceil(cfg.send_timeout_s))
            raise _Reject(503, f"server busy: {exc}", [("Retry-After", retry)]) from None
        try:
            yield hold
        finally:
            hold.release()

    def _authorize(self, req: _Request) -> None:
        token = self.config.token
        if token is None:
            # Loopback without a token: only loopback Host names, against DNS rebinding.
            host = req.headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if host and not is_loopback(name):
                raise _Reject(403, f"Host {host!r} is not a loopback name; use 127.0.0.1")
            return
        given = req.query.get("token")
        auth = req.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[len("bearer ") :].strip()
        if given is None or not hmac.compare_digest(given.encode(), token.encode()):
            why = "missing" if given is None else "wrong"
            raise _Reject(
                401,
                f"token {why}: send `Authorization: Bearer <token>` or add ?token=<token>",
                [("WWW-Authenticate", 'Bearer realm="cluster"')],
            )

    def _status_json(self, state: State, now_ms: int, metrics: MasterMetrics) -> bytes:
        status = cluster_status(
            state,
            now_ms,
            events_behind=metrics.catch_up_lag_by_node,
            catch_up_threshold=self.config.catch_up_threshold,
            initial_credit_ms=self.initial_credit_ms,
        )
        return to_json(status)

    def _metrics_text(self, state: State, now_ms: int, metrics: MasterMetrics) -> bytes:
        statuses = node_statuses(
            state,
            now_ms,
            events_behind=metrics.catch_up_lag_by_node,
            catch_up_threshold=self.config.catch_up_threshold,
        )
        text = render_prometheus(
            metrics, statuses, sse_subscribers=self.subscribers, http_requests=dict(self.responses)
        )
        return text.encode()

    # ------------------------------------------------------------------ responses
    async def _send(self, ex: _Exchange, event: h11.Event) -> None:
        data = ex.conn.send(event)
        if data:
            await self._write(ex, data)

    async def _write(self, ex: _Exchange, data: bytes) -> None:
        """Send bytes; a client that does not take them within `send_timeout_s` has
        stalled (`_ClientStalled`, dropped without an error in the log)."""
        with anyio.move_on_after(self.config.send_timeout_s) as deadline:
            await ex.stream.send(data)
        if deadline.cancelled_caught:
            raise _ClientStalled(f"no write accepted within {self.config.send_timeout_s:g} s")

    async def _respond(
        self,
        ex: _Exchange,
        status: int,
        body: bytes,
        content_type: str,
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        headers = [*_headers(content_type, len(body)), *extra_headers]
        self.responses[str(status)] = self.responses.get(str(status), 0) + 1
        await self._send(
            ex, h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, ""))
        )
        if not ex.head:  # HEAD: the same headers (Content-Length included), no body
            await self._send(ex, h11.Data(data=body))
        await self._send(ex, h11.EndOfMessage())

    # ------------------------------------------------------------------ event stream
    def _start_index(self, req: _Request) -> int:
        last_id = req.headers.get("last-event-id")
        if last_id is not None:
            # A reconnecting EventSource resumes after the last event it saw.
            if not _is_event_index(last_id):
                raise _Reject(400, f"Last-Event-ID {last_id!r} is not an event index")
            return int(last_id) + 1
        text = req.query.get("from")
        if text is None:
            return self.view.state.last_applied + 1  # live events only
        if not _is_event_index(text):
            raise _Reject(400, f"from={text!r}: expected a non-negative event index")
        return max(int(text), 1)

    async def _events(self, ex: _Exchange, req: _Request) -> None:
        cfg = self.config
        cursor = self._start_index(req)
        if self.subscribers >= cfg.max_subscribers:
            raise _Reject(503, f"too many event streams open (max {cfg.max_subscribers})")
        self.subscribers += 1
        self.responses["200"] = self.responses.get("200", 0) + 1
        try:
            headers = [
                ("Content-Type", "text/event-stream; charset=utf-8"),
                ("Cache-Control", "no-store"),
                ("X-Content-Type-Options", "nosniff"),
                ("Connection", "close"),
            ]
            # The reason phrase as every other answer has it (h11 leaves it empty otherwise).
            stream_head = h11.Response(status_code=200, headers=headers, reason=_REASONS[200])
            await self._send(ex, stream_head)
            if ex.head:  # the stream's headers, and no stream
                await self._send(ex, h11.EndOfMessage())
                return
            await self._send(ex, h11.Data(data=f"retry: 2000\n: from {cursor}\n\n".encode()))
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._cancel_on_close, ex.stream, tg.cancel_scope)
                await self._pump(ex, cursor)
                tg.cancel_scope.cancel()
        finally:
            self.subscribers -= 1

    async def _pump(self, ex: _Exchange, cursor: int) -> None:
        """Send events from `cursor` on, one bounded batch at a time, until cancelled."""
        cfg = self.config
        while True:
            batch = await self.view.read_events(cursor, cfg.batch_events)
            if batch:
                frames = b"".join(
                    b"id: %d\ndata: %s\n\n" % (ie.idx, event_json(ie)) for ie in batch
                )
                await self._send(ex, h11.Data(data=frames))
                cursor = batch[-1].idx + 1
                continue
            with anyio.move_on_after(cfg.keepalive_s) as idle:
                await self.view.wait_for_index(cursor)
            if idle.cancelled_caught:
                await self._send(ex, h11.Data(data=b": keepalive\n\n"))

    @staticmethod
    async def _cancel_on_close(stream: SocketStream, scope: anyio.CancelScope) -> None:
        """An event stream only writes; notice the client hanging up without waiting for a
        write to fail."""
        try:
            while True:
                await stream.receive(4096)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            scope.cancel()
