"""Launch the CLI under torchrun on loopback and build the tiny run the distributed tests share."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]


def tiny_config(backbone: str, n: int = 64) -> dict:
    """A RunConfig (as a dict) small enough for 2 shared cores: every stage in seconds."""
    from sae_cxr.config import RunConfig

    cfg = RunConfig(name="dist", seed=0)
    cfg.data.phantom.n, cfg.data.phantom.size = n, 64
    cfg.data.phantom.shortcut = "pacemaker:Cardiomegaly:0.9"
    cfg.extract.backbone = backbone
    cfg.extract.batch_size, cfg.extract.shard_size, cfg.extract.num_workers = 8, 16, 0
    cfg.extract.device = "cpu"
    cfg.classifier.hidden, cfg.classifier.max_epochs, cfg.classifier.n_boot = 32, 30, 20
    cfg.classifier.device = "cpu"
    tc = cfg.transcoders
    tc.n_members, tc.n_latents, tc.k, tc.device = 5, 64, 4, "cpu"
    tc.train.epochs, tc.train.batch_size, tc.train.checkpoint_every = 6.0, 16, 5
    tc.train.min_samples = 0
    cfg.patterns.probe_size = 256
    cfg.attribution.faithfulness_samples, cfg.attribution.localization_images = 20, 8
    cfg.attribution.batch_size = 7  # several batches per rank, boundaries that differ between 1 and 2 ranks
    return cfg.to_dict()


def build_base_run(root: Path, stages: tuple[str, ...]) -> tuple[Path, Path]:
    """A run through `stages`, built in this process; returns (run dir, config file)."""
    from sae_cxr.config import RunConfig
    from sae_cxr.pipeline import run_stage
    from sae_cxr.run import RunDir
    from tests.helpers import tiny_phantom_clip

    weights = tiny_phantom_clip(root / "backbone")
    cfg_path = root / "config.json"
    cfg_path.write_text(json.dumps(tiny_config(f"phantom:{weights}"), indent=1))
    cfg = RunConfig.load(cfg_path)
    run = RunDir(root / "base", create=True)
    for s in stages:
        t0 = time.perf_counter()
        run_stage(run, s, cfg)
        print(f"base run: {s} {time.perf_counter() - t0:.1f} s")  # shown with pytest -s
    return run.path, cfg_path


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def torchrun(nproc: int, args: list[str], timeout: float = 300, check: bool = True
             ) -> tuple[subprocess.CompletedProcess, float]:
    """`torchrun --standalone --nproc_per_node nproc -m sae_cxr.cli -- ARGS` on loopback, one thread per
    process (torchrun's own default for several processes; set for one too, so runs compare bit for bit).
    The `--` keeps torchrun's parser off our flags: it would take `--run` for an abbreviation of its `--run-path`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "SAE_CXR_NO_PROGRESS": "1",
           "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "--module", "sae_cxr.cli", "--", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc, wall


def stage_summary(run: Path, stage: str) -> dict:
    return json.loads((run / "manifest.json").read_text())["stages"][stage]


def assert_tensors_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray], rtol: float = 0.0, atol: float = 0.0,
                         what: str = "") -> None:
    assert sorted(a) == sorted(b), f"{what}: arrays {sorted(a)} vs {sorted(b)}"
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, f"{what}/{k}: {a[k].shape} vs {b[k].shape}"
        if rtol == 0 and atol == 0:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{what}/{k}")
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=f"{what}/{k}")


@contextlib.contextmanager
def one_thread():
    """Run in-process references on one thread, as each torchrun worker does (OMP_NUM_THREADS=1):
    the CPU kernels' results depend on the thread count at float rounding level."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
