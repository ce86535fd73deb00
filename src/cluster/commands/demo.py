"""`cluster demo`: a master and N workers as separate processes on loopback.

Everything lives in one data directory (a fresh temporary one unless `--data-dir` is given):
`master/` (log, snapshots, master.addr, digest.json), `worker-K/` (node.key, outbox,
digest.json), `cluster.secret`, and each process's output in `logs/`. Ctrl-C or SIGTERM (or
`--duration`) stops the children, the master first and then the workers (SIGTERM, then
SIGKILL after a grace period); exit code 0.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

GRACE_S = 10.0
MASTER_START_TIMEOUT_S = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=3, help="number of workers (default 3)")
    parser.add_argument("--data-dir", type=Path, help="where to keep everything (default: temp)")
    parser.add_argument(
        "--duration", type=float, metavar="SECONDS", help="stop by itself after this long"
    )
    parser.add_argument(
        "--plan-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between the master's planning cycles (default 1)",
    )
    parser.add_argument(
        "--epoch-length", default="1m", metavar="DURATION", help="epoch length (default 1m)"
    )
    parser.add_argument(
        "--http",
        default=None,
        metavar="HOST:PORT",
        help="dashboard and HTTP API of the master (default 127.0.0.1:8470, or any free port "
        "if 8470 is taken; port 0: any free)",
    )
    parser.add_argument(
        "--session-slots",
        type=int,
        default=2,
        metavar="N",
        help="create a demo session of N slots once the cluster is up (0: none)",
    )


def _spawn(args: list[str], log_path: Path) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    out = open(log_path, "ab")  # noqa: SIM115 -- closed by the caller after the child exits
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster", *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        # Own process group: a Ctrl-C on the terminal reaches only us; we stop the children.
        start_new_session=True,
    )
    return proc, out


def _stop(children: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]]) -> None:
    # The master first, then the workers: a worker stopped first says goodbye, and the
    # master disconnects it after its stale cycles -- outside a maintenance window an
    # unexcused disconnect that forfeits the epoch, each one a WARNING. A whole cluster
    # stopping is one act, and nothing is lost this way: the workers' last events (final
    # work, STOPPED) stay in their outboxes and reach the master when the demo runs again
    # on the same --data-dir.
    workers = [child for child in children if child[0] != "master"]
    masters = [child for child in children if child[0] == "master"]
    for group in (masters, workers):
        for _, proc, _ in group:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        for name, proc, out in group:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(
                    f"cluster demo: {name} did not stop within {GRACE_S:g} s: killing it",
                    file=sys.stderr,
                    flush=True,
                )
                proc.kill()
                proc.wait()
            out.close()


def _report_exit(name: str, code: int, logs: Path) -> bool:
    """Say on stderr that a child exited while the demo ran; True if it was the master
    (the demo stops: a cluster outlives a worker, not its master)."""
    if name == "master":
        print(f"cluster demo: the master exited with code {code}; see {logs}", file=sys.stderr)
        return True
    # The master notices and re-places its slots.
    print(
        f"cluster demo: {name} exited with code {code}; the cluster carries on without it",
        file=sys.stderr,
        flush=True,
    )
    return False


def _master_option_problem(args: argparse.Namespace) -> str:
    """What is wrong with the options the demo passes on to its master ("" if nothing)."""
    from cluster.commands.master import http_config, planner_config
    from cluster.master.config import PlannerConfig

    given = argparse.Namespace(
        plan_interval=args.plan_interval, epoch_length=args.epoch_length, stale_cycles=None
    )
    try:
        planner_config(given, PlannerConfig())
        if args.http is not None:
            http_config(args.http, None)
    except ValueError as exc:
        return str(exc)
    return ""


def invoked_as(argv0: str, executable: str, on_path: str | None) -> str:
    """How to run `cluster` again, for the commands the demo prints: `cluster` when that
    name on PATH (`on_path`, as `shutil.which` finds it) is the script running now,
    `<python> -m cluster` when run as a module, else the script's path as invoked (a
    virtual environment's bin/cluster, not on PATH: "cluster: command not found")."""
    if not argv0:  # embedded, or `python -c`: nothing better to say
        return "cluster"
    path = Path(argv0)
    if path.name == "__main__.py":  # `python -m cluster`
        return f"{shlex.quote(executable)} -m cluster"
    if on_path is not None:
        try:
            if Path(on_path).samefile(path):
                return "cluster"
        except OSError:
            pass
    return shlex.quote(argv0)


def _http_default() -> str:
    """127.0.0.1:8470 (what `cluster status` asks by default) unless something holds it."""
    import socket

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 8470))
        except OSError:
            return "127.0.0.1:0"
    return "127.0.0.1:8470"


def _demo_session(master_dir: Path, slots: int) -> str:
    """Ask the master for a small session (through its control socket), once."""
    from cluster.control import ControlError, SessionCreate, SessionList, call_sync
    from cluster.shared.humanize import plural

    try:
        listed = call_sync(master_dir, SessionList(), timeout=10)
        if listed.ok and listed.data:
            n = len(listed.data)
            return f"{plural(n, 'session')} already {'exists' if n == 1 else 'exist'}"
        reply = call_sync(
            master_dir, SessionCreate(slots=slots, memory_per_slot_mb=512, name="demo"), timeout=10
        )
    except ControlError as exc:
        return f"not created: {exc}"
    return reply.message


