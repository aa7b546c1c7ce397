"""Shortcut audit: how much of each finding's evidence is carried by device and artifact patterns.

A classifier that leans on a pacemaker to call cardiomegaly shows it in its decompositions: the
pacemaker pattern carries a large share of the Cardiomegaly logit. The audit reads only the
attribution stage's contributions and the labeler's categories, the same view an auditor has on
real data; on the phantom world the planted shortcut is known, so the audit itself can be graded
(`shortcut_rank`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from sae_cxr.run import RunDir

NUISANCE_CATEGORIES = ("device", "artifact")


@dataclass
class FindingAudit:
    """Evidence on one finding over the predictions of some splits."""

    finding: str
    n_predictions: int
    total_evidence: float
    """Sum over predictions of |contribution| of the reported patterns (logit units)."""
    nuisance_share: float
    """Share of total_evidence carried by patterns whose category is device or artifact."""
    patterns: pd.DataFrame
    """Device/artifact patterns, largest net push first: pattern_id, label, category, net (sum of signed
    contributions), evidence (sum of |contribution|), share (|net| / total_evidence), n_images."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.nuisance_share <= 1.0 + 1e-9:
            raise ValueError(f"nuisance share {self.nuisance_share} outside [0, 1]")


def evidence_by_pattern(contributions: pd.DataFrame, finding: str) -> pd.DataFrame:
    """Per pattern: net (signed sum) and total |contribution| to `finding`, and images where reported;
    largest |net| first.

    Ranking by the net push, not by the sum of magnitudes: a shortcut moves the logit one way every
    time its nuisance is present, while a ubiquitous marker that nudges it either way cancels out."""
    c = contributions[contributions["finding"] == finding]
    g = c.assign(mag=c["contribution"].abs()).groupby("pattern_id")
    out = pd.DataFrame({"net": g["contribution"].sum(), "evidence": g["mag"].sum(),
                        "n_images": g["record_id"].nunique()})
    return out.iloc[np.argsort(-out["net"].abs().to_numpy(), kind="stable")]


def audit_finding(contributions: pd.DataFrame, labels: pd.DataFrame, finding: str,
                  categories: Sequence[str] = NUISANCE_CATEGORIES) -> FindingAudit:
    """Audit one finding. `labels` is indexed by pattern_id with columns label and category."""
    ev = evidence_by_pattern(contributions, finding)
    total = float(ev["evidence"].sum())
    ev = ev.join(labels[["label", "category"]], how="left")
    ev["category"] = ev["category"].fillna("unlabelled")
    nuis = ev[ev["category"].isin(categories)].copy()
    nuis["share"] = nuis["net"].abs() / total if total > 0 else 0.0
    n_pred = int(contributions.loc[contributions["finding"] == finding, "record_id"].nunique())
    share = float(nuis["evidence"].sum() / total) if total > 0 else 0.0  # magnitudes: a share of all evidence
    return FindingAudit(finding=finding, n_predictions=n_pred, total_evidence=total, nuisance_share=share,
                        patterns=nuis.reset_index()[["pattern_id", "label", "category", "net", "evidence",
                                                     "share", "n_images"]])


@dataclass
class RunAudit:
    splits: tuple[str, ...]
    findings: dict[str, FindingAudit] = field(default_factory=dict)

    def ranked(self) -> list[FindingAudit]:
        """Findings by the share of their evidence carried by device/artifact patterns."""
        return sorted(self.findings.values(), key=lambda a: -a.nuisance_share)


def audit_run(run: RunDir, splits: Sequence[str] = ("test",)) -> RunAudit:
    """The audit of every finding of a labelled run, over predictions on `splits`."""
    from sae_cxr.attribution import load_predictions
    from sae_cxr.labeling.stage import load_labels

    preds, contrib = load_predictions(run)
    keep = preds.loc[preds["split"].isin(list(splits)), ["record_id", "finding"]].drop_duplicates()
    if keep.empty:
        have = sorted(preds["split"].unique())
        raise ValueError(f"no attributed predictions on split(s) {list(splits)} in {run.path}; "
                         f"the attribution stage covered: {have}")
    contrib = contrib.merge(keep, on=["record_id", "finding"])
    labels = load_labels(run)
    lab = pd.DataFrame([{"pattern_id": p, "label": l.label, "category": l.category} for p, l in labels.items()])
    lab = lab.set_index("pattern_id") if len(lab) else pd.DataFrame(columns=["label", "category"])
    out = RunAudit(splits=tuple(splits))
    for finding in sorted(preds["finding"].unique()):
        out.findings[finding] = audit_finding(contrib, lab, finding)
    return out


def shortcut_patterns(patterns: pd.DataFrame, nuisance: str, min_auroc: float = 0.75) -> np.ndarray:
    """Patterns that detect the planted nuisance concept: it is their best-matching concept and they
    detect it at concept AUROC >= min_auroc (phantom ground truth)."""
    col = f"concept_auroc:{nuisance}"
    if col not in patterns.columns:
        raise ValueError(f"the pattern table has no ground truth for concept {nuisance!r} (is this a phantom run?)")
    hit = (patterns["best_concept"] == nuisance) & (patterns[col] >= min_auroc)
    return patterns.loc[hit, "pattern_id"].to_numpy(dtype=np.int64)


def shortcut_rank(audit: FindingAudit, truth_ids: np.ndarray) -> int | None:
    """1-based rank of the first true shortcut pattern among the finding's device/artifact evidence;
    None when no true shortcut pattern is among them (the audit missed it)."""
    ids = audit.patterns["pattern_id"].to_numpy()
    where = np.flatnonzero(np.isin(ids, truth_ids))
    return int(where[0]) + 1 if len(where) else None
