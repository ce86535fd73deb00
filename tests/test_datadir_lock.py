"""One lock for a whole data directory, whatever the role (`cluster.datadir.hold`).

Each role used to lock only its own files (the master its log, the worker its outbox), and
the role check looked for what the other role leaves: a master and a worker started on one
*empty* directory at the same moment both passed it and both created their key, secret, log
and outbox before one was refused at the control socket. Now each takes the directory's
lock first and checks the role under it. flock is per open file description, so two nodes
in one process conflict as two processes do.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cluster_procs import Proc, wait_until

from cluster import cli
from cluster.datadir import DataDirInUseError, hold
from cluster.master.node import MasterNode
from cluster.net.identity import IdentityError
from cluster.net.membership import Membership
from cluster.worker.client import Worker

MEMBERSHIP = Membership(secret=b"s" * 32)
ADDR = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"


def _open(role: str, data_dir: Path) -> MasterNode | Worker:
    return MasterNode(data_dir, MEMBERSHIP) if role == "master" else Worker(data_dir, ADDR)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its inode and size: what a refused node must not touch."""
    return {
        str(p.relative_to(root)): (p.lstat().st_ino, p.lstat().st_size) for p in root.rglob("*")
    }


def _in_use(data_dir: Path) -> str:
    return (
        f"data directory {data_dir} is in use: another master or worker holds it (lock "
        f"{data_dir / 'LOCK'}); each process needs a data directory of its own"
    )


@pytest.mark.parametrize("first", ["master", "worker"])
def test_a_master_and_a_worker_starting_together_on_an_empty_directory(
    first: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race, made deterministic: the second node is built while the first has passed
    its role check but made nothing yet (its key is the next thing it makes). Both used to
    pass the check and fill the directory with a master's and a worker's files."""
    import cluster.master.node
    import cluster.worker.client

    second = "worker" if first == "master" else "master"
    data_dir = tmp_path / "d"
    seen: list[tuple[dict[str, tuple[int, int]], BaseException | None]] = []
    module: Any = cluster.master.node if first == "master" else cluster.worker.client
    real: Callable[[Path], Any] = module.load_identity

    def second_starts_now(path: Path) -> Any:
        before = _tree(data_dir)
        try:
            _open(second, data_dir).close()
        except DataDirInUseError as exc:
            seen.append((before, exc))
        else:
            seen.append((before, None))
        monkeypatch.setattr(module, "load_identity", real)
        return real(path)

    monkeypatch.setattr(module, "load_identity", second_starts_now)
    node = _open(first, data_dir)
    try:
        [(before, refused)] = seen
        assert refused is not None, f"a {second} started beside a starting {first}"
        assert str(refused) == _in_use(data_dir)
        assert before == {"LOCK": before["LOCK"]}  # nothing but the first one's lock
    finally:
        node.close()
    made = {"log", "node.key"} if first == "master" else {"outbox", "node.key"}
    assert made <= set(_tree(data_dir))
    assert not ({"log", "outbox"} - made) & set(_tree(data_dir))  # nothing of the second's


@pytest.mark.parametrize(
    ("first", "second"),
    [("master", "worker"), ("worker", "master"), ("master", "master"), ("worker", "worker")],
)
def test_a_second_node_on_a_held_directory_is_refused_creating_nothing(
    first: str, second: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "d"
    node = _open(first, data_dir)
    try:
        before = _tree(tmp_path)
        with pytest.raises(DataDirInUseError) as refused:
            _open(second, data_dir)
        assert str(refused.value) == _in_use(data_dir)
        assert _tree(tmp_path) == before
    finally:
        node.close()
    _open(first, data_dir).close()  # close() released it


def test_a_node_that_fails_opening_releases_the_directory(tmp_path: Path) -> None:
    data_dir = tmp_path / "w"
    (data_dir / "node.key").mkdir(parents=True)  # the key cannot be read: opening fails
    with pytest.raises(IdentityError):
        Worker(data_dir, ADDR)
    (data_dir / "node.key").rmdir()
    Worker(data_dir, ADDR).close()


def test_the_master_command_on_a_held_directory_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cluster master` locks the directory before it writes `cluster.secret` there."""
    data_dir = tmp_path / "d"
    starting = hold(data_dir, "worker")  # a worker that has made nothing else yet
    try:
        before = _tree(tmp_path)
        assert cli.main(["master", "--data-dir", str(data_dir), "--http", "off"]) == 2
        assert capsys.readouterr().err == f"cluster master: {_in_use(data_dir)}\n"
        assert _tree(tmp_path) == before  # no cluster.secret, no key, no log
    finally:
        starting.release()


@pytest.mark.slow
def test_a_worker_killed_with_sigkill_leaves_its_directory_free(tmp_path: Path) -> None:
    """A second `cluster worker` on a running one's directory stops in one line (exit 2);
    once the first is killed -9, the kernel has released its lock and a worker opens."""
    data_dir = tmp_path / "w"
    logs = tmp_path / "logs"
    logs.mkdir()
    argv = ["worker", "--data-dir", str(data_dir), "--master", ADDR, "--no-info", "--no-runners"]
    running = Proc("w", argv, logs)
    try:
        wait_until(lambda: "data dir" in running.log_text(), 60, "the worker to start")
        done = subprocess.run(
            [sys.executable, "-m", "cluster", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert done.stderr == f"cluster worker: {_in_use(data_dir)}\n"
        with pytest.raises(DataDirInUseError):
            Worker(data_dir, ADDR)
    finally:
        running.kill9()
    Worker(data_dir, ADDR).close()


def test_a_shared_lock_holds_the_directory_until_both_are_released(tmp_path: Path) -> None:
    """`cluster master` hands its lock to the node, which releases it when it closes, and
    keeps a second handle until it has removed what a refused start created there."""
    lock = hold(tmp_path, "master")
    second = lock.share()
    lock.release()
    with pytest.raises(DataDirInUseError):
        hold(tmp_path, "worker")
    second.release()
    hold(tmp_path, "worker").release()
    with pytest.raises(ValueError, match="is not held"):
        lock.share()
