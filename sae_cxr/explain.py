"""Natural-language explanations (NLEs) from exact decompositions, for clinicians and lay readers.

`compose` turns one `Decomposition` (image, finding) into text DETERMINISTICALLY: the same
decomposition and config always give the same words. It states the finding and its probability
on a verbal scale, the strongest supporting patterns with their strength and location, the main
counter-evidence, and caveats (shortcut, reconstruction error, unverified names, low coverage).
The clinician text uses radiological terms and numbers; the lay text says the same evidence in
plain words (WeNLEX's point: the audience changes the words, never the evidence).

`rewrite` asks a language model to make that text more fluent, and ACCEPTS the reply only when a
term-level guard finds nothing in it that the attribution does not contain: no new finding, no
new device/anatomy/vocabulary term, no new side, no new pattern id, no number the deterministic
text does not state, no negated finding, no changed verbal probability, no dropped caveat. Otherwise the
deterministic text stands and the rejection is logged with its reason.

The verbal probability scale (`VERBAL_SCALE`) uses the expressions clinicians read most
reproducibly ("very likely", "likely", "unlikely"; Shinagare et al., Clin Radiol 2014, found
"likely"/"unlikely"/"most likely" had the narrowest inter-decile ranges while "suspicious for",
"compatible with", "possibly" had the widest) with a middle band "uncertain". The words are
exactly as calibrated as the classifier's probabilities: calibrate the head (and report its ECE)
before reading them as frequencies.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from sae_cxr.attribution_types import Decomposition, PatternEvidence
from sae_cxr.findings import CONCEPTS, FINDINGS, NUISANCE_CATEGORIES, radiology_vocabulary
from sae_cxr.labeling.llm_client import ChatBackend, LLMError

log = logging.getLogger(__name__)

TEMPLATE_VERSION = "nle-templates/1"
"""Bumped whenever a template's wording changes, so stored explanations say which words made them."""

AUDIENCES = ("clinician", "lay")

# ----------------------------------------------------------------------------------------------
# Vocabularies
# ----------------------------------------------------------------------------------------------
VERBAL_SCALE: tuple[tuple[float, str], ...] = (
    (0.90, "very likely"),
    (0.70, "likely"),
    (0.40, "uncertain"),
    (0.10, "unlikely"),
    (0.00, "very unlikely"),
)
"""(lower bound of the probability, words): the first row whose bound p reaches names p."""

# Synonyms a rewrite may use for a band; the guard maps them back to the band to compare.
_BAND_SYNONYMS: dict[str, str] = {
    "very likely": "very likely", "almost certain": "very likely", "almost certainly": "very likely",
    "highly likely": "very likely", "most likely": "very likely",
    "likely": "likely", "probable": "likely", "probably": "likely",
    "uncertain": "uncertain", "unsure": "uncertain", "equivocal": "uncertain", "indeterminate": "uncertain",
    "unlikely": "unlikely", "improbable": "unlikely",
    "very unlikely": "very unlikely", "highly unlikely": "very unlikely", "almost certainly not": "very unlikely",
}

LAY_CONCEPT: dict[str, str] = {
    "cardiomegaly": "an enlarged heart",
    "consolidation": "a filled-in patch of lung",
    "edema": "fluid in the lungs",
    "atelectasis": "a partly collapsed area of lung",
    "nodule": "a small round spot in the lung",
    "pleural_effusion": "fluid around the lung",
    "pneumothorax": "air trapped around the lung",
    "scoliosis": "a curved spine",
    "elevated_hemidiaphragm": "a diaphragm sitting higher on one side",
    "rotation": "the patient turned slightly to one side",
    "pacemaker": "a pacemaker",
    "et_tube": "a breathing tube",
    "central_line": "a thin tube placed in a large vein",
    "sternotomy_wires": "wires from earlier chest surgery",
    "laterality_marker": "a side-marker letter on the image",
    "burned_in_text": "text printed on the image",
    "low_exposure": "a grainy, low-quality image",
    "collimation_edge": "a straight border at the edge of the image",
}
"""Plain words for every phantom concept (radiological phrase -> lay phrase)."""

LAY_FINDING: dict[str, str] = {
    f: LAY_CONCEPT[next(c.name for c in CONCEPTS.values() if c.finding == f)] for f in FINDINGS
}
"""Plain words for the five findings, e.g. Pleural Effusion -> "fluid around the lung"."""

LAY_CATEGORY: dict[str, str] = {
    "cardiac": "a change in the outline of the heart",
    "pulmonary": "a change in the lung tissue",
    "pleural": "a change at the lining around the lung",
    "structural": "a feature of the bones or body position",
    "device": "a medical device",
    "artifact": "a mark or flaw in the image itself",
}
"""Fallback lay names, by category, for labels that have no plain-word translation."""

JARGON: tuple[str, ...] = (
    "cardiomegaly", "cardiomediastinal", "cardiac silhouette", "silhouette", "consolidation", "consolidative",
    "atelectasis", "atelectatic", "edema", "oedema", "effusion", "pleural", "pneumothorax", "opacity",
    "opacities", "opacification", "costophrenic", "hilar", "hilum", "perihilar", "mediastinum", "mediastinal",
    "hemidiaphragm", "endotracheal", "catheter", "sternotomy", "interstitial", "septal", "bronchogram",
    "meniscus", "collimation", "laterality", "nodule", "nodular", "parenchyma", "parenchymal", "lobar",
    "retrocardiac", "scoliosis", "pulmonary", "apical", "basilar", "lucency", "kerley", "radiograph",
    "logit", "transcoder", "reconstruction error",
)
"""Radiological (and model) terms a lay explanation must not contain."""

