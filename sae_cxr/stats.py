"""Classification statistics shared by the classifier, the ensemble metrics, eval and reports.

AUROC is undefined on a split with a single class: it is reported as NaN with the reason, never
a crash. Labels may be NaN (unknown); those rows are left out per finding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ScoreCI:
    """A score with a bootstrap percentile interval; `note` says why a value is NaN."""

    value: float
    low: float
    high: float
    n: int
    n_pos: int
    note: str = ""

    def to_dict(self) -> dict:
        return {"value": _f(self.value), "low": _f(self.low), "high": _f(self.high), "n": self.n,
                "n_pos": self.n_pos, **({"note": self.note} if self.note else {})}


def _f(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 6)


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN if one class."""
    y = np.asarray(y, dtype=np.float64)
    s = np.asarray(score, dtype=np.float64)
    keep = ~np.isnan(y)
    y, s = y[keep], s[keep]
    n_pos = int((y == 1).sum())
    n_neg = int((y == 0).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def stratified_auroc(y: np.ndarray, score: np.ndarray, strata: np.ndarray, min_class: int = 10
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUROC of `score` for `y` [N] within each stratum's images and within the rest: strata [N, S] bool.
    Returns (auroc_with [S], auroc_without [S], n_with [S]); NaN where a side has fewer than `min_class`
    positives or negatives."""
    y = np.asarray(y, dtype=np.float64)
    strata = np.asarray(strata, dtype=bool)
    if strata.ndim != 2 or strata.shape[0] != len(y) or len(score) != len(y):
        raise ValueError(f"strata must be [N, S] and score [N] for N = {len(y)} labels")
    known = ~np.isnan(y)

    def side(mask: np.ndarray) -> float:
        m = mask & known
        n_pos = int((y[m] == 1).sum())
        return auroc(y[m], score[m]) if min(n_pos, int(m.sum()) - n_pos) >= min_class else float("nan")

    with_ = np.array([side(strata[:, k]) for k in range(strata.shape[1])])
    without = np.array([side(~strata[:, k]) for k in range(strata.shape[1])])
    return with_, without, strata.sum(0).astype(np.int64)


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the precision-recall curve (step interpolation, as sklearn); NaN without positives."""
    y = np.asarray(y, dtype=np.float64)
    s = np.asarray(score, dtype=np.float64)
    keep = ~np.isnan(y)
    y, s = y[keep], s[keep]
    if (y == 1).sum() == 0:
        return float("nan")
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, s))


def bootstrap_ci(y: np.ndarray, score: np.ndarray, metric=auroc, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> ScoreCI:
    """Percentile bootstrap interval of `metric`, resampling rows with replacement."""
    y = np.asarray(y, dtype=np.float64)
    s = np.asarray(score, dtype=np.float64)
    keep = ~np.isnan(y)
    y, s = y[keep], s[keep]
    n, n_pos = len(y), int((y == 1).sum())
    value = metric(y, s)
    if not np.isfinite(value):
        note = "no labelled rows" if n == 0 else ("single class: AUROC undefined" if metric is auroc
                                                  else "no positives")
        return ScoreCI(float("nan"), float("nan"), float("nan"), n, n_pos, note)
    rng = np.random.default_rng(seed)
    vals: list[float] = []
    chunk = max(1, min(n_boot, 4_000_000 // max(n, 1)))
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, (min(chunk, n_boot - start), n))
        batch = _batched(metric)(y[idx], s[idx])
        vals += [float(v) for v in batch if np.isfinite(v)]
    if not vals:
        return ScoreCI(value, float("nan"), float("nan"), n, n_pos, "bootstrap samples had a single class")
    lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
    return ScoreCI(value, float(lo), float(hi), n, n_pos)


def auroc_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AUROC of each row of [R, n] label/score matrices (labels 0/1), NaN where a row has one class."""
    from scipy.stats import rankdata

    ranks = rankdata(s, axis=1)
    n_pos = (y == 1).sum(axis=1)
    n_neg = (y == 0).sum(axis=1)
    u = (ranks * (y == 1)).sum(axis=1) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def average_precision_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Average precision of each row (precision at each positive, ranked by score), NaN without positives."""
    order = np.argsort(-s, axis=1, kind="stable")
    ys = np.take_along_axis(y == 1, order, axis=1)
    tp = np.cumsum(ys, axis=1)
    prec = tp / np.arange(1, y.shape[1] + 1)
    n_pos = ys.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_pos > 0, (prec * ys).sum(axis=1) / n_pos, np.nan)


def _batched(metric):
    if metric is auroc:
        return auroc_rows
    if metric is average_precision:
        return average_precision_rows
    return lambda y, s: np.array([metric(a, b) for a, b in zip(y, s)])


def bce_with_logits(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean binary cross-entropy over labelled entries (NaN labels masked)."""
    y = np.asarray(y, dtype=np.float64)
    z = np.asarray(logits, dtype=np.float64)
    m = ~np.isnan(y)
    if not m.any():
        return float("nan")
    z, t = z[m], y[m]
    return float(np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))))
