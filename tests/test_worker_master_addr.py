"""`cluster worker --master`: a multiaddr, or a file holding one (relative or absolute path)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.commands.worker import read_master_addr

ADDR = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWQVvZ6L522EVVqN2cWHkH6Q7Zsn6pvu116iFBLUpwTr4G"


def test_a_multiaddr_is_taken_as_given() -> None:
    assert read_master_addr(ADDR) == ADDR


def test_an_absolute_file_path_is_read_not_taken_for_a_multiaddr(tmp_path: Path) -> None:
    path = tmp_path / "master.addr"
    path.write_text(ADDR + "\n", encoding="utf-8")
    assert path.is_absolute()
    assert read_master_addr(str(path)) == ADDR


def test_a_relative_file_path_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "master.addr").write_text(ADDR + "\nignored\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert read_master_addr("master.addr") == ADDR


def test_an_empty_or_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    empty = tmp_path / "empty.addr"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        read_master_addr(str(empty))
    with pytest.raises(ValueError, match="neither a multiaddr"):
        read_master_addr("no-such-file.addr")
