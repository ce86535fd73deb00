"""`cluster_status` and its text/JSON renderings, from states built with real events."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec
from hypothesis import given
from hypothesis import strategies as st
from test_node_status import MIN, T0, Log, far_future_log, ready_node, stopping_node

from cluster.commands.replay import summary_lines
from cluster.master.metrics import MasterMetrics, render_prometheus
from cluster.shared.events import (
    NO_RUNNERS_DIGEST,
    DevshardFinalized,
    EpochSettled,
    GpuInfo,
    LateWorkSettled,
    MaintenanceCancelled,
    MaintenanceStarted,
    NodeConnected,
    NodeDisconnected,
    NodeGatheredInfo,
    NodeInfo,
    NodePayout,
    NodeRemoved,
    SessionDeleted,
    SessionRequested,
    SessionUnplaced,
    WorkReported,
)
from cluster.shared.humanize import clip, printable
from cluster.shared.node_status import NodeState, node_status, node_statuses
from cluster.shared.state import CLOSED_WINDOWS_KEPT_PER_NODE, WindowState
from cluster.shared.status_view import (
    DEFAULT_RECENT_WINDOWS,
    ClusterStatus,
    cluster_status,
    from_json,
    gpu_summary,
    render_text,
    to_json,
)

DASHBOARD = Path(__file__).resolve().parent.parent / "src" / "cluster" / "master" / "dashboard.html"
LONG_ID = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"


def _gpu(index: int, name: str, total_mb: int, used_mb: int, busy: int | None) -> GpuInfo:
    return GpuInfo(
        index=index,
        name=name,
        uuid=f"GPU-{index}",
        memory_total_mb=total_mb,
        memory_used_mb=used_mb,
        utilization_pct=busy,
    )


H100S = (
    _gpu(0, "NVIDIA H100 80GB HBM3", 81_559, 2_048, 60),
    _gpu(1, "NVIDIA H100 80GB HBM3", 81_559, 1_024, None),
)


def busy_cluster() -> Log:
    """Five nodes in five different states, a placed and an unplaced session, windows, ledgers."""
    log = Log()
    for node, host in [("node-a", "gpu-01"), ("node-b", "gpu-02"), ("node-c", "gpu-03")]:
        log.joined(node).tested(node)
        log.add(
            node,
            T0,
            NodeGatheredInfo(node_id=node, source="cpu", info=NodeInfo(hostname=host, slots=4)),
        )
    log.add(
        "node-a", T0, NodeGatheredInfo(node_id="node-a", source="gpu", info=NodeInfo(gpus=H100S))
    )
    log.joined(LONG_ID)  # self-testing
    log.joined("node-e").tested("node-e")
    # The planner's words (`liveness`), as docs/operations.md shows them.
    gone = f"no events for 3 cycles (3s); last event index {log.state.last_event_index('node-e')}"
    log.master(T0, NodeDisconnected(node_id="node-e", reason=gone))
    log.epoch(6, T0 - 10 * MIN, T0)
    log.placed("ds-6-chat", ["node-a"], epoch=6, ends_ms=T0)
    log.add(
        "node-a", T0, WorkReported(devshard_id="ds-6-chat", node_id="node-a", units=30, epoch=6)
    )
    log.master(T0, DevshardFinalized(devshard_id="ds-6-chat", epoch=6))
    log.master(T0, SessionDeleted(session_id="s-ds-6-chat"))
    log.master(
        T0,
        EpochSettled(
            epoch=6,
            payouts=(
                NodePayout(node_id="node-a", units=30, reward=30, punished=False),
                NodePayout(
                    node_id="node-e",
                    units=0,
                    reward=0,
                    punished=True,
                    reason=f"unexcused disconnect: {gone}",
                ),
            ),
        ),
    )
    log.epoch(7, T0, T0 + 10 * MIN)
    log.placed("ds-7-chat", ["node-a", "node-a", "node-b"], epoch=7, ends_ms=T0 + 10 * MIN)
    log.master(
        T0, SessionRequested(session_id="s-big", slots=64, memory_per_slot_mb=80_000, name="big")
    )
    log.master(
        T0, SessionUnplaced(session_id="s-big", epoch=7, reason="needs 64 slots, 12 eligible")
    )
    log.scheduled("node-c", "w-1", T0 + 5 * MIN, 25 * MIN)
    log.master(T0 + 5 * MIN, MaintenanceStarted(window_id="w-1", node_id="node-c"))
    log.scheduled("node-b", "w-2", T0 + 120 * MIN, 30 * MIN)
    log.master(
        T0, MaintenanceCancelled(window_id="w-2", node_id="node-b", credit_refund_ms=30 * MIN)
    )
    return log


NOW = T0 + 5 * MIN + 48_000


def test_cluster_status_has_every_node_with_its_status() -> None:
    status = cluster_status(busy_cluster().state, NOW)
    by_id = {n.node_id: n for n in status.nodes}
    assert by_id["node-a"].status is NodeState.SERVING
    assert by_id["node-a"].message == "serving 2 slots of devshard ds-7-chat"
    assert by_id["node-a"].slots_used == 2
    assert by_id["node-a"].slots_offered == 4
    assert by_id["node-a"].hostname == "gpu-01"
    assert by_id["node-c"].status is NodeState.MAINTENANCE
    assert by_id[LONG_ID].status is NodeState.SELF_TESTING
    assert by_id["node-e"].status is NodeState.DISCONNECTED
    assert status.counts["serving"] == 2
    assert status.counts["maintenance"] == 1
    assert sum(status.counts.values()) == len(status.nodes) == 5


def test_credit_is_each_nodes_balance_given_the_policys_grant() -> None:
    """State records only what was earned and spent; status showed that delta (0 for a new
    node, negative once it had scheduled) where `cluster maintenance next` showed 2h."""
    status = cluster_status(busy_cluster().state, NOW, initial_credit_ms=120 * MIN)
    credit = {n.node_id: n.credit_ms for n in status.nodes}
    assert credit["node-c"] == 120 * MIN - 25 * MIN  # w-1 spent
    assert credit["node-b"] == 120 * MIN  # w-2 spent, then refunded on cancel
    assert credit["node-e"] == 120 * MIN


def test_nodes_show_their_gpus_in_a_few_words() -> None:
    status = cluster_status(busy_cluster().state, NOW)
    by_id = {n.node_id: n for n in status.nodes}
    # Utilization is averaged over the GPUs that report it; memory is summed.
    assert by_id["node-a"].gpus == "2x H100 80GB HBM3, 3.0/159 GiB used, 60%"
    assert by_id["node-b"].gpus == ""  # no GPUs reported
    assert "[GPUs: 2x H100 80GB HBM3, 3.0/159 GiB used, 60%]" in " ".join(
        render_text(status, width=200).split()
    )
    mixed = (_gpu(0, "NVIDIA A10", 23_028, 0, None), *H100S, _gpu(3, "NVIDIA A10", 23_028, 0, None))
    assert gpu_summary(mixed) == "2x A10 + 2x H100 80GB HBM3, 3.0/204 GiB used, 60%"
    assert gpu_summary((_gpu(0, "", 1024, 0, None),)) == "1x GPU, 0.0/1 GiB used"
    assert gpu_summary(()) == gpu_summary(None) == ""


def test_epoch_sessions_windows_ledgers() -> None:
    status = cluster_status(busy_cluster().state, NOW)
    assert status.epoch is not None
    assert status.epoch.epoch == 7
    assert status.epoch.time_left_ms == 10 * MIN - 5 * MIN - 48_000
    sessions = {s.session_id: s for s in status.sessions}
    assert sessions["s-ds-7-chat"].devshard_id == "ds-7-chat"
    assert sessions["s-big"].unplaced_reason == "needs 64 slots, 12 eligible"
    assert sessions["s-big"].unplaced_ms == T0  # the counts are as of then
    assert status.devshards[0].slots_by_node == {"node-a": 2, "node-b": 1}
    windows = {w.window_id: w for w in status.windows}
    assert windows["w-1"].state is WindowState.ACTIVE
    assert windows["w-1"].note == "ends 14:30 UTC (in 24m 12s)"
    assert windows["w-2"].state is WindowState.CANCELLED
    assert [lv.epoch for lv in status.ledgers] == [7, 6]
    settled = status.ledgers[1]
    assert settled.settled
    rows = {r.node_id: r for r in settled.rows}
    assert (rows["node-a"].units, rows["node-a"].paid) == (30, 30)
    assert rows["node-e"].punished


def test_recent_limits_drop_old_closed_windows_and_ledgers() -> None:
    status = cluster_status(busy_cluster().state, NOW, recent_windows=0, recent_ledgers=1)
    assert [w.window_id for w in status.windows] == ["w-1"]  # open windows always shown
    assert [lv.epoch for lv in status.ledgers] == [7]


def test_state_holds_every_closed_window_status_shows_by_default() -> None:
    """Each node keeps its last CLOSED_WINDOWS_KEPT_PER_NODE closed windows; as long as that
    is at least the number status shows, the cluster's most recent ones are all held."""
    assert DEFAULT_RECENT_WINDOWS <= CLOSED_WINDOWS_KEPT_PER_NODE


