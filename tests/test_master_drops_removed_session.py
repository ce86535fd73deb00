"""A node the operator removes while its streams are still open must say hello again.

The master never pruned its members at a removal: a hung worker the master had marked
disconnected, then removed, kept its submit and subscribe streams, and its next event
re-created the node in the log with no boot id, no runner setting and no self-test (a
facts-only node shown self-testing, a runner node never placeable, no "joined again" line).
Now the master drops the removed node's session: its streams fail with code `removed`, the
worker logs why in one line and says hello again, which logs a NodeConnected with its worker
process and runner setting, under its old slot.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest
from embedded_nodes import embedded_cluster
from maintenance_log import Log, node_id

from cluster.master.server import Master, _Submission
from cluster.net.identity import load_identity
from cluster.net.membership import Membership
from cluster.net.protocol import PROTOCOL_VERSION, Hello, ProtocolError
from cluster.shared.events import (
    Event,
    NodeConnected,
    NodeDisconnected,
    NodeHeartbeat,
    NodeRemoved,
)
from cluster.shared.state import State
from cluster.shared.store import EventStore

CLIENT = "cluster.worker.client"
DROPPED = "the master dropped this node's session: removed from the cluster by the operator"


@pytest.mark.anyio
async def test_a_removed_nodes_open_streams_are_dropped_and_it_rejoins_with_a_hello(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CLIENT)
    async with embedded_cluster(tmp_path, no_runners=True) as cluster:
        master, worker = cluster.master, cluster.worker
        client = worker.worker
        node = client.node_id
        with anyio.fail_after(30):
            while client.phase != "connected" or node not in master.master.state.nodes:
                await anyio.sleep(0.05)
        slot = master.master.state.nodes[node].slot

        # Marked disconnected (as for a hung worker) and removed in one decision: its
        # streams stay open, and it heartbeats every 100 ms.
        def remove(state: State, now_ms: int) -> list[Event]:
            return [NodeDisconnected(node_id=node, reason="quiet"), NodeRemoved(node_id=node)]

        removal = await master.master.index_decision(remove)
        removed_idx = removal[-1].idx
        # It rejoins by a new hello. Which of its streams the worker reads the cut on
        # first is a race: usually the 'removed' refusal (logged as DROPPED), but a cut
        # that lands mid-frame on the subscribe stream reads as the stream ending, and
        # the worker redials as after a network fault -- to the same effect.
        with anyio.fail_after(20):
            while not (
                node in master.master.state.nodes and master.master.state.nodes[node].connected
            ):
                await anyio.sleep(0.05)
        after = list(master.store.read_from(removed_idx + 1))
        worker.stop()
        master.master.stop()
    dropped = [r for r in caplog.records if r.name == CLIENT and DROPPED in r.getMessage()]
    assert len(dropped) <= 1, dropped
    for record in dropped:  # when the refusal was read (see above): one WARNING saying so
        assert record.levelno == logging.WARNING
        assert "saying hello again to rejoin" in record.getMessage()
    # After the removal the node's first word in the log is the master's NodeConnected for
    # its hello: nothing of its own before (no bare record), its process and setting named.
    first = next(ie for ie in after if node in (ie.origin, getattr(ie.event, "node_id", None)))
    assert isinstance(first.event, NodeConnected), first
    assert first.event.boot_id == client.boot_id
    assert first.event.runner_digest == client.runner_digest != ""
    rec = master.master.state.nodes[node]
    assert rec.slot == slot and rec.boot_id == client.boot_id and rec.facts_only


@pytest.mark.anyio
async def test_a_batch_queued_before_its_nodes_removal_is_refused_until_a_new_hello(
    tmp_path: Path,
) -> None:
    """A worker batch waiting for the indexer when the removal commits is not indexed: it
    would speak for a node out of the cluster. After a new hello its batches are again."""
    log = Log()
    node = node_id(1)
    log.join(node)
    log.disconnect(node)
    store = EventStore.open(tmp_path / "master")
    store.append(log.log)
    key_pair, _ = load_identity(tmp_path / "master")
    master = Master(store, key_pair, Membership(secret=b"s" * 32), now_ms=lambda: log.now)
    master._members.add(node)  # its hello was long ago; its streams are open
    seq = master.state.last_seq(node)
    try:
        with anyio.fail_after(30):
            await master.index_decision(lambda state, now: [NodeRemoved(node_id=node)])
            assert node not in master.members
            queued = _Submission(node, [NodeHeartbeat(node_id=node)], [seq + 1])
            last = master.last_idx
            await master._index([queued])
            assert isinstance(queued.error, ProtocolError) and queued.error.code == "removed"
            assert master.last_idx == last and node not in master.state.nodes
            # Its hello readmits it (the NodeConnected decision adds it back to the members).
            hello = Hello(version=PROTOCOL_VERSION, nonce=b"n" * 16, boot_id="b2")
            await master._join(_Quiet(node), hello)  # type: ignore[arg-type]
            assert node in master.members and master.state.nodes[node].boot_id == "b2"
            again = _Submission(node, [NodeHeartbeat(node_id=node)], [seq + 1])
            await master._index([again])
            assert again.error is None and master.state.last_seq(node) == seq + 1
    finally:
        master.close()
        store.close()


class _Quiet:
    """A hello stream that takes the Welcome and closes."""

    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id

    async def send(self, msg: object, timeout: float) -> None:
        pass

    async def close(self) -> None:
        pass
