"""The dashboard tests' runs: a copy of the suite's shared tiny run (every stage, the shipped phantom
backbone, a planted pacemaker -> Cardiomegaly shortcut) that these tests may write into, and beside it
a run stopped after its first stage; both in one artifacts folder, as the sidebar's run picker sees it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sae_cxr.pipeline import run_pipeline
from sae_cxr.run import RunDir
from tests.helpers import tiny_config

SHORTCUT = "pacemaker:Cardiomegaly:0.9"


@pytest.fixture(scope="session")
def app_root(tmp_path_factory) -> Path:
    """An artifacts folder holding the runs."""
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def tiny_run(app_root, tiny_pipeline_run) -> RunDir:
    """A complete run: every stage done (runs are relocatable, so a copy is a run)."""
    shutil.copytree(tiny_pipeline_run.path, app_root / "tiny", symlinks=True)
    return RunDir(app_root / "tiny")


@pytest.fixture(scope="session")
def partial_run(app_root) -> RunDir:
    """A run stopped after the data stage (what a user sees mid-pipeline)."""
    run = RunDir(app_root / "partial", create=True)
    run_pipeline(run, tiny_config(app_root / "partial", n=40), stages=["data"])
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
