"""Metrics for natural-language explanations, in the WeNLEX / MIMIC-NLE style.

- simulatability: can a reader predict the MODEL's decision from the explanation text alone? The
  reader is a TF-IDF + logistic-regression classifier, cross-validated with a fixed seed; its
  accuracy is reported next to the majority-class rate (what guessing achieves). The model's
  decision is the primary target because simulatability is a property of the explanation with
  respect to the model it explains: an explanation that lets a reader predict what the model will
  say is informative about the model even where the model is wrong. The same score against the
  ground-truth label is reported when labels exist, but it mixes explanation quality with model
  accuracy. Our templates state the verdict in words, so the full text is trivially simulatable;
  `nle_report` therefore also scores the text WITHOUT the verdict sentence (the evidence alone).
- diversity: distinct-1/distinct-2 (unique n-grams / all n-grams over the corpus) and self-BLEU
  (each explanation's BLEU-4 against all the others; lower = more diverse).
- plausibility: overlap with reference explanations: BLEU-4 (corpus and mean sentence level) and
  ROUGE-L F1. References default to the image's own report (its sentences about the finding) and
  can come from MIMIC-NLE (`load_mimic_nle`).
- faithfulness is NOT measured here: it needs the model (deletion curves over patterns, in the
  evaluation stage), and a text-only proxy would be a fake.

Tokenisation (`tokenize`): lowercase; tokens are runs of letters/digits, joined by internal
hyphens or apostrophes ("burned-in", "patient's"); all other punctuation is dropped.

BLEU (Papineni et al. 2002): clipped n-gram precisions p_1..p_4 (a hypothesis n-gram counts at most
as often as in the reference that has it most often), geometric mean with uniform weights, brevity
penalty BP = exp(1 - r/c) when the hypothesis length c is not longer than r, the reference length
closest to c (ties: the shorter). Smoothing for zero-match orders (Chen & Cherry 2014), default
"exp" (their method 3, NIST geometric; sacreBLEU's default): the k-th order with no match gets
precision 1 / (2^k * total_n). Also "floor" (method 1: epsilon / total_n), "add1" (Lin & Och 2004:
add 1 to matches and totals for n > 1) and "none" (any zero order gives 0). Sentence-level BLEU uses
the effective order (orders the hypothesis is too short to have are left out of the mean);
corpus-level BLEU sums the statistics over all sentences first and uses all four orders.

ROUGE-L (Lin 2004): P = LCS/|hyp|, R = LCS/|ref|, F1 = 2PR/(P+R); with several references, the
best F1 counts.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from sae_cxr.findings import FINDINGS

_TOKEN = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*")
SMOOTHING_METHODS = ("exp", "floor", "add1", "none")


class NLEDataError(ValueError):
    """Input the metrics cannot use (misaligned lists, a malformed MIMIC-NLE file)."""


def tokenize(text: str) -> list[str]:
    """Lowercased word tokens; punctuation dropped (see the module docstring)."""
    return _TOKEN.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


# ----------------------------------------------------------------------------------------------
# BLEU
# ----------------------------------------------------------------------------------------------
@dataclass
class BleuStats:
    """Sufficient statistics of BLEU: matches and totals per order, hypothesis and reference lengths."""

    matches: list[int]
    totals: list[int]
    hyp_len: int
    ref_len: int

    def __add__(self, other: "BleuStats") -> "BleuStats":
        return BleuStats([a + b for a, b in zip(self.matches, other.matches)],
                         [a + b for a, b in zip(self.totals, other.totals)],
                         self.hyp_len + other.hyp_len, self.ref_len + other.ref_len)


def closest_ref_len(hyp_len: int, ref_lens: Iterable[int]) -> int:
    """The reference length closest to the hypothesis length; ties go to the shorter one."""
    lens = list(ref_lens)
    if not lens:
        raise NLEDataError("BLEU needs at least one reference")
    return min(lens, key=lambda r: (abs(r - hyp_len), r))


def bleu_stats(hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> BleuStats:
    """BLEU statistics of one tokenised hypothesis against tokenised references."""
    if not references:
        raise NLEDataError("BLEU needs at least one reference")
    matches, totals = [], []
    for n in range(1, max_n + 1):
        hyp = Counter(ngrams(hypothesis, n))
        best: Counter[tuple[str, ...]] = Counter()
        for ref in references:
            for g, c in Counter(ngrams(ref, n)).items():
                if c > best[g]:
                    best[g] = c
        matches.append(sum(min(c, best[g]) for g, c in hyp.items()))
        totals.append(max(len(hypothesis) - n + 1, 0))
    return BleuStats(matches, totals, len(hypothesis), closest_ref_len(len(hypothesis), (len(r) for r in references)))


def bleu_from_stats(stats: BleuStats, smoothing: str = "exp", epsilon: float = 0.1,
                    effective_order: bool = True) -> float:
    """BLEU in [0, 1] from its statistics (smoothing as in the module docstring)."""
    if smoothing not in SMOOTHING_METHODS:
        raise ValueError(f"unknown smoothing {smoothing!r}; expected one of: {', '.join(SMOOTHING_METHODS)}")
    if stats.hyp_len == 0:
        return 0.0
    logs: list[float] = []
    k = 1.0
    for n, (m, t) in enumerate(zip(stats.matches, stats.totals), start=1):
        if t == 0:  # the hypothesis has no n-grams of this order
            if effective_order:
                break
            return 0.0
        if smoothing == "add1" and n > 1:
            m, t = m + 1, t + 1
        if m > 0:
            p = m / t
        elif smoothing == "exp":
            k *= 2.0
            p = 1.0 / (k * t)
        elif smoothing == "floor":
            p = epsilon / t
        else:
            return 0.0
        logs.append(math.log(p))
    c, r = stats.hyp_len, stats.ref_len
    bp = 1.0 if c > r else math.exp(1.0 - r / c)
    return bp * math.exp(sum(logs) / len(logs))


def sentence_bleu(hypothesis: str, references: str | Sequence[str], max_n: int = 4, smoothing: str = "exp",
                  epsilon: float = 0.1) -> float:
    """BLEU-4 of one text against one or more reference texts (effective order, smoothed)."""
    refs = [references] if isinstance(references, str) else list(references)
    stats = bleu_stats(tokenize(hypothesis), [tokenize(r) for r in refs], max_n)
    return bleu_from_stats(stats, smoothing, epsilon, effective_order=True)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]], max_n: int = 4,
                smoothing: str = "exp", epsilon: float = 0.1) -> float:
    """Corpus BLEU-4: statistics summed over all pairs, then one score (all orders)."""
    if len(hypotheses) != len(references):
        raise NLEDataError(f"{len(hypotheses)} hypotheses but {len(references)} reference entries")
    if not hypotheses:
        raise NLEDataError("corpus BLEU of an empty corpus is undefined")
    total = BleuStats([0] * max_n, [0] * max_n, 0, 0)
    for h, refs in zip(hypotheses, references):
        refs_l = [refs] if isinstance(refs, str) else list(refs)
        total = total + bleu_stats(tokenize(h), [tokenize(r) for r in refs_l], max_n)
    return bleu_from_stats(total, smoothing, epsilon, effective_order=False)


# ----------------------------------------------------------------------------------------------
# ROUGE-L
# ----------------------------------------------------------------------------------------------
def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(|a| |b|) time, O(|b|) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(hypothesis: str, references: str | Sequence[str]) -> float:
    """ROUGE-L F1 (beta = 1) against the best-matching reference."""
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise NLEDataError("ROUGE-L needs at least one reference")
    h = tokenize(hypothesis)
    best = 0.0
    for r in refs:
        rt = tokenize(r)
        lcs = lcs_length(h, rt)
        if lcs == 0:
            continue
        p, rec = lcs / len(h), lcs / len(rt)
        best = max(best, 2 * p * rec / (p + rec))
    return best


# ----------------------------------------------------------------------------------------------
# Diversity
# ----------------------------------------------------------------------------------------------
def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / all n-grams over the corpus (n-grams never cross a text boundary)."""
    grams: list[tuple[str, ...]] = []
    for t in texts:
        grams.extend(ngrams(tokenize(t), n))
    if not grams:
        return 0.0
    return len(set(grams)) / len(grams)