def test_catch_up_lag_from_caller() -> None:
    status = cluster_status(busy_cluster().state, NOW, events_behind={"node-b": 1204})
    node_b = next(n for n in status.nodes if n.node_id == "node-b")
    assert node_b.status is NodeState.CATCHING_UP
    assert node_b.events_behind == 1204


def test_render_text_shows_every_node_and_fits_the_terminal() -> None:
    status = cluster_status(busy_cluster().state, NOW)
    text = render_text(status)
    for node in ["node-a", "node-b", "node-c", "node-e", "12D3Ko…CVe2Xo"]:
        assert node in text
    assert "serving 2 slots of devshard ds-7-chat" in text
    assert "in maintenance until 14:30 UTC" in text
    assert "disconnected 5m 48s ago: no events for 3 cycles (3s);" in text
    # The reason's counts are as of its SessionUnplaced, said at T0, not as of now.
    assert "unplaced in epoch 7 as of 14:00 UTC: needs 64 slots, 12\n" in text  # wraps
    assert "epoch 7: ends 14:10 UTC (in 4m 12s)" in text
    assert "forfeited: unexcused disconnect: no events for 3 cycles (3s);" in text
    for header in ["NODES", "SESSIONS", "MAINTENANCE WINDOWS", "LEDGERS"]:
        assert header in text
    assert all(len(line) <= 100 for line in text.splitlines()), text
    narrow = render_text(status, width=80)
    assert all(len(line) <= 80 for line in narrow.splitlines()), narrow


