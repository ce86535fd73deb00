"""State snapshots on disk, so loading a long log does not refold it from index 1.

A snapshot is the state's canonical bytes (`codec.encode_state`) as of log index `idx`, in a
file ``<idx:020d>.snap``:

    magic "CSNP" | version u16 | flags u16 | idx u64 | length u64 | [anchor] | crc32 u32 | payload

where the CRC covers the header fields before it and the payload. With flags bit 0 set, the
anchor ties the snapshot to the log it was taken of: the byte offset (u64) of the log record
at `idx` in its segment and that record's payload CRC (u32) -- see `eventlog.LogAnchor`. A
loader checks it against the log (`EventLog.holds`): a snapshot copied from another
cluster's directory describes another history and is not used. A snapshot without one
(written before anchors, or of a state received from the master) is unchecked.

`save` is atomic (write a temporary file, fsync, rename, fsync the directory): a crash leaves
the old snapshot or the new one, never half of one. A snapshot is only an optimisation -- the
log is the truth -- so a damaged one is skipped with a WARNING and the next older one (or a
refold from zero) is used. Building a `SnapshotStore` touches nothing: a directory that
cannot be used (a file in its place, no permission) is an `OSError` from the call that uses
it, which its caller turns into a WARNING.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Final, NamedTuple

from cluster.shared.eventlog import LogAnchor
from cluster.shared.files import fsync_dir, make_dirs_durably, write_bytes_durably

log = logging.getLogger(__name__)

SNAPSHOT_MAGIC: Final = b"CSNP"
#: 2: node marks moved from NodeRecord to State.last_event_by_node.
#: 3: NodeRecord.hello_idx (every NodeConnected sets it; older snapshots lack it).
#: 4: node marks by slot (NodeRecord.slot, State.last_event_by_node as NodeMarks).
#: 5: NodeRecord.marks_mid/marks_leaf/marks_offset (the marks address, derived from slot).
#: 6: a repeated identical RunnerStatusUpdated no longer moves RunnerRecord.updated_ms
#:    (an older snapshot may hold a later time than this build's fold of the same log).
#: 7: node gauges (CPU %, free memory and disk, network counters) moved from each
#:    NodeRecord's info to State.node_gauges.
#: 8: NodeRecord.boot_id (every NodeConnected sets it; older snapshots lack it),
#:    EpochLedger.held_devshards (without it, the work of every devshard placed before the
#:    snapshot would be refused) and DevshardRecord.assigned_ms.
#: 9: State.last_nodes_by_session holds the node of each slot (`DevshardRecord.holders`),
#:    not the sorted set of nodes, and a node's cancelled windows are dropped before its
#:    completed ones: an older snapshot's state would differ from a refold's. Also
#:    NodeRecord.runner_digest (every NodeConnected sets it; a hello under another runner
#:    setting drops the node's self-test, a test of another setting is not recorded).
#: 10: NodeLedger.late_decided_reward (late work a LateWorkSettled forfeited is not paid
#:    by a later one; an older snapshot lacks what was decided).
#: 11: SessionRecord.unplaced_ms (every SessionUnplaced sets it: the planner restates a
#:    reason whose counts alone moved only a minute after it; older snapshots lack it).
#: 12: State.removed_nodes (NodeRemoved's tombstones, which keep the slots of removed nodes:
#:    an older build would hand their slots to joining nodes).
#: 13: NodeRecord.stopping_idx/stopping_reason (a worker's NodeStopping sets them). They
#:    are written only when set, so a state without them encodes exactly as in 12 (same
#:    digest); the version moves with the layout all the same, so that a build that
#:    cannot read them refuses such a snapshot by its version.
SNAPSHOT_VERSION: Final = 13
_HEADER = struct.Struct("<4sHHQQ")  # magic, version, flags, idx, payload length
_ANCHOR = struct.Struct("<QI")  # the log record at idx: its offset in its segment, payload CRC
_CRC = struct.Struct("<I")
#: The header of a snapshot without an anchor (one with an anchor is `_ANCHOR.size` longer).
HEADER_SIZE: Final = _HEADER.size + _CRC.size
#: flags bit: an anchor follows the fixed header.
FLAG_ANCHOR: Final = 1
#: Snapshots kept after a save: the newest few, so one damaged file costs little.
KEEP: Final = 3
_NAME = re.compile(r"^(\d{20})\.snap$")


def snapshot_name(idx: int) -> str:
    return f"{idx:020d}.snap"


class Snapshot(NamedTuple):
    idx: int
    payload: bytes
    #: The log record the snapshot was taken after, when it was written with one.
    anchor: LogAnchor | None


def encode_snapshot(idx: int, data: bytes, anchor: LogAnchor | None = None) -> bytes:
    if anchor is not None and anchor.idx != idx:
        raise ValueError(f"the anchor names log index {anchor.idx}, the snapshot is at {idx}")
    flags = 0 if anchor is None else FLAG_ANCHOR
    head = _HEADER.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, flags, idx, len(data))
    if anchor is not None:
        head += _ANCHOR.pack(anchor.offset, anchor.crc)
    crc = zlib.crc32(data, zlib.crc32(head))
    return head + _CRC.pack(crc) + data


def decode_snapshot(blob: bytes) -> tuple[int, bytes]:
    """(idx, payload) of a snapshot file's bytes; `ValueError` naming what is wrong."""
    idx, payload, _anchor = decode_snapshot_anchored(blob)
    return idx, payload


