"""The built-in "subprocess" runner: a user command serves the slot.

The slot is described to the command in its environment (see `slot_environment`). The command
talks to the worker through lines on its standard output:

- ``WORK <n>``: n more units of work are done (reported to the master as `WorkReported`);
- ``READY``: loading is finished (awaited only with ``wait_ready = true``);
- ``RESPONSE <id> <base64>``: the answer to request <id> (only with ``requests = true``; the
  worker writes ``REQUEST <id> <base64>`` lines to the command's standard input).

With ``slot_lines = true`` the worker also writes ``SLOT KEY=VALUE ...`` to standard input
whenever the process is carried over into a later devshard: the slot's CLUSTER_* variables
as they are now (its environment still holds the first devshard's), shell-quoted (split the
line with `shlex.split`).

Any other output line is logged at DEBUG. Standard error is read in a thread, so a chatty
command never blocks on a full pipe: its last `STDERR_TAIL_BYTES` are kept (its last line is
the reason given when the command fails), and all of it is appended to `log_file` if set.

health = the process is alive (or exited with code 0: run() then returns, and the runner
manager counts that as a failure while the slot is still assigned: a runner command must stay
in the foreground; `end_reason()` names the exit).
stop = close stdin, SIGTERM to the command's process group, SIGKILL to the group once all of
it is gone or after `grace_s`, whatever state its leader is in; its standard output is read
(WORK lines counted) meanwhile. When the command (the group's leader) exits by itself, what
is left of its group is killed. An exit code other than 0 fails the runner with the code (or
signal) and the last line of standard error.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import itertools
import logging
import os
import select
import shlex
import signal
import subprocess
import threading
from collections.abc import Mapping
from stat import S_ISDIR
from typing import Annotated, Any, Final

import anyio
import anyio.abc
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from cluster.shared.events import MAX_WORK_UNITS
from cluster.worker.runners.base import (
    HEALTHY,
    Health,
    RequestsNotSupported,
    Runner,
    RunnerConfigError,
    RunnerError,
    RunnerFailed,
    RunnerSpec,
    parse_config,
)
from cluster.worker.runners.process_groups import RecordedRunner, RunnerProcessGroups

log = logging.getLogger(__name__)

#: Longest stdout line taken as a protocol line; longer ones are dropped (and logged once).
MAX_LINE_BYTES: Final = 1024 * 1024
#: Standard error kept in memory per process, for failure reasons (a log file gets it all).
STDERR_TAIL_BYTES: Final = 4096
#: Placeholder in `log_file` for the runner id (its "/" as "_"): one file per runner.
RUNNER_ID_PLACEHOLDER: Final = "{runner_id}"
#: Bounds of the grace period and timeouts: finite, so that a stop (see `stop_time_s`) and
#: every wait end.
MAX_GRACE_S: Final = 600.0
MAX_TIMEOUT_S: Final = 3600.0
#: What a stop may take beyond its three grace periods (closing stdin, reaping, ...).
_STOP_MARGIN_S: Final = 10.0
_Grace = Annotated[float, msgspec.Meta(gt=0, le=MAX_GRACE_S)]
_Timeout = Annotated[float, msgspec.Meta(gt=0, le=MAX_TIMEOUT_S)]


class SubprocessConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    #: The command: an argv list, or a string split like a POSIX shell would (no shell runs).
    command: list[str] | str
    #: Extra environment variables (the worker's environment and the slot's are included).
    env: dict[str, str] = msgspec.field(default_factory=dict)
    cwd: str | None = None
    #: Wait for a READY line before the runner counts as loaded.
    wait_ready: bool = False
    load_timeout_s: _Timeout = 60.0
    #: The command answers REQUEST lines with RESPONSE lines.
    requests: bool = False
    request_timeout_s: _Timeout = 30.0
    #: Seconds between SIGTERM and SIGKILL when stopping.
    grace_s: _Grace = 5.0
    #: File that receives the command's standard error (appended; "{runner_id}" in it is
    #: replaced, else every line starts with the runner id); empty: none (only the last few
    #: KiB are kept, for failure reasons).
    log_file: str = ""
    #: Keep the process when the session's slot stays on this node into the next epoch (no
    #: reload). Its CLUSTER_* variables then still describe the devshard it started for: set
    #: false if the command depends on CLUSTER_DEVSHARD_ID, CLUSTER_EPOCH or their like.
    carry_over: bool = True
    #: Tell a carried-over process its new slot with a SLOT line on its standard input.
    slot_lines: bool = False


def _check_config_strings(config: SubprocessConfig, argv: list[str]) -> None:
    """What the OS refuses, refused here with the key named: load() would fail on every try."""

    def bad(what: str) -> RunnerConfigError:
        return RunnerConfigError(f"runner 'subprocess' config: {what}")

    for key, value in config.env.items():
        if not key or "=" in key or "\0" in key:
            raise bad(f"env: {key!r} is not a variable name (empty, or holds '=' or NUL)")
        if "\0" in value:
            raise bad(f"env: the value of {key!r} holds a NUL byte")
    for what, text in [*(("command", arg) for arg in argv), ("cwd", config.cwd or "")]:
        if "\0" in text:
            raise bad(f"{what}: {text!r} holds a NUL byte")
    if "\0" in config.log_file:
        raise bad(f"log_file: {config.log_file!r} holds a NUL byte")


def _path_problem(cwd: str | None, log_file: str) -> str | None:
    """What is wrong with `cwd` and the log file's path (`log_file` with the runner id in
    place), naming the setting; None if nothing that can be seen now. Only existence and
    kind are checked: whether the worker may write there is for the OS to say when the
    command starts."""
    if cwd:
        try:
            if not S_ISDIR(os.stat(cwd).st_mode):
                return f"cwd: {cwd!r} is not a directory"
        except FileNotFoundError:
            return f"cwd: {cwd!r} does not exist"
        except OSError as exc:
            return f"cwd: {cwd!r}: {exc.strerror or exc}"
    if log_file:
        directory = os.path.dirname(log_file) or "."
        try:
            if not S_ISDIR(os.stat(directory).st_mode):
                return f"log_file: {log_file!r}: {directory!r} is not a directory"
        except FileNotFoundError:
            return f"log_file: {log_file!r}: its directory {directory!r} does not exist"
        except OSError as exc:
            return f"log_file: {log_file!r}: its directory {directory!r}: {exc.strerror or exc}"
        if os.path.isdir(log_file):
            return f"log_file: {log_file!r} is a directory, not a file"
    return None


def _open_log_file(path: str) -> int:
    """The log file, opened for appending; a failure names the setting, not the command."""
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise RunnerError(
            f"runner 'subprocess' config: log_file {path!r}: cannot open it: {exc.strerror or exc}"
        ) from None


def slot_environment(spec: RunnerSpec) -> dict[str, str]:
    """The CLUSTER_* variables that describe the slot to the command."""
    return {
        "CLUSTER_RUNNER_ID": spec.runner_id,
        "CLUSTER_NODE_ID": spec.node_id,
        "CLUSTER_DEVSHARD_ID": spec.devshard_id,
        "CLUSTER_SESSION_ID": spec.session_id,
        "CLUSTER_SLOT": str(spec.slot),
        "CLUSTER_MEMORY_MB": str(spec.memory_mb),
        "CLUSTER_GPU": "1" if spec.gpu else "0",
        "CLUSTER_EPOCH": str(spec.epoch),
        "CLUSTER_EPOCH_END_MS": str(spec.ends_ms),
    }


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _group_alive(pgid: int) -> bool:
    """Does a process of group `pgid` still run? Zombies do not count: an orphan's zombie
    waits for init to reap it, and some inits (in containers) never do."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return True  # no /proc: the signal test is all there is
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # After "pid (comm) ": state, ppid, pgrp, ... (comm may hold spaces and parentheses)
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid).encode() and fields[0] not in (b"Z", b"X"):
            return True
    return False


