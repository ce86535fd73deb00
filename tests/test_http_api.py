"""The HTTP API over real sockets on 127.0.0.1, against an in-memory `ClusterView`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import socket
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream
from test_node_status import MIN, T0, Log, far_future_log

from cluster.master.http_api import (
    ClusterView,
    HttpApi,
    HttpApiConfig,
    HttpApiConfigError,
    check_config,
)
from cluster.master.metrics import MasterMetrics, render_prometheus
from cluster.shared.codec import event_json, state_to_json
from cluster.shared.events import Event, IndexedEvent, NodeDisconnected, NodeHeartbeat
from cluster.shared.node_status import node_statuses
from cluster.shared.state import State

TOKEN = "s3cret-token-for-tests"
NOW = T0 + MIN


class FakeView:
    """The master's surface, in memory: a Log plus a condition for new events."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self._changed = anyio.Event()
        self.lag = {"node-a": 3, "node-b": 1204}

    @property
    def state(self) -> State:
        return self.log.state

    def now_ms(self) -> int:
        return NOW

    async def wait_for_index(self, idx: int) -> None:
        while self.log.state.last_applied < idx:
            await self._changed.wait()

    async def read_events(self, from_idx: int, limit: int) -> Sequence[IndexedEvent]:
        return self.log.events[from_idx - 1 : from_idx - 1 + limit]

    def metrics(self) -> MasterMetrics:
        return MasterMetrics(
            events_indexed=self.log.state.last_applied,
            log_size_bytes=4096,
            plan_cycle_last_seconds=0.0025,
            plan_cycle_seconds_sum=0.5,
            plan_cycles_total=200,
            catch_up_lag_by_node=self.lag,
            counters={"duplicates_dropped": 2},
        )

    def add(self, origin: str, event: Event) -> None:
        self.log.add(origin, NOW, event)
        changed, self._changed = self._changed, anyio.Event()
        changed.set()


def cluster_log() -> Log:
    log = Log().joined("node-a").tested("node-a").joined("node-b").tested("node-b")
    return log.epoch(1, T0, T0 + 10 * MIN).placed("ds-1", ["node-a"], epoch=1, ends_ms=T0 + MIN)


@asynccontextmanager
async def running(
    view: ClusterView, config: HttpApiConfig | None = None
) -> AsyncIterator[tuple[HttpApi, int]]:
    api = HttpApi(view, config, initial_credit_ms=0)
    async with anyio.create_task_group() as tg:
        port = await tg.start(api.serve)
        yield api, port
        tg.cancel_scope.cancel()


