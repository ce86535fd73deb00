"""The master process shell: accepts workers, indexes their events, streams the log back.

Everything that decides is elsewhere and pure (admission rules, membership rules, the
planner); this module only moves bytes, serialises indexing, and makes events durable.

Indexing is one task fed by a channel. It takes the submissions waiting (worker batches,
master events; up to `commit_events` events), drops duplicates by (origin, seq), gives the
rest consecutive indices and the master's clock, appends them with ONE durable group
commit, then fans them out to the subscribers and acknowledges each submitter with the
highest seq of its that is durable. What one peer may have waiting is bounded in bytes
(`max_pending_bytes_per_peer`).
A snapshot that comes due is written by another task on a worker thread, so no commit waits
for it; an I/O error in a commit stops the master (fail-stop) after one ERROR line.

A clean stop is ordered (`_stop_cleanly`): from `stop()` on, decisions and submissions are
refused (`MasterStopping`, "master is stopping"); the loops end; a decision already committing
is waited for; then digest.json and a snapshot that came due are written, so both describe
the log's last index.

Every libp2p frame costs a fixed ~0.1-0.3 ms of Python on each side, so the fan-out is
built for few frames: a commit is encoded once and the same bytes go to every subscriber,
each subscriber's queued commits leave in one write, and a worker with a live subscription
takes its acknowledgement from its own events arriving there (Acks still come, coalesced).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import itertools
import logging
import operator
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import anyio
import msgspec
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from cluster.digest_writer import DigestFileWriter, Reading
from cluster.master.admission import AdmissionError, check_event_sizes, check_worker_columns
from cluster.master.decision_log import decision_lines
from cluster.master.member_budget import MemberBudget
from cluster.master.metrics import MasterMetrics
from cluster.net import host as nethost
from cluster.net.framing import DEFAULT_MAX_FRAME, FrameError, encode_frame
from cluster.net.membership import Membership, new_nonce
from cluster.net.protocol import (
    HANDSHAKE_MAX_FRAME,
    HELLO_PROTOCOL,
    PROTOCOL_VERSION,
    REMOVED,
    REMOVED_MESSAGE,
    REQUEST_PROTOCOL,
    SUBMIT_PROTOCOL,
    SUBSCRIBE_PROTOCOL,
    Ack,
    Challenge,
    ControlReplyMsg,
    ControlRequestMsg,
    EventsRaw,
    Hello,
    Ping,
    Pong,
    Proof,
    ProtocolError,
    SnapshotBegin,
    SnapshotChunk,
    SubmitBatch,
    Subscribe,
    Tick,
    Welcome,
    decode,
    encode,
    encode_raw,
    expect,
)
from cluster.shared.eventlog import LogAnchor
from cluster.shared.events import (
    MASTER_ORIGIN,
    MAX_EVENT_BYTES,
    Event,
    IndexedEvent,
    NodeConnected,
    NodeRemoved,
)
from cluster.shared.state import State
from cluster.shared.store import Committed, DueSnapshot, as_logged

log = logging.getLogger(__name__)
#: What the master decided, one line per committed event (`cluster.master.decision_log`).
decisions_log = logging.getLogger("cluster.master.decisions")


class Planner(Protocol):
    """What the master's cycle runs (`cluster.master.planner.Planner`).

    Two steps, so that the planner's own bookkeeping follows the log: a decision the master
    refuses (or fails to commit) leaves the planner as it was, and the next cycle decides
    again from the same footing.
    """

    def __call__(self, state: State, now_ms: int) -> list[Event]:
        """This cycle's events, decided on `state` (nothing of the planner changes yet)."""
        ...

    def logged(self) -> None:
        """The last call's events are durable (none at all counts): the planner may now
        keep what it decided for itself. Never called for a refused decision."""
        ...


#: (state, node_id, boot_id, now_ms) -> extra events when a node (re)connects (e.g. finish its
#: window). The state is the one before the hello's NodeConnected, which records `boot_id`.
ConnectHook = Callable[[State, str, str, int], list[Event]]
#: (request JSON, requesting peer id) -> reply JSON, for requests forwarded by workers.
RequestHandler = Callable[[bytes, str], Awaitable[bytes]]
#: (state, now_ms) -> events: a decision made and indexed atomically (see index_decision).
Decision = Callable[[State, int], Sequence[Event]]


class Store(Protocol):
    """What the master needs of `cluster.shared.store.EventStore`."""

    @property
    def state(self) -> State: ...
    @property
    def last_idx(self) -> int: ...
    def append_decoded(
        self, events: Sequence[IndexedEvent], *, snapshot_when_due: bool = ...
    ) -> Committed: ...
    def read_raw_from(self, idx: int) -> Any: ...
    def read_from(self, idx: int) -> Any: ...
    def latest_snapshot(self) -> tuple[int, bytes] | None: ...
    def due_snapshot(self) -> DueSnapshot | None: ...
    def write_snapshot(self, state: State, anchor: LogAnchor | None = ...) -> bool: ...


#: The largest encoded event the master logs of its own: its log record (the event with its
#: index, time, origin and seq) must fit one Events frame, or no replica could be sent it and
#: every catch-up past it would fail. 1 KiB spare covers the record's and the frame's fields.
MAX_MASTER_EVENT_BYTES: Final = DEFAULT_MAX_FRAME - (1 << 10)


class MasterEventTooLarge(Exception):
    """A decision's event could never be streamed to a replica: nothing of it is logged.

    `event_type` names the event that was too large: the cause, for the master's log.
    """

    def __init__(self, message: str, event_type: str) -> None:
        super().__init__(message)
        self.event_type = event_type


def check_master_events(events: Sequence[Event]) -> None:
    """Raise MasterEventTooLarge for an event over MAX_MASTER_EVENT_BYTES, before it is logged
    (logged, it was committed, then the frames for the replicas could not be built)."""
    for event in events:
        size = len(encode_raw(event))
        if size > MAX_MASTER_EVENT_BYTES:
            name = type(event).__name__
            others = collections.Counter(type(e).__name__ for e in events if e is not event)
            # Said in full: a decision is logged whole or not at all, so the rest goes too.
            dropped = ", ".join(f"{n} {kind}" for kind, n in sorted(others.items()))
            raise MasterEventTooLarge(
                f"{name} of {size} bytes exceeds {MAX_MASTER_EVENT_BYTES} "
                "bytes (one Events frame could not carry it to replicas): not logged"
                + (f", nor the rest of its decision ({dropped})" if dropped else ""),
                name,
            )


#: How long a stopping master waits for its subscribe streams to say why they end.
_STOP_NOTICE_S: Final = 1.0


