import numpy as np
import pandas as pd
import pytest

from sae_cxr.audit import audit_finding, evidence_by_pattern, shortcut_patterns, shortcut_rank


def _contrib(rows):
    return pd.DataFrame(rows, columns=["record_id", "finding", "pattern_id", "contribution"])


def test_net_push_ranks_a_consistent_shortcut_above_a_noisy_marker():
    # pattern 1 (device) pushes Cardiomegaly up by 2 on three images: net 6, |evidence| 6
    # pattern 2 (artifact) moves it +3, -3, +1: net 1, |evidence| 7
    # pattern 3 (cardiac) carries 10 on each image: the rest of the evidence
    rows = [(f"r{i}", "Cardiomegaly", 1, 2.0) for i in range(3)]
    rows += [("r0", "Cardiomegaly", 2, 3.0), ("r1", "Cardiomegaly", 2, -3.0), ("r2", "Cardiomegaly", 2, 1.0)]
    rows += [(f"r{i}", "Cardiomegaly", 3, 10.0) for i in range(3)]
    rows += [("r0", "Edema", 1, 5.0)]
    c = _contrib(rows)
    labels = pd.DataFrame({"label": ["pacemaker", "marker", "enlarged heart"],
                           "category": ["device", "artifact", "cardiac"]}, index=[1, 2, 3])
    ev = evidence_by_pattern(c, "Cardiomegaly")
    assert list(ev.index) == [3, 1, 2]
    assert ev.loc[2, "net"] == pytest.approx(1.0) and ev.loc[2, "evidence"] == pytest.approx(7.0)
    a = audit_finding(c, labels, "Cardiomegaly")
    # total |evidence| = 6 + 7 + 30 = 43; device + artifact magnitudes = 13
    assert a.total_evidence == pytest.approx(43.0)
    assert a.nuisance_share == pytest.approx(13 / 43)
    assert list(a.patterns["pattern_id"]) == [1, 2]
    assert a.patterns["share"].tolist() == pytest.approx([6 / 43, 1 / 43])
    assert a.n_predictions == 3
    assert shortcut_rank(a, np.array([1])) == 1
    assert shortcut_rank(a, np.array([2, 9])) == 2
    assert shortcut_rank(a, np.array([3])) is None  # labelled cardiac: the audit cannot see it


def test_shortcut_patterns_need_the_nuisance_as_best_concept():
    t = pd.DataFrame({"pattern_id": [0, 1, 2], "best_concept": ["pacemaker", "pacemaker", "edema"],
                      "concept_auroc:pacemaker": [0.95, 0.6, 0.97]})
    assert shortcut_patterns(t, "pacemaker").tolist() == [0]
    with pytest.raises(ValueError, match="no ground truth"):
        shortcut_patterns(t, "burned_in_text")
