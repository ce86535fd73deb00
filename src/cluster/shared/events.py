"""The event catalogue: everything that ever happens in a cluster, as immutable facts.

Events are past tense and carry every value a reducer needs -- times, ids, seeds, amounts --
because reducers may not read clocks, randomness or configuration (DESIGN rules 1-2). They
form one msgspec tagged union (`Event`, tag field ``"type"``) so a log record decodes in one
typed pass with no hand-written dispatch.

Times are integer milliseconds since the Unix epoch, chosen by the master. Durations are
integer milliseconds. Node ids are libp2p peer ids (base58 strings).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Final

import msgspec

#: The `origin` of events the master makes itself (planner decisions, request handlers).
MASTER_ORIGIN: Final = "master"

#: The largest value State stores in an int64 cell (node marks, gauges) or encodes as a
#: signed msgpack int: indices, sequence numbers and the ledger's sums never exceed it.
INT64_MAX: Final = 2**63 - 1
#: A log position, clock reading or sequence number: what State keeps in its uint64 marks
#: and its canonical encoding reads back as an int64, so bounded by both.
LogNumber = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]


#: `Hello.runner_digest` / `NodeConnected.runner_digest` of a worker that runs no runners
#: (`cluster worker --no-runners`, `WorkerNodeConfig(runner=None)`): it reports facts only,
#: never self-tests and is never placed. Not a hex digest, so no runner setting has it; it
#: is just another setting to the reducer (a hello under it drops the node's earlier test),
#: which is why it needed no new field: old records decode and replay as before, and an
#: older build folds a log holding it to the same State. "" could not say this: it also
#: means "a worker from before hellos named the setting", whose test is kept.
NO_RUNNERS_DIGEST: Final = "no-runners"


#: The most work units one WorkReported may carry, and the most slots one WorkMissed may
#: count. A runner reports every few seconds (every `offline_work_interval_s` while the
#: master is unreachable), so real reports are far below; the bound keeps one report's
#: reward (units x reward per unit, at most `master.requests.MAX_REWARD_PER_UNIT`) under
#: 2**60, and the ledger's sums saturate at INT64_MAX beyond that (reducers/runners.py).
#: The master refuses reports beyond them (admission); workers never make one.
MAX_WORK_UNITS: Final = 2**40
MAX_MISSED_SLOTS: Final = 2**20


#: The longest failure reason a worker puts in an event, in characters. Reasons come from
#: runners (exception texts, a program's stderr): one of megabytes would exceed the outbox's
#: record limit and stop the worker, and the log would keep it forever.
MAX_REASON_CHARS: Final = 4096

#: The longest id a worker echoes or names in an event: a runner or devshard id (the master
#: makes them: ``ds-<epoch>-s<index>[-<session name>]/<slot>``, under 120 characters), a
#: runner kind, an info source's name, a GPU's name or UUID (NVML's buffers hold 96 and 80
#: bytes). The master refuses longer ones (admission): each is kept in State or the log.
MAX_ID_CHARS: Final = 256
#: The longest hostname a worker reports: a DNS name is at most 253 characters, and POSIX's
#: HOST_NAME_MAX at most 255 (64 on Linux). Workers clip to it; the master refuses longer.
MAX_HOSTNAME_CHARS: Final = 255
#: The most GPUs one info event may list: no machine holds more (NVML's own limit is far
#: below). Bounds the GPU text of one event (x2 `MAX_ID_CHARS`) as the other fields are.
MAX_NODE_GPUS: Final = 256

#: The largest encoded event a worker may submit (its outbox refuses larger ones; the master
#: refuses them too): every logged record must fit the frames that carry the log to replicas.
MAX_EVENT_BYTES: Final = 1 << 20


class _Event(msgspec.Struct, frozen=True, tag_field="type", kw_only=True):
    """Base of every event; the class name is the tag written to the log."""


# --------------------------------------------------------------------------------------------
# Node facts
# --------------------------------------------------------------------------------------------


#: A machine-wide CPU utilisation: finite, 0-100 (psutil.cpu_percent without percpu).
Percent = Annotated[float, msgspec.Meta(ge=0, le=100)]
#: A non-negative amount or counter that fits an int64.
Gauge = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
#: The most runner slots one node may offer. The maintenance caps weigh nodes by their
#: slots: one node claiming billions (or a negative number) would outweigh, or cancel, the
#: rest of the cluster. A node is a machine; no machine runs more runners than this.
MAX_NODE_SLOTS: Final = 4096
NodeSlots = Annotated[int, msgspec.Meta(ge=0, le=MAX_NODE_SLOTS)]


#: The most MiB of memory a GPU may report (total or used): 2**40 MiB is an exbibyte, far
#: above any GPU (today's largest hold under 2**18 MiB).
MAX_GPU_MEMORY_MB: Final = 2**40
#: The coldest and hottest GPU temperature a worker may report, in degrees Celsius: colder
#: than any place a machine runs, hotter than any chip survives (they throttle near 90 and
#: shut down near 100; solder melts near 220). NVML reads it as an unsigned number.
MIN_GPU_TEMPERATURE_C: Final = -100
MAX_GPU_TEMPERATURE_C: Final = 300
#: The bounds of each `GpuInfo` number, (field, lowest, highest); None (not reported) is
#: always fine. Checked at admission (`cluster.master.admission`), not at decode: a log
#: written before them must still replay, whatever it holds. Workers report an optional
#: reading out of them as not reported (`cluster.worker.gpu`).
GPU_LIMITS: Final[tuple[tuple[str, int, int], ...]] = (
    ("index", 0, MAX_NODE_GPUS - 1),  # NVML numbers a machine's GPUs 0..count-1
    ("memory_total_mb", 0, MAX_GPU_MEMORY_MB),
    ("memory_used_mb", 0, MAX_GPU_MEMORY_MB),
    ("utilization_pct", 0, 100),
    ("temperature_c", MIN_GPU_TEMPERATURE_C, MAX_GPU_TEMPERATURE_C),
)


#: The longest a self-test step may be reported to have taken (`RunnerSelfTestCompleted`'s
#: `load_ms`, `probe_ms`, `request_ms`: 0..a day). State keeps them and /api/state serves
#: them, so an unbounded int (2**64 - 1 was accepted) would reach JavaScript beyond what it
#: represents exactly. Checked at admission like `GPU_LIMITS`; a worker reports a longer
#: step (a `load_timeout_s` over a day) as this.
MAX_SELF_TEST_MS: Final = 24 * 60 * 60 * 1000
SELF_TEST_MS_FIELDS: Final = ("load_ms", "probe_ms", "request_ms")


class GpuInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One GPU's reading (`cluster.worker.gpu`); its numbers are bounded by `GPU_LIMITS`."""

    index: int
    name: str
    uuid: str
    memory_total_mb: Gauge
    memory_used_mb: Gauge
    utilization_pct: int | None = None
    temperature_c: int | None = None


