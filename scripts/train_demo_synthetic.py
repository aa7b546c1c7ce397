#!/usr/bin/env python
"""Time the demo's default ensemble (E=100, d_in=d_out=256, m=512, k=32) on phantom-like pairs.

Data: sae_cxr.transcoders.synthetic.synthetic_pairs (a sparse mixture of ~4 of 40 concept
directions plus noise, L2-normalised; h = relu(W1 x + b1) of a random-ish head). Trains on
--n-train samples with the default TrainConfig (or --epochs), then evaluates every member on
--n-test held-out samples with the metrics module. Prints wall time, samples/s and the table.

Usage: python scripts/train_demo_synthetic.py [--n-train 5000] [--epochs 20] [--members 100]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sae_cxr.transcoders.ensemble import EnsembleConfig  # noqa: E402
from sae_cxr.transcoders.metrics import evaluate_ensemble  # noqa: E402
from sae_cxr.transcoders.synthetic import synthetic_pairs  # noqa: E402
from sae_cxr.transcoders.train import TrainConfig, train_ensemble  # noqa: E402

FINDINGS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--members", type=int, default=100)
    ap.add_argument("--epochs", type=float, default=None, help="default: TrainConfig's")
    ap.add_argument("--batch", type=int, default=None, help="default: TrainConfig's")
    ap.add_argument("--magnitude", default="presence", choices=["presence", "exponential"])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--head", default="dense", choices=["dense", "concept"])
    ap.add_argument("--threads", type=int, default=None, help="torch/kernel threads (default: torch's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = synthetic_pairs(args.n_train + args.n_test, magnitude=args.magnitude, head=args.head, seed=args.seed)
    xtr, htr = data.x[: args.n_train], data.h[: args.n_train]
    xte, hte, yte = data.x[args.n_train:], data.h[args.n_train:], data.labels[args.n_train:]
    ecfg = EnsembleConfig(d_in=256, d_out=256, n_members=args.members, n_latents=512, k=32)
    kw = {}
    if args.epochs is not None:
        kw["epochs"] = args.epochs
    if args.batch is not None:
        kw["batch_size"] = args.batch
    tcfg = TrainConfig(**kw)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}")
    print(f"training E={args.members} on {args.n_train} samples: {tcfg}", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    model, hist = train_ensemble(xtr, htr, ecfg, tcfg, progress=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    last = hist.records[-1]
    print(f"\nwall {wall:.1f} s, process CPU {cpu:.1f} s ({hist.steps} steps, "
          f"{hist.steps * tcfg.batch_size / wall:.0f} samples/s wall, backend {hist.backend}); "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"last training batch: median FVU {last['fvu']:.4f}, median L0 {last['l0']:.1f}, "
          f"median dead (no fire in {min(10_000_000, args.n_train)} samples) {last['dead']:.3f}")
    tr = evaluate_ensemble(model, xtr, htr, data.W2, data.b2)
    te = evaluate_ensemble(model, xte, hte, data.W2, data.b2, yte, findings=FINDINGS)
    print(f"\nTRAIN set ({args.n_train}): median FVU {tr.summary()['fvu']['median']:.4f}, "
          f"median dead {tr.summary()['dead_fraction']['median']:.4f}")
    print(f"HELD-OUT set ({args.n_test}):")
    print(te.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"wall_s": wall, "cpu_s": cpu, "history": hist.to_dict(), "train": tr.to_dict(), "test": te.to_dict()}, f)


if __name__ == "__main__":
    main()