def self_bleu(texts: Sequence[str], max_n: int = 4, smoothing: str = "exp", epsilon: float = 0.1,
              max_hypotheses: int | None = 500, seed: int = 0) -> tuple[float, int]:
    """Mean sentence BLEU of each text against ALL other texts as references; (score, hypotheses scored).

    With more than `max_hypotheses` texts, a seeded random sample of them is scored (each still
    against all others). Exact and fast: per n-gram the two documents with the highest counts are
    kept, so "best count among the others" is a lookup.
    """
    if len(texts) < 2:
        raise NLEDataError("self-BLEU needs at least two texts")
    toks = [tokenize(t) for t in texts]
    lens = np.array([len(t) for t in toks])
    top: list[dict[tuple[str, ...], list[tuple[int, int]]]] = []
    for n in range(1, max_n + 1):
        table: dict[tuple[str, ...], list[tuple[int, int]]] = {}
        for doc, t in enumerate(toks):
            for g, c in Counter(ngrams(t, n)).items():
                best = table.setdefault(g, [])
                best.append((c, doc))
                if len(best) > 2:
                    best.sort(key=lambda x: (-x[0], x[1]))
                    del best[2:]
        top.append(table)
    idx = np.arange(len(texts))
    if max_hypotheses is not None and len(texts) > max_hypotheses:
        idx = np.sort(np.random.default_rng(seed).choice(len(texts), size=max_hypotheses, replace=False))
    scores = []
    for i in idx:
        matches, totals = [], []
        for n in range(1, max_n + 1):
            table = top[n - 1]
            m = 0
            for g, c in Counter(ngrams(toks[i], n)).items():
                others = [cnt for cnt, doc in table[g] if doc != i]
                m += min(c, max(others, default=0))
            matches.append(m)
            totals.append(max(len(toks[i]) - n + 1, 0))
        other_lens = np.delete(lens, i)
        ref_len = closest_ref_len(len(toks[i]), other_lens.tolist())
        scores.append(bleu_from_stats(BleuStats(matches, totals, len(toks[i]), ref_len), smoothing, epsilon))
    return float(np.mean(scores)), len(idx)


