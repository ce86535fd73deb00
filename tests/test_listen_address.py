"""A listen address is listened on exactly as given, or refused in one line saying why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.net.host import AddressError, full_addrs, parse_listen_multiaddr, running_host
from cluster.net.identity import key_pair_from_seed

PEER = "12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
NAMES_A_HOST = (
    "names a host, but a listen address names an interface: use /ip4/ADDR or /ip6/ADDR "
    "(e.g. /ip4/127.0.0.1/tcp/7400, or /ip4/0.0.0.0/tcp/7400 for every interface)"
)


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["dns", "dns4", "dns6", "dnsaddr"])
async def test_a_listen_address_naming_a_host_is_refused(name: str) -> None:
    """`--listen /dns4/localhost/tcp/P` listened on 0.0.0.0 and :: (py-libp2p finds no IP in
    it), and past the port check: a second master on a first one's port shared it through
    py-libp2p's SO_REUSEPORT, each printing `master listening on /ip4/0.0.0.0/tcp/P`."""
    async with running_host(key_pair_from_seed(b"\x01" * 32), ["/ip4/127.0.0.1/tcp/0"]) as first:
        port = full_addrs(first)[0].split("/")[4]
        listen = f"/{name}/localhost/tcp/{port}"
        with pytest.raises(AddressError) as refused:
            async with running_host(key_pair_from_seed(b"\x02" * 32), [listen]):
                pass
    assert str(refused.value) == f"cannot listen on {listen}: /{name} {NAMES_A_HOST}"


@pytest.mark.parametrize("suffix", ["/ws", "/tls", "/tcp/7401"])
def test_a_listen_address_with_more_than_an_interface_and_a_port_is_refused(
    suffix: str,
) -> None:
    """py-libp2p ignored a trailing /tls (listening on plain TCP) and refused a /ws with only
    a log line; only the interface address and the port are ever checked."""
    listen = f"/ip4/127.0.0.1/tcp/0{suffix}"
    with pytest.raises(AddressError) as refused:
        parse_listen_multiaddr(listen)
    assert str(refused.value) == (
        f"cannot listen on {listen}: expected /ip4/ADDR/tcp/PORT or /ip6/ADDR/tcp/PORT "
        "(e.g. /ip4/0.0.0.0/tcp/7400)"
    )


@pytest.mark.anyio
@pytest.mark.parametrize("listen", [f"/ip4/127.0.0.1/tcp/0/p2p/{PEER}", f"/p2p/{PEER}"])
async def test_a_listen_address_naming_a_peer_id_is_refused(listen: str) -> None:
    """The /p2p part was ignored: the master started under its own peer id, not the one
    given."""
    with pytest.raises(AddressError) as refused:
        async with running_host(key_pair_from_seed(b"\x03" * 32), [listen]):
            pass
    assert str(refused.value) == (
        f"cannot listen on {listen}: a listen address takes no /p2p part: the peer id comes "
        "from the node key (node.key in the data directory)"
    )


@pytest.mark.parametrize(
    "listen",
    ["/dns4/localhost/tcp/0", f"/ip4/127.0.0.1/tcp/0/p2p/{PEER}", "/ip4/127.0.0.1/tcp/0/tls"],
)
def test_cluster_master_refuses_such_a_listen_address_before_it_starts(
    listen: str, tmp_path: Path
) -> None:
    """One line, before the data directory (and its cluster.secret) is made. A subprocess,
    so that a master that starts instead fails the test rather than hanging it."""
    data_dir = tmp_path / "m"
    argv = ["master", "--data-dir", str(data_dir), "--listen", listen, "--http", "off"]
    src = str(Path(__file__).resolve().parents[1] / "src")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "cluster", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": src},
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"cluster master started on --listen {listen}: {exc.stdout!r}")
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.startswith(f"cluster master: cannot listen on {listen}: "), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stdout == ""
    assert not data_dir.exists()
