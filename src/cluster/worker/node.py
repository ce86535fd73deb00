"""A whole worker in one object: connection and replica, info sources, runners, self-test.

`cluster worker` is this plus what only a command line needs (flags, signals, a synthetic
load for benchmarks). A program that embeds a worker builds a `WorkerNode` directly
(docs/embedding.md):

    node = WorkerNode(data_dir, master_addr, WorkerNodeConfig(client=WorkerConfig(secret=s)))
    try:
        await task_group.start(node.run)
        node.worker.add_listener(on_state)   # the replica, after every change
        ...
        node.stop()
    finally:
        node.close()
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread
from anyio.abc import TaskStatus

from cluster import control
from cluster.shared.events import (
    MAX_REASON_CHARS,
    NO_RUNNERS_DIGEST,
    NodeStopping,
    RunnerSelfTestCompleted,
)
from cluster.shared.excuse import excusing_window
from cluster.shared.humanize import clip, encodable, format_relative, format_utc
from cluster.shared.state import State
from cluster.worker.client import Worker, WorkerConfig
from cluster.worker.gpu import NvmlGpuProbe
from cluster.worker.info import InfoConfig, InfoGatherer, default_sources
from cluster.worker.master_addr import MasterAddrSource
from cluster.worker.outbox import OutboxWriteError
from cluster.worker.relay import HostRelay
from cluster.worker.runner_manager import DEFAULT_LOAD_TIMEOUT_S, RunnerManager
from cluster.worker.runners.base import RunnerConfigError, RunnerFactory, describe_error
from cluster.worker.runners.process_groups import RunnerProcessGroups
from cluster.worker.runners.registry import RunnerSetting, load_limit_s, make_factory
from cluster.worker.selftest import needs_self_test, run_self_test, self_test_spec

log = logging.getLogger(__name__)

#: How long the self-test waits for NVML to say whether this machine has GPUs.
_GPU_PROBE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class WorkerNodeConfig:
    client: WorkerConfig = field(default_factory=WorkerConfig)
    #: Slots and sizes the built-in info sources report; None: gather no node info (the node
    #: then offers no slots unless something else emits its info).
    info: InfoConfig | None = None
    #: The runner kind and its config; None: run no runners (and skip the self-test).
    runner: RunnerSetting | None = field(default_factory=RunnerSetting)
    #: Serve the host's control socket (`cluster maintenance ...` on this host).
    control_socket: bool = True
    #: On stop, how long the runners' last events (their final work, STOPPED) may take to be
    #: acknowledged by the master before the connection closes anyway.
    stop_flush_timeout_s: float = 10.0
    #: Then how long the worker's goodbye (`NodeStopping`) may take to be acknowledged: the
    #: master then disconnects the node, should it not be back within `stale_cycles`, as
    #: stopped by its operator rather than as if it had crashed. 0: say no goodbye.
    goodbye_timeout_s: float = 2.0


def _check_runner_setting(setting: RunnerSetting) -> None:
    """Build one runner of `setting` (not loaded): a typo or a bad value in its config is a
    `RunnerConfigError` naming it now, not only a failed self-test seen in `cluster status`
    later. Whatever else its constructor raises is one too, naming the kind."""
    try:
        # The setting's digest travels in every hello: its config must be plain data (what
        # a TOML runner file gives), not a Path, a set or text with a lone surrogate.
        setting.digest()
    except (TypeError, ValueError, UnicodeError) as exc:
        raise RunnerConfigError(
            f"runner kind {setting.kind!r}: its config must be plain data (text, numbers, "
            f"booleans, lists and tables, as a TOML runner file gives): {describe_error(exc)}"
        ) from None
    try:
        make_factory(setting.kind, setting.config)(self_test_spec("config-check"))
    except RunnerConfigError:
        raise
    except Exception as exc:
        raise RunnerConfigError(f"runner kind {setting.kind!r}: {describe_error(exc)}") from None


def goodbye_words(state: State, node_id: str, at_ms: int, acked: bool, timeout_s: float) -> str:
    """What the worker's log says once it said goodbye (`acked`: the master acknowledged it
    within `timeout_s`), judged on its replica at `at_ms` by the master's one excuse rule:
    inside its maintenance window the node is offline for maintenance, excused, not
    disconnected (it said "disconnected as stopped by its operator" there too)."""
    window = excusing_window(state, node_id, at_ms)
    if window is not None:
        end = window.end_ms
        said = "said goodbye" if acked else "stopping (the master did not acknowledge our goodbye)"
        return (
            f"{said} inside maintenance window {window.window_id}: this node is offline for "
            f"maintenance until {format_utc(end, at_ms)} ({format_relative(end, at_ms)}), "
            "excused; not back by then, it is disconnected as stopped by its operator"
        )
    if acked:
        return (
            "said goodbye: unless this node is back within the master's stale cycles, it is "
            "disconnected as stopped by its operator"
        )
    return (
        f"the master did not acknowledge our goodbye within {timeout_s:g}s: it will find this "
        "node silent and disconnect it after its stale cycles"
    )


def _log_self_test(result: RunnerSelfTestCompleted) -> None:
    """Say how the self-test went in the worker's own log: otherwise only `cluster status`
    shows a failed one, and the worker's operator sees it connected and caught up, never
    learning that this node will serve nothing."""
    if result.passed:
        log.info(
            "runner self-test passed (kind %r: load %d ms, probe %d ms, request %d ms): this "
            "node can be given slots",
            result.runner_kind,
            result.load_ms,
            result.probe_ms,
            result.request_ms,
        )
    else:
        log.error(
            "runner self-test failed (kind %r): %s -- this node gets no slots until a test "
            "of its runner setting passes: fix the setting or the machine, then restart the "
            "worker",
            result.runner_kind,
            result.reason,
        )


class WorkerNode:
    """The worker process's parts, wired as `cluster worker` wires them.

    Opening reads the node's key and outbox in `data_dir` and checks the runner setting
    (`RunnerConfigError` names what is wrong); `close()` closes the outbox. In between,
    `run()` serves until `stop()`.
    """

    def __init__(
        self,
        data_dir: Path,
        master_addr: MasterAddrSource,
        config: WorkerNodeConfig | None = None,
        *,
        gpu_probe: NvmlGpuProbe | None = None,
    ) -> None:
        """`master_addr`: the master's full multiaddr, or a file (`Path`) or callable giving
        it, read again before every dial (a master restarted on a new port is followed).
        `gpu_probe` replaces the NVML probe the gpu info source and the self-test use."""
        self.data_dir = data_dir
        self.config = config = config or WorkerNodeConfig()
        # One probe for the gpu info source and the self-test: they must agree on whether
        # this machine has GPUs (no info gathering: no GPUs reported, none assumed).
        self._gpu_probe = (gpu_probe or NvmlGpuProbe()) if config.info is not None else None
        self.manager: RunnerManager | None = None
        self._factory: RunnerFactory | None = None
        self._stop_requested = False
        self._stop_reason = ""
        self._stopping: anyio.Event | None = None  # made by run(): needs the event loop
        self._process_groups = RunnerProcessGroups(data_dir / "runners")
        if config.runner is not None:
            _check_runner_setting(config.runner)
            self._factory = make_factory(
                config.runner.kind, config.runner.config, process_groups=self._process_groups
            )
        sources = (
            default_sources(config.info, gpu_probe=self._gpu_probe)
            if config.info is not None
            else None
        )
        # Its hello names the runner setting, so that the master stops counting a self-test
        # of another setting (this worker restarted with a changed one) from that hello on;
        # without runners it says so: "" would keep an earlier process's passed test, and the
        # master would go on placing slots here that nothing serves.
        digest = config.runner.digest() if config.runner is not None else NO_RUNNERS_DIGEST
        self.worker = worker = Worker(data_dir, master_addr, config.client, runner_digest=digest)
        try:
            self.gatherer: InfoGatherer | None = None
            if sources is not None:
                self.gatherer = InfoGatherer(worker.node_id, worker.emit_info, sources)
            if self._factory is not None:
                assert config.runner is not None
                self.manager = RunnerManager(
                    worker.node_id,
                    worker.emit,
                    self._factory,
                    load_timeout_s=load_limit_s(config.runner.config, DEFAULT_LOAD_TIMEOUT_S),
                    connected=lambda: worker.connected,
                )
        except BaseException:
            worker.close()  # the outbox is open: a bad setting must not leave it so
            raise

    @property
    def node_id(self) -> str:
        return self.worker.node_id

    @property
    def state(self) -> State:
        """This node's replica of the cluster state."""
        return self.worker.state

    @property
    def failure(self) -> OutboxWriteError | None:
        """The outbox write the disk refused, if one was: `run()` then stopped on its own,
        its runners stopped as by `stop()` (`cluster worker` exits 2)."""
        return self.worker.failure

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until `stop()`: connect (and reconnect) to the master, gather, run runners.

        Stopping is graceful: the runners stop first, while the connection is still up, and
        their last events (STOPPING, the work they did last, STOPPED) are given up to
        `stop_flush_timeout_s` to be acknowledged before the connection closes. Whatever is
        not acknowledged by then stays in the outbox and is sent on the next start. Last,
        the worker says goodbye (`_say_goodbye`).
        """
        worker = self.worker
        self._stopping = stopping = anyio.Event()
        if self._stop_requested:
            stopping.set()
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            if self.config.control_socket:
                await tg.start(control.serve, self.data_dir, HostRelay(worker).handle)
            tg.start_soon(self._stop_when_worker_finished, stopping)
            # Before any runner starts: a command an earlier, killed worker process left
            # running still holds its memory, and its slot would get a second one.
            await self._process_groups.reap_leftovers()
            # What emits events on its own: stopped before the connection, so what it says
            # last still reaches the master.
            async with anyio.create_task_group() as emitters:
                if self.gatherer is not None:
                    emitters.start_soon(self.gatherer.run)
                if self.manager is not None and self._factory is not None:
                    await emitters.start(self.manager.run)
                    assert self.config.runner is not None
                    emitters.start_soon(
                        self._self_test_then_serve,
                        self.config.runner,
                        self._factory,
                        self.manager,
                    )
                task_status.started()
                await stopping.wait()
                emitters.cancel_scope.cancel()  # the runner manager stops every runner
            if worker.connected and not await worker.flush(self.config.stop_flush_timeout_s):
                log.warning(
                    "stopping with events the master has not acknowledged yet (acked %d of "
                    "%d); they stay in the outbox for the next start",
                    worker.outbox.acked,
                    worker.outbox.last_seq,
                )
            await self._say_goodbye()
            worker.stop()
            await worker.wait_finished()
            tg.cancel_scope.cancel()

    def stop(self, reason: str = "") -> None:
        """Ask `run()` to stop (runners first, then the connection); returns at once.

        `reason` is what the goodbye tells the master stopped it (`cluster worker` says
        which signal); the master's log quotes it. Only the first stop's reason counts."""
        if not self._stop_requested:
            self._stop_reason = reason
        self._stop_requested = True
        if self._stopping is not None:
            self._stopping.set()

    # --- worker goodbye (NodeStopping) -----------------------------------------------------
    async def _say_goodbye(self) -> None:
        """Tell the master this node is stopping cleanly, and wait up to `goodbye_timeout_s`
        for it to be acknowledged, so that should this node not be back within the master's
        stale cycles, its log says "stopped by its operator" rather than what a crash gets
        (back sooner, a restart costs nothing). The event is the last: the runners have
        stopped and their events are flushed.

        A worker not connected (the master is unreachable, or the connection part ended on
        its own) just stops, as before: the master judges it by its silence. So does one
        whose outbox the disk refused (`Worker.failure`): the goodbye cannot be recorded.
        A goodbye the master did not acknowledge in time stays in the outbox and is sent on
        the next start, where it changes nothing: it names this process's boot id, no longer
        the node's.
        """
        worker = self.worker
        timeout = self.config.goodbye_timeout_s
        if timeout <= 0 or not worker.connected or worker.failure is not None:
            return
        # Its last event: the heartbeats stop with it (`emit_last`); the info sources and the
        # runners stopped before the flush in `run`.
        try:
            worker.emit_last(
                NodeStopping(
                    node_id=worker.node_id,
                    boot_id=worker.boot_id,
                    reason=clip(encodable(self._stop_reason), MAX_REASON_CHARS),
                )
            )
        except OutboxWriteError:
            # The disk refused it: the worker stops on that, said once (`Worker._fail_stop`);
            # the master judges this node by its silence, as after a crash.
            return
        acked = await worker.flush(timeout)
        # The replica's time: the master's clock as of its last event (heartbeats keep it
        # close), the time the master judges the window by.
        state = worker.state
        log.info("%s", goodbye_words(state, worker.node_id, state.last_time_ms, acked, timeout))

    # --- end worker goodbye ---------------------------------------------------------------

    async def _stop_when_worker_finished(self, stopping: anyio.Event) -> None:
        # The connection side may end on its own (an embedding program stops `node.worker`):
        # then the runners stop too.
        await self.worker.wait_finished()
        stopping.set()

    def close(self) -> None:
        """Close the outbox and NVML (call after `run` returned)."""
        self.worker.close()
        if self._gpu_probe is not None:
            self._gpu_probe.close()

    async def _self_test_then_serve(
        self, setting: RunnerSetting, make: RunnerFactory, manager: RunnerManager
    ) -> None:
        """Once the replica has caught up: self-test the runner unless the log already holds
        a result for this exact setting (a restart or config change re-tests only if needed),
        and only then let the runner manager act on the state.

        Not before: a worker restarted with a changed setting still holds slots (the node's
        earlier test passed), and their runners would load beside the self-test's -- two
        models on one GPU -- with a setting not yet tested. After the test they start whether
        it passed or not: a setting that cannot serve then fails its runners, and the planner
        moves their slots (failed_slot_grace_ms) with a miss recorded, as for any failure.
        """
        worker = self.worker
        while worker.phase != "connected":
            await anyio.sleep(0.2)
        if needs_self_test(worker.state, worker.node_id, setting.kind, setting.digest()):
            result = await run_self_test(
                setting.kind,
                make,
                setting.config,
                node_id=worker.node_id,
                gpu=await self._has_gpu(),
            )
            worker.emit(result)
            _log_self_test(result)
        else:
            log.info("runner self-test: this runner setting already passed one; not tested again")
        # Only caught-up states: a restart's catch-up replays placements that are long
        # finalized, and runners must not start for those.
        worker.add_listener(manager.reconcile, live_only=True)
        if worker.phase == "connected":  # else the listener gets the next caught-up state
            try:
                manager.reconcile(worker.state)
            except Exception:  # as a listener's: logged, and the next state tries again
                log.exception("state listener failed")

    async def _has_gpu(self) -> bool:
        """Does this node report GPUs (so GPU sessions may be placed here)? Read in a thread,
        bounded: NVML is a C library that a sick driver can hang.

        A GPU that fails to answer (GpuIsLost, a driver reset) must not end the worker: under
        systemd that is a crash loop, each restart failing the same way. It is tested as a
        node without GPUs, as on a timeout; the gpu info source keeps retrying, and a node
        whose GPU comes back gets GPU sessions once its info reports one.
        """
        probe = self._gpu_probe
        if probe is None:
            return False
        with anyio.move_on_after(_GPU_PROBE_TIMEOUT_S):
            try:
                gpus = await anyio.to_thread.run_sync(probe.read, abandon_on_cancel=True)
            except Exception as exc:
                log.warning(
                    "the GPUs did not answer (%s: %s): self-testing as a node without GPUs",
                    type(exc).__name__,
                    exc,
                )
                return False
            return bool(gpus)
        log.warning(
            "no GPU answer within %gs: self-testing as a node without GPUs", _GPU_PROBE_TIMEOUT_S
        )
        return False
