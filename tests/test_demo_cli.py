"""`cluster demo`'s own command line: its help, and the commands it prints for the operator."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest

from cluster import cli
from cluster.commands import demo
from cluster.commands.demo import invoked_as


def _demo_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    demo = sub.choices["demo"]
    assert isinstance(demo, argparse.ArgumentParser)
    return demo


def test_every_demo_option_has_help() -> None:
    """`--plan-interval` showed in `cluster demo --help` with no text at all."""
    missing = [
        a.option_strings[0]
        for a in _demo_parser()._actions
        if a.option_strings and a.help in (None, "")
    ]
    assert missing == []


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "venv" / "bin" / "cluster"
    path.parent.mkdir(parents=True)
    path.write_text("#!/bin/sh\n")
    return path


def test_the_printed_command_is_cluster_only_when_that_is_what_path_runs(
    script: Path, tmp_path: Path
) -> None:
    """The demo printed `cluster status --url ...` to an operator who ran
    .venv/bin/cluster, with no `cluster` on PATH ("command not found")."""
    assert invoked_as(str(script), "/usr/bin/python3", None) == str(script)
    other = tmp_path / "other-cluster"
    other.write_text("#!/bin/sh\n")
    assert invoked_as(str(script), "/usr/bin/python3", str(other)) == str(script)
    assert invoked_as(str(script), "/usr/bin/python3", str(script)) == "cluster"
    link = tmp_path / "bin-cluster"
    os.symlink(script, link)
    assert invoked_as(str(script), "/usr/bin/python3", str(link)) == "cluster"


def test_the_printed_command_as_a_module_or_with_spaces(tmp_path: Path) -> None:
    main = tmp_path / "src" / "cluster" / "__main__.py"
    python = "/opt/py 3/bin/python"
    assert invoked_as(str(main), python, None) == "'/opt/py 3/bin/python' -m cluster"
    spaced = tmp_path / "my env" / "cluster"
    assert invoked_as(str(spaced), "/usr/bin/python3", None) == f"'{spaced}'"
    assert invoked_as("", "/usr/bin/python3", None) == "cluster"


# --------------------------------------------------------------------------------------------
# Failures go to stderr: "master did not start" was printed on stdout, with the summary.
# --------------------------------------------------------------------------------------------

Spawn = Callable[[list[str], Path], tuple[subprocess.Popen[bytes], IO[bytes]]]

#: A stand-in master that writes its address file (the demo's "it is up") and exits 5.
_UP_THEN_EXIT = (
    "import pathlib, sys; d = pathlib.Path(sys.argv[sys.argv.index('--data-dir') + 1]); "
    "d.mkdir(parents=True, exist_ok=True); (d / 'master.addr').write_text('/ip4/127.0.0.1'); "
    "raise SystemExit(5)"
)


def _spawning(script: str) -> Spawn:
    """`demo._spawn` running `script` in place of `cluster ...`, with the same arguments."""

    def spawn(args: list[str], log_path: Path) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
        out = open(log_path, "ab")  # noqa: SIM115 -- closed by demo._stop
        cmd = [sys.executable, "-c", script, *args]
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        return proc, out

    return spawn


def _demo(tmp_path: Path) -> int:
    argv = ["demo", "--data-dir", str(tmp_path / "d"), "--workers", "0", "--session-slots", "0"]
    return cli.main(argv)


def test_a_master_that_does_not_start_is_said_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "_spawn", _spawning("raise SystemExit(3)"))
    assert _demo(tmp_path) == 1
    out, err = capsys.readouterr()
    log = tmp_path / "d" / "logs" / "master.log"
    assert err == f"cluster demo: master did not start (it exited with code 3); see {log}\n"
    assert "did not start" not in out


def test_a_master_that_exits_while_the_demo_runs_is_said_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "_spawn", _spawning(_UP_THEN_EXIT))
    assert _demo(tmp_path) == 1
    out, err = capsys.readouterr()
    logs = tmp_path / "d" / "logs"
    assert err == f"cluster demo: the master exited with code 5; see {logs}\n"
    assert "master address : /ip4/127.0.0.1" in out  # the summary stays on stdout


def test_a_worker_that_exits_is_said_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo._report_exit("worker-2", 1, tmp_path) is False
    out, err = capsys.readouterr()
    assert (out, err) == (
        "",
        "cluster demo: worker-2 exited with code 1; the cluster carries on without it\n",
    )


def test_a_child_killed_after_the_grace_period_is_said_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ready = tmp_path / "ready"
    stubborn = (
        "import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)"
    )
    proc, out = _spawning(stubborn)([], tmp_path / "w.log")
    deadline = time.monotonic() + 30
    while not ready.exists():  # SIGTERM ignored from here on: only the kill stops it
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    monkeypatch.setattr(demo, "GRACE_S", 0.2)
    demo._stop([("worker-1", proc, out)])
    assert proc.returncode is not None
    stdout, err = capsys.readouterr()
    assert (stdout, err) == ("", "cluster demo: worker-1 did not stop within 0.2 s: killing it\n")
