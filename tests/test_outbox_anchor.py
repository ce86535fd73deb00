"""A node that kept its key and lost its outbox: the events it emits before the master's first
welcome are renumbered above what the master holds, not dropped as already held.

A new outbox numbers from 1. The welcome says the master holds this node's events up to seq
K, and `skip_to(K)` took every record at or below K for one of those: a self-test result,
runner states or work emitted while the worker was connecting were acknowledged without ever
being sent (the master kept a node that never reported its self-test, so never placed it).
"""

from __future__ import annotations

import logging
from contextlib import closing
from pathlib import Path

import msgspec
import pytest

from cluster.shared.events import Event, WorkReported
from cluster.worker.outbox import Outbox

A = "12D3KooWD6FXdxPeu8Y7TL4snPwAnK2Pc7BuReewmryJYjmiqGSX"


_decode = msgspec.msgpack.Decoder(Event).decode


def _event(n: int) -> WorkReported:
    return WorkReported(devshard_id=f"ds-{n}", node_id=A, units=n, epoch=1)


def _pending(box: Outbox) -> list[tuple[int, Event]]:
    return [(seq, _decode(payload)) for seq, payload in box.pending_after(0, 100)]


def test_a_new_outbox_renumbers_what_it_holds_above_the_masters_seq(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with closing(Outbox.open(tmp_path / "outbox")) as box:
        assert [box.append(_event(n)) for n in (1, 2, 3)] == [1, 2, 3]
        with caplog.at_level(logging.WARNING, logger="cluster.worker.outbox"):
            box.skip_to(40)  # the master holds this node's events up to seq 40
        assert _pending(box) == [(41, _event(1)), (42, _event(2)), (43, _event(3))]
        assert box.append(_event(4)) == 44
        assert "renumbered from seq 41, not dropped" in caplog.text
    # On disk as renumbered, and anchored: a later welcome acknowledges as usual.
    with closing(Outbox.open(tmp_path / "outbox")) as box:
        assert [seq for seq, _ in _pending(box)] == [41, 42, 43, 44]
        box.skip_to(42)
        assert _pending(box) == [(43, _event(3)), (44, _event(4))]


def test_a_restart_before_the_first_welcome_still_renumbers(tmp_path: Path) -> None:
    with closing(Outbox.open(tmp_path / "outbox")) as box:
        box.append(_event(1))
    with closing(Outbox.open(tmp_path / "outbox")) as box:  # killed or stopped before connecting
        box.append(_event(2))
        box.skip_to(7)
        assert _pending(box) == [(8, _event(1)), (9, _event(2))]


def test_an_anchored_outbox_drops_what_the_master_holds(tmp_path: Path) -> None:
    """After its first welcome an outbox's seqs are the master's: a record at or below the
    welcome's seq was sent and is held there (its ack was lost), so it is dropped, not sent
    again under a new seq (that would log the event twice)."""
    with closing(Outbox.open(tmp_path / "outbox")) as box:
        box.skip_to(0)  # a new node: nothing to renumber, and now anchored
        for n in (1, 2, 3):
            box.append(_event(n))
    with closing(Outbox.open(tmp_path / "outbox")) as box:
        box.skip_to(2)  # the master got 1 and 2; the acks never arrived
        assert _pending(box) == [(3, _event(3))]


def test_an_outbox_from_before_the_marker_counts_as_anchored(tmp_path: Path) -> None:
    with closing(Outbox.open(tmp_path / "outbox")) as box:
        box.append(_event(1))
        box.append(_event(2))
    (tmp_path / "outbox" / "unanchored").unlink()  # as an older version left it
    with closing(Outbox.open(tmp_path / "outbox")) as box:
        box.skip_to(1)
        assert _pending(box) == [(2, _event(2))]