class MasterStopping(Exception):
    """The master has begun to stop: nothing more is decided or indexed."""

    def __init__(self) -> None:
        super().__init__("master is stopping")


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class MasterConfig:
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    plan_interval: float = 1.0
    #: A peer silent for this long on a stream that expects traffic is considered hung.
    peer_timeout: float = 10.0
    #: Idle subscribe streams get a Tick this often (so workers notice a hung master).
    keepalive: float = 1.0
    #: Broadcast batches a subscriber may have queued before it is cut as too slow.
    subscriber_queue: int = 4096
    #: A subscriber further behind than this (or new) starts from the newest snapshot.
    snapshot_behind: int = 10_000
    #: Subscribe streams one peer may hold at once (a worker uses one; a resubscribe opens
    #: the next as the last closes). Each catching-up stream holds a snapshot and a queue:
    #: unbounded, one member opening a hundred took the master from 115 MB to 916 MB.
    max_subscriptions_per_peer: int = 4
    #: Submit streams one peer may hold at once (a worker uses one).
    max_submit_streams_per_peer: int = 4
    #: Inflated frame bytes of one peer's submissions not yet indexed: while it has this
    #: much waiting, its submit streams read no further frame (a 120 KB compressed frame
    #: inflates to 4 MiB, ~11 MB decoded; counted in submissions, one member's waiting work
    #: took gigabytes and delayed every other member's acks by seconds). A worker has at
    #: most 3 batches of 2,048 events in flight, far less.
    max_pending_bytes_per_peer: int = 8 << 20
    #: What one member may have logged (`cluster.master.member_budget`): inflated frame
    #: bytes per second, sustained, and the burst it may send at once. Beyond, its submit
    #: streams read no further frame until the budget refills (backpressure: nothing is
    #: refused). An honest worker logs a few KB/s; its outbox backlog after an outage is
    #: tens of MB at most. One member flooding runner reports wrote ~75 MB/s of log.
    #: A 4 MiB frame over budget waits 4 s at the default rate (Pongs keep its worker from
    #: taking the master for hung meanwhile).
    member_log_bytes_per_s: int = 1 << 20
    member_log_burst_bytes: int = 64 << 20
    #: Events one group commit takes from the submissions waiting, at most (it may exceed
    #: it by the last submission taken): bounds a commit's time, memory, and a stop's wait.
    commit_events: int = 50_000
    #: Request streams one member may have open at once (a worker forwards one at a time).
    max_request_streams_per_peer: int = 4
    #: A hello must be done (Hello read, Challenge sent, Proof read) this soon after its
    #: stream opened (or `peer_timeout`, if shorter): a worker's takes milliseconds.
    hello_timeout: float = 5.0
    #: Hello streams not yet past the proof, per peer and over all peers: beyond either the
    #: stream is refused ('too-many-streams') and the worker dials again later. Each holds
    #: at most a small frame (`HANDSHAKE_MAX_FRAME`), for at most `hello_timeout`.
    max_hellos_per_peer: int = 2
    max_hellos: int = 128
    #: Refused streams whose first (small) frame the master takes before failing them, so
    #: that the peer reads why (refused at once, its write sees only a reset): hellos, and
    #: streams of other protocols from non-members or beyond a per-peer cap. At most this
    #: many at once over all peers, each for at most a second; beyond, refused at once.
    max_refusals: int = 128
    #: Events per Events frame and per catch-up read.
    frame_events: int = 4096
    snapshot_chunk: int = 1 << 20
    #: Submissions waiting for the indexer before submitters are slowed down.
    inbox_size: int = 1024
    #: A group commit this small is written (and fsynced) on the event loop: the hop to a
    #: thread and back costs more than the blocking; larger ones go to a thread so that
    #: frames keep being read meanwhile.
    inline_commit_events: int = 512
    #: Most one Ack per this many seconds to a peer with a live subscription (it sees its
    #: own durable events there); peers without one are acknowledged at once.
    ack_interval: float = 0.1
    #: Where digest.json is kept current (None: not written; see DigestFileWriter).
    data_dir: Path | None = None
    #: A clean stop writes a snapshot that came due and was not yet written, for at most this
    #: long (then it is abandoned: the next start folds from the one before).
    stop_snapshot_timeout: float = 30.0


class _Submission:
    """Events for the indexer: a worker batch (its seqs, strictly increasing, beside its
    events: columns, so indexing needs no Python per event) or the master's own events
    (`seqs` None: numbered by the indexer)."""

    __slots__ = ("ack", "done", "error", "events", "indexed", "on_done", "origin", "seqs")

    def __init__(self, origin: str, events: list[Event], seqs: list[int] | None = None) -> None:
        self.origin = origin
        self.events = events
        self.seqs = seqs
        self.done = anyio.Event()
        self.ack = 0
        self.indexed: list[IndexedEvent] = []
        self.error: BaseException | None = None
        #: Called once the indexer is done with it (releases its peer's pending bytes).
        self.on_done: Callable[[], None] | None = None

    def finish(self, error: BaseException | None = None) -> None:
        """The indexer is done with it: durable, or failed with `error`. Its events are
        dropped here: the acker, which may hold it a while longer, needs only `ack`."""
        if self.done.is_set():
            return
        self.error = error
        self.events = []
        if self.seqs is not None:
            self.seqs = []
        self.done.set()
        if self.on_done is not None:
            self.on_done()
            self.on_done = None


