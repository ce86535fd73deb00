"""The master's answers to requests: from its operator's control socket and from hosts.

Thin shell: every decision is `requests.decide`, made and indexed atomically through
`Master.index_decision`, so requests are judged one at a time against the state that
includes every earlier one. The status overview is `status_view.cluster_status`.
"""

from __future__ import annotations

from cluster.control import (
    Reply,
    Request,
    StatusRequest,
    decode_request,
    encode_message,
)
from cluster.master.requests import LOCAL_OPERATOR, decide
from cluster.master.server import Master, MasterEventTooLarge, MasterStopping
from cluster.shared.codec import to_builtins
from cluster.shared.events import Event
from cluster.shared.maintenance_policy import MaintenancePolicy
from cluster.shared.state import State
from cluster.shared.status_view import cluster_status, render_text


class MasterService:
    def __init__(self, master: Master, policy: MaintenancePolicy) -> None:
        self.master = master
        self.policy = policy

    async def handle(self, request: Request, requester: str) -> Reply:
        if isinstance(request, StatusRequest):
            status = cluster_status(
                self.master.state,
                self.master.now_ms(),
                initial_credit_ms=self.policy.initial_credit_ms,
            )
            return Reply(ok=True, message=render_text(status), data=to_builtins(status))
        replies: list[Reply] = []

        def decision(state: State, now_ms: int) -> list[Event]:
            made = decide(state, request, requester, now_ms, self.policy)
            replies.append(made.reply)
            return list(made.events)

        try:
            await self.master.index_decision(decision)
        except (MasterStopping, MasterEventTooLarge) as exc:
            # Refused before anything was logged: nothing of it is in the log.
            return Reply(ok=False, message=str(exc))
        return replies[0]

    async def handle_local(self, request: Request) -> Reply:
        """A request on the master's own control socket: the local operator."""
        return await self.handle(request, LOCAL_OPERATOR)

    async def handle_forwarded(self, payload: bytes, peer_id: str) -> bytes:
        """A request a worker forwarded for its host: judged as that node's own."""
        request = decode_request(payload)
        reply = request if isinstance(request, Reply) else await self.handle(request, peer_id)
        return encode_message(reply)
