"""Verification: does a label separate a pattern's held-out activating images from the rest?

Any labeler's label can be checked by any judge. A judge is anything with
`verify(label, description, activating, non_activating) -> Verification`:

- `TextJudge` (offline): the image-text cosine against a per-label threshold, on image embeddings;
- `sae_cxr.labeling.lmm.LMMLabeler` (a multimodal model), on PNG bytes.

The score is BALANCED accuracy over held-out ACTIVATING images (the pattern's top images on a split
that was not used to label it) and NON-activating images (random images where it does not fire).
CXR-LanIC's sibling code keeps a name when its yes-rate on activating images alone is >= 0.7; a
label that says yes to every radiograph passes that and scores 0.5 here. Labels below the
threshold (default 0.7) are FLAGGED, not dropped.

Text-judge calibration: the cosine that counts as "applies" differs per label (some phrases sit
closer to all images than others), so a threshold is fitted ONCE PER LABEL on the LABELLING split
(the split the labeler saw): with method "youden" it maximises TPR - FPR (= balanced accuracy) on
that split's activating vs non-activating images, taking the middle of the best interval; with
"midpoint" it is halfway between the two groups' mean cosines. The held-out split is only voted
on, never used to fit, so the verification score is not optimistically biased; `calibrate_and_verify`
refuses overlapping labelling and held-out image ids.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from sae_cxr.labeling.base import JudgeVote, PatternLabel, Verification, verification_from_votes
from sae_cxr.labeling.text import encode_phrases


class Judge(Protocol):
    """Anything that judges a label on activating and non-activating images (TextJudge, LMMLabeler)."""

    def verify(self, label: str, description: str, activating: Sequence[Any],
               non_activating: Sequence[Any]) -> Verification: ...


@dataclass
class VerifyConfig:
    """Which held-out images are judged and when a label is flagged."""

    threshold: float = 0.7
    """Labels with balanced accuracy below this are flagged."""
    n_pos: int = 50
    """Activating images judged: the pattern's strongest on the held-out split."""
    n_neg: int = 50
    """Non-activating images judged: drawn at random among those where the pattern does not fire."""
    fire_threshold: float = 0.0
    """An image activates the pattern when its activation exceeds this."""
    seed: int = 0
    """Seed of the random draw of non-activating images (verification is reproducible)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be a balanced accuracy in [0, 1], got {self.threshold}")
        if self.n_pos < 1 or self.n_neg < 1:
            raise ValueError(f"n_pos ({self.n_pos}) and n_neg ({self.n_neg}) must be >= 1")


def select_images(activations: Any, n_pos: int, n_neg: int, fire_threshold: float = 0.0,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the n_pos strongest activating images, n_neg random non-activating ones)."""
    a = np.asarray(activations, dtype=np.float64).reshape(-1)
    firing = np.flatnonzero(a > fire_threshold)
    quiet = np.flatnonzero(~(a > fire_threshold))
    if len(firing) == 0 or len(quiet) == 0:
        raise ValueError(f"verification needs activating and non-activating images; the pattern fires on "
                         f"{len(firing)} of {len(a)}")
    pos = firing[np.argsort(-a[firing], kind="stable")][:n_pos]
    rng = np.random.default_rng(seed)
    neg = np.sort(rng.choice(quiet, size=min(n_neg, len(quiet)), replace=False))
    return pos, neg


def verify(label: PatternLabel, judge: Judge, activating: Sequence[Any], non_activating: Sequence[Any],
           threshold: float = 0.7) -> tuple[PatternLabel, Verification]:
    """Judge `label` on held-out images; return the label with its score and flag, and the votes.

    `activating`/`non_activating` are whatever the judge reads: embeddings for TextJudge, PNG bytes
    for LMMLabeler.
    """
    result = judge.verify(label.label, label.description, activating, non_activating)
    return label.with_verification(result.balanced_accuracy, threshold, result.details()), result


@dataclass
class TextJudgeConfig:
    """How the text tower judges whether a label applies to an image."""

    template: str = "{}"
    """Prompt template the label is wrapped in (use the text labeler's)."""
    method: str = "youden"
    """Threshold calibration: "youden" (max TPR - FPR on the labelling split) or "midpoint"."""

    def __post_init__(self) -> None:
        if self.method not in ("youden", "midpoint"):
            raise ValueError(f"method must be 'youden' or 'midpoint', got {self.method!r}")
        if "{}" not in self.template:
            raise ValueError(f"template must contain '{{}}', got {self.template!r}")


