"""The operator's commands against real processes on 127.0.0.1, as an operator types them.

`cluster maintenance next/cancel/finish` on the worker's host and `cluster session
create/list/delete` on the master's host: each answers in plain words, is recorded in the
master's log, and a command that cannot be carried out exits 1 with the reason on stderr
(nothing in the log changes for it).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from cluster_procs import start_master, start_worker, wait_until
from cluster_scenarios import Deadline, MasterLog, cluster_cli, node_id_of, start_full_worker

from cluster.shared.events import (
    MaintenanceCancelled,
    MaintenanceFinished,
    MaintenanceScheduled,
    MaintenanceStarted,
    SessionDeleted,
    SessionRequested,
)

pytestmark = pytest.mark.slow

CONFIG = """
[maintenance]
min_lead = "2s"
drain_lead = "1s"
max_duration = "2m"
max_concurrent_capacity_share = 1.0  # a one-node cluster may go (the default needs two)
"""


def test_maintenance_and_session_commands(tmp_path: Path) -> None:
    budget = Deadline(150)
    logs = tmp_path / "logs"
    logs.mkdir()
    mdir, wdir = tmp_path / "master", tmp_path / "worker"
    config = tmp_path / "cluster.toml"
    config.write_text(CONFIG, encoding="utf-8")
    master, _addr = start_master(mdir, logs, "--config", str(config), "--plan-interval", "0.5")
    # Announced once the master serves (a refused start removes it: test_cli_validation).
    secret = mdir / "cluster.secret"
    assert (
        f"cluster secret: {secret} (workers: --cluster-secret-file {secret})" in master.log_text()
    )
    worker = None
    log = MasterLog(mdir)

    def maintenance(*args: str) -> tuple[int, str, str]:
        done = cluster_cli("maintenance", "--data-dir", str(wdir), *args)
        return done.returncode, done.stdout, done.stderr

    def session(*args: str) -> tuple[int, str, str]:
        done = cluster_cli("session", "--data-dir", str(mdir), *args)
        return done.returncode, done.stdout, done.stderr

    try:
        worker = start_full_worker("a", wdir, logs, mdir)
        node = node_id_of(worker, budget.left(30))
        # The worker forwards requests once it is connected: wait until `next` answers.
        wait_until(lambda: maintenance("next")[0] == 0, budget.left(30), "maintenance next")
        code, out, err = maintenance("next")
        assert code == 0 and "credit" in out, (out, err)

        # --- schedule, see it with `next`, cancel it; a second cancel has nothing to cancel.
        code, out, err = maintenance("schedule", "--in", "1m", "--duration", "30s")
        assert code == 0 and "scheduled window" in out, (out, err)
        _, first = log.wait_for(
            MaintenanceScheduled, lambda e: e.node_id == node, 10, "the first window"
        )
        code, out, err = maintenance("next")
        assert code == 0 and first.window_id in out, (out, err)
        code, out, err = maintenance("cancel")
        assert code == 0, (out, err)
        _, cancelled = log.wait_for(
            MaintenanceCancelled, lambda e: e.window_id == first.window_id, 10, "the cancel"
        )
        assert cancelled.node_id == node
        before = len(log.refresh())
        code, out, err = maintenance("cancel")
        assert code == 1 and out == "" and err.strip(), (out, err)
        code, out, err = maintenance("finish", "--window", first.window_id)
        assert code == 1 and first.window_id in err, (out, err)  # cancelled: nothing to finish

        # --- a window that starts soon: once active, `finish` closes it; a second one refuses.
        code, out, err = maintenance("schedule", "--in", "3s", "--duration", "1m")
        assert code == 0, (out, err)
        _, second = log.wait_for(
            MaintenanceScheduled,
            lambda e: e.window_id != first.window_id,
            10,
            "the second window",
        )
        assert len(log.events) > before  # the refused commands logged nothing, this did
        refused = [ie for ie in log.events[before:] if isinstance(ie.event, MaintenanceCancelled)]
        assert refused == [], refused
        log.wait_for(
            MaintenanceStarted,
            lambda e: e.window_id == second.window_id,
            budget.left(20),
            "the second window's start",
        )
        code, out, err = maintenance("finish")
        assert code == 0, (out, err)
        _, finished = log.wait_for(
            MaintenanceFinished, lambda e: e.window_id == second.window_id, 10, "the finish"
        )
        assert finished.how == "host" and finished.node_id == node
        code, out, err = maintenance("finish", "--window", second.window_id)
        assert code == 1 and err.strip(), (out, err)

        # --- sessions on the master's host: create, list (plain and JSON), delete.
        code, out, err = session("list")
        assert code == 0 and out.strip() == "no sessions", (out, err)
        code, out, err = session("create", "--slots", "1", "--memory-mb", "256", "--name", "web")
        assert code == 0, (out, err)
        _, requested = log.wait_for(SessionRequested, lambda e: True, 10, "the session")
        sid = requested.session_id
        code, out, err = session("list")
        assert code == 0 and f"{sid}: 1 slot x 256 MiB" in out, (out, err)
        code, out, err = session("list", "--json")
        listed = json.loads(out)
        assert code == 0 and listed["ok"], listed
        assert [(s["session_id"], s["slots"], s["memory_per_slot_mb"]) for s in listed["data"]] == [
            (sid, 1, 256)
        ]
        code, out, err = session("delete", sid)
        assert code == 0, (out, err)
        log.wait_for(SessionDeleted, lambda e: e.session_id == sid, 10, "the delete")
        code, out, err = session("list")
        assert code == 0 and out.strip() == "no sessions", (out, err)
        code, out, err = session("delete", sid)
        assert code == 1 and sid in err, (out, err)
        code, out, err = session("delete", "no-such-session")
        assert code == 1 and "no-such-session" in err, (out, err)
    finally:
        codes = {"worker": worker.stop()} if worker is not None else {}
        codes["master"] = master.stop()
    assert all(code == 0 for code in codes.values()), codes
    final = MasterLog(mdir)
    final.refresh()
    assert [e.session_id for _, e in final.of(SessionDeleted)] == [sid]  # one delete, not two


def test_a_process_on_a_data_dir_another_role_runs_with_is_refused(tmp_path: Path) -> None:
    """A worker started with a running master's `--data-dir` joined with the master's own id
    and, on exit, removed the master's control socket (`cluster session` then found none);
    a master started with a running worker's took the worker's id, wrote its log, secret and
    address there and removed the worker's socket. Each is refused in one line now, creating
    nothing, and the running process keeps its socket."""
    budget = Deadline(120)
    logs = tmp_path / "logs"
    logs.mkdir()
    mdir, wdir = tmp_path / "master", tmp_path / "worker"
    master, addr = start_master(mdir, logs)
    worker = None
    try:
        done = cluster_cli(
            "worker",
            "--data-dir",
            str(mdir),
            "--master",
            str(mdir / "master.addr"),
            "--cluster-secret-file",
            str(mdir / "cluster.secret"),
            "--no-info",
            timeout=budget.left(30),
        )
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert done.stderr == (
            f"cluster worker: data directory {mdir} holds a master's event log ({mdir}/log): "
            "it is a master's, and a worker needs a data directory of its own\n"
        )
        assert not (mdir / "outbox").exists()
        listed = cluster_cli("session", "--data-dir", str(mdir), "list", timeout=budget.left(30))
        assert listed.returncode == 0, listed.stderr

        worker = start_worker(
            "w", wdir, logs, addr, "--cluster-secret-file", str(mdir / "cluster.secret")
        )
        node_id_of(worker, budget.left(30))
        wait_until(lambda: (wdir / "control.sock").exists(), budget.left(30), "worker socket")
        socket_before = (wdir / "control.sock").lstat().st_ino
        done = cluster_cli(
            "master", "--data-dir", str(wdir), "--http", "off", timeout=budget.left(30)
        )
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert done.stderr == (
            f"cluster master: data directory {wdir} holds a worker's outbox ({wdir}/outbox): "
            "it is a worker's, and a master needs a data directory of its own\n"
        )
        made = [n for n in ("log", "cluster.secret", "master.addr") if (wdir / n).exists()]
        assert not made, made
        assert (wdir / "control.sock").lstat().st_ino == socket_before
        wait_until(
            lambda: cluster_cli("maintenance", "--data-dir", str(wdir), "next").returncode == 0,
            budget.left(30),
            "the worker's control socket to answer",
        )
        assert worker.stop() == 0
        worker = None
    finally:
        if worker is not None:
            worker.stop()
        assert master.stop() == 0


@pytest.mark.parametrize("command", ["master", "worker"])
def test_a_control_socket_something_listens_on_is_not_taken_over(
    command: str, tmp_path: Path
) -> None:
    """Starting, a master or worker unlinked whatever was at `control.sock` and bound its
    own, even where a live process listened: that process's commands lost their socket.
    Now it stops in one line naming the socket, and leaves it in place."""
    data_dir = tmp_path / command
    data_dir.mkdir()
    path = data_dir / "control.sock"
    argv = [command, "--data-dir", str(data_dir), "--log-level", "WARNING"]
    if command == "master":
        argv += ["--http", "off"]
    else:  # a master that is not there: the worker keeps dialling while it serves
        peer = "12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
        argv += ["--master", f"/ip4/127.0.0.1/tcp/1/p2p/{peer}", "--no-info", "--no-runners"]
    with socket.socket(socket.AF_UNIX) as other:  # listening: connects succeed
        other.bind(str(path))
        other.listen()
        theirs = path.lstat().st_ino
        done = cluster_cli(*argv, timeout=60)
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert done.stderr == (
            f"cluster {command}: {path} answers: another master or worker is running with "
            f"--data-dir {data_dir} (each process needs a data directory of its own)\n"
        )
        assert path.lstat().st_ino == theirs
