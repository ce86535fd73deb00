"""How a config table's keys become a settings object's fields: one reading for every table.

`[planner]` (`PlannerConfig`) and `[maintenance]` (`MaintenancePolicy`) read their tables the
same way, so what works in one works in the other:

- an unknown key is an error listing the known settings;
- a ``*_ms`` setting takes integer milliseconds or a duration text (``"15m"``), and may be
  written without the ``_ms`` suffix when its value is such text (``min_lead = "15m"``);
- a setting given twice (as ``x`` and ``x_ms``) is an error.

Values are only translated here; each settings object checks its own bounds.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from cluster.shared.durations import DurationError, parse_duration


def table_values(data: Mapping[str, Any], fields: Collection[str]) -> dict[str, Any]:
    """The table's settings as field name -> value, duration texts parsed to milliseconds.

    Raises ValueError naming the key (the caller prefixes where the table is)."""
    values: dict[str, Any] = {}
    written: dict[str, str] = {}  # field name -> the key it was written as, to name both
    for key, value in data.items():
        name = key if key in fields else f"{key}_ms"
        if name not in fields:
            raise ValueError(f"unknown setting {key!r}; known settings: {', '.join(fields)}")
        if name != key and not isinstance(value, str):
            raise ValueError(
                f'{key!r} takes a duration like "15m"; for a number of milliseconds write {name!r}'
            )
        if name in values:
            raise ValueError(f"{name!r} is given twice (as {written[name]!r} and {key!r})")
        if name.endswith("_ms") and isinstance(value, str):
            try:
                value = parse_duration(value)
            except DurationError as exc:
                raise ValueError(f"{key}: {exc}") from None
        values[name] = value
        written[name] = key
    return values
