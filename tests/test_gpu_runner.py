"""The GPU-backed runner path on a real GPU, end to end.

A node reports this machine's real GPUs through the worker's own `gpu` info source, the real
placement puts a GPU session on it (and never on a roomier node without a GPU), and the
node's runner manager starts the real subprocess runner for that slot: a PyTorch program that
sees `CLUSTER_GPU=1`, takes GPU memory, multiplies matrices and reports `WORK` lines. The
same `gpu` source must show the runner's memory while it runs and its release after the stop.

Every test needs a working NVML and `torch` with CUDA, and skips with the reason otherwise
(CI has no GPU and no torch). Nothing here imports libp2p: the path under test is pure
placement plus the worker's local shell.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from cluster_procs import process_alive
from test_runner_manager import Emitted as ManagerEvents

from cluster.master.config import PlannerConfig
from cluster.master.epochs import epoch_record, next_epoch
from cluster.master.placement import PlacementPool, place_sessions
from cluster.shared.apply import fold
from cluster.shared.events import (
    MASTER_ORIGIN,
    DevshardFinalized,
    DevshardPlaced,
    Event,
    IndexedEvent,
    NodeGatheredInfo,
    NodeInfo,
    RunnerSelfTestCompleted,
    RunnerStatus,
    RunnerStatusUpdated,
    SessionDeleted,
    SessionRequested,
    SessionUnplaced,
    WorkReported,
)
from cluster.shared.state import EMPTY_STATE, State
from cluster.worker.gpu import NvmlGpuProbe
from cluster.worker.info import InfoConfig, InfoGatherer, default_sources, probe_gpu
from cluster.worker.runner_manager import RunnerManager, desired_runners
from cluster.worker.runners import Runner, RunnerSpec, SubprocessRunner, make_factory

GPU_NODE = "node-gpu"
CPU_NODE = "node-cpu"
GPU_SESSION = "sess-gpu"
CPU_SESSION = "sess-cpu"
T0 = 1_700_000_000_000
#: The GPU node's worker configuration: 2 slots of 16 GiB.
GPU_NODE_SLOTS, GPU_NODE_SLOT_MB = 2, 16_384
#: The node without a GPU offers far more room, so it wins every draw it may take part in.
CPU_NODE_SLOTS, CPU_NODE_SLOT_MB = 8, 65_536
#: Seeds (as master entropy) tried for placement: deterministic, and enough that a GPU
#: filter that did nothing would put some GPU slot on the roomier node.
SEEDS = range(20)

#: What the runner program holds on the GPU, and how many batches of work it reports.
HOLD_MIB = 1024
BATCHES = 5
#: How far memory_used_mb may sit from its idle figure once the runner is gone (MiB): other
#: processes may exist, and NVML rounds.
RELEASE_SLACK_MIB = 64

# The runner program (run as `python -c`). SIGTERM is blocked before torch starts any thread
# (threads inherit the mask) and taken with sigwait once stdin ends, as in test_runners.py:
# a Python handler would race with the blocking read.
RUNNER_PROGRAM = rf"""
import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGTERM}})
if os.environ.get("CLUSTER_GPU") != "1":
    sys.stderr.write(f"CLUSTER_GPU is {{os.environ.get('CLUSTER_GPU')!r}}, expected '1'\n")
    sys.exit(3)
import torch
device = torch.device("cuda")
held = torch.empty({HOLD_MIB} * 1024 * 1024, dtype=torch.uint8, device=device)
held.fill_(1)
a = torch.randn(2048, 2048, device=device)
b = torch.randn(2048, 2048, device=device)
torch.cuda.synchronize()
print("READY", flush=True)
for batch in range({BATCHES}):
    c = a
    for _ in range(16):
        c = torch.tanh(c @ b)
    torch.cuda.synchronize()
    if not bool(torch.isfinite(c).all()):
        sys.stderr.write(f"batch {{batch}}: non-finite result\n")
        sys.exit(4)
    print("WORK 1", flush=True)
