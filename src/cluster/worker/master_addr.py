"""Where a worker finds its master: a fixed multiaddr, or a file (or callable) read again
before every dial.

A master restarted without `--listen` listens on a new port and rewrites its `master.addr`;
a worker that read that file once at start retried the old port forever. Given the file, the
worker reads it before each dial and follows the master to its new address.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.net import host as nethost
from cluster.shared.files import ADDR_FILE_LIMIT, InputFileError, read_input_file

log = logging.getLogger(__name__)

#: What `Worker` and `WorkerNode` take for the master's address: a full multiaddr (fixed),
#: the path of a file whose first line is one, or a callable returning one.
MasterAddrSource = str | Path | Callable[[], str]


class MasterAddrFileError(ValueError):
    """The master address file cannot be read, or holds nothing."""


def read_addr_file(path: Path) -> str:
    """The first line of `path`; MasterAddrFileError naming the file when there is none.
    Read bounded (`read_input_file`): a named pipe or a device given as `--master` would
    block the worker or fill its memory, at start and before every dial."""
    try:
        text = read_input_file(path, ADDR_FILE_LIMIT).decode("utf-8").strip()
    except InputFileError as exc:
        raise MasterAddrFileError(f"cannot read {path}: {exc}") from None
    except UnicodeError:
        raise MasterAddrFileError(f"{path} is not UTF-8 text") from None
    if not text:
        raise MasterAddrFileError(f"{path} is empty")
    return text.splitlines()[0]


class MasterAddr:
    """The master's multiaddr, kept current from its source.

    The first reading happens here and must succeed (AddressError; for a file,
    MasterAddrFileError naming the file, whatever is wrong with it). `current()`, called
    before each dial, reads the source again: a changed address is logged at INFO; an
    unreadable file, an empty one or a text that is not a full multiaddr keeps the last
    address and is logged once (until the source reads well again)."""

    def __init__(self, source: MasterAddrSource) -> None:
        self._read: Callable[[], str] | None
        if isinstance(source, str):
            self._read, self.where = None, ""
        elif isinstance(source, Path):
            path = source
            self._read, self.where = (lambda: read_addr_file(path)), str(path)
        else:
            self._read, self.where = source, getattr(source, "__name__", repr(source))
        self._text = source if isinstance(source, str) else self._read_now()
        try:
            self.addr: Any = nethost.parse_multiaddr(self._text, need_peer=True)
        except nethost.AddressError as exc:
            if not isinstance(source, Path):
                raise
            # "'x' is not a valid multiaddr" alone does not say where the x came from.
            raise MasterAddrFileError(f"{source}: {exc}") from None
        self._complaint = ""

    def _read_now(self) -> str:
        assert self._read is not None
        return self._read().strip()

    def current(self) -> Any:
        """The address to dial now (a multiaddr); reads the source again if it has one."""
        if self._read is None:
            return self.addr
        try:
            text = self._read_now()
            addr = nethost.parse_multiaddr(text, need_peer=True)
        except Exception as exc:  # a callable's own error, too: the worker keeps dialling
            complaint = str(exc) or type(exc).__name__
            if complaint != self._complaint:
                self._complaint = complaint
                log.warning(
                    "master address from %s unusable (%s); still dialling %s",
                    self.where,
                    complaint,
                    self._text,
                )
            return self.addr
        self._complaint = ""
        if text != self._text:
            log.info("master address changed (from %s): %s, was %s", self.where, text, self._text)
            self._text, self.addr = text, addr
        return self.addr
