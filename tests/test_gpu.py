"""NVML GPU listing: the real no-GPU paths, the conversion of NVML readings, and (with a GPU)
the real thing."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from cluster.master.admission import check_worker_event
from cluster.shared.events import MAX_GPU_TEMPERATURE_C, GpuInfo, NodeGatheredInfo, NodeInfo
from cluster.worker import gpu as gpu_module
from cluster.worker.gpu import NvmlGpuProbe


def _real_nvml_works() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    pynvml.nvmlShutdown()
    return True


def test_no_driver_reads_none_and_logs_once_at_info(caplog: pytest.LogCaptureFixture) -> None:
    if _real_nvml_works():
        pytest.skip("this machine has a working NVML; the no-driver path cannot be shown")
    probe = NvmlGpuProbe()
    with caplog.at_level(logging.DEBUG, logger="cluster.worker.gpu"):
        assert probe.read() is None
        assert probe.read() is None
        assert probe.read() is None
    records = [r for r in caplog.records if r.name == "cluster.worker.gpu"]
    assert len(records) == 1
    assert records[0].levelno == logging.INFO
    assert "no NVIDIA GPUs" in records[0].getMessage()
    assert probe.unavailable_reason is not None
    assert "NVMLError" in probe.unavailable_reason
    probe.close()  # closing a never-initialised probe is harmless


def test_missing_library_reads_none(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A None entry in sys.modules makes `import pynvml` raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, "pynvml", None)
    probe = NvmlGpuProbe()
    with caplog.at_level(logging.INFO, logger="cluster.worker.gpu"):
        assert probe.read() is None
    assert probe.unavailable_reason is not None
    assert "pynvml" in probe.unavailable_reason
    assert [r.levelno for r in caplog.records if r.name == "cluster.worker.gpu"] == [logging.INFO]


class _NvmlNotSupported(Exception):
    pass


_RESERVED = 480 * 1024**2  # what the driver sets aside on an idle H100, as NVML reports it


class _RecordingNvml:
    """An object with the pynvml functions the probe uses, answering for two GPUs.

    Like the real library and driver it answers both memory calls: v1, whose `used` counts the
    driver's reservation, and v2, which reports the reservation apart (nvidia-smi's view).
    """

    NVML_TEMPERATURE_GPU = 0
    nvmlMemory_v2: int | None = 0x02000028

    def __init__(self) -> None:
        self.init_calls = 0
        self.shutdown_calls = 0

    def nvmlInit(self) -> None:
        self.init_calls += 1

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> Any:
        # Old nvidia-ml-py returned bytes, new returns str: both must work.
        return b"NVIDIA H100" if handle == 0 else "NVIDIA A10"

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-{handle}"

    def nvmlDeviceGetMemoryInfo(self, handle: int, version: int | None = None) -> SimpleNamespace:
        total, allocated = 80 * 1024**3, (handle + 1) * 512 * 1024**2
        if version is None:  # v1: the reservation counts as used
            used = _RESERVED + allocated
            return SimpleNamespace(total=total, free=total - used, used=used)
        assert version == self.nvmlMemory_v2
        free = total - _RESERVED - allocated
        return SimpleNamespace(total=total, reserved=_RESERVED, free=free, used=allocated)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        if handle == 1:
            raise _NvmlNotSupported("Not Supported")
        return SimpleNamespace(gpu=37, memory=5)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return 55 + handle


def test_readings_are_converted_to_gpu_info() -> None:
    nvml = _RecordingNvml()
    probe = NvmlGpuProbe(nvml)
    gpus = probe.read()
    assert gpus == (
        GpuInfo(
            index=0,
            name="NVIDIA H100",
            uuid="GPU-0",
            memory_total_mb=81920,
            memory_used_mb=512,  # the driver's 480 MiB reservation is not "used" (v2, nvidia-smi)
            utilization_pct=37,
            temperature_c=55,
        ),
        GpuInfo(
            index=1,
            name="NVIDIA A10",
            uuid="GPU-1",
            memory_total_mb=81920,
            memory_used_mb=1024,
            utilization_pct=None,  # not supported on that board: None, not a failure
            temperature_c=56,
        ),
    )
    assert probe.read() == gpus
    assert nvml.init_calls == 1  # initialised once, not per read
    probe.close()
    assert nvml.shutdown_calls == 1


class _SentinelNvml(_RecordingNvml):
    """A driver answering "not available" with a sentinel rather than an error, and a board
    whose sensor reads nonsense."""

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=0xFFFFFFFF if handle == 0 else 100, memory=5)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return 5000 if handle == 0 else MAX_GPU_TEMPERATURE_C


def test_a_reading_beyond_the_masters_bounds_is_not_reported() -> None:
    """The master refuses an info event holding a GPU number beyond `GPU_LIMITS`; a driver's
    sentinel must not cost the node its whole GPU report, so such a reading is None, as an
    unsupported one is. Readings at the bounds are kept."""
    gpus = NvmlGpuProbe(_SentinelNvml()).read()
    assert gpus is not None
    assert [(g.utilization_pct, g.temperature_c) for g in gpus] == [
        (None, None),
        (100, MAX_GPU_TEMPERATURE_C),
    ]
    event = NodeGatheredInfo(node_id="n", source="gpu", info=NodeInfo(gpus=gpus))
    check_worker_event("n", 1, event)


class _BrokenMemoryNvml(_RecordingNvml):
    """A broken driver's memory figures: 2**64-1 bytes used on GPU 1."""

    def nvmlDeviceGetMemoryInfo(self, handle: int, version: int | None = None) -> SimpleNamespace:
        info = super().nvmlDeviceGetMemoryInfo(handle, version)
        if handle == 1:
            info.used = 2**64 - 1
        return info


