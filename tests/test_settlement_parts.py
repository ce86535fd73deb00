"""Settlements of any size: logged in parts that each fit a frame, folding to the one-event
result; old single-event settlements replay as they always did."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import msgspec
import pytest
from planner_world import quick_config

from cluster.master.liveness import EMPTY_BOOK
from cluster.master.planner import plan
from cluster.master.server import MAX_MASTER_EVENT_BYTES
from cluster.master.settlement import settle_epoch, split_settlement
from cluster.net.protocol import encode_raw
from cluster.shared.apply import fold
from cluster.shared.codec import decode_event, encode_event, state_digest
from cluster.shared.events import (
    MASTER_ORIGIN,
    SETTLEMENT_PART_BYTES,
    DevshardPlaced,
    EpochSettled,
    EpochStarted,
    Event,
    IndexedEvent,
    NodeDisconnected,
    NodeHeartbeat,
    SessionRequested,
    SlotAssignment,
    WorkReported,
)
from cluster.shared.state import EMPTY_STATE, EpochRecord, State

CFG = quick_config()
START_MS = 1_000
END_MS = 61_000


def _node(i: int) -> str:
    # As long as a real libp2p peer id (52 characters): payout sizes are realistic.
    return f"12D3KooWD6FXdxPeu8Y7TL4snPwAnK2Pc7BuReewmry{i:010d}"


def _indexed(state: State, origin: str, events: Sequence[Event], now_ms: int) -> list[IndexedEvent]:
    first = state.last_applied + 1
    return [IndexedEvent(first + i, now_ms, origin, first + i, ev) for i, ev in enumerate(events)]


@functools.cache  # States are immutable: the 30,000-node one is built once for the module
def _cluster(nodes: int) -> tuple[State, EpochRecord]:
    """`nodes` nodes joined before epoch 1; every other one was disconnected (unexcused)
    during it, every third of the rest did work: punished, paid and credit-only payouts."""
    ids = [_node(i) for i in range(nodes)]
    log: list[IndexedEvent] = [
        IndexedEvent(i + 1, 0, node, 1, NodeHeartbeat(node_id=node)) for i, node in enumerate(ids)
    ]
    master: list[Event] = [
        EpochStarted(epoch=1, start_ms=START_MS, end_ms=END_MS, seed=7),
        SessionRequested(session_id="s", slots=nodes, memory_per_slot_mb=1),
        DevshardPlaced(
            devshard_id="ds-1",
            session_id="s",
            epoch=1,
            assignments=tuple(SlotAssignment(i, node) for i, node in enumerate(ids)),
            ends_ms=END_MS,
        ),
    ]
    for i in range(0, nodes, 2):
        master.append(
            NodeDisconnected(
                node_id=ids[i], reason=f"no events for 3 cycles (3s); last event index {i + 1}"
            )
        )
    state = fold(EMPTY_STATE, log)
    state = fold(state, _indexed(state, MASTER_ORIGIN, master, START_MS))
    work = [
        IndexedEvent(state.last_applied + 1 + n, START_MS + 1, ids[i], 2, ev)
        for n, (i, ev) in enumerate(
            (i, WorkReported(devshard_id="ds-1", node_id=ids[i], units=i + 1, epoch=1))
            for i in range(1, nodes, 6)
        )
    ]
    state = fold(state, work)
    assert state.epoch is not None
    return state, state.epoch


def _settle(state: State, events: Sequence[Event]) -> State:
    return fold(state, _indexed(state, MASTER_ORIGIN, events, END_MS))


def test_a_settlement_of_30000_nodes_is_logged_in_parts_that_each_fit_a_frame() -> None:
    state, epoch = _cluster(30_000)
    whole = settle_epoch(state, epoch, CFG)
    assert len(whole.payouts) == 30_000
    # The defect: as one event it could never be logged (the master refused it every cycle).
    assert len(encode_raw(whole)) > MAX_MASTER_EVENT_BYTES
    parts = split_settlement(whole)
    assert len(parts) > 1
    for part in parts:
        assert len(encode_raw(part)) <= min(MAX_MASTER_EVENT_BYTES, SETTLEMENT_PART_BYTES + 64)
        assert part.epoch == 1
    assert [p.final for p in parts] == [False] * (len(parts) - 1) + [True]
    # Disjoint, complete, in order.
    assert tuple(p for part in parts for p in part.payouts) == whole.payouts
    # Folding the parts gives the state the one event gives.
    by_parts = _settle(state, parts)
    by_one = _settle(state, [whole])
    assert by_parts.ledgers[1].settled and by_one.ledgers[1].settled
    assert by_parts.ledgers == by_one.ledgers
    assert by_parts.credit_ms_by_node == by_one.credit_ms_by_node
    assert state_digest(by_parts) == state_digest(_with_index(by_one, by_parts))


def _with_index(state: State, like: State) -> State:
    """`state` at `like`'s log position (parts take more indexes than one event)."""
    return msgspec.structs.replace(
        state,
        last_applied=like.last_applied,
        last_time_ms=like.last_time_ms,
        master_seq=like.master_seq,
    )


