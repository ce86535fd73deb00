"""The cluster at a glance: `cluster_status(state, now_ms) -> ClusterStatus`, text and JSON.

`ClusterStatus` is a plain, serialisable picture derived from State (never stored): nodes
with their plain-language status, the epoch and its time left, sessions with their devshard
or the reason they are unplaced, maintenance windows, and the ledgers of recent epochs.
`render_text` lays it out as aligned tables for an 80-100 column terminal; `to_json` /
`from_json` carry it over the HTTP API so `cluster status` can render what the master sees.

Masters and CLIs are upgraded at different times, so the view's enum-valued fields (a node's
status and log level, a window's state) are plain text: a CLI older than its master shows a
value it does not know (one added since) as that text instead of failing to decode the whole
answer, and ignores fields it does not know. A field added later has a default, so a newer
CLI reads an older master's answer (docs/operations.md, "Versions").

Pure: "now" and the catch-up lag are arguments.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

import msgspec

from cluster.shared.codec import strict_decode
from cluster.shared.events import GpuInfo
from cluster.shared.humanize import (
    clip,
    format_count,
    format_duration,
    format_relative,
    format_utc,
    plural,
    printable,
    short_id,
)
from cluster.shared.node_status import (
    DEFAULT_CATCH_UP_THRESHOLD,
    NodeState,
    node_statuses,
)
from cluster.shared.state import (
    OPEN_WINDOW_STATES,
    EpochLedger,
    MaintenanceWindow,
    State,
    WindowState,
)

#: Closed (completed/cancelled) windows shown besides every open one.
DEFAULT_RECENT_WINDOWS: Final = 10
#: Epoch ledgers shown, newest first.
DEFAULT_RECENT_LEDGERS: Final = 3
#: Terminal width `render_text` lays tables out for.
DEFAULT_WIDTH: Final = 100
#: The widest a hostname is shown (clipped with "…"): a worker names its own host, and one
#: long name would push every node's message off the screen.
MAX_HOST_WIDTH: Final = 32


class EpochView(msgspec.Struct, frozen=True, kw_only=True):
    epoch: int
    start_ms: int
    end_ms: int
    time_left_ms: int


class NodeRow(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    hostname: str
    #: A `NodeState` value, or -- decoded from a newer master -- one this version lacks.
    status: str
    message: str
    #: A `LogLevel` value (likewise text).
    log_level: str
    #: Slots the node offers (from its info) and slots it holds in live devshards.
    slots_offered: int
    slots_used: int
    #: Its GPUs in a few words (`gpu_summary`); "" when it reports none.
    gpus: str
    devshards: tuple[str, ...]
    #: Index of the last event the node originated (0: none yet).
    last_event_idx: int
    #: Events the node has not applied yet, when the caller knows.
    events_behind: int | None
    window_id: str
    credit_ms: int
    #: Its worker runs no runners (`cluster worker --no-runners`): it holds no slots by
    #: design, so SLOTS shows "-" rather than a "0/N" that reads as capacity left idle.
    facts_only: bool = False


class DevshardView(msgspec.Struct, frozen=True, kw_only=True):
    devshard_id: str
    session_id: str
    epoch: int
    #: node_id -> slots it holds in this devshard.
    slots_by_node: dict[str, int]
    placed_ms: int
    ends_ms: int
    reason: str


class SessionView(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    name: str
    slots: int
    memory_per_slot_mb: int
    gpu: bool
    devshard_id: str
    unplaced_reason: str
    unplaced_epoch: int
    #: When the planner last said `unplaced_reason`: its counts are as of then (the planner
    #: restates counts that alone moved at most once a minute). 0 when placed.
    unplaced_ms: int = 0


class WindowView(msgspec.Struct, frozen=True, kw_only=True):
    window_id: str
    node_id: str
    #: A `WindowState` value, or -- decoded from a newer master -- one this version lacks.
    state: str
    start_ms: int
    end_ms: int
    duration_ms: int
    closed_ms: int
    outcome: str
    #: A one-line, human summary relative to now ("ends 14:30 UTC (in 25m)").
    note: str
    #: Its node has since been removed (`cluster node remove`): history, shown "(removed)".
    node_removed: bool = False


class LedgerRow(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    units: int
    reward: int
    misses: int
    #: Set once the node's payout is recorded: the payout and whether the node forfeited
    #: it, and why (before it: the reason of its unexcused disconnect, if any).
    paid: int
    punished: bool
    reason: str
    late_units: int
    late_paid: int
    #: Its payout is recorded -- before the epoch is `settled` when the settlement came in
    #: parts and not all are in yet (`EpochSettled.final`).
    settled: bool = False
    #: The SETTLEMENT cell as `cluster status` shows it ("paid 30", "forfeited: …", "open"),
    #: so the dashboard shows the same words.
    settlement: str = ""
    #: Its node has since been removed (`cluster node remove`): its ledger rows stay as
    #: history (and its current epoch is settled as any node's), shown "(removed)".
    node_removed: bool = False


class LedgerView(msgspec.Struct, frozen=True, kw_only=True):
    epoch: int
    #: The final part of its settlement is applied: every payout is in.
    settled: bool
    rows: tuple[LedgerRow, ...]
    #: Some payouts are recorded but the final part is not in yet (`nodes_settled` of its
    #: rows hold theirs); `stage` says where it stands in words (`ledger_stage`).
    settling: bool = False
    nodes_settled: int = 0
    stage: str = ""


class ClusterStatus(msgspec.Struct, frozen=True, kw_only=True):
    now_ms: int
    last_index: int
    epoch: EpochView | None
    nodes: tuple[NodeRow, ...]
    #: Every NodeState value -> how many nodes are in it (zeros included, for dashboards).
    counts: dict[str, int]
    sessions: tuple[SessionView, ...]
    devshards: tuple[DevshardView, ...]
    windows: tuple[WindowView, ...]
    ledgers: tuple[LedgerView, ...]


def cluster_status(
    state: State,
    now_ms: int,
    *,
    events_behind: Mapping[str, int] | None = None,
    catch_up_threshold: int = DEFAULT_CATCH_UP_THRESHOLD,
    extra_node_ids: Iterable[str] = (),
    recent_windows: int = DEFAULT_RECENT_WINDOWS,
    recent_ledgers: int = DEFAULT_RECENT_LEDGERS,
    initial_credit_ms: int = 0,
) -> ClusterStatus:
    """Derive the whole picture at `now_ms` (see `node_statuses` for the node arguments).

    `initial_credit_ms` is the maintenance policy's grant every node starts with (State
    records only what was earned and spent): each node's `credit_ms` is its balance.
    """
    lag = events_behind or {}
    statuses = node_statuses(
        state,
        now_ms,
        events_behind=lag,
        catch_up_threshold=catch_up_threshold,
        extra_node_ids=extra_node_ids,
    )
    nodes = []
    counts = {s.value: 0 for s in NodeState}
    for st in statuses:
        rec = state.nodes.get(st.node_id)
        info = rec.info if rec is not None else None
        counts[st.status.value] += 1
        nodes.append(
            NodeRow(
                node_id=st.node_id,
                hostname=(info.hostname if info is not None else None) or "",
                status=st.status,
                message=st.message,
                log_level=st.log_level,
                slots_offered=(info.slots if info is not None else None) or 0,
                slots_used=st.slots,
                gpus=gpu_summary(info.gpus if info is not None else None),
                devshards=st.devshards,
                last_event_idx=state.last_event_index(st.node_id),
                events_behind=lag.get(st.node_id),
                window_id=st.window_id,
                credit_ms=initial_credit_ms + state.credit_ms_by_node.get(st.node_id, 0),
                facts_only=rec is not None and rec.facts_only,
            )
        )
    removed = removed_node_ids(state)
    epoch = None
    if state.epoch is not None:
        e = state.epoch
        epoch = EpochView(
            epoch=e.epoch,
            start_ms=e.start_ms,
            end_ms=e.end_ms,
            time_left_ms=max(e.end_ms - now_ms, 0),
        )
    return ClusterStatus(
        now_ms=now_ms,
        last_index=state.last_applied,
        epoch=epoch,
        nodes=tuple(nodes),
        counts=counts,
        sessions=_sessions(state),
        devshards=_devshards(state),
        windows=_windows(state, now_ms, recent_windows, removed),
        ledgers=_ledgers(state, recent_ledgers, removed),
    )


def removed_node_ids(state: State) -> frozenset[str]:
    """The nodes the operator removed that have not joined again since: their rows in
    ledgers and windows are history, and say so."""
    return frozenset(r.node_id for r in state.removed().values() if r.node_id not in state.nodes)


def _sessions(state: State) -> tuple[SessionView, ...]:
    return tuple(
        SessionView(
            session_id=s.session_id,
            name=s.name,
            slots=s.slots,
            memory_per_slot_mb=s.memory_per_slot_mb,
            gpu=s.gpu,
            devshard_id=state.devshard_by_session.get(s.session_id, ""),
            unplaced_reason=s.unplaced_reason,
            unplaced_epoch=s.unplaced_epoch,
            unplaced_ms=s.unplaced_ms,
        )
        for _, s in sorted(state.sessions.items())
    )


def _devshards(state: State) -> tuple[DevshardView, ...]:
    views = []
    for _, d in sorted(state.devshards.items()):
        per_node: dict[str, int] = {}
        for a in d.assignments:
            per_node[a.node_id] = per_node.get(a.node_id, 0) + 1
        views.append(
            DevshardView(
                devshard_id=d.devshard_id,
                session_id=d.session_id,
                epoch=d.epoch,
                slots_by_node=dict(sorted(per_node.items())),
                placed_ms=d.placed_ms,
                ends_ms=d.ends_ms,
                reason=d.reason,
            )
        )
    return tuple(views)


def _windows(
    state: State, now_ms: int, recent: int, removed: frozenset[str]
) -> tuple[WindowView, ...]:
    open_windows = [w for w in state.windows.values() if w.state in OPEN_WINDOW_STATES]
    closed = sorted(
        (w for w in state.windows.values() if w.state not in OPEN_WINDOW_STATES),
        key=lambda w: (w.closed_ms, w.window_id),
        reverse=True,
    )[: max(recent, 0)]
    shown = sorted(open_windows + closed, key=lambda w: (w.start_ms, w.window_id))
    return tuple(
        WindowView(
            window_id=w.window_id,
            node_id=w.node_id,
            state=w.state,
            start_ms=w.start_ms,
            end_ms=w.end_ms,
            duration_ms=w.duration_ms,
            closed_ms=w.closed_ms,
            outcome=w.outcome,
            note=window_note(w, now_ms),
            node_removed=w.node_id in removed,
        )
        for w in shown
    )


def window_note(w: MaintenanceWindow, now_ms: int) -> str:
    """One line on where a window stands, relative to now."""
    if w.state is WindowState.SCHEDULED:
        return f"starts {format_relative(w.start_ms, now_ms)}"
    if w.state is WindowState.DRAINING:
        return f"draining; starts {format_relative(w.start_ms, now_ms)}"
    if w.state is WindowState.ACTIVE:
        if now_ms >= w.end_ms:
            return f"overran by {format_duration(now_ms - w.end_ms)}"
        return f"ends {format_utc(w.end_ms, now_ms)} ({format_relative(w.end_ms, now_ms)})"
    closed = format_utc(w.closed_ms, now_ms)
    # Closed by its node's removal (`NodeRemoved`): said, or it read as a cancel or finish
    # someone asked for (JSON said "removed" all along).
    removed = w.outcome == "removed"
    if w.state is WindowState.CANCELLED:
        return f"cancelled (node removed) {closed}" if removed else f"cancelled {closed}"
    if w.outcome == "overrun":
        return f"overran; closed {closed}"
    how = "node removed" if removed else w.outcome or "host"
    return f"finished ({how}) {closed}"


def _ledgers(state: State, recent: int, removed: frozenset[str]) -> tuple[LedgerView, ...]:
    epochs = sorted(state.ledgers.keys(), reverse=True)[: max(recent, 0)]
    return tuple(_ledger_view(state.ledgers[e], removed) for e in epochs)


def _ledger_view(ledger: EpochLedger, removed: frozenset[str]) -> LedgerView:
    rows = []
    for node_id in sorted(ledger.nodes.keys()):
        account = ledger.nodes[node_id]
        payout = account.payout
        reason = payout.reason if payout is not None else account.disconnect or ""
        row = LedgerRow(
            node_id=node_id,
            units=account.units,
            reward=account.reward,
            misses=account.misses,
            paid=payout.reward if payout is not None else 0,
            punished=payout.punished if payout is not None else False,
            reason=reason,
            late_units=account.late_units,
            late_paid=account.late_paid,
            settled=payout is not None,
            node_removed=node_id in removed,
        )
        rows.append(msgspec.structs.replace(row, settlement=settlement_text(ledger.settled, row)))
    settled_rows = sum(1 for r in rows if r.settled)
    return LedgerView(
        epoch=ledger.epoch,
        settled=ledger.settled,
        rows=tuple(rows),
        settling=not ledger.settled and settled_rows > 0,
        nodes_settled=settled_rows,
        stage=ledger_stage(ledger),
    )


def ledger_stage(ledger: EpochLedger) -> str:
    """Where an epoch's settlement stands: "settled", "open", or -- a settlement logged in
    parts of which not all are in yet -- "settling: 2 of 3 nodes settled"."""
    if ledger.settled:
        return "settled"
    paid = sum(1 for a in ledger.nodes.values() if a.payout is not None)
    if not paid:
        return "open"
    return f"settling: {paid:,} of {plural(len(ledger.nodes), 'node')} settled"


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------

_json_decoder = msgspec.json.Decoder(ClusterStatus)


def to_json(status: ClusterStatus) -> bytes:
    return msgspec.json.encode(status)


def from_json(data: bytes | str) -> ClusterStatus:
    """Decode a `/api/status` body; raises `msgspec.DecodeError`/`ValidationError` if bad."""
    return strict_decode(_json_decoder.decode, data)


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------

#: Short labels for the STATUS column; the message says the rest. Upper case = needs a look.
_LABELS: Final[Mapping[str, str]] = {
    NodeState.CONNECTING: "connecting",
    NodeState.CATCHING_UP: "catching up",
    NodeState.FACTS_ONLY: "facts only",
    NodeState.SELF_TESTING: "self-test",
    NodeState.TEST_FAILED: "TEST FAILED",
    NodeState.WAITING_FOR_PLACEMENT: "waiting",
    NodeState.SERVING: "serving",
    NodeState.DRAINING: "draining",
    NodeState.MAINTENANCE: "maintenance",
    NodeState.MAINTENANCE_OVERRUN: "OVERRUN",
    NodeState.DISCONNECTED: "DISCONNECTED",
    NodeState.STOPPING: "stopping",
}


#: The widest an unknown status is shown (the known ones are at most 14 characters).
_UNKNOWN_STATUS_WIDTH: Final = 24


def status_label(status: str) -> str:
    """The STATUS column's word for a node status; a status this version does not know (a
    newer master's) as its own text, so an older CLI still shows it -- made printable and
    clipped like any other text off the wire (it lands in the header line too)."""
    label = _LABELS.get(status)
    return label if label is not None else clip(printable(status), _UNKNOWN_STATUS_WIDTH)


def gpu_summary(gpus: Sequence[GpuInfo] | None) -> str:
    """A node's GPUs in a few words: "2x H100 80GB HBM3 + 1x A10, 3.1/182 GiB used, 87%"
    (models counted, memory summed, utilization averaged over the GPUs that report it); ""
    when it reports none."""
    if not gpus:
        return ""
    models: dict[str, int] = {}
    for gpu in gpus:
        name = gpu.name.removeprefix("NVIDIA ").strip() or "GPU"
        models[name] = models.get(name, 0) + 1
    used = sum(g.memory_used_mb for g in gpus) / 1024
    total = sum(g.memory_total_mb for g in gpus) / 1024
    parts = [
        " + ".join(f"{n}x {name}" for name, n in models.items()),
        f"{used:.1f}/{total:.0f} GiB used",
    ]
    busy = [g.utilization_pct for g in gpus if g.utilization_pct is not None]
    if busy:
        parts.append(f"{round(sum(busy) / len(busy))}%")
    return ", ".join(parts)


def render_text(status: ClusterStatus, width: int = DEFAULT_WIDTH) -> str:
    """Aligned tables for a terminal `width` columns wide (the last column wraps)."""
    now = status.now_ms
    lines = [f"cluster at event {format_count(status.last_index)} · {_date_time(now)}"]
    if status.epoch is None:
        lines.append("epoch: none started yet")
    else:
        e = status.epoch
        lines.append(
            f"epoch {e.epoch}: ends {format_utc(e.end_ms, now)} ({format_relative(e.end_ms, now)})"
        )
    in_use = [f"{n} {status_label(s)}" for s, n in status.counts.items() if n]
    lines.append(f"nodes: {len(status.nodes)}" + (f" ({', '.join(in_use)})" if in_use else ""))

    lines += ["", "NODES"]
    lines += _table(
        ("NODE", "HOST", "STATUS", "SLOTS", "MESSAGE"),
        [
            (
                short_id(n.node_id),
                clip(printable(n.hostname), MAX_HOST_WIDTH) or "-",
                status_label(n.status),
                slots_text(n),
                n.message + (f" [GPUs: {n.gpus}]" if n.gpus else ""),
            )
            for n in status.nodes
        ],
        width,
    )

    lines += ["", "SESSIONS"]
    lines += _table(
        ("SESSION", "NAME", "SLOTS", "DEVSHARD", "NODES (SLOTS) / WHY UNPLACED"),
        [_session_row(s, status) for s in status.sessions],
        width,
    )

    lines += ["", "MAINTENANCE WINDOWS"]
    lines += _table(
        ("WINDOW", "NODE", "STATE", "START", "END", "NOTE"),
        [
            (
                w.window_id,
                _node_name(w.node_id, w.node_removed),
                str(w.state),
                format_utc(w.start_ms, now),
                format_utc(w.end_ms, now),
                w.note,
            )
            for w in status.windows
        ],
        width,
    )

    lines += ["", "LEDGERS (recent epochs)"]
    # A partly settled epoch (its settlement's last parts not in yet) says so: its rows
    # alone would read as an open epoch with some nodes paid.
    lines += [f"  epoch {led.epoch}: {led.stage}" for led in status.ledgers if led.settling]
    lines += _table(
        ("EPOCH", "NODE", "UNITS", "REWARD", "MISSES", "SETTLEMENT"),
        [
            (
                str(ledger.epoch),
                _node_name(r.node_id, r.node_removed),
                format_count(r.units),
                format_count(r.reward),
                format_count(r.misses),
                settlement_text(ledger.settled, r),
            )
            for ledger in status.ledgers
            for r in ledger.rows
        ],
        width,
    )
    return "\n".join(lines) + "\n"


def slots_text(n: NodeRow) -> str:
    """The SLOTS cell: "used/offered", or "-" for a facts-only node, which holds none by
    design. One that still holds slots on paper (it served, then restarted with
    --no-runners, until the next plan cycle re-places them) shows them."""
    if n.facts_only and not n.slots_used:
        return "-"
    return f"{n.slots_used}/{n.slots_offered}"


def _node_name(node_id: str, removed: bool) -> str:
    return short_id(node_id) + (" (removed)" if removed else "")


def _date_time(ms: int) -> str:
    # Relative to a "now" on another day, so the date is always printed.
    return format_utc(ms, ms - 86_400_000)


def _session_row(s: SessionView, status: ClusterStatus) -> tuple[str, ...]:
    if s.devshard_id:
        shard = next((d for d in status.devshards if d.devshard_id == s.devshard_id), None)
        where = (
            ", ".join(f"{short_id(n)} ({k})" for n, k in shard.slots_by_node.items())
            if shard is not None
            else ""
        )
    elif s.unplaced_reason:
        # The reason's counts are as of when it was last said, not as of now.
        when = f" as of {format_utc(s.unplaced_ms, status.now_ms)}" if s.unplaced_ms else ""
        where = f"unplaced in epoch {s.unplaced_epoch}{when}: {s.unplaced_reason}"
    else:
        where = "not placed yet"
    gpu = " gpu" if s.gpu else ""
    return (s.session_id, s.name or "-", f"{s.slots}{gpu}", s.devshard_id or "-", where)


def settlement_text(ledger_settled: bool, r: LedgerRow) -> str:
    """A node's SETTLEMENT cell. A row whose payout is recorded says what it was, even in an
    epoch still settling; one without says "open" and, if so, why it will forfeit."""
    if not (ledger_settled or r.settled):
        # `reason` is the raw reason of its unexcused disconnect (no payout says more yet).
        text = "open" + (f" (disconnected: {r.reason})" if r.reason else "")
    elif r.punished:
        text = "forfeited" + (f": {r.reason}" if r.reason else "")
    else:
        text = f"paid {format_count(r.paid)}"
    if r.late_units:
        text += f"; late {plural(r.late_units, 'unit')}, paid {format_count(r.late_paid)}"
    return text


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], width: int) -> list[str]:
    """Left-aligned columns two spaces apart; the last column wraps to fit `width`."""
    if not rows:
        return ["  (none)"]
    fixed = len(headers) - 1
    # Cells hold worker-supplied text (hostnames, failure reasons, GPU names).
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(headers[i]), *(len(r[i]) for r in rows)) for i in range(fixed)]
    indent = sum(widths) + 2 * fixed
    last_width = max(width - indent, 24)
    out = []
    for row in [tuple(headers), *rows]:
        head = "".join(cell.ljust(w) + "  " for cell, w in zip(row, widths, strict=False))
        wrapped = textwrap.wrap(row[-1], last_width) or [""]
        out.append((head + wrapped[0]).rstrip())
        out += [" " * indent + more for more in wrapped[1:]]
    return out
