"""Per-member quality of a transcoder ensemble on held-out data.

Everything is built from sums accumulated over batches (`MetricsAccumulator.update`), so any
data set size streams through in bounded memory (except the spliced logits kept for AUROC:
[N, E, C] floats). The formulas are small named functions (`fvu`, `l0`, `dead_fraction`, ...),
each pinned by a test on a case worked by hand.

The classifier head is passed in as (W2 [C, d_out], b2 [C]): logits = h @ W2.T + b2. "Spliced"
means member e's reconstruction replaces h: logits_e = h_hat_e @ W2.T + b2.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sae_cxr.transcoders.ensemble import SparseCodes, TranscoderEnsemble

DENSE_THRESHOLD = 0.1
"""A latent is dense when it fires on more than this fraction of inputs: it behaves like a bias
or a generic direction, not a pattern (SAE literature flags > 10% as dense)."""


# ----------------------------------------------------------------------------------- formulas

def fvu(sse: np.ndarray | float, sum_sq: float, sum_vec: np.ndarray, n: int) -> np.ndarray | float:
    """Fraction of variance unexplained: sum |h_hat - h|^2 / sum |h - mean(h)|^2.

    sse: squared error summed over samples and dims; sum_sq = sum |h|^2; sum_vec = sum h [d].
    Total variance from sums: sum |h|^2 - |sum h|^2 / n.
    """
    tv = float(sum_sq) - float(np.dot(sum_vec, sum_vec)) / n
    if tv <= 0:
        raise ValueError("h has zero variance on this data: FVU is undefined")
    return np.asarray(sse, dtype=np.float64) / tv


def l0(active_total: np.ndarray, n: int) -> np.ndarray:
    """Mean number of active latents per sample, from the total count over n samples."""
    return np.asarray(active_total, dtype=np.float64) / n


def dead_fraction(fire_counts: np.ndarray) -> np.ndarray:
    """[E, m] -> [E]: fraction of latents that never fired on the data."""
    return (np.asarray(fire_counts) == 0).mean(axis=-1)


def dense_fraction(fire_counts: np.ndarray, n: int, threshold: float = DENSE_THRESHOLD) -> np.ndarray:
    """[E, m] -> [E]: fraction of latents firing on more than `threshold` of the n inputs."""
    return (np.asarray(fire_counts) / n > threshold).mean(axis=-1)


def logit_mse(sq_diff_sum: np.ndarray, n: int, n_findings: int) -> np.ndarray:
    """Mean over samples and findings of (spliced logit - original logit)^2."""
    return np.asarray(sq_diff_sum, dtype=np.float64) / (n * n_findings)


def bce_sum(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Binary cross-entropy summed over labelled entries, and their count, per finding.

    logits [..., C], labels [N, C] broadcastable (NaN = unlabelled, left out).
    BCE(z, y) = softplus(z) - y z, stable for any z. Returns (sum [..., C], count [C]).
    """
    ok = ~torch.isnan(labels)
    y = torch.where(ok, labels, torch.zeros_like(labels)).to(logits.dtype)
    while y.ndim < logits.ndim:  # labels [N, C] against logits [N, E, C]
        y, ok = y.unsqueeze(-2), ok.unsqueeze(-2)
    term = torch.nn.functional.softplus(logits) - y * logits
    term = torch.where(ok, term, torch.zeros_like(term))
    return term.sum(0).double(), ok.sum(0).squeeze(-2) if ok.ndim > 2 else ok.sum(0)


def bce_constant(logit: np.ndarray, n_pos: np.ndarray, n_neg: np.ndarray) -> np.ndarray:
    """Summed BCE of a constant logit c per finding over n_pos positives and n_neg negatives:
    n_pos * softplus(-c) + n_neg * softplus(c)."""
    c = np.asarray(logit, dtype=np.float64)
    sp = lambda z: np.logaddexp(0.0, z)  # noqa: E731
    return np.asarray(n_pos) * sp(-c) + np.asarray(n_neg) * sp(c)


