"""Cluster state: the immutable value that folding the log with `apply()` produces.

Every collection keyed by node, runner, window, session or devshard is an
`immutables.Map` (a hash array mapped trie): `set()` returns a new map sharing all but
O(log32 n) nodes with the old one, so one event costs about the same at 10 or 10,000
nodes (DESIGN rule 3). The exceptions are what nearly every event changes, kept unboxed by
node slot: the node marks every event moves (`NodeMarks`, node_marks.py) and the gauges every
info report changes (`NodeGauges`, node_gauges.py). Records are frozen msgspec Structs; a reducer
builds a new record with `msgspec.structs.replace` and a new state the same way.

Nothing here is ephemeral planner bookkeeping: staleness counters and retry timers live in
the master's planner shell, never in State (DESIGN rule 7).

The records an event replaces (State itself, node, runner and ledger records) are declared
`gc=False`: untracked by the cyclic garbage collector. A tracked object costs list
bookkeeping when allocated and, when the record it replaces is released, an unlink that
touches that old record's long-cold neighbours -- measurable per event at 10,000 nodes
(bench/apply_bench.py: apply at 10,000 nodes went from ~365-450k to ~445-470k events/s).
Untracking is safe because a frozen record can only refer to objects that existed before it
and holds no mutable container, so it can never be part of a reference cycle.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

import msgspec
from immutables import Map
from msgspec import UNSET, UnsetType

from cluster.shared.events import (
    MASTER_ORIGIN,
    NO_RUNNERS_DIGEST,
    NodeInfo,
    NodePayout,
    RunnerStatus,
    SlotAssignment,
)
from cluster.shared.node_gauges import NodeGauges
from cluster.shared.node_marks import NodeMarks


class SelfTestResult(msgspec.Struct, frozen=True, kw_only=True):
    runner_kind: str
    passed: bool
    reason: str
    load_ms: int
    probe_ms: int
    request_ms: int
    config_digest: str
    at_ms: int


# gc=False on this and the other replaced records: see the module docstring.
# omit_defaults, with a default only on the fields added since (the worker's goodbye): every
# other field is always written, so a record that never had them encodes byte for byte as
# before they existed, and a log without a NodeStopping keeps its state digest.
class NodeRecord(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    gc=False,
    forbid_unknown_fields=True,
    omit_defaults=True,
):
    node_id: str
    #: The node's number in join order (0, 1, ...): where `State.last_event_by_node` keeps
    #: its marks. Dense and the same on every node that folds the same log; never reused:
    #: a new node takes `State.next_node_slot()` -- the live records plus the tombstones of
    #: removed ones (`State.removed_nodes`), so a removal never frees a slot for reuse.
    slot: int
    #: Where `State.last_event_by_node` keeps this node's marks (`node_marks.address(slot)`),
    #: stored rather than computed: `apply` updates the marks on every event, and these are
    #: small integers, shared objects always in cache, where the slot itself is an object of
    #: its own above 256, cold at 10,000 nodes. Derived from `slot`: checked on decode.
    marks_mid: int
    marks_leaf: int
    marks_offset: int
    info: NodeInfo
    connected: bool
    #: Index of the first event this node (or the master about it) contributed.
    joined_idx: int
    joined_ms: int
    # The node's last event index and sequence number live in `State.last_event_by_node`,
    # not here: every event advances them, and a pair is much cheaper to replace than this.
    disconnected_ms: int
    disconnected_reason: str
    disconnect_excused: bool
    #: Index of the master's latest NodeConnected for this node: its latest authenticated
    #: hello. Liveness counts it as the node's progress, so a worker that reconnects without
    #: having been disconnected (restarted inside its maintenance window, say) gets K fresh
    #: cycles to speak, like a node that joins.
    hello_idx: int
    #: Boot id of the worker process behind that hello (`NodeConnected.boot_id`): a later
    #: hello under another one is a restarted worker, under the same one a redial.
    boot_id: str
    #: The runner setting that worker process announced (`NodeConnected.runner_digest`), ""
    #: if none. `self_test`, when set, is a test of this setting (or of any, when ""): a
    #: hello under another setting drops the test, and a result of another setting (one an
    #: earlier process left in its outbox) is not recorded. `NO_RUNNERS_DIGEST`: the worker
    #: runs no runners (`facts_only`).
    runner_digest: str
    self_test: SelfTestResult | None
    # --- worker goodbye (NodeStopping): the only fields with defaults (see above) ---
    #: Index of the `NodeStopping` its current worker process (`boot_id`) sent: that process
    #: is stopping cleanly. The planner disconnects the node when it would anyway (K cycles
    #: without events, outside its maintenance window), saying it was stopped by its
    #: operator. 0: not stopping. Cleared by the disconnect and by a hello from another
    #: worker process (a quick restart: nothing is decided); later events of the stopping
    #: process (a last heartbeat) leave it. A goodbye with an empty boot id marks nothing.
    stopping_idx: int = 0
    #: What the worker said stopped it (`NodeStopping.reason`).
    stopping_reason: str = ""
    # --- end worker goodbye ---

    @property
    def facts_only(self) -> bool:
        """Its worker said it runs no runners: no self-test will come, nothing is placed
        there, and it is not a node still joining."""
        return self.runner_digest == NO_RUNNERS_DIGEST


class RemovedNode(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The tombstone of a node the operator removed (`NodeRemoved`), filed under its slot.

    It keeps the slot taken: slots are numbered by `len(nodes) + len(removed_nodes)`, so a
    node joining after a removal never lands on a slot whose marks and gauges were another
    node's. A removed node that connects again takes this slot back (the tombstone goes):
    its marks, so its sequence numbers, carry over, and a node never holds two slots."""

    node_id: str
    removed_idx: int
    removed_ms: int
    hostname: str = ""
    reason: str = ""