_LAY_LOCATION: tuple[tuple[str, str], ...] = (
    (r"\bcostophrenic angles?\b", "lower outer corner of the lung"),
    (r"\bperihilar( region)?\b", "area around the centre of the lungs"),
    (r"\bhil(?:um|a|ar)( region)?\b", "centre of the lung"),
    (r"\bmediastin(?:um|al)( region)?\b", "middle of the chest"),
    (r"\bretrocardiac( region)?\b", "area behind the heart"),
    (r"\bapical( region)?\b|\bapex\b|\bapices\b", "top of the lung"),
    (r"\bbasal( region)?\b|\bbase\b|\bbases\b", "bottom of the lung"),
    (r"\bhemidiaphragm\b", "diaphragm"),
    (r"\bcardiac( region)?\b", "heart area"),
    (r"\bzone\b", "part of the chest"),
)

_ANATOMY: dict[str, str] = {
    "lung": "lung", "pulmonary": "lung", "heart": "heart", "cardiac": "heart",
    "diaphragm": "diaphragm", "hemidiaphragm": "diaphragm", "spine": "spine", "spinal": "spine",
    "vertebra": "spine", "vertebral": "spine", "rib": "rib", "clavicle": "clavicle", "sternum": "sternum",
    "sternal": "sternum", "trachea": "trachea", "tracheal": "trachea", "carina": "trachea",
    "mediastinum": "mediastinum", "mediastinal": "mediastinum", "hilum": "hilum", "hila": "hilum",
    "hilar": "hilum", "perihilar": "hilum", "costophrenic": "costophrenic angle", "apex": "apex",
    "apices": "apex", "apical": "apex", "base": "base", "basal": "base", "basilar": "base", "bibasilar": "base",
    "vein": "vein", "venous": "vein", "vena cava": "vein", "artery": "artery", "aorta": "aorta",
    "aortic": "aorta", "pleura": "pleura", "pleural": "pleura", "abdomen": "abdomen", "stomach": "abdomen",
    "neck": "neck", "shoulder": "shoulder", "breast": "breast", "retrocardiac": "heart",
    "upper zone": "upper zone", "middle zone": "middle zone", "mid zone": "middle zone", "lower zone": "lower zone",
    "lobe": "lobe",
}
"""Anatomy words the guard tracks (word -> structure); 'chest' is the whole image, so it is not tracked."""

_SIDES: dict[str, str] = {"right": "right", "left": "left", "bilateral": "bilateral", "both sides": "bilateral",
                          "bilaterally": "bilateral"}

_UNNAMED = frozenset({"", "unknown", "unresolved", "unlabelled", "unlabeled", "unnamed", "n/a", "none", "?"})


