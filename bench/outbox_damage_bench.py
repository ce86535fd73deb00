"""Opening a large worker outbox, undamaged and after damage.

Run: .venv/bin/python bench/outbox_damage_bench.py [--mib 32] [--rounds 3]

Writes an outbox of about `--mib` MiB of work reports, then for the undamaged file and each
kind of damage (a flipped bit, a zeroed 4 KiB page, a zeroed MiB and a MiB of garbage near
the start, a 4 MiB tail of zeros as a crash leaves when the file grew but its blocks were
never written) times, best of `--rounds`:

- search: from the damage to the next intact record (`outbox._next_record`);
- scan: finding every intact record of the file in bulk (`outbox._scan`, what open does);
- per record: the same scan as it was before it went bulk, `_record_end` for one record at a
  time (kept here, `per_record_scan`, for the comparison in one run);
- open: the whole `Outbox.open` (the file written beforehand, not timed).

Run it with PYTHONPATH pointing at another checkout's src to compare two versions.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from cluster.shared.events import WorkReported
from cluster.worker import outbox
from cluster.worker.outbox import Outbox

NODE = "12D3KooWD6FXdxPeu8Y7TL4snPwAnK2Pc7BuReewmryJYjmiqGSX"
AT = 1000  # where the damage starts: near the beginning of the file


def build(directory: Path, mib: int) -> bytes:
    box = Outbox.open(directory)
    rng = random.Random(1)
    while (directory / "events.log").stat().st_size < mib << 20:
        for _ in range(10_000):
            box.append(
                WorkReported(
                    devshard_id=f"ds-{rng.randrange(1000)}",
                    node_id=NODE,
                    units=rng.randrange(1, 10**9),
                    epoch=rng.randrange(1, 10**6),
                )
            )
    box.close()
    return (directory / "events.log").read_bytes()


def damaged(clean: bytes, kind: str) -> tuple[bytes, int]:
    """The damaged file and the offset the search starts from."""
    d = bytearray(clean)
    if kind == "bit":
        d[AT] ^= 0x10
    elif kind == "zero 4 KiB":
        d[AT : AT + 4096] = bytes(4096)
    elif kind == "zero 1 MiB":
        d[AT : AT + (1 << 20)] = bytes(1 << 20)
    elif kind == "garbage 1 MiB":
        d[AT : AT + (1 << 20)] = random.Random(2).randbytes(1 << 20)
    elif kind == "zero tail 4 MiB":
        d += bytes(4 << 20)
        return bytes(d), len(clean)
    return bytes(d), AT


def per_record_scan(data: bytes) -> list[tuple[int, bytes]]:
    """The records of `data` found as `Outbox.open` found them before its scan went bulk: a
    check per record, (seq, payload) for each intact one."""
    records: list[tuple[int, bytes]] = []
    off = 0
    while off + outbox._REC.size <= len(data):
        end = outbox._record_end(data, off)
        if end is None:
            resume = outbox._next_record(data, off + 1)
            if resume is None:
                break
            off = resume
            continue
        _, seq, _ = outbox._REC.unpack_from(data, off)
        records.append((seq, data[off + outbox._REC.size : end]))
        off = end
    return records


def best(rounds: int, run: Callable[[], object], setup: Callable[[], object] = tuple) -> float:
    times = []
    for _ in range(rounds):
        setup()
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # the damage's ERROR and WARNING, once per open
    root = Path(tempfile.mkdtemp(prefix="outbox-bench-"))
    try:
        clean = build(root / "clean", args.mib)
        print(f"outbox: {len(clean) / 2**20:.1f} MiB, code from {outbox.__file__}")

        directory = root / "box"

        def place(data: bytes) -> None:
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            (directory / "events.log").write_bytes(data)

        def open_box() -> int:
            box = Outbox.open(directory)
            kept = len(box)
            box.close()
            return kept

        print(
            f"{'damage':16} {'search':>10} {'scan':>10} {'per record':>10} {'open':>10}"
            "  records kept"
        )
        for kind in ("none", "bit", "zero 4 KiB", "zero 1 MiB", "garbage 1 MiB", "zero tail 4 MiB"):
            data, start = damaged(clean, kind) if kind != "none" else (clean, -1)
            searched = ""
            if start >= 0:
                t = best(args.rounds, partial(outbox._next_record, data, start + 1))
                searched = f"{t * 1000:8.1f}ms"
            t_scan = best(args.rounds, partial(outbox._scan, data))
            t_per_record = best(args.rounds, partial(per_record_scan, data))
            t_open = best(args.rounds, open_box, partial(place, data))
            place(data)
            print(
                f"{kind:16} {searched:>10} {t_scan * 1000:8.1f}ms {t_per_record * 1000:8.1f}ms "
                f"{t_open * 1000:8.1f}ms  {open_box()}"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
