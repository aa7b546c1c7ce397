"""Train every member of a transcoder ensemble in ONE vectorised pass with ONE optimiser.

A step: one chunked encoder GEMM for all members (x is shared), per-member sparse selection,
the sparse decoder with the squared error fused in, a backward that touches only the selected
latents (see sparse_ops), per-member gradient clipping, decoder-parallel gradient removal,
fused Adam over the stacked parameters, decoder renormalisation. No Python loop over members.

Members never couple: each member's loss depends only on its own parameters, gradients are
clipped per member, Adam is elementwise, and the learning-rate schedule is shared. Reductions
are per member too, so a slice of the members trained alone (`member_slice_config`; one rank's
share under torch.distributed) gives bit for bit the weights those members get in the full
ensemble on the CPU kernels (same thread count), and float-rounding-close ones on the torch path.

Resumable: with `checkpoint_dir`, the state (weights, optimiser, dead counters, step, history,
normalisation) is written atomically every `checkpoint_every` steps; the data order is a pure
function of (seed, epoch), so a killed run that resumes ends with exactly the weights of an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from sae_cxr.transcoders import _native, sparse_ops
from sae_cxr.transcoders.ensemble import (EnsembleConfig, Normalization, TranscoderEnsemble, _check_input,
                                          fold_normalization)
from sae_cxr.transcoders.sparse_ops import Selection

CHECKPOINT = "checkpoint.pt"
CHECKSUMS = "checkpoint.pt.sha256"
"""JSON list of the sha256 digests a checkpoint may have: the one being written and the one before it,
so a kill at any instant leaves a checkpoint that matches (see `_save_checkpoint`)."""

log = logging.getLogger("sae_cxr.transcoders")


@dataclass
class TrainConfig:
    """How an ensemble is trained (saved with every checkpoint; a resume must use the same one)."""

    lr: float = 1e-3
    """Peak Adam learning rate (after warmup). On ~5k phantom-like samples, 2-4e-3 lowers the
    FVU a little but leaves 10-25% of latents dead on held-out data; 1e-3 keeps them alive."""
    batch_size: int = 256
    """Samples per step; the last partial batch of an epoch is dropped (the order changes per epoch)."""
    epochs: float = 20.0
    """Passes over the data; ignored when `samples` is set."""
    samples: int | None = None
    """Sample budget (overrides epochs and min_samples)."""
    min_samples: int = 0
    """Train on at least this many samples, however few the data: the optimiser needs a number of
    STEPS, not of passes, so a small data set gets more epochs (see `sample_budget`)."""
    warmup_frac: float = 0.05
    """Fraction of the steps with a linear warmup from 0."""
    min_lr_frac: float = 0.05
    """Cosine decay ends at lr * min_lr_frac."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    aux_k: int | None = None
    """AuxK: dead latents used per sample to model the residual; None = d_out // 2."""
    aux_coef: float = 0.25
    """Weight of the AuxK loss. Higher than OpenAI's 1/32: with a few thousand samples there are
    few steps in which to revive a dead latent (measured: dead latents 25% -> 18% at 1/32 -> 1/4)."""
    dead_window: int | None = None
    """A latent is dead when it has not fired in this many SAMPLES; None = min(10M, one epoch)."""
    clip_norm: float = 1.0
    """Max gradient norm PER MEMBER (members are clipped independently; 0 disables)."""
    init: str = "data"
    """"data": encoder/decoder rows from (normalised) training pairs (x_i, h_i), a different
    random subset per member; "random": the model's own unit-norm random init."""
    normalize: bool = True
    """Centre and scale x and h for training; the result is folded back into raw units."""
    l0_coef: float = 2e-3
    """JumpReLU: weight of the L0 penalty (mean active latents per sample, per member)."""
    jumprelu_bandwidth: float = 0.05
    """JumpReLU: width of the rectangle kernel of the threshold pseudo-gradient (normalised units)."""
    batchtopk_momentum: float = 0.99
    """BatchTopK: EMA momentum of the inference threshold estimated from the training batches."""
    input_reconstruction: float = 0.0
    """Weight of an auxiliary reconstruction of the (normalised) INPUT x by the same sparse code: each
    member learns a second decoder for x next to its decoder for h, and only the h decoder is kept.
    Concepts that the head uses weakly still shape the latents (they carry x's variance), so more of
    the input's structure becomes patterns; the kept model is an ordinary transcoder and the exact
    attribution identity is untouched. 0 trains a pure transcoder."""
    checkpoint_every: int = 200
    """Steps between checkpoints (with checkpoint_dir)."""
    log_every: int = 10
    """Steps between history records."""
    seed: int = 0
    """Seed of the data order (the model's seeds are in EnsembleConfig)."""
    cuda_tf32: bool = True
    """On CUDA, run float32 GEMMs in TF32 (selection stays float32)."""

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        if self.batch_size < 1 or self.lr <= 0:
            raise ValueError("batch_size must be >= 1 and lr > 0")
        if self.init not in ("data", "random"):
            raise ValueError(f"TrainConfig.init must be 'data' or 'random', got {self.init!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainHistory:
    """What happened in training: periodic records plus the normalisation that was folded."""

    records: list[dict[str, float]] = field(default_factory=list)
    """step, samples, lr, loss, fvu / l0 / dead fraction (median, min, max over members), elapsed_s."""
    normalization: dict[str, Any] | None = None
    wall_s: float = 0.0
    steps: int = 0
    backend: str = ""
    """"native" (CPU kernels) or "torch"."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Interrupted(Exception):
    """Raised by a callback to stop training (the last checkpoint stays on disk)."""


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm = max(1, int(round(cfg.warmup_frac * total)))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _as_tensor(a: Any, name: str) -> Tensor:
    t = torch.as_tensor(np.asarray(a) if not isinstance(a, Tensor) else a)
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")
    return t.float()


def _fingerprint(x: Tensor, h: Tensor) -> str:
    hs = hashlib.sha256()
    for t in (x, h):
        hs.update(str(tuple(t.shape)).encode())
        hs.update(t[:: max(1, t.shape[0] // 64)].contiguous().cpu().numpy().tobytes())
    return hs.hexdigest()[:16]


class EnsembleTrainer:
    """The vectorised training step and its state (usable step by step, e.g. by the benchmark)."""

    def __init__(self, model: TranscoderEnsemble, cfg: TrainConfig, n_samples: int):
        self.model = model
        self.cfg = cfg
        ecfg = model.cfg
        E, m = ecfg.n_members, ecfg.n_latents
        dev = model.device
        self.params = [p for p in model.parameters()]
        fused = dev.type in ("cpu", "cuda")
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr, betas=cfg.betas, fused=fused)
        self.since_fired = torch.zeros(E, m, dtype=torch.long, device=dev)
        self.dead_window = int(cfg.dead_window or min(10_000_000, n_samples))
        self.aux_k = int(cfg.aux_k if cfg.aux_k is not None else max(1, ecfg.d_out // 2))
        self.aux_k = min(self.aux_k, m)
        self.step_count = 0
        self.k_dev = model.k_tensor.to(dev)
        self.native = sparse_ops.use_native(torch.empty(0, device=dev), model.W_enc)
        # native path: gradients of the sparse parameters are written in place (see Workspace)
        self.ws = (sparse_ops.Workspace([model.W_enc, model.b_enc, model.W_dec, model.b_dec])
                   if self.native else None)
        self.sink_ids = {id(p) for p in (model.W_enc, model.b_enc, model.W_dec, model.b_dec)} if self.native else set()

    def selection(self, dead: Tensor | None) -> Selection:
        act = self.model.cfg.activation
        aux_k, aux_mask = 0, None
        if dead is not None:
            aux_k = int(min(self.aux_k, int(dead.sum(1).max())))
            aux_mask = dead if aux_k > 0 else None
        if act == "topk":
            return Selection("topk", k=self.k_dev, aux_k=aux_k, aux_mask=aux_mask)
        if act == "batchtopk":
            return Selection("batchtopk", k=self.k_dev, aux_k=aux_k, aux_mask=aux_mask)
        return Selection("threshold", window=self.cfg.jumprelu_bandwidth / 2, aux_k=aux_k, aux_mask=aux_mask)

    def step(self, xb: Tensor, hb: Tensor, lr: float | None = None) -> dict[str, Tensor]:
        """One optimisation step on a normalised batch; returns per-member stats (tensors [E])."""
        model, cfg = self.model, self.cfg
        B = xb.shape[0]
        E = model.n_members
        dead = self.since_fired >= self.dead_window
        any_dead = bool(dead.any())
        sel = self.selection(dead if any_dead else None)
        tv = (hb - hb.mean(0)).pow(2).sum().clamp(min=1e-12)
        ws = self.ws
        for p in self.params:
            if id(p) not in self.sink_ids:
                p.grad = None
        if ws is not None:
            ws.begin_step()  # the fused decoder writes its gradients during the forward
        enc = sparse_ops.encode(xb, model.W_enc, model.b_enc, model.log_threshold, sel,
                                bandwidth=cfg.jumprelu_bandwidth, native=self.native, workspace=ws)
        base = model.skip_term(xb)
        L = model.cfg.n_levels()
        weights = (1.0 / (L * tv)).expand(L, E)  # loss_e = mean over Matryoshka levels of the FVU
        loss_e, sse, rsum, out = sparse_ops.decode_loss(
            enc.values, enc.indices, model.W_dec, model.b_dec, base, hb, weights, level=model.level, n_levels=L,
            want_out=enc.aux_values is not None, native=self.native, workspace=ws)
        fvu = sse.detach() / tv  # [L, E]
        if model.log_threshold is not None:
            loss_e = loss_e + cfg.l0_coef * enc.l0
        aux = torch.zeros(E, device=xb.device)
        if enc.aux_values is not None:
            r = out[-1].detach()
            var_r = (sse[-1] - rsum.pow(2).sum(-1) / B).detach().clamp(min=1e-12)
            _, asse, _ = sparse_ops.decode(enc.aux_values, enc.aux_indices, model.W_dec, None, r, None,
                                           native=self.native, workspace=ws, key="aux")
            asse = asse[0]
            n_dead = dead.sum(1).float()
            scale = (n_dead / self.aux_k).clamp(max=1.0)  # the configured k_aux: no coupling via others' deaths
            aux = torch.where(n_dead > 0, scale * asse / var_r, torch.zeros_like(asse))
            loss_e = loss_e + cfg.aux_coef * aux
        loss = loss_e.sum()
        loss.backward()
        if ws is not None:
            ws.finish_step()
        with torch.no_grad():
            sq = self._remove_parallel_and_norms()
            self._clip_per_member(sq)
            if lr is not None:
                for g in self.opt.param_groups:
                    g["lr"] = lr
            self.opt.step()
            self._renormalize_decoder()
            self._update_fired(enc.values, enc.indices, B)
            if enc.batch_threshold is not None:
                bt = model.batch_threshold
                mom = cfg.batchtopk_momentum
                new = torch.where(torch.isfinite(bt), mom * bt + (1 - mom) * enc.batch_threshold, enc.batch_threshold)
                bt.copy_(new)
        self.step_count += 1
        return {"loss": loss.detach(), "fvu": fvu[-1].detach(), "l0": enc.l0.detach(), "aux": aux.detach(),
                "dead": dead.float().mean(1)}

    def _remove_parallel_and_norms(self) -> Tensor:
        """Drop the gradient component along each (unit) decoder row (it would only change the
        norm, which renormalisation undoes) and return each member's squared gradient norm [E]."""
        model, E = self.model, self.model.n_members
        W, g = model.W_dec, model.W_dec.grad
        sq = torch.zeros(E, dtype=torch.float64, device=W.device)
        if self.native:
            lib, nt = _native.lib(), _native.nthreads(W.numel())
            if g is not None:
                lib.dec_grad_post(g.data_ptr(), W.detach().data_ptr(), E, W.shape[1], W.shape[2], sq.data_ptr(), nt)
            for p in self.params:
                if p is W or p.grad is None:
                    continue
                if not p.grad.is_contiguous():
                    p.grad = p.grad.contiguous()
                lib.member_sqnorm(p.grad.data_ptr(), E, p.grad.numel() // E, sq.data_ptr(), nt)
            return sq.float()
        if g is not None:
            g.sub_(torch.linalg.vecdot(g, W, dim=-1).unsqueeze(-1) * W)
        for p in self.params:
            if p.grad is not None:
                n = torch.linalg.vector_norm(p.grad.reshape(E, -1), dim=1)
                sq = sq + (n * n).double()
        return sq.float()

    def _clip_per_member(self, sq: Tensor) -> None:
        """Scale each member's gradient to norm <= clip_norm, independently of the others."""
        if not self.cfg.clip_norm or self.cfg.clip_norm <= 0:
            return
        E = self.model.n_members
        scale = (self.cfg.clip_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        if bool((scale < 1).any()):
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale.view(E, *([1] * (p.grad.ndim - 1))).to(p.grad.dtype))

    def _renormalize_decoder(self) -> None:
        W = self.model.W_dec
        if self.native:
            _native.lib().renorm_rows(W.detach().data_ptr(), W.shape[0] * W.shape[1], W.shape[2],
                                      _native.nthreads(W.numel()))
        else:
            self.model.normalize_decoder()

    def _update_fired(self, values: Tensor, indices: Tensor, B: int) -> None:
        """Samples since each latent last fired (dead = at least dead_window)."""
        E, m = self.model.n_members, self.model.cfg.n_latents
        if self.native:
            v, i = values.detach().contiguous(), indices.contiguous()
            _native.lib().fired_update(v.data_ptr(), i.data_ptr(), B, E, v.shape[-1], m,
                                       self.since_fired.data_ptr(), B, _native.nthreads(v.numel()))
            return
        act = values.detach() > 0
        gidx = (indices + torch.arange(E, device=values.device).view(1, E, 1) * m)[act]
        fired = torch.zeros(E * m, dtype=torch.bool, device=values.device)
        fired[gidx] = True
        self.since_fired += B
        self.since_fired.view(-1).masked_fill_(fired, 0)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                "opt": self.opt.state_dict(), "since_fired": self.since_fired.cpu(), "step": self.step_count}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.since_fired.copy_(st["since_fired"])
        self.step_count = int(st["step"])


@torch.no_grad()
def init_from_data(model: TranscoderEnsemble, x_n: Tensor, h_n: Tensor) -> None:
    """Each member's latent j starts as a detector of one training pair (x_i, h_i): encoder row =
    unit(x_i), decoder row = unit(h_i), a different random subset of pairs per member (its seed).
    Every latent starts on the data manifold, so few are dead from the start."""
    cfg = model.cfg
    N, m = x_n.shape[0], cfg.n_latents
    for e, s in enumerate(cfg.member_seeds()):
        g = torch.Generator().manual_seed(int(s) + 7919)
        idx = torch.randperm(N, generator=g)[:m] if N >= m else torch.randint(0, N, (m,), generator=g)
        idx = idx.to(x_n.device)
        xe = x_n[idx] + 1e-3 * torch.randn(m, cfg.d_in, generator=g).to(x_n.device)
        he = h_n[idx] + 1e-3 * torch.randn(m, cfg.d_out, generator=g).to(x_n.device)
        model.W_enc[e].copy_(xe / xe.norm(dim=1, keepdim=True).clamp(min=1e-12))
        model.W_dec[e].copy_(he / he.norm(dim=1, keepdim=True).clamp(min=1e-12))
    model.b_enc.zero_()
    model.b_dec.zero_()


@torch.no_grad()
def calibrate(model: TranscoderEnsemble, x_n: Tensor, h_n: Tensor, tcfg: TrainConfig) -> None:
    """Scale each member's encoder so that its initial reconstruction has the least-squares scale
    (selection is unchanged by a positive scale), and set JumpReLU thresholds so that each latent
    fires on about k/m of the calibration batch."""
    E, m = model.n_members, model.cfg.n_latents
    xb, hb = x_n[:4096], h_n[:4096]
    if model.log_threshold is not None:
        pre = torch.addmm(model.b_enc.reshape(-1), xb, model.W_enc.reshape(E * m, -1).t()).view(-1, E, m)
        q = 1.0 - model.k_tensor.float().to(pre.device) / m  # [E]
        thr = torch.stack([torch.quantile(pre[:, e], q[e].item(), dim=0) for e in range(E)])
        model.log_threshold.copy_(thr.clamp(min=1e-3).log())
    codes = model.encode(xb)
    out, _, _ = sparse_ops.decode(codes.values, codes.indices, model.W_dec, None, None)
    rec = out[-1]  # [B, E, d]
    # One reduction per member over its own contiguous copy: a sum over the stacked [B, E, d] tensor
    # adds in an order that depends on E, so a slice of the members (one rank's share under
    # torch.distributed) would start 1 ulp away from the same members inside the full ensemble.
    num = torch.stack([(rec[:, e].contiguous() * hb).sum() for e in range(E)])
    den = torch.stack([rec[:, e].contiguous().pow(2).sum() for e in range(E)]).clamp(min=1e-12)
    s = (num / den).clamp(min=1e-3, max=1e3)  # [E]
    model.W_enc.mul_(s.view(E, 1, 1))
    model.b_enc.mul_(s.view(E, 1))
    if model.log_threshold is not None:
        model.log_threshold.add_(s.log().view(E, 1))


def train_ensemble(x: Any, h: Any, ensemble_cfg: EnsembleConfig, cfg: TrainConfig | None = None,
                   device: str | torch.device = "cpu", checkpoint_dir: str | Path | None = None,
                   progress: bool = True, callback: Callable[[int, dict[str, float]], None] | None = None,
                   ) -> tuple[TranscoderEnsemble, TrainHistory]:
    """Train all members on pairs (x [N, d_in], h [N, d_out]); returns the model in RAW units.

    checkpoint_dir: resume from <dir>/checkpoint.pt when it exists (same configs and data),
    and write it every cfg.checkpoint_every steps. callback(step, record) runs after every step;
    raising `Interrupted` stops training cleanly (the test of resumption uses it).
    """
    cfg = cfg or TrainConfig()
    x = _as_tensor(x, "x")
    h = _as_tensor(h, "h")
    _check_input(x, ensemble_cfg.d_in, "x")
    _check_input(h, ensemble_cfg.d_out, "h")
    if x.shape[0] != h.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but h has {h.shape[0]}")
    N = x.shape[0]
    if N < cfg.batch_size:
        raise ValueError(f"{N} samples is fewer than one batch (batch_size={cfg.batch_size}); lower batch_size")
    dev = torch.device(device)
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    if dev.type == "cuda" and cfg.cuda_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True  # restored on return
    try:
        return _train(x, h, ensemble_cfg, cfg, dev, checkpoint_dir, progress, callback)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before


def sample_budget(cfg: TrainConfig, n: int) -> int:
    """Samples to train on from n: `samples` when set, else epochs * n raised to min_samples."""
    if cfg.samples is not None:
        return int(cfg.samples)
    return max(int(cfg.epochs * n), int(cfg.min_samples))


def _train(x: Tensor, h: Tensor, ensemble_cfg: EnsembleConfig, cfg: TrainConfig, dev: torch.device,
           checkpoint_dir: str | Path | None, progress: bool,
           callback: Callable[[int, dict[str, float]], None] | None) -> tuple[TranscoderEnsemble, TrainHistory]:
    N = x.shape[0]
    norm = Normalization.fit(x, h) if cfg.normalize else Normalization.identity(x.shape[1], h.shape[1])
    x_n = norm.x(x).to(dev)
    h_n = norm.h(h).to(dev)
    d_out = ensemble_cfg.d_out
    if cfg.input_reconstruction > 0:  # targets [h, alpha x]; the x half of the decoder is dropped at the end
        h_n = torch.cat([h_n, cfg.input_reconstruction * x_n], dim=1)
        ensemble_cfg = dataclasses.replace(ensemble_cfg, d_out=d_out + ensemble_cfg.d_in)

    model = TranscoderEnsemble(ensemble_cfg, device=dev)
    steps_per_epoch = N // cfg.batch_size
    budget = sample_budget(cfg, N)
    total = max(1, budget // cfg.batch_size)
    trainer = EnsembleTrainer(model, cfg, N)
    history = TrainHistory(normalization=norm.to_dict(), backend="native" if trainer.native else "torch")
    fp = _fingerprint(x, h)
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    st = _load_checkpoint(ckpt) if ckpt is not None else None
    if st is not None:
        if st["ensemble_cfg"] != ensemble_cfg.to_dict() or st["train_cfg"] != cfg.to_dict() or st["data"] != fp:
            raise ValueError(f"{ckpt} was written for another config or data set; delete it or use another directory")
        trainer.load_state_dict(st["trainer"])
        history = TrainHistory(**st["history"])
    else:
        if cfg.init == "data":
            init_from_data(model, x_n, h_n)
        calibrate(model, x_n, h_n, cfg)

    def save_ckpt() -> None:
        if ckpt is None:
            return
        _save_checkpoint(ckpt, {"trainer": trainer.state_dict(), "history": history.to_dict(), "data": fp,
                                "ensemble_cfg": ensemble_cfg.to_dict(), "train_cfg": cfg.to_dict()})

    from sae_cxr.progress import progress_bar

    t0 = time.perf_counter() - history.wall_s
    bar = progress_bar(total=total, desc=f"transcoders x{ensemble_cfg.n_members}", unit="step",
                       disable=None if progress else True, initial=trainer.step_count)
    perm, perm_epoch = None, -1
    try:
        while trainer.step_count < total:
            s = trainer.step_count
            epoch, pos = divmod(s, steps_per_epoch)
            if epoch != perm_epoch:
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
                perm = torch.randperm(N, generator=g).to(dev)
                perm_epoch = epoch
            bidx = perm[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]
            stats = trainer.step(x_n[bidx], h_n[bidx], lr=_lr_at(s, total, cfg))
            rec = None
            if (s + 1) % cfg.log_every == 0 or s + 1 == total or progress:
                fvu, l0, dead = (stats[k].float().cpu() for k in ("fvu", "l0", "dead"))
                rec = {"step": s + 1, "samples": (s + 1) * cfg.batch_size, "lr": _lr_at(s, total, cfg),
                       "loss": float(stats["loss"]), "fvu": float(fvu.median()), "fvu_min": float(fvu.min()),
                       "fvu_max": float(fvu.max()), "l0": float(l0.median()), "dead": float(dead.median()),
                       "dead_max": float(dead.max()), "aux": float(stats["aux"].float().median()),
                       "elapsed_s": time.perf_counter() - t0}
                bar.set_postfix(fvu=f"{rec['fvu']:.3f}", l0=f"{rec['l0']:.1f}", dead=f"{rec['dead']:.1%}",
                                refresh=False)
                if (s + 1) % cfg.log_every == 0 or s + 1 == total:
                    history.records.append(rec)
            bar.update(1)
            history.steps = trainer.step_count
            history.wall_s = time.perf_counter() - t0
            if ckpt is not None and (trainer.step_count % cfg.checkpoint_every == 0 or trainer.step_count == total):
                save_ckpt()
            if callback is not None:
                callback(trainer.step_count, rec or {})
    finally:
        bar.close()
    history.wall_s = time.perf_counter() - t0
    if model.cfg.d_out != d_out:
        model = keep_outputs(model, d_out)
    return fold_normalization(model, norm), history


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint crash-safely: temp name, fsync, rename (atomic_path), with its sha256 recorded.

    The digest file is written BEFORE the rename and lists the new digest and the current one, so
    whether a kill lands before or after the rename, the checkpoint on disk matches a listed digest.
    """
    from sae_cxr.run import atomic_path, sha256_file, write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    sums = path.with_name(CHECKSUMS)
    previous = sha256_file(path) if path.exists() else None
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        write_json_atomic(sums, [d for d in (sha256_file(tmp), previous) if d])


def _load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint's state, or None when there is none or it is unusable (then training restarts,
    which ends with the same weights: the run is deterministic). A damaged checkpoint is reported, by
    name, in the log; it is never loaded."""
    from sae_cxr.run import sha256_file

    if not path.exists():
        return None
    sums = path.with_name(CHECKSUMS)
    try:
        accepted = json.loads(sums.read_text())
    except (OSError, ValueError):
        accepted = []
    if sha256_file(path) not in accepted:
        log.warning("checkpoint %s does not match its recorded checksum (damaged, or written by an older "
                    "version); it is ignored and training restarts from step 0", path)
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a readable-but-wrong file (other torch version, foreign pickle)
        log.warning("checkpoint %s cannot be loaded (%s: %s); training restarts from step 0", path,
                    type(e).__name__, e)
        return None


@torch.no_grad()
def keep_outputs(model: TranscoderEnsemble, d_out: int) -> TranscoderEnsemble:
    """The same ensemble with only the first `d_out` output dimensions (drops an auxiliary decoder)."""
    cfg = dataclasses.replace(model.cfg, d_out=d_out)
    out = TranscoderEnsemble(cfg, device=model.device, init=False)
    for name, t in model.state_tensors().items():
        if name == "W_dec":
            t = t[..., :d_out]
        elif name == "b_dec":
            t = t[:, :d_out]
        elif name == "W_skip":
            t = t[:, :d_out]
        getattr(out, name).copy_(t)
    return out


def member_slice_config(cfg: EnsembleConfig, start: int, stop: int) -> EnsembleConfig:
    """The config of members [start, stop) of `cfg` as an ensemble of their own: the same seeds and
    k per member, so training the slice alone gives those members' weights in the full ensemble
    (members never couple; see the module docstring). Used to divide members among ranks."""
    if not 0 <= start < stop <= cfg.n_members:
        raise ValueError(f"member slice [{start}, {stop}) is not inside [0, {cfg.n_members})")
    ks = cfg.k_per_member()[start:stop]
    return dataclasses.replace(cfg, n_members=stop - start, seeds=tuple(cfg.member_seeds()[start:stop]),
                               k=ks[0] if isinstance(cfg.k, int) else tuple(ks))


@torch.no_grad()
def concat_members(cfg: EnsembleConfig, parts: list[TranscoderEnsemble]) -> TranscoderEnsemble:
    """Stack member slices, in member order, back into one ensemble with the full config `cfg`."""
    total = sum(p.n_members for p in parts)
    if total != cfg.n_members:
        raise ValueError(f"the member slices hold {total} members, the ensemble config {cfg.n_members}")
    out = TranscoderEnsemble(cfg, device="cpu", init=False)
    for name, t in out.state_tensors().items():
        stacked = torch.cat([p.state_tensors()[name].cpu() for p in parts], dim=0)
        if stacked.shape != t.shape:
            raise ValueError(f"member slices give {name} of shape {list(stacked.shape)}, expected {list(t.shape)}")
        getattr(out, name).copy_(stacked)
    return out
