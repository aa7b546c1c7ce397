import json

import numpy as np

from sae_cxr.evaluate import METRICS, PLOTS, SUMMARY_MD, EvalConfig, evaluate, grade


def test_grade_checks_each_target_on_worked_numbers():
    m = {"ensemble": {"fvu": {"median": 0.05}, "dead_fraction": {"median": 0.08},
                      "spliced_auroc_drop_worst_median": 0.004},
         "patterns": {"concept_recovery": {"recovered": 17, "concepts": 18, "per_concept": {"pacemaker": {"auroc": 0.93}}}},
         "labels": {"accuracy": {"evidence": {"named_correctly": 0.9, "category_correct": 0.85}}},
         "attribution": {"completeness_error": 2e-7,
                         "faithfulness": {"deletion_area_top": 0.4, "deletion_area_random": 0.5},
                         "localization": {"with_baseline/pattern_gradcam": {"pointing_game": 0.3},
                                          "with_baseline/logit_gradcam": {"pointing_game": 0.2}}},
         "shortcut": {"planted": {"nuisance": "pacemaker", "rank": 2, "found": False}}}
    g = grade(m, EvalConfig())
    verdict = {k: v["pass"] for k, v in g.items()}
    assert verdict == {"fvu_median": True, "dead_fraction_median": False, "spliced_auroc_drop": True,
                       "concept_recovery": True,  # 17/18 = 0.944 >= 0.9
                       "labeler_named": True, "labeler_category": False, "completeness_error": True,
                       "deletion_vs_random": False, "pointing_pattern_vs_logit_gradcam": True,
                       "shortcut_concept_recovered": True, "shortcut_found": False}
    assert g["concept_recovery"]["value"] == round(17 / 18, 4)


def test_pointing_grade_uses_the_paired_interval_when_there_is_one():
    loc = {"with_baseline/pattern_gradcam": {"pointing_game": 0.29}, "with_baseline/logit_gradcam": {"pointing_game": 0.32}}
    within_noise = {**loc, "paired/pointing_pattern_minus_logit": {"ci_low": -0.08, "ci_high": 0.02, "level": 0.95}}
    worse = {**loc, "paired/pointing_pattern_minus_logit": {"ci_low": -0.08, "ci_high": -0.01, "level": 0.95}}
    for loc_, expect in ((loc, False), (within_noise, True), (worse, False)):
        g = grade({"attribution": {"localization": loc_}}, EvalConfig())["pointing_pattern_vs_logit_gradcam"]
        assert g["pass"] is expect, (loc_, g)


def test_grade_leaves_out_what_a_run_does_not_have():
    assert grade({"ensemble": {"fvu": {"median": 0.2}}}, EvalConfig()) == {
        "fvu_median": {"value": 0.2, "target": "<= 0.1", "pass": False}}


def test_eval_stage_on_a_tiny_run(tiny_pipeline_run):
    run = tiny_pipeline_run
    m = json.loads(run.sub(METRICS).read_text())
    assert m == json.loads(json.dumps(evaluate(run, EvalConfig())))  # the stage wrote what evaluate computes
    for key in ("classifier", "ensemble", "patterns", "attribution", "labels", "explanations", "shortcut", "targets"):
        assert key in m, key
    assert set(m["classifier"]) >= {"test", "test_shifted"}
    assert m["ensemble"]["members"] == 8
    assert 0 <= m["ensemble"]["dead_fraction"]["median"] <= 1
    assert m["attribution"]["completeness_error"] < 1e-4
    cr = m["patterns"]["concept_recovery"]
    assert cr["concepts"] == 18 and 0 <= cr["recovered"] <= 18
    from sae_cxr.findings import CONCEPTS, NUISANCE_CATEGORIES

    strata = {c: v["weakest_stratum"] for c, v in cr["per_concept"].items() if "weakest_stratum" in v}
    assert strata  # the tiny world has devices on enough images to stratify by
    for c, w in strata.items():
        assert w["nuisance"] != c and CONCEPTS[w["nuisance"]].category in NUISANCE_CATEGORIES
        assert 0 <= w["auroc_with"] <= 1 and w["n_with"] > 0
        assert w["auroc_without"] is None or 0 <= w["auroc_without"] <= 1
    planted = m["shortcut"]["planted"]
    assert planted["nuisance"] == "pacemaker" and planted["finding"] == "Cardiomegaly"
    assert planted["rank"] is None or planted["rank"] >= 1
    contrasts = m["shortcut"]["nuisance_contrast"]["Cardiomegaly"]
    assert contrasts and all(r["category"] in ("device", "artifact") for r in contrasts)
    assert [r["contrast"] for r in contrasts] == sorted((r["contrast"] for r in contrasts), reverse=True)
    if planted.get("contrast_rank") is not None:  # the pacemaker is on enough Cardiomegaly-negative images
        assert contrasts[planted["contrast_rank"] - 1]["term"] == "concept:pacemaker"
    by_label = m["shortcut"]["label_contrast"]["Cardiomegaly"]  # the run's own label detectors as terms
    assert all(r["term"].startswith("label:") and r["category"] in ("device", "artifact") for r in by_label)
    assert [r["contrast"] for r in by_label] == sorted((r["contrast"] for r in by_label), reverse=True)
    assert planted["found"] == (planted["rank"] == 1) and planted["rank"] == planted.get("label_contrast_rank")
    if planted["rank"] is not None:
        assert by_label[planted["rank"] - 1]["term"] == f"label:{planted['label']}" or planted["rank"] > 5
    shares = np.array(list(m["shortcut"]["nuisance_share"].values()))
    assert ((shares >= 0) & (shares <= 1)).all()
    md = run.sub(SUMMARY_MD).read_text()
    assert "## Targets" in md and "concept_recovery" in md and "Shortcut audit" in md
    for rel in ("ensemble", "concepts", "localization", "deletion"):
        assert run.sub(PLOTS[rel]).stat().st_size > 1000, rel


def test_summary_marks_an_undefined_auroc():
    from sae_cxr.evaluate import summary_markdown

    m = {"run": "r", "targets": {}, "classifier": {
        "test": {"Edema": {"auroc": None, "auroc_ci": [None, None]},
                 "Cardiomegaly": {"auroc": 0.9, "auroc_ci": [0.85, 0.95]}}}}
    md = summary_markdown(m)
    assert "| Edema | n/a |" in md and "| Cardiomegaly | 0.900 [0.850, 0.950] |" in md