def test_the_planner_settles_a_30000_node_epoch_in_loggable_parts() -> None:
    state, _ = _cluster(30_000)
    events = plan(state, END_MS, EMPTY_BOOK, CFG).events
    parts = [e for e in events if isinstance(e, EpochSettled)]
    assert len(parts) > 1 and parts[-1].final and not any(p.final for p in parts[:-1])
    for event in events:
        assert len(encode_raw(event)) <= MAX_MASTER_EVENT_BYTES, type(event).__name__
    after = _settle(state, events)
    assert after.ledgers[1].settled
    paid = sum(1 for account in after.ledgers[1].nodes.values() if account.payout is not None)
    assert paid == 30_000


def test_a_partially_settled_epoch_is_not_settled_and_its_paid_nodes_are_not_paid_again() -> None:
    """A crash cut a decision's last parts (a torn tail): the epoch is unsettled, the nodes
    of the logged parts hold their payouts and credit once; the planner settles the rest."""
    state, epoch = _cluster(3_000)
    parts = split_settlement(settle_epoch(state, epoch, CFG), part_bytes=64 << 10)
    assert len(parts) >= 3
    partial = _settle(state, parts[:1])
    ledger = partial.ledgers[1]
    assert not ledger.settled
    first = {p.node_id for p in parts[0].payouts}
    assert {n for n, a in ledger.nodes.items() if a.payout is not None} == first
    # Decided again on the partial state: only the nodes without a payout.
    rest = settle_epoch(partial, epoch, CFG)
    assert {p.node_id for p in rest.payouts}.isdisjoint(first)
    again = _settle(partial, split_settlement(rest, part_bytes=64 << 10))
    whole = _settle(state, parts)
    assert again.ledgers == whole.ledgers
    assert again.credit_ms_by_node == whole.credit_ms_by_node
    # A part that names a paid node again (a hand-made log) does not pay it twice.
    replayed = _settle(partial, [parts[0], *parts[1:]])
    assert replayed.credit_ms_by_node == whole.credit_ms_by_node


def test_work_of_a_node_paid_by_a_part_is_late_work() -> None:
    state, epoch = _cluster(30)
    paid = settle_epoch(state, epoch, CFG).payouts[1]
    partial = _settle(state, [EpochSettled(epoch=1, payouts=(paid,), final=False)])
    report = WorkReported(devshard_id="ds-1", node_id=paid.node_id, units=4, epoch=1)
    after = fold(partial, [IndexedEvent(partial.last_applied + 1, END_MS, paid.node_id, 9, report)])
    account = after.ledgers[1].node(paid.node_id)
    assert account.units == paid.units and account.late_units == 4


def _old_log(settled: bytes) -> list[IndexedEvent]:
    """A small epoch's log around a settlement record given as logged bytes."""
    events: list[tuple[str, Event]] = [
        ("a", NodeHeartbeat(node_id="a")),
        ("b", NodeHeartbeat(node_id="b")),
        (MASTER_ORIGIN, EpochStarted(epoch=1, start_ms=10, end_ms=100, seed=3)),
        (MASTER_ORIGIN, SessionRequested(session_id="s", slots=2, memory_per_slot_mb=1)),
        (
            MASTER_ORIGIN,
            DevshardPlaced(
                devshard_id="ds",
                session_id="s",
                epoch=1,
                assignments=(SlotAssignment(0, "a"), SlotAssignment(1, "b")),
                ends_ms=100,
            ),
        ),
        ("a", WorkReported(devshard_id="ds", node_id="a", units=2, epoch=1)),
        (MASTER_ORIGIN, NodeDisconnected(node_id="b", reason="gone")),
    ]
    log = [IndexedEvent(i, 10 * i, o, i, ev) for i, (o, ev) in enumerate(events, start=1)]
    log.append(decode_event(settled))
    late = WorkReported(devshard_id="ds", node_id="a", units=5, epoch=1)
    log.append(IndexedEvent(9, 120, "a", 9, late))
    return log


#: An EpochSettled record (index 8) as logged before `final` existed: a paid and a punished
#: node, in one event.
OLD_SETTLED = (
    b"\x95\x08x\xa6master\x08\x83\xa4type\xacEpochSettled\xa5epoch\x01\xa7payouts\x92"
    b"\x86\xa7node_id\xa1a\xa5units\x02\xa6reward\x02\xa8punished\xc2\xa6reason\xa0"
    b"\xb0credit_earned_ms\n\x86\xa7node_id\xa1b\xa5units\x00\xa6reward\x00\xa8punished"
    b"\xc3\xa6reason\xbaunexcused disconnect: gone\xb0credit_earned_ms\x00"
)
#: `state_digest` of `_old_log(OLD_SETTLED)` folded, computed before parts existed.
OLD_DIGEST = "eaea378b618be88aa5a7a3dde79197a1528062650195dab56567ecf901a8ea7e"


def test_an_old_single_settlement_record_decodes_and_replays_as_before() -> None:
    """A record written before parts existed has no `final` field: it is the whole
    settlement. It replays to the digest it always did, and a settlement that needs one
    part is still written byte for byte as then."""
    ie = decode_event(OLD_SETTLED)
    assert isinstance(ie.event, EpochSettled) and ie.event.final
    assert encode_event(ie) == OLD_SETTLED
    state = fold(EMPTY_STATE, _old_log(OLD_SETTLED))
    assert state.ledgers[1].settled
    assert state.ledgers[1].node("a").late_units == 5
    assert state_digest(state) == OLD_DIGEST


def test_split_settlement_refuses_a_nonsense_part_size() -> None:
    with pytest.raises(ValueError, match="part_bytes must be positive, not 0"):
        split_settlement(EpochSettled(epoch=1, payouts=()), part_bytes=0)
