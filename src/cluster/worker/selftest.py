"""The runner self-test a worker runs on join and whenever its runner setting changes.

It builds one runner for a throw-away slot, loads it, probes its health, sends it one probe
request, checks it is still up a moment later (`survive_s`), and stops it, timing each step
(monotonic clock: these are measurements that travel inside the event, never decisions). A
node is eligible for placement only once its latest `RunnerSelfTestCompleted` passed, for the
setting its worker's hello named (`Hello.runner_digest`: a hello under another setting drops
the recorded test, see `reducers.nodes.ensure_node`). On
failure the reason names the step and why, e.g. "health probe timed out after 5s" or "load:
model file not found".

A runner that takes no requests (`RequestsNotSupported`) passes with the request step
skipped (request_ms = 0): there is nothing to probe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import anyio

from cluster.shared.events import MAX_REASON_CHARS, MAX_SELF_TEST_MS, RunnerSelfTestCompleted
from cluster.shared.humanize import clip, encodable
from cluster.shared.state import State
from cluster.worker.runners.base import (
    RequestsNotSupported,
    Runner,
    RunnerFactory,
    RunnerSpec,
    describe_end,
    describe_error,
    health_problem,
    stop_limit_s,
)
from cluster.worker.runners.registry import config_digest, load_limit_s

log = logging.getLogger(__name__)

SELF_TEST_PAYLOAD: Final = b"cluster self-test probe"


@dataclass(frozen=True)
class SelfTestTimeouts:
    #: Longer when the runner config's own `load_timeout_s` allows more (`load_limit_s`).
    load_s: float = 300.0
    probe_s: float = 10.0
    request_s: float = 60.0
    #: Or what the runner says its stop may take (`Runner.stop_time_s`), if longer.
    stop_s: float = 30.0
    #: How long a failed step waits for a dying runner's own account of why it died.
    settle_s: float = 1.0
    #: How long the runner must stay up after passing its probes: a command that starts and
    #: dies at once (a bad flag, a missing device) can answer a health probe in between.
    survive_s: float = 1.0


def self_test_spec(node_id: str, gpu: bool = False) -> RunnerSpec:
    """The throw-away slot a self-test runner serves; `gpu` as a GPU session's slot would be
    (a node with GPUs is tested the way it will serve GPU sessions: `CLUSTER_GPU=1`)."""
    return RunnerSpec(
        runner_id="selftest/0",
        node_id=node_id,
        devshard_id="selftest",
        session_id="selftest",
        slot=0,
        memory_mb=0,
        gpu=gpu,
        epoch=0,
        ends_ms=0,
    )


def needs_self_test(state: State, node_id: str, runner_kind: str, digest: str) -> bool:
    """True unless the log already holds a *passed* self-test of this exact runner setting
    (pure). A failed one is tried again by the next worker process: an operator who fixed
    the machine (a driver, a missing model file) and restarted the worker expects a new
    test, and the setting itself is all a node's failed result was keyed by."""
    node = state.nodes.get(node_id)
    result = node.self_test if node is not None else None
    return (
        result is None
        or not result.passed
        or result.runner_kind != runner_kind
        or result.config_digest != digest
    )


class _StepFailed(Exception):
    pass