async def _wait_group_gone(pgid: int) -> None:
    delay = 0.01
    while _group_alive(pgid):
        await anyio.sleep(delay)
        delay = min(2 * delay, 0.2)


class _LineReader:
    """Lines from a byte stream; keeps partial data across cancelled reads."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._eof = False
        self._skipping = False  # inside an over-long line

    async def next_line(self) -> bytes | None:
        """The next complete line (without its newline), or None at end of stream."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                if self._skipping:
                    self._skipping = False
                    continue
                return line
            if len(self._buffer) > MAX_LINE_BYTES:
                log.warning("dropping a stdout line longer than %d bytes", MAX_LINE_BYTES)
                self._buffer.clear()
                self._skipping = True
            if self._eof:
                if self._buffer and not self._skipping:
                    line = bytes(self._buffer)
                    self._buffer.clear()
                    return line
                return None
            try:
                self._buffer += await self._stream.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                self._eof = True


class SubprocessRunner(Runner):
    kind = "subprocess"

    def __init__(
        self,
        spec: RunnerSpec,
        config: Mapping[str, Any],
        *,
        process_groups: RunnerProcessGroups | None = None,
    ) -> None:
        """`process_groups`: where the command is recorded, so that a worker restarted after
        a crash ends it (see `cluster.worker.runners.process_groups`)."""
        super().__init__(spec)
        self.config = parse_config(SubprocessConfig, self.kind, config)
        command = self.config.command
        try:
            argv = shlex.split(command) if isinstance(command, str) else list(command)
        except ValueError as exc:
            raise RunnerConfigError(f"runner 'subprocess' config: command: {exc}") from None
        if not argv or not argv[0]:
            raise RunnerConfigError("runner 'subprocess' config: command is empty")
        _check_config_strings(self.config, argv)
        self.argv = argv
        # Checked when the runner is built -- at the worker's start, whose runner check builds
        # one (`cluster worker` then refuses, naming the setting), and for every slot -- not
        # only when the command starts, where every load and self-test would fail alike.
        problem = _path_problem(self.config.cwd, self._log_target()[0])
        if problem is not None:
            raise RunnerConfigError(f"runner 'subprocess' config: {problem}")
        self._process: anyio.abc.Process | None = None
        self._process_groups = process_groups
        self._recorded: RecordedRunner | None = None
        self._stdout: _LineReader | None = None
        self._stderr: _StderrReader | None = None
        self._units = 0
        self._ready = False
        self._bad_line_logged = False
        self._request_ids = itertools.count(1)
        self._pending: dict[int, tuple[anyio.Event, list[bytes]]] = {}
        self._stdin_lock = anyio.Lock()
        self._stopping = False
        self._group_over = False  # the command's process group was killed or found empty
        self._output_ended = False
        #: How the command ended when it exited by itself with code 0 (`end_reason`).
        self._end_reason = ""
        # SLOT lines from `carry_over` (sync) to the writer task in `run` (async). Carry-overs
        # come once per epoch at most, so a small buffer never fills in practice. Closed by
        # stop(), which the runner contract guarantees is called.
        self._slots: (
            tuple[MemoryObjectSendStream[bytes], MemoryObjectReceiveStream[bytes]] | None
        ) = None
        if self.config.slot_lines:
            self._slots = anyio.create_memory_object_stream[bytes](16)

    def record_commands_in(self, process_groups: RunnerProcessGroups) -> None:
        """Record the command it starts in `process_groups` (unless given at construction),
        so that a worker restarted after a crash ends it. `make_factory` calls this for
        every subprocess runner it builds, a plugin kind derived from this class included,
        whatever its constructor passes on."""
        if self._process_groups is None:
            self._process_groups = process_groups

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def stderr_tail(self) -> bytes:
        """The end of the command's standard error, as much as is kept (`STDERR_TAIL_BYTES`)."""
        return self._stderr.tail() if self._stderr is not None else b""

    # -- lifecycle ------------------------------------------------------------------------

    async def load(self) -> None:
        env = {**os.environ, **self.config.env, **slot_environment(self.spec)}
        if self._process_groups is not None:
            # Recorded before it starts: a worker killed -9 from here on leaves a record the
            # next worker start uses to end the command (process_groups.py).
            self._recorded = self._process_groups.record(
                self.spec.runner_id, self.config.grace_s, self.kind
            )
            env.update(self._recorded.environment)
        # Standard error through a pipe read in a thread: never a full pipe that blocks the
        # command, and no file growing for the process's life (only a tail is kept).
        stderr_read, stderr_write = os.pipe()
        log_fd: int | None = None
        try:
            log_file, prefix = self._log_target()
            if log_file:
                log_fd = _open_log_file(log_file)
            self._process = await anyio.open_process(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr_write,
                cwd=self.config.cwd,
                env=env,
                start_new_session=True,  # its own process group: stop() reaches its children
            )
        except BaseException as exc:
            os.close(stderr_read)  # stop() has no process to clean up after
            if log_fd is not None:
                os.close(log_fd)
            with anyio.CancelScope(shield=True):
                await self._release_record(0.0)  # nothing started: nothing to wait for
            if isinstance(exc, OSError | ValueError):
                raise RunnerError(self._start_error(exc)) from None
            raise
        finally:
            os.close(stderr_write)  # the command has its own copy
        if self._recorded is not None:
            self._recorded.started(self._process.pid)
        self._stderr = _StderrReader(stderr_read, log_fd, prefix)
        assert self._process.stdout is not None
        self._stdout = _LineReader(self._process.stdout)
        if not self.config.wait_ready:
            return
        process = self._process
        with anyio.move_on_after(self.config.load_timeout_s) as scope:
            await self._read_until_ready_or_exit(process)
        if scope.cancelled_caught:
            raise RunnerError(f"no READY line within {self.config.load_timeout_s:g}s")
        if not self._ready:
            rc = await self._end_group(process)  # also reads what it printed last
            if not self._ready:
                raise RunnerError(f"{self._exit_reason(rc)} before printing READY")

    async def run(self) -> None:
        process = self._started()
        async with anyio.create_task_group() as tg:
            if self._slots is not None:
                tg.start_soon(self._write_slot_lines, process, self._slots[1])
            # Until the leader exits, not until the end of output: a child left behind may
            # hold standard output open long after (and is killed by `_end_group`).
            await self._read_lines_until_exit(process)
            tg.cancel_scope.cancel()
        rc = await self._end_group(process)
        if rc != 0:
            raise RunnerFailed(self._exit_reason(rc))
        # A clean exit; the manager decides whether that was too early (the slot still
        # assigned: a command that daemonized) and names the code with `end_reason`.
        self._end_reason = self._exit_reason(rc)

    def end_reason(self) -> str:
        return self._end_reason

    async def health(self) -> Health:
        if self._process is None:
            return Health(False, "not started")
        rc = self._process.returncode
        if rc is None:
            return HEALTHY
        # A clean exit is not unhealthy: run() returns, and the manager judges the end (a
        # failure while the slot is still assigned, see RunnerManager).
        return Health(rc == 0, self._exit_reason(rc))

    async def serve_request(self, payload: bytes) -> bytes:
        if not self.config.requests:
            raise RequestsNotSupported(
                "this subprocess runner takes no requests (set requests = true if the "
                "command answers REQUEST lines)"
            )
        process = self._started()
        assert process.stdin is not None
        if self._output_ended:
            raise RunnerError("the command closed its output: it cannot answer")
        request_id = next(self._request_ids)
        answered = anyio.Event()
        answer: list[bytes] = []
        self._pending[request_id] = (answered, answer)
        line = f"REQUEST {request_id} {base64.b64encode(payload).decode()}\n".encode()
        try:
            async with self._stdin_lock:
                await process.stdin.send(line)
            with anyio.move_on_after(self.config.request_timeout_s):
                await answered.wait()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise RunnerError("the command closed its standard input") from None
        finally:
            del self._pending[request_id]
        if not answer and self._output_ended:
            raise RunnerError(
                f"the command closed its output before answering request {request_id}"
            )
        if not answer:
            raise RunnerError(
                f"no RESPONSE {request_id} line within {self.config.request_timeout_s:g}s"
            )
        return answer[0]

    def work_units(self) -> int:
        units, self._units = self._units, 0
        return units

    def can_carry_over(self) -> bool:
        return self.config.carry_over

    def stop_time_s(self) -> float:
        # The SIGTERM grace period, as long again to reap and read the last output, and once
        # more for processes that left the group (`RecordedRunner.release`).
        return 3 * self.config.grace_s + _STOP_MARGIN_S

    def carry_over(self, spec: RunnerSpec) -> None:
        super().carry_over(spec)
        if self._slots is not None:
            line = "SLOT " + shlex.join(f"{k}={v}" for k, v in slot_environment(spec).items())
            try:
                self._slots[0].send_nowait((line + "\n").encode())
            except (anyio.WouldBlock, anyio.ClosedResourceError):
                log.warning("runner %s: SLOT line not sent (queue full or stopped)", spec.runner_id)

    async def stop(self) -> None:
        if self._slots is not None:
            for end in self._slots:
                end.close()
        process = self._process
        if process is None or self._stopping:
            return
        self._stopping = True
        # Cancelled mid-stop, what is left outside the group gets no grace either.
        strays_grace_s = 0.0
        try:
            if process.stdin is not None:
                await process.stdin.aclose()
            # The whole group, whatever the leader's state: a launcher (`sh -c`, a Python
            # wrapper) may be gone while the child holding the GPU lives on.
            if self._signal_group(signal.SIGTERM):
                with anyio.move_on_after(self.config.grace_s):
                    await self._read_lines_until_exit(process, whole_group=True)
            await self._end_group(process)
            strays_grace_s = self.config.grace_s
        finally:
            with anyio.CancelScope(shield=True):
                self._signal_group(signal.SIGKILL)  # cancelled mid-stop: leave nothing running
                await _close_bounded(process)
                if self._stderr is not None:
                    self._stderr.close()
                # Processes that left the group (same token or session) are ended here.
                await self._release_record(strays_grace_s)

    # -- helpers --------------------------------------------------------------------------

    async def _write_slot_lines(
        self, process: anyio.abc.Process, lines: MemoryObjectReceiveStream[bytes]
    ) -> None:
        assert process.stdin is not None
        async for line in lines:
            try:
                async with self._stdin_lock:
                    await process.stdin.send(line)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return  # the command closed its input; it exits or is being stopped

    async def _release_record(self, grace_s: float) -> None:
        if self._recorded is not None:
            await self._recorded.release(grace_s)

    def _started(self) -> anyio.abc.Process:
        if self._process is None:
            raise RunnerError("the command was not started (load() first)")
        return self._process

    def _signal_group(self, sig: signal.Signals) -> bool:
        """Signal the command's process group, unless it is known to be over; True if sent."""
        assert self._process is not None
        if self._group_over:
            return False
        # The group's id is the leader's pid (its own session). Linux reuses no pid while a
        # group of that id exists, so this reaches only the command's processes, even after the
        # leader was reaped.
        try:
            os.killpg(self._process.pid, sig)
        except ProcessLookupError:
            self._group_over = True
            return False
        except PermissionError:  # e.g. only a setuid member is left: nothing we may signal
            log.warning("runner %s: not allowed to signal its processes", self.spec.runner_id)
            return False
        # A SIGKILL to a group reaches all of it at once: nothing can be left to signal.
        self._group_over = sig == signal.SIGKILL
        return True

    async def _end_group(self, process: anyio.abc.Process) -> int:
        """Kill what is left of the command's group, reap the leader, and read what is left of
        its output; the leader's exit code."""
        killed = self._signal_group(signal.SIGKILL)
        rc = await process.wait()
        # Count the WORK lines still in the pipe after the exit. Bounded, because a process
        # that left the group may hold the pipe open; as long as the grace period, because on a
        # busy host even reading a few buffered lines can stall for a while. The killed ones
        # are waited for too: what they hold (GPU memory) is free only once they are gone.
        with anyio.move_on_after(self.config.grace_s):
            await self._read_all_lines()
            if self._stderr is not None:
                await self._stderr.wait_ended()  # its last lines: the failure reason
            if killed:
                await _wait_group_gone(process.pid)
        return rc

    async def _read_lines_until_exit(
        self, process: anyio.abc.Process, *, whole_group: bool = False
    ) -> None:
        # A command with more to print while shutting down than the pipe holds blocks on the
        # write and never exits unless someone reads. Stop reading at the exit (of the leader,
        # or of every process in its group), not at the end of output: a process that left
        # the group may hold the pipe open.
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._read_all_lines)
            await process.wait()
            if whole_group:
                await _wait_group_gone(process.pid)
                self._group_over = True
            tg.cancel_scope.cancel()  # a cancelled read loses no data (`_LineReader`)

    async def _read_until_ready_or_exit(self, process: anyio.abc.Process) -> None:
        # Until READY, the end of output or the leader's exit, whichever is first: a leader
        # that dies while a child it started holds standard output (`sh -c 'serve & ...'`)
        # must fail the load with its exit code now, not after the whole load timeout.
        async with anyio.create_task_group() as tg:

            async def leader_exited() -> None:
                await process.wait()
                tg.cancel_scope.cancel()  # a cancelled read loses no data (`_LineReader`)

            tg.start_soon(leader_exited)
            while not self._ready and await self._read_one_line():
                pass
            tg.cancel_scope.cancel()

    async def _read_all_lines(self) -> None:
        while await self._read_one_line():
            pass

    async def _read_one_line(self) -> bool:
        """Read and act on one stdout line; False at end of output."""
        assert self._stdout is not None
        raw = await self._stdout.next_line()
        if raw is None:
            self._output_ended = True
            for answered, _ in self._pending.values():
                answered.set()  # no answer will come: wake the waiting requests
            return False
        self._handle_line(raw.decode("utf-8", errors="replace").strip())
        return True

    def _handle_line(self, line: str) -> None:
        word, _, rest = line.partition(" ")
        if word == "WORK":
            try:
                units = int(rest)
                if not 0 <= units <= MAX_WORK_UNITS:
                    raise ValueError
            except ValueError:
                self._bad_line(line, f"WORK needs an integer 0..{MAX_WORK_UNITS}")
                return
            self._units += units
        elif word == "READY" and not rest:
            self._ready = True
        elif word == "RESPONSE":
            id_text, _, data = rest.partition(" ")
            try:
                request_id = int(id_text)
                payload = base64.b64decode(data, validate=True)
            except (ValueError, binascii.Error):
                self._bad_line(line, "RESPONSE needs an id and base64 data")
                return
            pending = self._pending.get(request_id)
            if pending is not None:  # else: answered after its request timed out
                event, answer = pending
                answer.append(payload)
                event.set()
        else:
            log.debug("runner %s: %s", self.spec.runner_id, line)

    def _bad_line(self, line: str, why: str) -> None:
        if not self._bad_line_logged:
            self._bad_line_logged = True
            log.warning(
                "runner %s printed a malformed line %r (%s); further ones are ignored quietly",
                self.spec.runner_id,
                line[:200],
                why,
            )

    def _exit_reason(self, returncode: int) -> str:
        reason = describe_exit(returncode)
        last = self._last_stderr_line()
        return f"{reason}: {last}" if last else reason

    def _last_stderr_line(self) -> str:
        tail = self.stderr_tail.decode("utf-8", errors="replace")
        lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
        return lines[-1][:500] if lines else ""

    def _start_error(self, exc: OSError | ValueError) -> str:
        """Why the command did not start, blaming `cwd` when the OS named it (a directory
        removed or replaced since the runner was built): not the command, which is fine."""
        cwd = self.config.cwd
        if cwd and isinstance(exc, OSError) and exc.filename == cwd and self.argv[0] != cwd:
            return f"runner 'subprocess' config: cwd {cwd!r}: {exc.strerror or exc}"
        return f"cannot start {self.argv[0]!r}: {exc}"

    def _log_target(self) -> tuple[str, bytes]:
        """The log file's path, and what starts each line in it."""
        path, runner_id = self.config.log_file, self.spec.runner_id
        if RUNNER_ID_PLACEHOLDER in path:
            return path.replace(RUNNER_ID_PLACEHOLDER, runner_id.replace("/", "_")), b""
        # A file shared by every slot's runner: whose line is it?
        return path, f"{runner_id}: ".encode()


