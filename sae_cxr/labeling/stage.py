"""The label stage: name every pattern, verify the names on held-out images, write labels.jsonl.

Labelling uses the train and val images only; verification scores each name on held-out test
images (activating and non-activating) with a judge: the backbone's text tower offline, or the
LMM. Patterns below the verification threshold are flagged, not hidden. Several labelers can run
side by side: the first writes labels.jsonl, every one writes labels/<labeler>.jsonl, and on the
phantom world labels/eval.json scores each against the planted concepts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from sae_cxr.findings import CONCEPTS
from sae_cxr.labeling.base import PatternLabel, read_labels, write_labels
from sae_cxr.labeling.evidence import EvidenceConfig, EvidenceLabeler
from sae_cxr.labeling.llm_client import LLMConfig
from sae_cxr.labeling.text import TextConfig
from sae_cxr.labeling.verify import TextJudgeConfig, VerifyConfig
from sae_cxr.progress import progress_bar
from sae_cxr.run import RunDir, write_json_atomic

log = logging.getLogger("sae_cxr.labeling")

LABELS = "labels.jsonl"
LABEL_DIR = "labels"
LABEL_EVAL = "labels/eval.json"
LABELERS = ("evidence", "text", "lmm")
FIT_SPLITS = ("train", "val")
HELDOUT_SPLITS = ("test", "test_shifted")


@dataclass
class LabelConfig:
    """Which labelers name the patterns and how names are verified."""

    labelers: tuple[str, ...] = ("evidence", "text")
    """Labelers to run; the first one's names are THE labels (labels.jsonl). "text" is skipped when the
    backbone has no text tower; "lmm" needs `lmm` (endpoint) or `lmm_local_path`."""
    verify: str = "auto"
    """auto (text tower when there is one, else none) | text | lmm | none."""
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)
    text: TextConfig = field(default_factory=TextConfig)
    verification: VerifyConfig = field(default_factory=VerifyConfig)
    judge: TextJudgeConfig = field(default_factory=TextJudgeConfig)
    lmm: LLMConfig = field(default_factory=LLMConfig)
    """The OpenAI-compatible endpoint (base_url, model, api_key_env NAME; the key stays in the env)."""
    lmm_local_path: str | None = None
    """A local transformers vision-language model folder (used instead of the endpoint)."""
    montage_images: int = 12
    """Gallery images the LMM sees per pattern."""

    def __post_init__(self) -> None:
        if isinstance(self.labelers, (list, str)):
            self.labelers = (self.labelers,) if isinstance(self.labelers, str) else tuple(self.labelers)
        bad = [x for x in self.labelers if x not in LABELERS]
        if bad or not self.labelers:
            raise ValueError(f"labelers must be a non-empty subset of {LABELERS}, got {self.labelers}")
        if self.verify not in ("auto", "text", "lmm", "none"):
            raise ValueError(f"verify must be auto | text | lmm | none, got {self.verify!r}")


@dataclass
class _Context:
    run: RunDir
    table: pd.DataFrame  # records.parquet
    patterns: pd.DataFrame
    act: np.ndarray  # [N, P] dense pattern activations (valid rows), float32
    fit: np.ndarray  # row indices of the labelling splits
    held: np.ndarray  # row indices of the held-out splits
    embeddings: np.ndarray  # [N, D] image embeddings
    backbone: Any = None
    _ds: Any = None

    @property
    def dataset(self):
        if self._ds is None:
            from sae_cxr.ingest import open_run_dataset

            self._ds = open_run_dataset(self.run)
        return self._ds


def _lmm_backend(cfg: LabelConfig):
    if cfg.lmm_local_path:
        from sae_cxr.labeling.vlm_local import LocalVLM, LocalVLMConfig

        return LocalVLM(LocalVLMConfig(path=cfg.lmm_local_path))
    if not cfg.lmm.model:
        raise ValueError("the lmm labeler needs label.lmm.model (and base_url) or label.lmm_local_path in the config")
    from sae_cxr.labeling.llm_client import OpenAIChatClient

    return OpenAIChatClient(cfg.lmm)


def _montage(ctx: _Context, rows: np.ndarray, n: int) -> bytes:
    from sae_cxr.viz import contact_sheet, png_bytes, to_rgb

    tiles = [to_rgb(ctx.dataset.records[int(r)].load_image()).resize((160, 160)) for r in rows[:n]]
    return png_bytes(contact_sheet(tiles, cols=4))


def _png(ctx: _Context, row: int) -> bytes:
    from sae_cxr.viz import png_bytes, to_rgb

    return png_bytes(to_rgb(ctx.dataset.records[int(row)].load_image()).resize((224, 224)))


def label_patterns(ctx: _Context, cfg: LabelConfig, labeler: str, progress: bool = True) -> list[PatternLabel]:
    P = ctx.act.shape[1]
    fit_act = ctx.act[ctx.fit]
    out: list[PatternLabel] = []
    if labeler == "evidence":
        ev = EvidenceLabeler(cfg.evidence)
        table = ev.table(ctx.table.iloc[ctx.fit].reset_index(drop=True))
        with progress_bar(total=P, desc="evidence labels", unit="pattern", disable=not progress) as bar:
            for p in range(P):
                out.append(ev.label(p, fit_act[:, p], table))
                bar.update(1)
    elif labeler == "text":
        from sae_cxr.labeling.text import TextLabeler

        tl = TextLabeler(ctx.backbone, config=cfg.text)
        emb = ctx.embeddings[ctx.fit]
        mean = emb.mean(0)
        for p in range(P):
            a = fit_act[:, p]
            top = np.argsort(-a)[: cfg.text.top_k]
            top = top[a[top] > cfg.text.fire_threshold]
            if len(top) < cfg.text.min_top:
                out.append(tl.label(p, image_embeddings=emb, activations=a))
            else:
                out.append(tl.label(p, top_embeddings=emb[top], mean_embedding=mean))
    elif labeler == "lmm":
        from sae_cxr.labeling.lmm import LMMLabeler

        lm = LMMLabeler(_lmm_backend(cfg))
        for p in range(P):
            a = fit_act[:, p]
            top = ctx.fit[np.argsort(-a)[: cfg.montage_images]]
            top = top[ctx.act[top, p] > 0]
            reports = [str(ctx.table.iloc[int(r)]["report"]) for r in top]
            row = ctx.patterns.iloc[p]
            context = {"pattern_id": p, "frequency": round(float(row["frequency"]), 4),
                       "stability": round(float(row["stability"]), 3),
                       "strongest_finding_effect": max(((f, round(float(row[f"effect:{f}"]), 3))
                                                        for f in _findings()), key=lambda t: abs(t[1]))}
            out.append(lm.describe_pattern(_montage(ctx, top, cfg.montage_images), reports, context))
    return out


def _findings():
    from sae_cxr.findings import FINDINGS

    return FINDINGS


def _contrasts(col: np.ndarray, fire_threshold: float) -> bool:
    """Whether a pattern's activations have both activating and non-activating images (a pattern that
    fires on every image, or on none, cannot be verified by contrast and keeps verification None)."""
    fires = col > fire_threshold
    return bool(fires.any() and not fires.all())


def verify_labels(ctx: _Context, cfg: LabelConfig, labels: list[PatternLabel], judge_kind: str) -> list[PatternLabel]:
    if judge_kind == "none":
        return labels
    ft = cfg.verification.fire_threshold
    out = []
    if judge_kind == "text":
        from sae_cxr.labeling.verify import TextJudge, calibrate_and_verify

        judge = TextJudge(ctx.backbone, cfg.judge)
        ids = ctx.table["id"].astype(str).to_numpy()
        for lab in labels:
            p = int(lab.pattern_id)
            if lab.unresolved or not _contrasts(ctx.act[ctx.held, p], ft) or not _contrasts(ctx.act[ctx.fit, p], ft):
                out.append(lab)
                continue
            labelled, _ = calibrate_and_verify(lab, judge, ctx.embeddings[ctx.fit], ctx.act[ctx.fit, p],
                                               ctx.embeddings[ctx.held], ctx.act[ctx.held, p], cfg.verification,
                                               labelling_ids=ids[ctx.fit], heldout_ids=ids[ctx.held])
            out.append(labelled)
        return out
    from sae_cxr.labeling.lmm import LMMLabeler
    from sae_cxr.labeling.verify import select_images, verify

    lm = LMMLabeler(_lmm_backend(cfg))
    for lab in labels:
        p = int(lab.pattern_id)
        if lab.unresolved or not _contrasts(ctx.act[ctx.held, p], ft):
            out.append(lab)
            continue
        pos, neg = select_images(ctx.act[ctx.held, p], cfg.verification.n_pos, cfg.verification.n_neg,
                                 cfg.verification.fire_threshold, cfg.verification.seed)
        labelled, _ = verify(lab, lm, [_png(ctx, ctx.held[i]) for i in pos], [_png(ctx, ctx.held[i]) for i in neg],
                             cfg.verification.threshold)
        out.append(labelled)
    return out


def run_label(run: RunDir, cfg: LabelConfig, progress: bool = True) -> tuple[list[str], dict[str, Any]]:
    from sae_cxr.backbones.base import load_backbone
    from sae_cxr.extract import EmbeddingStore
    from sae_cxr.ingest import read_records_table
    from sae_cxr.labeling.accuracy import absence_matches, labeler_accuracy
    from sae_cxr.patterns import SUMMARY as PATTERNS_SUMMARY
    from sae_cxr.patterns import dense_activations, load_activations, load_patterns
    from sae_cxr.pipeline import config_from_run

    table = read_records_table(run)
    patterns, _ = load_patterns(run)
    rows, cols, vals, (n, p) = load_activations(run)
    store = EmbeddingStore(run)
    valid = store.valid
    splits = table["split"].to_numpy()
    fit = np.flatnonzero(valid & np.isin(splits, FIT_SPLITS))
    held = np.flatnonzero(valid & np.isin(splits, HELDOUT_SPLITS))
    if len(fit) == 0:
        raise ValueError("labelling needs train or val images; the run has none")
    needs_text = "text" in cfg.labelers or cfg.verify in ("auto", "text")
    backbone = load_backbone(config_from_run(run).extract.backbone) if needs_text else None
    has_text = bool(backbone is not None and backbone.has_text)
    ctx = _Context(run, table, patterns, dense_activations(rows, cols, vals, n, p), fit, held,
                   store.image(), backbone)
    judge = cfg.verify if cfg.verify != "auto" else ("text" if has_text and len(held) else "none")
    if judge == "text" and not has_text:
        raise ValueError("verification with the text tower needs a backbone with a text tower")
    if judge != "none" and len(held) == 0:
        log.warning("no held-out split: labels are not verified")
        judge = "none"
    run.sub(LABEL_DIR).mkdir(parents=True, exist_ok=True)
    results: dict[str, list[PatternLabel]] = {}
    skipped = []
    for name in cfg.labelers:
        if name == "text" and not has_text:
            skipped.append("text (backbone has no text tower)")
            continue
        labels = label_patterns(ctx, cfg, name, progress)
        labels = verify_labels(ctx, cfg, labels, judge)
        write_labels(run.sub(f"{LABEL_DIR}/{name}.jsonl"), labels)
        results[name] = labels
    primary = next(iter(results))
    write_labels(run.sub(LABELS), results[primary])
    summary: dict[str, Any] = {"primary": primary, "judge": judge, "patterns": p}
    if skipped:
        summary["labelers_skipped"] = skipped
    for name, labels in results.items():
        cats = pd.Series([lab.category for lab in labels]).value_counts().to_dict()
        summary[name] = {"unresolved": sum(lab.unresolved for lab in labels),
                         "flagged": sum(bool(lab.flagged) for lab in labels),
                         "verified": sum(lab.verification is not None for lab in labels),
                         "median_verification": _median([lab.verification for lab in labels]),
                         "by_category": cats}
    evaluation = {}
    if "best_concept" in patterns:
        matches = {int(r.pattern_id): str(r.best_concept) for r in patterns.itertuples()
                   if r.best_concept in CONCEPTS and float(r.concept_auroc) >= 0.9}
        if matches:
            # the concepts' prevalence over the run's valid images, as the patterns stage counted it
            recovery = json.loads(run.sub(PATTERNS_SUMMARY).read_text()).get("concept_recovery", {})
            absent = absence_matches(patterns, recovery.get("prevalence", {}), exclude=matches)
            for name, labels in results.items():
                by_id = {lab.pattern_id: lab for lab in labels}
                acc = labeler_accuracy(by_id, matches)
                evaluation[name] = {**acc.to_dict(), "confusion": acc.confusion.to_dict(),
                                    "per_pattern": acc.per_pattern.to_dict("records")}
                summary[name]["named_correctly"] = round(acc.named_correctly, 3)
                summary[name]["category_correct"] = round(acc.category_correct, 3)
                summary[name]["matched_patterns"] = acc.n
                if absent:
                    ab = labeler_accuracy(by_id, absent, polarity="absent")
                    evaluation[name]["absence"] = {**ab.to_dict(), "per_pattern": ab.per_pattern.to_dict("records")}
                    summary[name]["absence_named_correctly"] = round(ab.named_correctly, 3)
                    summary[name]["absence_matched_patterns"] = ab.n
    write_json_atomic(run.sub(LABEL_EVAL), evaluation)
    outputs = [LABELS, LABEL_DIR]
    if has_text:
        from sae_cxr.search import build_label_index

        outputs += build_label_index(run, results[primary], backbone)
    return outputs, summary


def _median(values) -> float | None:
    v = [x for x in values if x is not None]
    return round(float(np.median(v)), 3) if v else None


def load_labels(run: RunDir) -> dict[int, PatternLabel]:
    """Pattern id -> label (the primary labeler), or {} when the label stage has not run."""
    if run.stage("label") is None or run.stage("label").status != "done":
        return {}
    return {int(lab.pattern_id): lab for lab in read_labels(run.verify(LABELS))}
