"""Facts about this machine, each gathered by its own source on its own schedule.

A source is a blocking probe (psutil, NVML, a stat of the data directory) with an interval and
a timeout. `InfoGatherer` runs every source in its own task and every probe in a worker thread
that is abandoned when it overruns its timeout, so one slow probe (a 31 s `nvidia-smi`, a hung
NFS mount) never delays the others -- nor the worker's heartbeat, which the worker shell sends.
A probe still hung from an earlier cycle is not started again (threads would pile up); the
source counts that cycle as failed and tries again on its next one.

Each source reports only its own fields of `NodeInfo` in `NodeGatheredInfo(node_id, source,
info)`; the reducer overlays them on what the other sources said. A source whose reading has
not changed since it last emitted stays quiet: the log is durable, so state still knows it.

Failures are logged once when a source starts failing (WARNING) and once when it recovers
(INFO), never once per cycle.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import anyio
import anyio.to_thread
import msgspec
import psutil

from cluster.shared.events import (
    INT64_MAX,
    MAX_HOSTNAME_CHARS,
    MAX_NODE_SLOTS,
    NodeGatheredInfo,
    NodeInfo,
)
from cluster.shared.humanize import clip, encodable, error_text
from cluster.worker.gpu import NvmlGpuProbe

log = logging.getLogger(__name__)

_encode_info = msgspec.msgpack.Encoder().encode
_check_info = msgspec.msgpack.Decoder(NodeInfo).decode

_MIB: Final = 1024 * 1024

#: Source name that a stall applies to every source (`--stall-info-source all:60`).
ALL_SOURCES: Final = "all"

#: Default seconds between two probes of each built-in source. Host facts barely change;
#: load figures are worth refreshing often; NVML is slower to ask.
DEFAULT_INTERVALS_S: Final[Mapping[str, float]] = {
    "host": 60.0,
    "cpu": 5.0,
    "memory": 5.0,
    "disk": 15.0,
    "network": 5.0,
    "gpu": 15.0,
}
DEFAULT_TIMEOUT_S: Final = 10.0

Probe = Callable[[], NodeInfo]
#: Where readings go: the worker's `emit_info` (held while offline) or any event sink.
EmitInfo = Callable[[NodeGatheredInfo], None]


class InfoConfigError(ValueError):
    """A source definition or an info setting is invalid; the message names what."""


@dataclass(frozen=True)
class InfoSource:
    """One named probe and its schedule. `probe` blocks; it is always called in a thread."""

    name: str
    probe: Probe
    interval_s: float
    timeout_s: float

    def __post_init__(self) -> None:
        if not self.name:
            raise InfoConfigError("an info source needs a name")
        for what, value in (("interval_s", self.interval_s), ("timeout_s", self.timeout_s)):
            if not (math.isfinite(value) and value > 0):
                raise InfoConfigError(
                    f"info source {self.name!r}: {what} must be a positive number, got {value!r}"
                )


@dataclass(frozen=True)
class InfoConfig:
    """What the built-in sources need to know, from the worker's configuration.

    `stalls` maps a source name (or "all") to seconds that each of its probes hangs before
    probing: a documented way to simulate a stuck probe in multi-process tests
    (`cluster worker --stall-info-source disk:60`).
    """

    data_dir: Path
    slots: int
    slot_memory_mb: int
    intervals_s: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_INTERVALS_S))
    timeout_s: float = DEFAULT_TIMEOUT_S
    stalls: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.slots <= MAX_NODE_SLOTS:
            raise InfoConfigError(f"slots must be 0..{MAX_NODE_SLOTS}, got {self.slots}")
        if not 0 <= self.slot_memory_mb <= INT64_MAX:
            raise InfoConfigError(
                f"slot memory must be 0..{INT64_MAX} MiB, got {self.slot_memory_mb}"
            )
        known = set(DEFAULT_INTERVALS_S)
        for name in self.intervals_s:
            if name not in known:
                raise InfoConfigError(
                    f"unknown info source {name!r} in intervals (known: {', '.join(sorted(known))})"
                )
        for name, seconds in self.stalls.items():
            if name not in known and name != ALL_SOURCES:
                raise InfoConfigError(
                    f"unknown info source {name!r} to stall "
                    f"(known: {', '.join(sorted(known))}, or {ALL_SOURCES!r})"
                )
            if not (math.isfinite(seconds) and seconds >= 0):
                raise InfoConfigError(f"stall of {name!r} must be >= 0 seconds, got {seconds!r}")


def parse_stall(spec: str) -> tuple[str, float]:
    """Parse a `SOURCE:SECONDS` stall option, e.g. "disk:60" or "all:45"."""
    name, sep, seconds_text = spec.partition(":")
    if not sep or not name:
        raise InfoConfigError(f"stall {spec!r} must look like SOURCE:SECONDS, e.g. disk:60")
    try:
        seconds = float(seconds_text)
    except ValueError:
        raise InfoConfigError(
            f"stall {spec!r}: {seconds_text!r} is not a number of seconds"
        ) from None
    if not (math.isfinite(seconds) and seconds >= 0):
        raise InfoConfigError(f"stall {spec!r}: seconds must be >= 0")
    if name not in DEFAULT_INTERVALS_S and name != ALL_SOURCES:
        raise InfoConfigError(
            f"stall {spec!r}: unknown info source {name!r} "
            f"(known: {', '.join(sorted(DEFAULT_INTERVALS_S))}, or {ALL_SOURCES!r})"
        )
    return name, seconds


# --------------------------------------------------------------------------------------------
# Built-in probes
# --------------------------------------------------------------------------------------------


def probe_host(slots: int, slot_memory_mb: int) -> NodeInfo:
    return NodeInfo(
        # The master refuses a longer one (admission); no real hostname is (DNS: 253).
        hostname=clip(encodable(socket.gethostname()), MAX_HOSTNAME_CHARS),
        cpu_count=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        slots=slots,
        slot_memory_mb=slot_memory_mb,
    )


def probe_cpu() -> NodeInfo:
    # Utilisation since the previous call (the first call of a process reads 0.0).
    return NodeInfo(cpu_percent=float(psutil.cpu_percent(interval=None)))


def probe_memory() -> NodeInfo:
    vm = psutil.virtual_memory()
    return NodeInfo(memory_total_mb=vm.total // _MIB, memory_available_mb=vm.available // _MIB)


def probe_disk(data_dir: Path) -> NodeInfo:
    usage = psutil.disk_usage(str(data_dir))
    return NodeInfo(disk_total_mb=usage.total // _MIB, disk_free_mb=usage.free // _MIB)


def probe_network() -> NodeInfo:
    counters = psutil.net_io_counters()
    return NodeInfo(net_bytes_sent=counters.bytes_sent, net_bytes_recv=counters.bytes_recv)


def probe_gpu(gpus: NvmlGpuProbe) -> NodeInfo:
    # No NVML here means "no GPUs", which the planner needs to know as much as a GPU list.
    return NodeInfo(gpus=gpus.read() or ())


def _stalled(probe: Probe, seconds: float) -> Probe:
    def stalled_probe() -> NodeInfo:
        time.sleep(seconds)
        return probe()

    return stalled_probe


def default_sources(config: InfoConfig, gpu_probe: NvmlGpuProbe | None = None) -> list[InfoSource]:
    """The built-in sources: host, cpu, memory, disk (of the data dir), network, gpu."""
    gpus = gpu_probe if gpu_probe is not None else NvmlGpuProbe()
    data_dir = config.data_dir
    probes: dict[str, Probe] = {
        "host": lambda: probe_host(config.slots, config.slot_memory_mb),
        "cpu": probe_cpu,
        "memory": probe_memory,
        "disk": lambda: probe_disk(data_dir),
        "network": probe_network,
        "gpu": lambda: probe_gpu(gpus),
    }
    sources = []
    for name, probe in probes.items():
        stall = config.stalls.get(name, config.stalls.get(ALL_SOURCES, 0.0))
        sources.append(
            InfoSource(
                name=name,
                probe=_stalled(probe, stall) if stall > 0 else probe,
                interval_s=config.intervals_s.get(name, DEFAULT_INTERVALS_S[name]),
                timeout_s=config.timeout_s,
            )
        )
    return sources


# --------------------------------------------------------------------------------------------
# The gatherer
# --------------------------------------------------------------------------------------------


@dataclass
class SourceHealth:
    """How one source is doing, for logs, status displays and tests."""

    name: str
    emitted: int = 0
    probes_ok: int = 0
    failures: int = 0
    #: Consecutive failed cycles (0 while healthy).
    failing_for: int = 0
    last_error: str = ""
    #: A probe thread abandoned after its timeout is still running (a plain bool written by
    #: that thread when it ends and read by the source's task: atomic in CPython).
    hung: bool = False


class InfoGatherer:
    """Runs every source in its own task and emits `NodeGatheredInfo` for what it learns."""

    def __init__(self, node_id: str, emit: EmitInfo, sources: Iterable[InfoSource]) -> None:
        self._node_id = node_id
        self._emit = emit
        self._sources = list(sources)
        names = [s.name for s in self._sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InfoConfigError(f"info source names must be unique: {', '.join(duplicates)}")
        self._health = {s.name: SourceHealth(s.name) for s in self._sources}
        # Own thread budget: hung probes never starve other users of anyio's default limiter,
        # and one-probe-per-source keeps this one from ever blocking.
        self._limiter = anyio.CapacityLimiter(max(1, len(self._sources)))

    def health(self) -> dict[str, SourceHealth]:
        return dict(self._health)

    async def run(self) -> None:
        """Gather until cancelled."""
        async with anyio.create_task_group() as tg:
            for source in self._sources:
                tg.start_soon(self._run_source, source, name=f"info:{source.name}")

    async def _run_source(self, source: InfoSource) -> None:
        health = self._health[source.name]
        last_emitted: NodeInfo | None = None
        while True:
            info = await self._probe_once(source, health)
            if info is not None and info != last_emitted:
                self._emit(NodeGatheredInfo(node_id=self._node_id, source=source.name, info=info))
                last_emitted = info
                health.emitted += 1
            await anyio.sleep(source.interval_s)

    async def _probe_once(self, source: InfoSource, health: SourceHealth) -> NodeInfo | None:
        if health.hung:
            self._failed(source, health, "its previous probe is still hung")
            return None

        def call() -> NodeInfo:
            try:
                return source.probe()
            finally:
                health.hung = False  # the thread finished, even if long after its timeout

        health.hung = True
        try:
            with anyio.move_on_after(source.timeout_s) as scope:
                info = await anyio.to_thread.run_sync(
                    call, abandon_on_cancel=True, limiter=self._limiter
                )
        except Exception as exc:
            self._failed(source, health, error_text(exc))
            return None
        if scope.cancelled_caught:
            self._failed(source, health, f"timed out after {source.timeout_s:g}s")
            return None
        if not isinstance(info, NodeInfo):
            self._failed(source, health, f"probe returned {type(info).__name__}, not NodeInfo")
            return None
        try:
            # Constructing a Struct checks no constraints; the master checks them on decode
            # and refuses the whole batch, which the outbox would then offer again forever.
            _check_info(_encode_info(info))
        except msgspec.ValidationError as exc:
            self._failed(source, health, f"probe returned an invalid reading: {exc}")
            return None
        if health.failing_for:
            log.info(
                "info source %r recovered after %d failed attempt(s)",
                source.name,
                health.failing_for,
            )
        health.failing_for = 0
        health.probes_ok += 1
        return info

    def _failed(self, source: InfoSource, health: SourceHealth, why: str) -> None:
        health.failures += 1
        health.failing_for += 1
        health.last_error = why
        if health.failing_for == 1:
            log.warning(
                "info source %r failed: %s; retrying every %gs (quiet until it recovers)",
                source.name,
                why,
                source.interval_s,
            )


__all__ = [
    "ALL_SOURCES",
    "DEFAULT_INTERVALS_S",
    "DEFAULT_TIMEOUT_S",
    "InfoConfig",
    "InfoConfigError",
    "InfoGatherer",
    "InfoSource",
    "SourceHealth",
    "default_sources",
    "parse_stall",
]
