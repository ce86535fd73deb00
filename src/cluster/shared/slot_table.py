"""SlotTable: an immutable table of int64 rows by node slot, updated by copying one leaf.

What changes on nearly every event -- each node's marks (node_marks.py) and its gauges
(node_gauges.py) -- is kept here rather than in the node records of an `immutables.Map`:
replacing a value in a hash-mapped trie copies a node of ~10-30 (key, value) object pointers
and touches the reference count of every one, and at 10,000 nodes those objects are spread
over more memory than a core's L2 cache holds, so each write paid ~20 cache misses it did not
pay at 1,000 nodes (bench/apply_cost.py).

Here a row is `WIDTH` plain 64-bit numbers, addressed by the node's *slot* (`NodeRecord.slot`:
its number in join order, dense and the same on every node that folds the same log), stored in
`array` leaves of 32 rows under a persistent two-level trie of Python lists: a root list of
middle lists of 1,024 slots each. Replacing a row copies one leaf (no reference
counts: the values are not objects), one middle list and the short root list: the same cost at
10 or 10,000 nodes, and up to about 64,000 nodes, where the root list reaches 64 entries (its
copy grows by a pointer per 1,024).

Lists, not tuples, because a list copy plus an item assignment is the cheapest copy in CPython;
a published list or leaf is never mutated (only fresh copies are written before they are
returned), so a table is immutable to anyone holding it, across threads.

A slot never written reads as a row of `FILL`. Equality, hashing and the canonical form
(`rows()`) ignore unused capacity: two tables holding the same rows are equal however they
were built.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Final, Self, TypeAlias

#: Rows per leaf and leaves per middle list, the same in every table, so that a slot's
#: (middle list, leaf) is the same in all of them and the address a node record carries for
#: its marks finds its gauges too. 32 rows of the marks' two int64 are 512 bytes, the largest
#: block CPython's small-object allocator serves (a larger leaf copy costs a malloc).
LEAF_SHIFT: Final = 5
LEAF_SLOTS: Final = 1 << LEAF_SHIFT
_LEAF_MASK: Final = LEAF_SLOTS - 1
MID_SHIFT: Final = 10
MID_LEAVES: Final = 1 << (MID_SHIFT - LEAF_SHIFT)
_MID_MASK: Final = MID_LEAVES - 1

Leaf: TypeAlias = "array[Any]"  # array of WIDTH cells per row, of the table's TYPECODE
_Mid: TypeAlias = "list[Leaf]"
#: A table's whole trie: the root list of middle lists.
LeafRoot: TypeAlias = "list[_Mid]"


class SlotTable:
    """Immutable map slot -> row of `WIDTH` cells; see the module doc. Subclasses set
    `WIDTH`, `FILL` (what an unwritten cell reads as) and `TYPECODE`, and give the rows their
    meaning."""

    __slots__ = ("_root",)
    WIDTH: ClassVar[int]
    FILL: ClassVar[int]
    #: The array's type code: "q" (int64), "Q" (uint64) for a table of non-negative values --
    #: CPython converts an int for a "Q" array directly, for a "q" array through its argument
    #: parser: ~150 fewer machine instructions per cell written -- or "d" (double).
    TYPECODE: ClassVar[str] = "q"
    _empty_leaf: ClassVar[Leaf]
    _root: list[_Mid]

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        if "WIDTH" in cls.__dict__:
            cls._empty_leaf = array(cls.TYPECODE, [cls.FILL] * (cls.WIDTH * LEAF_SLOTS))

    def __init__(self, rows: Iterable[Sequence[float]] = ()) -> None:
        """A table holding `rows` for slots 0, 1, ...; each row is checked (`check_row`)."""
        root: list[_Mid] = []
        width = self.WIDTH
        for slot, row in enumerate(rows):
            self.check_row(slot, row)
            if len(row) != width:
                raise ValueError(f"row of slot {slot} has {len(row)} values, not {width}")
            base = (slot & _LEAF_MASK) * width
            self._ensure_leaf(root, slot)[base : base + width] = array(self.TYPECODE, row)
        self._root = root

    @classmethod
    def check_row(cls, slot: int, row: Sequence[float]) -> None:
        """Raise ValueError if `row` is not a valid row of this table (subclasses say what is)."""

    @classmethod
    def address(cls, slot: int) -> tuple[int, int, int]:
        """(middle list, leaf in it, offset of the row's first cell in the leaf) of `slot`. Its
        parts are below 257, CPython's cached small integers, for the first 262,144 slots
        (leaf and offset always are): a record can carry them, and an update then reads no
        slot number, which above 256 is an object of its own, cold at 10,000 nodes."""
        return (
            slot >> MID_SHIFT,
            (slot >> LEAF_SHIFT) & _MID_MASK,
            (slot & _LEAF_MASK) * cls.WIDTH,
        )

    @classmethod
    def slot_at(cls, mid: int, leaf: int, offset: int) -> int:
        """The slot at this address (the inverse of `address`)."""
        return (mid << MID_SHIFT) | (leaf << LEAF_SHIFT) | (offset // cls.WIDTH)

    def row(self, slot: int) -> tuple[int, ...]:
        """The row of `slot` (all `FILL` if never written)."""
        mid, leaf, offset = self.address(slot)
        try:
            cells = self._root[mid][leaf]
        except IndexError:
            return (self.FILL,) * self.WIDTH
        return tuple(cells[offset : offset + self.WIDTH])

    def with_rows(self, updates: Iterable[tuple[int, int, int]]) -> Self:
        """This table with each (slot, column, value) written in order; each leaf touched is
        copied once (a batch's worth of updates), and leaves are allocated as needed."""
        # Every middle list is copied up front: a pointer per leaf, once per batch.
        root = [mid.copy() for mid in self._root]
        copied: set[int] = set()  # leaf numbers (slot >> LEAF_SHIFT) already private to `root`
        width = self.WIDTH
        for slot, column, value in updates:
            if slot >> LEAF_SHIFT in copied:
                leaf = root[slot >> MID_SHIFT][(slot >> LEAF_SHIFT) & _MID_MASK]
            else:
                leaf = self._ensure_leaf(root, slot)[:]
                root[slot >> MID_SHIFT][(slot >> LEAF_SHIFT) & _MID_MASK] = leaf
                copied.add(slot >> LEAF_SHIFT)
            leaf[(slot & _LEAF_MASK) * width + column] = value
        return self.of_root(root)

    @classmethod
    def of_root(cls, root: LeafRoot) -> Self:
        """A table over this trie (which must never be written again): how a holder of several
        tries (node_gauges) reads one through the table's methods."""
        new = object.__new__(cls)
        new._root = root
        return new

    def rows(self) -> list[tuple[int, ...]]:
        """The rows of slots 0, 1, ... up to the last slot with a written (non-FILL) row: the
        canonical form."""
        width = self.WIDTH
        flat: list[int] = []
        for m, mid in enumerate(self._root):
            # A middle list holds leaves only up to the highest slot set in it: pad the rest.
            flat.extend([self.FILL] * ((m << MID_SHIFT) * width - len(flat)))
            for leaf in mid:
                flat.extend(leaf)
        end = len(flat)
        empty = [self.FILL] * width
        while end and flat[end - width : end] == empty:
            end -= width
        return [tuple(flat[i : i + width]) for i in range(0, end, width)]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SlotTable) or other.WIDTH != self.WIDTH:
            return NotImplemented
        return self is other or (other.FILL == self.FILL and self.rows() == other.rows())

    def __hash__(self) -> int:
        return hash(tuple(self.rows()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.rows()!r})"

    @classmethod
    def _ensure_leaf(cls, root: list[_Mid], slot: int) -> Leaf:
        """The leaf of `slot`, appending empty lists and leaves to `root` (and to the list of
        `slot`) up to it. Whatever it appends to must be private to the caller: `root` itself,
        and the list of `slot` if that exists already."""
        m = slot >> MID_SHIFT
        while len(root) <= m:
            root.append([])
        mid = root[m]
        i = (slot >> LEAF_SHIFT) & _MID_MASK
        while len(mid) <= i:
            mid.append(cls._empty_leaf[:])
        return mid[i]
