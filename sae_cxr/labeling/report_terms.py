"""A small clinical phrase extractor for report text: affirmed uni/bi/trigrams, negations dropped.

The evidence labeler counts how often a term is MENTIONED in the reports of a pattern's top
images. Radiology reports are full of pertinent negatives ("No pleural effusion.", "without
pneumothorax", "Consolidation is not seen."); counting those as mentions would make every
"normal" pattern look like an effusion pattern. So, in the spirit of NegEx (Chapman et al.,
J Biomed Inform 2001), each sentence is split into clauses at termination words ("but",
"however", ...), and within a clause:

- a PRE-negation trigger ("no", "without", "negative for", "no evidence of", ...) negates every
  word after it up to the end of the clause (so lists like "No effusion, pneumothorax or
  consolidation" are negated as a whole; NegEx uses a fixed window, clause ends suit the short
  sentences of radiology reports better);
- a POST-negation trigger ("is not seen", "not identified", "has resolved", ...) negates every
  word before it in the clause;
- PSEUDO-negations ("no change", "not only", "no increase") are phrases that look like triggers but
  negate nothing; they are consumed first.

Affirmed words are lower-cased, stop words and numbers dropped, and n-grams are formed only from
RUNS of adjacent affirmed content words (a stop word, a number or a negated word breaks a run), so
"Small left pleural effusion and mild cardiomegaly" yields "small left pleural", "pleural
effusion", "mild cardiomegaly" ... but never "effusion mild". Uncertain mentions ("possible
consolidation") count as mentions: they are not negations, and the labeler compares mention rates,
not diagnoses.
"""

from __future__ import annotations

import re
from typing import Iterable

PRE_NEGATION: tuple[str, ...] = (
    "no evidence of", "no evidence for", "no signs of", "no sign of", "negative for", "free of", "absence of",
    "resolution of", "rather than", "without", "no", "nor",
)
POST_NEGATION: tuple[str, ...] = (
    "is not seen", "are not seen", "was not seen", "not seen", "is not identified", "are not identified",
    "not identified", "is not present", "are not present", "not present", "is not demonstrated",
    "not demonstrated", "is not visualized", "not visualized", "is absent", "are absent", "has resolved",
    "have resolved", "resolved", "is excluded", "ruled out",
)
PSEUDO_NEGATION: tuple[str, ...] = (
    "no change", "no significant change", "no interval change", "no increase", "not only", "without change",
    "no new change",
)
TERMINATION: tuple[str, ...] = (
    "but", "however", "although", "though", "except", "aside from", "apart from", "which", "whereas", "yet",
    "with the exception of",
)
STOP_WORDS: frozenset[str] = frozenset("""
a an the of in on at to and or is are was were be been being with for by as from there this that these those
it its into over under above below within per than then also again still now since prior previous previously
compared comparison seen noted note place placed limits limit evaluation demonstrated present identified
mm cm measuring measures approximately about patient study image images film view views
""".split())

_SENTENCE = re.compile(r"(?<=[.;:!?])\s+|\n+")
_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def _split_triggers(triggers: Iterable[str]) -> list[tuple[str, ...]]:
    # Longest first, so "no evidence of" wins over "no".
    return sorted((tuple(t.split()) for t in triggers), key=len, reverse=True)


_PRE = _split_triggers(PRE_NEGATION)
_POST = _split_triggers(POST_NEGATION)
_PSEUDO = _split_triggers(PSEUDO_NEGATION)
_TERM = _split_triggers(TERMINATION)


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _match_at(tokens: list[str], i: int, phrases: list[tuple[str, ...]]) -> int:
    """Length of the longest phrase starting at tokens[i], 0 if none."""
    for p in phrases:
        if tuple(tokens[i:i + len(p)]) == p:
            return len(p)
    return 0


def _clauses(tokens: list[str]) -> list[list[str]]:
    out: list[list[str]] = [[]]
    i = 0
    while i < len(tokens):
        n = _match_at(tokens, i, _TERM)
        if n:
            out.append([])
            i += n
            continue
        out[-1].append(tokens[i])
        i += 1
    return [c for c in out if c]


def affirmed_runs(text: str) -> list[list[str]]:
    """Runs of adjacent affirmed content words, sentence by sentence and clause by clause."""
    runs: list[list[str]] = []
    for sentence in _SENTENCE.split(text):
        for clause in _clauses(tokenize(sentence)):
            n = len(clause)
            role = ["word"] * n  # word | trigger | negated
            i = 0
            while i < n:  # pseudo-negations first: consumed, negate nothing
                k = _match_at(clause, i, _PSEUDO)
                if k:
                    role[i:i + k] = ["trigger"] * k
                    i += k
                else:
                    i += 1
            i = 0
            while i < n:
                if role[i] == "trigger":
                    i += 1
                    continue
                k = _match_at(clause, i, _POST)
                if k:
                    role[i:i + k] = ["trigger"] * k
                    role[:i] = ["negated" if r == "word" else r for r in role[:i]]
                    i += k
                    continue
                k = _match_at(clause, i, _PRE)
                if k:
                    role[i:i + k] = ["trigger"] * k
                    role[i + k:] = ["negated" if r == "word" else r for r in role[i + k:]]
                    break
                i += 1
            run: list[str] = []
            for tok, r in zip(clause, role):
                if r == "word" and tok not in STOP_WORDS and not any(ch.isdigit() for ch in tok):
                    run.append(tok)
                else:
                    if run:
                        runs.append(run)
                    run = []
            if run:
                runs.append(run)
    return runs


def extract_terms(text: str, max_n: int = 3) -> set[str]:
    """The affirmed 1..max_n-grams of a report (negated mentions excluded)."""
    terms: set[str] = set()
    for run in affirmed_runs(text or ""):
        for n in range(1, max_n + 1):
            for i in range(len(run) - n + 1):
                terms.add(" ".join(run[i:i + n]))
    return terms
