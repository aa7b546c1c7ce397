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
