"""Statistics pinned on hand-worked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sae_cxr.stats import (auroc, auroc_rows, average_precision, average_precision_rows, bce_with_logits,
                           bootstrap_ci, stratified_auroc)


def test_auroc_hand_worked():
    # positives score 0.8 and 0.4, negatives 0.6 and 0.2: pairs (0.8>0.6, 0.8>0.2, 0.4<0.6, 0.4>0.2) -> 3/4
    assert auroc([1, 0, 1, 0], [0.8, 0.6, 0.4, 0.2]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half: (1 + 0.5) / 2
    assert auroc([1, 0, 0], [0.5, 0.5, 0.1]) == pytest.approx(0.75)
    assert math.isnan(auroc([1, 1], [0.1, 0.2]))
    assert auroc([1, np.nan, 0], [0.9, 0.0, 0.1]) == 1.0


def test_average_precision_hand_worked():
    # ranking: pos(0.9), neg(0.8), pos(0.7): precision at positives 1/1 and 2/3 -> (1 + 2/3) / 2
    assert average_precision([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx(5 / 6)
    assert math.isnan(average_precision([0, 0], [0.3, 0.1]))


def test_row_versions_agree_with_scalar_versions():
    rng = np.random.default_rng(0)
    y = (rng.random((20, 50)) < 0.3).astype(float)
    s = rng.random((20, 50))
    np.testing.assert_allclose(auroc_rows(y, s), [auroc(a, b) for a, b in zip(y, s)])
    np.testing.assert_allclose(average_precision_rows(y, s), [average_precision(a, b) for a, b in zip(y, s)])


def test_bootstrap_ci_brackets_the_value_and_reports_single_class():
    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.3).astype(float)
    s = y + rng.normal(0, 1.0, 300)
    ci = bootstrap_ci(y, s, auroc, n_boot=300)
    assert ci.low < ci.value < ci.high and ci.n == 300
    one = bootstrap_ci(np.ones(10), np.arange(10.0), auroc, n_boot=10)
    assert math.isnan(one.value) and "single class" in one.note


def test_bce_hand_worked():
    # logit 0 -> log 2 whatever the label; NaN labels ignored
    assert bce_with_logits(np.array([0.0, 5.0]), np.array([1.0, np.nan])) == pytest.approx(math.log(2))


def test_stratified_auroc_hand_worked():
    y = np.array([1, 1, 0, 0, 1, 1, 0, 0, np.nan])
    score = np.array([0.9, 0.8, 0.1, 0.2, 0.1, 0.3, 0.2, 0.4, 0.0])
    strata = np.zeros((9, 2), bool)
    strata[[0, 1, 2, 3, 8], 0] = True  # stratum 0: perfect inside, the unknown label is left out
    with_, without, n_with = stratified_auroc(y, score, strata, min_class=2)
    assert with_[0] == 1.0 and without[0] == 0.25  # rest: 0.3 > 0.2 is the only pair of 4 ranked right
    assert np.isnan(with_[1])  # an empty stratum has no AUROC
    assert without[1] == pytest.approx(11.5 / 16)  # everything: 0.9 and 0.8 win 4 each, 0.1 ties 0.1, 0.3 wins 3
    assert n_with.tolist() == [5, 0]
    assert np.isnan(stratified_auroc(y, score, strata, min_class=3)[0][0])  # two positives are too few
    with pytest.raises(ValueError, match="strata must be"):
        stratified_auroc(y, score, strata[:4])