# ----------------------------------------------------------------------------------------------
# Config and results
# ----------------------------------------------------------------------------------------------
@dataclass
class ExplainConfig:
    """How `compose` selects evidence and when it adds caveats. Saved with every explanation run."""

    max_primary: int = 3
    """Most patterns cited on the decision's side (support for a positive call, counter-evidence for a negative)."""
    max_secondary: int = 2
    """Most patterns cited on the other side (the evidence the decision outweighed)."""
    min_share: float = 0.02
    """Patterns with a smaller share of the |evidence| are not cited (noise, not explanation)."""
    strong_share: float = 0.25
    """Share of the |evidence| from which a pattern is called "strong"."""
    moderate_share: float = 0.10
    """Share from which a pattern is called "moderate"; below it, "weak"."""
    decision_threshold: float = 0.5
    """Probability at which the classifier's call turns positive (per-finding values: `thresholds`)."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """Optional per-finding decision thresholds (e.g. tuned on validation), overriding decision_threshold."""
    shortcut_share: float = 0.30
    """Shortcut warning when device/artifact patterns pushing the way of the decision hold MORE than
    this share of the |evidence| (the sum of their `share`)."""
    error_ratio: float = 0.25
    """Caveat when |error| / max(|logit|, error_logit_floor) exceeds this: the transcoders miss too much."""
    error_logit_floor: float = 1.0
    """Floor on |logit| in that ratio, so a near-zero logit does not turn every tiny error into a caveat."""
    min_coverage: float = 0.5
    """Caveat when the reported patterns explain less than this share of the |evidence|."""

    def __post_init__(self) -> None:
        if self.max_primary < 1 or self.max_secondary < 0:
            raise ValueError(f"max_primary must be >= 1 and max_secondary >= 0, got {self.max_primary}, "
                             f"{self.max_secondary}")
        if not 0.0 <= self.min_share <= self.moderate_share <= self.strong_share <= 1.0:
            raise ValueError("shares must satisfy 0 <= min_share <= moderate_share <= strong_share <= 1, got "
                             f"{self.min_share}, {self.moderate_share}, {self.strong_share}")
        for name in ("decision_threshold", "shortcut_share", "min_coverage"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")
        for f, t in self.thresholds.items():
            if f not in FINDINGS or not 0.0 <= t <= 1.0:
                raise ValueError(f"thresholds[{f!r}] = {t}: keys must be findings ({', '.join(FINDINGS)}) and "
                                 "values in [0, 1]")
        if self.error_ratio <= 0 or self.error_logit_floor <= 0:
            raise ValueError("error_ratio and error_logit_floor must be > 0")

    def threshold(self, finding: str) -> float:
        return self.thresholds.get(finding, self.decision_threshold)


@dataclass
class Explanation:
    """One composed explanation. `parts` are (kind, sentence) pairs whose texts joined make `text`."""

    text: str
    audience: str
    finding: str
    record_id: str
    cited_patterns: list[int]
    cited_findings: list[str]
    template_version: str
    decision: bool
    probability: float
    parts: list[tuple[str, str]] = field(default_factory=list)
    """kinds: verdict, primary, secondary, caveat:shortcut, caveat:error, caveat:flagged, caveat:coverage."""

    @property
    def caveats(self) -> list[str]:
        return [k.split(":", 1)[1] for k, _ in self.parts if k.startswith("caveat:")]

    @property
    def evidence_text(self) -> str:
        """The text without the verdict sentence: what simulatability should read to be non-trivial."""
        return " ".join(s for k, s in self.parts if k != "verdict")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["parts"] = [list(p) for p in self.parts]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Explanation":
        d = dict(d)
        d["parts"] = [tuple(p) for p in d.get("parts", [])]
        try:
            return cls(**d)
        except TypeError as e:
            raise ValueError(f"not an explanation record ({e}); keys: {sorted(d)}") from None


# ----------------------------------------------------------------------------------------------
# Term extraction (shared by compose, the rewrite guard and the metrics)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TermInfo:
    key: str  # a concept name, or "vocab:<phrase>" for a vocabulary phrase without a concept
    category: str | None
    finding: str | None  # the finding the term names or implies


@dataclass
class Terms:
    """What a text mentions, as the guard compares it."""

    findings: set[str] = field(default_factory=set)
    terms: dict[str, str] = field(default_factory=dict)  # key -> first surface form seen
    anatomy: set[str] = field(default_factory=set)
    sides: set[str] = field(default_factory=set)
    sided: set[tuple[str, str]] = field(default_factory=set)
    """(side, the term or structure it qualifies within the next three words), e.g. ("right", "lower zone")."""
    pattern_ids: set[int] = field(default_factory=set)
    numbers: list[float] = field(default_factory=list)
    bands: set[str] = field(default_factory=set)
    quoted: list[str] = field(default_factory=list)
    negated: set[str] = field(default_factory=set)
    """Findings named within three words after a negation cue ("no pleural effusion", "not ... edema")."""


def _norm(text: str, stops: bool = False) -> str:
    """Lowercase, every run of non-alphanumerics to one space, padded: the form phrases match in.
    With `stops`, sentence punctuation becomes a "|" token, so word windows end at a sentence."""
    s = text.lower()
    if stops:
        s = re.sub(r"[.;:!?](?=\s|$)", " | ", s)
    return " " + re.sub(r"[^a-z0-9|]+", " ", s).strip() + " "


def _words_between(n: str, a: int, b: int) -> int | None:
    """Words between two offsets of a normalised text; None when a sentence stop lies between."""
    gap = n[a:b]
    return None if "|" in gap else len(gap.split())


def _alternation(phrases: Iterable[str]) -> re.Pattern[str]:
    alts = sorted({p for p in phrases if p}, key=lambda p: (-len(p), p))
    body = "|".join(re.escape(p) for p in alts)
    # Word boundaries in the normalised text; an optional plural s/es.
    return re.compile(rf"(?<![a-z0-9])({body})(?:e?s)?(?![a-z0-9])")


_ID = r"(?:#\s*)?\d+(?!\d|\.\d|\s*%)"  # an id, not the start of a percentage or a decimal
_PATTERN_IDS = re.compile(rf"\bpatterns?\s+({_ID}(?:\s*(?:,|and|&|or)\s*{_ID})*)|#(\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])[-+]?(\d+(?:\.\d+)?|\.\d+)(\s*%)?")
# "not evidence of X" (the shortcut caveat) is about the evidence, not X, so "not" before "evidence" is no cue.
_NEGATION = re.compile(r"(?<![a-z0-9])(no|not(?! evidence)|without|absence of|free of|negative for|rules? out|"
                       r"ruled out|excludes?|excluded)(?![a-z0-9])")
_NEGATION_AFTER = re.compile(r"^\s*(?:\w+\s+)?(is |are )?(absent|not present|not seen|excluded|ruled out)(?![a-z0-9])")
_QUOTED = re.compile(r"[\"\u201c]([^\"\u201d]{1,120})[\"\u201d]")


class TermExtractor:
    """Finds findings, concept/vocabulary terms, anatomy, sides, pattern ids, numbers and verbal
    probability words in a text, mapping synonyms onto one key (so "pacing leads" and "pacemaker"
    are the same term, and "fluid around the lung" names Pleural Effusion).

    Knows FINDINGS, the concept phrases, `radiology_vocabulary()`, the lay phrases and the verbal scale.
    """

    def __init__(self) -> None:
        info: dict[str, TermInfo] = {}

        def add(phrase: str, ti: TermInfo) -> None:
            key = _norm(phrase).strip()
            if key and key not in info:  # first source wins: finding names, then concepts, then the vocabulary
                info[key] = ti

        concept_of_finding = {c.finding: c.name for c in CONCEPTS.values() if c.finding}
        for f in FINDINGS:
            c = CONCEPTS[concept_of_finding[f]]
            add(f, TermInfo(c.name, c.category, f))
        for c in CONCEPTS.values():
            add(c.phrase, TermInfo(c.name, c.category, c.finding))
            add(c.name.replace("_", " "), TermInfo(c.name, c.category, c.finding))
            add(re.sub(r"^(an?|the) ", "", LAY_CONCEPT[c.name]), TermInfo(c.name, c.category, c.finding))
        add("oedema", TermInfo("edema", "pulmonary", "Edema"))
        for v in radiology_vocabulary():
            if v.concept:
                c = CONCEPTS[v.concept]
                add(v.phrase, TermInfo(c.name, c.category, c.finding))
            else:
                add(v.phrase, TermInfo(f"vocab:{_norm(v.phrase).strip()}", v.category, None))
        self._info = info
        self._terms_re = _alternation(info)
        self._anatomy_re = _alternation(_ANATOMY)
        self._sides_re = _alternation(_SIDES)
        self._bands_re = _alternation(_BAND_SYNONYMS)

    def info(self, key: str) -> TermInfo | None:
        """The TermInfo of a normalised phrase, if the extractor knows it."""
        return self._info.get(_norm(key).strip())

    def extract(self, text: str) -> Terms:
        out = Terms()
        n = _norm(text, stops=True)
        anchors: list[tuple[int, int, str]] = []  # (start, 0 for a term / 1 for anatomy, key)
        negations = [m.end() for m in _NEGATION.finditer(n)]
        for m in self._terms_re.finditer(n):
            ti = self._info[m.group(1)]
            out.terms.setdefault(ti.key, m.group(1))
            anchors.append((m.start(), 0, ti.key))
            if ti.finding:
                out.findings.add(ti.finding)
                before = any(end <= m.start() and (w := _words_between(n, end, m.start())) is not None and w <= 3
                             for end in negations)
                if before or _NEGATION_AFTER.match(n[m.end():]):
                    out.negated.add(ti.finding)
        for m in self._anatomy_re.finditer(n):
            out.anatomy.add(_ANATOMY[m.group(1)])
            anchors.append((m.start(), 1, _ANATOMY[m.group(1)]))
        anchors.sort()
        for m in self._sides_re.finditer(n):
            side = _SIDES[m.group(1)]
            out.sides.add(side)
            target = next((key for start, _, key in anchors
                           if start >= m.end() and (w := _words_between(n, m.end(), start)) is not None and w <= 3),
                          None)
            if target is not None:
                out.sided.add((side, target))
        out.bands = {_BAND_SYNONYMS[m.group(1)] for m in self._bands_re.finditer(n)}
        id_spans: list[tuple[int, int]] = []
        for m in _PATTERN_IDS.finditer(text):
            id_spans.append(m.span())
            out.pattern_ids.update(int(x) for x in re.findall(r"\d+", m.group(1) or m.group(2)))
        for m in _NUMBER.finditer(text):
            if any(a <= m.start() < b for a, b in id_spans):
                continue
            v = float(m.group(1))
            out.numbers.append(v / 100.0 if m.group(2) else v)
        out.quoted = [q.strip() for q in _QUOTED.findall(text)]
        return out

    def concepts_in(self, text: str) -> list[str]:
        """Concept names the text mentions, in order of first appearance."""
        seen: list[str] = []
        for m in self._terms_re.finditer(_norm(text)):
            key = self._info[m.group(1)].key
            if key in CONCEPTS and key not in seen:
                seen.append(key)
        return seen


@functools.lru_cache(maxsize=1)
def default_extractor() -> TermExtractor:
    return TermExtractor()


def jargon_in(text: str) -> list[str]:
    """The JARGON terms a text contains (word-boundary, case-insensitive, plural-tolerant)."""
    n = _norm(text)
    return [j for j in JARGON if re.search(rf"(?<![a-z0-9]){re.escape(_norm(j).strip())}(?:e?s)?(?![a-z0-9])", n)]


# ----------------------------------------------------------------------------------------------
# Composition
# ----------------------------------------------------------------------------------------------
def verbal_probability(p: float) -> str:
    """The VERBAL_SCALE words for a probability."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability must lie in [0, 1], got {p}")
    for bound, words in VERBAL_SCALE:
        if p >= bound:
            return words
    raise AssertionError("unreachable: the scale's last bound is 0")