def test_render_text_columns_are_aligned() -> None:
    text = render_text(cluster_status(busy_cluster().state, NOW))
    lines = text.splitlines()
    start = lines.index("NODES") + 1
    header = lines[start]
    message_col = header.index("MESSAGE")
    for line in lines[start + 1 : start + 6]:
        if not line.startswith(" "):  # not a wrapped continuation
            assert line[message_col - 2 : message_col] == "  ", line


def test_render_text_escapes_and_clips_what_workers_name() -> None:
    # A worker names its own host: a newline and escape codes in it must not forge a row
    # (here: another node shown DISCONNECTED) or reach the terminal, and a long name must
    # not push every node's message off the screen.
    log = busy_cluster()
    forged = "g4\nnode-a DISCONNECTED\x1b[2J\u202e"
    log.add(
        "node-b",
        T0,
        NodeGatheredInfo(node_id="node-b", source="cpu", info=NodeInfo(hostname=forged)),
    )
    log.add(
        "node-c",
        T0,
        NodeGatheredInfo(node_id="node-c", source="cpu", info=NodeInfo(hostname="h" * 300)),
    )
    text = render_text(cluster_status(log.state, NOW))
    assert "\x1b" not in text and "\u202e" not in text
    lines = text.splitlines()
    nodes = lines[lines.index("NODES") + 2 : lines.index("SESSIONS") - 1]
    rows = [line for line in nodes if not line.startswith(" ")]  # not wrapped messages
    assert len(rows) == 5, nodes  # one row per node: none forged
    assert any(r"g4\nnode-a DISCONNECTED\x1b[2J" in line for line in nodes), nodes
    assert "h" * 31 + "…" in text and "h" * 33 not in text
    assert all(len(line) <= 100 for line in lines), text


def test_a_facts_only_node_is_shown_and_counted_as_such_not_as_self_testing() -> None:
    log = Log().master(T0, NodeConnected(node_id="facts", runner_digest=NO_RUNNERS_DIGEST))
    log.joined("facts")
    text = render_text(cluster_status(log.state, T0))
    assert "nodes: 1 (1 facts only)" in text
    row = next(line for line in text.splitlines() if line.startswith("facts "))
    assert "facts only" in row and "facts only (runs no runners)" in row
    assert "self-test" not in text


