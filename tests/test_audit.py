import numpy as np
import pandas as pd
import pytest

from sae_cxr.audit import (EvidenceSums, audit_finding, label_groups, shortcut_group_rank, shortcut_patterns,
                           shortcut_rank)


def test_swing_ranks_a_shortcut_above_a_constant_marker():
    # four images, four patterns, two findings; finding 0:
    # pattern 1 (device) pushes it by 4 on two of the four images: mean 2, swing 2, |evidence| 8
    # pattern 2 (artifact) pushes -3 on every image: a constant, swing 0, |evidence| 12
    # pattern 3 (cardiac) carries 10 on each image; pattern 0 never fires
    c = np.zeros((4, 4, 2))
    c[:, 1, 0] = [4.0, 0.0, 4.0, 0.0]
    c[:, 2, 0] = -3.0
    c[:, 3, 0] = 10.0
    c[0, 1, 1] = 5.0
    sums = EvidenceSums.zeros(4, 2)
    sums.add(c[:3])
    sums.add(c[3:])
    assert sums.n_images == 4 and sums.n_active[:, 0].tolist() == [0, 2, 4, 4]
    labels = pd.DataFrame({"label": ["pacemaker", "marker", "enlarged heart"],
                           "category": ["device", "artifact", "cardiac"]}, index=pd.Index([1, 2, 3], name="pattern_id"))
    a = audit_finding(sums, 0, labels, "Cardiomegaly")
    # total |evidence| = 8 + 12 + 40 = 60; device + artifact magnitudes = 20
    assert a.total_evidence == pytest.approx(60.0)
    assert a.nuisance_share == pytest.approx(20 / 60)
    assert list(a.patterns["pattern_id"]) == [1, 2]  # by swing, though pattern 2 has more |evidence|
    assert a.patterns["swing"].tolist() == pytest.approx([2.0, 0.0])
    assert a.patterns["mean"].tolist() == pytest.approx([2.0, -3.0])
    assert a.patterns["share"].tolist() == pytest.approx([8 / 60, 12 / 60])
    assert shortcut_rank(a, np.array([1])) == 1
    assert shortcut_rank(a, np.array([2, 9])) == 2
    assert shortcut_rank(a, np.array([3])) is None  # labelled cardiac: the audit cannot see it


def test_evidence_sums_refuse_inconsistent_arrays():
    with pytest.raises(ValueError, match="exceeds"):
        EvidenceSums(net=np.array([[2.0]]), magnitude=np.array([[1.0]]), n_active=np.array([[1]]),
                     square=np.array([[4.0]]))


def test_shortcut_patterns_need_the_nuisance_as_best_concept():
    t = pd.DataFrame({"pattern_id": [0, 1, 2], "best_concept": ["pacemaker", "pacemaker", "edema"],
                      "concept_auroc:pacemaker": [0.95, 0.6, 0.97]})
    assert shortcut_patterns(t, "pacemaker").tolist() == [0]
    with pytest.raises(ValueError, match="no ground truth"):
        shortcut_patterns(t, "burned_in_text")


def test_a_nuisance_split_over_patterns_is_ranked_by_its_label_group():
    # four images, one finding. Patterns 0 and 1 ("low exposure") each push +2 on images 0 and 2:
    # single swings 1, but their joint term [4, 0, 4, 0] swings 2. Pattern 2 ("pacemaker") pushes +3 on
    # the same images: swing 1.5, first by single patterns, second by label. Pattern 3 is cardiac.
    c = np.zeros((4, 4, 1))
    c[[0, 2], 0, 0] = 2.0
    c[[0, 2], 1, 0] = 2.0
    c[[0, 2], 2, 0] = 3.0
    c[:, 3, 0] = 1.0
    labels = pd.DataFrame({"label": ["low exposure", "Low  Exposure", "pacemaker", "enlarged heart"],
                           "category": ["artifact", "artifact", "device", "cardiac"]},
                          index=pd.Index([0, 1, 2, 3], name="pattern_id"))
    groups, keys = label_groups(labels, 4)
    assert groups.tolist() == [0, 0, 1, -1] and keys == [("low exposure", "artifact"), ("pacemaker", "device")]
    whole = EvidenceSums.zeros(4, 1, groups=groups, group_keys=keys)
    whole.add(c)
    parts = [EvidenceSums.zeros(4, 1, groups=groups, group_keys=keys) for _ in range(2)]
    parts[0].add(c[:1])
    parts[1].add(c[1:])
    parts[0].merge(parts[1])
    for sums in (whole, parts[0]):
        assert sums.group_swing()[:, 0] == pytest.approx([2.0, 1.5])
        a = audit_finding(sums, 0, labels, "Edema")
        assert list(a.patterns["pattern_id"]) == [2, 0, 1]  # by single swing
        assert list(a.groups["label"]) == ["low exposure", "pacemaker"]
        assert a.groups["n_patterns"].tolist() == [2, 1] and a.groups["pattern_ids"][0] == [0, 1]
        assert a.groups["mean"].tolist() == pytest.approx([2.0, 1.5])
        assert a.groups["share"].tolist() == pytest.approx([8 / 18, 6 / 18])  # total |evidence| 4 + 4 + 6 + 4
        assert shortcut_rank(a, np.array([0, 1])) == 2
        assert shortcut_group_rank(a, np.array([0, 1])) == 1
        assert shortcut_group_rank(a, np.array([2])) == 2
        assert shortcut_group_rank(a, np.array([3])) is None  # cardiac: not in any nuisance group


