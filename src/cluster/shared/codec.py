"""Wire and disk encodings: events as msgpack, State canonically, and State's digest.

The canonical encoding of State is msgpack with every map written as a dict in sorted key
order, the node marks as the list of (index, seq) pairs by slot (`NodeMarks.pairs`), the node
gauges as the list of their rows by slot (`NodeGauges.rows`: a double and four int64, -1 for
a gauge not reported), struct fields in
declaration order, floats as IEEE-754 doubles. Its BLAKE2b-256 digest is therefore
the same for equal states on any machine, in any process, under any PYTHONHASHSEED (DESIGN
rule 4).
"""

from __future__ import annotations

import hashlib
import typing
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import msgspec
from immutables import Map
from msgspec import UNSET, UnsetType

from cluster.shared.events import Event, IndexedEvent, LogNumber
from cluster.shared.node_gauges import GAUGES, NodeGauges
from cluster.shared.node_marks import NodeMarks, address
from cluster.shared.state import OPEN_WINDOW_STATES, State

_Mark = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
_Cell = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]  # NodeGauges checks the range


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, Map):
        # Sorted keys make the encoding canonical (a map's iteration order depends on
        # hashes, which depend on PYTHONHASHSEED for str keys).
        return dict(sorted(obj.items()))
    if isinstance(obj, (NodeMarks, NodeGauges)):
        return obj.rows()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _dec_hook(tp: Any, obj: Any) -> Any:
    if typing.get_origin(tp) is Map:
        key_type, value_type = typing.get_args(tp)
        return Map(msgspec.convert(obj, dict[key_type, value_type], dec_hook=_dec_hook))  # type: ignore[valid-type]
    if tp is NodeMarks:
        # Each mark must fit the int64 it is stored in: checked here, so bad input is a
        # ValidationError naming the value rather than an OverflowError from the array.
        try:
            return NodeMarks(msgspec.convert(obj, list[tuple[_Mark, _Mark]]))
        except msgspec.ValidationError as exc:
            # Raised as ValueError, msgspec reports it with the field's path.
            raise ValueError(f"bad node marks ({exc})") from None
    if tp is NodeGauges:
        try:
            return NodeGauges(msgspec.convert(obj, list[tuple[float, _Cell, _Cell, _Cell, _Cell]]))
        except msgspec.ValidationError as exc:
            raise ValueError(f"bad node gauges ({exc})") from None
    raise NotImplementedError(f"cannot decode {tp!r}")


_event_encoder = msgspec.msgpack.Encoder()
_event_decoder = msgspec.msgpack.Decoder(IndexedEvent)
_state_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_state_decoder = msgspec.msgpack.Decoder(State, dec_hook=_dec_hook)
_json_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)

DecodeError = msgspec.DecodeError
ValidationError = msgspec.ValidationError

_In = TypeVar("_In")
_Out = TypeVar("_Out")


def strict_decode(decode: Callable[[_In], _Out], data: _In) -> _Out:
    """``decode(data)`` for any msgspec decoder, with one more promise: bad input raises
    `msgspec.DecodeError` (or its `ValidationError`), never anything else.

    msgspec reports a string that is not valid UTF-8 as `UnicodeDecodeError` (and text
    given as `str` holding a lone surrogate as `UnicodeEncodeError`), which callers that
    catch `DecodeError` let through: a peer's frame, a control request or a log record with
    such bytes ended in a traceback instead of the refusal every other bad input gets.
    Every decoding of outside input goes through here.
    """
    try:
        return decode(data)
    except UnicodeError as exc:
        raise DecodeError(f"text is not valid UTF-8: {_unicode_problem(exc)}") from None


def _unicode_problem(exc: UnicodeError) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"byte 0x{exc.object[exc.start]:02x} in a string ({exc.reason})"
    if isinstance(exc, UnicodeEncodeError):
        return f"character {exc.object[exc.start]!r} ({exc.reason})"
    return str(exc)


def encode_event(ie: IndexedEvent) -> bytes:
    return _event_encoder.encode(ie)


def decode_event(data: bytes | memoryview) -> IndexedEvent:
    """Decode one log record; raises `msgspec.DecodeError`/`ValidationError` on bad input."""
    return strict_decode(_event_decoder.decode, data)


def encode_state(state: State) -> bytes:
    """The canonical bytes of a state (also the snapshot format)."""
    return _state_encoder.encode(state)


