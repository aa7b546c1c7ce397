"""Exact attribution: every finding's logit decomposed into pattern contributions.

For member e with active latents z (DESIGN.md, "Exact attribution"):
    logit_c = sum_i z_i (W2[c] . W_dec[e, i])  +  W2[c] . W_skip[e] x  +  W2[c] . b_dec[e] + b2[c]
              + W2[c] . (h - h_hat_e)
The ensemble's decomposition is the member mean. A pattern's contribution is the mean over members
of the terms of its latents; latents in no pattern form the "unassigned" entry. The error term is
computed from the members' actual reconstructions h_hat_e (not as a remainder), so the identity
contributions + unassigned + skip + bias + error = logit is a real check (tests assert it).

Faithfulness: deleting the top-n patterns of a prediction zeroes their latents in every member and
recomputes the hidden layer h' = relu(h - removed) and the logit; random active patterns are the
control. Comprehensiveness = p(full) - p(top-n removed); sufficiency = p(full) - p(only top-n kept).

Under torchrun the decomposition (the per-image work) is sharded by rank in contiguous blocks of
rows; each rank writes its tables to attributions/parts/, and rank 0 concatenates them in rank
order (the single-process order), then runs faithfulness and localization on their samples.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from sae_cxr import distributed as dist
from sae_cxr.findings import FINDINGS
from sae_cxr.progress import progress_bar
from sae_cxr.run import RunDir, atomic_path, write_json_atomic

log = logging.getLogger("sae_cxr.attribution")

ATTR_DIR = "attributions"
PREDICTIONS = "attributions/predictions.parquet"
CONTRIBUTIONS = "attributions/contributions.parquet"
FAITHFULNESS = "attributions/faithfulness.json"
LOCALIZATION = "attributions/localization.json"
SUMMARY = "attributions/summary.json"


@dataclass
class AttributionConfig:
    """Which predictions are decomposed and how many patterns are reported for each."""

    splits: tuple[str, ...] = ("test", "test_shifted")
    """Splits whose predictions are decomposed and stored."""
    coverage: float = 0.9
    """Report patterns until they explain this share of the absolute pattern evidence."""
    max_patterns: int = 50
    """Cap on reported patterns per prediction."""
    batch_size: int = 512
    faithfulness_samples: int = 300
    """Predictions (positive decisions first) used for deletion/insertion curves."""
    faithfulness_steps: int = 20
    random_repeats: int = 5
    localization_images: int = 300
    """Images with boxes on which pattern maps and the Grad-CAM baseline are scored (0 = skip)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.splits, list):
            self.splits = tuple(self.splits)
        if not 0 < self.coverage <= 1:
            raise ValueError("coverage must lie in (0, 1]")
        if self.max_patterns < 1:
            raise ValueError("max_patterns must be >= 1")


@dataclass
class AttributionBatch:
    """Decompositions of B inputs for all C findings."""

    logit: np.ndarray  # [B, C] the classifier's logits
    contributions: np.ndarray  # [B, P, C] per pattern (member mean)
    activations: np.ndarray  # [B, P] pattern activations
    unassigned: np.ndarray  # [B, C]
    skip: np.ndarray  # [B, C]
    bias: np.ndarray  # [C]
    error: np.ndarray  # [B, C]

    def total(self) -> np.ndarray:
        """[B, C] the sum of every term: equals `logit` up to float rounding."""
        return self.contributions.sum(1) + self.unassigned + self.skip + self.bias + self.error

    def completeness_error(self) -> float:
        """max |total - logit| / max(1, |logit|): the identity's worst relative violation."""
        return float(np.max(np.abs(self.total() - self.logit) / np.maximum(1.0, np.abs(self.logit))))