class _StderrReader:
    """A process's standard error, read in a thread (whatever the event loop is busy with, the
    command never blocks on a full pipe): the last `STDERR_TAIL_BYTES` are kept, and each line
    is appended to the log file, if any, in one write (lines of runners sharing it do not
    mix)."""

    def __init__(self, fd: int, log_fd: int | None, prefix: bytes) -> None:
        self._fd, self._log_fd, self._prefix = fd, log_fd, prefix
        self._tail = bytearray()
        self._partial = bytearray()  # a line not ended yet, for the log file
        self._lock = threading.Lock()
        self._closing = False
        self._ended = threading.Event()
        threading.Thread(target=self._read, name="runner-stderr", daemon=True).start()

    def tail(self) -> bytes:
        with self._lock:
            return bytes(self._tail)

    async def wait_ended(self) -> None:
        """Until the end of the stream: every process holding it is gone."""
        while not self._ended.is_set():
            await anyio.sleep(0.01)

    def close(self) -> None:
        """Stop reading soon (within a second), even if a process that left the group still
        holds the pipe."""
        self._closing = True

    def _read(self) -> None:
        poll = select.poll()
        poll.register(self._fd, select.POLLIN)
        try:
            while not self._closing:
                if not poll.poll(1000):
                    continue
                chunk = os.read(self._fd, 65536)
                if not chunk:
                    break
                with self._lock:
                    self._tail += chunk
                    del self._tail[:-STDERR_TAIL_BYTES]
                self._log(chunk)
        except OSError as exc:
            log.warning("reading a runner's standard error: %s", exc)
        finally:
            self._log(b"\n" if self._partial else b"")  # end the last line
            os.close(self._fd)
            if self._log_fd is not None:
                os.close(self._log_fd)
            self._ended.set()

    def _log(self, chunk: bytes) -> None:
        if self._log_fd is None:
            return
        self._partial += chunk
        end = self._partial.rfind(b"\n") + 1
        if not end and len(self._partial) > MAX_LINE_BYTES:
            self._partial += b"\n"  # an endless line: logged in pieces
            end = len(self._partial)
        if not end:
            return
        lines = self._partial[:end].split(b"\n")[:-1]
        del self._partial[:end]
        data = memoryview(b"".join(self._prefix + line + b"\n" for line in lines))
        try:
            while data:
                data = data[os.write(self._log_fd, data) :]
        except OSError as exc:
            log.warning("runner log file: %s (no more logging for this process)", exc)
            os.close(self._log_fd)
            self._log_fd = None


#: How long stopping waits for the leader to be reaped after SIGKILL.
_REAP_WAIT_S: Final = 10.0


async def _close_bounded(process: anyio.abc.Process) -> None:
    """`process.aclose()` with a bounded wait: that waits for the leader without limit, and
    one stuck in the kernel (a hung GPU driver call) ignores even SIGKILL -- a stop, and the
    worker's shutdown behind it, would hang for good."""
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.aclose()
    with anyio.move_on_after(_REAP_WAIT_S):
        await process.wait()
        return
    log.warning("process %d did not end within %gs of SIGKILL", process.pid, _REAP_WAIT_S)
