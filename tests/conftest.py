"""Shared pytest configuration: every async test runs on anyio's trio backend.

py-libp2p works only on trio, so the whole runtime (and every test) uses anyio on trio.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """Undo what an in-process `cluster master/worker` run does to the root logger.

    Those commands call `logging.basicConfig(stream=sys.stderr, force=True)`; in a test that
    stream is pytest's capture for that test alone, closed afterwards, and a handler left on it
    turns every later log call into a "--- Logging error ---" traceback. They also make
    py-libp2p's logger propagate and send `warnings.warn` to logging: undone too.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    libp2p = logging.getLogger("libp2p")
    libp2p_level, libp2p_propagate = libp2p.level, libp2p.propagate
    showwarning = warnings.showwarning
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    libp2p.setLevel(libp2p_level)
    libp2p.propagate = libp2p_propagate
    warnings.showwarning = showwarning
