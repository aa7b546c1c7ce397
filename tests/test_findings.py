from __future__ import annotations

import pytest

from sae_cxr.findings import CATEGORIES, CONCEPTS, FINDINGS, Shortcut, canonical_finding, finding_index


def test_every_concept_has_a_known_category_and_finding():
    assert len(CONCEPTS) == 18
    for c in CONCEPTS.values():
        assert c.category in CATEGORIES
        assert c.finding is None or c.finding in FINDINGS
    implied = {c.finding for c in CONCEPTS.values() if c.finding}
    assert implied == set(FINDINGS)


def test_finding_names_accept_loose_spellings():
    assert finding_index("pleural_effusion") == 4
    assert canonical_finding("CARDIOMEGALY") == "Cardiomegaly"
    with pytest.raises(ValueError, match="unknown finding"):
        finding_index("Pneumonia")


def test_shortcut_parse_and_str_round_trip():
    s = Shortcut.parse("pacemaker:cardiomegaly:0.9")
    assert (s.nuisance, s.finding, s.rate) == ("pacemaker", "Cardiomegaly", 0.9)
    assert Shortcut.parse(str(s)) == s
    with pytest.raises(ValueError, match="rate"):
        Shortcut.parse("pacemaker:Cardiomegaly:1.5")
    with pytest.raises(ValueError, match="implies a finding"):
        Shortcut.parse("edema:Cardiomegaly:0.9")
