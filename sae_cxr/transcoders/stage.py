"""The train-transcoders stage: fit the ensemble on (x, h) pairs from the run, evaluate every member.

x is the classifier input from the embeddings; h = relu(W1 x + b1) is the trained head's hidden
layer, computed here from the saved head (never stored). Members are trained on the train split;
metrics come from held-out images (val and test), with the head's W2, b2 and the labels, so
spliced AUROC and loss recovered describe what the transcoders do to the actual classifier.

Layout (transcoders/): ensemble.safetensors + config.json (raw units, normalisation folded),
metrics.json (per member and the ensemble median/spread), history.json (training curve); a
checkpoint lives in transcoders/checkpoint/ while training runs and is removed when it finishes.

Under torchrun the members are divided among the ranks (contiguous blocks, the same seeds per
member): each rank trains its slice with its own checkpoint (transcoders/checkpoint/members-A-B/)
and saves it to transcoders/parts/members-A-B/; rank 0 stacks the slices into the usual
ensemble.safetensors, evaluates it and removes the parts. A rerun keeps finished slices.
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

from sae_cxr import distributed as dist
from sae_cxr.findings import FINDINGS
from sae_cxr.run import RunDir, write_json_atomic
from sae_cxr.transcoders.ensemble import EnsembleConfig, TranscoderEnsemble
from sae_cxr.transcoders.train import TrainConfig

log = logging.getLogger("sae_cxr.transcoders")

TC_DIR = "transcoders"
METRICS = "transcoders/metrics.json"
HISTORY = "transcoders/history.json"
CHECKPOINT_DIR = "transcoders/checkpoint"
PARTS_DIR = "transcoders/parts"


@dataclass
class TranscoderStageConfig:
    """The ensemble's shape (its input and output widths come from the run) and its training."""

    n_members: int = 100
    """E: members trained side by side."""
    n_latents: int = 128
    """m: latents per member. Small members with many of them: on the phantom demo m = 128 recovers
    17/18 planted concepts with 0.8% dead latents, m = 512 only 15/18 with 12% dead (fragmented;
    both measured at 20 epochs)."""
    k: int | tuple[int, ...] = 32
    """Active latents per sample, one value or one per member (a k sweep inside the ensemble)."""
    activation: str = "batchtopk"
    """topk | batchtopk | jumprelu. BatchTopK by default: per-sample TopK makes concepts compete for
    k slots inside each image, which blurs a latent's detection of its concept."""
    skip: bool = False
    """Add a skip path W_skip x per member."""
    matryoshka: tuple[int, ...] | str | None = "auto"
    """Nested prefix sizes for a Matryoshka loss; "auto" = (m/8, m/2, m), None = no nesting. The short
    prefixes must reconstruct alone, which pushes the frequent, broad concepts into the first latents
    and keeps them from splitting."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=40.0, min_samples=150_000,
                                                                   input_reconstruction=1.0))
    """40 epochs and at least 150k samples (~590 steps), the input reconstructed at weight 1: on the
    artifact world (6k images, 3.6k training samples) the under-exposed atelectasis films are only
    separated late in training; 20 epochs recover 16/18 concepts there (atelectasis AUROC 0.878), 40
    epochs with weight 1.0 recover 17/18 (0.919). What counts is the number of steps: on a 4k-image
    world (2.4k samples) 40 epochs leave atelectasis at 0.882 and 60 reach 0.903."""
    device: str = "auto"
    """auto = CUDA when present."""

    def __post_init__(self) -> None:
        if isinstance(self.matryoshka, list):
            self.matryoshka = tuple(self.matryoshka)
        if isinstance(self.matryoshka, str) and self.matryoshka != "auto":
            raise ValueError(f"matryoshka must be a list of prefix sizes, \"auto\" or null, got {self.matryoshka!r}")

    def prefixes(self) -> tuple[int, ...] | None:
        """The Matryoshka prefix sizes for this n_latents."""
        if self.matryoshka != "auto":
            return self.matryoshka  # type: ignore[return-value]
        m = self.n_latents
        return tuple(sorted({max(1, m // 8), max(1, m // 2), m}))

    def ensemble_config(self, d_in: int, d_out: int, seed: int) -> EnsembleConfig:
        return EnsembleConfig(d_in=d_in, d_out=d_out, n_members=self.n_members, n_latents=self.n_latents,
                              k=self.k, activation=self.activation, skip=self.skip, matryoshka=self.prefixes(),
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
    if dist.is_distributed():
        _train_my_members(run, x_tr, h_tr, ens_cfg, train_cfg, device, progress)
        return dist.on_main(lambda: _finish(run, *_merge_members(run, ens_cfg), ens_cfg, ds, x, head, tr, held),
                            what="merging the ensemble")
    ens, history = train_ensemble(x_tr, h_tr, ens_cfg, train_cfg, device=device,
                                  checkpoint_dir=_checkpoint_dir(run, ens_cfg, train_cfg, x_tr, h_tr),
                                  progress=progress)
    return _finish(run, ens, history.to_dict(), ens_cfg, ds, x, head, tr, held)


def _finish(run: RunDir, ens: TranscoderEnsemble, history: dict[str, Any], ens_cfg: EnsembleConfig, ds,
            x: np.ndarray, head, tr: np.ndarray, held: np.ndarray) -> tuple[list[str], dict[str, Any]]:
    """Save the trained ensemble and its history, evaluate it on held-out images, summarise."""
    from sae_cxr.transcoders.metrics import evaluate_ensemble

    ens = ens.cpu() if hasattr(ens, "cpu") else ens
    ens.save(run.sub(TC_DIR))
    shutil.rmtree(run.sub(CHECKPOINT_DIR), ignore_errors=True)
    write_json_atomic(run.sub(HISTORY), history)
    summary: dict[str, Any] = {"members": ens_cfg.n_members, "latents": ens_cfg.n_latents, "k": ens_cfg.k,
                               "activation": ens_cfg.activation, "train_samples": int(len(tr)),
                               "train_seconds": round(history["wall_s"], 1), "backend": history["backend"]}
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


def _part_name(start: int, stop: int) -> str:
    return f"members-{start:05d}-{stop:05d}"


def _part_meta(ens_cfg: EnsembleConfig, train_cfg: TrainConfig, start: int, stop: int, data: str) -> dict[str, Any]:
    """What a member slice was trained from: a finished slice is reused only when all of it matches."""
    return json.loads(json.dumps({"members": [start, stop], "ensemble": ens_cfg.to_dict(),
                                  "train": train_cfg.to_dict(), "data": data}))


def _train_my_members(run: RunDir, x_tr: np.ndarray, h_tr: np.ndarray, ens_cfg: EnsembleConfig,
                      train_cfg: TrainConfig, device: torch.device, progress: bool) -> None:
    """Every rank: train this rank's contiguous slice of the members (resuming from its checkpoint,
    or keeping a finished slice) and save it under transcoders/parts/."""
    from sae_cxr.transcoders.train import _fingerprint, member_slice_config, train_ensemble

    a, b = dist.shard_range(ens_cfg.n_members)
    with dist.all_ranks("training the ensemble's members"):
        if b > a:
            fp = _fingerprint(torch.as_tensor(x_tr).float(), torch.as_tensor(h_tr).float())
            meta = _part_meta(ens_cfg, train_cfg, a, b, fp)
            part_dir = run.sub(f"{PARTS_DIR}/{_part_name(a, b)}")
            if _stored_meta(part_dir) == meta and (part_dir / "history.json").exists():
                log.info("%smembers [%d, %d) already trained: kept", dist.rank_prefix(), a, b)
            else:
                ckpt = run.sub(f"{CHECKPOINT_DIR}/{_part_name(a, b)}")
                part, history = train_ensemble(x_tr, h_tr, member_slice_config(ens_cfg, a, b), train_cfg,
                                               device=device, checkpoint_dir=ckpt, progress=progress)
                part.cpu().save(part_dir, metadata=meta)
                write_json_atomic(part_dir / "history.json", history.to_dict())
                shutil.rmtree(ckpt, ignore_errors=True)


def _stored_meta(part_dir) -> dict[str, Any] | None:
    try:
        return json.loads((part_dir / "config.json").read_text()).get("metadata")
    except (OSError, ValueError):
        return None


def _merge_members(run: RunDir, ens_cfg: EnsembleConfig) -> tuple[TranscoderEnsemble, dict[str, Any]]:
    """Rank 0: stack the ranks' member slices, in member order, into the full ensemble; one history
    with each slice's training curve under "parts"."""
    from sae_cxr.transcoders.train import concat_members

    world = dist.world_size()
    ranges = [r for r in (dist.shard_range(ens_cfg.n_members, k, world) for k in range(world)) if r[1] > r[0]]
    expected = json.loads(json.dumps(ens_cfg.to_dict()))
    parts, histories = [], []
    for a, b in ranges:
        d = run.sub(f"{PARTS_DIR}/{_part_name(a, b)}")
        meta = _stored_meta(d)
        if meta is None or meta.get("members") != [a, b] or meta.get("ensemble") != expected:
            raise RuntimeError(f"{d} is missing or was trained for another ensemble; rerun the stage")
        parts.append(TranscoderEnsemble.load(d))
        histories.append({"members": [a, b], **json.loads((d / "history.json").read_text())})
    ens = concat_members(ens_cfg, parts)
    first = histories[0]
    history = {"records": [], "normalization": first["normalization"],
               "wall_s": max(h["wall_s"] for h in histories), "steps": first["steps"], "backend": first["backend"],
               "world_size": world, "parts": histories}
    shutil.rmtree(run.sub(PARTS_DIR), ignore_errors=True)
    return ens, history


def load_ensemble(run: RunDir, device: str = "cpu") -> TranscoderEnsemble:
    run.require("train-transcoders")
    checked = [run.verify_identity(f"{TC_DIR}/{name}") for name in ("config.json", "ensemble.safetensors")]
    model = TranscoderEnsemble.load(run.sub(TC_DIR), device=device)
    for path, ident in checked:  # the bytes loaded are the bytes whose checksums matched
        if ident is not None:
            run.check_unchanged(path, ident)
    return model
