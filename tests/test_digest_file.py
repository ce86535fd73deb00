"""digest.json kept current without stalling the process (`DigestFileWriter`).

A digest is a canonical encoding of the whole state (~0.2 s at 10,000 nodes): written on
the event loop every cycle it held up every stream that long each second.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

import anyio
import pytest

from cluster import digest_writer
from cluster.digest_writer import MAX_TIME_SHARE, DigestFileWriter
from cluster.shared.codec import state_digest
from cluster.shared.digest_file import read_digest_file
from cluster.shared.state import State

pytestmark = pytest.mark.anyio


def _at(idx: int) -> State:
    return State(last_applied=idx)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_slow_digest_is_written_at_most_a_small_share_of_the_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    writes: list[int] = []

    def slow_write(data_dir: Path, state: State, **extra: object) -> None:
        writes.append(state.last_applied)
        clock.now += 0.2  # a 10,000-node state's digest

    monkeypatch.setattr(digest_writer, "write_digest_file", slow_write)
    writer = DigestFileWriter(tmp_path, clock=clock)
    assert await writer.update(_at(1))
    clock.now += 1.0  # the next cycle: too soon after a 0.2 s write
    assert not await writer.update(_at(2))
    clock.now = 100.2 + 0.2 / MAX_TIME_SHARE + 0.01  # 4 s after the write ended
    assert await writer.update(_at(3))
    assert not await writer.update(_at(3))  # much later, but the state has not advanced
    assert writes == [1, 3]


async def test_a_quick_digest_is_written_every_time_the_state_advanced(tmp_path: Path) -> None:
    clock = FakeClock()
    writer = DigestFileWriter(tmp_path, clock=clock)  # the clock stands still: 0 s writes
    for idx in (1, 2, 3):
        assert await writer.update(_at(idx), role="worker")
        assert read_digest_file(tmp_path) == {
            "idx": idx,
            "digest": state_digest(_at(idx)),
            "role": "worker",
        }


async def test_the_digest_is_computed_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a write is in progress, other tasks run: the write waits for one of them."""
    loop_ran = threading.Event()

    def write_needing_the_loop(data_dir: Path, state: State, **extra: object) -> None:
        # On the event loop's own thread this would wait for itself: fail instead of hang.
        if not loop_ran.wait(timeout=10):
            raise AssertionError("the event loop was blocked while the digest was written")

    monkeypatch.setattr(digest_writer, "write_digest_file", write_needing_the_loop)
    writer = DigestFileWriter(tmp_path)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.update, _at(1))
            await anyio.sleep(0)
            loop_ran.set()


async def test_a_digest_json_that_cannot_be_written_is_a_warning_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = DigestFileWriter(tmp_path, clock=FakeClock())  # no wait after a failure
    (tmp_path / ".digest.json.tmp").mkdir()  # every write of it fails (a full disk, say)
    with caplog.at_level(logging.WARNING, logger=digest_writer.__name__):
        assert not await writer.update(_at(1))
    assert f"could not write {tmp_path / 'digest.json'}: " in caplog.text
    (tmp_path / ".digest.json.tmp").rmdir()
    assert await writer.update(_at(1))  # the same state: it was never written
    assert read_digest_file(tmp_path) == {"idx": 1, "digest": state_digest(_at(1))}


async def test_a_digest_json_that_keeps_failing_is_one_warning_until_it_is_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An idle master on a full disk logged `could not write digest.json (retried later):
    [Errno 28] No space left on device` every plan cycle (each second), naming no file."""
    failures: list[int] = []  # the errno each next write fails with (0: it works)

    def write(data_dir: Path, state: State, **extra: object) -> None:
        code = failures.pop(0)
        if code:  # as the kernel's error from a write on a descriptor: naming no file
            raise OSError(code, os.strerror(code))

    monkeypatch.setattr(digest_writer, "write_digest_file", write)
    writer = DigestFileWriter(tmp_path, clock=FakeClock())  # no wait after a failure
    path = tmp_path / "digest.json"

    def said() -> list[tuple[int, str]]:
        seen = [(r.levelno, r.getMessage()) for r in caplog.records]
        caplog.clear()
        return seen

    def warned(code: int) -> tuple[int, str]:
        why = os.strerror(code)
        return logging.WARNING, f"could not write {path}: {why} (retried quietly until it works)"

    with caplog.at_level(logging.INFO, logger=digest_writer.__name__):
        failures[:] = [errno.ENOSPC] * 3
        for _ in range(3):  # three cycles on a full disk: one WARNING
            assert not await writer.update(_at(1))
        assert said() == [warned(errno.ENOSPC)]
        failures[:] = [0, 0]
        assert await writer.update(_at(2))
        assert said() == [(logging.INFO, f"wrote {path} again (at index 2)")]
        assert await writer.update(_at(3))  # written as usual: nothing to say
        assert said() == []
        failures[:] = [errno.ENOSPC] * 2  # full again: said again, once
        assert not await writer.update(_at(4))
        assert not await writer.update(_at(4))
        assert said() == [warned(errno.ENOSPC)]
        failures[:] = [errno.EACCES] * 2  # failing another way: said, once
        assert not await writer.update(_at(4))
        assert not await writer.update(_at(4))
        assert said() == [warned(errno.EACCES)]
    assert failures == []
