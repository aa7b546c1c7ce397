"""Nuisance contrasts: how far a device or artifact moves a finding's logit, and through which patterns.

The audit (`sae_cxr.audit`) reads the patterns' labels, so it misses a shortcut that the finding's own
patterns have absorbed: at a 0.9 co-occurrence a "pleural effusion" pattern may fire on the laterality
marker too, and the marker's reliance then flows through a pattern labelled otherwise. The contrast
asks the classifier instead. Among the images NEGATIVE for finding c, regress the logit on the term's
presence (a device or artifact, from the records' concepts or report terms) and on the other findings'
labels (positive / unknown indicators, so a device that comes with other disease is not blamed for
that disease):

    logit_c ~ b0 + sum_t contrast_t [term t] + sum_f (a_f [label_f = 1] + u_f [label_f unknown])

with every device/artifact term in one fit, so pacemaker and sternotomy wires, which come together,
are not credited with each other's push. `contrast_t` is the logit change that goes with term t, the
other findings and nuisances held fixed: a shortcut's
signature on data that has no intervention split. Least squares is linear in the response, and the
logit is exactly the sum of its decomposition's terms, so the same fit applied to each pattern's
contribution splits the contrast exactly over patterns (plus the non-pattern rest). Everything is
accumulated as sums of products, one batch at a time.

The terms come from one of two sources. "records": the records' own device/artifact annotations
(phantom concepts, or vocabulary phrases in the reports). "patterns": the workbench's own detectors,
one per device/artifact LABEL, namely the label's most stable pattern, present where its activation
passes its Otsu cut. The second source needs no annotation at all (pattern labels, activations and
the five finding labels), so it is the audit an auditor can run on any data set. Unlike the label
audit's swing, it still catches a shortcut that the finding's own patterns absorbed: the marker
pattern only has to DETECT the marker, not carry its push.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

REST = -1  # pattern id of the part of the logit that is no pattern's (unassigned + skip + bias + error)


@dataclass
class ContrastSums:
    """Sums of products over a finding's negative images, for the per-term regressions.

    Design columns z = [1, other labels positive (C-1), other labels unknown (C-1)], D = 2C - 1.
    Responses: K = P + 1 columns (each pattern's contribution, then the rest of the logit)."""

    finding: int
    zz: np.ndarray  # [D, D]
    zt: np.ndarray  # [D, T]
    tt: np.ndarray  # [T, T] (terms are 0/1: the diagonal counts the images with each term)
    zy: np.ndarray  # [D, K]
    ty: np.ndarray  # [T, K]
    yy: float  # sum of the squared logit (for the residual variance)
    n: int = 0

    def __post_init__(self) -> None:
        D, T, K = self.zz.shape[0], self.zt.shape[1], self.zy.shape[1]
        if self.zz.shape != (D, D) or self.zt.shape != (D, T) or self.tt.shape != (T, T):
            raise ValueError("zz [D, D], zt [D, T] and tt [T, T] must agree on D and T")
        if self.zy.shape != (D, K) or self.ty.shape != (T, K):
            raise ValueError("zy [D, K] and ty [T, K] must agree on D, T and K")
        if (np.diag(self.tt) < -1e-9).any() or (np.diag(self.tt) > self.n + 1e-9).any():
            raise ValueError("term counts must lie in [0, n]")

    @classmethod
    def zeros(cls, finding: int, n_findings: int, n_terms: int, n_patterns: int) -> "ContrastSums":
        D, K = 2 * n_findings - 1, n_patterns + 1
        return cls(finding, np.zeros((D, D)), np.zeros((D, n_terms)), np.zeros((n_terms, n_terms)), np.zeros((D, K)),
                   np.zeros((n_terms, K)), 0.0)

    def add(self, contributions: np.ndarray, logit: np.ndarray, labels: np.ndarray, terms: np.ndarray) -> None:
        """One batch: contributions [B, P, C], logit [B, C], labels [B, C] (1, 0, NaN = unknown), terms [B, T]
        0/1. Only images labelled negative for this finding count."""
        c = self.finding
        labels = np.asarray(labels, dtype=np.float64)
        neg = labels[:, c] == 0
        if not neg.any():
            return
        other = np.delete(labels[neg], c, axis=1)
        z = np.column_stack([np.ones(neg.sum()), np.nan_to_num(other, nan=0.0) == 1, np.isnan(other)]).astype(float)
        t = np.asarray(terms, dtype=np.float64)[neg]
        pat = contributions[neg, :, c].astype(np.float64)
        y = np.column_stack([pat, logit[neg, c] - pat.sum(1)])  # [b, K]: patterns, then the rest
        self.zz += z.T @ z
        self.zt += z.T @ t
        self.tt += t.T @ t
        self.zy += z.T @ y
        self.ty += t.T @ y
        self.yy += float((logit[neg, c].astype(np.float64) ** 2).sum())
        self.n += int(neg.sum())

    def merge(self, other: "ContrastSums") -> None:
        """Add another part's sums (another rank's images) for the same finding, terms and patterns."""
        if other.finding != self.finding or other.zy.shape != self.zy.shape or other.tt.shape != self.tt.shape:
            raise ValueError("only sums of the same finding, terms and patterns can be merged")
        for k in ("zz", "zt", "tt", "zy", "ty"):
            getattr(self, k).__iadd__(getattr(other, k))
        self.yy += other.yy
        self.n += other.n

    def counts(self) -> np.ndarray:
        """[T] negative images carrying each term."""
        return np.rint(np.diag(self.tt)).astype(np.int64)

    def fit(self, terms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The joint fit over the term columns `terms` [T']: their adjusted contrasts [T'], standard errors
        [T'], and each contrast's split over the K responses [T', K] (rows sum to the contrasts). Give only
        terms that are on some but not all images (see `counts`): a constant column has no contrast."""
        terms = np.asarray(terms, dtype=np.int64)
        D, T = self.zz.shape[0], len(terms)
        G = np.zeros((D + T, D + T))
        G[:D, :D] = self.zz
        G[:D, D:] = self.zt[:, terms]
        G[D:, :D] = self.zt[:, terms].T
        G[D:, D:] = self.tt[np.ix_(terms, terms)]
        rhs = np.vstack([self.zy, self.ty[terms]])  # [D + T, K]
        Ginv = np.linalg.pinv(G)  # unused columns (a finding never unknown) make G singular
        beta = Ginv @ rhs  # [D + T, K]
        split = beta[D:]
        rss = max(self.yy - float(beta.sum(1) @ rhs.sum(1)), 0.0)  # the logit is the sum of the responses
        dof = self.n - np.linalg.matrix_rank(G)
        var = rss / dof * np.diag(Ginv)[D:] if dof > 0 else np.full(T, np.nan)
        return split.sum(1), np.sqrt(np.maximum(var, 0.0)), split


@dataclass
class NuisanceTerm:
    key: str
    display: str
    category: str


def nuisance_terms(records: Sequence, categories: Sequence[str]) -> tuple[list[NuisanceTerm], np.ndarray]:
    """The device/artifact terms of `records` and their presence [N, T]: phantom concepts where the
    records have them, otherwise vocabulary phrases found in the reports (one column per concept)."""
    from sae_cxr.labeling.evidence import EvidenceConfig, EvidenceTable

    table = EvidenceTable.from_records(records, EvidenceConfig(use_findings=False))
    keep, seen = [], set()
    order = sorted(range(len(table.terms)), key=lambda j: table.terms[j].kind != "concept")  # concepts first
    for j in order:
        m = table.terms[j].meaning
        if m is None or m.category not in categories:
            continue
        ident = m.concept or table.terms[j].key
        if ident in seen:
            continue
        seen.add(ident)
        keep.append(j)
    keep.sort()
    terms = [NuisanceTerm(table.terms[j].key, table.terms[j].meaning.display, table.terms[j].meaning.category)
             for j in keep]
    present = np.column_stack([table.values(j) for j in keep]) if keep else np.zeros((len(records), 0), bool)
    return terms, present


@dataclass
class PatternDetectors:
    """One nuisance detector per device/artifact label: the label's most stable pattern (the one most
    members of the ensemble found) and a cut on its activation (Otsu's, over the images it fires on).
    A label's other patterns are left out: a group also collects weak and half-mislabelled patterns,
    and their union fires on most images."""

    terms: list[NuisanceTerm]
    pattern_ids: np.ndarray  # [T] the representative pattern of each label
    thresholds: np.ndarray  # [T] presence cut on its activation

    def __post_init__(self) -> None:
        if not (len(self.terms) == len(self.pattern_ids) == len(self.thresholds)):
            raise ValueError("terms, pattern_ids and thresholds must have one entry per label")

    def present(self, activations: np.ndarray) -> np.ndarray:
        """Pattern activations [B, P] -> presence of each label's nuisance [B, T]."""
        return activations[:, self.pattern_ids] > self.thresholds


def pattern_detectors(labels: pd.DataFrame, stability: pd.Series, activation_values: Callable[[int], np.ndarray],
                      categories: Sequence[str] = ("device", "artifact"), min_firing: int = 20) -> PatternDetectors:
    """Detectors for the labels of `categories`. `labels` (indexed by pattern_id: label, category),
    `stability` (pattern_id -> share of members), `activation_values(pattern_id)` -> the pattern's
    non-zero activations over a data set (for the cut). Labels whose representative fires on fewer than
    `min_firing` images are skipped: an Otsu cut needs a distribution."""
    from sae_cxr.audit import label_groups
    from sae_cxr.patterns import otsu_threshold

    n_patterns = int(max(labels.index.max(), stability.index.max())) + 1 if len(labels) else 0
    groups, keys = label_groups(labels, n_patterns, categories)
    stab = stability.reindex(range(n_patterns)).fillna(0.0).to_numpy()
    terms, ids, cuts = [], [], []
    for g, (label, category) in enumerate(keys):
        members = np.flatnonzero(groups == g)
        rep = int(members[np.argmax(stab[members])])  # ties: the lowest id
        values = np.asarray(activation_values(rep), dtype=np.float64)
        values = values[values > 0]
        if len(values) < min_firing:
            continue
        terms.append(NuisanceTerm(f"label:{label}", label, category))
        ids.append(rep)
        cuts.append(otsu_threshold(values))
    return PatternDetectors(terms, np.array(ids, dtype=np.int64), np.array(cuts, dtype=np.float64))


def run_pattern_detectors(run, labels: pd.DataFrame, categories: Sequence[str] = ("device", "artifact")
                          ) -> PatternDetectors:
    """`pattern_detectors` of a run: its patterns' stability and the activations the patterns stage saved."""
    from sae_cxr.patterns import load_activations, load_patterns

    table, _ = load_patterns(run)
    _, cols, vals, (_, n_patterns) = load_activations(run)
    order = np.argsort(cols, kind="stable")
    starts = np.searchsorted(cols[order], np.arange(n_patterns + 1))
    return pattern_detectors(labels, table.set_index("pattern_id")["stability"],
                             lambda p: vals[order[starts[p]:starts[p + 1]]], categories)


def contrast_table(sums: ContrastSums, terms: Sequence[NuisanceTerm], labels: pd.DataFrame | None = None,
                   min_images: int = 10, top: int = 5) -> pd.DataFrame:
    """One row per term seen on >= min_images negative images (and missing from as many), all fitted
    jointly, largest contrast first: contrast, se, z, n_with, n_without, and the `top` patterns carrying most of it
    (pattern id, label, share of the contrast; REST = the logit's non-pattern part)."""
    n_on = sums.counts()
    fit = np.flatnonzero((n_on >= min_images) & (sums.n - n_on >= min_images))
    rows = []
    if len(fit):
        est, se, split = sums.fit(fit)
        for i, j in enumerate(fit):
            e = float(est[i])
            carriers = []
            for k in np.argsort(-np.sign(e) * split[i], kind="stable")[:top]:
                pid = REST if k == split.shape[1] - 1 else int(k)
                lab = labels["label"].get(pid) if labels is not None and pid != REST and pid in labels.index else None
                carriers.append({"pattern_id": pid, "label": lab,
                                 "share": round(float(split[i, k] / e), 4) if e else None})
            s_i = float(se[i])
            rows.append({"term": terms[j].key, "display": terms[j].display, "category": terms[j].category,
                         "contrast": e, "se": s_i, "z": e / s_i if s_i > 0 else float("nan"),
                         "n_with": int(n_on[j]), "n_without": int(sums.n - n_on[j]), "carriers": carriers})
    out = pd.DataFrame(rows, columns=["term", "display", "category", "contrast", "se", "z", "n_with", "n_without",
                                      "carriers"])
    return out.sort_values("contrast", ascending=False, kind="stable").reset_index(drop=True)


def run_contrasts(run, splits: Sequence[str], categories: Sequence[str] = ("device", "artifact"),
                  batch_size: int = 512, min_images: int = 10,
                  sources: Sequence[str] = ("records", "patterns")) -> dict[str, dict[str, pd.DataFrame]]:
    """Per term source of `sources` ("records": annotations or report phrases; "patterns": the labels'
    own pattern detectors, once labels exist) and per finding, the contrast table of every
    device/artifact term over the valid images of `splits`, from one pass of decompositions."""
    return _contrast_pass(run, splits, categories, batch_size, min_images, sources, with_audit=False)[1]


def audit_and_contrasts(run, splits: Sequence[str], categories: Sequence[str] = ("device", "artifact"),
                        batch_size: int = 512, min_images: int = 10,
                        sources: Sequence[str] = ("records", "patterns")) -> tuple[Any, dict[str, dict[str, pd.DataFrame]]]:
    """`sae_cxr.audit.audit_run` and `run_contrasts` over the same images, from ONE pass of decompositions."""
    return _contrast_pass(run, splits, categories, batch_size, min_images, sources, with_audit=True)


def _contrast_pass(run, splits: Sequence[str], categories: Sequence[str], batch_size: int, min_images: int,
                   sources: Sequence[str], with_audit: bool) -> tuple[Any, dict[str, dict[str, pd.DataFrame]]]:
    from sae_cxr.audit import audit_from_sums, empty_evidence_sums, label_table, split_decompositions
    from sae_cxr.findings import FINDINGS

    unknown = set(sources) - {"records", "patterns"}
    if unknown:
        raise ValueError(f"unknown contrast term source(s) {sorted(unknown)}; known: records, patterns")
    data = split_decompositions(run, splits, batch_size)
    labels = label_table(run)  # empty before the label stage: carriers then go unnamed, no pattern terms
    terms_of: dict[str, tuple[list[NuisanceTerm], Callable]] = {}  # source -> (terms, (slice, batch) -> presence)
    if "records" in sources:
        rec_terms, rec_present = nuisance_terms(data.records, categories)
        terms_of["records"] = (rec_terms, lambda sl, batch: rec_present[sl])
    if "patterns" in sources and len(labels):
        detectors = run_pattern_detectors(run, labels, categories)
        terms_of["patterns"] = (detectors.terms, lambda sl, batch: detectors.present(batch.activations))
    C, P = len(FINDINGS), data.attributor.n_patterns
    sums = {k: [ContrastSums.zeros(c, C, len(terms), P) for c in range(C)] for k, (terms, _) in terms_of.items()}
    evidence = empty_evidence_sums(P, labels) if with_audit else None
    for sl, batch in data.batches():
        if evidence is not None:
            evidence.add(batch.contributions, data.labels[sl])
        for k, (_, present) in terms_of.items():
            t = present(sl, batch)
            for cs in sums[k]:
                cs.add(batch.contributions, batch.logit, data.labels[sl], t)
    audit = audit_from_sums(evidence, labels, splits) if evidence is not None else None
    return audit, {k: {f: contrast_table(sums[k][c], terms, labels, min_images) for c, f in enumerate(FINDINGS)}
                   for k, (terms, _) in terms_of.items()}
