"""Shared test settings: quiet progress bars, offline hubs, deterministic torch threads."""

from __future__ import annotations

import os

os.environ.setdefault("SAE_CXR_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest


@pytest.fixture(scope="session")
def tiny_pipeline_run(tmp_path_factory):
    """One whole tiny run (every stage) shared by the tests that only read it. Copy it before writing."""
    from tests.helpers import build_tiny_run

    return build_tiny_run(tmp_path_factory.mktemp("tiny") / "run")
