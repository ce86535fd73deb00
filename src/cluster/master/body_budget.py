"""One budget for the bytes of HTTP response bodies held in flight: built and not yet written.

A client that reads slowly keeps its response body in the master's memory until it has taken
it all, or its write deadline (`send_timeout_s`, 10 s) drops it: at 10,000 nodes /api/state
is several MB, so 64 slow readers held ~450 MB. Every body the API builds (/api/state,
/api/status, /metrics) therefore holds a share of one budget from before it is built until
it is written, and a request whose body does not fit waits for room (bounded) or is refused.

The rule, for a body of `size` bytes for `path`:

- it fits when the bytes held stay within the budget **and** its path's bytes stay within
  half of it. The half is what keeps /api/status and /metrics served while slow readers of
  /api/state (the biggest body) hold all they may;
- a body too big for that fits only when nothing at all is held, so an API whose budget is
  set too small still serves it, one at a time.

Building the body is itself the big allocation, so the room is taken *before* building, for
the size of the last body built for that path (its estimate; half the budget before the
first is built, so a burst of requests right after start cannot all get in on a guess of 0),
and set to the real size once built (`Hold.resize`, which never waits: the bytes exist by
then). So the bytes held can exceed the budget only by how much the bodies being built
(`max_renders` at a time) grew since the last ones.
"""

from __future__ import annotations

import anyio


class BudgetFull(Exception):
    """No room for a body within the wait; the text says how the budget is held."""


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class Hold:
    """Bytes one response body holds in a `BodyBudget` until released."""

    __slots__ = ("_budget", "path", "size")

    def __init__(self, budget: BodyBudget, path: str, size: int) -> None:
        self._budget = budget
        self.path = path
        self.size = size

    def resize(self, size: int) -> None:
        """Account the body's real size once built, and remember it as the path's estimate."""
        self._budget._change(self.path, size - self.size)
        self.size = size
        self._budget.estimates[self.path] = size

    def release(self) -> None:
        """The body is written (or dropped): give its bytes back. Idempotent."""
        if self.size:
            self._budget._change(self.path, -self.size)
            self.size = 0


class BodyBudget:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        #: Bytes held now, in all and by path (entries dropped at zero).
        self.held = 0
        self.by_path: dict[str, int] = {}
        #: Size of the last body built for each path: what the next one reserves (half the
        #: budget while none is known).
        self.estimates: dict[str, int] = {}
        self._freed = anyio.Event()

    def fits(self, path: str, size: int) -> bool:
        if self.held == 0:
            return True
        return (
            self.held + size <= self.budget_bytes
            and self.by_path.get(path, 0) + size <= self.budget_bytes // 2
        )

    async def reserve(self, path: str, wait_s: float) -> Hold:
        """Room for the next body of `path` (its estimate), waiting up to `wait_s` for it;
        `BudgetFull` if there is none by then."""
        size = self.estimates.get(path, self.budget_bytes // 2)
        with anyio.move_on_after(wait_s):
            while not self.fits(path, size):
                await self._freed.wait()
            self._change(path, size)
            return Hold(self, path, size)
        raise BudgetFull(
            f"response bodies still being sent to slow clients hold {mib(self.held)} "
            f"({mib(self.by_path.get(path, 0))} of them for {path}); a {path} body of "
            f"~{mib(size)} did not fit within {wait_s:g} s (budget {mib(self.budget_bytes)}, "
            "at most half for one path: body_budget_bytes)"
        )

    def _change(self, path: str, delta: int) -> None:
        self.held += delta
        left = self.by_path.get(path, 0) + delta
        if left:
            self.by_path[path] = left
        else:
            self.by_path.pop(path, None)
        if delta < 0:  # wake every waiter to check again (a new Event for the next round)
            freed, self._freed = self._freed, anyio.Event()
            freed.set()
