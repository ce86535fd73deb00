"""Transport benchmark: 1 master + 4 workers as separate processes on loopback.

Measures, in one run:

1. raw: events/s through ONE batched libp2p stream between two processes: the real cost of
   moving the benchmark's events, and nothing else. Precisely: the source sends `SubmitBatch`
   frames exactly as a worker's submit stream does -- `WorkerConfig.batch_events` (2048)
   pre-encoded `NodeHeartbeat` events of the same size per frame (a 52-character node id,
   as in the end-to-end run), each frame one length-prefixed write over Noise + Yamux --
   and the sink reads every frame and decodes it with the protocol's decoder into
   `SeqEvent`/`Event` objects, as the master does. No indexing, no disk, no fan-out. Both
   processes use the node processes' GC settings (`nethost.tune_gc`). The rate is counted
   from the first frame received to the last.
2. throughput: events/s from emission on 4 workers to durable-and-indexed at the master
   (the real `cluster master`: every event fsync-durable in a group commit before it is
   acknowledged, deduplicated by (origin, seq), broadcast to and applied on all 4 replicas).
   Workers emit as fast as the pipeline takes: each keeps its durable outbox topped up to
   `--backlog` unacknowledged events (emission, a write(2) per event, is part of the cost).
   The rate is the events in the master's log over the span of their master timestamps.
3. latency: at a fixed offered load of 1,000 events/s in total, p50/p99 from emission on a
   worker to applied on ALL 4 workers' replicas.

Workers here embed `cluster.worker.client.Worker` in a small child process that records
when it emitted each seq and when each seq became applied on its replica (CLOCK_MONOTONIC
is system-wide, so times compare across processes). Usage: python bench/transport_bench.py
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORKERS = int(__import__("os").environ.get("BENCH_WORKERS", "4"))
#: Closed-loop emission: at most this many events per worker per wake-up (1 ms).
BURST = 2048


def _percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


# ------------------------------------------------------------------------------ child: worker
def bench_worker(args: argparse.Namespace) -> None:
    import anyio

    from cluster.shared.events import NodeHeartbeat
    from cluster.shared.state import State
    from cluster.worker.client import Worker, WorkerConfig

    secret = Path(args.secret).read_bytes().strip()
    worker = Worker(
        Path(args.data_dir),
        args.master,
        WorkerConfig(secret=secret, heartbeats=False, write_digest=False),
    )
    emits: dict[int, float] = {}
    acks: list[tuple[int, float]] = []
    applied: dict[str, list[tuple[int, float]]] = {}
    watched: set[str] = set(args.watch.split(",")) if args.watch else set()
    cpu: dict[str, float] = {}  # CPU seconds this process spent while emitting

    def on_change(state: State) -> None:
        now = time.monotonic()
        for origin in watched:
            seq = state.last_seq(origin)
            rows = applied.setdefault(origin, [])
            if seq and (not rows or rows[-1][0] < seq):
                rows.append((seq, now))

    worker.add_listener(on_change)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            with anyio.fail_after(120):  # ready = caught up with the log, not just connected
                while worker.phase != "connected":
                    await anyio.sleep(0.02)
            Path(args.ready).write_text(worker.node_id)
            while not Path(args.go).exists():
                await anyio.sleep(0.01)
            start = time.monotonic()
            cpu_start = time.process_time()
            sent = 0
            event = NodeHeartbeat(node_id=worker.node_id)
            # Paced emission: `rate` per second for `duration` seconds; with no rate, as fast
            # as the pipeline takes them: the outbox is kept topped up to `backlog` waiting.
            while (elapsed := time.monotonic() - start) < args.duration:
                if args.rate:
                    due = int(elapsed * args.rate)
                else:
                    due = sent + min(args.backlog - len(worker.outbox), BURST)
                while sent < due:
                    now = time.monotonic()
                    emits[worker.emit_seq(event)] = now
                    sent += 1
                if not acks or acks[-1][0] < worker.outbox.acked:
                    acks.append((worker.outbox.acked, time.monotonic()))
                # Sleep until the next event is due (at least 1 ms): the harness should not
                # spend the CPU it measures on polling.
                next_due = start + (sent + 1) / args.rate if args.rate else 0.0
                await anyio.sleep(max(0.001, next_due - time.monotonic()))
            cpu["emission"] = time.process_time() - cpu_start
            # Let the tail drain (acks and replicas), bounded.
            with anyio.move_on_after(args.drain):
                while len(worker.outbox):
                    await anyio.sleep(0.02)
                await anyio.sleep(1.0)
            worker.stop()
            await worker.wait_finished()
        worker.close()

    anyio.run(main, backend="trio")
    Path(args.out).write_text(
        json.dumps(
            {
                "node_id": worker.node_id,
                "emits": emits,
                "applied": applied,
                "acks": acks,
                "cpu": cpu.get("emission", 0.0),
            }
        )
    )


# ------------------------------------------------------------------------------ child: raw source
def raw_source(args: argparse.Namespace) -> None:
    import anyio
    import msgspec

    from cluster.net import host as nethost
    from cluster.net.framing import encode_frame
    from cluster.net.identity import key_pair_from_seed
    from cluster.net.protocol import SeqEventRaw, SubmitBatchRaw, encode, encode_raw
    from cluster.shared.events import NodeHeartbeat
    from cluster.worker.client import WorkerConfig

    nethost.tune_gc()
    batch_events = WorkerConfig().batch_events
    kp = key_pair_from_seed(b"\x02" * 32)
    payload = msgspec.Raw(encode_raw(NodeHeartbeat(node_id="12D3KooW" + "x" * 44)))

    async def main() -> None:
        async with nethost.running_host(kp) as h:
            peer = await nethost.dial(
                h, nethost.parse_multiaddr(args.raw_source, need_peer=True), 10
            )
            fs = await nethost.open_stream(h, peer, "/bench/raw/1", 10)
            seq = 0
            while seq < args.events:
                batch = SubmitBatchRaw(
                    events=[SeqEventRaw(seq + i + 1, payload) for i in range(batch_events)]
                )
                seq += batch_events
                await fs.send_bytes(encode_frame(encode(batch)), 30)
            await fs.recv(60)  # the sink's final answer
            await fs.close()

    anyio.run(main, backend="trio")


async def raw_sink(events: int) -> float:
    """Run a sink host, start a source process, return events/s over the stream."""
    import anyio

    from cluster.net import host as nethost
    from cluster.net.identity import key_pair_from_seed
    from cluster.net.protocol import Ack, decode

    nethost.tune_gc()
    kp = key_pair_from_seed(b"\x01" * 32)
    result: dict[str, float] = {}
    done = anyio.Event()

    async def handle(fs: nethost.FramedStream) -> None:
        got = first = 0
        t0 = 0.0
        while got < events:
            frame = await fs.recv_frame(30)
            msg = decode(frame)  # decode like the master does (validates every event)
            got += len(msg.events)  # type: ignore[union-attr]
            if not t0:
                t0 = time.perf_counter()
                first = got
        result["rate"] = (got - first) / (time.perf_counter() - t0)
        await fs.send(Ack(seq=got), 10)
        done.set()

    async with nethost.running_host(kp, ["/ip4/127.0.0.1/tcp/0"]) as h:
        h.set_stream_handler("/bench/raw/1", nethost.safe_handler(handle, "raw"))
        addr = nethost.full_addrs(h)[0]
        cmd = [sys.executable, __file__, "--raw-source", addr, "--events", str(events)]
        proc = subprocess.Popen(cmd)
        with anyio.fail_after(120):
            await done.wait()
        proc.wait(timeout=30)
    return result["rate"]


# ------------------------------------------------------------------------------ orchestration
def run_phase(
    root: Path,
    name: str,
    rate_per_worker: float,
    duration: float,
    addr: str,
    secret: Path,
    backlog: int,
    master_pid: int | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """The workers' results, and the master's CPU seconds over the `duration` after go."""
    phase = root / name
    phase.mkdir()
    go = phase / "go"
    procs, outs, readies = [], [], []
    for k in range(WORKERS):
        out, ready = phase / f"w{k}.json", phase / f"w{k}.ready"
        cmd = [sys.executable, __file__, "--bench-worker", "--data-dir", str(root / f"w{k}")]
        cmd += ["--master", addr, "--secret", str(secret), "--rate", str(rate_per_worker)]
        cmd += ["--duration", str(duration), "--out", str(out), "--ready", str(ready)]
        cmd += ["--backlog", str(backlog)]
        cmd += ["--go", str(go), "--watch", ",".join(_ids(root))]
        procs.append(subprocess.Popen(cmd))
        outs.append(out)
        readies.append(ready)
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in readies):
        if time.monotonic() > deadline:
            raise SystemExit(f"{name}: workers did not catch up within 120 s")
        time.sleep(0.05)
    time.sleep(1.0)  # let every replica finish its catch-up
    master_cpu = 0.0
    if master_pid is not None:
        import psutil

        master = psutil.Process(master_pid)
        before = sum(master.cpu_times()[:2])
        go.write_text("go")
        time.sleep(duration)
        master_cpu = sum(master.cpu_times()[:2]) - before
    else:
        go.write_text("go")
    for p in procs:
        p.wait(timeout=duration + 120)
    return [json.loads(o.read_text()) for o in outs], master_cpu


def _ids(root: Path) -> list[str]:
    from cluster.net.identity import load_identity

    return [load_identity(root / f"w{k}")[1] for k in range(WORKERS)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bench-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--raw-source", help=argparse.SUPPRESS)
    for opt in ("--data-dir", "--master", "--secret", "--out", "--ready", "--go", "--watch"):
        parser.add_argument(opt, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--drain", type=float, default=20.0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--backlog",
        type=int,
        default=8192,
        help="throughput phase: events each worker keeps waiting in its outbox",
    )
    parser.add_argument("--verbose", action="store_true", help="per worker pair latency")
    parser.add_argument("--events", type=int, default=300_000, help="events for the raw run")
    parser.add_argument(
        "--phases", default="raw,throughput,latency", help="comma-separated subset to run"
    )
    args = parser.parse_args()
    if args.bench_worker:
        return bench_worker(args)
    if args.raw_source:
        return raw_source(args)

    import anyio

    phases = set(args.phases.split(","))
    root = Path(tempfile.mkdtemp(prefix="transport-bench-"))
    print(f"transport bench in {root} ({WORKERS} workers, separate processes, loopback)")
    raw = 0.0
    if "raw" in phases:
        raw = anyio.run(raw_sink, args.events, backend="trio")
        print(
            f"raw batched libp2p stream     : {raw:>10,.0f} events/s (1 stream, SubmitBatch frames)"
        )

    mdir = root / "master"
    master = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster",
            "master",
            "--data-dir",
            str(mdir),
            "--log-level",
            "WARNING",
            # No member log budget: the bench's workers emit as fast as the pipeline takes
            # (~2.5 MB/s each), beyond the default 1 MiB/s once past the 64 MiB burst, and
            # the bench measures the transport, not the budget.
            "--member-log-rate",
            str(1 << 40),
            "--member-log-burst",
            str(1 << 40),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (mdir / "master.addr").exists():
            if time.monotonic() > deadline or master.poll() is not None:
                raise SystemExit("master did not start")
            time.sleep(0.05)
        addr = (mdir / "master.addr").read_text().strip()
        secret = mdir / "cluster.secret"
        if "throughput" in phases:
            throughput_phase(root, mdir, addr, secret, args, raw, master.pid)
        if "latency" in phases:
            latency_phase(root, addr, secret, args)
    finally:
        master.terminate()
        master.wait(timeout=30)


def throughput_phase(
    root: Path,
    mdir: Path,
    addr: str,
    secret: Path,
    args: argparse.Namespace,
    raw: float,
    master_pid: int,
) -> None:
    """Offer more than the pipeline takes; count what the master's log holds."""
    from cluster.shared.eventlog import EventLog
    from cluster.shared.store import decode_record

    results, master_cpu = run_phase(
        root, "throughput", 0, args.duration, addr, secret, args.backlog, master_pid
    )
    ids = {r["node_id"] for r in results}
    emitted = sum(len(r["emits"]) for r in results)
    log = EventLog.open(mdir / "log", readonly=True)
    times = [
        ie.master_time_ms for i, p in log.read_from(1) if (ie := decode_record(i, p)).origin in ids
    ]
    log.close()
    span = (max(times) - min(times)) / 1000
    e2e = len(times) / span
    print(
        f"end-to-end, emission -> durable+indexed: {e2e:>10,.0f} events/s "
        f"({len(times):,} of {emitted:,} emitted, over {span:.1f} s)"
    )
    if raw:
        print(f"  ratio to raw stream: {e2e / raw:.0%} (target >= 50%)")
    # CPU per event over the emission window: the 2-core budget all 5 processes share.
    in_window = e2e * args.duration
    worker_us = [r["cpu"] / in_window * 1e6 for r in results]
    total = master_cpu / in_window * 1e6 + sum(worker_us)
    print(
        f"  CPU per indexed event: master {master_cpu / in_window * 1e6:.1f} us, workers "
        + " / ".join(f"{u:.1f}" for u in worker_us)
        + f" us; total {total:.1f} us (2 cores: at most {2e6 / total:,.0f} events/s)"
    )


