"""The one policy object every maintenance rule reads (DESIGN section 5).

`MaintenancePolicy` is configuration, not state: the master's decisions read it, and the
events they produce carry every number a reducer needs (the credit a window spends, the
refund of a cancel), so replaying a log never needs the policy that was in force.

Defaults assume the default 10-minute epoch; the reasoning for each is next to the field
and in docs/maintenance.md. Load an operator's file with `load_policy` (TOML or JSON) or a
config section with `policy_from_mapping`; unknown keys and bad values are errors that name
the key. Duration fields (``*_ms``) accept integer milliseconds or text like ``"15m"``.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import msgspec

from cluster.shared.durations import (
    DAY_MS,
    HOUR_MS,
    MAX_DURATION_MS,
    MAX_LEAD_MS,
    MINUTE_MS,
    SECOND_MS,
)
from cluster.shared.files import CONFIG_FILE_LIMIT, InputFileError, read_input_file
from cluster.shared.peer_ids import peer_id_problem
from cluster.shared.settings_table import table_values


class PolicyError(ValueError):
    """A maintenance policy value is invalid; the message names the field."""


def _check_ms(policy: MaintenancePolicy, name: str, *, minimum: int, maximum: int) -> None:
    value = getattr(policy, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(f"{name} must be an integer number of milliseconds, got {value!r}")
    if value < minimum:
        raise PolicyError(f"{name} must be >= {minimum} ms, got {value}")
    if value > maximum:
        # The numbers land in logged events (a window's end, its credit) and every view
        # renders them as dates and durations: a typo of 10**18 must not enter the log.
        raise PolicyError(
            f"{name} must be at most {maximum} ms ({maximum // DAY_MS} days), got {value}"
        )


class MaintenancePolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    #: A window must start at least this far ahead. 15 minutes is more than one default
    #: epoch, so the planner sees the window before it places the epoch that would cross
    #: it, and the rest of the cluster gets notice.
    min_lead_ms: int = 15 * MINUTE_MS
    #: ... and at most this far ahead: a window booked months out would hold a concurrency
    #: slot that nobody else can use. 30 days covers any planned change.
    max_lead_ms: int = 30 * 24 * HOUR_MS
    #: Longest window. 4 hours fits a driver or kernel upgrade with reboots and a hardware
    #: swap; a host gone longer should leave the cluster (and rejoin), not hold a window.
    max_duration_ms: int = 4 * HOUR_MS
    #: At most this many nodes draining or in maintenance at any moment, so a large cluster
    #: never re-places more than a handful of nodes' slots at once.
    max_concurrent_nodes: int = 5
    #: At most this share of the cluster's slots draining or in maintenance at any moment:
    #: a cluster run below 75% load keeps serving everything. One node of a cluster of two
    #: or more may always go, even if it alone is above this share.
    max_concurrent_capacity_share: float = 0.25
    #: Draining starts this long before the window. One epoch (10 minutes by default):
    #: the epoch that crosses the start is not placed on the node, so nothing is running
    #: there when it goes. Keep it at least one epoch long.
    drain_lead_ms: int = 10 * MINUTE_MS
    #: Credit earned for each epoch completed unpunished: 10 s per 10-minute epoch is 1/60
    #: of the time served, about 24 minutes a day or 2h 48m a week.
    credit_per_epoch_ms: int = 10 * SECOND_MS
    #: Credit stops accruing at this balance: two full-length windows, so a node cannot
    #: bank months of service into one long absence.
    credit_cap_ms: int = 8 * HOUR_MS
    #: Credit a node has before it has earned any: one routine 2-hour window, so a new
    #: node can fix what its first days reveal; a longer window must be earned.
    initial_credit_ms: int = 2 * HOUR_MS
    #: Peer ids of operator keys that may schedule, cancel and finish windows for any node
    #: (a node may always act for itself).
    operator_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Leads as far as a request's --in may reach; everything else at most a year, the
        # longest duration the command line accepts.
        _check_ms(self, "min_lead_ms", minimum=0, maximum=MAX_LEAD_MS)
        _check_ms(self, "max_lead_ms", minimum=1, maximum=MAX_LEAD_MS)
        _check_ms(self, "max_duration_ms", minimum=1, maximum=MAX_DURATION_MS)
        _check_ms(self, "drain_lead_ms", minimum=0, maximum=MAX_DURATION_MS)
        _check_ms(self, "credit_per_epoch_ms", minimum=0, maximum=MAX_DURATION_MS)
        _check_ms(self, "credit_cap_ms", minimum=0, maximum=MAX_DURATION_MS)
        _check_ms(self, "initial_credit_ms", minimum=0, maximum=MAX_DURATION_MS)
        if self.max_lead_ms < self.min_lead_ms:
            raise PolicyError(
                f"max_lead_ms ({self.max_lead_ms}) is below min_lead_ms ({self.min_lead_ms}): "
                "no start time could ever pass"
            )
        if self.initial_credit_ms > self.credit_cap_ms:
            raise PolicyError(
                f"initial_credit_ms ({self.initial_credit_ms}) is above credit_cap_ms "
                f"({self.credit_cap_ms}); lower it or raise the cap"
            )
        nodes = self.max_concurrent_nodes
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
            raise PolicyError(f"max_concurrent_nodes must be an integer >= 1, got {nodes!r}")
        share = self.max_concurrent_capacity_share
        if (
            isinstance(share, bool)
            or not isinstance(share, int | float)
            or not math.isfinite(share)
            or not 0 < share <= 1
        ):
            raise PolicyError(
                f"max_concurrent_capacity_share must be a number in (0, 1], got {share!r}"
            )
        ops = self.operator_ids
        if not isinstance(ops, tuple) or not all(isinstance(o, str) and o for o in ops):
            raise PolicyError("operator_ids must be a list of non-empty peer id strings")
        for n, op in enumerate(ops):
            # The same check as `cluster master --allow`: a typo here would silently grant
            # nobody (or, truncated, somebody else) operator rights.
            problem = peer_id_problem(op)
            if problem is not None:
                raise PolicyError(f"operator_ids[{n}]: {problem}")


DEFAULT_POLICY: Final = MaintenancePolicy()

_FIELDS: Final = MaintenancePolicy.__struct_fields__


def policy_from_mapping(
    data: Mapping[str, Any], *, where: str = "maintenance policy"
) -> MaintenancePolicy:
    """Build a policy from a parsed config table; `where` names it in error messages.

    Keys are the field names, read as every config table is (`settings_table`): ``*_ms``
    fields take integer ms or a duration like ``"15m"`` (a key may also be written without
    the ``_ms`` suffix when its value is such text).
    """
    if not isinstance(data, Mapping):
        raise PolicyError(f"{where}: expected a table of settings, got {type(data).__name__}")
    try:
        values = table_values(data, _FIELDS)
    except ValueError as exc:
        raise PolicyError(f"{where}: {exc}") from None
    if isinstance(values.get("operator_ids"), list):
        values["operator_ids"] = tuple(values["operator_ids"])
    try:
        return MaintenancePolicy(**values)
    except PolicyError as exc:
        raise PolicyError(f"{where}: {exc}") from None


def load_policy(path: str | Path, *, section: str | None = None) -> MaintenancePolicy:
    """Read a policy from a ``.toml`` or ``.json`` file (optionally one table of it)."""
    p = Path(path)
    try:
        raw = read_input_file(p, CONFIG_FILE_LIMIT)
    except InputFileError as exc:
        raise PolicyError(f"{p}: cannot read the policy file: {exc}") from None
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(raw.decode("utf-8"))
        elif suffix == ".json":
            data = json.loads(raw)
        else:
            raise PolicyError(f"{p}: unknown policy file type {suffix!r}; use .toml or .json")
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise PolicyError(f"{p}: not valid {suffix[1:].upper()}: {exc}") from None
    where = str(p)
    if section is not None:
        if not isinstance(data, dict) or section not in data:
            raise PolicyError(f"{p}: no [{section}] table")
        data = data[section]
        where = f"{p} [{section}]"
    return policy_from_mapping(data, where=where)
