"""Human durations and times for the command line: "1h30m" and ISO 8601 in, "1h 05m" out.

Everything here is pure (the caller passes "now"), so the maintenance commands stay thin
shells and every error message is testable. Errors are `DurationError` (a `ValueError`)
whose text says exactly what was wrong and what to write instead.

Formatting (``format_duration``, ``format_relative``) is `cluster.shared.humanize`'s,
re-exported here.

Accepted durations: one or more ``<integer><unit>`` parts with units ``h``, ``m``, ``s`` in
that order, each at most once, optionally separated by spaces: ``0h``, ``45s``, ``90m``,
``1h30m``, ``12h35m20s``, ``1h 05m``. Times for ``--at`` are ISO 8601
(``2026-11-23T02:00Z``, ``2026-11-23T03:00+01:00``); a time without a timezone is UTC.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Final

import msgspec

# Formatting durations for people already lives in humanize; re-exported so the CLI finds
# parsing and formatting in one place.
from cluster.shared.humanize import format_duration, format_relative, raw_time, utc_datetime

__all__ = [
    "DAY_MS",
    "HOUR_MS",
    "MAX_DURATION_MS",
    "MAX_LEAD_MS",
    "MINUTE_MS",
    "SECOND_MS",
    "DurationError",
    "WindowRequest",
    "format_duration",
    "format_relative",
    "format_time",
    "parse_duration",
    "parse_time",
    "parse_window_request",
    "resolve_start",
]

SECOND_MS: Final = 1_000
MINUTE_MS: Final = 60 * SECOND_MS
HOUR_MS: Final = 60 * MINUTE_MS
DAY_MS: Final = 24 * HOUR_MS

#: Longest duration we accept: anything longer is a typo, and it keeps ms inside int64.
MAX_DURATION_MS: Final = 366 * DAY_MS
#: The longest lead time anything may name (a maintenance request's --in, the policy's
#: max_lead_ms): past this no policy applies, and start plus duration stays a showable date.
MAX_LEAD_MS: Final = 100 * 366 * DAY_MS

_UNIT_MS: Final = {"h": HOUR_MS, "m": MINUTE_MS, "s": SECOND_MS}
_UNIT_ORDER: Final = "hms"
_PART: Final = re.compile(r"\s*(\d*)(\.\d*)?\s*([A-Za-z]*)")
_EXAMPLE: Final = "e.g. 1h30m, 90m or 45s"


class DurationError(ValueError):
    """A duration or time given by a user could not be understood; the text says why."""


def parse_duration(text: str) -> int:
    """Parse ``"1h30m"``-style text into milliseconds."""
    src = text.strip()
    if not src:
        raise DurationError(f"empty duration; write a number with a unit, {_EXAMPLE}")
    if src.startswith("-"):
        raise DurationError(f"{text!r}: a duration cannot be negative; {_EXAMPLE}")
    total = 0
    seen = ""
    pos = 0
    while pos < len(src):
        match = _PART.match(src, pos)
        if match is None or match.end() == pos:
            raise DurationError(f"{text!r}: cannot read {src[pos:]!r}; {_EXAMPLE}")
        digits, fraction, unit = match.groups()
        if not digits and not fraction:
            raise DurationError(f"{text!r}: expected a number at {src[pos:].strip()!r}; {_EXAMPLE}")
        if fraction is not None:
            raise DurationError(
                f"{text!r}: fractions are not supported; write whole units, e.g. 1h30m "
                "instead of 1.5h"
            )
        if not unit:
            # '90' alone names itself once; in '1h30' the part without a unit is named.
            where = "" if digits == src.strip() else f"{text!r}: "
            raise DurationError(
                f"{where}{digits!r} has no unit; write {digits}h, {digits}m or {digits}s"
            )
        key = unit.lower()
        if key not in _UNIT_MS:
            raise DurationError(f"{text!r}: unknown unit {unit!r}; use h, m or s, e.g. 1h30m")
        if key in seen:
            raise DurationError(f"{text!r}: unit {key!r} given twice; write each unit once")
        if seen and _UNIT_ORDER.index(key) < _UNIT_ORDER.index(seen[-1]):
            raise DurationError(
                f"{text!r}: units out of order; write hours, then minutes, then seconds, "
                "e.g. 1h30m20s"
            )
        seen += key
        total += int(digits) * _UNIT_MS[key]
        if total > MAX_DURATION_MS:
            raise DurationError(
                f"{text!r}: longer than {MAX_DURATION_MS // DAY_MS} days; check the number"
            )
        pos = match.end()
    return total


def parse_time(text: str) -> int:
    """Parse an ISO 8601 time into ms since the Unix epoch; no timezone means UTC."""
    src = text.strip()
    try:
        when = datetime.fromisoformat(src)
    except ValueError:
        raise DurationError(
            f"{text!r}: not an ISO 8601 time; write e.g. 2026-11-23T02:00Z or "
            "2026-11-23T03:00+01:00 (no timezone means UTC)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    # Whole milliseconds, computed from the exact timedelta (no float rounding).
    delta = when - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * SECOND_MS + delta.microseconds // 1_000


def format_time(ms: int) -> str:
    """Render ms since the epoch as an ISO 8601 UTC time, e.g. ``2026-11-23T02:00:00Z``.

    Never raises: a time outside years 1..9999 is shown as its number (`humanize.raw_time`).
    """
    when = utc_datetime(ms)
    if when is None:
        return raw_time(ms)
    text = f"{when.year:04d}-{when:%m-%dT%H:%M:%S}"  # %Y drops zeros before year 1000
    frac = ms % SECOND_MS
    return f"{text}.{frac:03d}Z" if frac else f"{text}Z"


class WindowRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A maintenance window as a user asked for it: absolute start and duration in ms."""

    start_ms: int
    duration_ms: int


def resolve_start(now_ms: int, in_text: str | None, at_text: str | None) -> int:
    """The start time from exactly one of ``--in DURATION`` or ``--at ISO-TIME``."""
    if in_text is not None and at_text is not None:
        raise DurationError("give either --in or --at, not both")
    if in_text is not None:
        return now_ms + parse_duration(in_text)
    if at_text is not None:
        return parse_time(at_text)
    raise DurationError("say when the window starts: --in 12h35m20s or --at 2026-11-23T02:00Z")


def parse_window_request(
    *, now_ms: int, in_text: str | None, at_text: str | None, duration_text: str | None
) -> WindowRequest:
    """The pure part of ``cluster maintenance schedule|check``: validate the flags.

    Only the syntax is checked here; whether the window is allowed (lead time, zero
    duration, caps...) is the master's decision, so the user sees every reason at once.
    """
    if duration_text is None:
        raise DurationError("say how long the window lasts: --duration 2h (or 90m, 1h30m)")
    start_ms = resolve_start(now_ms, in_text, at_text)
    return WindowRequest(start_ms=start_ms, duration_ms=parse_duration(duration_text))
