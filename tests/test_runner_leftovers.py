"""Runner commands a killed worker left running are ended by the next worker on its data
dir; processes that only look like them are not."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from cluster_procs import wait_until

from cluster.worker.node import WorkerNode, WorkerNodeConfig
from cluster.worker.runners import RunnerSpec, SubprocessRunner
from cluster.worker.runners.process_groups import OWNER_VARIABLE, RunnerProcessGroups

# A runner that neither prints nor reads (a model still loading): the shell leads the group,
# `sleep` is its child.
SILENT_COMMAND = ["sh", "-c", "sleep 1000; :"]
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
async def test_a_restarted_worker_ends_the_runner_its_killed_predecessor_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "w"
    runner_pgid: int | None = None
    try:
        with started(SILENT_COMMAND) as stranger:
            with started(
                [sys.executable, "-c", STAND_IN_WORKER, str(data_dir / "runners"), *SILENT_COMMAND]
            ) as stand_in:
                runner_pgid = read_pid(stand_in)  # the leader of its own group
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
