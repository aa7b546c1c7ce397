"""Fixtures of the reliability tests: one tiny finished run per session, copied for each test that
damages, kills or rewrites something."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sae_cxr.pipeline import run_stage
from sae_cxr.run import RunDir
from tests.helpers import tiny_phantom_clip
from tests.reliability.tiny import save_config, tiny_config

UP_TO_TRANSCODERS = ("data", "extract", "train-classifier", "train-transcoders")
ALL_BUT_EXPLAIN = UP_TO_TRANSCODERS + ("patterns", "galleries", "attribute", "label")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict:
    """A tiny backbone, its config (also as JSON, for child processes) and a finished reference run."""
    root = tmp_path_factory.mktemp("tiny-world")
    backbone = tiny_phantom_clip(root / "backbone")
    cfg = tiny_config(backbone)
    run = RunDir(root / "reference", create=True)
    for name in ALL_BUT_EXPLAIN:
        run_stage(run, name, cfg)
    return {"root": root, "cfg": cfg, "config_path": save_config(cfg, root / "config.json"), "reference": run}


def copy_run(src: RunDir, dst: Path, drop: tuple[str, ...] = (), remove: tuple[str, ...] = ()) -> RunDir:
    """A copy of a run with stages `drop` forgotten and paths `remove` deleted (runs are relocatable)."""
    shutil.copytree(src.path, dst, ignore=shutil.ignore_patterns(".stage-*.lock", ".manifest.lock"))
    run = RunDir(dst)
    if drop:
        run.invalidate(*drop)
    for rel in remove:
        p = run.sub(rel)
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return run
