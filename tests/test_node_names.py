"""Naming a node the way `cluster status` shows it: the pure resolver, on states built from
real events (`resolve_node`)."""

from __future__ import annotations

from maintenance_log import Log

from cluster.shared.durations import format_time
from cluster.shared.events import NodeGatheredInfo, NodeInfo, NodeRemoved
from cluster.shared.humanize import short_id
from cluster.shared.node_names import MIN_PREFIX_CHARS, Unresolved, resolve_node
from cluster.shared.state import State


def _peer(middle: str, end: str) -> str:
    """A 52-character id shaped like a libp2p Ed25519 peer id ("12D3KooW..." + `end`)."""
    head = "12D3KooW" + middle
    return head + "q" * (52 - len(head) - len(end)) + end


A = _peer("Abc", "x7Fq9a")
B = _peer("Abd", "Lm2pQr")
C = _peer("Xyz", "zz9Kc1")
#: Same first and last six characters as A: the short form `cluster status` shows is A's.
TWIN = _peer("AbcW", "x7Fq9a")


def _state(*nodes: str, hosts: dict[str, str] | None = None) -> Log:
    log = Log()
    for n in nodes:
        log.join(n)
        if hosts and n in hosts:
            info = NodeInfo(slots=4, hostname=hosts[n])
            log.emit(NodeGatheredInfo(node_id=n, source="test", info=info), origin=n)
    return log


def _refused(state: State, typed: str) -> str:
    got = resolve_node(state, typed)
    assert isinstance(got, Unresolved), got
    return got.message


def test_an_exact_id_names_its_node() -> None:
    state = _state(A, B).state
    assert len(A) == 52
    assert resolve_node(state, A) == A
    assert resolve_node(state, B) == B


def test_the_short_form_status_shows_names_its_node_with_either_ellipsis() -> None:
    state = _state(A, B, C).state
    shown = short_id(A)
    assert shown == "12D3Ko…x7Fq9a"
    assert resolve_node(state, shown) == A
    assert resolve_node(state, "12D3Ko...x7Fq9a") == A
    assert resolve_node(state, short_id(C, 9)) == C  # any keep `cluster status` might show


def test_a_prefix_of_at_least_eight_characters_names_its_node() -> None:
    state = _state(A, B, C).state
    assert resolve_node(state, A[:12]) == A
    assert resolve_node(state, C[:11]) == C


def test_an_ambiguous_name_is_refused_listing_candidates_with_their_hostnames() -> None:
    state = _state(A, B, C, hosts={A: "gpu-01", B: "gpu-02"}).state
    msg = _refused(state, A[:10])  # "12D3KooWAb": A and B
    assert msg == (
        "node name 12D3KooWAb is ambiguous: it matches 2 nodes: 12D3Ko…x7Fq9a (gpu-01), "
        "12D3Ko…Lm2pQr (gpu-02). Give more of the id, or the full id (`cluster status --json`)"
    )


def test_an_ambiguous_name_lists_five_candidates_and_counts_the_rest() -> None:
    ids = [_peer(f"N{i}", f"end00{i}") for i in range(7)]
    msg = _refused(_state(*ids).state, "12D3KooW")
    listed = ", ".join(short_id(n) for n in sorted(ids)[:5])
    assert f"it matches 7 nodes: {listed} and 2 more. Give more of the id" in msg


def test_candidates_sharing_their_shown_ends_are_listed_apart() -> None:
    """A and TWIN both show as 12D3Ko…x7Fq9a: listing that twice would not help choose."""
    state = _state(A, TWIN, B).state
    assert short_id(A) == short_id(TWIN)
    msg = _refused(state, short_id(A))
    # Each shortened just enough (12 characters a side) for the two to differ.
    assert "it matches 2 nodes: 12D3KooWAbcW…qqqqqqx7Fq9a, 12D3KooWAbcq…qqqqqqx7Fq9a." in msg
    # The longer form each is listed in names it alone.
    assert resolve_node(state, "12D3KooWAbcW…qqqqqqx7Fq9a") == TWIN
    assert resolve_node(state, "12D3KooWAbcq...x7Fq9a") == A


