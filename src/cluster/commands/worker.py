"""`cluster worker`: join a master, gather this machine's facts, keep a replica of the state.

`--master` takes the master's full multiaddr (as `cluster master` prints it) or the path of a
file holding it (such as the master's `master.addr`, read again before every dial: a master
restarted on another port is followed). The worker retries with back-off until
the master is reachable and says so at INFO. `--load RATE` adds synthetic NodeHeartbeat events
at RATE per second (for load tests and benchmarks; harmless to state).
"""

from __future__ import annotations

import argparse
import math
import os
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cluster.commands._args import text_or_path
from cluster.commands._process import LOG_LEVELS, data_dir_arg
from cluster.shared.events import INT64_MAX, MAX_NODE_SLOTS

if TYPE_CHECKING:  # the real imports happen in run(), after argument parsing (no libp2p)
    from cluster.worker.client import Worker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=data_dir_arg, required=True, help="node.key, outbox, digest"
    )
    parser.add_argument(
        "--master",
        type=text_or_path,
        required=True,
        metavar="MULTIADDR|FILE",
        help="the master's full address",
    )
    parser.add_argument(
        "--cluster-secret-file", type=Path, help="the cluster secret (if the master uses one)"
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="0.01..60 (default 1): keep it well below the master's staleness limit",
    )
    parser.add_argument(
        "--peer-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="3..86400 (default 10): a master silent this long is redialled",
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=None,
        help=f"runner slots offered, 0..{MAX_NODE_SLOTS} (default 1)",
    )
    parser.add_argument(
        "--slot-memory-mb", type=int, default=None, help="memory per slot in MiB (default 1024)"
    )
    parser.add_argument(
        "--stall-info-source",
        action="append",
        default=[],
        metavar="SOURCE:SECONDS",
        help="make an info probe hang (to test that one slow probe never silences the node)",
    )
    parser.add_argument("--no-info", action="store_true", help="do not gather machine info")
    parser.add_argument(
        "--runner-file",
        type=Path,
        metavar="FILE",
        help="TOML naming the runner kind and its config (default: the simulated runner)",
    )
    parser.add_argument(
        "--no-runners", action="store_true", help="run no runners and no self-test (facts only)"
    )
    parser.add_argument("--load", type=float, default=0.0, metavar="RATE", help=argparse.SUPPRESS)
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="INFO")


DEFAULT_SLOTS: Final = 1
DEFAULT_SLOT_MEMORY_MB: Final = 1024


def check_flag_combinations(args: argparse.Namespace) -> None:
    """ValueError naming a flag given with the one that turns it off (it was ignored, so a
    typo in it went unnoticed), or a slot flag out of range (named as the flag)."""
    if args.no_info:
        given = [
            flag
            for flag, value in (
                ("--slots", args.slots),
                ("--slot-memory-mb", args.slot_memory_mb),
                ("--stall-info-source", args.stall_info_source or None),
            )
            if value is not None
        ]
        if given:
            raise ValueError(
                f"{', '.join(given)} has no effect with --no-info (no machine info is gathered, "
                "so no slots are offered): drop one or the other"
            )
    if args.no_runners and args.runner_file is not None:
        raise ValueError("--runner-file has no effect with --no-runners: drop one or the other")
    if args.slots is not None and not 0 <= args.slots <= MAX_NODE_SLOTS:
        raise ValueError(f"--slots must be 0..{MAX_NODE_SLOTS}, got {args.slots}")
    if args.slot_memory_mb is not None and not 0 <= args.slot_memory_mb <= INT64_MAX:
        raise ValueError(f"--slot-memory-mb must be 0..{INT64_MAX}, got {args.slot_memory_mb}")


def master_addr_source(value: str) -> str | Path:
    """`--master` for the worker: a multiaddr as given, or the path of the file holding it.
    The worker reads that file when it is built (`MasterAddr`: an error names the file) and
    again before every dial, so a master restarted on another port (a new `master.addr`) is
    found again."""
    # An absolute file path starts with "/" too (such as /srv/master/master.addr): a file
    # that exists wins, then anything starting with a multiaddr protocol (/ip4/, /dns/...).
    try:
        is_dir = stat.S_ISDIR(os.stat(value).st_mode)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in it, no file's name
        # Not only "no such file": a name too long for a file name, a directory we may not
        # search (ENAMETOOLONG, EACCES) are not files we can read either.
        from cluster.net.host import names_a_protocol

        if value.startswith("/") and names_a_protocol(value):
            return value  # parsed (and any mistake in it named) when the worker is built
        hint = "" if value.startswith("/") else " (starting with /)"
        why = _reason(exc) if isinstance(exc, OSError) else "no such file"
        raise ValueError(
            f"--master {value!r} is neither a multiaddr{hint} nor a readable file: {why}"
        ) from None
    if is_dir:
        raise ValueError(
            f"--master {value!r} is neither a multiaddr nor a readable file: a directory"
        )
    return Path(value).absolute()


def _reason(exc: OSError) -> str:
    """ "no such file", "file name too long": not "[Errno 36] File name too long: '...'"
    (the name is said already)."""
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):  # as Path.exists() said
        return "no such file"
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


