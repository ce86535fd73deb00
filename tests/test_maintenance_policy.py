"""The maintenance policy: documented defaults, validation naming the field, config files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.shared.durations import (
    DAY_MS,
    HOUR_MS,
    MAX_DURATION_MS,
    MAX_LEAD_MS,
    MINUTE_MS,
    SECOND_MS,
)
from cluster.shared.maintenance_policy import (
    DEFAULT_POLICY,
    MaintenancePolicy,
    PolicyError,
    load_policy,
    policy_from_mapping,
)

#: A real Ed25519 peer id (what `cluster master --allow` accepts).
OPERATOR = "12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"


def test_defaults_are_the_documented_ones() -> None:
    p = DEFAULT_POLICY
    assert p.min_lead_ms == 15 * MINUTE_MS
    assert p.max_lead_ms == 30 * 24 * HOUR_MS
    assert p.max_duration_ms == 4 * HOUR_MS
    assert p.max_concurrent_nodes == 5
    assert p.max_concurrent_capacity_share == 0.25
    assert p.drain_lead_ms == 10 * MINUTE_MS
    assert p.credit_per_epoch_ms == 10 * SECOND_MS
    assert p.credit_cap_ms == 8 * HOUR_MS
    assert p.initial_credit_ms == 2 * HOUR_MS
    assert p.operator_ids == ()
    doc = (Path(__file__).parent.parent / "docs" / "maintenance.md").read_text()
    for field in MaintenancePolicy.__struct_fields__:
        assert f"`{field}`" in doc, f"docs/maintenance.md does not document {field}"


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"min_lead_ms": -1}, "min_lead_ms must be >= 0 ms, got -1"),
        ({"max_duration_ms": 0}, "max_duration_ms must be >= 1 ms, got 0"),
        ({"drain_lead_ms": 1.5}, "drain_lead_ms must be an integer number of milliseconds"),
        ({"credit_cap_ms": True}, "credit_cap_ms must be an integer number of milliseconds"),
        ({"max_concurrent_nodes": 0}, "max_concurrent_nodes must be an integer >= 1, got 0"),
        ({"max_concurrent_capacity_share": 0}, "max_concurrent_capacity_share must be a number"),
        ({"max_concurrent_capacity_share": 1.5}, "in (0, 1], got 1.5"),
        ({"max_concurrent_capacity_share": float("nan")}, "max_concurrent_capacity_share"),
        ({"initial_credit_ms": 10, "credit_cap_ms": 5}, "initial_credit_ms (10) is above"),
        ({"min_lead_ms": 10, "max_lead_ms": 5}, "max_lead_ms (5) is below min_lead_ms (10)"),
        ({"operator_ids": ("",)}, "operator_ids must be a list of non-empty peer id strings"),
        # Bounded: the numbers land in logged events and are shown as dates and durations.
        ({"max_duration_ms": 9 * 10**18}, "max_duration_ms must be at most 31622400000 ms"),
        ({"max_lead_ms": 9 * 10**18}, "max_lead_ms must be at most 3162240000000 ms"),
        ({"min_lead_ms": 9 * 10**18, "max_lead_ms": 9 * 10**18}, "min_lead_ms must be at most"),
        ({"credit_cap_ms": 9 * 10**18}, "credit_cap_ms must be at most 31622400000 ms (366"),
        ({"initial_credit_ms": 9 * 10**18}, "initial_credit_ms must be at most"),
        ({"credit_per_epoch_ms": 9 * 10**18}, "credit_per_epoch_ms must be at most"),
        ({"drain_lead_ms": 9 * 10**18}, "drain_lead_ms must be at most"),
        # The same check as --allow, naming the bad entry.
        (
            {"operator_ids": (OPERATOR, "alice")},
            "operator_ids[1]: 'alice' is not a libp2p peer id (base58)",
        ),
        ({"operator_ids": (OPERATOR + "\n",)}, "operator_ids[0]: "),
    ],
)
def test_invalid_values_name_the_field(changes: dict[str, object], says: str) -> None:
    with pytest.raises(PolicyError) as err:
        MaintenancePolicy(**changes)  # type: ignore[arg-type]
    assert says in str(err.value)


def test_bounds_are_the_command_lines() -> None:
    """The largest values accepted are a year's duration (`--duration`) and 100 years' lead
    (a request's `--in`); a config file reaching them is accepted."""
    p = MaintenancePolicy(
        max_duration_ms=MAX_DURATION_MS,
        credit_cap_ms=MAX_DURATION_MS,
        initial_credit_ms=MAX_DURATION_MS,
        max_lead_ms=100 * 366 * DAY_MS,
    )
    assert p.max_duration_ms == 366 * DAY_MS


def test_the_reviewers_unbounded_table_is_refused(tmp_path: Path) -> None:
    toml = tmp_path / "cluster.toml"
    toml.write_text(
        "[maintenance]\n"
        "max_duration_ms = 9000000000000000000\n"
        "credit_cap_ms = 9000000000000000000\n"
        "initial_credit_ms = 9000000000000000000\n"
        "max_lead_ms = 9000000000000000000\n"
        "min_lead_ms = 0\n"
        "max_concurrent_capacity_share = 1.0\n"
    )
    with pytest.raises(PolicyError, match=r"cluster\.toml \[maintenance\]: .* must be at most"):
        load_policy(toml, section="maintenance")


def test_mapping_accepts_durations_as_text_or_ms() -> None:
    p = policy_from_mapping(
        {
            "min_lead": "30m",
            "max_duration_ms": "2h",
            "drain_lead_ms": 60_000,
            "max_concurrent_nodes": 2,
            "max_concurrent_capacity_share": 0.5,
            "operator_ids": [OPERATOR],
        }
    )
    assert p.min_lead_ms == 30 * MINUTE_MS
    assert p.max_duration_ms == 2 * HOUR_MS
    assert p.drain_lead_ms == 60_000
    assert p.operator_ids == (OPERATOR,)
    assert p.credit_cap_ms == DEFAULT_POLICY.credit_cap_ms


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"min_leed_ms": 1}, "maintenance policy: unknown setting 'min_leed_ms'; known settings: "),
        ({"min_lead": 5}, "'min_lead' takes a duration like \"15m\"; for a number of milliseconds"),
        (
            {"min_lead_ms": 1, "min_lead": "5m"},
            "'min_lead_ms' is given twice (as 'min_lead_ms' and 'min_lead')",
        ),
        ({"max_duration": "4x"}, "max_duration: '4x': unknown unit 'x'"),
        ({"max_concurrent_nodes": -3}, "maintenance policy: max_concurrent_nodes must be"),
    ],
)
def test_mapping_errors(data: dict[str, object], says: str) -> None:
    with pytest.raises(PolicyError) as err:
        policy_from_mapping(data)
    assert says in str(err.value)


