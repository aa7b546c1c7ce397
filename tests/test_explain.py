"""Explanations: composition rules, audiences, determinism, and the guarded rewrite."""

from __future__ import annotations

import json
import logging
import math
import re

import pytest

from sae_cxr.attribution_types import AttributionFormatError, Decomposition, PatternEvidence
from sae_cxr.explain import (
    JARGON, TEMPLATE_VERSION, ExplainConfig, Explanation, RewriteConfig, check_rewrite, compose, decision_of,
    default_extractor, jargon_in, lay_location, load_explanations, rewrite, save_explanations, shortcut_share,
    verbal_probability,
)
from sae_cxr.labeling.llm_client import ChatResult, LLMTimeoutError, TokenUsage


def P(pid, contribution, label, category, share, location=None, flagged=False):  # noqa: N802 - a short builder
    return PatternEvidence(pattern_id=pid, contribution=contribution, activation=abs(contribution) * 2, label=label,
                           category=category, description=None, verification=None if label is None else 0.8,
                           flagged=flagged, location=location, share=share)


def cardio(pacemaker_share=0.35, pacemaker_sign=1.0, error=0.05, flagged=False, coverage=0.95,
           probability=0.88):
    """Cardiomegaly, positive: heart pattern, a pacemaker pattern, an unnamed one, one counter pattern."""
    return Decomposition(
        record_id="img1", finding="Cardiomegaly", logit=2.0, probability=probability, label=1.0,
        patterns=[P(12, 1.2, "enlarged cardiac silhouette", "cardiac", 0.40, "mediastinum"),
                  P(5, 1.0 * pacemaker_sign, "pacemaker generator", "device", pacemaker_share, "left upper zone"),
                  P(1812, 0.3, None, None, 0.08, "right lower zone"),
                  P(3, -0.4, "clear lungs", "pulmonary", 0.12, flagged=flagged)],
        unassigned=0.05, skip=0.0, bias=-0.2, error=error, n_active_patterns=10, coverage=coverage)


def effusion_negative():
    """Pleural Effusion, negative: the main evidence argues against it."""
    return Decomposition(
        record_id="img2", finding="Pleural Effusion", logit=-1.5, probability=0.18, label=0.0,
        patterns=[P(7, -0.9, "sharp costophrenic angles", "pleural", 0.45, "left costophrenic angle"),
                  P(9, 0.3, "right pleural effusion", "pleural", 0.15, "right lower zone"),
                  P(4, -0.05, "laterality marker", "artifact", 0.01)],
        unassigned=0.0, skip=0.0, bias=-0.5, error=-0.2, n_active_patterns=4, coverage=0.8)


# -- the data types ----------------------------------------------------------------------------
def test_decomposition_json_round_trip_and_identity():
    d = cardio()
    again = Decomposition.from_dict(json.loads(json.dumps(d.to_dict())))
    assert again == d
    # logit 2.0 = reported (1.2 + 1.0 + 0.3 - 0.4 = 2.1) + unassigned 0.05 + skip 0 + bias -0.2
    #           + error 0.05 + unreported
    assert d.unreported == pytest.approx(2.0 - (2.1 + 0.05 - 0.2 + 0.05))


def test_decomposition_nan_label_becomes_null_and_bad_input_is_explained():
    d = Decomposition.from_dict({**cardio().to_dict(), "label": float("nan")})
    assert d.label is None and json.loads(json.dumps(d.to_dict()))["label"] is None
    with pytest.raises(AttributionFormatError, match="unknown keys"):
        Decomposition.from_dict({**cardio().to_dict(), "logits": 1.0})
    with pytest.raises(AttributionFormatError, match="missing a required key"):
        Decomposition.from_dict({k: v for k, v in cardio().to_dict().items() if k != "error"})
    bad_pattern = {**cardio().to_dict()}
    bad_pattern["patterns"] = [{**bad_pattern["patterns"][0], "category": "cardiology"}]
    with pytest.raises(AttributionFormatError, match="unknown category"):
        Decomposition.from_dict(bad_pattern)
    with pytest.raises(ValueError, match="probability"):
        Decomposition("x", "Edema", 0.0, 1.5, None, [], 0, 0, 0, 0, 0, 1.0)


