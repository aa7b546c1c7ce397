"""The diagnostic head: x -> h = relu(W1 x + b1) -> logits = W2 h + b2, one logit per finding.

Its hidden layer h is what the transcoders replace, so its shape is the contract of the exact
attribution identity (DESIGN.md). Trained with BCE on labelled entries only (NaN = unknown is
masked), AdamW, early stopping on the validation mean AUROC. Evaluated per finding with AUROC
and AUPRC and bootstrap intervals on every test split present (test, test_shifted).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sae_cxr.findings import FINDINGS
from sae_cxr.progress import progress_bar
from sae_cxr.run import RunDir, atomic_path, write_json_atomic
from sae_cxr.stats import auroc, average_precision, bootstrap_ci

log = logging.getLogger("sae_cxr.classifier")

CLS_DIR = "classifier"
WEIGHTS = "classifier/head.safetensors"
CONFIG = "classifier/config.json"
METRICS = "classifier/metrics.json"
EVAL_SPLITS = ("test", "test_shifted")


@dataclass
class ClassifierConfig:
    """Training of the diagnostic head."""

    hidden: int = 256
    """Width of the hidden ReLU layer (the transcoders' output dimension)."""
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    max_epochs: int = 300
    patience: int = 20
    """Epochs without a better validation mean AUROC before stopping."""
    min_delta: float = 1e-4
    """Smallest rise of the validation mean AUROC that counts as better."""
    n_boot: int = 1000
    """Bootstrap resamples for the confidence intervals."""
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.batch_size < 1 or self.max_epochs < 1:
            raise ValueError("hidden, batch_size and max_epochs must be positive")


class ClassifierHead(nn.Module):
    """logits = W2 relu(W1 x + b1) + b2."""

    def __init__(self, d_in: int, hidden: int = 256, n_out: int = len(FINDINGS)):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, n_out)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """h [B, hidden]: the layer the transcoders reconstruct."""
        return F.relu(self.fc1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden(x))

    @property
    def W2(self) -> torch.Tensor:
        return self.fc2.weight

    @property
    def b2(self) -> torch.Tensor:
        return self.fc2.bias

    def numpy(self) -> dict[str, np.ndarray]:
        return {"W1": self.fc1.weight.detach().cpu().numpy(), "b1": self.fc1.bias.detach().cpu().numpy(),
                "W2": self.fc2.weight.detach().cpu().numpy(), "b2": self.fc2.bias.detach().cpu().numpy()}


