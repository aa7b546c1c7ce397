"""Naive references for the transcoder tests: one member at a time, dense, plain autograd."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sae_cxr.transcoders.ensemble import EnsembleConfig, TranscoderEnsemble


def small_model(E: int = 4, m: int = 64, d_in: int = 24, d_out: int = 20, k: int | tuple[int, ...] = 5,
                activation: str = "topk", skip: bool = False, matryoshka=None, seed: int = 0) -> TranscoderEnsemble:
    """A small ensemble with non-trivial biases (and skip / thresholds) so every term matters."""
    cfg = EnsembleConfig(d_in=d_in, d_out=d_out, n_members=E, n_latents=m, k=k, activation=activation,
                         skip=skip, matryoshka=matryoshka, seed=seed)
    model = TranscoderEnsemble(cfg)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        model.b_enc.copy_(0.1 * torch.randn(E, m, generator=g))
        model.b_dec.copy_(torch.randn(E, d_out, generator=g))
        if skip:
            model.W_skip.copy_(0.1 * torch.randn(E, d_out, d_in, generator=g))
        if activation == "jumprelu":
            model.log_threshold.copy_((0.05 + 0.5 * torch.rand(E, m, generator=g)).log())
    return model


def dense_topk(pre: Tensor, k: int) -> Tensor:
    """[B, m] -> dense activations keeping the k largest positive entries of each row."""
    v, i = pre.relu().topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, i, v)


def naive_member(model: TranscoderEnsemble, e: int, x: Tensor, batch_select: bool = False) -> tuple[Tensor, Tensor]:
    """Member e on its own, dense: (activations [B, m], h_hat [B, d_out]); differentiable."""
    cfg = model.cfg
    pre = x @ model.W_enc[e].T + model.b_enc[e]
    k = cfg.k_per_member()[e]
    if cfg.activation == "topk" or (cfg.activation == "batchtopk" and not batch_select
                                    and not bool(torch.isfinite(model.batch_threshold).all())):
        z = dense_topk(pre, k)
    elif cfg.activation == "batchtopk" and batch_select:
        flat = pre.relu().reshape(-1)
        v, i = flat.topk(k * x.shape[0])
        z = torch.zeros_like(flat).scatter(0, i, v).view_as(pre)
    elif cfg.activation == "batchtopk":
        z = pre * ((pre > model.batch_threshold[e]) & (pre > 0))
    else:
        z = pre * (pre > model.log_threshold[e].exp()).to(pre.dtype)
    h_hat = z @ model.W_dec[e] + model.b_dec[e]
    if model.W_skip is not None:
        h_hat = h_hat + x @ model.W_skip[e].T
    return z, h_hat


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def assert_close(a: Tensor, b: Tensor, tol: float = 1e-5, what: str = "") -> None:
    err = rel_err(a, b)
    assert err < tol and not math.isnan(err), f"{what}: relative error {err:.2e} >= {tol:.0e}"
