"""Reducers for runners and the work they report.

The ledger's sums saturate at INT64_MAX: State encodes them as msgpack ints, and a sum past
that could not be encoded (no snapshot, no digest). The master bounds each report
(events.MAX_WORK_UNITS, requests.MAX_REWARD_PER_UNIT) so that real clusters never get
near; the cap is what keeps a log holding larger values -- older, or not written by our
master -- foldable into a state that encodes.

Work and misses count only against an epoch that started: EpochStarted opens its ledger, and
a report naming any other epoch changes nothing. A worker names the epoch itself; without
this, one naming epoch 10**12 made a ledger that pushed the real epochs out of the status
view's "recent epochs", and work named for the next epoch was paid when that epoch settled.

Work counts, on time or late, only on a devshard placed in the epoch it names (one with a
rate in that epoch's ledger) and only from a node that held one of its slots at some time
in that epoch (`EpochLedger.held_devshards`). Without this a node holding no slot was paid
for any units it claimed, on a real devshard or a made-up one. A report that does not count
changes nothing, like one naming an epoch that did not start; the log keeps it, so
`cluster replay` still shows what was claimed.
"""

from __future__ import annotations

import msgspec

from cluster.shared.events import (
    INT64_MAX,
    IndexedEvent,
    RunnerStatus,
    RunnerStatusUpdated,
    WorkMissed,
    WorkReported,
)
from cluster.shared.state import (
    EMPTY_NODE_LEDGER,
    RunnerRecord,
    State,
    runner_id_for,
)

_replace = msgspec.structs.replace


def _holds_slot(state: State, ev: RunnerStatusUpdated) -> bool:
    """Is `ev`'s node the one its devshard assigns the runner's slot to now?

    The runner id must be the slot's own: a node quoting a slot it holds while naming
    another slot's runner would otherwise take over (or delete) that runner's record.
    """
    if ev.runner_id != runner_id_for(ev.devshard_id, ev.slot):
        return False
    shard = state.devshards.get(ev.devshard_id)
    if shard is None:
        return False
    assignments = shard.assignments
    # Placement lists slots in order, all of them filled in the usual case: then the slot's
    # assignment is at its own position (a devshard can have thousands of slots).
    if 0 <= ev.slot < len(assignments) and assignments[ev.slot].slot == ev.slot:
        return assignments[ev.slot].node_id == ev.node_id
    return any(a.slot == ev.slot and a.node_id == ev.node_id for a in assignments)


def runner_status_updated(state: State, ie: IndexedEvent, ev: RunnerStatusUpdated) -> State:
    # A re-placed slot keeps its runner id (devshard/slot) on its new node. The node that
    # lost it may still report on its own runner -- stopping it, or late, after being cut
    # off -- and that must not overwrite or delete the new holder's record.
    runners = state.runners
    try:  # subscript, not a varargs `.get()` call: most reports are on a known runner
        held: RunnerRecord | None = runners[ev.runner_id]
    except KeyError:
        held = None
    if (held is None or held.node_id != ev.node_id) and not _holds_slot(state, ev):
        # A record is created only by the slot's holder: otherwise any node could fill State
        # with runners of made-up devshards (each report a record kept forever).
        return state
    if (
        held is not None
        and held.status is ev.status
        and held.node_id == ev.node_id
        and held.reason == ev.reason
        and held.devshard_id == ev.devshard_id
        and held.slot == ev.slot
    ):
        # A repeated report changes nothing, not even `updated_ms`: that is when the status
        # last *changed*, and the planner counts a failed slot's grace from it.
        return state
    if ev.status is RunnerStatus.STOPPED:
        # A stopped runner is history (the log keeps it); state keeps only live runners.
        if held is None:
            return state
        return _replace(state, runners=runners.delete(ev.runner_id))
    rec = RunnerRecord(
        runner_id=ev.runner_id,
        node_id=ev.node_id,
        status=ev.status,
        devshard_id=ev.devshard_id,
        slot=ev.slot,
        reason=ev.reason,
        updated_ms=ie.master_time_ms,
    )
    return _replace(state, runners=runners.set(ev.runner_id, rec))


def work_reported(state: State, ie: IndexedEvent, ev: WorkReported) -> State:
    if ev.units <= 0:
        return state
    # One of the commonest events: lookups are written out here rather than through the
    # `EpochLedger.node` helper (a call on every report).
    ledgers = state.ledgers
    ledger = ledgers.get(ev.epoch)
    if ledger is None:
        return state  # not an epoch that started: see the module doc
    devshard_id = ev.devshard_id
    node_id = ev.node_id
    per_unit = ledger.rates.get(devshard_id)
    if per_unit is None:
        return state  # not a devshard of that epoch: see the module doc
    units = ev.units
    nodes = ledger.nodes
    account = nodes.get(node_id, EMPTY_NODE_LEDGER)
    by_shard = account.units_by_devshard
    # Work counted on this devshard before means the node held it (checked then): the
    # holder index, one more lookup by node id, is read only for a node's first report on a
    # devshard, not for every report (work is among the commonest events).
    if devshard_id not in by_shard:
        held = ledger.held_devshards.get(node_id)
        if held is None or devshard_id not in held:
            return state  # not a slot this node held in that epoch: see the module doc
    if ledger.settled or account.payout is not None:
        # Late work: remembered against its epoch; paid by a LateWorkSettled decision. A
        # node already paid by part of a settlement (a log whose last parts were lost in a
        # crash, decided again) is past its settlement too: its payout is fixed.
        total = account.late_units + units
        reward = account.late_reward + units * per_unit
        if total > INT64_MAX or reward > INT64_MAX:  # saturate: see the module doc
            total, reward = min(total, INT64_MAX), min(reward, INT64_MAX)
        account = _replace(account, late_units=total, late_reward=reward)
        ledger = ledger.with_node(node_id, account)
    else:
        total = account.units + units
        reward = account.reward + units * per_unit
        shard_units = by_shard.get(devshard_id, 0) + units  # <= total: part of the node's
        if total > INT64_MAX or reward > INT64_MAX:  # saturate: see the module doc
            total, reward = min(total, INT64_MAX), min(reward, INT64_MAX)
            shard_units = min(shard_units, INT64_MAX)
        account = _replace(
            account,
            units=total,
            reward=reward,
            units_by_devshard=by_shard.set(devshard_id, shard_units),
        )
        # On-time work leaves late work as it was: the late-work index needs no look.
        ledger = _replace(ledger, nodes=nodes.set(node_id, account))
    return _replace(state, ledgers=ledgers.set(ev.epoch, ledger))


def work_missed(state: State, ie: IndexedEvent, ev: WorkMissed) -> State:
    if ev.excused or ev.count <= 0:
        return state
    ledger = state.ledgers.get(ev.epoch)
    if ledger is None or ledger.settled:  # not an epoch that started: see the module doc
        return state
    account = ledger.node(ev.node_id)
    account = _replace(account, misses=min(account.misses + ev.count, INT64_MAX))
    ledger = ledger.with_node(ev.node_id, account)
    return _replace(state, ledgers=state.ledgers.set(ev.epoch, ledger))
