"""Helpers shared by the commands: logging (long-running ones and `cluster replay`), signals."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final, TextIO

import anyio

from cluster.shared.files import make_dirs_durably

if TYPE_CHECKING:
    from cluster.datadir import Role

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

#: `--peer-timeout` of `cluster master` and `cluster worker`: seconds a peer may stay silent
#: before its connection is given up. It must outlast a few of the 1 s keepalives both sides
#: send when idle, or an idle connection is dropped between two of them; a day is far longer
#: than any useful deadline (1e300 meant "never notice a dead peer").
PEER_TIMEOUT_S: Final = (3.0, 86400.0)


def check_seconds(flag: str, value: float, bounds: tuple[float, float]) -> None:
    """ValueError naming `flag` unless `value` lies in `bounds` (nan and inf never do)."""
    low, high = bounds
    if not low <= value <= high:  # nan fails both comparisons
        raise ValueError(f"{flag} must be {low:g}..{high:g} seconds, got {value}")


#: Every log line the commands print, ours and the libraries', has this one format.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: py-libp2p and the libraries it brings log connection churn at DEBUG and INFO: shown from
#: WARNING up whatever --log-level says (ours is what an operator reads). `LIBP2P_DEBUG` set
#: lets py-libp2p's own loggers follow the levels it names instead (docs/operations.md).
LIBRARY_LOGGERS = (
    "libp2p",
    "multiaddr",
    "quic",
    "http3",
    "zeroconf",
    "trio-websocket",
    "httpx",
    "httpcore",
    "urllib3",
)


#: py-libp2p's records of a failed outbound dial, as (logger, message template): it logs each
#: at ERROR, once per attempt and four attempts per dial, so a worker whose master is down,
#: or that names the wrong peer id, printed four ERROR lines every retry beside its own INFO
#: line "master at ... unreachable (<why>); retrying in N s", which already says it. These
#: are demoted to DEBUG (shown only when `LIBP2P_DEBUG` sets that logger to DEBUG); every
#: other py-libp2p record at WARNING or above still shows. Matched on the template, not the
#: text: a message py-libp2p words differently in another release shows again, never hides.
_MULTISELECT_CLIENT: Final = "libp2p.protocol_muxer.multiselect_client"
LIBP2P_DIAL_FAILURES: Final = frozenset(
    {
        ("libp2p.transport.tcp.tcp", "Failed to open TCP stream: %s"),
        ("libp2p.network.swarm", "failed to upgrade security for peer %s: %s"),
        # A port that is not libp2p's (the master's HTTP port, say) fails the first
        # protocol negotiation: the worker's retry line says what answered instead.
        (_MULTISELECT_CLIENT, "MultiselectClient handshake: read failed: %s"),
        (_MULTISELECT_CLIENT, "MultiselectClient handshake: write failed: %s"),
        (_MULTISELECT_CLIENT, "MultiselectClient: invalid handshake %r"),
    }
)

#: py-libp2p records logged at ERROR for what is churn, not a fault of this process: shown,
#: at WARNING. An inbound connection whose peer completed the handshake but not the muxer
#: negotiation -- a worker killed or timed out while connecting -- logged "fail to upgrade
#: mux for peer" at ERROR in the master's log, where nothing had failed and nothing was lost
#: (the worker dials again and resends from its outbox).
LIBP2P_CHURN: Final = frozenset({("libp2p.network.swarm", "fail to upgrade mux for peer %s")})


class _DemoteDialFailures(logging.Filter):
    """Turns py-libp2p's dial-failure records (`LIBP2P_DIAL_FAILURES`) into DEBUG records,
    dropped unless their logger is enabled for DEBUG, and its churn records (`LIBP2P_CHURN`)
    into WARNING records. Runs before `_LibraryFloor`."""

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg)
        if key in LIBP2P_CHURN and record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            return True
        if key not in LIBP2P_DIAL_FAILURES:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


class _LibraryFloor(logging.Filter):
    """Drops records below `level` from the loggers named (and their children).

    A filter on the handler, not only a level on the logger: py-libp2p sets levels on some of
    its own loggers (`libp2p.network.auto_connector` at INFO), which a parent's level cannot
    override.
    """

    def __init__(self, names: tuple[str, ...], level: int) -> None:
        super().__init__()
        self._names = names
        self._prefixes = tuple(f"{name}." for name in names)
        self._level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self._level:
            return True
        name = record.name
        return not (name in self._names or name.startswith(self._prefixes))


def setup_logging(level: str) -> None:
    """One handler on stderr, one format for every logger; py-libp2p's chatter kept out.

    Call it AFTER importing libp2p: on import it configures its own loggers (no propagation,
    so its warnings reached stderr through logging's last-resort handler as bare messages;
    with `LIBP2P_DEBUG`, its own handler and format). Here they are made to propagate to
    our handler like every other logger, and `warnings.warn` is logged as one line too.
    """
    numeric = getattr(logging, level)
    library_floor = max(logging.WARNING, numeric)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    libp2p_debug = bool(os.environ.get("LIBP2P_DEBUG", "").strip())
    floored = tuple(n for n in LIBRARY_LOGGERS if not (libp2p_debug and n == "libp2p"))
    handler.addFilter(_DemoteDialFailures())
    handler.addFilter(_LibraryFloor(floored, library_floor))
    logging.basicConfig(level=numeric, handlers=[handler], force=True)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and (name == "libp2p" or name.startswith("libp2p.")):
            for own in logger.handlers[:]:
                logger.removeHandler(own)
            logger.propagate = True
    if not libp2p_debug:
        logging.getLogger("libp2p").setLevel(library_floor)
    warnings.showwarning = _log_warning


class _CommandLineFormatter(logging.Formatter):
    """`cluster replay: warning: <message>`: the prefix a command's own error lines carry,
    the level in lower case, the record on one line (a line break shown as `\\n`)."""

    def __init__(self, command: str) -> None:
        super().__init__()
        self._command = command

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)  # the message, and a traceback if the record has one
        text = text.replace("\r", "\\r").replace("\n", "\\n")
        return f"cluster {self._command}: {record.levelname.lower()}: {text}"


def setup_command_logging(command: str) -> None:
    """For a command that prints its results (`cluster replay`): what the code it runs logs
    at WARNING and up (a torn log tail ignored, an unusable snapshot skipped) comes out on
    stderr as `cluster <command>: warning: ...`, one line each, like the command's own error
    lines; stdout keeps only its output. Without it such records reached stderr through
    logging's last-resort handler as bare messages."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CommandLineFormatter(command))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    warnings.showwarning = _log_warning


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """`warnings.warn` as one log line (logging.captureWarnings adds the source line too)."""
    logging.getLogger("py.warnings").warning(
        "%s: %s (%s:%d)", category.__name__, message, filename, lineno
    )


