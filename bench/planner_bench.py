"""Planner benchmark: one planning cycle at 1,000 to 10,000 nodes with 1,000 sessions.

Builds each cluster by folding real events (node info, self-tests, sessions, a first epoch's
placements, work) and then times `plan()` -- a pure function, so the same cycle can be timed
repeatedly on the same input. Two cycles are measured:

* **epoch turn** (the heaviest): misses, finalizing 1,000 devshards, settling every node,
  starting the next epoch and placing all 1,000 sessions (sticky to last epoch's nodes);
* **mid-epoch** with one node lost: liveness over every node and re-placing its slots.

Prints the median time per cycle and the growth from the smallest size, next to the growth
of n and n log n. Target: under 100 ms per cycle at 10,000 nodes, growth no worse than
n log n; PASS needs both, for both cycles (exit 1 on FAIL).

    .venv/bin/python bench/planner_bench.py [--sizes 1000,2000,5000,10000] [--sessions 1000]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

from cluster.master.config import PlannerConfig
from cluster.master.liveness import EMPTY_BOOK, LivenessBook
from cluster.master.planner import PlanResult, plan
from cluster.shared.apply import fold
from cluster.shared.events import (
    MASTER_ORIGIN,
    DevshardPlaced,
    Event,
    GpuInfo,
    IndexedEvent,
    NodeDisconnected,
    NodeGatheredInfo,
    NodeHeartbeat,
    NodeInfo,
    RunnerSelfTestCompleted,
    SessionRequested,
    WorkReported,
)
from cluster.shared.state import EMPTY_STATE, State

T0 = 1_700_000_000_000
CFG = PlannerConfig()
GPU = GpuInfo(index=0, name="sim", uuid="GPU-sim", memory_total_mb=81_920, memory_used_mb=0)


def _pick(key: str, n: int) -> int:
    """A deterministic small integer in [0, n) (no randomness in a benchmark's inputs)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big") % n


class _Log:
    def __init__(self) -> None:
        self.state: State = EMPTY_STATE
        self.now = T0
        self._seq: dict[str, int] = {}
        self._pending: list[IndexedEvent] = []

    def add(self, origin: str, event: Event) -> None:
        seq = self._seq.get(origin, 0) + 1
        self._seq[origin] = seq
        idx = self.state.last_applied + len(self._pending) + 1
        self._pending.append(IndexedEvent(idx, self.now, origin, seq, event))

    def flush(self) -> State:
        self.state = fold(self.state, self._pending)
        self._pending = []
        return self.state


def build_cluster(nodes: int, sessions: int) -> tuple[State, LivenessBook, list[str]]:
    """A cluster one cycle into its first epoch, placed and reporting work."""
    log = _Log()
    node_ids = [f"12D3KooWnode{i:06d}" for i in range(nodes)]
    for node_id in node_ids:
        gpu = _pick(node_id + "gpu", 5) == 0
        info = NodeInfo(
            hostname=node_id,
            slots=2 + _pick(node_id + "slots", 7),
            slot_memory_mb=(8_192, 16_384, 24_576, 81_920)[_pick(node_id + "mem", 4)],
            gpus=(GPU,) if gpu else (),
        )
        log.add(node_id, NodeGatheredInfo(node_id=node_id, source="static", info=info))
        log.add(node_id, RunnerSelfTestCompleted(node_id=node_id, runner_kind="sim", passed=True))
    for i in range(sessions):
        sid = f"session-{i:05d}"
        log.add(
            MASTER_ORIGIN,
            SessionRequested(
                session_id=sid,
                slots=1 + _pick(sid + "slots", 4),
                memory_per_slot_mb=(4_096, 8_192, 16_384)[_pick(sid + "mem", 3)],
                gpu=_pick(sid + "gpu", 20) == 0,
            ),
        )
    state = log.flush()
    log.now += CFG.plan_interval_ms
    first = plan(state, log.now, EMPTY_BOOK, CFG)
    for ev in first.events:
        log.add(MASTER_ORIGIN, ev)
    for ev in first.events:
        if isinstance(ev, DevshardPlaced):
            for a in ev.assignments:
                work = WorkReported(devshard_id=ev.devshard_id, node_id=a.node_id, units=3, epoch=1)
                log.add(a.node_id, work)
    for node_id in node_ids:
        log.add(node_id, NodeHeartbeat(node_id=node_id))
    return log.flush(), first.book, node_ids


def _time(fn: Callable[[], PlanResult], repeat: int) -> tuple[float, PlanResult]:
    samples: list[float] = []
    result = fn()  # warm-up (and the result to report on)
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples), result