# gc=False: info events replace a node's NodeInfo in State (see cluster.shared.state).
class NodeInfo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """A partial picture of a machine: each info source fills only its own fields.

    The reducer merges the non-None fields into what the state already knows, so one slow
    source (a hung `nvidia-smi`, a stuck disk) never blanks what the others reported.
    """

    hostname: str | None = None
    cpu_count: Gauge | None = None
    # The gauges (what changes every report) are bounded: State keeps them unboxed, in
    # int64 cells where -1 means "not reported" (cluster.shared.node_gauges).
    cpu_percent: Percent | None = None
    memory_total_mb: Gauge | None = None
    memory_available_mb: Gauge | None = None
    disk_total_mb: Gauge | None = None
    disk_free_mb: Gauge | None = None
    net_bytes_sent: Gauge | None = None
    net_bytes_recv: Gauge | None = None
    gpus: tuple[GpuInfo, ...] | None = None
    #: Runner slots this node offers for placement (capacity weight).
    slots: NodeSlots | None = None
    #: Memory per slot this node can give, in MiB.
    slot_memory_mb: Gauge | None = None


class NodeGatheredInfo(_Event, frozen=True):
    node_id: str
    source: str
    info: NodeInfo


class NodeHeartbeat(_Event, frozen=True):
    """The cheap info-class event an idle worker sends every cycle: liveness is event flow."""

    node_id: str


class NodeConnected(_Event, frozen=True):
    """The master authenticated a worker's connection (origin: master)."""

    node_id: str
    addr: str = ""
    #: The worker process's `Hello.boot_id` ("" in logs written before boot ids).
    boot_id: str = ""
    #: The worker's `Hello.runner_digest`: the digest of the runner setting it runs now
    #: (`RunnerSelfTestCompleted.config_digest` of a test of that setting), or
    #: `NO_RUNNERS_DIGEST` for a worker that runs no runners (a facts-only node). "" in logs
    #: written before it (and from older workers): then the node's self-test is kept.
    runner_digest: str = ""


class NodeDisconnected(_Event, frozen=True):
    """The node is considered gone (origin: master).

    `excused`: the disconnect carries no penalty. Liveness never disconnects a node its
    maintenance window excuses (it is offline for maintenance, not gone); older logs may
    still hold such disconnects marked excused, and replay keeps them penalty-free. The one
    excused disconnect the master makes: finishing the window of a node whose worker stopped
    in it and is not back (`maintenance.stopped_in_window`).
    """

    node_id: str
    reason: str
    excused: bool = False


