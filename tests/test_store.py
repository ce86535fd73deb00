"""EventStore: durable append + fold, reopen, snapshots, and load_state."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import pytest

from cluster.shared import codec
from cluster.shared.apply import OutOfOrderError, fold
from cluster.shared.eventlog import EventLog, LogAnchor
from cluster.shared.events import (
    MASTER_ORIGIN,
    EpochStarted,
    IndexedEvent,
    NodeGatheredInfo,
    NodeHeartbeat,
    NodeInfo,
    SessionRequested,
)
from cluster.shared.snapshots import SnapshotStore, snapshot_name
from cluster.shared.state import EMPTY_STATE, State
from cluster.shared.store import (
    LOG_DIR,
    EventDecodeError,
    EventStore,
    as_logged,
    load_state,
    restore,
)


def make_events(n: int, start: int = 1) -> list[IndexedEvent]:
    """A small but varied log: an epoch, sessions, info and heartbeats from 7 nodes."""
    out = []
    for idx in range(start, start + n):
        node = f"12D3KooWNode{idx % 7}"
        ev: object
        if idx % 50 == 1:
            ev = EpochStarted(epoch=idx // 50 + 1, start_ms=idx, end_ms=idx + 60_000, seed=idx)
            origin = MASTER_ORIGIN
        elif idx % 13 == 0:
            ev = SessionRequested(session_id=f"s{idx}", slots=2, memory_per_slot_mb=512)
            origin = MASTER_ORIGIN
        elif idx % 3 == 0:
            # An int where the schema says float, as careless producers write it.
            ev = NodeGatheredInfo(node_id=node, source="cpu", info=NodeInfo(cpu_percent=idx % 100))
            origin = node
        else:
            ev = NodeHeartbeat(node_id=node)
            origin = node
        out.append(IndexedEvent(idx, 1_000 + idx, origin, idx, ev))
    return out


def test_append_folds_and_reopen_gives_the_same_state(tmp_path: Path) -> None:
    events = make_events(300)
    with EventStore.open(tmp_path) as store:
        assert store.state == EMPTY_STATE and store.last_idx == 0
        for i in range(0, 300, 40):
            returned = store.append(events[i : i + 40])
            assert returned is store.state
        # What the store folds is the log's bytes, so its digest is what any replay gives.
        expected = fold(EMPTY_STATE, [codec.decode_event(codec.encode_event(e)) for e in events])
        assert store.state == expected and store.last_idx == 300
        assert codec.state_digest(store.state) == codec.state_digest(expected)
        assert list(store.read_from(295)) == events[294:]
        raw = list(store.read_raw_from(299))
        assert [codec.decode_event(p) for _, p in raw] == events[298:]
    with EventStore.open(tmp_path) as store:
        assert store.state == expected
        assert codec.state_digest(store.state) == codec.state_digest(expected)
        assert (tmp_path / "log").is_dir()


def test_append_decoded_writes_what_append_writes_and_returns_the_log_bytes(
    tmp_path: Path,
) -> None:
    events = make_events(300)
    with EventStore.open(tmp_path / "a") as plain:
        plain.append(events)
        plain_log = list(plain.read_from(1))
    with EventStore.open(tmp_path / "b") as store:
        committed = []
        for i in range(0, 300, 40):
            # The master hands over events decoded from bytes, or normalised by `as_logged`.
            batch = [as_logged(ie) for ie in events[i : i + 40]]
            result = store.append_decoded(batch)
            assert result.state is store.state
            committed += result.records
        assert committed == list(store.read_raw_from(1))
        assert list(store.read_from(1)) == plain_log
        assert codec.state_digest(store.state) == codec.state_digest(plain.state)
        assert codec.state_digest(store.state) == codec.state_digest(load_state(store.log, None))
    assert store.append_decoded([]).records == []


def test_as_logged_is_what_the_log_gives_back() -> None:
    ie = make_events(3)[2]  # NodeGatheredInfo with an int cpu_percent
    assert isinstance(ie.event, NodeGatheredInfo)
    assert type(ie.event.info.cpu_percent) is int
    logged = as_logged(ie)
    assert isinstance(logged.event, NodeGatheredInfo)
    assert type(logged.event.info.cpu_percent) is float
    assert logged == codec.decode_event(codec.encode_event(ie))


def test_out_of_order_batch_writes_nothing(tmp_path: Path) -> None:
    events = make_events(10)
    with EventStore.open(tmp_path) as store:
        store.append(events[:5])
        before = store.state
        with pytest.raises(OutOfOrderError):
            store.append([events[5], events[7]])
        assert store.state is before and store.last_idx == 5
        store.append(events[5:])
        assert store.last_idx == 10


def test_snapshots_are_taken_and_used_on_open(tmp_path: Path) -> None:
    events = make_events(1000)
    with EventStore.open(tmp_path, snapshot_every=250) as store:
        for i in range(0, 1000, 100):
            store.append(events[i : i + 100])
        # Every 250 events at batch boundaries (300, 600, 900); only the newest 3 are kept.
        assert store.snapshots.indices() == [900, 600, 300]
        latest = store.latest_snapshot()
        assert latest is not None
        idx, data = latest
        assert codec.decode_state(data) == fold(EMPTY_STATE, events[:idx])
    with EventLog.open(tmp_path / "log", readonly=True) as lg:
        snaps = SnapshotStore(tmp_path / "snapshots")
        from_snapshot = restore(lg, snaps)
        assert from_snapshot.snapshot_idx == snaps.indices()[0]
        full = restore(lg, None)
        assert full.snapshot_idx == 0
        assert codec.state_digest(from_snapshot.state) == codec.state_digest(full.state)
        assert from_snapshot.state == full.state
        # --until before the newest snapshot uses an older one, and agrees with a refold.
        mid = load_state(lg, snaps, until=620)
        assert mid == fold(EMPTY_STATE, events[:620])


def test_corrupt_snapshot_falls_back_to_an_older_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events = make_events(600)
    with EventStore.open(tmp_path, snapshot_every=200) as store:
        for i in range(0, 600, 50):
            store.append(events[i : i + 50])
    snaps = SnapshotStore(tmp_path / "snapshots")
    newest = snaps.indices()[0]
    path = snaps.directory / f"{newest:020d}.snap"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING), EventLog.open(tmp_path / "log", readonly=True) as lg:
        restored = restore(lg, snaps)
        assert restored.snapshot_idx == snaps.indices()[1]
        assert restored.state == fold(EMPTY_STATE, events)
    assert "unusable" in caplog.text


def test_snapshot_that_does_not_decode_to_its_index_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events = make_events(20)
    with EventStore.open(tmp_path) as store:
        store.append(events)
        # CRC-valid, but holds the state of another index: must not be trusted.
        store.snapshots.save(20, codec.encode_state(fold(EMPTY_STATE, events[:5])))
    with caplog.at_level(logging.WARNING), EventStore.open(tmp_path) as store:
        assert store.state == fold(EMPTY_STATE, events)
    assert "state is at index 5" in caplog.text


def test_a_store_over_an_unusable_snapshot_directory_serves_only_its_own_snapshots(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`snapshots` a file: opening refolds with a WARNING (it raised), catch-up is sent the
    log (no OSError out of `latest_snapshot`), and once the directory is back, a snapshot
    there that this process neither checked nor wrote -- here one ahead of the log at open,
    which the log has grown past since -- is never served; its own are."""
    events = make_events(160)
    with EventStore.open(tmp_path) as store:
        store.append(events[:100])
        store.snapshot()
    snap_dir = tmp_path / "snapshots"
    for path in snap_dir.iterdir():
        path.unlink()
    snap_dir.rmdir()
    snap_dir.write_text("x")
    with caplog.at_level(logging.WARNING), EventStore.open(tmp_path) as store:
        assert "cannot be used (Not a directory): refolding from the log" in caplog.text
        assert store.state == fold(EMPTY_STATE, events[:100])
        assert store.latest_snapshot() is None
        assert store.latest_snapshot() is None
        said = f"snapshots in {snap_dir} cannot be read (Not a directory): replicas catch up"
        assert caplog.text.count(said) == 1  # once, not once per catching-up replica
        snap_dir.unlink()
        SnapshotStore(snap_dir).save(150, b"not checked")  # ahead of the log when opened
        store.append(events[100:])
        assert store.latest_snapshot() is None
        assert store.write_snapshot(store.state)
        assert store.latest_snapshot() == (160, codec.encode_state(store.state))


