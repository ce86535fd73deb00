"""The durable event log: round trips, group commit, torn tails, corruption, kill -9."""

from __future__ import annotations

import logging
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

from cluster.shared.eventlog import (
    REC_HEADER_SIZE,
    SEG_HEADER_SIZE,
    SPARSE_EVERY,
    EventLog,
    LogCorruptError,
    LogDirectoryError,
    segment_name,
)


def payload(i: int) -> bytes:
    """Deterministic, varied-length content for record i, so a test can check every byte."""
    return f"record-{i}:".encode() * (1 + i % 7)


def records(first: int, n: int) -> list[tuple[int, bytes]]:
    return [(i, payload(i)) for i in range(first, first + n)]


def fill(path: Path, n: int, batch: int = 10, segment_max_bytes: int = 64 << 20) -> None:
    with EventLog.open(path, segment_max_bytes=segment_max_bytes) as lg:
        for first in range(1, n + 1, batch):
            lg.append(records(first, min(batch, n + 1 - first)))


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("*.seg"))


def record_offset(seg: Path, idx: int) -> int:
    """Byte offset of record `idx` in a segment, found by walking the headers."""
    data = seg.read_bytes()
    pos = SEG_HEADER_SIZE
    while pos < len(data):
        field, ridx, _pcrc, _hcrc = struct.unpack_from("<IQII", data, pos)
        if ridx == idx:
            return pos
        pos += REC_HEADER_SIZE + (field & 0x7FFF_FFFF)  # top bit: first record of a batch
    raise AssertionError(f"record {idx} not in {seg}")


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------ basics


def test_empty_log_has_last_idx_zero_and_reads_nothing(tmp_path: Path) -> None:
    with EventLog.open(tmp_path / "log") as lg:
        assert lg.last_idx == 0
        assert list(lg.read_from(1)) == []
    with EventLog.open(tmp_path / "log") as lg:
        assert lg.last_idx == 0


def test_append_read_and_reopen_continue(tmp_path: Path) -> None:
    fill(tmp_path, 95)
    with EventLog.open(tmp_path) as lg:
        assert lg.last_idx == 95
        assert list(lg.read_from(1)) == records(1, 95)
        assert list(lg.read_from(50)) == records(50, 46)
        assert list(lg.read_from(96)) == []
        lg.append(records(96, 5))
        assert lg.last_idx == 100
    with EventLog.open(tmp_path) as lg:
        assert list(lg.read_from(0)) == records(1, 100)


def test_append_rejects_gaps_and_duplicates_without_writing(tmp_path: Path) -> None:
    with EventLog.open(tmp_path) as lg:
        lg.append(records(1, 3))
        with pytest.raises(ValueError, match="expected 4"):
            lg.append([(5, b"x")])
        with pytest.raises(ValueError, match="expected 4"):
            lg.append([(3, b"x")])
        with pytest.raises(ValueError, match="record 1 of the batch has index 6, expected 5"):
            lg.append([(4, b"a"), (6, b"b")])
        lg.append([])
        assert lg.last_idx == 3
    with EventLog.open(tmp_path) as lg:
        assert list(lg.read_from(1)) == records(1, 3)


def test_batch_is_one_write_and_one_fdatasync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cluster.shared.eventlog as eventlog

    with EventLog.open(tmp_path) as lg:
        lg.append(records(1, 1))  # the segment exists now
        calls: list[str] = []
        real_write, real_sync = os.write, eventlog._fdatasync

        def write(fd: int, data: bytes) -> int:
            calls.append("write")
            return real_write(fd, data)

        def sync(fd: int) -> None:
            calls.append("sync")
            real_sync(fd)

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(eventlog, "_fdatasync", sync)
        lg.append(records(2, 500))
        assert calls == ["write", "sync"]