async def raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the response until the server closes; (status, headers, body)."""
    with anyio.fail_after(20):
        async with await anyio.connect_tcp("127.0.0.1", port) as s:
            await s.send(request)
            data = b""
            while True:
                try:
                    data += await s.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    return status, headers, body


async def get(port: int, target: str, *headers: str) -> tuple[int, dict[str, str], bytes]:
    extra = "".join(f"{h}\r\n" for h in headers)
    return await raw(port, f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())


@pytest.mark.anyio
async def test_state_json_is_the_folded_state() -> None:
    view = FakeView(cluster_log())
    async with running(view) as (_, port):
        status, headers, body = await get(port, "/api/state")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == json.loads(state_to_json(view.state))
    assert set(json.loads(body)["nodes"]) == {"node-a", "node-b"}


@pytest.mark.anyio
async def test_status_json_has_messages_and_uses_master_lag() -> None:
    async with running(FakeView(cluster_log())) as (_, port):
        status, _, body = await get(port, "/api/status")
    assert status == 200
    nodes = {n["node_id"]: n for n in json.loads(body)["nodes"]}
    assert nodes["node-a"]["message"] == "serving 1 slot of devshard ds-1"
    assert nodes["node-b"]["status"] == "catching_up"
    assert nodes["node-b"]["message"] == "catching up: 1,204 events behind"


@pytest.mark.anyio
async def test_dashboard_is_served_self_contained() -> None:
    async with running(FakeView(cluster_log())) as (_, port):
        status, headers, body = await get(port, "/")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    page = body.decode()
    assert "<title>cluster dashboard</title>" in page
    assert "/api/events" in page and "/api/status" in page
    # No external resources: the cluster's network is closed.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)


METRIC_LINE = re.compile(r'^[a-z_:][a-z0-9_:]*(\{[a-z_]+="[^"\\]*"(,[a-z_]+="[^"\\]*")*\})? \S+$')


@pytest.mark.anyio
async def test_metrics_in_prometheus_text_format() -> None:
    view = FakeView(cluster_log())
    async with running(view) as (_, port):
        status, headers, body = await get(port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("# "):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ .+$", line), line
            continue
        assert METRIC_LINE.match(line), line
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    assert samples["cluster_events_indexed_total"] == view.state.last_applied
    assert samples["cluster_log_size_bytes"] == 4096
    assert samples['cluster_nodes{status="serving"}'] == 1
    assert samples['cluster_nodes{status="catching_up"}'] == 1
    assert samples['cluster_nodes{status="disconnected"}'] == 0
    assert samples["cluster_plan_cycle_last_seconds"] == 0.0025
    assert samples["cluster_plan_cycle_seconds_count"] == 200
    assert samples['cluster_node_catch_up_lag_events{node="node-b"}'] == 1204
    assert samples["cluster_master_duplicates_dropped_total"] == 2


def test_metrics_escape_label_values_and_reject_bad_counter_names() -> None:
    text = render_prometheus(MasterMetrics(catch_up_lag_by_node={'we"ird\\n': 1}), [])
    assert 'cluster_node_catch_up_lag_events{node="we\\"ird\\\\n"} 1' in text
    with pytest.raises(ValueError, match="lower_snake_case"):
        render_prometheus(MasterMetrics(counters={"Bad-Name": 1}), [])


class SseReader:
    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.buf = b""

    async def frames(self, n: int) -> list[dict[str, str]]:
        """The next `n` event frames (comments skipped), each as {field: value}."""
        out: list[dict[str, str]] = []
        while len(out) < n:
            while b"\n\n" not in self.buf:
                self.buf += await self.stream.receive()
            block, self.buf = self.buf.split(b"\n\n", 1)
            fields = {}
            for line in block.decode().split("\n"):
                if line and not line.startswith(":") and ":" in line:
                    k, v = line.split(":", 1)
                    fields[k] = v.strip()
            if "data" in fields:
                out.append(fields)
        return out


@asynccontextmanager
async def sse(port: int, target: str, *headers: str) -> AsyncIterator[SseReader]:
    """Open an event stream; the reader sees the body after the response head."""
    async with await anyio.connect_tcp("127.0.0.1", port) as s:
        extra = "".join(f"{h}\r\n" for h in headers)
        # HTTP/1.0: the body is sent as is (no chunked framing) until the server closes.
        await s.send(f"GET {target} HTTP/1.0\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
        reader = SseReader(s)
        while b"\r\n\r\n" not in reader.buf:
            reader.buf += await s.receive()
        head, reader.buf = reader.buf.split(b"\r\n\r\n", 1)
        # "OK" as in every other answer (it was an empty reason phrase).
        assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
        assert b"text/event-stream" in head
        yield reader


@pytest.mark.anyio
async def test_event_stream_replays_from_index_then_delivers_live_events() -> None:
    view = FakeView(cluster_log())
    n = view.state.last_applied
    async with running(view) as (api, port):
        with anyio.fail_after(20):
            async with sse(port, "/api/events?from=2") as reader:
                past = await reader.frames(n - 1)
                assert [int(f["id"]) for f in past] == list(range(2, n + 1))
                assert json.loads(past[0]["data"])["idx"] == 2
                view.add("node-a", NodeHeartbeat(node_id="node-a"))
                view.add(
                    "master", NodeDisconnected(node_id="node-b", reason="no events for 3 cycles")
                )
                live = await reader.frames(2)
                assert [int(f["id"]) for f in live] == [n + 1, n + 2]
                event = json.loads(live[1]["data"])
                assert event["origin"] == "master"
                assert event["event"] == {
                    "type": "NodeDisconnected",
                    "node_id": "node-b",
                    "reason": "no events for 3 cycles",
                    "excused": False,
                }
                assert api.subscribers == 1
            # The client hung up: the server notices without having to write.
            with anyio.fail_after(20):
                while api.subscribers:
                    await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_event_stream_without_from_is_live_only_and_resumes_after_last_event_id() -> None:
    view = FakeView(cluster_log())
    n = view.state.last_applied
    async with running(view) as (_, port):
        with anyio.fail_after(20):
            async with sse(port, "/api/events") as reader:
                view.add("node-a", NodeHeartbeat(node_id="node-a"))
                (frame,) = await reader.frames(1)
                assert int(frame["id"]) == n + 1
            async with sse(port, "/api/events?from=1", f"Last-Event-ID: {n - 1}") as reader:
                frames = await reader.frames(2)
                assert [int(f["id"]) for f in frames] == [n, n + 1]


@pytest.mark.anyio
async def test_event_stream_sends_bounded_batches() -> None:
    view = FakeView(cluster_log())
    n = view.state.last_applied
    reads: list[int] = []
    original = view.read_events

    async def counting(from_idx: int, limit: int) -> Sequence[IndexedEvent]:
        reads.append(limit)
        return await original(from_idx, limit)

    view.read_events = counting  # type: ignore[method-assign]
    async with running(view, HttpApiConfig(batch_events=2)) as (_, port):
        with anyio.fail_after(20):
            async with sse(port, "/api/events?from=1") as reader:
                frames = await reader.frames(n)
    assert [int(f["id"]) for f in frames] == list(range(1, n + 1))
    assert reads and max(reads) == 2


def test_event_json_names_its_fields() -> None:
    ie = cluster_log().events[0]
    assert json.loads(event_json(ie))["event"]["type"] == "NodeHeartbeat"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("request_bytes", "code", "says"),
    [
        # The refused bytes as text: it was "illegal request line: bytearray(b'GARBAGE')".
        (b"GARBAGE\r\n\r\n", 400, "malformed request: illegal request line: 'GARBAGE'\n"),
        (
            b"GET /api/state HTTP/1.1\r\nno colon here\r\n\r\n",
            400,
            "malformed request: illegal header line: 'no colon here'\n",
        ),
        # ... printable (an escape code is shown, not sent to a terminal) and clipped.
        (
            b"GET /api/state HTTP/1.1\r\nX\x1b[2J" + b"x" * 500 + b"\r\n\r\n",
            400,
            "illegal header line: 'X\\x1b[2J" + "x" * 74 + "…'\n",
        ),
        (b"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20000, 431, ""),
        # Complete, and sent in one write: h11's own limit sees it whole and lets it by.
        (
            b"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
            431,
            "over the limit of 16384",
        ),
        (b"POST /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n", 405, "GET"),
        (b"GET /api/events?from=abc HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400, "from='abc'"),
        # A Unicode digit that str.isdigit() accepts and int() refuses.
        (b"GET /api/events?from=%C2%B2 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400, "from="),
        (
            b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nLast-Event-ID: \xc2\xb2\r\n\r\n",
            400,
            "Last-Event-ID",
        ),
        (
            b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nLast-Event-ID: "
            + b"9" * 5000
            + b"\r\n\r\n",
            400,
            "Last-Event-ID",
        ),
        (b"GET /api/status?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400, "unknown query"),
        (b"GET /api/status?a=1&a=2 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400, "2 times"),
        (
            b"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\nabc",
            400,
            "no body",
        ),
        (b"GET /api/state HTTP/1.1\r\nHost: evil.example:80\r\n\r\n", 403, "loopback"),
        (b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404, "no such path '/nope'"),
        # urlsplit took "//evil.example" for a host name and served /api/status.
        (
            b"GET //evil.example/api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            404,
            "no such path '//evil.example/api/status'",
        ),
        (b"GET /api/status#x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404, "'/api/status#x'"),
        # Two values for a field that holds one: the last one was used without a word.
        (
            b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Last-Event-ID: 1\r\nLast-Event-ID: 5\r\n\r\n",
            400,
            "header Last-Event-ID given 2 times",
        ),
    ],
)
async def test_bad_requests_get_a_clear_error_and_the_server_survives(
    request_bytes: bytes, code: int, says: str
) -> None:
    async with running(FakeView(cluster_log())) as (_, port):
        status, _, body = await raw(port, request_bytes)
        assert status == code, body
        assert says in body.decode()
        status, _, _ = await get(port, "/api/status")
        assert status == 200


@pytest.mark.anyio
async def test_a_repeated_authorization_header_is_refused_even_if_one_is_right() -> None:
    config = HttpApiConfig(token=TOKEN)
    async with running(FakeView(cluster_log()), config) as (_, port):
        status, _, body = await get(
            port, "/api/status", "Authorization: Bearer wrong", f"Authorization: Bearer {TOKEN}"
        )
        assert status == 400
        assert b"header Authorization given 2 times" in body


@pytest.mark.anyio
async def test_a_zero_content_length_written_with_leading_zeros_is_no_body() -> None:
    async with running(FakeView(cluster_log())) as (_, port):
        assert (await get(port, "/api/status", "Content-Length: 00"))[0] == 200


@pytest.mark.anyio
async def test_client_that_never_finishes_its_request_times_out() -> None:
    config = HttpApiConfig(request_timeout_s=0.2)
    async with running(FakeView(cluster_log()), config) as (_, port):
        status, _, body = await raw(port, b"GET /api/state HTTP/1.1\r\n")
    assert status == 408
    assert b"not received in time" in body


@pytest.mark.anyio
async def test_too_many_event_streams_get_503() -> None:
    async with running(FakeView(cluster_log()), HttpApiConfig(max_subscribers=1)) as (_, port):
        with anyio.fail_after(20):
            async with sse(port, "/api/events"):
                status, _, body = await get(port, "/api/events")
                assert status == 503
                assert b"max 1" in body


@pytest.mark.anyio
async def test_token_required_when_configured() -> None:
    config = HttpApiConfig(token=TOKEN)
    async with running(FakeView(cluster_log()), config) as (_, port):
        status, headers, body = await get(port, "/api/status")
        assert status == 401
        assert "Bearer" in headers["www-authenticate"]
        assert b"token missing" in body
        assert (await get(port, "/api/status", "Authorization: Bearer wrong"))[0] == 401
        assert (await get(port, "/api/status", f"Authorization: Bearer {TOKEN}"))[0] == 200
        assert (await get(port, f"/api/status?token={TOKEN}"))[0] == 200
        # With a token, any Host is fine: the token is the protection.
        assert (await get(port, "/", f"Authorization: Bearer {TOKEN}"))[0] == 200


@pytest.mark.anyio
async def test_config_errors_name_config_fields_and_keep_flags_for_the_command_line() -> None:
    """A program embedding the API was told to use `--http 127.0.0.1:0` / `--http off` and
    `--http-token-file`: flags it cannot pass. The flags stay in `command_line`."""
    with pytest.raises(HttpApiConfigError) as exposed:
        check_config(HttpApiConfig(host="0.0.0.0"))
    assert "`HttpApiConfig.token`" in str(exposed.value) and "--" not in str(exposed.value)
    assert "`cluster master --http-token-file FILE`" in exposed.value.command_line
    async with await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0) as taken:
        port = taken.extra(anyio.abc.SocketAttribute.local_port)
        api = HttpApi(FakeView(cluster_log()), HttpApiConfig(port=port), initial_credit_ms=0)
        with pytest.raises(HttpApiConfigError) as in_use:
            await api.serve()
    said = str(in_use.value)
    assert said.startswith(f"cannot listen for HTTP on 127.0.0.1:{port}: "), said
    assert "`HttpApiConfig(port=0)` picks a free port" in said and "--http" not in said, said
    assert "`MasterNodeConfig(http=None)` runs without the API" in said, said
    assert in_use.value.command_line.endswith(
        "; `--http 127.0.0.1:0` picks a free port (written to <data-dir>/http.url), "
        "`--http off` runs without it"
    )


def test_binding_off_loopback_requires_a_token() -> None:
    with pytest.raises(HttpApiConfigError, match="set a token"):
        check_config(HttpApiConfig(host="0.0.0.0"))
    with pytest.raises(HttpApiConfigError, match="set a token"):
        HttpApi(FakeView(cluster_log()), HttpApiConfig(host="10.1.2.3"), initial_credit_ms=0)
    with pytest.raises(HttpApiConfigError, match="at least 16"):
        check_config(HttpApiConfig(host="0.0.0.0", token="short"))
    with pytest.raises(HttpApiConfigError, match="port"):
        check_config(HttpApiConfig(port=70000))
    check_config(HttpApiConfig(host="0.0.0.0", token=TOKEN))
    check_config(HttpApiConfig(host="localhost"))
    check_config(HttpApiConfig(host="::1"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("request_timeout_s", 0.0),
        ("send_timeout_s", -1.0),
        ("keepalive_s", float("nan")),
        ("body_wait_s", -0.5),
        ("body_wait_s", float("inf")),
    ],
)
def test_a_duration_setting_out_of_range_is_named(field: str, value: float) -> None:
    with pytest.raises(HttpApiConfigError, match=f"HTTP API {field} is {value!r}"):
        changes: dict[str, Any] = {field: value}
        check_config(dataclasses.replace(HttpApiConfig(), **changes))


def test_no_wait_for_body_room_is_a_valid_setting() -> None:
    check_config(HttpApiConfig(body_wait_s=0.0))


def test_fake_view_satisfies_the_protocol() -> None:
    view: ClusterView = FakeView(cluster_log())
    statuses = node_statuses(view.state, view.now_ms())
    assert len(statuses) == 2


@pytest.mark.anyio
async def test_clients_hanging_up_mid_stream_log_no_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    view = FakeView(cluster_log())
    async with running(view, HttpApiConfig(batch_events=1)) as (api, port):
        with anyio.fail_after(20):
            for _ in range(5):
                async with sse(port, "/api/events?from=1") as reader:
                    await reader.frames(1)
                    view.add("node-a", NodeHeartbeat(node_id="node-a"))
            while api.subscribers:
                await anyio.sleep(0.01)
            assert (await get(port, "/api/status"))[0] == 200
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]


def test_client_gone_recognises_grouped_disconnects() -> None:
    from cluster.master.http_api import _client_gone, _ClientStalled

    assert _client_gone(anyio.BrokenResourceError())
    assert _client_gone(ExceptionGroup("g", [anyio.BrokenResourceError(), _ClientStalled()]))
    assert not _client_gone(ExceptionGroup("g", [anyio.BrokenResourceError(), KeyError("x")]))
    assert not _client_gone(RuntimeError("bug"))
    # The master's own timeouts are not the client's (a TimeoutError used to be taken for one).
    assert not _client_gone(TimeoutError("read timed out"))
    assert not _client_gone(ExceptionGroup("g", [anyio.BrokenResourceError(), TimeoutError()]))


class _NeverSends:
    """A socket stream whose client never takes a byte."""

    async def send(self, data: bytes) -> None:
        await anyio.sleep_forever()


@pytest.mark.anyio
async def test_a_client_that_takes_no_write_in_time_has_stalled() -> None:
    import h11

    from cluster.master.http_api import _client_gone, _ClientStalled, _Exchange

    api = HttpApi(FakeView(cluster_log()), HttpApiConfig(send_timeout_s=0.05), initial_credit_ms=0)
    ex = _Exchange(h11.Connection(h11.SERVER), _NeverSends())  # type: ignore[arg-type]
    with anyio.fail_after(20), pytest.raises(_ClientStalled) as stalled:
        await api._write(ex, b"data")
    assert _client_gone(stalled.value)


class TimingOutView(FakeView):
    """A view whose reads time out inside the master: `TimeoutError`, as an OS call that
    timed out raises (socket.timeout and ETIMEDOUT are `TimeoutError` too)."""

    def metrics(self) -> MasterMetrics:
        raise TimeoutError("log size read timed out")

    async def read_events(self, from_idx: int, limit: int) -> Sequence[IndexedEvent]:
        raise TimeoutError("log read timed out")


@pytest.mark.anyio
async def test_a_timeout_inside_the_master_is_an_internal_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It was taken for the client's write timeout: no answer at all (the connection just
    closed) and nothing in the log."""
    async with running(TimingOutView(cluster_log())) as (api, port):
        status, _, body = await get(port, "/api/status")
        assert status == 500
        reason = b"internal error (TimeoutError: log size read timed out)"
        assert body == b"500 Internal Server Error: " + reason + b"\n"
        # Once a stream has started only closing it is left, but the error is logged too.
        status, _, body = await get(port, "/api/events?from=1")
        assert status == 200 and b"data:" not in body
        with anyio.fail_after(20):
            while api.subscribers:
                await anyio.sleep(0.01)
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2, [r.getMessage() for r in caplog.records]
    assert "/api/status" in errors[0].getMessage() and "/api/events" in errors[1].getMessage()
    assert all(r.exc_info is not None for r in errors)


