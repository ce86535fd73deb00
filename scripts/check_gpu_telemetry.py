"""Check a GPU node's telemetry against `nvidia-smi`: what a worker would report is what the
driver says.

Runs the worker's own `gpu` info source (the built-in source of `default_sources`, inside an
`InfoGatherer`, as `cluster worker` runs it), prints the GpuInfo it produces next to
`nvidia-smi`'s reading of the same GPU (matched by UUID), and exits 1 on any disagreement
beyond a reading's natural drift. With `--alloc-gib N` it also takes N GiB on GPU 0 with
torch and reads again, to show that the memory figure is live rather than cached.

    PYTHONPATH=src python3 scripts/check_gpu_telemetry.py [--alloc-gib 4]
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import anyio

from cluster.shared.events import GpuInfo, NodeGatheredInfo
from cluster.worker.info import InfoConfig, InfoGatherer, InfoSource, default_sources

#: Readings that move between two looks a moment apart, and how far they may (MiB, %, °C).
USED_MIB_DRIFT = 64
UTILIZATION_DRIFT = 25
TEMPERATURE_DRIFT = 3
SMI_FIELDS = "uuid,name,memory.total,memory.used,utilization.gpu,temperature.gpu"


def gpu_source(data_dir: Path) -> InfoSource:
    config = InfoConfig(data_dir=data_dir, slots=1, slot_memory_mb=0)
    return {s.name: s for s in default_sources(config)}["gpu"]


async def gather_once(source: InfoSource, timeout_s: float) -> tuple[GpuInfo, ...]:
    """The first reading the gatherer emits for the `gpu` source."""
    emitted: list[NodeGatheredInfo] = []
    gatherer = InfoGatherer("gpu-check", emitted.append, [source])
    with anyio.fail_after(timeout_s):
        async with anyio.create_task_group() as tg:
            tg.start_soon(gatherer.run)
            while not emitted:
                await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    health = gatherer.health()["gpu"]
    if health.failures:
        raise RuntimeError(f"the gpu source failed: {health.last_error}")
    gpus = emitted[0].info.gpus
    return gpus if gpus is not None else ()


def smi_readings() -> dict[str, dict[str, str]]:
    """nvidia-smi's view, by UUID; "[N/A]" or "[Not Supported]" stay as text."""
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader,nounits"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    names = SMI_FIELDS.split(",")
    rows = [
        dict(zip(names, (v.strip() for v in line.split(",")), strict=True))
        for line in out.splitlines()
        if line.strip()
    ]
    return {row["uuid"]: row for row in rows}


def _number(text: str) -> int | None:
    try:
        return round(float(text))
    except ValueError:
        return None


def compare(gpu: GpuInfo, smi: dict[str, str]) -> list[str]:
    """What disagrees between our reading and nvidia-smi's, in words (empty when all agree)."""
    problems = []
    if gpu.name != smi["name"]:
        problems.append(f"name {gpu.name!r} != nvidia-smi {smi['name']!r}")
    if gpu.memory_total_mb != _number(smi["memory.total"]):
        problems.append(
            f"memory_total_mb {gpu.memory_total_mb} != nvidia-smi {smi['memory.total']}"
        )
    close: list[tuple[str, int | None, str, int]] = [
        ("memory_used_mb", gpu.memory_used_mb, "memory.used", USED_MIB_DRIFT),
        ("utilization_pct", gpu.utilization_pct, "utilization.gpu", UTILIZATION_DRIFT),
        ("temperature_c", gpu.temperature_c, "temperature.gpu", TEMPERATURE_DRIFT),
    ]
    for ours_name, ours, smi_name, drift in close:
        theirs = _number(smi[smi_name])
        if (ours is None) != (theirs is None):
            problems.append(f"{ours_name} {ours} but nvidia-smi {smi_name} {smi[smi_name]!r}")
        elif ours is not None and theirs is not None and abs(ours - theirs) > drift:
            problems.append(f"{ours_name} {ours} vs nvidia-smi {smi_name} {theirs} (> {drift})")
    return problems


def check_against_smi(gpus: tuple[GpuInfo, ...]) -> list[str]:
    smi = smi_readings()
    problems = []
    if {g.uuid for g in gpus} != set(smi):
        problems.append(f"GPUs {sorted(g.uuid for g in gpus)} != nvidia-smi {sorted(smi)}")
    for gpu in gpus:
        print(f"  ours      : {gpu}")
        if gpu.uuid in smi:
            print(f"  nvidia-smi: {smi[gpu.uuid]}")
            problems += [f"GPU {gpu.index}: {p}" for p in compare(gpu, smi[gpu.uuid])]
    return problems


def show_memory_is_live(source: InfoSource, gib: float) -> list[str]:
    """Take `gib` GiB on GPU 0 and check the used figure rises by that much, then falls back."""
    torch = importlib.import_module("torch")  # only this check needs torch (untyped here)

    def used_mib() -> int:
        gpus = source.probe().gpus or ()
        return gpus[0].memory_used_mb

    torch.zeros(1, device="cuda:0")  # the CUDA context costs memory of its own: take it first
    torch.cuda.synchronize()
    before = used_mib()
    block = torch.empty(int(gib * 1024**3), dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    during = used_mib()
    del block
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    after = used_mib()
    want = round(gib * 1024)
    print(
        f"memory_used_mb: before {before}, holding {gib:g} GiB {during} (+{during - before}), "
        f"released {after}"
    )
    problems = []
    if abs((during - before) - want) > USED_MIB_DRIFT:
        problems.append(f"holding {want} MiB moved memory_used_mb by {during - before}")
    if abs(after - before) > USED_MIB_DRIFT:
        problems.append(f"releasing it left memory_used_mb at {after}, was {before}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alloc-gib", type=float, default=0.0, help="also check liveness")
    parser.add_argument("--timeout-s", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.alloc_gib < 0:
        parser.error(f"--alloc-gib must be >= 0, got {args.alloc_gib}")
    with tempfile.TemporaryDirectory() as data_dir:
        source = gpu_source(Path(data_dir))
        gpus = anyio.run(gather_once, source, args.timeout_s, backend="trio")
        print(f"the gpu source reported {len(gpus)} GPU(s)")
        if not gpus:
            print("no GPUs: NVML is unavailable here or sees none", file=sys.stderr)
            return 1
        problems = check_against_smi(gpus)
        if args.alloc_gib:
            problems += show_memory_is_live(source, args.alloc_gib)
    for problem in problems:
        print(f"MISMATCH {problem}", file=sys.stderr)
    print(
        "OK: telemetry agrees with nvidia-smi" if not problems else f"{len(problems)} mismatch(es)"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
