"""The evidence labeler: name a pattern by what is over-represented among its top images.

Offline and deterministic, so it is the default labeler and the one the phantom benchmark holds to
account. For one pattern:

1. TOP SET. The images where the pattern fires (activation > `fire_threshold`), strongest first,
   cut to `top_k` (and, if `top_quantile` is set, to activations at or above that quantile of the
   firing activations). The REST is every other image, weaker firing ones included: the question
   is what distinguishes the pattern's strongest images, not what distinguishes firing at all.
2. CANDIDATE TERMS. The five finding labels (rows where a label is unknown are left out of that
   term's table), every planted concept (when the source has concepts), and affirmed report
   n-grams (`report_terms`: negated mentions such as "No pleural effusion." do not count).
3. ENRICHMENT per term, from the 2x2 table top/rest x term/no term (a, b / c, d):
   odds ratio with the Haldane-Anscombe correction ((a+.5)(d+.5) / ((b+.5)(c+.5)), finite even
   with an empty cell), a one-sided Fisher exact test (hypergeometric upper tail, the same value
   as scipy.stats.fisher_exact(alternative="greater")), Benjamini-Hochberg q-values across all
   tested terms. precision = a / (a+b) (share of top images with the term), recall = a / (a+c).
4. SCORE = precision * ln(OR). ln(OR) rewards specificity (the term is rare outside the top set),
   precision rewards coverage of the top set: a term on 3 of 50 top images never names the pattern
   however rare it is elsewhere. A term is ELIGIBLE when q <= alpha, a >= min_top_hits,
   precision >= min_precision, OR > 1, and its meaning has a category (bare modifiers and anatomy
   such as "right" or "lung" name nothing).
5. CONFOUNDING (explaining away). Co-occurring terms are all enriched: in a world where pacemakers
   go with cardiomegaly 90% of the time, a pacemaker pattern's top images also show cardiomegaly.
   Among the `n_candidates` best eligible terms, X SURVIVES Y when X is still enriched among the
   images WITHOUT Y (a >= 2 top images with X and not Y, one-sided Fisher p <= alpha_conditional):
   the pacemaker survives "no cardiomegaly" (the top images without cardiomegaly still all have a
   pacemaker), cardiomegaly does not survive "no pacemaker" (no top image lacks a pacemaker).
   Y EXPLAINS AWAY X when X does not survive Y and Y survives X. Candidates are distinct MEANINGS:
   a concept, its finding label and its report phrases are one candidate (the best-scoring of them),
   so synonyms cannot crowd the other meanings out of the comparison.
6. DECISION. The top set proposes, the whole distribution decides: among the candidates nothing
   explains away, the label is the term whose presence the pattern's activation ranks best over
   ALL images (AUROC where the term is known). The top-set score alone favours the rarest
   co-occurring term: a heart-failure axis whose strongest images all show oedema, but which
   tracks cardiomegaly over the whole range, is named after cardiomegaly. With
   `decide_by_auroc=False` the best-scoring standing term wins.
7. CONFIDENCE = precision * min(1, -log10(q) / full_confidence_log10_q): a label that covers its
   top images and is overwhelmingly significant scores near 1.
8. ABSENCE. When no term is eligible, a pattern may still stand for something: the ABSENCE of a
   common term. A sparse code prefers the rarer side of a common binary feature, so in a world
   where 60% of films carry a laterality marker the dictionary learns "no marker" (fires on the
   40% without one) rather than "marker". Such a pattern is named "no <term>" (evidence polarity
   "absent") when a categorised term is on at least `absence_min_rate` of the other images, on at
   most `absence_max_precision` of the top images, and DEPLETED there (one-sided Fisher lower
   tail, BH q <= alpha). Among the `n_candidates` best depleted meanings (score (1 - precision) *
   ln(1/OR)) the winner is the one whose presence the activation ranks WORST over all images
   (lowest AUROC), mirroring step 6. `absence=False` turns this off.
9. UNRESOLVED. When no term is eligible and no absence stands, the label is "unresolved pattern" with confidence 0 and a
   FALLBACK category: the category of the best-scoring categorised term with OR > 1 and nominal
   p <= fallback_p (weak evidence beats none), else `unresolved_category` ("structural": the
   variation a radiograph carries without annotation is mostly anatomy, habitus and positioning).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.stats import hypergeom

from sae_cxr.findings import CATEGORIES, CONCEPTS, FINDING_CATEGORY, FINDINGS, VocabPhrase
from sae_cxr.labeling.base import UNRESOLVED, PatternLabel
from sae_cxr.labeling.report_terms import extract_terms
from sae_cxr.labeling.vocab import TermMeaning, VocabularyIndex, finding_concept

KIND_PRIORITY: dict[str, int] = {"concept": 0, "finding": 1, "report": 2}
"""Ties in score go to the most curated source: planted concepts, then labels, then report text."""


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------
def haldane_odds_ratio(a: Any, b: Any, c: Any, d: Any) -> np.ndarray:
    """Odds ratio of a 2x2 table [[a, b], [c, d]] with 0.5 added to every cell (Haldane-Anscombe)."""
    a, b, c, d = (np.asarray(x, dtype=np.float64) for x in (a, b, c, d))
    return (a + 0.5) * (d + 0.5) / ((b + 0.5) * (c + 0.5))


def fisher_greater(a: Any, b: Any, c: Any, d: Any) -> np.ndarray:
    """One-sided (enrichment) Fisher exact p-value of [[a, b], [c, d]], vectorised.

    P(A >= a) for A hypergeometric with population a+b+c+d, a+c successes and a+b draws; equal to
    scipy.stats.fisher_exact([[a, b], [c, d]], alternative="greater")[1].
    """
    a, b, c, d = (np.asarray(x, dtype=np.int64) for x in (a, b, c, d))
    p = hypergeom.sf(a - 1, a + b + c + d, a + c, a + b)
    return np.clip(np.where(a + b + c + d > 0, p, 1.0), 0.0, 1.0)


def fisher_less(a: Any, b: Any, c: Any, d: Any) -> np.ndarray:
    """One-sided (depletion) Fisher exact p-value of [[a, b], [c, d]]: P(A <= a), vectorised; equal to
    scipy.stats.fisher_exact([[a, b], [c, d]], alternative="less")[1]."""
    a, b, c, d = (np.asarray(x, dtype=np.int64) for x in (a, b, c, d))
    p = hypergeom.cdf(a, a + b + c + d, a + c, a + b)
    return np.clip(np.where(a + b + c + d > 0, p, 1.0), 0.0, 1.0)


def benjamini_hochberg(p: Any) -> np.ndarray:
    """Benjamini-Hochberg q-values (step-up, monotone, capped at 1) in the input order."""
    p = np.asarray(p, dtype=np.float64)
    m = p.size
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum.accumulate(scaled[::-1])[::-1]
    q = np.empty(m)
    q[order] = np.minimum(q_sorted, 1.0)
    return q


# ------------------------------------------------------------------------------------------------
# Config and the table of candidate terms
# ------------------------------------------------------------------------------------------------
@dataclass
class EvidenceConfig:
    """How the evidence labeler picks top images, tests terms and turns the winner into a label."""

    top_k: int = 50
    """At most this many of the strongest firing images form the top set."""
    top_quantile: float | None = None
    """If set (e.g. 0.9), the top set also requires activation >= this quantile of firing activations."""
    fire_threshold: float = 0.0
    """An image counts as firing when its activation exceeds this value."""
    min_top: int = 5
    """Patterns firing on fewer images than this are left unresolved: too little to test."""
    alpha: float = 0.05
    """Benjamini-Hochberg level for a term to be eligible as the label."""
    min_top_hits: int = 3
    """An eligible term must appear on at least this many top images."""
    min_precision: float = 0.3
    """An eligible term must appear on at least this share of the top images."""
    n_candidates: int = 5
    """How many best eligible meanings (a concept with its synonyms is one) enter the explaining-away
    comparison."""
    decide_by_auroc: bool = True
    """Among the standing candidates, name the pattern after the term its activation ranks best over all
    images; False: after the best top-set score."""
    alpha_conditional: float = 0.05
    """Level of the conditional tests (few, pre-selected comparisons: uncorrected)."""
    min_conditional_hits: int = 2
    """X survives Y only with at least this many top images that have X without Y."""
    use_findings: bool = True
    use_concepts: bool = True
    use_reports: bool = True
    report_max_n: int = 3
    """Report terms are 1..report_max_n-grams of affirmed words."""
    min_term_images: int = 3
    """Report terms mentioned on fewer images than this are not tested (they only add tests)."""
    max_report_terms: int = 2000
    """Keep at most this many report terms (the most frequent); bounds memory on large corpora."""
    full_confidence_log10_q: float = 10.0
    """-log10(q) at which significance stops limiting confidence."""
    absence: bool = True
    """When no term is enriched, try naming the pattern after a common term missing from its top images."""
    absence_min_rate: float = 0.3
    """An absence label needs its term on at least this share of the other images (the absence of a rare
    term says nothing: most images lack it)."""
    absence_max_precision: float = 0.05
    """... and on at most this share of the top images."""
    fallback_p: float = 0.1
    """Unresolved patterns take the category of the best term with nominal p <= fallback_p."""
    unresolved_category: str = "structural"
    """Category of an unresolved pattern without even weak evidence (see the module docstring)."""
    evidence_terms: int = 10
    """How many top terms (by score) a label's evidence keeps."""

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.min_top < 1:
            raise ValueError(f"top_k ({self.top_k}) and min_top ({self.min_top}) must be >= 1")
        if self.top_quantile is not None and not 0.0 <= self.top_quantile < 1.0:
            raise ValueError(f"top_quantile must lie in [0, 1) or be None, got {self.top_quantile}")
        for name in ("alpha", "alpha_conditional", "fallback_p", "min_precision", "absence_min_rate"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"{name} must lie in (0, 1], got {v}")
        if self.unresolved_category not in CATEGORIES:
            raise ValueError(f"unresolved_category must be one of {', '.join(CATEGORIES)}, "
                             f"got {self.unresolved_category!r}")
        if not 0.0 <= self.absence_max_precision < 1.0:
            raise ValueError(f"absence_max_precision must lie in [0, 1), got {self.absence_max_precision}")
        if self.report_max_n < 1:
            raise ValueError(f"report_max_n must be >= 1, got {self.report_max_n}")