def _other_history(events: list[IndexedEvent], start: int) -> list[IndexedEvent]:
    """`events` with every node's event from index `start` on replaced by a heartbeat."""
    return [
        msgspec.structs.replace(ie, event=NodeHeartbeat(node_id=ie.origin))
        if ie.idx >= start and ie.origin != MASTER_ORIGIN
        else ie
        for ie in events
    ]


def test_a_snapshot_copied_from_another_history_is_not_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A snapshot from another cluster's directory at an index this log also holds was
    loaded unchecked: the state was that history's, and `cluster replay --digest` differed
    from `--no-snapshot`. A snapshot now carries the anchor of the log record it was taken
    after (offset + payload CRC) and is used only where the log holds that record."""
    ours = make_events(60)
    theirs = _other_history(ours, 41)
    for name, events in (("ours", ours), ("theirs", theirs)):
        with EventStore.open(tmp_path / name, snapshot_every=20) as store:
            for i in range(0, 60, 10):
                store.append(events[i : i + 10])
            assert store.snapshots.indices() == [60, 40, 20]
    snaps = tmp_path / "ours" / "snapshots"
    (snaps / snapshot_name(60)).write_bytes(
        (tmp_path / "theirs/snapshots" / snapshot_name(60)).read_bytes()
    )
    with caplog.at_level(logging.WARNING), EventStore.open(tmp_path / "ours") as store:
        assert store.state == fold(EMPTY_STATE, ours)
        assert store.latest_snapshot() is not None  # ours again, at 60: taken anew
    assert "snapshot at index 60 is not of this log" in caplog.text
    # Read-only (cluster replay): the same check, the older snapshot of ours is used.
    (snaps / snapshot_name(60)).write_bytes(
        (tmp_path / "theirs/snapshots" / snapshot_name(60)).read_bytes()
    )
    with EventLog.open(tmp_path / "ours" / "log", readonly=True) as lg:
        restored = restore(lg, SnapshotStore(snaps))
    assert restored.snapshot_idx == 40 and restored.state == fold(EMPTY_STATE, ours)


def test_snapshots_carry_the_anchor_of_their_log_record_and_old_ones_still_load(
    tmp_path: Path,
) -> None:
    events = make_events(30)
    with EventStore.open(tmp_path, snapshot_every=10) as store:
        for i in range(0, 30, 5):
            store.append(events[i : i + 5])
        # Due, written later on another thread (as the master does), after more commits.
        later = [as_logged(ie) for ie in make_events(12, start=31)]
        store.append_decoded(later, snapshot_when_due=False)
        due = store.due_snapshot()
        assert due is not None and due.state.last_applied == 42
        store.append(make_events(3, start=43))
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(store.write_snapshot, *due).result()
        for idx in (42, 30):
            found = store.snapshots.latest_anchored(idx)
            assert found is not None and found.anchor is not None
            assert found.anchor.idx == idx and store.log.holds(found.anchor) is True
        # A snapshot without an anchor (written before anchors) is used, unchecked.
        store.snapshots.save(45, codec.encode_state(store.state))
    with EventLog.open(tmp_path / "log", readonly=True) as lg:
        restored = restore(lg, SnapshotStore(tmp_path / "snapshots"))
        assert restored.snapshot_idx == 45
        assert restored.state == fold(EMPTY_STATE, [*events, *make_events(15, start=31)])


def _marks_by_node(doc: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Pop the by-slot marks and each record's slot from a state `doc`: node_id -> marks, as
    the layouts before format 4 keyed them."""
    pairs = doc.pop("last_event_by_node")
    out: dict[str, tuple[int, int]] = {}
    for node_id, rec in doc["nodes"].items():
        slot = rec.pop("slot")
        if slot < len(pairs) and pairs[slot][0]:
            out[node_id] = (pairs[slot][0], pairs[slot][1])
    return out