def test_a_facts_only_node_shows_no_slots_rather_than_idle_ones() -> None:
    # It showed "0/4": capacity left idle, where it holds no slots by design.
    log = Log().master(T0, NodeConnected(node_id="facts", runner_digest=NO_RUNNERS_DIGEST))
    info = NodeInfo(hostname="cpu-01", slots=4)
    log.add("facts", T0, NodeGatheredInfo(node_id="facts", source="cpu", info=info))
    log.joined("ready").tested("ready")
    log.add("ready", T0, NodeGatheredInfo(node_id="ready", source="cpu", info=info))
    # Disconnected it is still facts-only: still no slots.
    log.master(T0, NodeConnected(node_id="gone", runner_digest=NO_RUNNERS_DIGEST))
    log.joined("gone").master(T0, NodeDisconnected(node_id="gone", reason="no events"))
    status = cluster_status(log.state, T0)
    by_id = {n.node_id: n for n in status.nodes}
    assert by_id["facts"].facts_only and by_id["gone"].facts_only
    assert not by_id["ready"].facts_only
    assert json.loads(to_json(status))["nodes"][1]["facts_only"] is True
    lines = render_text(status).splitlines()
    rows = {line.split()[0]: line for line in lines[lines.index("NODES") + 2 :][:3]}
    assert rows["facts"].split()[1:5] == ["cpu-01", "facts", "only", "-"]
    assert rows["gone"].split()[1:4] == ["-", "DISCONNECTED", "-"]
    assert rows["ready"].split()[1:4] == ["cpu-01", "waiting", "0/4"]  # idle capacity
    # One still holding slots on paper (it served, then restarted with --no-runners) shows
    # them until the planner re-places them.
    log.epoch(7, T0, T0 + 10 * MIN).placed("ds-7", ["facts"], epoch=7, ends_ms=T0 + 10 * MIN)
    text = render_text(cluster_status(log.state, T0))
    row = next(line for line in text.splitlines() if line.startswith("facts "))
    assert row.split()[4] == "1/4"
    # The dashboard's SLOTS cell by the same rule.
    page = DASHBOARD.read_text()
    script = page[page.index('fillTable("nodes"') :]
    assert 'n.facts_only && !n.slots_used ? "-"' in script[: script.index("\n\n")]


def test_a_stopping_node_is_shown_and_counted_as_such_everywhere() -> None:
    # It was shown and counted as serving (or waiting) although its worker had stopped.
    state = stopping_node(placed=True).state
    status = cluster_status(state, T0 + MIN)
    text = render_text(status)
    assert "nodes: 1 (1 stopping)" in text
    row = next(line for line in text.splitlines() if line.startswith("node-a "))
    assert "stopping  1/0" in row and "stopping: its worker said goodbye" in row
    assert json.loads(to_json(status))["counts"]["stopping"] == 1
    assert status.counts["serving"] == 0
    metrics = render_prometheus(MasterMetrics(), node_statuses(state, T0 + MIN))
    assert 'cluster_nodes{status="stopping"} 1' in metrics.splitlines()
    assert 'cluster_nodes{status="serving"} 0' in metrics.splitlines()


