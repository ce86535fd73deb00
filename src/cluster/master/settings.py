"""The master's configuration file: planner tunables and the maintenance policy.

A TOML file with two optional tables, each validated by its owner (unknown keys, wrong types
and bad values are errors that name the file, the table and the setting). Both read keys the
same way (`cluster.shared.settings_table`): `*_ms` settings take milliseconds or a duration
text, with or without the `_ms` suffix:

    [planner]        # cluster.master.config.PlannerConfig
    epoch_length = "10m"
    stale_cycles = 3

    [maintenance]    # cluster.shared.maintenance_policy.MaintenancePolicy
    min_lead = "15m"
    max_concurrent_nodes = 5
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from cluster.master.config import PlannerConfig
from cluster.shared.files import CONFIG_FILE_LIMIT, InputFileError, read_input_file
from cluster.shared.humanize import format_duration
from cluster.shared.maintenance_policy import MaintenancePolicy, PolicyError, policy_from_mapping

SECTIONS = ("planner", "maintenance")


class SettingsError(ValueError):
    pass


def load_settings(path: Path | None) -> tuple[PlannerConfig, MaintenancePolicy]:
    if path is None:
        return PlannerConfig(), MaintenancePolicy()
    try:
        data: dict[str, Any] = tomllib.loads(
            read_input_file(path, CONFIG_FILE_LIMIT).decode("utf-8")
        )
    except InputFileError as exc:
        raise SettingsError(f"{path}: cannot read the config file: {exc}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise SettingsError(
            f"{path}: unknown table(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}"
        )
    try:
        planner = PlannerConfig.from_mapping(data.get("planner", {}), where=f"{path} [planner]")
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    try:
        policy = policy_from_mapping(data.get("maintenance", {}), where=f"{path} [maintenance]")
    except PolicyError as exc:
        raise SettingsError(str(exc)) from None
    return planner, policy


def settings_warnings(planner: PlannerConfig, policy: MaintenancePolicy) -> list[str]:
    """Settings that are each valid but work against each other, in words for a WARNING at
    start (refusing them would stop a master whose operator only lengthened the epoch)."""
    warnings: list[str] = []
    if policy.drain_lead_ms < planner.epoch_length_ms:
        warnings.append(
            f"maintenance drain_lead_ms ({format_duration(policy.drain_lead_ms)}) is shorter "
            f"than an epoch ({format_duration(planner.epoch_length_ms)}): placement skips a "
            "node for the epoch that crosses its window before the window starts draining, "
            "so a window cancelled in between cost placement but no credit; set drain_lead_ms "
            "to at least epoch_length_ms (docs/maintenance.md)"
        )
    return warnings
