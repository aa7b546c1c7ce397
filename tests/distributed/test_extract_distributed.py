"""`sae-cxr extract` under torchrun with 2 gloo ranks writes the shards one process writes."""

from __future__ import annotations

import json
import shutil

from safetensors import safe_open
from safetensors.numpy import load_file

from sae_cxr.config import RunConfig
from sae_cxr.pipeline import run_stage
from sae_cxr.run import RunDir
from tests.distributed.harness import assert_tensors_equal, copy_run, one_thread, stage_summary, torchrun


def _meta(path) -> dict:
    with safe_open(str(path), framework="np") as f:
        return f.metadata()


def test_two_ranks_write_the_same_shards_and_resume_per_shard(base_run, tmp_path):
    base, cfg_path = base_run
    one, two = copy_run(base, tmp_path / "one"), copy_run(base, tmp_path / "two")
    for r in (one, two):
        shutil.rmtree(r / "embeddings")
    with one_thread():
        run_stage(RunDir(one), "extract", RunConfig.load(cfg_path), force=True)
    proc, _ = torchrun(2, ["extract", "--run", str(two), "--config", str(cfg_path), "--force"])

    # only rank 0 reports; the stage is recorded once, with the work split 2 + 2 shards
    assert proc.stdout.count("extract: done") == 1, proc.stdout
    summary = stage_summary(two, "extract")
    assert summary["status"] == "done"
    assert summary["summary"]["world_size"] == 2 and summary["summary"]["shards_per_rank"] == [2, 2]
    # same files, same metadata, same arrays: bit for bit (same batches, one thread per process)
    files = sorted(p.name for p in (one / "embeddings").iterdir())
    assert files == sorted(p.name for p in (two / "embeddings").iterdir())
    shards = [f for f in files if f.startswith("shard-")]
    assert len(shards) == 4
    for f in shards:
        assert _meta(one / "embeddings" / f) == _meta(two / "embeddings" / f)
        assert_tensors_equal(load_file(str(one / "embeddings" / f)), load_file(str(two / "embeddings" / f)), what=f)
    assert json.loads((one / "embeddings/index.json").read_text()) == \
        json.loads((two / "embeddings/index.json").read_text())

    # resume: a lost shard is redone by one rank, the others are kept untouched
    kept = {f: (two / "embeddings" / f).stat().st_mtime_ns for f in shards if f != "shard-00002.safetensors"}
    (two / "embeddings/shard-00002.safetensors").unlink()
    torchrun(2, ["extract", "--run", str(two), "--config", str(cfg_path)])
    again = stage_summary(two, "extract")["summary"]
    assert again["shards_reused"] == 3 and again["shards_per_rank"] == [1, 0]
    assert {f: (two / "embeddings" / f).stat().st_mtime_ns for f in kept} == kept
    assert_tensors_equal(load_file(str(one / "embeddings/shard-00002.safetensors")),
                         load_file(str(two / "embeddings/shard-00002.safetensors")), what="redone shard")
