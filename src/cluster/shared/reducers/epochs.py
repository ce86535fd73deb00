"""Reducers for epochs, sessions, devshards and settlement (DESIGN section 6)."""

from __future__ import annotations

import msgspec
from immutables import Map

from cluster.shared.events import (
    DevshardFinalized,
    DevshardPlaced,
    EpochSettled,
    EpochStarted,
    IndexedEvent,
    LateWorkSettled,
    SessionDeleted,
    SessionRequested,
    SessionUnplaced,
)
from cluster.shared.state import (
    EMPTY_NODE_LEDGER,
    LEDGER_EPOCHS_KEPT,
    DevshardRecord,
    EpochLedger,
    EpochRecord,
    SessionRecord,
    State,
    runner_id_for,
)

_replace = msgspec.structs.replace


def epoch_started(state: State, ie: IndexedEvent, ev: EpochStarted) -> State:
    if state.epoch is not None and ev.epoch <= state.epoch.epoch:
        return state
    rec = EpochRecord(epoch=ev.epoch, start_ms=ev.start_ms, end_ms=ev.end_ms, seed=ev.seed)
    ledgers = state.ledgers
    if ev.epoch not in ledgers:
        ledgers = ledgers.set(ev.epoch, EpochLedger(epoch=ev.epoch))
    # Old settled ledgers leave State (LEDGER_EPOCHS_KEPT); an unsettled one stays until
    # its payouts are decided. Work naming a dropped epoch then counts nowhere, like work
    # naming an epoch that never started.
    oldest_kept = ev.epoch - LEDGER_EPOCHS_KEPT + 1
    for number, ledger in list(ledgers.items()):
        if number < oldest_kept and ledger.settled:
            ledgers = ledgers.delete(number)
    return _replace(state, epoch=rec, ledgers=ledgers)


def session_requested(state: State, ie: IndexedEvent, ev: SessionRequested) -> State:
    if ev.session_id in state.sessions:
        return state
    rec = SessionRecord(
        session_id=ev.session_id,
        slots=ev.slots,
        memory_per_slot_mb=ev.memory_per_slot_mb,
        gpu=ev.gpu,
        name=ev.name,
        reward_per_unit=ev.reward_per_unit,
        created_ms=ie.master_time_ms,
    )
    return _replace(state, sessions=state.sessions.set(ev.session_id, rec))


def session_deleted(state: State, ie: IndexedEvent, ev: SessionDeleted) -> State:
    if ev.session_id not in state.sessions:
        return state
    # Its live devshard stays until finalized at the epoch end: running work finishes.
    return _replace(
        state,
        sessions=state.sessions.delete(ev.session_id),
        last_nodes_by_session=_discard(state.last_nodes_by_session, ev.session_id),
    )


def devshard_placed(state: State, ie: IndexedEvent, ev: DevshardPlaced) -> State:
    session = state.sessions.get(ev.session_id)
    if session is None:
        return state
    devshards = state.devshards
    rec = DevshardRecord(
        devshard_id=ev.devshard_id,
        session_id=ev.session_id,
        epoch=ev.epoch,
        assignments=ev.assignments,
        assigned_ms=_assigned_ms(devshards.get(ev.devshard_id), ev, ie.master_time_ms),
        ends_ms=ev.ends_ms,
        placed_ms=ie.master_time_ms,
        reason=ev.reason,
        avoid_nodes=ev.avoid_nodes,
    )
    previous = state.devshard_by_session.get(ev.session_id)
    if previous is not None and previous != ev.devshard_id and previous in devshards:
        devshards = devshards.delete(previous)
    if session.unplaced_reason:
        session = _replace(session, unplaced_reason="", unplaced_epoch=-1, unplaced_ms=0)
    # Remember the price of this devshard's work in its epoch's ledger, so late work and
    # work after the session is deleted are priced as when the devshard was placed.
    ledger = state.ledgers.get(ev.epoch) or EpochLedger(epoch=ev.epoch)
    if ledger.rates.get(ev.devshard_id) != session.reward_per_unit:
        ledger = _replace(ledger, rates=ledger.rates.set(ev.devshard_id, session.reward_per_unit))
    ledger = _with_holders(ledger, ev, ie.master_time_ms)
    return _replace(
        state,
        devshards=devshards.set(ev.devshard_id, rec),
        devshard_by_session=state.devshard_by_session.set(ev.session_id, ev.devshard_id),
        sessions=state.sessions.set(ev.session_id, session),
        ledgers=state.ledgers.set(ev.epoch, ledger),
    )


def _assigned_ms(
    shard: DevshardRecord | None, ev: DevshardPlaced, placed_ms: int
) -> tuple[int, ...]:
    """When each slot of `ev` was given to its node: a slot that stays with the node that
    held it in `shard` (a re-placement of the same devshard) keeps its earlier time."""
    since: dict[tuple[int, str], int] = {}
    if shard is not None and shard.epoch == ev.epoch:
        for a, at_ms in zip(shard.assignments, shard.assigned_ms, strict=True):
            since[a.slot, a.node_id] = at_ms
    return tuple(since.get((a.slot, a.node_id), placed_ms) for a in ev.assignments)


