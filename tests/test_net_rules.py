"""Membership, admission, identity and outbox rules, without a network."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest
from libp2p.network.stream.exceptions import StreamReset

from cluster.master.admission import (
    AdmissionError,
    check_event_sizes,
    check_worker_batch,
    check_worker_columns,
    check_worker_event,
)
from cluster.net.host import FramedStream, error_of, safe_handler
from cluster.net.identity import IdentityError, load_identity, load_or_create_seed
from cluster.net.membership import (
    Membership,
    MembershipConfigError,
    load_allow_file,
    load_secret_file,
    new_nonce,
    validate_peer_id,
)
from cluster.net.protocol import CONTENT_REFUSALS, MAX_BOOT_ID_CHARS, MAX_RUNNER_DIGEST_CHARS
from cluster.shared.events import (
    GPU_LIMITS,
    MAX_GPU_MEMORY_MB,
    MAX_GPU_TEMPERATURE_C,
    MAX_HOSTNAME_CHARS,
    MAX_ID_CHARS,
    MAX_MISSED_SLOTS,
    MAX_NODE_GPUS,
    MAX_REASON_CHARS,
    MAX_WORK_UNITS,
    MIN_GPU_TEMPERATURE_C,
    EpochStarted,
    Event,
    GpuInfo,
    NodeGatheredInfo,
    NodeHeartbeat,
    NodeInfo,
    NodeStopping,
    RunnerSelfTestCompleted,
    RunnerStatus,
    RunnerStatusUpdated,
    WorkMissed,
    WorkReported,
)
from cluster.shared.humanize import error_text
from cluster.worker.outbox import Outbox, OutboxError

A = "12D3KooWD6FXdxPeu8Y7TL4snPwAnK2Pc7BuReewmryJYjmiqGSX"
B = "12D3KooWKGJ9FFG1hRwr25njMwqkie1TmER523ekRHZLbrSrytoD"
SECRET = b"0123456789abcdef0123"


def test_secret_challenge_binds_nonce_and_both_peers() -> None:
    m = Membership(secret=SECRET)
    n = new_nonce()
    good = m.worker_proof(n, A, B)
    assert m.check_worker_proof(good, n, A, B) is None
    assert m.check_worker_proof(good, new_nonce(), A, B) is not None  # replay on a new nonce
    assert m.check_worker_proof(good, n, B, B) is not None  # another peer
    assert "failed the cluster-secret" in str(
        Membership(secret=b"x" * 16).check_worker_proof(good, n, A, B)
    )
    assert m.check_master_proof(m.master_proof(n, B, A), n, B, A) is None
    assert m.check_master_proof(good, n, B, A) is not None  # worker proof is not a master proof


def test_allow_list_and_config_validation(tmp_path: Path) -> None:
    m = Membership(allowed=frozenset({A}))
    assert m.refuse_reason(A) is None
    assert "not on the cluster allow-list" in str(m.refuse_reason(B))
    with pytest.raises(MembershipConfigError, match="allow-list of peer ids, a cluster secret"):
        Membership()
    with pytest.raises(MembershipConfigError, match="at least 16"):
        Membership(secret=b"short")
    f = tmp_path / "allow"
    f.write_text(f"# members\n{A}  # first\n\n{B}\n")
    assert load_allow_file(f) == {A, B}
    f.write_text("not-a-peer-id\n")
    with pytest.raises(MembershipConfigError, match=r"allow:1: 'not-a-peer-id' is not a libp2p"):
        load_allow_file(f)
    with pytest.raises(MembershipConfigError, match=r"--allow: '.*\\n' is not a libp2p"):
        validate_peer_id(A + "\n", "--allow")  # a regex `$` would let the newline by
    with pytest.raises(MembershipConfigError, match="cannot read allow-list"):
        load_allow_file(tmp_path / "missing")
    for nobody in ("", "\n\n", "# members, to come\n  \n"):  # read as no one: the CLI judges
        f.write_text(nobody)  # the whole list (`--allow` too: tests/test_cli_validation.py)
        assert load_allow_file(f) == frozenset()
    s = tmp_path / "secret"
    s.write_bytes(b"  tiny \n")
    with pytest.raises(MembershipConfigError, match="holds 4 bytes"):
        load_secret_file(s)


def test_admission_binds_origin_and_keeps_decisions_for_the_master() -> None:
    check_worker_event(A, 1, NodeHeartbeat(node_id=A))
    with pytest.raises(AdmissionError, match=f"peer {A} may not speak for node {B}") as e:
        check_worker_event(A, 2, WorkReported(devshard_id="d", node_id=B, units=1, epoch=0))
    assert e.value.code == "forbidden-origin"
    with pytest.raises(AdmissionError, match=r"EpochStarted .* may only be issued by the master"):
        check_worker_event(A, 3, EpochStarted(epoch=1, start_ms=0, end_ms=1, seed=0))
    with pytest.raises(AdmissionError, match=r"sequence number 0 must be 1\.\.9223372036854775807"):
        check_worker_event(A, 0, NodeHeartbeat(node_id=A))


def test_admission_bounds_sequence_numbers_and_work_amounts() -> None:
    """What State keeps must stay encodable: a sequence number past int64 would make every
    later snapshot undecodable, and unbounded work amounts would overflow the ledger."""
    hb = NodeHeartbeat(node_id=A)
    check_worker_event(A, 2**63 - 1, hb)
    with pytest.raises(AdmissionError, match=f"sequence number {2**63} must be") as err:
        check_worker_event(A, 2**63, hb)
    assert err.value.code == "bad-seq"
    check_worker_event(
        A, 1, WorkReported(devshard_id="d", node_id=A, units=MAX_WORK_UNITS, epoch=0)
    )
    for units in (0, -3, MAX_WORK_UNITS + 1, 2**64 - 1):
        with pytest.raises(AdmissionError, match=f"carries {units} units: must be 1..") as err:
            check_worker_event(A, 1, WorkReported(devshard_id="d", node_id=A, units=units, epoch=0))
        assert err.value.code == "bad-units"
    check_worker_event(
        A, 1, WorkMissed(devshard_id="d", node_id=A, epoch=0, count=MAX_MISSED_SLOTS)
    )
    for count in (0, MAX_MISSED_SLOTS + 1):
        with pytest.raises(AdmissionError, match=f"counts {count} slots: must be 1..") as err:
            check_worker_event(A, 1, WorkMissed(devshard_id="d", node_id=A, epoch=0, count=count))
        assert err.value.code == "bad-count"


def test_only_the_master_excuses_missed_work() -> None:
    """A worker's WorkMissed marked excused was admitted: only the master decides an excuse
    (the one maintenance rule), so it is refused, saying what was wrong."""
    check_worker_event(A, 1, WorkMissed(devshard_id="d", node_id=A, epoch=1))
    excused = WorkMissed(devshard_id="d", node_id=A, epoch=1, excused=True)
    why = r"WorkMissed \(seq 4\) is marked excused: only the master excuses"
    with pytest.raises(AdmissionError, match=why) as err:
        check_worker_event(A, 4, excused)
    assert err.value.code == "forbidden-event" and err.value.code in CONTENT_REFUSALS
    hb = NodeHeartbeat(node_id=A)
    with pytest.raises(AdmissionError, match=r"seq 2\) is marked excused") as err:
        check_worker_columns(A, [1, 2], [hb, excused])  # the fast path too


_FAILED = RunnerStatusUpdated(
    runner_id="ds-1-s2/0", node_id=A, status=RunnerStatus.FAILED, devshard_id="ds-1-s2"
)
_TESTED = RunnerSelfTestCompleted(node_id=A, runner_kind="simulated", passed=False)
_MISSED = WorkMissed(devshard_id="ds-1-s2", node_id=A, epoch=1)
_WORK = WorkReported(devshard_id="ds-1-s2", node_id=A, units=1, epoch=1)
_STOPPING = NodeStopping(node_id=A, boot_id="0123456789abcdef")
_GPU = GpuInfo(index=0, name="NVIDIA H100", uuid="GPU-1", memory_total_mb=1, memory_used_mb=0)
_INFO = NodeGatheredInfo(node_id=A, source="gpu", info=NodeInfo(hostname="h1", gpus=(_GPU,)))


def _with(event: Event, field: str, value: object) -> Event:
    """`event` with one field, or one field of its `info` ("info.hostname"), replaced."""
    if field.startswith("info."):
        assert isinstance(event, NodeGatheredInfo)
        info = msgspec.structs.replace(event.info, **{field.removeprefix("info."): value})
        return msgspec.structs.replace(event, info=info)
    return msgspec.structs.replace(event, **{field: value})


def _refuses_text(event: Event, field: str, limit: int) -> None:
    """`field` of `event` at `limit` characters is admitted; one more is refused, naming the
    event kind, its seq, the field, its length and the limit, with a code the worker sets
    aside (worker/client.py: a content refusal is never resent)."""
    check_worker_event(A, 1, _with(event, field, "x" * limit))
    long = _with(event, field, "x" * (limit + 1))
    kind = type(event).__name__
    why = f"{kind} \\(seq 7\\) field {field} holds {limit + 1} characters: the limit is {limit}$"
    with pytest.raises(AdmissionError, match=why) as err:
        check_worker_event(A, 7, long)
    assert err.value.code == "forbidden-event" and err.value.code in CONTENT_REFUSALS
    with pytest.raises(AdmissionError, match=why):
        check_worker_columns(A, [6, 7], [NodeHeartbeat(node_id=A), long])  # the fast path too


def test_failure_reasons_are_bounded_as_honest_workers_clip_them() -> None:
    """A reason was bounded only by the event size (1 MiB): a modified worker could write a
    megabyte per event into the log (and, through the planner, into WorkMissed reasons)."""
    for event in (_FAILED, _TESTED, _MISSED, _STOPPING):
        _refuses_text(event, "reason", MAX_REASON_CHARS)


_BOUNDED: tuple[tuple[Event, str, int], ...] = (
    (_FAILED, "reason", MAX_REASON_CHARS),
    (_FAILED, "runner_id", MAX_ID_CHARS),
    (_FAILED, "devshard_id", MAX_ID_CHARS),
    (_TESTED, "reason", MAX_REASON_CHARS),
    (_TESTED, "runner_kind", MAX_ID_CHARS),
    (_TESTED, "config_digest", MAX_RUNNER_DIGEST_CHARS),
    (_WORK, "devshard_id", MAX_ID_CHARS),
    (_MISSED, "devshard_id", MAX_ID_CHARS),
    (_MISSED, "reason", MAX_REASON_CHARS),
    (_STOPPING, "boot_id", MAX_BOOT_ID_CHARS),
    (_STOPPING, "reason", MAX_REASON_CHARS),
    (_INFO, "source", MAX_ID_CHARS),
    (_INFO, "info.hostname", MAX_HOSTNAME_CHARS),
)


def test_ids_a_worker_names_or_echoes_are_bounded() -> None:
    for event, field in (
        (_FAILED, "runner_id"),
        (_FAILED, "devshard_id"),
        (_WORK, "devshard_id"),
        (_MISSED, "devshard_id"),
        (_TESTED, "runner_kind"),
        (_INFO, "source"),
    ):
        _refuses_text(event, field, MAX_ID_CHARS)
    # Bounded as the hello's fields they are compared with.
    _refuses_text(_STOPPING, "boot_id", MAX_BOOT_ID_CHARS)
    _refuses_text(_TESTED, "config_digest", MAX_RUNNER_DIGEST_CHARS)


def test_machine_info_text_is_bounded() -> None:
    _refuses_text(_INFO, "info.hostname", MAX_HOSTNAME_CHARS)
    check_worker_event(A, 1, _with(_INFO, "info.gpus", (_GPU,) * MAX_NODE_GPUS))
    many = _with(_INFO, "info.gpus", (_GPU,) * (MAX_NODE_GPUS + 1))
    why = rf"NodeGatheredInfo \(seq 3\) field info.gpus lists {MAX_NODE_GPUS + 1} GPUs: the limit"
    with pytest.raises(AdmissionError, match=why):
        check_worker_event(A, 3, many)
    for field in ("name", "uuid"):
        check_worker_event(A, 1, _with(_INFO, "info.gpus", (_GPU, _with_gpu(field, MAX_ID_CHARS))))
        bad = _with(_INFO, "info.gpus", (_GPU, _with_gpu(field, MAX_ID_CHARS + 1)))
        why = rf"field info.gpus\[1\]\.{field} holds {MAX_ID_CHARS + 1} characters: the limit is"
        with pytest.raises(AdmissionError, match=why) as err:
            check_worker_event(A, 3, bad)
        assert err.value.code == "forbidden-event"


#: Each GPU number at its bounds, and just beyond (the same order as GPU_LIMITS).
_GPU_BOUNDS: tuple[tuple[str, int, int], ...] = (
    ("index", 0, MAX_NODE_GPUS - 1),
    ("memory_total_mb", 0, MAX_GPU_MEMORY_MB),
    ("memory_used_mb", 0, MAX_GPU_MEMORY_MB),
    ("utilization_pct", 0, 100),
    ("temperature_c", MIN_GPU_TEMPERATURE_C, MAX_GPU_TEMPERATURE_C),
)


def _gpu_reading(field: str, value: int | None) -> Event:
    """An info event of two GPUs, the second with `field` set to `value`."""
    return _with(_INFO, "info.gpus", (_GPU, msgspec.structs.replace(_GPU, **{field: value})))


def test_gpu_readings_are_bounded() -> None:
    """A GPU's numbers were unbounded (only the event size capped them): a worker could log a
    utilisation of 10**9 percent, a temperature of -2**63 or 2**64-1 MiB of memory, shown as
    they were by `cluster status` and the dashboard. Each is refused beyond its bound, naming
    the kind, seq, field, value and bound, on both paths; an honest reading never is."""
    assert tuple(GPU_LIMITS) == _GPU_BOUNDS
    for field, low, high in _GPU_BOUNDS:
        for ok in (low, high):
            check_worker_event(A, 1, _gpu_reading(field, ok))
        for bad in (low - 1, high + 1, -(2**63), 2**64 - 1):
            event = _gpu_reading(field, bad)
            why = (
                rf"^NodeGatheredInfo \(seq 5\) field info\.gpus\[1\]\.{field} is {bad}: "
                rf"must be {low}\.\.{high}$"
            )
            with pytest.raises(AdmissionError, match=why) as err:
                check_worker_event(A, 5, event)
            assert err.value.code == "forbidden-event" and err.value.code in CONTENT_REFUSALS
            with pytest.raises(AdmissionError, match=why):  # the fast path too
                check_worker_columns(A, [4, 5], [NodeHeartbeat(node_id=A), event])
    for field in ("utilization_pct", "temperature_c"):  # not reported: nothing to bound
        check_worker_event(A, 1, _gpu_reading(field, None))
    h100 = GpuInfo(
        index=7,
        name="NVIDIA H100 80GB HBM3",
        uuid="GPU-5c3a",
        memory_total_mb=81559,
        memory_used_mb=81559,
        utilization_pct=100,
        temperature_c=89,
    )
    check_worker_event(A, 1, _with(_INFO, "info.gpus", (h100,) * 8))


def test_self_test_timings_are_bounded() -> None:
    """A self-test's timings were unbounded: load_ms=2**64-1 and probe_ms=-2**63 were
    logged, kept in State and served by /api/state beyond what JavaScript represents exactly
    (malicious-member review). Each is refused outside 0..a day, naming the field, on both
    paths; an honest timing never is."""
    day_ms = 24 * 60 * 60 * 1000
    for field in ("load_ms", "probe_ms", "request_ms"):
        for ok in (0, day_ms):
            check_worker_event(A, 1, msgspec.structs.replace(_TESTED, **{field: ok}))
        for bad in (-1, day_ms + 1, -(2**63), 2**64 - 1):
            event = msgspec.structs.replace(_TESTED, **{field: bad})
            why = (
                rf"^RunnerSelfTestCompleted \(seq 5\) field {field} is {bad} ms: "
                rf"must be 0\.\.{day_ms} "
            )
            with pytest.raises(AdmissionError, match=why) as err:
                check_worker_event(A, 5, event)
            assert err.value.code == "forbidden-event" and err.value.code in CONTENT_REFUSALS
            with pytest.raises(AdmissionError, match=why):  # the fast path too
                check_worker_columns(A, [4, 5], [NodeHeartbeat(node_id=A), event])


def _with_gpu(field: str, length: int) -> GpuInfo:
    return msgspec.structs.replace(_GPU, **{field: "g" * length})


def test_keys_a_worker_makes_must_be_printable_but_free_text_need_not() -> None:
    """Keys the worker makes itself (hex boot ids and digests, fixed names) are refused with a
    control character; reasons (a program's stderr) and hostnames keep theirs, escaped where
    shown; devshard ids too: the master made them, and a session named before names were
    checked whole could end in a newline -- its work must still be taken."""
    keys: tuple[tuple[Event, str], ...] = (
        (_STOPPING, "boot_id"),
        (_TESTED, "config_digest"),
        (_TESTED, "runner_kind"),
        (_INFO, "source"),
    )
    for event, field in keys:
        bad = _with(event, field, "ab\x1b[2Jcd")
        why = rf"\(seq 2\) field {field} holds the control or format character '\\x1b' at 2"
        with pytest.raises(AdmissionError, match=why) as err:
            check_worker_event(A, 2, bad)
        assert err.value.code == "forbidden-event"
    free: tuple[tuple[Event, str], ...] = (
        (_FAILED, "reason"),
        (_STOPPING, "reason"),
        (_INFO, "info.hostname"),
        (_WORK, "devshard_id"),
        (_FAILED, "runner_id"),
    )
    for event, field in free:
        check_worker_event(A, 1, _with(event, field, "line one\nline\ttwo\x1b[0m"))


def test_batches_must_count_up() -> None:
    hb = NodeHeartbeat(node_id=A)
    check_worker_batch(A, [(5, hb), (6, hb), (9, hb)])  # gaps are fine (duplicates dropped)
    with pytest.raises(AdmissionError, match="8 follows 9") as err:
        check_worker_batch(A, [(7, hb), (9, hb), (8, hb)])
    assert err.value.code == "bad-seq"
    with pytest.raises(AdmissionError, match="may not speak for node"):
        check_worker_batch(A, [(1, hb), (2, NodeHeartbeat(node_id=B))])


@pytest.mark.parametrize(
    ("seq", "event"),
    [
        (0, NodeHeartbeat(node_id=A)),
        (1, NodeHeartbeat(node_id=B)),
        (1, EpochStarted(epoch=1, start_ms=0, end_ms=1, seed=0)),
        (1, WorkReported(devshard_id="d", node_id=A, units=0, epoch=0)),
        (1, WorkMissed(devshard_id="d", node_id=A, epoch=0, count=0)),
        (1, NodeStopping(node_id=A, boot_id="b", reason="r" * (MAX_REASON_CHARS + 1))),
        (1, NodeStopping(node_id=A, boot_id="b\n")),
    ],
)
def test_every_admission_refusal_is_one_the_worker_sets_aside(seq: int, event: Event) -> None:
    """The worker tells a refused batch from a network fault by its code: a refusal it took
    for a fault would be resent forever (tests/test_worker_refused_events.py)."""
    with pytest.raises(AdmissionError) as err:
        check_worker_event(A, seq, event)
    assert err.value.code in CONTENT_REFUSALS


def _verdict(check: Callable[[], None]) -> tuple[str, str] | None:
    try:
        check()
    except AdmissionError as exc:
        return exc.code, str(exc)
    return None


def _too_long_batches(hb: Event, work: Event) -> list[list[tuple[int, Event]]]:
    """For each bounded field, a batch of one event with it one character too long, and a
    batch of several kinds that holds that event."""
    batches: list[list[tuple[int, Event]]] = []
    for event, field, limit in _BOUNDED:
        long = _with(event, field, "x" * (limit + 1))
        batches += [[(1, long)], [(1, hb), (2, work), (3, long), (4, hb)]]
    return batches


_GPU_EDGES = [(f, v) for f, low, high in _GPU_BOUNDS for v in (low, high)]


def test_column_check_judges_batches_exactly_as_the_pair_check() -> None:
    hb = NodeHeartbeat(node_id=A)
    work = WorkReported(devshard_id="d", node_id=A, units=MAX_WORK_UNITS, epoch=1)
    missed = WorkMissed(devshard_id="d", node_id=A, epoch=1, count=MAX_MISSED_SLOTS)
    good: list[list[tuple[int, Event]]] = [
        [],
        [(5, hb), (6, hb), (9, hb)],
        [(1, work), (2, missed), (2**63 - 1, hb)],
        # Every text at its bound, and free text with control characters (escaped when shown).
        [
            (1, _with(_FAILED, "reason", "r\n" * (MAX_REASON_CHARS // 2))),
            (2, _with(_TESTED, "config_digest", "f" * MAX_RUNNER_DIGEST_CHARS)),
            (3, _with(_STOPPING, "boot_id", "b" * MAX_BOOT_ID_CHARS)),
            (4, _with(_INFO, "info.gpus", (_with_gpu("name", MAX_ID_CHARS),) * MAX_NODE_GPUS)),
            (5, _with(_INFO, "info.hostname", "\x1b" * MAX_HOSTNAME_CHARS)),
            (6, _with(_WORK, "devshard_id", "ds-1-s2-x\n")),
            (7, _MISSED),
            (8, _INFO),
        ],
        [(1, _with(_INFO, "info", NodeInfo())), (2, _INFO)],  # no hostname, no GPUs
        # Every GPU number at its bounds, and optional readings not reported.
        [(i + 1, _gpu_reading(f, v)) for i, (f, v) in enumerate(_GPU_EDGES)],
        [(1, _gpu_reading("utilization_pct", None)), (2, _gpu_reading("temperature_c", None))],
    ]
    bad: list[list[tuple[int, Event]]] = [
        [(7, hb), (9, hb), (8, hb)],
        [(3, hb), (3, hb)],
        [(0, hb), (1, hb)],
        [(1, hb), (2, NodeHeartbeat(node_id=B))],
        [(1, hb), (2, EpochStarted(epoch=1, start_ms=0, end_ms=1, seed=0))],
        [(1, WorkReported(devshard_id="d", node_id=B, units=1, epoch=0))],
        # The bounds that keep State encodable hold on the fast path too.
        [(1, hb), (2**63, hb)],
        [(1, hb), (2**64 - 1, hb)],
        [(1, work), (2, msgspec.structs.replace(work, units=MAX_WORK_UNITS + 1))],
        [(1, msgspec.structs.replace(work, units=-5))],
        [(1, missed), (2, msgspec.structs.replace(missed, count=0))],
        [(1, msgspec.structs.replace(missed, excused=True))],
        # Text bounds: each bounded field, alone and among other kinds.
        *_too_long_batches(hb, work),
        [(1, _with(_INFO, "info.gpus", (_GPU,) * (MAX_NODE_GPUS + 1)))],
        [(1, _INFO), (2, _with(_INFO, "info.gpus", (_GPU, _with_gpu("name", MAX_ID_CHARS + 1))))],
        [(1, hb), (2, _with(_INFO, "info.gpus", (_with_gpu("uuid", MAX_ID_CHARS + 1),)))],
        # GPU numbers: each beyond its bound, alone and among other kinds.
        *(
            batch
            for field, low, high in _GPU_BOUNDS
            for value in (low - 1, high + 1)
            for batch in (
                [(1, _gpu_reading(field, value))],
                [(1, hb), (2, _gpu_reading(field, value)), (3, work)],
            )
        ),
        # Keys a worker makes must be printable, on both paths.
        [(1, hb), (2, _with(_STOPPING, "boot_id", "b\x00"))],
        [(1, _with(_TESTED, "config_digest", "\u202e"))],
        [(1, _INFO), (2, _with(_INFO, "source", "gpu\n"))],
        [(1, _with(_TESTED, "runner_kind", "sim\x7f")), (2, _TESTED)],
    ]
    for pairs in good + bad:
        seqs, events = [s for s, _ in pairs], [e for _, e in pairs]
        columns = _verdict(partial(check_worker_columns, A, seqs, events))
        assert columns == _verdict(partial(check_worker_batch, A, pairs)), pairs
        assert (columns is None) == (pairs in good), pairs


def test_identity_is_stable_and_validated(tmp_path: Path) -> None:
    _, first = load_identity(tmp_path)
    _, again = load_identity(tmp_path)
    assert first == again and first.startswith("12D3KooW")
    assert (tmp_path / "node.key").stat().st_mode & 0o777 == 0o600
    (tmp_path / "node.key").write_bytes(b"short")
    with pytest.raises(IdentityError, match="holds 5 bytes; expected a 32-byte Ed25519 seed"):
        load_or_create_seed(tmp_path)


def test_outbox_damage_in_the_middle_loses_only_the_damaged_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox.open(tmp_path)
    for n in range(10):
        box.append(WorkReported(devshard_id="d", node_id=A, units=n + 1, epoch=1))
    box.close()
    path = tmp_path / "events.log"
    data = bytearray(path.read_bytes())
    record = len(data) // 10
    data[2 * record + record // 2] ^= 0x10  # one bit in the third record
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, logger="cluster.worker.outbox"):
        box = Outbox.open(tmp_path)
    assert [s for s, _ in box.pending_after(0, 100)] == [1, 2, 4, 5, 6, 7, 8, 9, 10]
    assert box.last_seq == 10 and box.append(NodeHeartbeat(node_id=A)) == 11
    assert any("1 damaged region(s) skipped" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "events.log.damaged").read_bytes() == bytes(data)  # kept for a look
    box.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cluster.worker.outbox"):
        box = Outbox.open(tmp_path)  # the log was rewritten: clean from now on
    assert [s for s, _ in box.pending_after(0, 100)] == [1, 2, 4, 5, 6, 7, 8, 9, 10, 11]
    assert not caplog.records
    box.close()


def test_outbox_survives_reopen_acks_and_torn_tail(tmp_path: Path) -> None:
    box = Outbox.open(tmp_path)
    seqs = [box.append(NodeHeartbeat(node_id=A)) for _ in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    box.ack(2)
    box.close()
    # A crash mid-write leaves half a record at the end.
    with open(tmp_path / "events.log", "ab") as f:
        f.write(b"\x00\x00\x00\x10\x00\x00")
    box = Outbox.open(tmp_path)
    assert [s for s, _ in box.pending_after(0, 100)] == [3, 4, 5]
    assert box.append(NodeHeartbeat(node_id=A)) == 6
    box.ack(6)
    assert len(box) == 0 and os.path.getsize(tmp_path / "events.log") == 0
    box.close()
    box = Outbox.open(tmp_path)  # seqs never go back, even with an empty log
    assert box.append(NodeHeartbeat(node_id=A)) == 7
    box.skip_to(20)  # the master already holds up to 20 (e.g. the outbox was restored)
    assert len(box) == 0 and box.append(NodeHeartbeat(node_id=A)) == 21
    box.close()


def test_outbox_compaction_keeps_exactly_the_unacknowledged_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cluster.worker.outbox as outbox_module

    monkeypatch.setattr(outbox_module, "COMPACT_BYTES", 1000)
    box = Outbox.open(tmp_path)
    events = [NodeHeartbeat(node_id=f"{A}-{k}") for k in range(200)]
    for ev in events:
        box.append(ev)
    size = os.path.getsize(tmp_path / "events.log")
    box.ack(150)  # garbage (150 records) > max(1000 bytes, what is pending): compacted
    assert os.path.getsize(tmp_path / "events.log") < size // 3
    box.append(NodeHeartbeat(node_id=A))  # appends continue after the copied tail
    expected = [(151 + k, ev) for k, ev in enumerate([*events[150:], NodeHeartbeat(node_id=A)])]
    assert [
        (s, msgspec.msgpack.decode(p, type=NodeHeartbeat)) for s, p in box.pending_after(0, 500)
    ] == expected
    box.close()
    box = Outbox.open(tmp_path)  # and the compacted file reads back the same, CRCs and all
    assert [
        (s, msgspec.msgpack.decode(p, type=NodeHeartbeat)) for s, p in box.pending_after(0, 500)
    ] == expected
    assert box.append(NodeHeartbeat(node_id=A)) == 202
    box.close()


def _crash(box: Outbox) -> None:
    """What a kill -9 leaves: the files as they are, the descriptors (and the lock) gone."""
    os.close(box._fd)
    os.close(box._lock_fd)


def test_a_second_worker_on_the_same_data_directory_is_refused(tmp_path: Path) -> None:
    box = Outbox.open(tmp_path)
    with pytest.raises(OutboxError, match="in use by another worker process"):
        Outbox.open(tmp_path)
    box.close()
    Outbox.open(tmp_path).close()  # free again once the first is closed


def test_outbox_watermark_may_lag_but_seqs_never_go_back(tmp_path: Path) -> None:
    box = Outbox.open(tmp_path)
    for _ in range(10):
        box.append(NodeHeartbeat(node_id=A))
    box.ack(4)  # kept in memory only: the records are still in events.log
    assert box.acked == 4
    _crash(box)  # no close(), nothing more written
    box = Outbox.open(tmp_path)
    # Records the master already holds are offered again (it drops them as duplicates).
    assert box.acked <= 4 and [s for s, _ in box.pending_after(0, 100)][-6:] == list(range(5, 11))
    box.skip_to(30)  # the master holds up to 30: the log empties, the watermark is written
    _crash(box)
    box = Outbox.open(tmp_path)
    assert box.append(NodeHeartbeat(node_id=A)) == 31
    box.close()


def test_an_exception_without_a_message_is_named_without_a_dangling_colon() -> None:
    """A bare StreamReset was logged `submit handler ended: StreamReset: ` (and sent to a
    peer as "StreamReset: "): nothing after the colon."""
    assert error_text(StreamReset()) == "StreamReset"
    assert error_text(ValueError("bad")) == "ValueError: bad"
    assert error_of(StreamReset()) == ("internal", "StreamReset")


@pytest.mark.anyio
async def test_a_handler_ended_by_a_bare_reset_logs_just_its_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(_fs: FramedStream) -> None:
        raise StreamReset()

    async def nothing(*_args: object) -> bytes:
        return b""

    peer = SimpleNamespace(to_base58=lambda: "12D3KooWPeer")
    stream = SimpleNamespace(read=nothing, reset=nothing, muxed_conn=SimpleNamespace(peer_id=peer))
    with caplog.at_level(logging.INFO, logger="cluster.net.host"):
        await safe_handler(handler, "submit")(stream)
    assert [r.getMessage() for r in caplog.records] == ["submit handler ended: StreamReset"]


def test_an_event_no_replica_frame_could_carry_is_too_large_whatever_its_fields() -> None:
    """The size bound stays behind the field bounds (which now refuse the usual culprit, a
    huge reason, first): whatever makes an event outgrow MAX_EVENT_BYTES, it is refused."""
    small = RunnerStatusUpdated(runner_id="x/0", node_id="n", status=RunnerStatus.FAILED)
    check_event_sizes([small])
    huge = msgspec.structs.replace(small, reason="r" * (3 << 20))
    with pytest.raises(AdmissionError) as err:
        check_event_sizes([small, huge])
    assert err.value.code == "too-large"
    assert str(err.value).startswith("RunnerStatusUpdated of ")
