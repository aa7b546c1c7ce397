"""The train-transcoders stage: fit the ensemble on (x, h) pairs from the run, evaluate every member.

x is the classifier input from the embeddings; h = relu(W1 x + b1) is the trained head's hidden
layer, computed here from the saved head (never stored). Members are trained on the train split;
metrics come from held-out images (val and test), with the head's W2, b2 and the labels, so
spliced AUROC and loss recovered describe what the transcoders do to the actual classifier.

Layout (transcoders/): ensemble.safetensors + config.json (raw units, normalisation folded),
metrics.json (per member and the ensemble median/spread), history.json (training curve); a
checkpoint lives in transcoders/checkpoint/ while training runs and is removed when it finishes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sae_cxr.findings import FINDINGS
from sae_cxr.run import RunDir, write_json_atomic
from sae_cxr.transcoders.ensemble import EnsembleConfig, TranscoderEnsemble
from sae_cxr.transcoders.train import TrainConfig

log = logging.getLogger("sae_cxr.transcoders")

TC_DIR = "transcoders"
METRICS = "transcoders/metrics.json"
HISTORY = "transcoders/history.json"
CHECKPOINT_DIR = "transcoders/checkpoint"


@dataclass
class TranscoderStageConfig:
    """The ensemble's shape (its input and output widths come from the run) and its training."""

    n_members: int = 100
    """E: members trained side by side."""
    n_latents: int = 512
    """m: latents per member."""
    k: int | tuple[int, ...] = 32
    """Active latents per sample, one value or one per member (a k sweep inside the ensemble)."""
    activation: str = "topk"
    """topk | batchtopk | jumprelu."""
    skip: bool = False
    """Add a skip path W_skip x per member."""
    matryoshka: tuple[int, ...] | None = None
    """Nested prefix sizes for a Matryoshka loss."""
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "auto"
    """auto = CUDA when present."""

    def ensemble_config(self, d_in: int, d_out: int, seed: int) -> EnsembleConfig:
        return EnsembleConfig(d_in=d_in, d_out=d_out, n_members=self.n_members, n_latents=self.n_latents,
                              k=self.k, activation=self.activation, skip=self.skip, matryoshka=self.matryoshka,
                              seed=seed)


def _rows(records, valid: np.ndarray, splits: tuple[str, ...]) -> np.ndarray:
    return np.array([i for i, r in enumerate(records) if r.split in splits and valid[i]], dtype=np.int64)


def hidden_of(head, x: np.ndarray, batch: int = 8192) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([head.hidden(torch.from_numpy(x[s:s + batch]).float()).numpy()
                               for s in range(0, len(x), batch)])


def run_train_transcoders(run: RunDir, cfg: TranscoderStageConfig, seed: int = 0, progress: bool = True
                          ) -> tuple[list[str], dict[str, Any]]:
    from sae_cxr.classifier import load_head
    from sae_cxr.extract import EmbeddingStore, resolve_device
    from sae_cxr.ingest import open_run_dataset
    from sae_cxr.transcoders.metrics import evaluate_ensemble
    from sae_cxr.transcoders.train import train_ensemble

    ds = open_run_dataset(run)
    store = EmbeddingStore(run)
    head = load_head(run)
    x = store.features()
    valid = store.valid
    tr = _rows(ds.records, valid, ("train",))
    held = _rows(ds.records, valid, ("val", "test"))
    if len(tr) == 0:
        raise ValueError("the transcoders need training images: the run's train split is empty")
    x_tr = x[tr]
    h_tr = hidden_of(head, x_tr)
    ens_cfg = cfg.ensemble_config(x.shape[1], h_tr.shape[1], seed)
    train_cfg = dataclasses.replace(cfg.train, batch_size=min(cfg.train.batch_size, len(tr)))
    device = resolve_device(cfg.device)
    ens, history = train_ensemble(x_tr, h_tr, ens_cfg, train_cfg, device=device,
                                  checkpoint_dir=_checkpoint_dir(run, ens_cfg, train_cfg, x_tr, h_tr),
                                  progress=progress)
    ens = ens.cpu() if hasattr(ens, "cpu") else ens
    ens.save(run.sub(TC_DIR))
    shutil.rmtree(run.sub(CHECKPOINT_DIR), ignore_errors=True)
    write_json_atomic(run.sub(HISTORY), history.to_dict())
    summary: dict[str, Any] = {"members": ens_cfg.n_members, "latents": ens_cfg.n_latents, "k": ens_cfg.k,
                               "activation": ens_cfg.activation, "train_samples": int(len(tr)),
                               "train_seconds": round(history.wall_s, 1), "backend": history.backend}
    if len(held):
        labels = ds.labels()[held]
        metrics = evaluate_ensemble(ens, x[held], hidden_of(head, x[held]), head.W2.detach(), head.b2.detach(),
                                    labels, findings=list(FINDINGS))
        write_json_atomic(run.sub(METRICS), metrics.to_dict())
        print(metrics.table())
        s = metrics.summary()
        summary.update({"fvu_median": round(s["fvu"]["median"], 4), "l0_median": round(s["l0"]["median"], 2),
                        "dead_fraction_median": round(s["dead_fraction"]["median"], 4),
                        "dense_fraction_median": round(s["dense_fraction"]["median"], 4)})
        if "loss_recovered" in s:
            summary["loss_recovered_median"] = round(s["loss_recovered"]["median"], 4)
        drops = {f: round(-s[f"auroc_delta[{f}]"]["median"], 4) for f in FINDINGS if f"auroc_delta[{f}]" in s}
        if drops:
            summary["spliced_auroc_drop_median"] = drops
    return [TC_DIR], summary


def _checkpoint_dir(run: RunDir, ens_cfg: EnsembleConfig, train_cfg: TrainConfig, x: np.ndarray, h: np.ndarray):
    """transcoders/checkpoint/<key>, the key digesting the configs and the training pairs.

    A killed stage rerun with the same inputs resumes from its checkpoint; rerun with another config
    or other data it starts afresh, and checkpoints of other inputs are removed (they could never be
    resumed, and are large)."""
    d = hashlib.sha256()
    d.update(json.dumps({"ensemble": ens_cfg.to_dict(), "train": train_cfg.to_dict()}, sort_keys=True,
                        default=str).encode())
    for a in (x, h):
        a = np.ascontiguousarray(a)
        d.update(str(a.shape).encode() + str(a.dtype).encode())
        d.update(memoryview(a).cast("B"))
    key = d.hexdigest()[:16]
    root = run.sub(CHECKPOINT_DIR)
    if root.is_dir():
        for other in root.iterdir():
            if other.name != key:
                if other.is_dir():
                    shutil.rmtree(other, ignore_errors=True)
                else:
                    other.unlink(missing_ok=True)
    return root / key


def load_ensemble(run: RunDir, device: str = "cpu") -> TranscoderEnsemble:
    run.require("train-transcoders")
    checked = [run.verify_identity(f"{TC_DIR}/{name}") for name in ("config.json", "ensemble.safetensors")]
    model = TranscoderEnsemble.load(run.sub(TC_DIR), device=device)
    for path, ident in checked:  # the bytes loaded are the bytes whose checksums matched
        if ident is not None:
            run.check_unchanged(path, ident)
    return model
