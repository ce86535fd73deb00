"""When epochs end and begin, and with which seed (DESIGN section 6).

Pure: the master passes `now_ms` (and, if it wants, fresh entropy); the new epoch's times
and seed travel inside `EpochStarted`, so replay never needs the clock or the config.
"""

from __future__ import annotations

import hashlib

from cluster.master.config import PlannerConfig
from cluster.shared.events import DevshardFinalized, EpochStarted
from cluster.shared.state import EpochRecord, State

#: Seeds are kept below 2**63 so they fit a signed 64-bit integer in every encoding.
_SEED_BITS = 63


def epoch_due(state: State, now_ms: int) -> bool:
    """True when there is no epoch yet or the current one has reached its end."""
    return state.epoch is None or now_ms >= state.epoch.end_ms


def derive_seed(previous_seed: int, epoch: int, entropy: int | None = None) -> int:
    """BLAKE2 of the previous seed, the epoch number and optional master entropy.

    Without entropy the chain of seeds is fully determined by the first one, which makes
    placement reproducible in tests; a master that wants unpredictable placement passes
    fresh randomness, which is then recorded in the log through the event's seed.
    """
    material = f"{previous_seed}:{epoch}:{'' if entropy is None else entropy}".encode()
    digest = hashlib.blake2b(material, digest_size=8, person=b"cluster-epoch").digest()
    return int.from_bytes(digest, "big") >> (64 - _SEED_BITS)


def next_epoch(
    state: State, now_ms: int, cfg: PlannerConfig, entropy: int | None = None
) -> EpochStarted:
    """The EpochStarted that follows the current epoch (or the first one).

    Epochs are contiguous (start = previous end) while the master keeps up; after a gap
    longer than an epoch (master down) the new epoch starts now instead of producing a run
    of already-expired epochs.
    """
    current = state.epoch
    if current is None:
        number, start, previous_seed = 1, now_ms, 0
    else:
        number = current.epoch + 1
        contiguous = now_ms < current.end_ms + cfg.epoch_length_ms
        start = current.end_ms if contiguous else now_ms
        previous_seed = current.seed
    return EpochStarted(
        epoch=number,
        start_ms=start,
        end_ms=start + cfg.epoch_length_ms,
        seed=derive_seed(previous_seed, number, entropy),
    )


def epoch_record(ev: EpochStarted) -> EpochRecord:
    """The record the reducer will make of `ev`, for decisions in the same cycle."""
    return EpochRecord(epoch=ev.epoch, start_ms=ev.start_ms, end_ms=ev.end_ms, seed=ev.seed)


def finalize_devshards(state: State) -> list[DevshardFinalized]:
    """Finalize every live devshard: a devshard never crosses an epoch boundary."""
    return [
        DevshardFinalized(devshard_id=ds_id, epoch=state.devshards[ds_id].epoch)
        for ds_id in sorted(state.devshards.keys())
    ]
