"""Runners: the simulated runner's deterministic behaviour, the subprocess runner with real
processes, and the registry (built-ins, entry points, runner files)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from cluster.shared.events import MAX_ID_CHARS
from cluster.worker.node import WorkerNode, WorkerNodeConfig
from cluster.worker.runners import (
    ENTRY_POINT_GROUP,
    RequestsNotSupported,
    Runner,
    RunnerConfigError,
    RunnerError,
    RunnerFailed,
    RunnerSetting,
    RunnerSpec,
    SimulatedRunner,
    SubprocessRunner,
    UnknownRunnerKind,
    available_kinds,
    config_digest,
    find_kind,
    load_runner_setting,
    make_factory,
    subprocess_runner,
)
from cluster.worker.runners.subprocess_runner import STDERR_TAIL_BYTES, slot_environment

SPEC = RunnerSpec(
    runner_id="ds-1/2",
    node_id="node-a",
    devshard_id="ds-1",
    session_id="sess-1",
    slot=2,
    memory_mb=1536,
    gpu=True,
    epoch=7,
    ends_ms=1_700_000_600_000,
)

# A small runner program driven by its first argument (run with the test's Python).
PROGRAM = r"""
import base64, json, os, signal, sys, time

mode = sys.argv[1]
if mode == "serve":
    # SIGTERM stays blocked and is taken with sigwait once stdin ends: a Python handler would
    # race with time.sleep (a signal landing just before the sleep starts waits out the sleep).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    print("hello from the runner", flush=True)
    print("READY", flush=True)
    print("WORK 2", flush=True)
    print("WORK x", flush=True)
    print("WORK 1099511627777", flush=True)  # 2**40 + 1: more than one report may carry
    print("WORK 100000000000000000000", flush=True)  # past what msgpack can encode
    print("WORK 3", flush=True)
    for line in sys.stdin:
        word, request_id, data = line.split()
        answer = base64.b64decode(data)[::-1]
        print("RESPONSE", request_id, base64.b64encode(answer).decode(), flush=True)
    signal.sigwait({signal.SIGTERM})  # stdin closed: wait for SIGTERM
    print("WORK 5", flush=True)  # stopping: report the last work, then exit cleanly
    sys.exit(0)
elif mode == "env":
    with open(os.environ["OUT"], "w") as f:
        json.dump({k: v for k, v in os.environ.items() if k.startswith("CLUSTER_")}, f)
    print("READY", flush=True)
    time.sleep(60)
elif mode == "crash":
    print("WORK 1", flush=True)
    sys.stderr.write("loading weights\nCUDA error: out of memory\n")
    sys.exit(3)
elif mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("READY", flush=True)
    time.sleep(60)
elif mode == "exit-before-ready":
    sys.stderr.write("config file missing\n")
    sys.exit(2)
elif mode == "silent":
    time.sleep(60)
elif mode == "chatty-stop":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # as in "serve"
    print("WORK 2", flush=True)
    print("READY", flush=True)
    signal.sigwait({signal.SIGTERM})
    # Far more than a pipe holds, then the last WORK line: exits only if someone reads.
    sys.stdout.write(("shutting down: " + "x" * 49 + "\n") * 16384)  # 1 MiB
    print("WORK 5", flush=True)
    sys.exit(0)
elif mode == "flood":
    for _ in range(4096):  # 4 MiB: far more than is kept
        sys.stderr.write("x" * 1023 + "\n")
    sys.stderr.write("the last words\n")
    sys.stderr.flush()
    print("READY", flush=True)
    time.sleep(60)
elif mode == "slots":
    print("READY", flush=True)
    for line in sys.stdin:  # every stdin line, as received, to the OUT file
        with open(os.environ["OUT"], "a") as f:
            f.write(line)
