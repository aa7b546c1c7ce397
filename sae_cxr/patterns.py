"""Patterns: latents of all ensemble members consolidated into stable, scored units.

Steps (the summary reports how many latents or patterns each one kept):
1. Measure every latent (E x m) on a probe set: firing frequency and an activation profile
   (a random projection of its activations over the probe images, so profile cosines estimate
   co-activation cosines).
2. Drop dead latents (fire on fewer than `min_frequency` of probe images) and dense ones (more
   than `max_frequency`).
3. Match latents ACROSS members by the mean of three cosines: decoder direction, encoder
   direction and co-activation profile, with exact FAISS k-NN.
4. Seed-and-assign clustering: latents in order of their best cross-member match seed a pattern
   and take, from every other member, the single most similar unassigned latent above the
   threshold. A pattern thus holds at most one latent per member and its stability is the share
   of members that found it. The threshold defaults to Otsu's split of the best-match
   similarities, whose distribution is bimodal (latents that recur across seeds vs idiosyncratic
   ones); `patterns/threshold.png` shows it with the pattern count and stability it implies.
5. Keep patterns found by at least `min_stability` of the members; the rest of their latents
   become "unassigned" (an explicit attribution entry).

A pattern's activation on an image is the member mean (1/E) * sum of its latents' activations,
the same averaging the exact attribution uses.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from sae_cxr.findings import CONCEPT_NAMES, FINDINGS
from sae_cxr.progress import progress_bar
from sae_cxr.run import RunDir, atomic_path, write_json_atomic
from sae_cxr.stats import auroc_rows

log = logging.getLogger("sae_cxr.patterns")

PATTERNS = "patterns.parquet"
PAT_DIR = "patterns"
ARRAYS = "patterns/arrays.safetensors"
ACTIVATIONS = "patterns/activations.safetensors"
SUMMARY = "patterns/summary.json"
PLOT = "patterns/threshold.png"


@dataclass
class PatternConfig:
    """Consolidation of ensemble latents into patterns."""

    probe_size: int = 4096
    """Images (train and val) on which latents are measured and matched."""
    min_frequency: float = 0.002
    """Latents firing on a smaller share of probe images are dead."""
    max_frequency: float = 0.4
    """Latents firing on a larger share are dense (bias-like) and are not patterns."""
    profile_dims: int = 256
    """Random-projection width of the activation profiles."""
    neighbors: int = 0
    """Neighbours examined per latent; 0 = 3 x the number of members."""
    weight_decoder: float = 1.0
    weight_encoder: float = 1.0
    weight_activation: float = 1.0
    threshold: float | None = 0.5
    """Similarity needed to join a pattern; None = Otsu's threshold on the best-match distribution.
    0.5 by default: Otsu splits the best-match histogram high (0.81 on the demo) and leaves most
    latents of a concept unassigned, so each concept's evidence scatters over singletons."""
    threshold_bounds: tuple[float, float] = (0.35, 0.9)
    """Clamp for the automatic threshold (guards a unimodal distribution)."""
    min_stability: float = 0.1
    """Keep patterns found by at least this share of members."""
    top_k: int = 20
    """Top images used for purity scores."""
    batch_size: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.min_frequency < self.max_frequency <= 1:
            raise ValueError("need 0 < min_frequency < max_frequency <= 1")
        if self.threshold is not None and not -1 <= self.threshold <= 1:
            raise ValueError("threshold is a cosine similarity in [-1, 1]")
        if isinstance(self.threshold_bounds, list):
            self.threshold_bounds = tuple(self.threshold_bounds)


@dataclass
class LatentStats:
    frequency: np.ndarray  # [E, m] share of probe images where the latent fires
    mean_active: np.ndarray  # [E, m] mean activation where it fires
    profile: np.ndarray  # [E * m, r] random projection of the activation column


