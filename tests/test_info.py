"""Info gathering: real probes, per-source schedules, and one hung source never silencing the
others."""

from __future__ import annotations

import itertools
import logging
import threading
from pathlib import Path

import anyio
import pytest

from cluster.shared.events import MAX_NODE_SLOTS, Event, NodeGatheredInfo, NodeInfo
from cluster.worker.gpu import NvmlGpuProbe
from cluster.worker.info import (
    DEFAULT_INTERVALS_S,
    InfoConfig,
    InfoConfigError,
    InfoGatherer,
    InfoSource,
    default_sources,
    parse_stall,
)

NODE = "node-a"


class Collector:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def from_source(self, name: str) -> list[NodeGatheredInfo]:
        return [e for e in self.events if isinstance(e, NodeGatheredInfo) and e.source == name]


def _counting_probe() -> InfoSource:
    counter = itertools.count(1)
    return InfoSource(
        name="counter",
        probe=lambda: NodeInfo(cpu_percent=float(next(counter))),
        interval_s=0.01,
        timeout_s=10.0,
    )


async def _until(condition: object, timeout_s: float = 10.0) -> None:
    """Wait, bounded, until `condition()` holds."""
    assert callable(condition)
    with anyio.fail_after(timeout_s):
        while not condition():
            await anyio.sleep(0.005)


# --------------------------------------------------------------------------------------------
# Real probes
# --------------------------------------------------------------------------------------------


def test_default_sources_probe_this_machine(tmp_path: Path) -> None:
    config = InfoConfig(data_dir=tmp_path, slots=4, slot_memory_mb=2048)
    sources = {s.name: s for s in default_sources(config)}
    assert set(sources) == set(DEFAULT_INTERVALS_S)
    host = sources["host"].probe()
    assert host.hostname and host.cpu_count and host.cpu_count >= 1
    assert (host.slots, host.slot_memory_mb) == (4, 2048)
    assert host.memory_total_mb is None  # a source fills only its own fields
    assert sources["cpu"].probe().cpu_percent is not None
    memory = sources["memory"].probe()
    assert memory.memory_total_mb and memory.memory_available_mb is not None
    assert 0 < memory.memory_available_mb <= memory.memory_total_mb
    disk = sources["disk"].probe()
    assert disk.disk_total_mb and disk.disk_free_mb is not None
    assert disk.disk_free_mb <= disk.disk_total_mb
    network = sources["network"].probe()
    assert network.net_bytes_sent is not None and network.net_bytes_recv is not None
    gpu = sources["gpu"].probe()
    assert gpu.gpus is not None  # () on a machine without NVML: "no GPUs" is a fact too


def test_gpu_source_reports_no_gpus_without_nvml(tmp_path: Path) -> None:
    class NoDriver:
        def nvmlInit(self) -> None:
            raise OSError("NVML Shared Library Not Found")

    config = InfoConfig(data_dir=tmp_path, slots=1, slot_memory_mb=1)
    gpu = {s.name: s for s in default_sources(config, NvmlGpuProbe(NoDriver()))}["gpu"]
    assert gpu.probe() == NodeInfo(gpus=())


def test_disk_probe_of_a_missing_dir_fails_clearly(tmp_path: Path) -> None:
    config = InfoConfig(data_dir=tmp_path / "missing", slots=1, slot_memory_mb=1)
    disk = {s.name: s for s in default_sources(config)}["disk"]
    with pytest.raises(FileNotFoundError):
        disk.probe()


def test_config_intervals_and_timeout_apply(tmp_path: Path) -> None:
    config = InfoConfig(
        data_dir=tmp_path, slots=1, slot_memory_mb=1, intervals_s={"cpu": 0.5}, timeout_s=2.0
    )
    sources = {s.name: s for s in default_sources(config)}
    assert sources["cpu"].interval_s == 0.5
    assert sources["host"].interval_s == DEFAULT_INTERVALS_S["host"]
    assert all(s.timeout_s == 2.0 for s in sources.values())


# --------------------------------------------------------------------------------------------
# Validation of configuration
# --------------------------------------------------------------------------------------------