def strength_word(share: float, config: ExplainConfig) -> str:
    if share >= config.strong_share:
        return "strong"
    if share >= config.moderate_share:
        return "moderate"
    return "weak"


def decision_of(decomp: Decomposition, config: ExplainConfig) -> bool:
    """The classifier's call for this finding: probability >= the finding's threshold."""
    return decomp.probability >= config.threshold(decomp.finding)


def is_unnamed(p: PatternEvidence) -> bool:
    return p.label is None or p.label.strip().lower() in _UNNAMED


def nuisance_patterns(decomp: Decomposition, decision: bool) -> list[PatternEvidence]:
    """Device/artifact patterns pushing the way of the decision, strongest first."""
    sign = 1.0 if decision else -1.0
    return _ranked([p for p in decomp.patterns
                    if p.category in NUISANCE_CATEGORIES and p.contribution * sign > 0])


def shortcut_share(decomp: Decomposition, decision: bool) -> float:
    """Share of the |evidence| carried by device/artifact patterns pushing the way of the decision."""
    return float(sum(p.share for p in nuisance_patterns(decomp, decision)))


def relative_error(decomp: Decomposition, config: ExplainConfig) -> float:
    return abs(decomp.error) / max(abs(decomp.logit), config.error_logit_floor)


def _ranked(patterns: Iterable[PatternEvidence]) -> list[PatternEvidence]:
    # Ties broken by id, so equal contributions never reorder between runs.
    return sorted(patterns, key=lambda p: (-abs(p.contribution), p.pattern_id))


def _pct(share: float) -> str:
    v = round(share * 100)
    return "<1%" if v < 1 and share > 0 else f"{v}%"


def _join(items: list[str], sep: str = "; ") -> str:
    return sep.join(items)


