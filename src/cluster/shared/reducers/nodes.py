"""Reducers for node facts: info, heartbeats, connects and disconnects."""

from __future__ import annotations

import msgspec
import msgspec.inspect
from msgspec import UNSET, UnsetType

from cluster.shared.events import (
    IndexedEvent,
    NodeConnected,
    NodeDisconnected,
    NodeGatheredInfo,
    NodeHeartbeat,
    NodeInfo,
    NodeRemoved,
    NodeStopping,
    RunnerSelfTestCompleted,
)
from cluster.shared.node_gauges import GAUGE_COLUMN, NodeGauges
from cluster.shared.node_marks import address
from cluster.shared.reducers.maintenance import close_window
from cluster.shared.state import (
    EpochLedger,
    NodeRecord,
    RemovedNode,
    SelfTestResult,
    State,
    WindowState,
)

_replace = msgspec.structs.replace
_to_builtins = msgspec.to_builtins
_gauge_column = GAUGE_COLUMN.get
_SCALARS = (msgspec.inspect.StrType, msgspec.inspect.IntType, msgspec.inspect.FloatType)
#: NodeInfo fields holding more than a scalar (GPU lists): `info_update` takes those values
#: from the struct itself, since `to_builtins` turns nested structs into dicts.
_NESTED_INFO_FIELDS = frozenset(
    field.name
    for field in msgspec.inspect.type_info(NodeInfo).fields  # type: ignore[attr-defined]
    if not all(
        isinstance(t, (*_SCALARS, msgspec.inspect.NoneType))
        for t in getattr(field.type, "types", (field.type,))
    )
)


def info_update(
    rec: NodeRecord, gauges: NodeGauges, info: NodeInfo
) -> tuple[NodeRecord, NodeGauges]:
    """What a report of `info` about `rec`'s node changes: the gauges it names, written to
    the gauges table, and its other fields, overlaid on the record's NodeInfo -- the record is
    replaced only if one of them differs (totals and hostnames come with most reports and
    rarely change). A field the report leaves None keeps what other sources said before, so
    one slow source (a hung `nvidia-smi`, a stuck disk) never blanks the others."""
    # NodeInfo omits its None defaults when converted, so msgspec lists the reported fields
    # in C: several times faster than a getattr per field, and info events are frequent.
    cells: list[tuple[int, object]] = []
    changes: dict[str, object] | None = None
    old = rec.info
    for name, value in _to_builtins(info).items():
        column = _gauge_column(name)
        if column is not None:
            cells.append((column, value))
            continue
        if name in _NESTED_INFO_FIELDS:
            value = getattr(info, name)
        if getattr(old, name) != value:
            if changes is None:
                changes = {}
            changes[name] = value
    if cells:
        # node_gauges.gauges_row written out: a call saved per report.
        gauges = gauges.with_cells(rec.marks_mid, rec.marks_leaf, rec.marks_offset >> 1, cells)
    if changes:
        rec = _replace(rec, info=_replace(old, **changes))
    return rec, gauges


def joined(
    rec: NodeRecord | None, node_id: str, ie: IndexedEvent, state: State
) -> NodeRecord | None:
    """The record of `node_id` (re)joined by its own event `ie`: it was new or disconnected.
    None when `node_id` was removed (`NodeRemoved`) and not admitted again since: its event
    changes nothing (see below).

    apply() calls this only then; a connected node's event leaves its record alone and
    advances `State.last_event_by_node` instead (DESIGN rule 6). A new node takes the next
    slot, `state.next_node_slot()` (after every node the state knows or removed).

    A removed node is out of the cluster until the master admits it again: a NodeConnected,
    logged for a hello that passed the proof and names its worker process and runner setting
    (`ensure_node`). The master drops a removed node's streams at its removal, so it cannot
    speak before that; a log that holds such an event anyway has it ignored -- not indexed
    into the node's marks, not reduced -- rather than let it re-create the node as a bare
    record (no boot id, no runner setting: a facts-only node shown self-testing, a runner
    node never placeable) that the master never vetted.
    """
    if rec is None:
        if _tombstone_slot(state, node_id) is not None:
            return None
        return new_record(node_id, state.next_node_slot(), ie)
    return _replace(rec, connected=True, joined_idx=ie.idx, joined_ms=ie.master_time_ms)


def _tombstone_slot(state: State, node_id: str) -> int | None:
    """The slot of `node_id`'s tombstone, if it was removed and has not joined again. A
    scan of the tombstones: only for a node the state does not hold (new, or removed)."""
    removed = state.removed_nodes
    if isinstance(removed, UnsetType):
        return None
    return next((slot for slot, tomb in removed.items() if tomb.node_id == node_id), None)


