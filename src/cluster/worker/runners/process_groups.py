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
records. A recorded pid alone never decides (it may have been reused by a stranger); a token
is never reused.

A process may drop the token though: setproctitle (Ray, vLLM, gunicorn) writes the title over
the memory that ``/proc/<pid>/environ`` shows, and a command may run its program with ``env -u``.
So once the command has started its record also holds the leader's pid and start time: the
leader starts its own session, whose id (its pid) all its descendants share unless they start
a session of their own, and that session counts as the runner's by the rule in
`_session_is_the_runners`. A record needs no fsync: it matters only while the machine stays up
(a power loss ends the runners too), and a write survives the worker's kill -9.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Final, NamedTuple

import anyio
import anyio.to_thread
import msgspec

from cluster.shared.codec import strict_decode
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
#: The longest a worker's start waits between SIGTERM and SIGKILL for leftovers, whatever
#: their record's `grace_s` (up to 600 s by config; a damaged record may say anything): an
#: orphan's last words reach nobody (its worker, reading its stdout, is gone), and every
#: second of it keeps this worker from serving.
_REAP_GRACE_LIMIT_S: Final = 10.0
#: The longest `reap_leftovers` takes in all. Reading ``/proc/<pid>/environ`` waits for that
#: process's memory-map lock, which a process stuck in the kernel (a hung GPU driver: just
#: what a leftover model may be) can hold for good; the scan is then abandoned, the runners
#: not known to be gone are named in a WARNING, and their records kept for the next start.
_REAP_LIMIT_S: Final = 30.0
#: The longest one scan of /proc for a runner's processes may take (it normally takes
#: milliseconds); a stop or a start waits no longer for one that hangs.
_SCAN_LIMIT_S: Final = 10.0


class _Record(msgspec.Struct, frozen=True):
    runner_id: str
    grace_s: float
    # The runner kind that started the command ("" in records from before it was kept).
    kind: str = ""
    # The command's leader once it has started (absent before, and in records from before
    # they were kept): its pid, which is its session's id, and its start time in clock ticks
    # after boot (field 22 of /proc/<pid>/stat).
    leader_pid: int | None = None
    leader_start: int | None = None


_record_decoder: Final = msgspec.json.Decoder(_Record)


class _Owner(NamedTuple):
    """What identifies one runner's processes: the token, and the leader once started."""

    token: str
    leader_pid: int | None
    leader_start: int | None


class _Stat(NamedTuple):
    """The fields of /proc/<pid>/stat used here."""

    state: str
    session: int
    start: int