class Attributor:
    """Decomposes logits exactly; precomputes each latent's logit direction once."""

    def __init__(self, ensemble, head, latent_pattern: np.ndarray):
        self.ens = ensemble
        self.head = head
        E, m = ensemble.cfg.n_members, ensemble.cfg.n_latents
        self.E = E
        lp = torch.from_numpy(np.asarray(latent_pattern, dtype=np.int64))
        self.n_patterns = int(lp.max().item()) + 1 if (lp >= 0).any() else 0
        self.latent_pattern = torch.where(lp >= 0, lp, torch.tensor(self.n_patterns))  # unassigned -> P
        self.latent_pattern_flat = self.latent_pattern.reshape(-1).contiguous()
        self.m = m
        with torch.no_grad():
            W2 = head.fc2.weight.detach().double()
            self.W2 = W2
            self.latent_logit = torch.einsum("emh,ch->emc", ensemble.W_dec.detach().double(), W2)  # [E, m, C]
            self.latent_logit_flat = self.latent_logit.reshape(E * m, -1).contiguous()
            self.bias = (W2 @ ensemble.b_dec.detach().double().mean(0) + head.fc2.bias.detach().double()).numpy()
            self.skip_logit = (W2 @ ensemble.W_skip.detach().double().mean(0)) if ensemble.W_skip is not None else None

    @torch.no_grad()
    def decompose(self, x: np.ndarray | torch.Tensor) -> AttributionBatch:
        xt = torch.as_tensor(x, dtype=torch.float32)
        B, E, P = len(xt), self.E, self.n_patterns
        out = self.ens(xt)
        codes = out.codes
        vals, idx = codes.values.double(), codes.indices  # [B, E, K]
        ok = idx >= 0
        K = idx.shape[2]
        # one flat gather and one index_add over (image, pattern) slots: the scatter of every active
        # latent's logit term into its pattern, without [B, E, K, C] advanced-index temporaries
        flat = (torch.arange(E).view(1, E, 1) * self.m + idx.clamp(min=0)).reshape(-1)
        w = torch.where(ok, vals, 0.0).reshape(-1)
        terms = self.latent_logit_flat.index_select(0, flat) * w[:, None]  # [B*E*K, C]
        pid = torch.where(ok.reshape(-1), self.latent_pattern_flat.index_select(0, flat), torch.tensor(P))
        slot = torch.arange(B).repeat_interleave(E * K) * (P + 1) + pid
        C = terms.shape[1]
        contrib = torch.zeros(B * (P + 1), C, dtype=torch.float64).index_add_(0, slot, terms).view(B, P + 1, C) / E
        acts = torch.zeros(B * (P + 1), dtype=torch.float64).index_add_(0, slot, w).view(B, P + 1) / E
        h = self.head.hidden(xt).double()
        h_hat = out.h_hat.double().mean(1)  # [B, d_out], member mean of the actual reconstructions
        error = (h - h_hat) @ self.W2.T
        skip = (xt.double() @ self.skip_logit.T).numpy() if self.skip_logit is not None else np.zeros((B, C))
        logit = self.head(xt).double().numpy()
        return AttributionBatch(logit=logit, contributions=contrib[:, :P].numpy(), activations=acts[:, :P].numpy(),
                                unassigned=contrib[:, P].numpy(), skip=skip, bias=self.bias, error=error.numpy())

    @torch.no_grad()
    def hidden_parts(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For one input: h [d_out], per-pattern hidden contributions [P, d_out] (member mean of z W_dec),
        and the pattern ids with a non-zero part. Used by deletion/insertion curves."""
        xt = torch.as_tensor(x, dtype=torch.float32).view(1, -1)
        E, P = self.E, self.n_patterns
        codes = self.ens.encode(xt)
        vals, idx = codes.values[0].double(), codes.indices[0]
        ok = idx >= 0
        e_ix = torch.arange(E).view(E, 1).expand_as(idx)
        rows = self.ens.W_dec.detach().double()[e_ix[ok], idx[ok]] * vals[ok].unsqueeze(-1)  # [n, d_out]
        pid = self.latent_pattern[e_ix[ok], idx[ok]]
        parts = torch.zeros(P + 1, rows.shape[1], dtype=torch.float64).index_add_(0, pid, rows) / E
        h = self.head.hidden(xt).double()[0]
        active = torch.unique(pid[pid < P]).numpy()
        return h.numpy(), parts[:P].numpy(), active


def reported_patterns(contrib: np.ndarray, coverage: float, max_patterns: int) -> tuple[np.ndarray, float]:
    """Pattern indices, by |contribution| descending, until `coverage` of the total |evidence|; and the
    coverage reached."""
    mag = np.abs(contrib)
    total = mag.sum()
    if total == 0:
        return np.zeros(0, dtype=np.int64), 1.0
    order = np.argsort(-mag, kind="stable")
    order = order[mag[order] > 0]
    cum = np.cumsum(mag[order]) / total
    n = min(int(np.searchsorted(cum, coverage - 1e-12) + 1), max_patterns, len(order))
    return order[:n], float(cum[n - 1])


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def deletion_curves(attr: Attributor, x: np.ndarray, finding: int, steps: int, repeats: int,
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Logits after deleting the top-n (and n random) active patterns, and after keeping only the top-n.

    Top patterns are ranked by their contribution in the direction of the decision (for a positive
    logit the most positive first). Deleting removes their member-mean hidden parts: h' = relu(h - sum);
    keeping only the top-n removes all other active patterns' parts. Logits, not probabilities: a
    confident classifier saturates the sigmoid and would hide every effect.
    """
    h, parts, active = attr.hidden_parts(x)
    w2 = attr.W2[finding].numpy()
    b2 = float(attr.head.fc2.bias[finding].detach())
    contrib = parts @ w2
    logit0 = float(h @ w2 + b2)
    sign = 1.0 if logit0 >= 0 else -1.0
    ranked = active[np.argsort(-(sign * contrib[active]), kind="stable")]
    n_max = min(steps, len(ranked))

    def logit_without(removed: np.ndarray) -> float:
        hp = np.maximum(h - parts[removed].sum(0), 0.0) if len(removed) else h
        return float(hp @ w2 + b2)

    top = np.array([logit_without(ranked[:n]) for n in range(n_max + 1)])
    rand = np.zeros(n_max + 1)
    for _ in range(repeats):
        perm = rng.permutation(ranked)
        rand += np.array([logit_without(perm[:n]) for n in range(n_max + 1)])
    rand /= max(repeats, 1)
    keep = np.array([logit_without(ranked[n:]) for n in range(n_max + 1)])
    return {"top": top, "random": rand, "keep_top": keep, "sign": np.array([sign]),
            "n_active": np.array([len(ranked)])}


def faithfulness(attr: Attributor, x: np.ndarray, findings: np.ndarray, cfg: AttributionConfig) -> dict[str, Any]:
    """Deletion/insertion summary over predictions (x[i], findings[i]).

    Per prediction, evidence removed after deleting n patterns = sign * (logit_0 - logit_n) / |logit_0|
    (1 = the whole decision-aligned logit gone; > 1 = the decision flipped). Comprehensiveness@n uses
    the top-n patterns, random_deletion@n n random active ones, sufficiency@n keeps only the top-n
    (lower = the top-n alone carry the decision). The same in probability is reported as well.
    """
    rng = np.random.default_rng(cfg.seed)
    S = cfg.faithfulness_steps
    curves = [deletion_curves(attr, x[i], int(findings[i]), S, cfg.random_repeats, rng) for i in range(len(x))]
    curves = [c for c in curves if len(c["top"]) > 1 and abs(c["top"][0]) > 1e-6]
    if not curves:
        return {"n": 0}

    def pad(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a, np.full(S + 1 - len(a), a[-1])])

    top = np.stack([pad(c["top"]) for c in curves])
    rand = np.stack([pad(c["random"]) for c in curves])
    keep = np.stack([pad(c["keep_top"]) for c in curves])
    sign = np.array([c["sign"][0] for c in curves])[:, None]
    l0 = top[:, :1]
    removed_top = sign * (l0 - top) / np.abs(l0)
    removed_rand = sign * (l0 - rand) / np.abs(l0)
    removed_keep = sign * (l0 - keep) / np.abs(l0)
    out: dict[str, Any] = {"n": len(curves), "steps": S, "units": "share of the decision-aligned logit removed",
                           "mean_curve_top": removed_top.mean(0).round(4).tolist(),
                           "mean_curve_random": removed_rand.mean(0).round(4).tolist(),
                           "mean_curve_keep_top": removed_keep.mean(0).round(4).tolist()}
    p0, ptop, prand = sigmoid(l0), sigmoid(top), sigmoid(rand)
    for n in (1, 5, 10, 20):
        if n <= S:
            out[f"comprehensiveness@{n}"] = round(float(np.median(removed_top[:, n])), 4)
            out[f"random_deletion@{n}"] = round(float(np.median(removed_rand[:, n])), 4)
            out[f"sufficiency@{n}"] = round(float(np.median(removed_keep[:, n])), 4)
            out[f"probability_drop_top@{n}"] = round(float(np.mean(sign[:, 0] * (p0[:, 0] - ptop[:, n]))), 4)
            out[f"probability_drop_random@{n}"] = round(float(np.mean(sign[:, 0] * (p0[:, 0] - prand[:, n]))), 4)
            out[f"decision_flipped_top@{n}"] = round(float(np.mean(removed_top[:, n] > 1)), 4)
    # area under the "evidence removed" curve, per step (higher = evidence leaves faster)
    out["deletion_area_top"] = round(float(np.trapezoid(np.clip(removed_top, 0, 2), axis=1).mean() / S), 4)
    out["deletion_area_random"] = round(float(np.trapezoid(np.clip(removed_rand, 0, 2), axis=1).mean() / S), 4)
    out["top_vs_random@5"] = round(out.get("comprehensiveness@5", 0) / max(abs(out.get("random_deletion@5", 0)), 1e-3), 1)
    out["n_active_patterns_median"] = float(np.median([c["n_active"][0] for c in curves]))
    return out