# -- composition -------------------------------------------------------------------------------
def test_clinician_text_names_finding_top_support_location_and_counter_evidence():
    e = compose(cardio(), "clinician")
    assert e.text.startswith("Cardiomegaly: likely (p = 0.88")
    assert '"enlarged cardiac silhouette" (pattern 12, cardiac): strong, 40% of evidence, mediastinum' in e.text
    support, counter = e.text.index("Supporting evidence"), e.text.index("Counter-evidence")
    assert support < e.text.index("enlarged cardiac silhouette") < counter < e.text.index('"clear lungs"')
    assert e.cited_patterns == [12, 5, 1812, 3]
    assert e.cited_findings == ["Cardiomegaly"]
    assert e.template_version == TEMPLATE_VERSION and e.decision is True


def test_negative_prediction_leads_with_what_argues_against():
    e = compose(effusion_negative(), "clinician")
    assert e.text.startswith("Pleural Effusion: unlikely (p = 0.18") and "negative at threshold 0.50" in e.text
    against, outweighed = e.text.index("Evidence against:"), e.text.index("Evidence for (outweighed):")
    assert against < e.text.index("sharp costophrenic angles") < outweighed < e.text.index("right pleural effusion")
    assert 4 not in e.cited_patterns  # 1% of the evidence: below min_share
    lay = compose(effusion_negative(), "lay")
    assert "thinks fluid around the lung is unlikely" in lay.text
    assert lay.text.index("The main signs against it") < lay.text.index("pointed towards it but were outweighed")


@pytest.mark.parametrize("share, expect", [(0.29, False), (0.31, True)])
@pytest.mark.parametrize("audience", ["clinician", "lay"])
def test_shortcut_caveat_exactly_when_nuisance_share_exceeds_threshold(share, expect, audience):
    d = cardio(pacemaker_share=share)
    assert shortcut_share(d, decision=True) == pytest.approx(share)
    e = compose(d, audience, ExplainConfig(shortcut_share=0.30))
    assert ("shortcut" in e.caveats) is expect
    if expect and audience == "clinician":
        assert "rests on device/artifact patterns: \"pacemaker generator\" (pattern 5, device), which is not " \
               "evidence of cardiomegaly by itself" in e.text
    if expect and audience == "lay":
        assert "rests on a pacemaker, which by itself says nothing about whether there is an enlarged heart" in e.text


def test_nuisance_pushing_against_the_decision_is_no_shortcut():
    d = cardio(pacemaker_share=0.5, pacemaker_sign=-1.0)  # the pacemaker argues AGAINST cardiomegaly
    assert shortcut_share(d, decision=True) == 0.0
    assert "shortcut" not in compose(d, "clinician").caveats
    assert shortcut_share(d, decision=False) == pytest.approx(0.5)


def test_lay_text_has_no_jargon_and_no_numbers_the_clinician_text_has_both():
    for d in (cardio(), effusion_negative(), cardio(error=3.0, flagged=True, coverage=0.2)):
        lay, clin = compose(d, "lay"), compose(d, "clinician")
        assert jargon_in(lay.text) == [], lay.text
        assert jargon_in(clin.text), clin.text
        without_ids = re.sub(r"pattern \d+", "", lay.text)
        assert not re.search(r"\d", without_ids), lay.text
        assert re.search(r"\d+%", clin.text)
        # The audience changes the words, never the evidence.
        assert lay.cited_patterns == clin.cited_patterns and lay.caveats == clin.caveats


def test_jargon_list_catches_the_radiological_terms():
    assert jargon_in("Moderate right pleural effusion with blunted costophrenic angle.") == \
        ["effusion", "pleural", "costophrenic"]
    assert jargon_in("fluid around the lung") == []
    assert "cardiomegaly" in JARGON


def test_unnamed_patterns_are_cited_by_id():
    assert "pattern 1812 (unnamed): weak, 8% of evidence, right lower zone" in compose(cardio(), "clinician").text
    assert "an unnamed feature, pattern 1812, in the right lower part of the chest" in compose(cardio(), "lay").text


def test_composition_is_deterministic_and_order_independent():
    a = compose(cardio(), "clinician")
    assert compose(cardio(), "clinician") == a
    d = cardio()
    d.patterns = list(reversed(d.patterns))
    assert compose(d, "clinician").text == a.text
    # Equal contributions are ordered by pattern id, whatever the input order.
    tie = Decomposition("t", "Edema", 1.0, 0.7, None,
                        [P(9, 0.5, "perihilar haze", "pulmonary", 0.4), P(2, 0.5, "septal lines", "pulmonary", 0.4)],
                        0, 0, 0, 0, 2, 1.0)
    assert compose(tie).cited_patterns == [2, 9]


