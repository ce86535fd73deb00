"""NodeMarks: every node's last event index and sequence number, by node slot, unboxed.

Every node-originated event advances its node's marks (DESIGN rule 6), so this is the one
piece of State that every event replaces: a `SlotTable` (slot_table.py, which says why a
table of unboxed rows rather than a hash-mapped trie of records) with rows of two values,
(index, seq), interleaved in 512-byte leaves.

Counted with cachegrind (bench/apply_cost.py), an update is ~4,000 machine instructions,
most of them the interpreter's. Two cheap-looking steps were not cheap and are gone:
computing a slot's path (five integer operations CPython 3.11 does not specialize: ~700
instructions) -- `apply` passes the address each node record carries instead (`set_at`) --
and `object.__new__` for the new version (`_Made` is made by object's C initializer, ~300
fewer). Measured and dropped: a chain of pending updates flushed into the leaves every 32
events (no fewer instructions in order, more at random); leaves of Python ints (cheaper
writes, but a copy touches 64 cold objects); a shared table of paths by slot (fewer
instructions, but two more cold objects per event at 10,000 nodes: the slot and its path).

A slot that never received marks reads (0, 0): event indices start at 1, so an index of 0
means "no event yet".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import ClassVar, NamedTuple

from cluster.shared.slot_table import LEAF_SHIFT, LEAF_SLOTS, MID_LEAVES, MID_SHIFT, SlotTable

__all__ = ["LEAF_SLOTS", "MID_LEAVES", "MarksAddress", "NodeMarks", "address", "slot_at"]


class MarksAddress(NamedTuple):
    """Where a slot's marks live: middle list, leaf in it, offset of the index in the leaf."""

    mid: int
    leaf: int
    offset: int


def address(slot: int) -> MarksAddress:
    """The address of `slot`'s marks (see `SlotTable.address`): what each NodeRecord carries."""
    return MarksAddress(*NodeMarks.address(slot))


def slot_at(mid: int, leaf: int, offset: int) -> int:
    """The slot whose marks live at this address (the inverse of `address`)."""
    return NodeMarks.slot_at(mid, leaf, offset)


class NodeMarks(SlotTable):
    """Immutable map slot -> (last event index, last sequence number); see the module doc."""

    __slots__ = ()
    WIDTH: ClassVar[int] = 2
    FILL: ClassVar[int] = 0
    TYPECODE: ClassVar[str] = "Q"  # marks are never negative: the cheaper write (2 per event)

    def __init__(self, pairs: Iterable[tuple[int, int]] = ()) -> None:
        """Marks for slots 0, 1, ... from (index, seq) pairs."""
        super().__init__(pairs)

    @classmethod
    def check_row(cls, slot: int, row: Sequence[float]) -> None:
        if any(v < 0 for v in row):
            raise ValueError(f"marks of slot {slot} are negative: {tuple(row)}")

    def get(self, slot: int) -> tuple[int, int]:
        """(last event index, last seq) of `slot`; (0, 0) if it has none."""
        idx, seq = self.row(slot)
        return (idx, seq)

    def index(self, slot: int) -> int:
        """Last event index of `slot`; 0 if it has none. Written out (the liveness check asks
        it of every node every cycle)."""
        try:
            leaf = self._root[slot >> MID_SHIFT][(slot >> LEAF_SHIFT) & (MID_LEAVES - 1)]
        except IndexError:
            return 0
        index: int = leaf[(slot & (LEAF_SLOTS - 1)) << 1]
        return index

    def set(self, slot: int, idx: int, seq: int) -> NodeMarks:
        """These marks with `slot`'s replaced: copies one leaf and the lists above it."""
        mid, leaf, offset = address(slot)
        return self.set_at(mid, leaf, offset, idx, seq)

    def set_at(self, mid: int, leaf: int, offset: int, idx: int, seq: int) -> NodeMarks:
        """`set` for the slot at this `address`: what `apply` calls on every node event,
        with the address a node's record carries (`NodeRecord.marks_mid` ...), so it reads
        no slot number: three small integers are shared objects always in cache, where a
        slot above 256 is an object of its own, cold at 10,000 nodes (bench/apply_cost.py:
        ~2 L2 misses per event fewer at 10,000 nodes, the same instructions)."""
        try:
            root = self._root.copy()
            root[mid] = mids = root[mid].copy()
            mids[leaf] = values = mids[leaf][:]
        except IndexError:  # past the leaves allocated so far: once per 32 nodes that join
            return self.set_many(((slot_at(mid, leaf, offset), idx, seq),))
        values[offset] = idx
        values[offset + 1] = seq
        new: NodeMarks = _Made()
        new._root = root
        return new

    def set_many(self, marks: Iterable[tuple[int, int, int]]) -> NodeMarks:
        """These marks with each (slot, idx, seq) applied in order; each touched leaf is
        copied once (a batch's worth of events: see `apply.fold`)."""
        return self.with_rows(
            cell for slot, idx, seq in marks for cell in ((slot, 0, idx), (slot, 1, seq))
        )

    def pairs(self) -> list[tuple[int, int]]:
        """(index, seq) of slots 0, 1, ... up to the last slot with marks: the canonical form."""
        return [(idx, seq) for idx, seq in self.rows()]


class _Made(NodeMarks):
    """A NodeMarks that `set_at` made and fills in itself: created by object's initializer in
    C instead of a Python `__init__` or `object.__new__` call (about 300 fewer machine
    instructions on every event). Behaves as a NodeMarks in every way."""

    __slots__ = ()
    __init__ = object.__init__
