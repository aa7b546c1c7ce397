"""NLE metrics pinned on hand-worked examples (the arithmetic is in the comments)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sae_cxr.attribution_types import Decomposition, PatternEvidence
from sae_cxr.explain import compose
from sae_cxr.nle_metrics import (
    NLEDataError, NLEMetricsConfig, bleu_from_stats, bleu_stats, corpus_bleu, distinct_n, lcs_length, load_mimic_nle,
    mimic_nle_references, nle_report, plausibility, references_for_records, report_reference, rouge_l,
    self_bleu, sentence_bleu, simulatability, tokenize,
)

FIXTURE = Path(__file__).parent / "fixtures" / "mimic-nle-tiny.json"
HYP, REF = "the cat sat on the mat", "the cat is on the mat"


def test_tokenize_drops_punctuation_keeps_inner_hyphens():
    assert tokenize("Burned-in text, p = 0.82; patient's L!") == ["burned-in", "text", "p", "0", "82", "patient's", "l"]


def test_bleu4_hand_worked():
    # unigrams: the x2, cat, on, mat match; sat does not     -> p1 = 5/6
    # bigrams:  the cat, on the, the mat of 5                -> p2 = 3/5
    # trigrams: on the mat of 4                              -> p3 = 1/4
    # 4-grams:  none of 3; exp smoothing, first zero order   -> p4 = 1 / (2 * 3) = 1/6
    # equal lengths -> BP = 1; BLEU = (5/6 * 3/5 * 1/4 * 1/6) ** (1/4) = (1/48) ** 0.25
    assert sentence_bleu(HYP, REF) == pytest.approx((1 / 48) ** 0.25)          # 0.37992
    # floor smoothing (epsilon 0.1): p4 = 0.1 / 3 -> (1/2 * 1/4 * 1/30) ** 0.25 = (1/240) ** 0.25
    assert sentence_bleu(HYP, REF, smoothing="floor") == pytest.approx((1 / 240) ** 0.25)  # 0.25407
    # add1 (n > 1): (5/6 * 4/6 * 2/5 * 1/4) ** 0.25 = (1/18) ** 0.25
    assert sentence_bleu(HYP, REF, smoothing="add1") == pytest.approx((1 / 18) ** 0.25)
    assert sentence_bleu(HYP, REF, smoothing="none") == 0.0
    assert sentence_bleu(REF, REF) == pytest.approx(1.0)


def test_bleu_brevity_penalty_and_effective_order():
    # "the cat" vs a 6-token reference: p1 = 2/2, p2 = 1/1, no 3- or 4-grams -> effective order 2,
    # geometric mean 1, BP = exp(1 - 6/2) = exp(-2)
    assert sentence_bleu("the cat", REF) == pytest.approx(math.exp(-2))       # 0.13534
    # corpus BLEU uses all four orders: a corpus without any 3-gram scores 0
    assert corpus_bleu(["the cat"], [REF]) == 0.0


def test_bleu_multi_reference_clipping_and_closest_length():
    # hyp a b c d; refs "a b x d", "q b c d"
    # p1: a (ref1), b, c (ref2), d -> 4/4; p2: ab (ref1), bc, cd (ref2) -> 3/3; p3: bcd (ref2), abc none -> 1/2
    # p4: abcd none -> exp: 1/(2*1) = 1/2; both refs 4 long -> BP 1; BLEU = (1/4) ** 0.25 = 1/sqrt(2)
    assert sentence_bleu("a b c d", ["a b x d", "q b c d"]) == pytest.approx(2 ** -0.5)
    # clipping: "the the the" vs "the cat": p1 = 1/3 (the counts once); p2 = 0 -> exp 1/(2*2)
    # BP: c = 3 > r = 2 -> 1; effective order 3 (p3: 0 of 1 -> exp 1/(4*1)); (1/3 * 1/4 * 1/4) ** (1/3)
    assert sentence_bleu("the the the", "the cat") == pytest.approx((1 / 48) ** (1 / 3))
    # ties in closest reference length go to the shorter one: hyp 4, refs 3 and 5 -> r = 3
    assert bleu_stats(list("abcd"), [list("abc"), list("abcde")]).ref_len == 3


def test_corpus_bleu_sums_statistics_before_scoring():
    # pair 1 as above: matches (5, 3, 1, 0) of (6, 5, 4, 3); pair 2 identical 6-token pair: (6, 5, 4, 3) of (6, 5, 4, 3)
    # summed: 11/12, 8/10, 5/8, 3/6; BP 1 -> (11/12 * 8/10 * 5/8 * 1/2) ** 0.25 = (11/48) ** 0.25
    assert corpus_bleu([HYP, REF], [REF, [REF]]) == pytest.approx((11 / 48) ** 0.25)
    with pytest.raises(NLEDataError, match="2 hypotheses but 1"):
        corpus_bleu([HYP, REF], [REF])
    with pytest.raises(ValueError, match="unknown smoothing"):
        bleu_from_stats(bleu_stats(["a"], [["a"]]), smoothing="laplace")


def test_rouge_l_hand_worked():
    # LCS(the cat sat on the mat, the cat is on the mat) = the cat on the mat = 5; P = R = 5/6 -> F1 = 5/6
    assert rouge_l(HYP, REF) == pytest.approx(5 / 6)
    # LCS(a b c, a x b y c z) = 3; P = 3/3, R = 3/6 -> F1 = 2 * 1 * 0.5 / 1.5 = 2/3
    assert rouge_l("a b c", "a x b y c z") == pytest.approx(2 / 3)
    # several references: the best counts
    assert rouge_l("a b c", ["z z z", "a b c"]) == pytest.approx(1.0)
    assert rouge_l("a b c", "x y") == 0.0
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example (BCBA)


def test_distinct_n_hand_worked():
    # unigrams: a b a b | a b c -> 7 tokens, 3 distinct -> 3/7
    # bigrams: ab ba ab | ab bc -> 5, distinct {ab, ba, bc} -> 3/5 (no bigram crosses the text boundary)
    texts = ["a b a b", "a b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n([""], 1) == 0.0


def test_self_bleu_hand_worked():
    # t1 = a b c d vs {t2 = a b c e, t3 = x y z w}: p1 3/4, p2 2/3, p3 1/2, p4 0 -> 1/2 (exp); BP 1
    #   -> (3/4 * 2/3 * 1/2 * 1/2) ** 0.25 = (1/8) ** 0.25; t2 vs {t1, t3}: the same by symmetry.
    # t3 vs {t1, t2}: no match at any order; exp smoothing 1/(2*4), 1/(4*3), 1/(8*2), 1/(16*1)
    #   -> (1/24576) ** 0.25
    score, scored = self_bleu(["a b c d", "a b c e", "x y z w"])
    assert scored == 3
    assert score == pytest.approx((2 * (1 / 8) ** 0.25 + (1 / 24576) ** 0.25) / 3)  # 0.42303
    assert self_bleu(["same words here"] * 3)[0] == pytest.approx(1.0)
    with pytest.raises(NLEDataError):
        self_bleu(["only one"])


def test_self_bleu_fast_path_equals_brute_force_and_samples_with_a_seed():
    rng = np.random.default_rng(3)
    words = "a b c d e f g".split()
    texts = [" ".join(rng.choice(words, size=rng.integers(3, 9))) for _ in range(25)]
    brute = np.mean([sentence_bleu(t, texts[:i] + texts[i + 1:]) for i, t in enumerate(texts)])
    assert self_bleu(texts, max_hypotheses=None)[0] == pytest.approx(brute)
    a, n = self_bleu(texts, max_hypotheses=10, seed=1)
    assert n == 10 and a == self_bleu(texts, max_hypotheses=10, seed=1)[0]


def _synthetic_corpus(n=120, seed=0):
    """The text determines the decision: positives say 'fluid', negatives 'clear'; the rest is filler."""
    rng = np.random.default_rng(seed)
    filler = "the model looked at the image and weighed several patterns before it answered".split()
    texts, y = [], []
    for i in range(n):
        label = i % 2
        words = list(rng.choice(filler, size=8)) + (["fluid", "blunting"] if label else ["clear", "sharp"])
        rng.shuffle(words)
        texts.append(" ".join(words))
        y.append(label)
    return texts, y


def test_simulatability_is_perfect_when_text_determines_decision_and_chance_when_shuffled():
    texts, y = _synthetic_corpus()
    r = simulatability(texts, y)
    assert r.accuracy == pytest.approx(1.0) and r.chance == 0.5 and r.n == 120 and r.n_splits == 5
    shuffled = list(np.random.default_rng(1).permutation(texts))
    s = simulatability(shuffled, y)
    assert abs(s.accuracy - s.chance) < 0.15 and abs(s.balanced_accuracy - 0.5) < 0.15
    assert simulatability(texts, y, seed=0) == r  # seeded: the same split and the same reader


def test_simulatability_drops_unknown_targets_and_refuses_single_class():
    texts, y = _synthetic_corpus(40)
    with_nan = [float("nan") if i % 4 == 0 else float(v) for i, v in enumerate(y)]
    r = simulatability(texts, with_nan, target="label")
    assert r.n == 30 and r.target == "label"
    one = simulatability(texts, [1] * 40)
    assert one.accuracy is None and one.chance == 1.0 and "two examples of each class" in one.note
    with pytest.raises(NLEDataError, match="0/1"):
        simulatability(texts, [2] * 40)


def test_plausibility_and_report_reference():
    out = plausibility([HYP, "x y"], [REF, None])
    assert out["n"] == 1 and out["n_without_reference"] == 1
    assert out["rouge_l_mean"] == pytest.approx(5 / 6)
    assert out["bleu4_sentence_mean"] == pytest.approx((1 / 48) ** 0.25)
    assert out["bleu4_corpus"] == pytest.approx((1 / 48) ** 0.25)  # one pair: corpus = sentence (all orders present)
    report = "Moderate right pleural effusion. Pacemaker in place. No pulmonary edema."
    assert report_reference(report, "Pleural Effusion") == "Moderate right pleural effusion."
    assert report_reference(report, "Edema") == "No pulmonary edema."
    assert report_reference(report, "Atelectasis") == report  # no sentence about it: the whole report


def test_mimic_nle_loader_on_fixture():
    entries = load_mimic_nle(FIXTURE)
    assert len(entries) == 4
    e = entries[0]
    assert (e.sentence_id, e.report_id, e.study_id, e.patient_id) == ("s50000001#1", "s50000001", "50000001",
                                                                      "p10000001")
    assert e.diagnoses == ["Atelectasis"] and e.evidence == ["Lung Opacity"]
    assert e.img_labels["Atelectasis"] == "positive" and e.img_labels["Edema"] == "uncertain"
    refs = mimic_nle_references(entries)
    assert refs[("50000001", "Pleural Effusion")] == [
        "Blunting of the left costophrenic angle reflects a small effusion."]
    assert refs[("50000002", "Edema")] == ["Perihilar haziness is consistent with mild edema."]
    assert all(f != "Cardiomegaly" for _, f in refs)  # Enlarged Cardiomediastinum is not mapped by default
    opt_in = mimic_nle_references(entries, {"Enlarged Cardiomediastinum": "Cardiomegaly"})
    assert list(opt_in) == [("50000003", "Cardiomegaly")]
    by_record = references_for_records(refs, {"dicom-a": "50000001", "dicom-b": "s50000002", "dicom-c": "999"})
    assert set(by_record) == {("dicom-a", "Atelectasis"), ("dicom-a", "Pleural Effusion"), ("dicom-b", "Edema")}


def test_mimic_nle_loader_errors_are_actionable(tmp_path):
    query = tmp_path / "dev-query.json"
    query.write_text(json.dumps({"sentence_ID": "s1#0", "diagnosis_label": [0] * 10}) + "\n")
    with pytest.raises(NLEDataError, match="QUERY file"):
        load_mimic_nle(query)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sentence_ID": "s1#0", "nle": "x", "diagnosis_label": [1, 0]}) + "\n")
    with pytest.raises(NLEDataError, match=r"bad.json:1: diagnosis_label must be a list of 10"):
        load_mimic_nle(bad)
    as_array = tmp_path / "array.json"
    as_array.write_text(json.dumps([json.loads(line) for line in FIXTURE.read_text().splitlines()]))
    assert load_mimic_nle(as_array) == load_mimic_nle(FIXTURE)
    with pytest.raises(NLEDataError, match="cannot read"):
        load_mimic_nle(tmp_path / "missing.json")


def _decomp(i: int, positive: bool) -> Decomposition:
    sign = 1.0 if positive else -1.0
    label = "right pleural effusion" if positive else "sharp costophrenic angles"
    pats = [PatternEvidence(100 + i % 3, 0.9 * sign, 1.0, label, "pleural", None, 0.9, False, "right lower zone", 0.6),
            PatternEvidence(7, -0.2 * sign, 0.5, "clear lungs", "pulmonary", None, 0.8, False, None, 0.2)]
    return Decomposition(f"r{i}", "Pleural Effusion", 1.5 * sign, 0.82 if positive else 0.18, float(positive),
                         pats, 0.0, 0.0, 0.1 * sign, 0.0, 4, 0.9)


def test_nle_report_end_to_end():
    decomps = [_decomp(i, i % 2 == 0) for i in range(20)]
    expl = [compose(d, "clinician") for d in decomps]
    reports = {d.record_id: ("Pacemaker in place. Moderate right pleural effusion." if d.label
                             else "No pleural effusion. Heart size is normal.") for d in decomps}
    rep = nle_report(expl, labels=[d.label for d in decomps], references=reports,
                     config=NLEMetricsConfig(cv_splits=4))
    assert rep["n"] == 20
    sim = rep["simulatability"]
    assert sim["decision"]["accuracy"] == pytest.approx(1.0) and sim["decision"]["chance"] == 0.5
    assert sim["decision_evidence_only"]["accuracy"] == pytest.approx(1.0)  # the evidence alone gives it away here
    assert sim["label"]["n"] == 20
    assert 0 < rep["diversity"]["distinct_1"] < 1 and 0 < rep["diversity"]["self_bleu4"] <= 1
    assert rep["plausibility"]["n"] == 20 and 0 < rep["plausibility"]["rouge_l_mean"] < 1
    # record-keyed reports are reduced to their sentences about the finding before scoring
    own = plausibility([e.text for e in expl], [report_reference(reports[e.record_id], e.finding) for e in expl])
    assert rep["plausibility"] == own
    assert report_reference(reports["r0"], "Pleural Effusion") == "Moderate right pleural effusion."
    assert "not computed here" in rep["faithfulness"]
    json.dumps(rep)  # JSON-able as a whole
    with pytest.raises(NLEDataError, match="need `decisions`"):
        nle_report([e.text for e in expl])
    with pytest.raises(NLEDataError, match="20 explanations but 3 references"):
        nle_report(expl, references=["a", "b", "c"])
