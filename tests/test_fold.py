"""`fold` (the batched path replay uses) is observably identical to `apply` one by one."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import NODE_IDS, event_logs, with_removals

from cluster.shared.apply import OutOfOrderError, apply, fold
from cluster.shared.codec import state_digest
from cluster.shared.events import (
    MASTER_ORIGIN,
    Event,
    IndexedEvent,
    NodeConnected,
    NodeDisconnected,
    NodeGatheredInfo,
    NodeHeartbeat,
    NodeInfo,
    NodeRemoved,
    RunnerSelfTestCompleted,
)
from cluster.shared.state import EMPTY_STATE, State


def _apply_each(state: State, events: list[IndexedEvent]) -> State:
    for ie in events:
        state = apply(state, ie)
    return state


@settings(max_examples=150, deadline=None)
@given(log=event_logs(max_size=120, pairs=with_removals), cut=st.integers(0, 120))
def test_fold_equals_apply_each(log: list[IndexedEvent], cut: int) -> None:
    cut = min(cut, len(log))
    one_by_one = _apply_each(EMPTY_STATE, log)
    # Folding in two batches (as catch-up does) ends in the same state as one at a time.
    batched = fold(fold(EMPTY_STATE, log[:cut]), log[cut:])
    assert batched == one_by_one
    assert state_digest(batched) == state_digest(one_by_one)


def _churn(node: str) -> list[tuple[str, Event]]:
    """What makes a node join, speak, leave, go (removed) and rejoin, in every order."""
    return [
        (node, NodeHeartbeat(node_id=node)),
        (node, NodeGatheredInfo(node_id=node, source="host", info=NodeInfo(hostname=node))),
        (node, RunnerSelfTestCompleted(node_id=node, runner_kind="echo", passed=True, reason="")),
        (node, NodeDisconnected(node_id=node, reason="shutting down", excused=True)),
        (MASTER_ORIGIN, NodeConnected(node_id=node, addr="/ip4/127.0.0.1/tcp/1")),
        (MASTER_ORIGIN, NodeDisconnected(node_id=node, reason="quiet")),
        (MASTER_ORIGIN, NodeRemoved(node_id=node, reason="decommissioned")),
    ]


#: Two nodes only, so that a random log keeps hitting (re)joins between batched marks.
churn_pairs = st.sampled_from([pair for node in NODE_IDS[:2] for pair in _churn(node)])


@settings(max_examples=150, deadline=None)
@given(log=event_logs(max_size=40, pairs=churn_pairs), cut=st.integers(0, 40))
def test_fold_equals_apply_each_through_joins_and_rejoins(
    log: list[IndexedEvent], cut: int
) -> None:
    cut = min(cut, len(log))
    assert fold(fold(EMPTY_STATE, log[:cut]), log[cut:]) == _apply_each(EMPTY_STATE, log)


@settings(max_examples=50, deadline=None)
@given(log=event_logs(min_size=3, max_size=40))
def test_fold_refuses_a_gap_like_apply(log: list[IndexedEvent]) -> None:
    with_gap = log[:1] + log[2:]
    with pytest.raises(OutOfOrderError) as err:
        fold(EMPTY_STATE, with_gap)
    assert (err.value.expected, err.value.got) == (2, 3)
