"""What the control-socket commands (`session`, `maintenance`, `status`) share."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cluster.control import ControlError, Reply, Request, call_sync

DATA_DIR_ENV = "CLUSTER_DATA_DIR"


def add_data_dir(parser: argparse.ArgumentParser, whose: str, *, action: bool = False) -> None:
    """`--data-dir` on the command's parser, and (action=True) again on each action's, so
    `cluster session create --data-dir m` works as well as `cluster session --data-dir m
    create` (it was "unrecognized arguments"). An action's copy defaults to SUPPRESS: a
    default there would overwrite the value given before the action."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=argparse.SUPPRESS if action else None,
        help=f"data directory of the running {whose} (default: ${DATA_DIR_ENV} or ./data)",
    )


def data_dir(args: argparse.Namespace) -> Path:
    given: Path | None = args.data_dir
    if given is not None:
        return given
    return Path(os.environ.get(DATA_DIR_ENV, "data"))


def say_error(args: argparse.Namespace, message: str) -> None:
    """One line on stderr, `cluster session: <message>`, as every command starts its own."""
    print(f"cluster {args.command}: {message}", file=sys.stderr)


def send(args: argparse.Namespace, request: Request) -> Reply | None:
    """Send a request; on a transport problem say what to do and return None."""
    try:
        return call_sync(data_dir(args), request)
    except ControlError as exc:
        say_error(args, str(exc))
        return None


def finish(args: argparse.Namespace, reply: Reply | None, *, as_json: bool = False) -> int:
    """Print a reply: message (or JSON data) on stdout when ok; a refusal on stderr, as
    `cluster session: <why>` like every other error of the command."""
    if reply is None:
        return 2
    if as_json:
        print(json.dumps({"ok": reply.ok, "message": reply.message, "data": reply.data}, indent=2))
    elif reply.ok:
        if reply.message:
            print(reply.message)
    else:
        say_error(args, reply.message or "refused (the master gave no reason)")
    return 0 if reply.ok else 1