class NodeRemoved(_Event, frozen=True):
    """The operator removed a node that is gone for good (origin: master): `cluster node
    remove`. Its record leaves `State.nodes` (a tombstone keeps its slot, never reused), its
    open maintenance window closes and its maintenance credit is dropped; its ledgers, as
    all history, stay. The master removes only a node that is not connected, and drops its
    streams. Should the node connect again (a hello, a `NodeConnected`) it takes back its
    slot -- its marks, so its sequence numbers, carry over (the master's duplicate check) --
    but nothing else: a self-test to come, and the initial maintenance credit of any new
    node (the grant, 2 h by default), not what it had. Its own events before that hello
    change nothing (`nodes.joined`).
    """

    node_id: str
    reason: str = ""


# --- worker goodbye (NodeStopping) ---------------------------------------------------------


#: The most characters of a worker's own stop reason (`NodeStopping.reason`, up to
#: `MAX_REASON_CHARS`) quoted where it is shown: the disconnect reason, the node's status.
STOP_REASON_CHARS: Final = 200


class NodeStopping(_Event, frozen=True):
    """The node's worker is stopping cleanly (its operator stopped it): its last event.

    Sent by a worker on SIGTERM/SIGINT (or `WorkerNode.stop()`) once its runners have
    stopped, so that when the master's planner disconnects the node -- after K cycles without
    events, as any silent node; a worker restarted within them is not disconnected -- the
    reason says it was stopped by its operator instead of reading like a crash. It excuses
    nothing: outside a maintenance window the disconnect is unexcused.
    `boot_id` is the stopping worker process's (`Hello.boot_id`): a NodeStopping that an
    earlier process left in its outbox, delivered after a restarted worker's hello, names
    another process and marks nothing (the node is back, not stopping). An empty `boot_id`
    names no process, so it marks nothing either.
    """

    node_id: str
    boot_id: str
    #: What stopped it, in the worker's words ("cluster worker received SIGTERM").
    reason: str = ""


# --- end worker goodbye ---------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Runners and work
# --------------------------------------------------------------------------------------------


class RunnerStatus(StrEnum):
    PENDING = "pending"
    LOADING = "loading"
    READY = "ready"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class RunnerStatusUpdated(_Event, frozen=True):
    runner_id: str
    node_id: str
    status: RunnerStatus
    devshard_id: str = ""
    slot: int = -1
    reason: str = ""


class RunnerSelfTestCompleted(_Event, frozen=True):
    """Result of the load + health probe + one request self-test on join or config change."""

    node_id: str
    runner_kind: str
    passed: bool
    reason: str = ""
    load_ms: int = 0
    probe_ms: int = 0
    request_ms: int = 0
    config_digest: str = ""


class WorkReported(_Event, frozen=True):
    devshard_id: str
    node_id: str
    units: int
    epoch: int


class WorkMissed(_Event, frozen=True):
    """Expected work that did not happen (reported by the master's planner or the runner)."""

    devshard_id: str
    node_id: str
    epoch: int
    count: int = 1
    reason: str = ""
    #: Decided by the master through the one "is this excused?" rule at the time of the miss.
    excused: bool = False


# --------------------------------------------------------------------------------------------
# Maintenance windows
# --------------------------------------------------------------------------------------------


class MaintenanceScheduled(_Event, frozen=True):
    window_id: str
    node_id: str
    start_ms: int
    duration_ms: int
    requested_ms: int
    #: Maintenance credit this window spends (its duration, carried so replay needs no policy).
    credit_spent_ms: int


class MaintenanceCancelled(_Event, frozen=True):
    window_id: str
    node_id: str
    reason: str = ""
    credit_refund_ms: int = 0


class MaintenanceDrainStarted(_Event, frozen=True):
    window_id: str
    node_id: str


class MaintenanceStarted(_Event, frozen=True):
    window_id: str
    node_id: str


# omit_defaults, with a default only on `by` (added since): every other field is always
# written, so a record from before `by` existed (and a host's or a reconnect's finish now)
# encodes byte for byte as then. `how` is always written, so it has no default.
class MaintenanceFinished(_Event, frozen=True, omit_defaults=True):
    window_id: str
    node_id: str
    #: "host" (finished by command of the node itself), "operator" (by an operator: the
    #: master host's control socket or an operator key, named in `by`), "reconnect" (its
    #: worker restarted within its window).
    how: str
    #: Who finished it, for how="operator": the requester (`operator:local`, or an operator
    #: key's peer id). "" otherwise, and in records from before it existed.
    by: str = ""


class MaintenanceOverrun(_Event, frozen=True):
    window_id: str
    node_id: str


