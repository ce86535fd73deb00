"""Must-show of issue 5 with real processes on 127.0.0.1: a maintenance window end to end.

Three workers (2 slots each) serve one 4-slot session on 20 s epochs. Worker A schedules a
window through `cluster maintenance schedule` on its own host; the epoch that crosses the
window's start is placed on B and C only. At the start A stops (offline for maintenance),
and B simply dies (SIGKILL). A's silence is excused (not disconnected, no penalty), B's is
not (unexcused disconnect, punished payout). A restarts, its reconnect finishes the
window by itself, and the next epoch places A again. Replaying the master's log gives the
master's digest, the master's whole state (its /api/state) and the same window history.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from cluster_procs import Proc, read_digest, start_master, wait_until
from cluster_scenarios import (
    Deadline,
    MasterLog,
    cluster_cli,
    http_get,
    node_id_of,
    start_full_worker,
)

from cluster.shared.events import (
    DevshardPlaced,
    EpochSettled,
    EpochStarted,
    IndexedEvent,
    MaintenanceCancelled,
    MaintenanceDrainStarted,
    MaintenanceFinished,
    MaintenanceOverrun,
    MaintenanceScheduled,
    MaintenanceStarted,
    NodeDisconnected,
)

pytestmark = pytest.mark.slow

EPOCH_MS = 20_000
#: The window starts this long into the epoch after the one it is scheduled in, so that
#: epoch crosses the start (and must not be placed on the node).
INTO_EPOCH_MS = 7_000
CONFIG = """
[planner]
epoch_length_ms = 20000
stale_cycles = 3