class RecordedRunner:
    """One runner's record: its command's environment carries `environment`."""

    def __init__(
        self, path: Path, token: str, runner_id: str, grace_s: float = 0.0, kind: str = ""
    ) -> None:
        self.path = path
        self.token = token
        self.runner_id = runner_id
        self.grace_s = grace_s
        self.kind = kind
        self.environment = {OWNER_VARIABLE: token}
        self.leader_pid: int | None = None
        self.leader_start: int | None = None

    def started(self, pid: int) -> None:
        """Add the command's leader, just started in a session of its own, to the record:
        its session reaches the processes that drop the token. Call right after the start,
        before the leader is waited for."""
        stat = _read_stat(pid)
        if stat is None or stat.session != pid:  # not Linux, or not a session leader
            return
        self.leader_pid, self.leader_start = pid, stat.start
        record = _Record(self.runner_id, self.grace_s, self.kind, pid, stat.start)
        try:
            write_text_atomically(self.path, msgspec.json.encode(record).decode())
        except OSError as exc:  # the token still reaches the processes that keep it
            log.warning(
                "runner %s: cannot record its leader in %s: %s", self.runner_id, self.path, exc
            )

    async def release(self, grace_s: float) -> None:
        """End what is left of the runner after its stop (SIGTERM, SIGKILL after `grace_s`),
        then remove the record; keep it (the worker's next start tries again) if some
        processes outlive even that.

        The stop signals the command's process group; a child that moved to a group of its
        own (setpgid, ``Popen(process_group=0)``, a shell's ``set -m``) is not in it, and left
        alone it would hold its memory for good, one more copy at each restart."""
        owners = {self.token: _Owner(self.token, self.leader_pid, self.leader_start)}
        holders = await _wait_until_gone(owners, _RELEASE_WAIT_S)
        if holders:
            log.warning(
                "runner %s: processes %s outside its process group outlived its stop: ending them",
                self.runner_id,
                _pid_list(holders),
            )
            holders = await _end_processes(holders, owners, grace_s)
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

    def record(self, runner_id: str, grace_s: float, kind: str = "") -> RecordedRunner:
        """Record a runner (of kind `kind`) about to start its command. Call before the
        start: a worker killed right after it still finds the command."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        token = secrets.token_hex(16)
        path = self.directory / f"{token}{_RECORD_SUFFIX}"
        record = _Record(runner_id, grace_s, kind)
        write_text_atomically(path, msgspec.json.encode(record).decode())
        return RecordedRunner(path, token, runner_id, grace_s, kind)

    async def reap_leftovers(self) -> None:
        """End the processes of every recorded runner (left by an earlier worker process)
        and remove the records. Call before starting any runner.

        Bounded (`_REAP_LIMIT_S`): SIGKILL follows SIGTERM after at most
        `_REAP_GRACE_LIMIT_S`, and a scan of /proc that hangs is abandoned. What is not
        known to be gone by then is named in a WARNING and keeps its record."""
        records = self._read_records()
        if not records:
            return
        owners = {
            token: _Owner(token, record.leader_pid, record.leader_start)
            for token, (_, record) in records.items()
        }
        # Until a scan says otherwise, every recorded runner may still be running.
        left: dict[str, set[int]] = {token: set() for token in records}
        with anyio.move_on_after(_REAP_LIMIT_S) as limit:
            left = await _find_runner_processes(owners)
            for token, pids in sorted(left.items()):
                log.warning(
                    "runner %s was left running by an earlier worker process (%s, pids %s): "
                    "ending it",
                    records[token][1].runner_id,
                    _kind_of(records[token][1]),
                    _pid_list({token: pids}),
                )
            if left:
                # Cut short by the limit, `left` stays what was found (the records kept).
                grace_s = max(_reap_grace_s(records[token][1].grace_s) for token in left)
                left = await _end_processes(left, owners, grace_s)
        if limit.cancelled_caught:
            for token, pids in sorted(left.items()):
                log.warning(
                    "runner %s left by an earlier worker process (%s, pids %s) is not known to "
                    "be gone after %gs (a look at its processes in /proc hung): starting "
                    "anyway; its record is kept for the next start",
                    records[token][1].runner_id,
                    _kind_of(records[token][1]),
                    _pid_list({token: pids}) or "not found yet",
                    _REAP_LIMIT_S,
                )
        for token, (path, _) in records.items():
            if token not in left:  # else kept: the next start tries again
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _read_records(self) -> dict[str, tuple[Path, _Record]]:
        records: dict[str, tuple[Path, _Record]] = {}
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return records
        for path in entries:
            if path.name.startswith("."):  # a write cut by a crash (what it replaces stays)
                path.unlink(missing_ok=True)
            elif path.name.endswith(_RECORD_SUFFIX):
                try:
                    record = strict_decode(_record_decoder.decode, path.read_bytes())
                except (OSError, msgspec.DecodeError) as exc:
                    log.warning("unreadable runner record %s (%s): removed", path, exc)
                    path.unlink(missing_ok=True)
                    continue
                records[path.name.removesuffix(_RECORD_SUFFIX)] = (path, record)
        return records


def _reap_grace_s(recorded_s: float) -> float:
    """The grace a leftover gets at a worker's start: its record's, within
    `_REAP_GRACE_LIMIT_S` (and that limit for a value no config gives: negative, NaN)."""
    return recorded_s if 0 <= recorded_s <= _REAP_GRACE_LIMIT_S else _REAP_GRACE_LIMIT_S


def _kind_of(record: _Record) -> str:
    return f"runner kind {record.kind!r}" if record.kind else "runner kind not recorded"


async def _find_runner_processes(owners: Mapping[str, _Owner]) -> dict[str, set[int]]:
    """`_runner_processes` in a thread, abandoned if cancelled: a read of /proc that hangs
    (see `_REAP_LIMIT_S`) must not hold up the caller's deadline."""
    return await anyio.to_thread.run_sync(_runner_processes, owners, abandon_on_cancel=True)


