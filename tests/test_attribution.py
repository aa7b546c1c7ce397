import numpy as np
import pandas as pd
import pytest

from sae_cxr.attribution import Attributor, load_predictions, reported_patterns


def test_reported_patterns_stop_at_the_coverage_worked_by_hand():
    contrib = np.array([0.5, -3.0, 1.0, 0.0, 0.5])  # |c| total 5: 3 (0.6), +1 (0.8), +0.5 (0.9)
    ids, cov = reported_patterns(contrib, coverage=0.9, max_patterns=50)
    assert ids.tolist() == [1, 2, 0] and cov == pytest.approx(0.9)
    ids, cov = reported_patterns(contrib, coverage=0.9, max_patterns=2)
    assert ids.tolist() == [1, 2] and cov == pytest.approx(0.8)
    ids, cov = reported_patterns(np.zeros(3), 0.9, 50)
    assert len(ids) == 0 and cov == 1.0


def test_decomposition_is_exact_on_every_test_image(tiny_pipeline_run):
    from sae_cxr.classifier import load_head
    from sae_cxr.extract import EmbeddingStore
    from sae_cxr.patterns import load_patterns
    from sae_cxr.transcoders.stage import load_ensemble

    run = tiny_pipeline_run
    store = EmbeddingStore(run)
    head, ens = load_head(run), load_ensemble(run)
    _, arrays = load_patterns(run)
    attr = Attributor(ens, head, arrays["latent_pattern"])
    x = store.features()
    batch = attr.decompose(x)
    assert len(x) >= 300
    # the identity: patterns + unassigned + skip + bias + error = logit, within 1e-4 relative
    rel = np.abs(batch.total() - batch.logit) / np.maximum(1.0, np.abs(batch.logit))
    assert rel.max() < 1e-4
    assert batch.completeness_error() == pytest.approx(rel.max())
    # the error term is not a plug: it is small next to the pattern evidence
    assert np.median(np.abs(batch.error)) < np.median(np.abs(batch.contributions.sum(1)))


def test_stored_predictions_add_up(tiny_pipeline_run):
    preds, contrib = load_predictions(tiny_pipeline_run)
    assert set(preds["split"]) == {"test", "test_shifted"}
    # reported patterns per prediction respect the cap and are ranked by |contribution|
    per = contrib.groupby(["record_id", "finding"])
    assert per.size().max() <= 50
    first = contrib[contrib["rank"] == 0].set_index(["record_id", "finding"])["contribution"].abs()
    assert (per["contribution"].apply(lambda s: s.abs().max()).loc[first.index] == first).all()
    assert ((preds["coverage"] > 0) & (preds["coverage"] <= 1 + 1e-9)).all()
    assert (preds["n_reported"] <= preds["n_active_patterns"]).all()