def _and(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def lay_location(location: str | None) -> str | None:
    """A spatial-map location in plain words ("right costophrenic angle" -> "right lower outer corner of
    the lung"); None when it cannot be said without jargon."""
    if not location or not location.strip():
        return None
    s = location.strip().lower()
    for pattern, repl in _LAY_LOCATION:
        s = re.sub(pattern, repl, s)
    s = re.sub(r"\s+", " ", s).strip()
    return None if jargon_in(s) else s


def lay_name(p: PatternEvidence, extractor: TermExtractor | None = None, with_side: bool = True) -> str:
    """A pattern's label in plain words: the lay phrase of the concept it names (with the label's side
    unless `with_side` is False, e.g. when a location follows), the label itself when it is already
    plain, else a category-level description."""
    ex = extractor or default_extractor()
    if is_unnamed(p):
        return f"an unnamed feature, pattern {p.pattern_id},"
    label = p.label.strip()  # type: ignore[union-attr]
    concepts = ex.concepts_in(label)
    if concepts:
        phrase = LAY_CONCEPT[concepts[0]]
        sides = ex.extract(label).sides if with_side else set()
        if sides == {"bilateral"} or sides == {"left", "right"}:
            phrase += " on both sides"
        elif len(sides) == 1:
            phrase += f" on the {next(iter(sides))}"
        return phrase
    if not jargon_in(label):
        return label.lower()
    return LAY_CATEGORY.get(p.category or "", "an image feature")


def clinician_name(p: PatternEvidence) -> str:
    if is_unnamed(p):
        return f"pattern {p.pattern_id} (unnamed{', ' + p.category if p.category else ''})"
    cat = f", {p.category}" if p.category else ""
    ids = f"patterns {', '.join(map(str, p.merged_ids))}" if len(p.merged_ids) > 1 else f"pattern {p.pattern_id}"
    return f"\"{p.label.strip()}\" ({ids}{cat})"  # type: ignore[union-attr]


def merge_same_name(patterns: Iterable[PatternEvidence]) -> list[PatternEvidence]:
    """One item per (name, direction): patterns that a labeler gave the same name (feature splits of one
    finding, or members of one concept) are cited together with their summed contribution and share,
    at the location of the strongest. Unnamed patterns stay separate."""
    groups: dict[tuple[str, str, bool], list[PatternEvidence]] = {}
    singles: list[PatternEvidence] = []
    for p in patterns:
        if is_unnamed(p):
            singles.append(p)
            continue
        key = (p.label.strip().lower(), p.category or "", p.contribution > 0)  # type: ignore[union-attr]
        groups.setdefault(key, []).append(p)
    out = list(singles)
    for members in groups.values():
        members = _ranked(members)
        if len(members) == 1:
            out.append(members[0])
            continue
        top = members[0]
        out.append(PatternEvidence(
            pattern_id=top.pattern_id, contribution=sum(m.contribution for m in members),
            activation=top.activation, label=top.label, category=top.category, description=top.description,
            verification=top.verification, flagged=any(m.flagged for m in members),
            location=next((m.location for m in members if m.location), None),
            share=min(1.0, sum(m.share for m in members)), merged_ids=tuple(m.pattern_id for m in members)))
    return out


def _clinician_item(p: PatternEvidence, config: ExplainConfig) -> str:
    loc = f", {p.location.strip()}" if p.location and p.location.strip() else ""
    return f"{clinician_name(p)}: {strength_word(p.share, config)}, {_pct(p.share)} of evidence{loc}"


def _lay_item(p: PatternEvidence, config: ExplainConfig, ex: TermExtractor) -> str:
    loc = lay_location(p.location)
    where = f" in the {loc}" if loc else ""
    name = lay_name(p, ex, with_side=loc is None)
    if not loc:
        name = name.rstrip(",")
    return f"{name}{where} ({strength_word(p.share, config)} sign)"


def select_evidence(decomp: Decomposition, config: ExplainConfig
                    ) -> tuple[list[PatternEvidence], list[PatternEvidence]]:
    """(primary, secondary): the patterns on the decision's side and on the other side, strongest first."""
    decision = decision_of(decomp, config)
    eligible = [p for p in merge_same_name(decomp.patterns) if p.share >= config.min_share and p.contribution != 0.0]
    support = _ranked(p for p in eligible if p.contribution > 0)
    counter = _ranked(p for p in eligible if p.contribution < 0)
    primary, secondary = (support, counter) if decision else (counter, support)
    return primary[: config.max_primary], secondary[: config.max_secondary]


def compose(decomp: Decomposition, audience: str = "clinician", config: ExplainConfig | None = None,
            extractor: TermExtractor | None = None) -> Explanation:
    """The deterministic explanation of one decomposition for one audience."""
    if audience not in AUDIENCES:
        raise ValueError(f"unknown audience {audience!r}; expected one of: {', '.join(AUDIENCES)}")
    if not isinstance(decomp, Decomposition):
        raise TypeError(f"compose needs a Decomposition, got {type(decomp).__name__}; "
                        "build one with Decomposition.from_dict for JSON input")
    cfg = config or ExplainConfig()
    ex = extractor or default_extractor()
    decision = decision_of(decomp, cfg)
    primary, secondary = select_evidence(decomp, cfg)
    nuisance = nuisance_patterns(decomp, decision)
    shortcut = shortcut_share(decomp, decision) > cfg.shortcut_share
    named_nuisance = nuisance[: cfg.max_primary] if shortcut else []
    cited: list[PatternEvidence] = []
    for p in primary + secondary + named_nuisance:
        if all(p.pattern_id != q.pattern_id for q in cited):
            cited.append(p)
    flagged = [p for p in cited if p.flagged and not is_unnamed(p)]
    error_big = relative_error(decomp, cfg) > cfg.error_ratio
    low_coverage = decomp.coverage < cfg.min_coverage and decomp.n_active_patterns > 0

    if audience == "clinician":
        parts = _clinician_parts(decomp, cfg, decision, primary, secondary, named_nuisance, shortcut,
                                 error_big, flagged, low_coverage)
    else:
        parts = _lay_parts(decomp, cfg, ex, decision, primary, secondary, named_nuisance, shortcut,
                           error_big, flagged, low_coverage)
    text = " ".join(s for _, s in parts)
    mentioned = ex.extract(text).findings | {decomp.finding}
    return Explanation(text=text, audience=audience, finding=decomp.finding, record_id=decomp.record_id,
                       cited_patterns=[i for p in cited for i in (p.merged_ids or (p.pattern_id,))],
                       cited_findings=[f for f in FINDINGS if f in mentioned],
                       template_version=TEMPLATE_VERSION, decision=decision, probability=decomp.probability,
                       parts=parts)


def _clinician_parts(d: Decomposition, cfg: ExplainConfig, decision: bool, primary: list[PatternEvidence],
                     secondary: list[PatternEvidence], nuisance: list[PatternEvidence], shortcut: bool,
                     error_big: bool, flagged: list[PatternEvidence], low_coverage: bool) -> list[tuple[str, str]]:
    t = cfg.threshold(d.finding)
    call = "positive" if decision else "negative"
    parts = [("verdict", f"{d.finding}: {verbal_probability(d.probability)} (p = {d.probability:.2f}, "
                         f"logit {d.logit:+.2f}; {call} at threshold {t:.2f}).")]
    head1, head2 = (("Supporting evidence", "Counter-evidence") if decision
                    else ("Evidence against", "Evidence for (outweighed)"))
    if primary:
        parts.append(("primary", f"{head1}: {_join([_clinician_item(p, cfg) for p in primary])}."))
    else:
        parts.append(("primary", f"{head1}: no reported pattern holds {_pct(cfg.min_share)} of the evidence or more."))
    if secondary:
        parts.append(("secondary", f"{head2}: {_join([_clinician_item(p, cfg) for p in secondary])}."))
    finding = d.finding.lower()
    if shortcut:
        names = _and([clinician_name(p) for p in nuisance])
        verb, self_ = ("is", "itself") if len(nuisance) == 1 else ("are", "themselves")
        of = "of" if decision else "against"
        parts.append(("caveat:shortcut",
                      f"Shortcut warning: a large part of this {call} call ({_pct(shortcut_share(d, decision))} "
                      f"of the evidence) rests on device/artifact patterns: {names}, which {verb} not evidence "
                      f"{of} {finding} by {self_}."))
    if error_big:
        parts.append(("caveat:error",
                      f"Caveat: the transcoder reconstruction error ({d.error:+.2f}) is large relative to the "
                      f"logit ({d.logit:+.2f}); the pattern account is incomplete."))
    if flagged:
        ids = _and([str(p.pattern_id) for p in flagged])
        parts.append(("caveat:flagged",
                      f"Caveat: the name{'s' if len(flagged) > 1 else ''} of pattern{'s' if len(flagged) > 1 else ''} "
                      f"{ids} failed verification; treat {'them' if len(flagged) > 1 else 'it'} as tentative."))
    if low_coverage:
        parts.append(("caveat:coverage",
                      f"Caveat: the reported patterns cover only {_pct(d.coverage)} of the evidence."))
    return parts


def _lay_parts(d: Decomposition, cfg: ExplainConfig, ex: TermExtractor, decision: bool,
               primary: list[PatternEvidence], secondary: list[PatternEvidence], nuisance: list[PatternEvidence],
               shortcut: bool, error_big: bool, flagged: list[PatternEvidence],
               low_coverage: bool) -> list[tuple[str, str]]:
    what = LAY_FINDING[d.finding]
    band = verbal_probability(d.probability)
    if band == "uncertain":
        verdict = (f"The computer program is uncertain whether there is {what}, "
                   f"but leans towards {'yes' if decision else 'no'}.")
    else:
        verdict = f"The computer program thinks {what} is {band}."
    parts = [("verdict", verdict)]
    head1, head2 = (("The main signs it relied on", "Signs pointing the other way") if decision
                    else ("The main signs against it", "Signs that pointed towards it but were outweighed"))
    if primary:
        parts.append(("primary", f"{head1}: {_join([_lay_item(p, cfg, ex) for p in primary])}."))
    else:
        parts.append(("primary", "No single feature stood out as a main sign."))
    if secondary:
        parts.append(("secondary", f"{head2}: {_join([_lay_item(p, cfg, ex) for p in secondary])}."))
    if shortcut:
        names = _and([lay_name(p, ex).rstrip(",") for p in nuisance])
        parts.append(("caveat:shortcut",
                      f"Warning: much of this result rests on {names}, which by "
                      f"{'itself' if len(nuisance) == 1 else 'themselves'} says nothing about whether there "
                      f"is {what}."))
    if error_big:
        parts.append(("caveat:error",
                      "Part of the program's reasoning could not be traced, so this explanation is incomplete."))
    if flagged:
        parts.append(("caveat:flagged", "Some of the feature names above are not yet confirmed and may be wrong."))
    if low_coverage:
        parts.append(("caveat:coverage", "The signs listed cover only part of what the program used."))
    return parts


def compose_many(decomps: Iterable[Decomposition], audience: str = "clinician",
                 config: ExplainConfig | None = None) -> list[Explanation]:
    ex = default_extractor()
    return [compose(d, audience, config, ex) for d in decomps]


def save_explanations(path: str | os.PathLike, explanations: Sequence[Explanation]) -> None:
    """Write explanations as JSON Lines, atomically (explanations/ in the run directory)."""
    from sae_cxr.run import write_bytes_atomic

    lines = [json.dumps(e.to_dict(), sort_keys=True, ensure_ascii=False) for e in explanations]
    write_bytes_atomic(path, ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8"))


def load_explanations(path: str | os.PathLike) -> list[Explanation]:
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(Explanation.from_dict(json.loads(line)))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not an explanation record ({e})") from None
    return out


# ----------------------------------------------------------------------------------------------
# Guarded rewrite
# ----------------------------------------------------------------------------------------------
REWRITE_SYSTEM = (
    "You edit explanations of a chest X-ray classifier's predictions so that they read fluently for {reader}. "
    "Rewrite the explanation you are given. Keep every fact and every caveat. Add NOTHING: no finding, "
    "disease, anatomy, side, device, number or pattern id that is not already in the text. Keep pattern ids "
    "and numbers exactly as written. {style} Reply with the rewritten explanation only, no preamble."
)
_READER = {"clinician": "a radiologist or referring clinician",
           "lay": "a patient or another reader without medical training"}
_STYLE = {"clinician": "Use radiological terms.",
          "lay": "Use plain everyday words and no medical jargon; do not add numbers."}

_CAVEAT_CUES: dict[str, tuple[str, ...]] = {
    "error": ("error", "incomplete", "unexplained", "not be traced", "could not be traced", "partial", "partly"),
    "flagged": ("verification", "verified", "tentative", "unconfirmed", "not confirmed", "not yet confirmed",
                "may be wrong"),
    "coverage": ("only part", "cover", "partial", "incomplete", "only"),
}


@dataclass
class RewriteConfig:
    """How the guarded rewrite asks and what it tolerates."""

    max_length_ratio: float = 2.0
    """Reject a rewrite longer than this many times the deterministic text (padding invents content)."""
    min_length_ratio: float = 0.3
    """Reject a rewrite shorter than this fraction of it (too short to keep the evidence and caveats)."""
    number_tolerance: float = 0.011
    """A number in the rewrite matches a stated one within this absolute tolerance (after % -> fraction)
    or within 2% relative; covers rounding 0.824 -> 0.82 and 41% -> 0.41."""


@dataclass
class RewriteResult:
    text: str
    """The accepted rewrite, or the deterministic text when the rewrite was rejected."""
    accepted: bool
    reason: str
    """Why it was rejected ("" when accepted)."""
    candidate: str | None = None
    """What the model replied (None when the call failed)."""


def check_rewrite(candidate: str, explanation: Explanation, decomp: Decomposition,
                  config: RewriteConfig | None = None, extractor: TermExtractor | None = None) -> tuple[bool, str]:
    """Whether a rewrite says nothing the attribution does not; (accepted, reason if not)."""
    cfg = config or RewriteConfig()
    ex = extractor or default_extractor()
    original = explanation.text
    text = candidate.strip()
    if not text:
        return False, "empty rewrite"
    if len(text) > cfg.max_length_ratio * len(original):
        return False, f"rewrite is {len(text) / len(original):.1f}x the length of the explanation"
    if len(text) < cfg.min_length_ratio * len(original):
        return False, f"rewrite is only {len(text) / len(original):.2f}x the length of the explanation"

    by_id = {p.pattern_id: p for p in decomp.patterns}
    cited = [by_id[i] for i in explanation.cited_patterns if i in by_id]
    cited_labels = [p.label for p in cited if not is_unnamed(p)]
    context = " . ".join([*(lbl or "" for lbl in cited_labels), *(p.location or "" for p in cited)])
    old, ctx, new = ex.extract(original), ex.extract(context), ex.extract(text)

    allowed_findings = old.findings | ctx.findings | {decomp.finding}
    added = sorted(new.findings - allowed_findings, key=FINDINGS.index)
    if added:
        return False, f"adds finding(s) not in the attribution: {', '.join(added)}"
    allowed_terms = set(old.terms) | set(ctx.terms)
    added_terms = [surface for key, surface in new.terms.items() if key not in allowed_terms]
    if added_terms:
        return False, f"adds term(s) not in the attribution: {', '.join(sorted(added_terms))}"
    # Anatomy that an allowed term implies (its phrases, lay or radiological) may be named too.
    implied = " . ".join(s for k in allowed_terms if k in CONCEPTS for s in (CONCEPTS[k].phrase, LAY_CONCEPT[k]))
    allowed_anatomy = old.anatomy | ctx.anatomy | ex.extract(implied).anatomy
    added_anatomy = sorted(new.anatomy - allowed_anatomy)
    if added_anatomy:
        return False, f"adds anatomy not in the attribution: {', '.join(added_anatomy)}"
    added_sides = sorted(new.sides - (old.sides | ctx.sides))
    if added_sides:
        return False, f"adds side(s) not in the attribution: {', '.join(added_sides)}"
    swapped = sorted(new.sided - (old.sided | ctx.sided))
    if swapped:
        return False, "puts a side on something the attribution does not: " + ", ".join(f"{a} {b}" for a, b in swapped)
    bad_ids = sorted(new.pattern_ids - set(explanation.cited_patterns))
    if bad_ids:
        return False, f"mentions pattern id(s) not cited: {', '.join(map(str, bad_ids))}"
    for v in new.numbers:
        if not any(abs(v - w) <= max(cfg.number_tolerance, 0.02 * abs(w)) for w in old.numbers):
            return False, f"states a number the explanation does not: {v:g}"
    negated = sorted(new.negated - old.negated - ctx.negated, key=FINDINGS.index)
    if negated:
        return False, f"negates a finding the explanation does not: {', '.join(negated)}"
    changed = sorted(new.bands - old.bands)
    if changed:
        return False, f"changes the verbal probability to: {', '.join(changed)}"
    labels_norm = {_norm(lbl).strip() for lbl in cited_labels}
    for q in new.quoted:
        if _norm(q).strip() not in labels_norm and _norm(q) not in _norm(original):
            return False, f"quotes a name that is not a cited pattern label: \"{q}\""
    if decomp.finding not in new.findings:
        return False, f"drops the finding ({decomp.finding})"
    caveats = explanation.caveats
    if "shortcut" in caveats:
        nuisance_keys = {k for k in old.terms if (ti := ex.info(old.terms[k])) and ti.category in NUISANCE_CATEGORIES}
        if nuisance_keys and not nuisance_keys & set(new.terms):
            return False, "drops the shortcut warning (no device/artifact named any more)"
        if not re.search(r"\b(not evidence|says nothing|warning|shortcut|by itself|by themselves|alone)\b",
                         text, re.IGNORECASE):
            return False, "drops the shortcut warning"
    for kind in ("error", "flagged", "coverage"):
        if kind in caveats and not any(c in text.lower() for c in _CAVEAT_CUES[kind]):
            return False, f"drops the {kind} caveat"
    if explanation.audience == "lay":
        jargon = jargon_in(text)
        if jargon:
            return False, f"uses jargon in a lay explanation: {', '.join(jargon)}"
    return True, ""


def _clean_reply(text: str) -> str:
    s = text.strip()
    fence = re.fullmatch(r"```[a-zA-Z]*\s*\n?(.*?)\n?```", s, re.DOTALL)
    if fence:
        s = fence.group(1).strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        s = s[1:-1].strip()
    return re.sub(r"\s+", " ", s)


def rewrite_messages(explanation: Explanation) -> list[dict[str, Any]]:
    system = REWRITE_SYSTEM.format(reader=_READER[explanation.audience], style=_STYLE[explanation.audience])
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"Explanation to rewrite:\n{explanation.text}"}]


