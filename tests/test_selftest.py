"""Runner self-test: passing runs with timings, each failing step named, and when to re-run."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import anyio
import msgspec
import pytest

from cluster.master.admission import check_worker_event
from cluster.shared.apply import fold
from cluster.shared.events import (
    MAX_REASON_CHARS,
    IndexedEvent,
    NodeHeartbeat,
    RunnerSelfTestCompleted,
)
from cluster.shared.state import EMPTY_STATE
from cluster.worker.runners import (
    HEALTHY,
    Health,
    Runner,
    RunnerError,
    RunnerSpec,
    config_digest,
    make_factory,
)
from cluster.worker.selftest import (
    SELF_TEST_PAYLOAD,
    SelfTestTimeouts,
    needs_self_test,
    run_self_test,
    self_test_spec,
)

NODE = "node-a"
QUICK = SelfTestTimeouts(load_s=5, probe_s=0.2, request_s=0.5, stop_s=5, settle_s=0.05)
#: For real processes: a dying one gets ample time to explain itself (bounded, not slept).
PATIENT = SelfTestTimeouts(load_s=20, probe_s=5, request_s=10, stop_s=10, settle_s=10)


async def self_test(
    kind: str, config: Mapping[str, Any], timeouts: SelfTestTimeouts = QUICK
) -> RunnerSelfTestCompleted:
    with anyio.fail_after(60):
        return await run_self_test(
            kind, make_factory(kind, config), config, node_id=NODE, timeouts=timeouts
        )


@pytest.mark.anyio
async def test_simulated_runner_passes_with_timings() -> None:
    config = {"load_s": 0.05, "request_s": 0.02}
    result = await self_test("simulated", config)
    assert result.passed, result.reason
    assert result.reason == ""
    assert result.node_id == NODE and result.runner_kind == "simulated"
    assert result.load_ms >= 50 and result.request_ms >= 20
    assert result.probe_ms >= 0
    assert result.config_digest == config_digest("simulated", config)


@pytest.mark.anyio
async def test_load_failure_names_the_step() -> None:
    result = await self_test("simulated", {"load_s": 0, "fail_load": "weights not found"})
    assert not result.passed
    assert result.reason == "load: weights not found"


@pytest.mark.anyio
async def test_a_megabyte_failure_reason_is_clipped() -> None:
    result = await self_test("simulated", {"load_s": 0, "fail_load": "y" * 2**21})
    assert not result.passed
    assert len(result.reason) == MAX_REASON_CHARS and result.reason.startswith("load: yyy")


@pytest.mark.anyio
async def test_bad_config_fails_at_create() -> None:
    result = await self_test("simulated", {"load_secs": 1})
    assert not result.passed
    assert result.reason.startswith("create: runner 'simulated' config:")


class _Scripted(Runner):
    """A runner whose health and request steps misbehave as a test asks."""

    kind = "scripted"

    def __init__(self, spec: RunnerSpec, config: Mapping[str, Any]) -> None:
        super().__init__(spec)
        self.config = config
        self.stopped = False
        self.requests: list[bytes] = []

    async def load(self) -> None:
        pass

    async def run(self) -> None:
        await anyio.sleep_forever()

    async def health(self) -> Health:
        if self.config.get("hang_health"):
            await anyio.sleep_forever()
        if self.config.get("unhealthy"):
            return Health(False, "GPU 0 has ECC errors")
        return HEALTHY

    async def serve_request(self, payload: bytes) -> bytes:
        self.requests.append(payload)
        if self.config.get("hang_request"):
            await anyio.sleep_forever()
        return b"" if self.config.get("empty_answer") else b"ok"

    def work_units(self) -> int:
        return 0

    async def stop(self) -> None:
        if self.config.get("stop_raises"):
            raise OSError("could not release the GPU")
        self.stopped = True


async def scripted(**config: Any) -> tuple[RunnerSelfTestCompleted, _Scripted]:
    built: list[_Scripted] = []

    def factory(spec: RunnerSpec) -> Runner:
        built.append(_Scripted(spec, config))
        return built[0]

    with anyio.fail_after(30):
        result = await run_self_test("scripted", factory, config, node_id=NODE, timeouts=QUICK)
    return result, built[0]


@pytest.mark.anyio
async def test_a_failure_reason_that_cannot_be_encoded_is_escaped() -> None:
    # A file name that is not UTF-8, as `os.fsdecode` gives it: a lone surrogate, which the
    # outbox could not encode (UnicodeEncodeError, and the worker ended).
    name = os.fsdecode(b"weights-\xff.bin")

    class BadName(_Scripted):
        async def load(self) -> None:
            raise RunnerError(f"{name} not found")

    with anyio.fail_after(30):
        result = await run_self_test(
            "scripted", lambda spec: BadName(spec, {}), {}, node_id=NODE, timeouts=QUICK
        )
    assert result.reason == "load: weights-\\udcff.bin not found"
    msgspec.msgpack.encode(result)  # as the outbox does


@pytest.mark.anyio
async def test_a_runner_breaking_the_interface_fails_the_test_instead_of_raising() -> None:
    # Before, `health.ok` on a bare True raised AttributeError out of run_self_test, and the
    # worker, which runs it on joining, ended.
    class BoolHealth(_Scripted):
        async def health(self) -> Health:
            return True  # type: ignore[return-value]

    with anyio.fail_after(30):
        result = await run_self_test(
            "scripted", lambda spec: BoolHealth(spec, {}), {}, node_id=NODE, timeouts=QUICK
        )
    assert (result.passed, result.reason) == (
        False,
        "health probe: health() returned True, not a Health",
    )

    # A factory whose output is no runner at all fails the create step.
    with anyio.fail_after(30):
        result = await run_self_test(
            "scripted",
            lambda spec: object(),  # type: ignore[arg-type,return-value]
            {},
            node_id=NODE,
            timeouts=QUICK,
        )
    assert result.reason == "create: the factory built a object, not a Runner"

    # Whatever else breaks in a runner is a failed result too.
    class Broken(_Scripted):
        @property
        def load(self) -> Any:
            raise RuntimeError("half-installed plugin")

    with anyio.fail_after(30):
        result = await run_self_test(
            "scripted", lambda spec: Broken(spec, {}), {}, node_id=NODE, timeouts=QUICK
        )
    assert (result.passed, result.reason) == (
        False,
        "the self-test failed: RuntimeError: half-installed plugin",
    )


@pytest.mark.anyio
async def test_a_runners_own_timeout_is_its_error_not_the_steps_limit() -> None:
    # Before: "load timed out after 5s" after no time at all.
    class HubTimeout(_Scripted):
        async def load(self) -> None:
            raise TimeoutError(110, "Connection timed out (model hub 10.0.0.9:443)")

    class ProbeTimeout(_Scripted):
        async def health(self) -> Health:
            raise TimeoutError("GET /health: read timed out")

    class StopTimeout(_Scripted):
        async def stop(self) -> None:
            raise TimeoutError

    expected: dict[type[_Scripted], str] = {
        HubTimeout: "load: [Errno 110] Connection timed out (model hub 10.0.0.9:443)",
        ProbeTimeout: "health probe: GET /health: read timed out",
        StopTimeout: "stop: TimeoutError",
    }
    for kind, reason in expected.items():
        with anyio.fail_after(30):
            result = await run_self_test(
                "scripted", functools.partial(kind, config={}), {}, node_id=NODE, timeouts=QUICK
            )
        assert (result.passed, result.reason) == (False, reason), kind


@pytest.mark.anyio
async def test_each_failing_step_is_named() -> None:
    result, runner = await scripted()
    assert result.passed and runner.stopped
    assert runner.requests == [SELF_TEST_PAYLOAD]
    assert runner.spec == self_test_spec(NODE)

    result, runner = await scripted(hang_health=True)
    assert (result.passed, result.reason) == (False, "health probe timed out after 0.2s")
    assert runner.stopped  # stopped whatever happened

    result, _ = await scripted(unhealthy=True)
    assert result.reason == "health probe: GPU 0 has ECC errors"

    result, runner = await scripted(hang_request=True)
    assert result.reason == "probe request timed out after 0.5s"
    assert runner.stopped

    result, _ = await scripted(empty_answer=True)
    assert result.reason == "probe request: the runner gave an empty answer"

    result, _ = await scripted(stop_raises=True)
    assert result.reason == "stop: OSError: could not release the GPU"


@pytest.mark.anyio
async def test_subprocess_runner_self_test() -> None:
    echo = (
        "import sys\n"
        "print('READY', flush=True)\n"
        "for line in sys.stdin:\n"
        "    _, rid, data = line.split()\n"
        "    print('RESPONSE', rid, data, flush=True)\n"
    )
    passing = await self_test(
        "subprocess",
        {"command": [sys.executable, "-c", echo], "wait_ready": True, "requests": True},
        PATIENT,
    )
    assert passing.passed, passing.reason
    # A command that takes no requests passes with the request step skipped.
    no_requests = await self_test(
        "subprocess", {"command": [sys.executable, "-c", "input()"]}, PATIENT
    )
    assert no_requests.passed, no_requests.reason
    assert no_requests.request_ms == 0
    crashing = await self_test(
        "subprocess",
        {
            "command": [sys.executable, "-c", "import sys; sys.exit('no CUDA device')"],
            "requests": True,
        },
        PATIENT,
    )
    assert not crashing.passed
    assert crashing.reason == (
        "the runner failed during the self-test: exited with code 1: no CUDA device"
    )


@pytest.mark.anyio
async def test_a_command_exiting_0_at_once_fails_the_self_test_naming_the_exit() -> None:
    # A launcher that daemonizes (`docker run -d`) leaves nothing in the foreground to serve.
    launcher = "import sys; sys.stderr.write('started daemon 4242\\n')"
    result = await self_test("subprocess", {"command": [sys.executable, "-c", launcher]}, PATIENT)
    assert not result.passed
    assert result.reason == (
        "the runner ended on its own during the self-test (a runner must serve until it is "
        "stopped: a command must stay in the foreground): exited with code 0: started daemon 4242"
    )


@pytest.mark.anyio
async def test_the_load_step_allows_what_the_runner_config_allows() -> None:
    # A model that loads for longer than the self-test's own load limit (0.2 s here, 300 s
    # by default) but within the config's `load_timeout_s` passes.
    slow = "import time; time.sleep(0.5); print('READY', flush=True); input()"
    config = {"command": [sys.executable, "-c", slow], "wait_ready": True, "load_timeout_s": 20}
    result = await self_test("subprocess", config, replace(PATIENT, load_s=0.2))
    assert result.passed, result.reason
    assert result.load_ms >= 500


def test_needs_self_test_on_join_and_config_change() -> None:
    digest = config_digest("simulated", {"load_s": 1})
    state = fold(EMPTY_STATE, [IndexedEvent(1, 1000, NODE, 1, NodeHeartbeat(node_id=NODE))])
    assert needs_self_test(state, NODE, "simulated", digest)  # never tested
    assert needs_self_test(EMPTY_STATE, NODE, "simulated", digest)  # not even known
    done = RunnerSelfTestCompleted(
        node_id=NODE, runner_kind="simulated", passed=True, config_digest=digest
    )
    state = fold(state, [IndexedEvent(2, 2000, NODE, 2, done)])
    assert not needs_self_test(state, NODE, "simulated", digest)
    assert needs_self_test(state, NODE, "simulated", config_digest("simulated", {"load_s": 2}))
    assert needs_self_test(state, NODE, "subprocess", digest)


def test_a_failed_self_test_is_tried_again_by_the_next_worker_process() -> None:
    """The operator fixed the machine and restarted the worker, same setting: it used to keep
    its failed result, never re-tested, and so never placed."""
    digest = config_digest("simulated", {"load_s": 1})
    failed = RunnerSelfTestCompleted(
        node_id=NODE,
        runner_kind="simulated",
        passed=False,
        reason="load: no GPU",
        config_digest=digest,
    )
    state = fold(EMPTY_STATE, [IndexedEvent(1, 1000, NODE, 1, failed)])
    assert state.nodes[NODE].self_test is not None
    assert needs_self_test(state, NODE, "simulated", digest)


@pytest.mark.anyio
async def test_timings_over_a_day_are_reported_as_a_day() -> None:
    """The master refuses a timing beyond a day (admission, `MAX_SELF_TEST_MS`): a worker
    whose config lets a step take longer reports a day, not a test the master refuses."""
    ticks = iter(range(0, 10**9, 2 * 86_400))  # each reading two days after the last

    def clock() -> float:
        return float(next(ticks))

    config = {"load_s": 0, "request_s": 0}
    with anyio.fail_after(60):
        result = await run_self_test(
            "simulated", make_factory("simulated", config), config, node_id=NODE, clock=clock
        )
    assert result.passed, result.reason
    assert (result.load_ms, result.probe_ms, result.request_ms) == (86_400_000,) * 3
    check_worker_event(NODE, 1, result)  # the master admits it
