"""Devshard placement: which eligible nodes serve each session's slots this epoch (DESIGN 6).

Eligible node = connected, fresh (per the liveness book), not stopping (its worker said
goodbye, `NodeRecord.stopping_idx`), not draining or in maintenance
(`may_take_work` for work ending at the epoch end, and not `is_excused`), running runners
(not a facts-only worker, `NodeRecord.facts_only`), runner self-test passed, offering slots
(`NodeInfo.slots`, `NodeInfo.slot_memory_mb`), with room (offered slots minus slots already
assigned this epoch). A node fits a session when its memory per slot is
at least the session's and, for a GPU session, it reports a GPU.

How slots are chosen, deterministically from (epoch seed, session id):

1. **Sticky first.** Slots go back to the nodes that served the session last epoch (slot i
   to the node that held slot i) while they are eligible, fit and have room, so models are
   not reloaded needlessly.
2. **Spread, weighted by free capacity.** Remaining slots are drawn one by one with
   probability proportional to each fitting node's free slots (BLAKE2 of seed, session id
   and draw number -- never Python's salted `hash()`); of two such draws the node with the
   larger free share wins ("power of two choices"), which keeps load balanced across the
   cluster. A node already in the devshard is avoided while other fitting nodes have room,
   so a devshard spreads across nodes.
3. **All or nothing** for a new devshard: if the fitting nodes offer fewer free slots than
   needed, the session gets `SessionUnplaced` with the counts behind the decision.
   Re-placement of an existing devshard (slots on a lost node) is partial instead: the
   surviving slots keep serving and the rest are filled when room appears -- never on a
   node where one of the devshard's runners failed for good this epoch.
4. **Stickiness does not freeze an imbalance.** After 1-3 for every session, a node
   keeping several slots of one devshard gives its extra kept slots to fitting nodes
   outside the devshard that have room, and a node that would still be at or above the
   cluster's share of slots in use without a kept slot gives it to a fitting node outside
   the devshard that stays below that share after taking it (both drawn as in 2). Without
   it a doubling, or the slots others took over while a node was briefly ineligible
   (maintenance, stale at a turn), would stick for good and that node, back, would stay
   idle. No move crosses the share, so moves converge; a cluster with no node a slot above
   it while another is a slot below moves nothing. The moves come last, into the room the
   draws left, because a move keeps the number of free slots, not what fits where: before
   the draws it could take the only node a large or GPU session fits on (a session placed
   without the moves is always placed with them). A session the draws left unplaced is
   tried again after a move, which may have freed the room it needs.
5. **Stickiness does not keep a session out for good.** At an epoch turn, a session still
   unplaced after 1-4 gets room made for it when that is possible: slots of other sessions
   on nodes it fits move straight to nodes it does not fit that fit them and have room
   (exactly as many as it lacks, none if that is not enough -- nothing moves then, and it
   stays unplaced with its reason). Without it a small session placed first on the only
   large or GPU node kept it by stickiness at every turn, and a large or GPU session created
   later never ran, though a placement of both existed. Once placed, each keeps its nodes by
   stickiness (1), so nothing moves back. Mid-epoch no devshard moves for another: a session
   that fits nowhere waits for the next turn.

Cost: the pool (eligible set, free capacity) is built once per cycle in O(n log n); each
slot then costs O(log n) through a Fenwick tree of free slots over nodes sorted by memory per
slot, so a session's fitting nodes are a prefix found by bisection. Making room (5) costs
O(kinds log n + slots placed) for each attempt (the free slots per (memory, GPU) kind come
from the same trees), and nothing for a session that fits the same nodes as one that already
failed with no smaller shortfall while nothing changed: many sessions waiting for scarce GPUs
cost one attempt per set of fitting nodes, whatever memory each asks per slot. An attempt
that succeeds changes the pool, so a turn that makes room for many sessions costs up to
(sessions placed that way x slots placed).
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Final

from cluster.shared.durations import format_time
from cluster.shared.events import DevshardPlaced, SessionUnplaced, SlotAssignment
from cluster.shared.excuse import is_excused, may_take_work
from cluster.shared.state import DevshardRecord, EpochRecord, SessionRecord, State

# Why a node is not eligible, in the order reasons are reported.
DISCONNECTED = "disconnected"
STALE = "stale"
STOPPING = "stopping (its worker said goodbye)"
IN_MAINTENANCE = "in maintenance"
DRAINING = "draining"
RUNS_NO_RUNNERS = "running no runners"
SELF_TEST_FAILED = "failed its runner self-test"
NOT_SELF_TESTED = "not self-tested"
NO_SLOTS = "offering no slots"
FULL = "full"
_REASON_ORDER = (
    DISCONNECTED,
    STOPPING,
    STALE,
    IN_MAINTENANCE,
    DRAINING,
    RUNS_NO_RUNNERS,
    SELF_TEST_FAILED,
    NOT_SELF_TESTED,
    NO_SLOTS,
    FULL,
)
#: How an unplaced reason names nodes in one of those passing states ("3 node(s) stale"):
#: nodes move in and out of them all the time (the planner restates such news only once a
#: minute, `planner.UNPLACED_RECOUNT_MS`).
INELIGIBLE_DETAILS: tuple[str, ...] = tuple(f" node(s) {r}" for r in _REASON_ORDER)
#: How an unplaced reason points at a maintenance window that keeps a node the session fits
#: away ("2 slot(s) away until window mw-… of node X ends at T"): a lasting detail while the
#: window lasts (the planner restates the reason when one appears or ends), unlike the
#: passing counts above. `decision_log` looks for it to point the operator at the window.
AWAY_UNTIL_WINDOW: Final = " away until window "
#: The most windows one reason names; the rest are counted.
MAX_WINDOWS_NAMED: Final = 3


def devshard_id(epoch: int, session_id: str) -> str:
    """The master's deterministic devshard id for a session in an epoch."""
    return f"ds-{epoch}-{session_id}"