def test_error_flagged_and_coverage_caveats():
    assert compose(cardio(error=0.4)).caveats == ["shortcut"]           # 0.4 / 2.0 = 0.20 <= 0.25
    e = compose(cardio(error=0.6))                                        # 0.6 / 2.0 = 0.30 > 0.25
    assert "error" in e.caveats and "reconstruction error (+0.60)" in e.text
    e = compose(cardio(flagged=True))
    assert "caveat:flagged" in dict(e.parts) and "pattern 3 failed verification" in e.text
    e = compose(cardio(coverage=0.3))
    assert "only 30% of the evidence" in e.text
    assert compose(cardio(), "clinician", ExplainConfig(shortcut_share=0.5)).caveats == []


def test_verbal_scale_and_threshold():
    assert [verbal_probability(p) for p in (0.95, 0.9, 0.75, 0.5, 0.2, 0.05)] == \
        ["very likely", "very likely", "likely", "uncertain", "unlikely", "very unlikely"]
    d = cardio(probability=0.55)
    assert decision_of(d, ExplainConfig()) and not decision_of(d, ExplainConfig(thresholds={"Cardiomegaly": 0.6}))
    assert "uncertain whether there is an enlarged heart, but leans towards yes" in compose(d, "lay").text
    with pytest.raises(ValueError, match="probability"):
        verbal_probability(1.2)


def test_config_and_audience_errors_are_actionable():
    with pytest.raises(ValueError, match="min_share <= moderate_share"):
        ExplainConfig(moderate_share=0.5, strong_share=0.2)
    with pytest.raises(ValueError, match="keys must be findings"):
        ExplainConfig(thresholds={"Pneumonia": 0.5})
    with pytest.raises(ValueError, match="unknown audience"):
        compose(cardio(), "patient")


def test_lay_location_and_extractor_synonyms():
    assert lay_location("left costophrenic angle") == "left lower outer corner of the lung"
    assert lay_location("right lower zone") == "right lower part of the chest"
    assert lay_location(None) is None
    t = default_extractor().extract("Pacing leads and fluid around the lungs; pattern 12 and 40; 41% (p = 0.82).")
    assert "pacemaker" in t.terms and t.findings == {"Pleural Effusion"}
    assert t.pattern_ids == {12, 40} and t.numbers == pytest.approx([0.41, 0.82])
    assert default_extractor().extract("No pleural effusion. Edema is likely.").negated == {"Pleural Effusion"}


def test_explanations_save_and_load(tmp_path):
    es = [compose(cardio(), "clinician"), compose(effusion_negative(), "lay")]
    save_explanations(tmp_path / "explanations" / "nle.jsonl", es)
    assert load_explanations(tmp_path / "explanations" / "nle.jsonl") == es


# -- the guarded rewrite -----------------------------------------------------------------------
class FakeBackend:
    """A ChatBackend that answers with canned text and records what it was asked."""

    concurrency = 1

    def __init__(self, reply: str | Exception):
        self.reply = reply
        self.seen: list = []

    def chat(self, messages, response_format=None):
        self.seen.append(messages)
        if isinstance(self.reply, Exception):
            raise self.reply
        return ChatResult(text=self.reply, usage=TokenUsage(), cached=False)


FAITHFUL_CLINICIAN = (
    "Cardiomegaly is likely (p = 0.88, logit +2.00, positive at the 0.50 threshold). It rests chiefly on an "
    "enlarged cardiac silhouette (pattern 12) in the mediastinum, 40% of the evidence, and the pacemaker generator "
    "(pattern 5, 35%) in the left upper zone, with a weak unnamed pattern 1812 in the right lower zone (8%). Clear "
    "lungs (pattern 3, 12%) argue against. Shortcut warning: 35% of this call rests on the pacemaker, which is not "
    "evidence of cardiomegaly by itself."
)


def test_rewrite_accepts_a_faithful_rewrite():
    d = cardio()
    e = compose(d, "clinician")
    backend = FakeBackend(FAITHFUL_CLINICIAN)
    r = rewrite(e, d, backend)
    assert r.accepted, r.reason
    assert r.text == FAITHFUL_CLINICIAN and r.reason == ""
    assert e.text in backend.seen[0][1]["content"]  # the model saw the deterministic text


