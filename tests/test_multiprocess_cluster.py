"""Must-show of issue 3, with real processes on 127.0.0.1: convergence, kill -9 of a worker
and of the master under load (nothing acknowledged lost, nothing duplicated)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cluster_procs import (
    Proc,
    assert_gap_free,
    digest_at,
    read_digest,
    read_log,
    start_master,
    start_worker,
    wait_until,
)

from cluster.worker.outbox import Outbox, read_acked

pytestmark = pytest.mark.slow


def _node_id(proc: Proc) -> str:
    line = wait_until(
        lambda: next((ln for ln in proc.log_text().splitlines() if ln.startswith("worker ")), None),
        30,
        f"{proc.name} to print its node id",
    )
    return str(line.split()[1])


def _acked(data_dir: Path) -> int:
    d = read_digest(data_dir)
    return int(d["acked_seq"]) if d else 0


def _check_replicas(master_dir: Path, worker_dirs: list[Path], min_idx: int) -> None:
    """Each replica's (idx, digest) equals the master's log folded to that idx."""
    for wdir in worker_dirs:
        d = read_digest(wdir)
        assert d is not None, f"{wdir} wrote no digest.json"
        assert d["idx"] >= min_idx, f"{wdir} stuck at {d['idx']} (< {min_idx})"
        assert d["digest"] == digest_at(master_dir, d["idx"]), f"{wdir} diverged at {d['idx']}"


def _check_nothing_lost(
    worker_dirs: list[Path], node_ids: list[str], counts: dict[str, int]
) -> None:
    """Every seq a worker ever issued is in the log (which holds exactly 1..n, see
    assert_gap_free) or still waits in its outbox (acked+1..last, with acked <= n): none
    lost, none twice. Events durable at the master whose ack was cut off by the stop are
    still waiting; the next hello's last_seq clears them without resending."""
    for wdir, nid in zip(worker_dirs, node_ids, strict=True):
        box = Outbox.open(wdir / "outbox")
        try:
            n = counts.get(nid, 0)
            waiting = [seq for seq, _ in box.pending_after(0, 1 << 30)]
            assert box.acked <= n <= box.last_seq, (box.acked, n, box.last_seq)
            assert waiting == list(range(box.acked + 1, box.last_seq + 1)), (
                f"{wdir}: outbox waits with a gap: {waiting[:5]}... (acked {box.acked})"
            )
        finally:
            box.close()


def test_three_workers_converge_and_survive_worker_kill9(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    mdir = tmp_path / "master"
    secret = tmp_path / "secret"
    secret.write_text("a-cluster-secret-for-tests-0123456789\n")
    master, addr = start_master(mdir, logs, "--cluster-secret-file", str(secret))
    wdirs = [tmp_path / f"w{k}" for k in range(3)]
    procs = [
        start_worker(
            f"w{k}",
            wdirs[k],
            logs,
            addr,
            "--cluster-secret-file",
            str(secret),
            *(["--load", "400"] if k == 0 else []),
        )
        for k in range(3)
    ]
    try:
        ids = [_node_id(p) for p in procs]
        wait_until(lambda: all(_acked(w) > 5 for w in wdirs), 60, "all workers acknowledged")
        # kill -9 the loaded worker mid-stream, then restart it from its data dir.
        acked_before = wait_until(lambda: _acked(wdirs[0]) > 300 and _acked(wdirs[0]), 60, "load")
        procs[0].kill9()
        procs[0] = start_worker("w0b", wdirs[0], logs, addr, "--cluster-secret-file", str(secret))
        assert _node_id(procs[0]) == ids[0], "node id changed across restart"
        wait_until(lambda: _acked(wdirs[0]) > acked_before + 5, 60, "restarted worker acked")
        mark = read_digest(mdir)
        assert mark is not None
        wait_until(
            lambda: all((read_digest(w) or {}).get("idx", 0) >= mark["idx"] for w in wdirs),
            60,
            "replicas caught up",
        )
    finally:
        codes = [p.stop() for p in procs]
        codes.append(master.stop())
    assert codes == [0, 0, 0, 0], codes
    events = read_log(mdir)
    counts = assert_gap_free(events)
    _check_nothing_lost(wdirs, ids, counts)
    _check_replicas(mdir, wdirs, mark["idx"])


def test_master_kill9_under_load_keeps_every_acknowledged_event(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    mdir = tmp_path / "master"
    master, addr = start_master(mdir, logs)  # creates master/cluster.secret
    secret = str(mdir / "cluster.secret")
    wdirs = [tmp_path / f"w{k}" for k in range(2)]
    procs = [
        start_worker(
            f"w{k}", wdirs[k], logs, addr, "--cluster-secret-file", secret, "--load", "300"
        )
        for k in range(2)
    ]
    try:
        ids = [_node_id(p) for p in procs]
        wait_until(lambda: all(_acked(w) > 400 for w in wdirs), 60, "load acknowledged")
        master.kill9()
        # What the workers hold as acknowledged right after the crash must all be in the log.
        # (Read from the files: each outbox is locked by its running worker.)
        acked_seq = {nid: read_acked(w / "outbox") for nid, w in zip(ids, wdirs, strict=True)}
        in_log = assert_gap_free(read_log(mdir))
        for nid, seq in acked_seq.items():
            assert in_log.get(nid, 0) >= seq, f"{nid}: acked {seq}, log holds {in_log.get(nid)}"
        port_addr = addr.split("/p2p/")[0]
        master, addr2 = start_master(mdir, logs, "--listen", port_addr)
        assert addr2 == addr
        wait_until(
            lambda: all(_acked(w) > acked_seq[n] + 100 for n, w in zip(ids, wdirs, strict=True)),
            60,
            "workers reconnected and acknowledged again",
        )
        mark = read_digest(mdir)
        wait_until(
            lambda: (
                mark is not None
                and all((read_digest(w) or {}).get("idx", 0) >= mark["idx"] for w in wdirs)
            ),
            60,
            "replicas caught up after master restart",
        )
    finally:
        codes = [p.stop() for p in procs]
        codes.append(master.stop())
    assert codes == [0, 0, 0], codes
    counts = assert_gap_free(read_log(mdir))
    _check_nothing_lost(wdirs, ids, counts)
    assert mark is not None
    _check_replicas(mdir, wdirs, mark["idx"])