def latency_phase(root: Path, addr: str, secret: Path, args: argparse.Namespace) -> None:
    """At a fixed 1,000 events/s in total: emission -> applied on every replica."""
    results, _ = run_phase(root, "latency", 1000 / WORKERS, args.duration, addr, secret, 0)
    lat = []
    missing = 0
    for src in results:
        origin = src["node_id"]
        # Per replica: the seqs of `origin` seen applied, ascending, and when.
        seen = [
            (
                [s for s, _ in d["applied"].get(origin, [])],
                [t for _, t in d["applied"].get(origin, [])],
            )
            for d in results
        ]
        for seq_text, t_emit in src["emits"].items():
            seq = int(seq_text)
            worst = 0.0
            for seqs, ts in seen:
                k = bisect.bisect_left(seqs, seq)
                if k == len(seqs):
                    missing += 1
                    break
                worst = max(worst, ts[k] - t_emit)
            else:
                lat.append(worst * 1000)
    if args.verbose:
        for src in results:
            seqs = [a[0] for a in src["acks"]]
            ls = [
                (src["acks"][k][1] - t) * 1000
                for q, t in src["emits"].items()
                if (k := bisect.bisect_left(seqs, int(q))) < len(seqs)
            ]
            print(f"  {src['node_id'][-6:]} acked: p50 {statistics.median(ls):.1f} ms")
        for src in results:
            for d in results:
                rows = d["applied"].get(src["node_id"], [])
                seqs = [r[0] for r in rows]
                ls = [
                    (rows[k][1] - t) * 1000
                    for q, t in src["emits"].items()
                    if (k := bisect.bisect_left(seqs, int(q))) < len(seqs)
                ]
                pair = f"{src['node_id'][-6:]} -> {d['node_id'][-6:]}"
                print(f"  {pair}: p50 {statistics.median(ls):.1f} ms")
    print(
        f"latency at 1,000 ev/s, emission -> applied on all {WORKERS} workers: "
        f"p50 {statistics.median(lat):.1f} ms, p99 {_percentile(lat, 99):.1f} ms, "
        f"max {max(lat):.1f} ms over {len(lat):,} events ({missing} not seen everywhere)"
    )


if __name__ == "__main__":
    main()
