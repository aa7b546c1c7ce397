"""Scoring labels against the phantom world's planted concepts.

The benchmark question is "does the labeler name the concept a pattern responds to, and put it
in the right category?". The caller decides which concept a pattern matches (e.g. the planted
concept with the best activation AUROC, kept when AUROC >= 0.9); this module only compares.

A label NAMES a concept when its evidence says so (the evidence and text labelers record the
concept of the term or phrase they chose), or, for labels without that (an LMM's free text), when
the vocabulary gives its text that concept: exactly ("pacemaker generator") or through the
longest known phrase it contains ("bright pacemaker box" -> pacemaker).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Collection, Mapping, Sequence

import numpy as np
import pandas as pd

from sae_cxr.findings import CATEGORIES, CONCEPTS, VocabPhrase
from sae_cxr.labeling.base import PatternLabel
from sae_cxr.labeling.vocab import VocabularyIndex

@lru_cache(maxsize=1)
def _default_index() -> VocabularyIndex:
    return VocabularyIndex()


NEGATIONS = ("no ", "without ", "absent ", "absence of ", "missing ")
"""Free-text label openings that name the absence of what follows ("no pacemaker")."""


def label_polarity(label: PatternLabel) -> str:
    """"absent" for a label naming the absence of something ("no laterality marker"), else "present"."""
    if "polarity" in label.evidence:
        return str(label.evidence["polarity"])
    text = " ".join(label.label.lower().split())
    return "absent" if text.startswith(NEGATIONS) else "present"


def _concept_of(label: PatternLabel, vocabulary: Sequence[VocabPhrase] | None) -> str | None:
    if label.unresolved:
        return None
    if "concept" in label.evidence:
        return label.evidence["concept"]
    index = VocabularyIndex(vocabulary) if vocabulary is not None else _default_index()
    return index.meaning(label.label).concept


def named_concept(label: PatternLabel, vocabulary: Sequence[VocabPhrase] | None = None) -> str | None:
    """The planted concept a label names as PRESENT, or None (unresolved labels name nothing, and
    "no pacemaker" does not name a pacemaker pattern)."""
    return _concept_of(label, vocabulary) if label_polarity(label) == "present" else None


def absent_concept(label: PatternLabel, vocabulary: Sequence[VocabPhrase] | None = None) -> str | None:
    """The planted concept a label names as ABSENT ("no laterality marker" -> laterality_marker), or None."""
    return _concept_of(label, vocabulary) if label_polarity(label) == "absent" else None


def absence_matches(patterns: pd.DataFrame, prevalence: Mapping[str, float], exclude: Collection[Any] = (),
                    threshold: float = 0.9, min_prevalence: float = 0.3) -> dict[int, str]:
    """Pattern id -> the planted concept whose ABSENCE the pattern detects: the concept its activation
    ranks worst, when 1 - that AUROC >= threshold (columns concept_auroc:<concept> of the pattern
    table) and the concept is on at least `min_prevalence` of the images (`prevalence`: concept ->
    share). Below that, "fires where X is missing" describes most images and names nothing (the
    evidence labeler's absence_min_rate). Patterns in `exclude` (matched by a presence) are left out."""
    cols = [c for c in patterns.columns if c.startswith("concept_auroc:")
            and prevalence.get(c.split(":", 1)[1], 0.0) >= min_prevalence]
    if not cols:
        return {}
    skip = set(exclude)
    au = patterns[cols].to_numpy(dtype=float)
    out = {}
    for row, pid in enumerate(patterns["pattern_id"].to_numpy()):
        if int(pid) in skip or np.isnan(au[row]).all():
            continue
        j = int(np.nanargmin(au[row]))
        if 1.0 - au[row, j] >= threshold:
            out[int(pid)] = cols[j].split(":", 1)[1]
    return out


def category_confusion(true_categories: Sequence[str], predicted_categories: Sequence[str]) -> pd.DataFrame:
    """Counts with true categories as rows and predicted ones as columns, all six categories in order."""
    if len(true_categories) != len(predicted_categories):
        raise ValueError(f"{len(true_categories)} true categories but {len(predicted_categories)} predicted")
    for name, cats in (("true", true_categories), ("predicted", predicted_categories)):
        bad = sorted(set(cats) - set(CATEGORIES))
        if bad:
            raise ValueError(f"unknown {name} category {bad}; expected one of {', '.join(CATEGORIES)}")
    table = pd.DataFrame(0, index=pd.Index(CATEGORIES, name="true"),
                         columns=pd.Index(CATEGORIES, name="predicted"), dtype=int)
    for t, p in zip(true_categories, predicted_categories):
        table.loc[t, p] += 1
    return table


@dataclass(frozen=True)
class LabelerAccuracy:
    """How many matched patterns a labeler named right, and how many it put in the right category."""

    n: int
    named_correctly: float  # share of patterns whose label names their matched concept
    category_correct: float  # share whose category is the matched concept's category
    per_pattern: pd.DataFrame  # pattern_id, concept, label, named, named_concept, category, true_category, ...
    confusion: pd.DataFrame

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "named_correctly": self.named_correctly, "category_correct": self.category_correct}


def labeler_accuracy(labels: Mapping[Any, PatternLabel] | Sequence[PatternLabel], matches: Mapping[Any, str],
                     vocabulary: Sequence[VocabPhrase] | None = None, polarity: str = "present") -> LabelerAccuracy:
    """Score labels against `matches` (pattern id -> the planted concept it best matches).

    polarity "absent": the matched patterns fire on the concept's ABSENCE, and a label names them only
    when it names that absence ("no laterality marker"). Patterns in `matches` without a label count
    as wrong on both counts: a labeler that skips patterns must not look better for it.
    """
    if polarity not in ("present", "absent"):
        raise ValueError(f"polarity must be 'present' or 'absent', got {polarity!r}")
    name_of = named_concept if polarity == "present" else absent_concept
    by_id = dict(labels) if isinstance(labels, Mapping) else {lab.pattern_id: lab for lab in labels}
    if not matches:
        raise ValueError("no matched patterns to score: pass pattern id -> concept for the patterns that match one")
    unknown = sorted({c for c in matches.values() if c not in CONCEPTS})
    if unknown:
        raise ValueError(f"unknown concept(s) {unknown} in matches; expected phantom concept ids")
    rows = []
    for pid, concept in matches.items():
        lab = by_id.get(pid)
        true_cat = CONCEPTS[concept].category
        named = name_of(lab, vocabulary) if lab is not None else None
        rows.append({"pattern_id": pid, "concept": concept, "true_category": true_cat,
                     "label": lab.label if lab is not None else None,
                     "labeler": lab.labeler if lab is not None else None,
                     "named_concept": named, "named": named == concept,
                     "category": lab.category if lab is not None else None,
                     "category_ok": lab is not None and lab.category == true_cat,
                     "confidence": lab.confidence if lab is not None else None,
                     "flagged": lab.flagged if lab is not None else None})
    per = pd.DataFrame(rows)
    have = per["category"].notna()
    confusion = category_confusion(per.loc[have, "true_category"].tolist(), per.loc[have, "category"].tolist())
    return LabelerAccuracy(n=len(per), named_correctly=float(per["named"].mean()),
                           category_correct=float(per["category_ok"].mean()), per_pattern=per, confusion=confusion)
