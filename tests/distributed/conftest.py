"""A tiny run through the galleries stage, built once per session for the distributed tests."""

from __future__ import annotations

import pytest

from tests.distributed.harness import build_base_run, one_thread


@pytest.fixture(scope="session")
def base_run(tmp_path_factory):
    """(run dir through galleries, config file): each test copies it and never modifies it."""
    root = tmp_path_factory.mktemp("dist")
    with one_thread():
        return build_base_run(root, ("data", "extract", "train-classifier", "train-transcoders", "patterns",
                                     "galleries"))
