"""Plain-language numbers and clock times for operators: "14:30 UTC", "1,204", "2 slots".

Durations ("4m 12s", "1h 05m", "in 25m", "3m ago") live in `cluster.shared.durations`.
Pure: every function takes the times it shows (and "now" when it matters) as arguments and
never reads a clock, so status messages are reproducible in tests and on every node.
"""

from __future__ import annotations

from datetime import UTC, datetime

_MS_PER_S = 1000


def format_utc(at_ms: int, now_ms: int) -> str:
    """Wall-clock time in UTC: "14:30 UTC" on today's date, "2024-03-06 14:30 UTC" otherwise.

    Seconds are shown only when they are not zero ("14:30:15 UTC").
    """
    at = datetime.fromtimestamp(at_ms / _MS_PER_S, tz=UTC)
    now = datetime.fromtimestamp(now_ms / _MS_PER_S, tz=UTC)
    clock = at.strftime("%H:%M:%S" if at.second else "%H:%M")
    if at.date() != now.date():
        return f"{at.strftime('%Y-%m-%d')} {clock} UTC"
    return f"{clock} UTC"


def format_count(n: int) -> str:
    """An integer with thousands separators: 1204 -> "1,204"."""
    return f"{n:,}"


def plural(n: int, singular: str, plural_form: str | None = None) -> str:
    """ "1 slot", "2 slots", "1,204 events"."""
    word = singular if n == 1 else (plural_form or f"{singular}s")
    return f"{format_count(n)} {word}"


def short_id(node_id: str, keep: int = 6) -> str:
    """A long libp2p peer id shortened for tables ("12D3Ko…x7Fq9a"); short ids are kept."""
    if len(node_id) <= 2 * keep + 1:
        return node_id
    return f"{node_id[:keep]}…{node_id[-keep:]}"