def test_parse_stall() -> None:
    assert parse_stall("disk:60") == ("disk", 60.0)
    assert parse_stall("all:0.5") == ("all", 0.5)
    with pytest.raises(InfoConfigError, match="SOURCE:SECONDS"):
        parse_stall("disk")
    with pytest.raises(InfoConfigError, match="not a number"):
        parse_stall("disk:soon")
    with pytest.raises(InfoConfigError, match="unknown info source 'dsk'"):
        parse_stall("dsk:5")
    with pytest.raises(InfoConfigError, match=">= 0"):
        parse_stall("disk:-1")
    with pytest.raises(InfoConfigError, match=">= 0"):
        parse_stall("disk:nan")


def test_info_config_is_validated(tmp_path: Path) -> None:
    with pytest.raises(InfoConfigError, match="slots"):
        InfoConfig(data_dir=tmp_path, slots=-1, slot_memory_mb=0)
    with pytest.raises(InfoConfigError, match=f"slots must be 0..{MAX_NODE_SLOTS}, got 4097"):
        InfoConfig(data_dir=tmp_path, slots=MAX_NODE_SLOTS + 1, slot_memory_mb=0)
    with pytest.raises(InfoConfigError, match="unknown info source 'gpus'"):
        InfoConfig(data_dir=tmp_path, slots=1, slot_memory_mb=0, intervals_s={"gpus": 1.0})
    with pytest.raises(InfoConfigError, match="stall"):
        InfoConfig(data_dir=tmp_path, slots=1, slot_memory_mb=0, stalls={"nope": 1.0})


def test_source_and_gatherer_are_validated() -> None:
    with pytest.raises(InfoConfigError, match="interval_s must be a positive number"):
        InfoSource(name="x", probe=NodeInfo, interval_s=0, timeout_s=1)
    with pytest.raises(InfoConfigError, match="timeout_s"):
        InfoSource(name="x", probe=NodeInfo, interval_s=1, timeout_s=float("inf"))
    source = InfoSource(name="x", probe=NodeInfo, interval_s=1, timeout_s=1)
    with pytest.raises(InfoConfigError, match="unique: x"):
        InfoGatherer(NODE, Collector(), [source, source])


# --------------------------------------------------------------------------------------------
# The gatherer
# --------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_hung_source_never_silences_the_others(caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()

    def hang() -> NodeInfo:
        release.wait(30)  # bounded even if the test fails before releasing it
        return NodeInfo(disk_free_mb=1)

    hung = InfoSource(name="disk", probe=hang, interval_s=0.01, timeout_s=0.05)
    fast = _counting_probe()
    emitted = Collector()
    gatherer = InfoGatherer(NODE, emitted, [hung, fast])
    try:
        with caplog.at_level(logging.INFO, logger="cluster.worker.info"):
            async with anyio.create_task_group() as tg:
                tg.start_soon(gatherer.run)
                # The hung probe times out, and later cycles find it still hung...
                await _until(lambda: gatherer.health()["disk"].failures >= 4)
                # ...while the other source kept emitting all along.
                await _until(lambda: len(emitted.from_source("counter")) >= 20)
                assert emitted.from_source("disk") == []
                disk = gatherer.health()["disk"]
                assert disk.hung and disk.failing_for >= 4
                warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
                assert len(warnings) == 1  # once, not once per cycle
                assert "'disk' failed: timed out after 0.05s" in warnings[0].getMessage()

                release.set()  # the disk answers again: the source recovers on its schedule
                await _until(lambda: len(emitted.from_source("disk")) == 1)
                assert gatherer.health()["disk"].failing_for == 0
                tg.cancel_scope.cancel()
    finally:
        release.set()
    recovered = [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()]
    assert len(recovered) == 1 and "'disk' recovered after" in recovered[0]
    assert all(r.levelno <= logging.WARNING for r in caplog.records)
    counts: list[float] = []
    for e in emitted.from_source("counter"):
        assert e.info.cpu_percent is not None
        counts.append(e.info.cpu_percent)
    assert counts == sorted(counts)  # in order, each reading once
    assert all(isinstance(e, NodeGatheredInfo) and e.node_id == NODE for e in emitted.events)