sys.stdin.read()  # the worker closes stdin first when it stops the runner...
signal.sigwait({{signal.SIGTERM}})  # ...then sends SIGTERM
sys.exit(0)
"""


# --------------------------------------------------------------------------------------------
# What this machine must have
# --------------------------------------------------------------------------------------------


@pytest.fixture
def gpu_probe() -> Iterator[NvmlGpuProbe]:
    """The worker's own NVML probe, once this machine has a GPU and torch with CUDA."""
    probe = NvmlGpuProbe()
    gpus = probe.read()
    if not gpus:
        probe.close()
        reason = probe.unavailable_reason or "NVML sees no GPU"
        pytest.skip(f"no NVIDIA GPU on this machine ({reason})")
    try:
        torch = importlib.import_module("torch")  # untyped, and absent from the CI venv
    except ImportError as exc:
        probe.close()
        pytest.skip(f"no torch on this machine ({exc})")
    if not torch.cuda.is_available():
        probe.close()
        pytest.skip(f"torch {torch.__version__} here cannot use CUDA")
    yield probe
    probe.close()


# --------------------------------------------------------------------------------------------
# A small log: events folded through the real reducers
# --------------------------------------------------------------------------------------------


class Log:
    def __init__(self) -> None:
        self.state: State = EMPTY_STATE
        self._seq: dict[str, int] = {}

    def add(self, origin: str, *events: Event) -> State:
        batch: list[IndexedEvent] = []
        for event in events:
            self._seq[origin] = self._seq.get(origin, 0) + 1
            idx = self.state.last_applied + len(batch) + 1
            batch.append(IndexedEvent(idx, T0, origin, self._seq[origin], event))
        self.state = fold(self.state, batch)
        return self.state


async def gathered_gpu_node_info(probe: NvmlGpuProbe, data_dir: Path) -> list[NodeGatheredInfo]:
    """What the GPU node's worker reports: its `host` and `gpu` sources, run by the gatherer."""
    config = InfoConfig(data_dir=data_dir, slots=GPU_NODE_SLOTS, slot_memory_mb=GPU_NODE_SLOT_MB)
    sources = [s for s in default_sources(config, gpu_probe=probe) if s.name in ("host", "gpu")]
    emitted: list[NodeGatheredInfo] = []
    gatherer = InfoGatherer(GPU_NODE, emitted.append, sources)
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(gatherer.run)
            while {e.source for e in emitted} != {"host", "gpu"}:
                await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    failing = {name: h.last_error for name, h in gatherer.health().items() if h.failures}
    assert not failing, failing
    return emitted


def cluster_log(gpu_node_info: Sequence[NodeGatheredInfo], sessions: Sequence[Event]) -> Log:
    """Both nodes joined and self-tested, and the sessions requested."""
    log = Log()
    log.add(GPU_NODE, *gpu_node_info)
    # A worker without NVML reports an empty GPU list from its `gpu` source.
    log.add(
        CPU_NODE,
        NodeGatheredInfo(
            node_id=CPU_NODE,
            source="host",
            info=NodeInfo(hostname=CPU_NODE, slots=CPU_NODE_SLOTS, slot_memory_mb=CPU_NODE_SLOT_MB),
        ),
        NodeGatheredInfo(node_id=CPU_NODE, source="gpu", info=NodeInfo(gpus=())),
    )
    for node_id in (GPU_NODE, CPU_NODE):
        log.add(
            node_id, RunnerSelfTestCompleted(node_id=node_id, runner_kind="subprocess", passed=True)
        )
    log.add(MASTER_ORIGIN, *sessions)
    return log


def plan_first_epoch(state: State, entropy: int) -> tuple[Event, list[DevshardPlaced]]:
    """The first epoch's EpochStarted and every session's devshard, as the planner places them."""
    started = next_epoch(state, T0, PlannerConfig(), entropy=entropy)
    state = fold(state, [IndexedEvent(state.last_applied + 1, T0, MASTER_ORIGIN, 10**6, started)])
    epoch = epoch_record(started)
    pool = PlacementPool(state, now_ms=epoch.start_ms, work_end_ms=epoch.end_ms, used={})
    sessions = [state.sessions[s] for s in sorted(state.sessions.keys())]
    outcome = place_sessions(sessions, epoch, pool, {})
    unplaced = [e for e in outcome if isinstance(e, SessionUnplaced)]
    assert not unplaced, unplaced
    return started, [e for e in outcome if isinstance(e, DevshardPlaced)]


