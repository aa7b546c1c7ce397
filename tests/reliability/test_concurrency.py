"""Two dashboard sessions read a run while a pipeline stage is redone in another process: every read
returns the complete, checksummed table or a StageMissingError saying the stage is being redone,
never a partial or mixed table; a second writer of the same stage fails fast."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from sae_cxr.attribution import load_predictions
from sae_cxr.run import RunDir, RunError, StageMissingError
from tests.reliability.conftest import copy_run
from tests.reliability.test_crash import REPO


def _redo(run: RunDir, config) -> subprocess.Popen:
    """A child process redoing the attribute stage (--force) on the run."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "SAE_CXR_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("SAE_CXR_KILL", None)
    return subprocess.Popen([sys.executable, "-m", "tests.reliability.tiny", "--run", str(run.path), "--config",
                             str(config), "--stages", "attribute", "--force"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _difference(preds: pd.DataFrame, reference: pd.DataFrame) -> str:
    """'' when `preds` is the whole finished table (the child recomputes it with one thread: floats may
    differ in the last bits), else what differs."""
    try:
        pd.testing.assert_frame_equal(preds, reference, rtol=1e-5, atol=1e-6)
    except AssertionError as e:
        return str(e)[:300]
    return ""


def _session(run: RunDir, stop: threading.Event, outcomes: list, reference: pd.DataFrame) -> None:
    """A dashboard session polling the predictions table."""
    while not stop.is_set():
        try:
            preds, _ = load_predictions(RunDir(run.path))
        except StageMissingError as e:
            outcomes.append(("refused", str(e)))
        except Exception as e:  # anything else is a torn or mixed read: the failure this test looks for
            outcomes.append(("error", f"{type(e).__name__}: {e}"))
        else:
            outcomes.append(("complete", _difference(preds, reference)))
        time.sleep(0.005)


def test_sessions_read_complete_tables_while_attribution_is_redone(tiny_world, tmp_path):
    run = copy_run(tiny_world["reference"], tmp_path / "run")
    reference, _ = load_predictions(run)
    stop = threading.Event()
    outcomes: list[tuple[str, str]] = []
    sessions = [threading.Thread(target=_session, args=(run, stop, outcomes, reference)) for _ in range(2)]
    for s in sessions:
        s.start()
    writer = _redo(run, tiny_world["config_path"])
    try:
        lock = run.path / ".stage-attribute.lock"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and writer.poll() is None:
            if lock.exists() and f"pid {writer.pid} " in lock.read_text():
                break
            time.sleep(0.01)
        try:  # a second writer of the same stage, while the child holds it
            with RunDir(run.path).stage_lock("attribute"):
                refused = ""
        except RunError as e:
            refused = str(e)
        if writer.poll() is None:  # still running after our attempt: we must have been refused
            assert "is already running" in refused and f"pid {writer.pid}" in refused
        out, _ = writer.communicate(timeout=240)
        assert writer.returncode == 0, out
    finally:
        time.sleep(0.2)
        stop.set()
        for s in sessions:
            s.join()
    kinds = {k for k, _ in outcomes}
    assert "error" not in kinds, [m for k, m in outcomes if k == "error"][:3]
    assert [m for k, m in outcomes if k == "complete" and m] == []
    assert "complete" in kinds
    after, _ = load_predictions(RunDir(run.path))
    assert _difference(after, reference) == ""
