"""Localization of pattern maps against ground-truth boxes, next to a Grad-CAM baseline.

Phantom boxes: every planted concept instance is scored with the map of the pattern that detects
that concept best (if its AUROC reaches 0.9, i.e. the concept was recovered). Public boxes (NIH
BBox_List_2017, RSNA): each box's finding is scored with the map of the prediction's top pattern
for that finding. Baseline: Grad-CAM of the classifier logit for the finding the box implies, on
the same images (concepts without a finding have no baseline). Pattern maps and the baseline are
compared only on the boxes that both scored ("with_baseline/"), pooled and paired box by box: the
baseline alone also scores the boxes of concepts that no pattern recovered.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from typing import Any

import numpy as np
import pandas as pd
import torch

from sae_cxr.findings import CONCEPTS, FINDINGS, NIH_LABEL_ALIASES, NIH_TO_FINDING
from sae_cxr.maps import (LocalizationScores, logit_target, pattern_patch_maps, pattern_target, to_image)

log = logging.getLogger("sae_cxr.localization")
BOX_TO_FINDING = {**NIH_TO_FINDING, "Lung Opacity": "Consolidation", **{f: f for f in FINDINGS}}


def box_finding(label: str) -> str | None:
    if label in CONCEPTS:
        return CONCEPTS[label].finding
    return BOX_TO_FINDING.get(NIH_LABEL_ALIASES.get(label, label))


def localization_eval(run, ds, store, ens, head, table: pd.DataFrame, arrays: dict[str, np.ndarray],
                      rows: np.ndarray, cfg, rng: np.random.Generator, recovered_auroc: float = 0.9) -> dict[str, Any]:
    from sae_cxr.backbones.base import load_backbone
    from sae_cxr.pipeline import config_from_run

    with_boxes = [int(r) for r in rows if ds.records[r].boxes]
    if not with_boxes:
        return {"summary": {"n": 0, "note": "no images with boxes in the attributed splits"}}
    pick = sorted(rng.choice(with_boxes, size=min(cfg.localization_images, len(with_boxes)), replace=False).tolist())
    run_cfg = config_from_run(run)
    backbone = load_backbone(run_cfg.extract.backbone)
    W_enc = ens.W_enc.detach().cpu().numpy()
    E = ens.cfg.n_members
    members = {int(p): [tuple(v) for v in json.loads(m)] for p, m in zip(table["pattern_id"], table["members"])}
    concept_pattern: dict[str, int] = {}
    for c in CONCEPTS:
        col = f"concept_auroc:{c}"
        if col in table and table[col].notna().any():
            best = table.loc[table[col].idxmax()]
            if float(best[col]) >= recovered_auroc:
                concept_pattern[c] = int(best["pattern_id"])
    from sae_cxr.attribution import Attributor

    attr = Attributor(ens, head, arrays["latent_pattern"])
    scores: dict[str, dict[str, LocalizationScores]] = defaultdict(lambda: defaultdict(LocalizationScores.empty))
    # the boxes scored by every map (a recovered concept's pattern AND its finding's logit): the only
    # fair ground for comparing pattern maps with the baseline, since the baseline alone also scores
    # the boxes of concepts no pattern recovered (often the hardest ones)
    same_boxes: dict[str, dict[str, LocalizationScores]] = defaultdict(lambda: defaultdict(LocalizationScores.empty))
    paired: list[tuple[bool, bool]] = []  # (pattern Grad-CAM hit, logit Grad-CAM hit) on the same boxes
    multimodal = store.mode == "multimodal"
    for r in pick:
        rec = ds.records[r]
        img = rec.load_image()
        pixels, lbs = backbone.preprocess([img])
        lb = lbs[0]
        enc = backbone.encode_pixels(pixels, with_patches=True)
        patches = enc.patches[0].numpy()
        grid = enc.grid
        text = torch.from_numpy(store.text(np.array([r]))).float() if multimodal else None
        by_label: dict[str, list] = defaultdict(list)
        for b in rec.boxes:
            by_label[b.label].append(b)
        decomposition = None
        for label, boxes in by_label.items():
            finding = box_finding(label)
            if label in CONCEPTS:
                pid = concept_pattern.get(label)
                group = label
            else:
                if finding is None:
                    continue
                if decomposition is None:
                    decomposition = attr.decompose(store.features(np.array([r])))
                con = decomposition.contributions[0, :, FINDINGS.index(finding)]
                pid = int(np.argmax(con)) if con.max() > 0 else None
                group = finding
            maps: dict[str, np.ndarray] = {}
            if pid is not None:
                mem = members[pid]
                pmap = pattern_patch_maps(W_enc, mem, patches[None], E)[0].reshape(grid)
                maps["pattern_map"] = to_image(np.maximum(pmap, 0), lb, backbone.image_size)
                target = pattern_target(ens.W_enc.detach(), ens.b_enc.detach(), mem, E, text)
                maps["pattern_gradcam"] = to_image(backbone.gradcam(pixels, target)[0].numpy(), lb, backbone.image_size)
            if finding is not None:
                cam = backbone.gradcam(pixels, logit_target(head, FINDINGS.index(finding), text))[0].numpy()
                maps["logit_gradcam"] = to_image(cam, lb, backbone.image_size)
            for method, heat in maps.items():
                scores[group][method].add(heat, boxes)
            if len(maps) == 3:
                for method, heat in maps.items():
                    same_boxes[group][method].add(heat, boxes)
                paired.append((same_boxes[group]["pattern_gradcam"].pointing[-1],
                               same_boxes[group]["logit_gradcam"].pointing[-1]))
    per_group = {g: {m: s.summary() for m, s in d.items()} for g, d in scores.items()}
    summary = _pool(scores, same_boxes)
    if paired:
        summary["paired/pointing_pattern_minus_logit"] = paired_difference(np.array(paired, dtype=float), rng)
    return {"images": len(pick), "per_label": per_group, "summary": summary,
            "concept_patterns": concept_pattern}


def paired_difference(hits: np.ndarray, rng: np.random.Generator, n_boot: int = 2000,
                      level: float = 0.95) -> dict[str, Any]:
    """Mean of hits[:, 0] - hits[:, 1] over the boxes scored by both maps, with a percentile bootstrap
    interval that resamples boxes (the pairs stay together). Pointing hits are 0/1, so on a few hundred
    boxes two maps a few points apart are within noise; the interval says whether they are."""
    if hits.ndim != 2 or hits.shape[1] != 2 or not len(hits):
        raise ValueError(f"expected [n >= 1, 2] paired hits, got shape {hits.shape}")
    d = hits[:, 0] - hits[:, 1]
    boot = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return {"n": int(len(d)), "first": float(hits[:, 0].mean()), "second": float(hits[:, 1].mean()),
            "difference": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi), "level": level}


def _pool(scores, same_boxes) -> dict[str, Any]:
    """Pooled metrics per method: over all boxes each method scored ("all/"), and over the boxes that
    every method scored, the pattern maps and the logit baseline alike ("with_baseline/")."""
    out: dict[str, Any] = {}
    for subset, table in (("all", scores), ("with_baseline", same_boxes)):
        for method in ("pattern_map", "pattern_gradcam", "logit_gradcam"):
            pooled = LocalizationScores.empty()
            for g in table:
                s = table[g].get(method)
                if s is not None:
                    pooled.pointing += s.pointing
                    pooled.iobb += s.iobb
                    pooled.auprc += s.auprc
            if pooled.pointing:
                out[f"{subset}/{method}"] = pooled.summary()
    return out