def used_mib(probe: NvmlGpuProbe) -> int:
    """memory_used_mb over every GPU, as the node's `gpu` source reads it now.

    Summed, so the figure does not depend on which GPU CUDA_VISIBLE_DEVICES gives the runner.
    """
    gpus = probe_gpu(probe).gpus or ()
    return sum(g.memory_used_mb for g in gpus)


def session(session_id: str, gpu: bool) -> SessionRequested:
    return SessionRequested(session_id=session_id, slots=1, memory_per_slot_mb=8_192, gpu=gpu)


# --------------------------------------------------------------------------------------------
# a. Placement with this machine's real GPUs
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.anyio
async def test_a_gpu_session_is_placed_on_the_node_reporting_the_real_gpu(
    gpu_probe: NvmlGpuProbe, tmp_path: Path
) -> None:
    info = await gathered_gpu_node_info(gpu_probe, tmp_path)
    reported = [e.info.gpus for e in info if e.source == "gpu"]
    assert len(reported) == 1 and reported[0], "the gpu source reported no GPU"
    log = cluster_log(info, [session(GPU_SESSION, gpu=True), session(CPU_SESSION, gpu=False)])
    node = log.state.nodes[GPU_NODE].info
    # What placement reads: the real GPU list, and the worker's slots and memory per slot.
    assert node.gpus == reported[0]
    assert all(g.uuid.startswith("GPU-") and g.memory_total_mb > 0 for g in node.gpus or ())
    assert (node.slots, node.slot_memory_mb) == (GPU_NODE_SLOTS, GPU_NODE_SLOT_MB)
    assert log.state.nodes[CPU_NODE].info.gpus == ()

    cpu_session_nodes: set[str] = set()
    for entropy in SEEDS:
        _, placed = plan_first_epoch(log.state, entropy)
        by_session = {p.session_id: p for p in placed}
        assert [a.node_id for a in by_session[GPU_SESSION].assignments] == [GPU_NODE]
        cpu_session_nodes.update(a.node_id for a in by_session[CPU_SESSION].assignments)
    # The session without a GPU may go anywhere -- and the roomier node does win it, so only
    # the GPU requirement kept the GPU session off it.
    assert CPU_NODE in cpu_session_nodes
    assert cpu_session_nodes <= {GPU_NODE, CPU_NODE}


# --------------------------------------------------------------------------------------------
# b. The placed slot's subprocess runner on the GPU, seen by the node's telemetry
# --------------------------------------------------------------------------------------------


class Emitted(ManagerEvents):
    """What the runner manager emitted (test_runner_manager's recorder), with failure reasons."""

    def reasons(self) -> list[str]:
        return [e.reason for e in self.events if isinstance(e, RunnerStatusUpdated) and e.reason]


async def until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    try:
        with anyio.fail_after(timeout_s):
            while not condition():
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not within {timeout_s:g}s: {what}") from None


async def until_memory(
    probe: NvmlGpuProbe, good: Callable[[int], bool], timeout_s: float, what: str
) -> int:
    """Read the `gpu` source (in a thread, as the gatherer does) until `good(used)`."""
    seen: list[int] = []
    try:
        with anyio.fail_after(timeout_s):
            while True:
                used = await anyio.to_thread.run_sync(used_mib, probe)
                seen.append(used)
                if good(used):
                    return used
                await anyio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"not within {timeout_s:g}s: {what} (read {seen[-5:]})") from None


def compute_apps() -> str:
    """nvidia-smi's list of GPU processes, for the record (its pids may be another namespace's)."""
    if shutil.which("nvidia-smi") is None:
        return "(no nvidia-smi)"
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return (out.stdout + out.stderr).strip()


