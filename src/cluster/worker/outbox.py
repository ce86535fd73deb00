"""The worker's durable outbox: events it emitted that the master has not yet acknowledged.

Layout in its directory:

- ``events.log``: append-only records ``[len u32][seq u64][crc32 u32][payload]`` where the
  payload is the msgpack-encoded Event and the CRC covers seq and payload. Each record is one
  `os.write` on an O_APPEND descriptor, so it is in the kernel once `append` returns and
  survives ``kill -9`` of the worker. `sync()` (fsync) is called by the sender before each
  batch leaves, so anything the master may acknowledge has also reached the disk.
- ``acked``: the ack watermark ``[seq u64][crc32 u32]``, replaced atomically (write,
  rename). Records with seq <= watermark are done. It is rewritten at most every
  ACK_WRITE_EVERY seqs (acks arrive with every frame, and each rewrite costs four system
  calls), and always before records are dropped from ``events.log`` and on close. A watermark
  that lags after a crash only means records the master already holds are offered again:
  the hello's last_seq clears them (`skip_to`) and the master drops them as duplicates.
- ``refused.jsonl``: events the master refused (`set_aside`), one JSON object per line with
  the seq, the event, and the master's code and reason: kept for the operator, never resent.
- ``conflicts.jsonl``: the records of a seq that damage left two different events under
  (see below), the same way: kept for the operator, never resent.
- ``unanchored``: present from the creation of a new outbox until the master's first
  welcome. A new outbox numbers its events from 1, but the master may already hold events
  of this node under those seqs (the node kept its key and lost its outbox: wiped, restored
  from a backup without it): `skip_to` would take the events the worker emitted before the
  first welcome -- a self-test result, runner states, work -- for ones the master holds and
  drop them. Unanchored, it renumbers them above the master's count instead (nothing has
  been sent before the first welcome, so nothing under the old seqs can be at the master).

On open every record is checked (length, checksum) by one loop with the checks inlined
(`_intact_run`: no Python call per record; a 32 MiB log of 250,000 records opens in about
0.27 s where a call per record took 0.44 s, medians on a slow 2-core machine;
`bench/outbox_damage_bench.py`).
A torn or corrupt tail (a record cut by a crash) is truncated with a WARNING.
Damage in the middle (a bad checksum with intact records after it) loses only the damaged
bytes: the scan resumes at the next intact record (`_next_record`: the first offset that
holds one, found without a check per byte), the file as found is kept beside the log
(``events.log.damaged``, synced) with an ERROR, and the log is rewritten with the records kept.
Damage can also bring intact records out of order (a page written again elsewhere, an older
block showing through): a record whose seq does not exceed the one before it is damage too,
with an ERROR naming its offset and both seqs. Copies of one event are kept once and the log
is rewritten in seq order, so a master that drops every seq at or below its last one loses
none of them. Two different records under one seq cannot both be ours, and the master may
hold either: neither is resent, both go to ``conflicts.jsonl`` (seq, offset, event) with an
ERROR.
Sequence numbers never go backwards: the next seq is above both the watermark and every
record on disk, so the master's (origin, seq) duplicate check stays correct across restarts.

A write the disk refuses (full, read-only, an I/O error) raises `OutboxWriteError`, naming
the file and the OS error, and breaks the outbox for this process: every later call that
would write raises it again, as the master's event log refuses appends after a failed write
(what the page cache holds after a failed write or fsync is unknown). A record is one
`os.write`, but a file system with room for only part of it writes that part and reports no
error: `append` writes the rest (`write_all`), and if that fails cuts the file back to its
size before the record, so no seq is ever returned for a record not wholly written, and no
record follows a torn one. What the outbox held before the failure is intact on disk; the
worker stops on it (fail-stop, `Worker`), and its next start sends what is unacknowledged.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import operator
import os
import re
import struct
import zlib
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import msgspec

from cluster.shared.codec import strict_decode
from cluster.shared.events import MAX_EVENT_BYTES, Event
from cluster.shared.files import (
    fsync_dir,
    make_dirs_durably,
    try_lock,
    write_all,
    write_bytes_durably,
)

log = logging.getLogger(__name__)

_REC: Final = struct.Struct(">IQI")
_pack_rec = _REC.pack
_pack_seq = struct.Struct(">Q").pack
_crc32 = zlib.crc32
_seq_of = operator.itemgetter(0)
_ACK: Final = struct.Struct(">QI")
#: Rewrite the log without acknowledged records once they take this much of it -- and at
#: least half of it, so that a long backlog is not copied again on every ack.
COMPACT_BYTES: Final = 4 << 20
#: The ack watermark on disk lags the one in memory by fewer seqs than this.
ACK_WRITE_EVERY: Final = 4096

_encoder = msgspec.msgpack.Encoder()
_event_decoder = msgspec.msgpack.Decoder(Event)
#: What to do about a damaged watermark, said with the error (it stops the worker starting).
_ACK_RECOVERY: Final = (
    "; to recover, remove that file: every record in events.log is then offered to the master "
    "again, which keeps what it already holds once"
)


class OutboxError(Exception):
    pass


class OutboxWriteError(OutboxError):
    """The disk refused a write to the outbox (full, read-only, an I/O error): `path` is the
    file, `strerror` the OS error. The outbox takes no more writes in this process; what it
    held before is intact on disk, for the next start."""

    def __init__(self, path: Path | str, strerror: str) -> None:
        super().__init__(f"{path}: {strerror}")
        self.path = str(path)
        self.strerror = strerror


def _crc(seq: int, payload: bytes) -> int:
    return _crc32(payload, _crc32(_pack_seq(seq)))


def _record_end(data: bytes, off: int) -> int | None:
    """The end of the intact record at `off`, or None (cut short, too long, bad checksum)."""
    if off + _REC.size > len(data):
        return None
    length, seq, crc = _REC.unpack_from(data, off)
    end = off + _REC.size + length
    if length > MAX_EVENT_BYTES or end > len(data):
        return None
    return end if _crc(seq, data[off + _REC.size : end]) == crc else None


# Where an intact record can start: its length field, big-endian and at most MAX_EVENT_BYTES
# (below 2**24), opens with a zero byte and then one of at most MAX_EVENT_BYTES >> 16.
assert MAX_EVENT_BYTES < 1 << 24
_MAYBE_RECORD: Final = re.compile(b"\\x00[\\x00-\\x%02x]" % (MAX_EVENT_BYTES >> 16,))
_ZEROS: Final = re.compile(b"\\x00*")
#: A header of zeros (length 0, seq 0, CRC 0) is never intact: the CRC of seq 0 is not 0.
_ZERO_HEADER: Final = bytes(_REC.size)


def _next_record(data: bytes, start: int) -> int | None:
    """The offset of the first intact record at or after `start`: the first offset where
    `_record_end` finds one, as a scan byte by byte would, but only offsets that can hold one
    are checked (found by C-speed searches): where the length field fits, and not inside a
    run of zeros (the blocks a crash left unwritten). Only damage brings the outbox here."""
    last = len(data) - _REC.size
    search = _MAYBE_RECORD.search
    found = search(data, start)
    while found is not None and (off := found.start()) <= last:
        if data[off : off + _REC.size] == _ZERO_HEADER:
            # So does every later offset up to 16 bytes before the run's end.
            after = _ZEROS.match(data, off)
            assert after is not None  # matches the empty string at worst
            found = search(data, after.end() - _REC.size + 1)
            continue
        if _record_end(data, off) is not None:
            return off
        found = search(data, off + 1)
    return None


def _out_of_order(records: list[tuple[int, int, bytes]]) -> list[tuple[int, int, int]]:
    """(offset, seq, seq of the record before) of each intact record whose seq does not
    exceed the one before it in the file: only damage brings records out of order."""
    return [
        (at, seq, prev) for (_, prev, _), (at, seq, _) in itertools.pairwise(records) if seq <= prev
    ]


def _pending_in_order(
    records: list[tuple[int, int, bytes]], acked: int
) -> tuple[list[tuple[int, bytes]], list[tuple[int, list[tuple[int, bytes]]]]]:
    """The unacknowledged records of a log out of order: (seq, payload) in seq order, each
    seq once, and the seqs that different payloads claim with their (offset, payload)s.

    A seq is given once and never again, so two intact records with one seq and one payload
    are copies of one event: it is kept once. Different payloads under one seq cannot both
    be this worker's event, and which one is cannot be told: the master may already hold
    either under that seq, so neither may be resent as it (nor under a new seq: that could
    log the same event twice)."""
    by_seq: dict[int, list[tuple[int, bytes]]] = {}
    for at, seq, payload in records:
        if seq > acked:
            by_seq.setdefault(seq, []).append((at, payload))
    kept: list[tuple[int, bytes]] = []
    conflicts: list[tuple[int, list[tuple[int, bytes]]]] = []
    for seq in sorted(by_seq):
        copies = by_seq[seq]
        if all(payload == copies[0][1] for _, payload in copies):
            kept.append((seq, copies[0][1]))
        else:
            conflicts.append((seq, copies))
    return kept, conflicts


def _shown(payload: bytes) -> object:
    """A record's event as JSON shows it to an operator: the Event, or its bytes in hex if
    they no longer decode."""
    try:
        return strict_decode(_event_decoder.decode, payload)
    except msgspec.DecodeError:
        return {"undecodable_msgpack_hex": payload.hex()}


def _append_synced(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _intact_run(data: bytes, start: int) -> tuple[list[int], list[tuple[int, bytes]], int]:
    """The intact records back to back from `start`: their offsets and (seq, payload)s, and
    the end of the run (the first offset from `start` that holds no intact record).

    The same records as `_record_end` called record by record, with the checks inlined: a
    record costs one header read, one payload copy, two C checksum calls and no Python call
    of its own (an outbox of 32 MiB holds some 250,000 records), and its (seq, payload) is
    made once, as the outbox keeps it. An undamaged log is one run."""
    size = len(data)
    header = _REC.size
    last = size - header
    unpack = _REC.unpack_from
    pack_seq = _pack_seq
    crc32 = _crc32
    offsets: list[int] = []
    records: list[tuple[int, bytes]] = []
    keep_offset, keep_record = offsets.append, records.append
    off = start
    while off <= last:
        length, seq, crc = unpack(data, off)
        begin = off + header
        end = begin + length
        if length > MAX_EVENT_BYTES or end > size:
            break
        payload = data[begin:end]
        if crc32(payload, crc32(pack_seq(seq))) != crc:
            break
        keep_offset(off)
        keep_record((seq, payload))
        off = end
    return offsets, records, off


def _scan(data: bytes) -> tuple[list[int], list[tuple[int, bytes]], list[tuple[int, int]], int]:
    """Every intact record of a log in file order: offsets and (seq, payload)s; the damaged
    regions that have intact records after them, as (offset, bytes); and the end of the last
    intact record (what follows it is a torn tail). The same answer as checking record by
    record (`_record_end`) and searching after each damage (`_next_record`)."""
    good_end = 0
    damaged: list[tuple[int, int]] = []
    offsets: list[int] = []
    records: list[tuple[int, bytes]] = []
    off = 0
    while True:
        run_offsets, run_records, off = _intact_run(data, off)
        if run_records:
            offsets += run_offsets
            records += run_records
            good_end = off
        if off + _REC.size > len(data):
            break
        # No intact record at `off`. A torn tail (a crash mid-write) ends the file; damage in
        # the middle has intact records after it: find the next one rather than drop them all.
        resume = _next_record(data, off + 1)
        if resume is None:
            break
        damaged.append((off, resume - off))
        off = resume
    return offsets, records, damaged, good_end


class Outbox:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._log_path = directory / "events.log"
        self._ack_path = directory / "acked"
        self._refused_path = directory / "refused.jsonl"
        self._conflicts_path = directory / "conflicts.jsonl"
        self._pending: deque[tuple[int, bytes]] = deque()
        self._acked = 0
        #: The watermark as ``acked`` holds it (may lag `_acked`, see the module docstring).
        self._acked_on_disk = 0
        self._last_seq = 0
        self._fd = -1
        self._lock_fd = -1
        self._size = 0
        #: Bytes of `events.log` that unacknowledged records take (the rest is garbage).
        self._pending_size = 0
        self._dirty = False
        self._unanchored_path = directory / "unanchored"
        #: Whether the seqs are known to continue the master's count (see the module doc).
        self._anchored = True
        #: Set by the first write the disk refused (`_refused`): no write is tried after it.
        self._broken: OutboxWriteError | None = None

    # ---------------------------------------------------------------- open / recovery
    @classmethod
    def open(cls, directory: Path) -> Outbox:
        try:
            make_dirs_durably(directory)
        except OSError as exc:
            raise OutboxError(f"cannot create outbox {directory}: {exc.strerror}") from exc
        box = cls(directory)
        box._lock_fd = _lock(directory)
        try:
            if not box._log_path.exists() and not box._ack_path.exists():
                # A new outbox: its numbering is anchored by the master's first welcome. The
                # marker is on disk before any record, so a restart before that welcome
                # still knows. (An outbox from before the marker existed counts as anchored.)
                write_bytes_durably(box._unanchored_path, b"")
            box._anchored = not box._unanchored_path.exists()
            box._acked = box._acked_on_disk = box._read_ack()
            box._last_seq = box._acked
            box._load_log()
            # Read-write: compaction copies the unacknowledged tail from it (`_compact`).
            box._fd = os.open(box._log_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            os.close(box._lock_fd)
            # One line naming the file (`cluster worker` prints it and exits 2), not a
            # traceback: a start onto a full or read-only disk.
            where = f"{exc.filename}: " if exc.filename is not None else ""
            raise OutboxError(
                f"cannot open outbox {directory}: {where}{exc.strerror or exc}"
            ) from exc
        except BaseException:
            os.close(box._lock_fd)
            raise
        return box

    def _read_ack(self) -> int:
        return read_acked(self.directory)

    def _load_log(self) -> None:
        try:
            data = self._log_path.read_bytes()
        except FileNotFoundError:
            return
        offsets, records, damaged, good_end = _scan(data)
        seqs = list(map(_seq_of, records))
        if seqs:
            self._last_seq = max(self._last_seq, max(seqs))
        conflicts: list[tuple[int, list[tuple[int, bytes]]]] = []
        disorder: list[tuple[int, int, int]] = []
        if all(map(operator.lt, seqs, itertools.islice(seqs, 1, None))):
            # In order, as an undamaged log always is: the records after the watermark are
            # the outbox, as they are.
            pending = records[bisect.bisect_right(seqs, self._acked) :]
        else:
            placed = [
                (at, seq, payload) for at, (seq, payload) in zip(offsets, records, strict=True)
            ]
            disorder = _out_of_order(placed)
            pending, conflicts = _pending_in_order(placed, self._acked)
        self._pending.extend(pending)
        self._pending_size = sum(len(payload) for _, payload in pending) + _REC.size * len(pending)
        if damaged or disorder:
            aside = self._log_path.with_name(self._log_path.name + ".damaged")
            # Durably, before the log is rewritten: the events dropped from it live on here.
            write_bytes_durably(aside, data)
        if damaged:
            log.error(
                "outbox %s: %d damaged region(s) skipped (offset:bytes %s); the records after "
                "them are kept, the events in them are lost; the file as found is in %s",
                self._log_path,
                len(damaged),
                ", ".join(f"{at}:{size}" for at, size in damaged),
                aside,
            )
        if disorder:
            shown = ", ".join(
                f"offset {at}: seq {seq} after seq {prev}" for at, seq, prev in disorder[:10]
            )
            log.error(
                "outbox %s: %d intact record(s) out of sequence order (%s%s): damage repeated "
                "or moved them; each event is kept once and resent in seq order; the file as "
                "found is in %s",
                self._log_path,
                len(disorder),
                shown,
                f", and {len(disorder) - 10} more" if len(disorder) > 10 else "",
                aside,
            )
        if conflicts:
            self._set_conflicts_aside(conflicts)
        if good_end < len(data):
            log.warning(
                "outbox %s: dropped a torn tail of %d bytes at offset %d",
                self._log_path,
                len(data) - good_end,
                good_end,
            )
        if damaged or disorder:
            self._rewrite_pending()
            return
        if good_end < len(data):
            with open(self._log_path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
        self._size = good_end

    def _set_conflicts_aside(self, conflicts: list[tuple[int, list[tuple[int, bytes]]]]) -> None:
        """Append the records of seqs that two different intact records claim to
        ``conflicts.jsonl`` (synced), with an ERROR: neither is resent."""
        lines = []
        for seq, copies in conflicts:
            log.error(
                "outbox %s: seq %d is held by %d different records (offsets %s): none of them "
                "is resent (the master may hold either one under that seq); they are kept in %s",
                self._log_path,
                seq,
                len(copies),
                ", ".join(str(at) for at, _ in copies),
                self._conflicts_path,
            )
            for at, payload in copies:
                entry = {"seq": seq, "offset": at, "event": _shown(payload)}
                lines.append(msgspec.json.encode(entry) + b"\n")
        _append_synced(self._conflicts_path, b"".join(lines))

    def _pending_records(self) -> bytes:
        """The unacknowledged records as the log holds them, rebuilt from memory."""
        return b"".join(_pack_rec(len(p), s, _crc(s, p)) + p for s, p in self._pending)

    def _rewrite_pending(self) -> None:
        """Replace the log with exactly the unacknowledged records in memory (atomically)."""
        self._replace_log(self._pending_records())

    def _replace_log(self, data: bytes) -> None:
        """Replace the log with `data` (atomically); an open descriptor follows the new file
        (the old one names the file the rename replaced)."""
        write_bytes_durably(self._log_path, data)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = os.open(self._log_path, os.O_RDWR | os.O_APPEND, 0o600)
        self._size = self._pending_size = len(data)

    # ---------------------------------------------------------------- use
    @property
    def acked(self) -> int:
        return self._acked

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def __len__(self) -> int:
        return len(self._pending)

    def append(self, event: Event) -> int:
        """Give the event the next seq and record it; returns the seq."""
        if self._fd < 0 or self._broken is not None:
            self._check_writable()
        # Every emitted event passes here (a write(2) each): locals and C calls only.
        payload = _encoder.encode(event)
        n = len(payload)
        if n > MAX_EVENT_BYTES:
            raise OutboxError(f"event of {n} bytes exceeds {MAX_EVENT_BYTES}")
        seq = self._last_seq + 1
        record = _pack_rec(n, seq, _crc32(payload, _crc32(_pack_seq(seq)))) + payload
        try:
            written = os.write(self._fd, record)
            if written != len(record):  # room for part of it only: the rest, or an error
                write_all(self._fd, memoryview(record)[written:])
        except OSError as exc:
            # Never a torn record with more after it (the next start would find damage in
            # the middle, and lose what it held): cut back to where the record began.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise self._refused(exc, self._log_path) from None
        self._last_seq = seq
        n += _REC.size
        self._size += n
        self._pending_size += n
        self._dirty = True
        self._pending.append((seq, payload))
        return seq

    def pending_after(self, seq: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to `limit` unacknowledged records with seq > `seq`, in order."""
        pending = self._pending
        # Seqs in the outbox are consecutive: find the start by arithmetic, not by a scan
        # over everything already sent (the window can hold many thousands).
        k = seq + 1 - pending[0][0] if pending else -1
        if 0 <= k < len(pending) and pending[k][0] == seq + 1:
            return list(itertools.islice(pending, k, k + limit))
        out: list[tuple[int, bytes]] = []
        for item in self._pending:
            if item[0] > seq:
                out.append(item)
                if len(out) >= limit:
                    break
        return out

    def sync(self) -> None:
        """fsync the log (cheap when nothing was appended since the last call)."""
        if self._dirty:
            self._check_writable()
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise self._refused(exc, self._log_path) from None
            self._dirty = False

    @property
    def broken(self) -> OutboxWriteError | None:
        """The write the disk refused, if one was (the outbox then takes no more)."""
        return self._broken

    def _check_writable(self) -> None:
        if self._fd < 0:
            raise OutboxError(f"outbox {self.directory} is closed")
        if self._broken is not None:
            raise OutboxWriteError(self._broken.path, self._broken.strerror)

    def _refused(self, exc: OSError, path: Path) -> OutboxWriteError:
        """The disk refused a write: break the outbox (the first error is kept) and return
        the error to raise, naming the file (the kernel's error on a descriptor does not)."""
        error = OutboxWriteError(
            exc.filename if exc.filename is not None else path, exc.strerror or str(exc)
        )
        if self._broken is None:
            self._broken = error
        return error

    def ack(self, seq: int) -> None:
        """Everything up to `seq` is durable at the master: forget it (persistently)."""
        if seq <= self._acked:
            return
        with self._writing(self._ack_path):
            self._ack(seq)

    def _ack(self, seq: int) -> None:
        if not self._anchored:  # the master acknowledged our seqs: they are its count
            self._drop_marker()
        seq = min(seq, self._last_seq)
        self._acked = seq
        pending = self._pending
        while pending and pending[0][0] <= seq:
            self._pending_size -= _REC.size + len(pending.popleft()[1])
        if not pending:
            # Before the records go -- and when `skip_to` raised the seq past every record:
            # the watermark is then all that keeps seqs from going back after a restart.
            self._persist_ack()
            if self._size:
                os.ftruncate(self._fd, 0)
                self._size = 0
        elif self._size - self._pending_size > max(COMPACT_BYTES, self._pending_size):
            self._persist_ack()
            self._compact()
        elif seq - self._acked_on_disk >= ACK_WRITE_EVERY:
            self._persist_ack()

    def set_aside(self, seq: int, code: str, reason: str) -> Event | None:
        """The master refused the event with `seq`, the oldest unacknowledged one: append it
        to ``refused.jsonl`` (synced) and drop it from the outbox, so that the events after
        it can go. Returns the event (None if its payload no longer decodes)."""
        pending = self._pending
        if not pending or pending[0][0] != seq:
            raise OutboxError(f"seq {seq} is not the oldest unacknowledged event")
        payload = pending[0][1]
        shown = _shown(payload)
        event = shown if isinstance(shown, Event) else None
        line = msgspec.json.encode({"seq": seq, "code": code, "reason": reason, "event": shown})
        with self._writing(self._refused_path):
            _append_synced(self._refused_path, line + b"\n")
        self.ack(seq)
        with self._writing(self._ack_path):
            self._persist_ack()  # at once: after a crash it must not be offered (refused) again
        return event

    @property
    def refused_path(self) -> Path:
        return self._refused_path

    def skip_to(self, last_seq_at_master: int) -> None:
        """The master already holds our events up to this seq (our ack was lost in a crash,
        or our outbox was wiped): treat them as acknowledged and never reuse those seqs.

        Called with each welcome, before anything is sent. The first one anchors a new
        outbox: records it numbered at or below the master's seq were never sent (nothing
        is sent before a welcome) and are renumbered above it, not dropped."""
        if not self._anchored:
            with self._writing(self._log_path):
                self._anchor(last_seq_at_master)
        if last_seq_at_master > self._last_seq:
            self._last_seq = last_seq_at_master
        self.ack(last_seq_at_master)

    def _anchor(self, last_seq_at_master: int) -> None:
        pending = self._pending
        if pending and pending[0][0] <= last_seq_at_master:
            log.warning(
                "outbox %s is new, but the master already holds %d event(s) of this node: "
                "its outbox was removed while its key was kept; the %d event(s) emitted "
                "since the start are renumbered from seq %d, not dropped",
                self.directory,
                last_seq_at_master,
                len(pending),
                last_seq_at_master + 1,
            )
            renumbered = [
                (last_seq_at_master + k, payload) for k, (_, payload) in enumerate(pending, start=1)
            ]
            pending.clear()
            pending.extend(renumbered)
            self._last_seq = renumbered[-1][0]
            # Durably before the marker goes: a crash in between renumbers nothing again
            # (the records are already above the master's seq at the next welcome).
            self._rewrite_pending()
            self._dirty = False
        self._drop_marker()

    def _drop_marker(self) -> None:
        self._unanchored_path.unlink(missing_ok=True)
        fsync_dir(self.directory)
        self._anchored = True

    def _persist_ack(self) -> None:
        if self._acked != self._acked_on_disk:
            self._write_ack(self._acked)
            self._acked_on_disk = self._acked

    def _write_ack(self, seq: int) -> None:
        head = seq.to_bytes(8, "big")
        # Synced before the rename: after a power loss the watermark is the old one or the
        # new one, never an empty file that stops the worker from starting.
        write_bytes_durably(self._ack_path, _ACK.pack(seq, zlib.crc32(head)))

    def _compact(self) -> None:
        # The unacknowledged records are the file's last `_pending_size` bytes (records are
        # appended in seq order and acknowledged as a prefix): copied as they are.
        data = os.pread(self._fd, self._pending_size, self._size - self._pending_size)
        first = self._pending[0][0] if self._pending else 0
        if len(data) != self._pending_size or (data and _REC.unpack_from(data)[1] != first):
            # Not where the bookkeeping says (never seen): rebuild from memory instead.
            data = self._pending_records()
        self._replace_log(data)

    @contextlib.contextmanager
    def _writing(self, path: Path) -> Iterator[None]:
        """Around writes other than `append` and `sync`: refused if the outbox is broken, and
        an OSError of the disk becomes `OutboxWriteError` (naming `path` if the kernel's
        error names no file) and breaks it."""
        self._check_writable()
        try:
            yield
        except OSError as exc:
            raise self._refused(exc, path) from None

    def close(self) -> None:
        """Record the watermark and fsync the log, then close. Never raises for the disk: a
        stop must end, and what failed costs nothing (a watermark that lags only means
        records the master holds are offered again; records not synced were never sent)."""
        if self._fd >= 0:
            try:
                if self._broken is None:
                    with self._writing(self._ack_path):
                        self._persist_ack()
                    self.sync()
            except OutboxWriteError as exc:
                log.warning("outbox %s: could not close cleanly: %s", self.directory, exc)
            finally:
                os.close(self._fd)
                self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1


def _lock(directory: Path) -> int:
    """Hold an exclusive flock on ``directory/LOCK`` (released when the fd is closed, also by
    a crash). One worker per data directory: a second one would resend the same seqs and,
    at start, take the first one's live runners for a dead worker's leftovers."""
    fd = try_lock(directory / "LOCK")
    if fd is None:
        raise OutboxError(
            f"{directory} is in use by another worker process (one worker per data directory)"
        )
    return fd


def read_acked(directory: Path) -> int:
    """The ack watermark of the outbox in `directory`, read without opening the outbox (its
    lock belongs to the running worker): for tools and tests looking at a live worker."""
    path = directory / "acked"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    if len(data) != _ACK.size:
        raise OutboxError(f"{path}: {len(data)} bytes, expected {_ACK.size}{_ACK_RECOVERY}")
    seq, crc = _ACK.unpack(data)
    if zlib.crc32(data[:8]) != crc:
        raise OutboxError(f"{path}: checksum mismatch (corrupt ack watermark){_ACK_RECOVERY}")
    return int(seq)
