"""`sae-cxr train-transcoders` and `sae-cxr attribute` under torchrun with 2 gloo ranks give what
one process gives: the same ensemble (members split 3 + 2 among the ranks) and the same tables."""

from __future__ import annotations

import json

import pandas as pd
from safetensors.numpy import load_file

from sae_cxr.config import RunConfig
from sae_cxr.pipeline import run_stage
from sae_cxr.run import RunDir
from tests.distributed.harness import assert_tensors_equal, copy_run, one_thread, stage_summary, torchrun


def test_two_ranks_train_the_same_ensemble_and_keep_finished_slices(base_run, tmp_path):
    base, cfg_path = base_run
    one, two = copy_run(base, tmp_path / "one"), copy_run(base, tmp_path / "two")
    with one_thread():
        run_stage(RunDir(one), "train-transcoders", RunConfig.load(cfg_path), force=True)
    proc, _ = torchrun(2, ["train-transcoders", "--run", str(two), "--config", str(cfg_path), "--force"])
    assert proc.stdout.count("train-transcoders: done") == 1, proc.stdout

    # the saved ensemble has the single-process format and, member for member, the same weights
    w1 = load_file(str(one / "transcoders/ensemble.safetensors"))
    w2 = load_file(str(two / "transcoders/ensemble.safetensors"))
    assert_tensors_equal(w1, w2, what="ensemble")  # bit for bit: members never couple
    c1 = json.loads((one / "transcoders/config.json").read_text())
    c2 = json.loads((two / "transcoders/config.json").read_text())
    assert c1 == c2
    history = json.loads((two / "transcoders/history.json").read_text())
    assert history["world_size"] == 2 and [p["members"] for p in history["parts"]] == [[0, 3], [3, 5]]
    assert not (two / "transcoders/parts").exists() and not (two / "transcoders/checkpoint").exists()
    s1, s2 = stage_summary(one, "train-transcoders")["summary"], stage_summary(two, "train-transcoders")["summary"]
    assert s2["world_size"] == 2 and s2["members"] == s1["members"] == 5

    # a failure on rank 1 stops both ranks with an error naming it; rank 0's finished slice is kept
    # and reused by the rerun, which then gives the same ensemble again
    blocker = two / "transcoders/checkpoint/members-00003-00005"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a directory")  # rank 1 cannot write its checkpoint
    failed, _ = torchrun(2, ["train-transcoders", "--run", str(two), "--config", str(cfg_path), "--force"],
                         check=False)
    assert failed.returncode != 0
    assert "rank 1" in failed.stderr and "failed on 1 of 2 ranks" in failed.stderr, failed.stderr[-3000:]
    assert (two / "transcoders/parts/members-00000-00003/ensemble.safetensors").exists()
    assert stage_summary(two, "train-transcoders")["status"] != "done"
    blocker.unlink()
    again, _ = torchrun(2, ["--verbose", "train-transcoders", "--run", str(two), "--config", str(cfg_path)])
    assert "members [0, 3) already trained: kept" in again.stderr, again.stderr[-3000:]
    assert_tensors_equal(w1, load_file(str(two / "transcoders/ensemble.safetensors")), rtol=1e-5, atol=1e-6,
                         what="ensemble after resume")


def test_two_ranks_attribute_like_one(base_run, tmp_path):
    base, cfg_path = base_run
    one, two = copy_run(base, tmp_path / "one"), copy_run(base, tmp_path / "two")
    with one_thread():
        run_stage(RunDir(one), "attribute", RunConfig.load(cfg_path))
    proc, _ = torchrun(2, ["attribute", "--run", str(two), "--config", str(cfg_path)])
    assert proc.stdout.count("attribute: done") == 1, proc.stdout
    for name in ("predictions.parquet", "contributions.parquet"):
        a = pd.read_parquet(one / "attributions" / name)
        b = pd.read_parquet(two / "attributions" / name)
        assert len(a) > 0
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-6)
    assert not (two / "attributions/parts").exists()
    s1, s2 = stage_summary(one, "attribute")["summary"], stage_summary(two, "attribute")["summary"]
    assert s2["world_size"] == 2 and s1["predictions"] == s2["predictions"]
    assert abs(s1["completeness_error"] - s2["completeness_error"]) < 1e-5
