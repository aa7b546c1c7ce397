import numpy as np
import pytest

from sae_cxr.findings import FINDINGS
from sae_cxr.ingest import RecordIndex, open_run_dataset, record_index


def test_record_index_matches_the_full_records(tiny_pipeline_run):
    ds = open_run_dataset(tiny_pipeline_run)
    idx = record_index(tiny_pipeline_run)
    assert len(idx) == len(ds.records)
    assert idx.ids.tolist() == [r.id for r in ds.records]
    assert idx.splits.tolist() == [r.split for r in ds.records]
    np.testing.assert_array_equal(idx.labels, ds.labels())  # NaN where unknown, in FINDINGS order
    assert idx.labels.shape == (len(ds.records), len(FINDINGS))
    assert idx.split_counts() == ds.split_counts()


def test_record_index_refuses_ragged_columns():
    with pytest.raises(ValueError, match="one row per record"):
        RecordIndex(ids=np.array(["a", "b"], dtype=object), splits=np.array(["train"], dtype=object),
                    labels=np.zeros((2, len(FINDINGS)), dtype=np.float32))


def _same_records(lazy, full):
    import json

    assert len(lazy) == len(full)
    for a, b in zip(lazy, full):
        row_a, row_b = (json.dumps(r.to_row(), sort_keys=True, default=str) for r in (a, b))
        assert row_a == row_b
        assert a.path == b.path and (a.loader is None) == (b.loader is None)


def test_run_records_yield_the_records_open_run_dataset_builds(tiny_pipeline_run):
    from sae_cxr.ingest import RunRecords

    full = open_run_dataset(tiny_pipeline_run).records
    n = len(full)
    lazy = RunRecords(tiny_pipeline_run, chunk_rows=7)  # ranges cross chunk boundaries
    assert len(lazy) == n and lazy.ids.tolist() == [r.id for r in full]
    assert lazy.splits.tolist() == [r.split for r in full]
    ranges = [(0, 5), (5, 19), (30, 31), (31, 31), (40, n)]
    got = list(lazy.iter_ranges(ranges))
    assert [(s, e) for s, e, _ in got] == ranges
    for s, e, recs in got:
        _same_records(recs, full[s:e])
    _, _, everything = next(lazy.iter_ranges([(0, n)]))
    _same_records(everything, full)
    np.testing.assert_array_equal(everything[3].load_image(), full[3].load_image())
    with pytest.raises(ValueError, match="ascending"):
        list(lazy.iter_ranges([(10, 20), (0, 5)]))
    with pytest.raises(IndexError):
        list(lazy.iter_ranges([(0, n + 1)]))


def test_run_records_of_an_in_memory_phantom_world(tmp_path):
    """A phantom spec without image files: loaders regenerate the world (correct, not memory-bounded)."""
    from sae_cxr.data.phantom import PhantomConfig, PhantomWorld
    from sae_cxr.ingest import RunRecords, write_records
    from sae_cxr.run import RECORDS, RunDir

    run = RunDir(tmp_path / "run", create=True)
    ds = PhantomWorld(PhantomConfig.from_dict({"n": 12, "size": 32, "seed": 3})).dataset()
    write_records(run, ds)
    run.update_manifest(dataset=ds.spec)
    run.finish_stage("data", [RECORDS])
    full = open_run_dataset(run).records
    (_, _, a), (_, _, b) = RunRecords(run, chunk_rows=5).iter_ranges([(0, 6), (6, 12)])
    _same_records(a + b, full)
    assert all(r.loader is not None for r in a + b)
    for i in (0, 7, 11):
        np.testing.assert_array_equal((a + b)[i].load_image(), full[i].load_image())
