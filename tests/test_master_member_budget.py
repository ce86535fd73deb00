"""A member's log budget: one member cannot fill the master's disk (fake clocks only).

A member sending compressed frames that inflate to 4 MiB of runner reports about a runner
it does not hold wrote ~75 MB/s of log (nothing checked how much one member has logged):
a 64 GB disk full in ~15 minutes, then the master fail-stopped for everyone.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest
from test_master_net_limits import MEMBER, _batches, _fs, _inflated, _master
from trio.testing import MockClock, wait_all_tasks_blocked

from cluster.master.member_budget import MemberBudget
from cluster.net.identity import key_pair_from_seed, peer_id_of
from cluster.net.protocol import Pong

HONEST = peer_id_of(key_pair_from_seed(b"\x09" * 32))


def test_the_budget_refills_at_its_rate_up_to_its_burst() -> None:
    b = MemberBudget(rate=100, burst=1000)
    assert b.wait_s("p", 0.0) == (0.0, False)
    b.charge("p", 900, 0.0)
    assert b.wait_s("p", 0.0) == (0.0, False)  # within the burst: no wait
    b.charge("p", 300, 0.0)  # 200 in debt
    assert b.wait_s("p", 0.0) == (2.0, True)  # a new episode
    assert b.wait_s("p", 1.0) == (1.0, False)  # the same one
    assert b.wait_s("q", 1.0) == (0.0, False)  # per peer
    assert b.wait_s("p", 2.0) == (0.0, False)
    b.charge("p", 100, 2.0)
    assert b.wait_s("p", 2.0) == (1.0, False)  # not refilled to full: same episode
    assert b.throttled("p")
    assert b.wait_s("p", 13.0) == (0.0, False)  # full again: the episode is over
    assert not b.throttled("p")
    b.charge("p", 1100, 13.0)
    assert b.wait_s("p", 13.0) == (1.0, True)
    b.charge("p", 0, 5.0)  # a clock read late takes nothing back
    assert b.wait_s("p", 13.0) == (1.0, False)


@pytest.mark.parametrize("rate, burst", [(0, 1), (1, 0), (-1, 1)])
def test_the_budget_refuses_a_bad_setting(rate: int, burst: int) -> None:
    with pytest.raises(ValueError, match="member log budget"):
        MemberBudget(rate, burst)


def test_a_flooding_member_is_slowed_while_an_honest_member_is_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Over its budget a member's submit stream reads no further frame until the budget
    refills: what it sent before is indexed and acknowledged, nothing is refused, another
    member is served at once, and the master says so once (WARNING naming the peer)."""
    flood = _batches(MEMBER, 10, 100)
    frame = _inflated(flood[0])
    clock = MockClock()

    async def main() -> None:
        async with _master(
            tmp_path,
            peer_timeout=600.0,
            member_log_bytes_per_s=frame,  # a frame a second
            member_log_burst_bytes=frame * 5 // 2,  # 2.5 frames: the 3rd goes into debt
        ) as master:
            master._members |= {MEMBER, HONEST}
            fs, raw = _fs(MEMBER, b"".join(flood))
            async with anyio.create_task_group() as tg:
                tg.start_soon(master._indexer)
                tg.start_soon(master._serve_submit, fs)
                await wait_all_tasks_blocked()
                assert master.last_idx == 300, "the flooding member was not slowed"
                assert master.stats["member_throttled"] == 1

                honest_fs, _ = _fs(HONEST, _batches(HONEST, 1, 100)[0])
                tg.start_soon(master._serve_submit, honest_fs)
                await wait_all_tasks_blocked()
                assert master.last_idx == 400  # served without waiting for the flooder
                assert master.state.last_seq(HONEST) == 100

                clock.jump(0.6)  # the debt (half a frame) is repaid: one more frame
                await wait_all_tasks_blocked()
                assert master.last_idx == 500
                clock.jump(0.5)  # 0.9 frame in debt again: not yet
                await wait_all_tasks_blocked()
                assert master.last_idx == 500
                clock.jump(0.5)
                await wait_all_tasks_blocked()
                assert master.last_idx == 600
                assert master.state.last_seq(MEMBER) == 500
                assert not any(r for r in raw.replies() if type(r).__name__ == "ErrorMsg")
                tg.cancel_scope.cancel()
            assert master.stats["member_throttled"] == 1  # one episode
            assert master.metrics().counters["member_throttled"] == 1

    with caplog.at_level(logging.WARNING, logger="cluster.master.server"):
        anyio.run(main, backend="trio", backend_options={"clock": clock})
    warned = [r.getMessage() for r in caplog.records if "log budget" in r.getMessage()]
    assert len(warned) == 1 and MEMBER in warned[0], warned


def test_a_long_wait_keeps_the_worker_from_taking_the_master_for_hung(tmp_path: Path) -> None:
    """A worker drops a submit stream silent for its peer timeout: while its member waits
    longer than `keepalive`, the master sends it a Pong each `keepalive`."""
    flood = _batches(MEMBER, 3, 100)
    frame = _inflated(flood[0])
    clock = MockClock()

    async def main() -> None:
        async with _master(
            tmp_path,
            peer_timeout=600.0,
            member_log_bytes_per_s=frame // 10,  # a frame in 10 s
            member_log_burst_bytes=frame,
        ) as master:
            master._members |= {MEMBER}
            fs, raw = _fs(MEMBER, b"".join(flood))
            async with anyio.create_task_group() as tg:
                tg.start_soon(master._indexer)
                tg.start_soon(master._serve_submit, fs)
                await wait_all_tasks_blocked()
                assert master.last_idx == 200
                for _ in range(5):
                    clock.jump(1.0)
                    await wait_all_tasks_blocked()
                assert sum(isinstance(r, Pong) for r in raw.replies()) == 5
                assert master.last_idx == 200
                tg.cancel_scope.cancel()

    anyio.run(main, backend="trio", backend_options={"clock": clock})


@pytest.mark.anyio
async def test_an_honest_backlog_within_the_burst_is_not_slowed(tmp_path: Path) -> None:
    """A worker back after an outage sends its outbox backlog at once: at the default
    budget it is read as fast as it comes (no time passes here)."""
    backlog = _batches(MEMBER, 30, 2000)  # 60,000 events, ~5 MB
    async with _master(tmp_path, peer_timeout=600.0) as master:
        master._members |= {MEMBER}
        fs, _ = _fs(MEMBER, b"".join(backlog))
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(master._indexer)
                tg.start_soon(master._serve_submit, fs)
                while master.last_idx < 60_000:
                    await anyio.sleep(0.01)
                assert master.stats["member_throttled"] == 0
                tg.cancel_scope.cancel()
