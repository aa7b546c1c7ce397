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


def test_lazy_run_records_write_the_same_files_as_a_record_list(tiny_run, tmp_path):
    """The pipeline's path (RunRecords: Records built shard by shard) writes the files a list writes, bit for bit."""
    import shutil

    from sae_cxr.ingest import RunRecords

    run, spec = tiny_run
    other = RunDir(shutil.copytree(run.path, tmp_path / "copy"))
    cfg = ExtractConfig(backbone=spec, batch_size=8, shard_size=16, num_workers=0)
    run_extract(run, cfg, open_run_dataset(run).records, progress=False)
    _, summary = run_extract(other, cfg, RunRecords(other, chunk_rows=5), progress=False)
    assert summary["shards"] == 3 and summary["shards_reused"] == 0
    files = sorted(p.name for p in (run.path / "embeddings").iterdir())
    assert files == sorted(p.name for p in (other.path / "embeddings").iterdir())
    for name in files:
        _same_file(run.path / "embeddings" / name, other.path / "embeddings" / name)
    # resume: a list-made shard is reused by the lazy path and vice versa
    (other.path / "embeddings" / "shard-00001.safetensors").unlink()
    _, summary = run_extract(other, cfg, RunRecords(other), progress=False)
    assert summary["shards_reused"] == 2
    _same_file(run.path / "embeddings/shard-00001.safetensors", other.path / "embeddings/shard-00001.safetensors")


def _same_file(a, b):
    """Byte-equal, or for safetensors equal tensors (dtype, shape, bits) and metadata: safetensors writes
    its metadata map in no fixed order, so two runs of the same extraction can differ in header bytes."""
    from safetensors import safe_open

    if a.suffix != ".safetensors":
        assert a.read_bytes() == b.read_bytes(), a.name
        return
    with safe_open(str(a), framework="np") as fa, safe_open(str(b), framework="np") as fb:
        assert fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys()), a.name
        for k in fa.keys():
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), (a.name, k)
