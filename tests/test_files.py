"""Durable directories: every directory that will hold acknowledged data is created with its
entry on disk (the parent of each new level fsynced), so a power loss cannot take it back."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from cluster.commands._process import prepare_data_dir
from cluster.net.identity import load_or_create_seed
from cluster.net.membership import create_secret_file
from cluster.shared.eventlog import EventLog
from cluster.shared.files import make_dirs_durably
from cluster.shared.snapshots import SnapshotStore
from cluster.worker.outbox import Outbox


def _spy_syncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(device, inode) of every file and directory fsynced or fdatasynced from now on."""
    synced: list[tuple[int, int]] = []
    for name in ("fsync", "fdatasync"):
        real: Callable[[int], None] = getattr(os, name)

        def spy(fd: int, real: Callable[[int], None] = real) -> None:
            st = os.fstat(fd)
            synced.append((st.st_dev, st.st_ino))
            real(fd)

        monkeypatch.setattr(os, name, spy)
    return synced


def _ino(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _open_log(d: Path) -> None:
    EventLog.open(d).close()


def _save_snapshot(d: Path) -> None:
    SnapshotStore(d).save(1, b"state")


def _open_outbox(d: Path) -> None:
    Outbox.open(d).close()


def _create_seed(d: Path) -> None:
    load_or_create_seed(d)


@pytest.mark.parametrize(
    "create",
    [_open_log, _save_snapshot, _open_outbox, _create_seed, prepare_data_dir, make_dirs_durably],
)
def test_each_new_durable_directory_level_has_its_parent_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, create: Callable[[Path], None]
) -> None:
    synced = _spy_syncs(monkeypatch)
    target = tmp_path / "data" / "inner"  # two levels to create, as for <new data dir>/log
    create(target)
    assert target.is_dir()
    # Each new entry lives in its parent: the parent's fsync is what puts it on disk.
    for parent in (tmp_path, tmp_path / "data"):
        assert _ino(parent) in synced, f"{parent} was not fsynced after its new entry"


@pytest.mark.parametrize(
    "create",
    [_open_log, _save_snapshot, _open_outbox, _create_seed, prepare_data_dir, make_dirs_durably],
)
def test_each_durable_directory_found_existing_has_its_parents_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, create: Callable[[Path], None]
) -> None:
    """As an earlier start killed between its mkdir and its parent's fsync leaves them."""
    target = tmp_path / "data" / "inner"
    target.mkdir(parents=True)
    synced = _spy_syncs(monkeypatch)
    create(target)
    for parent in (tmp_path, tmp_path / "data"):
        assert _ino(parent) in synced, f"{parent} was not fsynced for its existing entry"


def test_an_existing_directory_has_its_parent_chain_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An earlier call killed (kill -9) between its mkdir and its parent's fsync left the
    directory there but its entry maybe not on disk: a call that finds it syncs it again,
    and the levels above it (which the same call may have created)."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    synced = _spy_syncs(monkeypatch)
    make_dirs_durably(tmp_path / "a" / "b")
    assert _ino(tmp_path / "a") in synced and _ino(tmp_path) in synced
    synced.clear()
    make_dirs_durably(tmp_path / "a" / "b" / "c")  # a new level and the chain above it
    assert synced[0] == _ino(tmp_path / "a" / "b")
    assert _ino(tmp_path / "a") in synced and _ino(tmp_path) in synced


def test_the_chain_stops_below_a_directory_this_process_cannot_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No level in it can have been created by us: what is above it is not ours to sync
    (and a directory we may not write can be one we may not open either)."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path and real_access(p, mode))
    synced = _spy_syncs(monkeypatch)
    make_dirs_durably(tmp_path / "a" / "b")
    assert synced == [_ino(tmp_path / "a")]


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EROFS])
def test_a_level_found_existing_on_a_filesystem_that_cannot_sync_it_is_no_error(
    code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above what the call creates, a filesystem that cannot sync a directory (EINVAL on some
    network and FUSE filesystems) or is read-only ends the chain: nothing there can be made
    durable, and a worker that started there before must still start. A level this call
    creates still needs its sync: there the error stands."""
    (tmp_path / "a").mkdir()
    real = os.fsync

    def refuse_above(fd: int) -> None:
        if os.fstat(fd).st_ino == _ino(tmp_path)[1]:
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(os, "fsync", refuse_above)
    make_dirs_durably(tmp_path / "a" / "b")  # syncs a (created b), then tmp_path: refused
    assert (tmp_path / "a" / "b").is_dir()
    with pytest.raises(OSError):
        make_dirs_durably(tmp_path / "c")  # c is new: its entry in tmp_path must be synced


def test_a_file_in_the_way_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(FileExistsError):
        make_dirs_durably(tmp_path / "f")
    with pytest.raises(FileExistsError):
        make_dirs_durably(tmp_path / "f" / "sub")


def test_a_relative_path_is_created_under_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    synced = _spy_syncs(monkeypatch)
    make_dirs_durably(Path("rel"))
    assert (tmp_path / "rel").is_dir() and synced[0] == _ino(tmp_path)


def test_a_new_secret_file_has_its_directory_entry_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers are handed this secret: after a power loss the file must still be there."""
    synced = _spy_syncs(monkeypatch)
    path = tmp_path / "cluster.secret"
    create_secret_file(path)
    assert _ino(path) in synced and _ino(tmp_path) in synced
