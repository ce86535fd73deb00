"""The outbox's search for the next intact record after damage: the same answers as checking
every offset, byte by byte, without checking every offset. And its scan of a whole log, with
the checks inlined: the same records as `_record_end` finds one by one."""

from __future__ import annotations

import logging
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cluster.worker.outbox as outbox_module
from cluster.shared.events import MAX_EVENT_BYTES, WorkReported
from cluster.worker.outbox import Outbox

A = "12D3KooWD6FXdxPeu8Y7TL4snPwAnK2Pc7BuReewmryJYjmiqGSX"
HEADER = outbox_module._REC.size
Damage = Callable[[bytearray, list[int]], None]


def _byte_by_byte(data: bytes, start: int) -> int | None:
    """The search as it was: every offset from `start` on, in order (the reference)."""
    for off in range(start, len(data) - HEADER + 1):
        if outbox_module._record_end(data, off) is not None:
            return off
    return None


def _record_by_record(
    data: bytes,
) -> tuple[list[int], list[tuple[int, bytes]], list[tuple[int, int]], int]:
    """The scan as it was: `_record_end` for each record in turn (the reference)."""
    offsets: list[int] = []
    records: list[tuple[int, bytes]] = []
    damaged: list[tuple[int, int]] = []
    off = good_end = 0
    while off + HEADER <= len(data):
        end = outbox_module._record_end(data, off)
        if end is None:
            resume = outbox_module._next_record(data, off + 1)
            if resume is None:
                break
            damaged.append((off, resume - off))
            off = resume
            continue
        offsets.append(off)
        records.append((outbox_module._REC.unpack_from(data, off)[1], data[off + HEADER : end]))
        off = good_end = end
    return offsets, records, damaged, good_end


def _record(seq: int, payload: bytes) -> bytes:
    return outbox_module._pack_rec(len(payload), seq, outbox_module._crc(seq, payload)) + payload


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[int]]:
    """An outbox file of 100 records, and where each starts."""
    directory = tmp_path_factory.mktemp("clean")
    box = Outbox.open(directory)
    rng = random.Random(7)
    for n in range(100):
        box.append(
            WorkReported(
                devshard_id=f"ds-{rng.randrange(10 ** rng.randrange(1, 6))}",
                node_id=A,
                units=rng.randrange(1, 10 ** rng.randrange(1, 12)),
                epoch=n // 10 + 1,
            )
        )
    box.close()
    data = (directory / "events.log").read_bytes()
    starts, off = [], 0
    while off < len(data):
        starts.append(off)
        end = outbox_module._record_end(data, off)
        assert end is not None
        off = end
    return data, starts


def _flip(field_offset: int) -> Damage:
    def damage(d: bytearray, starts: list[int]) -> None:
        d[starts[5] + field_offset] ^= 0x04

    return damage


def _zero_run(first: int, end_before_record: int, gap: int) -> Damage:
    """Zeros from record `first` to `gap` bytes before the record `end_before_record`."""

    def damage(d: bytearray, starts: list[int]) -> None:
        at, end = starts[first] + 3, starts[end_before_record] - gap
        d[at:end] = bytes(end - at)

    return damage


def _garbage(d: bytearray, starts: list[int]) -> None:
    at = starts[10] + 7
    d[at : at + 1500] = random.Random(3).randbytes(1500)


def _header_lookalikes(d: bytearray, starts: list[int]) -> None:
    """Damage made of record headers: a bad CRC, a length past the file's end (after a run
    of zeros), a length just over the limit."""
    at = starts[20] + 9
    fakes = (
        outbox_module._pack_rec(40, 21, 12345)
        + bytes(40)
        + outbox_module._pack_rec(1 << 19, 21, outbox_module._crc(21, b""))
        + b"\x00" * 30
        + _record(22, b"x" * 300)[:HEADER].replace(b"\x00\x00\x01\x2c", b"\x00\x10\x00\x01", 1)
    )
    d[at : at + len(fakes)] = fakes


def _intact_record_inside_zeros(d: bytearray, starts: list[int]) -> None:
    """A whole intact record in the middle of a zeroed region is found there."""
    at = starts[30] + 1
    d[at : starts[45]] = bytes(starts[45] - at)
    planted = _record(77, b"planted")
    d[at + 700 : at + 700 + len(planted)] = planted


def _empty_record_after_zeros(d: bytearray, starts: list[int]) -> None:
    """The intact record closest to a header of zeros: seq 0, no payload, twelve zero bytes
    and its CRC, at the end of a zeroed region."""
    empty = _record(0, b"")
    at, end = starts[60] + 5, starts[64]
    d[at:end] = bytes(end - at - len(empty)) + empty


def _zero_tail(d: bytearray, starts: list[int]) -> None:
    d[starts[90] + 2 :] = bytes(len(d) - starts[90] - 2)
    d.extend(bytes(5000))  # the file grew, the blocks were never written


def _garbage_tail(d: bytearray, starts: list[int]) -> None:
    d[starts[95] + 30 :] = random.Random(5).randbytes(len(d) - starts[95] - 30)


def _largest_record_after_damage(d: bytearray, starts: list[int]) -> None:
    """A record of exactly MAX_EVENT_BYTES (length field 00 10 00 00) is intact."""
    d[starts[99] + 1] ^= 0xFF
    d.extend(_record(1000, bytes(MAX_EVENT_BYTES)))


