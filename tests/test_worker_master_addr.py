"""`cluster worker --master`: a multiaddr, or a file holding one (relative or absolute path)."""

from __future__ import annotations

import logging
import secrets
import socket
from pathlib import Path

import anyio
import pytest
from embedded_nodes import fast_master

from cluster.commands.worker import master_addr_source
from cluster.net.identity import load_identity
from cluster.worker.client import Worker, WorkerConfig
from cluster.worker.master_addr import MasterAddr, MasterAddrFileError

ADDR = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWQVvZ6L522EVVqN2cWHkH6Q7Zsn6pvu116iFBLUpwTr4G"


def test_a_multiaddr_is_taken_as_given() -> None:
    assert master_addr_source(ADDR) == ADDR


def test_an_absolute_file_path_is_read_not_taken_for_a_multiaddr(tmp_path: Path) -> None:
    path = tmp_path / "master.addr"
    path.write_text(ADDR + "\n", encoding="utf-8")
    assert path.is_absolute()
    assert master_addr_source(str(path)) == path  # read again before every dial


def test_a_relative_file_path_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "master.addr").write_text(ADDR + "\nignored\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert master_addr_source("master.addr") == tmp_path / "master.addr"
    assert str(MasterAddr(tmp_path / "master.addr").addr) == ADDR  # the first line


def test_an_empty_or_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    empty = tmp_path / "empty.addr"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(MasterAddrFileError, match=f"^{empty} is empty$"):
        MasterAddr(empty)
    with pytest.raises(ValueError, match="neither a multiaddr"):
        master_addr_source("no-such-file.addr")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("x\n", "'x' is not a valid multiaddr: "),
        ("/ip4/127.0.0.1/tcp/1\n", "'/ip4/127.0.0.1/tcp/1' does not end in /p2p/<peer id>"),
    ],
)
def test_a_file_that_holds_no_full_multiaddr_is_named_in_the_error(
    tmp_path: Path, content: str, says: str
) -> None:
    """What an embedder's WorkerNode(data_dir, Path(...)) gets: the error said "'x' is not a
    valid multiaddr" without the file it came from (only the CLI, parsing the file a second
    time itself, named it)."""
    path = tmp_path / "bad.addr"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(MasterAddrFileError) as err:
        MasterAddr(path)
    assert str(err.value).startswith(f"{path}: {says}"), err.value
    with pytest.raises(MasterAddrFileError, match=f"^{path}: "):
        Worker(tmp_path / "worker", path)
    assert not (tmp_path / "worker").exists()  # refused before anything is made


def test_a_master_value_no_file_can_have_is_an_error_naming_the_flag(tmp_path: Path) -> None:
    """`path.exists()` raised for a name too long to be a file's (ENAMETOOLONG): the worker
    said "[Errno 36] File name too long: ..." without naming --master."""
    too_long = "x" * 300
    with pytest.raises(ValueError) as err:
        master_addr_source(too_long)
    assert str(err.value) == (
        f"--master {too_long!r} is neither a multiaddr (starting with /) nor a readable "
        "file: file name too long"
    )
    # A multiaddr long enough for that is still a multiaddr (parsed when the worker is built).
    long_addr = ADDR + "/" + "x" * 300
    assert master_addr_source(long_addr) == long_addr


def _moved(addr: str, port: int) -> str:
    """`addr` (/ip4/127.0.0.1/tcp/P/p2p/ID) with another port."""
    parts = addr.split("/")
    parts[parts.index("tcp") + 1] = str(port)
    return "/".join(parts)


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def test_the_file_is_read_again_and_an_unusable_one_keeps_the_last_address(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A master restarted without --listen rewrites master.addr with a new port; a worker
    that read it once retried the old port forever."""
    path = tmp_path / "master.addr"
    path.write_text(ADDR + "\n", encoding="utf-8")
    source = MasterAddr(path)
    moved = _moved(ADDR, 4002)
    with caplog.at_level(logging.INFO, logger="cluster.worker.master_addr"):
        assert str(source.current()) == ADDR
        assert not caplog.records  # unchanged: nothing to say
        path.write_text(moved + "\n", encoding="utf-8")
        assert str(source.current()) == moved
        assert _messages(caplog, logging.INFO) == [
            f"master address changed (from {path}): {moved}, was {ADDR}"
        ]
        caplog.clear()
        path.unlink()  # missing, then empty, then not a multiaddr: each said once
        for _ in range(3):
            assert str(source.current()) == moved
        path.write_text("", encoding="utf-8")
        for _ in range(3):
            assert str(source.current()) == moved
        path.write_text("/ip4/127.0.0.1/tcp/4003\n", encoding="utf-8")  # no /p2p/ part
        assert str(source.current()) == moved
        warnings = _messages(caplog, logging.WARNING)
        assert len(warnings) == 3, warnings
        assert warnings[0] == (
            f"master address from {path} unusable (cannot read {path}: No such file or "
            f"directory); still dialling {moved}"
        )
        assert f"({path} is empty)" in warnings[1]
        assert "does not end in /p2p/<peer id>" in warnings[2]
        caplog.clear()
        path.write_text(moved + "\n", encoding="utf-8")  # back: the next trouble is said again
        assert str(source.current()) == moved
        path.unlink()
        assert str(source.current()) == moved
        assert len(_messages(caplog, logging.WARNING)) == 1


def test_a_callable_source_is_called_before_each_dial_and_a_string_is_fixed() -> None:
    answers = iter([ADDR, _moved(ADDR, 4002)])
    source = MasterAddr(lambda: next(answers))
    assert str(source.addr) == ADDR
    assert str(source.current()) == _moved(ADDR, 4002)
    assert str(source.current()) == _moved(ADDR, 4002)  # StopIteration: keeps the last one
    assert str(MasterAddr(ADDR).current()) == ADDR


def test_an_unusable_file_at_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MasterAddrFileError, match="cannot read"):
        MasterAddr(tmp_path / "missing.addr")


@pytest.mark.anyio
async def test_a_worker_follows_the_master_to_the_address_its_file_names_now(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's retry path reads the file again: its first dial (an old port nobody
    listens on) fails, the file then names the master's real port, and it connects."""
    secret = secrets.token_bytes(32)
    master = fast_master(tmp_path / "master", secret)
    load_identity(tmp_path / "worker")
    path = tmp_path / "master.addr"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        old_port = s.getsockname()[1]
    config = WorkerConfig(
        secret=secret, heartbeats=False, write_digest=False, backoff_initial=0.05, backoff_max=0.2
    )
    worker: Worker | None = None
    try:
        with caplog.at_level(logging.INFO), anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                started = await tg.start(master.run)
                addr = started.addrs[0]
                path.write_text(_moved(addr, old_port) + "\n", encoding="utf-8")
                worker = Worker(tmp_path / "worker", path, config)
                await tg.start(worker.run)
                while not any("unreachable" in m for m in _messages(caplog, logging.INFO)):
                    await anyio.sleep(0.02)
                assert not worker.connected
                path.write_text(addr + "\n", encoding="utf-8")
                while not worker.connected:
                    await anyio.sleep(0.02)
                assert str(worker.master_addr) == addr
                worker.stop()
                await worker.wait_finished()
                master.stop()
        assert f"master address changed (from {path}): {addr}, was " in caplog.text
    finally:
        if worker is not None:
            worker.close()
        master.close()
