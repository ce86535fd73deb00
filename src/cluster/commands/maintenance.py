"""`cluster maintenance schedule|check|next|cancel|finish`, run on the worker's host.

It talks to the local worker's control socket; the worker forwards the request over its
authenticated connection, so the master knows which node asks. Run on the master host
(with the master's --data-dir) it acts as the operator and needs --node.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

from cluster.commands._control_cli import add_data_dir, finish, say_error, send
from cluster.control import (
    MaintenanceCancel,
    MaintenanceCheck,
    MaintenanceFinish,
    MaintenanceNext,
    MaintenanceSchedule,
    Request,
)
from cluster.shared.durations import DurationError, parse_duration, parse_time


def _window_args(p: argparse.ArgumentParser) -> None:
    # `--in -2h` took "-2h" for an option ("argument --in: expected one argument"): argparse
    # 3.11 reads an argument starting with "-" as a value only if it is a plain number. From
    # Python 3.13 every "-<digit>..." is (this parser has no option that looks like one);
    # here too, so the value reaches its check and is refused by name, like `--in=-2h`.
    p._negative_number_matcher = re.compile(r"-\.?\d")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--in", dest="in_", metavar="DURATION", help="start after, e.g. 12h35m20s")
    when.add_argument("--at", metavar="TIME", help="start at an ISO time, e.g. 2026-11-23T02:00Z")
    p.add_argument("--duration", required=True, help="how long, e.g. 2h or 1h30m")


_WHOSE = "worker (or master, with --node)"
_NODE_HELP = (
    "the node (operator only): its id as `cluster status` shows it (12D3Ko…x7Fq9a, or with "
    "...), its full id, or 8+ of its first characters"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_dir(parser, _WHOSE)
    parser.add_argument("--node", default="", help=_NODE_HELP)
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    _window_args(sub.add_parser("schedule", help="declare a maintenance window"))
    _window_args(sub.add_parser("check", help="would this window be allowed? (schedules nothing)"))
    sub.add_parser("next", help="show the node's window and credit")
    for name, text in (("cancel", "cancel a window not yet active"), ("finish", "end it early")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--window", default="", help="window id (default: the node's open one)")
    # Also after the action (`cluster maintenance check --data-dir w1 ...`); SUPPRESS keeps
    # a value given before the action (see add_data_dir).
    for action in sub.choices.values():
        add_data_dir(action, _WHOSE, action=True)
        action.add_argument("--node", default=argparse.SUPPRESS, help=_NODE_HELP)


def _parsed(flag: str, parse: Callable[[str], int], text: str) -> int:
    try:
        return parse(text)
    except DurationError as exc:
        raise DurationError(f"{flag} {exc}") from None


def build_request(args: argparse.Namespace) -> Request:
    """The request for the command line; raises DurationError naming the flag and saying
    what to change (`--in '-2h': a duration cannot be negative; ...`)."""
    node = args.node
    if args.action in ("schedule", "check"):
        duration = _parsed("--duration", parse_duration, args.duration)
        in_ms = _parsed("--in", parse_duration, args.in_) if args.in_ is not None else None
        start = _parsed("--at", parse_time, args.at) if args.at is not None else None
        cls = MaintenanceSchedule if args.action == "schedule" else MaintenanceCheck
        return cls(start_ms=start, in_ms=in_ms, duration_ms=duration, node_id=node)
    if args.action == "next":
        return MaintenanceNext(node_id=node)
    if args.action == "cancel":
        return MaintenanceCancel(window_id=args.window, node_id=node)
    return MaintenanceFinish(window_id=args.window, node_id=node)


def run(args: argparse.Namespace) -> int:
    try:
        request = build_request(args)
    except DurationError as exc:
        say_error(args, str(exc))
        return 2
    return finish(args, send(args, request))
