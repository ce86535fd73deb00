"""`<data-dir>/digest.json`: where a running process says which state it holds.

Master and workers rewrite it atomically (write, rename) when their state advanced, so
tests, benchmarks and operators can compare replicas without talking to the processes.
`cluster.digest_writer.DigestFileWriter` keeps it current for a running process (a shell
concern: a thread and a clock, kept out of this package, whose core reads neither).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

from cluster.shared.codec import state_digest
from cluster.shared.files import write_text_atomically
from cluster.shared.state import State

DIGEST_FILE: Final = "digest.json"


def write_digest_file(data_dir: Path, state: State, **extra: object) -> None:
    record = {"idx": state.last_applied, "digest": state_digest(state), **extra}
    write_text_atomically(data_dir / DIGEST_FILE, json.dumps(record, sort_keys=True) + "\n")


def read_digest_file(data_dir: Path) -> dict[str, object] | None:
    """The last record written, or None when there is none (yet)."""
    try:
        data = json.loads((data_dir / DIGEST_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