def _in_the_first_layout(state: State) -> bytes:
    """`state` encoded as the first snapshots were: two maps `last_event_index_by_node` and
    `last_seq_by_origin` beside plain node records."""
    doc = codec.to_builtins(state)
    marks = _marks_by_node(doc)
    doc["last_event_index_by_node"] = {n: m[0] for n, m in marks.items()}
    doc["last_seq_by_origin"] = {
        **{n: m[1] for n, m in marks.items()},
        MASTER_ORIGIN: doc.pop("master_seq"),
    }
    return msgspec.msgpack.encode(doc)


def _with_marks_in_node_records(state: State) -> bytes:
    """`state` encoded as format-1 snapshots were: each node's marks inside its record."""
    doc = codec.to_builtins(state)
    for node_id, (idx, seq) in _marks_by_node(doc).items():
        doc["nodes"][node_id] |= {"last_event_idx": idx, "last_seq": seq}
    return msgspec.msgpack.encode(doc)


def _with_marks_by_node_id(state: State) -> bytes:
    """`state` encoded as format-3 snapshots were: a map node_id -> (index, seq) and records
    without a slot."""
    doc = codec.to_builtins(state)
    doc["last_event_by_node"] = _marks_by_node(doc)
    return msgspec.msgpack.encode(doc)


