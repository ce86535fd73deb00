"""Length-prefixed frames on a byte stream, validated before anything is decoded.

A frame is a 4-byte big-endian length followed by that many payload bytes. libp2p streams
carry arbitrary byte runs (Yamux splits them at 64 KiB), so message boundaries are ours to
keep. Every problem is a `FrameError` whose message says exactly what was wrong, so the peer
can be told before its stream is reset.

The length's top bit marks a zlib-compressed payload. Every byte on a stream costs CPU on
both sides (Noise, Yamux, the socket: more than compressing it), and event batches are very
repetitive (node ids in every record), so senders of bulk frames compress them. The frame
limit applies to the payload both as sent and once inflated, so a small compressed frame
cannot make the reader buffer more than an uncompressed one could.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Awaitable, Callable
from typing import Final

HEADER: Final = struct.Struct(">I")
#: Largest payload we accept by default: big enough for a chunk of snapshot or a batch of
#: a few thousand events, small enough that a hostile length cannot make us buffer much.
DEFAULT_MAX_FRAME: Final = 4 << 20
#: How much to ask the stream for per read; Yamux delivers at most 64 KiB at a time anyway.
READ_CHUNK: Final = 1 << 16
#: Length-field bit: the payload is zlib-compressed (lengths never reach it: see the limit).
COMPRESSED: Final = 1 << 31
#: Payloads shorter than this are sent as they are even when compression is asked for.
COMPRESS_MIN: Final = 1024


class FrameError(Exception):
    """The byte stream broke the framing rules; the message names the problem."""


class FrameTooLarge(FrameError):
    pass


class TruncatedFrame(FrameError):
    pass


def encode_frame(
    payload: bytes, max_frame: int = DEFAULT_MAX_FRAME, *, compress: bool = False
) -> bytes:
    """One frame; with `compress`, a payload of COMPRESS_MIN bytes or more is deflated
    (fastest level) when that makes it smaller."""
    if len(payload) > max_frame:
        raise FrameTooLarge(f"frame of {len(payload)} bytes exceeds the limit of {max_frame}")
    if compress and len(payload) >= COMPRESS_MIN:
        packed = zlib.compress(payload, 1)
        if len(packed) < len(payload):
            return HEADER.pack(len(packed) | COMPRESSED) + packed
    return HEADER.pack(len(payload)) + payload


def encode_frames(payloads: list[bytes], max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Several frames coalesced into one write (writes, not bytes, are what cost CPU)."""
    return b"".join(encode_frame(p, max_frame) for p in payloads)


class FrameDecoder:
    """Incremental, push-style decoder: feed bytes, take complete frames out.

    Pure (no I/O), so the framing rules are tested byte by byte without a network.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._max = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_frame(self, max_frame: int | None = None) -> bytes | None:
        """The next complete frame, or None until more bytes arrive. `max_frame` lowers the
        limit for this frame (a handshake message is small: a stranger's 4 MiB frame is
        refused at its header, not buffered)."""
        limit = self._max if max_frame is None else min(self._max, max_frame)
        if len(self._buf) < HEADER.size:
            return None
        (field,) = HEADER.unpack_from(self._buf)
        length = field & ~COMPRESSED
        if length > limit:
            raise FrameTooLarge(
                f"frame header announces {length} bytes, more than the limit of {limit}"
            )
        end = HEADER.size + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[HEADER.size : end])
        del self._buf[:end]
        return self._inflate(payload, limit) if field & COMPRESSED else payload

    def _inflate(self, packed: bytes, limit: int) -> bytes:
        inflater = zlib.decompressobj()
        try:
            payload = inflater.decompress(packed, limit)
        except zlib.error as exc:
            raise FrameError(f"compressed frame of {len(packed)} bytes is corrupt: {exc}") from None
        if inflater.unconsumed_tail:
            raise FrameTooLarge(
                f"compressed frame of {len(packed)} bytes inflates beyond the limit of {limit}"
            )
        if not inflater.eof or inflater.unused_data:
            raise FrameError(
                f"compressed frame of {len(packed)} bytes is not exactly one zlib stream"
            )
        return payload

    def check_eof(self) -> None:
        """At end of stream: leftover bytes are a frame cut short."""
        if self._buf:
            if len(self._buf) < HEADER.size:
                raise TruncatedFrame(
                    f"stream ended inside a frame header ({len(self._buf)} of 4 bytes)"
                )
            length = HEADER.unpack_from(self._buf)[0] & ~COMPRESSED
            raise TruncatedFrame(
                f"stream ended after {len(self._buf) - HEADER.size} of {length} payload bytes"
            )


class FrameReader:
    """Reads whole frames from any `read(n)` coroutine (a libp2p stream's `read`).

    `read` must raise EOFError (libp2p's StreamEOF is one) at a clean end of stream; a stream
    that ends mid-frame raises `TruncatedFrame`, a clean end raises `EOFError`.
    """

    def __init__(
        self, read: Callable[[int], Awaitable[bytes]], max_frame: int = DEFAULT_MAX_FRAME
    ) -> None:
        self._read = read
        self._decoder = FrameDecoder(max_frame)

    async def read_frame(self, max_frame: int | None = None) -> bytes:
        """The next frame; `max_frame` lowers the limit for this one (see `next_frame`)."""
        while True:
            frame = self._decoder.next_frame(max_frame)
            if frame is not None:
                return frame
            try:
                data = await self._read(READ_CHUNK)
            except EOFError:
                self._decoder.check_eof()
                raise
            if not data:  # some transports signal EOF with b"" instead of raising
                self._decoder.check_eof()
                raise EOFError("stream closed")
            self._decoder.feed(data)
