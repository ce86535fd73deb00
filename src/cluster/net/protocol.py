"""Wire messages between workers and the master, as one msgspec tagged union.

Streams, all opened by the worker (the master never dials):

- ``HELLO``: `Hello` -> `Challenge` -> `Proof` -> `Welcome` | `ErrorMsg`. Nothing else a
  peer sends is accepted before it has passed hello (see `membership`).
- ``SUBMIT``: the worker sends `SubmitBatch` (its own (seq, event) pairs) and `Ping`; the
  master answers `Ack(seq)` (highest seq of that worker that is durable) and `Pong`.
- ``REQUEST``: one `ControlRequestMsg` (a host's maintenance request, as JSON) answered by
  one `ControlReplyMsg`; the master judges it as coming from the authenticated peer.
- ``SUBSCRIBE``: the worker sends one `Subscribe(from_idx)`; the master answers with an
  optional snapshot (`SnapshotBegin` + `SnapshotChunk`s), then `Events` batches in index order,
  and `Tick` when idle so a hung master is noticed.

Any side may send `ErrorMsg` (a code and a readable message) just before resetting a stream.
Senders that already hold encoded events use the `*Raw` twins (same tag, `msgspec.Raw`
payloads) so events are never decoded and re-encoded just to be forwarded.
"""

from __future__ import annotations

from typing import Annotated, Final, TypeVar

import msgspec

from cluster.shared.codec import strict_decode
from cluster.shared.events import Event, IndexedEvent
from cluster.shared.humanize import key_problem

HELLO_PROTOCOL: Final = "/cluster/hello/1.0.0"
SUBMIT_PROTOCOL: Final = "/cluster/submit/1.0.0"
SUBSCRIBE_PROTOCOL: Final = "/cluster/subscribe/1.0.0"
#: One request per stream: a host's `cluster maintenance ...` forwarded by its worker.
REQUEST_PROTOCOL: Final = "/cluster/request/1.0.0"
#: 2: bulk frames may be compressed (see `framing`).
#: 3: the state a catching-up worker receives keeps node marks by slot (snapshot format 4):
#: an older worker could not decode it, so it is refused at the hello with a clear reason.
#: 4: node records in that state carry their marks address (snapshot format 5).
#: 5: repeated identical runner reports leave RunnerRecord.updated_ms (snapshot format 6): an
#:    older worker would fold the same log to a different state (its digest would disagree).
#: 6: node gauges moved from node records to State.node_gauges (snapshot format 7): an older
#:    worker could not decode that state.
#: 7: `Hello.boot_id`, logged in NodeConnected and kept in NodeRecord.boot_id (snapshot format
#:    8): an older worker would fold the same log to a different state.
#: 8: `State.last_nodes_by_session` holds the node of each slot, and a node's cancelled
#:    maintenance windows leave State before its completed ones: an older worker would fold
#:    the same log to a different state. Also `Hello.runner_digest`, logged in NodeConnected
#:    and kept in NodeRecord.runner_digest: a hello under another runner setting than the
#:    node's recorded self-test clears that test (an older worker would keep it).
#: 9: the same `runner_digest` change, bumped again because builds of 8 without it exist
#:    (this session's earlier commits): their workers could not decode a NodeRecord with
#:    the new field (they forbid unknown fields) and would never catch up.
#: 10: new events `NodeRemoved` (with `State.removed_nodes`, snapshot format 12) and
#:    `NodeStopping` (with `NodeRecord.stopping_idx`, format 13), and `EpochSettled.final`
#:    (a settlement in parts): an older worker could not decode the first two, and would read
#:    every part as final, settling the epoch at the first part.
PROTOCOL_VERSION: Final = 10


class Msg(msgspec.Struct, frozen=True, tag_field="t", kw_only=True):
    pass


#: Longest `Hello.boot_id` accepted (workers send 16 hex digits).
MAX_BOOT_ID_CHARS: Final = 64
#: Longest `Hello.runner_digest` accepted (workers send 64 hex digits: BLAKE2b-256).
MAX_RUNNER_DIGEST_CHARS: Final = 128
#: Frame limit for what a peer sends before it is a member (Hello, Proof, and the first frame
#: of a stream refused as a stranger's): each is under 300 bytes. Read under the 4 MiB bulk
#: limit, every hello stream of a stranger could make the master buffer 4 MiB.
HANDSHAKE_MAX_FRAME: Final = 4 << 10


