"""Metric formulas pinned on cases worked by hand, and the accumulator built from them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sae_cxr.transcoders.ensemble import SparseCodes
from sae_cxr.transcoders.metrics import (EnsembleMetrics, MetricsAccumulator, auroc, bce_constant, bce_sum,
                                         dead_fraction, dense_fraction, evaluate_ensemble, fvu, l0, logit_mse,
                                         loss_recovered)
from tests.transcoders.helpers import small_model


def test_fvu_by_hand():
    # h = [[1,0],[3,0]]: mean [2,0], total variance 1 + 1 = 2; h_hat = [[1,1],[2,0]]: sse = 1 + 1 = 2
    assert fvu(2.0, sum_sq=10.0, sum_vec=np.array([4.0, 0.0]), n=2) == pytest.approx(1.0)
    assert fvu(np.array([0.0, 1.0]), 10.0, np.array([4.0, 0.0]), 2).tolist() == pytest.approx([0.0, 0.5])
    with pytest.raises(ValueError, match="zero variance"):
        fvu(1.0, sum_sq=2.0, sum_vec=np.array([2.0]), n=2)  # h = [1, 1]


def test_l0_dead_dense_by_hand():
    assert l0(np.array([6.0, 0.0]), 3).tolist() == [2.0, 0.0]
    counts = np.array([[0, 3, 1, 0], [2, 2, 2, 2]])
    assert dead_fraction(counts).tolist() == [0.5, 0.0]
    # n = 10: firing rates 0, .3, .1, 0 -> only .3 is above 10%; .2 everywhere in member 1
    assert dense_fraction(counts, 10).tolist() == [0.25, 1.0]
    assert dense_fraction(counts, 10, threshold=0.25).tolist() == [0.25, 0.0]


def test_logit_mse_by_hand():
    assert logit_mse(np.array([12.0]), n=3, n_findings=2).tolist() == [2.0]


def test_auroc_by_hand():
    # positives score .35 and .8, negatives .1 and .4: 3 of the 4 pairs are ordered right
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(np.array([0.5, 0.5]), np.array([0.0, 1.0])) == pytest.approx(0.5)  # a tie counts 1/2
    # an unlabelled sample (NaN) is left out whatever its score
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8, 99.0]), np.array([0, 0, 1, 1, np.nan])) == pytest.approx(0.75)
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([1.0, 1.0])))


def test_bce_by_hand():
    # BCE(0, y=1) = ln 2; BCE(ln 3, y=0) = softplus(ln 3) = ln 4; a NaN label is skipped
    logits = torch.tensor([[0.0], [math.log(3.0)], [5.0]])
    labels = torch.tensor([[1.0], [0.0], [float("nan")]])
    s, n = bce_sum(logits, labels)
    assert s.tolist() == pytest.approx([math.log(8.0)])
    assert n.tolist() == [2]
    # constant logit 0 on 3 positives and 1 negative: 4 ln 2
    assert bce_constant(np.array([0.0]), np.array([3]), np.array([1])).tolist() == pytest.approx([4 * math.log(2)])


def test_loss_recovered_by_hand():
    assert loss_recovered(1.0, np.array([0.2, 0.6, 1.0]), 0.2).tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert np.isnan(loss_recovered(0.5, np.array([0.3]), 0.5)).all()


def _codes(B, E):
    return SparseCodes(torch.ones(B, E, 1), torch.zeros(B, E, 1, dtype=torch.long), n_latents=2)


def test_accumulator_end_to_end_by_hand():
    """d = 1, one finding, logits = h. Member 0 reconstructs h exactly, member 1 outputs mean(h)."""
    h = torch.tensor([[0.0], [2.0]])
    h_hat = torch.tensor([[[0.0], [1.0]], [[2.0], [1.0]]])  # [B=2, E=2, d=1]
    labels = torch.tensor([[0.0], [1.0]])
    acc = MetricsAccumulator(2, 2, 1, W2=torch.tensor([[1.0]]), b2=torch.tensor([0.0]), findings=["F"])
    acc.update(h, h_hat, _codes(2, 2), labels)
    m = acc.compute()
    assert m.fvu.tolist() == pytest.approx([0.0, 1.0])
    assert m.logit_mse.tolist() == pytest.approx([0.0, 1.0])  # (1-0)^2 + (1-2)^2 over 2 samples
    assert m.l0.tolist() == [1.0, 1.0] and m.dead_fraction.tolist() == [0.5, 0.5]
    # original BCE: [softplus(0) + softplus(-2)] / 2; mean ablation: logit 1 on one 0 and one 1
    assert m.loss_original == pytest.approx((math.log(2) + math.log1p(math.exp(-2))) / 2)
    assert m.loss_mean_ablation == pytest.approx((math.log1p(math.e) + math.log1p(math.exp(-1))) / 2)
    assert m.loss_recovered.tolist() == pytest.approx([1.0, 0.0])
    assert m.auroc_original.tolist() == [1.0] and m.auroc_spliced[:, 0].tolist() == [1.0, 0.5]
    assert "loss_recovered" in m.table() and m.summary()["fvu"]["median"] == pytest.approx(0.5)


def test_accumulated_batches_equal_one_pass():
    model = small_model(k=(2, 3, 4, 5))
    x = torch.randn(50, model.cfg.d_in)
    h = torch.randn(50, model.cfg.d_out)
    W2, b2 = torch.randn(3, model.cfg.d_out), torch.randn(3)
    labels = (torch.rand(50, 3) < 0.5).float()
    labels[::7, 1] = float("nan")
    one = evaluate_ensemble(model, x, h, W2, b2, labels, batch_size=50)
    many = evaluate_ensemble(model, x, h, W2, b2, labels, batch_size=7)
    for name in ("fvu", "l0", "dead_fraction", "dense_fraction", "logit_mse", "loss_spliced", "auroc_spliced"):
        assert np.allclose(getattr(one, name), getattr(many, name), rtol=1e-6, atol=1e-9), name


def test_invariants_are_checked():
    with pytest.raises(ValueError, match="dead_fraction"):
        EnsembleMetrics(n=5, fvu=np.zeros(2), l0=np.zeros(2), dead_fraction=np.array([0.1, 1.5]),
                        dense_fraction=np.zeros(2), dense_threshold=0.1)
    with pytest.raises(ValueError, match="l0 has shape"):
        EnsembleMetrics(n=5, fvu=np.zeros(2), l0=np.zeros(3), dead_fraction=np.zeros(2),
                        dense_fraction=np.zeros(2), dense_threshold=0.1)
    with pytest.raises(ValueError, match="head"):
        MetricsAccumulator(2, 4, 3, W2=torch.zeros(5, 4), b2=torch.zeros(5))
