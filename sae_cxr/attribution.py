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
rows, streamed as in one process; each rank writes its tables to attributions/parts/, and rank 0
streams them, row group by row group in rank order (the single-process order), into the final
tables, combines the ranks' faithfulness samples and n_reported histograms, then runs
faithfulness and localization on the samples.
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


def reported_patterns_batch(contrib: np.ndarray, coverage: float, max_patterns: int
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`reported_patterns` for a whole batch [B, P, C] at once: (order [B, C, P] by |contribution|
    descending, n reported [B, C], coverage [B, C]); row by row it was the attribution stage's cost."""
    mag = np.abs(contrib).transpose(0, 2, 1)
    total = mag.sum(-1)
    order = np.argsort(-mag, axis=-1, kind="stable")
    smag = np.take_along_axis(mag, order, -1)
    cum = np.cumsum(smag, -1) / np.where(total > 0, total, 1.0)[..., None]
    n = np.minimum((cum < coverage - 1e-12).sum(-1) + 1, max_patterns)
    n = np.minimum(n, (smag > 0).sum(-1))
    cov = np.take_along_axis(cum, np.maximum(n - 1, 0)[..., None], -1)[..., 0]
    return order, n, np.where(n > 0, cov, 1.0)


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


def _schema(**cols: str):
    import pyarrow as pa

    return pa.schema([(k, {"str": pa.string(), "int": pa.int64(), "float": pa.float64()}[v]) for k, v in cols.items()])


PRED_COLUMNS = dict(record_id="str", row="int", split="str", finding="str", logit="float", probability="float",
                    label="float", unassigned="float", skip="float", bias="float", error="float",
                    n_active_patterns="int", n_reported="int", coverage="float")
CONTRIB_COLUMNS = dict(record_id="str", finding="str", pattern_id="int", contribution="float", activation="float",
                       rank="int")
PRED_SCHEMA = _schema(**PRED_COLUMNS)
CONTRIB_SCHEMA = _schema(**CONTRIB_COLUMNS)


class _ParquetSink:
    """Column batches appended as they come, written as one Parquet row group per `flush` rows: a table
    of 500k predictions never sits in memory."""

    def __init__(self, schema, flush: int):
        self.schema, self.flush = schema, flush
        self.pending: list = []
        self.pending_rows = 0
        self.writer = None
        self.rows = 0

    def open(self, path) -> None:
        import pyarrow.parquet as pq

        self.writer = pq.ParquetWriter(str(path), self.schema)

    def extend(self, columns: dict[str, Any]) -> None:
        import pyarrow as pa

        self.append(pa.Table.from_pydict({k: columns[k] for k in self.schema.names}, schema=self.schema))

    def append(self, table) -> None:
        """Append a pyarrow Table with this sink's schema."""
        self.pending.append(table)
        self.pending_rows += table.num_rows
        self.rows += table.num_rows
        if self.pending_rows >= self.flush:
            self._write()

    def _write(self) -> None:
        import pyarrow as pa

        self.writer.write_table(pa.concat_tables(self.pending) if self.pending else self.schema.empty_table())
        self.pending, self.pending_rows = [], 0

    def close(self) -> int:
        if self.pending or self.rows == 0:
            self._write()
        self.writer.close()
        return self.rows


class _TopLogits:
    """The `k` predictions with the highest logits, kept as a stream goes by (the faithfulness
    sample: positive decisions first, then the most confident negatives, i.e. logit descending)."""

    def __init__(self, k: int):
        self.k = k
        self.logit = np.zeros(0)
        self.row = np.zeros(0, dtype=np.int64)
        self.finding = np.zeros(0, dtype=np.int64)

    def add(self, rows: np.ndarray, logits: np.ndarray) -> None:
        B, C = logits.shape
        self.logit = np.concatenate([self.logit, logits.reshape(-1)])
        self.row = np.concatenate([self.row, np.repeat(rows, C)])
        self.finding = np.concatenate([self.finding, np.tile(np.arange(C), B)])
        if len(self.logit) > self.k:
            keep = np.argsort(-self.logit, kind="stable")[: self.k]
            self.logit, self.row, self.finding = self.logit[keep], self.row[keep], self.finding[keep]

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(-self.logit, kind="stable")[: self.k]
        return self.row[order], self.finding[order]


def _hist_quantile(hist: np.ndarray, q: float) -> float:
    """np.quantile (linear) of the values a histogram counts, without the values themselves."""
    n = int(hist.sum())
    cum = np.cumsum(hist)
    pos = (n - 1) * q
    lo, hi = int(np.floor(pos)), int(np.ceil(pos))
    v_lo, v_hi = int(np.searchsorted(cum, lo, side="right")), int(np.searchsorted(cum, hi, side="right"))
    return float(v_lo + (v_hi - v_lo) * (pos - lo))


@dataclass
class _Tally:
    """What a pass over a block of rows keeps besides its tables: the prediction count, the worst
    completeness error, the n_reported histogram and the running faithfulness sample. Small, so
    ranks exchange theirs and rank 0 combines them (`merged`)."""

    predictions: int
    worst: float
    n_reported: np.ndarray
    top: _TopLogits

    @staticmethod
    def merged(parts: Sequence["_Tally"]) -> "_Tally":
        """The tally of the blocks' concatenation, given in block (= rank = row) order."""
        top = _TopLogits(parts[0].top.k)
        for p in parts:  # each block's sample is its top k in stream order among ties: the union holds the
            top.logit = np.concatenate([top.logit, p.top.logit])  # global top k, and a stable sort of the
            top.row = np.concatenate([top.row, p.top.row])  # concatenation in row order breaks ties as
            top.finding = np.concatenate([top.finding, p.top.finding])  # one pass over all rows would
        return _Tally(predictions=sum(p.predictions for p in parts), worst=max(p.worst for p in parts),
                      n_reported=np.sum([p.n_reported for p in parts], axis=0), top=top)


def run_attribute(run: RunDir, cfg: AttributionConfig, seed: int = 0, ids: Sequence[str] | None = None,
                  progress: bool = True) -> tuple[list[str], dict[str, Any]]:
    from sae_cxr.classifier import load_head
    from sae_cxr.extract import EmbeddingStore
    from sae_cxr.ingest import record_index
    from sae_cxr.patterns import load_patterns
    from sae_cxr.transcoders.stage import load_ensemble

    index = record_index(run)  # ids, splits, labels only: no Record objects for every image
    store = EmbeddingStore(run)
    ens, head = load_ensemble(run), load_head(run)
    table, arrays = load_patterns(run)
    attr = Attributor(ens, head, arrays["latent_pattern"])
    valid = store.valid
    if ids is not None:
        wanted = set(ids)
        missing = wanted - set(index.ids.tolist())
        if missing:
            raise ValueError(f"{len(missing)} requested ids are not in the run, e.g. {sorted(missing)[:5]}")
        rows = np.flatnonzero(np.isin(index.ids, list(wanted)) & valid).astype(np.int64)
    else:
        rows = np.flatnonzero(np.isin(index.splits, list(cfg.splits)) & valid).astype(np.int64)
    if len(rows) == 0:
        raise ValueError(f"no images to attribute in splits {cfg.splits} (splits present: {index.split_counts()})")
    labels = index.labels
    t0 = time.perf_counter()
    if dist.is_distributed():  # each rank decomposes a contiguous block of rows; rank 0 merges in rank order
        a, b = dist.shard_range(len(rows))
        parts = run.sub(f"{ATTR_DIR}/parts")
        with dist.all_ranks("attribution"):
            parts.mkdir(parents=True, exist_ok=True)
            mine = _decompose_rows(attr, index, labels, store, rows[a:b], cfg, progress,
                                   parts / f"predictions-rank{dist.rank():05d}.parquet",
                                   parts / f"contributions-rank{dist.rank():05d}.parquet")
        tallies = dist.all_gather(mine)
        seconds = time.perf_counter() - t0

        def merge_and_finish() -> tuple[list[str], dict[str, Any]]:
            n_preds = _merge_parts(run, parts, cfg)
            tally = _Tally.merged(tallies)
            if n_preds != tally.predictions:
                raise RuntimeError(f"the attribution parts in {parts} hold {n_preds} predictions but the ranks "
                                   f"made {tally.predictions}; rerun the stage")
            return _finish(run, cfg, store, ens, head, table, arrays, attr, rows, tally, seconds)

        return dist.on_main(merge_and_finish, what="merging the attribution")
    run.sub(ATTR_DIR).mkdir(parents=True, exist_ok=True)
    tally = _decompose_rows(attr, index, labels, store, rows, cfg, progress, run.sub(PREDICTIONS),
                            run.sub(CONTRIBUTIONS))
    seconds = time.perf_counter() - t0
    return _finish(run, cfg, store, ens, head, table, arrays, attr, rows, tally, seconds)


def _flush_rows(cfg: AttributionConfig) -> int:
    return max(cfg.batch_size * len(FINDINGS), 20_000)


def _decompose_rows(attr: Attributor, index, labels: np.ndarray, store, rows: np.ndarray, cfg: AttributionConfig,
                    progress: bool, pred_path, contrib_path) -> _Tally:
    """Decompose `rows` (ascending) of the run, writing the prediction rows and the reported-pattern rows
    to `pred_path` and `contrib_path` (atomically); return the block's tally.

    Streamed: features one shard at a time, rows written to Parquet every `flush` predictions, and
    only the running faithfulness sample and a histogram kept, so memory follows the batch size.
    """
    flush = _flush_rows(cfg)
    pred_out = _ParquetSink(PRED_SCHEMA, flush)
    contrib_out = _ParquetSink(CONTRIB_SCHEMA, flush)
    top = _TopLogits(cfg.faithfulness_samples)
    n_reported = np.zeros(cfg.max_patterns + 1, dtype=np.int64)
    worst = 0.0
    with atomic_path(pred_path) as pred_tmp, atomic_path(contrib_path) as contrib_tmp, \
            progress_bar(total=len(rows), desc="attribution", unit="img", disable=not progress) as bar:
        pred_out.open(pred_tmp)
        contrib_out.open(contrib_tmp)
        for rb, xb in store.iter_features(rows, cfg.batch_size):
            batch = attr.decompose(xb)
            worst = max(worst, batch.completeness_error())
            top.add(rb, batch.logit)
            B, C = batch.logit.shape
            ids = index.ids[rb].tolist()
            order, n_rep, cov = reported_patterns_batch(batch.contributions, cfg.coverage, cfg.max_patterns)
            n_reported += np.bincount(n_rep.reshape(-1), minlength=len(n_reported))
            pred_out.extend({
                "record_id": np.repeat(np.array(ids, dtype=object), C), "row": np.repeat(rb, C),
                "split": np.repeat(index.splits[rb], C),
                "finding": np.tile(np.array(FINDINGS, dtype=object), B),
                "logit": batch.logit.reshape(-1).astype(np.float64),
                "probability": sigmoid(batch.logit.astype(np.float64)).reshape(-1),
                "label": labels[rb].reshape(-1).astype(np.float64),
                "unassigned": batch.unassigned.reshape(-1).astype(np.float64),
                "skip": batch.skip.reshape(-1).astype(np.float64),
                "bias": np.tile(np.asarray(batch.bias, dtype=np.float64), B),
                "error": batch.error.reshape(-1).astype(np.float64),
                "n_active_patterns": (batch.contributions != 0).sum(1).reshape(-1).astype(np.int64),
                "n_reported": n_rep.reshape(-1).astype(np.int64), "coverage": cov.reshape(-1).astype(np.float64)})
            bi, ci, rank = np.nonzero(np.arange(order.shape[-1])[None, None, :] < n_rep[..., None])
            pid = order[bi, ci, rank]
            contrib_out.extend({
                "record_id": np.array(ids, dtype=object)[bi], "finding": np.array(FINDINGS, dtype=object)[ci],
                "pattern_id": pid.astype(np.int64),
                "contribution": batch.contributions[bi, pid, ci].astype(np.float64),
                "activation": batch.activations[bi, pid].astype(np.float64), "rank": rank.astype(np.int64)})
            bar.update(len(rb))
        n_preds = pred_out.close()
        contrib_out.close()
    return _Tally(predictions=n_preds, worst=worst, n_reported=n_reported, top=top)


def _merge_parts(run: RunDir, parts, cfg: AttributionConfig) -> int:
    """Rank 0: the ranks' tables streamed, row group by row group and in rank order (= the single-process
    row order), into the final Parquet files; no table is ever whole in memory. Returns the predictions."""
    import pyarrow.parquet as pq

    world = dist.world_size()
    counts = {}
    for kind, final, schema in (("predictions", PREDICTIONS, PRED_SCHEMA),
                                ("contributions", CONTRIBUTIONS, CONTRIB_SCHEMA)):
        files = [parts / f"{kind}-rank{r:05d}.parquet" for r in range(world)]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise RuntimeError(f"attribution parts {missing} are missing in {parts}; rerun the stage")
        sink = _ParquetSink(schema, _flush_rows(cfg))
        with atomic_path(run.sub(final)) as tmp:
            sink.open(tmp)
            for f in files:
                pf = pq.ParquetFile(str(f))
                if not pf.schema_arrow.equals(schema):
                    raise RuntimeError(f"{f} does not have the attribution table's columns; rerun the stage")
                for g in range(pf.num_row_groups):
                    group = pf.read_row_group(g)
                    if group.num_rows:
                        sink.append(group)
            counts[kind] = sink.close()
    return counts["predictions"]


def _finish(run: RunDir, cfg: AttributionConfig, store, ens, head, table, arrays, attr: Attributor,
            rows: np.ndarray, tally: _Tally, seconds: float) -> tuple[list[str], dict[str, Any]]:
    """With the tables written: faithfulness and localization on samples, and the summary."""
    import shutil

    shutil.rmtree(run.sub(f"{ATTR_DIR}/parts"), ignore_errors=True)  # merged (or left by a killed run)

    # faithfulness on a sample: positive decisions first, then the most confident negatives
    rng = np.random.default_rng(cfg.seed)
    s_rows, s_findings = tally.top.sample()
    faith = faithfulness(attr, store.read_features(s_rows), s_findings, cfg)
    write_json_atomic(run.sub(FAITHFULNESS), faith)
    _plot_deletion(faith, run.sub("attributions/deletion.png"))
    outputs = [ATTR_DIR]
    loc = {}
    if cfg.localization_images > 0:
        from sae_cxr.ingest import open_run_dataset
        from sae_cxr.localization import localization_eval

        loc = localization_eval(run, open_run_dataset(run), store, ens, head, table, arrays, rows, cfg, rng)
        write_json_atomic(run.sub(LOCALIZATION), loc)
    n_reported = tally.n_reported
    summary = {"predictions": tally.predictions, "images": int(len(rows)),
               "completeness_error": float(f"{tally.worst:.3g}"),
               "patterns_per_prediction": {"median": _hist_quantile(n_reported, 0.5),
                                           "p10": _hist_quantile(n_reported, 0.1),
                                           "p90": _hist_quantile(n_reported, 0.9),
                                           "min": int(np.flatnonzero(n_reported)[0]),
                                           "max": int(np.flatnonzero(n_reported)[-1])},
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
