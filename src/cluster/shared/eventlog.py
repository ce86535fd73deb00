"""The durable, append-only event log: checksummed records of opaque payloads in segment files.

Layout: a directory of segment files named ``<first_idx:020d>.seg``. A segment starts with a
header (magic, format version, its first index, a CRC of those) and holds records back to back:

    record = length u32 | idx u64 | crc32(payload) u32 | crc32(the 16 bytes before) u32 | payload

The top bit of `length` marks the first record of each appended batch.

The log does not know the event schema; it stores bytes under consecutive indices.

Durability point: `append` writes a whole batch with one ``write`` and one ``fdatasync`` (group
commit); when it returns, every record of the batch is on disk ("acknowledged = fsync
returned"). A new segment also fsyncs the directory so the file itself survives a crash.

Recovery on open (see docs/storage.md):

* torn tail -- the LAST segment ends in a record cut mid-write, a partial header, or bytes
  that never made it (zeros), with no valid record after it: truncated back to the last good
  record with one WARNING naming file, offset and bytes dropped. Those records were never
  acknowledged, so nothing durable is lost.
* corruption -- a bad record (CRC mismatch, wrong index) with a valid record after it, or any
  bad record in a sealed segment: `LogCorruptError` naming the file, offset and index. Never
  skipped silently: folding past a hole would give a state nobody ever had.

Opening is O(last segment): sealed segments are checked (header at open, every record's CRC
and index when read). Each segment keeps a sparse index (every 1024th record -> offset) so
`read_from(idx)` seeks rather than scanning from the start.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import re
import stat
import struct
import zlib
from collections.abc import Generator, Iterator, Sequence
from operator import itemgetter
from pathlib import Path
from types import TracebackType
from typing import Final, NamedTuple

from cluster.shared.files import fsync_dir, make_dirs_durably, try_lock, write_all

log = logging.getLogger(__name__)

SEGMENT_MAGIC: Final = b"CLOG"
FORMAT_VERSION: Final = 1
_SEG_HEADER = struct.Struct("<4sHHQI")  # magic, version, flags, first_idx, crc32 of the 16 before
_REC_HEADER = struct.Struct("<IQII")  # length, idx, crc32(payload), crc32 of the 16 before
SEG_HEADER_SIZE: Final = _SEG_HEADER.size  # 20
REC_HEADER_SIZE: Final = _REC_HEADER.size  # 20
#: The largest payload one record may carry (a sanity bound, also for a damaged length field).
MAX_PAYLOAD: Final = 1 << 30
#: Every SPARSE_EVERY-th record of a segment has its offset remembered.
SPARSE_EVERY: Final = 1024
#: Bytes read per system call when scanning a segment.
READ_CHUNK: Final = 4 << 20
#: The length field's top bit marks the first record of each appended batch (recovery uses
#: it to tell a torn final batch from damage that acknowledged data follows).
_BATCH_START: Final = 1 << 31
_LENGTH_MASK: Final = _BATCH_START - 1
_SEG_NAME = re.compile(r"^(\d{20})\.seg$")
_LOCK_NAME = "LOCK"

_pack_rec_head = struct.Struct("<IQI").pack
_pack_crc = struct.Struct("<I").pack
_unpack_rec = _REC_HEADER.unpack_from
_crc32 = zlib.crc32


class LogError(Exception):
    """Base of every error the event log reports."""


class LogDirectoryError(LogError):
    """The log directory cannot be used (not a directory, unreadable, locked, foreign files)."""


class LogInUseError(LogDirectoryError):
    """Another writer holds the log's lock (another master on the same data directory)."""


class LogCorruptError(LogError):
    """A record that is not a torn tail is bad: the log cannot be trusted past `idx`.

    `path` is the segment file, `offset` the byte offset of the bad record in it, `idx` the
    index of the bad record (or the index that was expected there).
    """

    def __init__(self, path: Path, offset: int, idx: int, why: str) -> None:
        super().__init__(f"event log corrupt at index {idx}: {path} offset {offset}: {why}")
        self.path = path
        self.offset = offset
        self.idx = idx
        self.why = why


