"""The runner interface: what serves one devshard slot on a worker.

A runner kind is any callable `(spec, config) -> Runner` -- usually the runner class itself.
The worker's runner manager drives every runner through the same steps:

1. construct it (`kind(spec, config)`): validate `config`, raise `RunnerConfigError` if wrong;
2. `await load()`: get ready to serve (load weights, start a process); raise on failure;
3. `await run()` in a task while the slot is assigned: background work; it returns (or raises
   `RunnerFailed`) only when the runner ends by itself, and is cancelled when the slot goes.
   Ending by itself while the slot is still assigned is a failure even when `run()` returns
   cleanly (a command that daemonizes and exits 0 leaves the slot unserved);
4. meanwhile `await health()` every few seconds, and `work_units()` to collect the work done;
5. `await stop()` once, always, after cancelling `run()` -- also after a failure.

At an epoch's end every devshard is finalized and placed again; when the session keeps a slot
on this node, the loaded runner is carried over to the new devshard (`carry_over(spec)`)
rather than stopped and loaded again -- a model is not reloaded every epoch. A runner that
depends on which devshard or epoch it serves says so with `can_carry_over()`.

`serve_request(payload)` answers one request; the self-test sends one probe request.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import msgspec

from cluster.shared.humanize import clip, error_text, first_leaf

log = logging.getLogger(__name__)


class RunnerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """The slot a runner serves, as the master placed it."""

    runner_id: str
    node_id: str
    devshard_id: str
    session_id: str
    slot: int
    #: Memory the session asked for per slot, in MiB (0 when unknown).
    memory_mb: int
    #: Whether the session asked for a GPU.
    gpu: bool
    epoch: int
    #: When the devshard's work ends (its epoch's end), ms since the Unix epoch.
    ends_ms: int


@dataclass(frozen=True)
class Health:
    ok: bool
    reason: str = ""


HEALTHY = Health(ok=True)


def health_problem(health: object) -> str | None:
    """What is wrong with what a runner's `health()` returned, in words; None if healthy.
    A value that is not a `Health` (a plugin's bare `True`) is a problem too, named."""
    if not isinstance(health, Health):
        return f"health() returned {clip(repr(health), 80)}, not a Health"
    return None if health.ok else (health.reason or "unhealthy")


class RunnerError(Exception):
    """A runner step failed; the message says why, in words an operator can act on."""


class RunnerConfigError(RunnerError):
    """The runner configuration is invalid; the message names the field and the problem."""


class RunnerFailed(RunnerError):
    """The runner stopped serving by itself (crashed, exited with an error, lost its device)."""


class RequestsNotSupported(RunnerError):
    """This runner takes no requests (e.g. a subprocess that does not speak the protocol)."""


class Runner(ABC):
    """One slot's server. Subclasses set `kind` and implement every abstract method."""

    kind: ClassVar[str] = ""

    def __init__(self, spec: RunnerSpec) -> None:
        self.spec = spec

    @abstractmethod
    async def load(self) -> None:
        """Get ready to serve; raise (any exception) if that is impossible."""

    @abstractmethod
    async def run(self) -> None:
        """Serve until cancelled. Return if the runner ended cleanly by itself; raise
        `RunnerFailed` with the reason if it ended badly. While its slot is still assigned,
        the manager counts either as a failure (`end_reason()` says more about a clean end);
        a clean end once the slot is over (its devshard finalized) is just a stop."""

    @abstractmethod
    async def health(self) -> Health:
        """Is the runner able to serve right now? Cheap; called every few seconds."""

    @abstractmethod
    async def serve_request(self, payload: bytes) -> bytes:
        """Answer one request (raise `RequestsNotSupported` if this runner takes none)."""

    @abstractmethod
    def work_units(self) -> int:
        """Units of work completed since the previous call (the caller reports them)."""

    def can_carry_over(self) -> bool:
        """May this loaded runner serve the same session's slot in a later devshard?"""
        return True

    def carry_over(self, spec: RunnerSpec) -> None:
        """Serve `spec` from now on: the same session and slot size, a later devshard.
        Called only when `can_carry_over()` is true, between work collections."""
        self.spec = spec

    def end_reason(self) -> str:
        """How the runner ended, when `run()` returned by itself (e.g. "exited with code 0:
        <its last line of stderr>"); "" when there is nothing to add."""
        return ""

    def stop_time_s(self) -> float:
        """The longest `stop()` may take, in seconds, if more than its caller allows anyway
        (a configured grace period, say): the manager and the self-test wait at least this
        long before giving up on it. 0: no particular need."""
        return 0.0

    @abstractmethod
    async def stop(self) -> None:
        """Release everything. Called once, after `run()` was cancelled, possibly without a
        successful `load()`; must not raise for a runner that never started."""


#: What the registry finds by name: builds a runner for a slot from the kind's config.
RunnerKind = Callable[[RunnerSpec, Mapping[str, Any]], Runner]
#: What the runner manager and self-test use: builds a runner for a slot.
RunnerFactory = Callable[[RunnerSpec], Runner]


def stop_limit_s(runner: Runner, default_s: float) -> float:
    """How long to let `runner.stop()` run: `default_s`, or what the runner needs if longer."""
    try:
        need = float(runner.stop_time_s())
    except Exception as exc:  # a plugin's bug must not keep its runner from being stopped
        log.warning("runner %s: stop_time_s() failed: %s", runner.spec.runner_id, exc)
        return default_s
    return max(default_s, need) if math.isfinite(need) else default_s


#: Why a runner must not end by itself while it has a slot to serve, for the operator.
FOREGROUND_HINT = "a runner must serve until it is stopped: a command must stay in the foreground"


def describe_end(runner: Runner) -> str:
    """The rest of the reason for a runner whose `run()` returned while it still had to serve:
    the hint, then the runner's own `end_reason()` (a plugin's failing one is left out)."""
    try:
        how = str(runner.end_reason())
    except Exception as exc:
        log.warning("runner %s: end_reason() failed: %s", runner.spec.runner_id, exc)
        how = ""
    return f"({FOREGROUND_HINT}): {how}" if how else f"({FOREGROUND_HINT})"


def describe_error(exc: BaseException) -> str:
    """One line for an operator: the first real error (inside task-group exception groups),
    its type named unless it is a runner's own failure or a timeout that says what it is."""
    exc = first_leaf(exc)
    text = str(exc)
    if isinstance(exc, RunnerError | TimeoutError) and text:
        return text
    return error_text(exc)


C = TypeVar("C")


def parse_config(config_type: type[C], kind: str, config: Mapping[str, Any]) -> C:
    """Validate a runner's config mapping into its typed config, with a clear error."""
    try:
        return msgspec.convert(dict(config), config_type, strict=False)
    except (msgspec.ValidationError, TypeError, ValueError) as exc:
        raise RunnerConfigError(f"runner {kind!r} config: {exc}") from None
