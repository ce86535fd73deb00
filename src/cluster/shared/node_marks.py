"""NodeMarks: every node's last event index and sequence number, by node slot, unboxed.

Every node-originated event advances its node's marks (DESIGN rule 6), so this is the one
piece of State that every event replaces. In a hash-mapped trie (`immutables.Map`) that
replacement copies a leaf of ~10-30 (key, value) object pointers and touches the reference
count of every one of them; at 10,000 nodes those objects are scattered over more memory
than a core's L2 cache holds, so each event paid ~20 cache misses that it did not pay at
1,000 nodes (bench/apply_bench.py: heartbeat ~0.9 us at 1,000 nodes, ~1.4-1.9 us at 10,000).

Here the marks are plain 64-bit integers in `array('q')` leaves, addressed by the node's
*slot* (`NodeRecord.slot`: its number in join order, so slots are dense and the same on
every node that folds the same log). A persistent two-level trie of Python lists over those
leaves gives copy-on-write updates: replacing one node's marks copies one 512-byte leaf
(no reference counts: the values are not objects), one list of at most 32 leaves and the
short root list. That costs the same at 10 or 10,000 nodes, and up to about 64,000 nodes,
where the root list reaches 64 entries (its copy grows by a pointer per 1,024 nodes).

Counted with cachegrind (bench/apply_cost.py), an update is ~4,000 machine instructions,
most of them the interpreter's. Two cheap-looking steps were not cheap and are gone:
computing a slot's path (five integer operations CPython 3.11 does not specialize: ~700
instructions) -- `apply` passes the address each node record carries instead (`set_at`) --
and `object.__new__` for the new version (`_Made` is made by object's C initializer, ~300
fewer). Measured and dropped: a chain of pending updates flushed into the leaves every 32
events (no fewer instructions in order, more at random); leaves of Python ints (cheaper
writes, but a copy touches 64 cold objects); a shared table of paths by slot (fewer
instructions, but two more cold objects per event at 10,000 nodes: the slot and its path).

Lists, not tuples, because a list copy plus an item assignment is the cheapest copy in
CPython; a published list or leaf is never mutated (only fresh copies are written before
they are returned), so a `NodeMarks` is immutable to anyone holding it, across threads.

A slot that never received marks reads (0, 0): event indices start at 1, so an index of 0
means "no event yet". Equality, hashing and the canonical encoding (`pairs()`) ignore
unused capacity: two NodeMarks holding the same marks are equal however they were built.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from typing import Final, NamedTuple, TypeAlias

#: Slots per leaf; a leaf holds (index, seq) interleaved: 2 * 32 int64 = 512 bytes, the
#: largest block CPython's small-object allocator serves (a larger copy costs a malloc).
LEAF_SLOTS: Final = 32
_LEAF_SHIFT: Final = 5
_LEAF_MASK: Final = LEAF_SLOTS - 1
#: Leaves per middle list.
MID_LEAVES: Final = 32
_MID_SHIFT: Final = _LEAF_SHIFT + 5
_EMPTY_LEAF: Final[array[int]] = array("q", bytes(16 * LEAF_SLOTS))

_Leaf: TypeAlias = "array[int]"  # array('q') of 2 * LEAF_SLOTS int64
_Mid: TypeAlias = "list[_Leaf]"


class MarksAddress(NamedTuple):
    """Where a slot's marks live: middle list, leaf in it, offset of the index in the leaf."""

    mid: int
    leaf: int
    offset: int


def address(slot: int) -> MarksAddress:
    """The address of `slot`'s marks. Its parts are below 257, CPython's cached small
    integers, for the first 262,144 slots (offset and leaf always are; see `set_at`)."""
    return MarksAddress(slot >> _MID_SHIFT, (slot >> _LEAF_SHIFT) & 31, (slot & _LEAF_MASK) << 1)


def slot_at(mid: int, leaf: int, offset: int) -> int:
    """The slot whose marks live at this address (the inverse of `address`)."""
    return (mid << _MID_SHIFT) | (leaf << _LEAF_SHIFT) | (offset >> 1)