def decode_snapshot_anchored(blob: bytes) -> Snapshot:
    """A snapshot file's bytes as a `Snapshot`; `ValueError` naming what is wrong."""
    if len(blob) < HEADER_SIZE:
        raise ValueError(f"file of {len(blob)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, flags, idx, length = _HEADER.unpack_from(blob)
    if magic != SNAPSHOT_MAGIC:
        raise ValueError(f"magic {magic!r}, expected {SNAPSHOT_MAGIC!r}")
    if version != SNAPSHOT_VERSION:
        raise ValueError(f"format version {version}, this build reads {SNAPSHOT_VERSION}")
    if flags & ~FLAG_ANCHOR:
        raise ValueError(f"unknown flags {flags:#x}")
    head_size = _HEADER.size + (_ANCHOR.size if flags & FLAG_ANCHOR else 0)
    if len(blob) != head_size + _CRC.size + length:
        raise ValueError(
            f"header says {length} payload bytes, file has {len(blob) - head_size - _CRC.size}"
        )
    (crc,) = _CRC.unpack_from(blob, head_size)
    payload = blob[head_size + _CRC.size :]
    if zlib.crc32(payload, zlib.crc32(blob[:head_size])) != crc:
        raise ValueError("checksum mismatch")
    anchor = None
    if flags & FLAG_ANCHOR:
        offset, record_crc = _ANCHOR.unpack_from(blob, _HEADER.size)
        anchor = LogAnchor(idx, offset, record_crc)
    return Snapshot(idx, payload, anchor)


class SnapshotStore:
    """A directory of snapshots; see the module docstring."""

    def __init__(self, directory: Path, *, keep: int = KEEP) -> None:
        directory = Path(directory)
        if keep < 1:
            raise ValueError(f"keep={keep}: at least one snapshot must be kept")
        self._dir = directory
        self._keep = keep
        #: The last snapshot `latest` read, (idx, payload): every catching-up replica is sent
        #: the newest one, and re-reading a 10,000-node snapshot (~6 MB) per stream held one
        #: copy per stream. A file is never rewritten in place; `save` and `set_aside` drop it.
        self._last_read: Snapshot | None = None
        #: `latest`'s answer for it: the same object for every stream.
        self._last_pair: tuple[int, bytes] | None = None

    @property
    def directory(self) -> Path:
        return self._dir

    def indices(self) -> list[int]:
        """Indices of the snapshot files present, newest first (validity not checked). Only
        regular files count: a directory named like one is no snapshot (pruning it failed
        every later save, after the new snapshot was in place). Empty when the directory does
        not exist yet; `OSError` when it cannot be read, or is not a directory."""
        if not self._dir.is_dir():
            self._check_directory()
            return []
        found = []
        with os.scandir(self._dir) as entries:
            for entry in entries:
                m = _NAME.match(entry.name)
                if m is not None and entry.is_file():
                    found.append(int(m.group(1)))
        return sorted(found, reverse=True)

    def save(self, idx: int, data: bytes, anchor: LogAnchor | None = None) -> Path:
        """Write the snapshot of state at `idx` atomically, then keep only the newest few.

        `anchor`: the log record at `idx`, so a loader can tell the snapshot is of its log.
        """
        if idx < 0:
            raise ValueError(f"snapshot index {idx} must be >= 0")
        blob = encode_snapshot(idx, data, anchor)
        self._check_directory()
        make_dirs_durably(self._dir)
        self._last_read = None
        path = self._dir / snapshot_name(idx)
        write_bytes_durably(path, blob, mode=0o644)  # dir synced too
        self._prune()
        return path

    def _check_directory(self) -> None:
        """`NotADirectoryError` naming the path when something other than a directory is
        there (a mkdir would say "File exists", which reads as if all were well)."""
        if self._dir.exists() and not self._dir.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(self._dir))

    def set_aside(self, idx: int, why: str) -> Path:
        """Rename the snapshot at `idx` out of the way (kept for inspection, never loaded):
        for one that describes another history than the log's."""
        self._last_read = None
        path = self._dir / snapshot_name(idx)
        aside = path.with_name(f"{path.name}.{why}")
        os.replace(path, aside)
        fsync_dir(self._dir)
        return aside

    def _prune(self) -> None:
        """Drop old snapshots and leftovers. The new snapshot is already in place: a file
        that cannot be removed is a WARNING, not a failed save."""
        try:
            old = [self._dir / snapshot_name(i) for i in self.indices()[self._keep :]]
        except OSError as exc:  # e.g. a directory this process may write but not list
            log.warning("could not list old snapshots in %s: %s", self._dir, exc.strerror or exc)
            return
        # Half-written snapshots a crash left behind (one writer: none is in progress now);
        # each is as large as a snapshot, and a crash loop would otherwise pile them up.
        for path in [*old, *self._dir.glob(".*.snap.tmp")]:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not remove old snapshot file %s: %s", path, exc.strerror or exc)

    def latest(self, max_idx: int | None = None) -> tuple[int, bytes] | None:
        """(idx, payload) of the newest valid snapshot with index <= `max_idx` (any when
        None), or None. A damaged file is skipped with a WARNING and the next older one is
        tried."""
        found = self.latest_anchored(max_idx)
        if found is None:
            return None
        pair = self._last_pair
        if pair is None or pair[0] != found.idx or pair[1] is not found.payload:
            pair = self._last_pair = (found.idx, found.payload)
        return pair

    def latest_anchored(self, max_idx: int | None = None) -> Snapshot | None:
        """`latest`, with the snapshot's log anchor."""
        for idx in self.indices():
            if max_idx is not None and idx > max_idx:
                continue
            cached = self._last_read
            if cached is not None and cached.idx == idx:
                return cached
            path = self._dir / snapshot_name(idx)
            try:
                found = decode_snapshot_anchored(path.read_bytes())
                if found.idx != idx:
                    raise ValueError(f"header says index {found.idx} but the file name says {idx}")
            except (OSError, ValueError) as exc:
                log.warning("snapshot %s is unusable (%s): trying an older one", path, exc)
                continue
            self._last_read = found
            return found
        return None
