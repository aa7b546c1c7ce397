"""The evidence labeler on synthetic records tables whose planted truth is known."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import fisher_exact

from sae_cxr.findings import CATEGORIES, CONCEPTS, FINDINGS
from sae_cxr.labeling.accuracy import (absence_matches, absent_concept, category_confusion, label_polarity,
                                       labeler_accuracy, named_concept)
from sae_cxr.labeling.base import UNRESOLVED, PatternLabel
from sae_cxr.labeling.evidence import (
    EvidenceConfig,
    EvidenceLabeler,
    EvidenceTable,
    benjamini_hochberg,
    fisher_greater,
    fisher_less,
    haldane_odds_ratio,
)
from sae_cxr.labeling.report_terms import extract_terms
from tests.labeling.synthetic import confounded_world, pattern_on


@pytest.fixture(scope="module")
def world() -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    return confounded_world(n=2000, shortcut_rate=0.9, seed=0)


@pytest.fixture(scope="module")
def labeler() -> EvidenceLabeler:
    return EvidenceLabeler()


# -- statistics, pinned by hand -------------------------------------------------------------------
def test_odds_ratio_fisher_bh_hand_worked() -> None:
    # [[3, 1], [1, 3]]: Haldane OR = 3.5 * 3.5 / (1.5 * 1.5); one-sided Fisher p = P(A >= 3) for a
    # hypergeometric with 8 items, 4 successes, 4 draws = (C(4,3) C(4,1) + C(4,4) C(4,0)) / C(8,4) = 17/70.
    assert haldane_odds_ratio(3, 1, 1, 3) == pytest.approx(49 / 9)
    assert fisher_greater(3, 1, 1, 3) == pytest.approx(17 / 70)
    assert fisher_greater(3, 1, 1, 3) == pytest.approx(fisher_exact([[3, 1], [1, 3]], alternative="greater")[1])
    # an empty cell keeps the corrected OR finite: [[5, 0], [0, 5]] -> 5.5^2 / 0.5^2 = 121
    assert haldane_odds_ratio(5, 0, 0, 5) == pytest.approx(121.0)
    # vectorised over terms, equal to scipy's per-table test
    a, b, c, d = np.array([10, 0, 7]), np.array([2, 5, 3]), np.array([20, 9, 40]), np.array([300, 100, 200])
    expected = [fisher_exact([[a[i], b[i]], [c[i], d[i]]], alternative="greater")[1] for i in range(3)]
    assert fisher_greater(a, b, c, d) == pytest.approx(expected)
    # depletion: P(A <= 1) for [[1, 3], [3, 1]] = (C(4,0) C(4,4) + C(4,1) C(4,3)) / C(8,4) = 17/70
    assert fisher_less(1, 3, 3, 1) == pytest.approx(17 / 70)
    expected = [fisher_exact([[a[i], b[i]], [c[i], d[i]]], alternative="less")[1] for i in range(3)]
    assert fisher_less(a, b, c, d) == pytest.approx(expected)
    # BH, m = 4: sorted p .01 .03 .04 .20 -> p*m/rank .04 .06 .0533 .20 -> running min from the top
    q = benjamini_hochberg([0.01, 0.04, 0.03, 0.2])
    assert q == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.2])
    assert benjamini_hochberg([0.9, 0.8]) == pytest.approx([0.9, 0.9])


# -- naming planted concepts and findings ---------------------------------------------------------
@pytest.mark.parametrize("concept", ["pleural_effusion", "et_tube", "scoliosis", "laterality_marker", "nodule",
                                     "edema"])
def test_concept_pattern_named_with_category(world, labeler, concept) -> None:
    df, truth = world
    lab = labeler.label(7, pattern_on(truth[concept]), df)
    assert lab.evidence["concept"] == concept and named_concept(lab) == concept
    assert lab.label == CONCEPTS[concept].phrase
    assert lab.category == CONCEPTS[concept].category
    assert lab.labeler == "evidence" and lab.pattern_id == 7 and lab.confidence > 0.8
    best = lab.evidence["terms"][0]
    assert {"odds_ratio", "p", "q", "precision", "recall"} <= set(best) and best["q"] < 1e-10


def test_finding_without_a_concept_is_named_by_the_finding(world, labeler) -> None:
    df, truth = world  # Atelectasis is a label on 20% of records, with no concept and no report mention
    lab = labeler.label("ate", pattern_on(truth["Atelectasis (label only)"]), df)
    assert lab.evidence["kind"] == "finding" and lab.evidence["finding"] == "Atelectasis"
    assert (lab.label, lab.category) == ("atelectasis", "pulmonary")


def test_unknown_finding_labels_are_left_out_of_that_term(labeler) -> None:
    df, truth = confounded_world(n=600, seed=3)
    df = df.copy()
    unknown = np.random.default_rng(0).random(len(df)) < 0.3
    df.loc[unknown, "Atelectasis"] = np.nan
    lab = labeler.label(1, pattern_on(truth["Atelectasis (label only)"]), df)
    row = next(t for t in lab.evidence["terms"] if t["term"] == "finding:Atelectasis")
    assert row["top_n"] + row["rest_n"] == int((~unknown).sum())
    assert lab.evidence["finding"] == "Atelectasis"


# -- confounding ----------------------------------------------------------------------------------
def test_confounded_nuisance_and_finding_are_told_apart(world, labeler) -> None:
    """P(pacemaker | cardiomegaly) = 0.9: each pattern's top images show BOTH terms enriched."""
    df, truth = world
    pm = labeler.label("pm", pattern_on(truth["pacemaker"]), df)
    cm = labeler.label("cm", pattern_on(truth["cardiomegaly"]), df)
    # the confounder really is significantly enriched in each case (the test would be vacuous otherwise)
    for lab, other in ((pm, "concept:cardiomegaly"), (cm, "concept:pacemaker")):
        row = next(t for t in lab.evidence["terms"] if t["term"] == other)
        assert row["q"] < 1e-6 and row["odds_ratio"] > 3 and row["precision"] > 0.6
    assert (pm.evidence["concept"], pm.category) == ("pacemaker", "device")
    assert (cm.evidence["concept"], cm.category) == ("cardiomegaly", "cardiac")
    # candidates are meanings: cardiomegaly enters as its concept or its finding label, whichever scores best
    cardiomegaly = {"concept:cardiomegaly", "finding:Cardiomegaly"}
    assert any(e["term"] in cardiomegaly and e["by"] == "concept:pacemaker" for e in pm.evidence["explained_away"])
    assert any(e["term"] == "concept:pacemaker" and e["by"] in cardiomegaly for e in cm.evidence["explained_away"])