def test_a_memory_figure_beyond_the_masters_bounds_fails_the_read_naming_the_gpu() -> None:
    """It was sent, and the master refused the whole info event (set aside with an ERROR):
    memory is not optional, so the read fails as a GPU that stopped answering does -- the
    info source logs why and sends nothing."""
    probe = NvmlGpuProbe(_BrokenMemoryNvml())
    with pytest.raises(ValueError, match=r"GPU 1 reports memory_used_mb 17592186044415: "):
        probe.read()


class _NvmlFunctionNotFound(Exception):
    pass


class _OldDriverNvml(_RecordingNvml):
    """A driver without nvmlDeviceGetMemoryInfo_v2: the library raises when asked for v2."""

    def nvmlDeviceGetMemoryInfo(self, handle: int, version: int | None = None) -> SimpleNamespace:
        if version is not None:
            raise _NvmlFunctionNotFound("Function Not Found")
        return super().nvmlDeviceGetMemoryInfo(handle)


class _OldLibraryNvml(_RecordingNvml):
    """nvidia-ml-py from before memory v2: no `nvmlMemory_v2`, no `version` argument."""

    nvmlMemory_v2 = None  # getattr() finds nothing to ask for, as with the old module

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:  # type: ignore[override]
        return super().nvmlDeviceGetMemoryInfo(handle)


@pytest.mark.parametrize("nvml", [_OldDriverNvml(), _OldLibraryNvml()], ids=["driver", "library"])
def test_without_memory_v2_the_v1_figures_are_used(nvml: _RecordingNvml) -> None:
    gpus = NvmlGpuProbe(nvml).read()
    assert gpus is not None
    # v1 is all there is: its `used` includes the reservation, but the GPU is still listed.
    assert [(g.memory_total_mb, g.memory_used_mb) for g in gpus] == [(81920, 992), (81920, 1504)]


def test_a_gpu_that_stops_answering_is_an_error() -> None:
    nvml = _RecordingNvml()

    def lost(handle: int, version: int | None = None) -> Any:
        raise RuntimeError("GPU is lost")

    nvml.nvmlDeviceGetMemoryInfo = lost  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="GPU is lost"):
        NvmlGpuProbe(nvml).read()


@pytest.mark.gpu
def test_real_gpus_are_listed() -> None:
    if not _real_nvml_works():
        pytest.skip("no NVIDIA driver/GPU on this machine")
    probe = NvmlGpuProbe()
    gpus = probe.read()
    probe.close()
    assert gpus is not None and len(gpus) >= 1
    for i, gpu in enumerate(gpus):
        assert gpu.index == i
        assert gpu.name and gpu.uuid.startswith("GPU-")
        assert gpu.memory_total_mb > 0
        assert 0 <= gpu.memory_used_mb <= gpu.memory_total_mb
    # Every real reading is within the bounds the master admits.
    check_worker_event(
        "n", 1, NodeGatheredInfo(node_id="n", source="gpu", info=NodeInfo(gpus=gpus))
    )


def _nvidia_smi_memory_used_mib() -> dict[str, int]:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=uuid,memory.used", "--format=csv,noheader,nounits"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    rows = (line.split(",") for line in out.splitlines() if line.strip())
    return {uuid.strip(): int(used) for uuid, used in rows}


@pytest.mark.gpu
def test_real_memory_used_agrees_with_nvidia_smi() -> None:
    if not _real_nvml_works() or shutil.which("nvidia-smi") is None:
        pytest.skip("no NVIDIA driver/GPU or no nvidia-smi on this machine")
    probe = NvmlGpuProbe()
    before = probe.read()
    smi = _nvidia_smi_memory_used_mib()
    after = probe.read()
    probe.close()
    assert before is not None and after is not None
    assert {g.uuid for g in before} == set(smi)
    # Other processes may allocate meanwhile: nvidia-smi's figure must lie between our two
    # readings, give or take a little. Counting the driver's reservation (hundreds of MiB)
    # as used would put ours well above it on an idle GPU.
    slack = 32
    for b, a in zip(before, after, strict=True):
        low, high = min(b.memory_used_mb, a.memory_used_mb), max(b.memory_used_mb, a.memory_used_mb)
        assert low - slack <= smi[b.uuid] <= high + slack, (b, a, smi[b.uuid])


def test_close_does_not_wait_for_a_hung_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker stops even when NVML hangs: close() gives up on a read still in the driver."""
    monkeypatch.setattr(gpu_module, "_CLOSE_WAIT_S", 0.1)
    nvml = _RecordingNvml()
    entered, release = threading.Event(), threading.Event()

    def hung_count() -> int:
        entered.set()
        release.wait(30)
        return 2

    probe = NvmlGpuProbe(nvml)
    probe.read()  # initialised
    nvml.nvmlDeviceGetCount = hung_count  # type: ignore[method-assign]
    reader = threading.Thread(target=probe.read)
    reader.start()
    try:
        assert entered.wait(10)
        probe.close()  # returns although the read holds the probe
        assert nvml.shutdown_calls == 0
    finally:
        release.set()
        reader.join(10)
    probe.close()  # once the read is over, NVML is shut down
    assert nvml.shutdown_calls == 1