def new_record(
    node_id: str,
    slot: int,
    ie: IndexedEvent,
    hello_idx: int = 0,
    boot_id: str = "",
    runner_digest: str = "",
) -> NodeRecord:
    """The record of a node the state meets for the first time, connected by `ie`."""
    mid, leaf, offset = address(slot)
    return NodeRecord(
        node_id=node_id,
        slot=slot,
        marks_mid=mid,
        marks_leaf=leaf,
        marks_offset=offset,
        info=NodeInfo(),
        connected=True,
        joined_idx=ie.idx,
        joined_ms=ie.master_time_ms,
        disconnected_ms=0,
        disconnected_reason="",
        disconnect_excused=False,
        hello_idx=hello_idx,
        boot_id=boot_id,
        runner_digest=runner_digest,
        self_test=None,
    )


def ensure_node(
    state: State, node_id: str, ie: IndexedEvent, boot_id: str, runner_digest: str = ""
) -> State:
    """The node exists and is connected: the master saw it (re)connect (a hello) from the
    worker process `boot_id`, running the runner setting `runner_digest` ("" if unknown).
    A node the operator removed is admitted again this way (only this way: see `joined`).

    A node that was connected already (it reconnected before anyone noticed it gone) keeps
    its connected stretch (`joined_*`); only `hello_idx`, `boot_id` and `runner_digest` move.
    A self-test of another setting than `runner_digest` is dropped (`_untested_if_changed`).
    """
    rec = state.nodes.get(node_id)
    rec_boot_id = "" if rec is None else rec.boot_id
    if rec is None:
        # Known to the master before it spoke: no event of its own yet. A removed node
        # takes back its own slot, the tombstone's: its marks -- so `State.last_seq`, by
        # which the master drops the events it already logged -- carry over (a fresh slot
        # started at seq 0: events logged but never acknowledged were logged again, a
        # WorkReported counted twice). No other node ever gets that slot, so slots stay
        # unique and dense. Nothing else comes back: the record is new (no info, no
        # self-test), the slot's gauges (CPU %, memory, disk, network) are cleared until it
        # reports again, and its maintenance credit, dropped at the removal, starts again
        # from the policy's initial grant, as any new node's.
        slot = _tombstone_slot(state, node_id)
        if slot is None:
            slot = state.next_node_slot()
        else:
            removed = state.removed().delete(slot)
            # No tombstones left is "none": UNSET, as in a log without removals (one digest).
            state = _replace(
                state,
                removed_nodes=removed if removed else UNSET,
                node_gauges=state.node_gauges.cleared(slot),
            )
        rec = new_record(
            node_id,
            slot,
            ie,
            hello_idx=ie.idx,
            boot_id=boot_id,
            runner_digest=runner_digest,
        )
    elif not rec.connected:
        rec = _replace(
            rec,
            connected=True,
            joined_idx=ie.idx,
            joined_ms=ie.master_time_ms,
            hello_idx=ie.idx,
            boot_id=boot_id,
            runner_digest=runner_digest,
            self_test=_untested_if_changed(rec.self_test, runner_digest),
        )
    else:
        rec = _replace(
            rec,
            hello_idx=ie.idx,
            boot_id=boot_id,
            runner_digest=runner_digest,
            self_test=_untested_if_changed(rec.self_test, runner_digest),
        )
        if rec.stopping_idx and boot_id != rec_boot_id:
            # Another worker process said hello: the one that was stopping is gone, and
            # this one is not stopping (a restart quicker than the planner's cycle).
            rec = _replace(rec, stopping_idx=0, stopping_reason="")
    return _replace(state, nodes=state.nodes.set(node_id, rec))


def _untested_if_changed(test: SelfTestResult | None, runner_digest: str) -> SelfTestResult | None:
    """The node's self-test, or None when the worker now runs another setting than the one it
    tested: until that setting's own result arrives the node counts as not self-tested, so
    the planner places nothing there on the strength of a test of something else. The
    digest covers the kind as well as the config (`config_digest`). `NO_RUNNERS_DIGEST` (the
    worker now runs no runners) is another setting like any: the test is dropped, so a node
    restarted facts-only is placed nothing more on its earlier test. "" (a log written before
    hellos carried the setting, an older worker) keeps the test."""
    if test is None or not runner_digest or test.config_digest == runner_digest:
        return test
    return None


def node_gathered_info(state: State, ie: IndexedEvent, ev: NodeGatheredInfo) -> State:
    rec = state.nodes.get(ev.node_id)
    if rec is None:
        return state
    updated, gauges = info_update(rec, state.node_gauges, ev.info)
    if updated is not rec:
        state = _replace(state, nodes=state.nodes.set(ev.node_id, updated))
    return state if gauges is state.node_gauges else _replace(state, node_gauges=gauges)


def node_heartbeat(state: State, ie: IndexedEvent, ev: NodeHeartbeat) -> State:
    # Liveness bookkeeping (State.last_event_by_node) is done by apply() for every event.
    return state


def node_connected(state: State, ie: IndexedEvent, ev: NodeConnected) -> State:
    return ensure_node(state, ev.node_id, ie, ev.boot_id, ev.runner_digest)


