"""Which events a worker may submit, and in whose name: pure rules the master applies.

The master binds every submitted event to the authenticated peer (its origin). A worker may
only state facts about itself (an event's `node_id` must be its own id) and only of the kinds
a worker observes; decisions (placement, epochs, maintenance transitions, disconnects) are
the master's and arrive only through the planner or a request handler. So is an excuse: a
worker may report work it missed, but only the master excuses a miss (the one maintenance
rule, `cluster.shared.excuse`), so a `WorkMissed` marked excused is refused from a worker.

Every text a worker writes is bounded too (`TEXT_LIMITS`, `_info_problem`), and so is every
number of a GPU's reading (`GPU_LIMITS`: utilisation 0..100, a temperature in physical
sense...) and of a self-test's timings (`MAX_SELF_TEST_MS`: 0..a day): the log keeps each
event forever, on every replica, and status pages and decision-log lines show them, so a
field may not be bounded only by the event size (1 MiB). The bounds are far above what an
honest worker sends (it clips reasons, hostnames and self-test timings to them, and reports
a GPU reading beyond them as not reported). Keys a worker makes itself
(`KEY_FIELDS`: hex digests, boot ids, fixed names) must also be printable: no display or
comparison should meet a newline or an escape code in a key. Free text (reasons, hostnames,
GPU names) may hold any character -- a reason quotes a program's stderr -- and is escaped
where it is shown (`humanize.printable`); so are the runner and devshard ids a worker
echoes, which the master made: a session named before names were checked with `fullmatch`
could end in a newline, and its devshard's work must still be taken.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from itertools import chain, compress, repeat
from operator import attrgetter, is_, is_not, lt
from typing import Final

import msgspec

from cluster.net.protocol import MAX_BOOT_ID_CHARS, MAX_RUNNER_DIGEST_CHARS
from cluster.shared.events import (
    GPU_LIMITS,
    INT64_MAX,
    MAX_EVENT_BYTES,
    MAX_HOSTNAME_CHARS,
    MAX_ID_CHARS,
    MAX_MISSED_SLOTS,
    MAX_NODE_GPUS,
    MAX_REASON_CHARS,
    MAX_SELF_TEST_MS,
    MAX_WORK_UNITS,
    SELF_TEST_MS_FIELDS,
    Event,
    NodeGatheredInfo,
    NodeHeartbeat,
    NodeStopping,
    RunnerSelfTestCompleted,
    RunnerStatusUpdated,
    WorkMissed,
    WorkReported,
)
from cluster.shared.humanize import key_problem

_node_id = attrgetter("node_id")
_info, _hostname, _gpus = attrgetter("info"), attrgetter("hostname"), attrgetter("gpus")
_gpu_name, _gpu_uuid = attrgetter("name"), attrgetter("uuid")
_gpu_number_getters: Final = tuple((attrgetter(f), low, high) for f, low, high in GPU_LIMITS)
_is_reported = partial(is_not, None)
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


#: The longest text each worker event kind may carry, field by field (`node_id` is bound to
#: the origin instead; NodeGatheredInfo's `info` is checked by `_info_problem`).
TEXT_LIMITS: Final[dict[type, tuple[tuple[str, int], ...]]] = {
    NodeGatheredInfo: (("source", MAX_ID_CHARS),),
    RunnerStatusUpdated: (
        ("runner_id", MAX_ID_CHARS),
        ("devshard_id", MAX_ID_CHARS),
        ("reason", MAX_REASON_CHARS),
    ),
    RunnerSelfTestCompleted: (
        ("runner_kind", MAX_ID_CHARS),
        ("config_digest", MAX_RUNNER_DIGEST_CHARS),  # compared with Hello.runner_digest
        ("reason", MAX_REASON_CHARS),
    ),
    WorkReported: (("devshard_id", MAX_ID_CHARS),),
    WorkMissed: (("devshard_id", MAX_ID_CHARS), ("reason", MAX_REASON_CHARS)),
    NodeStopping: (("boot_id", MAX_BOOT_ID_CHARS), ("reason", MAX_REASON_CHARS)),  # as Hello's
}
#: Keys the worker makes itself, which must be printable (no control or format character).
KEY_FIELDS: Final[dict[type, tuple[str, ...]]] = {
    NodeGatheredInfo: ("source",),
    RunnerSelfTestCompleted: ("runner_kind", "config_digest"),
    NodeStopping: ("boot_id",),
}
_getters: Final = {
    kind: tuple((attrgetter(field), limit) for field, limit in limits)
    for kind, limits in TEXT_LIMITS.items()
}
_key_getters: Final = {kind: tuple(map(attrgetter, fields)) for kind, fields in KEY_FIELDS.items()}


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
    problem = text_problem(event) or _self_test_problem(event)
    if problem is not None:
        raise AdmissionError("forbidden-event", f"{type(event).__name__} (seq {seq}) {problem}")
    node_id = getattr(event, "node_id", origin)
    if node_id != origin:
        raise AdmissionError(
            "forbidden-origin",
            f"peer {origin} may not speak for node {node_id} ({type(event).__name__}, seq {seq})",
        )


def text_problem(event: Event) -> str | None:
    """What is wrong with the text of a worker event (a field too long, a key that is not
    printable), or None."""
    kind = type(event)
    for field, limit in TEXT_LIMITS.get(kind, ()):
        n = len(getattr(event, field))
        if n > limit:
            return f"field {field} holds {n} characters: the limit is {limit}"
    for field in KEY_FIELDS.get(kind, ()):
        problem = key_problem(field, getattr(event, field))
        if problem is not None:
            return problem
    if isinstance(event, NodeGatheredInfo):
        return _info_problem(event)
    return None


def _self_test_problem(event: Event) -> str | None:
    """A self-test timing out of 0..`MAX_SELF_TEST_MS`, or None."""
    if isinstance(event, RunnerSelfTestCompleted):
        for field in SELF_TEST_MS_FIELDS:
            value = getattr(event, field)
            if not 0 <= value <= MAX_SELF_TEST_MS:
                return f"field {field} is {value} ms: must be 0..{MAX_SELF_TEST_MS} (a day)"
    return None


def _info_problem(event: NodeGatheredInfo) -> str | None:
    info = event.info
    if info.hostname is not None and len(info.hostname) > MAX_HOSTNAME_CHARS:
        n = len(info.hostname)
        return f"field info.hostname holds {n} characters: the limit is {MAX_HOSTNAME_CHARS}"
    gpus = info.gpus or ()
    if len(gpus) > MAX_NODE_GPUS:
        return f"field info.gpus lists {len(gpus)} GPUs: the limit is {MAX_NODE_GPUS}"
    for i, gpu in enumerate(gpus):
        for field in ("name", "uuid"):
            n = len(getattr(gpu, field))
            if n > MAX_ID_CHARS:
                limit = MAX_ID_CHARS
                return f"field info.gpus[{i}].{field} holds {n} characters: the limit is {limit}"
        for field, low, high in GPU_LIMITS:
            value = getattr(gpu, field)
            if value is not None and not low <= value <= high:
                return f"field info.gpus[{i}].{field} is {value}: must be {low}..{high}"
    return None


def _infos_in_bounds(events: Sequence[NodeGatheredInfo]) -> bool:
    """`_info_problem` is None for every event, in C-level passes."""
    infos = list(map(_info, events))
    hostnames = [h for h in map(_hostname, infos) if h is not None]
    if hostnames and max(map(len, hostnames)) > MAX_HOSTNAME_CHARS:
        return False
    gpu_lists = [g for g in map(_gpus, infos) if g]
    if not gpu_lists:
        return True
    if max(map(len, gpu_lists)) > MAX_NODE_GPUS:
        return False
    gpus = list(chain.from_iterable(gpu_lists))
    if max(map(len, map(_gpu_name, gpus))) > MAX_ID_CHARS or (
        max(map(len, map(_gpu_uuid, gpus))) > MAX_ID_CHARS
    ):
        return False
    for get, low, high in _gpu_number_getters:
        values = list(map(get, gpus))
        if None in values:  # an optional reading not reported (rare: most GPUs report all)
            values = list(filter(_is_reported, values))
            if not values:
                continue
        if min(values) < low or max(values) > high:
            return False
    return True


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
            and _texts_in_bounds(events, types)
        )
    except AttributeError:  # an event without a node id: judged one by one below
        ok = False
    if not ok:
        check_worker_batch(origin, zip(seqs, events, strict=True))


def _amounts_in_bounds(events: Sequence[Event], types: set[type]) -> bool:
    """The work amounts and self-test timings `check_worker_event` bounds, for the kinds the
    batch holds, and no miss marked excused."""
    if RunnerSelfTestCompleted in types and any(
        _self_test_problem(e) for e in events if type(e) is RunnerSelfTestCompleted
    ):
        return False
    if WorkReported in types and not all(
        1 <= e.units <= MAX_WORK_UNITS for e in events if type(e) is WorkReported
    ):
        return False
    return WorkMissed not in types or all(
        1 <= e.count <= MAX_MISSED_SLOTS and not e.excused for e in events if type(e) is WorkMissed
    )


def _texts_in_bounds(events: Sequence[Event], types: set[type]) -> bool:
    """`text_problem` is None for every event, in C-level passes per kind and field: the
    longest value of each bounded field, and every key printable. (Heartbeats, most of the
    traffic, carry no text but their node id and are skipped.)"""
    kinds: list[type] = []
    for kind in types:
        getters = _getters.get(kind)
        if getters is None:
            continue
        kinds = kinds or list(map(type, events))
        of = events if len(types) == 1 else list(compress(events, map(is_, kinds, repeat(kind))))
        for get, limit in getters:
            if max(map(len, map(get, of))) > limit:
                return False
        for get in _key_getters.get(kind, ()):
            if not all(map(str.isprintable, map(get, of))):
                return False
        if kind is NodeGatheredInfo and not _infos_in_bounds(of):  # type: ignore[arg-type]
            return False
    return True