@pytest.mark.parametrize(
    ("at", "layout"),
    [
        (1, _in_the_first_layout),  # with no nodes yet
        (20, _in_the_first_layout),  # and with nodes
        (20, _with_marks_in_node_records),  # under the current header: the records say it
        (20, _with_marks_by_node_id),
    ],
)
def test_snapshot_in_an_older_state_layout_is_skipped_and_the_log_refolded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, at: int, layout: Callable[[State], bytes]
) -> None:
    events = make_events(30)
    with EventStore.open(tmp_path) as store:
        store.append(events)
        store.snapshots.save(at, layout(fold(EMPTY_STATE, events[:at])))
    with caplog.at_level(logging.WARNING), EventLog.open(tmp_path / "log", readonly=True) as lg:
        restored = restore(lg, SnapshotStore(tmp_path / "snapshots"))
        assert restored.snapshot_idx == 0
        assert restored.state == fold(EMPTY_STATE, events)
    assert f"snapshot at index {at} is unusable" in caplog.text


def test_a_snapshot_the_master_could_not_restore_from_is_never_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot of another version's layout is skipped on open; a replica catching up
    would fail to decode it the same way (and redial forever), so the store writes one of
    its own at once and never hands out the unusable one."""
    events = make_events(30)
    with EventStore.open(tmp_path) as store:
        store.append(events)
        store.snapshots.save(20, _in_the_first_layout(fold(EMPTY_STATE, events[:20])))
    with caplog.at_level(logging.WARNING), EventStore.open(tmp_path) as store:
        found = store.latest_snapshot()
        assert found is not None and found[0] == 30
        assert codec.decode_state(found[1]) == fold(EMPTY_STATE, events)
    # Where no new snapshot can be written (a full disk), the old one is still not served.
    with EventStore.open(tmp_path) as store:
        store.snapshots.save(30, _in_the_first_layout(fold(EMPTY_STATE, events)))

    def disk_full(
        self: SnapshotStore, idx: int, data: bytes, anchor: LogAnchor | None = None
    ) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SnapshotStore, "save", disk_full)
    with EventStore.open(tmp_path) as store:
        assert store.state == fold(EMPTY_STATE, events)
        assert store.latest_snapshot() is None


def test_a_due_snapshot_can_be_left_to_the_caller_and_written_beside_commits(
    tmp_path: Path,
) -> None:
    """What the master does: commit without snapshotting, take the due state, write it on a
    worker thread while later commits go on (the State is immutable)."""
    events = [as_logged(ie) for ie in make_events(25)]
    with EventStore.open(tmp_path, snapshot_every=10) as store:
        store.append_decoded(events[:12], snapshot_when_due=False)
        assert store.snapshots.indices() == []  # left to the caller
        due = store.due_snapshot()
        assert due is not None and due.state.last_applied == 12
        assert store.due_snapshot() is None  # taken: due again 10 events later
        with ThreadPoolExecutor(1) as pool:
            written = pool.submit(store.write_snapshot, *due)
            store.append_decoded(events[12:21], snapshot_when_due=False)
            assert written.result(timeout=30)
        assert store.due_snapshot() is None
        store.append_decoded(events[21:22], snapshot_when_due=False)
        again = store.due_snapshot()
        assert again is not None and again.state.last_applied == 22
        found = store.latest_snapshot()
        assert found is not None and found[0] == 12
        assert codec.decode_state(found[1]) == fold(EMPTY_STATE, events[:12])
    with EventStore.open(tmp_path) as store:
        assert store.state == fold(EMPTY_STATE, events[:22])


def test_each_due_snapshot_carries_its_own_anchor_when_a_newer_one_came_due_first(
    tmp_path: Path,
) -> None:
    """The snapshotter thread may write a state after a newer one came due: the anchor was
    kept in the store, the newer due replaced it, and the older snapshot was saved without
    its anchor (unchecked on the next load)."""
    events = [as_logged(ie) for ie in make_events(40)]
    with EventStore.open(tmp_path, snapshot_every=10) as store:
        store.append_decoded(events[:12], snapshot_when_due=False)
        first = store.due_snapshot()  # taken by the snapshotter...
        store.append_decoded(events[12:25], snapshot_when_due=False)
        second = store.due_snapshot()  # ...and a newer one came due before it was written
        assert first is not None and second is not None
        assert first.anchor is not None and first.anchor.idx == 12
        assert store.write_snapshot(*first) and store.write_snapshot(*second)
        for idx in (12, 25):
            found = store.snapshots.latest_anchored(idx)
            assert found is not None and found.idx == idx
            assert found.anchor is not None and found.anchor.idx == idx, found
            assert store.log.holds(found.anchor) is True
        # An anchor of another record is a caller's bug, said so (nothing saved unchecked).
        with pytest.raises(ValueError, match="snapshot at index 12 is of record 25"):
            store.write_snapshot(first.state, second.anchor)


def test_a_snapshot_ahead_of_the_log_is_moved_aside_not_loaded_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A log that lost records (damage, a backup restored) and then grew again past a
    snapshot taken of the lost history must not restore from that snapshot."""
    lost = make_events(40)
    with EventStore.open(tmp_path) as store:
        store.append(lost[:30])
        store.snapshots.save(40, codec.encode_state(fold(EMPTY_STATE, lost)))
    with caplog.at_level(logging.WARNING), EventStore.open(tmp_path) as store:
        assert store.state == fold(EMPTY_STATE, lost[:30])
        # Another history from index 31 on: other events than the snapshot folded.
        other = [
            msgspec.structs.replace(ie, event=NodeHeartbeat(node_id=ie.origin))
            if ie.origin != MASTER_ORIGIN
            else ie
            for ie in make_events(20, start=31)
        ]
        store.append(other)
        expected = fold(EMPTY_STATE, [*lost[:30], *other])
    assert "ahead of the log" in caplog.text
    assert (tmp_path / "snapshots" / "00000000000000000040.snap.ahead-of-log").exists()
    with EventStore.open(tmp_path) as store:
        assert store.state == expected
        found = store.latest_snapshot()
        assert found is None or codec.decode_state(found[1]) == fold(
            EMPTY_STATE, [*lost[:30], *other][: found[0]]
        )


