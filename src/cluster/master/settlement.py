"""End-of-epoch judgement: missed work, payouts, maintenance credit, late work (DESIGN 6).

Rewards accrue in the epoch's ledger as work is reported; nothing is paid until the epoch
ends. Then, per node:

* **Misses.** A node that holds slots of a devshard of the ending epoch and reported no work
  for it records one miss per slot it holds (`WorkMissed`, reason below), except for slots
  it was given less than `cfg.effective_miss_grace_ms` before the end (its runners may
  still be loading): a late re-placement exempts the nodes that got the moved slots, not
  the holders since earlier. Runners may report misses themselves too; both count. Each
  miss asks the one excuse rule (`is_excused`) at the epoch's last moment (`end_ms - 1`):
  a window that covers the end of the epoch excuses it, one that starts at its end does not.
* **Punishment.** Punished = unexcused misses > `cfg.miss_threshold`, or an unexcused
  disconnect during the epoch. A punished node's payout has reward 0.
* **Credit.** An unpunished node that served work, or stayed connected for the whole epoch
  and was in maintenance at no moment of it (`maintenance.in_maintenance_during`), earns
  maintenance credit by the maintenance policy's one rule (`maintenance.credit_to_earn_ms`:
  the per-epoch rate, never past the cap).
* **Late work.** Work reported after settlement is recorded against its epoch by the
  reducer (only on a devshard the node held a slot of in that epoch, like on-time work);
  the planner then emits `LateWorkSettled` for it. Decision: the event is emitted
  for punished nodes too, with reward 0 -- the log then says explicitly that the work was
  seen and forfeited, and the units are marked decided so they are not reconsidered.

* **Parts.** A settlement is logged in parts (`split_settlement`): EpochSettled events of
  the same epoch with disjoint payouts, each of at most `SETTLEMENT_PART_BYTES` of payouts,
  the last one `final`. One event of a cluster of ~25,000 nodes would not fit the frame
  that carries the log to replicas. A node already paid by a part (a crash lost the later
  parts of a decision) is not settled again.

The functions take this cycle's not-yet-applied decisions (misses, disconnects) as
arguments, because the master applies the planner's events only after `plan()` returns.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from cluster.master.config import PlannerConfig
from cluster.master.maintenance import credits_to_earn_ms, in_maintenance_during
from cluster.shared.events import (
    SETTLEMENT_PART_BYTES,
    EpochSettled,
    LateWorkSettled,
    NodeDisconnected,
    NodePayout,
    WorkMissed,
)
from cluster.shared.excuse import is_excused
from cluster.shared.maintenance_policy import MaintenancePolicy
from cluster.shared.state import EMPTY_NODE_LEDGER, EpochLedger, EpochRecord, State

DEFAULT_POLICY = MaintenancePolicy()

NO_WORK_REASON = "no work reported for its slots by the epoch's end"


def missed_work(
    state: State, epoch: EpochRecord, now_ms: int, cfg: PlannerConfig
) -> list[WorkMissed]:
    """WorkMissed for every slot holder of `epoch`'s live devshards that did no work."""
    ledger = state.ledgers.get(epoch.epoch) or EpochLedger(epoch=epoch.epoch)
    # A slot given to its node later than this is not judged: its runner may still be
    # loading. Per slot, so a late re-placement exempts only the nodes it gave slots to.
    judged_until_ms = epoch.end_ms - cfg.effective_miss_grace_ms
    # Excuses are judged inside the epoch, at its last moment, not at settlement time: a
    # window starting at the epoch's end (the drain rule lets an epoch end there) did not
    # excuse the node while it was expected to serve.
    excused_at_ms = min(now_ms, epoch.end_ms - 1)
    out: list[WorkMissed] = []
    for ds_id in sorted(state.devshards.keys()):
        shard = state.devshards[ds_id]
        if shard.epoch != epoch.epoch:
            continue
        slots: dict[str, int] = {}
        for a, assigned_ms in zip(shard.assignments, shard.assigned_ms, strict=True):
            if assigned_ms <= judged_until_ms:
                slots[a.node_id] = slots.get(a.node_id, 0) + 1
        for node_id in sorted(slots):
            if ledger.node(node_id).units_by_devshard.get(ds_id, 0) > 0:
                continue
            out.append(
                WorkMissed(
                    devshard_id=ds_id,
                    node_id=node_id,
                    epoch=epoch.epoch,
                    count=slots[node_id],
                    reason=NO_WORK_REASON,
                    excused=is_excused(state, node_id, excused_at_ms),
                )
            )
    return out