DAMAGES: dict[str, Damage] = {
    "length field": _flip(2),
    "seq field": _flip(9),
    "crc field": _flip(13),
    "payload": _flip(HEADER + 4),
    "zeros ending at a record": _zero_run(10, 40, 0),
    **{f"zeros ending {g} bytes before a record": _zero_run(10, 40, g) for g in (1, 3, 15, 16)},
    "a zeroed page": lambda d, s: d.__setitem__(slice(s[3] + 50, s[3] + 4146), bytes(4096)),
    "garbage": _garbage,
    "header lookalikes": _header_lookalikes,
    "an intact record inside zeros": _intact_record_inside_zeros,
    "an empty record after zeros": _empty_record_after_zeros,
    "a zero tail": _zero_tail,
    "a garbage tail": _garbage_tail,
    "the largest record after damage": _largest_record_after_damage,
}


def _damaged(clean: tuple[bytes, list[int]], damage: Damage) -> bytes:
    data = bytearray(clean[0])
    damage(data, clean[1])
    return bytes(data)


@pytest.mark.parametrize("name", DAMAGES)
def test_the_search_finds_what_a_byte_by_byte_scan_finds(
    name: str, clean: tuple[bytes, list[int]]
) -> None:
    data = _damaged(clean, DAMAGES[name])
    # Not from inside the largest record: the reference would take minutes over its payload.
    for start in range(0, len(data) if len(data) < MAX_EVENT_BYTES else len(clean[0]), 11):
        assert outbox_module._next_record(data, start) == _byte_by_byte(data, start), start


@pytest.mark.parametrize("name", ["none", *DAMAGES])
def test_the_scan_finds_what_a_record_by_record_scan_finds(
    name: str, clean: tuple[bytes, list[int]]
) -> None:
    data = clean[0] if name == "none" else _damaged(clean, DAMAGES[name])
    expected = _record_by_record(data)
    assert expected[1], "records were found"
    assert outbox_module._scan(data) == expected


@pytest.mark.parametrize("name", DAMAGES)
def test_opening_a_damaged_outbox_keeps_the_same_records_and_says_the_same(
    name: str,
    clean: tuple[bytes, list[int]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = _damaged(clean, DAMAGES[name])
    results = []
    for search in (outbox_module._next_record, _byte_by_byte):
        monkeypatch.setattr(outbox_module, "_next_record", search)
        directory = tmp_path / "box"
        directory.mkdir()
        (directory / "events.log").write_bytes(data)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cluster.worker.outbox"):
            box = Outbox.open(directory)
        results.append(
            (
                box.pending_after(0, 10**6),
                box.last_seq,
                [(r.levelname, r.getMessage()) for r in caplog.records],
                (directory / "events.log").read_bytes(),
                (directory / "events.log.damaged").exists(),
            )
        )
        box.close()
        shutil.rmtree(directory)
    assert results[0] == results[1]
    assert results[0][2], "the damage was reported"


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["zeros", "random", "flip", "cut", "record"]),
            st.integers(0, 14_000),
            st.integers(1, 3000),
            st.integers(0, 2**32),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_any_damage_is_searched_and_scanned_as_one_by_one(
    clean: tuple[bytes, list[int]], damages: list[tuple[str, int, int, int]]
) -> None:
    data = bytearray(clean[0])
    for kind, at, size, seed in damages:
        at %= len(data) + 1
        if kind == "zeros":
            data[at : at + size] = bytes(len(data[at : at + size]))
        elif kind == "random":
            data[at : at + size] = random.Random(seed).randbytes(len(data[at : at + size]))
        elif kind == "flip" and at < len(data):
            data[at] ^= 1 << seed % 8
        elif kind == "cut":
            del data[at : at + size]
        elif kind == "record":
            data[at:at] = _record(seed, random.Random(seed).randbytes(size % 64))
    blob = bytes(data)
    for start in {1, *(min(at, len(blob)) for _, at, _, _ in damages)}:
        assert outbox_module._next_record(blob, start) == _byte_by_byte(blob, start)
    assert outbox_module._scan(blob) == _record_by_record(blob)


def test_a_header_of_zeros_is_never_intact() -> None:
    """Why runs of zeros may be skipped: the CRC of seq 0 and no payload is not 0."""
    assert outbox_module._crc(0, b"") != 0
    assert outbox_module._record_end(bytes(64), 0) is None


def test_the_search_checks_only_offsets_that_can_hold_a_record(
    clean: tuple[bytes, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large damaged region costs C-speed searches, not a check per byte: a megabyte of
    zeros (blocks a crash left unwritten) and 256 KiB of garbage cost a few hundred checks
    in all, where a check per offset would make 1.3 million."""
    data, starts = clean
    damaged = bytes(1 << 20) + random.Random(9).randbytes(1 << 18) + data[starts[3] :]
    checks = 0
    check = outbox_module._record_end

    def counting(data: bytes, off: int) -> int | None:
        nonlocal checks
        checks += 1
        return check(data, off)

    monkeypatch.setattr(outbox_module, "_record_end", counting)
    assert outbox_module._next_record(damaged, 0) == (1 << 20) + (1 << 18)
    # Garbage holds a plausible length field (00 then at most 10 hex) at 17 offsets in 65,536.
    assert checks < 500, checks
