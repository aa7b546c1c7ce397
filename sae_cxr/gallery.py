"""Activation galleries: what each pattern fires on, stored compactly, rendered on demand.

Per pattern, from the sparse pattern activations of the patterns stage:
- top: the top-k activating images of the labelling splits (train, val);
- quantile: samples from activation quantile bins, so a gallery shows weak firings too;
- negative: random labelling-split images where the pattern does not fire;
- heldout_top / heldout_negative: the same from the evaluation splits (test, test_shifted), kept
  apart so verification never scores a label on the images it was named from;
- a density histogram of log10 activations, and the share of images where it is silent;
- enrichment: findings and concepts over-represented among the top images (lift vs base rate),
  a quick view; the evidence labeler does the statistics.
Only indices and values are stored (galleries/galleries.parquet); images are drawn on demand with
the pattern's spatial map.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from sae_cxr.findings import CONCEPT_NAMES, FINDINGS
from sae_cxr.index import IndexConfig
from sae_cxr.run import RunDir, atomic_path, write_json_atomic

GAL_DIR = "galleries"
GALLERIES = "galleries/galleries.parquet"
HISTOGRAMS = "galleries/histograms.safetensors"
ENRICHMENT = "galleries/enrichment.json"
FIT_SPLITS = ("train", "val")
HELDOUT_SPLITS = ("test", "test_shifted")


@dataclass
class GalleryConfig:
    """What each pattern's gallery keeps."""

    top_k: int = 20
    quantile_bins: int = 5
    per_quantile: int = 4
    negatives: int = 8
    heldout_top: int = 20
    heldout_negatives: int = 20
    histogram_bins: int = 30
    seed: int = 0
    index: IndexConfig = field(default_factory=IndexConfig)
    """The run's FAISS indices: type by size (exact, HNSW/IVF, IVF-PQ above compressed_above),
    shards by size (max_shard_bytes), recall@k against exact search measured on a sample."""


def build_galleries(act_rows: np.ndarray, act_cols: np.ndarray, act_vals: np.ndarray, n: int, p: int,
                    splits: np.ndarray, valid: np.ndarray, cfg: GalleryConfig) -> pd.DataFrame:
    """Gallery entries (pattern_id, kind, rank, row, activation) from sparse activations."""
    rng = np.random.default_rng(cfg.seed)
    fit = valid & np.isin(splits, FIT_SPLITS)
    held = valid & np.isin(splits, HELDOUT_SPLITS)
    order = np.argsort(act_cols, kind="stable")
    cols_sorted = act_cols[order]
    bounds = np.searchsorted(cols_sorted, np.arange(p + 1))
    out: dict[str, list] = {k: [] for k in ("pattern_id", "kind", "rank", "row", "activation")}

    def emit(pid: int, kind: str, rows: np.ndarray, vals: np.ndarray) -> None:
        for rank, (r, v) in enumerate(zip(rows, vals)):
            out["pattern_id"].append(pid)
            out["kind"].append(kind)
            out["rank"].append(rank)
            out["row"].append(int(r))
            out["activation"].append(float(v))

    for pid in range(p):
        sl = order[bounds[pid]:bounds[pid + 1]]
        rows, vals = act_rows[sl], act_vals[sl]
        for mask, kind_top, kind_neg, k_top, k_neg in ((fit, "top", "negative", cfg.top_k, cfg.negatives),
                                                       (held, "heldout_top", "heldout_negative", cfg.heldout_top,
                                                        cfg.heldout_negatives)):
            sel = mask[rows]
            r, v = rows[sel], vals[sel]
            top = np.argsort(-v, kind="stable")[:k_top]
            emit(pid, kind_top, r[top], v[top])
            silent = np.setdiff1d(np.flatnonzero(mask), r, assume_unique=False)
            if len(silent):
                neg = rng.choice(silent, size=min(k_neg, len(silent)), replace=False)
                emit(pid, kind_neg, neg, np.zeros(len(neg)))
            if kind_top == "top" and len(v) > cfg.top_k:
                edges = np.quantile(v, np.linspace(0, 1, cfg.quantile_bins + 1))
                picks_r, picks_v = [], []
                for q in range(cfg.quantile_bins):
                    inbin = np.flatnonzero((v >= edges[q]) & (v <= edges[q + 1]))
                    if len(inbin):
                        ch = rng.choice(inbin, size=min(cfg.per_quantile, len(inbin)), replace=False)
                        ch = ch[np.argsort(-v[ch])]
                        picks_r += r[ch].tolist()
                        picks_v += v[ch].tolist()
                emit(pid, "quantile", np.array(picks_r), np.array(picks_v))
    return pd.DataFrame(out)


