"""`Worker.request`'s errors are the documented ones, whatever the stream does.

docs/embedding.md listed `MasterUnavailable` and `ControlError`, but a request whose stream
failed raised the stream's own errors: `TimeoutError`, `OSError`, `EOFError`, a libp2p reset,
`ProtocolError` (the master failing the stream saying why). An embedder cannot know them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from libp2p.network.stream.exceptions import StreamReset

from cluster.control import ControlError, MaintenanceNext, Reply, encode_message
from cluster.net import host as nethost
from cluster.net.protocol import ControlReplyMsg, ErrorMsg, Message, ProtocolError
from cluster.worker.client import MasterNoAnswer, MasterUnavailable, Worker
from cluster.worker.relay import HostRelay

ADDR = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWNWFoMYtcaZW45ifH11CtDEYmzjqTqXrVavhSB5udW8Le"


class _Stream:
    """A request stream whose answer is `answer` (a message, or an error to raise)."""

    def __init__(self, answer: Message | BaseException) -> None:
        self.answer = answer
        self.closed = False

    async def send(self, msg: object, timeout: float) -> None:
        pass

    async def recv(self, timeout: float) -> Message:
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    async def close(self) -> None:
        self.closed = True


def _worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: Any) -> Worker:
    worker = Worker(tmp_path / "w", ADDR)
    worker._link = (object(), object())

    async def open_stream(host: Any, peer: Any, protocol: str, timeout: float) -> Any:
        if isinstance(answer, ConnectionRefusedError):  # at the open
            raise answer
        return _Stream(answer)

    monkeypatch.setattr(nethost, "open_stream", open_stream)
    return worker


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("answer", "kind", "says"),
    [
        (TimeoutError(), MasterNoAnswer, "no answer from the master within 30 s"),
        (EOFError("stream closed"), MasterNoAnswer, "failed before its answer"),
        (StreamReset("reset"), MasterNoAnswer, "it may have decided it"),
        (
            ErrorMsg(code="removed", message="removed from the cluster by the operator"),
            ControlError,
            "the master refused the request: peer reported removed",
        ),
        (ProtocolError("malformed", "bad frame"), ControlError, "refused the request: bad"),
        (ConnectionRefusedError("refused"), MasterUnavailable, "could not open a request"),
    ],
)
async def test_a_failed_request_stream_raises_a_documented_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: Any, kind: type, says: str
) -> None:
    worker = _worker(tmp_path, monkeypatch, answer)
    try:
        with pytest.raises(kind, match=says) as caught:
            await worker.request(MaintenanceNext())
        assert type(caught.value) is kind
        # The host's relay answers with a reply, never an error of the stream.
        reply = await HostRelay(worker).handle(MaintenanceNext())
        assert not reply.ok and says.split(":")[0] in reply.message
    finally:
        worker.close()


@pytest.mark.anyio
async def test_a_reply_is_returned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = encode_message(Reply(ok=True, message="next window: none"))
    worker = _worker(tmp_path, monkeypatch, ControlReplyMsg(payload=payload))
    try:
        reply = await worker.request(MaintenanceNext())
        assert reply == Reply(ok=True, message="next window: none")
    finally:
        worker.close()