class _Fenwick:
    """Prefix sums of non-negative integer weights with O(log n) update, sum and search."""

    __slots__ = ("_n", "_top", "_tree")

    def __init__(self, weights: Sequence[int]) -> None:
        n = len(weights)
        tree = [0] * (n + 1)
        for i, w in enumerate(weights, 1):
            tree[i] += w
            parent = i + (i & -i)
            if parent <= n:
                tree[parent] += tree[i]
        self._n = n
        self._tree = tree
        self._top = 1 << (n.bit_length() - 1) if n else 0

    def add(self, i: int, delta: int) -> None:
        i += 1
        tree, n = self._tree, self._n
        while i <= n:
            tree[i] += delta
            i += i & -i

    def prefix(self, k: int) -> int:
        """Sum of the first k weights."""
        total, tree = 0, self._tree
        while k > 0:
            total += tree[k]
            k -= k & -k
        return total

    def find(self, u: int) -> int:
        """The 0-based index i with prefix(i) <= u < prefix(i + 1); needs u < prefix(n)."""
        pos, step, tree, n = 0, self._top, self._tree, self._n
        while step:
            nxt = pos + step
            if nxt <= n and tree[nxt] <= u:
                pos = nxt
                u -= tree[nxt]
            step >>= 1
        return pos


def _run(index: _Index, memory: int) -> tuple[int, int]:
    """The positions [lo, hi) of the nodes with exactly `memory` per slot in `index`."""
    return bisect_left(index.neg_memory, -memory), bisect_right(index.neg_memory, -memory)


def _run_free(index: _Index, memory: int) -> int:
    lo, hi = _run(index, memory)
    return index.tree.prefix(hi) - index.tree.prefix(lo)


def _largest_memory_first(groups: dict[int, list[str]]) -> list[tuple[int, str]]:
    """(-memory, node id) pairs in ascending order, as `sorted` would give them -- but
    sorting plain id strings per size, which is several times faster than sorting pairs
    (this runs over every node each cycle that places anything)."""
    out: list[tuple[int, str]] = []
    for memory in sorted(groups, reverse=True):
        neg = -memory
        out.extend((neg, node_id) for node_id in sorted(groups[memory]))
    return out


@dataclass
class _Index:
    """Eligible nodes sorted by memory per slot (largest first) with a tree of free slots."""

    node_ids: list[str]
    neg_memory: list[int]
    tree: _Fenwick
    position: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, nodes: list[tuple[int, str]], free: Mapping[str, int]) -> _Index:
        """From (-memory per slot, node id) pairs sorted ascending (largest memory first)."""
        ids = [node_id for _, node_id in nodes]
        return cls(
            node_ids=ids,
            neg_memory=[neg for neg, _ in nodes],
            tree=_Fenwick([free[n] for n in ids]),
            position={n: i for i, n in enumerate(ids)},
        )

    def fitting(self, memory_mb: int) -> int:
        """How many nodes (a prefix) give at least `memory_mb` per slot."""
        return bisect_right(self.neg_memory, -memory_mb)