@pytest.mark.anyio
async def test_a_log_with_times_past_year_9999_is_still_served() -> None:
    """Status and metrics render every time they hold, even outside years 1..9999 (a log
    written under the unbounded settings of old): they used to send no response at all."""
    async with running(FakeView(far_future_log())) as (_, port):
        status, _, body = await get(port, "/api/status")
        assert status == 200, body
        assert "ms since 1970-01-01 UTC (after year 9999)" in body.decode()
        status, _, body = await get(port, "/metrics")
        assert status == 200, body
        assert b'cluster_nodes{status="maintenance"} 1' in body


class BrokenView(FakeView):
    """A view whose metrics fail: an internal error, as a bug would make one."""

    def metrics(self) -> MasterMetrics:
        raise RuntimeError("metrics went\nwrong")


@pytest.mark.anyio
async def test_an_internal_error_is_answered_500_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running(BrokenView(cluster_log())) as (api, port):
        status, headers, body = await get(port, "/api/status")
        assert status == 500
        assert headers["content-type"].startswith("text/plain")
        reason = b"internal error (RuntimeError: metrics went wrong)"  # one line
        assert body == b"500 Internal Server Error: " + reason + b"\n"
        # The server keeps serving what does not need the broken part.
        assert (await get(port, "/api/state"))[0] == 200
        assert api.responses["500"] == 1
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert "/api/status" in errors[0].getMessage() and errors[0].exc_info is not None


