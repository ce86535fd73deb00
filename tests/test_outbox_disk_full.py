"""The worker's outbox on a disk that refuses writes (full, read-only): fail-stop, nothing lost.

A fault review found two things. A full or read-only disk crashed the worker with a
100-200-line traceback (`OSError: [Errno 28] No space left on device` from `Outbox.append`,
no file named), also on SIGTERM, where the goodbye could not be written. And an event the
outbox accepted could be lost: `append` ignored what `os.write` returned, and tmpfs writes
part of a record without an error when only part of it fits; the next append then went after
the torn record, and the next start skipped it as damage ("the events in them are lost").

Now a record is written whole or the file is cut back and `OutboxWriteError` (naming the
file) is raised; the worker then stops with one ERROR, its runners stopped as on SIGTERM,
and `cluster worker` exits 2. The faults are injected (`os.write` writing short or raising),
no real full disk is needed.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from cluster_procs import assert_gap_free, read_log, start_master, wait_until
from embedded_nodes import embedded_cluster, until_serving

from cluster import control
from cluster.control import SessionCreate
from cluster.shared.events import NodeHeartbeat
from cluster.worker import outbox
from cluster.worker.node import WorkerNode
from cluster.worker.outbox import Outbox, OutboxError, OutboxWriteError

NODE = "12D3KooWdiskfull"
_real_write = os.write


def _beat() -> NodeHeartbeat:
    return NodeHeartbeat(node_id=NODE)


def _writes_to(fd: int, fault: Callable[[int, bytes], int]) -> Callable[[int, bytes], int]:
    """`os.write` with `fault` in place for descriptor `fd` only."""

    def write(target: int, data: bytes) -> int:
        return fault(target, data) if target == fd else _real_write(target, data)

    return write


def _short_then(then: Callable[[int, bytes], int]) -> Callable[[int, bytes], int]:
    """The first write takes only part of the record (no error, as tmpfs does when its last
    page has room for part of it); later writes do `then`."""
    calls = [0]

    def fault(fd: int, data: bytes) -> int:
        calls[0] += 1
        if calls[0] == 1:
            return _real_write(fd, bytes(data)[:10])
        return then(fd, data)

    return fault


def _no_space(fd: int, data: bytes) -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _no_space_for_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _pending_seqs(box: Outbox) -> list[int]:
    return [seq for seq, _ in box.pending_after(0, 1 << 20)]


def test_a_short_write_is_completed_and_the_record_is_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox.open(tmp_path / "ob")
    try:
        assert [box.append(_beat()) for _ in range(3)] == [1, 2, 3]
        with monkeypatch.context() as m:
            m.setattr(os, "write", _writes_to(box._fd, _short_then(_real_write)))
            assert box.append(_beat()) == 4
        assert box.append(_beat()) == 5
    finally:
        box.close()
    with caplog.at_level(logging.WARNING):
        again = Outbox.open(tmp_path / "ob")
    try:
        assert _pending_seqs(again) == [1, 2, 3, 4, 5]
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    finally:
        again.close()


def test_a_record_the_disk_cannot_finish_is_cut_back_and_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox.open(tmp_path / "ob")
    log_path = tmp_path / "ob" / "events.log"
    try:
        assert [box.append(_beat()) for _ in range(3)] == [1, 2, 3]
        size = log_path.stat().st_size
        with monkeypatch.context() as m:
            m.setattr(os, "write", _writes_to(box._fd, _short_then(_no_space)))
            with pytest.raises(OutboxWriteError) as caught:
                box.append(_beat())
        # No seq for it, and no part of it left on disk.
        assert caught.value.path == str(log_path)
        assert "No space left on device" in str(caught.value)
        assert log_path.stat().st_size == size
        assert box.last_seq == 3
        # Space is back, but this process writes no more (fail-stop, as the master's log).
        with pytest.raises(OutboxWriteError, match="No space left on device"):
            box.append(_beat())
        assert log_path.stat().st_size == size
        assert box.broken is not None
    finally:
        box.close()  # never raises for the disk
    with caplog.at_level(logging.WARNING):
        again = Outbox.open(tmp_path / "ob")
    try:
        assert _pending_seqs(again) == [1, 2, 3]
        assert again.append(_beat()) == 4
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    finally:
        again.close()


def test_an_fsync_the_disk_refuses_breaks_the_outbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = Outbox.open(tmp_path / "ob")
    try:
        box.append(_beat())

        def fsync(fd: int) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(OutboxWriteError, match=r"events\.log: Input/output error"):
            box.sync()
        with pytest.raises(OutboxWriteError):
            box.ack(1)  # the watermark is not written on a broken outbox either
    finally:
        box.close()


def test_an_outbox_that_cannot_be_opened_says_which_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A start onto a full disk: `cluster worker` prints this in one line and exits 2.
    monkeypatch.setattr(outbox, "write_bytes_durably", _no_space_for_file)
    with pytest.raises(OutboxError) as caught:
        Outbox.open(tmp_path / "ob")
    assert str(caught.value) == f"cannot open outbox {tmp_path / 'ob'}: No space left on device"
    (tmp_path / "ro").mkdir()
    monkeypatch.undo()

    def read_only(path: str | Path, flags: int, mode: int = 0o777) -> int:
        if str(path).endswith("events.log"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, mode)

    real_open = os.open
    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OutboxError) as caught:
        Outbox.open(tmp_path / "ro")
    log_path = tmp_path / "ro" / "events.log"
    assert str(caught.value) == (
        f"cannot open outbox {tmp_path / 'ro'}: {log_path}: Read-only file system"
    )


@pytest.mark.anyio
@pytest.mark.parametrize("refused", ["events.log", "acked"])
async def test_a_worker_whose_outbox_the_disk_refuses_stops_in_one_line(
    refused: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The disk refuses the next event's record, or the ack watermark (rewritten when an
    ack empties the outbox: the master acknowledges each heartbeat). The second was seen
    on a real full tmpfs: an ack fails on the subscribe stream, beside the stop's
    cancellation."""
    async with embedded_cluster(tmp_path, workers=0) as cluster:
        master, worker = cluster.master, cluster.new_worker()
        node, box = worker.node_id, worker.worker.outbox
        async with anyio.create_task_group() as worker_tg:
            await worker_tg.start(worker.run)
            reply = await master.request(SessionCreate(slots=1, memory_per_slot_mb=512, name="s"))
            assert reply.ok, reply.message
            await until_serving(master, node)
            assert worker.manager is not None and worker.manager._handles
            caplog.clear()
            if refused == "events.log":
                monkeypatch.setattr(os, "write", _writes_to(box._fd, _no_space))
            else:
                monkeypatch.setattr(outbox, "write_bytes_durably", _no_space_for_file)
            # run() returns on its own (its next heartbeat cannot be recorded): no stop().
        monkeypatch.undo()  # space is back
        assert worker.failure is not None
        manager = worker.manager
        assert manager is not None and not manager._handles  # runners stopped, as on SIGTERM
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, errors
        assert errors[0].startswith(
            f"outbox write failed: {box.directory / refused}: No space left on device; "
            "the worker stops"
        ), errors
        kept = box.last_seq
        worker.close()  # no exception: a broken outbox closes quietly
        cluster.workers.remove(worker)
        # A restart on the same directory sends what was kept: nothing accepted is lost.
        restarted = WorkerNode(worker.data_dir, cluster.addr, worker.config)
        cluster.workers.append(restarted)
        await cluster.start(restarted)
        while restarted.worker.outbox.acked < kept:
            await anyio.sleep(0.05)
        mine = [ie.seq for ie in master.store.read_from(1) if ie.origin == node]
        assert mine == list(range(1, len(mine) + 1))
        assert mine[-1] >= kept


