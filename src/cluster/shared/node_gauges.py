"""NodeGauges: each node's latest gauges -- CPU %, available memory, free disk, network
counters -- by node slot, unboxed.

The gauges are what a worker's info sources report every cycle (worker/info.py): after
heartbeats, the commonest change an event makes. Kept in the node's record they cost a new
NodeInfo, a new NodeRecord and a write to the 10,000-key nodes map per report: ~26 L2 misses
per report at 10,000 nodes against ~1 at 1,000 (bench/apply_cost.py --by-kind), the largest
share of what made `apply` slower as the cluster grew. Here a report copies one leaf of a
`SlotTable` (slot_table.py says why that costs the same at any size) and leaves the record and
the map alone.

A node's whole picture is `State.node_info(node_id)`: the NodeInfo in its record (hostname,
totals, GPUs, slots: what rarely changes) with its gauges laid over it. A record's NodeInfo
never holds a gauge (the reducers split every report; `codec.decode_state` checks).

Each gauge is one int64 cell; -1 means "not reported yet" (NodeInfo refuses negative gauges).
`cpu_percent` is stored as the bit pattern of its IEEE-754 double: exact, and non-negative for
every valid percentage, so it never reads as -1.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import ClassVar, Final

import msgspec

from cluster.shared.events import NodeInfo
from cluster.shared.slot_table import SlotTable

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
#: What a cell holds until its node reports that gauge.
NOT_REPORTED: Final = -1

_double = struct.Struct("<d")
_int64 = struct.Struct("<q")
pack_double, unpack_int64 = _double.pack, _int64.unpack
_MAX_PERCENT_BITS: Final[int] = unpack_int64(pack_double(100.0))[0]


def float_bits(value: float) -> int:
    """The int64 cell a `cpu_percent` is kept in: its IEEE-754 bit pattern."""
    bits: int = unpack_int64(pack_double(value))[0]
    return bits


def _value(column: int, cell: int) -> float | int:
    if column == 0:  # cpu_percent
        percent: float = _double.unpack(_int64.pack(cell))[0]
        return percent
    return cell


class NodeGauges(SlotTable):
    """Immutable map slot -> its node's gauges (`GAUGES`), a row of cells; see the module doc.

    Laid out like the marks -- 32 rows per leaf, so a node's gauges are at its marks' middle
    list and leaf, found from the address its record carries (`gauges_offset`). Measured and
    dropped (bench/apply_cost.py at 10,000 nodes, L2 misses and instructions per event of
    apply_bench's mix; this layout, before the marks became unsigned: 14.8 and 12,900): a
    column table per gauge (14.0, but +150 instructions: a network report writes two columns,
    and each column is an object of its own to replace) and leaves of 8 rows (15.1: a middle
    list of 128 leaves increfs all of them on every copy)."""

    __slots__ = ()
    WIDTH: ClassVar[int] = WIDTH
    FILL: ClassVar[int] = NOT_REPORTED
    LEAF_SHIFT: ClassVar[int] = 5

    @classmethod
    def check_row(cls, slot: int, row: Sequence[int]) -> None:
        """NOT_REPORTED or a valid value in every cell: what a snapshot from disk or a peer
        must hold before it is believed."""
        for column, cell in enumerate(row):
            # Non-negative doubles order like their bit patterns: 0.0 .. 100.0 is a range.
            top = _MAX_PERCENT_BITS if column == 0 else 2**63 - 1
            if cell != NOT_REPORTED and not 0 <= cell <= top:
                raise ValueError(f"gauge {GAUGES[column]} of slot {slot} is invalid: {cell}")

    def with_cells(
        self, mid: int, leaf: int, offset: int, cells: list[tuple[int, int]]
    ) -> NodeGauges:
        """These gauges with (column, cell) pairs written in the row at (`mid`, `leaf`,
        `offset`) (`address`; a cell as stored: `float_bits` of a cpu_percent, else the int).
        Called on every info report, so the path copy is written out here, as in
        `NodeMarks.set_at`."""
        try:
            root = self._root.copy()
            root[mid] = mids = root[mid].copy()
            mids[leaf] = values = mids[leaf][:]
        except IndexError:  # the slot's leaf is not allocated yet: once per 32 nodes
            slot = self.slot_at(mid, leaf, offset)
            return self.with_rows((slot, column, cell) for column, cell in cells)
        for column, cell in cells:
            values[offset + column] = cell
        new: NodeGauges = _Made()
        new._root = root
        return new

    def reported(self, slot: int) -> dict[str, float | int]:
        """The gauges `slot`'s node has reported, by name."""
        return {
            GAUGES[column]: _value(column, cell)
            for column, cell in enumerate(self.row(slot))
            if cell != NOT_REPORTED
        }

    def laid_over(self, slot: int, info: NodeInfo) -> NodeInfo:
        """`info` (a record's NodeInfo) with `slot`'s reported gauges in place."""
        reported = self.reported(slot)
        return msgspec.structs.replace(info, **reported) if reported else info


def gauges_offset(marks_offset: int) -> int:
    """Where a slot's gauges start in its leaf, from where its marks do (`NodeRecord.
    marks_offset`; the middle list and leaf are the marks'): two operations on small integers,
    where reading the slot itself would touch one more cold object per report."""
    return (marks_offset >> 1) * WIDTH


class _Made(NodeGauges):
    """A NodeGauges made by object's C initializer (see node_marks._Made)."""

    __slots__ = ()
    __init__ = object.__init__
