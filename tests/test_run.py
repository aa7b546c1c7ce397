"""The run directory: atomic writes, manifest, stage bookkeeping, corruption detection."""

from __future__ import annotations

import json

import pytest

from sae_cxr.run import (CorruptFileError, RunDir, RunError, StageMissingError, atomic_path, check_run_name,
                         list_runs, write_json_atomic)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_stage_lifecycle_and_skip_logic(tmp_path):
    run = RunDir(tmp_path / "r", create=True)
    with pytest.raises(StageMissingError, match="stage 'data' has not finished"):
        run.require("data")
    run.begin_stage("data", "h1")
    assert not run.is_done("data")
    write_json_atomic(run / "records.json", {"a": 1})
    run.finish_stage("data", ["records.json"], {"records": 1})
    assert run.is_done("data", "h1") and not run.is_done("data", "h2")
    assert run.stage("data").summary == {"records": 1}
    assert run.verify_all() == ["records.json"]
    run.invalidate("data")
    assert run.stage("data") is None


def test_corruption_is_detected_and_named(tmp_path):
    run = RunDir(tmp_path / "r", create=True)
    run.begin_stage("s", "h")
    (run.path / "w.bin").write_bytes(b"weights")
    run.finish_stage("s", ["w.bin"])
    (run.path / "w.bin").write_bytes(b"weightz")
    with pytest.raises(CorruptFileError, match=r"w.bin is corrupt"):
        run.verify("w.bin")


def test_paths_cannot_escape_the_run(tmp_path):
    run = RunDir(tmp_path / "r", create=True)
    with pytest.raises(ValueError, match="escapes"):
        run.sub("../outside")
    for bad in ("..", "../x", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(ValueError):
            check_run_name(bad)
    assert check_run_name("demo-2.v1") == "demo-2.v1"


def test_opening_a_missing_run_says_what_to_do(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        RunDir(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(RunError, match="not a run directory"):
        RunDir(tmp_path / "plain")


def test_manifest_records_versions_and_config(tmp_path):
    run = RunDir(tmp_path / "r", create=True)
    run.set_config("data", {"source": "phantom"})
    m = json.loads((run.path / "manifest.json").read_text())
    assert m["config"]["data"] == {"source": "phantom"} and "python" in m["versions"]
    assert list_runs(tmp_path) == [run.path]