@pytest.mark.anyio
async def test_a_reading_out_of_range_is_a_failed_probe_not_an_event() -> None:
    # The master refuses the batch holding it, and the outbox would offer it again forever,
    # holding back every later event of the node.
    readings = iter([NodeInfo(cpu_percent=150.0), NodeInfo(slots=-3)])

    def broken_then_fine() -> NodeInfo:
        return next(readings, NodeInfo(cpu_percent=50.0))

    source = InfoSource(name="cpu", probe=broken_then_fine, interval_s=0.01, timeout_s=1.0)
    emitted = Collector()
    gatherer = InfoGatherer(NODE, emitted, [source])
    async with anyio.create_task_group() as tg:
        tg.start_soon(gatherer.run)
        await _until(lambda: len(emitted.events) >= 1)
        tg.cancel_scope.cancel()
    assert [e.info for e in emitted.from_source("cpu")] == [NodeInfo(cpu_percent=50.0)]
    health = gatherer.health()["cpu"]
    assert health.failures == 2
    assert "invalid reading" in health.last_error and "slots" in health.last_error


@pytest.mark.anyio
async def test_a_failing_source_is_logged_once_and_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    attempts = itertools.count(1)

    def flaky() -> NodeInfo:
        n = next(attempts)
        if n <= 3:
            raise OSError(f"device busy ({n})")
        return NodeInfo(net_bytes_sent=n)

    source = InfoSource(name="network", probe=flaky, interval_s=0.01, timeout_s=1.0)
    emitted = Collector()
    gatherer = InfoGatherer(NODE, emitted, [source])
    with caplog.at_level(logging.INFO, logger="cluster.worker.info"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(gatherer.run)
            await _until(lambda: len(emitted.events) >= 1)
            tg.cancel_scope.cancel()
    health = gatherer.health()["network"]
    assert health.failures == 3 and health.failing_for == 0
    assert health.last_error == "OSError: device busy (3)"
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert messages[0][0] == logging.WARNING and "device busy (1)" in messages[0][1]
    assert [level for level, _ in messages] == [logging.WARNING, logging.INFO]
    assert emitted.from_source("network")[0].info == NodeInfo(net_bytes_sent=4)


@pytest.mark.anyio
async def test_unchanged_readings_are_emitted_once() -> None:
    source = InfoSource(
        name="host", probe=lambda: NodeInfo(hostname="h", slots=2), interval_s=0.01, timeout_s=1
    )
    emitted = Collector()
    gatherer = InfoGatherer(NODE, emitted, [source])
    async with anyio.create_task_group() as tg:
        tg.start_soon(gatherer.run)
        await _until(lambda: gatherer.health()["host"].probes_ok >= 5)
        tg.cancel_scope.cancel()
    assert len(emitted.events) == 1
    assert gatherer.health()["host"].emitted == 1


@pytest.mark.anyio
async def test_a_probe_returning_the_wrong_type_is_a_failure() -> None:
    source = InfoSource(name="cpu", probe=lambda: 42, interval_s=0.01, timeout_s=1)  # type: ignore[arg-type, return-value]
    gatherer = InfoGatherer(NODE, Collector(), [source])
    async with anyio.create_task_group() as tg:
        tg.start_soon(gatherer.run)
        await _until(lambda: gatherer.health()["cpu"].failures >= 1)
        tg.cancel_scope.cancel()
    assert "returned int, not NodeInfo" in gatherer.health()["cpu"].last_error


@pytest.mark.anyio
async def test_configured_stall_hangs_only_that_source(tmp_path: Path) -> None:
    config = InfoConfig(
        data_dir=tmp_path,
        slots=2,
        slot_memory_mb=512,
        intervals_s=dict.fromkeys(DEFAULT_INTERVALS_S, 0.02),
        timeout_s=0.2,
        stalls={"host": 1.0},
    )
    emitted = Collector()
    gatherer = InfoGatherer(NODE, emitted, default_sources(config))
    async with anyio.create_task_group() as tg:
        tg.start_soon(gatherer.run)
        await _until(lambda: gatherer.health()["host"].failures >= 1)
        await _until(lambda: all(emitted.from_source(n) for n in ("memory", "disk", "gpu")))
        tg.cancel_scope.cancel()
    assert emitted.from_source("host") == []
    assert gatherer.health()["host"].last_error == "timed out after 0.2s"