@dataclass(frozen=True)
class Term:
    """One candidate term: where it comes from and what it means."""

    key: str  # "concept:pacemaker", "finding:Cardiomegaly", "report:pleural effusion"
    kind: str  # concept | finding | report
    name: str  # the concept id, finding name or n-gram
    meaning: TermMeaning


@dataclass
class EvidenceTable:
    """The candidate terms of a set of records as a sparse boolean matrix, built once for many patterns.

    `present[i, t]` says record i has term t (scipy CSR; report terms are sparse, and MIMIC-CXR has
    377k reports). `unknown` maps a term column to the rows where it is unknown (a finding whose
    label is missing); those rows are left out of that term's 2x2 tables.
    """

    ids: list[str]
    terms: list[Term]
    present: Any  # scipy.sparse matrix or dense array [N, T], boolean
    unknown: dict[int, np.ndarray] = field(default_factory=dict)
    has_concepts: bool = False

    def __post_init__(self) -> None:
        n, t = len(self.ids), len(self.terms)
        self.present = sparse.csr_matrix(self.present, dtype=bool)
        if self.present.shape != (n, t):
            raise ValueError(f"present must be [n_records={n}, n_terms={t}], got {self.present.shape}")
        for j, mask in list(self.unknown.items()):
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != (n,) or not 0 <= j < t:
                raise ValueError(f"unknown[{j}] must be a boolean mask over the {n} records of a term column")
            self.unknown[j] = mask
        if self.unknown:  # an unknown label is never a present term
            coo = self.present.tocoo()
            drop = np.zeros(coo.nnz, dtype=bool)
            for j, mask in self.unknown.items():
                sel = coo.col == j
                drop[sel] = mask[coo.row[sel]]
            if drop.any():
                self.present = sparse.csr_matrix((coo.data[~drop], (coo.row[~drop], coo.col[~drop])),
                                                 shape=coo.shape, dtype=bool)
        self._csc = self.present.tocsc()
        self._col_present = np.asarray(self.present.sum(0), dtype=np.int64).ravel()
        self._col_known = np.full(t, n, dtype=np.int64)
        for j, mask in self.unknown.items():
            self._col_known[j] -= int(mask.sum())
        self._index = {term.key: j for j, term in enumerate(self.terms)}

    def __len__(self) -> int:
        return len(self.ids)

    def column(self, key: str) -> int:
        try:
            return self._index[key]
        except KeyError:
            raise KeyError(f"no term {key!r} in the evidence table") from None

    def values(self, j: int) -> np.ndarray:
        """Dense [N] bool: which records have term column j."""
        return self._csc[:, j].toarray().ravel()

    def known(self, j: int) -> np.ndarray:
        """Dense [N] bool: for which records term column j is known."""
        mask = self.unknown.get(j)
        return np.ones(len(self.ids), dtype=bool) if mask is None else ~mask

    def presence_auroc(self, j: int, scores: np.ndarray) -> float:
        """AUROC of `scores` [N] at ranking the records with term j above those without, over the records
        where the term is known; NaN when every such record has it or none does."""
        from sae_cxr.stats import auroc

        v, k = self.values(j), self.known(j)
        return auroc(v[k].astype(float), scores[k]) if 0 < v[k].sum() < k.sum() else float("nan")

    def top_counts(self, top_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(term hits among the given rows, rows with the term known) per term column."""
        a = np.asarray(self.present[top_idx].sum(0), dtype=np.int64).ravel()
        n1 = np.full(len(self.terms), len(top_idx), dtype=np.int64)
        for j, mask in self.unknown.items():
            n1[j] -= int(mask[top_idx].sum())
        return a, n1

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, config: EvidenceConfig | None = None,
                   vocabulary: Sequence[VocabPhrase] | None = None) -> "EvidenceTable":
        """Build from a records table as in records.parquet (id, the five findings, concepts, report).

        Columns that are absent are simply not used: a source without concepts or reports is
        labelled from what it has.
        """
        cfg = config or EvidenceConfig()
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"expected a pandas DataFrame of records (records.parquet), got {type(frame).__name__}")
        n = len(frame)
        ids = [str(x) for x in frame["id"]] if "id" in frame.columns else [str(i) for i in range(n)]
        index = VocabularyIndex(vocabulary)
        terms: list[Term] = []
        blocks: list[Any] = []
        unknown: dict[int, np.ndarray] = {}
        has_concepts = False

        if cfg.use_findings:
            for f in FINDINGS:
                if f not in frame.columns:
                    continue
                v = pd.to_numeric(frame[f], errors="coerce").to_numpy(dtype=np.float64)
                bad = ~np.isnan(v) & (v != 0) & (v != 1)
                if bad.any():
                    raise ValueError(f"finding column {f!r} must hold 1, 0 or NaN; got e.g. {v[bad][:3].tolist()}")
                concept = finding_concept(f)
                display = CONCEPTS[concept].phrase if concept else f.lower()
                if np.isnan(v).any():
                    unknown[len(terms)] = np.isnan(v)
                terms.append(Term(f"finding:{f}", "finding", f, TermMeaning(display, FINDING_CATEGORY[f], concept)))
                blocks.append(sparse.csr_matrix((v == 1)[:, None]))

        if cfg.use_concepts and "concepts" in frame.columns:
            lists = [_as_list(x, "concepts", i) for i, x in enumerate(frame["concepts"])]
            names = sorted({c for lst in lists for c in lst})
            has_concepts = bool(names)
            col = {c: j for j, c in enumerate(names)}
            rows = [i for i, lst in enumerate(lists) for c in set(lst)]
            cols = [col[c] for lst in lists for c in set(lst)]
            if names:
                blocks.append(sparse.csr_matrix((np.ones(len(rows), dtype=bool), (rows, cols)), shape=(n, len(names))))
            for c in names:
                if c in CONCEPTS:
                    meaning = TermMeaning(CONCEPTS[c].phrase, CONCEPTS[c].category, c)
                else:
                    meaning = index.meaning(c.replace("_", " "))
                terms.append(Term(f"concept:{c}", "concept", c, meaning))

        if cfg.use_reports and "report" in frame.columns:
            # Terms get integer ids as they are met; per-record id arrays keep memory linear in the corpus.
            term_id: dict[str, int] = {}
            per_record: list[np.ndarray] = []
            for r in frame["report"]:
                ts = extract_terms(r if isinstance(r, str) else "", cfg.report_max_n)
                per_record.append(np.fromiter((term_id.setdefault(t, len(term_id)) for t in ts), dtype=np.int64,
                                              count=len(ts)))
            flat = np.concatenate(per_record) if per_record else np.zeros(0, dtype=np.int64)
            df = np.bincount(flat, minlength=len(term_id))
            names_by_id = np.empty(len(term_id), dtype=object)
            for t, k in term_id.items():
                names_by_id[k] = t
            frequent = [k for k in np.flatnonzero(df >= cfg.min_term_images)]
            frequent.sort(key=lambda k: (-df[k], names_by_id[k]))
            kept = sorted(frequent[: cfg.max_report_terms], key=lambda k: names_by_id[k])
            if kept:
                remap = np.full(len(term_id), -1, dtype=np.int64)
                remap[kept] = np.arange(len(kept))
                rows = np.repeat(np.arange(n), [len(x) for x in per_record])
                cols = remap[flat]
                ok = cols >= 0
                blocks.append(sparse.csr_matrix((np.ones(int(ok.sum()), dtype=bool), (rows[ok], cols[ok])),
                                                shape=(n, len(kept))))
                for k in kept:
                    t = names_by_id[k]
                    terms.append(Term(f"report:{t}", "report", t, index.meaning(t)))

        if not terms:
            raise ValueError("the records table has no usable term columns: expected some of the finding columns "
                             f"({', '.join(FINDINGS)}), 'concepts' or 'report' (as in records.parquet)")
        return cls(ids=ids, terms=terms, present=sparse.hstack(blocks, format="csr"), unknown=unknown,
                   has_concepts=has_concepts)

    @classmethod
    def from_records(cls, records: Sequence[Any], config: EvidenceConfig | None = None,
                     vocabulary: Sequence[VocabPhrase] | None = None) -> "EvidenceTable":
        """Build from `sae_cxr.data.base.Record`s (via their records.parquet rows)."""
        return cls.from_frame(pd.DataFrame([r.to_row() for r in records]), config, vocabulary)


def _as_list(value: Any, column: str, row: int) -> list[str]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"row {row}: column {column!r} must be a JSON list (as written by Record.to_row), "
                             f"got {value[:80]!r}") from None
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v) for v in value]
    raise ValueError(f"row {row}: column {column!r} must be a list of names, got {type(value).__name__}")


# ------------------------------------------------------------------------------------------------
# The labeler
# ------------------------------------------------------------------------------------------------
@dataclass
class _Stats:
    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    d: np.ndarray
    odds_ratio: np.ndarray
    p: np.ndarray
    q: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    score: np.ndarray


class EvidenceLabeler:
    """Names patterns by the findings, concepts and report terms enriched among their top images."""

    def __init__(self, config: EvidenceConfig | None = None, vocabulary: Sequence[VocabPhrase] | None = None):
        self.config = config or EvidenceConfig()
        self.vocabulary = vocabulary
        self._cached: tuple[Any, EvidenceTable] | None = None  # (frame, its table): many patterns, one table

    def table(self, table: "EvidenceTable | pd.DataFrame") -> EvidenceTable:
        """The EvidenceTable for `table`, built once per DataFrame (kept while the same frame is passed)."""
        if isinstance(table, EvidenceTable):
            return table
        if self._cached is not None and self._cached[0] is table:
            return self._cached[1]
        built = EvidenceTable.from_frame(table, self.config, self.vocabulary)
        self._cached = (table, built)
        return built

    def top_set(self, activations: np.ndarray) -> tuple[np.ndarray, int]:
        """(boolean top-set mask, number of firing images) for one pattern's activations."""
        cfg = self.config
        firing = activations > cfg.fire_threshold
        n_fire = int(firing.sum())
        idx = np.flatnonzero(firing)
        if cfg.top_quantile is not None and n_fire:
            cut = np.quantile(activations[idx], cfg.top_quantile)
            idx = idx[activations[idx] >= cut]
        idx = idx[np.argsort(-activations[idx], kind="stable")][: cfg.top_k]
        top = np.zeros(len(activations), dtype=bool)
        top[idx] = True
        return top, n_fire

    def _stats(self, t: EvidenceTable, top: np.ndarray) -> _Stats:
        a, n1 = t.top_counts(np.flatnonzero(top))
        b = n1 - a
        c = t._col_present - a
        d = (t._col_known - n1) - c
        odds = haldane_odds_ratio(a, b, c, d)
        p = fisher_greater(a, b, c, d)
        q = benjamini_hochberg(p)
        precision = np.divide(a, n1, out=np.zeros(len(a)), where=n1 > 0)
        recall = np.divide(a, a + c, out=np.zeros(len(a)), where=(a + c) > 0)
        score = precision * np.log(odds)
        return _Stats(a, b, c, d, odds, p, q, precision, recall, score)

    def _conditional_p(self, cols: dict[int, tuple[np.ndarray, np.ndarray]], top: np.ndarray, x: int,
                       y: int) -> tuple[int, float]:
        """(top images with X and without Y, one-sided Fisher p of X among the images without Y).

        `cols[j]` holds term j's (values, known) as dense masks.
        """
        (vx, kx), (vy, ky) = cols[x], cols[y]
        rows = ~vy & kx & ky
        has_x, in_top = vx[rows], top[rows]
        a = int((has_x & in_top).sum())
        b = int((~has_x & in_top).sum())
        c = int((has_x & ~in_top).sum())
        d = int((~has_x & ~in_top).sum())
        return a, float(fisher_greater(a, b, c, d))

    def _auroc_decision(self, t: EvidenceTable, acts: np.ndarray, standing: list[int]) -> dict[str, Any] | None:
        """The standing candidate whose presence the whole activation distribution ranks best (AUROC over
        the images where the term is known); None when that is already the best-scoring one."""
        if len(standing) < 2:
            return None
        scores = {x: t.presence_auroc(x, acts) for x in standing}
        best = max(standing, key=lambda x: (np.nan_to_num(scores[x], nan=-1.0), -standing.index(x)))
        if best == standing[0]:
            return None
        return {"winner": best, "by": "auroc",
                "auroc": {t.terms[x].key: round(float(scores[x]), 4) for x in standing}}

    def _survives(self, cols: dict[int, tuple[np.ndarray, np.ndarray]], top: np.ndarray, x: int, y: int) -> bool:
        """Is X still enriched in the top set among the images without Y?"""
        a, p = self._conditional_p(cols, top, x, y)
        return a >= self.config.min_conditional_hits and p <= self.config.alpha_conditional

    def label(self, pattern_id: int | str, activations: Any, table: "EvidenceTable | pd.DataFrame") -> PatternLabel:
        """Name one pattern from its activation on every record of `table` (same order)."""
        cfg = self.config
        t = self.table(table)
        acts = np.asarray(activations, dtype=np.float64).reshape(-1)
        if acts.shape[0] != len(t):
            raise ValueError(f"pattern {pattern_id}: {acts.shape[0]} activations for a table of {len(t)} records; "
                             "pass the pattern's activation on every record, in the table's order")
        if not np.isfinite(acts).all():
            raise ValueError(f"pattern {pattern_id}: activations contain NaN or infinite values")
        top, n_fire = self.top_set(acts)
        n_top = int(top.sum())
        base = {"method": "enrichment", "n_images": len(t), "n_firing": n_fire, "n_top": n_top,
                "top_min_activation": float(acts[top].min()) if n_top else None,
                "has_concepts": t.has_concepts}
        if n_top < cfg.min_top:
            return self._unresolved(pattern_id, base, None, None,
                                    f"fires on {n_fire} image(s) (top set {n_top} < min_top={cfg.min_top})")

        s = self._stats(t, top)
        categorised = np.array([term.meaning.category is not None for term in t.terms])
        eligible = ((s.q <= cfg.alpha) & (s.a >= cfg.min_top_hits) & (s.precision >= cfg.min_precision)
                    & (s.odds_ratio > 1.0) & categorised)
        candidates = self._distinct_meanings(t, self._rank(t, s, np.flatnonzero(eligible)))[: cfg.n_candidates]
        if not len(candidates):
            absent = self._absence(pattern_id, base, t, s, acts, categorised) if cfg.absence else None
            if absent is not None:
                return absent
            return self._unresolved(pattern_id, base, t, s, f"no term is enriched at q <= {cfg.alpha} "
                                    f"with precision >= {cfg.min_precision} among the top {n_top} images")

        explained: list[dict[str, Any]] = []
        standing: list[int] = []
        cols = {j: (t.values(j), t.known(j)) for j in candidates}
        for x in candidates:
            by = next((y for y in candidates if y != x and not self._survives(cols, top, x, y)
                       and self._survives(cols, top, y, x)), None)
            if by is None:
                standing.append(x)
            else:
                explained.append({"term": t.terms[x].key, "by": t.terms[by].key})
        winner = standing[0] if standing else candidates[0]  # none standing: a cycle, keep the marginal best
        tie_break = self._auroc_decision(t, acts, standing) if cfg.decide_by_auroc else None
        if tie_break is not None:
            winner = tie_break["winner"]

        term = t.terms[winner]
        m = term.meaning
        significance = min(1.0, -math.log10(max(s.q[winner], 1e-300)) / cfg.full_confidence_log10_q)
        confidence = float(np.clip(s.precision[winner] * significance, 0.0, 1.0))
        rest_rate = s.c[winner] / max(s.c[winner] + s.d[winner], 1)
        description = (f"Over-represented among the pattern's top {n_top} images: {m.display} ({term.kind} "
                       f"{term.name!r}) on {s.a[winner]}/{s.a[winner] + s.b[winner]} "
                       f"({s.precision[winner]:.0%}) vs {rest_rate:.0%} of the other images; "
                       f"odds ratio {s.odds_ratio[winner]:.3g}, q = {s.q[winner]:.2g}.")
        evidence = {**base, "term": term.key, "kind": term.kind, "concept": m.concept,
                    "finding": term.name if term.kind == "finding" else None, "polarity": "present",
                    "terms": self._top_terms(t, s), "explained_away": explained}
        if tie_break is not None:
            evidence["tie_break"] = {k: v for k, v in tie_break.items() if k != "winner"}
        return PatternLabel(label=m.display, description=description, category=str(m.category),
                            confidence=confidence, labeler="evidence", pattern_id=pattern_id, evidence=evidence)

    def label_many(self, pattern_ids: Sequence[int | str], activations: Any,
                   table: "EvidenceTable | pd.DataFrame") -> list[PatternLabel]:
        """Label several patterns; activations is [N, P] with one column per pattern id."""
        acts = np.asarray(activations)
        if acts.ndim != 2 or acts.shape[1] != len(pattern_ids):
            raise ValueError(f"activations must be [n_records, n_patterns={len(pattern_ids)}], got {acts.shape}")
        t = self.table(table)
        return [self.label(pid, acts[:, j], t) for j, pid in enumerate(pattern_ids)]

    def _absence(self, pattern_id: int | str, base: dict[str, Any], t: EvidenceTable, s: _Stats,
                 acts: np.ndarray, categorised: np.ndarray) -> PatternLabel | None:
        """"no <term>" for the common term best depleted among the top images, or None (step 8)."""
        cfg = self.config
        n1 = s.a + s.b
        rest_rate = np.divide(s.c, s.c + s.d, out=np.zeros(len(s.c)), where=(s.c + s.d) > 0)
        common = categorised & (rest_rate >= cfg.absence_min_rate) & (n1 > 0)
        if not common.any():
            return None
        p_less = np.ones(len(s.a))
        idx = np.flatnonzero(common)
        p_less[idx] = fisher_less(s.a[idx], s.b[idx], s.c[idx], s.d[idx])
        q_less = np.ones(len(s.a))
        q_less[idx] = benjamini_hochberg(p_less[idx])
        ok = common & (q_less <= cfg.alpha) & (s.precision <= cfg.absence_max_precision) & (s.odds_ratio < 1.0)
        if not ok.any():
            return None
        score = (1.0 - s.precision) * -np.log(s.odds_ratio)
        order = sorted((int(j) for j in np.flatnonzero(ok)),
                       key=lambda j: (-round(float(score[j]), 12), KIND_PRIORITY[t.terms[j].kind], t.terms[j].key))
        candidates = self._distinct_meanings(t, order)[: cfg.n_candidates]
        aurocs = {j: t.presence_auroc(j, acts) for j in candidates}
        winner = candidates[0]
        if cfg.decide_by_auroc and len(candidates) > 1:
            winner = min(candidates, key=lambda j: (np.nan_to_num(aurocs[j], nan=2.0), candidates.index(j)))
        term, m = t.terms[winner], t.terms[winner].meaning
        significance = min(1.0, -math.log10(max(q_less[winner], 1e-300)) / cfg.full_confidence_log10_q)
        confidence = float(np.clip((1.0 - s.precision[winner]) * significance, 0.0, 1.0))
        description = (f"Missing from the pattern's top {int(n1[winner])} images: {m.display} ({term.kind} "
                       f"{term.name!r}) on {s.a[winner]}/{int(n1[winner])} ({s.precision[winner]:.0%}) vs "
                       f"{rest_rate[winner]:.0%} of the other images; odds ratio {s.odds_ratio[winner]:.3g}, "
                       f"q = {q_less[winner]:.2g} (depletion); presence AUROC of the activation "
                       f"{aurocs[winner]:.3f}.")
        evidence = {**base, "term": term.key, "kind": term.kind, "concept": m.concept,
                    "finding": term.name if term.kind == "finding" else None, "polarity": "absent",
                    "presence_auroc": {t.terms[j].key: round(float(aurocs[j]), 4) for j in candidates},
                    "terms": self._top_terms(t, s), "explained_away": []}
        return PatternLabel(label=f"no {m.display}", description=description, category=str(m.category),
                            confidence=confidence, labeler="evidence", pattern_id=pattern_id, evidence=evidence)

    # -- helpers -------------------------------------------------------------------------------------
    @staticmethod
    def _rank(t: EvidenceTable, s: _Stats, idx: np.ndarray) -> list[int]:
        """Best first: score, then concept > finding > report, then the longer (more specific) name."""
        return sorted((int(j) for j in idx),
                      key=lambda j: (-round(float(s.score[j]), 12), KIND_PRIORITY[t.terms[j].kind],
                                     -len(t.terms[j].name.split()), t.terms[j].key))

    @staticmethod
    def _distinct_meanings(t: EvidenceTable, order: list[int]) -> list[int]:
        """The first term of each meaning in `order` (a concept, its finding and its report phrases are one)."""
        seen: set[str] = set()
        out = []
        for j in order:
            m = t.terms[j].meaning
            key = m.concept or m.display
            if key not in seen:
                seen.add(key)
                out.append(j)
        return out

    def _top_terms(self, t: EvidenceTable, s: _Stats) -> list[dict[str, Any]]:
        shown = self._rank(t, s, np.flatnonzero((s.a > 0) & (s.odds_ratio > 1.0)))[: self.config.evidence_terms]
        return [{"term": t.terms[j].key, "kind": t.terms[j].kind, "display": t.terms[j].meaning.display,
                 "category": t.terms[j].meaning.category, "concept": t.terms[j].meaning.concept,
                 "top_hits": int(s.a[j]), "top_n": int(s.a[j] + s.b[j]), "rest_hits": int(s.c[j]),
                 "rest_n": int(s.c[j] + s.d[j]), "odds_ratio": float(s.odds_ratio[j]), "p": float(s.p[j]),
                 "q": float(s.q[j]), "precision": float(s.precision[j]), "recall": float(s.recall[j]),
                 "score": float(s.score[j])} for j in shown]

    def _unresolved(self, pattern_id: int | str, base: dict[str, Any], t: EvidenceTable | None,
                    s: _Stats | None, reason: str) -> PatternLabel:
        cfg = self.config
        category, weak = cfg.unresolved_category, None
        if t is not None and s is not None:
            weak_idx = [j for j in self._rank(t, s, np.flatnonzero((s.p <= cfg.fallback_p) & (s.odds_ratio > 1.0)))
                        if t.terms[j].meaning.category is not None]
            if weak_idx:
                weak = t.terms[weak_idx[0]]
                category = str(weak.meaning.category)
        how = (f"category from the weakly enriched term {weak.key!r}" if weak is not None
               else f"category is the default {cfg.unresolved_category!r}")
        evidence = {**base, "term": None, "kind": None, "concept": None, "finding": None, "reason": reason,
                    "fallback_term": weak.key if weak is not None else None,
                    "terms": self._top_terms(t, s) if t is not None and s is not None else [],
                    "explained_away": []}
        return PatternLabel(label=UNRESOLVED, description=f"No label: {reason}; {how}.", category=category,
                            confidence=0.0, labeler="evidence", pattern_id=pattern_id, evidence=evidence)
