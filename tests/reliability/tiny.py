"""A whole pipeline in seconds: a tiny phantom world, a tiny backbone, small stage settings.

Shared by the crash, concurrency and secret tests (and runnable as a child process: see
`python -m tests.reliability.tiny --help`), so every test exercises the real stages through
`run_stage`, the same path the CLI takes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sae_cxr.config import RunConfig, from_dict, to_dict


def tiny_config(backbone_dir: Path, n: int = 96, seed: int = 0) -> RunConfig:
    """Every stage at a size that runs in seconds on two shared CPU cores."""
    cfg = RunConfig(name="tiny", seed=seed)
    cfg.data.phantom.n, cfg.data.phantom.size, cfg.data.phantom.seed = n, 64, seed
    cfg.data.phantom.shortcut = "pacemaker:Cardiomegaly:0.9"
    cfg.extract.backbone = f"phantom:{backbone_dir}"
    cfg.extract.batch_size, cfg.extract.shard_size, cfg.extract.num_workers = 8, 16, 0
    cfg.classifier.hidden, cfg.classifier.max_epochs, cfg.classifier.patience = 16, 15, 5
    cfg.classifier.n_boot = 20
    cfg.transcoders.n_members, cfg.transcoders.n_latents, cfg.transcoders.k = 3, 32, 4
    cfg.transcoders.train.batch_size, cfg.transcoders.train.epochs = 16, 6.0
    cfg.transcoders.train.min_samples = 0
    cfg.transcoders.train.checkpoint_every = 5
    cfg.patterns.min_stability = 0.3
    cfg.patterns.min_frequency, cfg.patterns.max_frequency = 0.01, 0.9
    cfg.attribution.faithfulness_samples, cfg.attribution.localization_images = 10, 0
    cfg.label.labelers = ("evidence",)
    cfg.label.verify = "none"
    cfg.explain.max_predictions = 20
    return cfg


def save_config(cfg: RunConfig, path: Path) -> Path:
    path.write_text(json.dumps(to_dict(cfg), default=list))
    return path


def load_config(path: Path) -> RunConfig:
    return from_dict(RunConfig, json.loads(path.read_text()))


def main(argv: list[str] | None = None) -> int:
    """Run stages of a run in this process (a child the crash tests can kill)."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--stages", nargs="+", required=True)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    os.environ.setdefault("SAE_CXR_NO_PROGRESS", "1")
    from sae_cxr.pipeline import run_stage
    from sae_cxr.run import RunDir

    run = RunDir(a.run, create=True)
    cfg = load_config(Path(a.config))
    for name in a.stages:
        run_stage(run, name, cfg, force=a.force)
        print(f"done {name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
