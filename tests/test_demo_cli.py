"""`cluster demo`'s own command line: its help, and the commands it prints for the operator."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from cluster import cli
from cluster.commands.demo import invoked_as


def _demo_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    demo = sub.choices["demo"]
    assert isinstance(demo, argparse.ArgumentParser)
    return demo


def test_every_demo_option_has_help() -> None:
    """`--plan-interval` showed in `cluster demo --help` with no text at all."""
    missing = [
        a.option_strings[0]
        for a in _demo_parser()._actions
        if a.option_strings and a.help in (None, "")
    ]
    assert missing == []


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "venv" / "bin" / "cluster"
    path.parent.mkdir(parents=True)
    path.write_text("#!/bin/sh\n")
    return path


def test_the_printed_command_is_cluster_only_when_that_is_what_path_runs(
    script: Path, tmp_path: Path
) -> None:
    """The demo printed `cluster status --url ...` to an operator who ran
    .venv/bin/cluster, with no `cluster` on PATH ("command not found")."""
    assert invoked_as(str(script), "/usr/bin/python3", None) == str(script)
    other = tmp_path / "other-cluster"
    other.write_text("#!/bin/sh\n")
    assert invoked_as(str(script), "/usr/bin/python3", str(other)) == str(script)
    assert invoked_as(str(script), "/usr/bin/python3", str(script)) == "cluster"
    link = tmp_path / "bin-cluster"
    os.symlink(script, link)
    assert invoked_as(str(script), "/usr/bin/python3", str(link)) == "cluster"


def test_the_printed_command_as_a_module_or_with_spaces(tmp_path: Path) -> None:
    main = tmp_path / "src" / "cluster" / "__main__.py"
    python = "/opt/py 3/bin/python"
    assert invoked_as(str(main), python, None) == "'/opt/py 3/bin/python' -m cluster"
    spaced = tmp_path / "my env" / "cluster"
    assert invoked_as(str(spaced), "/usr/bin/python3", None) == f"'{spaced}'"
    assert invoked_as("", "/usr/bin/python3", None) == "cluster"