def test_a_removed_nodes_history_stays_and_says_the_node_was_removed() -> None:
    # Its ledger rows and windows stayed (history, by design) but read as a node still in
    # the cluster: nothing in status, JSON, the dashboard or replay said it was removed.
    log = busy_cluster()
    log.scheduled("node-e", "w-3", T0 + 60 * MIN, 30 * MIN)
    log.master(T0 + MIN, NodeRemoved(node_id="node-e", reason="decommissioned"))
    status = cluster_status(log.state, NOW)
    assert "node-e" not in {n.node_id for n in status.nodes}
    rows = {r.node_id: r for r in status.ledgers[1].rows}
    assert rows["node-e"].node_removed and not rows["node-a"].node_removed
    windows = {w.window_id: w for w in status.windows}
    assert windows["w-3"].node_removed and windows["w-3"].outcome == "removed"
    assert not windows["w-1"].node_removed
    plain = json.loads(to_json(status))
    assert [r["node_removed"] for r in plain["ledgers"][1]["rows"]] == [False, True]
    text = render_text(status)
    assert "6      node-e (removed)  0      0       0       forfeited: unexcused" in text
    assert "6      node-a            30     30      0       paid 30" in text
    assert "w-3     node-e (removed)  cancelled" in text
    # Why it was cancelled: the NOTE said "cancelled 14:01 UTC", as if someone had asked.
    assert windows["w-3"].note == "cancelled (node removed) 14:01 UTC", windows["w-3"].note
    assert "cancelled (node removed) 14:01 UTC" in text
    assert "w-1     node-c            active" in text
    summary = summary_lines(log.state, 0)
    epoch_6 = next(line for line in summary if line.startswith("  epoch 6: "))
    assert epoch_6.endswith("; 1 of its nodes removed since"), epoch_6
    epoch_7 = next(line for line in summary if line.startswith("  epoch 7: "))
    assert "removed" not in epoch_7
    # Joined again, it is a node of the cluster: no mark.
    log.master(T0 + 2 * MIN, NodeConnected(node_id="node-e"))
    again = cluster_status(log.state, NOW)
    assert not any(r.node_removed for r in again.ledgers[1].rows)
    assert "(removed)" not in render_text(again)


def test_the_dashboard_marks_a_removed_nodes_rows() -> None:
    page = DASHBOARD.read_text()
    for table, row in (("windows", "w"), ("ledgers", "r")):
        script = page[page.index(f'fillTable("{table}"') :]
        script = script[: script.index("\n\n")]
        assert f"nodeName({row}.node_id, {row}.node_removed)" in script, table
    assert 'const nodeName = (id, removed) => shortId(id) + (removed ? " (removed)" : "");' in page


def test_render_text_of_an_empty_cluster() -> None:
    text = render_text(cluster_status(Log().state, T0))
    assert "epoch: none started yet" in text
    assert "(none)" in text


def test_json_round_trip() -> None:
    status = cluster_status(busy_cluster().state, NOW)
    data = to_json(status)
    plain = json.loads(data)
    assert plain["epoch"]["epoch"] == 7
    assert {n["node_id"] for n in plain["nodes"]} >= {"node-a", LONG_ID}
    assert plain["nodes"][0]["status"] in {s.value for s in NodeState}
    back = from_json(data)
    assert isinstance(back, ClusterStatus)
    assert back == status


def newer_masters_status() -> bytes:
    """What a master newer than this code could answer: a node status, a log level and a
    window state this version does not know, and fields it has never heard of."""
    doc = json.loads(to_json(cluster_status(busy_cluster().state, NOW)))
    node = next(n for n in doc["nodes"] if n["node_id"] == "node-b")
    node.update(status="hibernating", log_level="NOTICE", message="asleep until 15:00 UTC")
    node["power_watts"] = 350
    doc["counts"]["serving"] -= 1
    doc["counts"]["hibernating"] = 1
    next(w for w in doc["windows"] if w["window_id"] == "w-1")["state"] = "paused"
    doc["federation"] = {"peers": ["m2"]}
    return json.dumps(doc).encode()


def test_a_status_from_a_newer_master_decodes_and_shows_what_it_does_not_know() -> None:
    # One enum value added in a later version failed the whole decode ("Invalid enum
    # value 'stopping'"), so an older `cluster status` showed nothing at all.
    status = from_json(newer_masters_status())
    node_b = next(n for n in status.nodes if n.node_id == "node-b")
    assert (node_b.status, node_b.log_level) == ("hibernating", "NOTICE")
    assert next(w for w in status.windows if w.window_id == "w-1").state == "paused"
    text = render_text(status)
    assert "nodes: 5 (1 self-test, 1 serving, 1 maintenance, 1 DISCONNECTED, 1 hibernating)" in text
    row = next(line for line in text.splitlines() if line.startswith("node-b "))
    assert row.split()[2:4] == ["hibernating", "1/4"] and row.endswith("asleep until 15:00 UTC")
    window = next(line for line in text.splitlines() if line.startswith("w-1 "))
    assert window.split()[2] == "paused"
    # What it knows still shows as before.
    assert "serving 2 slots of devshard ds-7-chat" in text


