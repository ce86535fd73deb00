"""`fold` (the batched path replay uses) is observably identical to `apply` one by one."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import event_logs

from cluster.shared.apply import OutOfOrderError, apply, fold
from cluster.shared.codec import state_digest
from cluster.shared.events import IndexedEvent
from cluster.shared.state import EMPTY_STATE, State


def _apply_each(state: State, events: list[IndexedEvent]) -> State:
    for ie in events:
        state = apply(state, ie)
    return state


@settings(max_examples=150, deadline=None)
@given(log=event_logs(max_size=120), cut=st.integers(0, 120))
def test_fold_equals_apply_each(log: list[IndexedEvent], cut: int) -> None:
    cut = min(cut, len(log))
    one_by_one = _apply_each(EMPTY_STATE, log)
    # Folding in two batches (as catch-up does) ends in the same state as one at a time.
    batched = fold(fold(EMPTY_STATE, log[:cut]), log[cut:])
    assert batched == one_by_one
    assert state_digest(batched) == state_digest(one_by_one)


@settings(max_examples=50, deadline=None)
@given(log=event_logs(min_size=3, max_size=40))
def test_fold_refuses_a_gap_like_apply(log: list[IndexedEvent]) -> None:
    with_gap = log[:1] + log[2:]
    with pytest.raises(OutOfOrderError) as err:
        fold(EMPTY_STATE, with_gap)
    assert (err.value.expected, err.value.got) == (2, 3)