class _PendingBytes:
    """Inflated frame bytes of each peer's submissions that the indexer has not finished
    (`max_pending_bytes_per_peer`): a peer at its limit reads no more until some is done."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: collections.Counter[str] = collections.Counter()
        self._freed: dict[str, anyio.Event] = {}

    async def wait_for_room(self, peer: str) -> None:
        while self.held[peer] >= self.limit:
            freed = self._freed.get(peer)
            if freed is None:
                freed = self._freed[peer] = anyio.Event()
            await freed.wait()

    def hold(self, sub: _Submission, size: int) -> None:
        peer = sub.origin
        self.held[peer] += size
        sub.on_done = functools.partial(self._release, peer, size)

    def _release(self, peer: str, size: int) -> None:
        self.held[peer] -= size
        if self.held[peer] <= 0:
            del self.held[peer]
        freed = self._freed.pop(peer, None)
        if freed is not None:
            freed.set()


class _Broadcast:
    """One group commit as every subscriber receives it: encoded ONCE, shared by all.

    `frames` is the ready-to-write bytes (one or more framed `Events` messages) holding the
    records `first`..`last`; `records` ((idx, bytes) as logged) is kept for a subscriber
    whose cursor falls inside the commit (it joined during catch-up) and needs only its tail.
    """

    __slots__ = ("first", "frames", "last", "records")

    def __init__(self, records: list[tuple[int, bytes]], frames: bytes) -> None:
        self.first = records[0][0]
        self.last = records[-1][0]
        self.records = records
        self.frames = frames


_seq_of = operator.attrgetter("seq")
_event_of = operator.attrgetter("event")


class Master:
    def __init__(
        self,
        store: Store,
        key_pair: Any,
        membership: Membership,
        config: MasterConfig | None = None,
        *,
        planner: Planner | None = None,
        connect_hook: ConnectHook | None = None,
        request_handler: RequestHandler | None = None,
        now_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        from cluster.net.identity import peer_id_of

        self.store = store
        self.key_pair = key_pair
        self.node_id = peer_id_of(key_pair)
        self.membership = membership
        self.config = config or MasterConfig()
        self.planner = planner
        self.connect_hook = connect_hook
        self.request_handler = request_handler
        self.now_ms = now_ms
        self.addrs: list[str] = []
        self._state = store.state
        self._last_idx = store.last_idx
        self._members: set[str] = set()
        #: Each member's open submit, subscribe and request streams, by the cancel scopes
        #: they are served in: a removed node's session is dropped (`_drop_member`).
        self._member_scopes: dict[str, dict[anyio.CancelScope, nethost.FramedStream]] = {}
        #: Peers removed (`NodeRemoved`) since their last hello: their submissions still
        #: queued for the indexer are refused, not indexed (`_index`).
        self._removed_peers: set[str] = set()
        self._subscribers: dict[int, MemoryObjectSendStream[_Broadcast]] = {}
        self._sub_ids = itertools.count(1)
        self._store_lock = anyio.Lock()
        #: Held while a batch is indexed, and while a decision (planner cycle, request) is
        #: made and indexed: a decision's events follow the state it was made on directly.
        self._index_lock = anyio.Lock()
        send, recv = anyio.create_memory_object_stream[_Submission](self.config.inbox_size)
        self._inbox_send: MemoryObjectSendStream[_Submission] = send
        self._inbox_recv: MemoryObjectReceiveStream[_Submission] = recv
        self._state_changed = anyio.Event()
        #: The newest state due for a snapshot and not yet being written (`_snapshotter`).
        self._snapshot_next: DueSnapshot | None = None
        self._snapshot_wanted = anyio.Event()
        data_dir = self.config.data_dir
        self._digests = None if data_dir is None else DigestFileWriter(data_dir)
        #: The I/O error a commit failed with: the master stops (`_fail_stop`).
        self._fatal: OSError | None = None
        self._stop = anyio.Event()
        self._finished = anyio.Event()
        self.stats = {
            "batches": 0,
            "commits": 0,
            "events": 0,
            "duplicates": 0,
            "refused": 0,
            "refused_decisions": 0,
            # Episodes of a member over its log budget (`member_log_bytes_per_s`).
            "member_throttled": 0,
        }
        #: Event types a decision was refused for (MasterEventTooLarge): each is an ERROR
        #: once per master run; later refusals for the same cause are only counted
        #: (`refused_decisions`), or a planner deciding the same thing again would log it
        #: every cycle, forever.
        self._refused_causes: set[str] = set()
        self.last_plan_seconds = 0.0
        self._plan_seconds_sum = 0.0
        self._plan_cycles = 0
        #: node id -> highest index sent on its subscribe stream (for catch-up lag).
        self._sent_idx: dict[str, int] = {}
        #: node id -> its subscribe streams that are past catch-up (see `_acker`).
        self._live: collections.Counter[str] = collections.Counter()
        #: Open subscribe streams by peer (catching up or live): `max_subscriptions_per_peer`.
        self._subscriptions: collections.Counter[str] = collections.Counter()
        #: Set once the master is stopping and its last subscribe stream has ended.
        self._subscriptions_ended = anyio.Event()
        self._submissions: collections.Counter[str] = collections.Counter()
        self._pending = _PendingBytes(self.config.max_pending_bytes_per_peer)
        self._budget = MemberBudget(
            self.config.member_log_bytes_per_s, self.config.member_log_burst_bytes
        )
        self._requests: collections.Counter[str] = collections.Counter()
        #: Hello streams not yet past the proof, by peer (`max_hellos_per_peer`, `max_hellos`).
        self._hellos: collections.Counter[str] = collections.Counter()
        self._refusals = 0  # streams being refused after their first frame (`_refuse`)
        #: Hello streams of peers the log does not know (at most half of `max_hellos`).
        self._unknown_hellos = 0

    # ------------------------------------------------------------------ public surface
    @property
    def state(self) -> State:
        return self._state

    @property
    def last_idx(self) -> int:
        return self._last_idx

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self._members)

    @property
    def failed_commit(self) -> OSError | None:
        """The I/O error a commit failed with, which stops the master (already logged)."""
        return self._fatal

    def stop(self) -> None:
        self._stop.set()

    async def wait_finished(self) -> None:
        """Return once `run` has stopped and closed the host."""
        await self._finished.wait()

    async def wait_for_index(self, idx: int) -> None:
        while self._last_idx < idx:
            await self._state_changed.wait()

    async def submit_master_events(self, events: Sequence[Event]) -> list[IndexedEvent]:
        """Index events the master decided (origin MASTER_ORIGIN); returns them once durable."""
        if not events:
            return []
        if self._stop.is_set():
            raise MasterStopping()
        check_master_events(events)
        sub = _Submission(MASTER_ORIGIN, list(events))
        try:
            await self._inbox_send.send(sub)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise MasterStopping() from None
        await sub.done.wait()
        if sub.error is not None:
            raise sub.error
        return sub.indexed

    async def read_events(self, from_idx: int, limit: int) -> list[IndexedEvent]:
        """Up to `limit` indexed events from `from_idx` (for the HTTP API's event stream)."""

        def read() -> list[IndexedEvent]:
            it = self.store.read_from(max(1, from_idx))
            try:
                return list(itertools.islice(it, limit))
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()

        if from_idx > self._last_idx:
            return []
        async with self._store_lock:
            return await anyio.to_thread.run_sync(read)

    def metrics(self) -> MasterMetrics:
        """The master's own measurements, for /metrics."""
        log_dir = getattr(self.store, "log", None)
        size = 0
        directory = getattr(log_dir, "directory", None)
        if directory is not None:
            with contextlib.suppress(OSError):
                size = sum(p.stat().st_size for p in Path(directory).glob("*.seg"))
        lag = {node: max(0, self._last_idx - idx) for node, idx in self._sent_idx.items()}
        return MasterMetrics(
            events_indexed=self._last_idx,
            log_size_bytes=size,
            plan_cycle_last_seconds=self.last_plan_seconds,
            plan_cycle_seconds_sum=self._plan_seconds_sum,
            plan_cycles_total=self._plan_cycles,
            catch_up_lag_by_node=lag,
            counters={k: v for k, v in self.stats.items() if k != "batches"},
        )

    async def index_decision(
        self, decide: Decision, *, on_durable: Callable[[], None] | None = None
    ) -> list[IndexedEvent]:
        """Decide on the current state and index the result before anything else.

        The planner's cycle and every request go through here, one at a time: each decision
        sees the state that includes every earlier decision, and no worker event lands
        between a decision and its events (DESIGN rule 2: the master's clock is read here).
        Raises `MasterStopping` once the master has begun to stop (nothing is decided then);
        a decision already made when it began is indexed before the stop goes on. Raises
        `MasterEventTooLarge` (logged as an ERROR, once per kind of event) for a decision
        with an event no Events frame could carry: nothing of it is logged. `on_durable` is
        called once the decision is durable (at once for an empty one), never for one that
        was refused or failed.
        """
        async with self._index_lock:
            # Checked with the lock held: `_stop_cleanly` takes the lock after the flag is
            # set, so every decision either finished before it or is refused here.
            if self._stop.is_set():
                raise MasterStopping()
            state = self._state
            now = max(self.now_ms(), state.last_time_ms)
            events = decide(state, now)
            if not events:
                if on_durable is not None:
                    on_durable()
                return []
            try:
                check_master_events(events)
            except MasterEventTooLarge as exc:
                self.stats["refused_decisions"] += 1
                if exc.event_type in self._refused_causes:
                    log.debug("a decision was refused again: %s", exc)
                else:
                    self._refused_causes.add(exc.event_type)
                    log.error(
                        "a decision was refused: %s (said once; later refusals for a too large "
                        "%s are counted in refused_decisions)",
                        exc,
                        exc.event_type,
                    )
                raise
            sub = _Submission(MASTER_ORIGIN, list(events))
            # Stamped with the time it was decided at: a clock that steps back before the
            # indexer reads it again must not date the events before the rules they passed.
            await self._index([sub], now)
            # Said only now that it is durable: a commit that failed raised above.
            if on_durable is not None:
                on_durable()
            _log_decision(events, state, now)
            return sub.indexed

    async def run(self, *, task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(task_status)
            await self._stop_cleanly()
        finally:
            self.close()  # however it ended: nothing more is decided
            self._finished.set()

    async def _stop_cleanly(self) -> None:
        """The end of a clean stop, once the host is closed and the loops have ended.

        New decisions were refused from `stop()` on; one that was already committing (a
        request waiting for the log behind a catch-up read, say) is waited for, so that what
        follows describes the log's last index: digest.json (the writer may not have run
        since the last commit), then the snapshot that came due and was not yet written.
        """
        async with self._index_lock:
            pass  # every decision made before the stop is now durable
        self._refuse_waiting_submissions()
        if self._digests is not None:
            self._digests.write_now(self._state, role="master")
        if self._snapshot_next is not None:
            self._snapshot_next = None
            await self._write_last_snapshot(self._state)

    def _refuse_waiting_submissions(self) -> None:
        """Submissions still queued for the stopped indexer are refused (not indexed), so
        their submitters stop waiting; a worker's stay in its outbox for the next start."""
        while True:
            try:
                sub = self._inbox_recv.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                return
            sub.finish(MasterStopping())

    async def _write_last_snapshot(self, state: State) -> None:
        """Write the snapshot that came due before the stop, at the final index (it covers
        the due one); bounded by `stop_snapshot_timeout`, and not fatal: a snapshot only
        shortens the next load. One abandoned at the bound finishes or is pruned later (it
        is written to a temporary file and renamed; it does not touch the log)."""
        idx = state.last_applied
        timeout = self.config.stop_snapshot_timeout
        with anyio.move_on_after(timeout) as scope:
            try:
                await anyio.to_thread.run_sync(
                    self.store.write_snapshot, state, abandon_on_cancel=True
                )
            except Exception:
                log.exception("could not write a snapshot at index %d while stopping", idx)
        if scope.cancelled_caught:
            log.warning(
                "the snapshot at index %d was not written within %g s of stopping: left "
                "behind; the next start folds from an older one",
                idx,
                timeout,
            )

    def close(self) -> None:
        """Release the submission queue (done by `run` on its way out; idempotent). The
        store is the caller's to close; nothing is decided from here on."""
        self._stop.set()
        self._inbox_send.close()
        self._inbox_recv.close()

    async def _run(self, task_status: TaskStatus[list[str]]) -> None:
        nethost.tune_gc()
        async with nethost.running_host(self.key_pair, self.config.listen) as host:
            host.set_stream_handler(HELLO_PROTOCOL, nethost.safe_handler(self._hello, "hello"))
            host.set_stream_handler(SUBMIT_PROTOCOL, nethost.safe_handler(self._submit, "submit"))
            host.set_stream_handler(
                SUBSCRIBE_PROTOCOL, nethost.safe_handler(self._subscribe, "subscribe")
            )
            host.set_stream_handler(
                REQUEST_PROTOCOL, nethost.safe_handler(self._request, "request")
            )
            self.addrs = nethost.full_addrs(host)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._indexer)
                tg.start_soon(self._cycle)
                if self._digests is not None:
                    interval = self.config.plan_interval
                    tg.start_soon(self._digests.keep_current, self._digest_reading, interval)
                tg.start_soon(self._snapshotter)
                task_status.started(self.addrs)
                await self._stop.wait()
                tg.cancel_scope.cancel()  # a snapshot being written is waited for
            await self._let_subscribers_hear_the_stop()
        if self._fatal is not None:
            # A commit failed where its error was not fatal to the caller (a hello, a
            # control request): the master ends all the same.
            raise self._fatal

    async def _let_subscribers_hear_the_stop(self) -> None:
        """Each subscribe stream now ends saying "stopping" (`_cut`): give them a moment to
        write it before the host closes under them (a worker then knows the master stopped;
        it used to read that it had fallen behind, or just a reset). Returns as soon as the
        last one has ended, however it ended."""
        for send in self._subscribers.values():
            send.close()
        if self._subscriptions:
            with anyio.move_on_after(_STOP_NOTICE_S):
                await self._subscriptions_ended.wait()

    # ------------------------------------------------------------------ indexing
    async def _indexer(self) -> None:
        while True:
            batch = [await self._inbox_recv.receive()]
            events = len(batch[0].events)
            while events < self.config.commit_events:
                try:
                    sub = self._inbox_recv.receive_nowait()
                except anyio.WouldBlock:
                    break
                batch.append(sub)
                events += len(sub.events)
            try:
                async with self._index_lock:
                    await self._index(batch)
            except BaseException as exc:
                # Cancelled by the stop: not acknowledged, and said as such (a worker resends
                # what it has not seen acknowledged; the master drops what it already has).
                why = MasterStopping() if self._stop.is_set() and self._fatal is None else exc
                for sub in batch:
                    sub.finish(why)
                raise

    async def _index(self, batch: list[_Submission], now: int | None = None) -> None:
        state = self._state
        idx = self._last_idx
        if now is None:
            now = max(self.now_ms(), state.last_time_ms)
        last_seq: dict[str, int] = {}
        records: list[IndexedEvent] = []
        for sub in batch:
            origin = sub.origin
            seqs = sub.seqs
            if seqs is not None and origin in self._removed_peers:
                # Queued before its node's removal was committed: not indexed, or it would
                # speak for a node out of the cluster (its stream is being dropped).
                sub.finish(ProtocolError(REMOVED, REMOVED_MESSAGE))
                continue
            seq = last_seq.get(origin)
            if seq is None:
                seq = state.last_seq(origin)
            if seqs is None:
                for ev in sub.events:
                    idx += 1
                    seq += 1
                    # Built in memory: made what the log will give back (see append_decoded).
                    ie = as_logged(IndexedEvent(idx, now, origin, seq, ev))
                    records.append(ie)
                    sub.indexed.append(ie)
            else:
                # A worker batch's seqs strictly increase (checked in `_submit`), so the
                # duplicates (seq <= the origin's last) are a prefix: skip it, index the rest
                # in one pass. Its events were decoded from the worker's frame: as logged.
                start = bisect.bisect_right(seqs, seq)
                if start:
                    self.stats["duplicates"] += start
                n = len(seqs) - start
                if n:
                    # Built column-wise by `map`: no Python frame per event.
                    records.extend(
                        map(
                            IndexedEvent,
                            range(idx + 1, idx + 1 + n),
                            itertools.repeat(now, n),
                            itertools.repeat(origin, n),
                            itertools.islice(seqs, start, None),
                            itertools.islice(sub.events, start, None),
                        )
                    )
                    idx += n
                    seq = seqs[-1]
            last_seq[origin] = seq
            sub.ack = seq
        if records:
            # A snapshot that comes due is written by `_snapshotter`, off the event loop:
            # it is not part of the acknowledgement, so the commit does not wait for it.
            commit = functools.partial(self.store.append_decoded, records, snapshot_when_due=False)
            try:
                async with self._store_lock:
                    if len(records) <= self.config.inline_commit_events:
                        committed = commit()
                    else:
                        committed = await anyio.to_thread.run_sync(commit)
            except OSError as exc:
                self._fail_stop(exc)
                raise
            due = self.store.due_snapshot()
            if due is not None:
                self._snapshot_next = due  # replaces one still waiting: the newest is kept
                self._snapshot_wanted.set()
            self._state = committed.state
            self._last_idx = records[-1].idx
            self.stats["commits"] += 1
            self.stats["events"] += len(records)
            if self._subscribers:
                # The log's own bytes, framed once for every subscriber: nothing re-encoded.
                raw = committed.records
                self._broadcast(_Broadcast(raw, self._encode_frames(raw)))
            changed, self._state_changed = self._state_changed, anyio.Event()
            changed.set()
            for sub in batch:
                if sub.seqs is None:  # a decision: a node the operator removed leaves now
                    for ev in sub.events:
                        if type(ev) is NodeRemoved:
                            self._drop_member(ev.node_id)
        self.stats["batches"] += len(batch)
        for sub in batch:
            sub.finish()

    def _drop_member(self, peer: str) -> None:
        """The operator removed `peer`'s node: drop its member session. Its streams still
        open (a hung worker the master marked disconnected keeps them) are closed with code
        `removed` (`_as_member`), and it is no member until it says hello again, which logs
        a NodeConnected with its worker process and runner setting. Without this it spoke
        on: its next event re-created the node in the log with neither."""
        scopes = self._member_scopes.get(peer, {})
        if peer in self._members or scopes:
            log.info(
                "dropped the session of removed node %s (%d open streams): it must say "
                "hello again to rejoin",
                peer,
                len(scopes),
            )
        self._members.discard(peer)
        self._removed_peers.add(peer)
        for scope, fs in list(scopes.items()):
            # Not in the middle of a frame: the worker must read the `removed` after it.
            fs.cancel_between_frames(scope)

    async def _as_member(
        self,
        fs: nethost.FramedStream,
        serve: Callable[[nethost.FramedStream], Awaitable[None]],
    ) -> None:
        """Serve a member's stream with `serve`; should its node be removed meanwhile
        (`_drop_member`), the stream is failed with code `removed`, saying why. Called
        right after `_require_member`, with no await between: no removal goes unseen."""
        peer = fs.peer_id
        scope = anyio.CancelScope()
        scopes = self._member_scopes.setdefault(peer, {})
        scopes[scope] = fs
        try:
            with scope:
                await serve(fs)
        finally:
            scopes.pop(scope, None)
            if not scopes and self._member_scopes.get(peer) is scopes:
                del self._member_scopes[peer]
        if scope.cancelled_caught:
            # Cancelled between frames (`_drop_member`), so this is read as a message of its
            # own, and before the stream's reset (`FramedStream.fail`).
            await fs.fail(REMOVED, REMOVED_MESSAGE)

    def _encode_frames(self, records: list[tuple[int, bytes]]) -> bytes:
        """(idx, encoded event) records as framed `Events` messages of at most `frame_events`
        each (halved until each frame fits the frame limit: events may be large)."""
        out: list[bytes] = []
        step = self.config.frame_events
        todo = [records[off : off + step] for off in range(0, len(records), step)]
        while todo:
            part = todo.pop(0)
            payload = encode(EventsRaw(events=[msgspec.Raw(raw) for _, raw in part]))
            if len(payload) > DEFAULT_MAX_FRAME and len(part) > 1:
                half = len(part) // 2
                todo[:0] = [part[:half], part[half:]]
                continue
            # Compressed once, here, for every subscriber (see `framing`).
            out.append(encode_frame(payload, DEFAULT_MAX_FRAME, compress=True))
        return b"".join(out)

    def _broadcast(self, item: _Broadcast) -> None:
        for sid, send in list(self._subscribers.items()):
            try:
                send.send_nowait(item)
            except anyio.WouldBlock:
                # Too slow: cut it. Its queue is full, so the cut is said by closing it: the
                # subscriber's stream sends what was queued, then 'lagging' (`_send_live`), and
                # it resubscribes from its last index on the same connection (DESIGN section 7).
                del self._subscribers[sid]
                send.close()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                del self._subscribers[sid]

    def _fail_stop(self, exc: OSError) -> None:
        """A commit could not be made durable: say so once, with the file and the error,
        and stop the master (fail-stop: the log refuses appends until it is reopened, and
        what the page cache holds after a failed write or fsync is unknown)."""
        if self._fatal is None:
            self._fatal = exc
            where = exc.filename
            if where is None:
                where = getattr(getattr(self.store, "log", None), "directory", "the event log")
            log.error(
                "event log write failed: %s: %s; the master stops (events after index %d "
                "were not acknowledged; restart it once the disk is fixed)",
                where,
                exc.strerror or exc,
                self._last_idx,
            )
        self._stop.set()

    async def _snapshotter(self) -> None:
        """Write the snapshots that `_index` found due, one at a time, on a worker thread.

        The State is immutable, so commits go on meanwhile; snapshots that come due during
        a write are coalesced into the newest. A failure is logged, never fatal: the events
        are durable and a snapshot only shortens the next load. A write in progress is not
        abandoned when the master stops: `stop()` waits for it; one due and not yet taken
        here is written by `_stop_cleanly`.
        """
        while True:
            await self._snapshot_wanted.wait()
            self._snapshot_wanted = anyio.Event()
            due, self._snapshot_next = self._snapshot_next, None
            if due is None:
                continue
            try:
                # Shielded: a state taken is written, even if the stop came just now (the
                # thread's start would otherwise be a cancellation point that drops it).
                # With its own anchor: by now the log may be past it, another one due.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self.store.write_snapshot, *due)
            except Exception:
                log.exception("could not write a snapshot at index %d", due.state.last_applied)

    async def _cycle(self) -> None:
        """Once per plan interval: run the planner."""
        while True:
            await anyio.sleep(self.config.plan_interval)
            if self.planner is not None:
                try:
                    # The planner keeps its liveness book only once its decision is durable.
                    await self.index_decision(self._plan_safely, on_durable=self.planner.logged)
                except MasterStopping:
                    return  # stopped between the sleep and the decision
                except MasterEventTooLarge:
                    pass  # logged; the state is unchanged, and the next cycle decides again

    def _digest_reading(self) -> Reading:
        return self._state, {"role": "master"}

    def _plan_safely(self, state: State, now_ms: int) -> list[Event]:
        assert self.planner is not None
        started = time.perf_counter()
        try:
            return self.planner(state, now_ms)
        except Exception:
            log.exception("planner failed this cycle; state unchanged")
            return []
        finally:
            self.last_plan_seconds = time.perf_counter() - started
            self._plan_seconds_sum += self.last_plan_seconds
            self._plan_cycles += 1

    # ------------------------------------------------------------------ hello
    async def _hello(self, fs: nethost.FramedStream) -> None:
        peer = fs.peer_id
        cfg = self.config
        reason = self.membership.refuse_reason(peer)
        if reason is not None:
            # Off the allow-list: decided by the peer id alone, before it may hold one of the
            # hello slots (new peer ids cost nothing: strangers filling them locked every
            # member out).
            self.stats["refused"] += 1
            log.warning("refused %s: %s", peer, reason)
            await self._refuse(fs, "unauthorized", reason)
            return
        if self._hellos[peer] >= cfg.max_hellos_per_peer:
            await self._refuse(
                fs,
                "too-many-streams",
                f"peer {peer} already holds {cfg.max_hellos_per_peer} hello streams",
            )
            return
        # A peer the log does not know yet may be a stranger that holds its stream for the
        # whole hello deadline without knowing the cluster secret: unknown peers share half
        # of the slots, so that nodes reconnecting always find room.
        known = peer in self._state.nodes
        busy = None
        if sum(self._hellos.values()) >= cfg.max_hellos:
            busy = f"{cfg.max_hellos} hellos in progress: dial again later"
        elif not known and self._unknown_hellos >= cfg.max_hellos // 2:
            busy = (
                f"{cfg.max_hellos // 2} hellos of peers new to the cluster in progress: "
                "dial again later"
            )
        if busy is not None:
            await self._refuse(fs, "too-many-streams", busy)
            return
        self._unknown_hellos += not known
        try:
            with _stream_slot(self._hellos, peer, cfg.max_hellos_per_peer):
                hello = await self._admit(fs)
        finally:
            self._unknown_hellos -= not known
        if hello is not None:
            await self._join(fs, hello)

    async def _refuse(self, fs: nethost.FramedStream, code: str, message: str) -> None:
        """Refuse a stream whose first frame has not been read (a hello beyond the caps or
        off the allow-list, a non-member's stream, one beyond its peer's cap). That frame
        (small) is taken first so that the peer reads why, by at most `max_refusals` such
        streams at once: beyond, it is refused at once (and likely sees only a reset)."""
        if self._refusals < self.config.max_refusals:
            self._refusals += 1
            try:
                await _take_first_frame(fs)
            finally:
                self._refusals -= 1
        await fs.fail(code, message)

    async def _admit(self, fs: nethost.FramedStream) -> Hello | None:
        """The hello up to the proof: the peer's Hello if it passed, else None (the stream is
        failed, saying why). Nothing the peer sends here may exceed `HANDSHAKE_MAX_FRAME`,
        and all of it must come within `hello_timeout`."""
        peer = fs.peer_id
        t = min(self.config.hello_timeout, self.config.peer_timeout)
        try:
            with anyio.fail_after(t):
                hello = expect(await fs.recv(t, HANDSHAKE_MAX_FRAME), Hello)
                if hello.version != PROTOCOL_VERSION:
                    raise ProtocolError(
                        "version",
                        f"protocol version {hello.version} unsupported "
                        f"(this master speaks {PROTOCOL_VERSION})",
                    )
                nonce = new_nonce()
                proof = self.membership.master_proof(hello.nonce, self.node_id, peer)
                await fs.send(Challenge(nonce=nonce, proof=proof), t)
                answer = expect(await fs.recv(t, HANDSHAKE_MAX_FRAME), Proof)
        except (ProtocolError, TimeoutError, EOFError, FrameError) as exc:
            await fs.fail(*nethost.error_of(exc, "hello", t))
            return None
        reason = self.membership.check_worker_proof(answer.proof, nonce, peer, self.node_id)
        if reason is not None:
            self.stats["refused"] += 1
            log.warning("refused %s: %s", peer, reason)
            await fs.fail("unauthorized", reason)
            return None
        return hello

    async def _join(self, fs: nethost.FramedStream, hello: Hello) -> None:
        """A peer that passed hello: a member from now on, its NodeConnected indexed."""
        peer = fs.peer_id
        t = self.config.peer_timeout

        def connected(state: State, now: int) -> list[Event]:
            # A member from here, under the index lock: a removal is decided either before
            # (and this hello readmits the node) or after (refused: it is connected).
            self._members.add(peer)
            self._removed_peers.discard(peer)
            events: list[Event] = [
                NodeConnected(
                    node_id=peer, boot_id=hello.boot_id, runner_digest=hello.runner_digest
                )
            ]
            if self.connect_hook is not None:
                events += self.connect_hook(state, peer, hello.boot_id, now)
            return events

        try:
            await self.index_decision(connected)
        except MasterStopping as exc:
            # Not a refusal of the node (it is not in `_REFUSALS`): it dials again.
            await fs.fail("stopping", str(exc))
            return
        welcome = Welcome(
            node_id=peer,
            last_idx=self._last_idx,
            last_seq=self._state.last_seq(peer),
        )
        await fs.send(welcome, t)
        await fs.close()

    async def _require_member(self, fs: nethost.FramedStream, what: str) -> bool:
        if fs.peer_id in self._members:
            return True
        self.stats["refused"] += 1
        reason = self.membership.refuse_reason(fs.peer_id) or "it has not passed hello"
        log.warning("refused %s stream from %s: %s", what, fs.peer_id, reason)
        await self._refuse(fs, "unauthorized", f"{what} refused: peer {fs.peer_id}: {reason}")
        return False

    # ------------------------------------------------------------------ request
    async def _request(self, fs: nethost.FramedStream) -> None:
        """A host's request forwarded by its worker: judged as coming from that node."""
        if await self._require_member(fs, "request"):
            await self._as_member(fs, self._member_request)

    async def _member_request(self, fs: nethost.FramedStream) -> None:
        limit = self.config.max_request_streams_per_peer
        with _stream_slot(self._requests, fs.peer_id, limit) as allowed:
            if allowed:
                await self._serve_request(fs)
            else:
                busy = _too_many_streams(fs.peer_id, limit, "request")
                await self._refuse(fs, "too-many-streams", busy)

    async def _serve_request(self, fs: nethost.FramedStream) -> None:
        t = self.config.peer_timeout
        try:
            msg = expect(await fs.recv(t), ControlRequestMsg)
        except (ProtocolError, TimeoutError, EOFError, FrameError) as exc:
            await fs.fail(*nethost.error_of(exc, "request", t))
            return
        if self.request_handler is None:
            reply = b'{"ok":false,"message":"this master takes no requests"}'
        else:
            reply = await self.request_handler(msg.payload, fs.peer_id)
        await fs.send(ControlReplyMsg(payload=reply), t)
        await fs.close()

    # ------------------------------------------------------------------ submit
    async def _submit(self, fs: nethost.FramedStream) -> None:
        if await self._require_member(fs, "submit"):
            await self._as_member(fs, self._member_submit)

    async def _member_submit(self, fs: nethost.FramedStream) -> None:
        limit = self.config.max_submit_streams_per_peer
        with _stream_slot(self._submissions, fs.peer_id, limit) as allowed:
            if allowed:
                await self._serve_submit(fs)
                return
            busy = _too_many_streams(fs.peer_id, limit, "submit")
            await self._refuse(fs, "too-many-streams", busy)

    async def _serve_submit(self, fs: nethost.FramedStream) -> None:
        peer = fs.peer_id
        send, recv = anyio.create_memory_object_stream[_Submission | Pong](64)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._acker, fs, recv)
                async with send:
                    while True:
                        # No frame is read (and decoded) while this peer has its fill
                        # waiting for the indexer: a blocked stream holds nothing decoded.
                        await self._pending.wait_for_room(peer)
                        await self._within_budget(peer, send)
                        try:
                            frame = await fs.recv_frame(self.config.peer_timeout)
                        except TimeoutError:
                            raise ProtocolError(
                                "timeout",
                                f"no frame from {peer} for {self.config.peer_timeout:g} s",
                            ) from None
                        self._budget.charge(peer, len(frame), anyio.current_time())
                        msg = decode(frame)
                        if isinstance(msg, Ping):
                            await send.send(Pong(last_idx=self._last_idx))
                            continue
                        batch = expect(msg, SubmitBatch)
                        seqs = list(map(_seq_of, batch.events))
                        events = list(map(_event_of, batch.events))
                        check_worker_columns(peer, seqs, events)
                        if len(frame) > MAX_EVENT_BYTES:
                            check_event_sizes(events)
                        sub = _Submission(peer, events, seqs)
                        self._pending.hold(sub, len(frame))
                        try:
                            await self._inbox_send.send(sub)
                        except BaseException:
                            sub.finish(MasterStopping())  # never queued: release its bytes
                            raise
                        await send.send(sub)
        except* EOFError:
            pass  # the worker closed its stream: normal at shutdown
        except* (ProtocolError, AdmissionError, FrameError) as group:
            exc = group.exceptions[0]
            if isinstance(exc, AdmissionError):
                self.stats["refused"] += 1
                code, message = exc.code, str(exc)
            else:
                code, message = nethost.error_of(exc)
            # A stop is no fault of the stream's: the worker reads why and dials again.
            level = logging.DEBUG if code == "stopping" else logging.WARNING
            log.log(level, "submit stream of %s reset: %s: %s", peer, code, message)
            await fs.fail(code, message)

    async def _within_budget(
        self, peer: str, acks: MemoryObjectSendStream[_Submission | Pong]
    ) -> None:
        """Return once `peer` is within its log budget (`MemberBudget`): until then its
        stream reads nothing (its frames wait in the network, its events in its outbox).
        What it sent before is still indexed and acknowledged meanwhile, and a Pong each
        `keepalive` tells its worker the master is alive (it drops a submit stream silent
        for its peer timeout, and would resend the same backlog)."""
        cfg = self.config
        while True:
            wait, new = self._budget.wait_s(peer, anyio.current_time())
            if wait <= 0:
                return
            if new:
                self.stats["member_throttled"] += 1
                log.warning(
                    "member %s is over its log budget (%d bytes/s, burst %d): its submissions "
                    "are read more slowly until it is back within it",
                    peer,
                    cfg.member_log_bytes_per_s,
                    cfg.member_log_burst_bytes,
                )
            if wait <= cfg.keepalive:
                await anyio.sleep(wait)
            else:
                await anyio.sleep(cfg.keepalive)
                await acks.send(Pong(last_idx=self._last_idx))

    async def _acker(
        self, fs: nethost.FramedStream, recv: MemoryObjectReceiveStream[_Submission | Pong]
    ) -> None:
        """Acknowledge each submission once it is durable, in order.

        One Ack covers every submission already queued behind the first (they are usually
        in the same group commit). A peer with a live subscription sees its own events
        arrive (only durable events are broadcast) and acknowledges them from there, so it
        gets at most one Ack per `ack_interval`: every frame costs CPU on both sides.
        """
        t = self.config.peer_timeout
        owed = 0  # durable seq not yet acknowledged
        last_ack = -float("inf")
        async with recv:
            while True:
                item: _Submission | Pong | None = None
                try:
                    if owed:
                        wait = self.config.ack_interval - (anyio.current_time() - last_ack)
                        with anyio.move_on_after(max(0.0, wait)):
                            item = await recv.receive()
                    else:
                        item = await recv.receive()
                except anyio.EndOfStream:
                    if owed:
                        await fs.send(Ack(seq=owed), t)
                    return
                pong: Pong | None = None
                while item is not None:
                    if isinstance(item, Pong):
                        pong = item
                        break
                    await item.done.wait()
                    if isinstance(item.error, MasterStopping):
                        raise ProtocolError("stopping", str(item.error))
                    if item.error is not None:
                        raise ProtocolError("internal", f"indexing failed: {item.error}")
                    owed = max(owed, item.ack)
                    try:
                        item = recv.receive_nowait()
                    except anyio.WouldBlock:
                        item = None
                now = anyio.current_time()
                if owed and (
                    pong is not None
                    or fs.peer_id not in self._live
                    or now - last_ack >= self.config.ack_interval
                ):
                    await fs.send(Ack(seq=owed), t)
                    owed = 0
                    last_ack = now
                if pong is not None:
                    await fs.send(pong, t)

    # ------------------------------------------------------------------ subscribe
    async def _subscribe(self, fs: nethost.FramedStream) -> None:
        if await self._require_member(fs, "subscribe"):
            await self._as_member(fs, self._member_subscribe)

    async def _member_subscribe(self, fs: nethost.FramedStream) -> None:
        cfg = self.config
        try:
            req = expect(await fs.recv(cfg.peer_timeout), Subscribe)
        except (ProtocolError, FrameError, TimeoutError) as exc:
            await fs.fail(*nethost.error_of(exc, "subscribe request", cfg.peer_timeout))
            return
        limit = cfg.max_subscriptions_per_peer
        try:
            with _stream_slot(self._subscriptions, fs.peer_id, limit) as allowed:
                if allowed:
                    await self._serve_subscription(fs, req)
                else:
                    busy = _too_many_streams(fs.peer_id, limit, "subscribe")
                    await fs.fail("too-many-streams", busy)
        finally:
            # However it ended (an unexpected error included): a stop waiting for the last
            # subscription to end (`_let_subscribers_hear_the_stop`) waits no longer.
            if self._stop.is_set() and not self._subscriptions:
                self._subscriptions_ended.set()

    async def _serve_subscription(self, fs: nethost.FramedStream, req: Subscribe) -> None:
        cfg = self.config
        if self._stop.is_set():  # its queue would never be closed: it is said now
            await fs.fail("stopping", str(MasterStopping()))
            return
        cursor = max(1, req.from_idx)
        if cursor > self._last_idx + 1:
            await fs.fail(
                "ahead-of-log",
                f"asked for index {req.from_idx} but the log ends at {self._last_idx}: "
                "drop the replica and subscribe from 0",
            )
            return
        send, recv = anyio.create_memory_object_stream[_Broadcast](cfg.subscriber_queue)
        sid = next(self._sub_ids)
        boundary = self._last_idx  # no await between this read and registering
        self._subscribers[sid] = send
        live = False
        try:
            cursor = await self._send_catch_up(fs, cursor, boundary, sid)
            self._live[fs.peer_id] += 1
            live = True
            await self._send_live(fs, recv, cursor)
        except (
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            anyio.EndOfStream,
            EOFError,
            TimeoutError,
        ):
            await fs.reset()  # the worker left, hung, or the master is stopping
        except ProtocolError as exc:
            await fs.fail(exc.code, str(exc))
        finally:
            if live:
                self._live[fs.peer_id] -= 1
                if not self._live[fs.peer_id]:
                    del self._live[fs.peer_id]
                    # Catch-up lag is reported for nodes being served, not for ones gone.
                    self._sent_idx.pop(fs.peer_id, None)
            self._subscribers.pop(sid, None)
            send.close()
            recv.close()

    async def _send_catch_up(
        self, fs: nethost.FramedStream, cursor: int, boundary: int, sid: int
    ) -> int:
        cfg = self.config
        if cursor <= boundary and (cursor == 1 or boundary - cursor >= cfg.snapshot_behind):
            async with self._store_lock:
                snap = await anyio.to_thread.run_sync(self.store.latest_snapshot)
            if snap is not None and snap[0] >= cursor:
                snap_idx, data = snap
                await fs.send(SnapshotBegin(idx=snap_idx, size=len(data)), cfg.peer_timeout)
                for off in range(0, len(data), cfg.snapshot_chunk):
                    chunk = SnapshotChunk(data=data[off : off + cfg.snapshot_chunk])
                    await fs.send(chunk, cfg.peer_timeout)
                cursor = snap_idx + 1
        while cursor <= boundary:
            # Cut while catching up (or the master is stopping): stop reading the log.
            if sid not in self._subscribers or self._stop.is_set():
                raise self._cut(cursor)
            n = min(cfg.frame_events, boundary - cursor + 1)
            async with self._store_lock:
                chunk_records = await anyio.to_thread.run_sync(self._read_raw, cursor, n)
            if not chunk_records:
                raise ProtocolError("internal", f"log has no record at index {cursor}")
            await self._send_records(fs, chunk_records)
            cursor = chunk_records[-1][0] + 1
        return cursor

    def _cut(self, cursor: int) -> ProtocolError:
        """Why a subscriber's queue was closed under it: the master is stopping (`_run`
        closes every queue on its way out) or the subscriber fell behind (`_broadcast`).
        Told apart so that a worker does not report a stop as having fallen behind."""
        if self._stop.is_set():
            return ProtocolError("stopping", "master is stopping")
        return _lagging(self.config.subscriber_queue, cursor)

    def _read_raw(self, start: int, n: int) -> list[tuple[int, bytes]]:
        it = self.store.read_raw_from(start)
        try:
            return list(itertools.islice(it, n))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    async def _send_records(
        self, fs: nethost.FramedStream, records: list[tuple[int, bytes]]
    ) -> None:
        await fs.send_bytes(self._encode_frames(records), self.config.peer_timeout)
        if records:
            self._sent_idx[fs.peer_id] = records[-1][0]

    async def _send_live(
        self,
        fs: nethost.FramedStream,
        recv: MemoryObjectReceiveStream[_Broadcast],
        cursor: int,
    ) -> None:
        cfg = self.config
        while True:
            item: _Broadcast | None = None
            try:
                with anyio.move_on_after(cfg.keepalive):
                    item = await recv.receive()
            except anyio.EndOfStream:  # closed by `_broadcast` (lagging) or by the stop
                raise self._cut(cursor) from None
            if item is None:
                await fs.send(Tick(last_idx=self._last_idx), cfg.peer_timeout)
                continue
            # Everything queued goes out in one write: the shared, already-encoded frames.
            out: list[bytes] = []
            cut = False
            while True:
                if item.last >= cursor:
                    if item.first == cursor:
                        out.append(item.frames)
                    elif item.first < cursor:  # joined mid-commit: only the tail is new
                        out.append(self._encode_frames(item.records[cursor - item.first :]))
                    else:
                        raise ProtocolError("internal", f"gap in live stream at index {cursor}")
                    cursor = item.last + 1
                try:
                    item = recv.receive_nowait()
                except anyio.WouldBlock:
                    break
                except anyio.EndOfStream:
                    cut = True
                    break
            if out:
                await fs.send_bytes(b"".join(out), cfg.peer_timeout)
                self._sent_idx[fs.peer_id] = cursor - 1
            if cut:
                raise self._cut(cursor)


