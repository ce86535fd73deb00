"""What an operator typed for a node -> the node's full id. Pure: decided on the state given.

`cluster status` shows node ids shortened ("12D3Ko…x7Fq9a", `humanize.short_id`); an operator
may name a node the way it is shown instead of copying the 52-character id from `cluster
status --json`. A name is, in this order:

- the exact id of a node of the cluster, or of a removed one (so that removing it again
  still says "already removed", with when and why);
- the shown short form "PREFIX…SUFFIX" (or "PREFIX...SUFFIX", for keyboards without "…"):
  every live node whose id starts with PREFIX and ends with SUFFIX;
- at least `MIN_PREFIX_CHARS` leading characters of the id: every live node whose id
  starts with them.

More than one match is refused, listing the candidates (never a guess: the request acts on
one node and its reply and the log name it in full). Removed nodes are matched only by their
exact id: a tombstone is history, and a short form that meant a live node yesterday must not
silently name a removed one today, nor a removed one make a live node's name ambiguous.
But a name that matches no live node and would match a removed one is not "unknown": the
refusal says that node was removed (when, and why) and that a removed node is named by its
full id, which it gives.
Every libp2p Ed25519 peer id starts with "12D3KooW", so a useful prefix is longer than that.
"""

from __future__ import annotations

from typing import Final

import msgspec

from cluster.shared.durations import format_time
from cluster.shared.humanize import clip, printable, short_id
from cluster.shared.state import RemovedNode, State

#: The fewest characters of an id a name must hold (a prefix, or a short form's two ends).
MIN_PREFIX_CHARS: Final = 8
#: The most candidates an ambiguous name's refusal lists.
MAX_CANDIDATES_SHOWN: Final = 5
#: The ellipses a short form may be written with: what `short_id` prints, and plain dots.
ELLIPSES: Final = ("…", "...")
#: A typed name is echoed at most this wide (it is operator input of any length).
_ECHO_WIDTH: Final = 80
_HOST_WIDTH: Final = 32
_SHORT_KEEP: Final = 6  # `short_id`'s default: what `cluster status` shows

_FORMS: Final = (
    "a node is named by its full id (`cluster status --json`), the short form `cluster "
    f"status` shows, or its first {MIN_PREFIX_CHARS} or more characters"
)


class Unresolved(msgspec.Struct, frozen=True):
    """Why a name names no single node, said for the operator."""

    message: str


def resolve_node(state: State, typed: str) -> str | Unresolved:
    """The full id of the one node `typed` names, or why it names none or several."""
    if typed in state.nodes or state.removed_node(typed) is not None:
        return typed
    ends = _short_form(typed)
    prefix, suffix = ends if ends is not None else (typed, "")
    shown = printable(clip(typed, _ECHO_WIDTH))
    if ends is not None and not (prefix and suffix):
        # "12D3Ko…" (one end lost in a copy) is no id that "never joined": say what is missing.
        return Unresolved(
            f"node name {shown} is incomplete: a short form needs both ends of the id "
            "(PREFIX…SUFFIX, as `cluster status` shows it); or give the id's first "
            f"{MIN_PREFIX_CHARS} or more characters, without the ellipsis"
        )
    matches = sorted(
        n
        for n in state.nodes
        if n.startswith(prefix) and n.endswith(suffix) and len(n) >= len(prefix) + len(suffix)
    )
    long_enough = len(prefix) + len(suffix) >= MIN_PREFIX_CHARS
    if not matches:
        removed = _removed_matches(state, prefix, suffix) if long_enough else []
        if removed:
            return Unresolved(_removed_message(shown, removed))
        return Unresolved(f"unknown node {shown}: it has never joined this cluster ({_FORMS})")
    if not long_enough:
        return Unresolved(
            f"node name {shown} is too short to name a node: give at least "
            f"{MIN_PREFIX_CHARS} characters of its id ({_FORMS})"
        )
    if len(matches) > 1:
        return Unresolved(
            f"node name {shown} is ambiguous: it matches {len(matches)} nodes: "
            f"{_candidates(state, matches)}. Give more of the id, or the full id "
            "(`cluster status --json`)"
        )
    return matches[0]


def _removed_matches(state: State, prefix: str, suffix: str) -> list[RemovedNode]:
    """The tombstones the name would match were removed nodes named like live ones."""
    return sorted(
        (
            r
            for r in state.removed().values()
            if r.node_id.startswith(prefix)
            and r.node_id.endswith(suffix)
            and len(r.node_id) >= len(prefix) + len(suffix)
        ),
        key=lambda r: r.node_id,
    )


def _removed_message(shown: str, removed: list[RemovedNode]) -> str:
    listed = removed[:MAX_CANDIDATES_SHOWN]
    parts = []
    for r in listed:
        why = f": {printable(clip(r.reason, _ECHO_WIDTH))}" if r.reason else ""
        parts.append(
            f"{r.node_id}, removed {format_time(r.removed_ms)} (event {r.removed_idx}{why})"
        )
    more = len(removed) - len(listed)
    which = "that node was" if len(removed) == 1 else f"the {len(removed)} nodes it fits were"
    return (
        f"node {shown} is no node of this cluster: {which} removed -- "
        + "; ".join(parts)
        + (f"; and {more} more" if more else "")
        + ". A removed node is named by its full id only"
    )


def _short_form(typed: str) -> tuple[str, str] | None:
    """(PREFIX, SUFFIX) of "PREFIX…SUFFIX", either end possibly empty; None if `typed` holds
    no ellipsis."""
    for ellipsis in ELLIPSES:
        prefix, found, suffix = typed.partition(ellipsis)
        if found:
            return prefix, suffix
    return None


def _candidates(state: State, matches: list[str]) -> str:
    """The first few matches, each in the shortest short form that tells the listed ones
    apart (two ids can share their shown ends), with its hostname when the state knows it."""
    listed = matches[:MAX_CANDIDATES_SHOWN]
    keep = _SHORT_KEEP
    longest = max(len(n) for n in listed)
    while len({short_id(n, keep) for n in listed}) < len(listed) and 2 * keep + 1 < longest:
        keep += 1
    parts = []
    for n in listed:
        info = state.node_info(n)
        host = printable(clip(info.hostname, _HOST_WIDTH)) if info and info.hostname else ""
        parts.append(short_id(n, keep) + (f" ({host})" if host else ""))
    more = len(matches) - len(listed)
    return ", ".join(parts) + (f" and {more} more" if more else "")
