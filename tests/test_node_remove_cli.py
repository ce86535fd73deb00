"""`cluster node remove` end to end: an embedded master and worker on loopback, the command
run against the master's control socket as an operator would."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest
from embedded_nodes import embedded_cluster

from cluster import cli
from cluster.control import StatusRequest
from cluster.shared.humanize import short_id

DECISIONS = "cluster.master.decisions"
#: Bound on every wait: a broken master fails the test instead of hanging it.
WAIT = 60.0


async def _cli(*argv: str) -> int:
    return await anyio.to_thread.run_sync(cli.main, list(argv))


@pytest.mark.anyio
async def test_node_remove_refuses_a_connected_node_and_removes_a_disconnected_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, logger=DECISIONS)
    async with embedded_cluster(tmp_path, wait=WAIT) as cluster:
        master, worker = cluster.master, cluster.worker
        master_dir = master.data_dir
        me = worker.node_id
        while master.state.nodes.get(me) is None:
            await anyio.sleep(0.05)
        capsys.readouterr()

        # The operator names the node as `cluster status` shows it; replies say
        # its full id (`cluster maintenance --node` and `cluster node remove`).
        shown = short_id(me)
        assert shown != me
        next_ = ("maintenance", "--data-dir", str(master_dir), "next", "--node")
        assert await _cli(*next_, shown.replace("…", "...")) == 0
        assert capsys.readouterr().out.startswith(f"node {me}: ")

        remove = ("node", "remove", me, "--data-dir", str(master_dir))
        assert await _cli("node", "remove", shown, "--data-dir", str(master_dir)) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"cluster node: node {me} is connected: stop its worker first")

        worker.stop()  # silent from now on: liveness disconnects it
        while master.state.nodes[me].connected:
            await anyio.sleep(0.05)
        by_name = ("node", "remove", shown, "--data-dir", str(master_dir))
        assert await _cli(*by_name, "--reason", "decommissioned") == 0
        out = capsys.readouterr().out
        assert out.startswith(f"node {me} removed.")
        assert me not in master.state.nodes

        # Gone from the status an operator reads and the counts in its header (its
        # ledger of this epoch stays: history, settled as any node's).
        status = await master.request(StatusRequest())
        assert status.ok and not status.data["nodes"]
        assert "\nnodes: 0\n" in status.message

        assert await _cli(*remove) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"cluster node: node {me} is already removed: since ")
        assert "(decommissioned)" in err
        assert await _cli("node", "remove", "nobody", "--data-dir", str(master_dir)) == 1
        err = capsys.readouterr().err
        assert err.startswith("cluster node: unknown node nobody: it has never joined")
    removed = [r for r in caplog.records if r.name == DECISIONS and "removed" in r.getMessage()]
    assert [r.levelno for r in removed] == [logging.INFO]
    line = removed[0].getMessage()
    assert line.startswith(f"node {me} (") and line.endswith(
        " removed by the operator: decommissioned; it no longer counts as a node of the cluster"
    )