@pytest.mark.parametrize("edit, reason", [
    (lambda t: t + " There is also a small left pleural effusion.", "adds finding(s) not in the attribution: "
                                                                     "Pleural Effusion"),
    (lambda t: t.replace("the pacemaker generator", "the central venous catheter"), "adds term(s)"),
    (lambda t: t.replace("40% of the evidence", "60% of the evidence"), "states a number"),
    (lambda t: t.replace("right lower zone", "left lower zone"), "puts a side on something the attribution "
                                                                  "does not: left lower zone"),
    (lambda t: t.replace("Clear lungs", "Clear left lung"), "puts a side on"),
    (lambda t: t.replace("pattern 1812", "pattern 1812 at the carina"), "adds anatomy not in the attribution: trachea"),
    (lambda t: t.replace("pattern 1812", "pattern 1813"), "mentions pattern id(s) not cited: 1813"),
    (lambda t: t.replace("Cardiomegaly is likely", "Cardiomegaly is very likely"), "changes the verbal probability"),
    (lambda t: t.split(" Shortcut warning")[0], "drops the shortcut warning"),
    (lambda t: t.replace("Cardiomegaly is likely", "There is no cardiomegaly"),
     "negates a finding the explanation does not: Cardiomegaly"),
    (lambda t: t + " The heart border abuts the aorta.", "adds anatomy not in the attribution: aorta"),
])
def test_rewrite_guard_rejects_unfaithful_rewrites(edit, reason, caplog):
    d = cardio()
    e = compose(d, "clinician")
    bad = edit(FAITHFUL_CLINICIAN)
    assert bad != FAITHFUL_CLINICIAN
    with caplog.at_level(logging.INFO, logger="sae_cxr.explain"):
        r = rewrite(e, d, FakeBackend(bad))
    assert not r.accepted and r.text == e.text and r.candidate == bad
    assert r.reason.startswith(reason), r.reason
    assert "rejected" in caplog.text and reason.split(":")[0] in caplog.text


def test_rewrite_guard_rejects_a_side_the_attribution_never_names():
    d = Decomposition("e1", "Edema", 1.2, 0.77, None, [P(8, 0.9, "perihilar haze", "pulmonary", 0.6, "hilum")],
                      0.0, 0.0, 0.3, 0.0, 3, 0.9)
    e = compose(d, "clinician")
    ok = "Edema is likely (p = 0.77, logit +1.20, positive at threshold 0.50), driven by perihilar haze (pattern 8: " \
         "strong, 60% of evidence) at the hilum."
    assert check_rewrite(ok, e, d) == (True, "")
    ok2, reason = check_rewrite(ok.replace("at the hilum", "at the right hilum"), e, d)
    assert not ok2 and reason == "adds side(s) not in the attribution: right"


def test_lay_rewrite_guard():
    d = cardio()
    e = compose(d, "lay")
    good = ("The program thinks an enlarged heart is likely. It mostly relied on an enlarged heart in the middle of "
            "the chest and a pacemaker in the left upper part of the chest, plus a weak unnamed feature, pattern "
            "1812, in the right lower part of the chest; clear lungs pointed the other way. Warning: much of this "
            "rests on a pacemaker, which by itself says nothing about whether there is an enlarged heart.")
    assert check_rewrite(good, e, d) == (True, "")
    jargon = good.replace("an enlarged heart in the middle", "cardiomegaly in the middle")
    ok, reason = check_rewrite(jargon, e, d)
    assert not ok and reason == "uses jargon in a lay explanation: cardiomegaly"
    tube = good.replace("a pacemaker in the left", "a breathing tube in the left")
    ok, reason = check_rewrite(tube, e, d)
    assert not ok and "breathing tube" in reason


def test_rewrite_keeps_the_deterministic_text_on_backend_error_and_bad_lengths():
    d = cardio()
    e = compose(d, "clinician")
    r = rewrite(e, d, FakeBackend(LLMTimeoutError("timed out")))
    assert not r.accepted and r.text == e.text and r.reason.startswith("backend error") and r.candidate is None
    assert check_rewrite("", e, d) == (False, "empty rewrite")
    assert not check_rewrite("Cardiomegaly likely.", e, d)[0]
    assert not check_rewrite(FAITHFUL_CLINICIAN * 3, e, d, RewriteConfig(max_length_ratio=2.0))[0]
    with pytest.raises(ValueError, match="different predictions"):
        rewrite(e, effusion_negative(), FakeBackend(FAITHFUL_CLINICIAN))


def test_rewrite_strips_code_fences_and_quotes():
    d = cardio()
    e = compose(d, "clinician")
    r = rewrite(e, d, FakeBackend(f"```\n\"{FAITHFUL_CLINICIAN}\"\n```"))
    assert r.accepted and r.text == FAITHFUL_CLINICIAN


def test_explanation_evidence_text_drops_the_verdict():
    e = compose(cardio(), "clinician")
    assert e.evidence_text == e.text[len(e.parts[0][1]) + 1:]
    assert not math.isnan(e.probability)
    assert Explanation.from_dict(json.loads(json.dumps(e.to_dict()))) == e
