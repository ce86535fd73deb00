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
from cluster.shared.slot_table import SlotTable, slot_at

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
    """Immutable map slot -> its node's gauges (`GAUGES`); see the module doc."""

    __slots__ = ()
    WIDTH: ClassVar[int] = WIDTH
    FILL: ClassVar[int] = NOT_REPORTED

    @classmethod
    def check_row(cls, slot: int, row: Sequence[int]) -> None:
        """A stored row is NOT_REPORTED or a valid value in every cell: what a snapshot from
        disk or a peer must hold before it is believed."""
        for column, cell in enumerate(row):
            if cell == NOT_REPORTED:
                continue
            # Non-negative doubles order like their bit patterns: 0.0 .. 100.0 is a range.
            top = _MAX_PERCENT_BITS if column == 0 else 2**63 - 1
            if not 0 <= cell <= top:
                raise ValueError(f"gauge {GAUGES[column]} of slot {slot} is invalid: {cell}")

    def with_cells(self, mid: int, leaf: int, row: int, cells: list[tuple[int, int]]) -> NodeGauges:
        """These gauges with (column, cell) pairs written for the slot at (`mid`, `leaf`,
        `row`), the address its record carries (a cell as stored: `float_bits` of a
        cpu_percent, else the int). Called on every info report, so the path copy is written
        out here, as in `NodeMarks.set_at`."""
        try:
            root = self._root.copy()
            root[mid] = mids = root[mid].copy()
            mids[leaf] = values = mids[leaf][:]
        except IndexError:  # the slot's leaf is not allocated yet: once per 32 nodes
            slot = slot_at(mid, leaf, row)
            return self.with_rows((slot, column, cell) for column, cell in cells)
        base = row * WIDTH
        for column, cell in cells:
            values[base + column] = cell
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


class _Made(NodeGauges):
    """A NodeGauges made by object's C initializer (see node_marks._Made)."""

    __slots__ = ()
    __init__ = object.__init__