def _with_holders(ledger: EpochLedger, ev: DevshardPlaced, at_ms: int) -> EpochLedger:
    """`ledger` with every node `ev` assigns a slot to recorded as a holder of its devshard
    (since `at_ms`, unless it held it already).

    Holders are only ever added: a node whose slot moves away (a replace) keeps its claim
    on the work it did while it held the slot.
    """
    devshard_id = ev.devshard_id
    changed = False
    with ledger.held_devshards.mutate() as held:
        for a in ev.assignments:
            devshards = held.get(a.node_id)
            if devshards is None:
                held[a.node_id] = Map({devshard_id: at_ms})
                changed = True
            elif devshard_id not in devshards:
                held[a.node_id] = devshards.set(devshard_id, at_ms)
                changed = True
        updated = held.finish()
    return _replace(ledger, held_devshards=updated) if changed else ledger


def session_unplaced(state: State, ie: IndexedEvent, ev: SessionUnplaced) -> State:
    session = state.sessions.get(ev.session_id)
    if session is None:
        return state
    session = _replace(
        session,
        unplaced_reason=ev.reason,
        unplaced_epoch=ev.epoch,
        unplaced_ms=ie.master_time_ms,
    )
    return _replace(state, sessions=state.sessions.set(ev.session_id, session))


def devshard_finalized(state: State, ie: IndexedEvent, ev: DevshardFinalized) -> State:
    shard = state.devshards.get(ev.devshard_id)
    if shard is None:
        return state
    nodes = shard.holders()
    by_session = state.devshard_by_session
    if by_session.get(shard.session_id) == ev.devshard_id:
        by_session = by_session.delete(shard.session_id)
    last_nodes = state.last_nodes_by_session
    session = state.sessions.get(shard.session_id)
    if session is not None:
        last_nodes = last_nodes.set(shard.session_id, nodes)
    # Its runners' records go with it: a runner carried over reports under its successor's
    # id, and one whose node died never reports STOPPED, which left its record in State
    # forever. Every slot is visited, filled or not (a lost slot's old holder has a record).
    runners = state.runners
    slot_count = max((a.slot + 1 for a in shard.assignments), default=0)
    for slot in range(max(slot_count, session.slots if session is not None else 0)):
        runner_id = runner_id_for(ev.devshard_id, slot)
        if runner_id in runners:
            runners = runners.delete(runner_id)
    return _replace(
        state,
        devshards=state.devshards.delete(ev.devshard_id),
        devshard_by_session=by_session,
        last_nodes_by_session=last_nodes,
        runners=runners,
    )


def epoch_settled(state: State, ie: IndexedEvent, ev: EpochSettled) -> State:
    ledger = state.ledgers.get(ev.epoch) or EpochLedger(epoch=ev.epoch)
    if ledger.settled:
        return state
    credit = state.credit_ms_by_node
    before = ledger.nodes
    # One batched update for the epoch's payouts: a payout touches no late work (there is
    # none before settlement), so the late-work index stays as it is.
    with before.mutate() as nodes:
        for p in ev.payouts:
            # A node an earlier part of this settlement paid keeps that payout: a part is
            # never counted twice (the planner settles only nodes without one, so this
            # guards a log whose last parts were lost and decided again). Checked against
            # the ledger before this event, so a single event folds exactly as it always did.
            account = before.get(p.node_id, EMPTY_NODE_LEDGER)
            if account.payout is not None:
                continue
            nodes[p.node_id] = _replace(nodes.get(p.node_id, EMPTY_NODE_LEDGER), payout=p)
            if p.credit_earned_ms:
                credit = credit.set(p.node_id, credit.get(p.node_id, 0) + p.credit_earned_ms)
        # Settled only by the final part: until then no work is late and the planner still
        # settles the rest (see EpochSettled).
        ledger = _replace(ledger, settled=ev.final, nodes=nodes.finish())
    return _replace(state, ledgers=state.ledgers.set(ev.epoch, ledger), credit_ms_by_node=credit)


def late_work_settled(state: State, ie: IndexedEvent, ev: LateWorkSettled) -> State:
    ledger = state.ledgers.get(ev.epoch)
    if ledger is None or not ledger.settled:
        return state
    account = ledger.node(ev.node_id)
    undecided, pending = account.late_undecided, account.late_undecided_reward
    # The planner decides all undecided units at once, on the state its event follows, so
    # this is normally all of it; a decision covering fewer units takes its share.
    decided = pending if ev.units >= undecided else pending * max(0, ev.units) // undecided
    account = _replace(
        account,
        late_paid=account.late_paid + ev.reward,
        late_settled_units=account.late_settled_units + ev.units,
        late_decided_reward=account.late_decided_reward + decided,
    )
    ledger = ledger.with_node(ev.node_id, account)
    return _replace(state, ledgers=state.ledgers.set(ev.epoch, ledger))


def _discard(m: Map[str, tuple[str, ...]], key: str) -> Map[str, tuple[str, ...]]:
    return m.delete(key) if key in m else m
