"""The state digest is the same in every process and under every PYTHONHASHSEED."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cluster.shared.codec import decode_state, encode_state, state_digest

# Builds the same log in any process and prints the digest and the raw map order.
_SCRIPT = """
import json
from cluster.shared.apply import fold
from cluster.shared.codec import state_digest
from cluster.shared.events import (IndexedEvent, NodeGatheredInfo, NodeInfo, EpochStarted,
    SessionRequested, MaintenanceScheduled, WorkReported, DevshardPlaced, SlotAssignment)
from cluster.shared.state import EMPTY_STATE

events = []
def add(origin, ev):
    events.append(IndexedEvent(len(events) + 1, 1000 + len(events), origin, len(events) + 1, ev))
add("master", EpochStarted(epoch=1, start_ms=0, end_ms=600000, seed=7))
# Every node holds a slot of "d", so its work counts (ledger accounts, holders).
add("master", SessionRequested(session_id="s", slots=300, memory_per_slot_mb=512))
add("master", DevshardPlaced(devshard_id="d", session_id="s", epoch=1, ends_ms=600000,
    assignments=tuple(SlotAssignment(i, f"12D3KooNode{i:04d}") for i in range(300))))
for i in range(300):
    n = f"12D3KooNode{i:04d}"
    add(n, NodeGatheredInfo(node_id=n, source="host", info=NodeInfo(hostname=n, slots=i % 5)))
    add(n, WorkReported(devshard_id="d", node_id=n, units=i, epoch=1))
for i in range(50):
    add("master", SessionRequested(session_id=f"s{i}", slots=2, memory_per_slot_mb=512))
n = "12D3KooNode0001"
add(n, MaintenanceScheduled(window_id="w", node_id=n, start_ms=9, duration_ms=5,
    requested_ms=1, credit_spent_ms=5))
state = fold(EMPTY_STATE, events)
print(json.dumps({"digest": state_digest(state), "order": list(state.nodes.keys())[:20]}))
"""


def _run(seed: str) -> dict[str, object]:
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_digest_is_identical_across_processes_and_hash_seeds() -> None:
    a, b, c = _run("1"), _run("2"), _run("12345")
    # The hash seed really changes the in-memory map order, so the equality below means
    # the encoding is canonical, not that the orders happened to agree.
    assert len({str(a["order"]), str(b["order"]), str(c["order"])}) > 1
    assert a["digest"] == b["digest"] == c["digest"]


def test_canonical_encoding_round_trips() -> None:
    from cluster.shared.apply import fold
    from cluster.shared.events import IndexedEvent, NodeHeartbeat
    from cluster.shared.state import EMPTY_STATE

    events = [
        IndexedEvent(i + 1, i, f"n{i % 7}", i + 1, NodeHeartbeat(node_id=f"n{i % 7}"))
        for i in range(50)
    ]
    state = fold(EMPTY_STATE, events)
    again = decode_state(encode_state(state))
    assert again == state
    assert state_digest(again) == state_digest(state)


def test_a_snapshot_with_the_old_ledger_layout_is_refused() -> None:
    """Per-fact ledger maps (the layout before NodeLedger) must not decode to empty ledgers."""
    import msgspec
    import pytest

    old = {"last_applied": 3, "ledgers": {1: {"epoch": 1, "units": {"n": 4}, "settled": False}}}
    with pytest.raises(msgspec.ValidationError, match="units"):
        decode_state(msgspec.msgpack.encode(old))


def test_a_state_with_records_filed_under_other_ids_is_refused() -> None:
    """A record stored under another key (a damaged or forged snapshot) would be found by one
    id and act as another: every map of records that carry their id is checked, and so are
    node marks for more slots than there are nodes and a devshard's assignment times."""
    import msgspec
    import pytest

    from cluster.shared.codec import ValidationError, to_builtins
    from cluster.shared.events import RunnerStatus, SlotAssignment
    from cluster.shared.node_marks import NodeMarks
    from cluster.shared.state import (
        EMPTY_STATE,
        DevshardRecord,
        EpochLedger,
        MaintenanceWindow,
        RunnerRecord,
        SessionRecord,
        WindowState,
    )

    state = msgspec.structs.replace(
        EMPTY_STATE,
        runners=EMPTY_STATE.runners.set(
            "d/0",
            RunnerRecord(
                runner_id="d/0",
                node_id="n",
                status=RunnerStatus.READY,
                devshard_id="d",
                slot=0,
                reason="",
                updated_ms=1,
            ),
        ),
        windows=EMPTY_STATE.windows.set(
            "w",
            MaintenanceWindow(
                window_id="w",
                node_id="n",
                start_ms=1,
                duration_ms=2,
                requested_ms=0,
                credit_spent_ms=2,
                state=WindowState.SCHEDULED,
            ),
        ),
        sessions=EMPTY_STATE.sessions.set(
            "s",
            SessionRecord(
                session_id="s",
                slots=1,
                memory_per_slot_mb=1,
                gpu=False,
                name="",
                reward_per_unit=1,
                created_ms=0,
            ),
        ),
        devshards=EMPTY_STATE.devshards.set(
            "d",
            DevshardRecord(
                devshard_id="d",
                session_id="s",
                epoch=1,
                assignments=(SlotAssignment(0, "n"),),
                assigned_ms=(0,),
                ends_ms=9,
                placed_ms=0,
                reason="",
            ),
        ),
        ledgers=EMPTY_STATE.ledgers.set(1, EpochLedger(epoch=1)),
    )
    good = to_builtins(state)
    assert decode_state(msgspec.msgpack.encode(good)) == state
    for field, key, other in (
        ("runners", "d/0", "d/1"),
        ("windows", "w", "w2"),
        ("sessions", "s", "s2"),
        ("devshards", "d", "d2"),
        ("ledgers", 1, 2),
    ):
        doc = dict(good)
        doc[field] = {other: good[field][key]}
        with pytest.raises(
            ValidationError, match=rf"{field}\[{other!r}\] holds the record of {key!r}"
        ):
            decode_state(msgspec.msgpack.encode(doc))
    doc = dict(good, last_event_by_node=NodeMarks([(0, 0), (3, 1)]).pairs())
    with pytest.raises(ValidationError, match="node marks hold 2 slots for 0 nodes"):
        decode_state(msgspec.msgpack.encode(doc))
    # Settlement reads a devshard's assignments and their times side by side.
    doc = dict(good, devshards={"d": dict(good["devshards"]["d"], assigned_ms=[])})
    with pytest.raises(ValidationError, match="devshard 'd': 0 assignment times for 1"):
        decode_state(msgspec.msgpack.encode(doc))


