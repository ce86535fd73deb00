"""A worker that stops cleanly tells the master what its runners did last."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from embedded_nodes import embedded_cluster, until_serving

from cluster.control import SessionCreate
from cluster.shared.events import RunnerStatus, RunnerStatusUpdated


@pytest.mark.anyio
async def test_a_clean_stop_delivers_the_runners_last_events(tmp_path: Path) -> None:
    async with embedded_cluster(tmp_path, workers=0, epoch_length_ms=60_000) as cluster:
        master, worker = cluster.master, cluster.new_worker()
        node = worker.node_id
        # Run in a task group of its own, to see what holds once its run() has returned.
        async with anyio.create_task_group() as worker_tg:
            await worker_tg.start(worker.run)
            reply = await master.request(SessionCreate(slots=1, memory_per_slot_mb=512, name="s"))
            assert reply.ok, reply.message
            await until_serving(master, node)
            worker.stop()
        # run() returned: the worker is stopped, the master still serves.
        box = worker.worker.outbox
        # Nothing left behind in the outbox: the final work report (if the runner did
        # any since its last one) and STOPPED reached the master's log.
        assert box.acked == box.last_seq
        assert not any(r.node_id == node for r in master.state.runners.values())
        mine = [ie.event for ie in master.store.read_from(1) if ie.origin == node]
        statuses = [e.status for e in mine if isinstance(e, RunnerStatusUpdated)]
        assert statuses[-2:] == [RunnerStatus.STOPPING, RunnerStatus.STOPPED]
