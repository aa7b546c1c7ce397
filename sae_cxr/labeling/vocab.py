"""What a term means: its category and phantom concept, from the concepts, findings and vocabulary.

Every labeler must turn what it found (a concept id, a finding, a report n-gram, a free-text LMM
name) into a category and, when it names one, a planted concept, so labels can be compared with
each other and scored against the phantom world's ground truth. Matching is word-level on
lightly stemmed words ("effusions" ~ "effusion"), never on substrings, so "heart" does not match
"heartburn".

A term means what it IS (an exact concept, finding or vocabulary phrase) or what it CONTAINS
(the longest known phrases inside it: "moderate cardiomegaly" -> cardiomegaly). A term that is
only PART of a known phrase gets no meaning ("right lung" is in "right lung consolidation" but
as often introduces a nodule): modifiers and anatomy alone do not name a pattern.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from sae_cxr.findings import CONCEPTS, FINDING_CATEGORY, FINDINGS, VocabPhrase, radiology_vocabulary
from sae_cxr.labeling.report_terms import tokenize


@dataclass(frozen=True)
class TermMeaning:
    """A term's readable text, category and concept (None where the vocabulary cannot tell)."""

    display: str
    category: str | None
    concept: str | None


def _stem(word: str) -> str:
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "is", "us")):
        return word[:-1]
    return word


def words_of(text: str) -> tuple[str, ...]:
    """Lower-cased, stemmed words; hyphens split ("burned-in" -> burned, in) so spellings meet."""
    return tuple(_stem(w) for tok in tokenize(text) for w in tok.split("-"))


def finding_concept(finding: str) -> str | None:
    """The planted concept that implies `finding` (Cardiomegaly -> cardiomegaly), if any."""
    hits = [c.name for c in CONCEPTS.values() if c.finding == finding]
    return hits[0] if len(hits) == 1 else None


class VocabularyIndex:
    """Looks up the meaning of terms against concepts, findings and a phrase vocabulary."""

    def __init__(self, vocabulary: Sequence[VocabPhrase] | None = None):
        vocab = list(radiology_vocabulary() if vocabulary is None else vocabulary)
        self._known: dict[tuple[str, ...], TermMeaning] = {}
        # Vocabulary first, then concept phrases and ids, then findings: later entries only fill gaps.
        for v in vocab:
            self._add(v.phrase, TermMeaning(v.phrase, v.category, v.concept))
        for c in CONCEPTS.values():
            self._add(c.phrase, TermMeaning(c.phrase, c.category, c.name))
            self._add(c.name.replace("_", " "), TermMeaning(c.phrase, c.category, c.name))
        for f in FINDINGS:
            concept = finding_concept(f)
            display = CONCEPTS[concept].phrase if concept else f.lower()
            self._add(f, TermMeaning(display, FINDING_CATEGORY[f], concept))
        self._max_len = max((len(k) for k in self._known), default=0)

    def _add(self, text: str, meaning: TermMeaning) -> None:
        key = words_of(text)
        if key and key not in self._known:
            self._known[key] = meaning

    def exact(self, text: str) -> TermMeaning | None:
        return self._known.get(words_of(text))

    def meaning(self, text: str) -> TermMeaning:
        """Exact match, else the agreement of the longest known phrases the text contains."""
        key = words_of(text)
        hit = self._known.get(key)
        if hit is not None:
            return hit
        found: list[TermMeaning] = []
        for n in range(min(len(key), self._max_len), 0, -1):
            for i in range(len(key) - n + 1):
                m = self._known.get(key[i:i + n])
                if m is not None:
                    found.append(m)
            if found:
                break
        display = " ".join(tokenize(text)) or text.strip()
        if not found:
            return TermMeaning(display, None, None)
        categories = {m.category for m in found}
        concepts = {m.concept for m in found}
        return TermMeaning(display, categories.pop() if len(categories) == 1 else None,
                           concepts.pop() if len(concepts) == 1 else None)
