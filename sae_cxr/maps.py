"""Spatial maps of patterns and their localization against ground-truth boxes.

Pattern map (default): the pattern's encoder response to the patch tokens. Patch tokens live in
the embedding space on the embedding's scale, so for patch t the map is the member mean of
W_enc[e, j] . t over the pattern's latents: for the phantom backbone, whose embedding is the mean
of its patch tokens, the encoder pre-activation on the image is exactly the mean of this map plus
the bias, so the map says where the pattern's input comes from.
Gradient map (alternative): Grad-CAM of the pattern's (pre-TopK) activation on the backbone's last
spatial feature map. Baseline: Grad-CAM of the classifier logit for the finding.

Localization metrics (per map and box set, maps upsampled to the image):
- pointing game: the map's maximum falls inside a box of the label;
- IoBB hit at T (ChestX-ray8): threshold the map at half its maximum, take the bounding box of the
  largest connected region, IoBB = area(pred box ∩ GT box) / area(pred box); hit if IoBB >= T;
- pixel AUPRC: average precision of map values against the union-of-boxes mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sae_cxr.backbones.base import Letterbox
from sae_cxr.data.base import Box

IOBB_THRESHOLDS = (0.1, 0.25, 0.5)


def pattern_patch_maps(W_enc: np.ndarray, members: Sequence[tuple[int, int]], patches: np.ndarray,
                       n_members: int) -> np.ndarray:
    """Map [B, P] of one pattern on patch tokens [B, P, D_img]: (1/E) sum over its latents of W_enc . t.

    Only the image part of the encoder is used (multimodal x = [image, report]: the first D_img dims).
    """
    D = patches.shape[-1]
    e = np.array([a for a, _ in members])
    j = np.array([b for _, b in members])
    w = W_enc[e, j, :D].sum(axis=0) / n_members  # [D]
    return patches @ w


def pattern_target(W_enc: torch.Tensor, b_enc: torch.Tensor, members: Sequence[tuple[int, int]],
                   n_members: int, text: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A differentiable pattern score of the normalised image embedding: the member mean of
    relu(pre-activation) of its latents (TopK selection left out, so the score has a gradient)."""
    e = torch.tensor([a for a, _ in members])
    j = torch.tensor([b for _, b in members])
    W = W_enc[e, j].detach()
    b = b_enc[e, j].detach()

    def score(emb: torch.Tensor) -> torch.Tensor:
        x = emb if text is None else torch.cat([emb, text.to(emb)], dim=1)
        return torch.relu(x @ W.T + b).sum(1) / n_members

    return score