# ----------------------------------------------------------------------------------------------
# Simulatability
# ----------------------------------------------------------------------------------------------
@dataclass
class SimulatabilityResult:
    target: str
    accuracy: float | None
    """Cross-validated accuracy of the text-only reader; None when it cannot be estimated."""
    balanced_accuracy: float | None
    """Mean per-class recall (0.5 = guessing, whatever the class balance)."""
    chance: float | None
    """Majority-class rate: the accuracy of always guessing the commoner class."""
    n: int
    n_splits: int
    note: str = ""


def simulatability(texts: Sequence[str], targets: Sequence[Any], target: str = "decision", n_splits: int = 5,
                   seed: int = 0, C: float = 1.0) -> SimulatabilityResult:
    """Cross-validated accuracy of TF-IDF (1-2 grams) + logistic regression predicting `targets`
    (0/1; NaN/None rows are dropped) from `texts` alone, with the majority-class rate beside it."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    if len(texts) != len(targets):
        raise NLEDataError(f"{len(texts)} texts but {len(targets)} {target} values")
    keep = [i for i, y in enumerate(targets) if y is not None and not (isinstance(y, float) and math.isnan(y))]
    x = [texts[i] for i in keep]
    y = np.array([int(round(float(targets[i]))) for i in keep])
    if not set(np.unique(y)) <= {0, 1}:
        raise NLEDataError(f"{target} values must be 0/1 (or NaN for unknown), got {sorted(set(y.tolist()))}")
    counts = np.bincount(y, minlength=2) if len(y) else np.zeros(2, int)
    chance = float(counts.max() / len(y)) if len(y) else None
    splits = int(min(n_splits, counts.min()))
    if splits < 2:
        return SimulatabilityResult(target, None, None, chance, len(y), 0,
                                    "needs at least two examples of each class; not estimated")
    model = make_pipeline(
        TfidfVectorizer(tokenizer=tokenize, token_pattern=None, lowercase=False, ngram_range=(1, 2),
                        sublinear_tf=True),
        LogisticRegression(C=C, max_iter=1000, random_state=seed))
    cv = StratifiedKFold(n_splits=splits, shuffle=True, random_state=seed)
    pred = cross_val_predict(model, np.array(x, dtype=object), y, cv=cv)
    return SimulatabilityResult(target, float(np.mean(pred == y)), float(balanced_accuracy_score(y, pred)),
                                chance, len(y), splits)


# ----------------------------------------------------------------------------------------------
# Plausibility and references
# ----------------------------------------------------------------------------------------------
def plausibility(hypotheses: Sequence[str], references: Sequence[str | Sequence[str] | None], max_n: int = 4,
                 smoothing: str = "exp", epsilon: float = 0.1) -> dict[str, Any]:
    """BLEU-4 (corpus and mean sentence level) and mean ROUGE-L F1 over the pairs that have references."""
    if len(hypotheses) != len(references):
        raise NLEDataError(f"{len(hypotheses)} explanations but {len(references)} reference entries")
    pairs = [(h, [r] if isinstance(r, str) else list(r)) for h, r in zip(hypotheses, references)
             if r is not None and (r if isinstance(r, str) else any(x.strip() for x in r))]
    pairs = [(h, [x for x in refs if x.strip()]) for h, refs in pairs]
    out: dict[str, Any] = {"n": len(pairs), "n_without_reference": len(hypotheses) - len(pairs),
                           "smoothing": smoothing}
    if not pairs:
        out.update(bleu4_corpus=None, bleu4_sentence_mean=None, rouge_l_mean=None)
        return out
    hs, rs = [h for h, _ in pairs], [r for _, r in pairs]
    out["bleu4_corpus"] = corpus_bleu(hs, rs, max_n, smoothing, epsilon)
    out["bleu4_sentence_mean"] = float(np.mean([sentence_bleu(h, r, max_n, smoothing, epsilon) for h, r in pairs]))
    out["rouge_l_mean"] = float(np.mean([rouge_l(h, r) for h, r in pairs]))
    return out


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def report_reference(report: str, finding: str) -> str:
    """The sentences of a report about `finding` (positive or negated: "No pleural effusion."), or the
    whole report when none names it: a finding-level reference, like a MIMIC-NLE sentence."""
    from sae_cxr.explain import default_extractor

    ex = default_extractor()
    picked = [s for s in split_sentences(report) if finding in ex.extract(s).findings]
    return " ".join(picked) if picked else report.strip()


# MIMIC-NLE (Kayser et al., MICCAI 2022): JSON Lines files mimic-nle-{train,dev,test}.json, one object per
# NLE with sentence_ID ("s51038639#2"), nle, patient_ID, report_ID ("s51038639"), diagnosis_label and
# evidence_label (one-hot over MIMIC_NLE_DIAGNOSES), img_labels ([negative, uncertain, positive] per class).
MIMIC_NLE_DIAGNOSES: tuple[str, ...] = (
    "Atelectasis", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Lung Lesion", "Lung Opacity",
    "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax",
)
"""The order of MIMIC-NLE's one-hot label vectors (alphabetical, as in its encodings.py)."""

