"""`cluster node remove`: the operator takes a node that is gone for good out of the cluster.

Run on the master host with the master's --data-dir. A node is named as `cluster status`
shows it ("12D3Ko…x7Fq9a", or with "..."), by its full id (`cluster status --json`,
`nodes[].node_id`), or by 8 or more of its id's first characters; the master resolves the
name (`cluster.shared.node_names`) and answers with the full id.
"""

from __future__ import annotations

import argparse

from cluster.commands._control_cli import add_data_dir, finish, send
from cluster.control import NodeRemove


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_dir(parser, "master")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    remove = sub.add_parser(
        "remove",
        help="remove a disconnected node that is gone for good (decommissioned, new key): "
        "it leaves status, counts and /metrics",
    )
    remove.add_argument(
        "node_id",
        metavar="NODE",
        help="the node: its id as `cluster status` shows it (12D3Ko…x7Fq9a, or with ...), "
        "its full id, or 8+ of its first characters",
    )
    remove.add_argument("--reason", default="", help="why, for the log (e.g. 'decommissioned')")
    for action in sub.choices.values():
        add_data_dir(action, "master", action=True)


def run(args: argparse.Namespace) -> int:
    return finish(args, send(args, NodeRemove(node_id=args.node_id, reason=args.reason)))