def loss_recovered(loss_mean: float, loss_spliced: np.ndarray, loss_original: float) -> np.ndarray:
    """(L_mean - L_spliced) / (L_mean - L_orig): 1 = splicing costs nothing, 0 = as bad as
    replacing h by its mean. NaN when mean ablation does not hurt (the head ignores h)."""
    gap = loss_mean - loss_original
    if abs(gap) < 1e-12:
        return np.full(np.shape(loss_spliced), np.nan)
    return (loss_mean - np.asarray(loss_spliced, dtype=np.float64)) / gap


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties
    counting 1/2 (Mann-Whitney U with average ranks). NaN labels are left out; NaN when only
    one class is present."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    ok = ~np.isnan(y)
    s, y = s[ok], y[ok] > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    ss = s[order]
    i = 0
    while i < len(ss):  # average rank within each group of ties
        j = i
        while j + 1 < len(ss) and ss[j + 1] == ss[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


# ----------------------------------------------------------------------------------- results

@dataclass
class EnsembleMetrics:
    """Per-member metrics on one data set. Arrays are indexed by member (E) and finding (C)."""

    n: int
    """Samples evaluated."""
    fvu: np.ndarray
    """[E] fraction of variance of h unexplained."""
    l0: np.ndarray
    """[E] mean active latents per sample."""
    dead_fraction: np.ndarray
    """[E] latents that never fired on this data."""
    dense_fraction: np.ndarray
    """[E] latents firing on more than `dense_threshold` of the inputs."""
    dense_threshold: float
    logit_mse: np.ndarray | None = None
    """[E] mean squared change of the logits when the member is spliced in (needs the head)."""
    auroc_original: np.ndarray | None = None
    """[C] AUROC of the original classifier (needs labels)."""
    auroc_spliced: np.ndarray | None = None
    """[E, C] AUROC with member e spliced in."""
    loss_original: float | None = None
    """Mean BCE of the original logits over labelled entries."""
    loss_mean_ablation: float | None = None
    """Mean BCE with h replaced by its mean over the data."""
    loss_spliced: np.ndarray | None = None
    """[E] mean BCE with member e spliced in."""
    loss_recovered: np.ndarray | None = None
    """[E] (L_mean - L_spliced) / (L_mean - L_orig)."""
    findings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        E = len(self.fvu)
        for name in ("l0", "dead_fraction", "dense_fraction"):
            if getattr(self, name).shape != (E,):
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected ({E},)")
        if self.n < 1:
            raise ValueError("metrics need at least one sample")
        if (self.fvu < -1e-9).any():
            raise ValueError("FVU cannot be negative")
        for name in ("dead_fraction", "dense_fraction"):
            a = getattr(self, name)
            if ((a < 0) | (a > 1)).any():
                raise ValueError(f"{name} must lie in [0, 1]")
        if self.logit_mse is not None and self.logit_mse.shape != (E,):
            raise ValueError("logit_mse must be [E]")
        if self.auroc_spliced is not None:
            C = self.auroc_spliced.shape[1]
            if self.auroc_spliced.shape != (E, C) or self.auroc_original is None or self.auroc_original.shape != (C,):
                raise ValueError("auroc_spliced must be [E, C] with auroc_original [C]")
        if self.loss_recovered is not None and self.loss_recovered.shape != (E,):
            raise ValueError("loss_recovered must be [E]")

    @property
    def n_members(self) -> int:
        return len(self.fvu)

    def summary(self) -> dict[str, dict[str, float]]:
        """Ensemble median and spread of every per-member metric."""
        rows: dict[str, np.ndarray] = {"fvu": self.fvu, "l0": self.l0, "dead_fraction": self.dead_fraction,
                                       "dense_fraction": self.dense_fraction}
        if self.logit_mse is not None:
            rows["logit_mse"] = self.logit_mse
        if self.loss_recovered is not None:
            rows["loss_recovered"] = self.loss_recovered
        if self.auroc_spliced is not None:
            for c in range(self.auroc_spliced.shape[1]):
                name = self.findings[c] if c < len(self.findings) else str(c)
                rows[f"auroc_delta[{name}]"] = self.auroc_spliced[:, c] - self.auroc_original[c]
        out = {}
        for k, a in rows.items():
            a = np.asarray(a, dtype=np.float64)
            a = a[~np.isnan(a)]
            if a.size == 0:
                out[k] = {q: math.nan for q in ("median", "p25", "p75", "min", "max")}
                continue
            out[k] = {"median": float(np.median(a)), "p25": float(np.percentile(a, 25)),
                      "p75": float(np.percentile(a, 75)), "min": float(a.min()), "max": float(a.max())}
        return out

    def table(self) -> str:
        """Plain-text table: one row per metric, the ensemble median and spread."""
        lines = [f"{'metric':<28}{'median':>10}{'p25':>10}{'p75':>10}{'min':>10}{'max':>10}"]
        for k, st in self.summary().items():
            lines.append(f"{k:<28}" + "".join(f"{st[q]:>10.4f}" for q in ("median", "p25", "p75", "min", "max")))
        if self.loss_original is not None:
            lines.append(f"(BCE original {self.loss_original:.4f}, mean-ablated {self.loss_mean_ablation:.4f}; "
                         f"n = {self.n}; dense = fires on > {self.dense_threshold:.0%} of inputs)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = v.tolist() if isinstance(v, np.ndarray) else v
        d["summary"] = self.summary()
        return d


class MetricsAccumulator:
    """Streams batches of (h, per-member h_hat, codes, labels) into the sums the metrics need."""

    def __init__(self, n_members: int, n_latents: int, d_out: int, W2: Tensor | None = None, b2: Tensor | None = None,
                 dense_threshold: float = DENSE_THRESHOLD, findings: list[str] | None = None):
        if (W2 is None) != (b2 is None):
            raise ValueError("pass both W2 and b2 (the head), or neither")
        if W2 is not None and (W2.ndim != 2 or W2.shape[1] != d_out or b2.shape != (W2.shape[0],)):
            raise ValueError(f"head must be W2 [C, {d_out}] and b2 [C], got {list(W2.shape)} and {list(b2.shape)}")
        self.E, self.m, self.d = n_members, n_latents, d_out
        self.W2 = W2.detach().double().cpu() if W2 is not None else None
        self.b2 = b2.detach().double().cpu() if b2 is not None else None
        self.dense_threshold = dense_threshold
        self.findings = list(findings or [])
        self.n = 0
        self.sse = torch.zeros(n_members, dtype=torch.float64)
        self.sum_sq = 0.0
        self.sum_vec = torch.zeros(d_out, dtype=torch.float64)
        self.active = torch.zeros(n_members, dtype=torch.float64)
        self.fire = torch.zeros(n_members, n_latents, dtype=torch.long)
        self.logit_sq = torch.zeros(n_members, dtype=torch.float64)
        self.orig_logits: list[Tensor] = []
        self.spliced_logits: list[Tensor] = []
        self.labels: list[Tensor] = []

    @torch.no_grad()
    def update(self, h: Tensor, h_hat: Tensor, codes: SparseCodes, labels: Tensor | None = None) -> None:
        """h [B, d_out], h_hat [B, E, d_out], codes [B, E, K], labels [B, C] (NaN = unlabelled)."""
        B = h.shape[0]
        if h_hat.shape != (B, self.E, self.d):
            raise ValueError(f"h_hat must be [{B}, {self.E}, {self.d}], got {list(h_hat.shape)}")
        h64, hh64 = h.detach().double().cpu(), h_hat.detach().double().cpu()
        self.n += B
        self.sse += (hh64 - h64[:, None]).pow(2).sum((0, 2))
        self.sum_sq += float(h64.pow(2).sum())
        self.sum_vec += h64.sum(0)
        act = (codes.values > 0).cpu()
        self.active += act.sum((0, 2)).double()
        gidx = (codes.indices.cpu().clamp(min=0) + torch.arange(self.E).view(1, self.E, 1) * self.m)[act]
        self.fire.view(-1).index_add_(0, gidx, torch.ones_like(gidx))
        if self.W2 is not None:
            lo = h64 @ self.W2.T + self.b2  # [B, C]
            ls = hh64 @ self.W2.T + self.b2  # [B, E, C]
            self.logit_sq += (ls - lo[:, None]).pow(2).sum((0, 2))
            if labels is not None:
                if labels.shape != (B, self.W2.shape[0]):
                    raise ValueError(f"labels must be [{B}, {self.W2.shape[0]}], got {list(labels.shape)}")
                self.orig_logits.append(lo.float())
                self.spliced_logits.append(ls.float())
                self.labels.append(labels.detach().float().cpu())

    def compute(self) -> EnsembleMetrics:
        if self.n == 0:
            raise ValueError("no data: call update() first")
        sum_vec = self.sum_vec.numpy()
        res = EnsembleMetrics(
            n=self.n,
            fvu=fvu(self.sse.numpy(), self.sum_sq, sum_vec, self.n),
            l0=l0(self.active.numpy(), self.n),
            dead_fraction=dead_fraction(self.fire.numpy()),
            dense_fraction=dense_fraction(self.fire.numpy(), self.n, self.dense_threshold),
            dense_threshold=self.dense_threshold,
            findings=self.findings,
        )
        if self.W2 is not None:
            C = self.W2.shape[0]
            res.logit_mse = logit_mse(self.logit_sq.numpy(), self.n, C)
            if self.labels:
                y = torch.cat(self.labels)
                lo = torch.cat(self.orig_logits)
                ls = torch.cat(self.spliced_logits)
                yn = y.numpy()
                res.auroc_original = np.array([auroc(lo[:, c].numpy(), yn[:, c]) for c in range(C)])
                res.auroc_spliced = np.array([[auroc(ls[:, e, c].numpy(), yn[:, c]) for c in range(C)]
                                              for e in range(self.E)])
                s_orig, cnt = bce_sum(lo.double(), y)
                s_spl, _ = bce_sum(ls.double(), y)
                total = float(cnt.sum())
                if total > 0:
                    mean_h = self.sum_vec / self.n
                    c_mean = (mean_h @ self.W2.T + self.b2).numpy()
                    n_pos = np.nansum(yn > 0.5, axis=0) * 1.0
                    n_neg = (~np.isnan(yn)).sum(0) - n_pos
                    res.loss_original = float(s_orig.sum()) / total
                    res.loss_mean_ablation = float(bce_constant(c_mean, n_pos, n_neg).sum()) / total
                    res.loss_spliced = s_spl.sum(-1).numpy() / total
                    res.loss_recovered = loss_recovered(res.loss_mean_ablation, res.loss_spliced, res.loss_original)
        res.__post_init__()
        return res


@torch.no_grad()
def evaluate_ensemble(model: TranscoderEnsemble, x: Any, h: Any, W2: Any = None, b2: Any = None,
                      labels: Any = None, batch_size: int = 1024, dense_threshold: float = DENSE_THRESHOLD,
                      findings: list[str] | None = None) -> EnsembleMetrics:
    """Evaluate every member on held-out (x [N, d_in], h [N, d_out]), raw units, with the head
    (W2 [C, d_out], b2 [C]) and labels [N, C] (NaN = unlabelled) when given."""
    def t(a: Any) -> Tensor | None:
        return None if a is None else torch.as_tensor(np.asarray(a) if not isinstance(a, Tensor) else a).float()

    x, h, W2, b2, labels = t(x), t(h), t(W2), t(b2), t(labels)
    if x.shape[0] != h.shape[0] or (labels is not None and labels.shape[0] != x.shape[0]):
        raise ValueError(f"x, h (and labels) need the same number of rows: {x.shape[0]}, {h.shape[0]}"
                         + (f", {labels.shape[0]}" if labels is not None else ""))
    acc = MetricsAccumulator(model.n_members, model.cfg.n_latents, model.cfg.d_out, W2, b2, dense_threshold, findings)
    dev = model.device
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size].to(dev)
        out = model(xb)
        acc.update(h[i:i + batch_size], out.h_hat, out.codes, None if labels is None else labels[i:i + batch_size])
    return acc.compute()