MIMIC_NLE_TO_FINDING: dict[str, str] = {"Atelectasis": "Atelectasis", "Consolidation": "Consolidation",
                                        "Edema": "Edema", "Pleural Effusion": "Pleural Effusion"}
"""MIMIC-NLE diagnoses that are one of our findings. MIMIC-NLE has no Cardiomegaly class; "Enlarged
Cardiomediastinum" is a different (wider) finding, so it is not mapped unless a caller asks."""

_IMG_LABEL_STATES = ("negative", "uncertain", "positive")


@dataclass
class MimicNLEEntry:
    sentence_id: str
    report_id: str
    patient_id: str
    nle: str
    diagnoses: list[str]
    """The diagnoses this NLE explains."""
    evidence: list[str]
    """Labels the NLE cites as evidence for them."""
    img_labels: dict[str, str]
    """Study-level label state per diagnosis: negative, uncertain or positive."""

    @property
    def study_id(self) -> str:
        """The MIMIC-CXR study id without its "s" prefix (as MIMIC-CXR-JPG's study_id column has it)."""
        return self.report_id[1:] if self.report_id[:1].lower() == "s" else self.report_id


def _one_hot(value: Any, where: str, key: str) -> list[str]:
    if not isinstance(value, list) or len(value) != len(MIMIC_NLE_DIAGNOSES) or any(v not in (0, 1) for v in value):
        raise NLEDataError(f"{where}: {key} must be a list of {len(MIMIC_NLE_DIAGNOSES)} zeros and ones "
                           f"(one-hot over {', '.join(MIMIC_NLE_DIAGNOSES)}), got {value!r}")
    return [d for d, v in zip(MIMIC_NLE_DIAGNOSES, value) if v == 1]


