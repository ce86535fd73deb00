"""The built-in "simulated" runner: inference without a model, for demos and tests.

It takes `load_s` to load, answers each request after `request_s` with a digest of the
payload, and completes `units_per_s` work units per second of serving plus
`units_per_request` per request. Given its config and clock it is deterministic: the work
done at time t is floor((t - loaded_at) * units_per_s) + requests * units_per_request.
`fail_load` and `fail_after_s` make it fail on purpose, to exercise failure paths.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import anyio
import msgspec

from cluster.shared.events import INT64_MAX
from cluster.worker.runners.base import (
    HEALTHY,
    Health,
    Runner,
    RunnerError,
    RunnerFailed,
    RunnerSpec,
    parse_config,
)

_NonNegative = Annotated[float, msgspec.Meta(ge=0)]


class SimulatedConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    load_s: _NonNegative = 0.5
    request_s: _NonNegative = 0.01
    units_per_s: _NonNegative = 1.0
    units_per_request: Annotated[int, msgspec.Meta(ge=0)] = 1
    #: Non-empty: `load()` fails with this reason after `load_s`.
    fail_load: str = ""
    #: Positive: the runner fails by itself this many seconds after loading.
    fail_after_s: _NonNegative = 0.0

    def __post_init__(self) -> None:
        # `ge=0` lets inf through; an infinite sleep would only hide the mistake.
        for what, value in (
            ("load_s", self.load_s),
            ("request_s", self.request_s),
            ("fail_after_s", self.fail_after_s),
        ):
            if not math.isfinite(value):
                raise ValueError(f"{what} must be a finite number of seconds, got {value!r}")
        # Nor inf here (the work formula cannot floor it), nor a rate whose product with the
        # seconds served could overflow to inf. More than a report carries is fine: it
        # exercises the manager's cap.
        if not (math.isfinite(self.units_per_s) and self.units_per_s <= INT64_MAX):
            raise ValueError(
                f"units_per_s must be a number 0..{INT64_MAX}, got {self.units_per_s!r}"
            )


class SimulatedRunner(Runner):
    kind = "simulated"

    def __init__(
        self,
        spec: RunnerSpec,
        config: Mapping[str, Any],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(spec)
        self.config = parse_config(SimulatedConfig, self.kind, config)
        self._clock = clock
        self._loaded_at: float | None = None
        self._stopped_at: float | None = None
        self._requests = 0
        self._reported = 0
        self._failure = ""

    async def load(self) -> None:
        await anyio.sleep(self.config.load_s)
        if self.config.fail_load:
            raise RunnerError(self.config.fail_load)
        self._loaded_at = self._clock()

    async def run(self) -> None:
        if self.config.fail_after_s > 0:
            await anyio.sleep(self.config.fail_after_s)
            self._failure = f"simulated failure after {self.config.fail_after_s:g}s"
            raise RunnerFailed(self._failure)
        await anyio.sleep_forever()

    async def health(self) -> Health:
        if self._failure:
            return Health(False, self._failure)
        if self._stopped_at is not None:
            return Health(False, "stopped")
        if self._loaded_at is None:
            return Health(False, "not loaded")
        return HEALTHY

    async def serve_request(self, payload: bytes) -> bytes:
        if self._loaded_at is None or self._stopped_at is not None:
            raise RunnerError("not serving: the runner is not loaded")
        await anyio.sleep(self.config.request_s)
        self._requests += 1
        digest = hashlib.blake2b(payload, digest_size=16, person=b"cluster-sim").hexdigest()
        return f"simulated:{digest}".encode()

    def work_units(self) -> int:
        done = self.work_done()
        new, self._reported = done - self._reported, done
        return new

    def work_done(self) -> int:
        """All units completed so far (the deterministic formula of the module docstring)."""
        if self._loaded_at is None:
            return 0
        end = self._stopped_at if self._stopped_at is not None else self._clock()
        serving_s = max(0.0, end - self._loaded_at)
        return math.floor(serving_s * self.config.units_per_s) + (
            self._requests * self.config.units_per_request
        )

    async def stop(self) -> None:
        if self._stopped_at is None:
            self._stopped_at = self._clock()