async def head(port: int, target: str) -> tuple[int, dict[str, str], bytes]:
    return await raw(port, f"HEAD {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())


@pytest.mark.anyio
async def test_head_is_answered_like_get_without_a_body(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running(FakeView(cluster_log())) as (_, port):
        for target in ("/", "/api/state", "/api/status", "/metrics"):
            status, headers, body = await head(port, target)
            _, get_headers, get_body = await get(port, target)
            assert (status, body) == (200, b""), target
            # GET's headers, Content-Length included (RFC 9110 9.3.2).
            assert headers == get_headers, target
            assert headers["content-length"] == str(len(get_body)), target
        status, headers, body = await head(port, "/api/events")
        assert (status, body) == (200, b"")
        assert headers["content-type"].startswith("text/event-stream")
        # Errors too: the status and headers, no body.
        status, _, body = await head(port, "/nope")
        assert (status, body) == (404, b"")
        status, _, body = await head(port, "/api/status?x=1")
        assert (status, body) == (400, b"")
        status, headers, body = await raw(
            port, b"DELETE / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
        )
        assert status == 405 and headers["allow"] == "GET, HEAD"
        assert b"read-only (GET, HEAD)" in body
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]


@pytest.mark.anyio
async def test_head_answers_the_status_get_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """A HEAD on /api/state, /api/status or /metrics skipped building the body, so it
    answered 200 where GET answered 500: a monitor probing with HEAD saw a healthy API."""
    from cluster.master import http_api

    def broken(*args: object) -> bytes:
        raise RuntimeError("cannot render")

    monkeypatch.setattr(http_api, "state_to_json", broken)
    monkeypatch.setattr(HttpApi, "_status_json", broken)
    monkeypatch.setattr(HttpApi, "_metrics_text", broken)
    async with running(FakeView(cluster_log())) as (api, port):
        for target in ("/api/state", "/api/status", "/metrics"):
            get_status, get_headers, get_body = await get(port, target)
            status, headers, body = await head(port, target)
            assert (get_status, status, body) == (500, 500, b""), target
            assert headers == get_headers, target  # Content-Length of GET's body included
            assert headers["content-length"] == str(len(get_body))
        assert api.responses == {"500": 6}
        # Refusals still come first: a HEAD is checked like a GET.
        assert (await head(port, "/api/status?x=1"))[0] == 400
        status, headers, _ = await raw(port, b"HEAD /metrics HTTP/1.1\r\nHost: evil.com\r\n\r\n")
        assert status == 403 and headers["content-length"] != "0"


@pytest.mark.anyio
async def test_one_client_cannot_take_every_connection() -> None:
    """Slow clients from one address hold at most `max_connections_per_client`; another
    address is still served. (127.0.0.2 is loopback too: a second client on this host.)"""
    config = HttpApiConfig(max_connections=4, max_connections_per_client=2, request_timeout_s=60)
    async with running(FakeView(cluster_log()), config) as (api, port):
        with anyio.fail_after(20):
            slow = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(2)]
            for s in slow:  # a request head that never ends
                await s.send(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            while api._connections < 2:
                await anyio.sleep(0.01)
            status, _, body = await get(port, "/api/status")
            assert status == 503
            assert b"too many connections from 127.0.0.1 (max 2 per client)" in body
            async with await anyio.connect_tcp("127.0.0.1", port, local_host="127.0.0.2") as s:
                await s.send(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                answer = b""
                while b"\r\n\r\n" not in answer:
                    answer += await s.receive()
                assert answer.startswith(b"HTTP/1.1 200 "), answer
            for s in slow:
                await s.aclose()
            while api._connections:
                await anyio.sleep(0.01)
            assert (await get(port, "/api/status"))[0] == 200


async def silent_connections(api: HttpApi, count: int, addresses: int) -> list[SocketStream]:
    """`count` connections spread over 127.0.0.2.. (`addresses` of them), each sending part
    of a request head and then nothing: slow clients on several hosts. One at a time, each
    seen by the server before the next, so the server's order is the list's."""
    conns = []
    for i in range(count):
        local = f"127.0.0.{2 + i % addresses}"
        s = await anyio.connect_tcp("127.0.0.1", api.port, local_host=local)
        await s.send(b"GET /api/status HTTP/1.1\r\n")
        conns.append(s)
        while api._connections < i + 1:
            await anyio.sleep(0.001)
    return conns


async def answer_of(s: SocketStream) -> bytes:
    """What the server sent on `s` until it closed."""
    data = b""
    while True:
        try:
            data += await s.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return data


@pytest.mark.anyio
async def test_slow_clients_from_many_addresses_cannot_lock_out_an_operator() -> None:
    """Every connection held by silent clients from 4 addresses (16 each, under the per-client
    cap): `cluster status --url` got 503 until their heads timed out, and they came back."""
    config = HttpApiConfig(request_timeout_s=60)  # so only eviction can free a connection
    async with running(FakeView(cluster_log()), config) as (api, port):
        with anyio.fail_after(20):
            slow = await silent_connections(api, config.max_connections, addresses=4)
            status, _, body = await get(port, "/api/status")
            assert status == 200, body
            assert json.loads(body)["nodes"]
            # The connection that had waited longest for its head made room, with a reason.
            evicted = await answer_of(slow[0])
            assert evicted.startswith(b"HTTP/1.1 408 "), evicted
            assert b"server at its connection cap (64)" in evicted
            # The others still wait: one arrival closes one waiting connection.
            assert len(api._awaiting_head) == config.max_connections - 1
            await slow[1].send(b"Host: 127.0.0.1\r\n\r\n")
            assert (await answer_of(slow[1])).startswith(b"HTTP/1.1 200 ")
            for s in slow:
                await s.aclose()


@pytest.mark.anyio
async def test_at_the_cap_with_no_connection_waiting_for_its_head_a_new_one_gets_503() -> None:
    """Connections already being answered (here event streams) are never closed for a
    newcomer: it is refused instead."""
    config = HttpApiConfig(max_connections=2, max_subscribers=2)
    async with running(FakeView(cluster_log()), config) as (api, port):
        with anyio.fail_after(20):
            async with sse(port, "/api/events"), sse(port, "/api/events"):
                assert api.subscribers == 2
                status, _, body = await get(port, "/api/status")
                assert status == 503
                assert b"too many connections (max 2), none waiting for its request" in body
                assert api.subscribers == 2


@pytest.mark.anyio
async def test_many_requests_leave_the_masters_worker_threads_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bodies were built on anyio's default worker threads (40 at once), the ones the master
    commits and reads its log on: 40 requests for /api/state (~145 ms each at 10,000 nodes)
    held them all, and the master's next commit waited behind every one of them."""
    from cluster.master import http_api

    release = threading.Event()

    def slow_render(state: State) -> bytes:
        release.wait(20)
        return b"{}"

    monkeypatch.setattr(http_api, "state_to_json", slow_render)
    n = int(anyio.to_thread.current_default_thread_limiter().total_tokens) + 1
    config = HttpApiConfig(max_connections_per_client=n)
    async with running(FakeView(cluster_log()), config) as (api, port):
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(n):
                    tg.start_soon(get, port, "/api/state")
                with anyio.fail_after(20):
                    # Every request read (each then goes straight to its render).
                    while api._connections < n or api._awaiting_head:
                        await anyio.sleep(0.01)
                with anyio.fail_after(5):  # the master's own work still gets a thread
                    assert await anyio.to_thread.run_sync(lambda: "ran") == "ran"
                release.set()
        finally:
            release.set()


@pytest.mark.anyio
async def test_every_event_stream_held_from_one_address_leaves_room_for_polls() -> None:
    """On the default bind every local client shares 127.0.0.1. With the per-client cap equal
    to the stream cap, 16 dashboard tabs (or streams) locked /api/status and /metrics out."""
    config = HttpApiConfig()
    async with running(FakeView(cluster_log()), config) as (api, port):
        with anyio.fail_after(20):
            async with contextlib.AsyncExitStack() as streams:
                for _ in range(config.max_subscribers):
                    await streams.enter_async_context(sse(port, "/api/events"))
                assert api.subscribers == config.max_subscribers
                for target in ("/api/status", "/metrics"):
                    assert (await get(port, target))[0] == 200, target


@pytest.mark.anyio
async def test_a_head_request_refused_for_its_size_is_answered_without_a_body(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The 431 came before the server knew it was a HEAD: it sent a body, h11 refused that,
    and every such request logged an ERROR with a traceback."""
    request = b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    with caplog.at_level(logging.WARNING):
        async with running(FakeView(cluster_log())) as (_, port):
            status, _, body = await raw(port, request)
            assert (status, body) == (431, b"")
            assert (await get(port, "/api/status"))[0] == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_the_request_head_has_a_short_deadline() -> None:
    """Shorter than the idle write timeout: 64 clients trickling request heads used to hold
    every connection for 10 s at a time."""
    config = HttpApiConfig()
    assert config.request_timeout_s <= 3 < config.send_timeout_s
    assert config.max_connections_per_client < config.max_connections


async def never_reading(port: int, target: str) -> SocketStream:
    """A client that sends its request and then never reads. Its receive buffer is set small
    before connecting (Linux grows a loopback one to 32 MB otherwise), so the server's write
    blocks once the kernel's buffers hold a few MB."""

    def connect() -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        return sock

    stream = await SocketStream.from_socket(await anyio.to_thread.run_sync(connect))
    await stream.send(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return stream


async def whole_answer(port: int, target: str) -> tuple[int, dict[str, str], bytes]:
    """`get` for a large body (a bytearray, not quadratic concatenation)."""
    with anyio.fail_after(20):
        async with await anyio.connect_tcp("127.0.0.1", port) as s:
            await s.send(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            data = bytearray()
            with contextlib.suppress(anyio.EndOfStream):
                while True:
                    data += await s.receive(1 << 20)
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.mark.anyio
async def test_slow_readers_hold_at_most_the_body_budget_and_status_is_still_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slow reader held its finished body until its write deadline: 64 of them held
    ~450 MB of /api/state at 10,000 nodes. Bodies in flight now share one budget, one path
    at most half of it, so /api/status is still served while /api/state waits."""
    from cluster.master import http_api

    size = 16 * 2**20  # far more than the kernel buffers of a never-reading client
    big = b"x" * size
    monkeypatch.setattr(http_api, "state_to_json", lambda state: big)
    config = HttpApiConfig(body_budget_bytes=4 * size, body_wait_s=0.2, send_timeout_s=60)
    async with running(FakeView(cluster_log()), config) as (api, port):
        with anyio.fail_after(20):
            slow = []
            for n in (1, 2):  # /api/state's half of the budget, taken by two slow readers
                slow.append(await never_reading(port, "/api/state"))
                while api.bodies.held != n * size:  # reserved, built and accounted
                    await anyio.sleep(0.01)
            # Each is blocked writing (send_timeout_s is 60 s): nothing frees their room.
            status, headers, body = await get(port, "/api/state")
            assert status == 503, body[:200]
            assert headers["retry-after"] == "60"
            assert b"server busy: response bodies still being sent to slow clients" in body
            assert b"/api/state body of ~16.0 MiB did not fit within 0.2 s" in body
            assert api.bodies.held == 2 * size
            # The operator's `cluster status` and a scrape still get through.
            status, _, body = await get(port, "/api/status")
            assert status == 200 and json.loads(body)["nodes"]
            assert (await get(port, "/metrics"))[0] == 200
            for s in slow:
                await s.aclose()
            while api.bodies.held:  # their writes fail: the room comes back
                await anyio.sleep(0.01)
        status, _, body = await whole_answer(port, "/api/state")
        assert status == 200 and body == big


def test_the_body_budget_rule() -> None:
    from cluster.master.body_budget import BodyBudget

    budget = BodyBudget(100)
    assert budget.fits("/api/state", 1000)  # nothing held: even a body over the budget
    budget._change("/api/state", 40)
    assert budget.fits("/api/state", 10) and not budget.fits("/api/state", 11)  # half
    assert budget.fits("/api/status", 50) and not budget.fits("/api/status", 61)
    budget._change("/api/status", 50)
    assert budget.fits("/metrics", 10) and not budget.fits("/metrics", 11)  # all


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("method", "code"), [("POST", 405), ("PUT", 405), ("GET", 400)], ids=["post", "put", "get"]
)
async def test_a_refused_request_body_is_drained_so_the_client_reads_the_answer(
    method: str, code: int
) -> None:
    """The server closed with the body unread, so the kernel sent a reset: the client got
    "connection reset" after (or, uploading, instead of) the answer."""
    body = b"x" * 200_000  # more than the server reads with the request head
    request = (
        f"{method} /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    async with running(FakeView(cluster_log())) as (_, port):
        with anyio.fail_after(20):
            async with await anyio.connect_tcp("127.0.0.1", port) as s:
                await s.send(request)
                answer = b""
                with contextlib.suppress(anyio.EndOfStream):  # a reset fails the test
                    while True:
                        answer += await s.receive()
        assert answer.startswith(f"HTTP/1.1 {code} ".encode()), answer
        assert (await get(port, "/api/status"))[0] == 200


@pytest.mark.anyio
async def test_a_body_reserves_its_paths_last_size_and_half_the_budget_before_the_first() -> None:
    """Room is taken before building: a burst of requests for a path never built must not
    all get in on a guess of 0 bytes (each would then hold a whole body)."""
    from cluster.master.body_budget import BodyBudget, BudgetFull

    budget = BodyBudget(100)
    first = await budget.reserve("/api/state", wait_s=0)
    assert first.size == 50
    with pytest.raises(BudgetFull, match="body_budget_bytes"):
        await budget.reserve("/api/state", wait_s=0)
    first.resize(10)  # built: the real size, and the next one's estimate
    second = await budget.reserve("/api/state", wait_s=0)
    assert (second.size, budget.held) == (10, 20)
    first.release()
    second.release()
    second.release()  # idempotent
    assert (budget.held, budget.by_path) == (0, {})
