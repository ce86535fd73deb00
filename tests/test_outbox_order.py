"""Sequence order in a damaged outbox: the records kept after damage strictly increase in seq,
so that a master dropping every seq at or below an origin's last one loses none of them.

Damage can bring intact records out of order: a page of the file written again elsewhere (a
misdirected write), an earlier generation's block showing through. A record that goes back was
once accepted as it stood: the records resent after it under lower seqs were then dropped by the
master as duplicates, or a batch going back was refused as a broken sender's.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

import cluster.worker.outbox as outbox_module
from cluster.shared.codec import strict_decode
from cluster.shared.events import WorkReported
from cluster.worker.outbox import Outbox

A = "12D3KooWD6FXdxPeu8Y7TL4snPwAnK2Pc7BuReewmryJYjmiqGSX"
N = 100


def _event(n: int) -> WorkReported:
    return WorkReported(devshard_id=f"ds-{n}", node_id=A, units=n, epoch=1)


def _record(seq: int, event: WorkReported) -> bytes:
    payload = outbox_module._encoder.encode(event)
    return outbox_module._pack_rec(len(payload), seq, outbox_module._crc(seq, payload)) + payload


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[int]]:
    """An outbox file of records 1..N (seq n holds `_event(n)`), and where each starts."""
    directory = tmp_path_factory.mktemp("clean")
    box = Outbox.open(directory)
    for n in range(1, N + 1):
        assert box.append(_event(n)) == n
    box.close()
    data = (directory / "events.log").read_bytes()
    starts, off = [], 0
    while off < len(data):
        starts.append(off)
        end = outbox_module._record_end(data, off)
        assert end is not None
        off = end
    return data, starts


def _deliver(box: Outbox) -> list[int]:
    """The seqs a master logs from this outbox: it refuses a batch whose seqs go back (the
    worker then sends one event at a time) and drops every seq at or below its last one."""
    logged: list[int] = []
    last = box.acked
    while batch := box.pending_after(last, 8):
        for seq, payload in batch:
            if seq > last:
                assert strict_decode(outbox_module._event_decoder.decode, payload) == _event(seq)
                logged.append(seq)
                last = seq
    return logged


def _open(directory: Path, data: bytes, caplog: pytest.LogCaptureFixture) -> Outbox:
    directory.mkdir()
    (directory / "events.log").write_bytes(data)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cluster.worker.outbox"):
        return Outbox.open(directory)


# Each damage: (the file from the clean one and its record starts, the seqs that must arrive,
# and what the ERROR must name besides the file).
Damage = Callable[[bytes, list[int]], bytes]


def _later_record_in_a_hole(data: bytes, starts: list[int]) -> bytes:
    """Records 31..45 zeroed, and a copy of record 60 written into the hole."""
    d = bytearray(data)
    d[starts[30] : starts[45]] = bytes(starts[45] - starts[30])
    copy = data[starts[59] : starts[60]]
    d[starts[30] + 100 : starts[30] + 100 + len(copy)] = copy
    return bytes(d)


def _earlier_page_again(data: bytes, starts: list[int]) -> bytes:
    """Records 5..8 written again after record 12."""
    return data[: starts[12]] + data[starts[4] : starts[8]] + data[starts[12] :]


def _record_twice(data: bytes, starts: list[int]) -> bytes:
    return data[: starts[50]] + data[starts[49] : starts[50]] + data[starts[50] :]


DAMAGES: dict[str, tuple[Damage, list[int], Callable[[list[int]], str]]] = {
    "a later record in a hole": (
        _later_record_in_a_hole,
        [*range(1, 31), *range(46, N + 1)],
        lambda s: f"offset {s[45]}: seq 46 after seq 60",
    ),
    "an earlier page written again": (
        _earlier_page_again,
        list(range(1, N + 1)),
        lambda s: f"offset {s[12]}: seq 5 after seq 12",
    ),
    "a record written twice": (
        _record_twice,
        list(range(1, N + 1)),
        lambda s: f"offset {s[50]}: seq 50 after seq 50",
    ),
}


@pytest.mark.parametrize("name", DAMAGES)
def test_records_out_of_order_are_all_delivered_once_in_seq_order(
    name: str, clean: tuple[bytes, list[int]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    damage, expected, named = DAMAGES[name]
    data = damage(*clean)
    box = _open(tmp_path / "box", data, caplog)
    pending = [seq for seq, _ in box.pending_after(0, 10**6)]
    assert pending == sorted(set(pending)), "the records kept strictly increase"
    assert _deliver(box) == expected
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("out of sequence order" in m and named(clean[1]) in m for m in errors), errors
    assert all(str(tmp_path / "box" / "events.log") in m for m in errors)
    # Handled as damage: the file as found is kept, the log rewritten with the records kept.
    assert (tmp_path / "box" / "events.log.damaged").read_bytes() == data
    assert box.append(_event(N + 1)) == N + 1
    box.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cluster.worker.outbox"):
        again = Outbox.open(tmp_path / "box")
    assert not caplog.records, "the rewritten log is in order"
    assert _deliver(again) == [*expected, N + 1]
    again.close()


def test_acknowledged_records_out_of_order_are_reported_and_never_resent(
    clean: tuple[bytes, list[int]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, starts = clean
    directory = tmp_path / "box"
    directory.mkdir()
    Outbox(directory)._write_ack(20)  # records 1..20 are done: the copies of 5..8 too
    (directory / "events.log").write_bytes(_earlier_page_again(data, starts))
    with caplog.at_level(logging.WARNING, logger="cluster.worker.outbox"):
        box = Outbox.open(directory)
    assert _deliver(box) == list(range(21, N + 1))
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(f"offset {starts[12]}: seq 5 after seq 12" in m for m in errors), errors
    box.close()


def test_two_events_under_one_seq_are_set_aside_not_resent(
    clean: tuple[bytes, list[int]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Which of the two the worker made is unknown, and the master may hold either: resending
    one could leave the master with the other one's seq taken by it. Both go to
    conflicts.jsonl for the operator, with an ERROR naming both offsets."""
    data, starts = clean
    stranger = _record(50, _event(5000))
    damaged = data[: starts[70]] + stranger + data[starts[70] :]
    box = _open(tmp_path / "box", damaged, caplog)
    assert _deliver(box) == [n for n in range(1, N + 1) if n != 50]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(
        f"seq 50 is held by 2 different records (offsets {starts[49]}, {starts[70]})" in m
        for m in errors
    ), errors
    lines = [
        json.loads(line) for line in (tmp_path / "box" / "conflicts.jsonl").read_text().splitlines()
    ]
    assert [(x["seq"], x["offset"], x["event"]["units"]) for x in lines] == [
        (50, starts[49], 50),
        (50, starts[70], 5000),
    ]
    assert box.append(_event(N + 1)) == N + 1, "seq 50 is never given again either"
    box.close()


def test_the_damaged_file_is_on_disk_before_the_log_is_rewritten(
    clean: tuple[bytes, list[int]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The events dropped from the log live on only in events.log.damaged: a power loss must
    not take that file back while keeping the rewritten log."""
    data, starts = clean
    order: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        order.append(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}")
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        order.append(f"replace {dst}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    box = _open(tmp_path / "box", _record_twice(data, starts), caplog)
    box.close()
    log_path = tmp_path / "box" / "events.log"
    damaged_written = [i for i, s in enumerate(order) if s == f"replace {log_path}.damaged"]
    assert damaged_written, order
    assert f"fsync {tmp_path / 'box'}" in order[damaged_written[0] + 1 :], order
    assert order.index(f"replace {log_path}") > damaged_written[0], order
