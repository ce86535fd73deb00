"""Runners: what serves a devshard slot on a worker (interface, built-ins, registry).

See docs/runners.md for how to write and register a runner kind.
"""

from __future__ import annotations

from cluster.worker.runners.base import (
    HEALTHY,
    Health,
    RequestsNotSupported,
    Runner,
    RunnerConfigError,
    RunnerError,
    RunnerFactory,
    RunnerFailed,
    RunnerKind,
    RunnerSpec,
)
from cluster.worker.runners.registry import (
    BUILTIN_KINDS,
    ENTRY_POINT_GROUP,
    RunnerSetting,
    UnknownRunnerKind,
    available_kinds,
    config_digest,
    find_kind,
    load_limit_s,
    load_runner_setting,
    make_factory,
)
from cluster.worker.runners.simulated import SimulatedConfig, SimulatedRunner
from cluster.worker.runners.subprocess_runner import SubprocessConfig, SubprocessRunner

__all__ = [
    "BUILTIN_KINDS",
    "ENTRY_POINT_GROUP",
    "HEALTHY",
    "Health",
    "RequestsNotSupported",
    "Runner",
    "RunnerConfigError",
    "RunnerError",
    "RunnerFactory",
    "RunnerFailed",
    "RunnerKind",
    "RunnerSetting",
    "RunnerSpec",
    "SimulatedConfig",
    "SimulatedRunner",
    "SubprocessConfig",
    "SubprocessRunner",
    "UnknownRunnerKind",
    "available_kinds",
    "config_digest",
    "find_kind",
    "load_limit_s",
    "load_runner_setting",
    "make_factory",
]
