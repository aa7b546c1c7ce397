"""A tiny complete run (every stage, a planted shortcut) built once per session for the dashboard tests.

Built through the real pipeline with a tiny random phantom backbone and small stage settings, so the
app is exercised on the same files a real run has; about half a minute on two busy cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sae_cxr.config import RunConfig, from_dict
from sae_cxr.pipeline import run_pipeline
from sae_cxr.run import RunDir
from tests.helpers import tiny_phantom_clip

SHORTCUT = "pacemaker:Cardiomegaly:0.9"


def tiny_config(backbone: str) -> RunConfig:
    """Every stage at toy size: 160 images of 64 px, three 64-latent transcoders."""
    return from_dict(RunConfig, {
        "name": "tiny", "seed": 0,
        "data": {"phantom": {"n": 160, "size": 64, "seed": 0, "shortcut": SHORTCUT}},
        "extract": {"backbone": backbone, "batch_size": 32, "num_workers": 0, "device": "cpu"},
        "classifier": {"hidden": 32, "max_epochs": 25, "patience": 10, "n_boot": 20, "device": "cpu"},
        "transcoders": {"n_members": 3, "n_latents": 64, "k": 8, "device": "cpu",
                        "train": {"epochs": 10, "batch_size": 32, "log_every": 5}},
        "patterns": {"probe_size": 160, "top_k": 10, "min_frequency": 0.005},
        "galleries": {"top_k": 6, "heldout_top": 4, "negatives": 3, "heldout_negatives": 4, "per_quantile": 2,
                      "quantile_bins": 3},
        "attribution": {"faithfulness_samples": 10, "faithfulness_steps": 4, "random_repeats": 1,
                        "localization_images": 10, "max_patterns": 10},
        "label": {"verification": {"n_pos": 6, "n_neg": 6}, "evidence": {"top_k": 10, "min_top": 2},
                  "text": {"top_k": 10, "min_top": 2}},
        "explain": {"max_predictions": 40},
    })


@pytest.fixture(scope="session")
def app_root(tmp_path_factory) -> Path:
    """An artifacts folder holding the tiny backbone (not a run) and, below, the runs."""
    root = tmp_path_factory.mktemp("artifacts")
    tiny_phantom_clip(root / "clip")
    return root


@pytest.fixture(scope="session")
def tiny_run(app_root) -> RunDir:
    """A complete run: every stage done."""
    run = RunDir(app_root / "tiny", create=True)
    run_pipeline(run, tiny_config(f"phantom:{app_root / 'clip'}"))
    return run


@pytest.fixture(scope="session")
def partial_run(app_root, tiny_run) -> RunDir:
    """A run stopped after the data stage (what a user sees mid-pipeline)."""
    run = RunDir(app_root / "partial", create=True)
    run_pipeline(run, tiny_config(f"phantom:{app_root / 'clip'}"), stages=["data"])
    return run


@pytest.fixture
def use_run(monkeypatch):
    """Point the app at a run (as `--run` does); returns a setter."""
    def set_run(run: RunDir) -> None:
        monkeypatch.setenv("SAE_CXR_RUN", str(run.path))
        monkeypatch.delenv("SAE_CXR_ARTIFACTS", raising=False)
    return set_run


APP = str(Path(__file__).resolve().parents[2] / "app" / "Home.py")
os.environ.setdefault("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")
