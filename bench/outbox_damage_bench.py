"""Opening a large worker outbox after damage: the cost of finding the next intact record.

Run: .venv/bin/python bench/outbox_damage_bench.py [--mib 32] [--rounds 3]

Writes an outbox of about `--mib` MiB of work reports, then for each kind of damage (a
flipped bit, a zeroed 4 KiB page, a zeroed MiB and a MiB of garbage near the start, a 4 MiB
tail of zeros as a crash leaves when the file grew but its blocks were never written) times
the search from the damage to the next intact record (`outbox._next_record`) and the whole
`Outbox.open`, best of `--rounds`, beside the open of the undamaged file. Run it with
PYTHONPATH pointing at another checkout's src to compare two versions.
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


def best(rounds: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(rounds):
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

        def open_file(data: bytes) -> int:
            directory = root / "box"
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            (directory / "events.log").write_bytes(data)
            box = Outbox.open(directory)
            kept = len(box)
            box.close()
            return kept

        print(f"{'damage':16} {'search':>10} {'open':>10}  records kept")
        t_open = best(args.rounds, partial(open_file, clean))
        print(f"{'none':16} {'':>10} {t_open * 1000:8.1f}ms  {open_file(clean)}")
        for kind in ("bit", "zero 4 KiB", "zero 1 MiB", "garbage 1 MiB", "zero tail 4 MiB"):
            data, start = damaged(clean, kind)
            t_search = best(args.rounds, partial(outbox._next_record, data, start + 1))
            t_open = best(args.rounds, partial(open_file, data))
            print(f"{kind:16} {t_search * 1000:8.1f}ms {t_open * 1000:8.1f}ms  {open_file(data)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
