"""NodeMarks: a persistent slot -> (index, seq) vector, checked against a dict model."""

from __future__ import annotations

import copy
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.shared import codec, node_marks
from cluster.shared.apply import apply
from cluster.shared.events import IndexedEvent, NodeHeartbeat
from cluster.shared.node_marks import LEAF_SLOTS, MID_LEAVES, NodeMarks, address
from cluster.shared.state import EMPTY_STATE

# Slots that cross leaf (32) and middle-list (1,024) boundaries, and a far one.
slots = st.one_of(st.integers(0, 70), st.integers(1000, 1100), st.integers(0, 5000))
marks = st.tuples(st.integers(1, 2**62), st.integers(1, 2**62))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("set"), slots, marks),
        st.tuples(st.just("many"), st.lists(st.tuples(slots, marks), max_size=20)),
    ),
    max_size=40,
)


def _expected(model: dict[int, tuple[int, int]]) -> list[tuple[int, int]]:
    end = max(model, default=-1) + 1
    return [model.get(slot, (0, 0)) for slot in range(end)]


@settings(max_examples=150, deadline=None)
@given(ops)
def test_every_version_keeps_its_marks(program: list[tuple[object, ...]]) -> None:
    versions = [(NodeMarks(), dict[int, tuple[int, int]]())]
    for op in program:
        current, model = versions[-1]
        model = dict(model)
        if op[0] == "set":
            _, slot, pair = op
            assert isinstance(slot, int) and isinstance(pair, tuple)
            idx, seq = pair
            assert isinstance(idx, int) and isinstance(seq, int)
            new = current.set(slot, idx, seq)
            model[slot] = (idx, seq)
        else:
            batch = op[1]
            assert isinstance(batch, list)
            new = current.set_many((slot, idx, seq) for slot, (idx, seq) in batch)
            for slot, pair in batch:
                model[slot] = pair
        versions.append((new, model))
    # Older versions are untouched by every later update (copy-on-write, never in place).
    for version, model in versions:
        assert version.pairs() == _expected(model)
        for slot in [*model, 0, 31, 32, 1023, 1024, 6000]:
            assert version.get(slot) == model.get(slot, (0, 0))
            assert version.index(slot) == model.get(slot, (0, 0))[0]
        # Built from its pairs, it is equal (capacity aside) and encodes the same.
        rebuilt = NodeMarks(version.pairs())
        assert rebuilt == version and hash(rebuilt) == hash(version)