def runner_id_for(devshard_id: str, slot: int) -> str:
    """The id of the runner serving `slot` of a devshard, on whichever node holds it."""
    return f"{devshard_id}/{slot}"


class RunnerRecord(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    runner_id: str
    node_id: str
    status: RunnerStatus
    devshard_id: str
    slot: int
    reason: str
    #: master_time_ms of the report that last changed this record (a repeated identical
    #: report leaves it): for a FAILED runner, when it failed.
    updated_ms: int


class WindowState(StrEnum):
    SCHEDULED = "scheduled"
    DRAINING = "draining"
    ACTIVE = "active"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


#: Window states that still block a new window for the same node.
OPEN_WINDOW_STATES = frozenset({WindowState.SCHEDULED, WindowState.DRAINING, WindowState.ACTIVE})

#: Closed (COMPLETED/CANCELLED) windows State keeps per node; closing one more drops that
#: node's oldest CANCELLED one, or its oldest if none is. Unbounded, a schedule/cancel loop
#: (free while SCHEDULED) would grow State, every snapshot and every status without end.
#: Cancelled ones go first because they never excused anything, while a completed window
#: decides whether its node earns credit for the epochs it touched (`in_maintenance_during`):
#: dropped oldest-first, 16 free schedule/cancel round trips erased it. 16 is above
#: status_view's DEFAULT_RECENT_WINDOWS (10) and leaves a node some history (`windows_of`)
#: while 10,000 nodes hold at most 160,000 closed records.
CLOSED_WINDOWS_KEPT_PER_NODE: Final = 16

#: Epochs whose ledgers State keeps: starting epoch N drops the settled ledgers of epochs
#: N - 16 and older. A ledger holds an account per node that served in its epoch, so kept
#: forever they grew State (and every snapshot) by one per epoch -- 144 a day with 10-minute
#: epochs. The log keeps every ledger's history; late work is settled for at most
#: `PlannerConfig.late_work_epochs` epochs back, which the planner's config keeps below this.
LEDGER_EPOCHS_KEPT: Final = 16


class MaintenanceWindow(msgspec.Struct, frozen=True, kw_only=True):
    window_id: str
    node_id: str
    start_ms: int
    duration_ms: int
    requested_ms: int
    credit_spent_ms: int
    state: WindowState
    drain_started_ms: int = 0
    started_ms: int = 0
    closed_ms: int = 0
    #: How a COMPLETED/CANCELLED window closed: "host", "operator" (finished by an operator:
    #: `MaintenanceFinished.by` names who), "reconnect", "overrun", "cancelled", "removed"
    #: (its node was removed: `NodeRemoved`).
    outcome: str = ""
    credit_refund_ms: int = 0

    @property
    def end_ms(self) -> int:
        return self.start_ms + self.duration_ms


class EpochRecord(msgspec.Struct, frozen=True, kw_only=True):
    epoch: int
    start_ms: int
    end_ms: int
    seed: int


class SessionRecord(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    slots: int
    memory_per_slot_mb: int
    gpu: bool
    name: str
    reward_per_unit: int
    created_ms: int
    #: Why the planner could not place it in `unplaced_epoch` (empty when placed), with the
    #: counts as of `unplaced_ms`: the master time of that `SessionUnplaced` (0 when placed).
    #: The planner restates a reason whose counts alone moved at most once a minute.
    unplaced_reason: str = ""
    unplaced_epoch: int = -1
    unplaced_ms: int = 0


class DevshardRecord(msgspec.Struct, frozen=True, kw_only=True):
    devshard_id: str
    session_id: str
    epoch: int
    assignments: tuple[SlotAssignment, ...]
    #: When each of `assignments` (same order) was given to its node: a re-placement keeps
    #: the time of the slots that stay put, so the miss grace exempts only the late holders.
    assigned_ms: tuple[int, ...]
    ends_ms: int
    #: The last (re)placement of the devshard as a whole.
    placed_ms: int
    reason: str
    #: See `DevshardPlaced.avoid_nodes`.
    avoid_nodes: tuple[str, ...] = ()

    def holders(self) -> tuple[str, ...]:
        """The node holding each slot, by slot number ("" for a slot left unfilled): what
        stickiness hands placement, so that slot i goes back to the node that held slot i
        and a node keeps as many slots as it had (its loaded runners are carried over)."""
        by_slot = {a.slot: a.node_id for a in self.assignments}
        return tuple(by_slot.get(slot, "") for slot in range(max(by_slot, default=-1) + 1))


class NodeLedger(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One node's account in one epoch: all a settlement needs to know about it.

    One record per node (rather than one map per fact) keeps a WorkReported at one lookup
    and one update of the epoch's node map, whatever the cluster's size.
    """

    #: On-time work (reported before settlement) and the reward it earned at its rates.
    units: int = 0
    reward: int = 0
    #: Unexcused missed slots.
    misses: int = 0
    #: Reason of the first unexcused disconnect in the epoch (None: none): it forfeits the
    #: reward. None rather than "" because an empty reason still punishes.
    disconnect: str | None = None
    #: devshard_id -> on-time units, so the planner sees which slot holders reported nothing
    #: by the epoch's end (WorkMissed). Small: a node holds few devshards per epoch.
    units_by_devshard: Map[str, int] = msgspec.field(default_factory=Map)
    #: Set when the epoch is settled and a payout names this node.
    payout: NodePayout | None = None
    #: Work that arrived after settlement, the reward it would earn (paid only if the node
    #: was not punished), what of it was paid, and the units a LateWorkSettled decided and
    #: the part of `late_reward` they were worth, paid or forfeited: a later decision pays
    #: only what no earlier one decided (a forfeit stays forfeited).
    late_units: int = 0
    late_reward: int = 0
    late_paid: int = 0
    late_settled_units: int = 0
    late_decided_reward: int = 0

    @property
    def late_undecided(self) -> int:
        """Late units no LateWorkSettled has decided yet (paid or forfeited)."""
        return self.late_units - self.late_settled_units

    @property
    def late_undecided_reward(self) -> int:
        """What the undecided late units earned (`late_reward` no decision covered)."""
        return self.late_reward - self.late_decided_reward


#: The empty account a node starts an epoch with.
EMPTY_NODE_LEDGER = NodeLedger()


# Unknown fields are refused so that a snapshot written with another ledger layout fails to
# decode (the snapshot is skipped and the log refolded) instead of decoding to empty ledgers.
class EpochLedger(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """What each node earned and lost in one epoch; paid out only when settled."""

    epoch: int
    nodes: Map[str, NodeLedger] = msgspec.field(default_factory=Map)
    #: devshard_id -> reward per unit of its session when placed, so work that arrives
    #: after the devshard was finalized (or its session deleted) is still priced.
    rates: Map[str, int] = msgspec.field(default_factory=Map)
    #: node_id -> {devshard_id: master time it was first given a slot of it} for every
    #: devshard of this epoch the node held at any time in it: work counts only there. Kept
    #: here, not read off the live devshard, so late work, a carried-over runner's last
    #: report and a moved slot's earlier work still count. Maps (not tuples) so that a node
    #: holding thousands of devshards is still one lookup per check and per placement.
    held_devshards: Map[str, Map[str, int]] = msgspec.field(default_factory=Map)
    settled: bool = False
    #: node_id -> its undecided late units (> 0 only): an index over `nodes`, so the planner
    #: finds late work each cycle without scanning every node of the recent epochs.
    late_pending: Map[str, int] = msgspec.field(default_factory=Map)

    def node(self, node_id: str) -> NodeLedger:
        """The node's account (empty if it has none in this epoch)."""
        return self.nodes.get(node_id, EMPTY_NODE_LEDGER)

    def with_node(self, node_id: str, account: NodeLedger) -> EpochLedger:
        """This ledger with `node_id`'s account replaced, its late-work index kept in step."""
        late = self.late_pending
        undecided = account.late_undecided
        if undecided > 0:
            if late.get(node_id) != undecided:
                late = late.set(node_id, undecided)
        elif node_id in late:
            late = late.delete(node_id)
        return msgspec.structs.replace(
            self, nodes=self.nodes.set(node_id, account), late_pending=late
        )


# Unknown fields are refused so that a snapshot written with another layout (the per-origin
# maps that NodeRecord's marks replaced, say) fails to decode -- the snapshot is skipped and
# the log refolded -- instead of decoding with those facts silently dropped.
class State(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    #: Index of the last applied event; the next event must carry `last_applied + 1`.
    last_applied: int = 0
    #: master_time_ms of the last applied event: the cluster's notion of "when" it is.
    last_time_ms: int = 0
    #: Sequence number of the master's last event (a node's is in `last_event_by_node`).
    master_seq: int = 0
    nodes: Map[str, NodeRecord] = msgspec.field(default_factory=Map)
    #: Each node's (index of the last event it originated, highest sequence number it gave an
    #: event in the log), by `NodeRecord.slot`. Every node-originated event advances it
    #: (DESIGN rule 6: liveness is event flow); the sequence number lets a restarted master
    #: drop what a worker resends. Kept apart from the records, unboxed (`NodeMarks`),
    #: because it is the one thing every event replaces: see node_marks.py for why.
    last_event_by_node: NodeMarks = msgspec.field(default_factory=NodeMarks)
    #: Each node's latest gauges (CPU %, available memory, free disk, network counters), by
    #: `NodeRecord.slot`: kept out of the records, unboxed, because nearly every info report
    #: changes them (node_gauges.py). `node_info()` gives a node's whole picture.
    node_gauges: NodeGauges = msgspec.field(default_factory=NodeGauges)
    runners: Map[str, RunnerRecord] = msgspec.field(default_factory=Map)
    windows: Map[str, MaintenanceWindow] = msgspec.field(default_factory=Map)
    #: node_id -> window_id of its SCHEDULED/DRAINING/ACTIVE window.
    open_window_by_node: Map[str, str] = msgspec.field(default_factory=Map)
    #: node_id -> ids of its closed windows still in `windows`, oldest closed first (at most
    #: CLOSED_WINDOWS_KEPT_PER_NODE): how a closing window finds the one to drop.
    closed_windows_by_node: Map[str, tuple[str, ...]] = msgspec.field(default_factory=Map)
    credit_ms_by_node: Map[str, int] = msgspec.field(default_factory=Map)
    epoch: EpochRecord | None = None
    sessions: Map[str, SessionRecord] = msgspec.field(default_factory=Map)
    #: Live (not yet finalized) devshards.
    devshards: Map[str, DevshardRecord] = msgspec.field(default_factory=Map)
    #: session_id -> its live devshard id.
    devshard_by_session: Map[str, str] = msgspec.field(default_factory=Map)
    #: session_id -> the node that held each slot of its last finalized devshard, by slot
    #: ("" for an unfilled slot: `DevshardRecord.holders`), for stickiness.
    last_nodes_by_session: Map[str, tuple[str, ...]] = msgspec.field(default_factory=Map)
    ledgers: Map[int, EpochLedger] = msgspec.field(default_factory=Map)
    #: slot -> tombstone of the node the operator removed from it (`NodeRemoved`). UNSET --
    #: absent from the canonical encoding -- until the first removal, so a state of a log
    #: without removals encodes, and digests, exactly as before the event existed. Read it
    #: through `removed()`.
    removed_nodes: Map[int, RemovedNode] | UnsetType = UNSET

    def removed(self) -> Map[int, RemovedNode]:
        """slot -> tombstone of each removed node (empty if none was ever removed)."""
        removed = self.removed_nodes
        return _NO_REMOVED if isinstance(removed, UnsetType) else removed

    def next_node_slot(self) -> int:
        """The slot a node joining now takes: after every live and every removed node's."""
        removed = self.removed_nodes
        return len(self.nodes) + (0 if isinstance(removed, UnsetType) else len(removed))

    def removed_node(self, node_id: str) -> RemovedNode | None:
        """The tombstone of `node_id` if it was removed and has not joined again since
        (one at most); None otherwise. Scans the tombstones: not for every event."""
        if node_id in self.nodes:
            return None
        return next((r for r in self.removed().values() if r.node_id == node_id), None)

    def last_event_index(self, node_id: str) -> int:
        """Index of the last event `node_id` originated; 0 if none (or the node is unknown)."""
        rec = self.nodes.get(node_id)
        return 0 if rec is None else self.last_event_by_node.index(rec.slot)

    def node_info(self, node_id: str) -> NodeInfo | None:
        """Everything `node_id` has reported about its machine: its record's NodeInfo with
        its latest gauges laid over it. None if the node is unknown."""
        rec = self.nodes.get(node_id)
        return None if rec is None else self.node_gauges.laid_over(rec.slot, rec.info)

    def open_window(self, node_id: str) -> MaintenanceWindow | None:
        """The node's SCHEDULED, DRAINING or ACTIVE maintenance window, if it has one."""
        window_id = self.open_window_by_node.get(node_id)
        return self.windows.get(window_id) if window_id is not None else None

    def last_seq(self, origin: str) -> int:
        """Highest sequence number of `origin` (a node or MASTER_ORIGIN) in the log; 0 if none."""
        if origin == MASTER_ORIGIN:
            return self.master_seq
        rec = self.nodes.get(origin)
        return 0 if rec is None else self.last_event_by_node.get(rec.slot)[1]


_NO_REMOVED: Final[Map[int, RemovedNode]] = Map()

EMPTY_STATE = State()
