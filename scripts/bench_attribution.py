"""Decomposition throughput: images/s of the exact attribution (every finding, every pattern).

Builds the demo-sized ensemble (100 members, 128 latents, BatchTopK k=32, 256 -> 256) and head
(5 findings) with random weights and a random latent -> pattern map (~200 patterns), then times
`Attributor.decompose` on batches of embeddings against a baseline in the same process: the same
identity computed per image and per member with dense numpy (the obvious implementation). Prints
median images/s over repeats and the ratio; checks both agree to 1e-8 first.

    python scripts/bench_attribution.py [--images 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def build(E: int, m: int, k: int, d: int, hidden: int, C: int, P: int, seed: int = 0):
    from sae_cxr.attribution import Attributor
    from sae_cxr.classifier import ClassifierHead
    from sae_cxr.transcoders.ensemble import EnsembleConfig, TranscoderEnsemble

    torch.manual_seed(seed)
    ens = TranscoderEnsemble(EnsembleConfig(d_in=d, d_out=hidden, n_members=E, n_latents=m, k=k,
                                            activation="batchtopk", seed=seed))
    head = ClassifierHead(d, hidden, C)
    rng = np.random.default_rng(seed)
    lp = rng.integers(-1, P, size=(E, m))  # -1 = unassigned latents
    return Attributor(ens, head, lp), ens, head, lp


def loop_baseline(attr, ens, head, lp, x: np.ndarray) -> np.ndarray:
    """Per image, per member: dense codes @ W_dec, then W2 per pattern. Returns [B, P, C]."""
    W_dec = ens.W_dec.detach().double().numpy()
    W2 = head.fc2.weight.detach().double().numpy()
    P = attr.n_patterns
    with torch.no_grad():
        z = ens.encode(torch.from_numpy(x).float()).to_dense().double().numpy()  # [B, E, m]
    out = np.zeros((len(x), P, W2.shape[0]))
    for b in range(len(x)):
        for e in range(z.shape[1]):
            for j in np.flatnonzero(z[b, e]):
                if lp[e, j] >= 0:
                    out[b, lp[e, j]] += z[b, e, j] * (W_dec[e, j] @ W2.T)
    return out / z.shape[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--baseline-images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--members", type=int, default=100)
    ap.add_argument("--latents", type=int, default=128)
    a = ap.parse_args()
    attr, ens, head, lp = build(a.members, a.latents, 32, 256, 256, 5, 200)
    x = np.random.default_rng(1).standard_normal((a.images, 256)).astype(np.float32)
    small = x[:a.baseline_images]
    ref = loop_baseline(attr, ens, head, lp, small[:8])
    got = attr.decompose(small[:8]).contributions
    assert np.allclose(ref, got, atol=1e-8), "the fast decomposition disagrees with the loop"
    fast, slow = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        for s in range(0, a.images, a.batch):
            attr.decompose(x[s:s + a.batch])
        fast.append(a.images / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        loop_baseline(attr, ens, head, lp, small)
        slow.append(len(small) / (time.perf_counter() - t0))
    f, s = statistics.median(fast), statistics.median(slow)
    print(f"ensemble {a.members} x {a.latents} (BatchTopK k=32), 5 findings, {attr.n_patterns} patterns, "
          f"torch threads {torch.get_num_threads()}")
    print(f"decompose: median {f:,.0f} images/s over {a.repeats} repeats of {a.images} (target >= 1,000)")
    print(f"per-image loop baseline: median {s:,.1f} images/s; ratio {f / s:,.0f}x")


if __name__ == "__main__":
    main()