def logit_target(head, finding_index: int, text: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    def score(emb: torch.Tensor) -> torch.Tensor:
        x = emb if text is None else torch.cat([emb, text.to(emb)], dim=1)
        return head(x)[:, finding_index]

    return score


def to_image(grid_map: np.ndarray, lb: Letterbox, model_size: int) -> np.ndarray:
    """Upsample a [rows, cols] map over the model input to the source image [H, W], undoing the letterbox."""
    t = torch.from_numpy(np.asarray(grid_map, dtype=np.float32))[None, None]
    up = F.interpolate(t, size=(model_size, model_size), mode="bilinear", align_corners=False)[0, 0].numpy()
    x0, y0 = int(round(lb.pad_x)), int(round(lb.pad_y))
    w, h = int(round(lb.src_w * lb.scale)), int(round(lb.src_h * lb.scale))
    crop = up[y0:y0 + max(h, 1), x0:x0 + max(w, 1)]
    out = F.interpolate(torch.from_numpy(np.ascontiguousarray(crop))[None, None], size=(lb.src_h, lb.src_w),
                        mode="bilinear", align_corners=False)[0, 0].numpy()
    return out


def box_mask(boxes: Sequence[Box], shape: tuple[int, int]) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    for b in boxes:
        x0, y0 = int(np.floor(b.x)), int(np.floor(b.y))
        x1, y1 = int(np.ceil(b.x + b.w)), int(np.ceil(b.y + b.h))
        m[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
    return m


def pointing_game(heat: np.ndarray, boxes: Sequence[Box]) -> bool:
    """True if the map's maximum lies inside any box (ties: the first maximum in raster order)."""
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return any(b.x <= x + 0.5 <= b.x + b.w and b.y <= y + 0.5 <= b.y + b.h for b in boxes)


def predicted_box(heat: np.ndarray, rel_threshold: float = 0.5) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1, exclusive) of the largest connected region >= rel_threshold * max."""
    from scipy import ndimage

    top = float(heat.max())
    if not np.isfinite(top) or top <= 0:
        return None
    lab, n = ndimage.label(heat >= rel_threshold * top)
    if n == 0:
        return None
    sizes = ndimage.sum(np.ones_like(heat), lab, index=np.arange(1, n + 1))
    k = int(np.argmax(sizes)) + 1
    ys, xs = np.nonzero(lab == k)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def iobb(pred: tuple[int, int, int, int] | None, boxes: Sequence[Box]) -> float:
    """Best intersection over the PREDICTED box area against any ground-truth box (ChestX-ray8)."""
    if pred is None:
        return 0.0
    x0, y0, x1, y1 = pred
    area = max(x1 - x0, 0) * max(y1 - y0, 0)
    if area == 0:
        return 0.0
    best = 0.0
    for b in boxes:
        ix = max(0.0, min(x1, b.x + b.w) - max(x0, b.x))
        iy = max(0.0, min(y1, b.y + b.h) - max(y0, b.y))
        best = max(best, ix * iy / area)
    return best


def pixel_auprc(heat: np.ndarray, boxes: Sequence[Box]) -> float:
    from sae_cxr.stats import average_precision

    mask = box_mask(boxes, heat.shape)
    if mask.all() or not mask.any():
        return float("nan")
    return average_precision(mask.reshape(-1).astype(float), heat.reshape(-1))


@dataclass
class LocalizationScores:
    """Accumulates localization results over many (map, boxes) pairs."""

    pointing: list[bool]
    iobb: list[float]
    auprc: list[float]

    @classmethod
    def empty(cls) -> "LocalizationScores":
        return cls([], [], [])

    def add(self, heat: np.ndarray, boxes: Sequence[Box]) -> None:
        self.pointing.append(pointing_game(heat, boxes))
        self.iobb.append(iobb(predicted_box(heat), boxes))
        self.auprc.append(pixel_auprc(heat, boxes))

    def summary(self) -> dict[str, float | int | None]:
        n = len(self.pointing)
        if n == 0:
            return {"n": 0}
        out: dict[str, float | int | None] = {"n": n, "pointing_game": float(np.mean(self.pointing))}
        for t in IOBB_THRESHOLDS:
            out[f"iobb_hit@{t}"] = float(np.mean(np.array(self.iobb) >= t))
        au = np.array(self.auprc, dtype=float)
        out["pixel_auprc"] = float(np.nanmean(au)) if np.isfinite(au).any() else None
        return out


def describe_location(u: float, v: float) -> str:
    """A radiological zone name for a point in normalised image coordinates (u right, v down).

    Radiological convention: the patient's right is on the image left. Points near the border are
    named as such: markers, text and collimation live there, not in the lungs.
    """
    if u < 0.08 or u > 0.92 or v < 0.06 or v > 0.94:
        vert = "top" if v < 0.5 else "bottom"
        horiz = "left" if u < 0.5 else "right"
        return f"image border ({vert} {horiz} of the film)"
    if 0.44 <= u <= 0.56:
        side = "midline"
    else:
        side = "right" if u < 0.5 else "left"
    zone = "upper" if v < 0.36 else ("middle" if v < 0.56 else "lower")
    return f"{side} {zone} zone" if side != "midline" else f"midline, {zone} chest"


def peak_location(grid_map: np.ndarray, lb: Letterbox | None = None, model_size: int | None = None) -> str | None:
    """Zone of a map's maximum (None for an all-zero map); the letterbox maps it back to the source image."""
    g = np.asarray(grid_map, dtype=np.float64)
    if not np.isfinite(g).any() or g.max() <= 0:
        return None
    r, c = np.unravel_index(int(np.argmax(g)), g.shape)
    u, v = (c + 0.5) / g.shape[1], (r + 0.5) / g.shape[0]
    if lb is not None and model_size is not None:
        x, y = lb.to_source(u * model_size, v * model_size)
        u, v = float(x) / lb.src_w, float(y) / lb.src_h
    return describe_location(float(u), float(v))