def test_load_toml_section_and_json(tmp_path: Path) -> None:
    toml = tmp_path / "cluster.toml"
    toml.write_text('[maintenance]\nmin_lead = "1m"\nmax_concurrent_nodes = 3\n')
    assert load_policy(toml, section="maintenance") == MaintenancePolicy(
        min_lead_ms=MINUTE_MS, max_concurrent_nodes=3
    )
    js = tmp_path / "policy.json"
    js.write_text(
        json.dumps({"credit_per_epoch": "1m", "credit_cap_ms": 3_600_000, "initial_credit": "30m"})
    )
    assert load_policy(js) == MaintenancePolicy(
        credit_per_epoch_ms=MINUTE_MS, credit_cap_ms=HOUR_MS, initial_credit_ms=30 * MINUTE_MS
    )
    # The default initial credit (2h) does not fit under a 1h cap: named, not silently cut.
    js.write_text(json.dumps({"credit_cap_ms": 3_600_000}))
    with pytest.raises(PolicyError, match=r"initial_credit_ms .* is above credit_cap_ms"):
        load_policy(js)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "p.toml"
    bad.write_text("min_lead = \n")
    with pytest.raises(PolicyError, match=r"p\.toml: not valid TOML"):
        load_policy(bad)
    unknown = tmp_path / "p.json"
    unknown.write_text('{"cooldown": "1h"}')
    with pytest.raises(PolicyError, match=r"p\.json: unknown setting 'cooldown'"):
        load_policy(unknown)
    with pytest.raises(PolicyError, match=r"unknown policy file type '\.yaml'"):
        (tmp_path / "p.yaml").write_text("x: 1")
        load_policy(tmp_path / "p.yaml")
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        load_policy(tmp_path / "missing.toml")
    with pytest.raises(PolicyError, match=r"no \[maintenance\] table"):
        load_policy(unknown, section="maintenance")
    not_table = tmp_path / "list.json"
    not_table.write_text("[1, 2]")
    with pytest.raises(PolicyError, match="expected a table of settings, got list"):
        load_policy(not_table)


def test_a_lead_beyond_a_durations_366_days_is_integer_ms_only() -> None:
    """What docs/maintenance.md says of the bounds: a duration text (`--in`, `max_lead`)
    stops at 366 days; `max_lead_ms` as integer milliseconds goes up to MAX_LEAD_MS."""
    assert policy_from_mapping({"max_lead_ms": 400 * DAY_MS}).max_lead_ms == 400 * DAY_MS
    assert policy_from_mapping({"max_lead_ms": MAX_LEAD_MS}).max_lead_ms == MAX_LEAD_MS
    with pytest.raises(PolicyError, match="max_lead: '9000h': longer than 366 days"):
        policy_from_mapping({"max_lead": "9000h"})
    with pytest.raises(PolicyError, match="max_lead_ms must be at most 3162240000000 ms"):
        policy_from_mapping({"max_lead_ms": MAX_LEAD_MS + 1})
