"""NVIDIA GPUs through NVML (the `pynvml` module of the nvidia-ml-py package), when present.

A machine without the library, without a driver or without a GPU is normal, not an error:
the probe says so once at INFO and then reports "no GPUs" (None) on every call without
retrying NVML, whose failed initialisation can itself be slow. A GPU that NVML found but
then fails to answer (fallen off the bus, driver reset) is an error the caller sees: the
info gatherer logs it and retries on its schedule.

Every call blocks (NVML is a C library; a sick driver can hang it), so callers run it in a
worker thread with a timeout -- the info gatherer does.
"""

from __future__ import annotations

import importlib
import logging
import threading
from types import ModuleType
from typing import Any

from cluster.shared.events import GPU_LIMITS, GpuInfo

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
_LIMITS = {field: (low, high) for field, low, high in GPU_LIMITS}
#: How long `close()` waits for a read in progress.
_CLOSE_WAIT_S = 2.0


class NvmlGpuProbe:
    """Lists the GPUs of this machine; `read()` is None when NVML is unusable here.

    `nvml` replaces the `pynvml` module (tests pass an object with the same functions);
    by default the real module is imported on first use.
    """

    def __init__(self, nvml: ModuleType | Any | None = None) -> None:
        self._nvml = nvml
        self._lock = threading.Lock()  # a timed-out read may still run in its thread
        self._initialised = False
        self._unavailable_reason: str | None = None

    @property
    def unavailable_reason(self) -> str | None:
        """Why NVML cannot be used here (None while usable or not tried yet)."""
        return self._unavailable_reason

    def read(self) -> tuple[GpuInfo, ...] | None:
        """The GPUs now, or None when this machine has no usable NVML."""
        with self._lock:
            nvml = self._ensure_initialised()
            if nvml is None:
                return None
            count = int(nvml.nvmlDeviceGetCount())
            return tuple(_read_device(nvml, index) for index in range(count))

    def close(self) -> None:
        # A read abandoned in a hung driver call still holds the lock: do not wait for it
        # forever at shutdown (the process exit releases NVML anyway).
        if not self._lock.acquire(timeout=_CLOSE_WAIT_S):
            log.info("NVML busy (a read is still running): not shutting it down")
            return
        try:
            if self._initialised and self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                except Exception as exc:  # shutting down a sick driver must not crash the worker
                    log.info("NVML shutdown failed: %s", exc)
            self._initialised = False
        finally:
            self._lock.release()

    def _ensure_initialised(self) -> Any | None:
        if self._initialised:
            return self._nvml
        if self._unavailable_reason is not None:
            return None
        try:
            if self._nvml is None:
                self._nvml = importlib.import_module("pynvml")
            self._nvml.nvmlInit()
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded...
            self._unavailable_reason = f"{type(exc).__name__}: {exc}".strip()
            log.info("no NVIDIA GPUs on this node (NVML unavailable: %s)", self._unavailable_reason)
            return None
        self._initialised = True
        return self._nvml


def _text(value: bytes | str) -> str:
    # nvidia-ml-py returned bytes before version 11.5 and str since.
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional_int(read: Any, field: str) -> int | None:
    """A reading some GPUs do not support (utilisation on vGPUs, temperature on some boards).
    One beyond `GPU_LIMITS` (a driver's "not available" sentinel, 0xFFFFFFFF say) is not
    reported either: the master would refuse the whole info event for it."""
    try:
        value = int(read())
    except Exception:
        return None
    low, high = _LIMITS[field]
    return value if low <= value <= high else None


def _memory_info(nvml: Any, handle: Any) -> Any:
    """Memory figures whose `used` excludes what the driver reserves, as nvidia-smi shows it.

    NVML's first memory call counts the driver's own reservation as used (480 MiB on an idle
    H100, where nvidia-smi says 0 MiB); its v2 reports that reservation apart. Older drivers
    (no `_v2` function) and older nvidia-ml-py (no `nvmlMemory_v2`) only have the first call;
    a GPU that has stopped answering fails both, and the second failure reaches the caller.
    """
    version = getattr(nvml, "nvmlMemory_v2", None)
    if version is not None:
        try:
            return nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
        except Exception as exc:
            log.debug("NVML memory v2 unavailable (%s); using v1", exc)
    return nvml.nvmlDeviceGetMemoryInfo(handle)


def _memory_mb(value: Any, field: str, index: int) -> int:
    """A memory figure in MiB (2**20 bytes, the unit nvidia-smi prints as "MiB"). One beyond
    `GPU_LIMITS` (a broken driver's 2**64-1 bytes) fails the read, as a GPU that stopped
    answering does: the info source says so and sends no report, where the master would
    refuse the whole info event for it (and set it aside with an ERROR). Memory is no
    optional reading that could be left out."""
    mb = int(value) // _MIB
    low, high = _LIMITS[field]
    if not low <= mb <= high:
        raise ValueError(f"GPU {index} reports {field} {mb}: not a reading (must be {low}..{high})")
    return mb


def _read_device(nvml: Any, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = _memory_info(nvml, handle)
    return GpuInfo(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        memory_total_mb=_memory_mb(memory.total, "memory_total_mb", index),
        memory_used_mb=_memory_mb(memory.used, "memory_used_mb", index),
        utilization_pct=_optional_int(
            lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu, "utilization_pct"
        ),
        temperature_c=_optional_int(
            lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
            "temperature_c",
        ),
    )