def test_a_newer_masters_unknown_status_is_shown_printable_and_clipped() -> None:
    """Shown as the master's own text, it reached the header line raw: an escape sequence
    and a newline a master (or a proxy before it) put there went to the terminal, and a
    long value widened the STATUS column without bound."""
    doc = json.loads(newer_masters_status())
    odd = "hib\x1b[2J\nernating" + "z" * 150
    next(n for n in doc["nodes"] if n["node_id"] == "node-b")["status"] = odd
    doc["counts"][odd] = doc["counts"].pop("hibernating")
    text = render_text(from_json(json.dumps(doc).encode()))
    assert "\x1b" not in text and "1 hib\\x1b[2J\\nernatingzzz" in text, text
    header = next(line for line in text.splitlines() if line.startswith("nodes: "))
    assert header.endswith("ernatingzzz…)") and len(header) < 120, header
    row = next(line for line in text.splitlines() if line.startswith("node-b "))
    assert "ernatingzzz…" in row and "z" * 30 not in row, row


def test_a_log_with_times_past_year_9999_still_renders() -> None:
    """`cluster status` and the dashboard's /api/status failed for good on such a log."""
    status = cluster_status(far_future_log().state, T0 + MIN)
    text = render_text(status)
    assert f"epoch 1: ends {T0 + 2**63 - 1} ms since 1970-01-01 UTC (after year 9999)" in text
    assert from_json(to_json(status)) == status


@given(st.text())
def test_printable_text_never_holds_a_control_character(text: str) -> None:
    shown = printable(text)
    assert shown.isprintable()
    assert shown == text or "\\" in shown  # whatever was replaced shows as an escape
    assert clip(shown, 8) == shown or (len(clip(shown, 8)) == 8 and clip(shown, 8)[-1] == "…")


def test_a_ledger_with_one_late_unit_says_it_in_the_singular() -> None:
    log = busy_cluster()
    late = WorkReported(devshard_id="ds-6-chat", node_id="node-a", units=1, epoch=6)
    log.add("node-a", T0, late)  # after epoch 6 settled
    log.master(T0, LateWorkSettled(epoch=6, node_id="node-a", units=1, reward=1))
    text = render_text(cluster_status(log.state, NOW), width=200)
    assert "late 1 unit, paid" in text, text  # it said "late 1 units"


def partly_settled() -> Log:
    """Epoch 1 whose settlement came in parts, only the first applied: node-a paid and node-c
    punished, node-b's payout (in the final part) not in yet."""
    log = Log()
    for node in ("node-a", "node-b", "node-c"):
        log.joined(node).tested(node)
    log.epoch(1, T0, T0 + 10 * MIN)
    log.placed("ds-1", ["node-a", "node-b", "node-c"], epoch=1, ends_ms=T0 + 10 * MIN)
    for node, units in (("node-a", 10), ("node-b", 7), ("node-c", 3)):
        log.add(node, T0, WorkReported(devshard_id="ds-1", node_id=node, units=units, epoch=1))
    why = "unexcused disconnect: no events for 3 cycles (3s); last event index 9"
    part = (
        NodePayout(node_id="node-a", units=10, reward=10, punished=False),
        NodePayout(node_id="node-c", units=3, reward=0, punished=True, reason=why),
    )
    return log.master(T0 + 10 * MIN, EpochSettled(epoch=1, payouts=part, final=False))