async def run_self_test(
    runner_kind: str,
    factory: RunnerFactory,
    config: Mapping[str, Any],
    *,
    node_id: str,
    gpu: bool = False,
    timeouts: SelfTestTimeouts = SelfTestTimeouts(),
    clock: Callable[[], float] = time.monotonic,
) -> RunnerSelfTestCompleted:
    """Self-test one runner setting; never raises for a runner's failure, whatever the
    runner does (it is the result).

    `gpu`: the node has GPUs, so the test slot is a GPU slot (see `self_test_spec`).
    """
    timings = {"load": 0, "probe": 0, "request": 0}
    failure = ""
    runner: Runner | None = None
    run_outcome: list[str] = []

    async def timed(key: str, step: str, limit_s: float, call: Callable[[], Any]) -> Any:
        started = clock()
        # The limit by its scope, not by TimeoutError: a runner's own one (a socket's
        # ETIMEDOUT) is its error, said as it is, not "timed out after 300s" at once.
        try:
            with anyio.move_on_after(limit_s):
                return await call()
        except RequestsNotSupported:
            raise
        except Exception as exc:
            raise _StepFailed(f"{step}: {describe_error(exc)}") from None
        finally:
            timings[key] = round((clock() - started) * 1000)
        raise _StepFailed(f"{step} timed out after {limit_s:g}s")  # the scope ran out

    run_ended = anyio.Event()

    async def run_in_background(r: Runner) -> None:
        try:
            await r.run()
            # As in the runner manager: a slot's runner must not end by itself.
            run_outcome.append(
                f"the runner ended on its own during the self-test {describe_end(r)}"
            )
        except Exception as exc:
            run_outcome.append(f"the runner failed during the self-test: {describe_error(exc)}")
        finally:
            run_ended.set()

    async def probe(r: Runner) -> None:
        health = await timed("probe", "health probe", timeouts.probe_s, r.health)
        problem = health_problem(health)
        if problem is not None:
            raise _StepFailed(f"health probe: {problem}")
        try:
            answer = await timed(
                "request",
                "probe request",
                timeouts.request_s,
                lambda: r.serve_request(SELF_TEST_PAYLOAD),
            )
        except RequestsNotSupported:
            timings["request"] = 0
            return
        if not isinstance(answer, bytes) or not answer:
            raise _StepFailed("probe request: the runner gave an empty answer")

    try:
        try:
            built = factory(self_test_spec(node_id, gpu))
        except Exception as exc:
            raise _StepFailed(f"create: {describe_error(exc)}") from None
        if not isinstance(built, Runner):  # as `make_factory` checks a kind's output
            raise _StepFailed(f"create: the factory built a {type(built).__name__}, not a Runner")
        runner = built
        await timed("load", "load", load_limit_s(config, timeouts.load_s), runner.load)
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_in_background, runner)
            try:
                await probe(runner)
                with anyio.move_on_after(timeouts.survive_s):
                    await run_ended.wait()
            except _StepFailed:
                # A runner dying under the test explains the failed step better than the
                # step does: give its run() a moment to say why.
                with anyio.move_on_after(timeouts.settle_s):
                    await run_ended.wait()
                raise
            finally:
                tg.cancel_scope.cancel()
        if run_outcome:
            raise _StepFailed(run_outcome[0])
    except* _StepFailed as group:
        failure = run_outcome[0] if run_outcome else str(group.exceptions[0])
    except* Exception as group:
        # A runner that breaks the interface in a way no step expects (a factory's output
        # without `load`, say): a failed test, not an exception that would end the worker.
        log.exception("runner self-test: unexpected error", exc_info=group)
        failure = failure or f"the self-test failed: {describe_error(group)}"
    finally:
        if runner is not None:
            with anyio.CancelScope(shield=True):
                stop_failure = await _stop(runner, stop_limit_s(runner, timeouts.stop_s))
            failure = failure or stop_failure
    return RunnerSelfTestCompleted(
        node_id=node_id,
        runner_kind=runner_kind,
        passed=not failure,
        reason=clip(encodable(failure), MAX_REASON_CHARS),  # a runner wrote it
        # Clipped to the bounds the master admits (a config may allow a load over a day).
        load_ms=_admitted_ms(timings["load"]),
        probe_ms=_admitted_ms(timings["probe"]),
        request_ms=_admitted_ms(timings["request"]),
        config_digest=config_digest(runner_kind, config),
    )


def _admitted_ms(ms: int) -> int:
    return min(max(ms, 0), MAX_SELF_TEST_MS)


async def _stop(runner: Runner, limit_s: float) -> str:
    try:
        with anyio.move_on_after(limit_s) as limit:  # the runner's own TimeoutError is its error
            await runner.stop()
    except Exception as exc:
        return f"stop: {describe_error(exc)}"
    return f"stop timed out after {limit_s:g}s" if limit.cancelled_caught else ""
