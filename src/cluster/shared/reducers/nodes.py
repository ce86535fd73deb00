"""Reducers for node facts: info, heartbeats, connects and disconnects."""

from __future__ import annotations

import msgspec

from cluster.shared.events import (
    IndexedEvent,
    NodeConnected,
    NodeDisconnected,
    NodeGatheredInfo,
    NodeHeartbeat,
    NodeInfo,
    RunnerSelfTestCompleted,
)
from cluster.shared.state import EpochLedger, NodeRecord, SelfTestResult, State

_replace = msgspec.structs.replace
_INFO_FIELDS = NodeInfo.__struct_fields__


def merge_info(old: NodeInfo, new: NodeInfo) -> NodeInfo:
    """Overlay the fields a source reported on what other sources said before."""
    changes = {f: v for f in _INFO_FIELDS if (v := getattr(new, f)) is not None}
    return _replace(old, **changes) if changes else old


def spoke(rec: NodeRecord | None, node_id: str, ie: IndexedEvent) -> NodeRecord:
    """The record of `node_id` after it originated `ie`: (re)joined if it was new or
    disconnected, its last event index (DESIGN rule 6) and sequence number advanced."""
    if rec is None:
        return NodeRecord(
            node_id=node_id,
            info=NodeInfo(),
            connected=True,
            joined_idx=ie.idx,
            joined_ms=ie.master_time_ms,
            last_event_idx=ie.idx,
            last_seq=ie.seq,
        )
    if not rec.connected:
        return _replace(
            rec,
            connected=True,
            joined_idx=ie.idx,
            joined_ms=ie.master_time_ms,
            last_event_idx=ie.idx,
            last_seq=ie.seq,
        )
    return _replace(rec, last_event_idx=ie.idx, last_seq=ie.seq)


def ensure_node(state: State, node_id: str, ie: IndexedEvent) -> State:
    """The node exists and is connected: the master saw it (re)connect."""
    rec = state.nodes.get(node_id)
    if rec is None:
        # Known to the master before it spoke: no event of its own yet.
        rec = NodeRecord(
            node_id=node_id,
            info=NodeInfo(),
            connected=True,
            joined_idx=ie.idx,
            joined_ms=ie.master_time_ms,
            last_event_idx=0,
            last_seq=0,
        )
    elif not rec.connected:
        rec = _replace(
            rec,
            connected=True,
            joined_idx=ie.idx,
            joined_ms=ie.master_time_ms,
        )
    else:
        return state
    return _replace(state, nodes=state.nodes.set(node_id, rec))


def node_gathered_info(state: State, ie: IndexedEvent, ev: NodeGatheredInfo) -> State:
    rec = state.nodes.get(ev.node_id)
    if rec is None:
        return state
    merged = merge_info(rec.info, ev.info)
    if merged is rec.info:
        return state
    return _replace(state, nodes=state.nodes.set(ev.node_id, _replace(rec, info=merged)))


def node_heartbeat(state: State, ie: IndexedEvent, ev: NodeHeartbeat) -> State:
    # Liveness bookkeeping (NodeRecord.last_event_idx) is done by apply() for every event.
    return state


def node_connected(state: State, ie: IndexedEvent, ev: NodeConnected) -> State:
    return ensure_node(state, ev.node_id, ie)


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


def runner_self_test_completed(
    state: State, ie: IndexedEvent, ev: RunnerSelfTestCompleted
) -> State:
    rec = state.nodes.get(ev.node_id)
    if rec is None:
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
