"""A file replaced whole on a full disk: the error names the file, and no temporary file stays.

The kernel's error from a write or fsync on a descriptor names no file: a master started on a
full data directory said `cluster master: [Errno 28] No space left on device` and left a 0-byte
`.master.addr.tmp`; a failed snapshot was `could not save a snapshot at index 4000: [Errno 28]
No space left on device`, which file of which disk left to guess.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
from cluster_procs import wait_until

from cluster.shared.events import WorkReported
from cluster.shared.files import fsync_dir, write_bytes_durably, write_text_atomically
from cluster.shared.snapshots import snapshot_name
from cluster.shared.state import State
from cluster.shared.store import EventStore
from cluster.worker.outbox import Outbox, OutboxWriteError

NO_SPACE = os.strerror(errno.ENOSPC)


class DiskFull:
    """`os.<call>` raises ENOSPC, as the kernel's does (naming no file), on descriptors of
    files whose name ends with `suffix`, while `on`; other files are written as usual."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, call: str, suffix: str) -> None:
        self.on = True
        self.hits = 0
        real: Callable[..., object] = getattr(os, call)

        def failing(fd: int, *args: object) -> object:
            if self.on and os.readlink(f"/proc/self/fd/{fd}").endswith(suffix):
                self.hits += 1
                raise OSError(errno.ENOSPC, NO_SPACE)
            return real(fd, *args)

        monkeypatch.setattr(os, call, failing)


def _write_text(path: Path) -> None:
    write_text_atomically(path, "new\n")


def _write_bytes(path: Path) -> None:
    write_bytes_durably(path, b"new\n")


@pytest.mark.parametrize(
    ("write", "call"), [(_write_text, "write"), (_write_bytes, "write"), (_write_bytes, "fsync")]
)
def test_a_whole_file_write_the_disk_refuses_names_the_file_and_leaves_no_temp_file(
    write: Callable[[Path], None], call: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "master.addr"
    path.write_text("old\n")
    disk = DiskFull(monkeypatch, call, ".master.addr.tmp")
    with pytest.raises(OSError) as raised:
        write(path)
    assert disk.hits == 1
    exc = raised.value
    # Still the OSError raised, with its errno: callers that test it work as before.
    assert type(exc) is OSError and exc.errno == errno.ENOSPC and exc.strerror == NO_SPACE
    assert exc.filename == str(path) and exc.filename2 is None
    assert str(exc) == f"[Errno {errno.ENOSPC}] {NO_SPACE}: {str(path)!r}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["master.addr"]  # no .master.addr.tmp
    assert path.read_text() == "old\n"


@pytest.mark.parametrize("write", [_write_text, _write_bytes])
def test_a_rename_that_fails_names_the_file_once_and_leaves_no_temp_file(
    write: Callable[[Path], None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename's error names both paths ('.x.tmp' -> 'x'): the file meant is `x`."""

    def failing_replace(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, NO_SPACE, str(src), None, str(dst))

    monkeypatch.setattr(os, "replace", failing_replace)
    path = tmp_path / "http.url"
    with pytest.raises(OSError) as raised:
        write(path)
    assert str(raised.value) == f"[Errno {errno.ENOSPC}] {NO_SPACE}: {str(path)!r}"
    assert list(tmp_path.iterdir()) == []


def test_a_directory_fsync_that_fails_names_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    DiskFull(monkeypatch, "fsync", tmp_path.name)
    with pytest.raises(OSError) as raised:
        fsync_dir(tmp_path)
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(tmp_path)


def test_a_snapshot_the_disk_refuses_is_a_warning_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = EventStore.open(tmp_path / "m")
    try:
        DiskFull(monkeypatch, "write", ".snap.tmp")
        with caplog.at_level(logging.WARNING, logger="cluster.shared.store"):
            assert not store.write_snapshot(State(last_applied=4000))
    finally:
        store.close()
    snap_dir = store.snapshots.directory
    assert [r.getMessage() for r in caplog.records] == [
        f"could not save a snapshot at index 4000: {snap_dir / snapshot_name(4000)}: {NO_SPACE}"
    ]
    assert list(snap_dir.iterdir()) == []


def test_an_acked_watermark_the_disk_refuses_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = "12D3KooWD6FXdxPeu8Y7TL4snPwAnK2Pc7BuReewmryJYjmiqGSX"
    event = WorkReported(devshard_id="ds-1", node_id=node, units=1, epoch=1)
    with closing(Outbox.open(tmp_path / "outbox")) as box:
        seq = box.append(event)
        disk = DiskFull(monkeypatch, "write", ".acked.tmp")
        with pytest.raises(OutboxWriteError) as raised:  # the worker stops on it, in a line
            box.ack(seq)
        disk.on = False  # the disk has room again by the time the worker stops
        assert raised.value.strerror == os.strerror(errno.ENOSPC)
        assert raised.value.path == str(tmp_path / "outbox" / "acked")
        assert not (tmp_path / "outbox" / ".acked.tmp").exists()


# In a process of its own: the master serves until stopped, and the fault must hit only
# master.addr (its event log is written with os.write too).
MASTER_ON_A_FULL_DISK = textwrap.dedent(
    """
    import errno, os, sys
    real = os.write
    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".master.addr.tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)
    os.write = write
    from cluster.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_a_master_that_cannot_write_master_addr_says_which_file_in_one_line(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "m"
    wrapper = tmp_path / "master_enospc.py"
    wrapper.write_text(MASTER_ON_A_FULL_DISK)
    args = ["master", "--data-dir", str(data_dir), "--listen", "/ip4/127.0.0.1/tcp/0"]
    master = subprocess.Popen(
        [sys.executable, str(wrapper), *args, "--http", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        wait_until(
            lambda: master.poll() is not None or (data_dir / "master.addr").exists(),
            60,
            "the master to stop, or to write master.addr",
        )
        if master.poll() is None:  # it wrote master.addr after all, and serves
            master.kill()
        _, err = master.communicate(timeout=30)
    finally:
        if master.poll() is None:
            master.kill()
            master.communicate()
    assert master.returncode == 2, err
    lines = [line for line in err.splitlines() if line.startswith("cluster master:")]
    assert lines == [f"cluster master: cannot write {data_dir / 'master.addr'}: {NO_SPACE}"], err
    assert "Traceback" not in err, err
    assert not (data_dir / ".master.addr.tmp").exists()
    assert not (data_dir / "master.addr").exists()
