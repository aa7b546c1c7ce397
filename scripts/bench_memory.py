"""Peak RSS of extraction and attribution as the data set grows, against a baseline in this process.

The claim under test (issue 11): extracting and attributing 100k phantom images needs memory
bounded by the batch and shard size, not by the number of images. One process measures every
size, so allocator state, imported libraries and the model are the same for all of them:
before each stage freed heap is returned to the kernel (malloc_trim) and the kernel's peak-RSS
counter (VmHWM) is reset through /proc/self/clear_refs, and the stage's peak is read back
afterwards. Printed per size and stage: RSS at the start, the peak, the growth during the stage
(peak - start) and both as a ratio to the smallest size.

What scales with the number of images is the pipeline's bookkeeping (records, shards, the
attribution tables), not one batch's pixels, so the expensive parts are made cheap to reach 100k
images on two CPU cores: the backbone is a fixed random projection of the pooled image to 512-d
(BiomedCLIP's width, so an array held per image would show: 100k x 512 x 4 B = 195 MiB), and
pixels come from a bank of 64 rendered phantom images cycled over the records (the records'
ids, labels, concepts, boxes and reports are the phantom world's, all N of them). Extraction
reads its records from the run's records.parquet as the pipeline's extract stage does
(`RunRecords`, Records built one shard at a time), with only the pixel loader swapped for the bank;
the harness holds no record list during it. The model
(classifier, 3 transcoders, patterns) is trained once, on the baseline size, in a child process,
so its memory does not sit in the measuring process; every size reuses it. The baseline size is
measured twice and the first pass (first-use imports and allocator growth) is not used.

    PYTHONPATH=. python scripts/bench_memory.py --sizes 1000 10000 100000
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("SAE_CXR_NO_PROGRESS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sae_cxr.attribution import run_attribute  # noqa: E402
from sae_cxr.backbones.base import Backbone, ImageEncoding, state_dict_sha256  # noqa: E402
from sae_cxr.config import RunConfig  # noqa: E402
from sae_cxr.data.phantom import PhantomConfig, PhantomWorld  # noqa: E402
from sae_cxr.extract import run_extract  # noqa: E402
from sae_cxr.ingest import RunRecords, write_records  # noqa: E402
from sae_cxr.run import RECORDS, RunDir  # noqa: E402

MODEL_STAGES = ("train-classifier", "train-transcoders", "patterns")
NOT_COPIED = ("data", "embeddings", "attributions", "galleries", "indices", "records.parquet")


@dataclass
class StageMemory:
    """One stage at one size; MiB from /proc/self/status."""

    n: int
    stage: str
    start_mib: float
    peak_mib: float
    seconds: float

    @property
    def growth_mib(self) -> float:
        return self.peak_mib - self.start_mib


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next reading is this stage's peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def release_free_memory() -> None:
    """Hand freed heap back to the kernel (glibc malloc_trim), so that a stage does not start on the
    previous stage's freed-but-kept pages: its growth would then read as ~0 whatever it allocates."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: growth may then be understated
        pass


def measure(n: int, stage: str, fn: Callable[[], object]) -> StageMemory:
    gc.collect()
    release_free_memory()
    reset_peak()
    start = _status_kib("VmRSS")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return StageMemory(n, stage, start / 1024, _status_kib("VmHWM") / 1024, seconds)


class ProjectionBackbone(Backbone):
    """A fixed random projection of the 8x8-pooled image: a backbone at memory-benchmark cost."""

    def __init__(self, embed_dim: int = 512, image_size: int = 32, seed: int = 0):
        self.name, self.embed_dim, self.image_size = "projection", embed_dim, image_size
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(64, embed_dim, generator=g) / 8.0

    def encode_pixels(self, pixels: torch.Tensor, with_patches: bool = False) -> ImageEncoding:
        pooled = torch.nn.functional.adaptive_avg_pool2d(pixels[:, :1].float(), 8).flatten(1)
        emb = torch.nn.functional.normalize(torch.tanh(pooled @ self.proj), dim=1)
        return ImageEncoding(embedding=emb, patches=None, grid=(8, 8))

    @property
    def weights_sha256(self) -> str:
        return state_dict_sha256({"proj": self.proj})


class BankLoader:
    """Pixels for record i: rendered phantom image i mod len(bank)."""

    def __init__(self, bank: np.ndarray, i: int):
        self.bank, self.i = bank, i

    def __call__(self) -> np.ndarray:
        return self.bank[self.i % len(self.bank)]


def bench_config(n: int, batch: int) -> RunConfig:
    cfg = RunConfig(name="bench-memory", seed=0)
    cfg.data.phantom.n, cfg.data.phantom.size, cfg.data.phantom.seed = n, 32, 0
    cfg.extract.backbone = "projection"
    cfg.extract.batch_size, cfg.extract.shard_size, cfg.extract.num_workers = batch, 4096, 0
    cfg.extract.patches = "none"
    cfg.classifier.hidden, cfg.classifier.max_epochs, cfg.classifier.patience, cfg.classifier.n_boot = 16, 10, 3, 10
    cfg.transcoders.n_members, cfg.transcoders.n_latents, cfg.transcoders.k = 3, 64, 8
    cfg.transcoders.train.batch_size, cfg.transcoders.train.epochs = 64, 3.0
    cfg.transcoders.train.min_samples = 0
    cfg.patterns.min_stability, cfg.patterns.min_frequency, cfg.patterns.max_frequency = 0.3, 0.005, 0.95
    cfg.attribution.splits = ("train", "val", "test", "test_shifted")  # every image, not only the test split
    cfg.attribution.batch_size = batch
    cfg.attribution.faithfulness_samples, cfg.attribution.localization_images = 50, 0
    return cfg