def settle_epoch(
    state: State,
    epoch: EpochRecord,
    cfg: PlannerConfig,
    new_misses: Iterable[WorkMissed] = (),
    new_disconnects: Iterable[NodeDisconnected] = (),
    *,
    policy: MaintenancePolicy = DEFAULT_POLICY,
) -> EpochSettled:
    """The payouts of `epoch`, counting this cycle's unapplied misses and disconnects.

    A payout is listed for every node with something to record: units, a punishment, or
    credit earned. Payouts are sorted by node id. A node that already holds a payout of
    this epoch (a part of an earlier decision, whose later parts a crash lost) is left out:
    it was settled. One event, of any size: `split_settlement` makes it loggable.
    """
    ledger = state.ledgers.get(epoch.epoch) or EpochLedger(epoch=epoch.epoch)
    served: set[str] = set()
    misses: dict[str, int] = {}
    disconnects: dict[str, str] = {}
    for node_id, account in ledger.nodes.items():
        if account.units > 0:
            served.add(node_id)
        if account.misses > 0:
            misses[node_id] = account.misses
        if account.disconnect is not None:
            disconnects[node_id] = account.disconnect
    for m in new_misses:
        if m.epoch == epoch.epoch and not m.excused and m.count > 0:
            misses[m.node_id] = misses.get(m.node_id, 0) + m.count
    leaving: set[str] = set()
    for d in new_disconnects:
        leaving.add(d.node_id)
        if not d.excused:
            disconnects.setdefault(d.node_id, d.reason)

    candidates = served | set(misses) | set(disconnects)
    # Nodes that stayed connected through the whole epoch earn credit even when idle --
    # not for time spent in maintenance, connected but excused (see in_maintenance_during).
    away = in_maintenance_during(state, epoch.start_ms, epoch.end_ms)
    stayed = {
        node_id
        for node_id, rec in state.nodes.items()
        if rec.connected
        and rec.joined_ms <= epoch.start_ms
        and node_id not in leaving
        and node_id not in away
    }
    candidates |= stayed

    judged = misses.keys() | disconnects.keys()  # may be punished (misses over threshold)
    # A node the operator removed (`NodeRemoved`) is paid for the work it did, but earns no
    # credit: it has no balance any more, and one would outlive it if it joined again.
    credits = credits_to_earn_ms(state, (n for n in served | stayed if n in state.nodes), policy)
    accounts = ledger.nodes
    payouts: list[NodePayout] = []
    for node_id in sorted(candidates):
        account = accounts.get(node_id, EMPTY_NODE_LEDGER)
        if account.payout is not None:
            continue
        units = account.units
        if node_id in judged:
            reasons = _punishments(misses.get(node_id, 0), disconnects.get(node_id), cfg)
        else:
            reasons = []
        credit = 0
        if not reasons and (units > 0 or node_id in stayed):
            credit = credits.get(node_id, 0)
        elif not reasons and units == 0:
            continue
        if units == 0 and not reasons and credit == 0:
            continue
        payouts.append(
            NodePayout(
                node_id=node_id,
                units=units,
                reward=0 if reasons else account.reward,
                punished=bool(reasons),
                reason="; ".join(reasons),
                credit_earned_ms=credit,
            )
        )
    return EpochSettled(epoch=epoch.epoch, payouts=tuple(payouts))


def split_settlement(
    settled: EpochSettled, part_bytes: int = SETTLEMENT_PART_BYTES
) -> list[EpochSettled]:
    """`settled` as parts that each carry at most `part_bytes` of encoded payouts (a payout
    larger than that alone), in order; only the last is `final`. One part -- `settled`
    itself -- when it fits: small clusters log exactly what they always did.

    Folding the parts gives the state `settled` gives (the reducer applies each part's
    payouts and settles the epoch with the final one).
    """
    if part_bytes <= 0:
        raise ValueError(f"part_bytes must be positive, not {part_bytes}")
    encode = msgspec.msgpack.encode
    sizes = [len(encode(p)) for p in settled.payouts]
    if sum(sizes) <= part_bytes:
        return [settled]
    chunks: list[tuple[NodePayout, ...]] = []
    start, used = 0, 0
    for i, size in enumerate(sizes):
        if used + size > part_bytes and i > start:
            chunks.append(settled.payouts[start:i])
            start, used = i, 0
        used += size
    chunks.append(settled.payouts[start:])
    last = len(chunks) - 1
    return [
        EpochSettled(epoch=settled.epoch, payouts=chunk, final=i == last)
        for i, chunk in enumerate(chunks)
    ]


def _punishments(misses: int, disconnect: str | None, cfg: PlannerConfig) -> list[str]:
    reasons: list[str] = []
    if misses > cfg.miss_threshold:
        reasons.append(
            f"{misses} unexcused missed slot(s), above the threshold of {cfg.miss_threshold}"
        )
    if disconnect is not None:
        reasons.append(f"unexcused disconnect: {disconnect}")
    return reasons


def late_work(state: State, cfg: PlannerConfig) -> list[LateWorkSettled]:
    """LateWorkSettled for undecided late units of the last `cfg.late_work_epochs` epochs.

    Reward is what the undecided late work earned (priced at its devshard's rate) if the
    node was not punished in that epoch and `cfg.pay_late_work`; otherwise 0, and that work
    stays forfeited whatever a later decision says.
    """
    if state.epoch is None:
        return []
    out: list[LateWorkSettled] = []
    current = state.epoch.epoch
    for number in range(max(1, current - cfg.late_work_epochs), current + 1):
        ledger = state.ledgers.get(number)
        if ledger is None or not ledger.settled or not ledger.late_pending:
            continue
        out.extend(_late_in(ledger, cfg))
    return out


def _late_in(ledger: EpochLedger, cfg: PlannerConfig) -> Iterable[LateWorkSettled]:
    # `late_pending` indexes exactly the nodes with undecided late units.
    for node_id in sorted(ledger.late_pending.keys()):
        account = ledger.node(node_id)
        units = account.late_undecided
        if units <= 0:
            continue
        punished = account.payout is not None and account.payout.punished
        reward = 0
        if cfg.pay_late_work and not punished:
            # Only what no earlier decision covered: late work forfeited before (the node
            # was punished, or pay_late_work was off then) is not paid now.
            reward = account.late_undecided_reward
        yield LateWorkSettled(
            epoch=ledger.epoch, node_id=node_id, units=units, reward=max(0, reward)
        )
