"""Statistics pinned on hand-worked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sae_cxr.stats import (auroc, auroc_rows, average_precision, average_precision_rows, bce_with_logits,
                           bootstrap_ci)


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
