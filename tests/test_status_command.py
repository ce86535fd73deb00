"""`cluster status` against a real HTTP API on 127.0.0.1 (fake cluster view)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator

import anyio
import pytest
from socket_servers import Answer, serving
from test_http_api import TOKEN, FakeView, cluster_log, running
from test_status_view import newer_masters_status

from cluster import cli
from cluster.master.http_api import HttpApiConfig


async def run_cli(*argv: str) -> int:
    return await anyio.to_thread.run_sync(cli.main, list(argv))


@pytest.mark.anyio
async def test_status_renders_the_masters_view(capsys: pytest.CaptureFixture[str]) -> None:
    async with running(FakeView(cluster_log())) as (_, port):
        assert await run_cli("status", "--url", f"http://127.0.0.1:{port}") == 0
    out = capsys.readouterr().out
    assert "NODES" in out
    assert "serving 1 slot of devshard ds-1" in out
    assert "catching up: 1,204 events behind" in out


@pytest.mark.anyio
async def test_status_json(capsys: pytest.CaptureFixture[str]) -> None:
    async with running(FakeView(cluster_log())) as (_, port):
        assert await run_cli("status", "--json", "--url", f"http://127.0.0.1:{port}") == 0
    data = json.loads(capsys.readouterr().out)
    assert {n["node_id"] for n in data["nodes"]} == {"node-a", "node-b"}


@pytest.mark.anyio
async def test_status_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CLUSTER_HTTP_TOKEN", raising=False)
    async with running(FakeView(cluster_log()), HttpApiConfig(token=TOKEN)) as (_, port):
        url = f"http://127.0.0.1:{port}"
        assert await run_cli("status", "--url", url) == 1
        assert "answered 401" in capsys.readouterr().err
        assert await run_cli("status", "--url", url, "--token", TOKEN) == 0
        monkeypatch.setenv("CLUSTER_HTTP_TOKEN", TOKEN)
        assert await run_cli("status", "--url", url) == 0


@pytest.mark.anyio
async def test_status_unreachable_or_bad_url(capsys: pytest.CaptureFixture[str]) -> None:
    # A port that was just free: nothing listens there.
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()
    assert await run_cli("status", "--url", f"http://127.0.0.1:{port}", "--timeout", "2") == 1
    err = capsys.readouterr().err
    assert "cannot reach the master's HTTP API" in err
    # Where a master on a free port (`--http 127.0.0.1:0`) says its address: it said nothing.
    assert "writes the address it serves on to <data-dir>/http.url" in err, err
    assert '`cluster status --url "$(cat DATA_DIR/http.url)"`' in err, err
    assert await run_cli("status", "--url", "ftp://x") == 2
    assert "expected http://HOST:PORT" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--url", "http://127.0.0.1:abc"], "--url 'http://127.0.0.1:abc': Port could not be cast"),
        (["--url", "http://127.0.0.1:99999"], "--url 'http://127.0.0.1:99999': Port out of range"),
        (["--url", "http://[::1"], "--url 'http://[::1': Invalid IPv6 URL"),
        (["--timeout", "-1"], "--timeout must be a finite number of seconds > 0, not -1.0"),
        (["--timeout", "nan"], "--timeout must be a finite number of seconds > 0, not nan"),
        # An OverflowError traceback from socket.settimeout:
        (["--timeout", "1e300"], "--timeout must be at most 86,400 seconds (a day), not 1e+300"),
        # Sent to DNS as the host name "user@127.0.0.1":
        (
            ["--url", "http://user:pw@127.0.0.1:1"],
            "--url 'http://user:pw@127.0.0.1:1': no user name or password in the URL",
        ),
        (["--url", "http://a b:1"], "--url 'http://a b:1': the host cannot contain spaces"),
        # http.client refuses it on sending; it was "cannot reach the master's HTTP API", exit 1:
        (["--url", "http://a%20b:1"], "--url 'http://a%20b:1': URL can't contain control"),
        (["--token", "t\u20acst"], "the API token must be printable ASCII"),
        (["--token", "a\nb"], "the API token must be printable ASCII"),
    ],
)
def test_status_arguments_are_validated_before_any_request(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["status", *argv]) == 2
    err = capsys.readouterr().err
    assert f"cluster status: {says}" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------------
# Pointed at something that is not our HTTP API: one line naming the address, exit 1
# --------------------------------------------------------------------------------------------


def _read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk


def _libp2p_greeting(conn: socket.socket, done: threading.Event) -> None:
    # What a libp2p listen port says first (multistream-select), before reading anything.
    conn.sendall(b"\x13/multistream/1.0.0\n")
    done.wait()


def _binary(conn: socket.socket, done: threading.Event) -> None:
    _read_request(conn)
    conn.sendall(b"\x00\x01\x02garbage\r\n\x1b[31mred\r\n\r\n")


def _close_at_once(conn: socket.socket, done: threading.Event) -> None:
    pass  # closed on return, before or while the request arrives


def _close_after_request(conn: socket.socket, done: threading.Event) -> None:
    _read_request(conn)


def _html_404(conn: socket.socket, done: threading.Event) -> None:
    _read_request(conn)
    conn.sendall(
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nConnection: close\r\n\r\n"
        b"<html>\n<body>\n<h1>Not Found</h1>\n</body>\n</html>\n"
    )


def _html_200(conn: socket.socket, done: threading.Event) -> None:
    _read_request(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n<html>\nhello\n</html>\n")


@contextlib.contextmanager
def tcp_server(answer: Answer) -> Iterator[int]:
    """A TCP server on 127.0.0.1 that handles each connection with `answer`; its port."""
    server = socket.create_server(("127.0.0.1", 0))
    with serving(server, answer):
        yield server.getsockname()[1]


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (_libp2p_greeting, "it answered '\\x13/multistream/1.0.0', not HTTP"),
        (_binary, "it answered '\\x00\\x01\\x02garbage', not HTTP"),
        (_close_at_once, ""),  # closed or reset, depending on when the close lands
        (_close_after_request, "it closed the connection without answering"),
        (_html_404, "GET /api/status answered 404 Not Found"),
        (_html_200, "its /api/status answer is not JSON (JSON is malformed"),
    ],
)
def test_status_from_something_that_is_not_our_api_is_one_line(
    answer: Callable[[socket.socket, threading.Event], None],
    why: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with tcp_server(answer) as port:
        url = f"http://127.0.0.1:{port}"
        assert cli.main(["status", "--url", url, "--timeout", "30"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"cluster status: {url} is not a cluster master's HTTP API: {why}"), err
    assert "\x1b" not in err and "\x00" not in err


def test_status_from_a_server_that_never_answers_says_so_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def silent(conn: socket.socket, done: threading.Event) -> None:
        done.wait()

    with tcp_server(silent) as port:
        url = f"http://127.0.0.1:{port}"
        assert cli.main(["status", "--url", url, "--timeout", "0.2"]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"cluster status: {url} accepted the connection but sent no answer within 0.2 s "
        "(is it a cluster master's HTTP API?)\n"
    )


def test_status_from_json_that_is_not_a_status_says_so_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def other_json(conn: socket.socket, done: threading.Event) -> None:
        _read_request(conn)
        conn.sendall(b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"hello":\n"world"}\n')

    with tcp_server(other_json) as port:
        url = f"http://127.0.0.1:{port}"
        assert cli.main(["status", "--url", url]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"cluster status: {url}/api/status answered JSON that is not a cluster status "
        "(another program, or a master of another version?): "
        "Object missing required field `now_ms`\n"
    )


@pytest.mark.parametrize("as_json", [False, True])
def test_status_of_a_newer_master_shows_values_this_cli_does_not_know(
    capsys: pytest.CaptureFixture[str], as_json: bool
) -> None:
    # An older CLI failed outright ("answered JSON that is not a cluster status") on a node
    # status added in a later version; masters and CLIs are upgraded at different times.
    body = newer_masters_status()

    def newer_master(conn: socket.socket, done: threading.Event) -> None:
        _read_request(conn)
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        conn.sendall(head.encode() + body)

    with tcp_server(newer_master) as port:
        argv = ["status", "--url", f"http://127.0.0.1:{port}"] + (["--json"] if as_json else [])
        assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert err == ""
    if as_json:
        assert json.loads(out) == json.loads(body)  # passed through, unknown fields and all
    else:
        assert "1 hibernating" in out and "asleep until 15:00 UTC" in out


@pytest.mark.parametrize("suffix", ["", "/", "/api/status", "/api/status/"])
def test_status_through_a_reverse_proxy_keeps_the_path_prefix(
    suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--url https://proxy/cluster` asks `/cluster/api/status`: the path is the prefix a
    reverse proxy serves the API under (it used to be dropped, and the proxy answered 404).
    A pasted endpoint or a trailing slash means the same."""
    asked: list[bytes] = []
    body = b'{"hello": "world"}'

    def proxy(conn: socket.socket, done: threading.Event) -> None:
        data = b""
        while b"\r\n\r\n" not in data and (chunk := conn.recv(4096)):
            data += chunk
        asked.append(data.split(b"\r\n", 1)[0])
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body)

    with tcp_server(proxy) as port:
        url = f"http://127.0.0.1:{port}/cluster{suffix}"
        assert cli.main(["status", "--url", url]) == 1  # answered, but not a status
    assert asked == [b"GET /cluster/api/status HTTP/1.1"]
    err = capsys.readouterr().err
    assert f"http://127.0.0.1:{port}/cluster/api/status answered JSON that is not" in err


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://127.0.0.1:1/?x=1", "no query or fragment"),
        ("http://127.0.0.1:1/#top", "no query or fragment"),
        ("http://127.0.0.1:1/a b", "the path must be printable ASCII without spaces"),
        ("http://127.0.0.1:1/caf\u00e9", "the path must be printable ASCII without spaces"),
    ],
)
def test_status_url_path_is_validated(
    url: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["status", "--url", url]) == 2
    assert capsys.readouterr().err.startswith(f"cluster status: --url {url!r}: {says}")