def _read_stat(pid: int) -> _Stat | None:
    """The state, session id and start time of process `pid`; None if it cannot be read
    (gone, or not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp session ... starttime ...": comm may hold spaces and
    # parentheses, the fields after it hold neither, so they start after the last ')'.
    closing = data.rfind(b")")
    fields = data[closing + 1 :].split()
    try:
        if closing < 0:
            raise ValueError
        return _Stat(fields[0].decode("ascii"), int(fields[3]), int(fields[19]))
    except (IndexError, ValueError):
        return None


def _session_is_the_runners(owner: _Owner, stats: Mapping[int, _Stat]) -> bool:
    """Are the live processes just found in session `owner.leader_pid` (there are some) the
    runner's? `stats`: all the processes found in the same look, zombies included.

    Linux gives no new process a pid that is still in use as a process's, a group's or a
    session's id. So while any process of the runner's session lives, its id (the leader's
    pid) is taken and no other session can have it:
    - the leader is there with its recorded start time (a zombie too): the session is the
      runner's (a session leader cannot leave its session);
    - another process has the leader's pid: the pid was free, so the runner's session had
      ended: the session of that id, if any, is a stranger's;
    - no process has the pid but the session has members: they are the runner's, unless its
      whole session ended, a stranger got the pid, started a session of that id, and went,
      leaving members behind, all while the record stood (the worker's downtime, or the
      second of a stop): that takes a wrap-around of the pid space, accepted here as too
      unlikely to weigh against a leftover that holds a GPU for good.
    """
    if owner.leader_pid is None or owner.leader_pid <= 1:
        return False
    leader = stats.get(owner.leader_pid)
    if leader is not None:
        return leader.start == owner.leader_start and leader.session == owner.leader_pid
    return True


def _runner_processes(owners: Mapping[str, _Owner]) -> dict[str, set[int]]:
    """The live processes (zombies are not) of each runner, by token: those that carry the
    token in their environment, and those in the runner's session (see
    `_session_is_the_runners`)."""
    wanted = {f"{OWNER_VARIABLE}={token}".encode(): token for token in owners}
    marker = f"{OWNER_VARIABLE}=".encode()
    holders: dict[str, set[int]] = {}
    if not owners:
        return holders
    try:
        entries = os.listdir("/proc")
    except FileNotFoundError:  # not Linux: nothing can be verified, so nothing is ended
        return holders
    stats: dict[int, _Stat] = {}
    by_session: dict[int, set[int]] = {}
    for name in entries:
        if not name.isdigit():
            continue
        pid = int(name)
        stat = _read_stat(pid)
        if stat is None:  # gone
            continue
        stats[pid] = stat
        if stat.state in ("Z", "X"):  # a zombie: nothing left to end
            continue
        by_session.setdefault(stat.session, set()).add(pid)
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
                holders.setdefault(token, set()).add(pid)
    for token, owner in owners.items():
        if owner.leader_pid is None:
            continue
        members = by_session.get(owner.leader_pid, set())
        if members and _session_is_the_runners(owner, stats):
            holders.setdefault(token, set()).update(members)
    return holders


async def _wait_until_gone(owners: Mapping[str, _Owner], timeout_s: float) -> dict[str, set[int]]:
    """The processes still left of the runners `owners` when none is or `timeout_s` has
    passed. The answer comes from a whole scan made at the end: the time limit is checked
    between scans, never used to cut one short, or a scan under way at the limit would leave
    the one before it (up to a poll older) to answer, and a process that had just ended be
    reported as outliving its stop. A scan that hangs is cut only by the caller's own limit
    (`_find_runner_processes` may be abandoned)."""
    deadline = anyio.current_time() + timeout_s
    # Until a scan says otherwise, every runner may still be running.
    holders = await _scan(owners, {token: set() for token in owners})
    while holders and (left_s := deadline - anyio.current_time()) > 0:
        # The last sleep ends at the limit, so the last scan starts at it.
        await anyio.sleep(min(_POLL_S, left_s))
        holders = await _scan({token: owners[token] for token in holders}, holders)
    return holders


async def _scan(owners: Mapping[str, _Owner], known: dict[str, set[int]]) -> dict[str, set[int]]:
    """One scan for the processes of `owners`, abandoned after `_SCAN_LIMIT_S` (a read of
    /proc that hangs: see `_REAP_LIMIT_S`); then `known`, what was known before it, stands:
    a runner stopping is never held up for good, and is not taken for gone."""
    with anyio.move_on_after(_SCAN_LIMIT_S):
        return await _find_runner_processes(owners)
    log.warning(
        "a look in /proc for runner processes took over %gs (a process stuck in the kernel?): "
        "abandoned, they are not known to be gone",
        _SCAN_LIMIT_S,
    )
    return known


async def _end_processes(
    holders: dict[str, set[int]], owners: Mapping[str, _Owner], grace_s: float
) -> dict[str, set[int]]:
    """SIGTERM to the groups of `holders`, SIGKILL to those still there after `grace_s`;
    what is left after that."""
    _signal_groups(holders, signal.SIGTERM)
    holders = await _wait_until_gone({token: owners[token] for token in holders}, grace_s)
    if holders:
        log.warning("still running after %gs: SIGKILL to %s", grace_s, _pid_list(holders))
        _signal_groups(holders, signal.SIGKILL)
        left = {token: owners[token] for token in holders}
        holders = await _wait_until_gone(left, _KILL_WAIT_S)
    if holders:
        log.error("still running %gs after SIGKILL: %s", _KILL_WAIT_S, _pid_list(holders))
    return holders


def _signal_groups(holders: dict[str, set[int]], sig: signal.Signals) -> None:
    """Signal the process groups of `holders`, just found: a group id of a verified live
    member cannot belong to a stranger (and a group lies within one session). Never our own
    group or session. A group we may not signal is logged, and left to its record."""
    own_group, own_session = os.getpgrp(), os.getsid(0)
    groups: dict[int, int] = {}  # group id: a pid in it
    for pids in holders.values():
        for pid in sorted(pids):
            try:
                group, session = os.getpgid(pid), os.getsid(pid)
            except ProcessLookupError:
                continue
            except PermissionError as exc:
                log.warning("cannot signal runner process %d: %s; its record is kept", pid, exc)
                continue
            if group != own_group and session != own_session:
                groups.setdefault(group, pid)
    for group, pid in sorted(groups.items()):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            log.warning(
                "cannot signal the process group %d of runner process %d: %s; its record is kept",
                group,
                pid,
                exc,
            )


def _pid_list(holders: dict[str, set[int]]) -> str:
    return " ".join(str(pid) for pids in holders.values() for pid in sorted(pids))
