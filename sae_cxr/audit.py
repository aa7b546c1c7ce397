"""Shortcut audit: how much of each finding's evidence is carried by device and artifact patterns.

A classifier that leans on a pacemaker to call cardiomegaly shows it in its decompositions: the
pacemaker pattern pushes the Cardiomegaly logit up whenever the device is there. The audit sums the
FULL decompositions (every active pattern, not only the reported top ones, which would under-state
a shortcut that is one of many small terms) over a split, and reads the labeler's categories: the
same view an auditor has on real data. On the phantom world the planted shortcut is known, so the
audit itself can be graded (`shortcut_rank`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from sae_cxr.findings import FINDINGS
from sae_cxr.run import RunDir

NUISANCE_CATEGORIES = ("device", "artifact")


@dataclass
class EvidenceSums:
    """Per pattern and finding, sums over images of the decomposition's pattern terms; optionally also
    per GROUP of patterns (patterns sharing a label), summed within each image before squaring, so a
    group's swing is the spread of its joint push, not of its members one by one."""

    net: np.ndarray  # [P, C] sum of signed contributions
    magnitude: np.ndarray  # [P, C] sum of |contribution|
    n_active: np.ndarray  # [P, C] images where the pattern's term is non-zero
    square: np.ndarray  # [P, C] sum of squared contributions
    n_images: int = 0
    groups: np.ndarray | None = None  # [P] group id per pattern, -1 = in no group
    group_keys: list[tuple[str, str]] | None = None  # [G] (label, category) of each group
    group_net: np.ndarray | None = None  # [G, C] sum over images of the group's summed term
    group_square: np.ndarray | None = None  # [G, C] sum over images of its square
    pos_net: np.ndarray | None = None  # [P, C] sum of signed contributions over images labelled positive
    neg_net: np.ndarray | None = None  # [P, C] ... over images labelled negative (unknown labels: neither)
    n_pos: np.ndarray | None = None  # [C] images labelled positive
    n_neg: np.ndarray | None = None  # [C] images labelled negative

    def __post_init__(self) -> None:
        if not (self.net.shape == self.magnitude.shape == self.n_active.shape == self.square.shape):
            raise ValueError("net, magnitude, n_active and square must have the same [P, C] shape")
        if (np.abs(self.net) > self.magnitude + 1e-9 * (1 + self.magnitude)).any():
            raise ValueError("|net| exceeds the summed magnitude: the sums were not accumulated together")
        if (self.groups is None) != (self.group_keys is None):
            raise ValueError("groups and group_keys come together (see label_groups)")
        if self.groups is not None:
            if self.groups.shape != (self.net.shape[0],):
                raise ValueError(f"groups must hold one id per pattern ({self.net.shape[0]}), got {self.groups.shape}")
            G = len(self.group_keys)
            if len(self.groups) and int(self.groups.max()) >= G:
                raise ValueError(f"group id {int(self.groups.max())} has no key ({G} group keys)")
            shape = (G, self.net.shape[1])
            if self.group_net is None:
                self.group_net, self.group_square = np.zeros(shape), np.zeros(shape)
            if self.group_net.shape != shape or self.group_square is None or self.group_square.shape != shape:
                raise ValueError(f"group sums must have shape {shape}")
        by_label = [v is None for v in (self.pos_net, self.neg_net, self.n_pos, self.n_neg)]
        if any(by_label) and not all(by_label):
            raise ValueError("pos_net, neg_net, n_pos and n_neg come together (zeros(..., by_label=True))")
        if self.pos_net is not None and not (self.pos_net.shape == self.neg_net.shape == self.net.shape
                                             and self.n_pos.shape == self.n_neg.shape == self.net.shape[1:]):
            raise ValueError("label-split sums must have the [P, C] and [C] shapes of net")

    @classmethod
    def zeros(cls, n_patterns: int, n_findings: int, groups: np.ndarray | None = None,
              group_keys: Sequence[tuple[str, str]] | None = None, by_label: bool = False) -> "EvidenceSums":
        """Empty sums; `groups`/`group_keys` as `label_groups` returns them; `by_label`: also split the
        sums by the images' finding labels (then `add` needs the labels), for `separation`."""
        z = np.zeros((n_patterns, n_findings))
        g = None if groups is None else np.asarray(groups, dtype=np.int64)
        keys = None if group_keys is None else list(group_keys)
        split = dict(pos_net=z.copy(), neg_net=z.copy(), n_pos=np.zeros(n_findings, dtype=np.int64),
                     n_neg=np.zeros(n_findings, dtype=np.int64)) if by_label else {}
        return cls(z, z.copy(), np.zeros((n_patterns, n_findings), dtype=np.int64), z.copy(), groups=g,
                   group_keys=keys, **split)

    def add(self, contributions: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Accumulate a batch of decompositions: contributions [B, P, C], and with label-split sums the
        images' labels [B, C] (1, 0 or NaN = unknown)."""
        if self.pos_net is not None:
            if labels is None or np.shape(labels) != (contributions.shape[0], contributions.shape[2]):
                raise ValueError(f"these sums are split by label: pass labels of shape "
                                 f"{(contributions.shape[0], contributions.shape[2])}")
            pos, neg = (np.asarray(labels) == 1).astype(float), (np.asarray(labels) == 0).astype(float)
            self.pos_net += np.einsum("bpc,bc->pc", contributions, pos)
            self.neg_net += np.einsum("bpc,bc->pc", contributions, neg)
            self.n_pos += pos.sum(0).astype(np.int64)
            self.n_neg += neg.sum(0).astype(np.int64)
        self.net += contributions.sum(0)
        self.magnitude += np.abs(contributions).sum(0)
        self.n_active += (contributions != 0).sum(0)
        self.square += (contributions ** 2).sum(0)
        self.n_images += contributions.shape[0]
        if self.groups is not None and len(self.group_net):
            member = self.groups >= 0
            per_image = np.zeros((contributions.shape[0], len(self.group_net), contributions.shape[2]))
            np.add.at(per_image, (slice(None), self.groups[member]), contributions[:, member])  # [B, G, C]
            self.group_net += per_image.sum(0)
            self.group_square += (per_image ** 2).sum(0)

    def merge(self, other: "EvidenceSums") -> None:
        """Add sums accumulated over other images (another block of pages, another rank)."""
        if (self.groups is None) != (other.groups is None) or (self.groups is not None and (
                not np.array_equal(self.groups, other.groups) or self.group_keys != other.group_keys)):
            raise ValueError("cannot merge evidence sums accumulated with different pattern groups")
        self.net += other.net
        self.magnitude += other.magnitude
        self.n_active += other.n_active
        self.square += other.square
        self.n_images += other.n_images
        if self.groups is not None:
            self.group_net += other.group_net
            self.group_square += other.group_square
        if (self.pos_net is None) != (other.pos_net is None):
            raise ValueError("cannot merge evidence sums split by label with sums that are not")
        if self.pos_net is not None:
            self.pos_net += other.pos_net
            self.neg_net += other.neg_net
            self.n_pos += other.n_pos
            self.n_neg += other.n_neg

    def separation(self) -> np.ndarray:
        """[P, C] mean term over positive images minus mean term over negative ones (logit units): how
        much of the margin between the classes the pattern supplies. Unlike the swing it has a
        direction, and a term that varies without separating anything (cancelled elsewhere, or
        unrelated to the label) scores near 0. NaN where a class has no image."""
        if self.pos_net is None:
            raise ValueError("these evidence sums were accumulated without labels (zeros(..., by_label=True))")
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where((self.n_pos > 0) & (self.n_neg > 0), self.pos_net / self.n_pos - self.neg_net / self.n_neg,
                            np.nan)

    def swing(self) -> np.ndarray:
        """[P, C] standard deviation over images of the pattern's term (logit units): how much the
        pattern moves the logit from one image to the next. A pattern that fires on every image with
        the same push acts as a bias and swings nothing; a shortcut that pushes only when its nuisance
        is present swings a lot."""
        return _std(self.square, self.net, self.n_images)

    def group_swing(self) -> np.ndarray:
        """[G, C] standard deviation over images of each group's summed term. A nuisance the ensemble
        splits over many patterns (an image-wide artifact often is) swings the logit through all of them
        together; its members' single swings would each look small."""
        if self.groups is None:
            raise ValueError("these evidence sums were accumulated without pattern groups")
        return _std(self.group_square, self.group_net, self.n_images)


def _std(square: np.ndarray, total: np.ndarray, n_images: int) -> np.ndarray:
    n = max(n_images, 1)
    return np.sqrt(np.maximum(square / n - (total / n) ** 2, 0.0))


def label_groups(labels: pd.DataFrame, n_patterns: int,
                 categories: Sequence[str] = NUISANCE_CATEGORIES) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Group the patterns of `categories` by their (normalised) label: ([P] group id or -1, and the
    (label, category) of each group). `labels` is indexed by pattern_id with columns label and category.
    Unresolved patterns stay out of every group: sharing "unresolved pattern" says nothing in common."""
    from sae_cxr.labeling.base import UNRESOLVED

    groups = np.full(n_patterns, -1, dtype=np.int64)
    keys: dict[tuple[str, str], int] = {}
    for pid, row in labels.iterrows():
        if (row["category"] not in categories or not isinstance(row["label"], str) or row["label"] == UNRESOLVED
                or not 0 <= int(pid) < n_patterns):
            continue
        key = (" ".join(row["label"].lower().split()), row["category"])
        groups[int(pid)] = keys.setdefault(key, len(keys))
    return groups, list(keys)


@dataclass
class FindingAudit:
    """Evidence on one finding over the images of some splits."""

    finding: str
    n_images: int
    total_evidence: float
    """Sum over images and patterns of |contribution| (logit units)."""
    nuisance_share: float
    """Share of total_evidence carried by patterns whose category is device or artifact."""
    patterns: pd.DataFrame
    """Device/artifact patterns, largest swing first: pattern_id, label, category, swing (std over images
    of the pattern's term), mean (mean term), evidence (sum of |contribution|), share (evidence /
    total_evidence), n_active, separation (mean term on positives minus on negatives; NaN when the
    sums carry no labels)."""
    groups: pd.DataFrame | None = None
    """The same patterns grouped by label, largest group swing first: label, category, n_patterns,
    pattern_ids, swing (std over images of the group's summed term), mean, evidence, share, separation
    (the sum of its patterns'). None when the sums were accumulated without groups."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.nuisance_share <= 1.0 + 1e-9:
            raise ValueError(f"nuisance share {self.nuisance_share} outside [0, 1]")


def audit_finding(sums: EvidenceSums, c: int, labels: pd.DataFrame, finding: str,
                  categories: Sequence[str] = NUISANCE_CATEGORIES) -> FindingAudit:
    """Audit finding column c. `labels` is indexed by pattern_id with columns label and category; label
    groups are reported when the sums were accumulated with them.

    Patterns are ranked by their swing, not by summed magnitudes: a marker present on every image
    with the same push shifts every logit alike (it is part of the baseline, it separates nothing),
    while a shortcut moves the logit exactly on the images that carry its nuisance."""
    P = sums.net.shape[0]
    n = max(sums.n_images, 1)
    sep = sums.separation()[:, c] if sums.pos_net is not None else np.full(P, np.nan)
    ev = pd.DataFrame({"swing": sums.swing()[:, c], "mean": sums.net[:, c] / n, "evidence": sums.magnitude[:, c],
                       "n_active": sums.n_active[:, c], "separation": sep}, index=pd.RangeIndex(P, name="pattern_id"))
    total = float(ev["evidence"].sum())
    ev = ev.join(labels[["label", "category"]], how="left")
    ev["category"] = ev["category"].fillna("unlabelled")
    nuis = ev[ev["category"].isin(categories) & (ev["evidence"] > 0)].copy()
    nuis["share"] = nuis["evidence"] / total if total > 0 else 0.0
    nuis = nuis.iloc[np.argsort(-nuis["swing"].to_numpy(), kind="stable")]
    share = float(nuis["evidence"].sum() / total) if total > 0 else 0.0
    grouped = None
    if sums.groups is not None:
        gs = sums.group_swing()[:, c]
        rows = []
        for g, (label, category) in enumerate(sums.group_keys):
            ids = np.flatnonzero(sums.groups == g)
            evid = float(sums.magnitude[ids, c].sum())
            if evid <= 0:
                continue
            rows.append({"label": label, "category": category, "n_patterns": len(ids), "pattern_ids": ids.tolist(),
                         "swing": float(gs[g]), "mean": float(sums.group_net[g, c] / n), "evidence": evid,
                         "share": evid / total if total > 0 else 0.0, "separation": float(np.sum(sep[ids]))})
        grouped = pd.DataFrame(rows, columns=["label", "category", "n_patterns", "pattern_ids", "swing", "mean",
                                              "evidence", "share", "separation"])
        grouped = grouped.iloc[np.argsort(-grouped["swing"].to_numpy(), kind="stable")].reset_index(drop=True)
    return FindingAudit(finding=finding, n_images=sums.n_images, total_evidence=total, nuisance_share=share,
                        patterns=nuis.reset_index()[["pattern_id", "label", "category", "swing", "mean", "evidence",
                                                     "share", "n_active", "separation"]], groups=grouped)


@dataclass
class RunAudit:
    splits: tuple[str, ...]
    findings: dict[str, FindingAudit] = field(default_factory=dict)

    def ranked(self) -> list[FindingAudit]:
        """Findings by the share of their evidence carried by device/artifact patterns."""
        return sorted(self.findings.values(), key=lambda a: -a.nuisance_share)


def label_table(run: RunDir) -> pd.DataFrame:
    """pattern_id -> label, category from labels.jsonl."""
    from sae_cxr.labeling.stage import load_labels

    labels = load_labels(run)
    lab = pd.DataFrame([{"pattern_id": p, "label": l.label, "category": l.category} for p, l in labels.items()],
                       columns=["pattern_id", "label", "category"])
    return lab.set_index("pattern_id")


@dataclass
class SplitDecompositions:
    """The valid images of some splits, ready to be decomposed batch by batch (for the audit's sums and
    the nuisance contrasts alike)."""

    records: list[Any]  # the images' records, in order
    labels: np.ndarray  # [N, C] 1, 0 or NaN
    x: np.ndarray  # [N, d_in] classifier inputs
    attributor: Any  # sae_cxr.attribution.Attributor
    batch_size: int = 512

    def batches(self) -> Iterator[tuple[slice, Any]]:
        """(positions in `records`, AttributionBatch) per batch."""
        for s in range(0, len(self.records), self.batch_size):
            sl = slice(s, s + self.batch_size)
            yield sl, self.attributor.decompose(self.x[sl])


def split_decompositions(run: RunDir, splits: Sequence[str], batch_size: int = 512) -> SplitDecompositions:
    """The valid images of `splits` with the run's attributor; raises when the splits hold none."""
    from sae_cxr.attribution import Attributor
    from sae_cxr.classifier import load_head
    from sae_cxr.extract import EmbeddingStore
    from sae_cxr.ingest import open_run_dataset
    from sae_cxr.patterns import load_patterns
    from sae_cxr.transcoders.stage import load_ensemble

    ds = open_run_dataset(run)
    store = EmbeddingStore(run)
    rows = np.array([i for i, r in enumerate(ds.records) if r.split in splits and store.valid[i]], dtype=np.int64)
    if len(rows) == 0:
        raise ValueError(f"no images to audit in split(s) {list(splits)} of {run.path}; "
                         f"splits present: {ds.split_counts()}")
    _, arrays = load_patterns(run)
    attr = Attributor(load_ensemble(run), load_head(run), arrays["latent_pattern"])
    records = [ds.records[i] for i in rows]
    labels = np.stack([r.labels for r in records]).astype(np.float64)
    return SplitDecompositions(records, labels, store.features()[rows], attr, batch_size)


def empty_evidence_sums(n_patterns: int, labels: pd.DataFrame | None = None) -> EvidenceSums:
    """Zero sums for `n_patterns` patterns, grouped per device/artifact label when `labels` (as
    `label_table` returns them) is given."""
    groups, keys = label_groups(labels, n_patterns) if labels is not None else (None, None)
    return EvidenceSums.zeros(n_patterns, len(FINDINGS), groups=groups, group_keys=keys, by_label=True)


def evidence_sums(run: RunDir, splits: Sequence[str], batch_size: int = 512,
                  labels: pd.DataFrame | None = None) -> EvidenceSums:
    """Full decompositions of every valid image of `splits`, summed per pattern and finding, and per
    label group of device/artifact patterns when `labels` is given."""
    data = split_decompositions(run, splits, batch_size)
    sums = empty_evidence_sums(data.attributor.n_patterns, labels)
    for sl, batch in data.batches():
        sums.add(batch.contributions, data.labels[sl])
    return sums


def audit_from_sums(sums: EvidenceSums, labels: pd.DataFrame, splits: Sequence[str]) -> RunAudit:
    """The audit of every finding from its accumulated sums."""
    out = RunAudit(splits=tuple(splits))
    for c, finding in enumerate(FINDINGS):
        out.findings[finding] = audit_finding(sums, c, labels, finding)
    return out


def audit_run(run: RunDir, splits: Sequence[str] = ("test",)) -> RunAudit:
    """The audit of every finding of a labelled run, over the images of `splits`."""
    labels = label_table(run)
    return audit_from_sums(evidence_sums(run, splits, labels=labels), labels, splits)


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


def shortcut_label(labels: pd.DataFrame, n_patterns: int, truth_ids: np.ndarray,
                   categories: Sequence[str] = NUISANCE_CATEGORIES) -> str | None:
    """The device/artifact label (normalised, as `label_groups` keys it) holding the most true shortcut
    patterns (ties: the label met first in pattern order); None when no label holds one."""
    groups, keys = label_groups(labels, n_patterns, categories)
    hits = [int(np.isin(np.flatnonzero(groups == g), truth_ids).sum()) for g in range(len(keys))]
    return keys[int(np.argmax(hits))][0] if hits and max(hits) else None


def shortcut_group_rank(audit: FindingAudit, truth_ids: np.ndarray, by: str = "swing") -> int | None:
    """1-based rank, among the finding's device/artifact label groups ordered by `by` (swing, as the
    audit ranks them, or separation), of the group holding the most true shortcut patterns (ties: the
    higher ranked); None when no group holds one."""
    if audit.groups is None:
        raise ValueError("this audit was computed without label groups")
    groups = audit.groups
    if by != "swing":
        groups = groups.iloc[np.argsort(-groups[by].fillna(-np.inf).to_numpy(), kind="stable")]
    hits = np.array([np.isin(ids, truth_ids).sum() for ids in groups["pattern_ids"]], dtype=np.int64)
    if not len(hits) or hits.max() == 0:
        return None
    return int(np.argmax(hits)) + 1
