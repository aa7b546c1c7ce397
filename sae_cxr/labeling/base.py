"""What every labeler produces and every judge returns: labels, votes, verifications, labels.jsonl.

The evidence, text and LMM labelers all return a `PatternLabel`; any judge (the text tower or an
LMM) scores it with a `Verification`. Keeping these in one module lets any labeler be verified by
either judge, and lets labels.jsonl hold labels from every labeler in one format.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from sae_cxr.findings import CATEGORIES

LABELERS: tuple[str, ...] = ("evidence", "text", "lmm")
"""The labelers whose names a PatternLabel may carry."""

UNRESOLVED = "unresolved pattern"
"""The label text of a pattern that no labeler could name honestly."""


@dataclass(frozen=True)
class PatternLabel:
    """A pattern's human-readable name, as one labeler proposes it, with the evidence behind it.

    `verification` is a judge's balanced accuracy on held-out images (None until verified);
    `flagged` marks a label whose verification fell below the threshold: it is kept and shown
    with a warning, never hidden, so a reader can see what the labeler proposed and why it failed.
    """

    label: str
    description: str
    category: str  # one of sae_cxr.findings.CATEGORIES
    confidence: float  # the labeler's own confidence in [0, 1]
    labeler: str  # "evidence", "text", "lmm" (LABELERS), or another labeler's name
    raw: str = ""  # an LMM's reply the label was parsed from, kept for audit ("" for offline labelers)
    pattern_id: int | str | None = None
    verification: float | None = None  # balanced accuracy of a judge, in [0, 1]
    flagged: bool = False  # verification below threshold (flagged, not hidden)
    evidence: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        where = f"label of pattern {self.pattern_id}" if self.pattern_id is not None else "label"
        if self.category not in CATEGORIES:
            raise ValueError(f"{where}: category must be one of {', '.join(CATEGORIES)}; got {self.category!r}")
        if isinstance(self.confidence, bool) or not (isinstance(self.confidence, (int, float))
                                                     and 0.0 <= float(self.confidence) <= 1.0):
            raise ValueError(f"{where}: confidence must be a number in [0, 1], got {self.confidence!r}")
        object.__setattr__(self, "confidence", float(self.confidence))
        if self.verification is not None:
            v = self.verification
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{where}: verification must be a balanced accuracy in [0, 1] or None, got {v!r}")
            object.__setattr__(self, "verification", float(v))
        if not isinstance(self.labeler, str) or not self.labeler:
            raise ValueError(f"{where}: labeler must name the labeler (one of {', '.join(LABELERS)}), "
                             f"got {self.labeler!r}")
        if not isinstance(self.label, str) or not self.label.strip():
            raise ValueError(f"{where}: label must be a non-empty string, got {self.label!r}")
        if isinstance(self.pattern_id, (np.integer,)):
            object.__setattr__(self, "pattern_id", int(self.pattern_id))

    @property
    def unresolved(self) -> bool:
        return self.label == UNRESOLVED

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["evidence"] = _jsonable(self.evidence)
        return d

    def to_json(self) -> str:
        """One line of labels.jsonl (strict JSON: NaN and infinities become null)."""
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> "PatternLabel":
        """Inverse of `to_json`; unknown keys are an error so a schema drift is caught, not ignored."""
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"a labels.jsonl line is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError("a labels.jsonl line must be a JSON object")
        known = {f.name for f in fields(cls)}
        extra = sorted(set(obj) - known)
        if extra:
            raise ValueError(f"labels.jsonl line has unknown key(s) {extra}; known keys: {sorted(known)}")
        missing = [k for k in ("label", "description", "category", "confidence") if k not in obj]
        if missing:
            raise ValueError(f"labels.jsonl line lacks key(s) {missing}")
        return cls(**obj)

    def with_verification(self, score: float, threshold: float,
                          details: dict[str, Any] | None = None) -> "PatternLabel":
        """A copy carrying a judge's balanced accuracy, flagged when it falls below `threshold`."""
        evidence = dict(self.evidence)
        if details is not None:
            evidence["verification"] = {**details, "threshold": threshold}
        return replace(self, verification=float(score), flagged=bool(score < threshold), evidence=evidence)


def _jsonable(obj: Any) -> Any:
    """Numpy scalars to Python, non-finite floats to None, tuples to lists (recursively)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def write_labels(path: str | os.PathLike, labels: Iterable[PatternLabel]) -> Path:
    """Write labels.jsonl atomically (one label per line), so an interrupted stage leaves no half file."""
    from sae_cxr.run import write_bytes_atomic

    text = "".join(lab.to_json() + "\n" for lab in labels)
    write_bytes_atomic(path, text.encode("utf-8"))
    return Path(path)


def read_labels(path: str | os.PathLike) -> list[PatternLabel]:
    """Read labels.jsonl; a bad line raises an error naming the file and line number."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                out.append(PatternLabel.from_json(line))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path} line {n}: {e}") from None
    return out


@dataclass(frozen=True)
class JudgeVote:
    """Whether a label applies to one image, with the judge's confidence."""

    applies: bool
    confidence: float
    raw: str = ""


@dataclass(frozen=True)
class Verification:
    """How well a label separates held-out activating from non-activating images."""

    balanced_accuracy: float
    true_positive_rate: float  # yes-rate on activating images (CXR-LanIC's sole criterion)
    true_negative_rate: float  # no-rate on non-activating images
    votes_pos: tuple[JudgeVote, ...] = field(repr=False)
    votes_neg: tuple[JudgeVote, ...] = field(repr=False)
    judge: str = ""  # which judge voted ("text", "lmm", ...)

    def details(self) -> dict[str, Any]:
        """The summary kept in a label's evidence (votes themselves are not stored)."""
        return {"judge": self.judge, "balanced_accuracy": self.balanced_accuracy,
                "true_positive_rate": self.true_positive_rate, "true_negative_rate": self.true_negative_rate,
                "n_pos": len(self.votes_pos), "n_neg": len(self.votes_neg)}


def balanced_accuracy(votes_pos: Sequence[JudgeVote | bool], votes_neg: Sequence[JudgeVote | bool]) -> float:
    """Mean of the yes-rate on activating images and the no-rate on non-activating ones.

    Both sides are needed: a label that says yes to everything scores 0.5, not 1.0.
    """
    return vote_rates(votes_pos, votes_neg)[0]


def vote_rates(votes_pos: Sequence[JudgeVote | bool],
               votes_neg: Sequence[JudgeVote | bool]) -> tuple[float, float, float]:
    """(balanced accuracy, true positive rate, true negative rate) of a judge's votes."""
    if not votes_pos or not votes_neg:
        raise ValueError(f"balanced accuracy needs votes on both activating ({len(votes_pos)}) and "
                         f"non-activating ({len(votes_neg)}) images")
    yes = [v.applies if isinstance(v, JudgeVote) else bool(v) for v in votes_pos]
    no = [not (v.applies if isinstance(v, JudgeVote) else bool(v)) for v in votes_neg]
    tpr = sum(yes) / len(yes)
    tnr = sum(no) / len(no)
    return (tpr + tnr) / 2, tpr, tnr


def verification_from_votes(votes_pos: Sequence[JudgeVote], votes_neg: Sequence[JudgeVote],
                            judge: str = "") -> Verification:
    ba, tpr, tnr = vote_rates(votes_pos, votes_neg)
    return Verification(balanced_accuracy=ba, true_positive_rate=tpr, true_negative_rate=tnr,
                        votes_pos=tuple(votes_pos), votes_neg=tuple(votes_neg), judge=judge)
