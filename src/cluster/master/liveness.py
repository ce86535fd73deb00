"""Event-index staleness (DESIGN section 4): liveness is the flow of events, not a clock.

Each cycle the planner compares every connected node's last event index
(`State.last_event_by_node`) with what it saw the cycle before. Any event the node
originates -- info, heartbeat, runner status, work -- advances that index, so a node whose
slow probe hangs but whose other events flow is never stale. A node whose index stands still
for K consecutive cycles is disconnected -- unless its maintenance window excuses it now: a
host in maintenance that goes quiet is *offline for maintenance*, not disconnected. Its idle
cycles keep counting, so if it is still silent when the window closes (overrun), the cycle
that closes it disconnects it like any other silent node.

A node whose worker said goodbye (`NodeStopping`: it was stopped cleanly, its record's
`stopping_idx`) is judged on the same clock -- the goodbye changes the words, not the timing:
after K cycles without events it is disconnected with a reason that says it was stopped by
its operator, not one that reads like a crash. Until then nothing is decided, so a worker
restarted within those cycles (an upgrade) is back before anyone judged it: its new hello
clears the mark and moves its index, as a quick restart always did, and it keeps its epoch.
The excuse rule is the same (inside its window it stays offline for maintenance, outside it
the disconnect is unexcused).

The cycle counters live in a `LivenessBook`: ephemeral master bookkeeping, deliberately not
in State (DESIGN rule 7). A restarted master starts with an empty book, so every node gets a
full K cycles again before it can be judged -- the safe direction, because the master cannot
know how long it was away.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from cluster.master.config import PlannerConfig
from cluster.shared.events import STOP_REASON_CHARS, NodeDisconnected
from cluster.shared.excuse import is_excused
from cluster.shared.humanize import clip
from cluster.shared.state import State

#: What the planner saw of one node: (its event index, consecutive cycles it stood still).
#: A plain tuple rather than a record because the book holds one per node, rebuilt each cycle.
Seen = tuple[int, int]


@dataclass(frozen=True)
class LivenessBook:
    """Per connected node, the last index seen and the count of consecutive idle cycles.

    Treat as immutable: `check_liveness` returns a new book. Lives in the master only and is
    reset (empty) when the master restarts.
    """

    seen: Mapping[str, Seen] = field(default_factory=dict)
    #: Nodes idle for more than `cfg.fresh_idle_cycles` when the book was made: they keep
    #: their work but get no new slots (kept as a set so placement never scans the book).
    not_fresh: frozenset[str] = frozenset()

    def idle_cycles(self, node_id: str) -> int:
        """0 for a node never observed (new, rejoined, or after a master restart)."""
        entry = self.seen.get(node_id)
        return 0 if entry is None else entry[1]

    def is_fresh(self, node_id: str) -> bool:
        """Fresh enough to be given new work (idle at most `cfg.fresh_idle_cycles`)."""
        return node_id not in self.not_fresh


EMPTY_BOOK = LivenessBook()


class LivenessResult(NamedTuple):
    events: list[NodeDisconnected]
    book: LivenessBook


def check_liveness(
    state: State, book: LivenessBook, now_ms: int, cfg: PlannerConfig
) -> LivenessResult:
    """One liveness cycle: disconnect nodes idle for K cycles; return the new book.

    A cycle is idle for a node when its index equals the one seen last cycle. The first
    observation of a node is never idle (there is nothing to compare with). A node
    disconnected here leaves the book, so if it speaks again it is observed afresh. A node
    its maintenance window excuses is never disconnected: it stays in the book, idle and
    not fresh, until it speaks or its window closes. A node whose worker said goodbye
    (`NodeRecord.stopping_idx`) counts its cycles like any other; only the reason of its
    disconnect differs (`_stopped`). Events come out sorted by node id.
    """
    k = cfg.stale_cycles
    fresh_limit = cfg.fresh_idle_cycles
    previous = book.seen
    seen: dict[str, Seen] = {}
    not_fresh: set[str] = set()
    quiet: list[tuple[str, int, int]] = []
    marks = state.last_event_by_node
    for node_id, rec in state.nodes.items():
        if not rec.connected:
            continue
        # A node that said goodbye is not disconnected sooner than a silent one: a worker
        # restarted within K cycles must not forfeit its epoch (its new hello clears the
        # mark and moves `hello_idx` below, so it is not idle). Only the words differ.
        index = marks.index(rec.slot)
        # The master's NodeConnected counts too (`hello_idx`): a node that just said hello
        # has made progress even before its first own event. (A node joins either by its own
        # event, which moves its marks, or by a NodeConnected: joined_idx needs no look.)
        if rec.hello_idx > index:
            index = rec.hello_idx
        before = previous.get(node_id)
        if before is None or before[0] != index:
            seen[node_id] = (index, 0)
            continue
        idle = before[1] + 1
        if idle >= k and not is_excused(state, node_id, now_ms):
            quiet.append((node_id, index, idle))
            continue
        seen[node_id] = (index, idle)
        if idle > fresh_limit:
            not_fresh.add(node_id)
    events = [_disconnect(state, node_id, index, idle, cfg) for node_id, index, idle in quiet]
    events.sort(key=_by_node)
    return LivenessResult(events, LivenessBook(seen, frozenset(not_fresh)))


def _by_node(event: NodeDisconnected) -> str:
    return event.node_id


#: How every clean stop's disconnect reason starts (`decision_log` and operators match it).
STOPPED_BY_OPERATOR: Final = "stopped by its operator"


def _disconnect(
    state: State, node_id: str, index: int, idle: int, cfg: PlannerConfig
) -> NodeDisconnected:
    # `idle` is K, or more for a node that stayed silent through its maintenance window.
    silence = f"{idle} cycles ({idle * cfg.plan_interval_ms / 1000:g}s)"
    rec = state.nodes[node_id]
    if rec.stopping_idx:
        return _stopped(node_id, rec.stopping_reason, rec.stopping_idx, silence)
    return NodeDisconnected(
        node_id=node_id,
        reason=f"no events for {silence}; last event index {index}",
    )


def _stopped(node_id: str, said: str, index: int, silence: str) -> NodeDisconnected:
    said = clip(said, STOP_REASON_CHARS)
    return NodeDisconnected(
        node_id=node_id,
        reason=f"{STOPPED_BY_OPERATOR}"
        + (f" ({said})" if said else "")
        + f"; its worker said goodbye at event index {index} and was not back within {silence}",
    )
