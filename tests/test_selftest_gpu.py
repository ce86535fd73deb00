"""A node with GPUs self-tests its runner as a GPU slot (`CLUSTER_GPU=1`), as it will serve.

A GPU command that insists on `CLUSTER_GPU=1` passes the self-test on a node whose NVML lists
a GPU, and fails it (with the command's own exit) on a node without one. NVML is faked: the
worker's real probe code runs against an object with pynvml's functions.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from embedded_nodes import embedded_cluster, until_self_tested

from cluster.shared.state import SelfTestResult
from cluster.worker.gpu import NvmlGpuProbe
from cluster.worker.runners.registry import RunnerSetting

# Serves until stdin ends, but only as a GPU slot: exit 3 otherwise, like a CUDA server.
GPU_ONLY = (
    "import os, sys\n"
    "if os.environ.get('CLUSTER_GPU') != '1':\n"
    "    print('needs a GPU slot, got CLUSTER_GPU=' + repr(os.environ.get('CLUSTER_GPU')),\n"
    "          file=sys.stderr)\n"
    "    sys.exit(3)\n"
    "sys.stdin.read()\n"
)


class _FakeNvml:
    """pynvml's functions, answering for `count` GPUs."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, count: int) -> None:
        self.count = count

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "NVIDIA H100"

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-{handle}"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(total=80 * 1024**3, free=80 * 1024**3, used=0)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=0)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return 40


class _LostNvml(_FakeNvml):
    """A GPU that NVML counts but that no longer answers (fallen off the bus)."""

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        raise RuntimeError("GPU is lost")


async def _self_test_of(tmp_path: Path, gpus: int, nvml: _FakeNvml | None = None) -> SelfTestResult:
    runner = RunnerSetting(
        kind="subprocess", config={"command": [sys.executable, "-c", GPU_ONLY], "grace_s": 2}
    )
    gpu_probe = NvmlGpuProbe(nvml or _FakeNvml(gpus))
    # On the way out the worker stops and finishes, then the master stops.
    async with embedded_cluster(tmp_path, runner=runner, gpu_probe=gpu_probe) as cluster:
        rec = await until_self_tested(cluster.master, cluster.worker.node_id)
    assert rec is not None and rec.self_test is not None
    return rec.self_test


@pytest.mark.anyio
async def test_a_node_with_a_gpu_self_tests_a_gpu_slot(tmp_path: Path) -> None:
    result = await _self_test_of(tmp_path, gpus=1)
    assert result.passed, result.reason


@pytest.mark.anyio
async def test_a_node_without_a_gpu_self_tests_a_plain_slot(tmp_path: Path) -> None:
    result = await _self_test_of(tmp_path, gpus=0)
    assert not result.passed
    expected = "exited with code 3: needs a GPU slot, got CLUSTER_GPU='0'"
    assert expected in result.reason, result.reason


@pytest.mark.anyio
async def test_a_gpu_that_stops_answering_is_tested_as_no_gpu_and_the_worker_lives_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: the NVML error escaped the self-test and ended `WorkerNode.run` (a crash loop
    # under systemd). Now the worker logs it, tests a plain slot, and serves on.
    result = await _self_test_of(tmp_path, gpus=1, nvml=_LostNvml(1))
    assert not result.passed
    assert "needs a GPU slot, got CLUSTER_GPU='0'" in result.reason, result.reason
    assert any(
        r.name == "cluster.worker.node"
        and r.levelno == logging.WARNING
        and "GPU is lost" in r.getMessage()
        for r in caplog.records
    ), caplog.text