@pytest.mark.gpu
@pytest.mark.anyio
async def test_the_placed_gpu_slot_runs_a_cuda_subprocess_runner_seen_in_telemetry(
    gpu_probe: NvmlGpuProbe, tmp_path: Path
) -> None:
    info = await gathered_gpu_node_info(gpu_probe, tmp_path)
    log = cluster_log(info, [session(GPU_SESSION, gpu=True)])
    started, placed = plan_first_epoch(log.state, entropy=0)
    state = log.add(MASTER_ORIGIN, started, *placed)
    (shard,) = placed
    # The slot the planner gave the GPU node, as its worker derives it from state.
    wanted = desired_runners(state, GPU_NODE)
    assert desired_runners(state, CPU_NODE) == {}
    (spec,) = wanted.values()
    assert (spec.devshard_id, spec.session_id, spec.gpu) == (shard.devshard_id, GPU_SESSION, True)

    stderr_log = tmp_path / "runner.stderr"
    base = make_factory(
        "subprocess",
        {
            "command": [sys.executable, "-c", RUNNER_PROGRAM],
            "wait_ready": True,  # READY comes once the memory is held
            "load_timeout_s": 180,  # torch import and CUDA start-up on a cold machine
            "grace_s": 30,
            "log_file": str(stderr_log),
        },
    )
    built: list[Runner] = []

    def factory(spec: RunnerSpec) -> Runner:
        runner = base(spec)
        built.append(runner)
        return runner

    emitted = Emitted()
    manager = RunnerManager(
        GPU_NODE,
        emitted,
        factory,
        work_interval_s=0.1,
        health_interval_s=0.5,
        load_timeout_s=180,
        stop_timeout_s=60,
        restart_limit=0,  # a failure must show, not be retried away
    )
    before = await anyio.to_thread.run_sync(used_mib, gpu_probe)
    runner_id = spec.runner_id

    async with anyio.create_task_group() as tg:
        await tg.start(manager.run)
        manager.reconcile(state)

        def running_or_failed() -> bool:
            return bool(
                {RunnerStatus.RUNNING, RunnerStatus.FAILED} & set(emitted.statuses(runner_id))
            )

        await until(running_or_failed, 240, "the GPU runner loads")
        assert RunnerStatus.FAILED not in emitted.statuses(runner_id), (
            emitted.reasons(),
            stderr_log.read_text() if stderr_log.exists() else "",
        )
        (runner,) = built
        assert isinstance(runner, SubprocessRunner) and runner.pid is not None
        pid = runner.pid
        await until(lambda: emitted.work(shard.devshard_id) >= 1, 120, "work reported")
        during = await until_memory(
            gpu_probe,
            lambda used: used >= before + HOLD_MIB,
            30,
            f"memory_used_mb rises by {HOLD_MIB} MiB from {before}",
        )
        apps = await anyio.to_thread.run_sync(compute_apps)
        await until(lambda: emitted.work(shard.devshard_id) == BATCHES, 120, "every batch")

        # The session ends: its devshard is finalized and the runner is stopped.
        state = log.add(
            MASTER_ORIGIN,
            SessionDeleted(session_id=GPU_SESSION),
            DevshardFinalized(devshard_id=shard.devshard_id, epoch=shard.epoch),
        )
        manager.reconcile(state)
        await until(lambda: manager.statuses() == {}, 90, "the runner is stopped")
        tg.cancel_scope.cancel()

    assert not process_alive(pid)
    after = await until_memory(
        gpu_probe,
        lambda used: used <= before + RELEASE_SLACK_MIB,
        30,
        f"memory_used_mb falls back to about {before}",
    )
    s = RunnerStatus
    assert emitted.statuses(runner_id) == [
        s.PENDING,
        s.LOADING,
        s.READY,
        s.RUNNING,
        s.STOPPING,
        s.STOPPED,
    ]
    assert emitted.work(shard.devshard_id) == BATCHES
    assert all(
        e.epoch == shard.epoch and e.node_id == GPU_NODE
        for e in emitted.events
        if isinstance(e, WorkReported)
    )
    gpu_count = len(log.state.nodes[GPU_NODE].info.gpus or ())
    print(
        f"\nGPU runner {runner_id} (pid {pid}) on {GPU_NODE}: "
        f"work units {emitted.work(shard.devshard_id)}; memory_used_mb over "
        f"{gpu_count} GPU(s): before {before}, during {during} "
        f"(+{during - before}), after {after}\nnvidia-smi compute apps while it ran:\n{apps}"
    )
