"""Runner commands a killed worker left running are ended by the next worker on its data
dir; processes that only look like them are not."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest
from cluster_procs import wait_until

from cluster.worker.node import WorkerNode, WorkerNodeConfig
from cluster.worker.runners import (
    RunnerFailed,
    RunnerSpec,
    SubprocessRunner,
    process_groups,
    registry,
)
from cluster.worker.runners.process_groups import OWNER_VARIABLE, RunnerProcessGroups

# A runner that neither prints nor reads (a model still loading): the shell leads the group,
# `sleep` is its child.
SILENT_COMMAND = ["sh", "-c", "sleep 1000; :"]
# The same, run without the record's token, as a process that sets its title with
# setproctitle (Ray, vLLM) shows it: none of its processes carries the token in /proc.
TOKENLESS_COMMAND = ["sh", "-c", f"exec env -u {OWNER_VARIABLE} sh -c 'sleep 1000; :'"]
UNREACHABLE_MASTER = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
SPEC = RunnerSpec(
    runner_id="ds-1/0",
    node_id="node-a",
    devshard_id="ds-1",
    session_id="sess-1",
    slot=0,
    memory_mb=0,
    gpu=False,
    epoch=1,
    ends_ms=0,
)
# A worker process as far as runners go: starts one through the factory the worker uses,
# prints its pid, then waits to be killed.
STAND_IN_WORKER = """
import sys
from pathlib import Path

import anyio

from cluster.worker.runners import RunnerSpec, make_factory
from cluster.worker.runners.process_groups import RunnerProcessGroups

async def main() -> None:
    groups = RunnerProcessGroups(Path(sys.argv[1]))
    spec = RunnerSpec(runner_id="ds-1/0", node_id="node-a", devshard_id="ds-1",
                      session_id="sess-1", slot=0, memory_mb=0, gpu=False, epoch=1, ends_ms=0)
    runner = make_factory("subprocess", {"command": sys.argv[2:]}, process_groups=groups)(spec)
    await runner.load()
    print(runner.pid, flush=True)
    await anyio.sleep_forever()