class LogAnchor(NamedTuple):
    """Where the record at `idx` lies and what it holds: its byte offset in its segment and
    its payload's CRC. A snapshot stores the anchor of the record it was taken after, so a
    loader can check it is a snapshot of this log (`EventLog.holds`), not of another
    history that merely reached the same index (a directory copied from another cluster)."""

    idx: int
    offset: int
    crc: int


def segment_name(first_idx: int) -> str:
    return f"{first_idx:020d}.seg"


def _segment_header(first_idx: int) -> bytes:
    head = struct.pack("<4sHHQ", SEGMENT_MAGIC, FORMAT_VERSION, 0, first_idx)
    return head + _pack_crc(_crc32(head))


def encode_records(records: Sequence[tuple[int, bytes]]) -> tuple[bytes, list[int]]:
    """The on-disk bytes of `records`, and each record's offset within them."""
    offsets: list[int] = []
    at = 0
    for _idx, payload in records:
        offsets.append(at)
        at += REC_HEADER_SIZE + len(payload)
    return _encode_batch(records), offsets


def _encode_batch(records: Sequence[tuple[int, bytes]]) -> bytes:
    """The on-disk bytes of one appended batch (the hot loop of every commit: locals only,
    three C calls per record, nothing else)."""
    longest = max(map(len, map(itemgetter(1), records)))
    if longest > MAX_PAYLOAD:
        idx = next(i for i, p in records if len(p) == longest)
        raise ValueError(f"record {idx}: payload of {longest} bytes exceeds {MAX_PAYLOAD}")
    pack_head, pack_crc, crc32 = _pack_rec_head, _pack_crc, _crc32
    parts: list[bytes] = []
    extend = parts.extend
    flag = _BATCH_START
    for idx, payload in records:
        head = pack_head(len(payload) | flag, idx, crc32(payload))
        extend((head, pack_crc(crc32(head)), payload))
        flag = 0
    return b"".join(parts)


class _Segment:
    """One segment file: its index range, durable size and sparse index."""

    __slots__ = ("first_idx", "last_idx", "path", "size", "sparse_idx", "sparse_off")

    def __init__(self, path: Path, first_idx: int, size: int) -> None:
        self.path = path
        self.first_idx = first_idx
        #: Last index in the segment; first_idx - 1 while empty. For a sealed segment that
        #: has not been read yet it is implied by the next segment's first index.
        self.last_idx = first_idx - 1
        #: Bytes known good: reads never go past it (a concurrent append may be mid-write).
        self.size = size
        self.sparse_idx: list[int] = [first_idx]
        self.sparse_off: list[int] = [SEG_HEADER_SIZE]

    def note(self, idx: int, offset: int) -> None:
        """Remember `offset` if `idx` is the next sparse point (keeps the lists sorted)."""
        if idx == self.sparse_idx[-1] + SPARSE_EVERY:
            self.sparse_idx.append(idx)
            self.sparse_off.append(offset)

    def seek(self, idx: int) -> tuple[int, int]:
        """(index, offset) of the nearest remembered record at or before `idx`."""
        i = bisect.bisect_right(self.sparse_idx, idx) - 1
        return self.sparse_idx[i], self.sparse_off[i]


