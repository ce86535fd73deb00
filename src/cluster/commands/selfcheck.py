"""`cluster selfcheck`: drive a full synthetic lifecycle in process; PASS/FAIL per stage."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Runs master, planner, maintenance rules and four simulated workers in process on a "
        "fake clock through join, self-test, epoch, placement, catch-up, work, settlement, "
        "maintenance, staleness and replay. Exit 0 when every stage passes, 1 otherwise."
    )


def run(args: argparse.Namespace) -> int:
    from cluster.selfcheck import run_selfcheck

    return 0 if run_selfcheck() else 1