def _log_decision(events: Sequence[Event], state: State, now_ms: int) -> None:
    """Log a committed decision's lines (see `decision_log`). Never raises: the decision is
    durable whatever its description does."""
    # The lowest level the log takes: lines below it are not even built (an epoch turn's
    # thousands of DEBUG details cost the loop milliseconds with DEBUG off).
    taken = [
        lv
        for lv in (logging.DEBUG, logging.INFO, logging.WARNING)
        if decisions_log.isEnabledFor(lv)
    ]
    if not taken:
        return
    try:
        for level, message in decision_lines(events, state, now_ms, min_level=taken[0]):
            decisions_log.log(level, "%s", message)
    except Exception:
        log.exception("could not describe a committed decision of %d events", len(events))


def _lagging(queue: int, cursor: int) -> ProtocolError:
    return ProtocolError(
        "lagging", f"subscriber fell more than {queue} batches behind; resubscribe from {cursor}"
    )


@contextlib.contextmanager
def _stream_slot(open_streams: collections.Counter[str], peer: str, limit: int) -> Iterator[bool]:
    """Count one more stream of `peer` while the block runs, if it holds fewer than `limit`;
    yields whether it may be served."""
    if open_streams[peer] >= limit:
        yield False
        return
    open_streams[peer] += 1
    try:
        yield True
    finally:
        open_streams[peer] -= 1
        if not open_streams[peer]:
            del open_streams[peer]


async def _take_first_frame(fs: nethost.FramedStream) -> None:
    """Take (and drop) a refused peer's first frame, if it comes within a second, so that its
    write succeeds and it reads why (refused at once, it would see only a reset). A small one
    only: a stream refused must not make the master buffer 4 MiB."""
    with anyio.move_on_after(1.0), contextlib.suppress(Exception):
        await fs.recv_frame(1.0, HANDSHAKE_MAX_FRAME)


def _too_many_streams(peer: str, limit: int, kind: str) -> str:
    return f"peer {peer} already holds {limit} {kind} streams"
