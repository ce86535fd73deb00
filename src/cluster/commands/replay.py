"""`cluster replay PATH`: fold an event log and show what the cluster believed, and its digest.

PATH is a data directory (holding ``log/`` and ``snapshots/``) or the ``log/`` directory
itself. The log is opened read-only (no lock, a torn tail is ignored rather than cut), so a
running master's log can be replayed. The fold starts from the newest valid snapshot at or
before ``--until`` unless ``--no-snapshot``; the digest is the same either way.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import TextIO

from cluster.shared import codec
from cluster.shared.eventlog import LogError
from cluster.shared.humanize import format_utc, plural
from cluster.shared.snapshots import SnapshotStore
from cluster.shared.state import State, WindowState
from cluster.shared.status_view import ledger_stage, removed_node_ids

log = logging.getLogger(__name__)

#: Show a progress bar for folds longer than this even when stderr is not a terminal.
PROGRESS_MIN_EVENTS = 200_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path", type=Path, metavar="PATH", help="data directory or its log/ directory"
    )
    parser.add_argument(
        "--until",
        type=int,
        metavar="IDX",
        help="stop after event IDX (default: the end of the log)",
    )
    out = parser.add_mutually_exclusive_group()
    out.add_argument(
        "--json",
        action="store_true",
        help="print the state as JSON on stdout (the digest line goes to stderr)",
    )
    out.add_argument("--digest", action="store_true", help="print only the digest (hex)")
    parser.add_argument(
        "--no-snapshot", action="store_true", help="refold from event 1, ignoring snapshots"
    )


def resolve_paths(path: Path) -> tuple[Path, Path | None]:
    """(log directory, snapshot directory or None) for a data dir or a log dir."""
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory (expected a data directory or its log/)")
    if (path / "log").is_dir():
        snaps = path / "snapshots"
        return path / "log", snaps if snaps.is_dir() else None
    if any(path.glob("*.seg")):
        snaps = path.parent / "snapshots"
        return path, snaps if snaps.is_dir() else None
    if (path / "master" / "log").is_dir():  # a `cluster demo` directory
        raise ValueError(
            f"{path}: no event log here, but its master/ subdirectory holds one: "
            f"cluster replay {path / 'master'}"
        )
    raise ValueError(f"{path}: no event log here (expected a log/ directory or *.seg files)")


def summary_lines(state: State, snapshot_idx: int) -> list[str]:
    """A readable picture of a state, one fact per line."""
    nodes = state.nodes.values()
    connected = sum(1 for n in nodes if n.connected)
    lines = [
        f"events:    {plural(state.last_applied, 'event')}"
        + (f" (last at {format_utc(state.last_time_ms, 0)})" if state.last_applied else "")
        + (f", from the snapshot at {snapshot_idx:,}" if snapshot_idx else ""),
        f"nodes:     {len(state.nodes):,} ({connected:,} connected, "
        f"{len(state.nodes) - connected:,} disconnected"
        + (f"; {len(state.removed()):,} removed" if state.removed() else "")
        + ")",
    ]
    if state.epoch is None:
        lines.append("epoch:     none started")
    else:
        e = state.epoch
        lines.append(
            f"epoch:     {e.epoch} ({format_utc(e.start_ms, 0)} -> {format_utc(e.end_ms, 0)})"
        )
    lines.append(f"sessions:  {len(state.sessions):,}")
    lines.append(f"devshards: {len(state.devshards):,} live")
    lines.append(f"runners:   {len(state.runners):,} live")
    by_state = Counter(w.state for w in state.windows.values())
    windows = ", ".join(f"{by_state[s]} {s.value}" for s in WindowState if by_state[s])
    lines.append(f"windows:   {len(state.windows):,}" + (f" ({windows})" if windows else ""))
    ledgers = sorted(state.ledgers.values(), key=lambda led: led.epoch)
    settled = sum(1 for led in ledgers if led.settled)
    # Partly settled: a settlement logged in parts of which not all are in (yet).
    settling = sum(
        1
        for led in ledgers
        if not led.settled and any(a.payout is not None for a in led.nodes.values())
    )
    more = f", {settling:,} settling" if settling else ""
    lines.append(f"ledgers:   {len(ledgers):,} ({settled:,} settled{more})")
    # A removed node's accounts stay in its epochs' ledgers (history): counted, and said.
    removed = removed_node_ids(state)
    for led in ledgers[-5:]:  # the recent epochs are what an operator asks about
        accounts = list(led.nodes.values())
        units = sum(a.units for a in accounts)
        reward = sum(a.reward for a in accounts)
        disconnects = sum(1 for a in accounts if a.disconnect is not None)
        misses = sum(a.misses for a in accounts)
        gone = sum(1 for node_id in led.nodes if node_id in removed)
        lines.append(
            f"  epoch {led.epoch}: {ledger_stage(led)}, "
            f"{plural(units, 'unit')}, reward {reward:,}, "
            f"{plural(disconnects, 'punished disconnect')}, "
            f"{plural(misses, 'miss', 'misses')}"
            + (f"; {gone:,} of its nodes removed since" if gone else "")
        )
    return lines


class ProgressBar:
    """A one-line progress bar on a stream: "replay  42% 420,000/1,000,000 events"."""

    WIDTH = 30

    def __init__(self, stream: TextIO, start_idx: int) -> None:
        self._stream = stream
        self._start = start_idx
        self._shown = False

    def __call__(self, idx: int, target: int) -> None:
        total = max(target - self._start, 1)
        done = max(idx - self._start, 0)
        filled = self.WIDTH * done // total
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self._stream.write(f"\rreplay [{bar}] {100 * done // total:3d}% {idx:,}/{target:,} events")
        self._stream.flush()
        self._shown = True

    def finish(self) -> None:
        if self._shown:
            self._stream.write("\n")
            self._stream.flush()


def run(args: argparse.Namespace) -> int:
    # Imported here so `cluster --help` stays fast; none of this imports libp2p.
    from cluster.commands._process import setup_command_logging
    from cluster.shared.eventlog import EventLog
    from cluster.shared.store import (
        ahead_of_log_warning,
        list_snapshots,
        restore,
        snapshots_ahead_of_log,
    )

    setup_command_logging("replay")  # warnings (a torn tail, a bad snapshot): one line each
    err = sys.stderr
    if args.until is not None and args.until < 0:
        print(f"cluster replay: --until {args.until} must be >= 0", file=err)
        return 2
    bar: ProgressBar | None = None
    try:
        log_dir, snap_dir = resolve_paths(args.path)
        with EventLog.open(log_dir, readonly=True) as event_log:
            snapshots = SnapshotStore(snap_dir) if snap_dir is not None else None
            # Snapshots only shorten a replay: an unreadable directory is a WARNING and a
            # refold from the log, not a failed command.
            on_disk = list_snapshots(snapshots) if snapshots is not None else []
            if on_disk is None:
                snapshots, on_disk = None, []
            last = event_log.last_idx
            # Also with --no-snapshot: such a snapshot proves the log lost acknowledged events.
            for idx in snapshots_ahead_of_log(on_disk, last):
                log.warning("%s; not used", ahead_of_log_warning(idx, last))
            if args.no_snapshot:
                snapshots = None
            target = last if args.until is None else args.until
            # Where the fold will likely start (the newest snapshot file), to size the bar.
            below = [i for i in on_disk if i <= target] if snapshots is not None else []
            start = below[0] if below else 0
            if err.isatty() or target - start > PROGRESS_MIN_EVENTS:
                bar = ProgressBar(err, start)
            try:
                state, snapshot_idx = restore(event_log, snapshots, args.until, progress=bar)
            finally:
                if bar is not None:
                    bar.finish()
    except (LogError, ValueError, OSError) as exc:
        print(f"cluster replay: {exc}", file=err)
        return 2
    digest = codec.state_digest(state)
    if args.digest:
        print(digest)
    elif args.json:
        sys.stdout.write(codec.state_to_json(state).decode() + "\n")
        print(f"digest: {digest}", file=err)
    else:
        for line in summary_lines(state, snapshot_idx):
            print(line)
        print(f"digest: {digest}")
    return 0
