"""`cluster` command line: one module per subcommand under `cluster.commands`.

Subcommand modules are imported only when chosen, so `cluster replay` never pays for
importing libp2p (about 1.3 s).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from cluster.commands._args import require_utf8

#: subcommand -> (module under cluster.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "replay": ("replay", "fold an event log and print the state and its digest"),
    "master": ("master", "run the master: index, persist and stream the event log"),
    "worker": ("worker", "run a worker: join a master, report facts, keep a replica"),
    "demo": ("demo", "run a master and N workers on loopback (the quick start)"),
    "status": ("status", "show the cluster at a glance: nodes, epoch, sessions, windows, ledgers"),
    "session": ("session", "create, list or delete sessions (operator, on the master host)"),
    "node": ("node", "remove a node that is gone for good (operator, on the master host)"),
    "maintenance": ("maintenance", "schedule, check, cancel or finish a maintenance window"),
    "selfcheck": ("selfcheck", "run a whole synthetic cluster lifecycle in process: PASS/FAIL"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cluster", description="Event-sourced master/worker runtime for inference clusters."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(f"cluster.commands.{module}").add_arguments(p)
    require_utf8(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"cluster.commands.{args._module}")
    try:
        return int(module.run(args))
    except BaseException as exc:
        if not _interrupted(exc):
            raise
        print(f"cluster {args.command}: interrupted", file=sys.stderr)
        return 130


def _interrupted(exc: BaseException) -> bool:
    """Ctrl-C, also when it reached us from inside a task group (as an exception group)."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(KeyboardInterrupt) is not None
    return isinstance(exc, KeyboardInterrupt)


if __name__ == "__main__":
    sys.exit(main())
