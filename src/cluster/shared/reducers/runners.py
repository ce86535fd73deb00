"""Reducers for runners and the work they report."""

from __future__ import annotations

import msgspec
from immutables import Map

from cluster.shared.events import (
    IndexedEvent,
    RunnerStatus,
    RunnerStatusUpdated,
    WorkMissed,
    WorkReported,
)
from cluster.shared.state import EpochLedger, RunnerRecord, State

_replace = msgspec.structs.replace


def runner_status_updated(state: State, ie: IndexedEvent, ev: RunnerStatusUpdated) -> State:
    if ev.status is RunnerStatus.STOPPED:
        # A stopped runner is history (the log keeps it); state keeps only live runners.
        if ev.runner_id not in state.runners:
            return state
        return _replace(state, runners=state.runners.delete(ev.runner_id))
    rec = RunnerRecord(
        runner_id=ev.runner_id,
        node_id=ev.node_id,
        status=ev.status,
        devshard_id=ev.devshard_id,
        slot=ev.slot,
        reason=ev.reason,
        updated_ms=ie.master_time_ms,
    )
    return _replace(state, runners=state.runners.set(ev.runner_id, rec))


def _ledger(state: State, epoch: int) -> EpochLedger:
    return state.ledgers.get(epoch) or EpochLedger(epoch=epoch)


def work_reported(state: State, ie: IndexedEvent, ev: WorkReported) -> State:
    if ev.units <= 0:
        return state
    ledger = _ledger(state, ev.epoch)
    per_unit = ledger.rates.get(ev.devshard_id)
    if per_unit is None:
        shard = state.devshards.get(ev.devshard_id)
        session = state.sessions.get(shard.session_id) if shard is not None else None
        per_unit = session.reward_per_unit if session is not None else 1
    if ledger.settled:
        # Late work: remembered against its epoch; paid by a LateWorkSettled decision.
        late = ledger.late_units.get(ev.node_id, 0) + ev.units
        late_reward = ledger.late_reward.get(ev.node_id, 0) + ev.units * per_unit
        ledger = _replace(
            ledger,
            late_units=ledger.late_units.set(ev.node_id, late),
            late_reward=ledger.late_reward.set(ev.node_id, late_reward),
        )
    else:
        units = ledger.units.get(ev.node_id, 0) + ev.units
        reward = ledger.reward.get(ev.node_id, 0) + ev.units * per_unit
        by_node = ledger.units_by_devshard.get(ev.devshard_id) or Map()
        by_node = by_node.set(ev.node_id, by_node.get(ev.node_id, 0) + ev.units)
        ledger = _replace(
            ledger,
            units=ledger.units.set(ev.node_id, units),
            reward=ledger.reward.set(ev.node_id, reward),
            units_by_devshard=ledger.units_by_devshard.set(ev.devshard_id, by_node),
        )
    return _replace(state, ledgers=state.ledgers.set(ev.epoch, ledger))


def work_missed(state: State, ie: IndexedEvent, ev: WorkMissed) -> State:
    if ev.excused or ev.count <= 0:
        return state
    ledger = _ledger(state, ev.epoch)
    if ledger.settled:
        return state
    misses = ledger.misses.get(ev.node_id, 0) + ev.count
    ledger = _replace(ledger, misses=ledger.misses.set(ev.node_id, misses))
    return _replace(state, ledgers=state.ledgers.set(ev.epoch, ledger))