def _lose_one(state: State, book: LivenessBook, victim: str) -> State:
    """The same state with `victim` disconnected (as if the previous cycle had decided so)."""
    ie = IndexedEvent(
        state.last_applied + 1,
        state.last_time_ms,
        MASTER_ORIGIN,
        10**9,
        NodeDisconnected(node_id=victim, reason="bench: lost"),
    )
    return fold(state, [ie])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,2000,5000,10000")
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if any(n < 1 for n in sizes) or args.sessions < 0 or args.repeat < 1:
        parser.error("--sizes must be positive, --sessions >= 0 and --repeat >= 1")

    print(f"planner cycle, {args.sessions} sessions, median of {args.repeat} runs")
    header = f"{'nodes':>7} {'turn ms':>9} {'mid ms':>8} {'placed':>7} {'unplaced':>9}"
    print(header + f" {'turn x':>7} {'mid x':>6} {'n x':>6} {'nlogn x':>8}")
    base: tuple[int, float, float] | None = None
    worst = 0.0
    too_steep: list[str] = []
    for n in sizes:
        state, book, node_ids = build_cluster(n, args.sessions)
        end = state.epoch.end_ms if state.epoch is not None else T0
        turn_s, turn = _time(partial(plan, state, end, book, CFG), args.repeat)
        holder = next(
            (a.node_id for ds in state.devshards.values() for a in ds.assignments), node_ids[0]
        )
        lost_state = _lose_one(state, book, holder)
        mid_now = state.last_time_ms + CFG.plan_interval_ms
        mid_s, mid = _time(partial(plan, lost_state, mid_now, book, CFG), args.repeat)
        if not any(isinstance(e, DevshardPlaced) and e.reason == "replace" for e in mid.events):
            print(f"mid-epoch cycle at {n} nodes did not re-place the lost node's slots")
            return 1
        placed = sum(isinstance(e, DevshardPlaced) for e in turn.events)
        unplaced = args.sessions - placed
        if base is None:
            base = (n, turn_s, mid_s)
        n0, t0, m0 = base
        growth_n = n / n0
        growth_nlogn = (n * math.log(n)) / (n0 * math.log(n0)) if n0 > 1 else growth_n
        print(
            f"{n:>7} {turn_s * 1e3:>9.1f} {mid_s * 1e3:>8.1f} {placed:>7} {unplaced:>9}"
            f" {turn_s / t0:>7.2f} {mid_s / m0:>6.2f} {growth_n:>6.2f} {growth_nlogn:>8.2f}"
        )
        worst = max(worst, turn_s, mid_s)
        for name, growth in (("epoch turn", turn_s / t0), ("mid-epoch", mid_s / m0)):
            if growth > growth_nlogn:
                too_steep.append(
                    f"{name} grew {growth:.2f}x to {n} nodes (n log n: {growth_nlogn:.2f}x)"
                )
    ok = worst < 0.100 and not too_steep
    print(
        f"{'PASS' if ok else 'FAIL'}: slowest cycle {worst * 1e3:.1f} ms (target < 100 ms); "
        f"growth {'within' if not too_steep else 'above'} n log n"
    )
    for line in too_steep:
        print(f"  {line}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
