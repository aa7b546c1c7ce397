"""Nuisance contrasts: pinned on hand-built cases where the answer is known exactly."""

import numpy as np
import pandas as pd
import pytest

from sae_cxr.contrast import REST, ContrastSums, NuisanceTerm, contrast_table


def _world(rng, n=400):
    """Finding 0 is the audited one; finding 1 is a confounder that comes with the term half the time."""
    labels = np.zeros((n, 2))
    labels[: n // 4, 0] = 1  # positives of finding 0: must be ignored
    term = (rng.random(n) < 0.3).astype(float)
    labels[:, 1] = ((rng.random(n) < 0.2) | ((term == 1) & (rng.random(n) < 0.5))).astype(float)
    contrib = np.zeros((n, 3, 2))
    contrib[:, 0, 0] = 1.5 * term  # pattern 0 carries 1.5 of the term's push
    contrib[:, 1, 0] = 0.5 * term + 1.0 * labels[:, 1]  # pattern 1: 0.5 of it, plus the confounder
    contrib[:, 2, 0] = 7.0 * labels[:, 0]  # pattern 2 only on positives
    logit = contrib.sum(1) - 2.0  # the rest of the logit is a constant (bias)
    return contrib, logit, labels, term[:, None]


def test_contrast_recovers_the_adjusted_effect_and_splits_it_exactly():
    contrib, logit, labels, term = _world(np.random.default_rng(0))
    s = ContrastSums.zeros(0, 2, 1, 3)
    s.add(contrib, logit, labels, term)
    (est,), (se,), (split,) = s.fit(np.array([0]))
    assert est == pytest.approx(2.0, abs=1e-9)  # 1.5 + 0.5, the confounder held fixed
    assert split == pytest.approx([1.5, 0.5, 0.0, 0.0], abs=1e-9)  # patterns 0, 1, 2, then the rest
    assert se == pytest.approx(0.0, abs=1e-6)  # a noiseless fit
    neg = labels[:, 0] == 0
    raw = logit[neg & (term[:, 0] == 1), 0].mean() - logit[neg & (term[:, 0] == 0), 0].mean()
    assert raw > 2.2  # the unadjusted difference also counts the confounder


def test_batches_equal_one_pass_and_the_standard_error_matches_least_squares():
    rng = np.random.default_rng(1)
    contrib, logit, labels, term = _world(rng)
    logit = logit + rng.normal(0, 0.3, logit.shape)  # noise lands in the rest of the logit
    labels[rng.random(len(labels)) < 0.1, 1] = np.nan  # some confounder labels unknown
    one = ContrastSums.zeros(0, 2, 1, 3)
    one.add(contrib, logit, labels, term)
    parts = ContrastSums.zeros(0, 2, 1, 3)
    for s in range(0, len(logit), 64):
        parts.add(contrib[s:s + 64], logit[s:s + 64], labels[s:s + 64], term[s:s + 64])
    half = len(logit) // 2  # two ranks' sums, merged, are one process's
    ranks = [ContrastSums.zeros(0, 2, 1, 3) for _ in range(2)]
    for r, sl in zip(ranks, (slice(0, half), slice(half, None))):
        r.add(contrib[sl], logit[sl], labels[sl], term[sl])
    ranks[0].merge(ranks[1])
    a, b, m = [tuple(v[0] for v in x.fit(np.array([0]))) for x in (one, parts, ranks[0])]
    assert a[0] == pytest.approx(b[0]) and a[1] == pytest.approx(b[1])
    assert ranks[0].n == one.n and a[0] == pytest.approx(m[0]) and a[1] == pytest.approx(m[1])
    with pytest.raises(ValueError, match="same finding"):
        one.merge(ContrastSums.zeros(1, 2, 1, 3))
    neg = labels[:, 0] == 0
    other = labels[neg, 1]
    X = np.column_stack([np.ones(neg.sum()), np.nan_to_num(other) == 1, np.isnan(other), term[neg, 0]]).astype(float)
    y = logit[neg, 0]
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ beta
    se = np.sqrt(resid @ resid / (len(y) - X.shape[1]) * np.linalg.inv(X.T @ X)[3, 3])
    assert a[0] == pytest.approx(beta[3]) and a[1] == pytest.approx(se)
    assert a[2].sum() == pytest.approx(a[0])  # the split still sums to the contrast
    assert a[2][0] == pytest.approx(1.5, abs=1e-9)  # pattern 0 is exactly 1.5 x term: recovered exactly


def test_table_ranks_terms_names_carriers_and_skips_rare_terms():
    rng = np.random.default_rng(2)
    contrib, logit, labels, term = _world(rng)
    rare = np.zeros((len(logit), 1))
    rare[:3] = 1
    weak = (rng.random((len(logit), 1)) < 0.4).astype(float)
    contrib[:, 2, 0] += 0.25 * weak[:, 0]
    logit = contrib.sum(1) - 2.0
    terms = np.hstack([weak, term, rare])
    s = ContrastSums.zeros(0, 2, 3, 3)
    s.add(contrib, logit, labels, terms)
    import pandas as pd

    names = pd.DataFrame({"label": ["marker", "effusion", "noise"]}, index=[0, 1, 2])
    t = contrast_table(s, [NuisanceTerm("concept:weak", "weak", "device"), NuisanceTerm("concept:marker", "marker",
                       "device"), NuisanceTerm("concept:rare", "rare", "artifact")], names, min_images=10, top=2)
    assert t["term"].tolist() == ["concept:marker", "concept:weak"]  # rare (3 images) left out
    assert t.loc[0, "contrast"] == pytest.approx(2.0, abs=1e-6)  # the weak term held fixed in the joint fit
    assert [c["pattern_id"] for c in t.loc[0, "carriers"]] == [0, 1]
    assert t.loc[0, "carriers"][0] == {"pattern_id": 0, "label": "marker", "share": 0.75}
    assert t.loc[1, "contrast"] == pytest.approx(0.25, abs=1e-6)
    assert t.loc[1, "carriers"][0]["pattern_id"] == 2


def test_term_on_every_image_has_no_contrast_and_bad_shapes_are_refused():
    contrib, logit, labels, _ = _world(np.random.default_rng(3))
    s = ContrastSums.zeros(0, 2, 1, 3)
    s.add(contrib, logit, labels, np.ones((len(logit), 1)))
    assert s.counts().tolist() == [int((labels[:, 0] == 0).sum())]
    assert contrast_table(s, [NuisanceTerm("concept:everywhere", "everywhere", "device")]).empty
    with pytest.raises(ValueError, match="zy"):
        ContrastSums(0, np.zeros((3, 3)), np.zeros((3, 1)), np.zeros((1, 1)), np.zeros((2, 4)), np.zeros((1, 4)), 0.0)
    assert REST == -1


def test_pattern_detectors_pick_each_labels_most_stable_pattern_and_cut_between_its_modes():
    import pandas as pd

    from sae_cxr.contrast import pattern_detectors

    labels = pd.DataFrame({"label": ["pacemaker", "pacemaker", "cardiomegaly", "Low  exposure", "collimation edge"],
                           "category": ["device", "device", "cardiac", "artifact", "artifact"]},
                          index=pd.Index([0, 1, 2, 3, 4], name="pattern_id"))
    stability = pd.Series([0.3, 0.9, 1.0, 0.5, 0.8], index=labels.index)
    rng = np.random.default_rng(0)
    firing = {1: np.concatenate([rng.uniform(0.01, 0.1, 300), rng.uniform(0.9, 1.0, 100)]),  # noise, then detections
              3: np.concatenate([rng.uniform(0.01, 0.05, 50), rng.uniform(0.5, 0.6, 50)]),
              4: np.array([0.2, 0.3, 0.0])}  # fires on 2 images: no distribution to cut
    d = pattern_detectors(labels, stability, lambda p: firing.get(p, np.zeros(0)))
    assert [t.key for t in d.terms] == ["label:pacemaker", "label:low exposure"]  # cardiac and thin labels left out
    assert [t.category for t in d.terms] == ["device", "artifact"]
    assert d.pattern_ids.tolist() == [1, 3]  # the most stable pacemaker pattern, not pattern 0
    assert 0.1 <= d.thresholds[0] < 0.9 and 0.05 <= d.thresholds[1] < 0.5
    act = np.zeros((3, 5))
    act[0, 1], act[1, 1], act[1, 0], act[2, 3] = 0.95, 0.05, 5.0, 0.55
    assert d.present(act).tolist() == [[True, False], [False, False], [False, True]]  # pattern 0 is no detector


def test_a_detected_nuisance_counts_even_when_its_pattern_carries_none_of_the_push():
    # the shortcut is absorbed: the marker's push on finding 0 flows through pattern 1 (a finding pattern);
    # pattern 0 (the marker detector) carries nothing, so only its detection (the term) ties it to the logit
    rng = np.random.default_rng(3)
    n = 600
    labels = np.zeros((n, 2))
    labels[rng.random(n) < 0.2, 0] = 1
    labels[:, 1] = rng.random(n) < 0.3
    marker = rng.random(n) < 0.4
    act = np.zeros((n, 2))
    act[:, 0] = np.where(marker, rng.uniform(0.8, 1.0, n), rng.uniform(0.0, 0.1, n))
    contrib = np.zeros((n, 2, 2))
    contrib[:, 1, 0] = 1.7 * marker + 0.8 * labels[:, 1] + 3.0 * labels[:, 0]
    logit = contrib.sum(1) + rng.normal(0, 0.2, (n, 2))
    s = ContrastSums.zeros(0, 2, 1, 2)
    s.add(contrib, logit, labels, (act[:, [0]] > 0.5).astype(float))
    t = contrast_table(s, [NuisanceTerm("label:marker", "marker", "artifact")])
    assert t.loc[0, "contrast"] == pytest.approx(1.7, abs=0.06)
    assert [c["pattern_id"] for c in t.loc[0, "carriers"]][:1] == [1]  # carried by the finding pattern
    shares = {c["pattern_id"]: c["share"] for c in t.loc[0, "carriers"]}
    assert abs(shares[0]) < 1e-9  # the detector itself carries none of it


def test_one_pass_audit_and_contrasts_equal_the_separate_passes(tiny_pipeline_run):
    from sae_cxr.audit import audit_run
    from sae_cxr.contrast import audit_and_contrasts, run_contrasts

    run = tiny_pipeline_run
    audit, both = audit_and_contrasts(run, ("test",), min_images=5)
    alone, contrasts = audit_run(run, ("test",)), run_contrasts(run, ("test",), min_images=5)
    assert set(both) == set(contrasts) == {"records", "patterns"}
    for src in both:
        for f, table in both[src].items():
            pd.testing.assert_frame_equal(table, contrasts[src][f])
    assert sum(len(t) for t in both["patterns"].values()) >= 1  # the tiny world's pacemaker detector
    for f, fa in alone.findings.items():
        one = audit.findings[f]
        assert (one.n_images, one.total_evidence, one.nuisance_share) == (fa.n_images, fa.total_evidence,
                                                                           fa.nuisance_share)
        pd.testing.assert_frame_equal(one.patterns, fa.patterns)
        pd.testing.assert_frame_equal(one.groups, fa.groups)
