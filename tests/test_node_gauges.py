"""NodeGauges: each node's latest gauges, unboxed by slot, checked against a dict model; and
the checks that keep a bad or old-layout state from being believed."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.shared import codec, node_marks
from cluster.shared.apply import apply
from cluster.shared.events import IndexedEvent, NodeGatheredInfo, NodeHeartbeat, NodeInfo
from cluster.shared.node_gauges import (
    GAUGE_COLUMN,
    GAUGES,
    NOT_REPORTED,
    AmountColumn,
    NodeGauges,
    gauges_row,
)
from cluster.shared.state import EMPTY_STATE, State

# Slots that cross leaf (32) and middle-list (1,024) boundaries.
slots = st.one_of(st.integers(0, 70), st.integers(1000, 1100))
reports = st.fixed_dictionaries(
    {},
    optional={
        "cpu_percent": st.floats(0.0, 100.0, allow_nan=False),
        "memory_available_mb": st.integers(0, 2**63 - 1),
        "disk_free_mb": st.integers(0, 2**63 - 1),
        "net_bytes_sent": st.integers(0, 2**63 - 1),
        "net_bytes_recv": st.integers(0, 2**63 - 1),
        "hostname": st.just("not a gauge"),
    },
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(slots, reports), max_size=30))
def test_every_version_keeps_its_gauges(program: list[tuple[int, dict[str, Any]]]) -> None:
    versions = [(NodeGauges(), dict[int, dict[str, Any]]())]
    for slot, report in program:
        table, model = versions[-1]
        model = {s: dict(g) for s, g in model.items()}
        gauges = {k: v for k, v in report.items() if k in GAUGES}
        if gauges:
            model.setdefault(slot, {}).update(gauges)
        new = (
            table.with_cells(*node_marks.address(slot)[:2], slot % 32, _cells(report))
            if gauges
            else table
        )
        versions.append((new, model))
    for table, model in versions:  # old versions are untouched by later writes
        for slot in {s for s, _ in program}:
            assert table.reported(slot) == model.get(slot, {})
        assert NodeGauges(table.rows()) == table  # the canonical rows rebuild it


def _cells(report: dict[str, Any]) -> list[tuple[int, Any]]:
    """What `info_update` hands `with_cells` for this report."""
    return [(GAUGE_COLUMN[name], value) for name, value in report.items() if name in GAUGE_COLUMN]


def _state_with(gauges: NodeGauges, nodes: int) -> State:
    state = EMPTY_STATE
    for i in range(nodes):
        node = f"n{i}"
        state = apply(state, IndexedEvent(i + 1, 1, node, 1, NodeHeartbeat(node_id=node)))
    return msgspec.structs.replace(state, node_gauges=gauges)


def _reported(state: State, node: str, info: NodeInfo) -> State:
    idx = state.last_applied + 1
    return apply(
        state,
        IndexedEvent(idx, idx, node, idx, NodeGatheredInfo(node_id=node, source="t", info=info)),
    )


def test_state_with_bad_gauges_does_not_decode() -> None:
    state = _reported(_state_with(NodeGauges(), 1), "n0", NodeInfo(cpu_percent=50.0))
    doc = codec.to_builtins(state)
    assert [list(row) for row in doc["node_gauges"]] == [[50.0] + [NOT_REPORTED] * 4]
    assert codec.decode_state(codec.encode_state(state)) == state
    for bad, message in (
        ([[100.5, -1, -1, -1, -1]], r"gauge cpu_percent of slot 0 is invalid: 100.5"),
        ([[float("nan"), -1, -1, -1, -1]], r"gauge cpu_percent of slot 0 is invalid: nan"),
        ([[-1, -2, -1, -1, -1]], r"gauge memory_available_mb of slot 0 is invalid: -2"),
        ([[-1, -1, -1, -1]], r"Expected `array` of length 5"),
        ([[-1] * 5, [0] * 5], r"node gauges hold 2 slots for 1 nodes"),
    ):
        doc["node_gauges"] = bad
        with pytest.raises(codec.ValidationError, match=message):
            codec.decode_state(msgspec.msgpack.encode(doc))


def test_a_record_holding_a_gauge_is_another_layout() -> None:
    # A snapshot from before the gauges moved holds them in the record's info: refused (the
    # snapshot is skipped and the log refolded), never read with the gauges silently lost.
    state = _reported(_state_with(NodeGauges(), 1), "n0", NodeInfo(hostname="h", disk_free_mb=9))
    doc = codec.to_builtins(state)
    assert doc["nodes"]["n0"]["info"] == {"hostname": "h"}
    doc["nodes"]["n0"]["info"]["disk_free_mb"] = 9
    del doc["node_gauges"]
    with pytest.raises(
        codec.ValidationError, match=r"node 'n0': info holds gauges \['disk_free_mb'\]"
    ):
        codec.decode_state(msgspec.msgpack.encode(doc))


def test_json_shows_gauges_by_node() -> None:
    state = _state_with(NodeGauges(), 2)
    state = _reported(state, "n1", NodeInfo(cpu_percent=12.5, net_bytes_sent=3))
    doc = json.loads(codec.state_to_json(state))
    assert doc["node_gauges"] == {"n0": {}, "n1": {"cpu_percent": 12.5, "net_bytes_sent": 3}}
    assert doc["nodes"]["n1"]["info"] == {}


def test_event_gauges_are_validated() -> None:
    # State stores gauges in int64 cells with -1 for "not reported": the event schema keeps
    # every reported value inside what a cell can hold, with a message naming the field.
    decode = msgspec.msgpack.Decoder(NodeInfo).decode
    for field, bad, message in (
        ("cpu_percent", 100.5, "Expected `float` <= 100.0"),
        ("cpu_percent", float("nan"), "Expected `float` >= 0.0"),
        ("memory_available_mb", -1, "Expected `int` >= 0"),
        ("net_bytes_recv", 2**63, "Expected `int` <= 9223372036854775807"),
    ):
        with pytest.raises(msgspec.ValidationError, match=rf"{message} - at `\$.{field}`"):
            decode(msgspec.msgpack.encode({field: bad}))


def test_a_records_marks_address_finds_its_gauges() -> None:
    # info_update finds a node's gauges from the marks address its record carries: the
    # columns are laid out like the marks, one cell per slot.
    for slot in [*range(0, 80), *range(1000, 1100), 262_143, 300_001]:
        mid, leaf, offset = node_marks.address(slot)
        assert AmountColumn.address(slot) == (mid, leaf, gauges_row(offset))
        assert AmountColumn.slot_at(mid, leaf, gauges_row(offset)) == slot


def test_canonical_rows_do_not_depend_on_allocated_leaves() -> None:
    # The same gauges, one table grown slot by slot, one built from rows: equal, and equal
    # bytes (cpu_percent is a float in every row, reported or not, allocated or not).
    grown = NodeGauges().with_cells(1, 3, 4, [(1, 7)])  # slot 1,124: a second middle list
    built = NodeGauges([(-1.0, -1, -1, -1, -1)] * 1124 + [(-1.0, 7, -1, -1, -1)])
    assert grown == built and grown.rows() == built.rows()
    assert codec.to_builtins(grown) == codec.to_builtins(built)
    assert all(type(row[0]) is float for row in grown.rows())