[maintenance]
min_lead = "5s"
drain_lead = "20s"
max_duration = "2m"
"""


def _holders(ev: DevshardPlaced) -> set[str]:
    return {a.node_id for a in ev.assignments}


def _epoch_at(events: list[IndexedEvent], idx: int) -> EpochStarted:
    """The epoch current at log index `idx` (the last EpochStarted before it)."""
    started = [ie.event for ie in events if ie.idx < idx and isinstance(ie.event, EpochStarted)]
    assert started, f"no epoch had started before index {idx}"
    return started[-1]


def test_maintenance_window_end_to_end(tmp_path: Path) -> None:
    budget = Deadline(170)
    logs = tmp_path / "logs"
    logs.mkdir()
    mdir = tmp_path / "master"
    config = tmp_path / "cluster.toml"
    config.write_text(CONFIG, encoding="utf-8")
    master, _addr = start_master(
        mdir,
        logs,
        *("--config", str(config), "--plan-interval", "0.5", "--http", "127.0.0.1:0"),
    )
    wdirs = {name: tmp_path / f"w{name}" for name in "abc"}
    procs: dict[str, Proc] = {}
    log = MasterLog(mdir)
    try:
        url = wait_until(
            lambda: (mdir / "http.url").exists() and (mdir / "http.url").read_text().strip(),
            budget.left(30),
            "the master's http.url",
        )
        for name in "abc":
            procs[name] = start_full_worker(name, wdirs[name], logs, mdir)
        ids = {name: node_id_of(p, budget.left(30)) for name, p in procs.items()}
        a, b, c = ids["a"], ids["b"], ids["c"]
        created = cluster_cli(
            "session", "--data-dir", str(mdir), "create", "--slots", "4", "--memory-mb", "256"
        )
        assert created.returncode == 0, created.stderr
        log.wait_for(
            DevshardPlaced, lambda e: len(e.assignments) == 4, budget.left(60), "a first devshard"
        )

        # --- A schedules its window from its own host, to start INTO_EPOCH_MS into the next
        # epoch (its current devshard ends before that start, so committed work allows it).
        def current_epoch_with_time_left() -> EpochStarted | None:
            epochs = [e for _, e in log.of(EpochStarted)]
            if epochs and epochs[-1].end_ms - time.time() * 1000 > 4_000:
                return epochs[-1]
            log.refresh()
            return None

        epoch = wait_until(current_epoch_with_time_left, budget.left(30), "room in an epoch")
        in_s = math.ceil((epoch.end_ms + INTO_EPOCH_MS - time.time() * 1000) / 1000)
        window_args = ("--in", f"{in_s}s", "--duration", "40s")
        checked = cluster_cli("maintenance", "--data-dir", str(wdirs["a"]), "check", *window_args)
        assert checked.returncode == 0 and "allowed" in checked.stdout, checked
        scheduled = cluster_cli(
            "maintenance", "--data-dir", str(wdirs["a"]), "schedule", *window_args
        )
        assert scheduled.returncode == 0, scheduled.stdout + scheduled.stderr
        assert "scheduled window" in scheduled.stdout, scheduled.stdout
        ie_sched, sched = log.wait_for(
            MaintenanceScheduled, lambda e: e.node_id == a, 10, "the window in the log"
        )
        window_id, start_ms = sched.window_id, sched.start_ms
        assert epoch.end_ms < start_ms < epoch.end_ms + EPOCH_MS, "the window misses its epoch"

        # --- The epoch that crosses the start is placed, but not on A.
        _, crossing = log.wait_for(
            EpochStarted,
            lambda e: e.start_ms <= start_ms < e.end_ms,
            budget.left(40),
            "the epoch that crosses the window start",
        )
        _, crossing_shard = log.wait_for(
            DevshardPlaced,
            lambda e: e.epoch == crossing.epoch and e.reason == "epoch",
            10,
            "the crossing epoch's devshard",
        )
        assert _holders(crossing_shard) == {b, c}, "the crossing epoch was placed on A"

        # --- At the start A goes offline for maintenance, and B simply dies.
        log.wait_for(
            MaintenanceStarted, lambda e: e.window_id == window_id, budget.left(30), "the start"
        )
        assert procs["a"].stop() == 0
        procs["b"].kill9()
        ie_b_gone, b_gone = log.wait_for(
            NodeDisconnected, lambda e: e.node_id == b, budget.left(20), "B disconnected"
        )
        assert not b_gone.excused, b_gone
        # A went quiet before B died, so it has been silent for longer than the K cycles that
        # disconnected B: offline for maintenance, it is shown so, and is not disconnected.
        rows = {n["node_id"]: n for n in json.loads(http_get(url + "api/status"))["nodes"]}
        assert rows[a]["status"] == "maintenance", rows[a]
        assert rows[b]["status"] == "disconnected", rows[b]

        # --- A comes back within its window: its reconnect finishes the window by itself.
        procs["a"] = start_full_worker("a-restarted", wdirs["a"], logs, mdir)
        assert node_id_of(procs["a"], budget.left(30)) == a, "A's node id changed on restart"
        ie_fin, fin = log.wait_for(
            MaintenanceFinished, lambda e: e.window_id == window_id, budget.left(30), "the finish"
        )
        assert fin.how == "reconnect", fin

        # --- The next epoch places A again; B's epoch is settled with B punished.
        back_epoch = _epoch_at(log.events, ie_fin.idx).epoch + 1
        _, back = log.wait_for(
            EpochStarted,
            lambda e: e.epoch == back_epoch,
            budget.left(40),
            "the epoch after the window",
        )
        _, back_shard = log.wait_for(
            DevshardPlaced,
            lambda e: e.epoch == back.epoch and e.reason == "epoch",
            10,
            "the devshard of the epoch after the window",
        )
        b_epoch = _epoch_at(log.events, ie_b_gone.idx).epoch
        log.wait_for(EpochSettled, lambda e: e.epoch == b_epoch, budget.left(40), "B's settlement")

        # --- Replay while the master runs: its digest and its whole state, reproduced.
        mark = read_digest(mdir)
        assert mark is not None
        replayed = cluster_cli("replay", str(mdir), "--until", str(mark["idx"]), "--digest")
        assert replayed.returncode == 0, replayed.stderr
        assert replayed.stdout.strip() == mark["digest"], "replay disagrees with the master"
        live = json.loads(http_get(url + "api/state"))
        as_json = cluster_cli(
            "replay", str(mdir), "--until", str(live["last_applied"]), "--json", "--no-snapshot"
        )
        assert as_json.returncode == 0, as_json.stderr
        refolded = json.loads(as_json.stdout)
        assert refolded["windows"] == live["windows"], "window history differs on replay"
        assert refolded == live, "replayed state differs from the master's"
    finally:
        codes = {name: p.stop() for name, p in procs.items() if p.popen.poll() is None}
        codes["master"] = master.stop()
    assert all(code == 0 for code in codes.values()), codes

    # What is judged: the log up to the replayed state. Stopping the processes afterwards
    # makes the master disconnect the quiet workers, which is teardown, not the scenario.
    events = MasterLog(mdir).refresh()[: live["last_applied"]]
    finished_at = ie_fin.idx

    # A was drained: nothing placed on it that would cross the start while its window was open.
    for ie in events:
        if isinstance(ie.event, DevshardPlaced) and ie_sched.idx < ie.idx < finished_at:
            assert a not in _holders(ie.event) or ie.event.ends_ms <= start_ms, ie
    assert a in _holders(back_shard), "A was not placed again in the epoch after its window"
    assert len(back_shard.assignments) == 4

    # A's window went through its whole lifecycle, once, and closed on reconnect.
    lifecycle = [
        (ie, type(ie.event))
        for ie in events
        if isinstance(
            ie.event,
            MaintenanceScheduled
            | MaintenanceDrainStarted
            | MaintenanceStarted
            | MaintenanceFinished
            | MaintenanceCancelled
            | MaintenanceOverrun,
        )
        and ie.event.window_id == window_id
    ]
    assert [kind for _, kind in lifecycle] == [
        MaintenanceScheduled,
        MaintenanceDrainStarted,
        MaintenanceStarted,
        MaintenanceFinished,
    ]
    window = refolded["windows"][window_id]
    assert window["state"] == "completed" and window["outcome"] == "reconnect", window
    assert window["drain_started_ms"] == lifecycle[1][0].master_time_ms
    assert window["started_ms"] == lifecycle[2][0].master_time_ms
    assert window["closed_ms"] == lifecycle[3][0].master_time_ms

    # Offline for maintenance is neither a disconnect nor a failure, and is never punished.
    a_gone = [
        ie for ie in events if isinstance(ie.event, NodeDisconnected) and ie.event.node_id == a
    ]
    assert a_gone == [], a_gone
    settlements = [ie.event for ie in events if isinstance(ie.event, EpochSettled)]
    assert any(s.epoch == crossing.epoch for s in settlements), "the crossing epoch never settled"
    for settled in settlements:
        for payout in settled.payouts:
            if payout.node_id == a:
                assert not payout.punished, f"A punished in epoch {settled.epoch}: {payout}"

    # B died: disconnected as a failure and punished in that epoch's settlement.
    b_settled = next(s for s in settlements if s.epoch == b_epoch)
    b_payout = next((p for p in b_settled.payouts if p.node_id == b), None)
    assert b_payout is not None and b_payout.punished and b_payout.reward == 0, b_settled
    assert "unexcused disconnect" in b_payout.reason, b_payout