def test_a_state_whose_closed_window_index_disagrees_is_refused() -> None:
    """The reducer drops a node's oldest closed window through `closed_windows_by_node`: an
    index missing a closed window would keep it forever, one naming a window not held (or
    open, or another node's, or twice) would make the drop fail."""
    import msgspec
    import pytest

    from cluster.shared.apply import fold
    from cluster.shared.codec import ValidationError, to_builtins
    from cluster.shared.events import (
        Event,
        IndexedEvent,
        MaintenanceCancelled,
        MaintenanceScheduled,
    )
    from cluster.shared.state import EMPTY_STATE

    def window(wid: str, node: str) -> MaintenanceScheduled:
        return MaintenanceScheduled(
            window_id=wid,
            node_id=node,
            start_ms=9,
            duration_ms=5,
            requested_ms=1,
            credit_spent_ms=5,
        )

    events: list[Event] = [
        window("a1", "na"),
        MaintenanceCancelled(window_id="a1", node_id="na"),
        window("b1", "nb"),
        MaintenanceCancelled(window_id="b1", node_id="nb"),
        window("a2", "na"),
    ]
    state = fold(
        EMPTY_STATE, [IndexedEvent(i + 1, i, "master", i + 1, ev) for i, ev in enumerate(events)]
    )
    good = to_builtins(state)
    assert good["closed_windows_by_node"] == {"na": ("a1",), "nb": ("b1",)}
    assert decode_state(msgspec.msgpack.encode(good)) == state
    before_the_index = {k: v for k, v in good.items() if k != "closed_windows_by_node"}
    with pytest.raises(ValidationError, match="lists 0 of the 2 closed windows held"):
        decode_state(msgspec.msgpack.encode(before_the_index))
    for index, complaint in (
        ({"na": ["a1"]}, "lists 1 of the 2 closed windows held"),
        ({"na": ["a1", "a1"], "nb": ["b1"]}, "lists 'a1' twice"),
        ({"na": ["a1", "a2"], "nb": ["b1"]}, r"\['na'\] lists 'a2', which is not a closed"),
        ({"na": ["a1", "b1"]}, r"\['na'\] lists 'b1', which is not a closed"),
        ({"na": ["a1", "gone"], "nb": ["b1"]}, r"\['na'\] lists 'gone', which is not a closed"),
    ):
        with pytest.raises(ValidationError, match=complaint):
            decode_state(msgspec.msgpack.encode(dict(good, closed_windows_by_node=index)))
