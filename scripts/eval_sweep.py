"""Run the whole pipeline at its defaults on several phantom worlds and print the per-world table.

    python scripts/eval_sweep.py --out artifacts/sweep            # the five default worlds
    python scripts/eval_sweep.py --out artifacts/sweep --worlds demo artifact --n 3000

Each world lands in OUT/<world> (a normal run directory: open it in the dashboard); the table is
OUT/sweep.md and the numbers OUT/sweep.json. Finished stages are reused, so a stopped sweep resumes.
"""

from __future__ import annotations

import argparse
import logging

from sae_cxr.sweep import WORLDS, run_sweep, sweep_markdown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="artifacts/sweep")
    ap.add_argument("--n", type=int, default=6000, help="images per world (the demo's 6000 by default)")
    ap.add_argument("--worlds", nargs="*", default=None, help=f"subset of: {', '.join(w.name for w in WORLDS)}")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = a.worlds or [w.name for w in WORLDS]
    unknown = sorted(set(names) - {w.name for w in WORLDS})
    if unknown:
        ap.error(f"unknown world(s) {unknown}; worlds: {', '.join(w.name for w in WORLDS)}")
    worlds = [w for w in WORLDS if w.name in names]
    rows = run_sweep(a.out, worlds, n=a.n, on_world=lambda name, row: print(f"{name}: {row}", flush=True))
    print(sweep_markdown(rows, worlds))


if __name__ == "__main__":
    main()
