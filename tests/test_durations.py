"""Durations and times typed by people: parsed exactly, errors that say what to change."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.shared.durations import (
    HOUR_MS,
    MINUTE_MS,
    SECOND_MS,
    DurationError,
    WindowRequest,
    format_duration,
    format_time,
    parse_duration,
    parse_time,
    parse_window_request,
    resolve_start,
)

NOW = 1_800_000_000_000


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("0h", 0),
        ("45s", 45 * SECOND_MS),
        ("90m", 90 * MINUTE_MS),
        ("2h", 2 * HOUR_MS),
        ("1h30m", 90 * MINUTE_MS),
        ("12h35m20s", 12 * HOUR_MS + 35 * MINUTE_MS + 20 * SECOND_MS),
        ("1h 05m", 65 * MINUTE_MS),
        (" 1H30M ", 90 * MINUTE_MS),
        ("1h70m", 130 * MINUTE_MS),
        ("0m30s", 30 * SECOND_MS),
    ],
)
def test_parse_duration_accepts(text: str, ms: int) -> None:
    assert parse_duration(text) == ms


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("1h70x", "'1h70x': unknown unit 'x'; use h, m or s, e.g. 1h30m"),
        ("90", "'90' has no unit; write 90h, 90m or 90s"),
        ("1h30", "'30' has no unit"),
        ("1.5h", "fractions are not supported; write whole units, e.g. 1h30m instead of 1.5h"),
        ("", "empty duration"),
        ("   ", "empty duration"),
        ("-5m", "cannot be negative"),
        ("30m1h", "units out of order; write hours, then minutes, then seconds"),
        ("1h2h", "unit 'h' given twice"),
        ("hm", "expected a number at 'hm'"),
        ("1h@", "cannot read '@'"),
        ("2hours", "unknown unit 'hours'"),
        ("9000h", "longer than 366 days"),
    ],
)
def test_parse_duration_errors_say_what_to_change(text: str, says: str) -> None:
    with pytest.raises(DurationError) as err:
        parse_duration(text)
    assert says in str(err.value)


def test_a_bare_number_is_named_once() -> None:
    with pytest.raises(DurationError) as err:
        parse_duration("90")
    assert str(err.value) == "'90' has no unit; write 90h, 90m or 90s"  # not "'90': '90' ..."
    with pytest.raises(DurationError) as err:
        parse_duration("1h30")
    assert str(err.value).startswith("'1h30': '30' has no unit")


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0s"),
        (45 * SECOND_MS, "45s"),
        (4 * MINUTE_MS + 12 * SECOND_MS, "4m 12s"),
        (90 * MINUTE_MS, "1h 30m"),
        (65 * MINUTE_MS, "1h 05m"),
        (2 * HOUR_MS, "2h 00m"),
    ],
)
def test_format_duration(ms: int, text: str) -> None:
    assert format_duration(ms) == text


@given(st.integers(min_value=0, max_value=23), st.integers(0, 59))
def test_formatted_hours_and_minutes_parse_back(hours: int, minutes: int) -> None:
    ms = hours * HOUR_MS + minutes * MINUTE_MS
    assert parse_duration(format_duration(ms)) == ms


@given(st.integers(min_value=0, max_value=100), st.integers(0, 59), st.integers(0, 59))
def test_compact_form_is_exact(hours: int, minutes: int, seconds: int) -> None:
    text = f"{hours}h{minutes}m{seconds}s"
    assert parse_duration(text) == hours * HOUR_MS + minutes * MINUTE_MS + seconds * SECOND_MS


@pytest.mark.parametrize(
    ("text", "iso"),
    [
        ("2026-11-23T02:00Z", "2026-11-23T02:00:00Z"),
        ("2026-11-23T02:00", "2026-11-23T02:00:00Z"),  # naive means UTC
        ("2026-11-23T03:00+01:00", "2026-11-23T02:00:00Z"),
        ("2026-11-23 02:00:00.250Z", "2026-11-23T02:00:00.250Z"),
        ("2026-11-23", "2026-11-23T00:00:00Z"),
    ],
)
def test_parse_time(text: str, iso: str) -> None:
    assert format_time(parse_time(text)) == iso


def test_format_time_never_raises() -> None:
    assert format_time(253_402_300_799_999) == "9999-12-31T23:59:59.999Z"
    assert format_time(-62_135_596_800_000) == "0001-01-01T00:00:00Z"
    assert format_time(-1) == "1969-12-31T23:59:59.999Z"
    assert format_time(2**63 - 1) == f"{2**63 - 1} ms since 1970-01-01 UTC (after year 9999)"
    assert format_time(-(10**17)) == f"{-(10**17)} ms since 1970-01-01 UTC (before year 1)"


def test_parse_time_is_ms_since_epoch() -> None:
    assert parse_time("1970-01-01T00:00:01Z") == 1000
    assert parse_time("2027-01-15T08:00:00Z") == NOW


@pytest.mark.parametrize("text", ["tomorrow", "2026-13-01T00:00Z", "02:00", ""])
def test_parse_time_errors(text: str) -> None:
    with pytest.raises(
        DurationError, match=r"not an ISO 8601 time; write e\.g\. 2026-11-23T02:00Z"
    ):
        parse_time(text)


def test_resolve_start_needs_exactly_one_of_in_or_at() -> None:
    assert resolve_start(NOW, "1h", None) == NOW + HOUR_MS
    assert resolve_start(NOW, None, "2027-01-15T09:00Z") == NOW + HOUR_MS
    with pytest.raises(DurationError, match="either --in or --at, not both"):
        resolve_start(NOW, "1h", "2027-01-15T09:00Z")
    with pytest.raises(DurationError, match="say when the window starts"):
        resolve_start(NOW, None, None)


def test_parse_window_request() -> None:
    req = parse_window_request(now_ms=NOW, in_text="12h35m20s", at_text=None, duration_text="2h")
    assert req == WindowRequest(
        start_ms=NOW + 12 * HOUR_MS + 35 * MINUTE_MS + 20 * SECOND_MS, duration_ms=2 * HOUR_MS
    )
    with pytest.raises(DurationError, match="--duration 2h"):
        parse_window_request(now_ms=NOW, in_text="1h", at_text=None, duration_text=None)
    with pytest.raises(DurationError, match="unknown unit 'd'"):
        parse_window_request(now_ms=NOW, in_text="1d", at_text=None, duration_text="1h")
    # Syntax only: a zero duration is the master's rule to refuse, with its own reason.
    zero = parse_window_request(now_ms=NOW, in_text="0h", at_text=None, duration_text="0h")
    assert zero == WindowRequest(start_ms=NOW, duration_ms=0)