@pytest.mark.parametrize("rate", [0.8, 0.95])
def test_confounding_across_shortcut_rates(rate) -> None:
    df, truth = confounded_world(n=1500, shortcut_rate=rate, seed=11)
    lab = EvidenceLabeler()
    for concept in ("pacemaker", "cardiomegaly"):
        assert lab.label(concept, pattern_on(truth[concept], leak=0.05), df).evidence["concept"] == concept


# -- report text: negations do not count ----------------------------------------------------------
@pytest.mark.parametrize("report, absent, present", [
    ("No pleural effusion.", {"pleural effusion", "effusion"}, set()),
    ("Without pneumothorax.", {"pneumothorax"}, set()),
    ("Consolidation is not seen.", {"consolidation"}, set()),
    ("No effusion, pneumothorax or consolidation. Pacemaker in place.",
     {"effusion", "pneumothorax", "consolidation"}, {"pacemaker"}),
    ("No focal consolidation but moderate right pleural effusion.", {"consolidation", "focal consolidation"},
     {"pleural effusion", "moderate right pleural"}),
    ("No change in cardiomegaly.", set(), {"cardiomegaly"}),  # a pseudo-negation negates nothing
    ("Small left pleural effusion and mild cardiomegaly.", {"effusion mild", "effusion and mild"},
     {"left pleural effusion", "mild cardiomegaly"}),
])
def test_report_terms_drop_negated_mentions(report, absent, present) -> None:
    terms = extract_terms(report)
    assert not (absent & terms), f"negated or cross-run terms extracted from {report!r}: {absent & terms}"
    assert present <= terms, f"missing affirmed terms from {report!r}: {present - terms}"


def _report_table(reports: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"id": [f"h{i}" for i in range(len(reports))], "report": reports})


