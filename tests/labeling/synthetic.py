"""Small synthetic records tables with known concepts, labels, reports and confounding.

Built in milliseconds with numpy, in the records.parquet layout the evidence labeler reads, so
the tests know exactly which concept each pattern responds to.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from sae_cxr.findings import CONCEPTS, FINDINGS

PREVALENCE = {"cardiomegaly": 0.30, "pleural_effusion": 0.20, "nodule": 0.10, "laterality_marker": 0.50,
              "edema": 0.15, "et_tube": 0.10, "scoliosis": 0.08}

SENTENCES = {"cardiomegaly": "Moderate cardiomegaly.", "pleural_effusion": "Small left pleural effusion.",
             "nodule": "A 9 mm nodule in the right lung.", "edema": "Mild pulmonary edema with perihilar haziness.",
             "et_tube": "Endotracheal tube in place.", "pacemaker": "Pacemaker in place.",
             "scoliosis": "Scoliosis of the thoracic spine."}
NEGATIVES = {"pleural_effusion": "No pleural effusion.", "edema": "No pulmonary edema.",
             "cardiomegaly": "Heart size is normal."}


def confounded_world(n: int = 2000, shortcut_rate: float = 0.9, label_noise: float = 0.03,
                     seed: int = 0) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Records with planted concepts where P(pacemaker | cardiomegaly) = shortcut_rate and
    P(pacemaker | no cardiomegaly) = 1 - shortcut_rate (the phantom world's shortcut rule).

    Returns the table and the ground-truth concept indicators. The Atelectasis label is planted
    WITHOUT a concept (a finding the annotations do not show), at 20% prevalence.
    """
    rng = np.random.default_rng(seed)
    truth = {c: rng.random(n) < p for c, p in PREVALENCE.items()}
    cardio = truth["cardiomegaly"]
    truth["pacemaker"] = np.where(cardio, rng.random(n) < shortcut_rate, rng.random(n) < 1 - shortcut_rate)
    atelectasis_label = rng.random(n) < 0.2
    rows = []
    for i in range(n):
        concepts = [c for c in truth if truth[c][i]]
        labels = {f: 0.0 for f in FINDINGS}
        for c in concepts:
            if CONCEPTS[c].finding:
                labels[CONCEPTS[c].finding] = 1.0
        labels["Atelectasis"] = float(atelectasis_label[i])
        for f in FINDINGS:
            if rng.random() < label_noise:
                labels[f] = 1.0 - labels[f]
        sentences = [SENTENCES[c] for c in concepts if c in SENTENCES]
        sentences += [s for c, s in NEGATIVES.items() if c not in concepts and rng.random() < 0.5]
        row = {"id": f"r{i:05d}", "split": "train", "path": "", **labels,
               **{f"{f} (uncertain)": False for f in FINDINGS},
               "concepts": json.dumps(concepts), "boxes": "[]", "report": " ".join(sentences), "meta": "{}"}
        rows.append(row)
    truth["Atelectasis (label only)"] = atelectasis_label
    return pd.DataFrame(rows), truth


def pattern_on(mask: np.ndarray, seed: int = 1, leak: float = 0.02) -> np.ndarray:
    """Activations of a pattern that fires on `mask` (strength 0.5-1.5) plus a few weak random firings."""
    rng = np.random.default_rng(seed)
    act = np.where(mask, rng.uniform(0.5, 1.5, mask.shape), 0.0)
    stray = (~mask) & (rng.random(mask.shape) < leak)
    act[stray] = rng.uniform(0.01, 0.2, int(stray.sum()))
    return act