#: `--load` events per second at most: far above what one worker's connection carries.
MAX_LOAD: Final = 1_000_000

#: `--heartbeat-interval`: a heartbeat every 1e-300 s is a busy loop flooding the master's
#: log; one a minute is already slower than any useful staleness limit (the master's is plan
#: interval x stale cycles, 3 s by default: keep the heartbeat well below). `--peer-timeout`
#: is bounded like the master's (`_process.PEER_TIMEOUT_S`).
HEARTBEAT_INTERVAL_S: Final = (0.01, 60.0)


def run(args: argparse.Namespace) -> int:
    import anyio

    from cluster.commands._process import (
        PEER_TIMEOUT_S,
        check_data_dir,
        check_seconds,
        setup_logging,
        stop_on_signal,
    )
    from cluster.control import SocketInUseError
    from cluster.net.host import AddressError
    from cluster.net.identity import IdentityError
    from cluster.net.membership import MembershipConfigError, load_secret_file
    from cluster.shared.humanize import first_leaf
    from cluster.worker.client import WorkerConfig
    from cluster.worker.info import InfoConfig, InfoConfigError, parse_stall
    from cluster.worker.master_addr import MasterAddrFileError
    from cluster.worker.node import WorkerNode, WorkerNodeConfig
    from cluster.worker.outbox import OutboxError
    from cluster.worker.runners.base import RunnerConfigError
    from cluster.worker.runners.registry import RunnerSetting, load_runner_setting

    setup_logging(args.log_level)
    try:
        # Nothing is created before every setting is checked: the directory (if new), the key
        # and the outbox are made by WorkerNode, after it checked the runner setting.
        check_data_dir(args.data_dir, "worker")
        check_seconds("--heartbeat-interval", args.heartbeat_interval, HEARTBEAT_INTERVAL_S)
        check_seconds("--peer-timeout", args.peer_timeout, PEER_TIMEOUT_S)
        if not (args.load >= 0 and math.isfinite(args.load)):
            raise ValueError("--load must be a finite number >= 0")
        if args.load > MAX_LOAD:  # emitted in bursts without yielding: it would never stop
            raise ValueError(f"--load must be at most {MAX_LOAD:,} events per second")
        check_flag_combinations(args)
        secret = load_secret_file(args.cluster_secret_file) if args.cluster_secret_file else None
        info = None
        if not args.no_info:
            info = InfoConfig(
                data_dir=args.data_dir,
                slots=args.slots if args.slots is not None else DEFAULT_SLOTS,
                slot_memory_mb=(
                    args.slot_memory_mb
                    if args.slot_memory_mb is not None
                    else DEFAULT_SLOT_MEMORY_MB
                ),
                stalls=dict(parse_stall(s) for s in args.stall_info_source),
            )
        runner = None
        if not args.no_runners:
            # WorkerNode checks its [config]: a typo stops the worker with one line here.
            runner = load_runner_setting(args.runner_file) if args.runner_file else RunnerSetting()
        config = WorkerNodeConfig(
            client=WorkerConfig(
                heartbeat_interval=args.heartbeat_interval,
                peer_timeout=args.peer_timeout,
                secret=secret,
            ),
            info=info,
            runner=runner,
        )
        try:
            node = WorkerNode(args.data_dir, master_addr_source(args.master), config)
        except MasterAddrFileError as exc:
            # Its first reading, when the worker is built: it names the file.
            raise ValueError(f"--master: {exc}") from None
        except RunnerConfigError as exc:
            if runner is None or not args.runner_file:
                raise
            # Its [config] is what WorkerNode found wrong: say which file holds it.
            raise RunnerConfigError(f"runner file {args.runner_file}: {exc}") from None
    except (
        RunnerConfigError,
        ValueError,
        AddressError,
        IdentityError,
        MembershipConfigError,
        InfoConfigError,
        OutboxError,
        OSError,
    ) as exc:
        print(f"cluster worker: {exc}", file=sys.stderr)
        return 2

    print(f"worker {node.node_id} data dir {args.data_dir}", flush=True)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            # The goodbye names the signal: the master's log quotes it.
            tg.start_soon(stop_on_signal, lambda name: node.stop(f"cluster worker got {name}"))
            await tg.start(node.run)
            if args.load > 0:
                tg.start_soon(_synthetic_load, node.worker, args.load)
            await node.worker.wait_finished()
            tg.cancel_scope.cancel()

    status = 0
    try:
        anyio.run(main, backend="trio")
    except* SocketInUseError as group:  # another process serves this directory: one line
        print(f"cluster worker: {first_leaf(group)}", file=sys.stderr)
        status = 2
    finally:
        node.close()
    if node.failure is not None:  # the disk refused the outbox: its ERROR said so
        status = 2
    return status


async def _synthetic_load(worker: Worker, rate: float) -> None:
    """NodeHeartbeat events at `rate` per second, paced against the monotonic clock."""
    import time

    import anyio

    from cluster.shared.events import NodeHeartbeat

    start = time.monotonic()
    sent = 0
    while True:
        due = int((time.monotonic() - start) * rate)
        for _ in range(due - sent):
            worker.emit(NodeHeartbeat(node_id=worker.node_id))
        sent = max(sent, due)
        await anyio.sleep(0.005)
