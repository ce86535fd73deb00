"""The worker process shell: connection to the master, durable outbox, replica state.

- `emit(event)` records the event in the durable outbox (it survives kill -9) and wakes the
  sender; it never blocks on the network.
- One connection at a time to the master, redialled with back-off (logged at INFO). After
  hello, two streams run side by side: *submit* (outbox batches out, acks back) and
  *subscribe* (indexed log in, folded into the replica a frame at a time). The master only
  broadcasts durable events, so our own events arriving on *subscribe* acknowledge them too
  (whichever comes first frees the outbox and lets the next batch go).
- The replica is `state`; `add_listener(cb)` and `wait_for_change(after_idx)` let runners and
  status code follow it (`live_only` listeners see only states caught up with the master).
  Every cycle the worker emits a NodeHeartbeat (liveness is event flow; none after its
  goodbye, `emit_last`) and rewrites <data-dir>/digest.json when its replica advanced.
- A write the disk refuses to the outbox (full, read-only) stops the worker (`_fail_stop`):
  one ERROR naming the file and the OS error, as the master does for its log. Every event
  the outbox accepted is on disk and is sent by the next start; events emitted after the
  failure are not recorded (`emit` drops them, as if the process had died first).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import anyio
import msgspec
from anyio.abc import TaskStatus

from cluster import control
from cluster.datadir import OUTBOX_DIR, hold
from cluster.digest_writer import DigestFileWriter, Reading
from cluster.net import host as nethost
from cluster.net.framing import FrameError, encode_frame
from cluster.net.identity import load_identity
from cluster.net.membership import Membership, new_nonce
from cluster.net.protocol import (
    CONTENT_REFUSALS,
    HELLO_PROTOCOL,
    PROTOCOL_VERSION,
    REMOVED,
    REQUEST_PROTOCOL,
    SUBMIT_PROTOCOL,
    SUBSCRIBE_PROTOCOL,
    Ack,
    Challenge,
    ControlReplyMsg,
    ControlRequestMsg,
    ErrorMsg,
    Events,
    Hello,
    Message,
    Ping,
    Pong,
    Proof,
    ProtocolError,
    SeqEventRaw,
    SnapshotBegin,
    SnapshotChunk,
    SubmitBatchRaw,
    Subscribe,
    Tick,
    Welcome,
    encode,
    expect,
)
from cluster.shared.apply import OutOfOrderError, fold
from cluster.shared.codec import decode_state
from cluster.shared.events import Event, NodeGatheredInfo, NodeHeartbeat
from cluster.shared.humanize import error_text
from cluster.shared.state import EMPTY_STATE, State
from cluster.worker.master_addr import MasterAddr, MasterAddrSource
from cluster.worker.outbox import Outbox, OutboxWriteError

log = logging.getLogger(__name__)

StateListener = Callable[[State], None]


@dataclass(frozen=True)
class WorkerConfig:
    #: Cycle of the NodeHeartbeat and of digest.json.
    heartbeat_interval: float = 1.0
    #: A master silent this long (no ack, pong or tick) is considered hung: reconnect.
    peer_timeout: float = 10.0
    #: Idle submit streams send a Ping this often.
    keepalive: float = 1.0
    connect_timeout: float = 5.0
    backoff_initial: float = 0.1
    backoff_max: float = 5.0
    #: Events per SubmitBatch frame, and events sent but not yet acknowledged.
    batch_events: int = 2048
    window_events: int = 16384
    #: Batches sent and not yet acknowledged (see the sender: this is what makes batches).
    inflight_batches: int = 3
    #: A batch smaller than this waits until nothing is in flight: at a low rate, one batch
    #: at a time keeps frames (each costs CPU on both sides) few; under load, full batches
    #: overlap so that disk, network and indexing work side by side.
    pipelined_batch_events: int = 512
    #: Cluster secret for the hello challenge (None when the cluster uses an allow-list only).
    secret: bytes | None = None
    write_digest: bool = True
    #: Emit NodeHeartbeat each cycle (benchmarks turn it off to count only their own events).
    heartbeats: bool = True


class MasterRefused(Exception):
    """The master refused this worker (not a member, or another protocol version): retried,
    but logged as an error."""


#: Added to the master's refusal of our (empty) proof when we have no cluster secret.
NO_SECRET_HINT: Final = (
    "this worker has no cluster secret: pass --cluster-secret-file with the master's cluster.secret"
)

#: Hello error codes that mean "refused", not "unreachable".
_REFUSALS = frozenset({"unauthorized", "version"})


class BatchRefused(Exception):
    """The master refused the content of a batch we sent (`CONTENT_REFUSALS`): resending
    it as it is would be refused forever. `first`..`last` are the seqs in flight then,
    `batch_ends` the last seq of each batch among them, oldest first."""

    def __init__(
        self, code: str, message: str, first: int, last: int, batch_ends: tuple[int, ...]
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.first = first
        self.last = last
        self.batch_ends = batch_ends


class MasterUnavailable(Exception):
    """There is no connection to the master right now (the request was not sent)."""


class MasterNoAnswer(MasterUnavailable):
    """A request was sent, but its reply did not come: the connection failed, or the master
    was silent for the timeout. The master may have decided it: look before repeating."""


class _Resubscribe(Exception):
    pass


class _MasterStopping(Exception):
    """The master ended our subscription because it is stopping: redial (with back-off)
    until it is back, and say so rather than that the replica fell behind."""


class _Removed(Exception):
    """The master dropped our session: the operator removed this node (`NodeRemoved`) while
    our streams were open. Said in one line, then we redial and say hello again."""


class Worker:
    def __init__(
        self,
        data_dir: Path,
        master_addr: MasterAddrSource,
        config: WorkerConfig | None = None,
        *,
        key_pair: Any = None,
        runner_digest: str = "",
    ) -> None:
        """`master_addr`: the master's full multiaddr, or a file holding it (a `Path`) or a
        callable returning it, read again before every dial (`MasterAddr`).
        `runner_digest`: the digest of the runner setting this worker runs
        (`RunnerSetting.digest()`), `events.NO_RUNNERS_DIGEST` if it runs none, "" if the
        caller does not say (an embedder emitting its own events); sent in every hello."""
        self.data_dir = data_dir
        self._master = MasterAddr(master_addr)
        self.config = config or WorkerConfig()
        # First, before the key and the outbox are made: no other process creates its files
        # here meanwhile, and a master's directory is not a worker's.
        self._dir_lock = hold(data_dir, "worker")
        try:
            if key_pair is None:
                key_pair, node_id = load_identity(data_dir)
            else:
                from cluster.net.identity import peer_id_of

                node_id = peer_id_of(key_pair)
            self.outbox = Outbox.open(data_dir / OUTBOX_DIR)
        except BaseException:
            self._dir_lock.release()
            raise
        self.key_pair = key_pair
        self.node_id: str = node_id
        #: New for each worker process, sent in every hello: the master tells a restarted
        #: worker (ends its maintenance window) from this one re-dialling.
        self.boot_id = secrets.token_hex(8)
        #: Sent in every hello: a node whose recorded self-test is of another setting is
        #: not self-tested from that hello on (until this setting's result arrives).
        self.runner_digest = runner_digest
        self._state: State = EMPTY_STATE
        self._listeners: list[StateListener] = []
        self._live_listeners: list[StateListener] = []
        self._changed = anyio.Event()
        self._wake = anyio.Event()
        self._stop = anyio.Event()
        self._finished = anyio.Event()
        #: "connecting", "catching up", "connected": for status lines and tests.
        self.phase = "connecting"
        self.master_last_idx = 0
        self.connections = 0
        #: (host, master peer) while connected: what `request_master` uses.
        self._link: tuple[Any, Any] | None = None
        #: Node-info readings made while not connected, the latest per source (`emit_info`).
        self._held_info: dict[str, NodeGatheredInfo] = {}
        #: Set by `emit_last`: this worker emits nothing of its own any more (heartbeats,
        #: held readings), so that event stays the last.
        self._last_said = False
        #: Highest seq sent (or being sent) to the master on the current submit stream, and
        #: the last seq of each batch in flight there, oldest first.
        self._last_sent = 0
        self._inflight: deque[int] = deque()
        #: After the master refused a batch: the events up to this seq hold a refused one,
        #: found by bisection (`_after_refusal`, `_isolation_batch`).
        self._isolate_until = 0
        #: The batches in flight when the master last refused one (see `_narrow_isolation`).
        self._refused_batch_ends: tuple[int, ...] = ()
        #: The outbox write the disk refused: the worker stopped on it (`_fail_stop`).
        self.failure: OutboxWriteError | None = None

    # ------------------------------------------------------------------ public surface
    @property
    def master_addr(self) -> Any:
        """The master's multiaddr: the one dialled last (or to be dialled first)."""
        return self._master.addr

    @property
    def state(self) -> State:
        return self._state

    @property
    def connected(self) -> bool:
        """A connection to the master is up (hello done): what is emitted now is sent now."""
        return self._link is not None

    def emit(self, event: Event) -> None:
        """Record an event durably and queue it for the master. Never blocks on the network
        (it is one local write); the callback given to info sources and runners.

        If the disk refuses the write, the worker stops (`failure`, one ERROR) and the
        event is not recorded: the emitter is not told, as if the worker had died just
        before (its runners are being stopped); nothing recorded earlier is lost."""
        with contextlib.suppress(OutboxWriteError):
            self.emit_seq(event)

    def emit_seq(self, event: Event) -> int:
        """`emit`, returning the seq the event was given (for tests and benchmarks). Raises
        `OutboxWriteError` if the disk refused the write (the worker then stops)."""
        try:
            seq = self.outbox.append(event)
        except OutboxWriteError as exc:
            self._fail_stop(exc)
            raise
        self._wake.set()
        return seq

    def emit_info(self, event: NodeGatheredInfo) -> None:
        """Emit a node-info reading: a gauge, of which only the latest per source matters.

        While the master is unreachable the reading is held in memory, replacing the
        source's earlier one, and goes into the outbox once the connection is back: a day
        offline leaves one event per source, not thousands of stale readings that the log
        would keep forever. A crash loses only held readings, and the gatherer reads again
        when the worker starts.
        """
        if self._last_said:
            return  # after the goodbye: a reading would come after it
        if not self.connected:
            self._held_info[event.source] = event
        else:
            self.emit(event)

    def emit_last(self, event: Event) -> int:
        """Emit `event` as this worker's last one (the goodbye, `NodeStopping`): its own
        emitting stops first -- no more heartbeats, readings held while offline are dropped,
        later `emit_info` calls are ignored -- so nothing of its own follows it, not even
        while it waits for the ack. Stop every other emitter (info sources, runners) first.
        Returns the event's seq."""
        self._last_said = True
        self._held_info.clear()
        return self.emit_seq(event)

    def add_listener(self, listener: StateListener, *, live_only: bool = False) -> None:
        """Call `listener(state)` after each replica change (keep it quick and non-blocking).

        With `live_only`, only once the replica has caught up with the master's log (and
        then at each change): while a (re)starting worker folds the log it missed, every
        intermediate state is history -- placements long finalized, say -- and a listener
        that acts on the cluster (the runner manager) must not act on it.
        """
        (self._live_listeners if live_only else self._listeners).append(listener)

    async def wait_for_change(self, after_idx: int) -> State:
        """Return the replica once its last_applied exceeds `after_idx`."""
        while self._state.last_applied <= after_idx:
            await self._changed.wait()
        return self._state

    def stop(self) -> None:
        self._stop.set()

    def _fail_stop(self, exc: OutboxWriteError) -> None:
        """The disk refused an outbox write: say so once, naming the file and the error, and
        stop (fail-stop, as the master on its log). Serving on would take events that cannot
        be recorded: the runners' work would reach no one, nor survive a crash. A
        `WorkerNode` stops its runners as on SIGTERM; `cluster worker` exits 2."""
        if self.failure is None:
            self.failure = exc
            box = self.outbox
            log.error(
                "outbox write failed: %s: %s; the worker stops (events up to seq %d were "
                "acknowledged by the master, %d more are kept in the outbox and sent when it "
                "starts again; restart it once the disk is fixed)",
                exc.path,
                exc.strerror,
                box.acked,
                box.last_seq - box.acked,
            )
        self._stop.set()

    async def request(self, request: control.Request, timeout: float = 30.0) -> control.Reply:
        """Forward a request of `cluster.control` for this host (`MaintenanceNext()`,
        `MaintenanceSchedule(...)`, ...) to the master and return its `Reply`: what
        `cluster maintenance ...` on this host does. The master judges it as this node's own.

        Checked as `MasterNode.request` checks it: anything but a request raises `TypeError`,
        a field of the wrong type `ValueError` naming the field. Raises `MasterUnavailable`
        when there is no connection right now (nothing sent), `MasterNoAnswer` (a kind of
        `MasterUnavailable`) when the reply did not come (it may have been decided), and
        `cluster.control.ControlError` when the master refused the stream or its answer is
        not a reply. No network error of the stream reaches the caller otherwise.
        """
        payload = control.encode_message(control.check_request(request))
        return control.decode_reply(await self.request_master(payload, timeout))

    async def request_master(self, payload: bytes, timeout: float = 30.0) -> bytes:
        """Forward an encoded host request (`cluster.control.encode_message(request)`) to the
        master; the master's reply, encoded (`cluster.control.decode_reply` reads it).
        `request` does both for a request object.

        The master judges it as coming from this node, over the authenticated connection.
        Raises as `request` does (`MasterUnavailable`, `MasterNoAnswer`, `ControlError`), and
        `TypeError` for a payload that is not bytes.
        """
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError(
                f"request_master takes an encoded request (bytes), got "
                f"{type(payload).__name__}: pass a request object to `request(...)`, or "
                "encode it with `cluster.control.encode_message`"
            )
        payload = bytes(payload)
        link = self._link
        if link is None:
            raise MasterUnavailable(f"not connected to the master (worker is {self.phase})")
        host, peer = link
        # The stream's own errors (timeouts, resets, libp2p's many kinds) are told as the
        # errors documented here: an embedder cannot be asked to know them all.
        try:
            fs = await nethost.open_stream(host, peer, REQUEST_PROTOCOL, timeout)
        except Exception as exc:
            raise MasterUnavailable(
                f"could not open a request stream to the master: {_describe(exc)}"
            ) from exc
        try:
            await fs.send(ControlRequestMsg(payload=payload), timeout)
            return expect(await fs.recv(timeout), ControlReplyMsg).payload
        except (ProtocolError, FrameError) as exc:
            # The master failed the stream saying why (`removed`, `too-many-streams`, ...),
            # or answered something that is not a reply.
            raise control.ControlError(f"the master refused the request: {exc}") from exc
        except TimeoutError as exc:
            raise MasterNoAnswer(
                f"no answer from the master within {timeout:g} s (it may have decided it)"
            ) from exc
        except Exception as exc:
            raise MasterNoAnswer(
                f"the connection to the master failed before its answer ({_describe(exc)}); "
                "it may have decided it"
            ) from exc
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await fs.close()

    async def wait_finished(self) -> None:
        await self._finished.wait()

    async def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` s until the master has acknowledged every event emitted so
        far; True if it has. Returns False at once when not connected (the outbox keeps them).
        """
        target = self.outbox.last_seq
        with anyio.move_on_after(timeout):
            while self.outbox.acked < target and self.connected:
                await anyio.sleep(0.02)  # a shutdown path: polling keeps the hot path untouched
        return self.outbox.acked >= target

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        nethost.tune_gc()
        try:
            async with (
                nethost.running_host(self.key_pair) as host,
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(self._connection_loop, host)
                tg.start_soon(self._cycle)
                if self.config.write_digest:
                    digests = DigestFileWriter(self.data_dir)
                    interval = self.config.heartbeat_interval
                    tg.start_soon(digests.keep_current, self._digest_reading, interval)
                task_status.started()
                await self._stop.wait()
                tg.cancel_scope.cancel()
        finally:
            self._finished.set()

    def close(self) -> None:
        """Close the outbox (fsync first) and release the data directory; call after `run`
        returned and emitters stopped."""
        try:
            self.outbox.close()
        finally:
            self._dir_lock.release()

    # ------------------------------------------------------------------ replica
    def _set_state(self, state: State) -> None:
        self._state = state
        changed, self._changed = self._changed, anyio.Event()
        changed.set()
        self._notify(self._listeners, state)
        if self.phase == "connected":
            self._notify(self._live_listeners, state)

    @staticmethod
    def _notify(listeners: list[StateListener], state: State) -> None:
        for listener in listeners:
            try:
                listener(state)
            except Exception:
                log.exception("state listener failed")

    async def _cycle(self) -> None:
        while True:
            # A heartbeat says "alive now": kept while the master is unreachable, hours of
            # them would only grow the outbox and flood the log on reconnect.
            # After the goodbye (`emit_last`) none: it must stay the node's last event.
            if self.config.heartbeats and self.phase != "connecting" and not self._last_said:
                self.emit(NodeHeartbeat(node_id=self.node_id))
            await anyio.sleep(self.config.heartbeat_interval)

    def _digest_reading(self) -> Reading:
        extra: dict[str, object] = {
            "role": "worker",
            "node_id": self.node_id,
            "acked_seq": self.outbox.acked,
            "phase": self.phase,
        }
        return self._state, extra

    # ------------------------------------------------------------------ connection
    async def _connection_loop(self, host: Any) -> None:
        cfg = self.config
        backoff = cfg.backoff_initial
        while True:
            self.phase = "connecting"
            try:
                peer = await nethost.dial(host, self._master.current(), cfg.connect_timeout)
                welcome = await self._hello(host, peer)
                log.info(
                    "connected to master %s as %s (log at %d, our acked seq %d)",
                    peer,
                    self.node_id,
                    welcome.last_idx,
                    welcome.last_seq,
                )
                self.connections += 1
                backoff = cfg.backoff_initial
                self.outbox.skip_to(welcome.last_seq)
                self._narrow_isolation()
                self.master_last_idx = welcome.last_idx
                self._link = (host, peer)
                held, self._held_info = self._held_info, {}
                for reading in held.values():
                    self.emit(reading)
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._submit_stream, host, peer)
                        tg.start_soon(self._subscribe_streams, host, peer)
                finally:
                    self._link = None
            except MasterRefused as exc:
                log.error("master refused this worker: %s", exc)
                backoff = cfg.backoff_max
            except Exception as exc:
                refused = _refusal_in(exc)
                failed = _found_in(exc, OutboxWriteError)
                if failed is not None:
                    # The outbox cannot be written (a welcome's skip_to, a batch's fsync, an
                    # ack): the worker stops, said once (`_fail_stop`); no redial.
                    self._fail_stop(failed)
                    return
                if refused is not None:
                    try:
                        self._after_refusal(refused)
                    except OutboxWriteError as failure:  # refused.jsonl, or the watermark
                        self._fail_stop(failure)
                        return
                elif (removed := _found_in(exc, _Removed)) is not None:
                    log.warning(
                        "the master dropped this node's session: %s; saying hello again to "
                        "rejoin (first try in %.1f s)",
                        removed,
                        backoff,
                    )
                elif _found_in(exc, _MasterStopping):
                    log.info(
                        "the master at %s is stopping; reconnecting (first try in %.1f s)",
                        self.master_addr,
                        backoff,
                    )
                else:
                    log.info(
                        "master at %s unreachable (%s); retrying in %.1f s",
                        self.master_addr,
                        _describe(exc),
                        backoff,
                    )
            self.phase = "connecting"
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(2),
                contextlib.suppress(Exception),
            ):
                await host.disconnect(nethost.peer_of(self.master_addr))
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, cfg.backoff_max)

    def _after_refusal(self, refused: BatchRefused) -> None:
        """Make progress past events the master will never take (it resets the stream and
        we redial): a lone event in flight is the refused one, set aside in the outbox's
        ``refused.jsonl`` with an ERROR; a larger batch is bisected: its first half is sent
        alone, and whichever part holds the refused event is halved again (`_isolation_batch`),
        so finding one refused event among n takes about 2 log2(n) submissions, not n. Every
        refusal thus moves the outbox on, instead of the same batch being resent forever
        (with a NodeConnected logged for every redial)."""
        # Acknowledged since (from the subscribe stream, say) means accepted, not refused.
        first, last = max(refused.first, self.outbox.acked + 1), refused.last
        if first == last == refused.first:
            # One event in flight, every earlier one acknowledged (durable at the master):
            # that one is what the master refused, whatever its message says.
            event = self.outbox.set_aside(first, refused.code, refused.message)
            # The range bisected held this one; the events after it go out in full batches
            # again (another refused one among them is bisected in its turn).
            self._isolate_until = 0
            log.error(
                "master refused our event seq %d (%s): %s; set aside in %s, sending the rest",
                first,
                type(event).__name__ if event is not None else "undecodable",
                refused,
                self.outbox.refused_path,
            )
        elif first <= last:
            # The refused part: the events in flight. (While bisecting, that is the probe,
            # which narrows the range that holds the refused event.)
            self._isolate_until = last
            self._refused_batch_ends = refused.batch_ends
            log.error(
                "master refused a batch of our events (seq %d..%d): %s; resending them in "
                "halves to find the refused ones",
                first,
                last,
                refused,
            )
        else:
            log.error("master refused a batch, but none of our events was in flight: %s", refused)

    def _isolation_batch(self) -> int:
        """While isolating: how many events the next probe holds. Every event up to
        `_isolate_until` not yet acknowledged is suspect, and one of them is refused: send
        the first half. Refused, the range shrinks to that half; accepted, to the rest. A
        lone suspect goes alone, so that a refusal names it (and sets it aside)."""
        suspects = self._isolate_until - self.outbox.acked
        return max(1, (suspects + 1) // 2)

    def _narrow_isolation(self) -> None:
        """After a refusal and a new hello: the master's last seq tells which batches of
        those in flight it took; the refused one is the first of the rest, and only it need
        be bisected (up to three full batches were in flight). Only narrows what is
        bisected, never sets an event aside: a master that has not yet indexed an
        accepted batch reports an older seq, and then the refused batch is simply refused
        again, with fewer events in flight."""
        ends, self._refused_batch_ends = self._refused_batch_ends, ()
        acked = self.outbox.acked
        refused_end = next((end for end in ends if end > acked), None)
        if refused_end is not None and acked < refused_end < self._isolate_until:
            self._isolate_until = refused_end

    async def _hello(self, host: Any, peer: Any) -> Welcome:
        cfg = self.config
        membership = Membership(allowed=None, secret=cfg.secret) if cfg.secret else None
        fs = await nethost.open_stream(host, peer, HELLO_PROTOCOL, cfg.connect_timeout)
        try:
            nonce = new_nonce()
            hello = Hello(
                version=PROTOCOL_VERSION,
                nonce=nonce,
                boot_id=self.boot_id,
                runner_digest=self.runner_digest,
            )
            await fs.send(hello, cfg.peer_timeout)
            try:
                challenge = _hello_reply(await fs.recv(cfg.peer_timeout), Challenge)
            except ProtocolError as exc:
                # Not a network hiccup: retrying cannot help until someone acts (an ERROR).
                if exc.code in _REFUSALS:
                    raise MasterRefused(str(exc)) from exc
                raise
            proof = b""
            if membership is not None:
                reason = membership.check_master_proof(
                    challenge.proof, nonce, fs.peer_id, self.node_id
                )
                if reason is not None:
                    raise MasterRefused(reason)
                proof = membership.worker_proof(challenge.nonce, self.node_id, fs.peer_id)
            await fs.send(Proof(proof=proof), cfg.peer_timeout)
            try:
                return _hello_reply(await fs.recv(cfg.peer_timeout), Welcome)
            except ProtocolError as exc:
                if exc.code in _REFUSALS:
                    why = str(exc)
                    if exc.code == "unauthorized" and membership is None:
                        # Refused here, after the proof: the master checks a cluster secret
                        # and this worker, without one, sent an empty proof.
                        why += f" ({NO_SECRET_HINT})"
                    raise MasterRefused(why) from exc
                raise
        finally:
            await fs.close()

    # ------------------------------------------------------------------ submit
    async def _submit_stream(self, host: Any, peer: Any) -> None:
        cfg = self.config
        fs = await nethost.open_stream(host, peer, SUBMIT_PROTOCOL, cfg.connect_timeout)
        inflight = self._inflight = deque()  # last seq of each batch sent, oldest first
        sent = self._last_sent = self.outbox.acked
        reader_done = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._ack_reader, fs, reader_done)
                while True:
                    self._wake = anyio.Event()  # fresh before looking: a later emit wakes us
                    # Acks come from the submit stream or from our own events seen on the
                    # subscribe stream (see `_apply_events`), whichever is first.
                    while inflight and inflight[0] <= self.outbox.acked:
                        inflight.popleft()
                    sent = max(sent, self.outbox.acked)
                    room = cfg.window_events - (sent - self.outbox.acked)
                    # Adaptive batching: while `inflight_batches` wait for their ack, new
                    # events pile up into the next batch. A lone event leaves at once; under
                    # load batches grow, so the master's per-frame cost stays bounded.
                    # Isolating refused events (`_after_refusal`): one probe at a time.
                    isolating = self.outbox.acked < self._isolate_until
                    limit = min(cfg.batch_events, room)
                    if isolating:
                        limit = min(limit, self._isolation_batch())
                    batch = (
                        self.outbox.pending_after(sent, limit)
                        if room > 0 and len(inflight) < cfg.inflight_batches
                        else []
                    )
                    if inflight and (isolating or len(batch) < cfg.pipelined_batch_events):
                        batch = []
                    if not batch:
                        with anyio.move_on_after(cfg.keepalive) as scope:
                            await self._wake.wait()
                        if scope.cancelled_caught:
                            await self._send_submit(fs, encode_frame(encode(_PING)), reader_done)
                        continue
                    # Everything the master may acknowledge is on our disk first. (A small
                    # fsync, done inline: a thread hop costs more CPU than it saves here.)
                    self.outbox.sync()
                    payload = _submit_payload(batch)
                    # Large events: a batch that would exceed a frame leaves in halves (one
                    # event always fits: the outbox bounds it far below the frame limit).
                    while len(payload) > fs.max_frame and len(batch) > 1:
                        batch = batch[: len(batch) // 2]
                        payload = _submit_payload(batch)
                    frame = encode_frame(payload, fs.max_frame, compress=True)
                    # In flight from now: a refusal may arrive before the write returns.
                    sent = self._last_sent = batch[-1][0]
                    inflight.append(sent)
                    await self._send_submit(fs, frame, reader_done)
        finally:
            await fs.reset()

    async def _ack_reader(self, fs: nethost.FramedStream, done: anyio.Event) -> None:
        try:
            while True:
                try:
                    msg = await fs.recv(self.config.peer_timeout)
                except TimeoutError:
                    raise TimeoutError(
                        f"master silent on submit stream for {self.config.peer_timeout:g} s"
                    ) from None
                if isinstance(msg, Pong):
                    self.master_last_idx = max(self.master_last_idx, msg.last_idx)
                    continue
                if isinstance(msg, ErrorMsg) and msg.code in CONTENT_REFUSALS:
                    ends = tuple(e for e in self._inflight if e > self.outbox.acked)
                    first = self.outbox.acked + 1
                    raise BatchRefused(msg.code, msg.message, first, self._last_sent, ends)
                ack = _expect_from_master(msg, Ack)
                self._acked(ack.seq)
        finally:
            done.set()

    async def _send_submit(
        self, fs: nethost.FramedStream, frame: bytes, reader_done: anyio.Event
    ) -> None:
        """Send on the submit stream. If the write fails because the master reset the stream
        after refusing a batch, its reason is probably waiting to be read: give the ack
        reader a moment to read it, or the refusal would look like a network fault (and the
        refused batch would go out again as it was)."""
        try:
            await fs.send_bytes(frame, self.config.peer_timeout)
        except Exception:
            with anyio.move_on_after(_REASON_WAIT_S):
                await reader_done.wait()
            raise

    def _acked(self, seq: int) -> None:
        """The master holds our events up to `seq` durably: forget them, send more."""
        if seq > self.outbox.acked:
            try:
                self.outbox.ack(seq)
            except OutboxWriteError as exc:
                # Not raised on: the stop cancels this connection, and an error beside that
                # cancellation would leave the task groups as a traceback.
                self._fail_stop(exc)
                return
            self._wake.set()

    # ------------------------------------------------------------------ subscribe
    async def _subscribe_streams(self, host: Any, peer: Any) -> None:
        ended: deque[float] = deque(maxlen=_RESUBSCRIBES_PER_WINDOW)  # when, recent first
        while True:
            try:
                await self._subscribe_once(host, peer)
            except _Resubscribe as exc:
                log.info("resubscribing: %s", exc)
            except Exception as exc:
                # The master resets a subscribe stream it could not write to for a while:
                # yamux gives up after 5 s with the window full, when this replica did not
                # read (a long GC pause, a busy event loop). The connection is likely fine,
                # so subscribe again from where the replica stands rather than redial: a
                # redial costs a new hello (a NodeConnected in the log) and restarts the
                # submit stream. If the connection is gone, opening the stream fails and
                # the connection loop redials; if streams keep ending, it redials too (with
                # its back-off) rather than resubscribe in a loop.
                now = anyio.current_time()
                if not nethost.ended_by_peer(exc) or (
                    len(ended) == ended.maxlen and now - ended[-1] < _RESUBSCRIBE_WINDOW_S
                ):
                    raise
                ended.appendleft(now)
                log.info(
                    "the master ended the subscribe stream (%s); resubscribing from index %d",
                    _describe(exc),
                    self._state.last_applied + 1,
                )

    async def _subscribe_once(self, host: Any, peer: Any) -> None:
        cfg = self.config
        fs = await nethost.open_stream(host, peer, SUBSCRIBE_PROTOCOL, cfg.connect_timeout)
        try:
            from_idx = self._state.last_applied + 1
            await fs.send(Subscribe(from_idx=from_idx), cfg.peer_timeout)
            self.phase = "catching up"
            while True:
                try:
                    msg = await fs.recv(cfg.peer_timeout)
                except TimeoutError:
                    raise TimeoutError(
                        f"master silent on subscribe stream for {cfg.peer_timeout:g} s"
                    ) from None
                if isinstance(msg, Events):
                    self._apply_events(msg)
                elif isinstance(msg, Tick):
                    self.master_last_idx = max(self.master_last_idx, msg.last_idx)
                    self._note_caught_up()
                elif isinstance(msg, SnapshotBegin):
                    await self._receive_snapshot(fs, msg)
                elif isinstance(msg, ErrorMsg):
                    if msg.code == "ahead-of-log":
                        log.warning(
                            "master's log is behind our replica (%s): starting over", msg.message
                        )
                        self._set_state(EMPTY_STATE)
                        raise _Resubscribe(msg.message)
                    if msg.code == "lagging":
                        raise _Resubscribe(msg.message)
                    raise _master_error(msg)
                else:
                    raise ProtocolError(
                        "unexpected", f"unexpected {type(msg).__name__} on subscribe"
                    )
        finally:
            await fs.reset()

    def _apply_events(self, msg: Events) -> None:
        state = self._state
        events = msg.events
        # Duplicates (after a resubscribe) can only be a prefix: the log is in index order.
        if events and events[0].idx <= state.last_applied:
            events = [ie for ie in events if ie.idx > state.last_applied]
        if events:
            try:
                # One fold per frame (the batched `apply`): listeners see the frame at once.
                state = fold(state, events)
            except OutOfOrderError as exc:
                raise _Resubscribe(f"{exc}; resubscribing from {state.last_applied + 1}") from exc
            self._set_state(state)
            # The master broadcasts only what is durable: our own events seen here are
            # acknowledged (it then sends its Acks less often, see Master._acker).
            self._acked(state.last_seq(self.node_id))
        self.master_last_idx = max(self.master_last_idx, state.last_applied)
        self._note_caught_up()

    def _note_caught_up(self) -> None:
        if self.phase != "connected" and self._state.last_applied >= self.master_last_idx:
            self.phase = "connected"
            log.info("caught up at index %d", self._state.last_applied)
            self._notify(self._live_listeners, self._state)

    async def _receive_snapshot(self, fs: nethost.FramedStream, begin: SnapshotBegin) -> None:
        parts: list[bytes] = []
        got = 0
        while got < begin.size:
            # The master may end the stream between two chunks (a removal, a stop).
            chunk = _expect_from_master(await fs.recv(self.config.peer_timeout), SnapshotChunk)
            parts.append(chunk.data)
            got += len(chunk.data)
        if got != begin.size:
            raise ProtocolError("malformed", f"snapshot of {got} bytes, announced {begin.size}")
        state = await anyio.to_thread.run_sync(decode_state, b"".join(parts))
        if state.last_applied != begin.idx:
            raise ProtocolError(
                "malformed", f"snapshot holds index {state.last_applied}, announced {begin.idx}"
            )
        log.info("loaded snapshot at index %d (%d bytes)", begin.idx, begin.size)
        self._set_state(state)


_PING = Ping()


#: A subscribe stream the master ends is subscribed again at most this many times within
#: _RESUBSCRIBE_WINDOW_S; one more and the worker redials (`_subscribe_streams`).
_RESUBSCRIBES_PER_WINDOW: Final = 2
_RESUBSCRIBE_WINDOW_S: Final = 30.0

#: How long a failed submit-stream write waits for the master's reason (`_send_submit`).
_REASON_WAIT_S: Final = 1.0


def _submit_payload(batch: list[tuple[int, bytes]]) -> bytes:
    return encode(SubmitBatchRaw(events=[SeqEventRaw(s, msgspec.Raw(p)) for s, p in batch]))


def _master_error(msg: ErrorMsg) -> Exception:
    """What the master's ErrorMsg means, on whichever stream it came: it fails every stream
    of ours with the same code when it stops or drops our session, between two frames, and
    the connection loop says which (`_Removed`, `_MasterStopping`) rather than call the
    master unreachable. Codes that concern one stream only (a refused batch, a lagging
    subscriber) are that stream's reader's to handle before this."""
    if msg.code == REMOVED:
        return _Removed(msg.message)
    if msg.code == "stopping":
        return _MasterStopping(msg.message)
    return ProtocolError(msg.code, f"master reported {msg.code}: {msg.message}")


_T = TypeVar("_T")


def _expect_from_master(msg: Message, kind: type[_T]) -> _T:
    """`expect` for a stream from the master: an ErrorMsg raises what it means
    (`_master_error`)."""
    if isinstance(msg, ErrorMsg):
        raise _master_error(msg)
    return expect(msg, kind)


def _hello_reply(msg: Message, kind: type[_T]) -> _T:
    """`expect` for the master's answers to our hello: a master stopping says so there too
    (`_MasterStopping`: the connection loop waits for it to come back, rather than logging
    it unreachable); its refusals stay protocol errors, which `_hello` turns into
    `MasterRefused`."""
    if isinstance(msg, ErrorMsg) and msg.code == "stopping":
        raise _master_error(msg)
    return expect(msg, kind)


_E = TypeVar("_E", bound=BaseException)


def _refusal_in(exc: BaseException) -> BatchRefused | None:
    """The BatchRefused that ended a connection, wherever task groups nested it."""
    return _found_in(exc, BatchRefused)


def _found_in(exc: BaseException, kind: type[_E]) -> _E | None:
    """The first `kind` error in `exc`, wherever task groups nested it."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _found_in(inner, kind)
            if found is not None:
                return found
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    exc = nethost.dial_failure(exc)
    if isinstance(exc, nethost.NotLibp2pPort):
        return str(exc)
    return error_text(exc)