def masked_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BCE over labelled entries only (NaN = unknown)."""
    m = ~torch.isnan(y)
    if not m.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[m], y[m])


def mean_auroc(y: np.ndarray, scores: np.ndarray) -> float:
    vals = [auroc(y[:, j], scores[:, j]) for j in range(y.shape[1])]
    vals = [v for v in vals if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def train_classifier(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                     cfg: ClassifierConfig, seed: int = 0, progress: bool = True
                     ) -> tuple[ClassifierHead, list[dict[str, float]]]:
    """Fit the head; keep the epoch with the best validation mean AUROC."""
    _check_inputs(x_train, y_train, "train")
    _check_inputs(x_val, y_val, "val")
    torch.manual_seed(seed)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    head = ClassifierHead(x_train.shape[1], cfg.hidden).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    xt = torch.from_numpy(x_train).float().to(device)
    yt = torch.from_numpy(y_train).float().to(device)
    xv = torch.from_numpy(x_val).float().to(device)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, since, history = -np.inf, None, 0, []
    with progress_bar(total=cfg.max_epochs, desc="classifier", unit="epoch", disable=not progress) as bar:
        for epoch in range(cfg.max_epochs):
            head.train()
            perm = torch.randperm(len(xt), generator=gen).to(device)
            losses = []
            for s in range(0, len(xt), cfg.batch_size):
                idx = perm[s:s + cfg.batch_size]
                loss = masked_bce(head(xt[idx]), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            head.eval()
            with torch.no_grad():
                val_scores = head(xv).cpu().numpy()
            score = mean_auroc(y_val, val_scores)
            history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_mean_auroc": score})
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", val_auroc=f"{score:.4f}")
            bar.update(1)
            if score > best + cfg.min_delta:
                best, best_state, since = score, copy.deepcopy(head.state_dict()), 0
            else:
                since += 1
                if since >= cfg.patience:
                    break
    if best_state is not None:
        head.load_state_dict(best_state)
    return head.cpu().eval(), history


def _check_inputs(x: np.ndarray, y: np.ndarray, split: str) -> None:
    if len(x) == 0:
        raise ValueError(f"the {split} split is empty: the classifier needs labelled {split} images")
    if not np.isfinite(x).all():
        rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(f"{split} embeddings have NaN/Inf in {len(rows)} rows (first: row {rows[0]})")
    if np.isnan(y).all():
        raise ValueError(f"the {split} split has no labels for any finding")


def predict(head: ClassifierHead, x: np.ndarray, batch: int = 8192) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([head(torch.from_numpy(x[s:s + batch]).float()).numpy()
                               for s in range(0, len(x), batch)]) if len(x) else np.zeros((0, len(FINDINGS)))


def evaluate_head(head: ClassifierHead, x: np.ndarray, y: np.ndarray, n_boot: int = 1000, seed: int = 0
                  ) -> dict[str, dict[str, Any]]:
    """Per-finding AUROC and AUPRC with bootstrap intervals."""
    scores = predict(head, x)
    return {f: {"auroc": bootstrap_ci(y[:, j], scores[:, j], auroc, n_boot, seed=seed).to_dict(),
                "auprc": bootstrap_ci(y[:, j], scores[:, j], average_precision, n_boot, seed=seed).to_dict()}
            for j, f in enumerate(FINDINGS)}


def format_table(metrics: dict[str, dict[str, dict[str, Any]]]) -> str:
    """A plain-text table: one row per finding, AUROC and AUPRC [95% CI] per split."""
    splits = list(metrics)
    lines = [f"{'finding':<18}" + "".join(f"{s + ' AUROC':>26}{s + ' AUPRC':>26}" for s in splits)]
    for f in FINDINGS:
        row = f"{f:<18}"
        for s in splits:
            for k in ("auroc", "auprc"):
                m = metrics[s][f][k]
                cell = "n/a (" + m.get("note", "") + ")" if m["value"] is None else \
                    f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"
                row += f"{cell:>26}"
        lines.append(row)
    return "\n".join(lines)


def save_head(run: RunDir, head: ClassifierHead, cfg: ClassifierConfig, d_in: int) -> None:
    from safetensors.torch import save_file

    with atomic_path(run.sub(WEIGHTS)) as tmp:
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp))
    write_json_atomic(run.sub(CONFIG), {"d_in": d_in, "hidden": cfg.hidden, "findings": list(FINDINGS),
                                        "config": asdict(cfg)})


def load_head(run: RunDir) -> ClassifierHead:
    from safetensors.torch import load_file

    run.require("train-classifier")
    meta = run.load_verified(CONFIG, lambda p: json.loads(p.read_text()))
    head = ClassifierHead(meta["d_in"], meta["hidden"], len(meta["findings"]))
    head.load_state_dict(run.load_verified(WEIGHTS, lambda p: load_file(str(p))))
    return head.eval()


def split_rows(records, valid: np.ndarray, split: str) -> np.ndarray:
    return np.array([i for i, r in enumerate(records) if r.split == split and valid[i]], dtype=np.int64)


def run_classifier(run: RunDir, cfg: ClassifierConfig, seed: int = 0, progress: bool = True
                   ) -> tuple[list[str], dict[str, Any]]:
    from sae_cxr.extract import EmbeddingStore
    from sae_cxr.ingest import open_run_dataset

    ds = open_run_dataset(run)
    store = EmbeddingStore(run)
    x = store.features()
    y = ds.labels()
    valid = store.valid
    tr, va = split_rows(ds.records, valid, "train"), split_rows(ds.records, valid, "val")
    if len(va) == 0:  # carve a validation split from train, stably, rather than fail
        rng = np.random.default_rng(seed)
        perm = rng.permutation(tr)
        va, tr = np.sort(perm[: max(1, len(perm) // 10)]), np.sort(perm[max(1, len(perm) // 10):])
        log.warning("no val split: using %d train images for early stopping", len(va))
    head, history = train_classifier(x[tr], y[tr], x[va], y[va], cfg, seed=seed, progress=progress)
    save_head(run, head, cfg, x.shape[1])
    metrics: dict[str, Any] = {}
    for split in ("val", *EVAL_SPLITS):
        rows = split_rows(ds.records, valid, split)
        if len(rows):
            metrics[split] = evaluate_head(head, x[rows], y[rows], cfg.n_boot, seed)
    write_json_atomic(run.sub(METRICS), {"metrics": metrics, "history": history,
                                         "n": {s: int(len(split_rows(ds.records, valid, s)))
                                               for s in ("train", "val", *EVAL_SPLITS)}})
    print(format_table({s: m for s, m in metrics.items() if s in EVAL_SPLITS} or metrics))
    summary: dict[str, Any] = {"epochs": len(history), "best_val_mean_auroc": round(max(h["val_mean_auroc"]
                                                                                       for h in history), 4)}
    for s in EVAL_SPLITS:
        if s in metrics:
            summary[f"{s}_auroc"] = {f: metrics[s][f]["auroc"]["value"] for f in FINDINGS}
    return [CLS_DIR], summary