class Hello(Msg, frozen=True):
    version: int
    nonce: bytes
    #: Random per worker process, new at each start: a hello under another boot id than the
    #: node's last hello means the worker restarted, not merely re-dialled (the master ends
    #: a maintenance window on it). Defaulted so that the message still decodes without it.
    #: Bounded: it is logged (NodeConnected) and kept in State, and every replica reads it.
    boot_id: Annotated[str, msgspec.Meta(max_length=MAX_BOOT_ID_CHARS)] = ""
    #: The digest of the worker's runner setting (`RunnerSetting.digest()`: its kind and
    #: config), `NO_RUNNERS_DIGEST` for a worker that runs no runners ("" from workers built
    #: before that value: they said nothing either way). The master logs it in NodeConnected,
    #: whose reducer drops the node's self-test if it was of another setting: until the new
    #: setting's result arrives the node is not self-tested, and nothing is placed there.
    #: Bounded like `boot_id`: it is logged and kept in State.
    runner_digest: Annotated[str, msgspec.Meta(max_length=MAX_RUNNER_DIGEST_CHARS)] = ""

    def __post_init__(self) -> None:
        # Both are keys the worker makes (hex digits, or `NO_RUNNERS_DIGEST`), compared and
        # shown as they are: printable, as the same keys in its events must be (admission).
        # Raised here, decode refuses the hello as `malformed`, naming the field, as it does
        # one too long.
        for field in ("boot_id", "runner_digest"):
            problem = key_problem(field, getattr(self, field))
            if problem is not None:
                raise ValueError(f"Hello {problem}")


class Challenge(Msg, frozen=True):
    nonce: bytes
    #: HMAC proving the master knows the cluster secret (empty when none is configured).
    proof: bytes = b""


class Proof(Msg, frozen=True):
    proof: bytes = b""


class Welcome(Msg, frozen=True):
    node_id: str
    last_idx: int
    #: Highest seq of this node the log holds: the worker drops outbox entries up to it.
    last_seq: int


class SeqEvent(msgspec.Struct, frozen=True, array_like=True):
    seq: int
    event: Event


class SubmitBatch(Msg, frozen=True):
    events: list[SeqEvent]


class Ack(Msg, frozen=True):
    seq: int


class Ping(Msg, frozen=True):
    pass


class Pong(Msg, frozen=True):
    last_idx: int = 0


class Subscribe(Msg, frozen=True):
    from_idx: int


class SnapshotBegin(Msg, frozen=True):
    idx: int
    size: int


class SnapshotChunk(Msg, frozen=True):
    data: bytes


class Events(Msg, frozen=True):
    events: list[IndexedEvent]


class Tick(Msg, frozen=True):
    last_idx: int


class ControlRequestMsg(Msg, frozen=True, tag="Request"):
    """A `cluster.control.Request` (its JSON), asked on behalf of the worker's own host."""

    payload: bytes


class ControlReplyMsg(Msg, frozen=True, tag="Reply"):
    """The master's `cluster.control.Reply` (its JSON)."""

    payload: bytes


class ErrorMsg(Msg, frozen=True, tag="Error"):
    code: str
    message: str


Message = (
    Hello
    | Challenge
    | Proof
    | Welcome
    | SubmitBatch
    | Ack
    | Ping
    | Pong
    | Subscribe
    | SnapshotBegin
    | SnapshotChunk
    | Events
    | Tick
    | ControlRequestMsg
    | ControlReplyMsg
    | ErrorMsg
)


# Same tags as SubmitBatch/Events, with already-encoded payloads.
class SeqEventRaw(msgspec.Struct, frozen=True, array_like=True):
    seq: int
    event: msgspec.Raw


class SubmitBatchRaw(Msg, frozen=True, tag="SubmitBatch"):
    events: list[SeqEventRaw]


class EventsRaw(Msg, frozen=True, tag="Events"):
    events: list[msgspec.Raw]


#: The code the master fails a member's open streams with when the operator removes its node
#: (`NodeRemoved`): its session is dropped, and the worker says hello again to rejoin.
REMOVED: Final = "removed"
REMOVED_MESSAGE: Final = "removed from the cluster by the operator"

#: Codes the master fails a submit stream with when a batch's *content* is refused (the
#: admission rules, or a frame it cannot decode or take): resending the same events can never
#: help, so the worker finds the refused one and sets it aside (worker/client.py).
CONTENT_REFUSALS: Final = frozenset(
    {
        "bad-seq",
        "forbidden-event",
        "forbidden-origin",
        "bad-units",
        "bad-count",
        "malformed",
        "too-large",
    }
)

T = TypeVar("T")


class ProtocolError(Exception):
    """A frame decoded to something invalid; `code` is sent to the peer in an ErrorMsg."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Msg) -> bytes:
    return _encoder.encode(msg)


def encode_raw(obj: object) -> bytes:
    """Encode any msgspec-encodable value (an Event for the outbox, say)."""
    return _encoder.encode(obj)


def decode(frame: bytes) -> Message:
    """Decode one frame; a bad one raises ProtocolError("malformed", <what was wrong>)."""
    try:
        msg: Message = strict_decode(_decoder.decode, frame)
        return msg
    except msgspec.ValidationError as exc:
        raise ProtocolError("malformed", f"invalid message: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise ProtocolError("malformed", f"undecodable frame: {exc}") from exc


def expect(msg: Message, kind: type[T]) -> T:
    """The message, if it is of the kind this point of the conversation allows."""
    if isinstance(msg, ErrorMsg):
        raise ProtocolError(msg.code, f"peer reported {msg.code}: {msg.message}")
    if not isinstance(msg, kind):
        raise ProtocolError("unexpected", f"expected {kind.__name__}, got {type(msg).__name__}")
    return msg
