"""Finding runner kinds by name: the built-ins, then the "cluster.runners" entry points.

A package adds a runner kind by declaring an entry point (see docs/runners.md)::

    [project.entry-points."cluster.runners"]
    vllm = "my_package.runner:VllmRunner"

Built-in names cannot be shadowed: "simulated" always means the built-in one.

A worker's runner setting (kind + config) can come from a TOML file::

    kind = "subprocess"
    [config]
    command = ["python", "serve.py"]
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import msgspec

from cluster.shared.events import MAX_ID_CHARS
from cluster.shared.files import CONFIG_FILE_LIMIT, InputFileError, read_input_file
from cluster.shared.humanize import error_text, key_problem
from cluster.worker.runners.base import (
    Runner,
    RunnerConfigError,
    RunnerFactory,
    RunnerKind,
    RunnerSpec,
)
from cluster.worker.runners.process_groups import RunnerProcessGroups
from cluster.worker.runners.simulated import SimulatedRunner
from cluster.worker.runners.subprocess_runner import SubprocessRunner

ENTRY_POINT_GROUP: Final = "cluster.runners"

BUILTIN_KINDS: Final[Mapping[str, RunnerKind]] = {
    SimulatedRunner.kind: SimulatedRunner,
    SubprocessRunner.kind: SubprocessRunner,
}


class UnknownRunnerKind(RunnerConfigError):
    pass


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_kinds() -> dict[str, str]:
    """Every runner kind this worker can use, with where it comes from."""
    kinds = {name: "built-in" for name in BUILTIN_KINDS}
    for name, ep in sorted(_entry_points().items()):
        kinds.setdefault(name, f"entry point {ep.value}")
    return kinds


def check_kind_name(name: str) -> None:
    """A `RunnerConfigError` unless `name` can name a runner kind in the log: every self-test
    result carries it (`RunnerSelfTestCompleted.runner_kind`), and the master refuses one
    longer than `MAX_ID_CHARS` or not printable. A worker with such a kind would run, but its
    self-test would be set aside at each start and the node never placed: said now instead."""
    if len(name) > MAX_ID_CHARS:
        raise RunnerConfigError(
            f"runner kind {name!r} is {len(name)} characters long: the limit is {MAX_ID_CHARS} "
            "(the master refuses a self-test naming a longer kind)"
        )
    problem = key_problem("kind", name)
    if problem is not None:
        raise RunnerConfigError(f"runner kind {name!r}: {problem}")


def find_kind(name: str) -> RunnerKind:
    """The runner kind called `name`; a clear error if it is unknown, cannot be loaded or
    cannot be named in the log (`check_kind_name`)."""
    check_kind_name(name)
    builtin = BUILTIN_KINDS.get(name)
    if builtin is not None:
        return builtin
    ep = _entry_points().get(name)
    if ep is None:
        known = ", ".join(sorted(available_kinds()))
        raise UnknownRunnerKind(f"unknown runner kind {name!r} (available: {known})")
    try:
        kind = ep.load()
    except Exception as exc:
        raise RunnerConfigError(
            f"runner kind {name!r}: cannot load entry point {ep.value!r}: {error_text(exc)}"
        ) from None
    if not callable(kind):
        raise RunnerConfigError(
            f"runner kind {name!r}: entry point {ep.value!r} is not a runner class or callable"
        )
    return kind  # type: ignore[no-any-return]


def make_factory(
    name: str, config: Mapping[str, Any], *, process_groups: RunnerProcessGroups | None = None
) -> RunnerFactory:
    """A factory building runners of kind `name` with `config` for any slot.

    The factory checks that what the kind builds is a `Runner`, so a broken plugin fails
    the self-test with a clear reason rather than somewhere deep in the manager.
    `process_groups` records the commands of subprocess runners -- the built-in kind's and
    a plugin kind's that derives from `SubprocessRunner` -- so that a worker restarted after
    a crash can end those left running.
    """
    kind = find_kind(name)
    frozen = dict(config)

    def factory(spec: RunnerSpec) -> Runner:
        runner = kind(spec, frozen)
        if not isinstance(runner, Runner):
            raise RunnerConfigError(
                f"runner kind {name!r} built a {type(runner).__name__}, not a Runner"
            )
        # Not only `kind is SubprocessRunner`: a plugin kind built on it (a vLLM launcher,
        # say) runs commands as well, and their leftovers hold GPU memory just the same.
        if process_groups is not None and isinstance(runner, SubprocessRunner):
            runner.record_commands_in(process_groups)
        return runner

    return factory


#: How much longer than a runner config's own `load_timeout_s` the manager and the self-test
#: wait for `load()`: the runner's own bound, with its clearer reason, must come first.
LOAD_LIMIT_MARGIN_S: Final = 30.0


def load_limit_s(config: Mapping[str, Any], default_s: float) -> float:
    """How long `load()` of a runner with `config` may take: `default_s`, or longer when the
    config's `load_timeout_s` (the subprocess runner's wait for READY; a plugin kind may take
    the same key) asks for more -- a fixed limit would fail a slow load the config allows."""
    try:
        own_s = float(config.get("load_timeout_s", 0))
    except (TypeError, ValueError):
        return default_s  # malformed: the kind's own validation says so
    return max(default_s, own_s + LOAD_LIMIT_MARGIN_S) if own_s > 0 else default_s


class RunnerSetting(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Which runner kind a worker uses and its configuration."""

    kind: str = "simulated"
    config: dict[str, Any] = msgspec.field(default_factory=dict)

    def digest(self) -> str:
        return config_digest(self.kind, self.config)


def config_digest(kind: str, config: Mapping[str, Any]) -> str:
    """BLAKE2b-256 of the canonical (sorted-key JSON) kind + config: it changes exactly when
    the runner setting does, whatever order the config was written in."""
    canonical = msgspec.json.encode({"kind": kind, "config": dict(config)}, order="sorted")
    return hashlib.blake2b(canonical, digest_size=32).hexdigest()


def load_runner_setting(path: Path) -> RunnerSetting:
    """Read a runner setting from a TOML file, with errors naming the file and the field."""
    try:
        raw = tomllib.loads(read_input_file(path, CONFIG_FILE_LIMIT).decode("utf-8"))
    except InputFileError as exc:
        raise RunnerConfigError(f"runner file {path}: {exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RunnerConfigError(f"runner file {path}: not valid TOML: {exc}") from None
    try:
        setting = msgspec.convert(raw, RunnerSetting)
    except msgspec.ValidationError as exc:
        raise RunnerConfigError(f"runner file {path}: {exc}") from None
    find_kind(setting.kind)  # fail now, naming the known kinds, not at the first placement
    return setting
