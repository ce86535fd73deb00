"""The planner: one pure step per cycle, state + now -> events (DESIGN sections 1, 4, 6).

`plan()` looks at the state *before* any of its own events and returns them in a fixed
order, which the master appends to the log contiguously and applies one by one:

1. liveness: `NodeDisconnected` for nodes idle K cycles outside a maintenance window, a
   node whose worker said goodbye (`NodeStopping`) as "stopped by its operator" (sorted by
   node id);
2. the maintenance hook's window transitions (the maintenance rules own their order);
3. `LateWorkSettled` for work reported after its epoch was settled;
4. at an epoch's end: `WorkMissed`, `DevshardFinalized` (sorted by devshard id),
   `EpochSettled` (in parts when large: `settlement.split_settlement`), `EpochStarted`,
   then a `DevshardPlaced`/`SessionUnplaced` for every session of the new epoch (sorted by
   session id);
   otherwise: `DevshardPlaced(reason="replace")` for devshards that lost slots, then
   placements for sessions that have no devshard this epoch.

Decisions later in the list already account for earlier ones (placement reads the state
with steps 1-3 folded in: a node disconnected in step 1 is not given slots in step 4 and its
slots are re-placed, a window that overran in step 2 no longer keeps its node out;
settlement counts this cycle's misses and disconnects), so one cycle never contradicts
itself. Placement also assumes the
master appends these events right after the state it passed in, with no worker event in
between (a WorkReported squeezed between plan and EpochSettled would be in the ledger but
not in the payout).

`Planner` is the thin stateful adapter the master calls: it keeps the ephemeral
`LivenessBook` between cycles (DESIGN rule 7: lost on master restart, by design).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Final, NamedTuple

from cluster.master import maintenance
from cluster.master.config import PlannerConfig
from cluster.master.epochs import epoch_due, epoch_record, finalize_devshards, next_epoch
from cluster.master.liveness import EMPTY_BOOK, LivenessBook, check_liveness
from cluster.master.placement import (
    INELIGIBLE_DETAILS,
    PlacementPool,
    place_sessions,
    replace_lost_slots,
)
from cluster.master.settlement import (
    DEFAULT_POLICY,
    late_work,
    missed_work,
    settle_epoch,
    split_settlement,
)
from cluster.shared.apply import fold
from cluster.shared.events import (
    MASTER_ORIGIN,
    DevshardPlaced,
    Event,
    IndexedEvent,
    RunnerStatus,
    SessionUnplaced,
    SlotAssignment,
    WorkMissed,
)
from cluster.shared.excuse import is_excused
from cluster.shared.maintenance_policy import MaintenancePolicy
from cluster.shared.state import EpochRecord, RunnerRecord, SessionRecord, State, runner_id_for

#: The maintenance rules' per-cycle transitions: (state, now_ms) -> events.
MaintenanceHook = Callable[[State, int], Sequence[Event]]


def no_maintenance(state: State, now_ms: int) -> list[Event]:
    """A hook with no window transitions (for tests that isolate other rules)."""
    return []


class PlanResult(NamedTuple):
    events: list[Event]
    book: LivenessBook


def plan(
    state: State,
    now_ms: int,
    book: LivenessBook,
    cfg: PlannerConfig,
    *,
    policy: MaintenancePolicy = DEFAULT_POLICY,
    maintenance_cycle: MaintenanceHook | None = None,
    entropy: int | None = None,
    reconnecting: bool = False,
) -> PlanResult:
    """One planning cycle (see the module doc for what comes out, in which order).

    `entropy` is optional fresh randomness for the next epoch's seed; it is used only when
    an epoch starts and is recorded in the log through `EpochStarted.seed`. `reconnecting`:
    the master has just restarted and its workers are still redialling (see
    `PlannerConfig.restart_grace_ms`): only maintenance transitions and late work are
    decided, and the liveness book stays as it is (nobody is judged idle yet).
    """
    if reconnecting:
        return PlanResult(_clock_decisions(state, now_ms, cfg, policy, maintenance_cycle), book)
    liveness = check_liveness(state, book, now_ms, cfg)
    new_book = liveness.book
    leaving = {d.node_id for d in liveness.events}
    events: list[Event] = list(liveness.events)
    events.extend(_clock_decisions(state, now_ms, cfg, policy, maintenance_cycle))
    # Placement reads the state these decisions make: a window that overran this cycle no
    # longer keeps its node out (read before, the node's window was still ACTIVE and the
    # node lost the whole epoch that started in the same cycle). Settlement reads `state`
    # and is handed this cycle's misses and disconnects explicitly.
    decided = _fold_own(state, events, now_ms)

    def holds_work(node_id: str) -> bool:
        # Stale-but-connected nodes keep their slots; gone, in maintenance or running no
        # runners (restarted facts-only: nothing there would serve them), they lose them.
        rec = decided.nodes.get(node_id)
        return (
            rec is not None
            and rec.connected
            and not rec.facts_only
            and node_id not in leaving
            and not is_excused(decided, node_id, now_ms)
        )

    current = state.epoch
    if current is not None and not epoch_due(state, now_ms):
        events.extend(
            _keep_epoch(
                decided,
                current,
                now_ms,
                new_book.not_fresh,
                holds_work,
                leaving,
                cfg.failed_slot_grace_ms,
            )
        )
        return PlanResult(events, new_book)
    if current is not None:
        misses = missed_work(state, current, now_ms, cfg)
        events.extend(misses)
        events.extend(finalize_devshards(state))
        settled = settle_epoch(state, current, cfg, misses, liveness.events, policy=policy)
        events.extend(split_settlement(settled))
    started = next_epoch(state, now_ms, cfg, entropy)
    events.append(started)
    events.extend(
        _place_new_epoch(decided, epoch_record(started), now_ms, new_book.not_fresh, leaving)
    )
    return PlanResult(events, new_book)


def _fold_own(state: State, events: Sequence[Event], now_ms: int) -> State:
    """`state` with this cycle's `events` so far applied as the master will index them
    (the next indexes and master sequence numbers, stamped `now_ms`): scratch for the
    decisions that follow, never returned."""
    if not events:
        return state
    first, seq = state.last_applied + 1, state.master_seq + 1
    return fold(
        state,
        [
            IndexedEvent(first + i, now_ms, MASTER_ORIGIN, seq + i, event)
            for i, event in enumerate(events)
        ],
    )


def _clock_decisions(
    state: State,
    now_ms: int,
    cfg: PlannerConfig,
    policy: MaintenancePolicy,
    maintenance_cycle: MaintenanceHook | None,
) -> list[Event]:
    """What the clock alone decides, whoever has been heard: maintenance transitions, then
    late work."""
    transitions: Sequence[Event] = (
        maintenance.maintenance_cycle(state, now_ms, policy)
        if maintenance_cycle is None
        else maintenance_cycle(state, now_ms)
    )
    return [*transitions, *late_work(state, cfg)]


def _sorted_sessions(state: State, ids: Sequence[str] | None = None) -> list[SessionRecord]:
    chosen = sorted(state.sessions.keys()) if ids is None else sorted(ids)
    return [state.sessions[s] for s in chosen]


def _place_new_epoch(
    state: State,
    epoch: EpochRecord,
    now_ms: int,
    not_fresh: frozenset[str],
    leaving: set[str],
) -> list[DevshardPlaced | SessionUnplaced]:
    sessions = _sorted_sessions(state)
    if not sessions:
        return []
    preferred: dict[str, Sequence[str]] = {}
    for session in sessions:
        sid = session.session_id
        # The devshard ending now is not finalized in `state` yet: prefer its exact slots.
        live = state.devshards.get(state.devshard_by_session.get(sid, ""))
        if live is not None:
            preferred[sid] = live.holders()
        else:
            preferred[sid] = state.last_nodes_by_session.get(sid, ())
    pool = PlacementPool(
        state,
        now_ms=now_ms,
        work_end_ms=epoch.end_ms,
        used={},
        not_fresh=not_fresh,
        leaving=leaving,
    )
    # The turn is the one time devshards move: room may be made for a session that fits
    # only where another session's slots stick (mid-epoch it waits for the next turn).
    return place_sessions(sessions, epoch, pool, preferred, make_room=True)


def _keep_epoch(
    state: State,
    epoch: EpochRecord,
    now_ms: int,
    not_fresh: frozenset[str],
    holds_work: Callable[[str], bool],
    leaving: set[str],
    failed_slot_grace_ms: int,
) -> list[Event]:
    """Mid-epoch: re-place lost slots and place sessions that have no devshard yet.

    A slot is lost when its node is gone, in maintenance or runs no runners (its worker
    restarted facts-only), or when its runner there has been FAILED for
    `failed_slot_grace_ms`: the worker's own restarts did not help. Such a slot never goes
    back to that node this epoch (`replace_lost_slots`), so one failure is one miss, not one
    per cycle.
    """
    used: dict[str, int] = {}
    holding: dict[str, bool] = {}
    damaged: list[str] = []
    failed: dict[str, dict[int, RunnerRecord]] = {}
    for ds_id, shard in state.devshards.items():
        if shard.epoch != epoch.epoch:
            continue
        intact = True
        for a in shard.assignments:
            node_id = a.node_id
            ok = holding.get(node_id)
            if ok is None:
                ok = holding[node_id] = holds_work(node_id)
            runner = state.runners.get(runner_id_for(ds_id, a.slot))
            if (
                runner is not None
                and runner.status is RunnerStatus.FAILED
                and runner.node_id == node_id
                and now_ms - runner.updated_ms >= failed_slot_grace_ms
            ):
                failed.setdefault(ds_id, {})[a.slot] = runner
                ok = False
            else:
                # A runner the worker gave up on holds no room (it was released), and the
                # replace below takes its slot off the node.
                used[node_id] = used.get(node_id, 0) + 1
            intact = intact and ok
        session = state.sessions.get(shard.session_id)
        if session is not None and (not intact or len(shard.assignments) < session.slots):
            damaged.append(ds_id)
    waiting = [
        sid
        for sid in state.sessions
        if (ds := state.devshards.get(state.devshard_by_session.get(sid, ""))) is None
        or ds.epoch != epoch.epoch
    ]
    if not damaged and not waiting:
        return []
    pool = PlacementPool(
        state,
        now_ms=now_ms,
        work_end_ms=epoch.end_ms,
        used=used,
        not_fresh=not_fresh,
        leaving=leaving,
    )
    events: list[Event] = []
    for ds_id in sorted(damaged):
        shard = state.devshards[ds_id]
        session = state.sessions[shard.session_id]
        gone = failed.get(ds_id, {})

        def keeps(a: SlotAssignment, gone: dict[int, RunnerRecord] = gone) -> bool:
            return a.slot not in gone and holds_work(a.node_id)

        failed_nodes = {runner.node_id for runner in gone.values()}
        outcome = replace_lost_slots(shard, session, epoch, pool, keeps, failed_nodes)
        if outcome.placed is not None:
            events.append(outcome.placed)
        # A runner that failed for good is a missed slot for its node, as if it never served.
        for slot, runner in sorted(gone.items()):
            events.append(
                WorkMissed(
                    devshard_id=ds_id,
                    node_id=runner.node_id,
                    epoch=epoch.epoch,
                    count=1,
                    reason=f"runner {runner_id_for(ds_id, slot)} failed"
                    + (f": {runner.reason}" if runner.reason else ""),
                    excused=is_excused(state, runner.node_id, now_ms),
                )
            )
        if outcome.unfilled:
            reason = (
                f"devshard {ds_id} has {outcome.unfilled} of {session.slots} slot(s) "
                f"unassigned: {outcome.reason}"
            )
            # A replace just cleared the recorded reason (the DevshardPlaced above): say it
            # again at once. Otherwise only news is said (`_worth_restating`).
            if outcome.placed is not None or _worth_restating(session, epoch.epoch, reason, now_ms):
                events.append(
                    SessionUnplaced(session_id=session.session_id, epoch=epoch.epoch, reason=reason)
                )
    preferred = {sid: state.last_nodes_by_session.get(sid, ()) for sid in waiting}
    # No `make_room`: mid-epoch no devshard moves for another; one that fits nowhere waits
    # for the turn, where room is made for it.
    for ev in place_sessions(_sorted_sessions(state, waiting), epoch, pool, preferred):
        if isinstance(ev, SessionUnplaced) and not _worth_restating(
            state.sessions[ev.session_id], ev.epoch, ev.reason, now_ms
        ):
            continue  # said already; retried every cycle in case room appears
        events.append(ev)
    return events


#: How long an unplaced session's recorded reason may keep stale counts: when only the
#: numbers in it moved ("3 node(s) stale" -> "4 node(s) stale"), the planner restates it
#: once this long has passed since the session's last `SessionUnplaced`, not before. In a
#: large cluster those counts move nearly every cycle (nodes going stale and fresh, joining,
#: self-testing): restated on every change, each unplaced session appended one event to the
#: durable log per cycle (100 such sessions at 1 s cycles: ~100 events/s, millions a day,
#: replicated to every worker). A new kind of obstacle, or a new epoch, is said at once.
UNPLACED_RECOUNT_MS: Final = 60_000

_NUMBER = re.compile(r"[0-9]+")


def _shape(reason: str) -> str:
    """Which lasting obstacles `reason` names, not how many of each: its numbers masked, and
    its counts of nodes in a passing state (stale, draining, not self-tested, full ...: see
    `placement.INELIGIBLE_DETAILS`) left out. Those come and go with single nodes -- one
    node flickering stale made "1 node(s) stale" appear and vanish -- and are restated with
    the other counts, once a minute."""
    head, _, details = reason.partition("; ")
    lasting = [d for d in details.split(", ") if d and not d.endswith(INELIGIBLE_DETAILS)]
    return _NUMBER.sub("#", "; ".join([head, *lasting]))


def _worth_restating(session: SessionRecord, epoch: int, reason: str, now_ms: int) -> bool:
    """Whether `reason` is news against the session's recorded unplaced reason: a new epoch,
    another kind of obstacle, or other counts once `UNPLACED_RECOUNT_MS` has passed since
    the last `SessionUnplaced` (the same text is never news)."""
    if session.unplaced_epoch != epoch:
        return True
    if session.unplaced_reason == reason:
        return False
    if _shape(session.unplaced_reason) != _shape(reason):
        return True
    return now_ms - session.unplaced_ms >= UNPLACED_RECOUNT_MS


class Planner:
    """The master's per-cycle hook `(state, now_ms) -> events`, holding the liveness book.

    The master must apply the returned events before the next call, and then call `logged`.
    The book a decision makes is kept only by `logged`: a decision the master refused (an
    event too large to log) or failed to commit never happened, so its book must not count
    either -- kept, it had counted an idle cycle the log never saw and dropped the nodes
    that decision disconnected from the book (observed afresh, they got K more cycles).
    The book is ephemeral: a new Planner (a restarted master) starts empty and gives every
    node K fresh cycles. The maintenance policy drives window transitions and the credit
    settlement earns.
    """

    def __init__(
        self,
        cfg: PlannerConfig | None = None,
        *,
        policy: MaintenancePolicy = DEFAULT_POLICY,
        maintenance_cycle: MaintenanceHook | None = None,
        entropy: Callable[[], int] | None = None,
    ) -> None:
        self.cfg = cfg if cfg is not None else PlannerConfig()
        self.policy = policy
        self._maintenance_cycle = maintenance_cycle
        self._entropy = entropy
        self.book: LivenessBook = EMPTY_BOOK
        #: The book the last call's decision makes, until `logged` says it is durable.
        self._proposed: LivenessBook | None = None
        #: Until when (master time) workers are still reconnecting: set at the first cycle.
        self._reconnect_until_ms: int | None = None

    def __call__(self, state: State, now_ms: int) -> list[Event]:
        self._proposed = None  # an earlier decision that was never logged is forgotten
        if self._reconnect_until_ms is None:
            # A log with an epoch means a cluster that was running: its workers need time to
            # redial this (restarted) master. A new cluster has nobody to wait for.
            grace = self.cfg.restart_grace_ms if state.epoch is not None else 0
            self._reconnect_until_ms = now_ms + grace
        reconnecting = now_ms < self._reconnect_until_ms
        entropy = None
        if self._entropy is not None and not reconnecting and epoch_due(state, now_ms):
            entropy = self._entropy()
        result = plan(
            state,
            now_ms,
            self.book,
            self.cfg,
            policy=self.policy,
            maintenance_cycle=self._maintenance_cycle,
            entropy=entropy,
            reconnecting=reconnecting,
        )
        self._proposed = result.book
        return result.events

    def logged(self) -> None:
        """The last call's events are durable (an empty decision counts): keep its book."""
        if self._proposed is not None:
            self.book = self._proposed
            self._proposed = None
