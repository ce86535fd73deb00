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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Final

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
#: What a cell holds until its node reports that gauge.
NOT_REPORTED: Final = -1

_double = struct.Struct("<d")
_int64 = struct.Struct("<q")
_MAX_PERCENT_BITS: Final[int] = _int64.unpack(_double.pack(100.0))[0]


def _cell(column: int, value: Any) -> int:
    """The int64 a gauge value is stored as (NodeInfo has validated the value)."""
    if column == 0:  # cpu_percent, a float
        bits: int = _int64.unpack(_double.pack(value))[0]
        return bits
    return int(value)


def _value(column: int, cell: int) -> float | int:
    if column == 0:
        percent: float = _double.unpack(_int64.pack(cell))[0]
        return percent
    return cell


class NodeGauges(SlotTable):
    """Immutable map slot -> its node's gauges (`GAUGES`); see the module doc."""

    __slots__ = ()
    WIDTH: ClassVar[int] = len(GAUGES)
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

    def with_reported(
        self, mid: int, leaf: int, row: int, reported: Mapping[str, Any]
    ) -> NodeGauges:
        """These gauges with those that `reported` names (a NodeInfo's non-None fields by
        name, as `msgspec.to_builtins` gives them; other fields are ignored) written for the
        slot at (`mid`, `leaf`, `row`), the address its record carries. Itself if `reported`
        names no gauge."""
        cells = [
            (column, _cell(column, value))
            for name, value in reported.items()
            if (column := GAUGE_COLUMN.get(name)) is not None
        ]
        if not cells:
            return self
        copied = self._copied(mid, leaf)
        if copied is None:  # the slot's leaf is not allocated yet
            slot = slot_at(mid, leaf, row)
            return self.with_rows((slot, column, cell) for column, cell in cells)
        root, values = copied
        base = row * len(GAUGES)
        for column, cell in cells:
            values[base + column] = cell
        return self._made(root)

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

    @classmethod
    def from_reports(cls, reports: Iterable[tuple[int, Mapping[str, Any]]]) -> NodeGauges:
        """Gauges from (slot, reported fields) pairs, later reports overlaying earlier ones."""
        return cls().with_rows(
            (slot, column, _cell(column, value))
            for slot, reported in reports
            for name, value in reported.items()
            if (column := GAUGE_COLUMN.get(name)) is not None
        )