def density_histograms(act_cols: np.ndarray, act_vals: np.ndarray, p: int, n_valid: int, bins: int
                       ) -> dict[str, np.ndarray]:
    """Histogram of log10 activation per pattern over shared edges, and each pattern's silent share."""
    pos = act_vals > 0
    logv = np.log10(act_vals[pos])
    lo, hi = (float(logv.min()), float(logv.max())) if len(logv) else (-3.0, 0.0)
    edges = np.linspace(lo, hi + 1e-6, bins + 1)
    counts = np.zeros((p, bins), dtype=np.int64)
    b = np.clip(np.searchsorted(edges, logv, side="right") - 1, 0, bins - 1)
    np.add.at(counts, (act_cols[pos], b), 1)
    firing = np.bincount(act_cols[pos], minlength=p)
    return {"counts": counts, "log10_edges": edges.astype(np.float64),
            "silent_fraction": (1.0 - firing / max(n_valid, 1)).astype(np.float64)}


def enrichment(gal: pd.DataFrame, ds, valid: np.ndarray, p: int, top_n: int = 5) -> dict[int, list[dict[str, Any]]]:
    """Lift of each finding label and concept among a pattern's top images over its base rate."""
    labels = ds.labels()
    have_concepts = any(r.concepts for r in ds.records)
    terms = list(FINDINGS) + (list(CONCEPT_NAMES) if have_concepts else [])
    M = np.zeros((len(ds), len(terms)), dtype=np.float64)
    M[:, :len(FINDINGS)] = np.nan_to_num(labels, nan=0.0)
    if have_concepts:
        for i, r in enumerate(ds.records):
            for c in r.concepts:
                if c in CONCEPT_NAMES:
                    M[i, len(FINDINGS) + CONCEPT_NAMES.index(c)] = 1.0
    base = M[valid].mean(0)
    out: dict[int, list[dict[str, Any]]] = {}
    top = gal[gal["kind"] == "top"]
    for pid, grp in top.groupby("pattern_id"):
        rate = M[grp["row"].to_numpy()].mean(0)
        lift = np.where(base > 0, rate / np.maximum(base, 1e-12), 0.0)
        best = np.argsort(-(lift * (rate >= 0.3)))[:top_n]
        out[int(pid)] = [{"term": terms[j], "rate": round(float(rate[j]), 3), "base": round(float(base[j]), 3),
                          "lift": round(float(lift[j]), 2)} for j in best if rate[j] > 0]
    return out


def run_galleries(run: RunDir, cfg: GalleryConfig, seed: int = 0) -> tuple[list[str], dict[str, Any]]:
    from safetensors.numpy import save_file

    from sae_cxr.extract import EmbeddingStore
    from sae_cxr.ingest import open_run_dataset
    from sae_cxr.patterns import load_activations

    ds = open_run_dataset(run)
    store = EmbeddingStore(run)
    rows, cols, vals, (n, p) = load_activations(run)
    splits = np.array([r.split for r in ds.records])
    valid = store.valid
    gal = build_galleries(rows, cols, vals, n, p, splits, valid, cfg)
    gal["record_id"] = [ds.records[r].id for r in gal["row"]]
    gal["split"] = splits[gal["row"].to_numpy()] if len(gal) else []
    run.sub(GAL_DIR).mkdir(parents=True, exist_ok=True)
    with atomic_path(run.sub(GALLERIES)) as tmp:
        gal.to_parquet(tmp, index=False)
    hist = density_histograms(cols, vals, p, int(valid.sum()), cfg.histogram_bins)
    with atomic_path(run.sub(HISTOGRAMS)) as tmp:
        save_file(hist, str(tmp))
    enr = enrichment(gal, ds, valid, p)
    write_json_atomic(run.sub(ENRICHMENT), {str(k): v for k, v in enr.items()})
    outputs = [GAL_DIR]
    summary: dict[str, Any] = {"patterns": p, "entries": int(len(gal)),
                               "patterns_with_heldout_top": int(gal[gal["kind"] == "heldout_top"]["pattern_id"].nunique())}
    from sae_cxr.search import build_run_indices

    idx_outputs, idx_summary = build_run_indices(run, store, cfg.index)
    outputs += idx_outputs
    summary["indices"] = idx_summary
    return outputs, summary


def load_galleries(run: RunDir) -> pd.DataFrame:
    run.require("galleries")
    return pd.read_parquet(run.verify(GALLERIES))


def load_histograms(run: RunDir) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run.verify(HISTOGRAMS)))


def load_enrichment(run: RunDir) -> dict[int, list[dict[str, Any]]]:
    return {int(k): v for k, v in json.loads(run.verify(ENRICHMENT).read_text()).items()}


def config_dict(cfg: GalleryConfig) -> dict[str, Any]:
    return asdict(cfg)
