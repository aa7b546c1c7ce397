"""Phantom-world throughput: images/s at the default size, serial and with one process per core.

Counts everything a user waits for: drawing each image's parameters, boxes and report, and
rendering the pixels. Prints the median of several repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from sae_cxr.data.phantom import PhantomConfig, PhantomWorld


def rate(world: PhantomWorld, n: int, workers: int, batch: int) -> float:
    t0 = time.perf_counter()
    count = sum(len(cases) for cases, _ in world.batches(batch, range(n), workers=workers))
    return count / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    world = PhantomWorld(PhantomConfig(n=a.n, size=a.size, shortcut="pacemaker:Cardiomegaly:0.9"))
    world.render(world.cases(range(8)))  # build the texture bank once
    cores = os.cpu_count() or 1
    print(f"phantom world: {a.n} images of {a.size}x{a.size}, {cores} cores, median of {a.repeats}")
    for workers in sorted({1, min(2, cores), cores}):
        rates = [rate(world, a.n, workers, a.batch) for _ in range(a.repeats)]
        print(f"  workers={workers}: {statistics.median(rates):7.0f} images/s "
              f"(min {min(rates):.0f}, max {max(rates):.0f})")


if __name__ == "__main__":
    main()