class EventLog:
    """Append-only log of (index, payload) records; see the module docstring."""

    def __init__(
        self,
        directory: Path,
        segments: list[_Segment],
        *,
        segment_max_bytes: int,
        readonly: bool,
        lock_fd: int | None,
    ) -> None:
        self._dir = directory
        self._segments = segments
        self._firsts = [s.first_idx for s in segments]
        self._max = segment_max_bytes
        self._readonly = readonly
        self._lock_fd = lock_fd
        self._fd: int | None = None  # write handle of the active (last) segment
        self._last_idx = segments[-1].last_idx if segments else 0
        #: The anchor of the record at `last_idx`, when known (see `last_anchor`).
        self._anchor: LogAnchor | None = None
        self._broken: str | None = None
        self._closed = False

    # ---------------------------------------------------------------------------- open

    @classmethod
    def open(
        cls, directory: Path, *, segment_max_bytes: int = 64 << 20, readonly: bool = False
    ) -> EventLog:
        """Open (creating it unless `readonly`) the log in `directory` and recover its tail.

        `readonly` takes no lock and never truncates: a torn tail is ignored, not removed,
        so tools like `cluster replay` can read the log of a running master.
        """
        if segment_max_bytes < SEG_HEADER_SIZE + REC_HEADER_SIZE:
            raise ValueError(f"segment_max_bytes={segment_max_bytes} is too small")
        directory = Path(directory)
        _check_directory(directory, readonly)
        lock_fd = None if readonly else _lock(directory)
        try:
            segments = _list_segments(directory, readonly)
            if segments:
                _check_headers(segments, readonly)
                segments = [s for s in segments if s.size >= 0]  # torn empty last segment
            anchor = _recover_last(segments[-1], readonly) if segments else None
            opened = cls(
                directory,
                segments,
                segment_max_bytes=segment_max_bytes,
                readonly=readonly,
                lock_fd=lock_fd,
            )
            opened._anchor = anchor
            return opened
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise

    # ---------------------------------------------------------------------------- properties

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def last_idx(self) -> int:
        """Highest durable index; 0 when the log is empty."""
        return self._last_idx

    @property
    def last_anchor(self) -> LogAnchor | None:
        """The anchor of the record at `last_idx`; None when the log is empty or that record
        is not in the last segment (an empty last segment after a crash). Cheap, and safe to
        read from another thread: it is kept, not computed."""
        return self._anchor

    def holds(self, anchor: LogAnchor) -> bool | None:
        """Whether the record at `anchor.idx` is the one `anchor` describes (one read of a
        record header): False for another record there (another history); None when the
        log does not hold that index, so there is nothing to check it against."""
        idx = anchor.idx
        if not self._segments or idx < self.first_idx or idx > self._last_idx:
            return None
        seg = self._segments[bisect.bisect_right(self._firsts, idx) - 1]
        if anchor.offset < SEG_HEADER_SIZE or anchor.offset + REC_HEADER_SIZE > seg.size:
            return False
        with open(seg.path, "rb") as f:
            f.seek(anchor.offset)
            head = f.read(REC_HEADER_SIZE)
        if len(head) < REC_HEADER_SIZE:
            return False
        _field, ridx, pcrc, hcrc = _unpack_rec(head)
        return bool(_crc32(head[:16]) == hcrc and ridx == idx and pcrc == anchor.crc)

    @property
    def first_idx(self) -> int:
        """Lowest index held (1 for a log that starts at the beginning); 1 when empty."""
        return self._segments[0].first_idx if self._segments else 1

    # ---------------------------------------------------------------------------- append

    def append(self, records: Sequence[tuple[int, bytes]]) -> None:
        """Write `records` durably: ONE write, ONE fdatasync. Durable when this returns.

        Indices must continue from `last_idx + 1` without gaps (`ValueError` otherwise).
        After an I/O error the log refuses further appends: reopen it to recover.
        """
        if not records:
            return
        if self._closed:
            raise ValueError("event log is closed")
        if self._readonly:
            raise ValueError("event log was opened read-only")
        if self._broken is not None:
            raise OSError(f"event log is unusable after an earlier I/O error: {self._broken}")
        expected = self._last_idx + 1
        indices = list(map(itemgetter(0), records))
        if indices != list(range(expected, expected + len(records))):
            i, idx = next((i, x) for i, x in enumerate(indices) if x != expected + i)
            raise ValueError(
                f"record {i} of the batch has index {idx}, expected {expected + i} "
                f"(indices must continue from last_idx {self._last_idx})"
            )
        data = _encode_batch(records)
        seg = self._segments[-1] if self._segments else None
        new_segment = seg is None or (
            seg.last_idx >= seg.first_idx and seg.size + len(data) > self._max
        )
        if seg is None or new_segment:
            seg = self._start_segment(expected)
        fd = self._active_fd()
        old_size = seg.size
        try:
            write_all(fd, data)
            _fdatasync(fd)
        except OSError as exc:
            # After a failed write or fsync the page cache state is unknown: cut back to the
            # last acknowledged byte and refuse to go on in this process.
            _name_file(exc, seg.path)
            self._broken = str(exc)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, old_size)
            raise
        # The sparse index: the offsets of the (few) records that fall on its points.
        note_at = seg.sparse_idx[-1] + SPARSE_EVERY
        while expected <= note_at <= records[-1][0]:
            k = note_at - expected
            size_before = k * REC_HEADER_SIZE + sum(map(len, map(itemgetter(1), records[:k])))
            seg.note(note_at, old_size + size_before)
            note_at += SPARSE_EVERY
        seg.size = old_size + len(data)
        seg.last_idx = records[-1][0]
        self._last_idx = seg.last_idx
        last = records[-1][1]
        # One tuple, replaced whole: a snapshot writer on another thread reads it.
        self._anchor = LogAnchor(seg.last_idx, seg.size - REC_HEADER_SIZE - len(last), _crc32(last))

    def _start_segment(self, first_idx: int) -> _Segment:
        """Create the next segment (header written and synced) and make it the active one."""
        path = self._dir / segment_name(first_idx)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        try:
            write_all(fd, _segment_header(first_idx))
            _fdatasync(fd)
            fsync_dir(self._dir)
        except OSError as exc:
            _name_file(exc, path)
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        self._fd = fd
        seg = _Segment(path, first_idx, SEG_HEADER_SIZE)
        self._segments.append(seg)
        self._firsts.append(first_idx)
        return seg

    def _active_fd(self) -> int:
        # Opened lazily: a log that is only read never holds a write handle.
        if self._fd is None:
            seg = self._segments[-1]
            self._fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND)
        return self._fd

    # ---------------------------------------------------------------------------- read

    def read_from(self, start_idx: int) -> Iterator[tuple[int, bytes]]:
        """Yield (idx, payload) for every durable record from `start_idx` on, in order.

        Every record read is checked (CRCs, consecutive index); a bad one raises
        `LogCorruptError`. Records appended while iterating are included.
        """
        idx = max(start_idx, self.first_idx)
        while idx <= self._last_idx:
            if self._closed:
                raise ValueError("event log is closed")
            i = bisect.bisect_right(self._firsts, idx) - 1
            seg = self._segments[i]
            sealed = i + 1 < len(self._segments)
            end_idx = yield from _read_segment(seg, idx)
            if sealed:
                next_first = self._firsts[i + 1]
                if end_idx != next_first:
                    raise LogCorruptError(
                        seg.path,
                        seg.size,
                        end_idx,
                        f"segment ends before index {end_idx} but the next starts at {next_first}",
                    )
                seg.last_idx = next_first - 1
            elif end_idx == idx:
                break  # the active segment has nothing more yet
            idx = end_idx

    def locate(self, idx: int) -> tuple[Path, int]:
        """(segment file, byte offset) of record `idx`, for naming where a record that passed
        its checksums is still bad (an event that does not decode). Walks the record headers
        from the nearest remembered offset: for error paths, not for reading."""
        i = bisect.bisect_right(self._firsts, idx) - 1
        if i < 0 or idx > self._last_idx:
            raise ValueError(f"index {idx} is not in the log")
        seg = self._segments[i]
        at, offset = seg.seek(idx)
        with open(seg.path, "rb") as f:
            while at < idx:
                f.seek(offset)
                head = f.read(REC_HEADER_SIZE)
                if len(head) < REC_HEADER_SIZE:
                    raise LogCorruptError(seg.path, offset, at, "record cut short at segment end")
                offset += REC_HEADER_SIZE + (_unpack_rec(head)[0] & _LENGTH_MASK)
                at += 1
        return seg.path, offset

    def verify(self) -> int:
        """Read every record, checking CRCs and indices; returns the number of records."""
        count = 0
        for _ in self.read_from(self.first_idx):
            count += 1
        return count

    # ---------------------------------------------------------------------------- close

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten close must not leak the lock to a later open
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"EventLog({str(self._dir)!r}, last_idx={self._last_idx})"


