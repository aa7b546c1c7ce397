import numpy as np
import pytest

from sae_cxr.localization import _pool, paired_difference
from sae_cxr.maps import LocalizationScores


def _s(hits: list[bool]) -> LocalizationScores:
    return LocalizationScores(pointing=list(hits), iobb=[0.5 if h else 0.0 for h in hits], auprc=[0.3] * len(hits))


def test_the_baseline_is_compared_only_on_the_boxes_the_patterns_scored_too():
    # edema: two boxes scored by all three maps; atelectasis: no recovered pattern, so only the logit
    # baseline scored its three boxes (all missed). Over ALL its boxes the baseline hits 1/5; on the
    # boxes both scored it hits 1/2, the same as the pattern Grad-CAM.
    scores = {"edema": {"pattern_map": _s([False, False]), "pattern_gradcam": _s([True, False]),
                        "logit_gradcam": _s([False, True])},
              "atelectasis": {"logit_gradcam": _s([False, False, False])},
              "pacemaker": {"pattern_map": _s([True]), "pattern_gradcam": _s([True])}}
    same = {"edema": scores["edema"]}
    out = _pool(scores, same)
    assert out["all/logit_gradcam"]["n"] == 5 and out["all/logit_gradcam"]["pointing_game"] == 0.2
    assert out["all/pattern_gradcam"]["n"] == 3 and out["all/pattern_gradcam"]["pointing_game"] == 2 / 3
    assert out["with_baseline/logit_gradcam"]["n"] == 2 and out["with_baseline/logit_gradcam"]["pointing_game"] == 0.5
    assert out["with_baseline/pattern_gradcam"]["n"] == 2 and out["with_baseline/pattern_gradcam"]["pointing_game"] == 0.5
    assert out["with_baseline/pattern_map"]["pointing_game"] == 0.0


def test_paired_difference_on_worked_hits():
    # 4 boxes: pattern hits 1,1,0,0; logit hits 1,0,0,1 -> differences 0, +1, 0, -1, mean 0
    hits = np.array([[1, 1], [1, 0], [0, 0], [0, 1]], dtype=float)
    d = paired_difference(hits, np.random.default_rng(0))
    assert (d["n"], d["first"], d["second"], d["difference"]) == (4, 0.5, 0.5, 0.0)
    assert -1.0 <= d["ci_low"] <= 0.0 <= d["ci_high"] <= 1.0
    # a map that hits every box the other misses, on 200 boxes: the interval excludes 0
    many = np.tile([[1, 0], [1, 1]], (100, 1)).astype(float)
    d = paired_difference(many, np.random.default_rng(0))
    assert d["difference"] == 0.5 and d["ci_low"] > 0.35 and d["ci_high"] < 0.65
    with pytest.raises(ValueError, match="paired hits"):
        paired_difference(np.zeros((3, 3)), np.random.default_rng(0))
