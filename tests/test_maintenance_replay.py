"""Replay of a log full of maintenance windows reproduces every window's history exactly.

A fake-clock master drives five windows through every ending (host finish, reconnect,
cancel while scheduled, cancel while draining, overrun then an unexcused disconnect). The
log is written to a real event log on disk, read back, decoded and folded -- here and in a
separate Python process with another hash seed -- and must give the same digest and, after
every single event, the same windows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from maintenance_log import HOUR, MIN, Log, node_id

from cluster.shared.apply import apply
from cluster.shared.codec import decode_event, encode_event, state_digest
from cluster.shared.eventlog import EventLog
from cluster.shared.events import (
    MaintenanceCancelled,
    MaintenanceDrainStarted,
    MaintenanceFinished,
    MaintenanceOverrun,
    MaintenanceScheduled,
    MaintenanceStarted,
)
from cluster.shared.maintenance_policy import MaintenancePolicy
from cluster.shared.state import EMPTY_STATE, WindowState

A, B, C = (node_id(n) for n in range(1, 4))
EPOCH = 10 * MIN
_MAINTENANCE = (
    MaintenanceScheduled,
    MaintenanceCancelled,
    MaintenanceDrainStarted,
    MaintenanceStarted,
    MaintenanceFinished,
    MaintenanceOverrun,
)


def run_cluster() -> tuple[Log, dict[str, str]]:
    """Four simulated hours, one planner cycle per minute; returns the log and window ids."""
    log = Log(MaintenancePolicy(max_concurrent_capacity_share=1.0))
    for n in (A, B, C):
        log.join(n)
    t0 = log.now
    ids: dict[str, str] = {}
    offline: set[str] = set()
    epoch = 0
    for minute in range(4 * 60 + 1):
        log.now = t0 + minute * MIN
        if minute % 10 == 0:
            if epoch:
                for n in (A, B, C):
                    log.earn(n, epoch)
            epoch += 1
            log.epoch(epoch, length_ms=EPOCH)
        log.cycle()
        for n in (A, B, C):
            if n not in offline:
                log.heartbeat(n)
        at = t0 + minute * MIN
        if minute == 1:
            ids["a-reconnect"] = log.schedule_ok(A, at + HOUR, 2 * HOUR)
            ids["b-cancel-scheduled"] = log.schedule_ok(B, at + 30 * MIN, 30 * MIN)
            ids["c-cancel-draining"] = log.schedule_ok(C, at + 40 * MIN, HOUR)
        elif minute == 5:
            assert isinstance(log.cancel(B), MaintenanceCancelled)
        elif minute == 35:
            assert isinstance(log.cancel(C), MaintenanceCancelled)
        elif minute == 40:
            ids["b-host-finish"] = log.schedule_ok(B, at + 80 * MIN, 20 * MIN)
            ids["c-overrun"] = log.schedule_ok(C, at + 140 * MIN, 15 * MIN)
        elif minute == 65:  # A's worker stops during its window
            offline.add(A)
            assert log.disconnect(A, reason="no events for 3 cycles").excused
        elif minute == 90:  # ... and restarts: its return finishes the window
            offline.discard(A)
            log.reconnect(A, restarted=True)
        elif minute == 130:
            assert isinstance(log.finish(B), MaintenanceFinished)
        elif minute == 195:  # C overran at 195 and then went silent: penalised as usual
            offline.add(C)
            assert not log.disconnect(C).excused
    return log, ids


def history(log_events: list, window_id: str) -> list[str]:  # type: ignore[type-arg]
    return [
        type(ie.event).__name__
        for ie in log_events
        if isinstance(ie.event, _MAINTENANCE) and ie.event.window_id == window_id
    ]


def test_every_window_reaches_its_ending() -> None:
    log, ids = run_cluster()
    w = log.state.windows
    outcomes = {name: (w[wid].state, w[wid].outcome) for name, wid in ids.items()}
    assert outcomes == {
        "a-reconnect": (WindowState.COMPLETED, "reconnect"),
        "b-cancel-scheduled": (WindowState.CANCELLED, "cancelled"),
        "c-cancel-draining": (WindowState.CANCELLED, "cancelled"),
        "b-host-finish": (WindowState.COMPLETED, "host"),
        "c-overrun": (WindowState.COMPLETED, "overrun"),
    }
    assert history(log.log, ids["a-reconnect"]) == [
        "MaintenanceScheduled",
        "MaintenanceDrainStarted",
        "MaintenanceStarted",
        "MaintenanceFinished",
    ]
    assert history(log.log, ids["b-cancel-scheduled"]) == [
        "MaintenanceScheduled",
        "MaintenanceCancelled",
    ]
    assert history(log.log, ids["c-cancel-draining"]) == [
        "MaintenanceScheduled",
        "MaintenanceDrainStarted",
        "MaintenanceCancelled",
    ]
    assert history(log.log, ids["c-overrun"])[-1] == "MaintenanceOverrun"
    # Penalties: A's planned absence is excused, C's silence after the overrun is not.
    disconnects = {
        n
        for ledger in log.state.ledgers.values()
        for n, account in ledger.nodes.items()
        if account.disconnect is not None
    }
    assert disconnects == {C}
    assert not log.state.nodes[C].disconnect_excused
    assert log.state.nodes[A].connected


def test_replay_from_disk_reproduces_every_window_after_every_event(tmp_path: Path) -> None:
    log, _ = run_cluster()
    with EventLog.open(tmp_path / "log") as disk:
        disk.append([(ie.idx, encode_event(ie)) for ie in log.log])
    with EventLog.open(tmp_path / "log", readonly=True) as disk:
        records = list(disk.read_from(1))
    assert len(records) == len(log.log)
    state = EMPTY_STATE
    for (idx, payload), windows_then in zip(records, log.window_history, strict=True):
        ie = decode_event(payload)
        assert ie.idx == idx
        state = apply(state, ie)
        assert state.windows == windows_then, f"window history differs at event {idx}"
    assert state_digest(state) == state_digest(log.state)
    assert state.credit_ms_by_node == log.state.credit_ms_by_node


def test_replay_in_another_process_gives_the_same_digest(tmp_path: Path) -> None:
    log, _ = run_cluster()
    with EventLog.open(tmp_path / "log") as disk:
        disk.append([(ie.idx, encode_event(ie)) for ie in log.log])
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from cluster.shared.apply import fold
        from cluster.shared.codec import decode_event, state_digest
        from cluster.shared.eventlog import EventLog
        from cluster.shared.state import EMPTY_STATE
        with EventLog.open(Path(sys.argv[1]), readonly=True) as disk:
            events = [decode_event(p) for _, p in disk.read_from(1)]
        print(state_digest(fold(EMPTY_STATE, events)))
        """
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "log")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == state_digest(log.state)
