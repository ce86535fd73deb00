"""Snapshot files: atomic save, keep the newest three, skip a damaged one with a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cluster.shared.eventlog import LogAnchor
from cluster.shared.snapshots import (
    HEADER_SIZE,
    SNAPSHOT_VERSION,
    SnapshotStore,
    decode_snapshot,
    decode_snapshot_anchored,
    encode_snapshot,
    snapshot_name,
)


def test_save_and_latest_round_trip(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snaps")
    assert store.latest() is None
    store.save(10, b"state at ten")
    store.save(20, b"state at twenty")
    assert store.latest() == (20, b"state at twenty")
    assert store.latest(max_idx=19) == (10, b"state at ten")
    assert store.latest(max_idx=9) is None


def test_keeps_only_the_newest_three_and_no_temp_files(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    (tmp_path / f".{snapshot_name(2)}.tmp").write_bytes(b"half written before a crash")
    for idx in (5, 1, 9, 7, 3):
        store.save(idx, f"s{idx}".encode())
    assert store.indices() == [9, 7, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == [snapshot_name(i) for i in (5, 7, 9)]


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "magic"])
def test_damaged_newest_snapshot_falls_back_to_the_older_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    store = SnapshotStore(tmp_path)
    store.save(100, b"older" * 100)
    path = store.save(200, b"newer" * 100)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[HEADER_SIZE + 50] ^= 1
    elif damage == "truncate":
        del data[-10:]
    elif damage == "empty":
        data = bytearray()
    else:
        data[:4] = b"XXXX"
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert store.latest() == (100, b"older" * 100)
    assert str(path) in caplog.text and "unusable" in caplog.text


def test_file_name_and_header_must_agree(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    store.save(1, b"one")
    (tmp_path / snapshot_name(5)).write_bytes(encode_snapshot(4, b"four"))
    assert store.latest() == (1, b"one")


def test_decode_names_what_is_wrong() -> None:
    blob = encode_snapshot(3, b"abc")
    assert decode_snapshot(blob) == (3, b"abc")
    with pytest.raises(ValueError, match="shorter than"):
        decode_snapshot(blob[:5])
    with pytest.raises(ValueError, match="header says 3 payload bytes"):
        decode_snapshot(blob + b"x")
    other = (SNAPSHOT_VERSION + 1).to_bytes(2, "little")  # a later build's
    with pytest.raises(ValueError, match=f"format version {SNAPSHOT_VERSION + 1}"):
        decode_snapshot(blob[:4] + other + blob[6:])
    with pytest.raises(ValueError, match="checksum"):
        decode_snapshot(blob[:-1] + b"X")


def test_path_that_is_a_file_is_refused_by_each_use_naming_it(tmp_path: Path) -> None:
    """Building the store does not fail (its owner may go on without snapshots); listing,
    loading and saving say what is wrong, not "File exists" as a mkdir would."""
    f = tmp_path / "f"
    f.write_text("x")
    store = SnapshotStore(f)
    for use in (store.indices, store.latest, lambda: store.save(1, b"one")):
        with pytest.raises(NotADirectoryError) as info:
            use()
        assert str(info.value) == f"[Errno 20] Not a directory: '{f}'"
    assert f.read_text() == "x"
    assert SnapshotStore(tmp_path / "absent").indices() == []  # not made yet: none


def test_the_newest_snapshot_is_read_once_for_every_catching_up_replica(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each catching-up stream asked for it: a 10,000-node snapshot (~6 MB) was read and
    held once per stream. A new save is read afresh."""
    store = SnapshotStore(tmp_path)
    store.save(5, b"five")
    reads: list[Path] = []
    read_bytes = Path.read_bytes

    def counting(path: Path) -> bytes:
        reads.append(path)
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", counting)
    first, second = store.latest(), store.latest()
    assert first == second == (5, b"five") and first is second
    assert len(reads) == 1
    store.save(9, b"nine")
    assert store.latest() == (9, b"nine") and len(reads) == 2
    assert store.latest(max_idx=8) == (5, b"five")  # an older one when asked: read again


def test_an_entry_named_like_a_snapshot_that_is_no_file_does_not_fail_saves(
    tmp_path: Path,
) -> None:
    """A directory named like the oldest snapshot: pruning it raised IsADirectoryError after
    each new snapshot was in place, so every save reported failure, and the leftovers of a
    crash were never removed."""
    store = SnapshotStore(tmp_path)
    (tmp_path / snapshot_name(1)).mkdir()
    (tmp_path / f".{snapshot_name(2)}.tmp").write_bytes(b"half written before a crash")
    for idx in (3, 5, 7, 9):
        store.save(idx, f"s{idx}".encode())
    assert store.indices() == [9, 7, 5]
    assert store.latest() == (9, b"s9")
    assert not (tmp_path / f".{snapshot_name(2)}.tmp").exists()
    assert (tmp_path / snapshot_name(1)).is_dir()  # not ours to remove


def test_a_snapshot_file_that_cannot_be_pruned_is_a_warning_not_a_failed_save(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SnapshotStore(tmp_path)
    for idx in (1, 3, 5):
        store.save(idx, b"s")
    real_unlink = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self.name == snapshot_name(1):
            raise PermissionError(13, "Permission denied")
        real_unlink(self, missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    with caplog.at_level(logging.WARNING):
        path = store.save(7, b"s7")  # saved: no exception
    assert path.exists() and store.latest() == (7, b"s7")
    assert f"could not remove old snapshot file {tmp_path / snapshot_name(1)}" in caplog.text


def test_an_anchor_round_trips_under_the_checksum(tmp_path: Path) -> None:
    """The anchor (the log record a snapshot was taken after) is part of the checksummed
    header; a snapshot without one reads as before, with no anchor."""
    anchor = LogAnchor(7, 1234, 0xDEADBEEF)
    blob = encode_snapshot(7, b"state", anchor)
    assert decode_snapshot_anchored(blob) == (7, b"state", anchor)
    assert decode_snapshot(blob) == (7, b"state")
    assert decode_snapshot_anchored(encode_snapshot(7, b"state")) == (7, b"state", None)
    with pytest.raises(ValueError, match="the anchor names log index 8"):
        encode_snapshot(7, b"state", anchor._replace(idx=8))
    damaged = bytearray(blob)
    damaged[HEADER_SIZE - 4] ^= 1  # inside the anchor's offset
    with pytest.raises(ValueError, match="checksum mismatch"):
        decode_snapshot(bytes(damaged))
    flagged = bytearray(blob)
    flagged[6] |= 0x80  # a flag this build does not know
    with pytest.raises(ValueError, match="unknown flags 0x81"):
        decode_snapshot(bytes(flagged))
    store = SnapshotStore(tmp_path)
    store.save(7, b"state", anchor)
    assert store.latest_anchored() == (7, b"state", anchor)
    assert store.latest() == (7, b"state")