#: Maps of State whose records carry their own id, and how to read it: a record filed under
#: another key would be found by one id and act as another.
_FILED_RECORDS: tuple[tuple[str, Callable[[Any], object]], ...] = (
    ("runners", lambda r: r.runner_id),
    ("windows", lambda w: w.window_id),
    ("sessions", lambda s: s.session_id),
    ("devshards", lambda d: d.devshard_id),
    ("ledgers", lambda e: e.epoch),
)


def decode_state(data: bytes | memoryview) -> State:
    """Decode a canonical state; raises `msgspec.DecodeError`/`ValidationError` on bad input,
    including a node record filed under another node's id, slots that are not 0..n-1 (one
    per node, live or removed; a node live and removed at once, or removed twice), a record
    whose marks address does not match its slot, an index of closed windows that does not
    list exactly the closed windows held, and a devshard without one assignment time per
    assignment."""
    state = strict_decode(_state_decoder.decode, data)
    if not isinstance(state.removed_nodes, UnsetType) and not state.removed_nodes:
        # No tombstones is "never removed one": UNSET, as a fold leaves it (one digest).
        state = msgspec.structs.replace(state, removed_nodes=UNSET)
    # Slots number every node that ever joined: the live ones and the removed ones' tombstones.
    slots = state.next_node_slot()
    gauged = len(state.node_gauges.rows())
    if gauged > slots:
        raise ValidationError(f"node gauges hold {gauged} slots for {slots} nodes")
    marked = len(state.last_event_by_node.rows())
    if marked > slots:
        # A node joining later would take a slot with marks it never earned.
        raise ValidationError(f"node marks hold {marked} slots for {slots} nodes")
    for field, id_of in _FILED_RECORDS:
        for key, record in getattr(state, field).items():
            if id_of(record) != key:
                raise ValidationError(f"{field}[{key!r}] holds the record of {id_of(record)!r}")
    _check_closed_windows(state)
    for ds_id, shard in state.devshards.items():
        if len(shard.assigned_ms) != len(shard.assignments):
            # Settlement reads them side by side: one time per assignment.
            raise ValidationError(
                f"devshard {ds_id!r}: {len(shard.assigned_ms)} assignment times for "
                f"{len(shard.assignments)} assignments"
            )
    tombstones = state.removed()
    removed_at: dict[str, int] = {}
    for slot, tomb in tombstones.items():
        if not 0 <= slot < slots:
            raise ValidationError(
                f"removed node {tomb.node_id!r}: slot {slot} is outside 0..{slots - 1}"
            )
        # A node keeps one slot for good: removed, it is out of `nodes`; rejoining, it
        # takes back its tombstone's slot (its marks, so its sequence numbers, with it).
        first = removed_at.setdefault(tomb.node_id, slot)
        if first != slot:
            raise ValidationError(
                f"removed node {tomb.node_id!r} has two tombstones, slots "
                f"{min(first, slot)} and {max(first, slot)}"
            )
        if tomb.node_id in state.nodes:
            raise ValidationError(
                f"node {tomb.node_id!r} is both live (slot {state.nodes[tomb.node_id].slot}) "
                f"and removed (slot {slot})"
            )
    slot_holder: dict[int, str] = {}
    for node_id, rec in state.nodes.items():
        if rec.node_id != node_id:
            raise ValidationError(f"nodes[{node_id!r}] holds the record of {rec.node_id!r}")
        # Slots are join order, dense and never reused: a duplicate would share one node's
        # marks and gauges with another, a gap would hand a joining node a slot in use.
        kept = tombstones.get(rec.slot)
        if kept is not None:
            raise ValidationError(
                f"node {node_id!r} holds slot {rec.slot}, kept by removed node {kept.node_id!r}"
            )
        other = slot_holder.setdefault(rec.slot, node_id)
        if other != node_id:
            raise ValidationError(
                f"nodes {min(other, node_id)!r} and {max(other, node_id)!r} "
                f"both hold slot {rec.slot}"
            )
        if not 0 <= rec.slot < slots:
            raise ValidationError(
                f"node {node_id!r}: slot {rec.slot} is outside 0..{slots - 1} "
                f"(slots number the {slots} nodes, removed ones included, in join order)"
            )
        held = [name for name in GAUGES if getattr(rec.info, name) is not None]
        if held:
            # Gauges live in State.node_gauges: a record holding one is from another layout.
            raise ValidationError(f"node {rec.node_id!r}: info holds gauges {held}")
        expected = address(rec.slot)
        if (rec.marks_mid, rec.marks_leaf, rec.marks_offset) != expected:
            raise ValidationError(
                f"node {rec.node_id!r}: marks address ({rec.marks_mid}, {rec.marks_leaf}, "
                f"{rec.marks_offset}) does not match slot {rec.slot} "
                f"(expected ({expected.mid}, {expected.leaf}, {expected.offset}))"
            )
    return state