class NodeMarks:
    """Immutable map slot -> (last event index, last sequence number); see the module doc."""

    __slots__ = ("_root",)
    _root: list[_Mid]

    def __init__(self, pairs: Iterable[tuple[int, int]] = ()) -> None:
        """Marks for slots 0, 1, ... from (index, seq) pairs."""
        root: list[_Mid] = []
        for slot, (idx, seq) in enumerate(pairs):
            if idx < 0 or seq < 0:
                raise ValueError(f"marks of slot {slot} are negative: ({idx}, {seq})")
            leaf = _ensure_leaf(root, slot)
            offset = (slot & _LEAF_MASK) << 1
            leaf[offset] = idx
            leaf[offset + 1] = seq
        self._root = root

    def get(self, slot: int) -> tuple[int, int]:
        """(last event index, last seq) of `slot`; (0, 0) if it has none."""
        try:
            leaf = self._root[slot >> _MID_SHIFT][(slot >> _LEAF_SHIFT) & 31]
        except IndexError:
            return (0, 0)
        offset = (slot & _LEAF_MASK) << 1
        return (leaf[offset], leaf[offset + 1])

    def index(self, slot: int) -> int:
        """Last event index of `slot`; 0 if it has none."""
        try:
            leaf = self._root[slot >> _MID_SHIFT][(slot >> _LEAF_SHIFT) & 31]
        except IndexError:
            return 0
        index: int = leaf[(slot & _LEAF_MASK) << 1]
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
        # Every middle list is copied up front: a pointer per 32 nodes, once per batch.
        root = [mid.copy() for mid in self._root]
        copied: set[int] = set()  # leaf numbers (slot >> 5) already private to `root`
        for slot, idx, seq in marks:
            if slot >> _LEAF_SHIFT in copied:
                leaf = root[slot >> _MID_SHIFT][(slot >> _LEAF_SHIFT) & 31]
            else:
                leaf = _ensure_leaf(root, slot)[:]
                root[slot >> _MID_SHIFT][(slot >> _LEAF_SHIFT) & 31] = leaf
                copied.add(slot >> _LEAF_SHIFT)
            offset = (slot & _LEAF_MASK) << 1
            leaf[offset] = idx
            leaf[offset + 1] = seq
        new: NodeMarks = _Made()
        new._root = root
        return new

    def pairs(self) -> list[tuple[int, int]]:
        """(index, seq) of slots 0, 1, ... up to the last slot with marks: the canonical form."""
        flat: list[int] = []
        for m, mid in enumerate(self._root):
            # A middle list holds leaves only up to the highest slot set in it: pad the rest.
            flat.extend([0] * (m * 2 * MID_LEAVES * LEAF_SLOTS - len(flat)))
            for leaf in mid:
                flat.extend(leaf)
        end = len(flat)
        while end and flat[end - 2] == 0 and flat[end - 1] == 0:
            end -= 2
        return list(zip(flat[0:end:2], flat[1:end:2], strict=True))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NodeMarks):
            return NotImplemented
        return self is other or self.pairs() == other.pairs()

    def __hash__(self) -> int:
        return hash(tuple(self.pairs()))

    def __repr__(self) -> str:
        return f"NodeMarks({self.pairs()!r})"


class _Made(NodeMarks):
    """A NodeMarks that `set` or `set_many` made and fills in itself: created by object's
    initializer in C instead of a Python `__init__` or `object.__new__` call (about 300
    fewer machine instructions on every event). Behaves as a NodeMarks in every way."""

    __slots__ = ()
    __init__ = object.__init__


def _ensure_leaf(root: list[_Mid], slot: int) -> _Leaf:
    """The leaf of `slot`, appending empty lists and leaves to `root` (and to the list of
    `slot`) up to it. Whatever it appends to must be private to the caller: `root` itself,
    and the list of `slot` if that exists already."""
    m = slot >> _MID_SHIFT
    while len(root) <= m:
        root.append([])
    mid = root[m]
    i = (slot >> _LEAF_SHIFT) & 31
    while len(mid) <= i:
        mid.append(_EMPTY_LEAF[:])
    return mid[i]
