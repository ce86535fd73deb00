"""`cluster session create|list|delete`: the operator's sessions, on the master host."""

from __future__ import annotations

import argparse
import time

from cluster.commands._control_cli import add_data_dir, finish, send
from cluster.control import SessionCreate, SessionDelete, SessionList
from cluster.shared.humanize import format_utc, plural


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_dir(parser, "master")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="ask for capacity: slots of a given memory size")
    create.add_argument("--slots", type=int, required=True, help="number of runner slots")
    create.add_argument("--memory-mb", type=int, required=True, help="memory per slot in MiB")
    create.add_argument("--gpu", action="store_true", help="slots need a GPU")
    create.add_argument("--name", default="", help="a short name (letters, digits, . _ -)")
    create.add_argument(
        "--reward-per-unit",
        type=int,
        default=1,
        help="reward per work unit, 0..1048576 (default 1; 0: the session pays nothing, its "
        "work still earns maintenance credit and its misses still count)",
    )
    lst = sub.add_parser("list", help="list sessions")
    lst.add_argument("--json", action="store_true")
    delete = sub.add_parser("delete", help="delete a session (its devshard ends with the epoch)")
    delete.add_argument("session_id")
    for action in sub.choices.values():
        add_data_dir(action, "master", action=True)


def run(args: argparse.Namespace) -> int:
    if args.action == "create":
        request = SessionCreate(
            slots=args.slots,
            memory_per_slot_mb=args.memory_mb,
            gpu=args.gpu,
            name=args.name,
            reward_per_unit=args.reward_per_unit,
        )
        return finish(args, send(args, request))
    if args.action == "delete":
        return finish(args, send(args, SessionDelete(session_id=args.session_id)))
    reply = send(args, SessionList())
    if reply is None or args.json or not reply.ok:
        return finish(args, reply, as_json=args.json)
    sessions = reply.data or []
    if not sessions:
        print("no sessions")
    now_ms = time.time_ns() // 1_000_000
    for s in sessions:
        gpu = ", gpu" if s.get("gpu") else ""
        note = ""
        if s.get("unplaced_reason"):
            # Its counts are as of the planner's last SessionUnplaced (restated at most once
            # a minute when only they move), as `cluster status` says too.
            at = s.get("unplaced_ms")
            when = f" (as of {format_utc(at, now_ms)})" if isinstance(at, int) and at > 0 else ""
            note = f"  unplaced{when}: {s['unplaced_reason']}"
        slots = plural(s["slots"], "slot")
        print(f"{s['session_id']}: {slots} x {s['memory_per_slot_mb']} MiB{gpu}{note}")
    return 0
