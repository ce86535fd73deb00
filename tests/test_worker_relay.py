"""The worker's control socket answers a status request with its own distance to the head of
the log, as the master's view does: a worker far behind says "catching up" (it used to say
what its old state said, e.g. "connecting")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import pytest
from test_node_status import ready_node

from cluster.control import StatusRequest
from cluster.shared.state import State
from cluster.worker.client import Worker
from cluster.worker.relay import HostRelay


@dataclass
class _Worker:
    """What HostRelay reads of a Worker."""

    state: State
    master_last_idx: int
    node_id: str = "node-a"
    phase: str = "catching up"


@pytest.mark.anyio
async def test_status_of_a_worker_far_behind_is_catching_up() -> None:
    state = ready_node().state
    relay = HostRelay(cast(Worker, _Worker(state, state.last_applied + 5000)))
    reply = await relay.handle(StatusRequest())
    assert reply.ok
    assert reply.message == "worker node-a (catching up): catching up: 5,000 events behind"


@pytest.mark.anyio
async def test_status_of_a_worker_at_the_head_is_its_state() -> None:
    state = ready_node().state
    relay = HostRelay(cast(Worker, _Worker(state, state.last_applied, phase="connected")))
    reply = await relay.handle(StatusRequest())
    assert reply.message.startswith("worker node-a (connected): waiting for placement")
