"""`cluster status` against a real HTTP API on 127.0.0.1 (fake cluster view)."""

from __future__ import annotations

import json

import anyio
import pytest
from test_http_api import TOKEN, FakeView, cluster_log, running

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
    assert "cannot reach the master's HTTP API" in capsys.readouterr().err
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
