"""Runner processes a killed worker left behind, ended when a worker starts on its data dir.

A subprocess runner's command runs in its own session and process group, so when the worker
dies without stopping it (kill -9, the OOM killer, a crash) the command lives on, reparented
to init: a model still loading, which neither prints nor reads, holds its GPU memory for
good, and the restarted worker starts a second one for the same slot.

So while a command may be alive its runner keeps a record in ``<data-dir>/runners/``, named
by a random token that the command's environment carries as ``CLUSTER_RUNNER_OWNER`` (its
children inherit it). A worker starting on the data dir, before it starts any runner, finds
the processes that carry a recorded token (in ``/proc/<pid>/environ``, so Linux only), sends
SIGTERM to their process groups, SIGKILL after the runner's grace period, and removes the
records. Only the token decides: a recorded pid may have been reused by a stranger, a token
never is. A record needs no fsync: it matters only while the machine stays up (a power loss
ends the runners too), and a write survives the worker's kill -9.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Final

import anyio
import anyio.to_thread
import msgspec

from cluster.shared.files import write_text_atomically

log = logging.getLogger(__name__)

#: The environment variable that marks a process as started for one recorded runner.
OWNER_VARIABLE: Final = "CLUSTER_RUNNER_OWNER"
_RECORD_SUFFIX: Final = ".json"
_POLL_S: Final = 0.1
#: How long a process may take to go after SIGKILL (one in the kernel, freeing GPU memory
#: say) before the worker goes on without it, keeping its record for the next start.
_KILL_WAIT_S: Final = 5.0
#: How long `release` lets a stopped runner's processes take to disappear.
_RELEASE_WAIT_S: Final = 1.0


class _Record(msgspec.Struct, frozen=True):
    runner_id: str
    grace_s: float


class RecordedRunner:
    """One runner's record: its command's environment carries `environment`."""

    def __init__(self, path: Path, token: str, runner_id: str) -> None:
        self.path = path
        self.token = token
        self.runner_id = runner_id
        self.environment = {OWNER_VARIABLE: token}

    async def release(self) -> None:
        """Remove the record once no process carries the token; keep it (the worker's next
        start ends them) if some outlive the runner's stop."""
        holders = await _wait_until_gone({self.token}, _RELEASE_WAIT_S)
        if holders:
            log.warning(
                "runner %s: processes %s outlived its stop; the worker's next start ends them",
                self.runner_id,
                _pid_list(holders),
            )
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class RunnerProcessGroups:
    """The records of the runner commands started from one worker data dir (`directory` is
    ``<data-dir>/runners``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def record(self, runner_id: str, grace_s: float) -> RecordedRunner:
        """Record a runner about to start its command. Call before the start: a worker
        killed right after it still finds the command."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        token = secrets.token_hex(16)
        path = self.directory / f"{token}{_RECORD_SUFFIX}"
        write_text_atomically(path, msgspec.json.encode(_Record(runner_id, grace_s)).decode())
        return RecordedRunner(path, token, runner_id)

    async def reap_leftovers(self) -> None:
        """End the processes of every recorded runner (left by an earlier worker process)
        and remove the records. Call before starting any runner."""
        records = self._read_records()
        if not records:
            return
        holders = await anyio.to_thread.run_sync(_token_holders, records.keys())
        for token, pids in sorted(holders.items()):
            log.warning(
                "runner %s was left running by an earlier worker process (pids %s): ending it",
                records[token][1].runner_id,
                _pid_list({token: pids}),
            )
        if holders:
            grace_s = max(records[token][1].grace_s for token in holders)
            holders = await _end_processes(holders, grace_s)
        for token, (path, _) in records.items():
            if token not in holders:  # else kept: the next start tries again
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _read_records(self) -> dict[str, tuple[Path, _Record]]:
        records: dict[str, tuple[Path, _Record]] = {}
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return records
        for path in entries:
            if path.name.startswith("."):  # a write cut by a crash: its command never started
                path.unlink(missing_ok=True)
            elif path.name.endswith(_RECORD_SUFFIX):
                try:
                    record = msgspec.json.decode(path.read_bytes(), type=_Record)
                except (OSError, msgspec.DecodeError) as exc:
                    log.warning("unreadable runner record %s (%s): removed", path, exc)
                    path.unlink(missing_ok=True)
                    continue
                records[path.name.removesuffix(_RECORD_SUFFIX)] = (path, record)
        return records


def _token_holders(tokens: Iterable[str]) -> dict[str, set[int]]:
    """The live processes whose environment carries each token (zombies carry none)."""
    wanted = {f"{OWNER_VARIABLE}={token}".encode(): token for token in tokens}
    marker = f"{OWNER_VARIABLE}=".encode()
    holders: dict[str, set[int]] = {}
    if not wanted:
        return holders
    try:
        entries = os.listdir("/proc")
    except FileNotFoundError:  # not Linux: nothing can be verified, so nothing is ended
        return holders
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read()
        except OSError:  # gone, another user's, or a kernel thread
            continue
        if marker not in environ:
            continue
        for variable in environ.split(b"\0"):
            token = wanted.get(variable)
            if token is not None:
                holders.setdefault(token, set()).add(int(name))
    return holders


async def _wait_until_gone(tokens: Collection[str], timeout_s: float) -> dict[str, set[int]]:
    """The processes still carrying `tokens` when none does or `timeout_s` has passed."""
    holders = await anyio.to_thread.run_sync(_token_holders, tokens)
    with anyio.move_on_after(timeout_s):
        while holders:
            await anyio.sleep(_POLL_S)
            holders = await anyio.to_thread.run_sync(_token_holders, holders.keys())
    return holders


async def _end_processes(holders: dict[str, set[int]], grace_s: float) -> dict[str, set[int]]:
    """SIGTERM to the groups of `holders`, SIGKILL to those still there after `grace_s`;
    what is left after that."""
    _signal_groups(holders, signal.SIGTERM)
    holders = await _wait_until_gone(holders.keys(), grace_s)
    if holders:
        log.warning("still running after %gs: SIGKILL to %s", grace_s, _pid_list(holders))
        _signal_groups(holders, signal.SIGKILL)
        holders = await _wait_until_gone(holders.keys(), _KILL_WAIT_S)
    if holders:
        log.error("still running %gs after SIGKILL: %s", _KILL_WAIT_S, _pid_list(holders))
    return holders


def _signal_groups(holders: dict[str, set[int]], sig: signal.Signals) -> None:
    """Signal the process groups of `holders`, just found: a group id of a verified live
    member cannot belong to a stranger. Never our own group."""
    groups: set[int] = set()
    for pids in holders.values():
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(pid))
    groups.discard(os.getpgrp())
    for group in sorted(groups):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)


def _pid_list(holders: dict[str, set[int]]) -> str:
    return " ".join(str(pid) for pids in holders.values() for pid in sorted(pids))