def load_mimic_nle(path: str | os.PathLike) -> list[MimicNLEEntry]:
    """Read a MIMIC-NLE split (JSON Lines; a JSON array is accepted too)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise NLEDataError(f"cannot read MIMIC-NLE file {p}: {e}") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = [(i + 1, r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise NLEDataError(f"{p}: not valid JSON ({e})") from None
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise NLEDataError(f"{p}:{n}: not a JSON object ({e}); MIMIC-NLE files hold one per line") from None
    out = []
    for n, row in rows:
        where = f"{p}:{n}"
        if not isinstance(row, dict):
            raise NLEDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if "nle" not in row and "sentence_ID" in row:
            raise NLEDataError(f"{where}: no 'nle' text: this is a MIMIC-NLE QUERY file; build the dataset with "
                               "the MIMIC-NLE repository's extract_mimic_nle.py from the MIMIC-CXR reports first")
        missing = [k for k in ("sentence_ID", "nle", "diagnosis_label") if k not in row]
        if missing:
            raise NLEDataError(f"{where}: missing key(s) {missing}; a MIMIC-NLE entry has sentence_ID, nle, "
                               "patient_ID, report_ID, diagnosis_label, evidence_label, img_labels")
        sid = str(row["sentence_ID"])
        report_id = str(row.get("report_ID") or sid.split("#", 1)[0])
        diagnoses = _one_hot(row["diagnosis_label"], where, "diagnosis_label")
        evidence = _one_hot(row["evidence_label"], where, "evidence_label") if "evidence_label" in row else []
        img: dict[str, str] = {}
        if "img_labels" in row:
            lab = row["img_labels"]
            if not isinstance(lab, list) or len(lab) != len(MIMIC_NLE_DIAGNOSES):
                raise NLEDataError(f"{where}: img_labels must hold {len(MIMIC_NLE_DIAGNOSES)} [neg, unc, pos] triples")
            for d, triple in zip(MIMIC_NLE_DIAGNOSES, lab):
                if not isinstance(triple, list) or len(triple) != 3 or sum(triple) != 1:
                    raise NLEDataError(f"{where}: img_labels entry for {d} must be a one-hot triple, got {triple!r}")
                img[d] = _IMG_LABEL_STATES[triple.index(1)]
        out.append(MimicNLEEntry(sid, report_id, str(row.get("patient_ID", "")), str(row["nle"]).strip(),
                                 diagnoses, evidence, img))
    return out


def mimic_nle_references(entries: Iterable[MimicNLEEntry], mapping: Mapping[str, str] | None = None
                         ) -> dict[tuple[str, str], list[str]]:
    """(study id, finding) -> the NLE sentences that explain that finding in that study."""
    m = dict(MIMIC_NLE_TO_FINDING if mapping is None else mapping)
    bad = [f for f in m.values() if f not in FINDINGS]
    if bad:
        raise ValueError(f"mapping targets {bad} are not findings; expected some of: {', '.join(FINDINGS)}")
    out: dict[tuple[str, str], list[str]] = {}
    for e in entries:
        for d in e.diagnoses:
            if d in m:
                out.setdefault((e.study_id, m[d]), []).append(e.nle)
    return out


def references_for_records(by_study: Mapping[tuple[str, str], list[str]], study_of_record: Mapping[str, str]
                           ) -> dict[tuple[str, str], list[str]]:
    """Re-key study-level references to (record id, finding) through each record's study id
    (MIMIC-CXR-JPG records: record.meta["study_id"])."""
    out: dict[tuple[str, str], list[str]] = {}
    for rid, study in study_of_record.items():
        s = str(study)
        s = s[1:] if s[:1].lower() == "s" else s
        for f in FINDINGS:
            if (s, f) in by_study:
                out[(rid, f)] = list(by_study[(s, f)])
    return out


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
@dataclass
class NLEMetricsConfig:
    """Settings of `nle_report`, saved next to its numbers."""

    max_n: int = 4
    """BLEU order (BLEU-4)."""
    smoothing: str = "exp"
    """BLEU smoothing: exp (default), floor, add1, none (module docstring)."""
    floor_epsilon: float = 0.1
    """Epsilon of the floor smoothing."""
    cv_splits: int = 5
    """Folds of the simulatability cross-validation (fewer when a class is rarer)."""
    seed: int = 0
    """Seed of the cross-validation split, the reader and the self-BLEU sample."""
    reader_C: float = 1.0
    """Inverse regularisation strength of the simulatability reader."""
    self_bleu_max: int | None = 500
    """Self-BLEU scores a seeded sample of this many explanations when there are more (None: all)."""

    def __post_init__(self) -> None:
        if self.smoothing not in SMOOTHING_METHODS:
            raise ValueError(f"smoothing must be one of {SMOOTHING_METHODS}, got {self.smoothing!r}")
        if self.max_n < 1 or self.cv_splits < 2:
            raise ValueError("max_n must be >= 1 and cv_splits >= 2")


def _resolve_references(explanations: Sequence[Any], references: Any) -> list[Any]:
    if references is None:
        return [None] * len(explanations)
    if isinstance(references, Mapping):
        out = []
        for e in explanations:
            if not hasattr(e, "record_id"):
                raise NLEDataError("references given as a mapping need Explanation objects (record_id, finding) "
                                   "to look them up; pass a list aligned with the explanations instead")
            ref = references.get((e.record_id, e.finding))
            if ref is None and (report := references.get(e.record_id)) is not None:
                # A record's own report: its sentences about this finding are the reference.
                ref = report_reference(report, e.finding) if isinstance(report, str) else report
            out.append(ref)
        return out
    refs = list(references)
    if len(refs) != len(explanations):
        raise NLEDataError(f"{len(explanations)} explanations but {len(refs)} references")
    return refs


def nle_report(explanations: Sequence[Any], decisions: Sequence[Any] | None = None,
               labels: Sequence[Any] | None = None, references: Any = None,
               config: NLEMetricsConfig | None = None) -> dict[str, Any]:
    """Simulatability, diversity and plausibility of a corpus of explanations, as one JSON-able dict.

    explanations: `Explanation` objects or plain strings. decisions: the model's 0/1 calls (taken from
    the Explanations when None). labels: ground truth 0/1/NaN (optional). references: None, a list
    aligned with the explanations (str, list of str, or None each), or a mapping keyed by
    (record_id, finding) (e.g. from MIMIC-NLE) or by record_id (the image's report, reduced to its
    sentences about the explanation's finding by `report_reference`).
    """
    cfg = config or NLEMetricsConfig()
    if not explanations:
        raise NLEDataError("nle_report needs at least one explanation")
    texts = [e if isinstance(e, str) else e.text for e in explanations]
    objects = all(not isinstance(e, str) for e in explanations)
    if decisions is None:
        if not objects:
            raise NLEDataError("plain-text explanations need `decisions` (the model's 0/1 calls)")
        decisions = [int(e.decision) for e in explanations]
    if len(decisions) != len(texts):
        raise NLEDataError(f"{len(texts)} explanations but {len(decisions)} decisions")
    sim: dict[str, Any] = {}
    run = dict(n_splits=cfg.cv_splits, seed=cfg.seed, C=cfg.reader_C)
    sim["decision"] = asdict(simulatability(texts, list(decisions), "decision", **run))
    if objects:
        evidence = [e.evidence_text for e in explanations]
        sim["decision_evidence_only"] = asdict(simulatability(evidence, list(decisions), "decision", **run))
    if labels is not None:
        if len(labels) != len(texts):
            raise NLEDataError(f"{len(texts)} explanations but {len(labels)} labels")
        sim["label"] = asdict(simulatability(texts, list(labels), "label", **run))
    diversity: dict[str, Any] = {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2)}
    if len(texts) >= 2:
        sb, scored = self_bleu(texts, cfg.max_n, cfg.smoothing, cfg.floor_epsilon, cfg.self_bleu_max, cfg.seed)
        diversity.update(self_bleu4=sb, self_bleu_hypotheses=scored)
    else:
        diversity.update(self_bleu4=None, self_bleu_hypotheses=0)
    refs = _resolve_references(explanations, references)
    plaus = plausibility(texts, refs, cfg.max_n, cfg.smoothing, cfg.floor_epsilon)
    return {
        "n": len(texts),
        "simulatability": sim,
        "diversity": diversity,
        "plausibility": plaus,
        "faithfulness": "not computed here: it needs the model (pattern-deletion curves in the evaluation stage)",
        "config": asdict(cfg),
    }
