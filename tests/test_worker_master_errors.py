"""The master's word that ends a stream means the same on every stream the worker reads.

The master fails each of a worker's streams with one code when it stops (`stopping`) or drops
the node's session (`removed`), always between two frames. During a catch-up those frames are
snapshot chunks, and the snapshot reader took the message for any other protocol error:
`ProtocolError('removed')`, which the connection loop logged as "master at ... unreachable"
instead of saying that the node was removed. Now one mapping serves the ack reader, the
subscribe reader and the snapshot reader.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import pytest

from cluster.net import host as nethost
from cluster.net.protocol import (
    REMOVED,
    REMOVED_MESSAGE,
    ErrorMsg,
    Message,
    ProtocolError,
    SnapshotBegin,
    SnapshotChunk,
)
from cluster.worker.client import Worker, _MasterStopping, _Removed

ADDR = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"


class _Script:
    """A stream from the master that says the given messages, in order, then nothing."""

    def __init__(self, msgs: list[Message]) -> None:
        self.msgs = msgs

    async def recv(self, timeout: float) -> Message:
        if not self.msgs:
            await anyio.sleep_forever()
        return self.msgs.pop(0)

    async def send(self, msg: object, timeout: float) -> None:
        pass

    async def reset(self) -> None:
        pass

    async def close(self) -> None:
        pass


#: (code, what the worker raises for it): the whole session's ends, and any other code.
CODES = [
    (REMOVED, _Removed, REMOVED_MESSAGE),
    ("stopping", _MasterStopping, "master is stopping"),
    ("internal", ProtocolError, "master reported internal: boom"),
]

_Reader = Callable[[Worker, _Script], Coroutine[Any, Any, None]]


async def _ack_reader(worker: Worker, fs: _Script) -> None:
    await worker._ack_reader(fs, anyio.Event())  # type: ignore[arg-type]


async def _subscribe(worker: Worker, fs: _Script) -> None:
    await worker._subscribe_once(None, None)


#: Where each reader reads the error: the ack reader and the subscriber between frames, the
#: snapshot reader between two chunks of a snapshot (the case that was missed).
READERS: list[tuple[str, _Reader, list[Message]]] = [
    ("ack reader", _ack_reader, []),
    ("subscribe", _subscribe, []),
    (
        "between snapshot chunks",
        _subscribe,
        [SnapshotBegin(idx=5, size=100), SnapshotChunk(data=b"x" * 10)],
    ),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("where", "read", "before"), READERS, ids=[r[0] for r in READERS])
@pytest.mark.parametrize(("code", "raised", "text"), CODES, ids=[c[0] for c in CODES])
async def test_the_masters_error_is_read_alike_on_every_stream(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    read: _Reader,
    before: list[Message],
    code: str,
    raised: type[Exception],
    text: str,
) -> None:
    message = "boom" if raised is ProtocolError else text
    fs = _Script([*before, ErrorMsg(code=code, message=message)])

    async def open_stream(host: Any, peer: Any, protocol: str, timeout: float) -> _Script:
        return fs

    monkeypatch.setattr(nethost, "open_stream", open_stream)
    worker = Worker(tmp_path / "worker", ADDR)
    try:
        with anyio.fail_after(10), pytest.raises(raised) as err:
            await read(worker, fs)
        assert type(err.value) is raised and str(err.value) == text
        if raised is ProtocolError:
            assert err.value.code == code  # type: ignore[attr-defined]
        assert not fs.msgs  # the error was read where it came, after what preceded it
    finally:
        worker.close()


@pytest.mark.anyio
@pytest.mark.parametrize("answered", ["challenge", "welcome"])
async def test_a_master_stopping_during_our_hello_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answered: str
) -> None:
    """A master stopping while a worker said hello answered `stopping`; the hello reader took
    it for any protocol error, and the connection loop logged the master unreachable."""
    from cluster.net.protocol import Challenge

    before: list[Message] = []
    if answered == "welcome":  # stopping after the challenge: proof sent, no welcome
        before = [Challenge(nonce=b"n" * 32, proof=b"")]
    fs = _Script([*before, ErrorMsg(code="stopping", message="master is stopping")])

    async def open_stream(host: Any, peer: Any, protocol: str, timeout: float) -> _Script:
        return fs

    monkeypatch.setattr(nethost, "open_stream", open_stream)
    monkeypatch.setattr(_Script, "peer_id", "12D3KooWMaster", raising=False)
    worker = Worker(tmp_path / "worker", ADDR)
    try:
        with anyio.fail_after(10), pytest.raises(_MasterStopping, match="master is stopping"):
            await worker._hello(None, None)
        assert not fs.msgs
    finally:
        worker.close()
