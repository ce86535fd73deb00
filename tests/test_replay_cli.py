"""`cluster replay`: summary, JSON, digest, --until, snapshots, and clean errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from cluster.cli import main
from cluster.shared import codec
from cluster.shared.apply import fold
from cluster.shared.eventlog import EventLog
from cluster.shared.events import (
    MASTER_ORIGIN,
    DevshardPlaced,
    EpochStarted,
    IndexedEvent,
    MaintenanceScheduled,
    NodeConnected,
    NodeDisconnected,
    NodeGatheredInfo,
    NodeHeartbeat,
    NodeInfo,
    RunnerSelfTestCompleted,
    SessionRequested,
    SlotAssignment,
    WorkReported,
)
from cluster.shared.state import EMPTY_STATE
from cluster.shared.store import LOG_DIR, EventStore

T0 = 1_700_000_000_000


def build_log() -> list[IndexedEvent]:
    nodes = [f"12D3KooWNode{i}" for i in range(4)]
    placed = DevshardPlaced(
        devshard_id="d1",
        session_id="s1",
        epoch=1,
        assignments=tuple(SlotAssignment(i, n) for i, n in enumerate(nodes)),
        ends_ms=T0 + 600_000,
    )
    evs: list[tuple[str, object]] = [
        (MASTER_ORIGIN, EpochStarted(epoch=1, start_ms=T0, end_ms=T0 + 600_000, seed=7)),
        (MASTER_ORIGIN, SessionRequested(session_id="s1", slots=4, memory_per_slot_mb=64)),
        (MASTER_ORIGIN, placed),  # its holders' work counts
    ]
    for n in nodes:
        evs.append((n, NodeGatheredInfo(node_id=n, source="host", info=NodeInfo(slots=2))))
        evs.append((n, WorkReported(devshard_id="d1", node_id=n, units=3, epoch=1)))
    evs.append((MASTER_ORIGIN, NodeDisconnected(node_id="12D3KooWNode3", reason="stale")))
    evs.append(
        (
            MASTER_ORIGIN,
            MaintenanceScheduled(
                window_id="w1",
                node_id="12D3KooWNode0",
                start_ms=T0 + 10_000_000,
                duration_ms=60_000,
                requested_ms=T0,
                credit_spent_ms=60_000,
            ),
        )
    )
    return [
        IndexedEvent(i + 1, T0 + i, origin, i + 1, ev)  # type: ignore[arg-type]
        for i, (origin, ev) in enumerate(evs)
    ]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    with EventStore.open(tmp_path / "data", snapshot_every=5) as store:
        events = build_log()
        for i in range(0, len(events), 3):
            store.append(events[i : i + 3])
    return tmp_path / "data"


def replay(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["replay", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_summary_and_digest(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = replay(capsys, str(data_dir))
    assert code == 0, err
    state = fold(EMPTY_STATE, build_log())
    lines = out.splitlines()
    assert lines[-1] == f"digest: {codec.state_digest(state)}"
    assert "events:    13 events" in out
    assert "nodes:     4 (3 connected, 1 disconnected)" in out
    assert "epoch:     1 (" in out
    assert "sessions:  1" in out
    assert "windows:   1 (1 scheduled)" in out
    assert "ledgers:   1 (0 settled)" in out
    assert "epoch 1: open, 12 units" in out
    assert "1 punished disconnect" in out


def test_digest_only_json_and_log_dir_path(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    digest = codec.state_digest(fold(EMPTY_STATE, build_log()))
    assert replay(capsys, str(data_dir), "--digest") == (0, digest + "\n", "")
    assert replay(capsys, str(data_dir / "log"), "--digest")[1] == digest + "\n"
    code, out, err = replay(capsys, str(data_dir), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["last_applied"] == 13 and sorted(doc["nodes"]) == [
        f"12D3KooWNode{i}" for i in range(4)
    ]
    # Each node's marks under its own id (its last event: the work report at 5 + 2i).
    assert doc["last_event_by_node"] == {
        f"12D3KooWNode{i}": [5 + 2 * i, 5 + 2 * i] for i in range(4)
    }
    assert err.strip() == f"digest: {digest}"


def test_state_json_keys_the_marks_by_node_id() -> None:
    # B is known from the master's NodeConnected only: no event of its own yet.
    state = fold(
        EMPTY_STATE,
        [
            IndexedEvent(1, T0, "node-a", 1, NodeHeartbeat(node_id="node-a")),
            IndexedEvent(2, T0, MASTER_ORIGIN, 1, NodeConnected(node_id="node-b")),
            IndexedEvent(3, T0, "node-a", 2, NodeHeartbeat(node_id="node-a")),
        ],
    )
    doc = json.loads(codec.state_to_json(state))
    assert doc["last_event_by_node"] == {"node-a": [3, 2], "node-b": [0, 0]}
    assert doc["nodes"]["node-b"]["slot"] == 1
    # The canonical encoding (digest, snapshots) keeps them by slot.
    assert [list(p) for p in codec.to_builtins(state)["last_event_by_node"]] == [[3, 2]]


def test_a_log_with_times_past_year_9999_replays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_node_status import far_future_log

    events = far_future_log().events
    with EventStore.open(tmp_path / "data") as store:
        store.append(events)
    code, out, err = replay(capsys, str(tmp_path / "data"))
    assert code == 0, err
    (end,) = [ie.event.end_ms for ie in events if isinstance(ie.event, EpochStarted)]
    assert f"-> {end} ms since 1970-01-01 UTC (after year 9999))" in out
    assert out.splitlines()[-1] == f"digest: {codec.state_digest(fold(EMPTY_STATE, events))}"


def test_a_log_from_before_hellos_named_the_runner_setting_replays_as_it_did(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its NodeConnected records have no runner_digest: they decode with "" and keep the
    node's self-test, as the build that wrote them folded them."""
    node = "12D3KooWNode0"
    test = RunnerSelfTestCompleted(
        node_id=node, runner_kind="simulated", passed=True, config_digest="d" * 64
    )
    old_hello = {"type": "NodeConnected", "node_id": node, "addr": "", "boot_id": "b1"}
    raw = [
        [1, T0, MASTER_ORIGIN, 1, old_hello],
        [2, T0 + 1, node, 1, msgspec.to_builtins(test)],
        [3, T0 + 2, MASTER_ORIGIN, 2, old_hello | {"boot_id": "b2"}],  # a restart
    ]
    records = [(r[0], msgspec.msgpack.encode(r)) for r in raw]
    assert b"runner_digest" not in b"".join(data for _, data in records)
    with EventLog.open(tmp_path / "data" / LOG_DIR) as event_log:
        event_log.append(records)
    events = [codec.decode_event(data) for _, data in records]
    state = fold(EMPTY_STATE, events)
    rec = state.nodes[node]
    assert rec.runner_digest == "" and rec.boot_id == "b2"
    assert rec.self_test is not None and rec.self_test.config_digest == "d" * 64
    code, out, err = replay(capsys, str(tmp_path / "data"))
    assert code == 0, err
    assert out.splitlines()[-1] == f"digest: {codec.state_digest(state)}"