anyio.run(main, backend="trio")
"""


def session_members(sid: int) -> set[int]:
    """The live (not zombie) processes of session `sid`."""
    members: set[int] = set()
    for name in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{name}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
            if int(fields[3]) == sid and fields[0] != b"Z":
                members.add(int(name))
    return members


def carries_a_token(pid: int) -> bool:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/environ", "rb") as f:
        return f"{OWNER_VARIABLE}=".encode() in f.read()
    return False


def kill_session(sid: int) -> None:
    for pid in session_members(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    """Has process group `pgid` a member that is not a zombie? (This host's init may not reap
    orphans: a killed one stays a zombie, and `os.killpg(pgid, 0)` still finds it.)"""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, 0)
        for name in os.listdir("/proc"):
            with contextlib.suppress(OSError), open(f"/proc/{name}/stat", encoding="ascii") as f:
                state, _ppid, group = f.read().rpartition(")")[2].split()[:3]
                if int(group) == pgid and state != "Z":
                    return True
    return False


@contextlib.contextmanager
def started(
    argv: list[str], env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A process in its own session (as a runner is), killed with its group on the way out."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env, start_new_session=True
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


def read_pid(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    assert ready, "the stand-in worker did not start its runner within 30 s"
    line = proc.stdout.readline()
    assert line, "the stand-in worker exited (its error is in the captured stderr)"
    return int(line)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "command", [SILENT_COMMAND, TOKENLESS_COMMAND], ids=["token", "token-dropped"]
)
async def test_a_restarted_worker_ends_the_runner_its_killed_predecessor_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, command: list[str]
) -> None:
    data_dir = tmp_path / "w"
    runner_pgid: int | None = None
    try:
        with started(command) as stranger:
            with started(
                [sys.executable, "-c", STAND_IN_WORKER, str(data_dir / "runners"), *command]
            ) as stand_in:
                runner_pgid = read_pid(stand_in)  # the leader of its own group and session
                if command is TOKENLESS_COMMAND:  # found by its session alone
                    sid = runner_pgid
                    wait_until(
                        lambda: (
                            len(session_members(sid)) == 2
                            and not any(map(carries_a_token, session_members(sid)))
                        ),
                        10,
                        "the runner's shell and sleep, without the token",
                    )
                stand_in.kill()  # kill -9 of the worker
                stand_in.wait(timeout=10)
            assert group_alive(runner_pgid), "the runner outlives its worker (nothing to test)"

            node = WorkerNode(
                data_dir,
                UNREACHABLE_MASTER,
                WorkerNodeConfig(info=None, runner=None, control_socket=False),
            )
            try:
                with anyio.fail_after(30), caplog.at_level(logging.WARNING):
                    async with anyio.create_task_group() as tg:
                        await tg.start(node.run)  # started: the leftovers are dealt with
                        node.stop()
            finally:
                node.close()
            pgid = runner_pgid
            wait_until(lambda: not group_alive(pgid), 10, "the leftover runner's group to end")
            assert "runner ds-1/0 was left running by an earlier worker process" in caplog.text
            assert list((data_dir / "runners").iterdir()) == []
            assert stranger.poll() is None, "a process with the same command was ended"
            assert group_alive(stranger.pid)
    finally:
        if runner_pgid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(runner_pgid, signal.SIGKILL)


@pytest.mark.anyio
async def test_only_processes_carrying_a_recorded_token_are_ended(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    groups = RunnerProcessGroups(tmp_path / "runners")
    stubborn = groups.record("ds-1/0", grace_s=0.2)  # its command ignores SIGTERM
    groups.record("ds-1/1", grace_s=0.2)  # the worker died before starting this one
    ignores_term = ["sh", "-c", "trap '' TERM; sleep 1000; :"]
    foreign = {**os.environ, OWNER_VARIABLE: "0" * 32}  # another token: not ours
    with (
        started(ignores_term, env={**os.environ, **stubborn.environment}) as leftover,
        started(ignores_term, env=foreign) as stranger,
    ):
        with anyio.fail_after(30), caplog.at_level(logging.WARNING):
            await groups.reap_leftovers()
        assert not group_alive(leftover.pid)
        assert "SIGKILL" in caplog.text
        assert list(groups.directory.iterdir()) == []
        assert group_alive(stranger.pid)


@pytest.mark.anyio
async def test_a_command_carries_its_record_token_and_a_stop_removes_the_record(
    tmp_path: Path,
) -> None:
    groups = RunnerProcessGroups(tmp_path / "runners")
    runner = SubprocessRunner(SPEC, {"command": SILENT_COMMAND}, process_groups=groups)
    try:
        with anyio.fail_after(30):
            await runner.load()
            (record,) = groups.directory.iterdir()
            assert runner.pid is not None
            with open(f"/proc/{runner.pid}/environ", "rb") as f:
                token = record.name.removesuffix(".json")
                assert f"{OWNER_VARIABLE}={token}".encode() in f.read().split(b"\0")
    finally:
        with anyio.fail_after(30):
            await runner.stop()
    assert list(groups.directory.iterdir()) == []


# A child that moves to a process group of its own (setpgid: `Popen(process_group=0)`, a
# shell's `set -m`), so that the stop's signals to the command's group miss it, and that
# ignores SIGTERM. The command prints READY once the child ignores it, then serves or crashes.
_OWN_GROUP_CHILD = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('up', flush=True)\n"
    "time.sleep(1000)\n"
)


def _own_group_command(*, drop_token: bool, crash: bool) -> list[str]:
    spawn = (
        "import os, subprocess, sys, time\n"
        "env = dict(os.environ)\n"
        f"if {drop_token}: del env[{OWNER_VARIABLE!r}]\n"
        f"child = subprocess.Popen([sys.executable, '-c', {_OWN_GROUP_CHILD!r}], env=env,\n"
        "                         process_group=0, stdout=subprocess.PIPE)\n"
        "child.stdout.readline()\n"
        "print('READY', flush=True)\n"
        f"if {crash}: sys.exit(3)\n"
        "time.sleep(1000)\n"
    )
    return [sys.executable, "-c", spawn]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("drop_token", "crash"),
    [(True, False), (False, True)],
    ids=["token-dropped-stopped", "token-kept-crashed"],
)
async def test_a_process_that_left_the_group_is_ended_by_the_stop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, drop_token: bool, crash: bool
) -> None:
    # Before, the stop only logged such a child ("outlived its stop"): it lived on, holding
    # its memory, and each restart of a crashing command left one more copy. Found by its
    # token or its session, it now gets SIGTERM and, ignoring that, SIGKILL after grace_s.
    groups = RunnerProcessGroups(tmp_path / "runners")
    command = _own_group_command(drop_token=drop_token, crash=crash)
    runner = SubprocessRunner(
        SPEC, {"command": command, "wait_ready": True, "grace_s": 0.5}, process_groups=groups
    )
    leader: int | None = None
    try:
        with anyio.fail_after(30):
            await runner.load()
            leader = runner.pid
            assert leader is not None
            sid = leader
            (child,) = session_members(sid) - {leader}
            assert os.getpgid(child) == child  # out of the command's group
            assert carries_a_token(child) is not drop_token
            if crash:
                with pytest.raises(RunnerFailed, match="exited with code 3"):
                    await runner.run()
                assert group_alive(child)  # the crash's group kill missed it
            with caplog.at_level(logging.WARNING):
                await runner.stop()
            assert f"processes {child} outside its process group" in caplog.text
            assert f"SIGKILL to {child}" in caplog.text  # it ignored SIGTERM
            assert session_members(sid) == set()
            assert list(groups.directory.iterdir()) == []
    finally:
        with anyio.fail_after(30):
            await runner.stop()
        if leader is not None:
            kill_session(leader)


@pytest.mark.anyio
async def test_a_process_that_outlives_its_stop_keeps_the_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process the stop cannot end (here: not allowed to signal it) keeps the record, so
    # that the worker's next start tries again.
    groups = RunnerProcessGroups(tmp_path / "runners")
    command = _own_group_command(drop_token=False, crash=False)
    runner = SubprocessRunner(
        SPEC, {"command": command, "wait_ready": True, "grace_s": 0.2}, process_groups=groups
    )
    leader: int | None = None
    try:
        with anyio.fail_after(30):
            await runner.load()
            leader = runner.pid
            assert leader is not None
            (child,) = session_members(leader) - {leader}
            real_killpg = os.killpg

            def refuse_child(pgid: int, sig: int) -> None:
                if pgid == child:
                    raise PermissionError("not allowed")
                real_killpg(pgid, sig)

            monkeypatch.setattr(os, "killpg", refuse_child)
            monkeypatch.setattr(process_groups, "_KILL_WAIT_S", 0.5)
            with caplog.at_level(logging.WARNING):
                await runner.stop()
            assert f"processes {child} outlived its stop" in caplog.text
            assert session_members(leader) == {child}
            assert len(list(groups.directory.iterdir())) == 1
    finally:
        monkeypatch.undo()
        with anyio.fail_after(30):
            await runner.stop()
        if leader is not None:
            kill_session(leader)


@pytest.mark.anyio
async def test_a_session_whose_leader_pid_was_reused_is_not_the_runners(tmp_path: Path) -> None:
    groups = RunnerProcessGroups(tmp_path / "runners")
    recorded = groups.record("ds-1/0", grace_s=0.2)
    with started(SILENT_COMMAND) as stranger:  # a session leader, as the runner's was
        recorded.started(stranger.pid)
        record = recorded.path.read_bytes()
        assert f'"leader_pid":{stranger.pid}'.encode() in record
        # The same pid with another start time: a stranger that got the pid once the runner's
        # session had ended.
        start = recorded.leader_start
        assert start is not None
        recorded.path.write_bytes(
            record.replace(f":{start}}}".encode(), f":{start - 1}}}".encode())
        )
        with anyio.fail_after(30):
            await groups.reap_leftovers()
        assert group_alive(stranger.pid)
        assert list(groups.directory.iterdir()) == []


@pytest.mark.anyio
async def test_a_process_that_cannot_be_signalled_is_logged_and_keeps_its_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups = RunnerProcessGroups(tmp_path / "runners")
    recorded = groups.record("ds-1/0", grace_s=0.1)
    with started(SILENT_COMMAND, env={**os.environ, **recorded.environment}) as other_users:
        real_killpg = os.killpg

        def killpg(pgid: int, sig: int) -> None:
            if pgid == other_users.pid:
                raise PermissionError(1, "Operation not permitted")
            real_killpg(pgid, sig)

        with monkeypatch.context() as patched:
            patched.setattr(os, "killpg", killpg)
            patched.setattr(process_groups, "_KILL_WAIT_S", 0.2)
            with anyio.fail_after(30), caplog.at_level(logging.WARNING):
                await groups.reap_leftovers()
        assert f"cannot signal the process group {other_users.pid} " in caplog.text
        assert [path.name for path in groups.directory.iterdir()] == [recorded.path.name]
        assert group_alive(other_users.pid)


@pytest.mark.anyio
async def test_a_leftover_ignoring_sigterm_is_killed_without_waiting_out_a_long_grace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its record's grace_s (600 s, the config's maximum) was waited out in full before the
    # worker started anything: ten minutes without info or runners for one stubborn orphan.
    groups = RunnerProcessGroups(tmp_path / "runners")
    recorded = groups.record("ds-1/0", grace_s=600, kind="subprocess")
    monkeypatch.setattr(process_groups, "_REAP_GRACE_LIMIT_S", 0.3, raising=False)
    ignores_term = ["sh", "-c", "trap '' TERM; sleep 1000; :"]
    with started(ignores_term, env={**os.environ, **recorded.environment}) as leftover:
        with anyio.fail_after(20), caplog.at_level(logging.WARNING):
            await groups.reap_leftovers()
        assert not group_alive(leftover.pid)
    assert "(runner kind 'subprocess', pids " in caplog.text
    assert "SIGKILL" in caplog.text
    assert list(groups.directory.iterdir()) == []


@pytest.mark.anyio
async def test_a_look_at_proc_that_hangs_does_not_hold_up_the_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reading /proc/<pid>/environ waits for that process's memory-map lock, which one stuck
    # in a driver can hold for good: the worker's start waited with it, for ever.
    groups = RunnerProcessGroups(tmp_path / "runners")
    recorded = groups.record("ds-1/0", grace_s=5, kind="subprocess")
    released = threading.Event()

    def hangs(owners: object) -> dict[str, set[int]]:
        released.wait(20)  # bounded: the thread of a failing run ends too
        return {}

    monkeypatch.setattr(process_groups, "_runner_processes", hangs)
    monkeypatch.setattr(process_groups, "_REAP_LIMIT_S", 0.3, raising=False)
    try:
        began = anyio.current_time()
        with anyio.fail_after(10), caplog.at_level(logging.WARNING):
            await groups.reap_leftovers()
        assert anyio.current_time() - began < 10  # the hung look is not waited out (20 s)
    finally:
        released.set()
    assert (
        "runner ds-1/0 left by an earlier worker process (runner kind 'subprocess', pids not "
        "found yet) is not known to be gone after 0.3s"
    ) in caplog.text
    assert [path.name for path in groups.directory.iterdir()] == [recorded.path.name]


@pytest.mark.anyio
async def test_the_wait_for_a_runners_processes_answers_from_a_whole_last_scan() -> None:
    # A scan under way when the wait's time ran out was cut short, and the scan before it
    # answered: processes that had just ended were reported as outliving their stop (a
    # WARNING, a needless SIGTERM pass, a record kept if it happened after the SIGKILL).
    scans: list[int] = []

    def slow_second_scan(owners: Mapping[str, object]) -> dict[str, set[int]]:
        scans.append(len(scans))
        if len(scans) == 1:
            return {"t": {4_000_000}}  # still there at first
        time.sleep(0.5)  # a slow look at /proc, outlasting the 0.2 s wait
        return {}  # gone by this look

    owner = process_groups._Owner("t", None, None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(process_groups, "_runner_processes", slow_second_scan)
        with anyio.fail_after(10):
            left = await process_groups._wait_until_gone({"t": owner}, 0.2)
    assert left == {}
    assert len(scans) == 2


@pytest.mark.anyio
async def test_a_scan_of_proc_that_hangs_does_not_hold_a_runners_stop_for_good(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # No scan was time-limited inside a wait: a stop (shielded, with no limit of its own)
    # waited for ever on a read of /proc/<pid>/environ held by a process stuck in a driver.
    released = threading.Event()

    def hangs(owners: Mapping[str, object]) -> dict[str, set[int]]:
        released.wait(20)  # bounded: the thread of a failing run ends too
        return {}

    owner = process_groups._Owner("t", None, None)
    try:
        with pytest.MonkeyPatch.context() as patch, caplog.at_level(logging.WARNING):
            patch.setattr(process_groups, "_runner_processes", hangs)
            patch.setattr(process_groups, "_SCAN_LIMIT_S", 0.2)
            with anyio.fail_after(10):
                left = await process_groups._wait_until_gone({"t": owner}, 0.1)
    finally:
        released.set()
    assert left == {"t": set()}  # not known to be gone: its record is kept
    assert "took over 0.2s (a process stuck in the kernel?): abandoned" in caplog.text


class _Launcher(SubprocessRunner):
    """A plugin kind built on the subprocess runner, with a constructor of its own."""

    kind = "launcher"

    def __init__(self, spec: RunnerSpec, config: Mapping[str, Any]) -> None:
        super().__init__(spec, {"command": config["argv"]})


@pytest.mark.anyio
async def test_a_plugin_kind_built_on_the_subprocess_runner_records_its_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the built-in kind was recorded (`kind is SubprocessRunner`): a plugin's command
    # left by a killed worker was never ended.
    monkeypatch.setattr(registry, "find_kind", lambda name: _Launcher)
    groups = RunnerProcessGroups(tmp_path / "runners")
    runner = registry.make_factory("launcher", {"argv": SILENT_COMMAND}, process_groups=groups)(
        SPEC
    )
    try:
        with anyio.fail_after(30):
            await runner.load()
            (record,) = groups.directory.iterdir()
            assert json.loads(record.read_bytes())["kind"] == "launcher"
    finally:
        with anyio.fail_after(30):
            await runner.stop()
    assert list(groups.directory.iterdir()) == []
