"""A host's inbound connections: how many it accepts over its life, and at once.

py-libp2p 0.8.1 kept a slot of its inbound limiter for every connection a host had ever
accepted, until the host stopped: a master refused everyone after 300 connections in its
lifetime (workers redialling after a network fault or a restart count too). Its pruner
closed connections above 300 down to the low watermark: a master could not hold more than
300 workers. Loopback only; the limiter is shrunk so that a few dials show it.
"""

from __future__ import annotations

import anyio
import multiaddr
import pytest

from cluster.net.host import MAX_CONNECTIONS, build_host, dial, full_addrs, running_host
from cluster.net.identity import key_pair_from_seed


@pytest.mark.anyio
async def test_a_closed_inbound_connection_gives_back_its_slot() -> None:
    cap = 3
    async with running_host(key_pair_from_seed(b"\x11" * 32), ["/ip4/127.0.0.1/tcp/0"]) as server:
        limiter = server.get_network()._inbound_limiter
        limiter.total_tokens = cap  # as if `cap` were py-libp2p's 300
        addr = multiaddr.Multiaddr(full_addrs(server)[0])
        with anyio.fail_after(20):
            for i in range(3 * cap):  # one peer after another, each gone before the next
                async with running_host(key_pair_from_seed(bytes([i + 1]) * 32)) as client:
                    await dial(client, addr, 10)
                # The server sees the close a moment later; then the slot is free again.
                while limiter.borrowed_tokens:
                    await anyio.sleep(0.01)


def test_a_host_holds_and_keeps_more_connections_than_a_cluster_has_workers() -> None:
    config = build_host(key_pair_from_seed(b"\x12" * 32)).get_network().connection_config
    assert config.max_connections >= MAX_CONNECTIONS >= 100_000
    assert config.high_watermark >= MAX_CONNECTIONS  # the pruner starts above this
