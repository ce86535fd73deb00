"""The master's configuration file: planner tunables and the maintenance policy.

A TOML file with two optional tables, each validated by its owner (unknown keys, wrong types
and bad values are errors that name the file, the table and the setting):

    [planner]        # cluster.master.config.PlannerConfig
    epoch_length_ms = 600000
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
from cluster.shared.maintenance_policy import MaintenancePolicy, PolicyError, policy_from_mapping

SECTIONS = ("planner", "maintenance")


class SettingsError(ValueError):
    pass


def load_settings(path: Path | None) -> tuple[PlannerConfig, MaintenancePolicy]:
    if path is None:
        return PlannerConfig(), MaintenancePolicy()
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise SettingsError(
            f"{path}: unknown table(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}"
        )
    planner_table = data.get("planner", {})
    if not isinstance(planner_table, dict):
        raise SettingsError(f"{path}: [planner] must be a table")
    try:
        planner = PlannerConfig.from_mapping(planner_table)
    except ValueError as exc:
        raise SettingsError(f"{path} [planner]: {exc}") from None
    try:
        policy = policy_from_mapping(data.get("maintenance", {}), where=f"{path} [maintenance]")
    except PolicyError as exc:
        raise SettingsError(str(exc)) from None
    return planner, policy
