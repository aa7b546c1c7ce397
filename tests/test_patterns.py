"""Consolidation recovers directions shared by members; scores pinned on hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_cxr.findings import CONCEPT_NAMES
from sae_cxr.patterns import (PatternConfig, concept_recovery, consolidate, monosemanticity_score, otsu_threshold,
                              pattern_activations, seed_and_assign)
from sae_cxr.transcoders.ensemble import EnsembleConfig, TranscoderEnsemble


def planted_ensemble(E=6, m=12, d=16, n_shared=3, seed=0):
    """Every member holds the same `n_shared` unit directions (at different latent slots, with a little
    noise); its other latents are random. Returns the ensemble, the directions and probe inputs."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    shared = Q[:, :n_shared].T  # [n_shared, d]
    cfg = EnsembleConfig(d_in=d, d_out=d, n_members=E, n_latents=m, k=2, seed=seed)
    ens = TranscoderEnsemble(cfg, init=True)
    slots = {}
    with torch.no_grad():
        for e in range(E):
            perm = rng.permutation(m)[:n_shared]
            slots[e] = perm
            W = rng.normal(size=(m, d))
            W /= np.linalg.norm(W, axis=1, keepdims=True)
            for s, j in enumerate(perm):
                v = shared[s] + 0.02 * rng.normal(size=d)
                W[j] = v / np.linalg.norm(v)
            ens.W_enc[e] = torch.tensor(W, dtype=torch.float32)
            ens.W_dec[e] = torch.tensor(W, dtype=torch.float32)
            ens.b_enc[e] = -0.3
    # probe: each input carries one shared direction strongly (plus noise), so shared latents fire together
    n = 600
    which = rng.integers(0, n_shared, n)
    x = shared[which] * rng.uniform(1.0, 2.0, (n, 1)) + 0.05 * rng.normal(size=(n, d))
    return ens, shared, torch.tensor(x, dtype=torch.float32), slots


def test_consolidation_recovers_shared_directions_with_full_stability():
    ens, shared, x, slots = planted_ensemble()
    cfg = PatternConfig(min_frequency=0.01, max_frequency=0.9, min_stability=0.5, profile_dims=64, threshold=0.6)
    pats, summary, _ = consolidate(ens, x, cfg)
    assert pats.n_patterns == 3, summary
    assert np.allclose(pats.stability(), 1.0)
    dec = ens.W_dec.detach().numpy()
    for mem in pats.members:
        assert len({e for e, _ in mem}) == len(mem)  # at most one latent per member
        proto = np.mean([dec[e, j] for e, j in mem], axis=0)
        proto /= np.linalg.norm(proto)
        assert np.max(np.abs(shared @ proto)) > 0.99
    # every member's shared slots are in patterns, its random latents are not
    for e, slot in slots.items():
        assert set(np.flatnonzero(pats.latent_pattern[e] >= 0)) == set(slot.tolist())
    rows, cols, vals = pattern_activations(ens, pats, x)
    assert len(rows) > 0 and set(np.unique(cols)) <= {0, 1, 2}
    codes = ens.encode(x[:1])
    v, i = codes.values[0].numpy(), codes.indices[0].numpy()
    expect = np.zeros(3)
    for e in range(ens.cfg.n_members):
        for val, j in zip(v[e], i[e]):
            if j >= 0 and pats.latent_pattern[e, j] >= 0:
                expect[pats.latent_pattern[e, j]] += val / ens.cfg.n_members
    got = np.zeros(3)
    got[cols[rows == 0]] = vals[rows == 0]
    np.testing.assert_allclose(got, expect, rtol=1e-5)


def test_otsu_threshold_splits_two_modes():
    v = np.concatenate([np.full(100, 0.2), np.full(50, 0.8)])
    t = otsu_threshold(v, bins=60)
    assert 0.2 < t <= 0.8


def test_seed_and_assign_takes_one_latent_per_member():
    member = np.array([0, 1, 1, 2])
    sims = np.array([[1.0, 0.9, 0.85, 0.2], [1.0, 0.9, 0.0, 0.0], [1.0, 0.85, 0.0, 0.0], [1.0, 0.2, 0.0, 0.0]])
    nbrs = np.array([[0, 1, 2, 3], [1, 0, -1, -1], [2, 0, -1, -1], [3, 0, -1, -1]])
    clusters = seed_and_assign(member, sims, nbrs, np.array([0, 1, 2, 3]), threshold=0.5)
    assert clusters[0] == [0, 1]  # member 1 gives its most similar latent only; 3 is below threshold
    assert sorted(map(sorted, clusters)) == [[0, 1], [2], [3]]


def test_monosemanticity_score_hand_worked():
    # three images; the pattern fires on the first two (0.5, 1.0 -> normalised 0.5, 1.0 with min 0)
    emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    act = np.array([[0.5], [1.0], [0.0]])
    # pairs with weight: (0,1): 0.5*1.0, similarity 1 -> score 1
    assert monosemanticity_score(act, emb)[0] == pytest.approx(1.0)
    act2 = np.array([[1.0], [0.0], [1.0]])  # fires on orthogonal images: similarity 0
    assert monosemanticity_score(act2, emb)[0] == pytest.approx(0.0)


def test_concept_recovery_counts_presence_and_lists_absence_apart() -> None:
    """Three patterns. The marker is only recovered by its absence (pattern 2 ranks it worst, AUROC
    0.05), which is listed but not counted; nodule's absence (pattern 1 at 0.02) is not listed, being
    on 10% of films. Every other concept sits at 0.5 except cardiomegaly (pattern 0, 0.95)."""
    import pandas as pd

    au = {c: [0.5, 0.5, 0.5] for c in CONCEPT_NAMES}
    au["cardiomegaly"] = [0.95, 0.4, 0.5]
    au["laterality_marker"] = [0.6, 0.5, 0.05]
    au["nodule"] = [0.5, 0.02, 0.5]
    table = pd.DataFrame({"pattern_id": [0, 1, 2], "stability": [1.0, 0.5, 0.8],
                          "best_concept": ["cardiomegaly", "nodule", "laterality_marker"],
                          **{f"concept_auroc:{c}": v for c, v in au.items()}})
    prevalence = {c: 0.1 for c in CONCEPT_NAMES} | {"laterality_marker": 0.6}
    out = concept_recovery(table, prevalence=prevalence)
    assert out["recovered"] == 1 and out["concepts"] == len(CONCEPT_NAMES)
    assert out["recovered_as_absence"] == ["laterality_marker"]
    lm = out["per_concept"]["laterality_marker"]
    assert (lm["pattern"], lm["auroc"], lm["absence_pattern"], lm["absence_auroc"]) == (0, 0.6, 2, 0.95)
    assert out["per_concept"]["nodule"]["absence_auroc"] == 0.98
    assert "recovered_as_absence" not in concept_recovery(table)  # without prevalence, nothing is listed
