"""Gallery top-k is exact; negatives never fire; held-out entries come from held-out splits."""

from __future__ import annotations

import numpy as np

from sae_cxr.gallery import GalleryConfig, build_galleries, density_histograms


def test_top_k_is_exact_and_splits_are_respected():
    rng = np.random.default_rng(0)
    n, p = 200, 4
    dense = np.where(rng.random((n, p)) < 0.3, rng.random((n, p)), 0.0)
    rows, cols = np.nonzero(dense)
    vals = dense[rows, cols]
    splits = np.array(["train"] * 120 + ["val"] * 30 + ["test"] * 50)
    valid = np.ones(n, dtype=bool)
    valid[3] = False
    cfg = GalleryConfig(top_k=5, heldout_top=4, negatives=6)
    gal = build_galleries(rows, cols, vals, n, p, splits, valid, cfg)
    fit = valid & np.isin(splits, ["train", "val"])
    for pid in range(p):
        top = gal[(gal.pattern_id == pid) & (gal.kind == "top")].sort_values("rank")
        expect = np.argsort(-np.where(fit, dense[:, pid], -1))[:5]
        np.testing.assert_array_equal(top["row"].to_numpy(), expect)
        neg = gal[(gal.pattern_id == pid) & (gal.kind == "negative")]
        assert len(neg) == 6 and (dense[neg["row"], pid] == 0).all() and fit[neg["row"]].all()
        held = gal[(gal.pattern_id == pid) & (gal.kind.str.startswith("heldout"))]
        assert (splits[held["row"]] == "test").all()
        q = gal[(gal.pattern_id == pid) & (gal.kind == "quantile")]
        assert (dense[q["row"], pid] > 0).all()


def test_histograms_count_every_firing():
    cols = np.array([0, 0, 1, 1, 1])
    vals = np.array([0.1, 1.0, 0.01, 0.1, 1.0])
    h = density_histograms(cols, vals, p=2, n_valid=10, bins=4)
    assert h["counts"].sum(axis=1).tolist() == [2, 3]
    np.testing.assert_allclose(h["silent_fraction"], [0.8, 0.7])
