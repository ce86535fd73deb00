"""Helpers shared by the long-running commands (master, worker, demo): logging and signals."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import anyio

from cluster.shared.files import make_dirs_durably

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def setup_logging(level: str) -> None:
    """Configure logging; call it AFTER importing libp2p, which resets loggers on import."""
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # libp2p logs connection churn at INFO; ours is what an operator reads.
    logging.getLogger("libp2p").setLevel(max(logging.WARNING, getattr(logging, level)))


async def stop_on_signal(stop: Callable[[], None]) -> None:
    """Call `stop()` on the first SIGINT or SIGTERM (clean shutdown, exit 0)."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            logging.getLogger("cluster").info("received %s: stopping", signal.Signals(signum).name)
            stop()
            return


def prepare_data_dir(path: Path) -> None:
    """Create `--data-dir` if needed; a clear ValueError if it cannot be one."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--data-dir {path} is a file, not a directory")
    try:
        make_dirs_durably(path)
    except OSError as exc:
        raise ValueError(f"--data-dir {path}: cannot create it: {exc.strerror or exc}") from None
