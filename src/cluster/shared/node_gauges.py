"""NodeGauges: each node's latest gauges -- CPU %, available memory, free disk, network
counters -- by node slot, unboxed.

The gauges are what a worker's info sources report every cycle (worker/info.py): after
heartbeats, the commonest change an event makes. Kept in the node's record they cost a new
NodeInfo, a new NodeRecord and a write to the 10,000-key nodes map per report: ~26 L2 misses
per report at 10,000 nodes against ~1 at 1,000 (bench/apply_cost.py --by-kind), the largest
share of what made `apply` slower as the cluster grew. Here each gauge is a column of its own,
a `SlotTable` (slot_table.py says why its update costs the same at any size): a report copies
one 256-byte leaf per gauge it names and leaves the record and the map alone.

A node's whole picture is `State.node_info(node_id)`: the NodeInfo in its record (hostname,
totals, GPUs, slots: what rarely changes) with its gauges laid over it. A record's NodeInfo
never holds a gauge (the reducers split every report; `codec.decode_state` checks).

Each gauge is one cell, a double for `cpu_percent` and an int64 for the others; -1 means "not
reported yet" (NodeInfo refuses negative gauges).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Final

import msgspec

from cluster.shared.events import NodeInfo
from cluster.shared.slot_table import LeafRoot, SlotTable

#: The gauges, in column order. Every other NodeInfo field stays in the node's record.
GAUGES: Final = (
    "cpu_percent",
    "memory_available_mb",
    "disk_free_mb",
    "net_bytes_sent",
    "net_bytes_recv",
)
#: Gauge name -> its column.
GAUGE_COLUMN: Final = {name: column for column, name in enumerate(GAUGES)}
WIDTH: Final = len(GAUGES)
#: What a cell holds until its node reports that gauge (-1.0 in the cpu_percent column).
NOT_REPORTED: Final = -1
_INT64_MAX: Final = 2**63 - 1


class PercentColumn(SlotTable):
    """cpu_percent of every node by slot, as doubles."""

    __slots__ = ()
    WIDTH: ClassVar[int] = 1
    FILL: ClassVar[int] = NOT_REPORTED
    TYPECODE: ClassVar[str] = "d"


class AmountColumn(SlotTable):
    """One integer gauge of every node by slot, as int64."""

    __slots__ = ()
    WIDTH: ClassVar[int] = 1
    FILL: ClassVar[int] = NOT_REPORTED


#: The table type of each column.
COLUMN_TYPES: Final[tuple[type[SlotTable], ...]] = (PercentColumn,) + (AmountColumn,) * (WIDTH - 1)


def _check_cell(slot: int, column: int, cell: float) -> None:
    if cell == NOT_REPORTED:
        return
    top = 100 if column == 0 else _INT64_MAX
    if not 0 <= cell <= top or (column > 0 and not isinstance(cell, int)):
        raise ValueError(f"gauge {GAUGES[column]} of slot {slot} is invalid: {cell!r}")


class NodeGauges:
    """Immutable map slot -> its node's gauges (`GAUGES`); see the module doc.

    One column per gauge, each laid out like the marks -- 32 slots per leaf (256 bytes), so a
    node's cells are at its marks' middle list and leaf, at its row there (`marks_offset >> 1`)
    -- and the five column tries held side by side, so a report writes only the columns it
    names and makes one new object. Measured (bench/apply_cost.py at 10,000 nodes, per event of
    apply_bench's mix; this layout: 12,400 instructions and 13.6 L2 misses) and dropped: rows
    of all five gauges, 32 per leaf (1,280-byte leaves: a malloc and 20 cache lines per copy
    where a column's leaf takes 4, and the double stored as its bit pattern: 12,550 and 14.6),
    leaves of 8 such rows (15.1 misses: a middle list of 128 leaves increfs every one on each
    copy), and a table object per column (+150 instructions: a report made 1 + k objects)."""

    __slots__ = ("_roots",)
    _roots: tuple[LeafRoot, ...]

    def __init__(self, rows: Iterable[Sequence[float]] = ()) -> None:
        """Gauges for slots 0, 1, ... from rows of cells (the canonical form, `rows()`), each
        checked: NOT_REPORTED or a valid value in every cell -- what a snapshot from disk or
        a peer must hold before it is believed."""
        table = [tuple(row) for row in rows]
        for slot, row in enumerate(table):
            if len(row) != WIDTH:
                raise ValueError(f"gauges of slot {slot} are {len(row)} values, not {WIDTH}")
            for column, cell in enumerate(row):
                _check_cell(slot, column, cell)
        self._roots = tuple(
            kind([(row[column],) for row in table])._root
            for column, kind in enumerate(COLUMN_TYPES)
        )

    def _column(self, column: int) -> SlotTable:
        return COLUMN_TYPES[column].of_root(self._roots[column])

    def with_cells(self, mid: int, leaf: int, row: int, cells: list[tuple[int, Any]]) -> NodeGauges:
        """These gauges with (column, value) pairs written for the slot at (`mid`, `leaf`,
        `row`): its marks' middle list and leaf, and its row in that leaf (`gauges_row`).
        Called on every info report, so each column's path copy is written out here, as in
        `NodeMarks.set_at`."""
        roots = list(self._roots)
        for column, value in cells:
            try:
                root = roots[column].copy()
                root[mid] = mids = root[mid].copy()
                mids[leaf] = values = mids[leaf][:]
            except IndexError:  # the slot's leaf is not allocated yet: once per 32 nodes
                slot = COLUMN_TYPES[column].slot_at(mid, leaf, row)
                roots[column] = self._column(column).with_rows(((slot, 0, value),))._root
                continue
            values[row] = value
            roots[column] = root
        new: NodeGauges = _Made()
        new._roots = tuple(roots)
        return new

    def cleared(self, slot: int) -> NodeGauges:
        """These gauges with every cell of `slot` NOT_REPORTED again (self when it reported
        none): a removed node taking back its slot starts with no readings."""
        if all(cell == NOT_REPORTED for cell in self.row(slot)):
            return self
        new: NodeGauges = _Made()
        new._roots = tuple(
            self._column(column).with_rows(((slot, 0, NOT_REPORTED),))._root
            for column in range(WIDTH)
        )
        return new

    def row(self, slot: int) -> tuple[float, ...]:
        """The cells of `slot` (NOT_REPORTED where it has not reported that gauge)."""
        cpu, *amounts = (self._column(column).row(slot)[0] for column in range(WIDTH))
        return (float(cpu), *amounts)  # a float even where its column was never allocated

    def rows(self) -> list[tuple[float, ...]]:
        """The rows of slots 0, 1, ... up to the last slot with a reported gauge: the
        canonical form."""
        columns: list[list[float]] = [
            [cell for (cell,) in self._column(c).rows()] for c in range(WIDTH)
        ]
        end = max(len(cells) for cells in columns)
        for cells in columns:
            cells.extend([NOT_REPORTED] * (end - len(cells)))
        # The cpu_percent cells as floats throughout (padding is the int -1): the canonical
        # bytes must not depend on which leaves happen to be allocated.
        columns[0] = [float(cell) for cell in columns[0]]
        return list(zip(*columns, strict=True))

    def reported(self, slot: int) -> dict[str, float | int]:
        """The gauges `slot`'s node has reported, by name."""
        return {
            GAUGES[column]: cell
            for column, cell in enumerate(self.row(slot))
            if cell != NOT_REPORTED
        }

    def laid_over(self, slot: int, info: NodeInfo) -> NodeInfo:
        """`info` (a record's NodeInfo) with `slot`'s reported gauges in place."""
        reported = self.reported(slot)
        return msgspec.structs.replace(info, **reported) if reported else info

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NodeGauges):
            return NotImplemented
        return self is other or self.rows() == other.rows()

    def __hash__(self) -> int:
        return hash(tuple(self.rows()))

    def __repr__(self) -> str:
        return f"NodeGauges({self.rows()!r})"


def gauges_row(marks_offset: int) -> int:
    """A slot's row in its gauges leaves, from where its marks are (`NodeRecord.marks_offset`;
    the middle list and leaf are the marks'): one operation on small integers, where reading
    the slot itself would touch one more cold object per report."""
    return marks_offset >> 1


class _Made(NodeGauges):
    """A NodeGauges made by object's C initializer (see node_marks._Made)."""

    __slots__ = ()
    __init__ = object.__init__