def test_negated_report_mentions_do_not_name_a_pattern(labeler) -> None:
    """The pattern's top images all SAY 'pleural effusion', but as a negation; few other reports do."""
    top = ["No pleural effusion. Pacemaker in place."] * 40
    rest = ["Heart size is normal."] * 140 + ["Small right pleural effusion."] * 20
    df = _report_table(top + rest)
    act = np.r_[np.linspace(1.0, 2.0, 40), np.zeros(160)]
    lab = labeler.label("neg", act, df)
    assert lab.label == "pacemaker" and lab.category == "device" and lab.evidence["kind"] == "report"
    table = EvidenceTable.from_frame(df)
    j = table.column("report:pleural effusion")
    mentioned = table.values(j)
    assert mentioned[:40].sum() == 0 and mentioned[180:].all()
    # and an affirmed mention does name the pattern, from report text alone
    lab = labeler.label("pos", np.r_[np.zeros(180), np.linspace(1, 2, 20)], df)
    assert lab.evidence["concept"] == "pleural_effusion" and lab.category == "pleural"
    assert "pleural effusion" in lab.label


# -- honest failure -------------------------------------------------------------------------------
def test_random_pattern_is_unresolved_with_low_confidence(world, labeler) -> None:
    df, _ = world
    rng = np.random.default_rng(5)
    act = np.where(rng.random(len(df)) < 0.3, rng.random(len(df)), 0.0)
    lab = labeler.label("rnd", act, df)
    assert lab.label == UNRESOLVED and lab.unresolved and lab.confidence < 0.2
    assert lab.category in CATEGORIES and "no term is enriched" in lab.evidence["reason"]
    assert named_concept(lab) is None


def test_rarely_firing_pattern_is_unresolved_with_default_category(world) -> None:
    df, _ = world
    act = np.zeros(len(df))
    act[:3] = 1.0
    lab = EvidenceLabeler(EvidenceConfig(unresolved_category="artifact")).label(3, act, df)
    assert lab.unresolved and lab.category == "artifact" and "fires on 3" in lab.evidence["reason"]


# -- boundaries -----------------------------------------------------------------------------------
def test_errors_at_the_boundary(world, labeler) -> None:
    df, _ = world
    with pytest.raises(ValueError, match="activations for a table of 2000 records"):
        labeler.label(1, np.zeros(10), df)
    with pytest.raises(ValueError, match="NaN"):
        labeler.label(1, np.full(len(df), np.nan), df)
    bad = df.head(5).copy()
    bad["Edema"] = [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="'Edema' must hold 1, 0 or NaN"):
        EvidenceTable.from_frame(bad)
    with pytest.raises(ValueError, match="no usable term columns"):
        EvidenceTable.from_frame(pd.DataFrame({"id": ["a"], "split": ["train"]}))
    with pytest.raises(ValueError, match="top_quantile"):
        EvidenceConfig(top_quantile=1.5)


def test_label_many_builds_the_table_once_and_top_quantile_restricts(world) -> None:
    df, truth = world
    lab = EvidenceLabeler(EvidenceConfig(top_quantile=0.5))
    acts = np.stack([pattern_on(truth["nodule"]), pattern_on(truth["scoliosis"])], axis=1)
    labels = lab.label_many(["a", "b"], acts, df)
    assert [x.evidence["concept"] for x in labels] == ["nodule", "scoliosis"]
    assert lab._cached is not None and lab._cached[0] is df
    n_nodule = int((acts[:, 0] > 0).sum())
    assert labels[0].evidence["n_top"] <= (n_nodule + 1) // 2 + 1


# -- scoring labels against planted concepts ------------------------------------------------------
def test_labeler_accuracy_on_the_synthetic_world(world, labeler) -> None:
    """A mini benchmark: concept patterns with AUROC well above 0.9 are named and categorised."""
    df, truth = world
    rng = np.random.default_rng(1)
    concepts = [c for c in truth if c in CONCEPTS]
    labels, matches = [], {}
    for i, c in enumerate(concepts):
        noisy = truth[c] * 1.0 + rng.normal(0, 0.3, len(df))
        labels.append(labeler.label(i, np.maximum(noisy - 0.2, 0), df))
        matches[i] = c
    acc = labeler_accuracy(labels, matches)
    assert acc.n == len(concepts) and acc.named_correctly >= 0.9 and acc.category_correct >= 0.9
    assert int(np.trace(acc.confusion.to_numpy())) == round(acc.category_correct * acc.n)


