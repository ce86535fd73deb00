"""Must-show of issue 6: the logs of a normal join say nothing alarming.

A master and two workers started as an operator would (info gathering, runner self-test,
default heartbeats) go through connecting, catching up, self-testing, waiting for placement
and serving a session, and are then stopped cleanly. Normal onboarding is INFO: neither
process's output may hold a WARNING, an ERROR or a traceback, before or after the stop.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cluster_procs import Proc, start_master
from cluster_scenarios import (
    Deadline,
    MasterLog,
    cluster_cli,
    node_id_of,
    warnings_and_errors,
)

from cluster.shared.events import RunnerSelfTestCompleted, WorkReported

pytestmark = pytest.mark.slow


def _worker(name: str, data_dir: Path, log_dir: Path, master_dir: Path) -> Proc:
    """`cluster worker` with nothing but what a host must give it (defaults otherwise)."""
    args = ["worker", "--data-dir", str(data_dir), "--master", str(master_dir / "master.addr")]
    return Proc(name, [*args, "--cluster-secret-file", str(master_dir / "cluster.secret")], log_dir)


def _of_node(node_id: str) -> Callable[[RunnerSelfTestCompleted | WorkReported], bool]:
    return lambda e: e.node_id == node_id


def _check_quiet(procs: list[Proc]) -> None:
    for proc in procs:
        loud = warnings_and_errors(proc.log_text())
        assert not loud, f"{proc.name} logged above INFO during a normal join:\n" + "\n".join(loud)


def test_normal_join_logs_no_warning_or_error(tmp_path: Path) -> None:
    budget = Deadline(90)
    logs = tmp_path / "logs"
    logs.mkdir()
    mdir = tmp_path / "master"
    master, _ = start_master(mdir, logs, "--epoch-length", "1m", "--http", "127.0.0.1:0")
    procs: list[Proc] = []
    try:
        # A session that waits for capacity: "unplaced" is normal before any node joins.
        created = cluster_cli(
            "session", "--data-dir", str(mdir), "create", "--slots", "2", "--memory-mb", "256"
        )
        assert created.returncode == 0, created.stderr
        procs = [_worker(f"w{k}", tmp_path / f"w{k}", logs, mdir) for k in range(2)]
        ids = [node_id_of(p, budget.left(30)) for p in procs]
        log = MasterLog(mdir)
        for nid in ids:
            _, test = log.wait_for(
                RunnerSelfTestCompleted,
                _of_node(nid),
                budget.left(40),
                f"the self-test of {nid}",
            )
            assert test.passed, test
        for nid in ids:
            log.wait_for(WorkReported, _of_node(nid), budget.left(40), "work")
        # The check below is not vacuous: each process did log its progress at INFO.
        assert " INFO " in master.log_text() and "joined" in master.log_text()
        assert all("INFO cluster.worker.client: connected to master" in p.log_text() for p in procs)
        _check_quiet([master, *procs])
    finally:
        # A whole cluster stops master first (docs/operations.md): workers stopped first say
        # goodbye, and the master rightly warns that each forfeits its epoch.
        codes = [master.stop()]
        codes += [p.stop() for p in procs]
    assert codes == [0] * len(codes), codes
    _check_quiet([master, *procs])