def youden_threshold(pos_scores: Any, neg_scores: Any) -> float:
    """The threshold maximising TPR - FPR for 'score >= threshold means applies'.

    Candidates are midpoints between consecutive distinct scores (plus one below and one above all);
    among equally good ones the middle candidate is taken, so the threshold sits inside the gap.
    """
    pos = np.sort(np.asarray(pos_scores, dtype=np.float64))
    neg = np.sort(np.asarray(neg_scores, dtype=np.float64))
    if pos.size == 0 or neg.size == 0:
        raise ValueError("calibration needs scores of both activating and non-activating images")
    values = np.unique(np.concatenate([pos, neg]))
    cands = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    tpr = 1.0 - np.searchsorted(pos, cands, side="left") / pos.size  # share of pos >= t
    tnr = np.searchsorted(neg, cands, side="left") / neg.size  # share of neg < t
    j = tpr + tnr
    best = np.flatnonzero(j >= j.max() - 1e-12)
    return float(cands[best[len(best) // 2]])


@dataclass(frozen=True)
class Calibration:
    """A label's threshold and the labelling-split statistics it came from."""

    threshold: float
    spread: float  # scale of the vote confidence: half the gap between the group means (or their std)
    balanced_accuracy: float  # on the labelling split (optimistic by construction; for reference)
    n_pos: int
    n_neg: int


class TextJudge:
    """Judges labels with the text tower: applies iff cos(image, label text) >= a per-label threshold."""

    name = "text"

    def __init__(self, backbone: Any, config: TextJudgeConfig | None = None):
        self.backbone = backbone
        self.config = config or TextJudgeConfig()
        if not getattr(backbone, "has_text", False):
            raise ValueError(f"backbone {getattr(backbone, 'name', type(backbone).__name__)!r} has no text tower: "
                             "the text judge needs one; verify with an LMM judge instead")
        self._text: dict[str, np.ndarray] = {}
        self.calibrations: dict[str, Calibration] = {}

    def text_embedding(self, label: str) -> np.ndarray:
        if label not in self._text:
            self._text[label] = encode_phrases(self.backbone, [self.config.template.format(label)])[0]
        return self._text[label]

    def cosines(self, label: str, embeddings: Any) -> np.ndarray:
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"the text judge reads image embeddings [n, D]; got an array of shape {x.shape}")
        t = self.text_embedding(label)
        if x.shape[1] != t.shape[0]:
            raise ValueError(f"image embeddings have {x.shape[1]} dimensions, the text space {t.shape[0]}")
        norms = np.linalg.norm(x, axis=1)
        return (x @ t) / np.where(norms > 0, norms, 1.0)

    def calibrate(self, label: str, activating: Any, non_activating: Any) -> Calibration:
        """Fit `label`'s threshold on LABELLING-split embeddings (never the held-out ones)."""
        sp, sn = self.cosines(label, activating), self.cosines(label, non_activating)
        if sp.size == 0 or sn.size == 0:
            raise ValueError(f"calibrating {label!r} needs activating and non-activating images "
                             f"(got {sp.size} and {sn.size})")
        if self.config.method == "youden":
            thr = youden_threshold(sp, sn)
        else:
            thr = float((sp.mean() + sn.mean()) / 2)
        gap = abs(sp.mean() - sn.mean()) / 2
        spread = float(gap if gap > 1e-9 else max(np.concatenate([sp, sn]).std(), 1e-6))
        ba = ((sp >= thr).mean() + (sn < thr).mean()) / 2
        cal = Calibration(threshold=thr, spread=spread, balanced_accuracy=float(ba), n_pos=sp.size, n_neg=sn.size)
        self.calibrations[label] = cal
        return cal

    def votes(self, label: str, embeddings: Any) -> list[JudgeVote]:
        cal = self.calibrations.get(label)
        if cal is None:
            raise ValueError(f"label {label!r} has no calibrated threshold: call TextJudge.calibrate on the "
                             "labelling split first (calibrating on the held-out images would leak them)")
        out = []
        for c in self.cosines(label, embeddings):
            out.append(JudgeVote(applies=bool(c >= cal.threshold),
                                 confidence=float(min(1.0, abs(c - cal.threshold) / cal.spread)),
                                 raw=json.dumps({"cosine": round(float(c), 6), "threshold": round(cal.threshold, 6)})))
        return out

    def verify(self, label: str, description: str, activating: Any, non_activating: Any) -> Verification:
        """Vote on held-out embeddings with the label's calibrated threshold (description is unused)."""
        return verification_from_votes(self.votes(label, activating), self.votes(label, non_activating),
                                       judge=self.name)


def calibrate_and_verify(label: PatternLabel, judge: TextJudge,
                         labelling_embeddings: Any, labelling_activations: Any,
                         heldout_embeddings: Any, heldout_activations: Any,
                         config: VerifyConfig | None = None,
                         labelling_ids: Sequence[str] | None = None,
                         heldout_ids: Sequence[str] | None = None) -> tuple[PatternLabel, Verification]:
    """The text-judge protocol in one call: calibrate on the labelling split, verify on the held-out one.

    Activating images are each split's strongest firing ones, non-activating ones a seeded random
    draw among those where the pattern does not fire. With ids given, an image in both splits is an
    error: a held-out set that overlaps the calibration set would inflate the score.
    """
    cfg = config or VerifyConfig()
    if labelling_ids is not None and heldout_ids is not None:
        shared = set(map(str, labelling_ids)) & set(map(str, heldout_ids))
        if shared:
            raise ValueError(f"{len(shared)} image(s) are in both the labelling and the held-out split "
                             f"(e.g. {sorted(shared)[:3]}); verify on images the labeler did not see")
    xl, xh = np.asarray(labelling_embeddings), np.asarray(heldout_embeddings)
    lp, ln = select_images(labelling_activations, cfg.n_pos, cfg.n_neg, cfg.fire_threshold, cfg.seed)
    judge.calibrate(label.label, xl[lp], xl[ln])
    hp, hn = select_images(heldout_activations, cfg.n_pos, cfg.n_neg, cfg.fire_threshold, cfg.seed + 1)
    labelled, result = verify(label, judge, xh[hp], xh[hn], cfg.threshold)
    cal = judge.calibrations[label.label]
    details = {**labelled.evidence["verification"], "calibration": {**asdict(cal), "method": judge.config.method}}
    return labelled.with_verification(result.balanced_accuracy, cfg.threshold, details), result