def run(args: argparse.Namespace) -> int:
    if args.workers < 0 or args.workers > 64:
        print("cluster demo: --workers must be between 0 and 64", file=sys.stderr)
        return 2
    if args.session_slots < 0:
        print("cluster demo: --session-slots must be >= 0 (0: no demo session)", file=sys.stderr)
        return 2
    if args.duration is not None and not args.duration > 0:
        print("cluster demo: --duration must be > 0", file=sys.stderr)
        return 2
    problem = _master_option_problem(args)
    if problem:  # checked here, with the master's own rules: not "master did not start"
        print(f"cluster demo: {problem}", file=sys.stderr)
        return 2
    root: Path = args.data_dir or Path(tempfile.mkdtemp(prefix="cluster-demo-"))
    logs = root / "logs"
    try:
        logs.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"cluster demo: cannot create {logs}: {exc.strerror}", file=sys.stderr)
        return 2
    master_dir = root / "master"
    secret_file = root / "cluster.secret"
    if not secret_file.exists():
        from cluster.net.membership import create_secret_file

        create_secret_file(secret_file)

    stop_now = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop_now
        stop_now = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    children: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []
    try:
        addr_file = master_dir / "master.addr"
        addr_file.unlink(missing_ok=True)
        master_args = ["master", "--data-dir", str(master_dir)]
        master_args += ["--cluster-secret-file", str(secret_file)]
        master_args += ["--plan-interval", str(args.plan_interval)]
        master_args += ["--epoch-length", args.epoch_length, "--http", args.http or _http_default()]
        proc, out = _spawn(master_args, logs / "master.log")
        children.append(("master", proc, out))
        deadline = time.monotonic() + MASTER_START_TIMEOUT_S
        while not addr_file.exists():
            if stop_now:  # Ctrl-C before the master was up: not the master's failure
                print("cluster demo: interrupted before the cluster was up", file=sys.stderr)
                return 130
            if proc.poll() is not None or time.monotonic() > deadline:
                how = (
                    f"it exited with code {proc.returncode}"
                    if proc.returncode is not None
                    else f"not up within {MASTER_START_TIMEOUT_S:g} s"
                )
                print(
                    f"cluster demo: master did not start ({how}); see {logs / 'master.log'}",
                    file=sys.stderr,
                )
                return 1
            time.sleep(0.05)
        addr = addr_file.read_text(encoding="utf-8").strip()
        for k in range(1, args.workers + 1):
            wdir = root / f"worker-{k}"
            # The file, not its text: a worker reads it again before every dial, so it
            # follows a master restarted on another port.
            wargs = ["worker", "--data-dir", str(wdir), "--master", str(addr_file)]
            wargs += ["--cluster-secret-file", str(secret_file), "--slots", "2"]
            # Liveness is event flow: a worker speaks at least once per plan cycle.
            wargs += ["--heartbeat-interval", str(max(0.01, min(1.0, args.plan_interval)))]
            proc, out = _spawn(wargs, logs / f"worker-{k}.log")
            children.append((f"worker-{k}", proc, out))

        print(
            f"cluster demo: master + {args.workers} workers running (pids "
            + ", ".join(f"{n}={p.pid}" for n, p, _ in children)
            + ")"
        )
        cluster = invoked_as(sys.argv[0], sys.executable, shutil.which("cluster"))
        print(f"  master address : {addr}")
        print(f"  data directory : {root}")
        print(f"  master data    : {master_dir}  (log/, snapshots/, digest.json)")
        print(f"  worker data    : {root}/worker-N  (node.key, outbox/, digest.json)")
        print(f"  process logs   : {logs}")
        url_file = master_dir / "http.url"
        while not url_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if url_file.exists():
            url = url_file.read_text(encoding="utf-8").strip()
            print(f"  dashboard      : {url}")
            print(f"  status         : {cluster} status --url {url}")
        if args.session_slots > 0:
            print(f"  demo session   : {_demo_session(master_dir, args.session_slots)}")
        print(f"  replay the log : {cluster} replay {master_dir}")
        print(
            "  stop           : Ctrl-C"
            + (f" (or after {args.duration:g} s)" if args.duration else "")
        )
        sys.stdout.flush()
        end = time.monotonic() + args.duration if args.duration else None
        status = 0
        reported: set[str] = set()
        while not stop_now and (end is None or time.monotonic() < end):
            for name, proc, _ in children:
                if proc.poll() is None or name in reported:
                    continue
                reported.add(name)
                if _report_exit(name, proc.returncode, logs):
                    stop_now = True
                    status = 1
            time.sleep(0.1)
        return status
    finally:
        _stop(children)
        for s, handler in old.items():
            signal.signal(s, handler)
        print(f"cluster demo: stopped; data kept in {root}", flush=True)