# -------------------------------------------------------------------------------- reading


def _read_segment(seg: _Segment, start_idx: int) -> Generator[tuple[int, bytes], None, int]:
    """Yield the records of `seg` from `start_idx` up to its durable size.

    Generator's return value: the index after the last record read (the next one expected).
    Reads big chunks and parses them in place; every record's CRCs and index are checked.
    """
    idx, offset = seg.seek(start_idx)
    path = seg.path
    unpack = _unpack_rec
    crc32 = _crc32
    hsize = REC_HEADER_SIZE
    mask = _LENGTH_MASK
    note_at = seg.sparse_idx[-1] + SPARSE_EVERY
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        buf = b""
        pos = 0
        base = offset  # file offset of buf[0]
        while True:
            limit = seg.size  # re-read: the active segment grows while we iterate
            file_pos = base + len(buf)
            if file_pos < limit:
                chunk = f.read(min(READ_CHUNK, limit - file_pos))
                if not chunk:
                    raise LogCorruptError(path, file_pos, idx, "segment is shorter than recorded")
                buf = buf[pos:] + chunk
                base += pos
                pos = 0
            elif pos == len(buf):
                return idx
            else:
                raise LogCorruptError(path, base + pos, idx, "record cut short at segment end")
            end = len(buf)
            mv = memoryview(buf)
            while pos + hsize <= end:
                field, ridx, pcrc, hcrc = unpack(buf, pos)
                if crc32(mv[pos : pos + 16]) != hcrc:
                    raise LogCorruptError(path, base + pos, idx, "record header checksum mismatch")
                if ridx != idx:
                    raise LogCorruptError(
                        path, base + pos, idx, f"record has index {ridx}, expected {idx}"
                    )
                stop = pos + hsize + (field & mask)
                if stop > end:
                    break
                payload = buf[pos + hsize : stop]
                if crc32(payload) != pcrc:
                    raise LogCorruptError(path, base + pos, idx, "payload checksum mismatch")
                if idx == note_at:
                    seg.note(idx, base + pos)
                    note_at += SPARSE_EVERY
                if idx >= start_idx:
                    yield idx, payload
                idx += 1
                pos = stop
            mv.release()