"""


@pytest.fixture
def program(tmp_path: Path) -> list[str]:
    path = tmp_path / "runner_program.py"
    path.write_text(PROGRAM)
    return [sys.executable, str(path)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------------------------
# Simulated runner
# --------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_simulated_runner_is_deterministic_given_config_and_clock() -> None:
    clock = FakeClock()
    config = {"load_s": 0, "request_s": 0, "units_per_s": 2.5, "units_per_request": 3}
    runner = SimulatedRunner(SPEC, config, clock=clock)
    assert (await runner.health()).reason == "not loaded"
    assert runner.work_units() == 0
    await runner.load()
    assert (await runner.health()).ok
    clock.now += 2.0
    assert runner.work_units() == 5  # 2 s * 2.5/s
    clock.now += 0.3
    assert runner.work_units() == 0  # floor(2.3 * 2.5) = 5: nothing new yet
    answer = await runner.serve_request(b"hello")
    assert answer.startswith(b"simulated:")
    twin = SimulatedRunner(SPEC, config, clock=clock)
    await twin.load()
    assert await twin.serve_request(b"hello") == answer  # same payload, same answer
    assert answer == (await runner.serve_request(b"hello"))
    assert answer != await runner.serve_request(b"other")
    assert runner.work_units() == 9  # three requests * 3 units
    await runner.stop()
    clock.now += 100
    assert runner.work_units() == 0  # no work after stopping
    assert runner.work_done() == 5 + 9
    assert not (await runner.health()).ok
    with pytest.raises(RunnerError, match="not loaded"):
        await runner.serve_request(b"late")


@pytest.mark.anyio
async def test_simulated_failures_on_purpose() -> None:
    failing_load = SimulatedRunner(SPEC, {"load_s": 0, "fail_load": "weights corrupt"})
    with pytest.raises(RunnerError, match="weights corrupt"):
        await failing_load.load()
    runner = SimulatedRunner(SPEC, {"load_s": 0, "fail_after_s": 0.01})
    await runner.load()
    with anyio.fail_after(20), pytest.raises(RunnerFailed, match=r"simulated failure after 0\.01s"):
        await runner.run()
    assert (await runner.health()).reason == "simulated failure after 0.01s"


def test_simulated_config_is_validated() -> None:
    with pytest.raises(RunnerConfigError, match=r"runner 'simulated' config: .*load_sec"):
        SimulatedRunner(SPEC, {"load_sec": 1})
    with pytest.raises(RunnerConfigError, match=r"units_per_s"):
        SimulatedRunner(SPEC, {"units_per_s": -1})
    with pytest.raises(RunnerConfigError, match=r"load_s"):
        SimulatedRunner(SPEC, {"load_s": "slow"})
    # Past `>= 0` but no rate: inf cannot be floored into work units, nor a rate that
    # overflows to inf once multiplied by the seconds served.
    for rate, shown in ((math.inf, "inf"), ("inf", "inf"), (1e300, "1e+300")):
        with pytest.raises(
            RunnerConfigError,
            match=re.escape(f"units_per_s must be a number 0..{2**63 - 1}, got {shown}") + "$",
        ):
            SimulatedRunner(SPEC, {"units_per_s": rate})
    with pytest.raises(RunnerConfigError, match=r"units_per_s"):
        SimulatedRunner(SPEC, {"units_per_s": math.nan})
    with pytest.raises(RunnerConfigError, match=r"load_s must be a finite number .*, got inf$"):
        SimulatedRunner(SPEC, {"load_s": math.inf})
    assert SimulatedRunner(SPEC, {"units_per_s": 1e18}).config.units_per_s == 1e18


# --------------------------------------------------------------------------------------------
# Subprocess runner
# --------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_subprocess_runner_slot_environment(program: list[str], tmp_path: Path) -> None:
    out = tmp_path / "env.json"
    config = {"command": [*program, "env"], "env": {"OUT": str(out)}, "wait_ready": True}
    runner = SubprocessRunner(SPEC, config)
    with anyio.fail_after(20):
        await runner.load()
        await runner.stop()
    assert json.loads(out.read_text()) == {
        "CLUSTER_RUNNER_ID": "ds-1/2",
        "CLUSTER_NODE_ID": "node-a",
        "CLUSTER_DEVSHARD_ID": "ds-1",
        "CLUSTER_SESSION_ID": "sess-1",
        "CLUSTER_SLOT": "2",
        "CLUSTER_MEMORY_MB": "1536",
        "CLUSTER_GPU": "1",
        "CLUSTER_EPOCH": "7",
        "CLUSTER_EPOCH_END_MS": "1700000600000",
    }


@pytest.mark.anyio
async def test_subprocess_runner_carried_over_gets_a_slot_line(
    program: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "stdin.txt"
    config = {
        "command": [*program, "slots"],
        "env": {"OUT": str(out)},
        "wait_ready": True,
        "slot_lines": True,
    }
    runner = SubprocessRunner(SPEC, config)
    successor = msgspec.structs.replace(
        SPEC, runner_id="ds-2/2", devshard_id="ds-2", epoch=8, ends_ms=1_700_001_200_000
    )
    with anyio.fail_after(30):
        await runner.load()
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.run)
            runner.carry_over(successor)
            while not (out.exists() and out.read_text().endswith("\n")):
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        await runner.stop()
    assert runner.spec == successor
    word, *pairs = shlex.split(out.read_text())
    assert word == "SLOT"
    assert dict(p.split("=", 1) for p in pairs) == slot_environment(successor)
    assert slot_environment(successor)["CLUSTER_EPOCH_END_MS"] == "1700001200000"


@pytest.mark.anyio
async def test_subprocess_runner_work_requests_and_clean_stop(
    program: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    runner = SubprocessRunner(
        SPEC,
        # A long grace period: on a busy host the program may need a while to be scheduled
        # after SIGTERM, and a SIGKILL before it prints its last WORK line is not what this tests.
        {"command": [*program, "serve"], "wait_ready": True, "requests": True, "grace_s": 30},
    )
    with caplog.at_level(logging.DEBUG, logger="cluster.worker.runners.subprocess_runner"):
        with anyio.fail_after(60):
            await runner.load()
            async with anyio.create_task_group() as tg:
                tg.start_soon(runner.run)
                assert await runner.serve_request(b"abc") == b"cba"
                assert await runner.serve_request(bytes(range(256))) == bytes(range(256))[::-1]
                assert (await runner.health()).ok
                tg.cancel_scope.cancel()
            await runner.stop()
    # WORK lines before and after the requests, and the one printed while stopping; none
    # of the amounts past the bound.
    assert runner.work_units() == 2 + 3 + 5
    assert runner.work_units() == 0
    health = await runner.health()  # a clean exit is no failure
    assert health.ok and health.reason.startswith("exited with code 0")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # The first malformed line is named; the out-of-range ones after it are dropped too.
    assert len(warnings) == 1 and "'WORK x'" in warnings[0], warnings
    assert "WORK needs an integer 0..1099511627776" in warnings[0]
    assert any("hello from the runner" in r.getMessage() for r in caplog.records)


@pytest.mark.anyio
async def test_subprocess_output_while_stopping_is_read_so_the_command_can_exit(
    program: list[str],
) -> None:
    # A long grace period, as above: only a command blocked on a full pipe should need it.
    runner = SubprocessRunner(
        SPEC, {"command": [*program, "chatty-stop"], "wait_ready": True, "grace_s": 30}
    )
    with anyio.fail_after(60):
        await runner.load()
        await runner.stop()
    # It exited by itself (not SIGKILLed on a full pipe), and its last WORK line counted.
    assert (await runner.health()).reason == "exited with code 0"
    assert runner.work_units() == 2 + 5


@pytest.mark.anyio
async def test_subprocess_exit_code_fails_with_last_stderr_line(program: list[str]) -> None:
    runner = SubprocessRunner(SPEC, {"command": [*program, "crash"]})
    with anyio.fail_after(20):
        await runner.load()
        with pytest.raises(RunnerFailed) as failed:
            await runner.run()
        assert str(failed.value) == "exited with code 3: CUDA error: out of memory"
        health = await runner.health()
        assert health.reason == "exited with code 3: CUDA error: out of memory"
        assert runner.work_units() == 1
        await runner.stop()


@pytest.mark.anyio
async def test_subprocess_exit_before_ready(program: list[str]) -> None:
    runner = SubprocessRunner(
        SPEC, {"command": [*program, "exit-before-ready"], "wait_ready": True}
    )
    with anyio.fail_after(20):
        with pytest.raises(RunnerError, match=r"exited with code 2: config file missing before"):
            await runner.load()
        await runner.stop()


@pytest.mark.anyio
async def test_subprocess_ready_timeout(program: list[str]) -> None:
    runner = SubprocessRunner(
        SPEC, {"command": [*program, "silent"], "wait_ready": True, "load_timeout_s": 0.3}
    )
    with anyio.fail_after(20):
        with pytest.raises(RunnerError, match=r"no READY line within 0.3s"):
            await runner.load()
        await runner.stop()
    assert runner.pid is not None and not _alive(runner.pid)


@pytest.mark.anyio
async def test_subprocess_ignoring_sigterm_is_killed_after_grace(program: list[str]) -> None:
    runner = SubprocessRunner(
        SPEC, {"command": [*program, "ignore-term"], "wait_ready": True, "grace_s": 0.3}
    )
    with anyio.fail_after(20):
        await runner.load()
        pid = runner.pid
        assert pid is not None and _alive(pid)
        await runner.stop()
    assert not _alive(pid)
    assert (await runner.health()).reason == "killed by SIGKILL"


# A child that ignores SIGTERM (as a process holding a GPU may, busy in a driver call) and
# writes its pid to the file named by its argument once it does.
CHILD = r"""
import os, signal, sys, time

signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(120)
"""


def _launcher(tmp_path: Path, then: str, *, child_stdout: str = " >/dev/null") -> list[str]:
    """`sh -c`: start CHILD in the background (in the launcher's process group), wait for its
    pid file, then run `then`."""
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    pid_file = tmp_path / "child.pid"
    script = (
        f"{shlex.quote(sys.executable)} {shlex.quote(str(child))} {shlex.quote(str(pid_file))}"
        f"{child_stdout} & while [ ! -e {shlex.quote(str(pid_file))} ]; do sleep 0.05; done; "
        + then
    )
    return ["sh", "-c", script]


async def _gone(pid: int) -> bool:
    """Wait (bounded) until the process `pid` has ended: gone, or a zombie (an orphan waits
    for init to reap it, and some inits never do)."""
    with anyio.move_on_after(20):
        while _running(pid):
            await anyio.sleep(0.05)
    return not _running(pid)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] != b"Z"


def _child_pid(tmp_path: Path) -> int:
    return int((tmp_path / "child.pid").read_text())


@pytest.mark.anyio
async def test_subprocess_stop_kills_a_child_that_outlives_its_launcher(tmp_path: Path) -> None:
    # The launcher exits at SIGTERM; the child it started ignores SIGTERM: the group still
    # gets SIGKILL after the grace period, though its leader is gone by then.
    command = _launcher(tmp_path, 'trap "exit 0" TERM; echo READY; while :; do sleep 0.1; done')
    runner = SubprocessRunner(SPEC, {"command": command, "wait_ready": True, "grace_s": 0.5})
    with anyio.fail_after(60):
        await runner.load()
        child = _child_pid(tmp_path)
        await runner.stop()
        assert await _gone(child)
    assert (await runner.health()).reason.startswith("exited with code 0")


@pytest.mark.anyio
async def test_subprocess_stop_cancelled_during_the_grace_period_kills_the_group(
    tmp_path: Path,
) -> None:
    # Everything ignores SIGTERM and the grace period is long: whoever cancels the stop (a
    # caller's deadline) still leaves nothing of the command running.
    command = _launcher(tmp_path, 'trap "" TERM; echo READY; while :; do sleep 0.1; done')
    runner = SubprocessRunner(SPEC, {"command": command, "wait_ready": True, "grace_s": 600})
    with anyio.fail_after(60):
        await runner.load()
        child, leader = _child_pid(tmp_path), runner.pid
        assert leader is not None
        with anyio.move_on_after(0.5):
            await runner.stop()
        assert await _gone(child)
    assert not _alive(leader)


@pytest.mark.anyio
async def test_subprocess_crashed_leader_leaves_no_child_behind(tmp_path: Path) -> None:
    command = _launcher(tmp_path, "echo boom >&2; exit 3")
    runner = SubprocessRunner(SPEC, {"command": command, "grace_s": 0.5})
    with anyio.fail_after(60):
        await runner.load()
        with pytest.raises(RunnerFailed, match="exited with code 3: boom"):
            await runner.run()
        child = _child_pid(tmp_path)
        await runner.stop()
        assert await _gone(child)


@pytest.mark.anyio
async def test_subprocess_clean_exit_with_a_child_holding_its_output(tmp_path: Path) -> None:
    # The leader exits 0 while its child keeps standard output open: the runner ended by
    # itself (run() returns, health stays ok), and the child goes with it.
    command = _launcher(tmp_path, "echo WORK 1; exit 0", child_stdout="")
    runner = SubprocessRunner(SPEC, {"command": command, "grace_s": 0.5})
    with anyio.fail_after(60):  # far less than the child's sleep
        await runner.load()
        await runner.run()
        assert (await runner.health()).ok
        assert await _gone(_child_pid(tmp_path))
        await runner.stop()
    assert runner.work_units() == 1


@pytest.mark.anyio
async def test_a_leader_dying_before_ready_fails_the_load_at_once(tmp_path: Path) -> None:
    """With wait_ready, a leader that exits while the child it started holds standard output
    made load() wait out the whole load timeout and report "no READY line"; now its exit
    code and last stderr line, at once, and the child is gone."""
    command = _launcher(tmp_path, "echo 'CUDA OOM' >&2; exit 3", child_stdout="")
    config = {"command": command, "wait_ready": True, "load_timeout_s": 600, "grace_s": 0.5}
    runner = SubprocessRunner(SPEC, config)
    with anyio.fail_after(60):  # a tenth of the load timeout
        with pytest.raises(RunnerError, match="exited with code 3: CUDA OOM before printing READY"):
            await runner.load()
        assert await _gone(_child_pid(tmp_path))
        await runner.stop()


@pytest.mark.anyio
async def test_subprocess_without_requests(program: list[str]) -> None:
    runner = SubprocessRunner(SPEC, {"command": [*program, "serve"], "wait_ready": True})
    with anyio.fail_after(20):
        await runner.load()
        with pytest.raises(RequestsNotSupported, match="requests = true"):
            await runner.serve_request(b"x")
        await runner.stop()


@pytest.mark.anyio
async def test_subprocess_request_timeout(program: list[str]) -> None:
    runner = SubprocessRunner(
        SPEC, {"command": [*program, "silent"], "requests": True, "request_timeout_s": 0.2}
    )
    with anyio.fail_after(20):
        await runner.load()
        with pytest.raises(RunnerError, match=r"no RESPONSE 1 line within 0.2s"):
            await runner.serve_request(b"x")
        await runner.stop()


@pytest.mark.anyio
async def test_subprocess_request_to_a_dying_command_fails_fast(program: list[str]) -> None:
    runner = SubprocessRunner(
        SPEC, {"command": [*program, "crash"], "requests": True, "request_timeout_s": 60}
    )
    with anyio.fail_after(20):  # far less than the request timeout: the exit wakes it
        await runner.load()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_swallow_failure, runner)
            with pytest.raises(RunnerError, match=r"closed its (output|standard input)"):
                await runner.serve_request(b"x")
            tg.cancel_scope.cancel()
        await runner.stop()


async def _swallow_failure(runner: Runner) -> None:
    with pytest.raises(RunnerFailed):
        await runner.run()


@pytest.mark.anyio
async def test_subprocess_missing_command(tmp_path: Path) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    for config in [
        {"command": str(tmp_path / "no-such-server")},
        {"command": str(tmp_path / "no-such-server"), "log_file": str(tmp_path / "log")},
    ]:
        runner = SubprocessRunner(SPEC, config)
        with pytest.raises(RunnerError, match=r"cannot start .*no-such-server"):
            await runner.load()
        await runner.stop()  # stopping a runner that never started is harmless
    assert len(os.listdir("/proc/self/fd")) == fds  # a failed start keeps no descriptor


def test_subprocess_paths_that_cannot_work_are_refused_when_the_runner_is_built(
    tmp_path: Path,
) -> None:
    # What `cluster worker` checks at its start (its runner check builds one runner).
    (tmp_path / "file").write_text("")
    for config, why in [
        ({"cwd": str(tmp_path / "gone")}, f"cwd: '{tmp_path}/gone' does not exist"),
        ({"cwd": str(tmp_path / "file")}, f"cwd: '{tmp_path}/file' is not a directory"),
        ({"log_file": str(tmp_path)}, f"log_file: '{tmp_path}' is a directory, not a file"),
        (
            {"log_file": str(tmp_path / "gone" / "{runner_id}.log")},
            f"log_file: '{tmp_path}/gone/ds-1_2.log': its directory '{tmp_path}/gone' "
            "does not exist",
        ),
        (
            {"log_file": str(tmp_path / "file" / "x.log")},
            f"log_file: '{tmp_path}/file/x.log': '{tmp_path}/file' is not a directory",
        ),
    ]:
        with pytest.raises(RunnerConfigError, match=re.escape(why)):
            SubprocessRunner(SPEC, {"command": "x", **config})
    # A log file that is not there yet is made at start; {runner_id} in a file name is fine.
    SubprocessRunner(SPEC, {"command": "x", "log_file": str(tmp_path / "{runner_id}.log")})


@pytest.mark.anyio
async def test_subprocess_paths_broken_after_the_runner_was_built_are_named_at_load(
    tmp_path: Path,
) -> None:
    # Things change after the worker's start: the failure names the setting, not the
    # command ("cannot start 'echo': [Errno 21] Is a directory: ..." before).
    fds = len(os.listdir("/proc/self/fd"))
    workdir = tmp_path / "work"
    workdir.mkdir()
    runner = SubprocessRunner(SPEC, {"command": "echo hi", "cwd": str(workdir)})
    workdir.rmdir()
    with pytest.raises(RunnerError) as caught:
        await runner.load()
    assert str(caught.value) == (
        f"runner 'subprocess' config: cwd '{workdir}': No such file or directory"
    )
    await runner.stop()
    log_file = tmp_path / "stderr.log"
    runner = SubprocessRunner(SPEC, {"command": "echo hi", "log_file": str(log_file)})
    log_file.mkdir()
    with pytest.raises(RunnerError) as caught:
        await runner.load()
    assert str(caught.value) == (
        f"runner 'subprocess' config: log_file '{log_file}': cannot open it: Is a directory"
    )
    await runner.stop()
    assert len(os.listdir("/proc/self/fd")) == fds  # a failed start keeps no descriptor


@pytest.mark.anyio
async def test_subprocess_stderr_log_file_per_runner(program: list[str], tmp_path: Path) -> None:
    log_file = tmp_path / "runner-{runner_id}.log"
    runner = SubprocessRunner(SPEC, {"command": [*program, "crash"], "log_file": str(log_file)})
    with anyio.fail_after(20):
        await runner.load()
        with pytest.raises(RunnerFailed, match="out of memory"):
            await runner.run()
        await runner.stop()
    written = (tmp_path / "runner-ds-1_2.log").read_text()
    assert written == "loading weights\nCUDA error: out of memory\n"


@pytest.mark.anyio
async def test_subprocess_runners_sharing_a_log_file_keep_their_own_reasons(
    tmp_path: Path,
) -> None:
    # One log_file for every slot: each runner's failure reason is its own last line, and
    # each line in the file says whose it is.
    go = shlex.quote(str(tmp_path / "go"))
    failing = SubprocessRunner(
        SPEC,
        {
            "command": [
                "sh",
                "-c",
                f"echo 'A: out of memory' >&2; echo READY; "
                f"while [ ! -e {go} ]; do sleep 0.05; done; exit 3",
            ],
            "wait_ready": True,
            "log_file": str(tmp_path / "shared.log"),
        },
    )
    other_spec = msgspec.structs.replace(SPEC, runner_id="ds-1/3", slot=3)
    serving = SubprocessRunner(
        other_spec,
        {
            "command": ["sh", "-c", "echo 'B: serving' >&2; echo READY; exec sleep 60"],
            "wait_ready": True,
            "log_file": str(tmp_path / "shared.log"),
        },
    )
    with anyio.fail_after(60):
        await failing.load()
        await serving.load()  # its line is written after the failing runner's
        (tmp_path / "go").touch()
        with pytest.raises(RunnerFailed) as failed:
            await failing.run()
        assert str(failed.value) == "exited with code 3: A: out of memory"
        await failing.stop()
        await serving.stop()
    lines = (tmp_path / "shared.log").read_text().splitlines()
    assert sorted(lines) == ["ds-1/2: A: out of memory", "ds-1/3: B: serving"]


@pytest.mark.anyio
async def test_subprocess_stderr_flood_keeps_a_bounded_tail(program: list[str]) -> None:
    runner = SubprocessRunner(SPEC, {"command": [*program, "flood"], "wait_ready": True})
    with anyio.fail_after(60):
        await runner.load()
        # Not a file growing for the command's life: a pipe, of which a tail is kept.
        assert not stat.S_ISREG(os.stat(f"/proc/{runner.pid}/fd/2").st_mode)
        while not runner.stderr_tail.endswith(b"the last words\n"):
            await anyio.sleep(0.01)
        assert len(runner.stderr_tail) <= STDERR_TAIL_BYTES
        await runner.stop()
    assert (await runner.health()).reason == "killed by SIGTERM: the last words"


def test_subprocess_config_is_validated() -> None:
    with pytest.raises(RunnerConfigError, match="command is empty"):
        SubprocessRunner(SPEC, {"command": []})
    with pytest.raises(RunnerConfigError, match="command is empty"):
        SubprocessRunner(SPEC, {"command": "   "})
    with pytest.raises(RunnerConfigError, match="command: No closing quotation"):
        SubprocessRunner(SPEC, {"command": "serve 'oops"})
    with pytest.raises(RunnerConfigError, match="Object missing required field `command`"):
        SubprocessRunner(SPEC, {})
    with pytest.raises(RunnerConfigError, match="grace_s"):
        SubprocessRunner(SPEC, {"command": "x", "grace_s": 0})
    # Finite and bounded: a stop must end, and the manager waits as long as it may take.
    for key, value in [
        ("grace_s", math.inf),
        ("grace_s", 1e308),
        ("grace_s", 601),
        ("load_timeout_s", math.inf),
        ("request_timeout_s", math.nan),
        ("request_timeout_s", 3601),
    ]:
        with pytest.raises(RunnerConfigError, match=key):
            SubprocessRunner(SPEC, {"command": "x", key: value})
    assert SubprocessRunner(SPEC, {"command": "x", "grace_s": 600}).stop_time_s() == 1810
    # What the OS would refuse at every start is refused here, naming the key.
    for env, why in [
        ({"A=B": "x"}, "'A=B' is not a variable name"),
        ({"": "x"}, "'' is not a variable name"),
        ({"A\0": "x"}, "is not a variable name"),
        ({"A": "x\0"}, "the value of 'A' holds a NUL byte"),
    ]:
        with pytest.raises(RunnerConfigError, match=f"env: .*{re.escape(why)}"):
            SubprocessRunner(SPEC, {"command": "x", "env": env})
    configs: list[dict[str, Any]] = [{"command": ["x", "a\0"]}, {"command": "x", "cwd": "/\0"}]
    for config in configs:
        with pytest.raises(RunnerConfigError, match="holds a NUL byte"):
            SubprocessRunner(SPEC, config)
    with pytest.raises(RunnerConfigError, match="unknown field `cmd`"):
        SubprocessRunner(SPEC, {"command": "x", "cmd": "y"})
    assert SubprocessRunner(SPEC, {"command": "serve --port '8 0'"}).argv == [
        "serve",
        "--port",
        "8 0",
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_builtin_kinds() -> None:
    assert find_kind("simulated") is SimulatedRunner
    assert find_kind("subprocess") is SubprocessRunner
    kinds = available_kinds()
    assert kinds["simulated"] == kinds["subprocess"] == "built-in"
    runner = make_factory("simulated", {"load_s": 0})(SPEC)
    assert isinstance(runner, SimulatedRunner) and runner.spec is SPEC


def test_unknown_kind_names_the_available_ones() -> None:
    with pytest.raises(
        UnknownRunnerKind, match=r"unknown runner kind 'vllm' \(available: .*simulated"
    ):
        find_kind("vllm")


PLUGIN = """
from cluster.worker.runners import HEALTHY, Runner


class EchoRunner(Runner):
    kind = "echo"

    def __init__(self, spec, config):
        super().__init__(spec)
        self.prefix = config.get("prefix", "").encode()

    async def load(self):
        pass

    async def run(self):
        import anyio
        await anyio.sleep_forever()

    async def health(self):
        return HEALTHY

    async def serve_request(self, payload):
        return self.prefix + payload

    def work_units(self):
        return 0

    async def stop(self):
        pass


def not_a_runner(spec, config):
    return "surprise"

BROKEN = 42
"""


LONGEST_KIND = "k" * MAX_ID_CHARS
TOO_LONG_KIND = "k" * (MAX_ID_CHARS + 1)


@pytest.fixture
def plugin_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real installed distribution (a dist-info on sys.path) declaring runner entry points."""
    (tmp_path / "echo_plugin.py").write_text(PLUGIN)
    dist = tmp_path / "echo_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\n"
        "echo = echo_plugin:EchoRunner\n"
        "liar = echo_plugin:not_a_runner\n"
        "broken = echo_plugin:BROKEN\n"
        "missing = no_such_module:Runner\n"
        "simulated = echo_plugin:EchoRunner\n"
        f"{LONGEST_KIND} = echo_plugin:EchoRunner\n"
        f"{TOO_LONG_KIND} = echo_plugin:EchoRunner\n"
        "echo\x1b[2J = echo_plugin:EchoRunner\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.anyio
async def test_entry_point_runner_kinds(plugin_distribution: Path) -> None:
    kinds = available_kinds()
    assert kinds["echo"] == "entry point echo_plugin:EchoRunner"
    assert kinds["simulated"] == "built-in"  # a plugin cannot shadow a built-in
    assert find_kind("simulated") is SimulatedRunner
    runner = make_factory("echo", {"prefix": "re: "})(SPEC)
    assert isinstance(runner, Runner)
    assert await runner.serve_request(b"hi") == b"re: hi"
    with pytest.raises(RunnerConfigError, match="built a str, not a Runner"):
        make_factory("liar", {})(SPEC)
    with pytest.raises(RunnerConfigError, match=r"'broken'.*not a runner class or callable"):
        find_kind("broken")
    with pytest.raises(RunnerConfigError, match=r"cannot load entry point.*ModuleNotFoundError"):
        find_kind("missing")


def test_runner_setting_file(tmp_path: Path) -> None:
    path = tmp_path / "runner.toml"
    path.write_text(
        'kind = "subprocess"\n[config]\ncommand = ["python", "serve.py"]\ngrace_s = 2\n'
    )
    setting = load_runner_setting(path)
    assert setting == RunnerSetting(
        kind="subprocess", config={"command": ["python", "serve.py"], "grace_s": 2}
    )
    assert setting.digest() == config_digest(
        "subprocess", {"grace_s": 2, "command": ["python", "serve.py"]}
    )

    path.write_text('kind = "vllm"\n')
    with pytest.raises(UnknownRunnerKind, match="'vllm'"):
        load_runner_setting(path)
    path.write_text("kind = \n")
    with pytest.raises(RunnerConfigError, match=r"runner\.toml: not valid TOML"):
        load_runner_setting(path)
    path.write_text('kind = "simulated"\nconfigs = {}\n')
    with pytest.raises(RunnerConfigError, match="unknown field `configs`"):
        load_runner_setting(path)
    with pytest.raises(RunnerConfigError, match="No such file"):
        load_runner_setting(tmp_path / "absent.toml")


def test_a_kind_the_log_cannot_name_is_refused_when_the_setting_is_loaded(
    plugin_distribution: Path, tmp_path: Path
) -> None:
    """A plugin kind whose name is longer than `MAX_ID_CHARS` (or not printable) loaded and
    ran, but the master refused every self-test naming it: the worker set each aside and the
    node was never placed, said only in `outbox/refused.jsonl`. Refused at start instead,
    naming the kind and the limit, from a runner file and from an embedder's setting."""
    path = tmp_path / "runner.toml"
    path.write_text(f'kind = "{LONGEST_KIND}"\n')
    assert load_runner_setting(path).kind == LONGEST_KIND  # at the limit: fine
    assert isinstance(make_factory(LONGEST_KIND, {})(SPEC), Runner)
    path.write_text(f'kind = "{TOO_LONG_KIND}"\n')
    n, limit = MAX_ID_CHARS + 1, MAX_ID_CHARS
    why = f"runner kind '{TOO_LONG_KIND}' is {n} characters long: the limit is {limit}"
    with pytest.raises(RunnerConfigError, match=f"^{why} "):
        load_runner_setting(path)
    with pytest.raises(RunnerConfigError, match=f"^{why} "):
        WorkerNode(
            tmp_path / "w",
            "/ip4/127.0.0.1/tcp/1",
            WorkerNodeConfig(runner=RunnerSetting(kind=TOO_LONG_KIND)),
        )
    assert not (tmp_path / "w").exists()  # nothing made before the setting is checked
    path.write_text('kind = "echo\\u001b[2J"\n')
    with pytest.raises(
        RunnerConfigError,
        match=r"^runner kind 'echo\\x1b\[2J': field kind holds the control or format character",
    ):
        load_runner_setting(path)


def test_config_digest_tracks_the_setting() -> None:
    a: Mapping[str, Any] = {"load_s": 1, "units_per_s": 2}
    assert config_digest("simulated", a) == config_digest(
        "simulated", dict(reversed(list(a.items())))
    )
    assert config_digest("simulated", a) != config_digest("simulated", {**a, "load_s": 2})
    assert config_digest("simulated", a) != config_digest("subprocess", a)
    assert len(config_digest("simulated", a)) == 64


@pytest.mark.anyio
async def test_closing_a_process_that_never_ends_is_bounded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A leader stuck in the kernel (a hung GPU driver call) ignores even SIGKILL; anyio's
    aclose() waited for it without limit, inside a shielded scope: the stop, and the worker's
    shutdown behind it, hung for good."""

    class Stuck:
        pid = 4242
        stdin = stdout = stderr = None

        async def wait(self) -> int:
            await anyio.sleep_forever()
            return 0

    monkeypatch.setattr(subprocess_runner, "_REAP_WAIT_S", 0.2)
    with anyio.fail_after(20), anyio.CancelScope(shield=True):
        await subprocess_runner._close_bounded(Stuck())  # type: ignore[arg-type]
    assert "process 4242 did not end" in caplog.text
