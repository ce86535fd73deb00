"""`cluster master`: run the master (index, persist and stream the cluster's event log).

Membership (see docs/membership.md): `--allow`/`--allow-file` restrict joining to listed peer
ids; `--cluster-secret-file` requires the HMAC challenge. With neither, the master creates
`<data-dir>/cluster.secret` (0600) once and uses it: a master is never open to strangers.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from cluster.commands._process import LOG_LEVELS, data_dir_arg

if TYPE_CHECKING:
    from cluster.datadir import DataDirLock
    from cluster.master.config import PlannerConfig
    from cluster.master.http_api import HttpApiConfig

#: The secret a master with neither --allow nor --cluster-secret-file creates and uses.
SECRET_FILE: Final = "cluster.secret"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=data_dir_arg, required=True, help="log, snapshots, node.key"
    )
    parser.add_argument(
        "--listen",
        default="/ip4/127.0.0.1/tcp/0",
        metavar="MULTIADDR",
        help="/ip4/ADDR/tcp/PORT or /ip6/ADDR/tcp/PORT to listen on (default: %(default)s; "
        "tcp/0 picks a free port)",
    )
    parser.add_argument(
        "--allow", action="append", default=[], metavar="PEERID", help="peer id allowed to join"
    )
    parser.add_argument("--allow-file", type=Path, help="file of allowed peer ids, one a line")
    parser.add_argument(
        "--cluster-secret-file", type=Path, help="shared secret workers must prove they know"
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML with [planner] and [maintenance] tables (see docs/operations.md)",
    )
    parser.add_argument(
        "--plan-interval",
        type=float,
        metavar="SECONDS",
        help="seconds between planning cycles (default 1; overrides --config)",
    )
    parser.add_argument(
        "--epoch-length", metavar="DURATION", help="epoch length, e.g. 10m (overrides --config)"
    )
    parser.add_argument(
        "--stale-cycles",
        type=int,
        metavar="K",
        help="idle cycles before a node is disconnected, 2..10000 (default 3; overrides "
        "--config): above [planner] fresh_idle_cycles, 1 unless --config sets 0",
    )
    parser.add_argument(
        "--http",
        default="127.0.0.1:8470",
        metavar="HOST:PORT",
        help="read-only HTTP API and dashboard (default %(default)s; 'off' to disable; "
        "port 0 picks a free one)",
    )
    parser.add_argument(
        "--http-token-file", type=Path, help="token required when --http is not loopback"
    )
    parser.add_argument(
        "--peer-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="3..86400 (default 10): a worker silent this long is dropped",
    )
    parser.add_argument(
        "--snapshot-every",
        type=int,
        default=100_000,
        metavar="EVENTS",
        help="1..100,000,000 (default 100,000): events between state snapshots",
    )
    parser.add_argument(
        "--member-log-rate",
        type=int,
        default=1 << 20,
        metavar="BYTES",
        help=f"1..{MAX_MEMBER_LOG_BYTES:,} (default 1 MiB): bytes per second one member may "
        "have logged, sustained; beyond, its submissions are read more slowly",
    )
    parser.add_argument(
        "--member-log-burst",
        type=int,
        default=64 << 20,
        metavar="BYTES",
        help=f"1..{MAX_MEMBER_LOG_BYTES:,} (default 64 MiB): bytes one member may have logged "
        "at once (an outbox backlog after an outage) before its rate applies",
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="INFO")


#: The most `--member-log-rate` / `--member-log-burst` take: 1 TiB (per second), beyond
#: any disk's speed -- in effect no budget.
MAX_MEMBER_LOG_BYTES: Final = 1 << 40


def check_member_log(name: str, value: int) -> None:
    if not 1 <= value <= MAX_MEMBER_LOG_BYTES:
        raise ValueError(f"{name} must be 1..{MAX_MEMBER_LOG_BYTES:,} bytes, got {value}")


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):  # inf passes `> 0`, then breaks round()
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def planner_config(args: argparse.Namespace, file_cfg: PlannerConfig) -> PlannerConfig:
    """The planner settings: the --config file's (or the defaults), then the flags given.

    Only flags the operator actually passed override the file. Rebuilt through validation,
    so an override is checked like the file's values (ValueError names the setting).
    """
    import msgspec

    from cluster.master.config import PlannerConfig, check_stale_cycles
    from cluster.shared.durations import MAX_DURATION_MS, DurationError, parse_duration

    overrides: dict[str, int] = {}
    if args.plan_interval is not None:
        _positive("--plan-interval", args.plan_interval)
        if args.plan_interval * 1000 > MAX_DURATION_MS:
            # The cap of --epoch-length, which it may not exceed anyway; said here, where
            # the config check would print plan_interval_ms (300 digits for 1e300).
            raise ValueError(
                f"--plan-interval must be at most {MAX_DURATION_MS // 1000:,} seconds "
                f"(366 days), got {args.plan_interval:g}"
            )
        overrides["plan_interval_ms"] = round(args.plan_interval * 1000)
        if overrides["plan_interval_ms"] < 1:  # "plan_interval_ms must be >= 1, got 0"
            raise ValueError(
                f"--plan-interval must be at least 0.001 seconds (1 ms), got {args.plan_interval:g}"
            )
    if args.epoch_length is not None:
        try:
            overrides["epoch_length_ms"] = parse_duration(args.epoch_length)
        except DurationError as exc:  # "'5' has no unit" did not say which flag
            raise ValueError(f"--epoch-length {exc}") from None
    if args.stale_cycles is not None:
        check_stale_cycles(args.stale_cycles, "--stale-cycles")  # the file's check, by flag
        overrides["stale_cycles"] = args.stale_cycles
    values = {**msgspec.to_builtins(file_cfg), **overrides}
    _check_flags_against_settings(args, values)
    return PlannerConfig.from_mapping(values)


def _check_flags_against_settings(args: argparse.Namespace, values: dict[str, Any]) -> None:
    """The checks that relate two planner settings, made here when a flag set one of them,
    so that the error names the flags typed (PlannerConfig's names its fields only)."""
    fresh = values["fresh_idle_cycles"]
    if args.stale_cycles is not None and args.stale_cycles <= fresh:
        raise ValueError(
            f"--stale-cycles must be above [planner] fresh_idle_cycles ({fresh}), got "
            f"{args.stale_cycles}: give --stale-cycles {fresh + 1} or more, or lower "
            "fresh_idle_cycles in the --config file"
        )
    plan_ms, epoch_ms = values["plan_interval_ms"], values["epoch_length_ms"]
    if epoch_ms >= plan_ms or (args.plan_interval is None and args.epoch_length is None):
        return
    plan = (
        f"--plan-interval {args.plan_interval:g} ({plan_ms} ms)"
        if args.plan_interval is not None
        else f"the plan interval ([planner] plan_interval_ms = {plan_ms})"
    )
    epoch = (
        f"--epoch-length {args.epoch_length} ({epoch_ms} ms)"
        if args.epoch_length is not None
        else f"the epoch length ([planner] epoch_length_ms = {epoch_ms})"
    )
    raise ValueError(f"{epoch} is shorter than {plan}: an epoch holds at least one plan cycle")


def run(args: argparse.Namespace) -> int:
    import anyio

    from cluster import control
    from cluster.commands._process import (
        PEER_TIMEOUT_S,
        check_data_dir,
        check_seconds,
        prepare_data_dir,
        setup_logging,
        stop_on_signal,
    )
    from cluster.datadir import hold
    from cluster.master.http_api import HttpApiConfigError
    from cluster.master.node import MasterNode, MasterNodeConfig
    from cluster.master.settings import load_settings
    from cluster.net.host import AddressError, parse_listen_multiaddr
    from cluster.net.identity import IdentityError
    from cluster.net.membership import (
        Membership,
        MembershipConfigError,
        create_secret_file,
        load_allow_file,
        load_secret_file,
        validate_peer_id,
    )
    from cluster.shared.eventlog import LogError, LogInUseError
    from cluster.shared.humanize import first_leaf
    from cluster.shared.store import check_snapshot_every

    setup_logging(args.log_level)
    data_dir: Path = args.data_dir
    new_files: NewFiles | None = None
    secret_path: Path | None = None
    try:
        check_data_dir(data_dir, "master")
        check_seconds("--peer-timeout", args.peer_timeout, PEER_TIMEOUT_S)
        check_snapshot_every(args.snapshot_every, "--snapshot-every")
        check_member_log("--member-log-rate", args.member_log_rate)
        check_member_log("--member-log-burst", args.member_log_burst)
        parse_listen_multiaddr(args.listen)
        file_cfg, policy = load_settings(args.config)
        planner_cfg = planner_config(args, file_cfg)
        http = http_config(args.http, args.http_token_file)
        allowed: set[str] | None = None
        if args.allow or args.allow_file:
            allowed = {validate_peer_id(p, "--allow") for p in args.allow}
            if args.allow_file:
                allowed |= load_allow_file(args.allow_file)
            if not allowed:  # a master nobody can join, started without a word
                raise ValueError(
                    f"allow-list {args.allow_file} names no peer id (list one a line): "
                    "nobody could join"
                )
        secret = None
        if args.cluster_secret_file:
            secret = load_secret_file(args.cluster_secret_file)
        # Every setting checked: only now is the directory created (if new), and locked
        # before the secret is written there (the node owns the lock from then on).
        prepare_data_dir(data_dir)
        dir_lock = hold(data_dir, "master")
        try:
            new_files = NewFiles(data_dir, dir_lock.share())
            if secret is None and allowed is None:
                secret_path = data_dir / SECRET_FILE
                secret = (
                    load_secret_file(secret_path)
                    if secret_path.exists()
                    else create_secret_file(secret_path)
                )
            membership = Membership(
                allowed=frozenset(allowed) if allowed is not None else None, secret=secret
            )
        except BaseException:
            dir_lock.release()
            raise
        node = MasterNode(
            data_dir,
            membership,
            MasterNodeConfig(
                listen=[args.listen],
                planner=planner_cfg,
                policy=policy,
                peer_timeout=args.peer_timeout,
                snapshot_every=args.snapshot_every,
                member_log_bytes_per_s=args.member_log_rate,
                member_log_burst_bytes=args.member_log_burst,
                http=http,
            ),
            dir_lock=dir_lock,
        )
    except BaseException as exc:
        if new_files is not None:  # the key, secret or log this start made are removed
            new_files.done(refused=True)
        if isinstance(exc, LogInUseError):
            print(
                f"cluster master: {exc}: another master is probably running with --data-dir "
                f"{data_dir}; stop it first, or give this one another --data-dir",
                file=sys.stderr,
            )
            return 2
        refused = (
            ValueError,
            AddressError,
            IdentityError,
            MembershipConfigError,
            OSError,
            LogError,  # a damaged log: one line, not a traceback
        )
        if not isinstance(exc, refused):
            raise
        print(f"cluster master: {_flag_text(exc)}", file=sys.stderr)
        return 2
    serving = False
    # A start refused after the master began listening (the HTTP port taken, say) may have
    # indexed a worker's events already, acknowledged to it: then what it made is kept -- the
    # log, and the secret and key the worker joined with. (The planner's own events, an
    # epoch started, leave the nodes and their marks alone.)
    before = node.master.state

    def workers_were_heard() -> bool:
        now = node.master.state
        return (
            now.nodes is not before.nodes or now.last_event_by_node is not before.last_event_by_node
        )

    async def main() -> None:
        nonlocal serving
        async with anyio.create_task_group() as tg:
            started = await tg.start(node.run)
            serving = True  # from here on the log may hold what workers were told: kept
            if secret_path is not None:
                # Said only now: a start refused before this removes the secret it made.
                print(
                    f"cluster secret: {secret_path} (workers: --cluster-secret-file {secret_path})",
                    flush=True,
                )
            addr = next((a for a in started.addrs if "/127.0.0.1/" in a), started.addrs[0])
            write_run_file(data_dir / "master.addr", addr + "\n")
            print(f"master listening on {addr}", flush=True)
            print(f"node id {node.node_id}; log at index {node.master.last_idx}", flush=True)
            print(f"control socket {control.socket_path(data_dir)}", flush=True)
            if http is not None and started.http_port is not None:
                url = f"http://{http.host}:{started.http_port}/"
                write_run_file(data_dir / "http.url", url + "\n")
                print(f"dashboard {url}", flush=True)
            tg.start_soon(stop_on_signal, lambda _signal: node.stop())
            await node.master.wait_finished()
            tg.cancel_scope.cancel()

    status = 0
    try:
        anyio.run(main, backend="trio")
    except* (HttpApiConfigError, AddressError, control.SocketInUseError, RunFileError) as group:
        # A port is taken, another process serves this data directory, or master.addr
        # cannot be written (a full disk): one line.
        print(f"cluster master: {_flag_text(first_leaf(group))}", file=sys.stderr)
        status = 2
    except* OSError as group:
        # A commit the disk refused stops the master after one ERROR line saying so
        # (Master._fail_stop): nothing to add. Another I/O error: one line too.
        if node.master.failed_commit is None:
            print(f"cluster master: {first_leaf(group)}", file=sys.stderr)
        status = 2
    finally:
        try:
            node.close()
        finally:
            assert new_files is not None
            new_files.done(refused=not serving and not workers_were_heard())
    return status


class RunFileError(Exception):
    """A file that says where a started master is (master.addr, http.url) could not be
    written: the master stops (workers started with `--master <data-dir>/master.addr`
    would find no master, or an old one's address)."""


def write_run_file(path: Path, text: str) -> None:
    """`write_text_atomically`, its failure one line naming the file: "cannot write
    m/master.addr: No space left on device", not "[Errno 28] No space left on device"."""
    from cluster.shared.files import write_text_atomically

    try:
        write_text_atomically(path, text)
    except OSError as exc:
        raise RunFileError(f"cannot write {path}: {exc.strerror or exc}") from exc


class NewFiles:
    """What a start may create in the data directory -- the secret, the node key, the event
    log and its snapshots -- noted as it was before (under the directory's lock), so that a
    start refused before it serves (a port taken, a damaged key or log) removes what it
    created and never what was there before. It keeps a second handle on the lock (the node
    releases its own when it closes): nobody else creates files there until `done`.

    The directory itself and its `LOCK` stay: removing a lock file another process may have
    just opened could let two processes hold the directory at once."""

    def __init__(self, data_dir: Path, lock: DataDirLock) -> None:
        from cluster.net.identity import KEY_FILE
        from cluster.shared.store import LOG_DIR, SNAPSHOT_DIR

        self._lock = lock
        names = (SECRET_FILE, KEY_FILE, LOG_DIR, SNAPSHOT_DIR)
        self._new = [data_dir / n for n in names if not os.path.lexists(data_dir / n)]

    def done(self, *, refused: bool) -> None:
        """Release the lock; first, if the start was `refused`, remove what it created."""
        import shutil

        try:
            for path in self._new if refused else []:
                try:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink(missing_ok=True)
                except OSError as exc:
                    print(
                        f"cluster master: cannot remove {path}, created by this refused "
                        f"start: {exc.strerror or exc}",
                        file=sys.stderr,
                    )
        finally:
            self._lock.release()


def _flag_text(exc: BaseException) -> str:
    """An error as an operator reads it: the HTTP API's names `cluster master` flags here,
    where a program embedding it reads `HttpApiConfig` fields."""
    from cluster.master.http_api import HttpApiConfigError

    return exc.command_line if isinstance(exc, HttpApiConfigError) else str(exc)


def http_config(value: str, token_file: Path | None) -> HttpApiConfig | None:
    """`HOST:PORT` (or 'off') and an optional token file, validated."""
    from cluster.master.http_api import HttpApiConfig, check_config
    from cluster.shared.files import SECRET_FILE_LIMIT, InputFileError, read_input_file

    if value == "off":
        return None
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"--http {value!r}: expected HOST:PORT (e.g. 127.0.0.1:8470) or 'off'")
    token = None
    if token_file is not None:
        try:
            token = read_input_file(token_file, SECRET_FILE_LIMIT).decode("utf-8").strip()
        except InputFileError as exc:
            raise ValueError(f"--http-token-file {token_file}: {exc}") from None
        except UnicodeDecodeError:
            raise ValueError(f"--http-token-file {token_file}: not UTF-8 text") from None
    config = HttpApiConfig(host=host.strip("[]"), port=int(port_text), token=token)
    check_config(config)
    return config