def test_until_and_no_snapshot_agree_with_a_fold(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = build_log()
    assert len(list((data_dir / "snapshots").glob("*.snap"))) >= 1
    for until in (0, 1, 5, 7, 13):
        expected = codec.state_digest(fold(EMPTY_STATE, events[:until]))
        with_snap = replay(capsys, str(data_dir), "--until", str(until), "--digest")
        without = replay(capsys, str(data_dir), "--until", str(until), "--digest", "--no-snapshot")
        assert with_snap == without == (0, expected + "\n", "")


def test_errors_are_one_line_with_exit_code_2(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = replay(capsys, str(tmp_path / "nope"))
    assert (code, out) == (2, "") and "no such file or directory" in err
    # Prefixed as every command's errors are: `cluster replay: ...`, one line.
    assert err == f"cluster replay: {tmp_path / 'nope'}: no such file or directory\n", err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = replay(capsys, str(empty))
    assert code == 2 and "no event log here" in err
    code, _, err = replay(capsys, str(data_dir), "--until", "99")
    assert code == 2 and "index 99 is outside the log (it holds events 1..13)" in err
    # A `cluster demo` directory: its master's log is in master/, and the error says so.
    demo = tmp_path / "demo"
    demo.mkdir()
    data_dir.rename(demo / "master")
    code, _, err = replay(capsys, str(demo))
    assert (code, err) == (
        2,
        f"cluster replay: {demo}: no event log here, but its master/ subdirectory holds one: "
        f"cluster replay {demo / 'master'}\n",
    )
    data_dir = demo / "master"
    code, _, err = replay(capsys, str(data_dir), "--until", "-1")
    assert code == 2 and "--until -1 must be >= 0" in err

    seg = next((data_dir / "log").glob("*.seg"))
    data = bytearray(seg.read_bytes())
    data[60] ^= 0x10  # inside an early record, with good records after it
    seg.write_bytes(bytes(data))
    code, out, err = replay(capsys, str(data_dir), "--no-snapshot")
    assert code == 2 and out == ""
    assert "event log corrupt at index" in err and "Traceback" not in err


def test_real_entry_point_with_progress_bar_and_no_libp2p(data_dir: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    code = (
        "import sys, cluster.commands.replay as r; r.PROGRESS_MIN_EVENTS = 0; "
        "import cluster.shared.store as s; s.PROGRESS_EVERY = 4; "
        "from cluster.cli import main; rc = main(sys.argv[1:]); "
        "print('libp2p' in sys.modules, file=sys.stderr); sys.exit(rc)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "replay", str(data_dir), "--no-snapshot"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "replay [" in out.stderr and "100% 13/13 events" in out.stderr
    assert out.stderr.strip().endswith("False")
    assert out.stdout.splitlines()[-1].startswith("digest: ")
    cli = subprocess.run(
        [sys.executable, "-m", "cluster", "replay", str(data_dir / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 2 and "Traceback" not in cli.stderr


@pytest.mark.parametrize("mode", ["--json", "--digest", "summary"])
def test_warnings_are_one_prefixed_line_each_on_stderr(data_dir: Path, mode: str) -> None:
    """A torn tail and an unusable snapshot were logged with no logging set up: logging's
    last-resort handler printed them as bare lines. Now each is one line on stderr like the
    command's errors, and stdout holds only the output (JSON or the digest, parseable)."""
    newest = max((data_dir / "snapshots").glob("*.snap"))
    data = bytearray(newest.read_bytes())
    data[20:24] = b"XXXX"  # its header: unusable, an older snapshot is used
    newest.write_bytes(bytes(data))
    seg = next((data_dir / "log").glob("*.seg"))
    with seg.open("ab") as f:
        f.write(b"garbage")  # a torn tail: ignored (the log is opened read-only)
    args = [] if mode == "summary" else [mode]
    out = subprocess.run(
        [sys.executable, "-m", "cluster", "replay", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    err = out.stderr.splitlines()
    warnings = [line for line in err if not line.startswith("digest: ")]
    assert len(warnings) == 2, err
    assert all(line.startswith("cluster replay: warning: ") for line in warnings), err
    assert "incomplete tail in" in warnings[0] and f"{newest} is unusable" in warnings[1], err
    expected = codec.state_digest(fold(EMPTY_STATE, build_log()))
    if mode == "--json":
        assert json.loads(out.stdout)["last_applied"] == 13
        assert err[-1] == f"digest: {expected}"
    elif mode == "--digest":
        assert out.stdout == expected + "\n"
    else:
        assert out.stdout.splitlines()[-1] == f"digest: {expected}"
        assert "from the snapshot at" in out.stdout


def test_a_logged_line_break_stays_on_its_line(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from cluster.commands._process import setup_command_logging

    setup_command_logging("replay")
    logging.getLogger("cluster.shared.eventlog").warning("two\nlines")
    logging.getLogger("cluster.shared.eventlog").info("not shown")
    assert capsys.readouterr() == ("", "cluster replay: warning: two\\nlines\n")


def _record_offset(seg: Path, idx: int) -> int:
    from test_eventlog import record_offset

    return record_offset(seg, idx)


@pytest.mark.parametrize("loss", ["truncated", "no segments"])
def test_a_snapshot_ahead_of_the_log_is_a_warning_and_stays_in_place(
    data_dir: Path, capsys: pytest.CaptureFixture[str], loss: str
) -> None:
    """Such a snapshot proves that acknowledged events were lost. Replay printed a digest
    for fewer events without a word, while the master warns and moves it aside. Replay
    (read-only) leaves it where it is, but says so, naming both indices."""
    snaps = sorted((data_dir / "snapshots").glob("*.snap"))
    ahead = sorted((int(p.stem) for p in snaps), reverse=True)
    seg = next((data_dir / "log").glob("*.seg"))
    if loss == "truncated":
        kept = min(ahead) - 1
        os.truncate(seg, _record_offset(seg, kept + 1))  # at a record boundary: no torn tail
    else:
        kept = 0
        seg.unlink()
    for args in ([], ["--no-snapshot"], ["--json"]):
        code, out, err = replay(capsys, str(data_dir), *args)
        assert code == 0, err
        warnings = [line for line in err.splitlines() if not line.startswith("digest: ")]
        assert warnings == [
            f"cluster replay: warning: snapshot at index {idx} is ahead of the log (last index "
            f"{kept}): the log lost events it held when the snapshot was taken (events after "
            f"{kept} were lost); not used"
            for idx in ahead
        ], err
        expected = codec.state_digest(fold(EMPTY_STATE, build_log()[:kept]))
        assert f"digest: {expected}" in out + err
    assert sorted((data_dir / "snapshots").glob("*.snap")) == snaps  # read-only: not moved


def test_an_unreadable_snapshot_directory_is_a_warning_and_a_refold(
    data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Snapshots only shorten a replay: a snapshots/ it may not read (chmod 000) made it
    exit 2 on a bare "Permission denied". Injected: the tests run as root."""
    snap_dir = data_dir / "snapshots"
    real_scandir = os.scandir

    def denied(path: str | Path) -> object:
        if Path(path) == snap_dir:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    code, out, err = replay(capsys, str(data_dir))
    assert code == 0, err
    assert err == (
        f"cluster replay: warning: snapshots in {snap_dir} cannot be used (Permission denied): "
        "refolding from the log\n"
    )
    assert out.splitlines()[-1] == f"digest: {codec.state_digest(fold(EMPTY_STATE, build_log()))}"
    assert "from the snapshot at" not in out