def test_a_failed_write_names_the_segment_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel's error for a write or fsync on a descriptor names no file; whoever reports
    it (the master, before it stops) must be able to say where."""
    import cluster.shared.eventlog as eventlog

    def failing_sync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    with EventLog.open(tmp_path) as lg:
        with monkeypatch.context() as m:
            m.setattr(eventlog, "_fdatasync", failing_sync)
            with pytest.raises(OSError) as new_segment:
                lg.append(records(1, 1))  # creates the first segment
        assert new_segment.value.filename == str(tmp_path / eventlog.segment_name(1))
        lg.append(records(1, 1))
        monkeypatch.setattr(eventlog, "_fdatasync", failing_sync)
        with pytest.raises(OSError) as append:
            lg.append(records(2, 1))
        assert append.value.filename == str(tmp_path / eventlog.segment_name(1))
        assert "Input/output error" in str(append.value)


def test_segments_roll_and_reads_cross_them(tmp_path: Path) -> None:
    fill(tmp_path, 3000, batch=37, segment_max_bytes=8 << 10)
    segs = segments(tmp_path)
    assert len(segs) > 5
    firsts = [int(s.stem) for s in segs]
    assert firsts[0] == 1 and firsts == sorted(firsts)
    assert all(s.stat().st_size <= (8 << 10) + 37 * 200 for s in segs)
    with EventLog.open(tmp_path, segment_max_bytes=8 << 10) as lg:
        assert lg.last_idx == 3000
        for start in (1, firsts[3] - 1, firsts[3], firsts[3] + 1, 2999, 3000):
            assert list(lg.read_from(start)) == records(start, 3001 - start)
        lg.append(records(3001, 1))
    assert lg.last_idx == 3001


def test_sparse_index_lets_reads_seek(tmp_path: Path) -> None:
    fill(tmp_path, 5 * SPARSE_EVERY + 10, batch=100)
    with EventLog.open(tmp_path) as lg:
        seg = lg._segments[-1]
        # Built while recovering the (only, last) segment at open.
        assert seg.sparse_idx == [1 + k * SPARSE_EVERY for k in range(6)]
        idx, off = seg.seek(3 * SPARSE_EVERY + 5)
        assert idx == 1 + 3 * SPARSE_EVERY and off == record_offset(seg.path, idx)
        assert next(lg.read_from(3 * SPARSE_EVERY + 5)) == (
            3 * SPARSE_EVERY + 5,
            payload(3 * SPARSE_EVERY + 5),
        )


def test_read_from_sees_records_appended_while_iterating(tmp_path: Path) -> None:
    with EventLog.open(tmp_path, segment_max_bytes=4 << 10) as lg:
        lg.append(records(1, 10))
        it = lg.read_from(1)
        got = [next(it) for _ in range(10)]
        lg.append(records(11, 200))  # also rolls into new segments
        got.extend(it)
        assert got == records(1, 210)


# ------------------------------------------------------------------------------ torn tails


@pytest.mark.parametrize("cut", [1, REC_HEADER_SIZE - 1, REC_HEADER_SIZE, REC_HEADER_SIZE + 3, -1])
def test_last_record_cut_mid_write_is_truncated_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cut: int
) -> None:
    fill(tmp_path, 20)
    seg = segments(tmp_path)[-1]
    start = record_offset(seg, 20)
    keep = start + cut if cut > 0 else seg.stat().st_size - 1
    os.truncate(seg, keep)
    with caplog.at_level(logging.WARNING), EventLog.open(tmp_path) as lg:
        assert lg.last_idx == 19
        assert list(lg.read_from(1)) == records(1, 19)
        lg.append([(20, b"again")])
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert str(seg) in msg and f"offset {start}" in msg and f"{keep - start} bytes" in msg
    with EventLog.open(tmp_path) as lg:
        assert list(lg.read_from(19)) == [(19, payload(19)), (20, b"again")]


@pytest.mark.parametrize("junk", [b"\0" * 7, b"\0" * 4096, b"\0" * (REC_HEADER_SIZE + 50)])
def test_trailing_zeros_are_a_torn_tail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, junk: bytes
) -> None:
    fill(tmp_path, 5)
    seg = segments(tmp_path)[-1]
    size = seg.stat().st_size
    with seg.open("ab") as f:
        f.write(junk)
    with caplog.at_level(logging.WARNING), EventLog.open(tmp_path) as lg:
        assert lg.last_idx == 5
    assert seg.stat().st_size == size
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_torn_write_of_a_batch_keeps_every_acknowledged_record(tmp_path: Path) -> None:
    """A batch whose tail pages never reached the disk: zeros where its records should be."""
    fill(tmp_path, 30, batch=10)
    seg = segments(tmp_path)[-1]
    at = record_offset(seg, 24)  # batch 21..30 is torn from record 24 on
    data = bytearray(seg.read_bytes())
    data[at:] = b"\0" * (len(data) - at)
    seg.write_bytes(bytes(data))
    with EventLog.open(tmp_path) as lg:
        assert lg.last_idx == 23
        assert list(lg.read_from(1)) == records(1, 23)


def test_readonly_open_ignores_a_torn_tail_without_cutting_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fill(tmp_path, 5)
    seg = segments(tmp_path)[-1]
    os.truncate(seg, seg.stat().st_size - 2)
    size = seg.stat().st_size
    with caplog.at_level(logging.WARNING), EventLog.open(tmp_path, readonly=True) as lg:
        assert lg.last_idx == 4
        assert list(lg.read_from(1)) == records(1, 4)
        with pytest.raises(ValueError, match="read-only"):
            lg.append([(5, b"x")])
    assert seg.stat().st_size == size
    # A running master may be mid-write: a reader does not call it a crash.
    assert caplog.messages == [
        f"event log: incomplete tail in {seg} at offset {record_offset(seg, 5)} "
        "(record cut mid-write; being written, or left by a crash): ignoring "
        f"{size - record_offset(seg, 5)} bytes after index 4"
    ]


def test_readonly_open_of_a_segment_being_created_does_not_speak_of_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fill(tmp_path, 8)
    new = tmp_path / segment_name(9)
    new.write_bytes(b"CLO")  # a running writer is writing its header right now
    with caplog.at_level(logging.WARNING), EventLog.open(tmp_path, readonly=True) as lg:
        assert list(lg.read_from(1)) == records(1, 8)
    assert caplog.messages == [
        f"event log: {new}: incomplete segment header (being written, or left by a crash): "
        "ignoring 3 bytes"
    ]
    assert new.read_bytes() == b"CLO"


def test_torn_segment_header_of_a_new_segment_is_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fill(tmp_path, 8)
    torn = tmp_path / segment_name(9)
    torn.write_bytes(b"CLO")  # the crash came while the header was being written
    with caplog.at_level(logging.WARNING), EventLog.open(tmp_path) as lg:
        assert lg.last_idx == 8
        lg.append(records(9, 2))
    assert "torn segment header" in caplog.text
    with EventLog.open(tmp_path) as lg:
        assert list(lg.read_from(1)) == records(1, 10)


@pytest.mark.parametrize("readonly", [False, True])
def test_a_tiny_foreign_file_named_like_the_last_segment_is_not_taken_for_a_torn_header(
    tmp_path: Path, readonly: bool
) -> None:
    # Any last segment under 20 bytes was "a torn header" and removed, whatever it held:
    # a note someone left under a segment's name was deleted by the master's open.
    fill(tmp_path, 8)
    stray = tmp_path / segment_name(9)
    stray.write_bytes(b"hello\n")
    with pytest.raises(LogDirectoryError, match=r"foreign file of 6 bytes, not a segment"):
        EventLog.open(tmp_path, readonly=readonly).close()
    assert stray.read_bytes() == b"hello\n"


# ------------------------------------------------------------------------------ corruption


@pytest.mark.parametrize("where", ["header", "length", "index"])
def test_flipped_header_byte_in_the_middle_is_reported_at_open(tmp_path: Path, where: str) -> None:
    fill(tmp_path, 50)
    seg = segments(tmp_path)[-1]
    at = record_offset(seg, 17)
    flip_byte(seg, at + {"header": 16, "length": 0, "index": 5}[where])
    with pytest.raises(LogCorruptError) as info:
        EventLog.open(tmp_path)
    err = info.value
    assert (err.idx, err.offset, err.path) == (17, at, seg)
    assert "index 17" in str(err) and f"offset {at}" in str(err)


@pytest.mark.parametrize("victim", [17, 20, 21])  # inside, last of, first of a batch
def test_flipped_payload_byte_in_the_middle_is_reported_with_its_index(
    tmp_path: Path, victim: int
) -> None:
    fill(tmp_path, 50)  # batches of 10: 1-10, 11-20, ...
    seg = segments(tmp_path)[-1]
    at = record_offset(seg, victim)
    flip_byte(seg, at + REC_HEADER_SIZE + 3)
    with EventLog.open(tmp_path) as lg:  # open checks headers, and payloads of the last batch
        got: list[int] = []
        with pytest.raises(LogCorruptError) as info:
            for idx, _ in lg.read_from(1):
                got.append(idx)
        assert got == list(range(1, victim))  # never skipped: reading stops at the bad record
    err = info.value
    assert (err.idx, err.offset, err.path) == (victim, at, seg)
    assert f"index {victim}" in str(err) and "payload checksum" in str(err)


def test_flipped_byte_in_the_final_batch_followed_by_nothing_acknowledged_is_torn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Pages of an unsynced write reach the disk in any order: a hole inside the final batch
    with good records of that same batch after it is a torn write, not corruption."""
    fill(tmp_path, 50)
    seg = segments(tmp_path)[-1]
    start, hole = record_offset(seg, 41), record_offset(seg, 44)
    data = bytearray(seg.read_bytes())
    data[hole : hole + 30] = b"\0" * 30  # records 45..50 after it are intact
    seg.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING), EventLog.open(tmp_path) as lg:
        assert lg.last_idx == 43
        assert list(lg.read_from(1)) == records(1, 43)
    assert f"offset {hole}" in caplog.text and start < hole


