"""A subscribe stream the master resets is subscribed again, not taken for a lost connection.

The master resets a subscriber's stream when it cannot write to it for a while (yamux gives
up after 5 s with the window full: a replica that did not read, in a long pause). The worker
used to redial for that: a new hello, a NodeConnected in the log and the submit stream
restarted. Now it subscribes again from where its replica stands, on the same connection.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from embedded_nodes import embedded_cluster

from cluster.master.server import Master
from cluster.net import host as nethost
from cluster.shared.events import NodeConnected


@pytest.mark.anyio
async def test_a_reset_subscribe_stream_is_resubscribed_on_the_same_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resets = 0
    send_live = Master._send_live

    async def reset_the_first_live_stream(
        self: Master, fs: nethost.FramedStream, *args: object
    ) -> None:
        nonlocal resets
        if resets == 0:
            resets += 1
            await fs.reset()  # what the master does when a write times out
            return
        await send_live(self, fs, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Master, "_send_live", reset_the_first_live_stream)
    async with embedded_cluster(tmp_path) as cluster:
        master, worker = cluster.master, cluster.worker
        while resets == 0:
            await anyio.sleep(0.05)
        # The replica follows the log past the reset: heartbeats keep it growing.
        target = master.state.last_applied + 5
        while worker.state.last_applied < target:
            await anyio.sleep(0.05)
        assert worker.worker.connections == 1
        me = worker.node_id
        hellos = [
            ie
            for ie in master.store.read_from(1)
            if isinstance(ie.event, NodeConnected) and ie.event.node_id == me
        ]
        assert len(hellos) == 1
        worker.stop()
        master.stop()
