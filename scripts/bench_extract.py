"""Extraction throughput of the backbones on 2 CPU cores (or the GPU when present).

For each backbone, median images/s over repeats of:
  - forward: encoding already-preprocessed pixels (the model alone: the baseline);
  - end to end: reading PNG files from disk, decoding, letterboxing, normalising and encoding,
and the share of end-to-end time spent outside the model (decode + preprocess).

Backbones: the shipped phantom model, and the FULL-SIZE BiomedCLIP architecture (ViT-B/16 at
224 px) with random weights built offline (timing only; its outputs mean nothing).

    python scripts/bench_extract.py [--images 128] [--repeats 3] [--skip-biomedclip]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _pngs(n: int, size: int, out: Path) -> list[Path]:
    from sae_cxr.data.phantom import PhantomConfig, PhantomWorld
    from PIL import Image

    world = PhantomWorld(PhantomConfig(n=n, size=size, seed=5))
    paths = []
    for cases, images in world.batches(32, range(n)):
        for c, img in zip(cases, images):
            p = out / f"{len(paths):05d}.png"
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(p)
            paths.append(p)
    return paths


def bench(backbone, paths: list[Path], batch: int, repeats: int) -> tuple[float, float]:
    from sae_cxr.data.images import load_image

    imgs = [load_image(p) for p in paths[:batch]]
    pixels, _ = backbone.preprocess(imgs)
    with torch.no_grad():
        backbone.encode_pixels(pixels[:2])  # warm-up
    fwd, e2e = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            for s in range(0, len(paths), batch):
                backbone.encode_pixels(pixels[: min(batch, len(paths) - s)])
        fwd.append(len(paths) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        with torch.no_grad():
            for s in range(0, len(paths), batch):
                backbone.encode_images([load_image(p) for p in paths[s:s + batch]])
        e2e.append(len(paths) / (time.perf_counter() - t0))
    return statistics.median(fwd), statistics.median(e2e)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=256, help="PNG side on disk")
    ap.add_argument("--skip-biomedclip", action="store_true")
    a = ap.parse_args()
    from sae_cxr.backbones.base import load_backbone

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, torch threads {torch.get_num_threads()}, {a.images} PNGs of {a.size} px")
    with tempfile.TemporaryDirectory() as tmp:
        paths = _pngs(a.images, a.size, Path(tmp))
        backbones = [("phantom", lambda: load_backbone("phantom", device=device))]
        if not a.skip_biomedclip:
            from sae_cxr.backbones.biomedclip import build_biomedclip_architecture

            backbones.append(("biomedclip-architecture", lambda: build_biomedclip_architecture(device=device)))
        for name, make in backbones:
            b = make()
            fwd, e2e = bench(b, paths, a.batch, a.repeats)
            outside = 1.0 - e2e / fwd
            print(f"{name:26s} forward {fwd:8.1f} img/s | end to end {e2e:8.1f} img/s | "
                  f"ratio {e2e / fwd:.2f} | decode+preprocess share {outside:.0%}")


if __name__ == "__main__":
    main()
