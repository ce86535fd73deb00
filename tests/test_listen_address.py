"""A listen address is listened on exactly as given, or refused in one line saying why.

Loopback only: the one address that is not this machine's, 192.0.2.1 (TEST-NET-1, reserved
for documentation), is only bound to, which fails at once and sends nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import cli
from cluster.net.host import AddressError, full_addrs, parse_listen_multiaddr, running_host
from cluster.net.identity import key_pair_from_seed

PEER = "12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
NAMES_A_HOST = (
    "names a host, but a listen address names an interface: use /ip4/ADDR or /ip6/ADDR "
    "(e.g. /ip4/127.0.0.1/tcp/7400, or /ip4/0.0.0.0/tcp/7400 for every interface)"
)
NOT_MINE = "192.0.2.1"


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


@pytest.mark.anyio
async def test_an_address_of_no_interface_here_says_why_it_cannot_be_listened_on() -> None:
    """The reason was only in a py-libp2p ERROR record ("Failed to start TCP listener ...:
    [Errno 99] Cannot assign requested address"); the error said `cannot listen on ...`."""
    listen = f"/ip4/{NOT_MINE}/tcp/0"
    with pytest.raises(AddressError) as refused:
        async with running_host(key_pair_from_seed(b"\x04" * 32), [listen]):
            pass
    assert str(refused.value) == (
        f"cannot listen on {listen}: Cannot assign requested address "
        f"(no interface of this machine has the address {NOT_MINE})"
    )


def test_cluster_master_says_why_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cluster master` printed py-libp2p's ERROR record, then a line without the reason."""
    listen = f"/ip4/{NOT_MINE}/tcp/0"
    argv = ["master", "--data-dir", str(tmp_path / "m"), "--listen", listen, "--http", "off"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"cluster master: cannot listen on {listen}: Cannot assign requested address "
        f"(no interface of this machine has the address {NOT_MINE})\n"
    )
