"""Must-show of issue 3: strangers, impostors and broken frames against a real master process.

The master runs as a subprocess with an allow-list AND a cluster secret; the attacks come from
libp2p hosts inside the test process; a legitimate worker subprocess keeps being served.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from cluster_procs import read_digest, read_log, start_master, start_worker, wait_until

from cluster.net import host as nethost
from cluster.net.identity import key_pair_from_seed, load_identity, peer_id_of
from cluster.net.membership import Membership, new_nonce
from cluster.net.protocol import (
    HELLO_PROTOCOL,
    PROTOCOL_VERSION,
    SUBMIT_PROTOCOL,
    SUBSCRIBE_PROTOCOL,
    Ack,
    Challenge,
    ErrorMsg,
    Events,
    Hello,
    Ping,
    Pong,
    Proof,
    SeqEvent,
    SubmitBatch,
    Subscribe,
    Tick,
    Welcome,
)
from cluster.shared.events import (
    EpochStarted,
    NodeHeartbeat,
    RunnerStatus,
    RunnerStatusUpdated,
)

pytestmark = pytest.mark.slow

SECRET = b"the-real-cluster-secret-0123456789"
T = 10.0


async def _hello(h: Any, peer: Any, secret: bytes, version: int = PROTOCOL_VERSION) -> Any:
    """Run hello with `secret`; returns the master's final message (Welcome or ErrorMsg)."""
    fs = await nethost.open_stream(h, peer, HELLO_PROTOCOL, T)
    try:
        await fs.send(Hello(version=version, nonce=new_nonce()), T)
        first = await fs.recv(T)
        if not isinstance(first, Challenge):
            return first
        me = peer_id_of(_KP[id(h)])
        proof = Membership(secret=secret).worker_proof(first.nonce, me, fs.peer_id)
        await fs.send(Proof(proof=proof), T)
        return await fs.recv(T)
    finally:
        await fs.close()


_KP: dict[int, Any] = {}


async def _send_refused(fs: nethost.FramedStream, msg: Any) -> None:
    """Send, tolerating a reset: a refused stream may be reset before our frame arrives."""
    try:
        await fs.send(msg, T)
    except Exception as exc:
        if "Reset" not in type(exc).__name__:
            raise


async def _expect_error(fs: nethost.FramedStream) -> ErrorMsg:
    msg = await fs.recv(T)
    assert isinstance(msg, ErrorMsg), f"expected an error, got {msg!r}"
    return msg