def node_disconnected(state: State, ie: IndexedEvent, ev: NodeDisconnected) -> State:
    rec = state.nodes.get(ev.node_id)
    if rec is None or not rec.connected:
        return state
    rec = _replace(
        rec,
        connected=False,
        disconnected_ms=ie.master_time_ms,
        disconnected_reason=ev.reason,
        disconnect_excused=ev.excused,
        # Gone now: whatever it said on its way out is in the reason (a stopping mark kept
        # would make the planner disconnect it again the moment it rejoins).
        stopping_idx=0,
        stopping_reason="",
    )
    state = _replace(state, nodes=state.nodes.set(ev.node_id, rec))
    if ev.excused or state.epoch is None:
        return state
    # An unexcused disconnect punishes the node for the current epoch (DESIGN section 6).
    epoch = state.epoch.epoch
    ledger = state.ledgers.get(epoch) or EpochLedger(epoch=epoch)
    account = ledger.node(ev.node_id)
    if account.disconnect is not None:
        return state  # the first unexcused disconnect of the epoch is the one recorded
    ledger = ledger.with_node(ev.node_id, _replace(account, disconnect=ev.reason))
    return _replace(state, ledgers=state.ledgers.set(epoch, ledger))


def node_removed(state: State, ie: IndexedEvent, ev: NodeRemoved) -> State:
    """The operator removed the node: its record becomes a tombstone holding its slot (never
    another node's: see `State.removed_nodes`); its open maintenance window closes
    ("removed": an active one as completed, for the time it excused, a pending one as
    cancelled, nothing refunded) and its maintenance credit goes. Should it connect again
    it rejoins under that slot, with the initial credit of any new node (`ensure_node`).
    Its ledgers stay: history, and what its current epoch owes it is settled as for any node.
    Its marks and gauges stay in their slot, read by no one; should it rejoin, its marks
    carry over and its gauges are cleared (`ensure_node`). The master
    removes only nodes that are not connected; a log may still say otherwise, and the event
    is applied as is."""
    rec = state.nodes.get(ev.node_id)
    if rec is None:
        return state
    tomb = RemovedNode(
        node_id=ev.node_id,
        removed_idx=ie.idx,
        removed_ms=ie.master_time_ms,
        hostname=rec.info.hostname or "",
        reason=ev.reason,
    )
    state = _replace(
        state,
        nodes=state.nodes.delete(ev.node_id),
        removed_nodes=state.removed().set(rec.slot, tomb),
    )
    window = state.open_window(ev.node_id)
    if window is not None:
        closed = (
            WindowState.COMPLETED if window.state is WindowState.ACTIVE else WindowState.CANCELLED
        )
        state = close_window(
            state,
            _replace(window, state=closed, closed_ms=ie.master_time_ms, outcome="removed"),
        )
    if ev.node_id in state.credit_ms_by_node:
        state = _replace(state, credit_ms_by_node=state.credit_ms_by_node.delete(ev.node_id))
    return state


# --- worker goodbye (NodeStopping) ---------------------------------------------------------


def node_stopping(state: State, ie: IndexedEvent, ev: NodeStopping) -> State:
    """Mark the node as stopping cleanly: should it stay silent for K cycles, the planner
    disconnects it as stopped by its operator (a new worker process's hello clears the mark).

    Only its current worker process may say so (`ev.boot_id` is that of the node's latest
    hello): a goodbye an earlier process left in its outbox, resent by a restarted worker
    after its own hello, marks nothing -- that node is back, not stopping. A goodbye with an
    empty boot id marks nothing either: a hello may carry none (an older or custom worker),
    and "" would match the record of the *next* process of such a worker just as well.
    """
    rec = state.nodes.get(ev.node_id)
    if rec is None or not rec.connected or not ev.boot_id or ev.boot_id != rec.boot_id:
        return state
    rec = _replace(rec, stopping_idx=ie.idx, stopping_reason=ev.reason)
    return _replace(state, nodes=state.nodes.set(ev.node_id, rec))


# --- end worker goodbye ---------------------------------------------------------------------


def runner_self_test_completed(
    state: State, ie: IndexedEvent, ev: RunnerSelfTestCompleted
) -> State:
    rec = state.nodes.get(ev.node_id)
    if rec is None:
        return state
    if rec.runner_digest and ev.config_digest != rec.runner_digest:
        # A test of a setting the node no longer runs: an earlier worker process's result,
        # delivered from its outbox after the hello of a process with another setting. Kept,
        # it would make the node eligible on a test of something else.
        return state
    result = SelfTestResult(
        runner_kind=ev.runner_kind,
        passed=ev.passed,
        reason=ev.reason,
        load_ms=ev.load_ms,
        probe_ms=ev.probe_ms,
        request_ms=ev.request_ms,
        config_digest=ev.config_digest,
        at_ms=ie.master_time_ms,
    )
    return _replace(state, nodes=state.nodes.set(ev.node_id, _replace(rec, self_test=result)))
