"""The worker's control socket: its host's `cluster maintenance ...`, relayed to the master.

The master judges a relayed request as coming from this node (it arrives over the node's
authenticated libp2p connection), so a host can only manage its own windows. Session
management is the operator's and is refused here with a pointer to the master host.
"""

from __future__ import annotations

from cluster.control import (
    ControlError,
    MaintenanceCancel,
    MaintenanceCheck,
    MaintenanceFinish,
    MaintenanceNext,
    MaintenanceSchedule,
    Reply,
    Request,
    StatusRequest,
    decode_reply,
    encode_message,
)
from cluster.shared.node_status import node_status
from cluster.worker.client import MasterNoAnswer, MasterUnavailable, Worker

_RELAYED = (
    MaintenanceSchedule,
    MaintenanceCheck,
    MaintenanceCancel,
    MaintenanceFinish,
    MaintenanceNext,
)


class HostRelay:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def handle(self, request: Request) -> Reply:
        if isinstance(request, _RELAYED):
            # `request_master` raises only these: the stream's own errors come as them.
            try:
                return decode_reply(await self.worker.request_master(encode_message(request)))
            except MasterNoAnswer as exc:
                return Reply(ok=False, message=f"{exc}: check before asking again")
            except MasterUnavailable as exc:
                return Reply(ok=False, message=f"{exc}; try again once it has reconnected")
            except ControlError as exc:  # refused, or not a reply
                return Reply(ok=False, message=str(exc))
        if isinstance(request, StatusRequest):
            worker = self.worker
            state = worker.state
            # Its own distance to the head of the log, as the master's view passes it: a
            # worker far behind is "catching up", not what its old state says.
            behind = max(0, worker.master_last_idx - state.last_applied)
            mine = node_status(state, worker.node_id, state.last_time_ms, events_behind=behind)
            return Reply(
                ok=True,
                message=f"worker {self.worker.node_id} ({self.worker.phase}): {mine.message}",
                data={"node_id": self.worker.node_id, "phase": self.worker.phase},
            )
        return Reply(
            ok=False,
            message="sessions and nodes are managed by the operator: run `cluster session` or "
            "`cluster node` on the master host (with the master's --data-dir)",
        )