class PlacementPool:
    """The eligible nodes and their free slots for one plan cycle.

    Built once per cycle and consumed by every placement in it, so sessions placed earlier
    in the cycle leave less room for later ones. Mutable scratch: it belongs to one `plan`
    call and never outlives it.
    """

    def __init__(
        self,
        state: State,
        *,
        now_ms: int,
        work_end_ms: int,
        used: Mapping[str, int],
        not_fresh: Collection[str] = frozenset(),
        leaving: Collection[str] = frozenset(),
    ) -> None:
        self.ineligible: Counter[str] = Counter()
        self.free: dict[str, int] = {}
        #: Slots each eligible node offers in all (free + already assigned).
        self.capacity: dict[str, int] = {}
        self.memory: dict[str, int] = {}
        self.has_gpu: set[str] = set()
        # Node ids grouped by memory per slot (a handful of distinct sizes in practice).
        everyone: dict[int, list[str]] = {}
        gpus: dict[int, list[str]] = {}
        with_window = state.open_window_by_node
        ineligible = self.ineligible
        # Locals: this loop runs over every node once per cycle that places anything.
        free, capacity, memory_of, has_gpu = self.free, self.capacity, self.memory, self.has_gpu
        used_get = used.get
        for node_id, rec in state.nodes.items():
            test = rec.self_test
            # The order of `node_status`: a node its window excuses is in maintenance, quiet,
            # stopped or even disconnected (it said "stopping" or "stale" of one stopped in
            # its window, which the master keeps excused).
            if node_id in with_window and is_excused(state, node_id, now_ms):
                reason = IN_MAINTENANCE
            elif not rec.connected or node_id in leaving:
                reason = DISCONNECTED
            elif rec.stopping_idx:
                # Said goodbye: it keeps what it holds mid-epoch until it is back or
                # disconnected, but takes nothing new meanwhile (at an epoch turn its slots
                # are placed afresh: its runners restart anyway). Before the staleness
                # check, which it soon meets too: "stopping" is the truer reason.
                reason = STOPPING
            elif node_id in not_fresh:
                reason = STALE
            elif node_id in with_window and not may_take_work(state, node_id, work_end_ms):
                reason = DRAINING
            elif rec.facts_only:
                reason = RUNS_NO_RUNNERS  # whatever test it holds: nothing would serve
            elif test is None:
                reason = NOT_SELF_TESTED
            elif not test.passed:
                reason = SELF_TEST_FAILED
            else:
                info = rec.info
                slots, memory = info.slots, info.slot_memory_mb
                if not slots or slots <= 0 or not memory or memory <= 0:
                    reason = NO_SLOTS
                else:
                    room = slots - used_get(node_id, 0)
                    if room <= 0:
                        reason = FULL
                    else:
                        free[node_id] = room
                        capacity[node_id] = slots
                        memory_of[node_id] = memory
                        everyone.setdefault(memory, []).append(node_id)
                        if info.gpus:
                            has_gpu.add(node_id)
                            gpus.setdefault(memory, []).append(node_id)
                        continue
            ineligible[reason] += 1
        self.away = _away(state, now_ms, work_end_ms)
        self._index(everyone, gpus)

    def _index(self, everyone: dict[int, list[str]], gpus: dict[int, list[str]]) -> None:
        self._all = _Index.build(_largest_memory_first(everyone), self.free)
        self._gpu = _Index.build(_largest_memory_first(gpus), self.free)
        self._memories = sorted(everyone, reverse=True)
        self._kinds: dict[tuple[int, bool], list[str]] = {}
        # Nodes temporarily hidden from draws (already in the devshard being placed).
        self._hidden: set[str] = set()
        self._hidden_in: _Index | None = None

    def below(self, load: Fraction) -> PlacementPool:
        """A scratch pool of the nodes that can take slots and stay below `load` (a share
        of their slots in use), each offering just that many: what `_even_out` draws from,
        so every node it draws is one that evening out may load."""
        view = object.__new__(PlacementPool)
        view.ineligible = Counter()
        view.free, view.capacity, view.memory = {}, {}, {}
        view.has_gpu = set()
        view.away = ()
        everyone: dict[int, list[str]] = {}
        gpus: dict[int, list[str]] = {}
        num, den = load.numerator, load.denominator
        for node_id, free in self.free.items():
            cap = self.capacity[node_id]
            # Slots k it can take with (in use + k) / cap < load, i.e. k * den < room.
            room = num * cap - (cap - free) * den
            if room <= den:
                continue
            memory = self.memory[node_id]
            view.free[node_id] = min(free, (room - 1) // den)
            view.capacity[node_id] = cap
            view.memory[node_id] = memory
            everyone.setdefault(memory, []).append(node_id)
            if node_id in self.has_gpu:
                view.has_gpu.add(node_id)
                gpus.setdefault(memory, []).append(node_id)
        view._index(everyone, gpus)
        return view

    # -- capacity bookkeeping -------------------------------------------------------------

    def fits(self, node_id: str, session: SessionRecord) -> bool:
        mem = self.memory.get(node_id)
        return (
            mem is not None
            and mem >= session.memory_per_slot_mb
            and (not session.gpu or node_id in self.has_gpu)
        )

    def _shift(self, node_id: str, delta: int) -> None:
        self.free[node_id] += delta
        indexes = (self._all, self._gpu) if node_id in self.has_gpu else (self._all,)
        for index in indexes:
            if index is self._hidden_in and node_id in self._hidden:
                continue
            index.tree.add(index.position[node_id], delta)

    def take(self, node_id: str) -> None:
        self._shift(node_id, -1)

    def release(self, node_id: str) -> None:
        self._shift(node_id, +1)

    def share(self, node_id: str) -> Fraction:
        """The share of its slots an eligible node has in use."""
        cap = self.capacity[node_id]
        return Fraction(cap - self.free[node_id], cap)

    def load(self) -> Fraction:
        """The share of all eligible slots in use."""
        total = sum(self.capacity.values())
        return Fraction(total - sum(self.free.values()), total) if total else Fraction(0)

    def _index_for(self, session: SessionRecord) -> _Index:
        return self._gpu if session.gpu else self._all

    def free_by_kind(self) -> dict[tuple[int, bool], int]:
        """Free slots per kind of node, (memory per slot, GPU), in O(kinds log n): each
        memory size is a run of the trees' node order (between draws)."""
        out: dict[tuple[int, bool], int] = {}
        for memory in self._memories:
            gpu = _run_free(self._gpu, memory)
            out[(memory, True)] = gpu
            out[(memory, False)] = _run_free(self._all, memory) - gpu
        return out

    def nodes_of_kind(self, kind: tuple[int, bool]) -> list[str]:
        """The eligible nodes of a kind, (memory per slot, GPU), by node id."""
        nodes = self._kinds.get(kind)
        if nodes is None:
            memory, gpu = kind
            index = self._gpu if gpu else self._all
            lo, hi = _run(index, memory)
            nodes = [n for n in index.node_ids[lo:hi] if gpu or n not in self.has_gpu]
            self._kinds[kind] = nodes
        return nodes

    def room_for(self, session: SessionRecord) -> tuple[int, int]:
        """(fitting nodes, their free slots) for a session (between draws)."""
        index = self._index_for(session)
        k = index.fitting(session.memory_per_slot_mb)
        return k, index.tree.prefix(k)

    # -- drawing ----------------------------------------------------------------------------

    def _hide(self, index: _Index, node_id: str) -> None:
        if node_id in self._hidden or node_id not in index.position:
            return
        self._hidden.add(node_id)
        index.tree.add(index.position[node_id], -self.free[node_id])

    def _unhide(self, keep: Collection[str] = ()) -> None:
        """Put the hidden nodes back into the draws, all but `keep`."""
        index = self._hidden_in
        if index is not None:
            for node_id in self._hidden.difference(keep):
                index.tree.add(index.position[node_id], self.free[node_id])
        self._hidden = self._hidden.intersection(keep)
        if not self._hidden:
            self._hidden_in = None

    def draw(
        self,
        session: SessionRecord,
        seed: int,
        count: int,
        avoid: Iterable[str],
        salt: str = "",
        exclude: Collection[str] = (),
        repeat: bool = True,
    ) -> list[str]:
        """Draw up to `count` slots for a session, avoiding `avoid` while others have room
        and never choosing a node in `exclude`.

        Returns the chosen node per slot (a node may repeat once no other node has room);
        fewer than `count` only when the fitting nodes outside `exclude` have no free slot.
        With `repeat=False` it stops instead once no node outside `avoid` (and those already
        drawn) has room: every node returned is distinct and new to the devshard.
        """
        index = self._index_for(session)
        k = index.fitting(session.memory_per_slot_mb)
        chosen: list[str] = []
        self._hidden_in = index
        for node_id in (*exclude, *avoid):
            self._hide(index, node_id)
        number = 0
        try:
            for spread in (True, False) if repeat else (True,):
                if not spread:
                    self._unhide(keep=exclude)
                while len(chosen) < count:
                    total = index.tree.prefix(k)
                    if total <= 0:
                        break
                    u1, u2 = _two_uniform(seed, session.session_id, salt, number, total)
                    number += 1
                    node_id = self._less_loaded(
                        index.node_ids[index.tree.find(u1)], index.node_ids[index.tree.find(u2)]
                    )
                    self.take(node_id)
                    chosen.append(node_id)
                    if spread:
                        self._hide(index, node_id)
        finally:
            self._unhide()
        return chosen

    def _less_loaded(self, first: str, second: str) -> str:
        """Power of two choices: of two capacity-weighted draws, the larger free share.

        Drawing proportionally to free slots weights by capacity; keeping the emptier of two
        such draws keeps the busiest node's load close to the average (balance), at the
        cost of one extra tree search. Ties keep the first draw.
        """
        cap = self.capacity
        if self.free[second] * cap[first] > self.free[first] * cap[second]:
            return second
        return first

    # -- reasons ----------------------------------------------------------------------------

    def unplaced_reason(
        self, session: SessionRecord, needed: int, excluded: Collection[str] = ()
    ) -> str:
        """Why `needed` slots of `session` cannot be had, with the counts behind it.

        `excluded` are nodes the draw may not use (where the devshard's runner failed for
        good): those that fit are named as such, their room not counted as on offer. Nodes
        it fits that a maintenance window keeps away are named with their window and its
        end (`AWAY_UNTIL_WINDOW`): their room comes back by itself.
        """
        k, free = self.room_for(session)
        barred = [node_id for node_id in excluded if self.fits(node_id, session)]
        gpu = " with a GPU" if session.gpu else ""
        head = (
            f"needs {needed} slot(s) of {session.memory_per_slot_mb} MiB{gpu}: "
            f"{k - len(barred)} eligible node(s) offer "
            f"{free - sum(self.free[node_id] for node_id in barred)} free slot(s)"
        )
        details: list[str] = []
        small = len(self._all.node_ids) - self._all.fitting(session.memory_per_slot_mb)
        if small:
            details.append(
                f"{small} node(s) with less than {session.memory_per_slot_mb} MiB per slot"
            )
        if session.gpu:
            no_gpu = self._all.fitting(session.memory_per_slot_mb) - k
            if no_gpu:
                details.append(f"{no_gpu} node(s) without a GPU")
        if barred:
            details.append(f"{len(barred)} node(s) where its runner failed for good")
        details.extend(
            f"{self.ineligible[r]} node(s) {r}" for r in _REASON_ORDER if self.ineligible[r]
        )
        details.extend(self._away_details(session))
        return head + ("; " + ", ".join(details) if details else "")

    def _away_details(self, session: SessionRecord) -> list[str]:
        """The windows keeping nodes the session fits away, soonest back first: the room
        that comes back by itself, so the operator is pointed at them."""
        fitting = [
            a
            for a in self.away
            if a.memory_mb >= session.memory_per_slot_mb and (a.gpu or not session.gpu)
        ]
        out = [
            f"{a.slots} slot(s){AWAY_UNTIL_WINDOW}{a.window_id} of node {a.node_id} ends at "
            f"{format_time(a.end_ms)}"
            for a in fitting[:MAX_WINDOWS_NAMED]
        ]
        rest = fitting[MAX_WINDOWS_NAMED:]
        if rest:
            out.append(
                f"{sum(a.slots for a in rest)} slot(s) away on {len(rest)} more window(s) "
                f"until {format_time(max(a.end_ms for a in rest))}"
            )
        return out


@dataclass(frozen=True)
class _AwayNode:
    """A node kept out by its maintenance window, with what it offers once back."""

    window_id: str
    node_id: str
    end_ms: int
    slots: int
    memory_mb: int
    gpu: bool


def _away(state: State, now_ms: int, work_end_ms: int) -> tuple[_AwayNode, ...]:
    """Nodes draining or in maintenance (whatever else they are now: a host powered off in
    its window reads stale or disconnected) that serve once back: passed their runner
    self-test and offer slots. Only nodes with an open window are looked at: a handful."""
    out: list[_AwayNode] = []
    for node_id, window_id in state.open_window_by_node.items():
        rec = state.nodes.get(node_id)
        if rec is None or rec.stopping_idx or rec.facts_only:
            continue
        if not is_excused(state, node_id, now_ms) and may_take_work(state, node_id, work_end_ms):
            continue
        test, info = rec.self_test, rec.info
        slots, memory = info.slots, info.slot_memory_mb
        if test is None or not test.passed or not slots or slots <= 0 or not memory or memory <= 0:
            continue
        win = state.windows[window_id]
        out.append(_AwayNode(window_id, node_id, win.end_ms, slots, memory, bool(info.gpus)))
    out.sort(key=lambda a: (a.end_ms, a.window_id))
    return tuple(out)


def _two_uniform(seed: int, session_id: str, salt: str, number: int, total: int) -> tuple[int, int]:
    """Two deterministic integers in [0, total) from the seed, session, salt and draw number."""
    material = f"{seed}\x1f{session_id}\x1f{salt}\x1f{number}".encode()
    digest = hashlib.blake2b(material, digest_size=32, person=b"cluster-place").digest()
    return int.from_bytes(digest[:16], "big") % total, int.from_bytes(digest[16:], "big") % total


# --------------------------------------------------------------------------------------------
# Placing sessions and re-placing lost slots
# --------------------------------------------------------------------------------------------


def place_sessions(
    sessions: Sequence[SessionRecord],
    epoch: EpochRecord,
    pool: PlacementPool,
    preferred: Mapping[str, Sequence[str]],
    *,
    make_room: bool = False,
) -> list[DevshardPlaced | SessionUnplaced]:
    """Place a devshard for every session (in the given order) for `epoch`.

    `preferred[session_id]` lists the node that held each slot before, by slot number ("" for
    a slot nobody held: `DevshardRecord.holders`). In this order:

    1. sticky slots are reserved for every session, so one session's draws never steal a
       slot another session would have kept;
    2. each session's remaining slots are drawn (all or nothing) -- exactly as if kept
       slots never moved, so every session placed without the moves is placed with them;
    3. only then are kept slots spread and evened out (`_spread_doubled`, `_even_out`),
       into the room the draws left: a move never takes a node a session of this cycle
       needed. (Moves keep the number of free slots, not what fits where: moved first, a
       small session's slot took the only node a large or GPU session fitted on, which
       then stayed unplaced for good, the moved slot kept there by stickiness.)
    4. sessions left unplaced in 2 are tried again when a slot moved: a move off a large or
       GPU node may have freed the room one needs;
    5. with `make_room` (epoch turns only: mid-epoch a running devshard never moves), a
       session still unplaced gets room made for it, in the same order, when other
       sessions' slots on nodes it fits can move to nodes with room it does not fit
       (`_make_room`). Stickiness alone kept it out for good: a small session held the
       only large or GPU node by stickiness at every turn, though it fitted elsewhere.
    """
    seed = epoch.seed
    sticky = {s.session_id: _reserve(s, preferred.get(s.session_id, ()), pool) for s in sessions}
    drawn: dict[str, list[SlotAssignment]] = {}
    why: dict[str, str] = {}  # why each unplaced session is, when it was decided
    for session in sessions:
        got = _draw_open(session, sticky[session.session_id], seed, pool)
        if got is None:
            why[session.session_id] = pool.unplaced_reason(session, session.slots)
        else:
            drawn[session.session_id] = got
    moved_any = False
    if any(sticky[sid] for sid in drawn):
        load = pool.load()
        light: PlacementPool | None = None
        for session in sessions:
            sid = session.session_id
            if sid not in drawn or not sticky[sid]:
                continue
            kept = sticky[sid]
            fresh = [a.node_id for a in drawn[sid]]
            moved = _spread_doubled(session, kept, fresh, seed, pool)
            givers = _heavy(moved, pool, load)
            if givers:
                light = pool.below(load) if light is None else light
                moved = _even_out(session, moved, fresh, givers, seed, pool, light, load)
            moved_any = moved_any or moved != kept
            sticky[sid] = moved
    for session in sessions:
        sid = session.session_id
        if sid not in drawn and moved_any:
            kept = _reserve(session, preferred.get(sid, ()), pool)
            got = _draw_open(session, kept, seed, pool)
            if got is None:
                why[sid] = pool.unplaced_reason(session, session.slots)
            else:
                sticky[sid], drawn[sid] = kept, got
    if make_room and len(drawn) < len(sessions):
        # Per set of fitting nodes (the length of the fitting prefix of the GPU or the
        # general index): the least shortfall room could not be made for since the pool last
        # changed. Room depends only on which nodes a session fits, so another session that
        # fits the same nodes and lacks as much fails too: a turn with many sessions waiting
        # for scarce GPUs scans once per set, not once per session -- also when their memory
        # per slot differs (keyed on the raw memory, 400 such sessions took 1 s at 10,000
        # nodes).
        hopeless: dict[tuple[int, bool], int] = {}
        for session in sessions:
            sid = session.session_id
            if sid in drawn:
                continue
            fitting, room = pool.room_for(session)
            short = session.slots - room
            kind = (fitting, session.gpu)
            if short > 0 and (
                short >= hopeless.get(kind, short + 1)
                or not _make_room(session, short, sessions, sticky, drawn, seed, pool)
            ):
                hopeless[kind] = min(short, hopeless.get(kind, short))
                # Nothing moved; the room may still differ from when the draws decided.
                why[sid] = pool.unplaced_reason(session, session.slots)
                continue
            hopeless.clear()
            kept = _reserve(session, preferred.get(sid, ()), pool)
            got = _draw_open(session, kept, seed, pool)
            if got is None:  # never: the room was just counted
                why[sid] = pool.unplaced_reason(session, session.slots)
            else:
                sticky[sid], drawn[sid] = kept, got
    out: list[DevshardPlaced | SessionUnplaced] = []
    for session in sessions:
        sid = session.session_id
        if sid not in drawn:
            out.append(SessionUnplaced(session_id=sid, epoch=epoch.epoch, reason=why[sid]))
            continue
        out.append(
            DevshardPlaced(
                devshard_id=devshard_id(epoch.epoch, sid),
                session_id=sid,
                epoch=epoch.epoch,
                assignments=tuple(sorted(sticky[sid] + drawn[sid], key=lambda a: a.slot)),
                ends_ms=epoch.end_ms,
            )
        )
    return out


def _make_room(
    session: SessionRecord,
    short: int,
    sessions: Sequence[SessionRecord],
    sticky: dict[str, list[SlotAssignment]],
    drawn: dict[str, list[SlotAssignment]],
    seed: int,
    pool: PlacementPool,
) -> bool:
    """Free `short` more slots on nodes `session` fits, or move nothing and return False.

    A slot of another placed session (its `sticky` kept or `drawn` slots) on a node the
    session fits moves straight to a node it does not fit (so the move gains it a slot)
    where the slot's own session fits and there is room: never leaving that session short,
    and no chains of moves, so exactly `short` slots move. Which kinds of slot go to which
    kinds of node is a small max flow over (memory, GPU) kinds -- a greedy choice could
    send a slot that fits anywhere to the only node another fits. Within a kind the slots
    drawn this cycle go first (nothing to reload), one per node first (the session spreads),
    then by node id; each goes to a node of its target kind with room outside its own
    devshard while one has room, the first from a point drawn as in `draw` (BLAKE2 of the
    seed, the session and the slot), so moved slots do not pile onto the lowest node ids.
    """
    mine = (session.memory_per_slot_mb, session.gpu)
    # Room on nodes of kinds the session does not fit (a move into its own kinds gains it
    # nothing), in O(kinds log n) from the pool's trees.
    capacity = {
        kind: free
        for kind, free in pool.free_by_kind().items()
        if free > 0 and not _kind_fits(kind, mine)
    }
    if sum(capacity.values()) < short:
        return False
    # Slots that could leave, by (memory, GPU) of their session: (fresh?, node, sid, slot).
    movable: dict[tuple[int, bool], list[tuple[int, str, str, int]]] = {}
    for other in sessions:
        sid = other.session_id
        if sid == session.session_id or sid not in drawn:
            continue
        key = (other.memory_per_slot_mb, other.gpu)
        for rank, group in enumerate((drawn[sid], sticky[sid])):
            for a in group:
                if pool.fits(a.node_id, session):
                    movable.setdefault(key, []).append((rank, a.node_id, sid, a.slot))
    if not movable:
        return False
    flow = _class_flow({key: len(slots) for key, slots in movable.items()}, capacity, short)
    if flow is None:
        return False
    for key in sorted(flow):
        rounds: Counter[str] = Counter()
        order: list[tuple[int, int, str, str, int]] = []
        for rank, node_id, sid, slot in sorted(movable[key]):
            order.append((rank, rounds[node_id], node_id, sid, slot))
            rounds[node_id] += 1
        order.sort()
        picks = iter(order)
        for to_kind in sorted(flow[key]):
            for _ in range(flow[key][to_kind]):
                _, _, node_id, sid, slot = next(picks)
                nodes = pool.nodes_of_kind(to_kind)
                start, _ = _two_uniform(seed, sid, "room", slot, len(nodes))
                target = _first_with_room(nodes, start, sticky[sid] + drawn[sid], pool)
                pool.release(node_id)
                pool.take(target)
                # Moved, it is a fresh slot: a later session may move it again for free.
                sticky[sid] = [a for a in sticky[sid] if a.slot != slot]
                drawn[sid] = [a for a in drawn[sid] if a.slot != slot]
                drawn[sid].append(SlotAssignment(slot, target))
    return True


def _kind_fits(node_kind: tuple[int, bool], slot_kind: tuple[int, bool]) -> bool:
    """Whether a node of (memory per slot, GPU) fits a slot of (memory per slot, GPU)."""
    return node_kind[0] >= slot_kind[0] and (node_kind[1] or not slot_kind[1])


def _first_with_room(
    nodes: Sequence[str], start: int, devshard: Sequence[SlotAssignment], pool: PlacementPool
) -> str:
    """The first of `nodes` from `start` on (wrapping) with room, outside `devshard` while
    one of those has room."""
    inside = {a.node_id for a in devshard}
    free = pool.free
    fallback = ""
    for i in range(len(nodes)):
        node_id = nodes[(start + i) % len(nodes)]
        if free[node_id] > 0:
            if node_id not in inside:
                return node_id
            fallback = fallback or node_id
    assert fallback, "the flow never sends more slots to a kind than its nodes have room"
    return fallback


def _class_flow(
    supply: Mapping[tuple[int, bool], int],
    capacity: Mapping[tuple[int, bool], int],
    want: int,
) -> dict[tuple[int, bool], dict[tuple[int, bool], int]] | None:
    """How many slots of each (memory, GPU) kind to send to each kind of node with room
    (`capacity` free slots each) so that `want` move in all, or None when fewer can.

    A slot fits a node kind with at least its memory and, for a GPU slot, a GPU. The kinds
    are a handful (`free_by_kind`), so plain augmenting paths (one slot at a time, breadth
    first, in sorted kind order for determinism) are cheap.
    """
    sources = sorted(supply)
    sinks = sorted(capacity)
    fits = {src: [dst for dst in sinks if _kind_fits(dst, src)] for src in sources}
    flow: dict[tuple[int, bool], dict[tuple[int, bool], int]] = {src: {} for src in sources}
    sent = dict.fromkeys(sources, 0)
    into = dict.fromkeys(sinks, 0)
    for _ in range(want):
        # Breadth first from every source with slots left; back edges undo earlier sends.
        parent: dict[tuple[str, tuple[int, bool]], tuple[str, tuple[int, bool]] | None] = {}
        queue: list[tuple[str, tuple[int, bool]]] = []
        for src in sources:
            if sent[src] < supply[src]:
                parent[("s", src)] = None
                queue.append(("s", src))
        end: tuple[str, tuple[int, bool]] | None = None
        for side, key in queue:  # the list grows while it is walked: a FIFO queue
            if side == "s":
                for dst in fits[key]:
                    if ("d", dst) not in parent:
                        parent[("d", dst)] = (side, key)
                        queue.append(("d", dst))
            elif into[key] < capacity[key]:
                end = (side, key)
                break
            else:
                for src in sources:
                    if flow[src].get(key, 0) > 0 and ("s", src) not in parent:
                        parent[("s", src)] = (side, key)
                        queue.append(("s", src))
        if end is None:
            return None
        into[end[1]] += 1
        step: tuple[str, tuple[int, bool]] = end
        while (back := parent[step]) is not None:
            if back[0] == "s":  # forward: back's source sends one more to step's sink
                flow[back[1]][step[1]] = flow[back[1]].get(step[1], 0) + 1
            else:  # backward: step's source sends one less to back's sink
                flow[step[1]][back[1]] -= 1
            step = back
        sent[step[1]] += 1
    return {
        src: {dst: n for dst, n in out.items() if n}
        for src, out in flow.items()
        if any(out.values())
    }


def _reserve(
    session: SessionRecord, holders: Sequence[str], pool: PlacementPool
) -> list[SlotAssignment]:
    """Take back each slot's last node while it fits and has room (slot i to the node that
    held slot i, so runners stay where they are)."""
    kept: list[SlotAssignment] = []
    for slot, node_id in enumerate(holders[: session.slots]):
        if node_id and pool.fits(node_id, session) and pool.free[node_id] > 0:
            pool.take(node_id)
            kept.append(SlotAssignment(slot, node_id))
    return kept


def _draw_open(
    session: SessionRecord, kept: list[SlotAssignment], seed: int, pool: PlacementPool
) -> list[SlotAssignment] | None:
    """Draw the slots `kept` leaves open, or release `kept` and return None when the fitting
    nodes lack the room (all or nothing)."""
    held = {a.slot for a in kept}
    open_slots = [slot for slot in range(session.slots) if slot not in held]
    if open_slots and pool.room_for(session)[1] < len(open_slots):
        for a in kept:
            pool.release(a.node_id)
        return None
    nodes = pool.draw(session, seed, len(open_slots), avoid=[a.node_id for a in kept])
    return [SlotAssignment(slot, n) for slot, n in zip(open_slots, nodes, strict=True)]


def _spread_doubled(
    session: SessionRecord,
    assignments: list[SlotAssignment],
    fresh: Sequence[str],
    seed: int,
    pool: PlacementPool,
) -> list[SlotAssignment]:
    """Move the extra kept slots (`assignments`) of a node holding several of the devshard
    to fitting nodes outside it (nor among `fresh`, the nodes drawn for its other slots)
    that have room, keeping each node's lowest slot where it is.

    Stickiness alone would keep a doubling for good: a node that got two slots while
    another was briefly ineligible (maintenance, stale at the turn) got both back every
    epoch, and the other, back, stayed idle. The spread rule holds for kept slots too:
    one slot per node while other nodes have room. A node's slot beyond its first moves
    (the most doubled-up node's first) through the normal draw, never onto a node already
    in the devshard, so a doubling that is still needed (no room elsewhere) stays put.
    """
    rank: Counter[str] = Counter()
    extra: list[tuple[int, int]] = []  # (-rank among its node's slots, slot)
    for a in sorted(assignments, key=lambda a: a.slot):
        if rank[a.node_id]:
            extra.append((-rank[a.node_id], a.slot))
        rank[a.node_id] += 1
    if not extra:
        return assignments
    extra.sort()
    drawn = pool.draw(session, seed, len(extra), avoid=[*rank, *fresh], salt="spread", repeat=False)
    if not drawn:
        return assignments
    to = {slot: node_id for (_, slot), node_id in zip(extra, drawn, strict=False)}
    out: list[SlotAssignment] = []
    for a in assignments:
        node_id = to.get(a.slot)
        if node_id is None:
            out.append(a)
        else:
            pool.release(a.node_id)
            out.append(SlotAssignment(a.slot, node_id))
    return out


def _heavy(
    assignments: list[SlotAssignment], pool: PlacementPool, load: Fraction
) -> list[SlotAssignment]:
    """The slots on nodes that would still be at or above `load` without them, the most
    loaded node's first."""
    cap, free = pool.capacity, pool.free
    num, den = load.numerator, load.denominator
    # Integer form of (in use - 1) / capacity >= load; runs for every kept slot.
    out = [
        a
        for a in assignments
        if (cap[a.node_id] - free[a.node_id] - 1) * den >= num * cap[a.node_id]
    ]
    out.sort(key=lambda a: (-pool.share(a.node_id), a.slot))
    return out


def _even_out(
    session: SessionRecord,
    assignments: list[SlotAssignment],
    fresh: Sequence[str],
    givers: list[SlotAssignment],
    seed: int,
    pool: PlacementPool,
    light: PlacementPool,
    load: Fraction,
) -> list[SlotAssignment]:
    """Move the `givers` (kept slots on heavy nodes, see `_heavy`) to fitting nodes outside
    the devshard (`assignments`, the kept slots, and `fresh`, the nodes drawn for the
    others) that stay below the cluster's `load` (the share of eligible slots in use)
    after taking them, drawn from `light` (`PlacementPool.below`) as in a normal draw.

    Stickiness alone never gives a node back its share: one that was ineligible at a turn
    (maintenance, stale) saw its slots go to the others, who then kept them every epoch
    while it stayed idle. A move never takes a node across `load` (the giver stays at or
    above it, the taker below it), so moves converge instead of swapping slots back and
    forth between epochs, and a cluster where every node is within a slot of its share
    moves nothing: no needless reloads.
    """
    drawn = light.draw(
        session,
        seed,
        len(givers),
        avoid=[*(a.node_id for a in assignments), *fresh],
        salt="even",
        repeat=False,
    )
    to: dict[int, str] = {}
    for a, taker in zip(givers, drawn, strict=False):
        # `light` may lag behind `pool` (spreading doubled slots loads nodes too).
        if pool.free[taker] <= 0:
            continue
        pool.take(taker)
        if pool.share(taker) >= load or not _heavy([a], pool, load):
            pool.release(taker)
            continue
        to[a.slot] = taker
        pool.release(a.node_id)
    if not to:
        return assignments
    return [SlotAssignment(a.slot, to[a.slot]) if a.slot in to else a for a in assignments]


def place_session(
    session: SessionRecord,
    epoch: EpochRecord,
    pool: PlacementPool,
    preferred: Sequence[str] = (),
) -> DevshardPlaced | SessionUnplaced:
    """Place one session's devshard for `epoch` (see `place_sessions`)."""
    return place_sessions([session], epoch, pool, {session.session_id: preferred})[0]


#: The most nodes one devshard avoids in an epoch (`DevshardPlaced.avoid_nodes`). The list
#: only grows (a node joins it when the devshard's runner failed there for good), and a
#: DevshardPlaced must fit one Events frame: 4096 slots (`requests.MAX_SLOTS`) and this many
#: peer ids stay near 1 MiB, where an unbounded list passed the frame at ~70,000 nodes and
#: the master refused the planner's every cycle. A runner that failed on this many nodes in
#: one epoch is broken, not unlucky: its open slots wait for the next epoch.
MAX_AVOID_NODES: Final = 16_384


@dataclass(frozen=True)
class Replacement:
    """The outcome of re-placing a devshard's lost slots."""

    #: The devshard with lost slots moved (None when nothing changed).
    placed: DevshardPlaced | None
    #: Slots that could not be re-placed for lack of room (0 when all were).
    unfilled: int
    reason: str = ""


def replace_lost_slots(
    shard: DevshardRecord,
    session: SessionRecord,
    epoch: EpochRecord,
    pool: PlacementPool,
    keeps: Callable[[SlotAssignment], bool],
    failed_nodes: Collection[str] = (),
) -> Replacement:
    """Move the slots of `shard` that `keeps` says are lost; fill earlier gaps too.

    Only lost slots move: survivors keep their slot numbers and nodes. Slots that cannot be
    placed for lack of room stay unassigned (the devshard keeps serving with the rest) and
    are retried in later cycles. `failed_nodes` (where a runner of the devshard failed for
    good) join the devshard's `avoid_nodes`, which get none of its open slots for the rest
    of the epoch, even when no other node has room: drawn back there, the slot would keep
    its runner id, the worker would see nothing new to restart, and the same failure would
    be counted again every cycle. Once a devshard avoids `MAX_AVOID_NODES` nodes, none of its
    open slots is drawn again in the epoch (the event must stay loggable).
    """
    survivors = [a for a in shard.assignments if keeps(a)]
    held = {a.slot for a in survivors}
    open_slots = [s for s in range(session.slots) if s not in held]
    lost_any = len(survivors) != len(shard.assignments)
    if not open_slots and not lost_any:
        return Replacement(placed=None, unfilled=0)
    avoided = sorted({*shard.avoid_nodes, *failed_nodes})
    # At the cap no slot is drawn (one might land on a failed node the list could not
    # name); the list keeps its first MAX_AVOID_NODES ids, so the event stays bounded.
    given_up = len(avoided) >= MAX_AVOID_NODES
    avoid_nodes = tuple(avoided[:MAX_AVOID_NODES])
    nodes = (
        []
        if given_up
        else pool.draw(
            session,
            epoch.seed,
            len(open_slots),
            avoid=[a.node_id for a in survivors],
            salt=f"replace:{shard.placed_ms}",
            exclude=avoid_nodes,
        )
    )
    why = (
        f"its runner failed for good on {len(avoided)} node(s) this epoch, the most "
        f"({MAX_AVOID_NODES}): no more re-placements until the next epoch"
        if given_up
        else ""
    )
    if not nodes and not lost_any:
        return Replacement(
            placed=None,
            unfilled=len(open_slots),
            reason=why or pool.unplaced_reason(session, len(open_slots), avoid_nodes),
        )
    moved = [
        SlotAssignment(slot, node_id) for slot, node_id in zip(open_slots, nodes, strict=False)
    ]
    assignments = tuple(sorted(survivors + moved, key=lambda a: a.slot))
    unfilled = len(open_slots) - len(nodes)
    return Replacement(
        placed=DevshardPlaced(
            devshard_id=shard.devshard_id,
            session_id=shard.session_id,
            epoch=shard.epoch,
            assignments=assignments,
            ends_ms=shard.ends_ms,
            reason="replace",
            avoid_nodes=avoid_nodes,
        ),
        unfilled=unfilled,
        reason=(why or pool.unplaced_reason(session, unfilled, avoid_nodes)) if unfilled else "",
    )