def rewrite(explanation: Explanation, decomp: Decomposition, backend: ChatBackend,
            config: RewriteConfig | None = None, extractor: TermExtractor | None = None) -> RewriteResult:
    """Ask the backend for a more fluent text; keep it only if `check_rewrite` accepts it."""
    if explanation.record_id != decomp.record_id or explanation.finding != decomp.finding:
        raise ValueError(f"explanation ({explanation.record_id}/{explanation.finding}) and decomposition "
                         f"({decomp.record_id}/{decomp.finding}) describe different predictions")
    try:
        reply = backend.chat(rewrite_messages(explanation))
    except LLMError as e:
        log.warning("rewrite %s/%s: backend failed (%s); keeping the deterministic text",
                    decomp.record_id, decomp.finding, e)
        return RewriteResult(explanation.text, False, f"backend error: {e}", None)
    candidate = _clean_reply(reply.text)
    ok, reason = check_rewrite(candidate, explanation, decomp, config, extractor)
    if not ok:
        log.info("rewrite %s/%s rejected: %s", decomp.record_id, decomp.finding, reason)
        return RewriteResult(explanation.text, False, reason, candidate)
    return RewriteResult(candidate, True, "", candidate)


# ----------------------------------------------------------------------------------------------
# The explain stage
# ----------------------------------------------------------------------------------------------
EXPL_DIR = "explanations"
EXPLANATIONS = "explanations/explanations.jsonl"
NLE_METRICS = "explanations/metrics.json"