def test_damaged_last_record_of_a_batch_that_another_batch_follows_is_corruption(
    tmp_path: Path,
) -> None:
    fill(tmp_path, 50)
    seg = segments(tmp_path)[-1]
    at = record_offset(seg, 40)
    data = bytearray(seg.read_bytes())
    data[at : at + 8] = b"\0" * 8  # header of 40 wrecked; batch 41-50 was written after it
    seg.write_bytes(bytes(data))
    with pytest.raises(LogCorruptError, match="a later batch \\(from index 41\\)") as info:
        EventLog.open(tmp_path)
    assert (info.value.idx, info.value.offset) == (40, at)


@pytest.mark.parametrize("hole", [4096, 64 << 10])
def test_a_bad_page_hiding_many_records_before_later_batches_is_corruption(
    tmp_path: Path, hole: int
) -> None:
    """A zeroed page (a bad sector) in the middle of the last segment hides dozens of
    records: recovery used to look only a few indices past the damage, find nothing, and
    cut every acknowledged record after it off as a "torn tail"."""
    fill(tmp_path, 8000, batch=50)
    seg = segments(tmp_path)[-1]
    size = seg.stat().st_size
    at = size // 3
    data = bytearray(seg.read_bytes())
    data[at : at + hole] = b"\0" * hole
    seg.write_bytes(bytes(data))
    with pytest.raises(LogCorruptError, match="a later batch") as info:
        EventLog.open(tmp_path)
    assert info.value.offset <= at
    assert seg.stat().st_size == size  # nothing cut


