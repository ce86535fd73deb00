"""Real processes on 127.0.0.1: at an epoch turn, a session that stays on the same nodes keeps
its loaded runners (carried over, not stopped and loaded again).

A master with 6 s epochs and two workers serve one 2-slot session. Placement is sticky, so
the next epoch's devshard lands on the same nodes; each worker must hand its loaded runner to
the new devshard: the old runner id ends `stopped` ("carried over to ..."), and the new one
starts at `ready` -- never `pending` or `loading`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cluster_procs import Proc, start_master
from cluster_scenarios import Deadline, MasterLog, cluster_cli, node_id_of, start_full_worker

from cluster.shared.events import (
    DevshardPlaced,
    RunnerSelfTestCompleted,
    RunnerStatus,
    RunnerStatusUpdated,
)
from cluster.shared.state import runner_id_for

pytestmark = pytest.mark.slow

CONFIG = """
[planner]
epoch_length_ms = 6000
"""


def _statuses(log: MasterLog, runner_id: str, node_id: str) -> list[RunnerStatusUpdated]:
    return [
        e
        for _, e in log.of(RunnerStatusUpdated, lambda e: e.runner_id == runner_id)
        if e.node_id == node_id
    ]


def _passed_on(node_id: str) -> Callable[[RunnerSelfTestCompleted], bool]:
    return lambda e: e.node_id == node_id and e.passed


def _running(runner_id: str) -> Callable[[RunnerStatusUpdated], bool]:
    return lambda e: e.runner_id == runner_id and e.status is RunnerStatus.RUNNING


def test_runners_are_carried_over_across_an_epoch_turn(tmp_path: Path) -> None:
    budget = Deadline(120)
    logs = tmp_path / "logs"
    logs.mkdir()
    mdir = tmp_path / "master"
    config = tmp_path / "cluster.toml"
    config.write_text(CONFIG, encoding="utf-8")
    master, _addr = start_master(mdir, logs, "--config", str(config), "--plan-interval", "0.5")
    procs: dict[str, Proc] = {}
    log = MasterLog(mdir)
    try:
        for name in "ab":
            procs[name] = start_full_worker(name, tmp_path / f"w{name}", logs, mdir)
        ids = {node_id_of(p, budget.left(30)) for p in procs.values()}
        for node_id in ids:  # both eligible before the session is placed, so it spreads
            log.wait_for(
                RunnerSelfTestCompleted,
                _passed_on(node_id),
                budget.left(60),
                f"{node_id}'s runner self-test",
            )
        created = cluster_cli(
            "session", "--data-dir", str(mdir), "create", "--slots", "2", "--memory-mb", "256"
        )
        assert created.returncode == 0, created.stderr
        _, first = log.wait_for(
            DevshardPlaced,
            lambda e: e.reason == "epoch" and len(e.assignments) == 2,
            budget.left(60),
            "a first devshard",
        )
        for a in first.assignments:
            rid = runner_id_for(first.devshard_id, a.slot)
            log.wait_for(
                RunnerStatusUpdated,
                _running(rid),
                budget.left(30),
                f"{rid} running",
            )
        _, second = log.wait_for(
            DevshardPlaced,
            lambda e: e.reason == "epoch" and e.epoch == first.epoch + 1,
            budget.left(30),
            "the next epoch's devshard",
        )
        for a in second.assignments:
            rid = runner_id_for(second.devshard_id, a.slot)
            log.wait_for(
                RunnerStatusUpdated,
                _running(rid),
                budget.left(30),
                f"{rid} running",
            )
    finally:
        codes = {name: p.stop() for name, p in procs.items() if p.popen.poll() is None}
        codes["master"] = master.stop()
    assert all(code == 0 for code in codes.values()), codes

    before = {a.node_id: a.slot for a in first.assignments}
    after = {a.node_id: a.slot for a in second.assignments}
    assert len(before) == 2, f"the session did not spread over both nodes: {first}"
    assert set(before) == set(after) == ids, "placement was not sticky: nothing to carry over"
    for node_id in ids:
        old_id = runner_id_for(first.devshard_id, before[node_id])
        new_id = runner_id_for(second.devshard_id, after[node_id])
        old = _statuses(log, old_id, node_id)
        new = _statuses(log, new_id, node_id)
        assert [e.status for e in old][:4] == [
            RunnerStatus.PENDING,
            RunnerStatus.LOADING,
            RunnerStatus.READY,
            RunnerStatus.RUNNING,
        ]
        assert old[-1].status is RunnerStatus.STOPPED
        assert old[-1].reason == f"carried over to {new_id} (loaded, not restarted)"
        assert RunnerStatus.STOPPING not in [e.status for e in old]
        assert [e.status for e in new][:2] == [RunnerStatus.READY, RunnerStatus.RUNNING]
