"""The diagnostic head: learns separable findings, masks unknown labels, saves and loads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sae_cxr.classifier import (ClassifierConfig, ClassifierHead, evaluate_head, format_table, masked_bce,
                                train_classifier)


def _data(n: int, d: int = 16, seed: int = 0):
    w = np.random.default_rng(99).normal(size=(d, 5))  # one labelling rule for every split
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ w + rng.normal(0, 0.5, (n, 5)) > 0).astype(np.float32)
    return x, y


def test_learns_separable_findings_and_stops_early():
    x, y = _data(600)
    xv, yv = _data(200, seed=1)
    cfg = ClassifierConfig(hidden=32, lr=1e-2, max_epochs=100, patience=5, min_delta=1e-3, n_boot=50)
    head, history = train_classifier(x, y, xv, yv, cfg, progress=False)
    assert len(history) < 100
    xt, yt = _data(300, seed=2)
    m = evaluate_head(head, xt, yt, n_boot=50)
    for f, v in m.items():
        assert v["auroc"]["value"] > 0.85, (f, v)
        assert v["auroc"]["low"] <= v["auroc"]["value"] <= v["auroc"]["high"]
    assert "Pleural Effusion" in format_table({"test": m})


def test_unknown_labels_are_masked_out_of_the_loss():
    logits = torch.tensor([[0.0, 3.0]])
    y = torch.tensor([[1.0, float("nan")]])
    assert masked_bce(logits, y).item() == pytest.approx(math.log(2))


def test_single_class_split_is_reported_not_a_crash():
    x, y = _data(100)
    head = ClassifierHead(16, 8)
    y[:, 0] = 1.0
    m = evaluate_head(head, x, y, n_boot=20)
    assert m["Atelectasis"]["auroc"]["value"] is None
    assert "single class" in m["Atelectasis"]["auroc"]["note"]


def test_bad_inputs_are_refused_with_the_reason():
    x, y = _data(50)
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"train embeddings have NaN/Inf in 1 rows \(first: row 3\)"):
        train_classifier(x, y, x, y, ClassifierConfig(max_epochs=1), progress=False)
    with pytest.raises(ValueError, match="val split is empty"):
        train_classifier(_data(10)[0], _data(10)[1], np.zeros((0, 16), np.float32), np.zeros((0, 5), np.float32),
                         ClassifierConfig(max_epochs=1), progress=False)