@pytest.mark.anyio
async def test_strangers_impostors_and_bad_frames_are_refused(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    good_dir, listed_dir = tmp_path / "good", tmp_path / "listed"
    _, good_id = load_identity(good_dir)
    listed_kp, listed_id = load_identity(listed_dir)
    (tmp_path / "allow").write_text(f"# members\n{good_id}\n{listed_id}\n")
    (tmp_path / "secret").write_bytes(SECRET)
    mdir = tmp_path / "master"
    master, addr = start_master(
        mdir,
        logs,
        "--allow-file",
        str(tmp_path / "allow"),
        "--cluster-secret-file",
        str(tmp_path / "secret"),
    )
    worker = start_worker(
        "good", good_dir, logs, addr, "--cluster-secret-file", str(tmp_path / "secret")
    )
    try:
        wait_until(lambda: (read_digest(good_dir) or {}).get("acked_seq", 0) > 2, 60, "good worker")
        stranger_kp = key_pair_from_seed(b"\x07" * 32)
        stranger_id = peer_id_of(stranger_kp)
        maddr = nethost.parse_multiaddr(addr, need_peer=True)

        # 1. A stranger (not on the allow-list) is refused before hello, and cannot submit.
        async with nethost.running_host(stranger_kp) as h:
            _KP[id(h)] = stranger_kp
            peer = await nethost.dial(h, maddr, T)
            reply = await _hello(h, peer, SECRET)
            assert isinstance(reply, ErrorMsg) and reply.code == "unauthorized"
            assert "not on the cluster allow-list" in reply.message and stranger_id in reply.message
            fs = await nethost.open_stream(h, peer, SUBMIT_PROTOCOL, T)
            await _send_refused(
                fs, SubmitBatch(events=[SeqEvent(1, NodeHeartbeat(node_id=stranger_id))])
            )
            err = await _expect_error(fs)
            assert err.code == "unauthorized" and "submit refused" in err.message

        # 2. A listed peer without the secret fails the challenge and cannot submit either.
        async with nethost.running_host(listed_kp) as h:
            _KP[id(h)] = listed_kp
            peer = await nethost.dial(h, maddr, T)
            reply = await _hello(h, peer, b"a-wrong-secret-of-enough-length!!")
            assert isinstance(reply, ErrorMsg) and reply.code == "unauthorized"
            assert "cluster-secret challenge" in reply.message
            fs = await nethost.open_stream(h, peer, SUBMIT_PROTOCOL, T)
            await _send_refused(
                fs, SubmitBatch(events=[SeqEvent(1, NodeHeartbeat(node_id=listed_id))])
            )
            assert (await _expect_error(fs)).code == "unauthorized"

            # 2b. A worker of an older protocol (which could not decode this master's state) is
            # refused at the hello, saying which versions differ.
            reply = await _hello(h, peer, SECRET, version=PROTOCOL_VERSION - 1)
            assert isinstance(reply, ErrorMsg) and reply.code == "version", reply
            assert (
                f"protocol version {PROTOCOL_VERSION - 1} unsupported "
                f"(this master speaks {PROTOCOL_VERSION})" in reply.message
            )

            # 3. With the secret it joins, but may not speak for another node or as the master.
            reply = await _hello(h, peer, SECRET)
            assert isinstance(reply, Welcome) and reply.node_id == listed_id
            fs = await nethost.open_stream(h, peer, SUBMIT_PROTOCOL, T)
            await fs.send(SubmitBatch(events=[SeqEvent(1, NodeHeartbeat(node_id=good_id))]), T)
            err = await _expect_error(fs)
            assert err.code == "forbidden-origin" and good_id in err.message, err
            fs = await nethost.open_stream(h, peer, SUBMIT_PROTOCOL, T)
            await fs.send(
                SubmitBatch(
                    events=[SeqEvent(1, EpochStarted(epoch=9, start_ms=0, end_ms=1, seed=1))]
                ),
                T,
            )
            err = await _expect_error(fs)
            assert err.code == "forbidden-event" and "EpochStarted" in err.message

            # 4. Malformed, oversized and truncated frames: a clear error each.
            fs = await nethost.open_stream(h, peer, SUBMIT_PROTOCOL, T)
            await fs.send_bytes(struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1", T)
            err = await _expect_error(fs)
            assert err.code == "malformed", err
            fs = await nethost.open_stream(h, peer, SUBMIT_PROTOCOL, T)
            await fs.send_bytes(struct.pack(">I", 512 << 20), T)
            err = await _expect_error(fs)
            assert err.code == "too-large" and "limit" in err.message, err
            fs = await nethost.open_stream(h, peer, SUBMIT_PROTOCOL, T)
            await fs.send_bytes(struct.pack(">I", 100) + b"0123456789", T)
            await fs.stream.close()  # half-close: the master sees the end mid-frame
            err = await _expect_error(fs)
            assert err.code == "truncated" and "10 of 100" in err.message, err

            # One event of ~3 MiB fits a 4 MiB frame, but once logged no Events frame could
            # carry it to a replica: refused before it is indexed -- by its over-long text
            # field, the bound that comes first now that every text field has one (the event
            # size limit stays behind it).
            fs = await nethost.open_stream(h, peer, SUBMIT_PROTOCOL, T)
            huge = RunnerStatusUpdated(
                runner_id="x/0",
                node_id=listed_id,
                status=RunnerStatus.FAILED,
                reason="r" * (3 << 20),
            )
            await fs.send(SubmitBatch(events=[SeqEvent(1, huge)]), T)
            err = await _expect_error(fs)
            assert err.code == "forbidden-event", err
            assert "RunnerStatusUpdated (seq 1) field reason holds 3145728 characters" in (
                err.message
            ), err

            # A member may hold a few subscribe streams, not any number (each catching-up one
            # holds a snapshot and a queue in the master).
            held = []
            for _ in range(4):
                sub = await nethost.open_stream(h, peer, SUBSCRIBE_PROTOCOL, T)
                await sub.send(Subscribe(from_idx=1), T)
                assert isinstance(await sub.recv(T), Events | Tick)
                held.append(sub)
            extra = await nethost.open_stream(h, peer, SUBSCRIBE_PROTOCOL, T)
            await extra.send(Subscribe(from_idx=1), T)
            err = await _expect_error(extra)
            assert err.code == "too-many-streams" and "4 subscribe streams" in err.message, err
            for sub in held:
                await sub.reset()
            # And a few submit streams.
            held = [await nethost.open_stream(h, peer, SUBMIT_PROTOCOL, T) for _ in range(4)]
            for sub in held:  # answered: each is being served (and counted) by now
                await sub.send(Ping(), T)
                assert isinstance(await sub.recv(T), Pong)
            extra = await nethost.open_stream(h, peer, SUBMIT_PROTOCOL, T)
            await extra.send(SubmitBatch(events=[]), T)
            err = await _expect_error(extra)
            assert err.code == "too-many-streams" and "4 submit streams" in err.message, err
            for sub in held:
                await sub.reset()

            # The listed peer can still submit properly on a fresh stream.
            fs = await nethost.open_stream(h, peer, SUBMIT_PROTOCOL, T)
            await fs.send(SubmitBatch(events=[SeqEvent(1, NodeHeartbeat(node_id=listed_id))]), T)
            ack = await fs.recv(T)
            assert isinstance(ack, Ack) and ack.seq == 1

        # The master kept serving the good worker throughout.
        seen = (read_digest(good_dir) or {}).get("acked_seq", 0)
        wait_until(
            lambda: (read_digest(good_dir) or {}).get("acked_seq", 0) > seen + 3,
            30,
            "good worker still acknowledged",
        )
        assert master.popen.poll() is None
    finally:
        assert worker.stop() == 0
        assert master.stop() == 0
    origins = {ie.origin for ie in read_log(mdir)}
    assert stranger_id not in origins
    events_by_listed = [ie for ie in read_log(mdir) if ie.origin == listed_id]
    assert [type(ie.event).__name__ for ie in events_by_listed] == ["NodeHeartbeat"]
    text = master.log_text()
    assert "refused" in text and stranger_id in text