# --------------------------------------------------------------------------------------------
# Epochs, sessions, devshards, settlement
# --------------------------------------------------------------------------------------------


class EpochStarted(_Event, frozen=True):
    epoch: int
    start_ms: int
    end_ms: int
    seed: int


class SessionRequested(_Event, frozen=True):
    session_id: str
    slots: int
    memory_per_slot_mb: int
    gpu: bool = False
    name: str = ""
    #: Reward credited to a node's epoch ledger for each work unit it reports.
    reward_per_unit: Annotated[int, msgspec.Meta(ge=0)] = 1


class SessionDeleted(_Event, frozen=True):
    session_id: str


class SlotAssignment(msgspec.Struct, frozen=True, array_like=True):
    slot: int
    node_id: str


class DevshardPlaced(_Event, frozen=True):
    devshard_id: str
    session_id: str
    epoch: int
    assignments: tuple[SlotAssignment, ...]
    #: Expected end of the work: the epoch end (devshards never cross an epoch boundary).
    ends_ms: int
    #: "epoch" for the regular placement, "replace" when slots moved off a lost node.
    reason: str = "epoch"
    #: Nodes this devshard's slots moved off because their runner failed there for good:
    #: later re-placements in the epoch never put a slot there (it stays unassigned instead).
    avoid_nodes: tuple[str, ...] = ()


class SessionUnplaced(_Event, frozen=True):
    """The planner could not place a session this epoch, and says why."""

    session_id: str
    epoch: int
    reason: str


class DevshardFinalized(_Event, frozen=True):
    devshard_id: str
    epoch: int


class NodePayout(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    units: int
    reward: int
    punished: bool
    reason: str = ""
    #: Maintenance credit earned by completing this epoch unpunished.
    credit_earned_ms: int = 0


#: The most encoded payout bytes one `EpochSettled` carries. A settlement lists one payout per
#: paid or punished node (~150 bytes each): past ~25,000 nodes one event would not fit the
#: Events frame that carries the log to replicas, and the master would refuse to log it.
#: Larger settlements are split into parts of at most this much (`settlement.split_settlement`),
#: a quarter of a frame: each part is a modest record to commit, send and fold.
SETTLEMENT_PART_BYTES: Final = 1 << 20


# omit_defaults: a settlement in one part (`final` true) encodes exactly as before parts
# existed, so logs and their bytes stay the same for every cluster that never needed parts.
class EpochSettled(_Event, frozen=True, omit_defaults=True):
    """An epoch's payouts, one per paid or punished node (or node earning credit).

    A large settlement is logged as several EpochSettled of the same epoch, contiguous in
    one decision, with disjoint payouts: every part records its payouts (and credit) at
    once; only the part with `final` (the last) marks the epoch settled. Between parts the
    epoch is *partially settled*: some nodes hold their payout, the ledger is not settled
    yet (no late work, no settlement again of a node already paid). Records from before
    parts existed have no `final` field: one event, the whole settlement, as always.
    """

    epoch: int
    payouts: tuple[NodePayout, ...]
    #: This part completes the settlement: the epoch counts as settled once it is applied.
    final: bool = True


class LateWorkSettled(_Event, frozen=True):
    """Work reported after its epoch was settled, paid to that epoch if it was unpunished."""

    epoch: int
    node_id: str
    units: int
    reward: int


Event = (
    NodeGatheredInfo
    | NodeHeartbeat
    | NodeConnected
    | NodeDisconnected
    | NodeRemoved
    | NodeStopping
    | RunnerStatusUpdated
    | RunnerSelfTestCompleted
    | WorkReported
    | WorkMissed
    | MaintenanceScheduled
    | MaintenanceCancelled
    | MaintenanceDrainStarted
    | MaintenanceStarted
    | MaintenanceFinished
    | MaintenanceOverrun
    | EpochStarted
    | SessionRequested
    | SessionDeleted
    | DevshardPlaced
    | SessionUnplaced
    | DevshardFinalized
    | EpochSettled
    | LateWorkSettled
)

#: Every concrete event class, for exhaustiveness checks in tests and the reducer table.
EVENT_TYPES: Final[tuple[type[_Event], ...]] = Event.__args__


class IndexedEvent(msgspec.Struct, frozen=True, array_like=True):
    """One record of the log: the master's global index, its clock, who said it, and what.

    `origin` is the node id the master authenticated (or `MASTER_ORIGIN`); `seq` is the
    origin's own sequence number, so the master can drop a resent duplicate. Master events
    use the master's own counter as `seq`. The numbers are bounded (`LogNumber`) so that a
    record that decodes always folds and its state always encodes.
    """

    idx: LogNumber
    master_time_ms: LogNumber
    origin: str
    seq: LogNumber
    event: Event