def test_until_outside_the_log_is_a_value_error(tmp_path: Path) -> None:
    with EventStore.open(tmp_path) as store:
        store.append(make_events(5))
        with pytest.raises(
            ValueError, match=r"index 9 is outside the log \(it holds events 1..5\)"
        ):
            restore(store.log, None, until=9)
        assert load_state(store.log, None, until=0) == EMPTY_STATE


def test_record_that_is_not_an_event_is_reported_with_its_index(tmp_path: Path) -> None:
    with EventStore.open(tmp_path) as store:
        store.append(make_events(3))
        store.log.append([(4, b"\x93not an event")])
        with pytest.raises(EventDecodeError, match="record 4 is not a valid event"):
            list(store.read_from(1))
    with pytest.raises(EventDecodeError) as info:
        EventStore.open(tmp_path)
    assert info.value.idx == 4


def test_record_that_is_not_an_event_is_reported_with_its_file_and_offset(
    tmp_path: Path,
) -> None:
    """Reported by index only, an operator could not tell which file to look at or restore."""
    with EventStore.open(tmp_path, segment_max_bytes=4 << 10) as store:
        for first in range(1, 200, 10):
            store.append(make_events(10, start=first))  # rolls a few segments
        seg = sorted((tmp_path / LOG_DIR).glob("*.seg"))[-1]
        offset = seg.stat().st_size
        store.log.append([(201, b"\x93not an event")])
        with pytest.raises(EventDecodeError) as info:
            list(store.read_from(150))
    where = f"record 201 is not a valid event: {seg} offset {offset}: "
    assert where in str(info.value) and info.value.idx == 201
    with pytest.raises(EventDecodeError) as info:
        EventStore.open(tmp_path, segment_max_bytes=4 << 10)
    assert where in str(info.value)


