"""The operator's input files (config, runner file, secret, token, allow-list) are read with a
size limit, and only when they are regular files: `--config /dev/zero` grew the master to
gigabytes in seconds, and `--config FIFO` hung it without a word."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from cluster.commands.master import http_config
from cluster.master.settings import load_settings
from cluster.net.membership import load_allow_file, load_secret_file
from cluster.shared.files import (
    CONFIG_FILE_LIMIT,
    LIST_FILE_LIMIT,
    SECRET_FILE_LIMIT,
    InputFileError,
    read_input_file,
)
from cluster.shared.maintenance_policy import load_policy
from cluster.worker.runners.registry import load_runner_setting

#: (loader, its size limit, the words its error starts the path with)
LOADERS: dict[str, tuple[Callable[[Path], object], int, str]] = {
    "--config": (load_settings, CONFIG_FILE_LIMIT, ""),
    "policy file": (load_policy, CONFIG_FILE_LIMIT, ""),
    "--runner-file": (load_runner_setting, CONFIG_FILE_LIMIT, "runner file "),
    "--allow-file": (load_allow_file, LIST_FILE_LIMIT, "cannot read allow-list "),
    "--cluster-secret-file": (load_secret_file, SECRET_FILE_LIMIT, "cannot read cluster secret "),
    "--http-token-file": (
        lambda path: http_config("127.0.0.1:0", path),
        SECRET_FILE_LIMIT,
        "--http-token-file ",
    ),
}


def _call_bounded(call: Callable[[], object], fifo: Path | None = None) -> BaseException | None:
    """What `call` raised (None if it returned), failing the test if it blocks: a reader
    stuck opening `fifo` is released (a writer opens and closes it) before failing."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=30)  # instant when it works; only a hang waits this long
    if thread.is_alive():
        if fifo is not None:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            thread.join(timeout=30)
        pytest.fail("the loader blocked reading its file")
    return outcome[0]


@pytest.mark.parametrize("flag", LOADERS)
@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("fifo", "is a named pipe (FIFO), not a regular file"),
        ("directory", "is a directory, not a regular file"),
        ("device", "is a character device, not a regular file"),
        ("oversized", "holds {size:,} bytes; at most {most} accepted"),
    ],
)
def test_every_loader_refuses_what_is_not_a_small_regular_file(
    flag: str, kind: str, problem: str, tmp_path: Path
) -> None:
    """Each refused in one error naming the file and what is wrong, without reading it (a
    pipe would block until a writer came) or past its limit."""
    load, limit, words = LOADERS[flag]
    path = tmp_path / "input.toml"  # a policy file says its format by its suffix
    fifo = None
    if kind == "fifo":
        os.mkfifo(path)
        fifo = path
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        path = Path("/dev/null")  # a device that, unlike /dev/zero, is safe read unbounded
    else:
        path.write_bytes(b"#" * (limit + 1))  # a comment: valid as all of these, but for size
    raised = _call_bounded(lambda: load(path), fifo)
    assert raised is not None, f"{flag} accepted {kind}"
    most = f"{limit // 1024} KiB" if limit < 1024 * 1024 else f"{limit // 1024 // 1024} MiB"
    assert f"{words}{path}" in str(raised), raised
    assert problem.format(size=limit + 1, most=most) in str(raised), raised


def test_a_file_is_read_up_to_its_limit_and_no_further(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the limit: read. Past it: refused, having read at most limit + 1 bytes, also from a
    file that says it is empty and is not (as in /proc)."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert read_input_file(path, 100) == b"x" * 100
    with pytest.raises(InputFileError, match=r"^holds 100 bytes; at most 99 bytes accepted"):
        read_input_file(path, 99)
    asked: list[int] = []
    real_read = os.read

    def spy(fd: int, n: int) -> bytes:
        asked.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", spy)
    status = Path("/proc/self/status")  # size 0 by stat, about a kilobyte by reading
    assert status.stat().st_size == 0
    with pytest.raises(InputFileError, match=r"^holds more than 10 bytes; at most 10 bytes"):
        read_input_file(status, 10)
    assert sum(asked) <= 11, asked
    with pytest.raises(InputFileError, match=r"^No such file or directory$"):
        read_input_file(tmp_path / "absent", 10)


def _limit_memory() -> None:
    # Without the limit this test, failing, would take the machine's memory with it.
    resource.setrlimit(resource.RLIMIT_DATA, (1 << 30, 1 << 30))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["master", "--config", "/dev/zero"],
            "cluster master: /dev/zero: cannot read the config file: is a character device",
        ),
        (
            ["master", "--cluster-secret-file", "/dev/zero"],
            "cluster master: cannot read cluster secret /dev/zero: is a character device",
        ),
        (
            ["worker", "--master", "/ip4/127.0.0.1/tcp/1", "--runner-file", "/dev/zero"],
            "cluster worker: runner file /dev/zero: is a character device",
        ),
    ],
)
def test_dev_zero_as_an_input_file_is_one_line_not_all_the_memory(
    argv: list[str], message: str, tmp_path: Path
) -> None:
    """A subprocess with its memory capped, so that a regression fails the test (exit 1,
    MemoryError) instead of the machine."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    proc = subprocess.run(
        [sys.executable, "-m", "cluster", *argv, "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": src},
        preexec_fn=_limit_memory,
    )
    assert (proc.returncode, proc.stderr) == (2, f"{message}, not a regular file\n")
    assert not (tmp_path / "d").exists()


def test_a_token_file_that_is_not_text_names_the_flag(tmp_path: Path) -> None:
    """It printed only "'utf-8' codec can't decode byte 0xff ...", naming no file."""
    path = tmp_path / "token"
    path.write_bytes(b"\xff" * 40)
    with pytest.raises(ValueError, match=f"^--http-token-file {path}: not UTF-8 text$"):
        http_config("127.0.0.1:0", path)
