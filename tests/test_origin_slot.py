"""IndexedEvent.origin_slot: the master stamps a known node's slot on its records, `apply` and
`fold` find a connected node's marks by it, and a slot that contradicts the origin is an
error wherever the node is looked up."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from strategies import event_logs, stamped

from cluster import cli
from cluster.shared import codec
from cluster.shared.apply import OriginSlotError, apply, fold
from cluster.shared.eventlog import EventLog
from cluster.shared.events import (
    MASTER_ORIGIN,
    Event,
    IndexedEvent,
    NodeConnected,
    NodeDisconnected,
    NodeGatheredInfo,
    NodeHeartbeat,
    NodeInfo,
)
from cluster.shared.state import EMPTY_STATE, State

A, B = "12D3KooWNodeA", "12D3KooWNodeB"


def apply_each(events: list[IndexedEvent], state: State = EMPTY_STATE) -> State:
    for ie in events:
        state = apply(state, ie)
    return state


def log(*steps: tuple[str, Event, int]) -> list[IndexedEvent]:
    """(origin, event, origin_slot) steps as consecutive records; seq counts per origin."""
    seqs: dict[str, int] = {}
    out = []
    for i, (origin, event, slot) in enumerate(steps, start=1):
        seqs[origin] = seqs.get(origin, 0) + 1
        out.append(IndexedEvent(i, 1_000 * i, origin, seqs[origin], event, slot))
    return out


def unstamped(events: list[IndexedEvent]) -> list[IndexedEvent]:
    return [msgspec.structs.replace(ie, origin_slot=-1) for ie in events]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=event_logs(max_size=150))
def test_a_stamped_log_folds_to_the_state_of_the_same_log_unstamped(
    events: list[IndexedEvent],
) -> None:
    plain = unstamped(events)
    hinted = stamped(plain)
    expected = apply_each(plain)
    assert apply_each(hinted) == expected
    assert fold(EMPTY_STATE, hinted) == expected
    middle = len(events) // 2
    assert fold(apply_each(hinted[:middle]), hinted[middle:]) == expected
    assert codec.state_digest(apply_each(hinted)) == codec.state_digest(expected)


def test_the_slot_finds_a_connected_node_and_a_rejoin_still_looks_it_up() -> None:
    events = log(
        (A, NodeHeartbeat(node_id=A), -1),  # A joins: slot 0
        (B, NodeHeartbeat(node_id=B), -1),  # B joins: slot 1
        (B, NodeHeartbeat(node_id=B), 1),  # connected: found by its slot
        (B, NodeGatheredInfo(node_id=B, source="cpu", info=NodeInfo(cpu_count=8)), 1),
        (MASTER_ORIGIN, NodeDisconnected(node_id=B, reason="gone"), -1),
        (B, NodeHeartbeat(node_id=B), 1),  # disconnected: looked up, rejoins
        (B, NodeHeartbeat(node_id=B), 1),
    )
    state = apply_each(events)
    assert state == apply_each(unstamped(events)) == fold(EMPTY_STATE, events)
    b = state.nodes[B]
    assert (b.slot, b.connected, b.joined_idx) == (1, True, 6)
    assert state.last_event_by_node.get(1) == (7, 5)
    assert state.node_info(B) is not None and state.node_info(B).cpu_count == 8  # type: ignore[union-attr]
    marks = state.last_event_by_node
    assert marks.is_connected(0) and marks.is_connected(1) and not marks.is_connected(2)


def test_which_slots_hold_a_connected_node_survives_a_snapshot() -> None:
    events = log(
        (A, NodeHeartbeat(node_id=A), -1),
        (B, NodeHeartbeat(node_id=B), -1),
        (MASTER_ORIGIN, NodeDisconnected(node_id=A, reason="gone"), -1),
    )
    decoded = codec.decode_state(codec.encode_state(apply_each(events)))
    marks = decoded.last_event_by_node
    assert not marks.is_connected(0) and marks.is_connected(1)
    # And a node the master connected before it spoke is found by its slot at once.
    hello = log((MASTER_ORIGIN, NodeConnected(node_id=A), -1), (A, NodeHeartbeat(node_id=A), 0))
    state = apply_each(hello)
    assert state.last_event_by_node.get(0) == (2, 1)
    assert state == apply_each(unstamped(hello))


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        # A new node's record cannot name a slot other than the one it is about to take.
        (((A, NodeHeartbeat(node_id=A), 3),), "origin '12D3KooWNodeA' carries slot 3, but"),
        # A disconnected node is looked up, and its slot checked.
        (
            (
                (A, NodeHeartbeat(node_id=A), -1),
                (B, NodeHeartbeat(node_id=B), -1),
                (MASTER_ORIGIN, NodeDisconnected(node_id=B, reason="gone"), -1),
                (B, NodeHeartbeat(node_id=B), 2),
            ),
            "event 4: origin '12D3KooWNodeB' carries slot 2, but that node's slot is 1",
        ),
        # An info report reads the record: its slot is checked even when the slot is live.
        (
            (
                (A, NodeHeartbeat(node_id=A), -1),
                (B, NodeHeartbeat(node_id=B), -1),
                (B, NodeGatheredInfo(node_id=B, source="cpu", info=NodeInfo(cpu_count=2)), 0),
            ),
            "event 3: origin '12D3KooWNodeB' carries slot 0, but that node's slot is 1",
        ),
    ],
)
def test_a_slot_that_contradicts_the_origin_is_reported(
    steps: tuple[tuple[str, Event, int], ...], message: str
) -> None:
    events = log(*steps)
    with pytest.raises(OriginSlotError, match=message):
        apply_each(events)
    with pytest.raises(OriginSlotError, match=message):
        fold(EMPTY_STATE, events)


def test_a_record_with_a_negative_slot_other_than_minus_one_does_not_decode() -> None:
    good = IndexedEvent(1, 1, A, 1, NodeHeartbeat(node_id=A), 0)
    assert codec.decode_event(codec.encode_event(good)) == good
    bad = codec.encode_event(msgspec.structs.replace(good, origin_slot=-2))
    with pytest.raises(codec.ValidationError, match=r"Expected `int` >= -1 - at `\$\[5\]`"):
        codec.decode_event(bad)
    # A record written before slots were stamped (five fields) reads as unstamped.
    old = msgspec.msgpack.encode([1, 1, A, 1, msgspec.to_builtins(NodeHeartbeat(node_id=A))])
    assert codec.decode_event(old).origin_slot == -1


def test_replay_of_a_log_whose_slot_contradicts_its_origin_names_the_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Written past the store (which folds before it commits, and so refuses such a batch).
    events = log((A, NodeHeartbeat(node_id=A), -1), (A, NodeHeartbeat(node_id=A), 5))
    with EventLog.open(tmp_path / "log") as lg:
        lg.append([(ie.idx, codec.encode_event(ie)) for ie in events])
    assert cli.main(["replay", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "event 2: origin '12D3KooWNodeA' carries slot 5, but that node's slot is 0" in err