def _plot_deletion(f: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not f.get("n"):
        return
    n = np.arange(len(f["mean_curve_top"]))
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ax.plot(n, f["mean_curve_top"], "o-", color="#e63946", label="delete top-n patterns")
    ax.plot(n, f["mean_curve_random"], "s--", color="#457b9d", label="delete n random active patterns")
    ax.plot(n, f["mean_curve_keep_top"], "^-", color="#2a9d8f", label="keep only top-n (evidence lost)")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("patterns deleted / kept (n)")
    ax.set_ylabel("share of the decision's logit removed")
    ax.set_title(f"deletion curves over {f['n']} predictions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def run_attribute(run: RunDir, cfg: AttributionConfig, seed: int = 0, ids: Sequence[str] | None = None,
                  progress: bool = True) -> tuple[list[str], dict[str, Any]]:
    from sae_cxr.classifier import load_head
    from sae_cxr.extract import EmbeddingStore
    from sae_cxr.ingest import open_run_dataset
    from sae_cxr.patterns import load_patterns
    from sae_cxr.transcoders.stage import load_ensemble

    ds = open_run_dataset(run)
    store = EmbeddingStore(run)
    ens, head = load_ensemble(run), load_head(run)
    table, arrays = load_patterns(run)
    attr = Attributor(ens, head, arrays["latent_pattern"])
    valid = store.valid
    if ids is not None:
        wanted = set(ids)
        missing = wanted - {r.id for r in ds.records}
        if missing:
            raise ValueError(f"{len(missing)} requested ids are not in the run, e.g. {sorted(missing)[:5]}")
        rows = np.array([i for i, r in enumerate(ds.records) if r.id in wanted and valid[i]], dtype=np.int64)
    else:
        rows = np.array([i for i, r in enumerate(ds.records) if r.split in cfg.splits and valid[i]], dtype=np.int64)
    if len(rows) == 0:
        raise ValueError(f"no images to attribute in splits {cfg.splits} (splits present: {ds.split_counts()})")
    x_all = store.features()
    labels = ds.labels()
    t0 = time.perf_counter()
    if dist.is_distributed():  # each rank decomposes a contiguous block of rows; rank 0 merges in rank order
        a, b = dist.shard_range(len(rows))
        parts = run.sub(f"{ATTR_DIR}/parts")
        with dist.all_ranks("attribution"):
            pred_rows, contrib_rows, worst = _decompose_rows(attr, ds, labels, x_all, rows[a:b], cfg, progress)
            parts.mkdir(parents=True, exist_ok=True)
            with atomic_path(parts / f"predictions-rank{dist.rank():05d}.parquet") as tmp:
                pd.DataFrame(pred_rows).to_parquet(tmp, index=False)
            with atomic_path(parts / f"contributions-rank{dist.rank():05d}.parquet") as tmp:
                pd.DataFrame(contrib_rows).to_parquet(tmp, index=False)
        worst = max(dist.all_gather(worst))
        seconds = time.perf_counter() - t0
        return dist.on_main(lambda: _finish(run, cfg, ds, store, ens, head, table, arrays, attr, rows, x_all,
                                            *_merge_parts(parts), worst, seconds), what="merging the attribution")
    pred_rows, contrib_rows, worst = _decompose_rows(attr, ds, labels, x_all, rows, cfg, progress)
    seconds = time.perf_counter() - t0
    return _finish(run, cfg, ds, store, ens, head, table, arrays, attr, rows, x_all, pd.DataFrame(pred_rows),
                   pd.DataFrame(contrib_rows), worst, seconds)


def _decompose_rows(attr: Attributor, ds, labels: np.ndarray, x_all: np.ndarray, rows: np.ndarray,
                    cfg: AttributionConfig, progress: bool) -> tuple[list[dict[str, Any]], dict[str, list], float]:
    """Prediction rows and reported-pattern rows for `rows` of the run, and the worst completeness error."""
    pred_rows: list[dict[str, Any]] = []
    contrib_rows: dict[str, list] = {k: [] for k in ("record_id", "finding", "pattern_id", "contribution",
                                                     "activation", "rank")}
    worst = 0.0
    with progress_bar(total=len(rows), desc="attribution", unit="img", disable=not progress) as bar:
        for s in range(0, len(rows), cfg.batch_size):
            rb = rows[s:s + cfg.batch_size]
            batch = attr.decompose(x_all[rb])
            worst = max(worst, batch.completeness_error())
            for bi, r in enumerate(rb):
                rec = ds.records[r]
                for c, f in enumerate(FINDINGS):
                    con = batch.contributions[bi, :, c]
                    rep, cov = reported_patterns(con, cfg.coverage, cfg.max_patterns)
                    pred_rows.append({
                        "record_id": rec.id, "row": int(r), "split": rec.split, "finding": f,
                        "logit": float(batch.logit[bi, c]), "probability": float(sigmoid(batch.logit[bi, c])),
                        "label": float(labels[r, c]), "unassigned": float(batch.unassigned[bi, c]),
                        "skip": float(batch.skip[bi, c]), "bias": float(batch.bias[c]),
                        "error": float(batch.error[bi, c]), "n_active_patterns": int((con != 0).sum()),
                        "n_reported": len(rep), "coverage": cov})
                    for rank, p in enumerate(rep):
                        contrib_rows["record_id"].append(rec.id)
                        contrib_rows["finding"].append(f)
                        contrib_rows["pattern_id"].append(int(p))
                        contrib_rows["contribution"].append(float(con[p]))
                        contrib_rows["activation"].append(float(batch.activations[bi, p]))
                        contrib_rows["rank"].append(rank)
            bar.update(len(rb))
    return pred_rows, contrib_rows, worst


def _merge_parts(parts) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rank 0: the ranks' tables concatenated in rank order (= the single-process row order)."""
    tables = []
    for kind in ("predictions", "contributions"):
        files = [parts / f"{kind}-rank{r:05d}.parquet" for r in range(dist.world_size())]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise RuntimeError(f"attribution parts {missing} are missing in {parts}; rerun the stage")
        frames = [pd.read_parquet(f) for f in files]
        nonempty = [f for f in frames if len(f)] or frames[:1]  # an empty part would turn int columns to object
        tables.append(pd.concat(nonempty, ignore_index=True))
    return tables[0], tables[1]


def _finish(run: RunDir, cfg: AttributionConfig, ds, store, ens, head, table, arrays, attr: Attributor,
            rows: np.ndarray, x_all: np.ndarray, preds: pd.DataFrame, contrib: pd.DataFrame, worst: float,
            seconds: float) -> tuple[list[str], dict[str, Any]]:
    """Write the tables, then faithfulness and localization on samples, and the summary."""
    import shutil

    run.sub(ATTR_DIR).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run.sub(f"{ATTR_DIR}/parts"), ignore_errors=True)  # merged (or left by a killed run)
    with atomic_path(run.sub(PREDICTIONS)) as tmp:
        preds.to_parquet(tmp, index=False)
    with atomic_path(run.sub(CONTRIBUTIONS)) as tmp:
        contrib.to_parquet(tmp, index=False)

    # faithfulness on a sample: positive decisions first, then the most confident negatives
    rng = np.random.default_rng(cfg.seed)
    order = preds.assign(pos=preds["logit"] > 0).sort_values(["pos", "logit"], ascending=[False, False])
    sample = order.head(cfg.faithfulness_samples)
    faith = faithfulness(attr, x_all[sample["row"].to_numpy()],
                         np.array([FINDINGS.index(f) for f in sample["finding"]]), cfg)
    write_json_atomic(run.sub(FAITHFULNESS), faith)
    _plot_deletion(faith, run.sub("attributions/deletion.png"))
    outputs = [ATTR_DIR]
    loc = {}
    if cfg.localization_images > 0:
        from sae_cxr.localization import localization_eval

        loc = localization_eval(run, ds, store, ens, head, table, arrays, rows, cfg, rng)
        write_json_atomic(run.sub(LOCALIZATION), loc)
    nr = preds["n_reported"].to_numpy()
    summary = {"predictions": len(preds), "images": int(len(rows)), "completeness_error": float(f"{worst:.3g}"),
               "patterns_per_prediction": {"median": float(np.median(nr)), "p10": float(np.quantile(nr, 0.1)),
                                           "p90": float(np.quantile(nr, 0.9)), "min": int(nr.min()),
                                           "max": int(nr.max())},
               "images_per_s": round(len(rows) / seconds, 1),
               "faithfulness": {k: v for k, v in faith.items() if not k.startswith("mean_curve")}}
    if loc:
        summary["localization"] = loc.get("summary", loc)
    write_json_atomic(run.sub(SUMMARY), summary)
    return outputs, summary