#: `cluster worker` whose outbox writes fail with ENOSPC while the file argv[1] exists.
WRAPPER = textwrap.dedent(
    """
    import errno, os, sys
    real = os.write
    def write(fd, data):
        if os.path.exists(sys.argv[1]):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if target.endswith("events.log"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)
    os.write = write
    from cluster.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


class _Worker:
    """`cluster worker --no-info --no-runners` through WRAPPER, its output in a file."""

    def __init__(self, tmp_path: Path, run: int, master_dir: Path, interval: str) -> None:
        self.data_dir = tmp_path / "w"
        self.out = tmp_path / f"worker{run}.log"
        wrapper = tmp_path / "worker_enospc.py"
        wrapper.write_text(WRAPPER)
        args = ["worker", "--data-dir", str(self.data_dir)]
        args += ["--master", str(master_dir / "master.addr")]
        args += ["--cluster-secret-file", str(master_dir / "cluster.secret")]
        args += ["--no-info", "--no-runners", "--heartbeat-interval", interval]
        with open(self.out, "w") as out:
            self.popen = subprocess.Popen(
                [sys.executable, str(wrapper), str(tmp_path / "disk-is-full"), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def text(self) -> str:
        return self.out.read_text()

    def wait_caught_up(self) -> None:
        wait_until(
            lambda: "caught up at index" in self.text() or self.popen.poll() is not None,
            30,
            "the worker to connect",
        )
        assert self.popen.poll() is None, self.text()

    def ends_in_one_line(self) -> None:
        self.popen.wait(timeout=30)
        out = self.text()
        assert self.popen.returncode == 2, out
        assert "Traceback" not in out, out
        errors = [line for line in out.splitlines() if " ERROR " in line]
        assert len(errors) == 1, out
        events_log = self.data_dir / "outbox" / "events.log"
        assert f"outbox write failed: {events_log}: No space left on device" in errors[0], out

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def test_cluster_worker_on_a_full_disk_exits_2_in_one_line(tmp_path: Path) -> None:
    master_dir, full = tmp_path / "m", tmp_path / "disk-is-full"
    master, _ = start_master(master_dir, tmp_path)
    workers: list[_Worker] = []

    def start(interval: str) -> _Worker:
        workers.append(_Worker(tmp_path, len(workers), master_dir, interval))
        return workers[-1]

    try:
        # The disk fills up while it serves: its next heartbeat cannot be recorded.
        worker = start("0.05")
        worker.wait_caught_up()
        full.touch()
        worker.ends_in_one_line()
        # Restarted onto the still-full disk: the same.
        start("0.05").ends_in_one_line()
        # Stopped (SIGTERM) on a full disk: its goodbye is the write that fails (the
        # heartbeat cycle is long: it emits none after connecting).
        full.unlink()
        worker = start("60")
        worker.wait_caught_up()
        full.touch()
        worker.popen.terminate()
        worker.ends_in_one_line()
        # Space is back: a restart delivers everything the outbox accepted.
        full.unlink()
        worker = start("0.05")
        worker.wait_caught_up()
        events_log = worker.data_dir / "outbox" / "events.log"
        wait_until(lambda: events_log.stat().st_size == 0, 30, "the outbox to be delivered")
        worker.popen.terminate()
        assert worker.popen.wait(timeout=30) == 0, worker.text()
    finally:
        for w in workers:
            w.kill()
        master.stop()
    assert_gap_free(read_log(master_dir))


def test_a_control_socket_on_a_read_only_disk_does_not_end_the_stop_in_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The worker's stop on a read-only disk ended in a second traceback: `serve` could not
    # remove its socket file. Now that is one WARNING (the next start clears the socket).
    sock = tmp_path / "control.sock"
    sock.touch()
    bound = sock.lstat()

    def unlink(self: Path, missing_ok: bool = False) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "unlink", unlink)
    with caplog.at_level(logging.WARNING, logger="cluster.control"):
        control._unlink_if_same(sock, bound)
    assert [r.getMessage() for r in caplog.records] == [
        f"could not remove control socket {sock}: Read-only file system"
    ]