def test_a_name_that_fits_no_node_is_unknown_with_a_hint() -> None:
    state = _state(A, B).state
    for typed in ("12D3KooWNope", "12D3Ko…nope99", "nobody", "12D3Ko……x7Fq9a"):
        msg = _refused(state, typed)
        assert msg.startswith(f"unknown node {typed}: it has never joined this cluster ("), msg
        assert "`cluster status`" in msg and f"first {MIN_PREFIX_CHARS} or more" in msg


def test_a_short_form_missing_an_end_is_said_to_be_incomplete() -> None:
    """It was "unknown node 12D3Ko…: it has never joined this cluster": true of no id, and
    no word that half the name was lost."""
    state = _state(A, B).state
    for typed in ("12D3Ko…", "…x7Fq9a", "12D3KooWAbc...", "…"):
        msg = _refused(state, typed)
        assert msg == (
            f"node name {typed} is incomplete: a short form needs both ends of the id "
            "(PREFIX…SUFFIX, as `cluster status` shows it); or give the id's first "
            f"{MIN_PREFIX_CHARS} or more characters, without the ellipsis"
        ), msg


def test_a_name_too_short_to_trust_is_refused_even_if_one_node_fits() -> None:
    state = _state(A, C).state
    for typed in (A[: MIN_PREFIX_CHARS - 1], "12D…9a", "1…x7Fq9a"):
        msg = _refused(state, typed)
        assert msg.startswith(f"node name {typed} is too short to name a node: give at least 8"), (
            msg
        )
    assert resolve_node(state, "12D3…Fq9a") == A  # eight characters of the id in all


def test_removed_nodes_are_named_only_by_their_exact_id() -> None:
    log = _state(A, B)
    log.disconnect(A)
    log.emit(NodeRemoved(node_id=A))
    # Its full id still finds it (so a second removal can say "already removed") ...
    assert resolve_node(log.state, A) == A
    # ... but nothing shorter does: a short form that named it is refused,
    assert isinstance(resolve_node(log.state, short_id(A)), Unresolved)
    # and a prefix it shares with a live node names that one, not both.
    assert resolve_node(log.state, A[:10]) == B


def test_a_removed_node_named_by_a_short_form_or_prefix_is_said_to_be_removed() -> None:
    """It was "unknown node ...: it has never joined this cluster" -- untrue, and no hint
    that a removed node is named by its full id."""
    log = _state(A, B)
    log.disconnect(A)
    log.emit(NodeRemoved(node_id=A, reason="decommissioned"))
    gone = log.state.removed_node(A)
    assert gone is not None
    when = format_time(gone.removed_ms)
    for typed in (short_id(A), short_id(A).replace("…", "..."), A[:12] + "q"):
        msg = _refused(log.state, typed)
        assert msg == (
            f"node {typed} is no node of this cluster: that node was removed -- {A}, "
            f"removed {when} (event {gone.removed_idx}: decommissioned). A removed node is "
            "named by its full id only"
        ), msg
    # A name too short to trust, or one no removed node fits, is still just unknown.
    assert _refused(log.state, "1…x7Fq9a").startswith("unknown node 1…x7Fq9a:")
    assert _refused(log.state, _peer("Zzz", "abcdef")[:20]).startswith("unknown node ")
    # Two removed nodes the name fits: both are listed.
    log.disconnect(B)
    log.emit(NodeRemoved(node_id=B))
    msg = _refused(log.state, A[:10])
    assert msg.startswith(f"node {A[:10]} is no node of this cluster: the 2 nodes it fits "), msg
    assert A in msg and B in msg, msg


def test_an_echoed_name_is_printable_and_bounded() -> None:
    state = _state(A).state
    msg = _refused(state, "evil\x1b[2J" + "z" * 500)
    assert "\x1b" not in msg and "\\x1b[2J" in msg
    assert len(msg) < 400
