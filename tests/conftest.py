"""Shared pytest configuration: every async test runs on anyio's trio backend.

py-libp2p works only on trio, so the whole runtime (and every test) uses anyio on trio.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "trio"
