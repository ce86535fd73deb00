"""`EventStore`: the durable log + snapshots + the folded state, as master and tools use them.

``data_dir/log/`` holds the event log (`eventlog.EventLog`, opaque msgpack payloads) and
``data_dir/snapshots/`` the state snapshots (`snapshots.SnapshotStore`). On open the state is
the newest valid snapshot plus the log tail folded over it; `append` makes a batch durable in
one group commit and folds it. Importing this module never imports libp2p.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

from cluster.shared import codec
from cluster.shared.apply import fold
from cluster.shared.eventlog import EventLog, LogAnchor, LogDirectoryError, LogError
from cluster.shared.events import IndexedEvent
from cluster.shared.snapshots import SnapshotStore
from cluster.shared.state import EMPTY_STATE, State

log = logging.getLogger(__name__)

LOG_DIR = "log"
SNAPSHOT_DIR = "snapshots"
#: How often `restore` reports progress, in events.
PROGRESS_EVERY = 16_384

Progress = Callable[[int, int], None]
"""progress(index reached, target index)"""


class EventDecodeError(LogError):
    """A record passed its checksums but is not a valid event (foreign or newer writer).

    `where` names the segment file and offset when known ("<path> offset <n>").
    """

    def __init__(self, idx: int, why: str, where: str = "") -> None:
        at = f"{where}: " if where else ""
        super().__init__(f"event log record {idx} is not a valid event: {at}{why}")
        self.idx = idx
        self.why = why
        self.where = where


def _located(exc: EventDecodeError, event_log: EventLog) -> EventDecodeError:
    """`exc` naming the segment file and offset of its record: an operator who has to look at
    or restore the file needs to know which one (an index alone does not say)."""
    try:
        path, offset = event_log.locate(exc.idx)
    except (LogError, ValueError, OSError):
        return exc  # the index alone, rather than an error about the error
    return EventDecodeError(exc.idx, exc.why, f"{path} offset {offset}")


class Restored(NamedTuple):
    state: State
    #: Index of the snapshot the fold started from; 0 when it started from the empty state.
    snapshot_idx: int


class DueSnapshot(NamedTuple):
    """A state that came due for a snapshot (`EventStore.due_snapshot`) and the anchor of
    the log record it was folded to (None: the log knows none, e.g. empty)."""

    state: State
    anchor: LogAnchor | None


class Committed(NamedTuple):
    state: State
    #: (idx, payload) exactly as the log holds them.
    records: list[tuple[int, bytes]]


def as_logged(ie: IndexedEvent) -> IndexedEvent:
    """The event as it will decode from the log (for events built in memory): see
    `EventStore.append_decoded`."""
    return codec.decode_event(codec.encode_event(ie))


def decode_record(idx: int, payload: bytes) -> IndexedEvent:
    """Decode one log payload, checking it is the event the log says it is."""
    try:
        ie = codec.decode_event(payload)
    except (codec.DecodeError, codec.ValidationError) as exc:
        raise EventDecodeError(idx, str(exc)) from None
    if ie.idx != idx:
        raise EventDecodeError(idx, f"payload carries index {ie.idx}")
    return ie


def snapshot_state(
    snapshots: SnapshotStore, max_idx: int, event_log: EventLog | None = None
) -> State | None:
    """The state of the newest usable snapshot at or before `max_idx`, or None.

    A snapshot whose bytes pass the CRC but do not decode to a State of that index (written
    by another version, say) is skipped with a WARNING like a damaged one. So is one whose
    log anchor does not match `event_log`'s record at its index: it was taken of another
    history (a snapshot copied from another cluster's directory) and its state is not what
    this log folds to. A snapshot without an anchor is used unchecked.
    """
    limit = max_idx
    while limit >= 0:
        found = snapshots.latest_anchored(limit)
        if found is None:
            return None
        idx, data, anchor = found
        if anchor is not None and event_log is not None and event_log.holds(anchor) is False:
            log.warning(
                "snapshot at index %d is not of this log (the log's event %d is not the one it "
                "was taken after: another history, a snapshot copied from elsewhere?): trying "
                "an older one",
                idx,
                idx,
            )
            limit = idx - 1
            continue
        try:
            state = codec.decode_state(data)
            if state.last_applied != idx:
                raise ValueError(f"its state is at index {state.last_applied}")
        except (codec.DecodeError, codec.ValidationError, ValueError) as exc:
            log.warning("snapshot at index %d is unusable (%s): trying an older one", idx, exc)
            limit = idx - 1
            continue
        return state
    return None


def snapshots_ahead_of_log(indices: Iterable[int], last_idx: int) -> list[int]:
    """Of the snapshot `indices`, those past the log's `last_idx`, each with the WARNING that
    says so (`ahead_of_log_warning`): the log lost records it held when they were taken
    (damage, a restore from backup, a deleted segment), so they describe another history.
    The master moves them aside; `cluster replay` (read-only) only warns."""
    return [idx for idx in indices if idx > last_idx]


def ahead_of_log_warning(idx: int, last_idx: int) -> str:
    return (
        f"snapshot at index {idx} is ahead of the log (last index {last_idx}): the log lost "
        f"events it held when the snapshot was taken (events after {last_idx} were lost)"
    )


def list_snapshots(snapshots: SnapshotStore) -> list[int] | None:
    """The indices of `snapshots`, newest first; None when its directory cannot be listed
    (a file in its place, no permission): a WARNING names it and what is wrong, and the
    caller refolds from the log. A snapshot only shortens a load; the log alone is
    durable. (`EventStore.open` and `cluster replay` both list this way, in the same words.)"""
    try:
        return snapshots.indices()
    except OSError as exc:
        _unusable(snapshots, exc)
        return None


def _unusable(snapshots: SnapshotStore, exc: OSError) -> None:
    log.warning(
        "snapshots in %s cannot be used (%s): refolding from the log",
        snapshots.directory,
        exc.strerror or exc,
    )


def _check_snapshots(snapshots: SnapshotStore, last_idx: int) -> bool:
    """Whether the state can be restored from `snapshots`: the directory lists
    (`list_snapshots`), and each snapshot ahead of the log (`last_idx`) is moved aside --
    once the log grows past its index it would look usable, so it is not merely skipped.
    Stale snapshots that cannot be moved are the same WARNING, and False: a refold."""
    indices = list_snapshots(snapshots)
    if indices is None:
        return False
    try:
        for idx in snapshots_ahead_of_log(indices, last_idx):
            aside = snapshots.set_aside(idx, "ahead-of-log")
            log.warning("%s: moved to %s, not used", ahead_of_log_warning(idx, last_idx), aside)
    except OSError as exc:
        _unusable(snapshots, exc)
        return False
    return True


def restore(
    event_log: EventLog,
    snapshots: SnapshotStore | None,
    until: int | None = None,
    *,
    progress: Progress | None = None,
) -> Restored:
    """State after event `until` (default: the last): newest snapshot <= until + the tail.

    `snapshots=None` refolds from the empty state. Raises `ValueError` when `until` is outside
    the log, `LogCorruptError`/`EventDecodeError` when a record on the way is bad.
    """
    last = event_log.last_idx
    target = last if until is None else until
    if target < 0 or target > last:
        raise ValueError(f"index {target} is outside the log (it holds events 1..{last})")
    state = None if snapshots is None else snapshot_state(snapshots, target, event_log)
    if state is None:
        state = EMPTY_STATE
    snapshot_idx = state.last_applied
    if snapshot_idx + 1 < event_log.first_idx and snapshot_idx < target:
        raise ValueError(
            f"the log starts at index {event_log.first_idx} and no snapshot covers the events "
            "before it"
        )
    if snapshot_idx >= target:
        return Restored(state, snapshot_idx)
    state = fold(state, decoded_events(event_log, snapshot_idx + 1, target, progress))
    if state.last_applied != target:
        raise ValueError(f"the log ended at index {state.last_applied}, before {target}")
    return Restored(state, snapshot_idx)


def decoded_events(
    event_log: EventLog, start: int, target: int, progress: Progress | None = None
) -> Iterator[IndexedEvent]:
    """The events start..target decoded from the log (CRCs checked, index checked), reporting
    progress every PROGRESS_EVERY events. `restore` folds exactly this stream."""
    next_report = start + PROGRESS_EVERY - 1
    for idx, payload in event_log.read_from(start):
        try:
            ie = decode_record(idx, payload)
        except EventDecodeError as exc:
            raise _located(exc, event_log) from None
        yield ie
        if idx >= target:
            break
        if idx == next_report:
            next_report += PROGRESS_EVERY
            if progress is not None:
                progress(idx, target)
    if progress is not None:
        progress(target, target)


def load_state(
    event_log: EventLog,
    snapshots: SnapshotStore | None,
    until: int | None = None,
    *,
    progress: Progress | None = None,
) -> State:
    """`restore(...).state`: the state as of `until` (default: the end of the log)."""
    return restore(event_log, snapshots, until, progress=progress).state


#: The most events between snapshots. A load refolds up to this many events from the newest
#: snapshot: 100 million is ~7 minutes of a restart (docs/storage.md), and a larger value is
#: a typo or "never", which would make every restart refold the whole log.
MAX_SNAPSHOT_EVERY = 100_000_000


def check_snapshot_every(value: int, name: str = "snapshot_every") -> None:
    """ValueError naming `name` unless 1 <= value <= MAX_SNAPSHOT_EVERY."""
    if not 1 <= value <= MAX_SNAPSHOT_EVERY:
        raise ValueError(f"{name} must be 1..{MAX_SNAPSHOT_EVERY:,} events, got {value}")


class EventStore:
    """The log, its snapshots and the state they fold to; see the module docstring."""

    def __init__(
        self,
        event_log: EventLog,
        snapshots: SnapshotStore,
        restored: Restored,
        every: int,
        *,
        snapshots_checked: bool = True,
    ) -> None:
        """`snapshots_checked=False`: the snapshot directory could not be listed when the
        state was restored (`open` warned and refolded), so what is in it is unknown."""
        self._log = event_log
        self._snapshots = snapshots
        self._state = restored.state
        self._every = every
        #: Index of the last snapshot taken (or restored from); see `due_snapshot`.
        self._snapshot_idx = restored.snapshot_idx
        #: One snapshot is written at a time (`write_snapshot` may run on a worker thread
        #: while a caller snapshots directly); `SnapshotStore` prunes leftovers assuming so.
        self._snapshot_write = threading.Lock()
        #: Snapshots on disk newer than the one restored from: they did not decode (another
        #: version's layout, say), so they are never served to a catching-up replica either.
        self._unusable: set[int] = set()
        #: When the directory could not be listed at open (None: it could), the snapshots
        #: this process wrote: only those are served (any other there may be ahead of the
        #: log, or of another version, and was neither checked nor moved aside).
        self._own: set[int] | None = None if snapshots_checked else set()
        #: `latest_snapshot` found the directory unreadable (said once, until it reads again).
        self._listing_failed = False
        if snapshots_checked:
            self._unusable = {idx for idx in snapshots.indices() if idx > restored.snapshot_idx}
        if self._unusable:
            # One snapshot this version can read, so catch-up starts from a snapshot again.
            self.snapshot()

    @classmethod
    def open(
        cls,
        data_dir: Path,
        *,
        snapshot_every: int = 100_000,
        segment_max_bytes: int = 64 << 20,
    ) -> EventStore:
        """Open (creating) the store in `data_dir` and load its state."""
        check_snapshot_every(snapshot_every)
        data_dir = Path(data_dir)
        if data_dir.exists() and not data_dir.is_dir():
            raise LogDirectoryError(f"data directory {data_dir} is not a directory")
        event_log = EventLog.open(data_dir / LOG_DIR, segment_max_bytes=segment_max_bytes)
        try:
            snapshots = SnapshotStore(data_dir / SNAPSHOT_DIR)
            checked = _check_snapshots(snapshots, event_log.last_idx)
            restored = restore(event_log, snapshots if checked else None)
        except BaseException:
            event_log.close()
            raise
        return cls(event_log, snapshots, restored, snapshot_every, snapshots_checked=checked)

    @property
    def state(self) -> State:
        return self._state

    @property
    def last_idx(self) -> int:
        return self._log.last_idx

    @property
    def log(self) -> EventLog:
        return self._log

    @property
    def snapshots(self) -> SnapshotStore:
        return self._snapshots

    def append(self, events: Sequence[IndexedEvent]) -> State:
        """Make `events` durable (one group commit) and fold them; returns the new state.

        The batch is applied before it is written, so an out-of-order event
        (`apply.OutOfOrderError`) leaves both the log and the state untouched. What is folded
        is the events as they decode from their log bytes, not the objects passed in: an
        event built in memory with, say, an int where the schema says float would otherwise
        give this process a state whose digest no replay of the log reproduces.
        """
        if not events:
            return self._state
        records = [(ie.idx, codec.encode_event(ie)) for ie in events]
        return self._commit([codec.decode_event(data) for _, data in records], records)

    def append_decoded(
        self, events: Sequence[IndexedEvent], *, snapshot_when_due: bool = True
    ) -> Committed:
        """`append` for events that are already exactly what their bytes decode to: each was
        decoded from bytes (a worker's frame) or passed through `as_logged`.

        Each event is encoded once and never decoded again (the master's hot path: decoding
        costs more than everything else a commit does per event). Returns the new state and
        the records written, so the same bytes can be forwarded to replicas.

        With `snapshot_when_due=False` a snapshot that comes due is left to the caller
        (`due_snapshot` + `write_snapshot`): the master writes it off its event loop.
        """
        if not events:
            return Committed(self._state, [])
        encode = codec.encode_event
        records = [(ie.idx, encode(ie)) for ie in events]
        return Committed(self._commit(events, records, snapshot_when_due), records)

    def _commit(
        self,
        events: Sequence[IndexedEvent],
        records: list[tuple[int, bytes]],
        snapshot_when_due: bool = True,
    ) -> State:
        state = fold(self._state, events)
        self._log.append(records)
        self._state = state
        if snapshot_when_due:
            due = self.due_snapshot()
            if due is not None:
                self.write_snapshot(*due)
        return state

    def snapshot(self) -> None:
        """Save a snapshot of the current state now (also done every `snapshot_every`).

        A failure is logged, not raised: the events are already durable and a snapshot only
        shortens the next load.
        """
        state = self._state
        self._snapshot_idx = state.last_applied
        self.write_snapshot(state)

    def due_snapshot(self) -> DueSnapshot | None:
        """The state to snapshot, with its log anchor, if `snapshot_every` events have been
        committed since the last snapshot was taken, else None.

        Taking it counts as taking the snapshot: it is not due again for another
        `snapshot_every` events, even if its write fails (a snapshot only shortens a load).
        Write it with `write_snapshot(*due)`.
        """
        state = self._state
        if state.last_applied - self._snapshot_idx < self._every:
            return None
        self._snapshot_idx = state.last_applied
        # Handed out with the state, not kept here for the write: the write may run later,
        # on another thread, after a newer snapshot came due (kept, one would replace the
        # other's, and the older snapshot be saved unchecked).
        return DueSnapshot(state, self._log.last_anchor)

    def write_snapshot(self, state: State, anchor: LogAnchor | None = None) -> bool:
        """Encode `state` and save it as the snapshot at its index; whether it was saved.

        `anchor`: the log record `state` was folded to (`due_snapshot` hands it out); None
        takes the log's last when that is the state's index (a snapshot of the current state),
        else the snapshot is saved unchecked. Safe on a worker thread while commits go on (a
        State is immutable, and the log is not touched); one snapshot is written at a time.
        A failure is logged, not raised.
        """
        idx = state.last_applied
        if anchor is None:
            last = self._log.last_anchor
            anchor = last if last is not None and last.idx == idx else None
        elif anchor.idx != idx:
            raise ValueError(
                f"the anchor given for the snapshot at index {idx} is of record {anchor.idx}"
            )
        try:
            data = codec.encode_state(state)
        except Exception:  # a bug (reducers keep State encodable): not a reason to stop serving
            log.exception("could not encode the state at index %d for a snapshot", idx)
            return False
        with self._snapshot_write:
            try:
                self._snapshots.save(idx, data, anchor)
            except OSError as exc:
                # The file (or directory) that failed, as an operator needs it to free space.
                log.warning(
                    "could not save a snapshot at index %d: %s: %s",
                    idx,
                    exc.filename or self._snapshots.directory,
                    exc.strerror or exc,
                )
                return False
            except Exception:  # a bug: the events are durable, the snapshot is optional
                log.exception("could not save a snapshot at index %d", idx)
                return False
            # Replaced by this version's snapshot. Only after the rename: until then a reader
            # must not take the file there for one this process could restore from.
            self._unusable.discard(idx)
            if self._own is not None:
                self._own.add(idx)
        return True

    def read_from(self, idx: int) -> Iterator[IndexedEvent]:
        for i, payload in self._log.read_from(idx):
            try:
                ie = decode_record(i, payload)
            except EventDecodeError as exc:
                raise _located(exc, self._log) from None
            yield ie

    def read_raw_from(self, idx: int) -> Iterator[tuple[int, bytes]]:
        """(idx, encoded event) records, for shipping to replicas without re-encoding."""
        return self._log.read_from(idx)

    def latest_snapshot(self) -> tuple[int, bytes] | None:
        """(idx, canonical state bytes) of the newest valid snapshot, for catching up; None
        when that one is a snapshot this process could not restore from (a replica could not
        decode it either: the log is sent instead)."""
        try:
            found = self._snapshots.latest(self._log.last_idx)
        except OSError as exc:
            if not self._listing_failed:
                self._listing_failed = True
                log.warning(
                    "snapshots in %s cannot be read (%s): replicas catch up from the log",
                    self._snapshots.directory,
                    exc.strerror or exc,
                )
            return None
        self._listing_failed = False
        if found is None or found[0] in self._unusable:
            return None
        if self._own is not None and found[0] not in self._own:
            return None
        return found

    def close(self) -> None:
        self._log.close()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