def test_flipped_byte_in_a_sealed_segment_is_reported_when_read(tmp_path: Path) -> None:
    fill(tmp_path, 400, batch=20, segment_max_bytes=4 << 10)
    first = segments(tmp_path)[0]
    at = record_offset(first, 7)
    flip_byte(first, at + REC_HEADER_SIZE + 1)
    with EventLog.open(tmp_path, segment_max_bytes=4 << 10) as lg:
        assert lg.last_idx == 400  # opening checks only the last segment's records
        got: list[int] = []
        with pytest.raises(LogCorruptError) as info:
            for idx, _ in lg.read_from(1):
                got.append(idx)
        assert got == list(range(1, 7))  # never skipped: reading stops at the bad record
        assert (info.value.idx, info.value.offset) == (7, at)
        with pytest.raises(LogCorruptError):
            lg.verify()


def test_non_consecutive_indices_on_disk_are_corruption(tmp_path: Path) -> None:
    from cluster.shared.eventlog import _segment_header, encode_records

    data, _ = encode_records([(1, b"a"), (2, b"b"), (4, b"d")])
    (tmp_path / segment_name(1)).write_bytes(_segment_header(1) + data)
    with pytest.raises(LogCorruptError, match="index 4, expected 3") as info:
        EventLog.open(tmp_path)
    assert info.value.idx == 3


def test_missing_records_between_segments_are_corruption(tmp_path: Path) -> None:
    fill(tmp_path, 300, batch=20, segment_max_bytes=4 << 10)
    segs = segments(tmp_path)
    second_first = int(segs[1].stem)
    # Cut the last record off the first (sealed) segment.
    os.truncate(segs[0], record_offset(segs[0], second_first - 1))
    with (
        EventLog.open(tmp_path, segment_max_bytes=4 << 10) as lg,
        pytest.raises(LogCorruptError, match=f"next starts at {second_first}"),
    ):
        lg.verify()


# ------------------------------------------------------------------------------ directory