def state_digest(state: State) -> str:
    """BLAKE2b-256 of the canonical encoding, as hex: equal logs give equal digests."""
    return hashlib.blake2b(encode_state(state), digest_size=32).hexdigest()


def state_to_json(state: State) -> bytes:
    """State as JSON for people and HTTP clients (`cluster replay --json`, `/api/state`): the
    canonical layout, maps as objects with sorted keys, except that the node marks and gauges
    are keyed by node id -- `{"<node_id>": [index, seq], ...}`, [0, 0] for a node with no
    event of its own yet; `{"<node_id>": {"cpu_percent": 12.5, ...}, ...}` with the gauges it
    has reported -- where the canonical encoding lists them by slot, which a reader would
    have to match against each record's `slot`."""
    marks, gauges = state.last_event_by_node, state.node_gauges
    records = sorted(state.nodes.items())
    marks_by_node = {node_id: marks.get(rec.slot) for node_id, rec in records}
    gauges_by_node = {node_id: gauges.reported(rec.slot) for node_id, rec in records}
    # A throwaway copy holding dicts where the tables were, handed straight to the encoder
    # (replace does not check types): at 10,000 nodes 18 ms, against 31 ms converting the
    # whole state to builtins first, and nothing else ever sees it.
    return _json_encoder.encode(
        msgspec.structs.replace(state, last_event_by_node=marks_by_node, node_gauges=gauges_by_node)
    )


def to_builtins(obj: Any) -> Any:
    """Plain dicts/lists for JSON APIs (maps become dicts with sorted keys)."""
    return msgspec.to_builtins(obj, enc_hook=_enc_hook)


def _check_closed_windows(state: State) -> None:
    """`closed_windows_by_node` lists each held closed window once, under its node: a window
    missing there would never be dropped, one listed but gone would fail the drop. A
    snapshot from before the index decodes with it empty and is refused here."""
    listed: set[str] = set()
    for node_id, window_ids in state.closed_windows_by_node.items():
        for window_id in window_ids:
            win = state.windows.get(window_id)
            if win is None or win.node_id != node_id or win.state in OPEN_WINDOW_STATES:
                raise ValidationError(
                    f"closed_windows_by_node[{node_id!r}] lists {window_id!r}, "
                    "which is not a closed window of that node"
                )
            if window_id in listed:
                raise ValidationError(f"closed_windows_by_node lists {window_id!r} twice")
            listed.add(window_id)
    held = sum(1 for w in state.windows.values() if w.state not in OPEN_WINDOW_STATES)
    if len(listed) != held:
        raise ValidationError(
            f"closed_windows_by_node lists {len(listed)} of the {held} closed windows held"
        )


class _IndexedEventObject(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`IndexedEvent` as a JSON object with named fields (`event_json`), not the log's array."""

    idx: LogNumber
    master_time_ms: LogNumber
    origin: str
    seq: LogNumber
    event: Event


_event_json_decoder = msgspec.json.Decoder(_IndexedEventObject)


def event_json(ie: IndexedEvent) -> bytes:
    """One indexed event as a JSON object, fields by name (what the master's /api/events
    stream sends); `event_from_json` reads it back."""
    return msgspec.json.encode(
        {
            "idx": ie.idx,
            "master_time_ms": ie.master_time_ms,
            "origin": ie.origin,
            "seq": ie.seq,
            "event": to_builtins(ie.event),
        }
    )


def event_from_json(data: bytes | str) -> IndexedEvent:
    """The IndexedEvent of one `event_json` object (e.g. an /api/events `data:` line), ready
    for `apply`; raises `msgspec.DecodeError`/`ValidationError` on bad input."""
    o = strict_decode(_event_json_decoder.decode, data)
    return IndexedEvent(o.idx, o.master_time_ms, o.origin, o.seq, o.event)
