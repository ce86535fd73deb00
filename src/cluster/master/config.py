"""The planner's tunables, with the reasoning behind each default.

One frozen object the master builds once (from defaults, flags or a config file) and passes
to every `plan()` call. Nothing here travels in events: decisions carry their own values
(times, seeds, amounts), so a log replays the same whatever configuration reads it later.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import msgspec

from cluster.shared.durations import DAY_MS, MAX_DURATION_MS
from cluster.shared.settings_table import table_values
from cluster.shared.state import LEDGER_EPOCHS_KEPT

#: Most `stale_cycles` accepted. Staleness is meant to notice a silent node within seconds
#: (3 cycles of 1 s by default); 10,000 cycles is already ~2.8 hours at the default interval,
#: and a larger count (1e18 was accepted) only means a dead node is never disconnected and
#: its slots never re-placed.
MAX_STALE_CYCLES: Final = 10_000


def check_stale_cycles(value: object, name: str = "stale_cycles") -> None:
    """The one check of a stale-cycles count: the config file's setting and `--stale-cycles`
    (which passes its own `name`, so the message names what the operator typed)."""
    _at_least(name, value, 1)
    _at_most(name, value, MAX_STALE_CYCLES, unit="")


class PlannerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Planner settings; every value is validated when the object is built."""

    #: One plan cycle. Workers heartbeat at least once per cycle, so liveness is measured
    #: in cycles rather than seconds.
    plan_interval_ms: int = 1_000
    #: K: a connected node whose event index did not advance for K consecutive cycles is
    #: disconnected. 3 tolerates one late heartbeat plus one slow master cycle.
    stale_cycles: int = 3
    #: A node idle for more than this many cycles (but fewer than K) is not "fresh": it keeps
    #: the work it has but gets no new slots until its events flow again.
    fresh_idle_cycles: int = 1
    #: Epoch length: devshards are placed per epoch and settled at its end.
    epoch_length_ms: int = 600_000
    #: A node with more unexcused missed slots than this in an epoch is punished (forfeits
    #: that epoch's reward). 1 tolerates one failed slot per epoch, not a habit.
    miss_threshold: int = 1
    #: A slot given to its node less than this long before its epoch ends (by a placement
    #: or a re-placement) is not judged for misses: its runner may still be loading. Nodes
    #: holding their slots since earlier are judged. Capped at half the epoch (see
    #: `effective_miss_grace_ms`) so short test epochs are still judged.
    miss_grace_ms: int = 30_000
    #: Whether work reported after its epoch was settled is paid (to unpunished nodes).
    pay_late_work: bool = True
    #: How many settled epochs back the planner still settles late work; later work is
    #: recorded in the ledger but never paid (bounds the per-cycle scan and old claims).
    late_work_epochs: int = 6
    #: A slot whose runner has reported FAILED for this long is lost like a lost node's: it
    #: moves to another node and the failure counts as a miss. Longer than the worker's own
    #: restarts (5 + 10 + 20 s of back-off by default), which recover most failures.
    failed_slot_grace_ms: int = 60_000
    #: A restarted master first lets its workers reconnect: for this long after its first
    #: cycle (when the log already has an epoch) it disconnects nobody for silence, ends no
    #: epoch and places nothing. A worker redials with back-off up to 5 s (plus its connect
    #: timeout), so without this, nodes that merely had not redialled yet were disconnected
    #: (an unexcused disconnect forfeits the epoch's reward), and an epoch that ended while
    #: the master was down was settled before its work, waiting in the workers' outboxes,
    #: arrived: misses, punishment, the late work forfeited.
    restart_grace_ms: int = 10_000

    def __post_init__(self) -> None:
        # Durations are at most a year (what `--epoch-length` accepts): an epoch's end is
        # logged (EpochStarted.end_ms) and shown as a date everywhere, and a typo of 2**63
        # wrote an end past int64 that every later status and replay failed on.
        for name in (
            "plan_interval_ms",
            "epoch_length_ms",
            "miss_grace_ms",
            "failed_slot_grace_ms",
            "restart_grace_ms",
        ):
            _at_most(name, getattr(self, name), MAX_DURATION_MS)
        _at_least("plan_interval_ms", self.plan_interval_ms, 1)
        check_stale_cycles(self.stale_cycles)
        _at_least("fresh_idle_cycles", self.fresh_idle_cycles, 0)
        if self.fresh_idle_cycles >= self.stale_cycles:
            raise ValueError(
                f"fresh_idle_cycles ({self.fresh_idle_cycles}) must be below stale_cycles "
                f"({self.stale_cycles}): raise stale_cycles (--stale-cycles) or lower "
                "fresh_idle_cycles"
            )
        _at_least("epoch_length_ms", self.epoch_length_ms, 1)
        if self.epoch_length_ms < self.plan_interval_ms:
            raise ValueError(
                f"epoch_length_ms must be at least plan_interval_ms ({self.plan_interval_ms}), "
                f"got {self.epoch_length_ms}"
            )
        _at_least("miss_threshold", self.miss_threshold, 0)
        _at_least("miss_grace_ms", self.miss_grace_ms, 0)
        _at_least("late_work_epochs", self.late_work_epochs, 0)
        if self.late_work_epochs >= LEDGER_EPOCHS_KEPT:
            # Their ledgers must still be in State for the late work to be settled.
            raise ValueError(
                f"late_work_epochs must be below {LEDGER_EPOCHS_KEPT} (the epochs whose "
                f"ledgers State keeps), got {self.late_work_epochs}"
            )
        _at_least("failed_slot_grace_ms", self.failed_slot_grace_ms, 0)
        _at_least("restart_grace_ms", self.restart_grace_ms, 0)

    @property
    def effective_miss_grace_ms(self) -> int:
        return min(self.miss_grace_ms, self.epoch_length_ms // 2)

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], *, where: str = "planner config"
    ) -> PlannerConfig:
        """Build from a parsed config table, read as `[maintenance]` is (`settings_table`:
        unknown keys list the known ones, ``*_ms`` settings take duration text too); wrong
        types and bad values are errors. `where` names the table in error messages."""
        if not isinstance(values, Mapping):
            raise ValueError(f"{where}: expected a table of settings, got {type(values).__name__}")
        try:
            fields = table_values(values, cls.__struct_fields__)
            return msgspec.convert(fields, cls)
        except (ValueError, msgspec.ValidationError) as exc:
            raise ValueError(f"{where}: {exc}") from None


def _at_most(name: str, value: object, maximum: int, *, unit: str = "ms") -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value > maximum:
        what = f"{maximum} ({maximum // DAY_MS} days)" if unit == "ms" else f"{maximum:,}"
        raise ValueError(f"{name} must be at most {what}, got {value}")


def _at_least(name: str, value: object, minimum: int) -> None:
    # bool is an int subclass; a flag where a number belongs is a config mistake.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