# -------------------------------------------------------------------------------- opening


def _check_directory(directory: Path, readonly: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise LogDirectoryError(f"event log path {directory} is not a directory")
    if readonly and not directory.exists():
        raise LogDirectoryError(f"event log directory {directory} does not exist")
    if not readonly:
        # Also when it exists: a start killed before its parent's fsync may have left it.
        try:
            make_dirs_durably(directory)
        except OSError as exc:
            raise LogDirectoryError(
                f"cannot create event log directory {directory} (or sync it to disk): {exc}"
            ) from exc
    need = os.R_OK | os.X_OK | (0 if readonly else os.W_OK)
    if not os.access(directory, need):
        what = "readable" if readonly else "readable and writable"
        raise LogDirectoryError(f"event log directory {directory} is not {what}")


def _lock(directory: Path) -> int:
    """Exclusive lock: two writers on one log would interleave records."""
    fd = try_lock(directory / _LOCK_NAME, 0o644)
    if fd is None:
        raise LogInUseError(
            f"event log {directory} is in use by another writer (lock {_LOCK_NAME} is held)"
        )
    return fd


def _list_segments(directory: Path, readonly: bool) -> list[_Segment]:
    """The segments in `directory`, sorted by first index.

    Read-only, a writer may roll segments while we list. One directory scan is not a
    snapshot: an entry created during it may be missed while a later one (created after it,
    in a part of the directory not read yet) is seen, and that gap would look like lost
    records. So a read-only open scans twice and keeps, from the second scan, only the
    segments up to the newest one the first scan saw: those all existed before the second
    scan started (segments are created in index order and never removed while a writer
    runs), so it saw every one of them, and each but the last was sealed by then (its size
    final). Segments only the second scan saw are left out: the log is read as it was a
    moment earlier. A writer holds the lock, so nothing rolls under it: one scan.
    """
    found = _scan_segments(directory)
    if readonly and found:
        newest_before = max(found)
        found = {k: v for k, v in _scan_segments(directory).items() if k <= newest_before}
    return [found[k] for k in sorted(found)]


def _scan_segments(directory: Path) -> dict[int, _Segment]:
    """One scan of `directory`: its segments by first index."""
    segments: dict[int, _Segment] = {}
    with os.scandir(directory) as entries:  # closed even when a bad entry raises
        for entry in entries:
            if not entry.name.endswith(".seg"):
                continue  # the lock file, editor leftovers: not ours to judge
            m = _SEG_NAME.match(entry.name)
            if m is None:
                raise LogDirectoryError(
                    f"{entry.path}: not a segment of this log (expected <20 digits>.seg files)"
                )
            if not entry.is_file():
                raise LogDirectoryError(f"{entry.path}: named like a segment but {_kind(entry)}")
            first = int(m.group(1))
            if first < 1:
                raise LogDirectoryError(f"{entry.path}: segment first index must be >= 1")
            segments[first] = _Segment(Path(entry.path), first, entry.stat().st_size)
    return segments


def _kind(entry: os.DirEntry[str]) -> str:
    """What a directory entry that is not a regular file is, for an error message."""
    if entry.is_symlink():
        try:
            target = os.readlink(entry.path)
        except OSError:
            target = "?"
        if not os.path.exists(entry.path):
            return f"a dangling symlink (to {target})"
        return f"a symlink to something that is not a regular file ({target})"
    if entry.is_dir(follow_symlinks=False):
        return "a directory, not a regular file"
    mode = entry.stat(follow_symlinks=False).st_mode
    if stat.S_ISFIFO(mode):
        return "a FIFO, not a regular file"
    if stat.S_ISSOCK(mode):
        return "a socket, not a regular file"
    return "not a regular file"


def _check_headers(segments: list[_Segment], readonly: bool) -> None:
    """Every segment must carry our magic, version and its own first index.

    An incomplete or all-zero header on the LAST segment is a crash while it was being
    created (nothing in it was ever acknowledged): removed. Read-only it may as well be a
    running writer creating it: ignored. Such a segment is marked with size -1 for the
    caller to drop.
    """
    for n, seg in enumerate(segments):
        with open(seg.path, "rb") as f:
            head = f.read(SEG_HEADER_SIZE)
        last = n == len(segments) - 1
        if (
            last
            and (len(head) < SEG_HEADER_SIZE or not any(head))
            and _torn_header(head, seg.first_idx)
            and not any(_read_rest(seg.path, len(head)))
        ):
            if readonly:
                # A running writer may be creating it right now: no crash to speak of.
                log.warning(
                    "event log: %s: incomplete segment header (being written, or left by a "
                    "crash): ignoring %d bytes",
                    seg.path,
                    seg.size,
                )
            else:
                log.warning(
                    "event log: %s: torn segment header (crash while creating it): "
                    "removing %d bytes",
                    seg.path,
                    seg.size,
                )
                seg.path.unlink()
                fsync_dir(seg.path.parent)
            seg.size = -1
            continue
        if len(head) < SEG_HEADER_SIZE:
            if not _header_damaged(head, seg.first_idx):
                raise LogDirectoryError(
                    f"{seg.path}: foreign file of {seg.size} bytes, not a segment of this log "
                    f"(it starts {head[:4]!r}, expected {SEGMENT_MAGIC!r})"
                )
            raise LogCorruptError(seg.path, 0, seg.first_idx, "segment header is cut short")
        magic, version, _flags, first, crc = _SEG_HEADER.unpack(head)
        if _crc32(head[:16]) != crc:
            # The CRC first: a flipped bit in the magic or version is damage to one of our
            # segments, not a foreign file or a newer format. A foreign file fails the CRC
            # too, but looks nothing like our header; damage leaves most of it in place.
            if _header_damaged(head, seg.first_idx):
                raise LogCorruptError(
                    seg.path, 0, seg.first_idx, "segment header checksum mismatch"
                )
            raise LogDirectoryError(
                f"{seg.path}: foreign file, not a segment of this log "
                f"(magic {magic!r}, expected {SEGMENT_MAGIC!r})"
            )
        if magic != SEGMENT_MAGIC:  # a foreign header that happens to pass our CRC
            raise LogDirectoryError(
                f"{seg.path}: foreign file, not a segment of this log "
                f"(magic {magic!r}, expected {SEGMENT_MAGIC!r})"
            )
        if version != FORMAT_VERSION:
            raise LogDirectoryError(
                f"{seg.path}: segment format version {version} is not supported "
                f"(this build reads version {FORMAT_VERSION})"
            )
        if first != seg.first_idx:
            raise LogCorruptError(
                seg.path, 0, seg.first_idx, f"segment header says first index {first}"
            )


#: A header whose CRC fails and that differs from the one this segment should have in at
#: most this many bytes is a damaged header of ours (a flipped bit, a bad byte or word);
#: more, and it is some other file. Zeroed bytes (a lost page) count as damage.
_HEADER_DAMAGE_BYTES: Final = 4


def _header_damaged(head: bytes, first_idx: int) -> bool:
    """Whether a segment header with a bad CRC, or cut short, is one of ours, damaged
    (else: foreign)."""
    ours = _segment_header(first_idx)[: len(head)]
    differ = sum(1 for a, b in zip(head, ours, strict=True) if a != b and a != 0)
    return differ <= _HEADER_DAMAGE_BYTES


def _torn_header(head: bytes, first_idx: int) -> bool:
    """Whether a short or blank header is what a crash while creating the segment leaves:
    zeros (the size was made durable, the data not) or the start of the very header it was
    writing. Anything else is some other file that only carries a segment's name: it is
    named as foreign, never removed as torn."""
    return not any(head) or _segment_header(first_idx).startswith(head)


def _read_rest(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()


def _recover_last(seg: _Segment, readonly: bool) -> LogAnchor | None:
    """Find the last segment's last good record, cut a torn tail (one WARNING), and raise
    `LogCorruptError` for a bad record that an acknowledged batch follows.

    Every record header is checked, and the payloads of the final batch (the only one a
    crash can tear); older payloads are checked when read, as in sealed segments. That keeps
    opening a long log at about a third of a second per 64 MiB segment.
    """
    with open(seg.path, "rb") as f:
        buf = f.read()
    size = len(buf)
    mv = memoryview(buf)
    pos = SEG_HEADER_SIZE
    idx = seg.first_idx
    batch_pos, batch_idx = pos, idx  # where the final batch (so far) starts
    note_at = seg.sparse_idx[-1] + SPARSE_EVERY
    why = ""
    unpack, crc32, hsize, mask, start_bit = (
        _unpack_rec,
        _crc32,
        REC_HEADER_SIZE,
        _LENGTH_MASK,
        _BATCH_START,
    )
    while pos < size:  # the hot loop of opening: locals only
        if pos + hsize > size:
            why = "partial record header"
            break
        field, ridx, _pcrc, hcrc = unpack(buf, pos)
        if crc32(mv[pos : pos + 16]) != hcrc:
            why = "record header checksum mismatch"
            break
        if ridx != idx:
            raise LogCorruptError(seg.path, pos, idx, f"record has index {ridx}, expected {idx}")
        stop = pos + hsize + (field & mask)
        if stop > size:
            why = "record cut mid-write"
            break
        if field & start_bit:
            batch_pos, batch_idx = pos, idx
        if idx == note_at:
            seg.note(idx, pos)
            note_at += SPARSE_EVERY
        idx += 1
        pos = stop
    # Payloads of the final batch, up to the first bad one.
    check, check_idx = batch_pos, batch_idx
    while check < pos:
        field, _ridx, pcrc, _hcrc = _unpack_rec(buf, check)
        stop = check + REC_HEADER_SIZE + (field & _LENGTH_MASK)
        if _crc32(mv[check + REC_HEADER_SIZE : stop]) != pcrc:
            pos, idx, why = check, check_idx, "payload checksum mismatch"
            break
        check, check_idx = stop, check_idx + 1
    mv.release()
    if pos < size:
        later = _later_batch_after(buf, pos, idx)
        if later is not None:
            raise LogCorruptError(
                seg.path, pos, idx, f"{why}, and a later batch (from index {later}) follows it"
            )
        dropped = size - pos
        if readonly:
            # A running writer may be in the middle of this very write: no crash to speak of.
            log.warning(
                "event log: incomplete tail in %s at offset %d (%s; being written, or left by "
                "a crash): ignoring %d bytes after index %d",
                seg.path,
                pos,
                why,
                dropped,
                idx - 1,
            )
        else:
            log.warning(
                "event log: torn tail in %s at offset %d (%s): dropped %d bytes after index %d",
                seg.path,
                pos,
                why,
                dropped,
                idx - 1,
            )
        if not readonly:
            fd = os.open(seg.path, os.O_WRONLY)
            try:
                os.ftruncate(fd, pos)
                _fdatasync(fd)
            finally:
                os.close(fd)
        # The sparse index may name records past the cut.
        while seg.sparse_idx[-1] >= idx and len(seg.sparse_idx) > 1:
            seg.sparse_idx.pop()
            seg.sparse_off.pop()
    seg.size = pos
    seg.last_idx = idx - 1
    return _anchor_in(buf, seg, idx - 1)


def _anchor_in(buf: bytes, seg: _Segment, idx: int) -> LogAnchor | None:
    """The anchor of record `idx` of `seg`, whose good bytes `buf` holds (the sparse index
    bounds the walk to SPARSE_EVERY headers), or None when the segment holds no records."""
    if idx < seg.first_idx:
        return None
    at, pos = seg.seek(idx)
    while at < idx:
        pos += REC_HEADER_SIZE + (_unpack_rec(buf, pos)[0] & _LENGTH_MASK)
        at += 1
    return LogAnchor(idx, pos, _unpack_rec(buf, pos)[2])


def _valid_at(buf: bytes, at: int) -> tuple[int, int, bool] | None:
    """(index, end offset, starts a batch) of a record with good CRCs at `at`, else None."""
    if at < 0 or at + REC_HEADER_SIZE > len(buf):
        return None
    field, ridx, pcrc, hcrc = _unpack_rec(buf, at)
    stop = at + REC_HEADER_SIZE + (field & _LENGTH_MASK)
    if (
        _crc32(buf[at : at + 16]) != hcrc
        or stop > len(buf)
        or _crc32(buf[at + REC_HEADER_SIZE : stop]) != pcrc
    ):
        return None
    return ridx, stop, bool(field & _BATCH_START)


def _later_batch_after(buf: bytes, bad_pos: int, expected: int) -> int | None:
    """Index of a valid batch-starting record after the bad one at `bad_pos`, if any.

    Batches are written one after another and each only after the one before was fsynced,
    so a later batch proves the damaged one was acknowledged: that is corruption. Good
    records of the SAME batch after a bad one are a torn write (pages of an unsynced write
    reach the disk in any order) and are dropped with it. Good records are found wherever
    they are after the damage (`_next_good_record`), then walked in order.
    """
    pos = bad_pos + 1
    while True:
        found = _next_good_record(buf, pos, expected)
        if found is None:
            return None
        _at, ridx, stop, starts = found
        while True:  # walk the chain of good records from there
            if starts:
                return ridx
            rec = _valid_at(buf, stop)
            if rec is None or rec[0] != ridx + 1:
                break
            ridx, stop, starts = rec
        pos = stop


def _next_good_record(buf: bytes, pos: int, lowest: int) -> tuple[int, int, int, bool] | None:
    """The first record at or after offset `pos` with good checksums and an index of at
    least `lowest`: (offset, index, end offset, starts a batch), or None.

    The damage may hide any number of records (a bad 4 KiB page holds dozens), so the
    indices to look for are all those the rest of the file could hold. They are found by
    the upper six bytes of their little-endian index field, one pattern per 65,536
    indices, with C-speed searches; each hit is then checked by its checksums. Only
    recovery from damage runs this.
    """
    highest = lowest + (len(buf) - pos) // REC_HEADER_SIZE
    patterns = {
        struct.pack("<Q", block << 16)[2:] for block in range(lowest >> 16, (highest >> 16) + 1)
    }
    best: tuple[int, int, int, bool] | None = None
    for pattern in patterns:
        at = buf.find(pattern, pos + 6)
        while at != -1 and (best is None or at - 6 < best[0]):
            rec = _valid_at(buf, at - 6)  # the index field starts 4 bytes into the header
            if rec is not None and lowest <= rec[0] <= highest:
                best = (at - 6, rec[0], rec[1], rec[2])
                break
            at = buf.find(pattern, at + 1)
    return best


# -------------------------------------------------------------------------------- syscalls


def _name_file(exc: OSError, path: Path) -> None:
    """Name the file a write or fsync on a descriptor failed on (the kernel's error does
    not), so whoever reports it can say where."""
    if exc.filename is None:
        exc.filename = str(path)


def _fdatasync(fd: int) -> None:
    # fdatasync also flushes the file size, which is all an append changes in the metadata.
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:  # pragma: no cover - macOS
        os.fsync(fd)