def write_data(run: RunDir, cfg: RunConfig, n: int) -> None:
    """records.parquet for the first n phantom cases, the data stage marked done (the records are dropped)."""
    pcfg = PhantomConfig.from_dict({**cfg.data.phantom.to_dict(), "n": n})
    ds = PhantomWorld(pcfg).dataset()
    write_records(run, ds)
    run.update_manifest(dataset=ds.spec)
    run.finish_stage("data", [RECORDS])


def extract(run: RunDir, cfg: RunConfig, bank: np.ndarray, backbone: Backbone) -> None:
    """The extract stage's path: records streamed from records.parquet, a shard at a time; pixels from the bank."""
    records = RunRecords(run, loader=lambda i, rid: BankLoader(bank, i))
    outputs, _ = run_extract(run, cfg.extract, records, backbone=backbone, progress=False)
    run.finish_stage("extract", outputs)


def render_bank(cfg: RunConfig, k: int = 64) -> np.ndarray:
    world = PhantomWorld(cfg.data.phantom)
    return world.render(world.cases(range(k)))


def train_model(model_dir: Path, n: int, batch: int) -> None:
    """The child process: data and embeddings for n images, then classifier, transcoders, patterns."""
    from sae_cxr.pipeline import run_stage

    cfg = bench_config(n, batch)
    run = RunDir(model_dir, create=True)
    write_data(run, cfg, n)
    extract(run, cfg, render_bank(cfg), ProjectionBackbone())
    for name in MODEL_STAGES:
        run_stage(run, name, cfg)


def sized_run(model: RunDir, dst: Path, cfg: RunConfig, n: int, bank: np.ndarray, backbone: Backbone
              ) -> list[StageMemory]:
    """A run with the model's classifier, transcoders and patterns and `n` phantom records."""
    shutil.copytree(model.path, dst, ignore=shutil.ignore_patterns(*NOT_COPIED, ".*.lock"))
    run = RunDir(dst)
    out = [measure(n, "records", lambda: write_data(run, cfg, n)),
           measure(n, "extract", lambda: extract(run, cfg, bank, backbone))]
    out.append(measure(n, "attribute", lambda: run_attribute(run, cfg.attribution, progress=False)))
    shutil.rmtree(dst)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000],
                    help="data-set sizes; the first is the baseline (and trains the model)")
    ap.add_argument("--batch", type=int, default=64, help="extraction and attribution batch size")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--train-model", type=Path, default=None, help=argparse.SUPPRESS)  # the child process
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    base = a.sizes[0]
    if a.train_model is not None:
        train_model(a.train_model, base, a.batch)
        return 0
    if not Path("/proc/self/clear_refs").exists():
        print("needs Linux /proc/self/clear_refs to reset the peak-RSS counter", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="bench-memory-", dir=a.workdir))
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--sizes", str(base), "--batch", str(a.batch),
                        "--train-model", str(root / "model")], check=True, stdout=subprocess.DEVNULL)
        cfg = bench_config(base, a.batch)
        print(f"model trained on {base} images in a child process in {time.perf_counter() - t0:.0f} s; "
              f"batch {a.batch}, shard {cfg.extract.shard_size}, embedding 512-d, {torch.get_num_threads()} threads",
              flush=True)
        model, bank, backbone = RunDir(root / "model"), render_bank(cfg), ProjectionBackbone()
        sized_run(model, root / "warmup", cfg, base, bank, backbone)  # first-use costs, not reported
        results: list[StageMemory] = []
        for n in a.sizes:
            results += sized_run(model, root / f"n{n}", cfg, n, bank, backbone)
            for r in results[-3:]:
                print(f"  n={n:>7} {r.stage:<9} start {r.start_mib:7.1f} MiB  peak {r.peak_mib:7.1f} MiB  "
                      f"growth {r.growth_mib:7.1f} MiB  {r.seconds:6.1f} s", flush=True)
        print(f"\npeak RSS and growth during the stage, as ratios to the baseline n={base} (same process):")
        print(f"{'stage':<10}{'n':>8}{'n ratio':>9}{'peak MiB':>10}{'peak ratio':>12}{'growth MiB':>12}"
              f"{'growth ratio':>14}")
        first = {r.stage: r for r in results if r.n == base}
        for r in results:
            b = first[r.stage]
            print(f"{r.stage:<10}{r.n:>8}{r.n / base:>9.0f}{r.peak_mib:>10.1f}{r.peak_mib / b.peak_mib:>12.2f}"
                  f"{r.growth_mib:>12.1f}{r.growth_mib / max(b.growth_mib, 0.1):>14.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