def test_evidence_sums_refuse_to_merge_different_groupings():
    a = EvidenceSums.zeros(2, 1, groups=np.array([0, -1]), group_keys=[("pacemaker", "device")])
    with pytest.raises(ValueError, match="different pattern groups"):
        a.merge(EvidenceSums.zeros(2, 1))
    with pytest.raises(ValueError, match="without pattern groups"):
        EvidenceSums.zeros(2, 1).group_swing()
    with pytest.raises(ValueError, match="come together"):
        EvidenceSums.zeros(2, 1, groups=np.array([0, -1]))
    with pytest.raises(ValueError, match="has no key"):
        EvidenceSums.zeros(2, 1, groups=np.array([0, 1]), group_keys=[("pacemaker", "device")])


def test_unresolved_patterns_form_no_label_group():
    from sae_cxr.labeling.base import UNRESOLVED

    labels = pd.DataFrame({"label": [UNRESOLVED, UNRESOLVED, "pacemaker"], "category": ["device", "device", "device"]},
                          index=pd.Index([0, 1, 2], name="pattern_id"))
    groups, keys = label_groups(labels, 3)
    assert groups.tolist() == [-1, -1, 0] and keys == [("pacemaker", "device")]


def test_separation_is_the_margin_a_term_supplies_between_the_classes():
    """Four images labelled [1, 1, 0, NaN] on one finding. Pattern 0 (text) swings [2, -2, 2, -2]
    without separating: positives mean 0, the negative 2 -> separation -2. Pattern 1 (marker) pushes
    [1, 1, 0, 0]: positives mean 1, negative 0 -> +1, though its swing (0.5) is the smaller. The
    unknown label (image 3) counts in the swing but in neither class."""
    c = np.zeros((4, 2, 1))
    c[:, 0, 0] = [2.0, -2.0, 2.0, -2.0]
    c[:, 1, 0] = [1.0, 1.0, 0.0, 0.0]
    y = np.array([[1.0], [1.0], [0.0], [np.nan]])
    sums = EvidenceSums.zeros(2, 1, groups=np.array([0, 1]), group_keys=[("burned-in text", "artifact"),
                                                                          ("laterality marker", "artifact")],
                              by_label=True)
    sums.add(c[:2], y[:2])
    part = EvidenceSums.zeros(2, 1, groups=sums.groups, group_keys=sums.group_keys, by_label=True)
    part.add(c[2:], y[2:])
    sums.merge(part)
    assert sums.n_pos.tolist() == [2] and sums.n_neg.tolist() == [1]
    assert sums.separation()[:, 0].tolist() == pytest.approx([-2.0, 1.0])
    labels = pd.DataFrame({"label": ["burned-in text", "laterality marker"], "category": ["artifact", "artifact"]},
                          index=pd.Index([0, 1], name="pattern_id"))
    a = audit_finding(sums, 0, labels, "Pleural Effusion")
    assert a.groups["label"].tolist() == ["burned-in text", "laterality marker"]  # by swing: 2 vs 0.5
    assert a.groups["separation"].tolist() == pytest.approx([-2.0, 1.0])
    assert shortcut_group_rank(a, np.array([1])) == 2
    assert shortcut_group_rank(a, np.array([1]), by="separation") == 1
    with pytest.raises(ValueError, match="pass labels of shape"):
        sums.add(c)
    with pytest.raises(ValueError, match="without labels"):
        EvidenceSums.zeros(2, 1).separation()
    with pytest.raises(ValueError, match="split by label with sums that are not"):
        EvidenceSums.zeros(2, 1).merge(EvidenceSums.zeros(2, 1, by_label=True))
    # a class without images leaves the separation undefined, not 0
    lone = EvidenceSums.zeros(2, 1, by_label=True)
    lone.add(c[:2], y[:2])
    assert np.isnan(lone.separation()).all()


def test_shortcut_label_is_the_nuisance_label_holding_most_truth_patterns():
    from sae_cxr.audit import shortcut_label

    labels = pd.DataFrame({"label": ["pacemaker", "Laterality  marker", "laterality marker", "cardiomegaly"],
                           "category": ["device", "artifact", "artifact", "cardiac"]},
                          index=pd.Index([0, 1, 2, 3], name="pattern_id"))
    assert shortcut_label(labels, 4, np.array([1, 2, 0])) == "laterality marker"  # 2 hits (labels normalised) vs 1
    assert shortcut_label(labels, 4, np.array([0, 1])) == "pacemaker"  # a tie: the label met first
    assert shortcut_label(labels, 4, np.array([3])) is None  # a cardiac pattern is no nuisance label
    assert shortcut_label(labels, 4, np.array([], dtype=np.int64)) is None