def test_labeler_accuracy_counts_missing_and_free_text_labels() -> None:
    lmm = PatternLabel("bright pacemaker box", "a box", "device", 0.8, labeler="lmm", pattern_id=1)
    wrong = PatternLabel("enlarged heart", "big heart", "cardiac", 0.8, labeler="lmm", pattern_id=2)
    acc = labeler_accuracy([lmm, wrong], {1: "pacemaker", 2: "pleural_effusion", 3: "nodule"})
    assert named_concept(lmm) == "pacemaker" and named_concept(wrong) == "cardiomegaly"
    assert acc.named_correctly == pytest.approx(1 / 3) and acc.category_correct == pytest.approx(1 / 3)
    assert pd.isna(acc.per_pattern.set_index("pattern_id").loc[3, "label"])
    with pytest.raises(ValueError, match="unknown concept"):
        labeler_accuracy([lmm], {1: "pacemakers"})


def test_category_confusion_table() -> None:
    table = category_confusion(["device", "device", "cardiac"], ["device", "cardiac", "cardiac"])
    assert list(table.index) == list(CATEGORIES) and list(table.columns) == list(CATEGORIES)
    assert table.loc["device", "device"] == 1 and table.loc["device", "cardiac"] == 1
    assert table.loc["cardiac", "cardiac"] == 1 and table.to_numpy().sum() == 3
    with pytest.raises(ValueError, match="unknown predicted category"):
        category_confusion(["device"], ["hardware"])
    with pytest.raises(ValueError, match="1 true categories but 2"):
        category_confusion(["device"], ["device", "device"])


def test_records_round_trip_into_an_evidence_table() -> None:
    from sae_cxr.data.base import Record

    recs = [Record(id=f"x{i}", split="train", labels=np.array([np.nan, 1, 0, 0, 0]), concepts=("pacemaker",),
                   report="Pacemaker in place.") for i in range(4)]
    table = EvidenceTable.from_records(recs)
    assert table.has_concepts and table.ids == ["x0", "x1", "x2", "x3"]
    assert table.values(table.column("concept:pacemaker")).all()
    assert not table.known(table.column(f"finding:{FINDINGS[0]}")).any()
    assert not table.values(table.column(f"finding:{FINDINGS[0]}")).any()
    assert json.loads(pd.DataFrame([recs[0].to_row()])["concepts"][0]) == ["pacemaker"]


def test_inseparable_top_set_is_decided_by_the_whole_distribution() -> None:
    """A pacemaker pattern that also responds weakly to cardiomegaly: its strongest images all carry
    both (the shortcut), so the top set cannot tell them apart; over all images it tracks the pacemaker."""
    df, truth = confounded_world(n=2000, shortcut_rate=0.9, seed=5)
    rng = np.random.default_rng(0)
    pm, cm = truth["pacemaker"].astype(float), truth["cardiomegaly"].astype(float)
    acts = np.maximum(pm * (1.0 + 0.6 * cm) + 0.05 * rng.random(len(pm)), 0)
    lab = EvidenceLabeler().label("pm", acts, df)
    top = np.argsort(-acts)[:50]
    assert truth["cardiomegaly"][top].all() and truth["pacemaker"][top].all()  # the top set is confounded
    assert (lab.evidence["concept"], lab.category) == ("pacemaker", "device")
    assert lab.evidence["tie_break"]["by"] == "auroc"


def test_a_graded_pattern_is_named_after_what_it_tracks_over_all_images() -> None:
    """A heart-failure axis: the activation grows with cardiomegaly and most with oedema, which mostly
    comes with it. Its 50 strongest images all show oedema, and rare oedema has the larger top-set
    score; but over all images the pattern tracks cardiomegaly (oedema also occurs without it, where
    the pattern is silent). Oedema's report phrases share one candidate slot with it."""
    rng = np.random.default_rng(3)
    n = 3000
    cm = rng.random(n) < 0.2
    ed = np.where(cm, rng.random(n) < 0.35, rng.random(n) < 0.03)
    concepts = [[c for c, on in (("cardiomegaly", a), ("edema", b)) if on] for a, b in zip(cm, ed)]
    reports = ["Perihilar haziness. Pulmonary edema." if b else "Clear lungs." for b in ed]
    labels = np.stack([np.zeros(n), cm, np.zeros(n), ed, np.zeros(n)], 1).astype(float)
    df = pd.DataFrame({"id": [f"r{i}" for i in range(n)], "concepts": concepts, "report": reports,
                       **{f: labels[:, j] for j, f in enumerate(FINDINGS)}})
    acts = cm * (1.0 + 1.5 * ed + 0.3 * rng.random(n))
    top = np.argsort(-acts)[:50]
    assert ed[top].all()  # the top set shows oedema everywhere
    lab = EvidenceLabeler().label("hf", acts, df)
    assert (lab.evidence["concept"], lab.category) == ("cardiomegaly", "cardiac")
    assert lab.evidence["tie_break"]["by"] == "auroc"
    assert EvidenceLabeler(EvidenceConfig(decide_by_auroc=False)).label("hf", acts, df).evidence["concept"] == "edema"


