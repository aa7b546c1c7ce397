"""The attribution stage's output for one (image, finding): what every downstream reader consumes.

This module holds only the data types, so the attribution stage (which builds them), the
explanation stage, reports and the dashboard can all import them without an import cycle.

The exact identity behind a `Decomposition` (DESIGN.md, "Exact attribution"):

    sum(contribution of ALL active patterns) + unassigned + skip + bias + error == logit

to float tolerance, for every image and finding. `patterns` holds only the REPORTED patterns
(ranked by |contribution|), so the reported contributions alone need not close the identity:
`unreported` is what the active patterns that were not reported add up to.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from sae_cxr.findings import CATEGORIES, canonical_finding


class AttributionFormatError(ValueError):
    """A serialised decomposition that cannot be read back (missing key, wrong type, bad value)."""


@dataclass
class PatternEvidence:
    """One pattern's part in one prediction."""

    pattern_id: int
    contribution: float
    """Additive term of the finding's logit (mean over ensemble members); > 0 pushes towards the finding."""
    activation: float
    """The pattern's activation on this image (mean of its member latents)."""
    label: str | None = None
    """The pattern's name from a labeler; None while unnamed."""
    category: str | None = None
    """One of findings.CATEGORIES; None while unknown."""
    description: str | None = None
    verification: float | None = None
    """The label's verification score (balanced accuracy); None if never verified."""
    flagged: bool = False
    """True when the label failed verification (the name is tentative)."""
    location: str | None = None
    """Where the pattern's spatial map peaks, e.g. "right lower zone"; None without a map."""
    share: float = 0.0
    """|contribution| / sum of |contribution| over all active patterns of this prediction, in [0, 1]."""
    merged_ids: tuple[int, ...] = ()
    """When several patterns with the same name are cited as one item: all their ids (strongest first)."""

    def __post_init__(self) -> None:
        self.pattern_id = int(self.pattern_id)
        self.merged_ids = tuple(int(i) for i in self.merged_ids)
        self.contribution = float(self.contribution)
        self.activation = float(self.activation)
        self.share = float(self.share)
        if not math.isfinite(self.contribution):
            raise ValueError(f"pattern {self.pattern_id}: contribution must be finite, got {self.contribution}")
        if not (0.0 <= self.share <= 1.0 + 1e-9):
            raise ValueError(f"pattern {self.pattern_id}: share must lie in [0, 1], got {self.share} "
                             "(share = |contribution| / sum of |contributions| of the prediction)")
        if self.category is not None and self.category not in CATEGORIES:
            raise ValueError(f"pattern {self.pattern_id}: unknown category {self.category!r}; "
                             f"expected one of: {', '.join(CATEGORIES)} (or None)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PatternEvidence":
        return _build(cls, d, "pattern evidence")


@dataclass
class Decomposition:
    """The exact decomposition of one finding's logit on one image.

    Identity (checked by the attribution stage's tests):
        sum(contributions of ALL active patterns) + unassigned + skip + bias + error == logit
    `patterns` are the reported ones, ranked by |contribution| (largest first). Every field is
    required: an exact decomposition has no sensible defaults.
    """

    record_id: str
    finding: str
    logit: float
    probability: float
    label: float | None
    """Ground truth: 1.0, 0.0, or None/NaN when unknown."""
    patterns: list[PatternEvidence]
    unassigned: float
    """Summed contribution of active latents that belong to no pattern."""
    skip: float
    """The transcoders' skip path (W2 . W_skip x), 0 without one."""
    bias: float
    """W2 . b_dec + b2: the part of the logit that does not depend on the image."""
    error: float
    """W2 . (h - h_hat): what the transcoders fail to reconstruct."""
    n_active_patterns: int
    """How many patterns are active on this image (the reported ones are the top of them)."""
    coverage: float
    """Share of the |evidence| (sum of |contribution| over active patterns) the reported patterns explain."""

    def __post_init__(self) -> None:
        self.record_id = str(self.record_id)
        self.finding = canonical_finding(self.finding)
        self.logit = float(self.logit)
        self.probability = float(self.probability)
        if not math.isfinite(self.logit):
            raise ValueError(f"{self.record_id}/{self.finding}: logit must be finite, got {self.logit}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"{self.record_id}/{self.finding}: probability must lie in [0, 1], got {self.probability}")
        if self.label is not None:
            self.label = float(self.label)
            if math.isnan(self.label):
                self.label = None
            elif self.label not in (0.0, 1.0):
                raise ValueError(f"{self.record_id}/{self.finding}: label must be 1, 0 or None (unknown), "
                                 f"got {self.label}")
        self.patterns = [p if isinstance(p, PatternEvidence) else PatternEvidence.from_dict(p) for p in self.patterns]
        for name in ("unassigned", "skip", "bias", "error", "coverage"):
            setattr(self, name, float(getattr(self, name)))
        self.n_active_patterns = int(self.n_active_patterns)

    @property
    def unreported(self) -> float:
        """Summed contribution of the active patterns not in `patterns` (closes the identity)."""
        reported = sum(p.contribution for p in self.patterns)
        return self.logit - (reported + self.unassigned + self.skip + self.bias + self.error)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["label"] is not None and math.isnan(d["label"]):
            d["label"] = None  # NaN is not JSON
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Decomposition":
        if not isinstance(d, Mapping):
            raise AttributionFormatError(f"a decomposition must be a JSON object, got {type(d).__name__}")
        raw = dict(d)
        patterns = raw.get("patterns", [])
        if not isinstance(patterns, list):
            raise AttributionFormatError(f"decomposition {raw.get('record_id')!r}: 'patterns' must be a list")
        raw["patterns"] = [PatternEvidence.from_dict(p) for p in patterns]
        return _build(cls, raw, "decomposition")


def _build(cls: type, d: Mapping[str, Any], what: str) -> Any:
    """Construct a dataclass from a dict, turning every problem into one actionable error."""
    if not isinstance(d, Mapping):
        raise AttributionFormatError(f"a {what} must be a JSON object, got {type(d).__name__}")
    names = set(cls.__dataclass_fields__)
    unknown = sorted(set(d) - names)
    if unknown:
        raise AttributionFormatError(f"{what} has unknown keys {unknown}; expected a subset of {sorted(names)}")
    try:
        return cls(**d)
    except TypeError as e:
        raise AttributionFormatError(f"{what} is missing a required key or has a wrong type ({e}); "
                                     f"got keys {sorted(d)}") from None
    except ValueError as e:
        raise AttributionFormatError(f"{what} holds a bad value: {e}") from None
