"""Bad command-line input gets a clear message naming what was wrong, and exit code 2."""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import cli


@pytest.mark.parametrize("command", ["master", "worker"])
def test_data_dir_that_is_a_file_is_refused(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    argv = [command, "--data-dir", str(not_a_dir)]
    if command == "worker":
        argv += [
            "--master",
            "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq",
        ]
    assert cli.main(argv) == 2
    assert f"--data-dir {not_a_dir} is a file, not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["master", "worker"])
def test_an_empty_data_dir_is_refused(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--data-dir ""` (an unset variable in a script) ran in the current directory."""
    argv = [command, "--data-dir", ""]
    if command == "worker":
        argv += ["--master", "/ip4/127.0.0.1/tcp/1"]
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "argument --data-dir: must name a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epoch-length", "5x"], "cluster master: --epoch-length '5x': unknown unit 'x'"),
        (["--epoch-length", "5"], "cluster master: --epoch-length '5' has no unit"),
        (["--http", "0.0.0.0:8470"], "exposes it beyond this machine: set a token (`cluster "),
        (["--http", "0.0.0.0:8470"], "master --http-token-file FILE`; clients then send"),
        (["--http", "nonsense"], "expected HOST:PORT"),
        (["--plan-interval", "0"], "--plan-interval must be a finite number > 0"),
        (["--plan-interval", "inf"], "--plan-interval must be a finite number > 0, got inf"),
        (["--peer-timeout", "nan"], "--peer-timeout must be 3..86400 seconds, got nan"),
        # Not "epoch_length_ms must be at least plan_interval_ms (1000000000000...)":
        (
            ["--plan-interval", "1e300"],
            "--plan-interval must be at most 31,622,400 seconds (366 days), got 1e+300",
        ),
    ],
)
def test_master_options_are_validated(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["master", "--data-dir", str(tmp_path / "m"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()  # a refused setting leaves no new directory behind


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # Bounded like the worker's (one check, _process.PEER_TIMEOUT_S).
        (["--peer-timeout", "1e300"], "--peer-timeout must be 3..86400 seconds, got 1e+300"),
        (["--peer-timeout", "2"], "--peer-timeout must be 3..86400 seconds, got 2.0"),
        # The config file's check (config.check_stale_cycles), naming the flag.
        (["--stale-cycles", str(10**18)], f"--stale-cycles must be at most 10,000, got {10**18}"),
        (["--stale-cycles", "10001"], "--stale-cycles must be at most 10,000, got 10001"),
        (["--stale-cycles", "0"], "--stale-cycles must be >= 1, got 0"),
        # 10**30 was accepted: never a snapshot, every restart refolds the whole log.
        (
            ["--snapshot-every", str(10**30)],
            f"--snapshot-every must be 1..100,000,000 events, got {10**30}",
        ),
        (["--snapshot-every", "0"], "--snapshot-every must be 1..100,000,000 events, got 0"),
    ],
)
def test_master_bounds_are_checked_before_anything_starts(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--peer-timeout 1e300` and `--stale-cycles 10**18` were accepted. A bad --http after
    them is checked later: accepted, they would be refused for it instead (not hang here
    running a master)."""
    argv = ["master", "--data-dir", str(tmp_path / "m"), *argv, "--http", "nonsense"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"cluster master: {message}\n", err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epoch-length", "xyz"], "cluster demo: --epoch-length 'xyz': expected a number"),
        (["--plan-interval", "-1"], "--plan-interval must be a finite number > 0, got -1.0"),
        (["--http", "nonsense"], "--http 'nonsense': expected HOST:PORT"),
        (["--plan-interval", "1e300"], "--plan-interval must be at most 31,622,400 seconds"),
        # Taken as 0: the demo started (here for a second, with no workers).
        (
            ["--session-slots", "-1", "--workers", "0", "--duration", "1"],
            "cluster demo: --session-slots must be >= 0",
        ),
    ],
)
def test_demo_checks_its_master_options_before_starting_anything(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Not "master did not start; see its log" (exit 1) after spawning it.
    assert cli.main(["demo", "--data-dir", str(tmp_path / "d"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_a_master_on_a_data_dir_another_master_holds_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cluster.shared.store import EventStore

    with EventStore.open(tmp_path / "m"):  # what a running master holds
        assert cli.main(["master", "--data-dir", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cluster master: ") and "Traceback" not in err
    assert "lock" in err.lower()
    assert err.endswith(
        f"another master is probably running with --data-dir {tmp_path / 'm'}; stop it first, "
        "or give this one another --data-dir\n"
    ), err


@pytest.mark.parametrize("which", ["listen", "http"])
def test_a_master_whose_port_is_taken_says_so_in_one_line(
    which: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """libp2p only logged a taken --listen port (then an IndexError traceback), and binds
    with SO_REUSEPORT, so a second master shared the port silently; a taken --http port
    said "Exceptions from Trio nursery (1 sub-exception)"."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["master", "--data-dir", str(tmp_path / "m"), "--listen", "/ip4/127.0.0.1/tcp/0"]
        if which == "listen":
            argv += ["--listen", f"/ip4/127.0.0.1/tcp/{port}", "--http", "off"]
        else:
            argv += ["--http", f"127.0.0.1:{port}"]
        assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cluster master: "), err
    assert str(port) in err[0] and "in use" in err[0].lower(), err
    if which == "http":
        assert err[0].endswith(
            "; `--http 127.0.0.1:0` picks a free port (written to <data-dir>/http.url), "
            "`--http off` runs without it"
        ), err


def test_an_allow_file_naming_nobody_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--allow-file` of blank lines started a master nobody could join, silently. (Its
    --listen port is taken: were the file accepted, the start would end there, not run.)"""
    allow = tmp_path / "allow"
    allow.write_text("\n\n", encoding="utf-8")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        argv = ["master", "--data-dir", str(tmp_path / "m"), "--http", "off"]
        argv += ["--listen", f"/ip4/127.0.0.1/tcp/{taken.getsockname()[1]}"]
        assert cli.main([*argv, "--allow-file", str(allow)]) == 2
    assert capsys.readouterr().err == (
        f"cluster master: allow-list {allow} names no peer id (list one a line): nobody could "
        "join\n"
    )
    assert not (tmp_path / "m").exists()


def test_an_empty_allow_file_beside_allow_flags_is_no_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The peers `--allow` names can join: an allow-list file still to be filled beside them
    was refused as "nobody could join". (The --listen port is taken: accepted, the start ends
    there.)"""
    allow = tmp_path / "allow"
    allow.write_text("# workers to come\n", encoding="utf-8")
    peer = "12D3KooWC9w4VpQsbty32hQnCPitYYddjkPcDYRo7P2UiwFyFUFW"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        argv = ["master", "--data-dir", str(tmp_path / "m"), "--http", "off"]
        argv += ["--listen", f"/ip4/127.0.0.1/tcp/{taken.getsockname()[1]}"]
        assert cli.main([*argv, "--allow", peer, "--allow-file", str(allow)]) == 2
    err = capsys.readouterr().err
    assert "allow-list" not in err and "in use" in err.lower(), err


@pytest.mark.parametrize("before", ["nothing", "a secret"])
@pytest.mark.parametrize("refusal", ["listen taken", "http taken", "bad key", "damaged log"])
def test_a_refused_master_start_leaves_nothing_new_behind(
    refusal: str, before: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A start refused for a taken port, a damaged key or log printed `cluster secret: ...`
    and left a new secret, key and log behind. Now only the directory's LOCK stays (and what
    was there before, untouched); the secret is announced once the master serves."""
    data_dir = tmp_path / "m"
    data_dir.mkdir()
    if before == "a secret":
        (data_dir / "cluster.secret").write_bytes(b"s" * 32)
    if refusal == "bad key":
        (data_dir / "node.key").write_bytes(b"junk")
    if refusal == "damaged log":
        (data_dir / "log").mkdir()
        (data_dir / "log" / "00000000000000000001.seg").write_bytes(b"junk" * 8)
    files_before = {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["master", "--data-dir", str(data_dir), "--http", "off"]
        if refusal == "listen taken":
            argv += ["--listen", f"/ip4/127.0.0.1/tcp/{port}"]
        if refusal == "http taken":
            argv += ["--http", f"127.0.0.1:{port}"]
        assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("cluster master: ") and err.count("\n") == 1, (out, err)
    left = {p for p in data_dir.rglob("*") if p.name != "LOCK"}
    assert left == {*files_before, *(p.parent for p in files_before if p.parent != data_dir)}
    assert {p: p.read_bytes() for p in files_before} == files_before


def test_a_start_refused_after_a_worker_was_heard_keeps_what_it_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The master serves workers before its HTTP API binds: a start refused then (the HTTP
    port taken) removed the new log -- with a worker's events acknowledged to it -- and the
    secret it joined with. Simulated: a worker's hello is indexed, then the bind fails."""
    import anyio
    from anyio.abc import TaskStatus

    from cluster.master.node import MasterNode
    from cluster.net.host import AddressError
    from cluster.shared.events import Event, NodeConnected
    from cluster.shared.state import State

    peer = "12D3KooWC9w4VpQsbty32hQnCPitYYddjkPcDYRo7P2UiwFyFUFW"

    def hello(state: State, now_ms: int) -> list[Event]:
        return [NodeConnected(node_id=peer, boot_id="b")]

    async def run(self: MasterNode, *, task_status: TaskStatus[object]) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(self.master.run)
            await self.master.index_decision(hello)
            raise AddressError("cannot listen on 127.0.0.1:1 (simulated): address in use")

    monkeypatch.setattr(MasterNode, "run", run)
    data_dir = tmp_path / "m"
    assert cli.main(["master", "--data-dir", str(data_dir), "--http", "off"]) == 2
    assert "simulated" in capsys.readouterr().err
    assert (data_dir / "cluster.secret").is_file() and (data_dir / "node.key").is_file()
    from cluster.shared.store import EventStore

    store = EventStore.open(data_dir)
    try:
        assert peer in store.state.nodes
    finally:
        store.close()


def test_master_config_file_errors_name_the_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "cluster.toml"
    config.write_text('[planner]\nstale_cycles = 0\n[maintenance]\nmin_lead = "soon"\n')
    assert cli.main(["master", "--data-dir", str(tmp_path / "m"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "stale_cycles" in err and str(config) in err
    # The same bound as --stale-cycles: one check for both. (A bad --http is checked after the
    # file: were the value accepted, the master would be refused for it rather than run.)
    config.write_text("[planner]\nstale_cycles = 10001\n")
    argv = ["master", "--data-dir", str(tmp_path / "m"), "--config", str(config)]
    assert cli.main([*argv, "--http", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert (
        f"{config} [planner]: " in err and "stale_cycles must be at most 10,000, got 10001" in err
    )
    config.write_text("[planer]\n")
    assert cli.main(["master", "--data-dir", str(tmp_path / "m"), "--config", str(config)]) == 2
    assert "unknown table(s) planer" in capsys.readouterr().err
    # An unknown key lists the known ones, in [planner] as in [maintenance].
    config.write_text("[planner]\nepoch_lenght_ms = 5\n")
    assert cli.main(["master", "--data-dir", str(tmp_path / "m"), "--config", str(config)]) == 2
    assert (
        f"cluster master: {config} [planner]: unknown setting 'epoch_lenght_ms'; known "
        "settings: plan_interval_ms, stale_cycles, fresh_idle_cycles, epoch_length_ms, "
    ) in capsys.readouterr().err
    config.write_text("planner = 3\n")
    assert cli.main(["master", "--data-dir", str(tmp_path / "m"), "--config", str(config)]) == 2
    assert f"{config} [planner]: expected a table of settings, got int" in capsys.readouterr().err
    # The directory was created before the file was read: refused, it stayed behind (empty).
    assert not (tmp_path / "m").exists()


def _master_args(*argv: str) -> argparse.Namespace:
    from cluster.commands import master

    parser = argparse.ArgumentParser()
    master.add_arguments(parser)
    return parser.parse_args(["--data-dir", "unused", *argv])


def test_master_config_file_values_hold_unless_a_flag_is_given(tmp_path: Path) -> None:
    from cluster.commands.master import planner_config
    from cluster.master.config import PlannerConfig
    from cluster.master.settings import load_settings

    config = tmp_path / "cluster.toml"
    # A duration as text, as [maintenance] takes it ("2m" was refused here).
    config.write_text('[planner]\nplan_interval_ms = 250\nstale_cycles = 5\nepoch_length = "2m"\n')
    file_cfg, _ = load_settings(config)
    # No flags: every value from the file (a flag's default must not mask it).
    cfg = planner_config(_master_args(), file_cfg)
    assert (cfg.plan_interval_ms, cfg.stale_cycles, cfg.epoch_length_ms) == (250, 5, 120_000)
    # Flags given: they win over the file, one setting at a time.
    cfg = planner_config(_master_args("--plan-interval", "2", "--epoch-length", "20m"), file_cfg)
    assert (cfg.plan_interval_ms, cfg.epoch_length_ms, cfg.stale_cycles) == (2_000, 1_200_000, 5)
    # Neither: the documented defaults.
    assert planner_config(_master_args(), PlannerConfig()) == PlannerConfig()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--heartbeat-interval", "0"], "--heartbeat-interval must be 0.01..60 seconds, got 0"),
        (["--heartbeat-interval", "1e-300"], "--heartbeat-interval must be 0.01..60 seconds"),
        (["--heartbeat-interval", "inf"], "--heartbeat-interval must be 0.01..60 seconds"),
        (["--peer-timeout", "nan"], "--peer-timeout must be 3..86400 seconds, got nan"),
        (["--peer-timeout", "0.5"], "--peer-timeout must be 3..86400 seconds, got 0.5"),
        (["--load", "-1"], "--load must be a finite number >= 0"),
        # Named as the flag (it said "slots must be 0..4096"):
        (["--slots", "-5"], "cluster worker: --slots must be 0..4096, got -5"),
        (["--slot-memory-mb", "-1"], "cluster worker: --slot-memory-mb must be 0.."),
        # Ignored before, typos and all, because another flag turned them off:
        (
            ["--no-info", "--slots", "-5", "--stall-info-source", "bogus"],
            "cluster worker: --slots, --stall-info-source has no effect with --no-info",
        ),
        (
            ["--no-runners", "--runner-file", "/nonexistent.toml"],
            "cluster worker: --runner-file has no effect with --no-runners",
        ),
    ],
)
def test_worker_options_are_validated(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    master = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
    argv = ["worker", "--data-dir", str(tmp_path / "w"), "--master", master, *argv]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_a_worker_load_too_high_to_pace_is_refused(tmp_path: Path) -> None:
    """`--load 1e300` emitted events in one endless burst that never yielded to the event
    loop: the worker hung, deaf to SIGTERM. A subprocess, so that a hang fails the test."""
    master = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
    argv = ["worker", "--data-dir", str(tmp_path / "w"), "--master", master, "--no-info"]
    src = str(Path(__file__).resolve().parents[1] / "src")
    proc = subprocess.run(
        [sys.executable, "-m", "cluster", *argv, "--no-runners", "--load", "1e300"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": src},
    )
    assert proc.returncode == 2
    assert proc.stderr == "cluster worker: --load must be at most 1,000,000 events per second\n"


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("/ip4/127.0.0.1/udp/7400", "cannot listen on /ip4/127.0.0.1/udp/7400: not a TCP address"),
        ("/ip6/::1", "cannot listen on /ip6/::1: not a TCP address"),
    ],
)
def test_a_master_listen_address_that_is_not_tcp_is_one_line(
    listen: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """libp2p logged two warnings ("no transport found ... Skipping") before the master said
    it could not listen, after it had created the cluster secret and printed its path."""
    data_dir = tmp_path / "m"
    assert cli.main(["master", "--data-dir", str(data_dir), "--listen", listen]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"cluster master: {message} (e.g. /ip4/0.0.0.0/tcp/7400)\n"
    assert captured.out == ""
    assert not (data_dir / "cluster.secret").exists()


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            "{tmp}/missing.addr",
            "--master '{tmp}/missing.addr' is neither a multiaddr nor a "
            "readable file: no such file",
        ),
        ("{tmp}", "--master '{tmp}' is neither a multiaddr nor a readable file: a directory"),
        # Looking for the file raised: "cluster worker: [Errno 36] File name too long: ...".
        (
            "x" * 300,
            f"--master '{'x' * 300}' is neither a multiaddr (starting with /) nor a readable "
            "file: file name too long",
        ),
        ("/ip4/127.0.0.1/tcp/1", "'/ip4/127.0.0.1/tcp/1' does not end in /p2p/<peer id>"),
        ("/ip4/999.0.0.1/tcp/1", "base address '999.0.0.1' is not IPv4"),
    ],
)
def test_a_worker_master_path_that_is_no_file_is_not_read_as_a_multiaddr(
    given: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing master.addr given by absolute path was parsed as a multiaddr: "Invalid
    MultiAddr '/tmp/.../missing.addr': unknown protocol: tmp"."""
    argv = ["worker", "--data-dir", str(tmp_path / "w"), "--master", given.format(tmp=tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cluster worker: ") and err.count("\n") == 1, err
    assert message.format(tmp=tmp_path) in err, err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # It said only "'utf-8' codec can't decode byte 0xff in position 0: ...".
        (b"\xff\xfe", "--master: {path} is not UTF-8 text"),
        # It said "'x' is not a valid multiaddr: ...", not where the x came from.
        (b"x\n", "--master: {path}: 'x' is not a valid multiaddr: "),
        (b"/ip4/127.0.0.1/tcp/1\n", "--master: {path}: '/ip4/127.0.0.1/tcp/1' does not end"),
        (b" \n", "--master: {path} is empty"),
    ],
)
def test_a_worker_master_file_that_holds_no_address_names_the_file(
    content: bytes, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "master.addr"
    path.write_bytes(content)
    assert cli.main(["worker", "--data-dir", str(tmp_path / "w"), "--master", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cluster worker: {message.format(path=path)}"), err
    assert err.count("\n") == 1 and not (tmp_path / "w").exists(), err


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_worker_master_path_that_is_no_regular_file_is_refused_without_reading_it(
    kind: str, tmp_path: Path
) -> None:
    """`--master` read its file whole: a named pipe blocked the worker until some writer came
    (at start, and again before every dial), /dev/zero filled its memory. A subprocess, so a
    worker that blocks fails the test at its timeout instead of hanging it."""
    if kind == "fifo":
        given = tmp_path / "master.addr"
        os.mkfifo(given)
        what = "is a named pipe"
    else:
        given, what = Path("/dev/zero"), "is a character device"
    argv = ["worker", "--data-dir", str(tmp_path / "w"), "--master", str(given)]
    src = str(Path(__file__).resolve().parents[1] / "src")
    proc = subprocess.run(
        [sys.executable, "-m", "cluster", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": src},
    )
    err = proc.stderr
    assert proc.returncode == 2, err
    assert err.startswith(f"cluster worker: --master: cannot read {given}: {what}"), err
    assert err.count("\n") == 1 and not (tmp_path / "w").exists(), err


@pytest.mark.parametrize(
    ("runner_file", "message"),
    [
        ('kind = "subprocess"\n[config]\ncomand = ["true"]\n', "unknown field `comand`"),
        ('kind = "simulated"\n[config]\nload_s = -1\n', "load_s"),
        ('kind = "simulated"\n[config]\nunits_per_s = "fast"\n', "units_per_s"),
    ],
)
def test_a_runner_config_mistake_stops_the_worker_at_start(
    runner_file: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Typos in a runner file's [config] used to surface only as a failed self-test in
    `cluster status` on the master; the worker itself logged nothing."""
    path = tmp_path / "runner.toml"
    path.write_text(runner_file)
    master = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
    argv = ["worker", "--data-dir", str(tmp_path / "w"), "--master", master]
    assert cli.main([*argv, "--runner-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cluster worker: ") and message in err, err
    assert not (tmp_path / "w").exists()  # refused before the directory is made


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('cwd = "{tmp}/gone"', "cwd: '{tmp}/gone' does not exist"),
        ('cwd = "{tmp}/runner.toml"', "cwd: '{tmp}/runner.toml' is not a directory"),
        ('log_file = "{tmp}"', "log_file: '{tmp}' is a directory, not a file"),
        (
            'log_file = "{tmp}/gone/{{runner_id}}.log"',
            "log_file: '{tmp}/gone/selftest_0.log': its directory '{tmp}/gone' does not exist",
        ),
    ],
)
def test_a_runner_path_that_cannot_work_stops_the_worker_at_start_naming_it(
    config: str, message: str, tmp_path: Path
) -> None:
    """A missing cwd or a log_file that is a directory only showed as a failed self-test in
    `cluster status`, blamed on the command: "cannot start 'echo': [Errno 21] Is a
    directory: '/tmp'". A subprocess: a worker that does not refuse runs on (and the test
    fails at its timeout rather than hang)."""
    path = tmp_path / "runner.toml"
    setting = config.format(tmp=tmp_path)
    path.write_text(f'kind = "subprocess"\n[config]\ncommand = "echo hi"\n{setting}\n')
    master = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
    argv = ["worker", "--data-dir", str(tmp_path / "w"), "--master", master]
    src = str(Path(__file__).resolve().parents[1] / "src")
    proc = subprocess.run(
        [sys.executable, "-m", "cluster", *argv, "--runner-file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": src},
    )
    err = proc.stderr
    assert proc.returncode == 2, err
    assert err.startswith(f"cluster worker: runner file {path}: "), err
    assert err.count("\n") == 1 and message.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "w").exists()  # refused before the directory is made


def test_ctrl_c_from_inside_a_task_group_is_one_line_and_exit_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C during `cluster selfcheck` reached main() wrapped in trio's exception group and
    printed a 54-line traceback."""
    from cluster.commands import selfcheck

    def interrupted(args: argparse.Namespace) -> int:
        raise BaseExceptionGroup("Exceptions from Trio nursery", [KeyboardInterrupt()])

    monkeypatch.setattr(selfcheck, "run", interrupted)
    assert cli.main(["selfcheck"]) == 130
    assert capsys.readouterr().err == "cluster selfcheck: interrupted\n"

    def broken(args: argparse.Namespace) -> int:
        raise BaseExceptionGroup("Exceptions from Trio nursery", [RuntimeError("a bug")])

    monkeypatch.setattr(selfcheck, "run", broken)
    with pytest.raises(BaseExceptionGroup):  # a real error is not hidden as an interrupt
        cli.main(["selfcheck"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["session", "list"], "cluster session: no control socket at {tmp}/control.sock: "),
        (["session", "delete", "s1"], "cluster session: no control socket at {tmp}/control.sock"),
        (["maintenance", "next"], "cluster maintenance: no control socket at {tmp}/control.sock"),
        (
            ["maintenance", "check", "--in", "5x", "--duration", "1h"],
            "cluster maintenance: --in '5x': unknown unit 'x'",
        ),
        # "-2h" was taken for an option: "argument --in: expected one argument".
        (
            ["maintenance", "schedule", "--in", "-2h", "--duration", "1h"],
            "cluster maintenance: --in '-2h': a duration cannot be negative",
        ),
        (
            ["maintenance", "check", "--in=-2h", "--duration", "1h"],
            "cluster maintenance: --in '-2h': a duration cannot be negative",
        ),
        (
            ["maintenance", "check", "--in", "2h", "--duration", "-30m"],
            "cluster maintenance: --duration '-30m': a duration cannot be negative",
        ),
        (
            ["maintenance", "check", "--at", "tomorrow", "--duration", "1h"],
            "cluster maintenance: --at 'tomorrow': not an ISO 8601 time",
        ),
    ],
)
def test_session_and_maintenance_errors_name_the_command(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """They began `error: ...` where every other command's begin `cluster <command>: `."""
    assert cli.main([argv[0], "--data-dir", str(tmp_path), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(tmp=tmp_path)) and err.count("\n") == 1, err


def _doc_config_blocks() -> list[tuple[str, str]]:
    """(file, text) of each ```toml block in the docs with a [planner] or [maintenance]
    table: what an operator copies into `cluster master --config`."""
    root = Path(__file__).resolve().parent.parent
    blocks = []
    for doc in sorted([*root.glob("docs/*.md"), root / "README.md"]):
        for block in re.findall(r"```toml\n(.*?)```", doc.read_text(encoding="utf-8"), re.S):
            if re.search(r"^\[(planner|maintenance)\]", block, re.M):
                blocks.append((doc.name, block))
    return blocks


@pytest.mark.parametrize(("doc", "block"), _doc_config_blocks())
def test_the_docs_config_examples_load(doc: str, block: str, tmp_path: Path) -> None:
    """The example `operator_ids` once held a placeholder that the peer-id check refuses.
    No example shows settings that work against each other either."""
    from cluster.master.settings import load_settings, settings_warnings

    path = tmp_path / "cluster.toml"
    path.write_text(block, encoding="utf-8")
    assert settings_warnings(*load_settings(path)) == []


def test_the_docs_have_config_examples() -> None:
    assert len(_doc_config_blocks()) >= 3


def test_a_stale_cycles_flag_at_or_below_fresh_idle_cycles_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The error named only the config key, though the operator typed the flag."""
    argv = ["master", "--data-dir", str(tmp_path / "m"), "--stale-cycles", "1", "--http", "off"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--stale-cycles" in err and "fresh_idle_cycles (1)" in err, err
    # Said as the flag's own bound, not as the config object's ("planner config: ...").
    assert err == (
        "cluster master: --stale-cycles must be above [planner] fresh_idle_cycles (1), got 1: "
        "give --stale-cycles 2 or more, or lower fresh_idle_cycles in the --config file\n"
    )


def test_stale_cycles_help_gives_the_range_the_flag_accepts(tmp_path: Path) -> None:
    """The help said 1..10000, and 1 was always refused (fresh_idle_cycles is 1 by default);
    1 is accepted where the config file sets fresh_idle_cycles = 0."""
    from cluster.commands import master
    from cluster.master.settings import load_settings

    parser = argparse.ArgumentParser()
    master.add_arguments(parser)
    (help_text,) = [a.help for a in parser._actions if a.dest == "stale_cycles"]
    assert help_text is not None and "2..10000" in help_text and "1..10000" not in help_text
    config = tmp_path / "cluster.toml"
    config.write_text("[planner]\nfresh_idle_cycles = 0\n")
    cfg = master.planner_config(_master_args("--stale-cycles", "1"), load_settings(config)[0])
    assert (cfg.stale_cycles, cfg.fresh_idle_cycles) == (1, 0)


@pytest.mark.parametrize(
    ("argv", "config", "message"),
    [
        # Rounded to 0 ms: "plan_interval_ms must be >= 1, got 0".
        (
            ["--plan-interval", "0.0004"],
            "",
            "--plan-interval must be at least 0.001 seconds (1 ms), got 0.0004",
        ),
        # Not "planner config: epoch_length_ms must be at least plan_interval_ms (2000), ...":
        (
            ["--epoch-length", "1s", "--plan-interval", "2"],
            "",
            "--epoch-length 1s (1000 ms) is shorter than --plan-interval 2 (2000 ms): an epoch "
            "holds at least one plan cycle",
        ),
        (
            ["--epoch-length", "1s"],
            "[planner]\nplan_interval_ms = 2000\n",
            "--epoch-length 1s (1000 ms) is shorter than the plan interval ([planner] "
            "plan_interval_ms = 2000): an epoch holds at least one plan cycle",
        ),
        (
            ["--plan-interval", "700"],
            "",
            "the epoch length ([planner] epoch_length_ms = 600000) is shorter than "
            "--plan-interval 700 (700000 ms): an epoch holds at least one plan cycle",
        ),
    ],
)
def test_planner_flags_refused_together_are_named_as_flags(
    argv: list[str], config: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(config)
    argv = ["master", "--data-dir", str(tmp_path / "m"), "--config", str(path), *argv]
    assert cli.main([*argv, "--http", "off"]) == 2
    assert capsys.readouterr().err == f"cluster master: {message}\n"
    assert not (tmp_path / "m").exists()


def test_a_drain_lead_shorter_than_an_epoch_is_warned_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each setting is valid alone; together, placement skips a node for the epoch crossing
    its window before the window drains, and a cancel in between is free. Warned, not
    refused: an operator who only lengthened the epoch keeps a running master."""
    from cluster.master.config import PlannerConfig
    from cluster.master.node import MasterNode, MasterNodeConfig
    from cluster.master.settings import settings_warnings
    from cluster.net.membership import Membership
    from cluster.shared.maintenance_policy import MaintenancePolicy

    assert settings_warnings(PlannerConfig(), MaintenancePolicy()) == []
    long_epochs = PlannerConfig(epoch_length_ms=30 * 60_000)
    (warning,) = settings_warnings(long_epochs, MaintenancePolicy())
    assert warning.startswith("maintenance drain_lead_ms (10m) is shorter than an epoch (30m)")
    assert settings_warnings(long_epochs, MaintenancePolicy(drain_lead_ms=30 * 60_000)) == []

    with caplog.at_level("WARNING", logger="cluster.master.node"):
        config = MasterNodeConfig(planner=long_epochs, http=None, control_socket=False)
        MasterNode(tmp_path / "m", Membership(secret=b"s" * 32), config).close()
    assert [r.getMessage() for r in caplog.records] == [warning]


@pytest.mark.parametrize(
    "argv",
    [
        ["session", "create", "--data-dir", "{d}", "--slots", "1", "--memory-mb", "512"],
        ["session", "--data-dir", "{d}", "create", "--slots", "1", "--memory-mb", "512"],
        ["session", "list", "--data-dir", "{d}"],
        ["maintenance", "check", "--data-dir", "{d}", "--node", "n1", "--in=2h", "--duration=1h"],
        ["maintenance", "--data-dir", "{d}", "--node", "n1", "check", "--in=2h", "--duration=1h"],
        ["maintenance", "--data-dir", "{d}", "next", "--node", "n1"],
        ["maintenance", "--node", "n1", "cancel", "--data-dir", "{d}"],
    ],
)
def test_data_dir_and_node_are_accepted_before_or_after_the_action(
    argv: list[str], tmp_path: Path
) -> None:
    """`cluster session create --data-dir m ...` was "unrecognized arguments: --data-dir m";
    given before the action, an action's own default must not overwrite it."""
    args = cli.build_parser().parse_args([a.format(d=tmp_path) for a in argv])
    assert args.data_dir == tmp_path
    if argv[0] == "maintenance":
        assert args.node == "n1"


def test_data_dir_and_node_default_when_not_given() -> None:
    args = cli.build_parser().parse_args(["maintenance", "next"])
    assert (args.data_dir, args.node) == (None, "")
    assert cli.build_parser().parse_args(["session", "list"]).data_dir is None


#: What Python makes of the byte 0xff in an argument: a lone surrogate, which cannot encode.
NOT_UTF8 = "\udcff"


def _text_arguments() -> list[tuple[list[str], str]]:
    """(argv up to the argument, its name as argparse says it) for every argument of every
    command that takes text, positional or not, file and directory names excepted."""
    from cluster.commands._args import _FILE_NAMES

    found: list[tuple[list[str], str]] = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for command, sub in action.choices.items():
                    walk(sub, [*path, command])
            elif action.nargs != 0 and action.type not in _FILE_NAMES:  # those kept as given
                name = "/".join(action.option_strings) or str(action.metavar or action.dest)
                found.append(([*path, *action.option_strings[-1:]], name))

    walk(cli.build_parser(), [])
    return found


def test_every_command_has_text_arguments_to_check() -> None:
    names = {(" ".join(argv), name) for argv, name in _TEXT_ARGUMENTS}
    assert {
        ("session create --name", "--name"),
        ("session delete", "session_id"),
        ("node remove", "NODE"),
        ("node remove --reason", "--reason"),
        ("maintenance --node", "--node"),
        ("maintenance cancel --window", "--window"),
        ("status --token", "--token"),
        ("master --listen", "--listen"),
    } <= names
    assert not any("--data-dir" in argv for argv, _ in _TEXT_ARGUMENTS)


_TEXT_ARGUMENTS = _text_arguments()


@pytest.mark.parametrize(
    ("argv", "name"), _TEXT_ARGUMENTS, ids=[" ".join(argv) for argv, _ in _TEXT_ARGUMENTS]
)
def test_text_that_is_not_utf8_is_refused_by_name(
    argv: list[str], name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cluster session create --name $'\\xff'` ended in a traceback (UnicodeEncodeError
    from the control request's encoder); every text argument is checked as it is parsed."""
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, NOT_UTF8])
    assert exc.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.endswith(f": error: argument {name}: not valid UTF-8: b'\\xff'"), last


def test_file_and_directory_names_need_not_be_utf8() -> None:
    """The OS takes any bytes back: a directory named so works (only text is checked)."""
    parse = cli.build_parser().parse_args
    assert parse(["replay", NOT_UTF8]).path == Path(NOT_UTF8)
    assert parse(["session", "--data-dir", NOT_UTF8, "list"]).data_dir == Path(NOT_UTF8)
    assert parse(["worker", "--data-dir", NOT_UTF8, "--master", NOT_UTF8]).master == NOT_UTF8
    args = parse(["session", "create", "--slots", "2", "--memory-mb", "512", "--name", "é"])
    assert (args.slots, args.name) == (2, "é")


def test_a_converter_still_refuses_in_its_own_words(capsys: pytest.CaptureFixture[str]) -> None:
    """The UTF-8 check runs first, then the argument's own converter, named as before."""
    with pytest.raises(SystemExit):
        cli.main(["session", "create", "--slots", "x", "--memory-mb", "512"])
    assert capsys.readouterr().err.endswith("argument --slots: invalid int value: 'x'\n")


@pytest.mark.parametrize("flag", ["--member-log-rate", "--member-log-burst"])
def test_a_member_log_budget_flag_out_of_range_is_named(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["master", "--data-dir", str(tmp_path / "m"), "--http", "off", flag, "0"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"cluster master: {flag} must be 1..1,099,511,627,776 bytes, got 0\n", err
    assert not (tmp_path / "m").exists()


def test_the_member_log_budget_flags_reach_the_master(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget (a member flooding the log is slowed) was an embedding setting only: an
    operator told by its WARNING that an honest, busy worker was slowed could not raise it."""
    from cluster.master import node as node_module

    seen: list[object] = []

    def capture(
        self: object, data_dir: Path, membership: object, config: object, **kw: object
    ) -> None:
        seen.append(config)
        raise ValueError("captured")

    monkeypatch.setattr(node_module.MasterNode, "__init__", capture)
    argv = ["master", "--data-dir", str(tmp_path / "m"), "--http", "off"]
    argv += ["--member-log-rate", "5000000", "--member-log-burst", "300000000"]
    assert cli.main(argv) == 2
    assert "captured" in capsys.readouterr().err
    config = seen[0]
    assert isinstance(config, node_module.MasterNodeConfig)
    assert (config.member_log_bytes_per_s, config.member_log_burst_bytes) == (
        5_000_000,
        300_000_000,
    )