async def stop_on_signal(stop: Callable[[str], None]) -> None:
    """Call `stop(name)` on the first SIGINT or SIGTERM, with the signal's name (clean
    shutdown, exit 0)."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            logging.getLogger("cluster").info("received %s: stopping", name)
            stop(name)
            return


def data_dir_arg(text: str) -> Path:
    """`--data-dir` of `cluster master` / `cluster worker`: `""` (an unset variable in a
    script) became the current directory, which the process then filled with its files."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "must name a directory (an empty one is the current directory: give . to mean it)"
        )
    return Path(text)


def check_data_dir(path: Path, role: Role) -> None:
    """ValueError unless `--data-dir` can be this role's: not a file, not the other role's
    directory (`cluster.datadir`). Creates nothing: a command checks this first, then its
    other settings, and only then creates the directory (`prepare_data_dir`), so a refused
    setting does not leave a new empty directory behind."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--data-dir {path} is a file, not a directory")
    from cluster.datadir import check_role

    check_role(path, role, warn=False)  # MasterNode / Worker check again, and say it


def prepare_data_dir(path: Path) -> None:
    """Create `--data-dir` if needed; a clear ValueError if it cannot be one."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--data-dir {path} is a file, not a directory")
    try:
        make_dirs_durably(path)
    except OSError as exc:
        raise ValueError(f"--data-dir {path}: cannot create it: {exc.strerror or exc}") from None
