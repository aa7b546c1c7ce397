"""kill -9 a stage, rerun it, and the run directory is consistent and the result is the same.

A child process runs extraction or transcoder training on a copy of the tiny reference run and is
killed with SIGKILL, either at a chosen write (tests/reliability/crashchild.py: mid-write, before
or after the rename) or after a random delay once the stage has started. Then:
  - the manifest parses, the stage is not marked done, and every file under a real name is whole
    (no truncated safetensors / Parquet / JSON / checkpoint is ever visible);
  - readers refuse the unfinished stage with StageMissingError instead of reading it;
  - a rerun completes and gives embeddings / transcoder weights bit-equal to the uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sae_cxr.extract import EmbeddingStore
from sae_cxr.pipeline import run_stage
from sae_cxr.run import CorruptFileError, RunDir, StageMissingError
from sae_cxr.transcoders.stage import load_ensemble
from tests.reliability.conftest import copy_run

REPO = Path(__file__).resolve().parents[2]


def _child(run: RunDir, config: Path, stage: str, kill: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SAE_CXR_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("SAE_CXR_KILL", None)
    if kill:
        env["SAE_CXR_KILL"] = kill
    return subprocess.Popen([sys.executable, "-m", "tests.reliability.crashchild", "--run", str(run.path),
                             "--config", str(config), "--stages", stage], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_randomly(proc: subprocess.Popen, run: RunDir, stage: str, rng: random.Random, span: float) -> None:
    """SIGKILL at a random moment after the stage has taken its lock (i.e. is running)."""
    lock = run.path / f".stage-{stage}.lock"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if lock.exists() and f"pid {proc.pid} " in lock.read_text():
            break
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, span))
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)


def _kill_stage(run: RunDir, config: Path, stage: str, kill: str, span: float) -> None:
    """Run `stage` in a child and kill it: at a planned point (`file:n:when`, the child SIGKILLs itself
    there, which is checked) or, for `random:seed`, at a random moment within `span` s of its start."""
    if kill.startswith("random"):
        proc = _child(run, config, stage)
        _kill_randomly(proc, run, stage, random.Random(int(kill.split(":")[1])), span=span)
    else:
        proc = _child(run, config, stage, kill)
    out, _ = proc.communicate(timeout=300)
    if not kill.startswith("random"):
        assert proc.returncode == -signal.SIGKILL, out


def _whole(path: Path) -> None:
    """Read a file completely with the reader of its format; raises if it is truncated or garbled."""
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        load_file(str(path))
    elif path.suffix == ".json" or path.name.endswith(".sha256"):
        json.loads(path.read_text())
    elif path.suffix == ".parquet":
        pd.read_parquet(path)
    elif path.suffix == ".pt":
        torch.load(path, map_location="cpu", weights_only=False)
    elif path.suffix == ".faiss":
        import faiss

        faiss.read_index(str(path))


def _assert_consistent_after_kill(run: RunDir, stage: str, out_dir: str, reader) -> None:
    m = run.manifest()  # parses: the manifest is only ever replaced whole
    for f in sorted(run.sub(out_dir).rglob("*")) if run.sub(out_dir).exists() else []:
        if f.is_file() and not f.name.startswith("."):
            _whole(f)
    if m["stages"].get(stage, {}).get("status") == "done":
        run.verify_all()
        reader(run)
    else:
        with pytest.raises(StageMissingError):
            reader(run)


def _no_temp_left(run: RunDir, out_dir: str) -> None:
    left = [p.name for p in run.sub(out_dir).rglob(".*.tmp")]
    assert not left, f"temporary files left after the rerun: {left}"


# --- extraction -----------------------------------------------------------------------------------

EXTRACT_KILLS = [
    "shard-00002.safetensors:1:half",  # mid-write of a shard
    "shard-00001.safetensors:1:before",  # shard complete under its temporary name
    "shard-00004.safetensors:1:after",  # shard renamed, the stage dies right after
    "embeddings/index.json:1:half",  # every shard written, the index half-written
    "manifest.json:4:half",  # the stage's work all done, dying while it marks itself done
]


def _extract_reader(run: RunDir):
    return EmbeddingStore(run).features()


@pytest.mark.parametrize("kill", EXTRACT_KILLS + ["random:0", "random:1", "random:2"])
def test_killed_extraction_reruns_to_identical_embeddings(tiny_world, tmp_path, kill):
    ref = tiny_world["reference"]
    expected = EmbeddingStore(ref).features()
    run = copy_run(ref, tmp_path / "run", drop=("extract", "train-classifier", "train-transcoders", "patterns",
                                                "galleries", "attribute", "label"),
                   remove=("embeddings",))
    _kill_stage(run, tiny_world["config_path"], "extract", kill, span=1.5)
    _assert_consistent_after_kill(run, "extract", "embeddings", _extract_reader)

    summary = run_stage(run, "extract", tiny_world["cfg"])
    got = EmbeddingStore(run)
    np.testing.assert_array_equal(got.features(), expected)
    np.testing.assert_array_equal(got.valid, EmbeddingStore(ref).valid)
    assert run.verify_all()
    _no_temp_left(run, "embeddings")
    if kill in ("shard-00004.safetensors:1:after", "manifest.json:4:half"):
        assert summary.get("shards_reused", 0) >= 4  # finished shards were kept, not recomputed


# --- transcoder training --------------------------------------------------------------------------

TRAIN_KILLS = [
    "checkpoint.pt:3:half",  # mid-write of the third checkpoint: resume from the second
    "checkpoint.pt:2:before",  # checksum list written, rename not done: resume from the first
    "checkpoint.pt:2:after",  # renamed, dying before anything else: resume from the second
    "ensemble.safetensors:1:half",  # training finished, final weights half-written
    "transcoders/config.json:1:before",  # weights renamed, config not
]


def _state(run: RunDir) -> dict[str, torch.Tensor]:
    return load_ensemble(run).state_tensors()


@pytest.mark.parametrize("kill", TRAIN_KILLS + ["random:0", "random:1"])
def test_killed_transcoder_training_resumes_to_equal_weights(tiny_world, tmp_path, kill, caplog):
    ref = tiny_world["reference"]
    expected = _state(ref)
    run = copy_run(ref, tmp_path / "run", drop=("train-transcoders", "patterns", "galleries", "attribute", "label"),
                   remove=("transcoders",))
    _kill_stage(run, tiny_world["config_path"], "train-transcoders", kill, span=1.0)
    _assert_consistent_after_kill(run, "train-transcoders", "transcoders", _state)
    ckpts = list(run.sub("transcoders").rglob("checkpoint.pt"))
    if kill.startswith("checkpoint.pt"):
        n = int(kill.split(":")[1])
        step = torch.load(ckpts[0], weights_only=False)["trainer"]["step"]
        done_before = n - 1 if kill.endswith(("half", "before")) else n
        assert step == 5 * done_before  # the checkpoint on disk is the last one completed

    with caplog.at_level(logging.WARNING, logger="sae_cxr.transcoders"):
        run_stage(run, "train-transcoders", tiny_world["cfg"])
    assert "restarts from step 0" not in caplog.text  # a kill never damages the checkpoint
    got = _state(run)
    assert set(got) == set(expected)
    for k in expected:
        assert torch.equal(got[k], expected[k]), f"{k} differs from the uninterrupted run"
    assert not run.sub("transcoders/checkpoint").exists()  # removed once the stage is done
    _no_temp_left(run, "transcoders")


def test_damaged_checkpoint_is_reported_and_training_restarts(tiny_world, tmp_path, caplog):
    ref = tiny_world["reference"]
    run = copy_run(ref, tmp_path / "run", drop=("train-transcoders", "patterns", "galleries", "attribute", "label"),
                   remove=("transcoders",))
    proc = _child(run, tiny_world["config_path"], "train-transcoders", "checkpoint.pt:3:before")
    proc.communicate(timeout=300)
    ckpt = next(run.sub("transcoders").rglob("checkpoint.pt"))
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a bit flip inside the tensor data: the zip container still opens
    ckpt.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="sae_cxr.transcoders"):
        run_stage(run, "train-transcoders", tiny_world["cfg"])
    assert str(ckpt) in caplog.text and "restarts from step 0" in caplog.text
    expected = _state(ref)
    got = _state(run)
    assert all(torch.equal(got[k], expected[k]) for k in expected)  # training is deterministic


# --- corruption after a stage finished ------------------------------------------------------------

def _recorded(run: RunDir) -> list[str]:
    return sorted(rel for s in run.manifest()["stages"].values() for rel in s["outputs"])


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_every_recorded_file_is_checked_and_named(tiny_world, tmp_path, damage):
    run = copy_run(tiny_world["reference"], tmp_path / "run")
    files = _recorded(run)
    assert any(f.endswith(".faiss") for f in files) and any(f.endswith(".parquet") for f in files)
    for rel in files:
        p = run.sub(rel)
        original = p.read_bytes()
        if damage == "flip":
            b = bytearray(original)
            b[len(b) // 2] ^= 0x01
            p.write_bytes(bytes(b))
        else:
            p.write_bytes(original[: len(original) // 2])
        with pytest.raises(CorruptFileError, match=f"{p.name} is corrupt") as e:
            run.verify(rel)
        assert e.value.path == p and "rerun the stage" in str(e.value)
        p.write_bytes(original)


LOADERS = {
    "embeddings/shard-00000.safetensors": lambda run: EmbeddingStore(run).features(),
    "embeddings/index.json": lambda run: EmbeddingStore(run),
    "records.parquet": lambda run: __import__("sae_cxr.ingest", fromlist=["x"]).read_records_table(run),
    "classifier/head.safetensors": lambda run: __import__("sae_cxr.classifier", fromlist=["x"]).load_head(run),
    "transcoders/ensemble.safetensors": load_ensemble,
    "transcoders/config.json": load_ensemble,
    "patterns.parquet": lambda run: __import__("sae_cxr.patterns", fromlist=["x"]).load_patterns(run),
    "galleries/galleries.parquet": lambda run: __import__("sae_cxr.gallery", fromlist=["x"]).load_galleries(run),
    "attributions/contributions.parquet":
        lambda run: __import__("sae_cxr.attribution", fromlist=["x"]).load_predictions(run),
    "indices/images.faiss": lambda run: __import__("sae_cxr.search", fromlist=["x"]).RunSearch(run)._load(
        "indices/images.faiss"),
    "labels.jsonl": lambda run: __import__("sae_cxr.labeling.stage", fromlist=["x"]).load_labels(run),
}


@pytest.mark.parametrize("rel", sorted(LOADERS))
def test_loaders_refuse_a_corrupt_file_by_name(tiny_world, tmp_path, rel):
    run = copy_run(tiny_world["reference"], tmp_path / "run")
    assert rel in _recorded(run)
    p = run.sub(rel)
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(CorruptFileError, match=p.name):
        LOADERS[rel](run)
