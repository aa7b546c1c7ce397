"""Bounded-memory attribution: streaming (one shard of features, Parquet written in row groups, a
running faithfulness sample, a histogram for the summary) gives the same tables as decomposing
everything at once. scripts/bench_memory.py measures the memory itself."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sae_cxr.attribution import (SUMMARY, Attributor, _hist_quantile, _TopLogits, load_predictions,
                                 reported_patterns, reported_patterns_batch)
from sae_cxr.classifier import load_head
from sae_cxr.extract import EmbeddingStore
from sae_cxr.findings import FINDINGS
from sae_cxr.patterns import load_patterns
from sae_cxr.transcoders.stage import load_ensemble


def test_batched_reported_patterns_match_the_row_by_row_rule():
    rng = np.random.default_rng(0)
    contrib = rng.normal(size=(40, 30, 5)) * (rng.random((40, 30, 5)) < 0.3)
    contrib[3] = 0.0  # an image with no active pattern
    contrib[4, :, 0] = 0.5  # ties
    for coverage, cap in [(0.9, 50), (0.5, 3), (1.0, 30)]:
        order, n, cov = reported_patterns_batch(contrib, coverage, cap)
        for b in range(40):
            for c in range(5):
                rep, want_cov = reported_patterns(contrib[b, :, c], coverage, cap)
                assert n[b, c] == len(rep)
                np.testing.assert_array_equal(order[b, c, : n[b, c]], rep)
                assert cov[b, c] == pytest.approx(want_cov)


def test_summary_helpers_equal_their_in_memory_versions():
    rng = np.random.default_rng(1)
    for _ in range(100):
        v = rng.integers(0, 20, size=int(rng.integers(1, 60)))
        hist = np.bincount(v, minlength=21)
        for q in (0.1, 0.5, 0.9):
            assert _hist_quantile(hist, q) == pytest.approx(np.quantile(v, q))
    top = _TopLogits(7)
    logits = rng.normal(size=(50, 5))
    for s in range(0, 50, 8):
        top.add(np.arange(s, min(s + 8, 50)), logits[s:s + 8])
    rows, findings = top.sample()
    assert np.array_equal(logits[rows, findings], np.sort(logits.reshape(-1))[::-1][:7])


def test_streamed_attribution_matches_in_memory_decomposition(tiny_world):
    run = tiny_world["reference"]
    preds, contrib = load_predictions(run)
    store = EmbeddingStore(run)
    rows = np.sort(preds["row"].unique())
    streamed = list(store.iter_features(rows, 5))  # batches cross shard boundaries (shard size 16)
    assert np.array_equal(np.concatenate([r for r, _ in streamed]), rows)
    np.testing.assert_array_equal(np.concatenate([x for _, x in streamed]), store.features(rows))
    np.testing.assert_array_equal(store.read_features(rows[::-1]), store.features(rows[::-1]))

    attr = Attributor(load_ensemble(run), load_head(run), load_patterns(run)[1]["latent_pattern"])
    full = attr.decompose(store.features(rows))
    by_row = preds.set_index(["row", "finding"])
    cfg = run.config("attribution")
    for i, r in enumerate(rows):
        for c, f in enumerate(FINDINGS):
            p = by_row.loc[(r, f)]
            assert p["logit"] == pytest.approx(float(full.logit[i, c]), abs=1e-5)
            rep, cov = reported_patterns(full.contributions[i, :, c], cfg["coverage"], cfg["max_patterns"])
            assert p["n_reported"] == len(rep) and p["coverage"] == pytest.approx(cov)
            mine = contrib[(contrib["record_id"] == p["record_id"]) & (contrib["finding"] == f)]
            assert mine.sort_values("rank")["pattern_id"].tolist() == rep.tolist()
    summary = json.loads(run.sub(SUMMARY).read_text())
    assert summary["predictions"] == len(preds) == len(rows) * len(FINDINGS)
    assert summary["patterns_per_prediction"]["median"] == pytest.approx(float(np.median(preds["n_reported"])))
