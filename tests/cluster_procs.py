"""Helpers for multi-process tests: start `cluster master`/`cluster worker` subprocesses on
loopback, wait for files they write (bounded), and check their logs and digests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from cluster.shared.codec import state_digest
from cluster.shared.eventlog import EventLog
from cluster.shared.events import IndexedEvent
from cluster.shared.store import decode_record, restore


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `pred` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Proc:
    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        self.log_path = log_dir / f"{name}.log"
        self._out: IO[bytes] = open(self.log_path, "ab")  # noqa: SIM115
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "cluster", *args],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def kill9(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)
        self._out.close()

    def stop(self, timeout: float = 15) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
                raise AssertionError(f"{self.name} ignored SIGTERM for {timeout} s") from None
        if not self._out.closed:
            self._out.close()
        return int(self.popen.returncode)


def process_alive(pid: int) -> bool:
    """Is `pid` a live process? A zombie counts as dead: it has exited, only its parent (gone,
    or not reaping it yet) still holds its exit status."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def start_master(
    data_dir: Path, log_dir: Path, *extra: str, listen: str = "/ip4/127.0.0.1/tcp/0"
) -> tuple[Proc, str]:
    addr_file = data_dir / "master.addr"
    if addr_file.exists():
        addr_file.unlink()
    # The HTTP API on a free port unless the test picks one: the default port (8470) may be
    # taken by another master on this machine (a demo, a parallel test run).
    http = () if "--http" in extra else ("--http", "127.0.0.1:0")
    args = ["master", "--data-dir", str(data_dir), "--listen", listen, *http, *extra]
    proc = Proc("master", args, log_dir)
    wait_until(lambda: addr_file.exists() or proc.popen.poll() is not None, 30, "master.addr")
    assert proc.popen.poll() is None, f"master exited early:\n{proc.log_text()}"
    return proc, addr_file.read_text().strip()


def start_worker(name: str, data_dir: Path, log_dir: Path, master_addr: str, *extra: str) -> Proc:
    args = ["worker", "--data-dir", str(data_dir), "--master", master_addr, "--no-info"]
    return Proc(name, [*args, "--heartbeat-interval", "0.2", *extra], log_dir)


def read_digest(data_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((data_dir / "digest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def read_log(master_dir: Path) -> list[IndexedEvent]:
    log = EventLog.open(master_dir / "log", readonly=True)
    try:
        return [decode_record(i, p) for i, p in log.read_from(1)]
    finally:
        log.close()


def digest_at(master_dir: Path, idx: int) -> str:
    """Digest of the master's log folded up to `idx` (from scratch: no snapshot)."""
    log = EventLog.open(master_dir / "log", readonly=True)
    try:
        return state_digest(restore(log, None, idx).state)
    finally:
        log.close()


def seqs_by_origin(events: list[IndexedEvent]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for ie in events:
        out[ie.origin].append(ie.seq)
    return dict(out)


def assert_gap_free(events: list[IndexedEvent]) -> dict[str, int]:
    """Every origin's seqs are exactly 1..n in log order; returns origin -> n."""
    assert [ie.idx for ie in events] == list(range(1, len(events) + 1)), "log indices not 1..n"
    result = {}
    for origin, seqs in seqs_by_origin(events).items():
        assert seqs == list(range(1, len(seqs) + 1)), (
            f"origin {origin}: seqs are not 1..{len(seqs)} "
            f"(first problem near {next(i for i, s in enumerate(seqs, 1) if s != i)})"
        )
        result[origin] = len(seqs)
    return result