def test_a_partly_settled_epoch_shows_as_settling_with_its_recorded_payouts() -> None:
    # It showed as "open" beside paid rows, and the punished row read "open (disconnected:
    # unexcused disconnect: ...)".
    log = partly_settled()
    status = cluster_status(log.state, T0 + 11 * MIN)
    text = render_text(status, width=200)
    assert "  epoch 1: settling: 2 of 3 nodes settled" in text
    rows = {line.split()[1]: line for line in text.splitlines() if line.startswith("1 ")}
    assert rows["node-a"].endswith("paid 10")
    assert rows["node-b"].endswith("open")
    assert rows["node-c"].endswith(
        "forfeited: unexcused disconnect: no events for 3 cycles (3s); last event index 9"
    )
    assert "disconnected: unexcused" not in text
    ledger = json.loads(to_json(status))["ledgers"][0]
    assert (ledger["settled"], ledger["settling"], ledger["nodes_settled"]) == (False, True, 2)
    assert ledger["stage"] == "settling: 2 of 3 nodes settled"
    assert [(r["node_id"], r["settled"], r["settlement"]) for r in ledger["rows"]] == [
        ("node-a", True, "paid 10"),
        ("node-b", False, "open"),
        (
            "node-c",
            True,
            "forfeited: unexcused disconnect: no events for 3 cycles (3s); last event index 9",
        ),
    ]
    assert from_json(to_json(status)) == status
    summary = summary_lines(log.state, 0)
    assert "ledgers:   1 (0 settled, 1 settling)" in summary
    assert any(line.startswith("  epoch 1: settling: 2 of 3 nodes settled, ") for line in summary)

    final = (NodePayout(node_id="node-b", units=7, reward=7, punished=False),)
    log.master(T0 + 10 * MIN, EpochSettled(epoch=1, payouts=final))
    done = cluster_status(log.state, T0 + 11 * MIN).ledgers[0]
    assert (done.settled, done.settling, done.stage) == (True, False, "settled")
    assert [r.settlement for r in done.rows][:2] == ["paid 10", "paid 7"]
    assert "epoch 1: settled, " in "\n".join(summary_lines(log.state, 0))


def test_an_open_epoch_says_open_and_why_a_node_will_forfeit() -> None:
    log = ready_node_in_epoch_with_disconnect()
    ledger = cluster_status(log.state, T0 + MIN).ledgers[0]
    assert (ledger.settled, ledger.settling, ledger.stage) == (False, False, "open")
    assert ledger.rows[0].settlement == "open (disconnected: no events for 3 cycles)"


def ready_node_in_epoch_with_disconnect() -> Log:
    log = Log().joined("node-a").tested("node-a").epoch(1, T0, T0 + 10 * MIN)
    log.placed("ds-1", ["node-a"], epoch=1, ends_ms=T0 + 10 * MIN)
    return log.master(T0, NodeDisconnected(node_id="node-a", reason="no events for 3 cycles"))


def test_the_dashboard_shows_the_masters_settlement_words_not_its_own() -> None:
    # It copied the text logic, and so showed a partly settled epoch as "open" beside paid
    # rows; now the master's `settlement` and `stage` are the words.
    page = DASHBOARD.read_text()
    script = page[page.index('fillTable("ledgers"') :]
    script = script[: script.index("\n\n")]
    assert "r.settlement" in script and "l.stage" in script
    assert "disconnected:" not in script and "forfeited" not in script


def test_the_dashboard_styles_every_node_status() -> None:
    # `facts_only` had no rule and showed the chip's fallback grey by accident.
    style = DASHBOARD.read_text().split("<style>")[1].split("</style>")[0]
    selectors = set(re.findall(r"\.s-([a-z_]+)\b", style))
    assert {s.value for s in NodeState} <= selectors, {s.value for s in NodeState} - selectors


OPERATIONS_MD = DASHBOARD.parents[3] / "docs" / "operations.md"


def test_the_operations_guide_shows_cluster_status_word_for_word() -> None:
    # Its sample said "no events for 3 cycles" and "forfeited: disconnected", which the
    # code never prints.
    doc = OPERATIONS_MD.read_text()
    start = doc.index("\ncluster at event ") + 1
    sample = doc[start : doc.index("```", start)]
    assert sample == render_text(cluster_status(busy_cluster().state, NOW))


def test_the_operations_guide_status_table_quotes_the_messages() -> None:
    doc = OPERATIONS_MD.read_text()
    table = dict(re.findall(r"^\| `(\w+)` \| `(.*)` \| \w+ \|$", doc, re.MULTILINE))
    gone = "no events for 3 cycles (3s); last event index 812"
    log = ready_node().master(T0, NodeDisconnected(node_id="node-a", reason=gone))
    assert table["disconnected"] == node_status(log.state, "node-a", T0 + 3 * MIN).message
    held = stopping_node(placed=True).placed("ds-7-chat", ["node-a", "node-a"], 1, T0 + MIN)
    rec = held.state.nodes["node-a"]
    state = msgspec.structs.replace(
        held.state,
        nodes=held.state.nodes.set("node-a", msgspec.structs.replace(rec, stopping_idx=812)),
        devshards=held.state.devshards.delete("ds-1"),
    )
    assert table["stopping"] == node_status(state, "node-a", T0 + MIN).message
