"""Embedding: a master and two workers in one program (examples/embedded_cluster.py).

The example is what docs/embedding.md shows; running it here keeps both true. It serves a
session from runners on both workers, then checks that each worker's replica equals the fold
of the master's log at the replica's index. `cluster replay` of the same log agrees.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from cluster import cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "embedded_cluster.py"


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("embedded_cluster", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_embedded_master_and_workers_agree_with_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = _load_example()
    assert example.main(["--data-dir", str(tmp_path), "--seconds", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 runners running" in out, out
    replicas = re.findall(r"^replica (\S+) at (\d+): ([0-9a-f]{64}) matches the log$", out, re.M)
    assert len(replicas) == 2 and len({node for node, _, _ in replicas}) == 2, out
    # The command-line replay of the same log reaches the same digest at each index.
    for _, idx, digest in replicas:
        assert cli.main(["replay", str(tmp_path / "master"), "--until", idx, "--digest"]) == 0
        assert capsys.readouterr().out.strip() == digest


def test_embedded_example_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    example = _load_example()
    with pytest.raises(SystemExit) as exc:
        example.main(["--seconds", "-1"])
    assert exc.value.code == 2
    assert "--seconds must be >= 0" in capsys.readouterr().err
