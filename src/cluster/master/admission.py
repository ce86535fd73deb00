"""Which events a worker may submit, and in whose name: pure rules the master applies.

The master binds every submitted event to the authenticated peer (its origin). A worker may
only state facts about itself (an event's `node_id` must be its own id) and only of the kinds
a worker observes; decisions (placement, epochs, maintenance transitions, disconnects) are
the master's and arrive only through the planner or a request handler. So is an excuse: a
worker may report work it missed, but only the master excuses a miss (the one maintenance
rule, `cluster.shared.excuse`), so a `WorkMissed` marked excused is refused from a worker.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from operator import attrgetter, lt
from typing import Final

import msgspec

from cluster.shared.events import (
    INT64_MAX,
    MAX_EVENT_BYTES,
    MAX_MISSED_SLOTS,
    MAX_WORK_UNITS,
    Event,
    NodeGatheredInfo,
    NodeHeartbeat,
    NodeStopping,
    RunnerSelfTestCompleted,
    RunnerStatusUpdated,
    WorkMissed,
    WorkReported,
)

_node_id = attrgetter("node_id")
_encode = msgspec.msgpack.Encoder().encode

WORKER_EVENT_TYPES: Final[tuple[type, ...]] = (
    NodeGatheredInfo,
    NodeHeartbeat,
    RunnerStatusUpdated,
    RunnerSelfTestCompleted,
    WorkReported,
    WorkMissed,
    # A worker's goodbye: only for its own node (the origin check below), like every fact.
    NodeStopping,
)


class AdmissionError(Exception):
    """A submitted event is refused; `code` goes to the worker with the message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_worker_event(origin: str, seq: int, event: Event) -> None:
    """Raise AdmissionError unless `origin` may submit `event` with sequence number `seq`."""
    if not 1 <= seq <= INT64_MAX:
        raise AdmissionError("bad-seq", f"sequence number {seq} must be 1..{INT64_MAX}")
    if not isinstance(event, WORKER_EVENT_TYPES):
        raise AdmissionError(
            "forbidden-event",
            f"event type {type(event).__name__} (seq {seq}) may only be issued by the master",
        )
    if isinstance(event, WorkReported) and not 1 <= event.units <= MAX_WORK_UNITS:
        raise AdmissionError(
            "bad-units",
            f"WorkReported (seq {seq}) carries {event.units} units: must be 1..{MAX_WORK_UNITS}",
        )
    if isinstance(event, WorkMissed) and not 1 <= event.count <= MAX_MISSED_SLOTS:
        raise AdmissionError(
            "bad-count",
            f"WorkMissed (seq {seq}) counts {event.count} slots: must be 1..{MAX_MISSED_SLOTS}",
        )
    if isinstance(event, WorkMissed) and event.excused:
        raise AdmissionError(
            "forbidden-event",
            f"WorkMissed (seq {seq}) is marked excused: only the master excuses missed work "
            "(maintenance windows); a worker reports its misses with excused=False",
        )
    node_id = getattr(event, "node_id", origin)
    if node_id != origin:
        raise AdmissionError(
            "forbidden-origin",
            f"peer {origin} may not speak for node {node_id} ({type(event).__name__}, seq {seq})",
        )


def check_worker_batch(origin: str, events: Iterable[tuple[int, Event]]) -> None:
    """Every event of a submitted batch, and sequence numbers that strictly increase.

    A worker numbers its events 1, 2, 3... and resends in order; a batch that goes back is
    a broken or hostile sender, refused rather than silently treated as duplicates.
    """
    prev = 0
    for seq, event in events:
        check_worker_event(origin, seq, event)
        if seq <= prev:
            raise AdmissionError(
                "bad-seq", f"sequence numbers must increase within a batch: {seq} follows {prev}"
            )
        prev = seq


def check_event_sizes(events: Sequence[Event]) -> None:
    """Raise AdmissionError("too-large") for an event whose encoding exceeds MAX_EVENT_BYTES.

    A frame can hold one event of nearly its whole size, but the log is sent to replicas in
    frames of the same size with more around each record: such an event, once logged, could
    be sent to nobody (every catch-up past it would fail). Called only for frames larger than
    the bound (one within it cannot hold a larger event).
    """
    for event in events:
        size = len(_encode(event))
        if size > MAX_EVENT_BYTES:
            raise AdmissionError(
                "too-large",
                f"{type(event).__name__} of {size} bytes exceeds {MAX_EVENT_BYTES} bytes",
            )


def check_worker_columns(origin: str, seqs: Sequence[int], events: Sequence[Event]) -> None:
    """`check_worker_batch` for a batch given as two columns, seqs and events.

    The master checks every event of every frame, so a batch that passes is checked with a
    handful of C-level passes rather than Python per event; one that fails is checked again
    event by event, for the exact error `check_worker_batch` gives.
    """
    try:
        types = set(map(type, events))
        ok = (
            len(seqs) == len(events)
            and (not seqs or (seqs[0] >= 1 and seqs[-1] <= INT64_MAX))  # the seqs increase
            and all(map(lt, seqs, seqs[1:]))
            and types.issubset(WORKER_EVENT_TYPES)
            and set(map(_node_id, events)) <= {origin}
            and _amounts_in_bounds(events, types)
        )
    except AttributeError:  # an event without a node id: judged one by one below
        ok = False
    if not ok:
        check_worker_batch(origin, zip(seqs, events, strict=True))


def _amounts_in_bounds(events: Sequence[Event], types: set[type]) -> bool:
    """The work amounts `check_worker_event` bounds, for the kinds the batch holds, and no
    miss marked excused."""
    if WorkReported in types and not all(
        1 <= e.units <= MAX_WORK_UNITS for e in events if type(e) is WorkReported
    ):
        return False
    return WorkMissed not in types or all(
        1 <= e.count <= MAX_MISSED_SLOTS and not e.excused for e in events if type(e) is WorkMissed
    )
