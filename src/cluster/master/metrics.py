"""Prometheus text exposition of the master's health (served at GET /metrics).

`MasterMetrics` is what the master process measures itself (how many events it indexed, how
big the log is, how long plan cycles take, how far each worker is behind); node counts by
status are derived from State by `cluster.shared.node_status`, never counted twice.
`render_prometheus` is pure, so the format is tested without a server.

Format: https://prometheus.io/docs/instrumenting/exposition_formats/ (text format 0.0.4).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Final

import msgspec

from cluster.shared.node_status import NodeState, NodeStatus

#: The Content-Type Prometheus expects for the text format.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

_NAME: Final = re.compile(r"[a-z_][a-z0-9_]*")


class MasterMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """Numbers only the master process knows (State cannot: they are about the process)."""

    #: Events indexed into the log (the log's last index).
    events_indexed: int = 0
    #: Bytes the event log takes on disk (all segments).
    log_size_bytes: int = 0
    #: Duration of the most recent plan cycle, and the total over all cycles so far.
    plan_cycle_last_seconds: float = 0.0
    plan_cycle_seconds_sum: float = 0.0
    plan_cycles_total: int = 0
    #: node_id -> events indexed that the node has not yet acknowledged applying.
    catch_up_lag_by_node: dict[str, int] = msgspec.field(default_factory=dict)
    #: Extra monotonically increasing counters (e.g. duplicates dropped): name -> value,
    #: exported as ``cluster_master_<name>_total``. Names must be lower_snake_case.
    counters: dict[str, int] = msgspec.field(default_factory=dict)


def render_prometheus(
    metrics: MasterMetrics,
    statuses: Iterable[NodeStatus],
    *,
    sse_subscribers: int = 0,
    http_requests: Mapping[str, int] | None = None,
) -> str:
    """The text exposition: one HELP and TYPE line per family, then its samples."""
    out: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]) -> None:
        # A sample's "labels" part is a label set `{k="v"}` or a suffix (`_sum`, `_count`).
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

    family(
        "cluster_events_indexed_total",
        "counter",
        "Events the master has indexed into the log.",
        [("", metrics.events_indexed)],
    )
    family(
        "cluster_log_size_bytes",
        "gauge",
        "Size of the event log on disk.",
        [("", metrics.log_size_bytes)],
    )
    counts = {s.value: 0 for s in NodeState}
    for st in statuses:
        counts[st.status.value] += 1
    family(
        "cluster_nodes",
        "gauge",
        "Nodes by plain-language status (derived from state).",
        [(_labels(status=s), n) for s, n in counts.items()],
    )
    family(
        "cluster_plan_cycle_last_seconds",
        "gauge",
        "Duration of the most recent plan cycle.",
        [("", metrics.plan_cycle_last_seconds)],
    )
    family(
        "cluster_plan_cycle_seconds",
        "summary",
        "Plan cycle durations (rate(sum)/rate(count) is the mean).",
        [
            ("_sum", metrics.plan_cycle_seconds_sum),
            ("_count", metrics.plan_cycles_total),
        ],
    )
    family(
        "cluster_node_catch_up_lag_events",
        "gauge",
        "Indexed events a node has not yet acknowledged applying.",
        [(_labels(node=n), lag) for n, lag in sorted(metrics.catch_up_lag_by_node.items())],
    )
    family(
        "cluster_http_sse_subscribers",
        "gauge",
        "Open server-sent-event streams of the HTTP API.",
        [("", sse_subscribers)],
    )
    if http_requests:
        family(
            "cluster_http_requests_total",
            "counter",
            "HTTP API requests answered, by status code.",
            [(_labels(code=c), n) for c, n in sorted(http_requests.items())],
        )
    for name, value in sorted(metrics.counters.items()):
        if not _NAME.fullmatch(name):
            raise ValueError(f"metric counter name {name!r} is not lower_snake_case")
        family(f"cluster_master_{name}_total", "counter", f"Master counter {name}.", [("", value)])
    return "\n".join(out) + "\n"


def _labels(**labels: str) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)