def test_addresses_agree_with_the_layout() -> None:
    # `apply` writes marks by the address a node record carries (`set_at`), other code by
    # slot (`set`): both must reach the same place, whatever boundaries the slot crosses.
    assert (LEAF_SLOTS, MID_LEAVES) == (32, 32)
    m = NodeMarks().set(1024 + 32 + 5, 7, 8)
    assert m.get(1061) == (7, 8) and m.pairs()[1061] == (7, 8) and len(m.pairs()) == 1062
    for slot in (0, 1, 31, 32, 1023, 1024, 1061, 5 * 1024 + 77, 262_143):
        where = node_marks.address(slot)
        assert where == (slot // 1024, slot // 32 % 32, slot % 32 * 2)
        assert node_marks.slot_at(*where) == slot
        assert NodeMarks().set_at(*where, 9, 4) == NodeMarks().set(slot, 9, 4)
        assert NodeMarks().set_at(*where, 9, 4).get(slot) == (9, 4)
    # Within the first 262,144 slots every part is one of CPython's cached small integers.
    assert all(part <= 256 for part in node_marks.address(262_143))


def test_apply_keeps_marks_where_the_record_says() -> None:
    state = EMPTY_STATE
    for i in range(1, 1100):  # a second middle list
        node = f"n{i}"
        state = apply(state, IndexedEvent(i, i, node, 1, NodeHeartbeat(node_id=node)))
    rec = state.nodes["n1099"]
    assert rec.slot == 1098
    assert (rec.marks_mid, rec.marks_leaf, rec.marks_offset) == node_marks.address(1098)
    assert state.last_event_index("n1099") == 1099 and state.last_seq("n1099") == 1


def test_equal_marks_are_equal_however_built() -> None:
    grown = NodeMarks().set(40, 3, 1).set(40, 5, 2)
    assert grown == NodeMarks([(0, 0)] * 40 + [(5, 2)])
    assert grown != NodeMarks([(0, 0)] * 40 + [(5, 3)])
    assert NodeMarks().set(3000, 1, 1).set(3000, 0, 0) == NodeMarks()  # no marks at all


def test_negative_marks_are_refused() -> None:
    with pytest.raises(ValueError, match=r"marks of slot 1 are negative: \(-1, 2\)"):
        NodeMarks([(1, 1), (-1, 2)])


def test_state_with_bad_marks_does_not_decode() -> None:
    state = apply(EMPTY_STATE, IndexedEvent(1, 5, "n1", 1, NodeHeartbeat(node_id="n1")))
    doc = codec.to_builtins(state)
    assert [list(pair) for pair in doc["last_event_by_node"]] == [[1, 1]]
    assert codec.decode_state(codec.encode_state(state)) == state
    for bad, message in (
        (
            [[-4, 1]],
            r"bad node marks \(Expected `int` >= 0 - at `\$\[0\]\[0\]`\)"
            r" - at `\$.last_event_by_node`",
        ),
        ([[1, 2**63]], r"Expected `int` <= 9223372036854775807"),
        ([[1, "x"]], "Expected `int`"),
        ({"n1": [1, 1]}, "Expected `array`"),
    ):
        doc["last_event_by_node"] = bad
        with pytest.raises(codec.ValidationError, match=message):
            codec.decode_state(msgspec.msgpack.encode(doc))


def test_record_with_a_wrong_marks_address_does_not_decode() -> None:
    # The address is derived from the slot: a state where they disagree (a damaged or forged
    # snapshot or catch-up state) would put the node's marks in another node's place.
    state = apply(EMPTY_STATE, IndexedEvent(1, 5, "n1", 1, NodeHeartbeat(node_id="n1")))
    doc = codec.to_builtins(state)
    assert doc["nodes"]["n1"]["marks_offset"] == 0
    doc["nodes"]["n1"]["marks_offset"] = 2
    with pytest.raises(
        codec.ValidationError,
        match=r"node 'n1': marks address \(0, 0, 2\) does not match slot 0 "
        r"\(expected \(0, 0, 0\)\)",
    ):
        codec.decode_state(msgspec.msgpack.encode(doc))
    del doc["nodes"]["n1"]["marks_offset"]  # a record from before format 5
    with pytest.raises(codec.ValidationError, match="missing required field `marks_offset`"):
        codec.decode_state(msgspec.msgpack.encode(doc))


def test_state_whose_slots_or_keys_disagree_does_not_decode() -> None:
    # Slots number the nodes 0..n-1 in join order and each record is filed under its own id:
    # a damaged or forged snapshot that breaks either would mix two nodes' marks and gauges.
    state = EMPTY_STATE
    for i, node in enumerate(("n1", "n2", "n3"), start=1):
        state = apply(state, IndexedEvent(i, 5, node, 1, NodeHeartbeat(node_id=node)))
    good = codec.to_builtins(state)
    assert [good["nodes"][n]["slot"] for n in ("n1", "n2", "n3")] == [0, 1, 2]
    assert codec.decode_state(msgspec.msgpack.encode(good)) == state

    def with_slot(node: str, slot: int) -> dict[str, Any]:
        doc: dict[str, Any] = copy.deepcopy(good)
        mid, leaf, offset = address(slot)
        doc["nodes"][node].update(slot=slot, marks_mid=mid, marks_leaf=leaf, marks_offset=offset)
        return doc

    for doc, message in (
        (with_slot("n3", 1), r"nodes 'n2' and 'n3' both hold slot 1"),
        (with_slot("n3", 3), r"node 'n3': slot 3 is outside 0\.\.2 \(slots number the 3 nodes"),
        (with_slot("n1", -1), r"node 'n1': slot -1 is outside 0\.\.2"),
    ):
        with pytest.raises(codec.ValidationError, match=message):
            codec.decode_state(msgspec.msgpack.encode(doc))
    misfiled = copy.deepcopy(good)
    misfiled["nodes"]["n2"]["node_id"] = "n9"
    with pytest.raises(codec.ValidationError, match=r"nodes\['n2'\] holds the record of 'n9'"):
        codec.decode_state(msgspec.msgpack.encode(misfiled))
