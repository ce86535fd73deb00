"""What one `apply` costs, counted rather than timed: machine instructions and L2 misses per
event, at 1,000 and 10,000 nodes, under valgrind's cachegrind.

Run: .venv/bin/python bench/apply_cost.py [--by-kind] [--events N] [--l2-bytes B]

Wall time on a shared 2-core VM moves by up to 1.7x within a run, so a change worth 5% cannot
be seen in `apply_bench.py` without many runs. Cachegrind counts the same work the same way
every time: instructions (the interpreter's share of the cost, the same at every size) and
misses of a simulated last-level cache sized like this machine's L2 (2 MiB; the part that
grows with the cluster: docs/benchmarks.md, "Where the misses come from"). It is a tool for
comparing changes, not a target: the targets are apply_bench's.

Each figure is the difference between two runs of the same program -- state and events built,
one warm-up pass of `apply` -- one of which then applies the events again, divided by the
number of events, so building, warming up and interpreter start-up cancel out. The cyclic
GC is off in both (apply_bench sees no collection during its timed passes either).

`--by-kind` adds, for each kind of event in apply_bench's mix, what it costs beyond a
heartbeat: the mix is run again with that kind's events replaced by heartbeats, and the
difference is spread over the replaced events. Needs `valgrind` on PATH; takes a few minutes.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from apply_bench import seeded_state, timed_events

from cluster.shared.apply import apply
from cluster.shared.events import IndexedEvent, NodeHeartbeat

#: apply_bench's mix: events j with j % 8 in these positions are of this kind.
KINDS = {5: "info", 6: "runner status", 7: "work"}
SIZES = (1_000, 10_000)


def child(nodes: int, count: int, replaced: int | None, measure: bool) -> None:
    """Build, warm up and (if `measure`) apply the events once more: run under cachegrind."""
    gc.disable()
    state = seeded_state(nodes)
    events = timed_events(nodes, count)
    if replaced is not None:
        events = [
            IndexedEvent(
                ie.idx, ie.master_time_ms, ie.origin, ie.seq, NodeHeartbeat(node_id=ie.origin)
            )
            if ie.master_time_ms % 8 == replaced  # apply_bench's time is the event's j
            else ie
            for ie in events
        ]
    s = state
    for ie in events:
        s = apply(s, ie)
    if measure:
        s = state
        for ie in events:
            s = apply(s, ie)


def counts(out_file: Path) -> dict[str, int]:
    """The totals of a cachegrind output file, by event name (Ir, DLmr, DLmw, ...)."""
    names: list[str] = []
    totals: list[int] = []
    for line in out_file.read_text().splitlines():
        if line.startswith("events:"):
            names = line.split()[1:]
        elif line.startswith("summary:"):
            totals = [int(v) for v in line.split()[1:]]
    if not names or len(totals) != len(names):
        raise RuntimeError(f"no totals in {out_file}: did cachegrind run?")
    return dict(zip(names, totals, strict=True))


def run_child(
    args: argparse.Namespace, nodes: int, replaced: int | None, measure: bool
) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cachegrind.out"
        cmd = [
            "valgrind",
            "--tool=cachegrind",
            "--cache-sim=yes",
            f"--LL={args.l2_bytes},16,64",
            f"--cachegrind-out-file={out}",
            sys.executable,
            __file__,
            "--child",
            str(nodes),
            str(args.events),
            "-" if replaced is None else str(replaced),
            "measure" if measure else "build",
        ]
        env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same HAMT shapes in both runs
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"cachegrind run failed ({done.returncode}): {done.stderr[-2000:]}")
        return counts(out)


def per_event(args: argparse.Namespace, nodes: int, replaced: int | None) -> tuple[float, float]:
    """(instructions, L2 misses) per event of the mix at `nodes`."""
    with ThreadPoolExecutor(2) as pool:  # the two runs of a pair side by side
        base, measured = pool.map(lambda m: run_child(args, nodes, replaced, m), (False, True))
    ir = (measured["Ir"] - base["Ir"]) / args.events
    misses = sum(measured[k] - base[k] for k in ("DLmr", "DLmw")) / args.events
    return ir, misses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=16_000)
    parser.add_argument("--l2-bytes", type=int, default=2 * 1024 * 1024)
    parser.add_argument("--by-kind", action="store_true")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        nodes, count, replaced, mode = args.child
        child(int(nodes), int(count), None if replaced == "-" else int(replaced), mode == "measure")
        return
    if shutil.which("valgrind") is None:
        sys.exit("apply_cost needs valgrind (cachegrind) on PATH, e.g. apt-get install valgrind")
    if args.events % 8:
        sys.exit(f"--events must be a multiple of 8 (the mix's period), got {args.events}")

    print(f"per event, {args.events:,} events of apply_bench's mix, L2 {args.l2_bytes:,} bytes")
    print(f"{'nodes':>7} {'what':<34} {'instructions':>12} {'L2 misses':>10}")
    for nodes in SIZES:
        ir, misses = per_event(args, nodes, None)
        print(f"{nodes:>7} {'mix':<34} {ir:>12,.0f} {misses:>10.1f}")
        if args.by_kind:
            for kind, name in KINDS.items():
                ir_without, misses_without = per_event(args, nodes, kind)
                # The difference spread over the 1-in-8 events that were replaced.
                extra_ir = (ir - ir_without) * 8
                extra_misses = (misses - misses_without) * 8
                label = f"{name}, beyond a heartbeat"
                print(f"{nodes:>7} {label:<34} {extra_ir:>12,.0f} {extra_misses:>10.1f}")


if __name__ == "__main__":
    main()