def test_store_does_not_import_libp2p() -> None:
    code = "import sys, cluster.shared.store; print('libp2p' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_record_whose_numbers_do_not_fit_the_state_is_reported_with_its_index(
    tmp_path: Path,
) -> None:
    # A CRC-valid record with a negative or too large sequence number used to decode and then
    # crash the fold (an unsigned marks cell): it is refused at decode, naming the record.
    for seq in (-1, 2**63):
        data = tmp_path / str(seq)
        with EventStore.open(data) as store:
            store.append(make_events(3))
            bad = IndexedEvent(4, 4, "n1", 0, NodeHeartbeat(node_id="n1"))
            store.log.append([(4, msgspec.msgpack.encode(msgspec.structs.replace(bad, seq=seq)))])
        with pytest.raises(EventDecodeError, match="record 4 is not a valid event") as info:
            EventStore.open(data)
        assert info.value.idx == 4
        assert "- at `$[3]`" in str(info.value)  # the record's fourth field: its seq


def test_a_state_that_cannot_be_encoded_skips_its_snapshot_and_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(state: State) -> bytes:
        raise OverflowError("can't serialize ints > 2**64 - 1")

    with EventStore.open(tmp_path, snapshot_every=2) as store:
        monkeypatch.setattr(codec, "encode_state", broken)
        with caplog.at_level(logging.ERROR):
            store.append(make_events(4))
        assert store.state.last_applied == 4
        assert "could not encode the state at index 4 for a snapshot" in caplog.text
        monkeypatch.undo()
        store.append(make_events(6)[4:])
    with EventStore.open(tmp_path) as store:
        assert store.state == fold(EMPTY_STATE, make_events(6))


@pytest.mark.parametrize("every", [0, -1, 100_000_001, 10**30])
def test_snapshot_every_is_bounded(every: int, tmp_path: Path) -> None:
    """An embedding program's `snapshot_every` is checked as `--snapshot-every` is."""
    with pytest.raises(
        ValueError, match=f"snapshot_every must be 1..100,000,000 events, got {every}"
    ):
        EventStore.open(tmp_path, snapshot_every=every)
    assert not (tmp_path / "log").exists()  # refused before anything was created