def test_directory_problems_have_clear_errors(tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(LogDirectoryError, match="is not a directory"):
        EventLog.open(afile)
    with pytest.raises(LogDirectoryError, match="does not exist"):
        EventLog.open(tmp_path / "missing", readonly=True)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / segment_name(1)).write_bytes(b"SQLite format 3\0" + b"\0" * 100)
    with pytest.raises(LogDirectoryError, match="foreign file"):
        EventLog.open(foreign)

    newer = tmp_path / "newer"
    fill(newer, 3)
    seg = segments(newer)[0]
    data = bytearray(seg.read_bytes())
    data[4:6] = struct.pack("<H", 99)  # as a newer build writes it: its CRC is good
    data[16:20] = struct.pack("<I", zlib.crc32(data[:16]))
    seg.write_bytes(bytes(data))
    with pytest.raises(LogDirectoryError, match="version 99 is not supported"):
        EventLog.open(newer)

    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "7.seg").write_bytes(b"")
    with pytest.raises(LogDirectoryError, match="not a segment of this log"):
        EventLog.open(odd)


@pytest.mark.parametrize(
    ("offset", "bit"), [(0, 0x01), (3, 0x80), (4, 0x02), (6, 0x01), (9, 0x10), (18, 0x04)]
)
def test_a_flipped_bit_in_a_segment_header_is_corruption_not_a_foreign_file(
    tmp_path: Path, offset: int, bit: int
) -> None:
    """The magic and version were checked before the header CRC: one flipped bit made a
    damaged segment of ours a "foreign file (magic b'BLOG')" or an unsupported version."""
    fill(tmp_path, 300, batch=20, segment_max_bytes=4 << 10)
    seg = segments(tmp_path)[1]  # a sealed one
    data = bytearray(seg.read_bytes())
    data[offset] ^= bit
    seg.write_bytes(bytes(data))
    for readonly in (False, True):
        with pytest.raises(LogCorruptError) as info:
            EventLog.open(tmp_path, readonly=readonly)
        err = info.value
        assert (err.path, err.offset, err.idx) == (seg, 0, int(seg.stem))
        assert "segment header checksum mismatch" in str(err)
    # A zeroed header (a lost page) is damage too; a text file is still no segment of ours.
    seg.write_bytes(bytes(SEG_HEADER_SIZE) + bytes(data[SEG_HEADER_SIZE:]))
    with pytest.raises(LogCorruptError, match="segment header checksum mismatch"):
        EventLog.open(tmp_path, readonly=True)
    seg.write_text("notes about the cluster, kept next to its log\n")
    with pytest.raises(LogDirectoryError) as foreign:
        EventLog.open(tmp_path, readonly=True)
    assert str(foreign.value) == (
        f"{seg}: foreign file, not a segment of this log (magic b'note', expected b'CLOG')"
    )


def test_an_entry_named_like_a_segment_that_is_no_file_is_named_for_what_it_is(
    tmp_path: Path,
) -> None:
    """The name matches: "expected <20 digits>.seg files" sent the operator looking for a
    naming problem that was not there."""
    cases = {
        "dangling": "a dangling symlink (to ",
        "directory": "a directory, not a regular file",
        "fifo": "a FIFO, not a regular file",
    }
    for case, said in cases.items():
        d = tmp_path / case
        fill(d, 3)
        odd = d / segment_name(100)
        if case == "dangling":
            odd.symlink_to(d / "gone.seg")
        elif case == "directory":
            odd.mkdir()
        else:
            os.mkfifo(odd)
        for readonly in (False, True):
            with pytest.raises(LogDirectoryError) as info:
                EventLog.open(d, readonly=readonly)
            assert str(info.value).startswith(f"{odd}: named like a segment but {said}")
            assert "expected <20 digits>" not in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any directory")
def test_unreadable_directory_is_reported(tmp_path: Path) -> None:
    d = tmp_path / "locked"
    d.mkdir()
    d.chmod(0)
    try:
        with pytest.raises(LogDirectoryError, match="not readable"):
            EventLog.open(d)
    finally:
        d.chmod(0o755)


def test_second_writer_is_refused_but_a_reader_is_not(tmp_path: Path) -> None:
    with EventLog.open(tmp_path) as lg:
        lg.append(records(1, 3))
        with pytest.raises(LogDirectoryError, match="in use by another writer"):
            EventLog.open(tmp_path)
        with EventLog.open(tmp_path, readonly=True) as reader:
            assert list(reader.read_from(1)) == records(1, 3)
    with EventLog.open(tmp_path) as lg:  # the lock went with close()
        assert lg.last_idx == 3


