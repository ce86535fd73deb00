"""Plain-language numbers and times for operators: "4m 12s", "1h 05m", "14:30 UTC", "1,204".

`cluster.shared.durations` re-exports the duration formatting next to its parsers.
Pure: every function takes the times it shows (and "now" when it matters) as arguments and
never reads a clock, so status messages are reproducible in tests and on every node.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final

_MS_PER_S = 1000
_S_PER_M = 60
_S_PER_H = 3600
_S_PER_D = 86400


def format_duration(ms: int) -> str:
    """A duration at the precision an operator needs: "12s", "4m 12s", "25m", "1h 05m", "2d 03h".

    Seconds are rounded to the nearest whole second; a negative duration counts as zero.
    Whole minutes drop the seconds ("25m") so a fake-clock test and a person read the same.
    """
    s = (max(ms, 0) + _MS_PER_S // 2) // _MS_PER_S
    if s < _S_PER_M:
        return f"{s}s"
    if s < _S_PER_H:
        m, sec = divmod(s, _S_PER_M)
        return f"{m}m {sec:02d}s" if sec else f"{m}m"
    if s < _S_PER_D:
        h, rest = divmod(s, _S_PER_H)
        return f"{h}h {rest // _S_PER_M:02d}m"
    d, rest = divmod(s, _S_PER_D)
    return f"{d}d {rest // _S_PER_H:02d}h"


def format_relative(at_ms: int, now_ms: int) -> str:
    """ "in 4m 12s" for the future, "3m ago" for the past, "now" within half a second."""
    delta = at_ms - now_ms
    if abs(delta) < _MS_PER_S // 2:
        return "now"
    if delta > 0:
        return f"in {format_duration(delta)}"
    return f"{format_duration(-delta)} ago"


_UNIX_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)
#: The times a `datetime` can hold, in ms since the Unix epoch: years 1..9999.
MIN_TIME_MS: Final = (datetime.min.replace(tzinfo=UTC) - _UNIX_EPOCH) // _ONE_MS
MAX_TIME_MS: Final = (datetime.max.replace(tzinfo=UTC) - _UNIX_EPOCH) // _ONE_MS


def utc_datetime(ms: int) -> datetime | None:
    """ms since the Unix epoch as an aware UTC datetime (exact, no float rounding), or None
    for a time outside years 1..9999, which no calendar date can show."""
    if not MIN_TIME_MS <= ms <= MAX_TIME_MS:
        return None
    return _UNIX_EPOCH + timedelta(milliseconds=ms)


def raw_time(ms: int) -> str:
    """A time no calendar date can show, as its number: the formatters' answer for times
    outside years 1..9999 (a log written with unbounded settings must still render)."""
    side = "after year 9999" if ms > MAX_TIME_MS else "before year 1"
    return f"{ms} ms since 1970-01-01 UTC ({side})"


def format_utc(at_ms: int, now_ms: int) -> str:
    """Wall-clock time in UTC: "14:30 UTC" on today's date, "2024-03-06 14:30 UTC" otherwise.

    Seconds are shown only when they are not zero ("14:30:15 UTC"). A time outside years
    1..9999 is shown as its number of ms (`raw_time`): this never raises.
    """
    at = utc_datetime(at_ms)
    if at is None:
        return raw_time(at_ms)
    now = utc_datetime(now_ms)
    clock = at.strftime("%H:%M:%S" if at.second else "%H:%M")
    if now is None or at.date() != now.date():
        return f"{at.year:04d}-{at:%m-%d} {clock} UTC"  # %Y drops zeros before year 1000
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


def printable(text: str) -> str:
    """`text` safe to print on a terminal: control and format characters (a newline, an
    escape code, a bidi override) are shown as Python escapes ("\\x1b"), not acted on.

    Workers name their own hosts and write their runners' failure reasons; a newline plus an
    escape code in one must not forge a row of `cluster status` or restyle the terminal.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def key_problem(field: str, value: str) -> str | None:
    """Why `value`, a key a worker makes itself (a boot id, a digest, a runner kind), is not
    printable -- the first control or format character and where -- or None if it is. Keys
    are compared and shown as they are: none may hold a newline or an escape code."""
    if value.isprintable():
        return None
    at, char = next((i, c) for i, c in enumerate(value) if not c.isprintable())
    return (
        f"field {field} holds the control or format character {char!r} at {at}: "
        "a key must be printable"
    )


def encodable(text: str) -> str:
    """`text` that encodes as UTF-8: a lone surrogate -- what `os.fsdecode` makes of a file
    name that is not UTF-8, say in a runner's failure reason -- is shown as its escape
    ("\\udcff"); anything else is left as it is.

    Text bound for an event must encode: an event that cannot is refused by the outbox with
    `UnicodeEncodeError`, which ended the runner manager, and the worker with it.
    """
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


def clip(text: str, width: int) -> str:
    """`text` cut to `width` characters, the last one an ellipsis when cut."""
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def error_text(exc: BaseException) -> str:
    """`Type: message`, or only `Type` when the exception says nothing (a bare StreamReset
    left "StreamReset: " with nothing after it)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def first_leaf(exc: BaseException) -> BaseException:
    """The first real error inside (possibly nested) task-group exception groups: what a
    one-line message should name, not "Exceptions from Trio nursery (1 sub-exception)"."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