def latent_stats(ensemble, x: torch.Tensor, cfg: PatternConfig) -> LatentStats:
    """Frequency, mean activation and co-activation profile of every latent on probe inputs x [N, d_in].

    The profile is A^T R for the [N, E*m] activation matrix A and a Gaussian R [N, r] / sqrt(r), built
    one batch at a time with a dense matmul (cheaper than scattering every active entry)."""
    E, m = ensemble.cfg.n_members, ensemble.cfg.n_latents
    N = len(x)
    g = torch.Generator().manual_seed(cfg.seed)
    R = torch.randn(N, cfg.profile_dims, generator=g) / cfg.profile_dims ** 0.5
    count = torch.zeros(E * m)
    total = torch.zeros(E * m)
    profile = torch.zeros(E * m, cfg.profile_dims)
    step = max(1, min(cfg.batch_size, 4_000_000 // (E * m)))
    for s in range(0, N, step):
        dense = ensemble.encode(x[s:s + step]).to_dense().reshape(-1, E * m).float()
        count += (dense > 0).sum(0)
        total += dense.sum(0)
        profile.addmm_(dense.T, R[s:s + len(dense)])
    freq = (count / N).view(E, m).numpy()
    mean_active = (total / count.clamp(min=1)).view(E, m).numpy()
    return LatentStats(freq, mean_active, profile.numpy())


def _unit(a: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.maximum(n, 1e-12)


def match_features(ensemble, stats: LatentStats, alive: np.ndarray, cfg: PatternConfig) -> np.ndarray:
    """[n_alive, D] features whose inner product is the weighted mean of the three cosines."""
    E, m = ensemble.cfg.n_members, ensemble.cfg.n_latents
    dec = ensemble.W_dec.detach().cpu().reshape(E * m, -1).numpy()[alive]
    enc = ensemble.W_enc.detach().cpu().reshape(E * m, -1).numpy()[alive]
    act = stats.profile[alive]
    w = np.array([cfg.weight_decoder, cfg.weight_encoder, cfg.weight_activation], dtype=np.float64)
    w = w / w.sum()
    parts = [_unit(a) * np.sqrt(wi) for a, wi in zip((dec, enc, act), w) if wi > 0]
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


def knn(features: np.ndarray, k: int, exact_below: int = 8000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Inner-product k-NN of every row against all rows (FAISS): exact for small sets, IVF above.

    Matching only needs the close neighbours (similarity above the threshold), which IVF with a
    generous nprobe finds reliably; exact all-pairs search is quadratic in E x m."""
    import faiss

    n, d = features.shape
    k = min(k, n)
    if n < exact_below:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(2 ** round(np.log2(2 * np.sqrt(n))))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        index.train(features[rng.choice(n, size=min(n, 64 * nlist), replace=False)])
        index.nprobe = max(8, nlist // 8)
    index.add(features)
    sims, nbrs = index.search(features, k)
    return sims, nbrs


def otsu_threshold(values: np.ndarray, bins: int = 100) -> float:
    """Otsu's threshold: the cut that maximises the between-class variance of a 1-D sample."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 2 or v.min() == v.max():
        return float(v.mean()) if len(v) else 0.0
    hist, edges = np.histogram(v, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centers)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def seed_and_assign(member: np.ndarray, sims: np.ndarray, nbrs: np.ndarray, order: np.ndarray, threshold: float
                    ) -> list[list[int]]:
    """Clusters over rows: each seed takes, per other member, its most similar unassigned neighbour
    with similarity >= threshold. Rows index the alive latents; `member` gives each row's member."""
    assigned = np.zeros(len(member), dtype=bool)
    clusters: list[list[int]] = []
    for seed in order:
        if assigned[seed]:
            continue
        taken = {int(member[seed])}
        cluster = [int(seed)]
        assigned[seed] = True
        for s, j in zip(sims[seed], nbrs[seed]):
            if j < 0 or s < threshold:
                break  # neighbours come sorted by similarity
            if assigned[j] or int(member[j]) in taken:
                continue
            taken.add(int(member[j]))
            cluster.append(int(j))
            assigned[j] = True
        clusters.append(cluster)
    return clusters


def best_cross_member(member: np.ndarray, sims: np.ndarray, nbrs: np.ndarray) -> np.ndarray:
    """Each row's highest similarity to a latent of ANOTHER member (-1 if none among the neighbours)."""
    other = (nbrs >= 0) & (member[np.clip(nbrs, 0, None)] != member[:, None])
    masked = np.where(other, sims, -1.0)
    return masked.max(axis=1)


@dataclass
class PatternSet:
    """The consolidated patterns and the latent -> pattern map."""

    latent_pattern: np.ndarray  # [E, m] int32 pattern id, -1 = unassigned
    members: list[list[tuple[int, int]]]  # per pattern: (member, latent)
    n_members: int

    @property
    def n_patterns(self) -> int:
        return len(self.members)

    def stability(self) -> np.ndarray:
        return np.array([len({e for e, _ in mem}) / self.n_members for mem in self.members])


def consolidate(ensemble, x_probe: torch.Tensor, cfg: PatternConfig, plot_path=None
                ) -> tuple[PatternSet, dict[str, Any], LatentStats]:
    """Steps 1-5 of the module docstring. Returns the patterns, a step-by-step summary and the stats."""
    E, m = ensemble.cfg.n_members, ensemble.cfg.n_latents
    stats = latent_stats(ensemble, x_probe, cfg)
    freq = stats.frequency.reshape(-1)
    dead = freq < cfg.min_frequency
    dense = freq > cfg.max_frequency
    alive = ~dead & ~dense
    rows = np.flatnonzero(alive)
    member = rows // m
    summary: dict[str, Any] = {"latents": int(E * m), "dead": int(dead.sum()), "dense": int(dense.sum()),
                               "alive": int(alive.sum())}
    if len(rows) == 0:
        raise ValueError(f"no latent fires on between {cfg.min_frequency} and {cfg.max_frequency} of the "
                         f"{len(x_probe)} probe images: the ensemble looks untrained or the probe set is wrong")
    feats = match_features(ensemble, stats, alive, cfg)
    k = cfg.neighbors or 3 * E
    sims, nbrs = knn(feats, k + 1)
    best = best_cross_member(member, sims, nbrs)
    if cfg.threshold is None:
        lo, hi = cfg.threshold_bounds
        threshold = float(np.clip(otsu_threshold(best[best > -1]), lo, hi))
        how = "otsu"
    else:
        threshold, how = float(cfg.threshold), "configured"
    order = np.lexsort((-freq[rows], -best))  # best cross-member match first, then frequency
    clusters = seed_and_assign(member, sims, nbrs, order, threshold)
    n_mem = np.array([len(c) for c in clusters])
    keep = n_mem / E >= cfg.min_stability
    kept = [clusters[i] for i in np.flatnonzero(keep)]
    # order patterns: most stable first, then most frequent
    kept.sort(key=lambda c: (-len(c), -float(freq[rows[c]].mean())))
    latent_pattern = np.full(E * m, -1, dtype=np.int32)
    members: list[list[tuple[int, int]]] = []
    for pid, c in enumerate(kept):
        lat = rows[c]
        latent_pattern[lat] = pid
        members.append([(int(l // m), int(l % m)) for l in lat])
    summary.update({"threshold": round(threshold, 4), "threshold_method": how, "clusters": len(clusters),
                    "singletons": int((n_mem == 1).sum()), "patterns": len(kept),
                    "latents_in_patterns": int((latent_pattern >= 0).sum()),
                    "latents_unassigned": int(alive.sum() - (latent_pattern >= 0).sum()),
                    "min_stability": cfg.min_stability})
    if plot_path is not None:
        _threshold_plot(best, member, sims, nbrs, rows, freq, threshold, E, cfg, plot_path)
    return PatternSet(latent_pattern.reshape(E, m), members, E), summary, stats


def _threshold_plot(best, member, sims, nbrs, rows, freq, threshold, E, cfg, path) -> None:
    """Histogram of best cross-member similarities, with patterns and stability for each threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(cfg.threshold_bounds[0] - 0.1, min(0.98, cfg.threshold_bounds[1] + 0.05), 13)
    order = np.lexsort((-freq[rows], -best))
    n_pat, mean_stab = [], []
    for t in grid:
        cl = seed_and_assign(member, sims, nbrs, order, float(t))
        sizes = np.array([len(c) for c in cl])
        ok = sizes / E >= cfg.min_stability
        n_pat.append(int(ok.sum()))
        mean_stab.append(float((sizes[ok] / E).mean()) if ok.any() else 0.0)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].hist(best[best > -1], bins=60, color="#457b9d")
    ax[0].axvline(threshold, color="#e63946", lw=2, label=f"threshold {threshold:.2f}")
    ax[0].set_xlabel("best similarity to a latent of another member")
    ax[0].set_ylabel("latents")
    ax[0].legend()
    ax[0].set_title("cross-member matches (bimodal: recurring vs idiosyncratic)")
    ax[1].plot(grid, n_pat, "o-", color="#2a9d8f", label="patterns kept")
    ax[1].axvline(threshold, color="#e63946", lw=2)
    ax[1].set_xlabel("threshold")
    ax[1].set_ylabel("patterns kept")
    ax2 = ax[1].twinx()
    ax2.plot(grid, mean_stab, "s--", color="#f4a261", label="mean stability")
    ax2.set_ylabel("mean stability")
    ax[1].set_title("what the threshold implies")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def pattern_activations(ensemble, patterns: PatternSet, x: torch.Tensor, batch_size: int = 1024,
                        progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse pattern activations on inputs x [N, d_in]: (rows, cols, values), value = (1/E) sum of
    the pattern's latents' activations."""
    E = patterns.n_members
    lp = torch.from_numpy(patterns.latent_pattern.astype(np.int64))
    P = patterns.n_patterns
    rows_out, cols_out, vals_out = [], [], []
    with progress_bar(total=len(x), desc="pattern activations", unit="img", disable=not progress) as bar:
        for s in range(0, len(x), batch_size):
            codes = ensemble.encode(x[s:s + batch_size])
            vals, idx = codes.values.float(), codes.indices
            B = vals.shape[0]
            pid = lp[torch.arange(E).view(1, E, 1), idx.clamp(min=0)]
            ok = (idx >= 0) & (pid >= 0) & (vals > 0)
            dense = torch.zeros(B, P + 1)
            dense.index_put_((torch.arange(B).view(B, 1, 1).expand_as(pid)[ok], pid[ok]), vals[ok] / E,
                             accumulate=True)
            nz = dense[:, :P].nonzero(as_tuple=False)
            rows_out.append((nz[:, 0] + s).numpy().astype(np.int64))
            cols_out.append(nz[:, 1].numpy().astype(np.int32))
            vals_out.append(dense[nz[:, 0], nz[:, 1]].numpy().astype(np.float32))
            bar.update(B)
    cat = (lambda a, dt: np.concatenate(a) if a else np.zeros(0, dt))
    return cat(rows_out, np.int64), cat(cols_out, np.int32), cat(vals_out, np.float32)


def dense_activations(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n: int, p: int) -> np.ndarray:
    out = np.zeros((n, p), dtype=np.float32)
    out[rows, cols] = vals
    return out


def monosemanticity_score(act: np.ndarray, emb: np.ndarray) -> np.ndarray:
    """Pach et al. (2025) MS for each column of act [N, P]: the activation-weighted mean pairwise cosine
    similarity, over distinct image pairs, of the images it fires on, in embedding space emb [N, D].

    With a = min-max normalised activations and unit rows x: sum_{n != m} a_n a_m x_n.x_m
    = ||X^T a||^2 - sum_n a_n^2, divided by (sum a)^2 - sum a^2.
    """
    X = _unit(emb.astype(np.float64))
    A = act.astype(np.float64)
    lo, hi = A.min(axis=0), A.max(axis=0)
    A = (A - lo) / np.where(hi > lo, hi - lo, 1.0)
    XtA = X.T @ A
    num = (XtA ** 2).sum(axis=0) - (A ** 2).sum(axis=0)
    den = A.sum(axis=0) ** 2 - (A ** 2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def concept_scores(act: np.ndarray, truth: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """AUROC [P, C] of each pattern's activation for each binary truth column, and top-k purity [P, C]."""
    P, C = act.shape[1], truth.shape[1]
    au = np.full((P, C), np.nan)
    for c in range(C):
        y = truth[:, c]
        keep = ~np.isnan(y)
        if keep.sum() == 0 or y[keep].min() == y[keep].max():
            continue
        au[:, c] = auroc_rows(np.broadcast_to(y[keep], (P, keep.sum())), act[keep].T)
    k = min(top_k, len(act))
    top = np.argsort(-act, axis=0, kind="stable")[:k]  # [k, P]
    purity = np.nanmean(truth[top], axis=0) if k else np.full((P, C), np.nan)  # [P, C]
    return au, purity


def run_patterns(run: RunDir, cfg: PatternConfig, seed: int = 0, progress: bool = True
                 ) -> tuple[list[str], dict[str, Any]]:
    from safetensors.numpy import save_file

    from sae_cxr.classifier import load_head
    from sae_cxr.extract import EmbeddingStore
    from sae_cxr.ingest import open_run_dataset
    from sae_cxr.transcoders.stage import load_ensemble

    ds = open_run_dataset(run)
    store = EmbeddingStore(run)
    ens = load_ensemble(run)
    head = load_head(run)
    x_all = torch.from_numpy(store.features()).float()
    valid = store.valid
    splits = np.array([r.split for r in ds.records])
    fit_rows = np.flatnonzero(valid & np.isin(splits, ["train", "val"]))
    rng = np.random.default_rng(cfg.seed)
    probe = np.sort(rng.choice(fit_rows, size=min(cfg.probe_size, len(fit_rows)), replace=False))
    run.sub(PAT_DIR).mkdir(parents=True, exist_ok=True)
    patterns, summary, stats = consolidate(ens, x_all[probe], cfg, plot_path=run.sub(PLOT))
    if patterns.n_patterns == 0:
        raise ValueError(f"no pattern reached stability {cfg.min_stability}; lower patterns.min_stability "
                         f"(summary: {summary})")
    rows, cols, vals = pattern_activations(ens, patterns, x_all, progress=progress)
    rows_valid = valid[rows]
    rows, cols, vals = rows[rows_valid], cols[rows_valid], vals[rows_valid]
    N, P = len(x_all), patterns.n_patterns
    act = dense_activations(rows, cols, vals, N, P)
    table = pattern_table(ens, head, patterns, stats, act, ds, store, valid, fit_rows, cfg)
    arrays = pattern_arrays(ens, head, patterns)
    with atomic_path(run.sub(ARRAYS)) as tmp:
        save_file(arrays, str(tmp))
    with atomic_path(run.sub(ACTIVATIONS)) as tmp:
        save_file({"rows": rows, "cols": cols, "values": vals, "shape": np.array([N, P], dtype=np.int64)}, str(tmp))
    with atomic_path(run.sub(PATTERNS)) as tmp:
        table.to_parquet(tmp, index=False)
    if "best_concept" in table:
        share = ds.concept_truth()[valid].mean(0) if valid.any() else np.zeros(len(CONCEPT_NAMES))
        recovery = concept_recovery(table, prevalence=dict(zip(CONCEPT_NAMES, share.tolist())))
    else:
        recovery = {}
    summary.update({"frequency_on_all_images_median": float(table["frequency"].median()),
                    "stability_median": float(table["stability"].median())})
    if recovery:
        summary["concept_recovery"] = recovery
    write_json_atomic(run.sub(SUMMARY), summary)
    short = {k: summary[k] for k in ("latents", "dead", "dense", "alive", "threshold", "clusters", "patterns",
                                     "latents_unassigned") if k in summary}
    if recovery:
        short["concepts_recovered"] = f"{recovery['recovered']}/{recovery['concepts']}"
    return [PATTERNS, PAT_DIR], short


def pattern_arrays(ens, head, patterns: PatternSet) -> dict[str, np.ndarray]:
    """Prototype directions and logit effects per pattern, and the latent -> pattern map."""
    W_enc = ens.W_enc.detach().cpu().numpy()
    W_dec = ens.W_dec.detach().cpu().numpy()
    W2 = head.W2.detach().cpu().numpy()
    P = patterns.n_patterns
    enc = np.zeros((P, W_enc.shape[2]), np.float32)
    dec = np.zeros((P, W_dec.shape[2]), np.float32)
    effect = np.zeros((P, W2.shape[0]), np.float32)
    for p, mem in enumerate(patterns.members):
        e, j = np.array([a for a, _ in mem]), np.array([b for _, b in mem])
        enc[p] = _unit(W_enc[e, j]).mean(0)
        dec[p] = _unit(W_dec[e, j]).mean(0)
        effect[p] = (W_dec[e, j] @ W2.T).mean(0)  # logit change per unit of a member latent
    return {"latent_pattern": patterns.latent_pattern.astype(np.int32), "encoder_prototype": enc,
            "decoder_prototype": dec, "logit_effect": effect}


def pattern_table(ens, head, patterns: PatternSet, stats: LatentStats, act: np.ndarray, ds, store, valid,
                  fit_rows: np.ndarray, cfg: PatternConfig) -> pd.DataFrame:
    P = patterns.n_patterns
    arrays = pattern_arrays(ens, head, patterns)
    v = act[valid]
    fires = v > 0
    freq = fires.mean(axis=0)
    rows: list[dict[str, Any]] = []
    ms = monosemanticity_score(act[fit_rows], store.image(fit_rows))
    rng = np.random.default_rng(cfg.seed)
    shuffled = act[fit_rows][rng.permutation(len(fit_rows))]
    ms_random = monosemanticity_score(shuffled, store.image(fit_rows))
    labels = ds.labels()
    lab_au, lab_pur = concept_scores(act[fit_rows], labels[fit_rows], cfg.top_k)
    concepts_present = any(r.concepts for r in ds.records)
    if concepts_present:
        truth = ds.concept_truth()
        con_au, con_pur = concept_scores(act[fit_rows], truth[fit_rows], cfg.top_k)
    for p in range(P):
        nz = v[:, p][fires[:, p]]
        mem = patterns.members[p]
        row: dict[str, Any] = {
            "pattern_id": p, "n_members": len({e for e, _ in mem}), "stability": len({e for e, _ in mem}) / patterns.n_members,
            "members": json.dumps(mem), "frequency": float(freq[p]),
            "act_mean": float(nz.mean()) if len(nz) else 0.0,
            "act_p50": float(np.median(nz)) if len(nz) else 0.0,
            "act_p90": float(np.quantile(nz, 0.9)) if len(nz) else 0.0,
            "act_max": float(nz.max()) if len(nz) else 0.0,
            "monosemanticity": float(ms[p]), "monosemanticity_random": float(ms_random[p]),
        }
        for j, f in enumerate(FINDINGS):
            row[f"effect:{f}"] = float(arrays["logit_effect"][p, j])
            row[f"auroc:{f}"] = float(lab_au[p, j])
        j = int(np.nanargmax(np.where(np.isnan(lab_au[p]), -np.inf, lab_au[p]))) if np.isfinite(lab_au[p]).any() else 0
        row["best_finding"], row["best_finding_auroc"] = FINDINGS[j], float(lab_au[p, j])
        row["finding_purity"] = float(lab_pur[p, j])
        if concepts_present:
            au = np.where(np.isnan(con_au[p]), -np.inf, con_au[p])
            c = int(np.argmax(au))
            row["best_concept"] = CONCEPT_NAMES[c]
            row["concept_auroc"] = float(con_au[p, c])
            row["concept_purity"] = float(con_pur[p, c])
            for ci, name in enumerate(CONCEPT_NAMES):
                row[f"concept_auroc:{name}"] = float(con_au[p, ci])
        rows.append(row)
    return pd.DataFrame(rows)


def concept_recovery(table: pd.DataFrame, threshold: float = 0.9, prevalence: Mapping[str, float] | None = None,
                     absence_min_prevalence: float = 0.3) -> dict[str, Any]:
    """For every planted concept, the pattern that detects it best (AUROC over held-in images), and how
    many concepts reach `threshold`. `own` says whether that concept is also the pattern's own best
    concept (a monosemantic match) rather than a correlate of another concept it detects better.

    Also the pattern that detects the concept's ABSENCE best (1 - its AUROC): a sparse code may learn
    the rarer side of a common feature ("no laterality marker" where 60% of films carry one). With
    `prevalence` (concept -> share of images), `recovered_as_absence` lists the concepts that only
    their absence recovers, counted where the concept is on >= absence_min_prevalence of the images.
    The headline `recovered` counts presence only."""
    out: dict[str, Any] = {"per_concept": {}}
    recovered = 0
    as_absence = []
    for c in CONCEPT_NAMES:
        col = f"concept_auroc:{c}"
        if col not in table or table[col].isna().all():
            out["per_concept"][c] = {"pattern": None, "auroc": None}
            continue
        best = table.loc[table[col].idxmax()]
        worst = table.loc[table[col].idxmin()]
        au, absence_au = float(best[col]), 1.0 - float(worst[col])
        recovered += au >= threshold
        out["per_concept"][c] = {"pattern": int(best["pattern_id"]), "auroc": round(au, 4),
                                 "own": bool(best["best_concept"] == c),
                                 "stability": round(float(best["stability"]), 3),
                                 "absence_pattern": int(worst["pattern_id"]), "absence_auroc": round(absence_au, 4)}
        if (prevalence is not None and au < threshold <= absence_au
                and prevalence.get(c, 0.0) >= absence_min_prevalence):
            as_absence.append(c)
    out.update({"concepts": len(CONCEPT_NAMES), "recovered": int(recovered), "threshold": threshold})
    if prevalence is not None:
        out["recovered_as_absence"] = as_absence
        out["prevalence"] = {c: float(prevalence.get(c, 0.0)) for c in CONCEPT_NAMES}
    return out


def load_patterns(run: RunDir) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    run.require("patterns")
    return pd.read_parquet(run.verify(PATTERNS)), load_file(str(run.verify(ARRAYS)))


def load_activations(run: RunDir) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    from safetensors.numpy import load_file

    a = load_file(str(run.verify(ACTIVATIONS)))
    n, p = (int(v) for v in a["shape"])
    return a["rows"], a["cols"], a["values"], (n, p)


def config_dict(cfg: PatternConfig) -> dict[str, Any]:
    return asdict(cfg)
