"""The evaluation stage: one graded report of a run against the targets of every stage.

Most numbers were measured by the stages themselves (their summaries are the contract); this stage
gathers them, adds what needs more than one stage (the shortcut audit against the planted truth,
monosemanticity against its random baseline, spread over members), checks them against the targets,
and writes eval/metrics.json, eval/summary.md and plots. On real data the phantom-only parts
(concept recovery, labeler accuracy, shortcut truth) are absent, not faked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sae_cxr.run import RunDir, atomic_path, write_json_atomic

EVAL_DIR = "eval"
METRICS = "eval/metrics.json"
SUMMARY_MD = "eval/summary.md"
PLOTS = {"ensemble": "eval/ensemble.png", "concepts": "eval/concepts.png", "localization": "eval/localization.png",
         "deletion": "eval/deletion.png", "audit": "eval/audit.png"}


@dataclass
class EvalConfig:
    """Targets the run is graded against (the issues' numbers) and the audit's settings."""

    fvu_max: float = 0.10
    """Median FVU of the members."""
    dead_max: float = 0.05
    """Median dead fraction of the members."""
    spliced_auroc_drop_max: float = 0.01
    """Largest median (over members) AUROC drop of any finding when the transcoder replaces the layer."""
    concept_recovery_min: float = 0.9
    """Share of planted concepts matched by a pattern at concept AUROC >= 0.9."""
    labeler_named_min: float = 0.9
    labeler_category_min: float = 0.9
    completeness_error_max: float = 1e-4
    patterns_per_prediction: tuple[int, int] = (20, 50)
    """CXR-LanIC's range for the median number of reported patterns (informative, not a pass/fail)."""
    audit_splits: tuple[str, ...] = ("test",)
    """Predictions the shortcut audit reads."""
    shortcut_min_reliance: float = 0.5
    """The shortcut audit is graded only when the classifier uses the planted nuisance: its logit moves by
    at least this much (logit units) with the nuisance on test_shifted, where the two are independent."""
    shortcut_min_auroc: float = 0.75
    """A pattern is the planted shortcut's when the nuisance is its best concept at this AUROC or more."""

    def __post_init__(self) -> None:
        for name in ("patterns_per_prediction", "audit_splits"):
            v = getattr(self, name)
            if isinstance(v, list):
                setattr(self, name, tuple(v))


def _spread(values) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    a = a[np.isfinite(a)]
    if not len(a):
        return {}
    return {"median": float(np.median(a)), "p10": float(np.quantile(a, 0.1)), "p90": float(np.quantile(a, 0.9)),
            "min": float(a.min()), "max": float(a.max())}


def _read(run: RunDir, rel: str) -> dict[str, Any] | None:
    p = run.sub(rel)
    return json.loads(p.read_text()) if p.exists() else None


def _world(run: RunDir) -> dict[str, Any] | None:
    return _read(run, "data/world.json")


def classifier_metrics(run: RunDir) -> dict[str, Any]:
    from sae_cxr.classifier import METRICS as CLS_METRICS

    m = json.loads(run.verify(CLS_METRICS).read_text())["metrics"]
    out: dict[str, Any] = {}
    for split, per in m.items():
        out[split] = {f: {"auroc": v["auroc"]["value"], "auroc_ci": [v["auroc"]["low"], v["auroc"]["high"]],
                          "auprc": v["auprc"]["value"], "auprc_ci": [v["auprc"]["low"], v["auprc"]["high"]],
                          "n": v["auroc"]["n"], "n_pos": v["auroc"]["n_pos"]} for f, v in per.items()}
    return out


def ensemble_metrics(run: RunDir) -> dict[str, Any]:
    from sae_cxr.transcoders.stage import METRICS as TC_METRICS

    m = json.loads(run.verify(TC_METRICS).read_text())
    out: dict[str, Any] = {"members": len(m["fvu"])}
    for key in ("fvu", "l0", "dead_fraction", "dense_fraction", "loss_recovered"):
        if key in m:
            out[key] = _spread(m[key])
    orig = np.asarray(m["auroc_original"], dtype=float)  # [F]
    spliced = np.asarray(m["auroc_spliced"], dtype=float)  # [E, F]
    drop = orig[None, :] - spliced
    out["spliced_auroc_drop"] = {f: _spread(drop[:, j]) for j, f in enumerate(m["findings"])}
    out["spliced_auroc_drop_worst_median"] = float(np.median(drop, axis=0).max())
    return out


def pattern_metrics(run: RunDir) -> dict[str, Any]:
    from sae_cxr.patterns import PATTERNS, SUMMARY

    summary = json.loads(run.verify(SUMMARY).read_text())
    table = pd.read_parquet(run.verify(PATTERNS))
    out: dict[str, Any] = {"patterns": int(len(table)), "latents": summary.get("latents"),
                           "latents_in_patterns": summary.get("latents_in_patterns"),
                           "threshold": summary.get("threshold"), "stability": _spread(table["stability"])}
    if "monosemanticity" in table:
        ms, rnd = table["monosemanticity"].to_numpy(), table["monosemanticity_random"].to_numpy()
        out["monosemanticity"] = {"median": float(np.nanmedian(ms)), "random_median": float(np.nanmedian(rnd)),
                                  "share_above_random_p95": float(np.mean(ms > np.nanquantile(rnd, 0.95)))}
    if "concept_recovery" in summary:
        out["concept_recovery"] = summary["concept_recovery"]
        truth = concept_truth_rows(run)
        ceiling = probe_ceiling(truth) if truth is not None else {}
        if ceiling:
            out["probe_ceiling"] = ceiling
            for c, v in out["concept_recovery"]["per_concept"].items():
                if c in ceiling and v.get("auroc") is not None:
                    v["probe_auroc"] = ceiling[c]
        strata = weakest_strata(run, truth, out["concept_recovery"]["per_concept"]) if truth is not None else {}
        for c, worst in strata.items():
            out["concept_recovery"]["per_concept"][c]["weakest_stratum"] = worst
    return out


@dataclass
class ConceptTruthRows:
    """A phantom run's planted concepts on its valid images, split as the patterns stage splits them."""

    store: Any  # sae_cxr.extract.EmbeddingStore
    fit: np.ndarray  # record rows of train + val (where concept recovery is measured)
    held: np.ndarray  # record rows of test
    truth: np.ndarray  # [n_records, n_concepts] presence


def concept_truth_rows(run: RunDir) -> ConceptTruthRows | None:
    """None when the records carry no concepts (real data)."""
    from sae_cxr.extract import EmbeddingStore
    from sae_cxr.ingest import open_run_dataset

    ds = open_run_dataset(run)
    if not any(r.concepts for r in ds.records):
        return None
    store = EmbeddingStore(run)
    splits = np.array([r.split for r in ds.records])
    return ConceptTruthRows(store, np.flatnonzero(store.valid & np.isin(splits, ["train", "val"])),
                            np.flatnonzero(store.valid & (splits == "test")), ds.concept_truth())


def weakest_strata(run: RunDir, rows_of: ConceptTruthRows, per_concept: dict[str, dict[str, Any]],
                   min_share: float = 0.05, min_class: int = 10) -> dict[str, dict[str, Any]]:
    """Per concept, the device/artifact concept under which its best pattern detects it worst: the
    pattern's AUROC on the images WITH that nuisance and on those without (the images the recovery
    was measured on). A pattern that detects a finding on normal films but not on under-exposed ones
    shows here as e.g. low_exposure 0.69 / 0.94: a failure of the representation under an acquisition
    condition, which the overall AUROC averages away. Nuisances on fewer than `min_share` (or more than
    1 - min_share) of the images, and strata with fewer than `min_class` positives or negatives, are
    skipped."""
    from sae_cxr.findings import CONCEPT_NAMES, CONCEPTS, NUISANCE_CATEGORIES
    from sae_cxr.patterns import load_activations
    from sae_cxr.stats import stratified_auroc

    fit = rows_of.fit
    truth = rows_of.truth[fit]
    rows, cols, vals, _ = load_activations(run)
    pos = np.full(len(rows_of.truth), -1, dtype=np.int64)
    pos[fit] = np.arange(len(fit))
    nuisances = [j for j, c in enumerate(CONCEPT_NAMES) if CONCEPTS[c].category in NUISANCE_CATEGORIES
                 and min_share <= np.nanmean(truth[:, j]) <= 1 - min_share]
    if not nuisances:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for c, v in per_concept.items():
        if v.get("pattern") is None or c not in CONCEPT_NAMES:
            continue
        j = CONCEPT_NAMES.index(c)
        keep = (cols == v["pattern"]) & (pos[rows] >= 0)
        score = np.zeros(len(fit))
        score[pos[rows[keep]]] = vals[keep]
        others = [k for k in nuisances if k != j]
        with_, without, n_with = stratified_auroc(truth[:, j], score, truth[:, others] == 1, min_class)
        if not np.isfinite(with_).any():
            continue
        k = int(np.nanargmin(with_))
        out[c] = {"nuisance": CONCEPT_NAMES[others[k]], "auroc_with": round(float(with_[k]), 4),
                  "auroc_without": round(float(without[k]), 4) if np.isfinite(without[k]) else None,
                  "n_with": int(n_with[k])}
    return out


def probe_ceiling(rows_of: ConceptTruthRows, max_fit: int = 4000, seed: int = 0) -> dict[str, float]:
    """Held-out AUROC of a linear probe on the embeddings, per planted concept: how well the backbone
    encodes the concept at all. A pattern rarely beats it, so a concept the probe cannot find is the
    backbone's limit (image size, subtlety), not the dictionary's."""
    from sklearn.linear_model import LogisticRegression

    from sae_cxr.findings import CONCEPT_NAMES
    from sae_cxr.stats import auroc

    x = rows_of.store.features()
    held, truth = rows_of.held, rows_of.truth
    fit = np.random.default_rng(seed).permutation(rows_of.fit)[:max_fit]
    mu, sd = x[fit].mean(0), x[fit].std(0) + 1e-8
    out: dict[str, float] = {}
    for j, c in enumerate(CONCEPT_NAMES):
        y_fit, y_held = truth[fit, j], truth[held, j]
        if y_fit.min() == y_fit.max() or y_held.min() == y_held.max():
            continue
        clf = LogisticRegression(C=1.0, max_iter=500).fit((x[fit] - mu) / sd, y_fit)
        out[c] = round(float(auroc(y_held, clf.decision_function((x[held] - mu) / sd))), 4)
    return out


def label_metrics(run: RunDir) -> dict[str, Any]:
    from sae_cxr.labeling.stage import LABEL_EVAL, load_labels

    labels = load_labels(run)
    ver = [l.verification for l in labels.values() if l.verification is not None]
    out: dict[str, Any] = {"patterns_labelled": len(labels),
                           "flagged": int(sum(bool(l.flagged) for l in labels.values())),
                           "verification": _spread(ver)}
    ev = _read(run, LABEL_EVAL)
    if ev:
        def brief(d: dict[str, Any]) -> dict[str, Any]:
            return {k: (brief(v) if isinstance(v, dict) and "named_correctly" in v else v)
                    for k, v in d.items() if k != "per_pattern"}

        out["accuracy"] = {name: brief(d) for name, d in ev.items() if isinstance(d, dict) and "named_correctly" in d}
    return out


def attribution_metrics(run: RunDir) -> dict[str, Any]:
    from sae_cxr.attribution import FAITHFULNESS, SUMMARY as ATTR_SUMMARY

    s = json.loads(run.verify(ATTR_SUMMARY).read_text())
    faith = _read(run, FAITHFULNESS) or {}
    return {"completeness_error": s.get("completeness_error"), "patterns_per_prediction": s.get("patterns_per_prediction"),
            "images_per_s": s.get("images_per_s"),
            "faithfulness": {k: v for k, v in faith.items() if not k.startswith("mean_curve")},
            "curves": {k: v for k, v in faith.items() if k.startswith("mean_curve")},
            "localization": s.get("localization", {})}


def explanation_metrics(run: RunDir) -> dict[str, Any]:
    from sae_cxr.explain import NLE_METRICS

    m = _read(run, NLE_METRICS) or {}
    out: dict[str, Any] = {}
    for audience, d in m.items():
        if not isinstance(d, dict) or "diversity" not in d:
            continue
        sim = d.get("simulatability", {})
        out[audience] = {"simulatability_label_bal_acc": sim.get("label", {}).get("balanced_accuracy"),
                         "simulatability_decision_bal_acc": sim.get("decision", {}).get("balanced_accuracy"),
                         "diversity_distinct_2": d["diversity"].get("distinct_2"),
                         "diversity_self_bleu4": d["diversity"].get("self_bleu4"),
                         "plausibility_rouge_l": d.get("plausibility", {}).get("rouge_l_mean"),
                         "plausibility_bleu4": d.get("plausibility", {}).get("bleu4_corpus")}
    return out


def shortcut_metrics(run: RunDir, cfg: EvalConfig, classifier: dict[str, Any]) -> dict[str, Any]:
    """The audit of every finding; on a phantom world with a planted shortcut, whether the audit finds it."""
    from sae_cxr.audit import label_table, shortcut_group_rank, shortcut_label, shortcut_patterns, shortcut_rank
    from sae_cxr.contrast import audit_and_contrasts
    from sae_cxr.findings import Shortcut
    from sae_cxr.patterns import PATTERNS

    audit, by_source = audit_and_contrasts(run, cfg.audit_splits)
    out: dict[str, Any] = {"splits": list(cfg.audit_splits),
                           "nuisance_share": {a.finding: round(a.nuisance_share, 4) for a in audit.ranked()},
                           "top_nuisance_patterns": {a.finding: _records(a.patterns.head(5)) for a in audit.ranked()},
                           "top_nuisance_labels": {a.finding: _records(a.groups.head(5)) for a in audit.ranked()}}
    contrasts = by_source["records"]
    out["nuisance_contrast"] = {f: _contrast_records(t.head(5)) for f, t in contrasts.items()}
    label_contrasts = by_source.get("patterns", {})
    out["label_contrast"] = {f: _contrast_records(t.head(5)) for f, t in label_contrasts.items()}
    world = _world(run)
    if not world or not world.get("shortcut"):
        return out
    sc = Shortcut.parse(world["shortcut"])
    table = pd.read_parquet(run.verify(PATTERNS))
    truth = shortcut_patterns(table, sc.nuisance, cfg.shortcut_min_auroc)
    fa = audit.findings.get(sc.finding)
    rank = shortcut_rank(fa, truth) if fa is not None else None
    group_rank = shortcut_group_rank(fa, truth) if fa is not None else None
    separation_rank = shortcut_group_rank(fa, truth, by="separation") if fa is not None else None
    shift = {}
    if "test" in classifier and "test_shifted" in classifier:
        a0, a1 = classifier["test"][sc.finding]["auroc"], classifier["test_shifted"][sc.finding]["auroc"]
        shift = {"auroc_test": a0, "auroc_test_shifted": a1,
                 "auroc_drop": a0 - a1 if a0 is not None and a1 is not None else None}
    reliance = shortcut_reliance(run, sc.nuisance, sc.finding)
    label_rank = _planted_label_contrast(label_contrasts.get(sc.finding),
                                         shortcut_label(label_table(run), len(table), truth))
    out["planted"] = {"shortcut": str(sc), "nuisance": sc.nuisance, "finding": sc.finding, "reliance": reliance,
                      "truth_patterns": truth.tolist(), "pattern_rank": rank, "swing_rank": group_rank,
                      "separation_rank": separation_rank, **label_rank, "rank": label_rank.get("label_contrast_rank"),
                      "found": label_rank.get("label_contrast_rank") == 1,
                      "finding_rank_by_nuisance_share": 1 + [a.finding for a in audit.ranked()].index(sc.finding)
                      if fa is not None else None, **shift, **_planted_contrast(contrasts.get(sc.finding), sc.nuisance)}
    return out


def _contrast_records(t: pd.DataFrame) -> list[dict[str, Any]]:
    return [{**r, "carriers": c} for r, c in zip(_records(t.drop(columns="carriers")), t["carriers"])]


def _term_rank(table: pd.DataFrame | None, term: str, other_name: str) -> dict[str, Any] | None:
    """Where `term` ranks in a contrast table (`sae_cxr.contrast`, largest contrast first): its 1-based
    rank, contrast, se and carriers, and the best other term (named by column `other_name`) with the gap
    to it. None when the table has no such term."""
    hit = np.flatnonzero(table["term"].to_numpy() == term) if table is not None and not table.empty else []
    if not len(hit):
        return None
    i = int(hit[0])
    row, others = table.iloc[i], table.drop(index=table.index[i])
    best = others.iloc[0] if len(others) else None
    return {"rank": i + 1, "contrast": round(float(row["contrast"]), 4), "se": round(float(row["se"]), 4),
            "best_other": None if best is None else str(best[other_name]),
            "gap": None if best is None else round(float(row["contrast"] - best["contrast"]), 4),
            "carriers": row["carriers"]}


def _planted_label_contrast(table: pd.DataFrame | None, label: str | None) -> dict[str, Any]:
    """Where the planted nuisance's LABEL (`sae_cxr.audit.shortcut_label`) ranks among the finding's
    label detectors by adjusted logit contrast, with its contrast, se and the gap to the next label:
    the graded audit, since it needs nothing but the run's own patterns."""
    if label is None:
        return {"label_contrast_rank": None}
    r = _term_rank(table, f"label:{label}", "display")
    if r is None:
        return {"label": label, "label_contrast_rank": None}
    return {"label": label, "label_contrast_rank": r["rank"], "label_contrast": r["contrast"],
            "label_contrast_se": r["se"], "label_contrast_best_other": r["best_other"],
            "label_contrast_gap": r["gap"]}


def _planted_contrast(table: pd.DataFrame | None, nuisance: str) -> dict[str, Any]:
    """Where the planted nuisance ranks among the finding's device/artifact terms by adjusted logit contrast
    (`sae_cxr.contrast`), its contrast and standard error, and the gap to the best other term."""
    if table is None or table.empty:
        return {}
    r = _term_rank(table, f"concept:{nuisance}", "term")
    if r is None:
        return {"contrast_rank": None}
    return {"contrast_rank": r["rank"], "contrast": r["contrast"], "contrast_se": r["se"],
            "contrast_best_other": r["best_other"], "contrast_gap": r["gap"], "contrast_carriers": r["carriers"]}


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-safe dicts, numbers to 4 decimals, NaN (an undefined separation) as null."""
    df = df.round(4)
    return df.astype(object).where(df.notna(), None).to_dict(orient="records")


def shortcut_reliance(run: RunDir, nuisance: str, finding: str) -> float | None:
    """How much the classifier uses the planted nuisance: on test_shifted (where nuisance and finding
    are independent), the mean logit of `finding` with the nuisance minus without it, within each label
    and averaged over the two labels (logit units). None without test_shifted predictions."""
    from sae_cxr.attribution import PREDICTIONS
    from sae_cxr.ingest import open_run_dataset

    preds = pd.read_parquet(run.verify(PREDICTIONS), columns=["record_id", "split", "finding", "logit", "label"])
    preds = preds[(preds["split"] == "test_shifted") & (preds["finding"] == finding)]
    if preds.empty:
        return None
    has = {r.id: nuisance in r.concepts for r in open_run_dataset(run).records}
    preds = preds.assign(nuisance=preds["record_id"].map(has))
    gaps = []
    for _, g in preds.groupby("label"):
        on, off = g.loc[g["nuisance"] == True, "logit"], g.loc[g["nuisance"] == False, "logit"]  # noqa: E712
        if len(on) >= 5 and len(off) >= 5:
            gaps.append(float(on.mean() - off.mean()))
    return round(float(np.mean(gaps)), 4) if gaps else None


def grade(m: dict[str, Any], cfg: EvalConfig) -> dict[str, dict[str, Any]]:
    """Target checks: {name: {value, target, pass}}; a target whose metric is absent is left out."""
    g: dict[str, dict[str, Any]] = {}

    def check(name: str, value, target: str, ok: bool) -> None:
        g[name] = {"value": value, "target": target, "pass": bool(ok)}

    ens = m.get("ensemble", {})
    if "fvu" in ens:
        check("fvu_median", ens["fvu"]["median"], f"<= {cfg.fvu_max}", ens["fvu"]["median"] <= cfg.fvu_max)
    if "dead_fraction" in ens:
        v = ens["dead_fraction"]["median"]
        check("dead_fraction_median", v, f"<= {cfg.dead_max}", v <= cfg.dead_max)
    if "spliced_auroc_drop_worst_median" in ens:
        v = ens["spliced_auroc_drop_worst_median"]
        check("spliced_auroc_drop", v, f"<= {cfg.spliced_auroc_drop_max}", v <= cfg.spliced_auroc_drop_max)
    cr = m.get("patterns", {}).get("concept_recovery")
    if cr:
        share = cr["recovered"] / max(cr["concepts"], 1)
        check("concept_recovery", round(share, 4), f">= {cfg.concept_recovery_min}", share >= cfg.concept_recovery_min)
    acc = m.get("labels", {}).get("accuracy", {}).get("evidence")
    if acc:
        check("labeler_named", round(acc["named_correctly"], 4), f">= {cfg.labeler_named_min}",
              acc["named_correctly"] >= cfg.labeler_named_min)
        check("labeler_category", round(acc["category_correct"], 4), f">= {cfg.labeler_category_min}",
              acc["category_correct"] >= cfg.labeler_category_min)
    att = m.get("attribution", {})
    if att.get("completeness_error") is not None:
        v = att["completeness_error"]
        check("completeness_error", v, f"<= {cfg.completeness_error_max}", v <= cfg.completeness_error_max)
    f = att.get("faithfulness", {})
    if "deletion_area_top" in f:
        check("deletion_vs_random", [f["deletion_area_top"], f["deletion_area_random"]], "top > random",
              f["deletion_area_top"] > f["deletion_area_random"])
    loc = att.get("localization", {})
    if "with_baseline/pattern_gradcam" in loc and "with_baseline/logit_gradcam" in loc:
        # on the same boxes (findings with a logit baseline): the top pattern's own Grad-CAM against the
        # Grad-CAM of the finding's logit; the cheaper patch-token map is reported next to them, not graded
        # Pointing hits are 0/1 on a few hundred boxes, so the check is a paired one: the pattern map fails
        # when it is worse than the baseline beyond noise (the bootstrap interval of the paired difference
        # lies below 0), not when a point estimate is a few boxes behind.
        pm, gc = loc["with_baseline/pattern_gradcam"]["pointing_game"], loc["with_baseline/logit_gradcam"]["pointing_game"]
        pair = loc.get("paired/pointing_pattern_minus_logit")
        if pair:
            check("pointing_pattern_vs_logit_gradcam",
                  [round(pm, 4), round(gc, 4), [round(pair["ci_low"], 4), round(pair["ci_high"], 4)]],
                  f"pattern Grad-CAM not worse than logit Grad-CAM (paired {pair['level']:.0%} CI of the "
                  f"difference reaches 0)", pair["ci_high"] >= 0)
        else:
            check("pointing_pattern_vs_logit_gradcam", [round(pm, 4), round(gc, 4)],
                  "pattern Grad-CAM >= logit Grad-CAM", pm >= gc)
    planted = m.get("shortcut", {}).get("planted")
    if planted:
        if cr:
            got = cr["per_concept"].get(planted["nuisance"], {}).get("auroc", 0.0)
            check("shortcut_concept_recovered", got, ">= 0.9", got >= 0.9)
        used = planted.get("reliance") is None or abs(planted["reliance"]) >= cfg.shortcut_min_reliance
        if used:  # a shortcut the classifier does not use leaves nothing to find: reported, not graded
            check("shortcut_found", planted["rank"],
                  "its label ranks 1st among the finding's device/artifact label detectors by adjusted logit contrast",
                  planted["found"])
    return g


def evaluate(run: RunDir, cfg: EvalConfig) -> dict[str, Any]:
    """All metrics of a run (stages that have not run are left out) and the target grades."""
    m: dict[str, Any] = {"run": run.path.name, "world": _world(run)}
    steps = [("classifier", "train-classifier", lambda: classifier_metrics(run)),
             ("ensemble", "train-transcoders", lambda: ensemble_metrics(run)),
             ("patterns", "patterns", lambda: pattern_metrics(run)),
             ("attribution", "attribute", lambda: attribution_metrics(run)),
             ("labels", "label", lambda: label_metrics(run)),
             ("explanations", "explain", lambda: explanation_metrics(run))]
    for key, stage, fn in steps:
        if run.is_done(stage):
            m[key] = fn()
    if run.is_done("label") and "classifier" in m:
        m["shortcut"] = shortcut_metrics(run, cfg, m["classifier"])
    m["targets"] = grade(m, cfg)
    return m


def _plots(run: RunDir, m: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []

    def save(fig, key: str) -> None:
        fig.tight_layout()
        with atomic_path(run.sub(PLOTS[key])) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        written.append(PLOTS[key])

    if "ensemble" in m:
        from sae_cxr.transcoders.stage import METRICS as TC_METRICS

        raw = json.loads(run.sub(TC_METRICS).read_text())
        fig, axes = plt.subplots(1, 3, figsize=(10, 3))
        for ax, key, title in zip(axes, ("fvu", "l0", "dead_fraction"), ("FVU", "L0", "dead fraction")):
            ax.hist(raw[key], bins=20, color="#457b9d")
            ax.set_title(f"{title} over {len(raw[key])} members")
        save(fig, "ensemble")
    cr = m.get("patterns", {}).get("concept_recovery")
    if cr:
        names = sorted(cr["per_concept"], key=lambda c: -cr["per_concept"][c]["auroc"])
        vals = [cr["per_concept"][c]["auroc"] for c in names]
        fig, ax = plt.subplots(figsize=(8, 3.6))
        ax.bar(range(len(names)), vals, color=["#2a9d8f" if v >= 0.9 else "#e63946" for v in vals])
        ax.axhline(0.9, color="grey", ls=":")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_ylim(0.5, 1.0)
        ax.set_ylabel("best pattern AUROC")
        ax.set_title(f"concept recovery: {cr['recovered']}/{cr['concepts']} at AUROC >= 0.9")
        save(fig, "concepts")
    loc = m.get("attribution", {}).get("localization", {})
    methods = [k for k in ("all/pattern_map", "all/pattern_gradcam", "all/logit_gradcam") if k in loc]
    if methods:
        metrics = ("pointing_game", "iobb_hit@0.25", "pixel_auprc")
        fig, ax = plt.subplots(figsize=(6, 3.2))
        w = 0.8 / len(methods)
        for i, meth in enumerate(methods):
            ax.bar(np.arange(len(metrics)) + i * w, [loc[meth].get(k) or 0 for k in metrics], w,
                   label=f"{meth.split('/')[1]} (n={loc[meth]['n']})")
        ax.set_xticks(np.arange(len(metrics)) + 0.4 - w / 2, metrics)
        ax.legend(fontsize=8)
        ax.set_title("localization against ground-truth boxes")
        save(fig, "localization")
    curves = m.get("attribution", {}).get("curves", {})
    if curves:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for key, style, label in (("mean_curve_top", "o-", "delete top-n"), ("mean_curve_random", "s--", "delete random n"),
                                  ("mean_curve_keep_top", "^-", "keep only top-n")):
            if key in curves:
                ax.plot(curves[key], style, label=label)
        ax.set_xlabel("n patterns")
        ax.set_ylabel("share of decision logit removed")
        ax.legend(fontsize=8)
        save(fig, "deletion")
    planted = m.get("shortcut", {}).get("planted")
    tops = m.get("shortcut", {}).get("top_nuisance_patterns", {})
    if planted and tops.get(planted["finding"]):
        rows = tops[planted["finding"]]
        fig, ax = plt.subplots(figsize=(6.5, 3.2))
        truth = set(planted["truth_patterns"])
        ax.barh([f"#{r['pattern_id']} {r['label'][:28]}" for r in rows][::-1], [r["share"] for r in rows][::-1],
                color=["#e63946" if r["pattern_id"] in truth else "#8d99ae" for r in rows][::-1])
        ax.set_xlabel(f"share of {planted['finding']} evidence")
        ax.set_title(f"device/artifact evidence for {planted['finding']} (red: planted {planted['nuisance']})",
                     fontsize=9)
        save(fig, "audit")
    return written


def _num(v: float | None) -> str:
    return "n/a" if v is None or v != v else f"{v:.3f}"


def _ci_cell(v: dict[str, Any] | None) -> str:
    """'0.973 [0.964, 0.982]', or 'n/a' where the split has no positives (AUROC undefined)."""
    if not v or v.get("auroc") is None:
        return "n/a"
    lo, hi = v["auroc_ci"]
    return f"{v['auroc']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


def summary_markdown(m: dict[str, Any]) -> str:
    """A one-page Markdown summary: targets first, then the headline numbers per stage."""
    lines = [f"# Evaluation of run `{m['run']}`", ""]
    if m.get("world"):
        w = m["world"]
        lines += [f"World: phantom seed {w.get('seed')}, {w.get('n')} images of {w.get('size')} px, "
                  f"prevalence x{w.get('prevalence_scale')}, shortcut `{w.get('shortcut')}`.", ""]
    lines += ["## Targets", "", "| check | value | target | |", "|---|---|---|---|"]
    for name, t in m["targets"].items():
        lines.append(f"| {name} | {t['value']} | {t['target']} | {'pass' if t['pass'] else '**FAIL**'} |")
    if "classifier" in m:
        lines += ["", "## Classifier AUROC", "", "| finding | " + " | ".join(m["classifier"]) + " |",
                  "|---|" + "---|" * len(m["classifier"])]
        first = next(iter(m["classifier"].values()))
        for f in first:
            cells = []
            for split in m["classifier"]:
                v = m["classifier"][split].get(f)
                cells.append(_ci_cell(v))
            lines.append(f"| {f} | " + " | ".join(cells) + " |")
    cr = m.get("patterns", {}).get("concept_recovery")
    if cr:
        lines += ["", f"## Concept recovery: {cr['recovered']}/{cr['concepts']}", "",
                  "| concept | best pattern | AUROC | linear-probe AUROC (the embedding's ceiling) | stability "
                  "| best absence pattern: 1 - AUROC | weakest under: AUROC with / without |",
                  "|---|---|---|---|---|---|---|"]
        for c, v in sorted(cr["per_concept"].items(), key=lambda kv: -(kv[1]["auroc"] or 0)):
            if v.get("auroc") is None:
                continue
            absence = f"{v['absence_pattern']}: {v['absence_auroc']:.3f}" if "absence_auroc" in v else ""
            w = v.get("weakest_stratum")
            weakest = f"{w['nuisance']}: {w['auroc_with']:.3f} / {_num(w['auroc_without'])}" if w else ""
            lines.append(f"| {c} | {v['pattern']} | {v['auroc']:.3f} | {_num(v.get('probe_auroc'))} | "
                         f"{v['stability']:.2f} | {absence} | {weakest} |")
        if cr.get("recovered_as_absence"):
            lines += ["", "Recovered only as their absence (a pattern that fires where the concept is missing; "
                      "not counted above): " + ", ".join(
                          f"{c} (pattern {cr['per_concept'][c]['absence_pattern']}, "
                          f"{cr['per_concept'][c]['absence_auroc']:.3f})" for c in cr["recovered_as_absence"]) + "."]
    loc = (m.get("attribution") or {}).get("localization", {})
    if loc:
        lines += ["", "## Localization against the boxes", "", "| boxes / method | n | pointing | IoBB>=0.25 | pixel AUPRC |",
                  "|---|---|---|---|---|"]
        for key, v in loc.items():
            if "pointing_game" not in v:
                continue
            auprc = v.get("pixel_auprc")
            lines.append(f"| {key} | {v['n']} | {v['pointing_game']:.3f} | {v['iobb_hit@0.25']:.3f} | "
                         f"{'' if auprc is None else f'{auprc:.3f}'} |")
        pair = loc.get("paired/pointing_pattern_minus_logit")
        if pair:
            lines += ["", f"Paired on the same {pair['n']} boxes, pattern Grad-CAM minus logit Grad-CAM pointing: "
                          f"{pair['difference']:+.3f} ({pair['level']:.0%} bootstrap CI {pair['ci_low']:+.3f} to "
                          f"{pair['ci_high']:+.3f})."]
    att = m.get("attribution")
    if att:
        ppp = att.get("patterns_per_prediction") or {}
        lines += ["", "## Attribution", "", f"- completeness error: {att.get('completeness_error')}",
                  f"- patterns per prediction: median {ppp.get('median')} (p10 {ppp.get('p10')}, p90 {ppp.get('p90')})"]
        f = att.get("faithfulness", {})
        if f:
            lines.append(f"- deletion area top {f.get('deletion_area_top')} vs random {f.get('deletion_area_random')}; "
                         f"comprehensiveness@5 {f.get('comprehensiveness@5')} vs random {f.get('random_deletion@5')}")
    sc = m.get("shortcut", {})
    if sc.get("planted"):
        p = sc["planted"]
        lines += ["", "## Shortcut audit", "",
                  f"Planted `{p['shortcut']}`: truth patterns {p['truth_patterns']}; among the device/artifact "
                  f"evidence for {p['finding']}, the label holding them ({p.get('label')}) ranks {p['rank']} by "
                  f"adjusted logit contrast of its detector ({'found' if p['found'] else 'not found'}: "
                  f"{_num(p.get('label_contrast'))} ± {_num(p.get('label_contrast_se'))} logit, gap to "
                  f"{p.get('label_contrast_best_other')}: {_num(p.get('label_contrast_gap'))}), "
                  f"{p.get('swing_rank')} by swing, and its best single pattern ranks {p.get('pattern_rank')} by swing; "
                  f"the classifier's reliance on it: {_num(p.get('reliance'))} logit on test_shifted; "
                  f"AUROC test {_num(p.get('auroc_test'))} -> test_shifted {_num(p.get('auroc_test_shifted'))}. "
                  f"Ranked by separation (the margin between {p['finding']} positives and negatives that a label's "
                  f"patterns supply) instead of swing, the label ranks {p.get('separation_rank')}."]
        if p.get("contrast_rank") is not None:
            carriers = ", ".join(f"{'rest of the logit' if c['pattern_id'] == -1 else '#' + str(c['pattern_id'])}"
                                 f"{' (' + c['label'] + ')' if c.get('label') else ''} {_num(c.get('share'))}"
                                 for c in p.get("contrast_carriers") or [])
            lines += ["", f"Adjusted logit contrast among {p['finding']}-negative images (`sae_cxr.contrast`: the logit "
                      f"change that comes with the nuisance, other findings held fixed): {_num(p.get('contrast'))} "
                      f"± {_num(p.get('contrast_se'))} logit, rank {p['contrast_rank']} among device/artifact terms "
                      f"(gap to {p.get('contrast_best_other')}: {_num(p.get('contrast_gap'))}); carried by {carriers}."]
        groups = (sc.get("top_nuisance_labels") or {}).get(p["finding"]) or []
        if groups:
            lines += ["", f"| device/artifact label on {p['finding']} | patterns | swing (logit) | separation (logit) "
                      "| share of evidence |", "|---|---|---|---|---|"]
            lines += [f"| {g['label']} | {g['n_patterns']} | {g['swing']:.3f} | {_num(g.get('separation'))} | "
                      f"{g['share']:.3f} |" for g in groups]
    if sc.get("nuisance_share"):
        lines += ["", "| finding | device/artifact share of evidence |", "|---|---|"]
        lines += [f"| {f} | {v:.3f} |" for f, v in sc["nuisance_share"].items()]
    return "\n".join(lines) + "\n"


def run_eval(run: RunDir, cfg: EvalConfig) -> tuple[list[str], dict[str, Any]]:
    m = evaluate(run, cfg)
    write_json_atomic(run.sub(METRICS), m)
    plots = _plots(run, m)
    with atomic_path(run.sub(SUMMARY_MD)) as tmp:
        tmp.write_text(summary_markdown(m))
    t = m["targets"]
    summary = {"targets_passed": sum(v["pass"] for v in t.values()), "targets": len(t),
               "failed": [k for k, v in t.items() if not v["pass"]]}
    return [EVAL_DIR], summary