@dataclass
class ExplainStageConfig:
    """Which predictions get explanations, and whether a language model rewrites them."""

    splits: tuple[str, ...] = ("test",)
    """Splits whose predictions are explained (they must have been attributed)."""
    max_predictions: int = 3000
    """Cap: every positive decision first, then negatives at random up to the cap (seeded)."""
    audiences: tuple[str, ...] = ("clinician", "lay")
    compose: ExplainConfig = field(default_factory=ExplainConfig)
    rewrite: bool = False
    """Rewrite with a language model (through label.lmm's endpoint), guarded; off by default."""
    rewrite_config: RewriteConfig = field(default_factory=RewriteConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.splits, list):
            self.splits = tuple(self.splits)
        if isinstance(self.audiences, list):
            self.audiences = tuple(self.audiences)
        bad = [a for a in self.audiences if a not in ("clinician", "lay")]
        if bad or not self.audiences:
            raise ValueError(f"audiences must be a non-empty subset of (clinician, lay), got {self.audiences}")


def run_explain(run, cfg: ExplainStageConfig, llm_config=None, progress: bool = True) -> tuple[list[str], dict[str, Any]]:
    """Compose explanations for the chosen predictions; score them with the NLE metrics."""
    import numpy as np

    from sae_cxr.attribution import DecompositionReader
    from sae_cxr.ingest import read_records_table
    from sae_cxr.nle_metrics import nle_report
    from sae_cxr.progress import progress_bar
    from sae_cxr.run import write_json_atomic

    reader = DecompositionReader(run)
    preds = reader.preds[reader.preds["split"].isin(cfg.splits)]
    if preds.empty:
        raise ValueError(f"no attributed predictions in splits {cfg.splits}; run `sae-cxr attribute` on them first")
    pos = preds[preds["probability"] >= cfg.compose.decision_threshold]
    neg = preds[preds["probability"] < cfg.compose.decision_threshold]
    rng = np.random.default_rng(cfg.seed)
    n_pos = min(len(pos), cfg.max_predictions)
    pos = pos.iloc[np.sort(rng.choice(len(pos), n_pos, replace=False))] if n_pos < len(pos) else pos
    n_neg = min(len(neg), max(cfg.max_predictions - n_pos, 0))
    neg = neg.iloc[np.sort(rng.choice(len(neg), n_neg, replace=False))] if n_neg else neg.iloc[:0]
    chosen = pd.concat([pos, neg])
    backend = None
    if cfg.rewrite:
        from sae_cxr.labeling.llm_client import OpenAIChatClient

        if llm_config is None or not llm_config.model:
            raise ValueError("explain.rewrite needs a language model: set label.lmm.model and base_url")
        backend = OpenAIChatClient(llm_config)
    exps: dict[str, list[Explanation]] = {a: [] for a in cfg.audiences}
    rewrites = {"accepted": 0, "rejected": 0, "reasons": {}}
    with progress_bar(total=len(chosen), desc="explanations", unit="pred", disable=not progress) as bar:
        for r in chosen.itertuples():
            d = reader.get(r.record_id, r.finding)
            for a in cfg.audiences:
                e = compose(d, a, cfg.compose)
                if backend is not None:
                    res = rewrite(e, d, backend, cfg.rewrite_config)
                    key = "accepted" if res.accepted else "rejected"
                    rewrites[key] += 1
                    if not res.accepted:
                        rewrites["reasons"][res.reason] = rewrites["reasons"].get(res.reason, 0) + 1
                    e = dataclasses.replace(e, text=res.text)
                exps[a].append(e)
            bar.update(1)
    run.sub(EXPL_DIR).mkdir(parents=True, exist_ok=True)
    save_explanations(run.sub(EXPLANATIONS), [e for a in cfg.audiences for e in exps[a]])
    records = read_records_table(run)
    reports = dict(zip(records["id"].astype(str), records["report"].astype(str)))
    labels = [float(x) for x in chosen["label"]]
    metrics = {a: nle_report(exps[a], labels=labels, references=reports) for a in cfg.audiences}
    if backend is not None:
        metrics["rewrite"] = rewrites
    write_json_atomic(run.sub(NLE_METRICS), metrics)
    summary: dict[str, Any] = {"predictions": len(chosen), "positives": int(n_pos)}
    for a in cfg.audiences:
        m = metrics[a]
        summary[a] = {"simulatability_decision": _round(m["simulatability"]["decision"]["accuracy"]),
                      "simulatability_evidence_only": _round(m["simulatability"]["decision_evidence_only"]["accuracy"]),
                      "chance": _round(m["simulatability"]["decision"]["chance"]),
                      "distinct_2": _round(m["diversity"]["distinct_2"]),
                      "self_bleu4": None if m["diversity"]["self_bleu4"] is None else round(m["diversity"]["self_bleu4"], 3),
                      "plausibility_rouge_l": _round(m["plausibility"].get("rouge_l_mean")),
                      "plausibility_bleu4": _round(m["plausibility"].get("bleu4_corpus"))}
    return [EXPL_DIR], summary


def _round(v: Any) -> Any:
    return round(float(v), 3) if isinstance(v, (int, float)) else v
