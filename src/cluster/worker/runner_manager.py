"""Keeps this node's runners in line with the slots the master assigned to it.

`desired_runners(state, node_id)` is the pure part: every slot of a live devshard assigned to
this node, as a `RunnerSpec` whose runner id is ``f"{devshard_id}/{slot}"``. The shell,
`RunnerManager`, starts a runner for each new slot, stops those no longer wanted, and tells
the master every step through `RunnerStatusUpdated`:

    pending -> loading -> ready -> running -> stopping -> stopped
                     \\         \\          \\-> failed (reason) -> stopped (when unassigned)

"ready" means loaded; "running" means its devshard's epoch has begun (a devshard placed
ahead of its epoch waits loaded). A failed runner is stopped at once and reported FAILED with
the reason -- and so is one that ends by itself, even cleanly, while its slot is still
assigned (a command that daemonizes and exits 0 leaves the slot unserved; it is not
restarted: each restart would leave one more daemon). While its slot stays assigned a
failed runner is started again after `restart_backoff_s` (doubling each time), at most
`restart_limit` times per devshard -- a crash or a transient out-of-memory should not cost
the rest of the epoch. After the last attempt it keeps its FAILED record until the slot is
unassigned. A failed runner whose devshard is over (parked, below) is stopped instead, and one
that ends cleanly then is simply STOPPED. Work done is reported every `work_interval_s` (every
`offline_work_interval_s` while the master is unreachable) and once more when a runner
stops, as `WorkReported` for the devshard's epoch.

Carry-over: devshards end with their epoch and the session is placed again, usually on the
same nodes (placement is sticky). A loaded runner whose devshard was finalized is therefore
kept ("parked") for `carry_over_grace_s`, or until its session is deleted; if the new devshard
gives this node a slot of the same session (same memory and GPU), the runner takes it over
without a reload: its old runner id is reported stopped ("carried over to ...") and the new id
ready, then running. Work done before the switch is reported for the old devshard.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.abc

from cluster.shared.events import (
    MAX_REASON_CHARS,
    MAX_WORK_UNITS,
    Event,
    RunnerStatus,
    RunnerStatusUpdated,
    WorkReported,
)
from cluster.shared.humanize import clip, encodable
from cluster.shared.state import State, runner_id_for
from cluster.worker.runners.base import (
    Runner,
    RunnerFactory,
    RunnerFailed,
    RunnerSpec,
    describe_end,
    describe_error,
    health_problem,
    stop_limit_s,
)

log = logging.getLogger(__name__)

Emit = Callable[[Event], None]

#: How long `load()` may take unless told otherwise (see `load_limit_s` for a runner config
#: that allows more).
DEFAULT_LOAD_TIMEOUT_S = 300.0

#: Statuses in which a runner holds resources that `stop()` must release.
_LIVE = frozenset({RunnerStatus.LOADING, RunnerStatus.READY, RunnerStatus.RUNNING})


def desired_runners(state: State, node_id: str) -> dict[str, RunnerSpec]:
    """Every runner this node should have now: one per slot assigned to it (pure)."""
    wanted: dict[str, RunnerSpec] = {}
    for shard in state.devshards.values():
        session = state.sessions.get(shard.session_id)  # None once deleted: work finishes
        for assignment in shard.assignments:
            if assignment.node_id != node_id:
                continue
            runner_id = runner_id_for(shard.devshard_id, assignment.slot)
            wanted[runner_id] = RunnerSpec(
                runner_id=runner_id,
                node_id=node_id,
                devshard_id=shard.devshard_id,
                session_id=shard.session_id,
                slot=assignment.slot,
                memory_mb=session.memory_per_slot_mb if session is not None else 0,
                gpu=session.gpu if session is not None else False,
                epoch=shard.epoch,
                ends_ms=shard.ends_ms,
            )
    return wanted


def epoch_has_begun(state: State, epoch: int) -> bool:
    return state.epoch is not None and state.epoch.epoch >= epoch


def _whole_units(value: object) -> int | None:
    """`value` as a count of work units: any int (numpy's too, via `__index__`) but a bool;
    None for anything else."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def _shutting_down() -> bool:
    """The calling task is being cancelled (the manager is stopping)."""
    return anyio.current_effective_deadline() == float("-inf")


@dataclass
class _Handle:
    spec: RunnerSpec
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    epoch_begun: anyio.Event = field(default_factory=anyio.Event)
    status: RunnerStatus | None = None
    reason: str = ""
    runner: Runner | None = None
    runner_stopped: bool = False
    #: Unassigned (being stopped); a new assignment of the same id waits for it to finish.
    retired: bool = False
    #: Its devshard was finalized: kept loaded for a successor devshard (see carry-over).
    parked: bool = False
    #: Times parked: a grace timer stops the runner only if it is still that parking.
    parks: int = 0
    #: Restarts used for this slot of this devshard (a carry-over starts the count afresh).
    restarts: int = 0
    #: The runner whose `can_carry_over()` raised and was logged (logged once per runner).
    carry_check_failed: Runner | None = None
    #: The runner whose `work_units()` returned a non-int and was logged (once per runner).
    bad_units_logged: Runner | None = None
    #: The task group serving the loaded runner (None when not serving).
    serving: anyio.abc.TaskGroup | None = None


def _portable(h: _Handle) -> bool:
    """Loaded, serving, and of a kind that may serve a later devshard (carry-over)."""
    return (
        h.serving is not None
        and h.status in (RunnerStatus.READY, RunnerStatus.RUNNING)
        and h.runner is not None
        and _can_carry_over(h, h.runner)
    )


def _can_carry_over(h: _Handle, runner: Runner) -> bool:
    """`runner.can_carry_over()`, where a plugin's exception means no: raised out of
    `reconcile`, it would keep every slot of this node from starting or stopping."""
    try:
        return runner.can_carry_over()
    except Exception as exc:
        if h.carry_check_failed is not runner:
            h.carry_check_failed = runner
            log.warning(
                "runner %s: can_carry_over() failed, so it is never carried over: %s",
                h.spec.runner_id,
                describe_error(exc),
            )
        return False


class RunnerManager:
    """Runs this node's runners. Call `reconcile(state)` from the event loop on every
    replica change; `run()` must be running for runners to start."""

    def __init__(
        self,
        node_id: str,
        emit: Emit,
        runner_factory: RunnerFactory,
        *,
        work_interval_s: float = 1.0,
        health_interval_s: float = 2.0,
        health_timeout_s: float = 5.0,
        load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S,
        stop_timeout_s: float = 30.0,
        carry_over_grace_s: float = 10.0,
        restart_limit: int = 3,
        restart_backoff_s: float = 5.0,
        offline_work_interval_s: float = 60.0,
        connected: Callable[[], bool] = lambda: True,
    ) -> None:
        for what, value in (
            ("work_interval_s", work_interval_s),
            ("offline_work_interval_s", offline_work_interval_s),
            ("health_interval_s", health_interval_s),
            ("health_timeout_s", health_timeout_s),
            ("load_timeout_s", load_timeout_s),
            ("stop_timeout_s", stop_timeout_s),
            ("carry_over_grace_s", carry_over_grace_s),
            ("restart_backoff_s", restart_backoff_s),
        ):
            if not value > 0:
                raise ValueError(f"RunnerManager: {what} must be > 0, got {value!r}")
        if (
            isinstance(restart_limit, bool)
            or not isinstance(restart_limit, int)
            or restart_limit < 0
        ):
            raise ValueError(
                f"RunnerManager: restart_limit must be an integer >= 0, got {restart_limit!r}"
            )
        self.node_id = node_id
        self._emit = emit
        self._factory = runner_factory
        self._work_interval_s = work_interval_s
        self._offline_work_interval_s = offline_work_interval_s
        self._connected = connected
        self._health_interval_s = health_interval_s
        self._health_timeout_s = health_timeout_s
        self._load_timeout_s = load_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._carry_over_grace_s = carry_over_grace_s
        self._restart_limit = restart_limit
        self._restart_backoff_s = restart_backoff_s
        self._handles: dict[str, _Handle] = {}
        self._state: State | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._applied: tuple[object, object, object] | None = None

    def statuses(self) -> dict[str, tuple[RunnerStatus, str]]:
        """This node's runners as the manager sees them: id -> (status, reason)."""
        return {
            rid: (h.status, h.reason) for rid, h in self._handles.items() if h.status is not None
        }

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Supervise runners until cancelled; every runner is stopped before this returns."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if self._state is not None:
                    self._apply(self._state)
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._tg = None

    def reconcile(self, state: State) -> None:
        """Start runners for new slots, stop those no longer assigned (non-blocking)."""
        self._state = state
        # Most events (info, heartbeats, work) leave devshards, the epoch and sessions
        # untouched, and immutable state keeps them the same objects: skip the
        # O(devshards) scan then.
        if self._tg is not None and not self._already_applied(state):
            try:
                self._apply(state)
            except BaseException:
                # Not (fully) applied: the next state must try again, not be skipped as the
                # same devshards -- a runner left unstarted would stay so all epoch.
                self._applied = None
                raise

    # -- shell ----------------------------------------------------------------------------

    def _already_applied(self, state: State) -> bool:
        applied = self._applied
        current = (state.devshards, state.epoch, state.sessions)
        return applied is not None and all(a is b for a, b in zip(applied, current, strict=True))

    def _apply(self, state: State) -> None:
        assert self._tg is not None
        self._applied = (state.devshards, state.epoch, state.sessions)
        wanted = desired_runners(state, self.node_id)
        for runner_id, spec in wanted.items():
            if runner_id not in self._handles:
                predecessor = self._predecessor(spec, wanted)
                if predecessor is not None:
                    self._carry_over(predecessor, spec, state)
        for runner_id, handle in list(self._handles.items()):
            if runner_id in wanted or handle.retired:
                continue
            if not self._may_park(handle, state):
                self._retire(handle)  # parked ones too: e.g. their session was deleted
            elif not handle.parked:
                handle.parked = True
                handle.parks += 1
                self._tg.start_soon(self._stop_if_still_parked, handle, handle.parks)
        for runner_id, spec in wanted.items():
            if runner_id not in self._handles:
                handle = _Handle(spec)
                self._handles[runner_id] = handle
                self._tg.start_soon(self._supervise, handle, name=f"runner:{runner_id}")
        for handle in self._handles.values():
            if not handle.retired and epoch_has_begun(state, handle.spec.epoch):
                handle.epoch_begun.set()

    # -- carry-over -----------------------------------------------------------------------

    def _predecessor(self, spec: RunnerSpec, wanted: dict[str, RunnerSpec]) -> _Handle | None:
        """A loaded runner, no longer wanted, that can serve `spec` as it is: the same
        session, memory and GPU. The same slot number is preferred, then the lowest id."""
        fits = [
            h
            for rid, h in self._handles.items()
            if rid not in wanted
            and not h.retired
            and _portable(h)
            and (h.spec.session_id, h.spec.memory_mb, h.spec.gpu)
            == (spec.session_id, spec.memory_mb, spec.gpu)
        ]
        fits.sort(key=lambda h: (h.spec.slot != spec.slot, h.spec.runner_id))
        return fits[0] if fits else None

    def _may_park(self, h: _Handle, state: State) -> bool:
        """Keep this unwanted runner loaded for a successor? Only when its devshard simply
        ended (finalized) while its session lives on, and it is loaded and able to."""
        return (
            h.spec.devshard_id not in state.devshards
            and h.spec.session_id in state.sessions
            and _portable(h)
        )

    async def _stop_if_still_parked(self, h: _Handle, parks: int) -> None:
        await anyio.sleep(self._carry_over_grace_s)
        # Carried over and parked again since, it has a newer grace of its own.
        if h.parked and h.parks == parks and not h.retired:
            log.info("runner %s: no successor devshard here: stopping", h.spec.runner_id)
            self._retire(h)

    def _retire(self, h: _Handle) -> None:
        """Stop the runner of `h` (in its own task); its slot is not served any more."""
        h.retired = True
        h.scope.cancel()

    def _carry_over(self, h: _Handle, spec: RunnerSpec, state: State) -> None:
        """Hand the loaded runner of `h` to `spec`'s slot: no stop, no reload. If the runner
        cannot take it (a plugin's exception), it is stopped and `spec` gets a fresh one."""
        runner, serving, old = h.runner, h.serving, h.spec
        assert runner is not None and serving is not None
        try:
            self._report_work(h, runner)  # what it did so far belongs to the old devshard
            runner.carry_over(spec)
        except Exception as exc:
            log.warning(
                "runner %s: cannot be carried over to %s, stopping it (a new one loads): %s",
                old.runner_id,
                spec.runner_id,
                describe_error(exc),
            )
            self._retire(h)
            return
        reason = f"carried over to {spec.runner_id} (loaded, not restarted)"
        self._emit_status(old, RunnerStatus.STOPPED, reason)
        log.info("runner %s: carried over to %s without a reload", old.runner_id, spec.runner_id)
        del self._handles[old.runner_id]
        h.spec, h.parked, h.status, h.restarts = spec, False, None, 0
        h.epoch_begun = anyio.Event()
        self._handles[spec.runner_id] = h
        self._set(h, RunnerStatus.READY)
        if epoch_has_begun(state, spec.epoch):
            h.epoch_begun.set()
        serving.start_soon(self._mark_running, h)

    def _set(self, h: _Handle, status: RunnerStatus, reason: str = "") -> None:
        # A runner writes its reasons: they must encode (a surrogate-escaped file name).
        reason = clip(encodable(reason), MAX_REASON_CHARS)
        if h.status is status and h.reason == reason:
            return
        h.status, h.reason = status, reason
        spec = h.spec
        level = logging.WARNING if status is RunnerStatus.FAILED else logging.INFO
        said = f"{status.value} {reason}" if reason else status.value  # no trailing space
        log.log(level, "runner %s: %s", spec.runner_id, said)
        self._emit_status(spec, status, reason)

    def _emit_status(self, spec: RunnerSpec, status: RunnerStatus, reason: str) -> None:
        self._emit(
            RunnerStatusUpdated(
                runner_id=spec.runner_id,
                node_id=self.node_id,
                status=status,
                devshard_id=spec.devshard_id,
                slot=spec.slot,
                reason=reason,
            )
        )

    async def _supervise(self, h: _Handle) -> None:
        try:
            with h.scope:
                while True:
                    failure = await self._serve(h)
                    if failure is None and not self._still_assigned(h):
                        # Its slot is over (devshard finalized, parked, unassigned, shutting
                        # down): ending now is no failure.
                        await self._release(h)
                        self._set(h, RunnerStatus.STOPPED, "the runner ended by itself")
                        # Retired at once (a parked one too): nothing is left to carry over,
                        # and a STOPPED entry kept for the rest of the carry-over grace would
                        # show the operator and the master a runner that is not there.
                        self._retire(h)
                        break
                    ended_cleanly = failure is None
                    if failure is None:
                        # The slot is left unserved all the same (a command that daemonized
                        # and exited 0): a failure, moved by the planner, but not restarted.
                        assert h.runner is not None  # it served, so it was made
                        failure = (
                            "serve: ended on its own while its slot was still assigned "
                            + describe_end(h.runner)
                        )
                    self._set(h, RunnerStatus.FAILED, failure)
                    await self._release(h)
                    if self._devshard_over(h):
                        # A restart would serve a finalized devshard and, parked, race the
                        # fresh runner of a successor placed meanwhile: two loads, one slot.
                        self._retire(h)
                        break
                    if ended_cleanly:
                        # A launcher that daemonizes (`docker run -d`) exits 0 at once, and
                        # each restart would leave one more daemon out of the worker's reach.
                        # A crash is restarted; a clean end would most likely end again.
                        if self._restart_limit > 0:
                            log.warning(
                                "runner %s: not restarted: it ended cleanly by itself, as a "
                                "command that daemonizes does (each restart would leave one "
                                "more daemon running); a command must stay in the foreground "
                                "(`docker run` without -d)",
                                h.spec.runner_id,
                            )
                        break  # FAILED stays visible until the slot is unassigned
                    if h.restarts >= self._restart_limit:
                        break
                    h.restarts += 1
                    delay = self._restart_backoff_s * 2 ** (h.restarts - 1)
                    log.info(
                        "runner %s: restarting in %gs (restart %d of %d)",
                        h.spec.runner_id,
                        delay,
                        h.restarts,
                        self._restart_limit,
                    )
                    await anyio.sleep(delay)
                    h.runner, h.runner_stopped = None, False
                await anyio.sleep_forever()  # keep the outcome visible until unassigned
        finally:
            with anyio.CancelScope(shield=True):
                await self._release(h)
                if h.status is not RunnerStatus.STOPPED:
                    self._set(h, RunnerStatus.STOPPED)
            # Only if still this handle's: a new one may have taken the id meanwhile.
            if self._handles.get(h.spec.runner_id) is h:
                del self._handles[h.spec.runner_id]
            state = self._state
            if h.retired and not _shutting_down() and self._tg is not None and state is not None:
                self._apply(state)  # the same slot may have been assigned again

    def _still_assigned(self, h: _Handle) -> bool:
        """Does the latest state still give this node the slot `h` serves, and is the manager
        still serving it (not retired, parked or shutting down)?"""
        state = self._state
        if h.retired or h.parked or _shutting_down() or state is None:
            return False
        shard = state.devshards.get(h.spec.devshard_id)
        return shard is not None and any(
            a.slot == h.spec.slot and a.node_id == self.node_id for a in shard.assignments
        )

    def _devshard_over(self, h: _Handle) -> bool:
        """Parked, or its devshard gone from the latest state: nothing left to serve."""
        state = self._state
        return h.parked or (state is not None and h.spec.devshard_id not in state.devshards)

    async def _serve(self, h: _Handle) -> str | None:
        """Create, load and serve a runner; the failure reason, or None if it ended cleanly."""
        self._set(h, RunnerStatus.PENDING)
        step = "create"
        try:
            runner = h.runner = self._factory(h.spec)
            step = "load"
            self._set(h, RunnerStatus.LOADING)
            # The limit by its scope, not by TimeoutError: a runner's own one (a socket's
            # ETIMEDOUT) is its error, said as it is, not "timed out after 300s" at once.
            with anyio.move_on_after(self._load_timeout_s) as limit:
                await runner.load()
            if limit.cancelled_caught:
                raise TimeoutError(f"timed out after {self._load_timeout_s:g}s")
            self._set(h, RunnerStatus.READY)
            step = "serve"
            async with anyio.create_task_group() as tg:
                h.serving = tg
                tg.start_soon(self._mark_running, h)
                tg.start_soon(self._watch_health, runner)
                tg.start_soon(self._report_work_every_interval, h, runner)
                try:
                    await runner.run()
                finally:
                    h.serving = None
                tg.cancel_scope.cancel()
            return None
        except Exception as exc:
            return f"{step}: {describe_error(exc)}"

    async def _mark_running(self, h: _Handle) -> None:
        await h.epoch_begun.wait()
        self._set(h, RunnerStatus.RUNNING)

    async def _watch_health(self, runner: Runner) -> None:
        while True:
            await anyio.sleep(self._health_interval_s)
            # As for load: the limit by its scope; what the probe raises is its own error.
            try:
                with anyio.move_on_after(self._health_timeout_s) as limit:
                    health = await runner.health()
            except Exception as exc:
                raise RunnerFailed(f"health probe: {describe_error(exc)}") from None
            if limit.cancelled_caught:
                raise RunnerFailed(f"health probe timed out after {self._health_timeout_s:g}s")
            problem = health_problem(health)
            if problem is not None:
                raise RunnerFailed(f"health probe: {problem}")

    async def _report_work_every_interval(self, h: _Handle, runner: Runner) -> None:
        last = anyio.current_time()
        while True:
            await anyio.sleep(self._work_interval_s)
            now = anyio.current_time()
            # While the master is unreachable, units pile up in the runner and are reported
            # every offline_work_interval_s instead: each report is a durable outbox record
            # and later a log event forever, and a day offline at one report a second per
            # runner would add ~86,000 of them. A crash offline loses at most that interval.
            if not self._connected() and now - last < self._offline_work_interval_s:
                continue
            last = now
            self._report_work(h, runner)

    def _report_work(self, h: _Handle, runner: Runner) -> None:
        raw = runner.work_units()
        units = _whole_units(raw)
        if units is None:
            # A float or a bool (a plugin's bug): the master would refuse the whole batch
            # as malformed, each refusal costing a redial, and the work around it would be
            # lost. Dropped here instead, and said once: the runner keeps serving.
            if h.bad_units_logged is not runner:
                h.bad_units_logged = runner
                log.error(
                    "runner %s: work_units() must return an int, got %s: its reports are "
                    "dropped (logged once per runner)",
                    h.spec.runner_id,
                    clip(f"{raw!r} ({type(raw).__name__})", 100),
                )
            return
        if units > MAX_WORK_UNITS:
            # More than any runner does between two reports: a broken count. The master
            # would refuse the report, and the outbox would offer it again forever.
            log.error(
                "runner %s reported %d work units at once, over the bound of %d: reporting %d",
                h.spec.runner_id,
                units,
                MAX_WORK_UNITS,
                MAX_WORK_UNITS,
            )
            units = MAX_WORK_UNITS
        if units > 0:
            spec = h.spec
            self._emit(
                WorkReported(
                    devshard_id=spec.devshard_id,
                    node_id=self.node_id,
                    units=units,
                    epoch=spec.epoch,
                )
            )

    async def _release(self, h: _Handle) -> None:
        """Stop the runner once (bounded), then report the work it did last."""
        runner = h.runner
        if runner is None or h.runner_stopped:
            return
        h.runner_stopped = True
        if h.status in _LIVE:
            self._set(h, RunnerStatus.STOPPING)
        # Shielded: an unassignment arriving mid-stop must not leave a process half-stopped.
        # Never shorter than the runner says its stop may take (a long grace period).
        limit_s = stop_limit_s(runner, self._stop_timeout_s)
        with anyio.CancelScope(shield=True), anyio.move_on_after(limit_s) as scope:
            try:
                await runner.stop()
            except Exception as exc:
                log.warning("runner %s: stop failed: %s", h.spec.runner_id, describe_error(exc))
        if scope.cancelled_caught:
            log.warning("runner %s: stop did not finish within %gs", h.spec.runner_id, limit_s)
        try:
            self._report_work(h, runner)
        except Exception as exc:
            log.warning("runner %s: cannot read its last work: %s", h.spec.runner_id, exc)