# -- absence ----------------------------------------------------------------------------------------
def test_a_pattern_of_a_common_features_absence_is_named_no_x(world, labeler) -> None:
    """Half the films carry a laterality marker; the pattern fires on the ones WITHOUT it (the sparse
    side a dictionary prefers). Nothing is enriched among its top images, but the marker is missing
    from all of them: "no laterality marker", not "unresolved"."""
    df, truth = world
    rng = np.random.default_rng(2)
    marker = truth["laterality_marker"]
    acts = np.where(~marker, 1.0 + 0.3 * rng.random(len(df)), 0.0)
    lab = labeler.label("nomarker", acts, df)
    assert lab.label == "no laterality marker" and lab.category == "artifact" and not lab.unresolved
    assert lab.evidence["polarity"] == "absent" and lab.evidence["concept"] == "laterality_marker"
    assert lab.evidence["presence_auroc"]["concept:laterality_marker"] < 0.05
    assert label_polarity(lab) == "absent" and named_concept(lab) is None
    assert absent_concept(lab) == "laterality_marker" and lab.confidence > 0.9
    off = EvidenceLabeler(EvidenceConfig(absence=False)).label("nomarker", acts, df)
    assert off.unresolved
    # the absence of a RARE term is no name: a pattern silent on the 10% with a nodule stays unresolved
    rare = np.where(~truth["nodule"], 1.0 + 0.3 * rng.random(len(df)), 0.0)
    assert labeler.label("nonodule", rare, df).unresolved
    # an enriched term always wins over an absence: the pacemaker pattern is still "pacemaker"
    pm = labeler.label("pm", pattern_on(truth["pacemaker"]), df)
    assert label_polarity(pm) == "present" and pm.evidence["concept"] == "pacemaker"


def test_absence_accuracy_and_matches() -> None:
    no_marker = PatternLabel("no laterality marker", "d", "artifact", 0.9, labeler="evidence", pattern_id=1,
                             evidence={"concept": "laterality_marker", "polarity": "absent"})
    free_text = PatternLabel("No pacemaker visible", "d", "device", 0.5, labeler="lmm", pattern_id=2)
    marker = PatternLabel("laterality marker", "d", "artifact", 0.9, labeler="evidence", pattern_id=3,
                          evidence={"concept": "laterality_marker", "polarity": "present"})
    assert label_polarity(free_text) == "absent" and absent_concept(free_text) == "pacemaker"
    # a presence match is not named by the absence of the same concept, and vice versa
    pres = labeler_accuracy([no_marker, marker], {1: "laterality_marker", 3: "laterality_marker"})
    assert pres.named_correctly == pytest.approx(0.5) and pres.category_correct == 1.0
    absn = labeler_accuracy([no_marker, free_text, marker], {1: "laterality_marker", 2: "pacemaker",
                                                            3: "laterality_marker"}, polarity="absent")
    assert absn.per_pattern["named"].tolist() == [True, True, False]
    with pytest.raises(ValueError, match="polarity"):
        labeler_accuracy([marker], {3: "laterality_marker"}, polarity="negative")
    # matches: pattern 10 ranks the marker worst (AUROC 0.04 -> absence 0.96) and the marker is common;
    # pattern 11's worst concept is rare nodule (absence of something on 10% of films names nothing);
    # pattern 12 already matches a presence
    table = pd.DataFrame({"pattern_id": [10, 11, 12], "concept_auroc:laterality_marker": [0.04, 0.5, 0.02],
                          "concept_auroc:nodule": [0.5, 0.05, 0.99]})
    prevalence = {"laterality_marker": 0.6, "nodule": 0.1}
    assert absence_matches(table, prevalence, exclude={12}) == {10: "laterality_marker"}
    assert absence_matches(table, prevalence, exclude={12}, min_prevalence=0.05) == {
        10: "laterality_marker", 11: "nodule"}