def load_predictions(run: RunDir) -> tuple[pd.DataFrame, pd.DataFrame]:
    run.require("attribute")
    return pd.read_parquet(run.verify(PREDICTIONS)), pd.read_parquet(run.verify(CONTRIBUTIONS))


class DecompositionReader:
    """Builds `Decomposition` objects from the run's attribution tables, labels and patch tokens.

    Locations come from the spatial map peaks of the top `located` patterns of each prediction,
    for images whose patch tokens were stored (the evaluation splits by default).
    """

    def __init__(self, run: RunDir, located: int = 5):
        from sae_cxr.extract import EmbeddingStore
        from sae_cxr.labeling.stage import load_labels
        from sae_cxr.patterns import load_patterns
        from sae_cxr.transcoders.stage import load_ensemble

        self.run = run
        self.preds, contrib = load_predictions(run)
        self.by_key = {k: g for k, g in contrib.groupby(["record_id", "finding"], sort=False)}
        self.pred_index = {(r.record_id, r.finding): i for i, r in enumerate(self.preds.itertuples())}
        self.labels = load_labels(run)
        table, _ = load_patterns(run)
        self.members = {int(p): [tuple(x) for x in json.loads(m)] for p, m in zip(table["pattern_id"], table["members"])}
        self.store = EmbeddingStore(run)
        self.has_patches = set(int(r) for r in self.store.patch_rows())
        ens = load_ensemble(run)
        self.W_enc = ens.W_enc.detach().cpu().numpy()
        self.E = ens.cfg.n_members
        self.located = located
        self._loc_cache: dict[tuple[int, int], str | None] = {}

    def location(self, row: int, pattern_id: int) -> str | None:
        from sae_cxr.maps import pattern_patch_maps, peak_location

        key = (row, pattern_id)
        if key not in self._loc_cache:
            if row not in self.has_patches or self.store.grid is None:
                self._loc_cache[key] = None
            else:
                patches = self.store.patches([row])
                m = pattern_patch_maps(self.W_enc, self.members[pattern_id], patches, self.E)[0]
                self._loc_cache[key] = peak_location(m.reshape(self.store.grid))
        return self._loc_cache[key]

    def get(self, record_id: str, finding: str):
        from sae_cxr.attribution_types import Decomposition, PatternEvidence

        i = self.pred_index.get((record_id, finding))
        if i is None:
            raise KeyError(f"no attribution for image {record_id!r} and finding {finding!r}; "
                           "attribute its split first (sae-cxr attribute --split ...)")
        p = self.preds.iloc[i]
        rows = self.by_key.get((record_id, finding))
        patterns = []
        if rows is not None:
            total = float(np.abs(rows["contribution"]).sum() / max(float(p["coverage"]), 1e-12))
            for rank, r in enumerate(rows.sort_values("rank").itertuples()):
                lab = self.labels.get(int(r.pattern_id))
                patterns.append(PatternEvidence(
                    pattern_id=int(r.pattern_id), contribution=float(r.contribution), activation=float(r.activation),
                    label=None if lab is None or lab.unresolved else lab.label,
                    category=None if lab is None else lab.category,
                    description=None if lab is None else lab.description,
                    verification=None if lab is None else lab.verification,
                    flagged=False if lab is None else bool(lab.flagged),
                    location=self.location(int(p["row"]), int(r.pattern_id)) if rank < self.located else None,
                    share=min(1.0, abs(float(r.contribution)) / total) if total > 0 else 0.0))
        return Decomposition(record_id=record_id, finding=finding, logit=float(p["logit"]),
                             probability=float(p["probability"]), label=float(p["label"]), patterns=patterns,
                             unassigned=float(p["unassigned"]), skip=float(p["skip"]), bias=float(p["bias"]),
                             error=float(p["error"]), n_active_patterns=int(p["n_active_patterns"]),
                             coverage=float(p["coverage"]))


def config_dict(cfg: AttributionConfig) -> dict[str, Any]:
    return asdict(cfg)