# ------------------------------------------------------------------------------ kill -9

_CHILD = """
import random, sys
from pathlib import Path
from cluster.shared.eventlog import EventLog

def payload(i):
    return f"record-{i}:".encode() * (1 + i % 7)

rng = random.Random(int(sys.argv[2]))
lg = EventLog.open(Path(sys.argv[1]), segment_max_bytes=64 << 10)
print("start", lg.last_idx, flush=True)
while True:
    first = lg.last_idx + 1
    lg.append([(i, payload(i)) for i in range(first, first + rng.randint(1, 300))])
    print(lg.last_idx, flush=True)  # printed only after append returned: durable
"""


def _lines(proc: subprocess.Popen[str], out: queue.Queue[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        out.put(line)


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(3))
def test_kill_9_while_appending_loses_no_acknowledged_record(tmp_path: Path, round_: int) -> None:
    # Several kill/reopen cycles on the same directory: each child recovers the last one's tail.
    reported = 0
    for cycle in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(tmp_path), str(100 * round_ + cycle)],
            stdout=subprocess.PIPE,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=_lines, args=(proc, lines), daemon=True)
        reader.start()
        try:
            start = lines.get(timeout=30).split()
            assert start[0] == "start" and int(start[1]) >= reported
            deadline = time.monotonic() + 30
            for _ in range(40 + 30 * cycle):  # a bounded number of acknowledgements
                reported = int(lines.get(timeout=max(deadline - time.monotonic(), 0.1)))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            reader.join(timeout=30)  # it reads up to the end of the killed child's output
            assert proc.stdout is not None
            proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        while not lines.empty():  # acknowledgements printed before the kill landed
            line = lines.get_nowait().strip()
            if line:
                reported = int(line)
        with EventLog.open(tmp_path, segment_max_bytes=64 << 10) as lg:
            assert lg.last_idx >= reported
            n = 0
            for idx, data in lg.read_from(1):
                assert data == payload(idx)
                n += 1
            assert n == lg.last_idx


# ------------------------------------------------------------------------------ a live log


class _Listing:
    """What `os.scandir` returns, for a chosen list of entries."""

    def __init__(self, entries: list[os.DirEntry[str]]) -> None:
        self._entries = entries

    def __enter__(self) -> list[os.DirEntry[str]]:
        return self._entries

    def __exit__(self, *exc: object) -> None:
        pass


def test_a_readonly_open_while_segments_roll_sees_no_false_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cluster replay` of a running master: a writer rolled segments during the directory
    scan, which (a directory bigger than one getdents batch) missed the segment created
    during it but saw the one created after it. One scan read that as records lost between
    segments ("segment ends before index N but the next starts at M"): false corruption."""
    fill(tmp_path, 300, batch=20, segment_max_bytes=4 << 10)
    segs = segments(tmp_path)
    assert len(segs) >= 4
    missed = segs[1].name
    real_scandir = os.scandir
    scans: list[int] = []

    def torn_once(path: str | Path) -> object:
        with real_scandir(path) as it:
            entries = list(it)
        if Path(path) == tmp_path:
            scans.append(1)
            if len(scans) == 1:  # the writer created `missed` while this scan ran
                entries = [e for e in entries if e.name != missed]
        return _Listing(entries)

    monkeypatch.setattr(os, "scandir", torn_once)
    with EventLog.open(tmp_path, readonly=True) as lg:
        assert lg.last_idx == 300
        assert list(lg.read_from(1)) == records(1, 300)
    assert len(scans) == 2

    # A first scan that saw only the first segments: the log is read up to the newest of
    # them (as it was a moment earlier), never with a gap.
    scans.clear()
    seen_first = {s.name for s in segs[:2]}

    def early_once(path: str | Path) -> object:
        with real_scandir(path) as it:
            entries = list(it)
        if Path(path) == tmp_path:
            scans.append(1)
            if len(scans) == 1:
                entries = [e for e in entries if e.name in seen_first]
        return _Listing(entries)

    monkeypatch.setattr(os, "scandir", early_once)
    with EventLog.open(tmp_path, readonly=True) as lg:
        end = int(segs[2].stem) - 1
        assert lg.last_idx == end
        assert list(lg.read_from(1)) == records(1, end)
