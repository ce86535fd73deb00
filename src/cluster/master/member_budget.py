"""How much one member may have the master log: a token bucket of bytes per peer.

Every event a member submits is logged forever, whether or not it changes the state (a
runner report about a runner the member does not hold changes nothing, and is still a
record). Without a budget one member sending compressed frames that inflate to 4 MiB wrote
~75 MB/s of log: a 64 GB disk full in ~15 minutes, and the master fail-stops for everyone.

The master charges each frame it reads from a member's submit streams (its inflated bytes:
about what the log will hold) and reads no further frame from that member while the bucket
is in debt (`Master._serve_submit`): backpressure, not refusal, so nothing accepted is lost
and an honest worker catching up on a large outbox backlog only goes slower (its events wait
in its outbox). The burst is far above an honest worker's backlog after an outage.

No clock of its own: the caller passes the time (seconds on any monotonic clock), so tests
use a fake one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    at: float


class MemberBudget:
    """Per-peer byte buckets refilled at `rate` bytes/s up to `burst` bytes.

    A charge may take a bucket below zero (a frame is charged once read, whatever its size);
    `wait_s` is then how long until it is back at zero. An *episode* is a peer's time in
    debt, from its first wait until its bucket is full again: `wait_s` says when one begins,
    so the caller warns once per episode, not once per frame.
    """

    def __init__(self, rate: float, burst: float) -> None:
        if not rate > 0:
            raise ValueError(f"member log budget rate must be > 0 bytes/s, got {rate!r}")
        if not burst > 0:
            raise ValueError(f"member log budget burst must be > 0 bytes, got {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._buckets: dict[str, _Bucket] = {}
        self._throttled: set[str] = set()

    def _refill(self, peer: str, now: float) -> _Bucket | None:
        b = self._buckets.get(peer)
        if b is None:
            return None
        b.tokens = min(self.burst, b.tokens + max(0.0, now - b.at) * self.rate)
        b.at = max(b.at, now)  # a clock read late never takes tokens back
        if b.tokens >= self.burst:
            # Full again: as good as new, so forgotten (members come and go), episode over.
            del self._buckets[peer]
            self._throttled.discard(peer)
            return None
        return b

    def charge(self, peer: str, n: int, now: float) -> None:
        """`peer` had `n` bytes read at `now`."""
        b = self._refill(peer, now)
        if b is None:
            b = self._buckets[peer] = _Bucket(self.burst, now)
        b.tokens -= n

    def wait_s(self, peer: str, now: float) -> tuple[float, bool]:
        """Seconds until `peer` may be read again (0.0: now), and whether this wait begins
        a new episode."""
        b = self._refill(peer, now)
        if b is None or b.tokens >= 0:
            return 0.0, False
        new = peer not in self._throttled
        self._throttled.add(peer)
        return -b.tokens / self.rate, new

    def throttled(self, peer: str) -> bool:
        """In an episode (see the class): debt not yet repaid up to a full bucket."""
        return peer in self._throttled
