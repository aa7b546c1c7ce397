"""Extraction: shapes, patch tokens for the evaluation splits, multimodal mode, resume by shard."""

from __future__ import annotations

import numpy as np
import pytest

from sae_cxr.backbones.base import load_backbone
from sae_cxr.config import RunConfig
from sae_cxr.extract import EmbeddingStore, ExtractConfig, run_extract
from sae_cxr.ingest import open_run_dataset
from sae_cxr.pipeline import run_stage
from sae_cxr.run import RunDir
from tests.helpers import tiny_phantom_clip


@pytest.fixture
def tiny_run(tmp_path):
    weights = tiny_phantom_clip(tmp_path / "bb")
    run = RunDir(tmp_path / "run", create=True)
    cfg = RunConfig()
    cfg.data.phantom.n, cfg.data.phantom.size = 40, 64
    cfg.data.phantom.shortcut = "pacemaker:Cardiomegaly:0.9"
    run_stage(run, "data", cfg)
    return run, f"phantom:{weights}"


def test_embeddings_match_the_backbone_and_patches_cover_eval_splits(tiny_run):
    run, spec = tiny_run
    records = open_run_dataset(run).records
    cfg = ExtractConfig(backbone=spec, batch_size=8, shard_size=16, num_workers=0)
    outputs, summary = run_extract(run, cfg, records, progress=False)
    assert summary["images"] == 40 and summary["shards"] == 3 and summary["unreadable"] == 0
    store = EmbeddingStore(run, verify=False)
    x = store.features()
    assert x.shape == (40, 32) and store.valid.all()
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    bb = load_backbone(spec)
    direct = bb.encode_images([records[i].load_image() for i in range(5)]).embedding.numpy()
    np.testing.assert_allclose(x[:5], direct, atol=1e-5)
    eval_rows = [i for i, r in enumerate(records) if r.split in ("test", "test_shifted")]
    np.testing.assert_array_equal(np.sort(store.patch_rows()), eval_rows)
    p = store.patches(eval_rows[:3])
    assert p.shape == (3, 16, 32) and store.grid == (4, 4)
    # the phantom embedding is the mean of its patch tokens (before normalisation: same scale)
    np.testing.assert_allclose(p.mean(axis=1), x[eval_rows[:3]], atol=2e-3)
    with pytest.raises(KeyError, match="no patch tokens"):
        store.patches([next(i for i, r in enumerate(records) if r.split == "train")])
    assert store.text().shape == (40, 32)


def test_multimodal_concatenates_image_and_report(tiny_run):
    run, spec = tiny_run
    records = open_run_dataset(run).records
    run_extract(run, ExtractConfig(backbone=spec, mode="multimodal", patches="none", num_workers=0), records,
                progress=False)
    store = EmbeddingStore(run, verify=False)
    x = store.features()
    assert x.shape == (40, 64)
    np.testing.assert_array_equal(x[:, 32:], store.text())


def test_rerun_keeps_finished_shards(tiny_run):
    run, spec = tiny_run
    records = open_run_dataset(run).records
    cfg = ExtractConfig(backbone=spec, batch_size=8, shard_size=16, num_workers=0)
    run_extract(run, cfg, records, progress=False)
    before = EmbeddingStore(run, verify=False).features().copy()
    (run.path / "embeddings" / "shard-00001.safetensors").unlink()
    _, summary = run_extract(run, cfg, records, progress=False)
    assert summary["shards_reused"] == 2
    np.testing.assert_array_equal(EmbeddingStore(run, verify=False).features(), before)


def test_unreadable_image_is_named_or_skipped(tiny_run):
    run, spec = tiny_run
    records = open_run_dataset(run).records
    victim = records[7]
    open(victim.path, "wb").write(b"\x89PNG\r\n\x1a\ntruncated")
    cfg = ExtractConfig(backbone=spec, patches="none", num_workers=0)
    with pytest.raises(ValueError, match=rf"{victim.id}"):
        run_extract(run, cfg, records, progress=False)
    _, summary = run_extract(run, cfg, records, skip_bad=True, progress=False)
    assert summary["unreadable"] == 1
    assert not EmbeddingStore(run, verify=False).valid[7]


def test_multimodal_needs_a_text_tower():
    with pytest.raises(ValueError, match="mode"):
        ExtractConfig(mode="both")
