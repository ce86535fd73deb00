"""Helpers for end-to-end scenarios on loopback: fully wired workers (info gathering, runners,
self-test), a cheap incremental reader of the master's log, the `cluster` CLI, the HTTP API.

Everything waits on a condition with a deadline (never on a bare sleep), and every failure
message names what was awaited, so a slow run fails with a reason instead of hanging.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cluster_procs import Proc, wait_until

from cluster.shared.eventlog import EventLog
from cluster.shared.events import Event, IndexedEvent
from cluster.shared.store import decode_record

E = TypeVar("E", bound=Event)


class Deadline:
    """One overall time budget for a test; each wait takes what is left of it at most."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self, at_most: float) -> float:
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"the test's {self.seconds:g} s budget is spent")
        return min(at_most, remaining)


def start_full_worker(
    name: str, data_dir: Path, log_dir: Path, master_dir: Path, *extra: str
) -> Proc:
    """A worker as an operator runs it (info gathering, runner manager, self-test), with a
    heartbeat well inside one 0.5 s plan cycle so liveness margins do not depend on luck."""
    args = ["worker", "--data-dir", str(data_dir), "--master", str(master_dir / "master.addr")]
    args += ["--cluster-secret-file", str(master_dir / "cluster.secret"), "--slots", "2"]
    return Proc(name, [*args, "--heartbeat-interval", "0.2", *extra], log_dir)


def node_id_of(proc: Proc, timeout: float = 30) -> str:
    """The node id a worker prints first (`worker <id> data dir ...`)."""
    line = wait_until(
        lambda: (
            next((ln for ln in proc.log_text().splitlines() if ln.startswith("worker ")), None)
            or (proc.popen.poll() is not None and f"exited {proc.popen.returncode}")
        ),
        timeout,
        f"{proc.name} to print its node id",
    )
    assert line.startswith("worker "), f"{proc.name} {line}:\n{proc.log_text()}"
    return str(line.split()[1])


class MasterLog:
    """The master's event log, read read-only and incrementally (each poll decodes only the
    records appended since the last one)."""

    def __init__(self, master_dir: Path) -> None:
        self.master_dir = master_dir
        self.events: list[IndexedEvent] = []

    def refresh(self) -> list[IndexedEvent]:
        log = EventLog.open(self.master_dir / "log", readonly=True)
        try:
            start = len(self.events) + 1
            self.events.extend(decode_record(i, p) for i, p in log.read_from(start))
        finally:
            log.close()
        return self.events

    def of(
        self, kind: type[E], pred: Callable[[E], bool] = lambda _e: True
    ) -> list[tuple[IndexedEvent, E]]:
        """(record, event) for every event of `kind` matching `pred`, in log order."""
        return [
            (ie, ie.event) for ie in self.events if isinstance(ie.event, kind) and pred(ie.event)
        ]

    def wait_for(
        self,
        kind: type[E],
        pred: Callable[[E], bool],
        timeout: float,
        what: str,
    ) -> tuple[IndexedEvent, E]:
        """The first event of `kind` matching `pred`, waiting (bounded) until it is logged."""

        def found() -> tuple[IndexedEvent, E] | None:
            self.refresh()
            hits = self.of(kind, pred)
            return hits[0] if hits else None

        result: tuple[IndexedEvent, E] = wait_until(found, timeout, what, interval=0.2)
        return result


def cluster_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `cluster ARGS...` as an operator would (captured output, bounded in time)."""
    return subprocess.run(
        [sys.executable, "-m", "cluster", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )


def http_get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        body: bytes = resp.read()
        return body


def http_json(url: str, timeout: float = 10) -> Any:
    return json.loads(http_get(url, timeout))


def warnings_and_errors(text: str) -> list[str]:
    """Lines logged at WARNING or above (the processes log `time LEVEL logger: message`),
    and any traceback."""
    levels = (" WARNING ", " ERROR ", " CRITICAL ")
    return [
        ln
        for ln in text.splitlines()
        if any(level in ln for level in levels) or ln.startswith("Traceback")
    ]
