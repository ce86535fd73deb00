"""The master's answers to requests: from its operator's control socket and from hosts.

Thin shell: every decision is `requests.decide`, made and indexed atomically through
`Master.index_decision`, so requests are judged one at a time against the state that
includes every earlier one. The status overview is `status_view.cluster_status`.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Final

import anyio

from cluster.control import (
    MaintenanceCheck,
    MaintenanceSchedule,
    Reply,
    Request,
    SessionDelete,
    StatusRequest,
    decode_request,
    encode_message,
)
from cluster.master.requests import LOCAL_OPERATOR, ShortfallFinder, decide
from cluster.master.server import Master, MasterEventTooLarge, MasterStopping
from cluster.master.window_fit import Shortfall, sessions_short
from cluster.shared.codec import to_builtins
from cluster.shared.events import (
    Event,
    IndexedEvent,
    MaintenanceScheduled,
    SessionDeleted,
    SessionRequested,
)
from cluster.shared.humanize import format_utc
from cluster.shared.maintenance_policy import MaintenancePolicy
from cluster.shared.state import State
from cluster.shared.status_view import cluster_status, render_text

#: Status answers (control socket, members' requests) built at once, in worker threads.
_MAX_STATUS_RENDERS: Final = 2
#: How far apart the start of a window judged off the event loop and the start of the one
#: decided may be for the warning found for the first to be said of the second.
_SAME_START_MS: Final = 5_000
#: A session id names the index of its SessionRequested: "s2496" or "s2496-<name>".
_SESSION_ID: Final = re.compile(r"s([1-9][0-9]{0,17})(?:-.*)?", re.DOTALL)
#: Events after a session's creation read to find its deletion, at most (an operator's
#: `cluster session delete` of a gone session; the log is read in a thread, in batches).
DELETION_SCAN_EVENTS: Final = 20_000
_SCAN_BATCH: Final = 1_000


class MasterService:
    def __init__(self, master: Master, policy: MaintenancePolicy) -> None:
        self.master = master
        self.policy = policy
        #: Status answers are built in worker threads, at most this many at once.
        self._renders = anyio.CapacityLimiter(_MAX_STATUS_RENDERS)

    async def handle(self, request: Request, requester: str) -> Reply:
        if isinstance(request, StatusRequest):
            # Built off the event loop, from the state of this moment (immutable): ~18 ms at
            # 300 nodes and growing with the cluster, and any member may ask, as often as it
            # likes -- inline, it stalled every worker's submissions (as /api/status would).
            return await anyio.to_thread.run_sync(
                self._status_reply, self.master.state, self.master.now_ms(), limiter=self._renders
            )
        replies: list[Reply] = []
        #: Whether the operator's SessionDelete was refused for want of the session, judged
        #: on the state the decision saw (a member's is refused before that: not its call).
        no_session: list[bool] = []

        find_shortfalls = await self._shortfalls_off_the_loop(request, requester)

        def decision(state: State, now_ms: int) -> list[Event]:
            made = decide(
                state, request, requester, now_ms, self.policy, find_shortfalls=find_shortfalls
            )
            replies.append(made.reply)
            no_session.append(
                requester == LOCAL_OPERATOR
                and isinstance(request, SessionDelete)
                and not made.reply.ok
                and request.session_id not in state.sessions
            )
            return list(made.events)

        try:
            await self.master.index_decision(decision)
        except (MasterStopping, MasterEventTooLarge) as exc:
            # Refused before anything was logged: nothing of it is in the log.
            return Reply(ok=False, message=str(exc))
        reply = replies[0]
        if no_session[0] and isinstance(request, SessionDelete):
            # Only then is the log read (up to DELETION_SCAN_EVENTS events): a member's
            # refused request must neither be told about sessions nor start a scan.
            gone = await self.deleted_session(request.session_id)
            if gone is not None:
                return Reply(ok=False, message=gone)
        return reply

    def _status_reply(self, state: State, now_ms: int) -> Reply:
        status = cluster_status(state, now_ms, initial_credit_ms=self.policy.initial_credit_ms)
        return Reply(ok=True, message=render_text(status), data=to_builtins(status))

    async def _shortfalls_off_the_loop(self, request: Request, requester: str) -> ShortfallFinder:
        """For a maintenance check or schedule: the sessions the window would leave unplaced,
        found in a worker thread before the decision, on the state of that moment.

        Finding them places every session twice per moment looked at (`window_fit`): ~120 ms
        at 10,000 nodes and 1,000 sessions for one moment, up to 8 moments. Decisions are
        made on the event loop with the index lock held, where that would stall every
        worker's submissions. The decision then takes this answer when its window is the
        same (node, duration, a start within `_SAME_START_MS`: `--in` moves with the clock);
        it is a warning, so a session created in between may be missing from it. Any other
        window (rare: the state changed the rules' verdict) is judged in place."""
        if not isinstance(request, MaintenanceCheck | MaintenanceSchedule):
            return sessions_short
        found: dict[tuple[str, int], tuple[int, tuple[Shortfall, ...]]] = {}

        def record(
            state: State, window: MaintenanceScheduled, now_ms: int, policy: MaintenancePolicy
        ) -> tuple[Shortfall, ...]:
            short = sessions_short(state, window, now_ms, policy)
            found[(window.node_id, window.duration_ms)] = (window.start_ms, short)
            return short

        state, now_ms = self.master.state, self.master.now_ms()
        await anyio.to_thread.run_sync(
            partial(decide, state, request, requester, now_ms, self.policy, find_shortfalls=record)
        )

        def reuse(
            state: State, window: MaintenanceScheduled, now_ms: int, policy: MaintenancePolicy
        ) -> tuple[Shortfall, ...]:
            start, short = found.get((window.node_id, window.duration_ms), (None, ()))
            if start is not None and abs(start - window.start_ms) <= _SAME_START_MS:
                return short
            return sessions_short(state, window, now_ms, policy)

        return reuse

    async def deleted_session(self, session_id: str) -> str | None:
        """Why a session the state does not hold is not there, when the log shows it was
        created and deleted since (None for an id that never named a session): a second
        `cluster session delete` said "no session", as for a typo."""
        match = _SESSION_ID.fullmatch(session_id)
        if match is None or session_id in self.master.state.sessions:
            return None
        created_idx = int(match.group(1))
        first = await self.master.read_events(created_idx, 1)
        if not first or first[0].idx != created_idx:
            return None
        created = first[0]
        if not (
            isinstance(created.event, SessionRequested) and created.event.session_id == session_id
        ):
            return None
        now_ms = self.master.now_ms()
        deleted = await self._deletion(session_id, created_idx + 1)
        if deleted is None:  # beyond the scan: the log holds it, later
            made = format_utc(created.master_time_ms, now_ms)
            return (
                f"session {session_id!r} (created at index {created_idx}, {made}) was already "
                "deleted: nothing to delete"
            )
        return (
            f"session {session_id!r} was already deleted, at index {deleted.idx} "
            f"({format_utc(deleted.master_time_ms, now_ms)}; created at index {created_idx}): "
            "nothing to delete"
        )

    async def _deletion(self, session_id: str, from_idx: int) -> IndexedEvent | None:
        """The SessionDeleted of `session_id` among the `DELETION_SCAN_EVENTS` events from
        `from_idx` (None when not among them)."""
        idx, end = from_idx, from_idx + DELETION_SCAN_EVENTS
        while idx < end:
            batch = await self.master.read_events(idx, min(_SCAN_BATCH, end - idx))
            for ie in batch:
                if isinstance(ie.event, SessionDeleted) and ie.event.session_id == session_id:
                    return ie
            if not batch:
                return None
            idx = batch[-1].idx + 1
        return None

    async def handle_local(self, request: Request) -> Reply:
        """A request on the master's own control socket: the local operator."""
        return await self.handle(request, LOCAL_OPERATOR)

    async def handle_forwarded(self, payload: bytes, peer_id: str) -> bytes:
        """A request a worker forwarded for its host: judged as that node's own."""
        request = decode_request(payload)
        reply = request if isinstance(request, Reply) else await self.handle(request, peer_id)
        return encode_message(reply)
