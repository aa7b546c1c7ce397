"""A stacked ensemble of transcoders: E members map the classifier input x to its hidden layer h.

Member e: pre_e = W_enc[e] x + b_enc[e];  z_e = sparse(pre_e);  h_hat_e = W_dec[e]^T z_e + b_dec[e]
(+ W_skip[e] x). All members live in stacked parameters (no per-member modules) so one GEMM
encodes every member (x is shared) and one optimiser trains them all.

Layout, chosen for the fast path: one contiguous ROW per latent, for the encoder and the decoder.
  W_enc [E, m, d_in]   encoder row j of member e: pre[e, j] = W_enc[e, j] . x + b_enc[e, j]
  W_dec [E, m, d_out]  decoder row j: latent j's direction in h
Viewing W_enc as [E*m, d_in] makes the forward a single x @ W^T GEMM, and the sparse backward a
scatter of whole rows (only the k selected latents of each sample), the same for both matrices.

Units. A saved / returned model works in RAW units: raw x in, raw h out. Training runs on
normalised activations and folds the normalisation into the weights (`fold_normalization`), so
the exact-attribution identity downstream uses these tensors as they are.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sae_cxr.run import atomic_path, write_bytes_atomic
from sae_cxr.transcoders import sparse_ops
from sae_cxr.transcoders.sparse_ops import Selection

FORMAT = "sae-cxr-transcoder-ensemble"
FORMAT_VERSION = 1
ACTIVATIONS = ("topk", "batchtopk", "jumprelu")


@dataclass
class EnsembleConfig:
    """Shape and activation of a transcoder ensemble (saved as config.json next to the weights)."""

    d_in: int
    """Width of the classifier input x (256 phantom demo, 512 / 1024 BiomedCLIP)."""
    d_out: int
    """Width of the hidden layer h that members reconstruct (256 by default)."""
    n_members: int = 100
    """E: members trained side by side; patterns are consolidated across them downstream."""
    n_latents: int = 512
    """m: dictionary size of every member."""
    k: int | tuple[int, ...] = 32
    """Active latents per sample: one int for all members, or one per member (a k sweep inside
    one ensemble). BatchTopK keeps k*B per member over a batch; JumpReLU uses k only to set the
    initial thresholds."""
    activation: str = "topk"
    """topk (default), batchtopk, or jumprelu."""
    skip: bool = False
    """Add a dense skip path W_skip[e] x (skip transcoder). Costs a d_out x d_in GEMM per member."""
    matryoshka: tuple[int, ...] | None = None
    """Nested prefix sizes, increasing, the last equal to n_latents (appended if missing). Training
    then reconstructs from every prefix, so early latents carry coarse, general features."""
    seeds: tuple[int, ...] | None = None
    """Initialisation seed of each member; None means seed + e."""
    seed: int = 0
    """Base seed used when `seeds` is None."""

    def __post_init__(self) -> None:
        if isinstance(self.k, list):
            self.k = tuple(int(v) for v in self.k)
        if isinstance(self.seeds, list):
            self.seeds = tuple(int(v) for v in self.seeds)
        if isinstance(self.matryoshka, list):
            self.matryoshka = tuple(int(v) for v in self.matryoshka)
        for name in ("d_in", "d_out", "n_members", "n_latents"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EnsembleConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"EnsembleConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        ks = self.k_per_member()
        if any(k < 1 or k > self.n_latents for k in ks):
            raise ValueError(f"every k must be in [1, n_latents={self.n_latents}], got {sorted(set(ks))}")
        if self.seeds is not None and len(self.seeds) != self.n_members:
            raise ValueError(f"seeds has {len(self.seeds)} entries for {self.n_members} members")
        if self.matryoshka is not None:
            pre = tuple(int(p) for p in self.matryoshka)
            if pre and pre[-1] != self.n_latents:
                pre = pre + (self.n_latents,)
            if any(b <= a for a, b in zip(pre, pre[1:])) or pre[0] < 1 or pre[-1] != self.n_latents:
                raise ValueError(f"matryoshka prefixes must increase and end at n_latents, got {self.matryoshka}")
            self.matryoshka = pre

    def k_per_member(self) -> list[int]:
        if isinstance(self.k, int):
            return [int(self.k)] * self.n_members
        if len(self.k) != self.n_members:
            raise ValueError(f"k has {len(self.k)} entries for {self.n_members} members")
        return [int(v) for v in self.k]

    def member_seeds(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else [self.seed + e for e in range(self.n_members)]

    def n_levels(self) -> int:
        return len(self.matryoshka) if self.matryoshka else 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EnsembleConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown EnsembleConfig key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class SparseCodes:
    """Active latents per (sample, member), padded: slot s of row (b, e) is latent indices[b, e, s]
    with activation values[b, e, s] > 0; empty slots have value 0 and index -1."""

    values: Tensor
    """[B, E, K] float (a single member's codes drop the E axis: [B, K])."""
    indices: Tensor
    """[B, E, K] int64 latent index within the member, -1 for an empty slot."""
    n_latents: int

    def l0(self) -> Tensor:
        """[B, E] number of active latents."""
        return (self.values > 0).sum(-1)

    def to_dense(self) -> Tensor:
        """[B, E, m] dense activations."""
        shape = (*self.values.shape[:-1], self.n_latents)
        dense = torch.zeros(shape, dtype=self.values.dtype, device=self.values.device)
        ok = self.indices >= 0
        return dense.scatter_add_(-1, self.indices.clamp(min=0), torch.where(ok, self.values, 0.0))


@dataclass
class EnsembleOutput:
    codes: SparseCodes
    h_hat: Tensor
    """[B, E, d_out] each member's reconstruction of h."""


def _check_input(x: Tensor, d: int, name: str = "x") -> None:
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"{name} must have shape [B, {d}], got {list(x.shape)}")
    bad = ~torch.isfinite(x).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        raise ValueError(f"{name} has NaN/inf in {rows.numel()} rows (first: {int(rows[0])})")


def matryoshka_levels(cfg: EnsembleConfig) -> Tensor | None:
    """[m] int32: index of the first Matryoshka prefix that contains each latent."""
    if not cfg.matryoshka:
        return None
    level = torch.zeros(cfg.n_latents, dtype=torch.int32)
    start = 0
    for l, end in enumerate(cfg.matryoshka):
        level[start:end] = l
        start = end
    return level


class TranscoderEnsemble(nn.Module):
    """E transcoders in stacked parameters; see the module docstring for layout and units."""

    def __init__(self, cfg: EnsembleConfig, device: str | torch.device | None = None, init: bool = True):
        super().__init__()
        self.cfg = cfg
        E, m, di, do = cfg.n_members, cfg.n_latents, cfg.d_in, cfg.d_out
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.W_enc = nn.Parameter(torch.empty(E, m, di, device=dev))
        self.b_enc = nn.Parameter(torch.zeros(E, m, device=dev))
        self.W_dec = nn.Parameter(torch.empty(E, m, do, device=dev))
        self.b_dec = nn.Parameter(torch.zeros(E, do, device=dev))
        self.W_skip = nn.Parameter(torch.zeros(E, do, di, device=dev)) if cfg.skip else None
        self.log_threshold = (nn.Parameter(torch.full((E, m), math.log(1e-3), device=dev))
                              if cfg.activation == "jumprelu" else None)
        # BatchTopK inference threshold per member, estimated in training (NaN: not estimated yet)
        self.register_buffer("batch_threshold", torch.full((E,), math.nan, device=dev)
                             if cfg.activation == "batchtopk" else None)
        self.register_buffer("k_tensor", torch.tensor(cfg.k_per_member(), dtype=torch.long, device=dev))
        lv = matryoshka_levels(cfg)
        self.register_buffer("level", lv.to(dev) if lv is not None else None, persistent=False)
        if init:
            self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random unit decoder rows per member (own seed); encoder = decoder rows when d_in == d_out
        (the transpose in the usual [d, m] picture), else its own random unit rows."""
        cfg = self.cfg
        for e, s in enumerate(cfg.member_seeds()):
            g = torch.Generator().manual_seed(int(s))
            wd = torch.randn(cfg.n_latents, cfg.d_out, generator=g)
            wd /= wd.norm(dim=1, keepdim=True)
            we = wd.clone() if cfg.d_in == cfg.d_out else torch.randn(cfg.n_latents, cfg.d_in, generator=g)
            we /= we.norm(dim=1, keepdim=True)
            self.W_dec[e].copy_(wd)
            self.W_enc[e].copy_(we)
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.W_skip is not None:
            self.W_skip.zero_()

    # ------------------------------------------------------------------ properties
    @property
    def n_members(self) -> int:
        return self.cfg.n_members

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def normalize_decoder(self) -> None:
        """Unit-norm decoder rows (training keeps them so; a folded model does not)."""
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp(min=1e-12)

    # ------------------------------------------------------------------ forward
    def inference_selection(self) -> Selection:
        cfg = self.cfg
        if cfg.activation == "jumprelu":
            return Selection("threshold", thr_lat=self.log_threshold.detach().exp().contiguous())
        if cfg.activation == "batchtopk" and bool(torch.isfinite(self.batch_threshold).all()):
            return Selection("threshold", thr_mem=self.batch_threshold.contiguous())
        return Selection("topk", k=self.k_tensor)

    def skip_term(self, x: Tensor) -> Tensor | None:
        """[B, E, d_out] = W_skip[e] x for every member (one GEMM), or None."""
        if self.W_skip is None:
            return None
        E, do, di = self.W_skip.shape
        return (x @ self.W_skip.reshape(E * do, di).t()).view(x.shape[0], E, do)

    def encode(self, x: Tensor, differentiable: bool = False) -> SparseCodes:
        """x [B, d_in] -> sparse codes [B, E, K] (inference selection; BatchTopK uses its threshold).

        differentiable=True keeps the graph (values w.r.t. x and the weights), e.g. for gradient maps."""
        _check_input(x.detach(), self.cfg.d_in)
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            enc = sparse_ops.encode(x.to(self.W_enc.dtype), self.W_enc, self.b_enc, None, self.inference_selection())
        return SparseCodes(enc.values, enc.indices, self.cfg.n_latents)

    def decode(self, codes: SparseCodes, x: Tensor | None = None) -> Tensor:
        """Codes [B, E, K] (+ x for the skip path) -> h_hat [B, E, d_out]."""
        base = None
        if self.W_skip is not None:
            if x is None:
                raise ValueError("this ensemble has a skip path: decode(codes, x) needs x")
            base = self.skip_term(x)
        out, _, _ = sparse_ops.decode(codes.values, codes.indices, self.W_dec, self.b_dec, base)
        return out[-1]

    def forward(self, x: Tensor, differentiable: bool = False) -> EnsembleOutput:
        """x [B, d_in] -> codes [B, E, K] and h_hat [B, E, d_out] (no graph unless differentiable)."""
        codes = self.encode(x, differentiable)
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            h_hat = self.decode(codes, x)
        return EnsembleOutput(codes, h_hat)

    def dense_latents(self, x: Tensor) -> Tensor:
        """[B, E, m] latent activations (zeros where inactive), for analysis."""
        return self.encode(x).to_dense()

    # ------------------------------------------------------------------ members
    def member(self, e: int) -> "Transcoder":
        """A standalone single transcoder holding a copy of member e."""
        if not 0 <= e < self.n_members:
            raise IndexError(f"member {e} out of range [0, {self.n_members})")
        cfg = dataclasses.replace(self.cfg, n_members=1, k=self.cfg.k_per_member()[e],
                                  seeds=(self.cfg.member_seeds()[e],))
        single = TranscoderEnsemble(cfg, device=self.device, init=False)
        with torch.no_grad():
            for name, t in self.state_tensors().items():
                getattr(single, name).copy_(t[e:e + 1])
        return Transcoder(single)

    # ------------------------------------------------------------------ save / load
    def state_tensors(self) -> dict[str, Tensor]:
        """The tensors that define the model (what the safetensors file holds)."""
        out = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.W_skip is not None:
            out["W_skip"] = self.W_skip
        if self.log_threshold is not None:
            out["log_threshold"] = self.log_threshold
        if self.batch_threshold is not None:
            out["batch_threshold"] = self.batch_threshold
        return {k: v.detach() for k, v in out.items()}

    def save(self, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write <dir>/ensemble.safetensors + <dir>/config.json (atomic per file)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous().cpu() for k, v in self.state_tensors().items()}
        with atomic_path(d / "ensemble.safetensors") as tmp:  # temp name, fsync, rename: never half-written
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "units": "raw",
                "config": self.cfg.to_dict(), "metadata": metadata or {}}
        write_bytes_atomic(d / "config.json", json.dumps(meta, indent=2).encode())
        return d

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device | None = None) -> "TranscoderEnsemble":
        d = Path(directory)
        cfile, wfile = d / "config.json", d / "ensemble.safetensors"
        for f in (cfile, wfile):
            if not f.exists():
                raise FileNotFoundError(f"{f} not found: is {d} a directory written by TranscoderEnsemble.save?")
        meta = json.loads(cfile.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{cfile} is not a {FORMAT} config (format={meta.get('format')!r})")
        if int(meta.get("version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{cfile} has format version {meta['version']}; this code reads <= {FORMAT_VERSION}")
        model = cls(EnsembleConfig.from_dict(meta["config"]), device=device, init=False)
        tensors = load_file(str(wfile))
        expected = model.state_tensors()
        if set(tensors) != set(expected):
            raise ValueError(f"{wfile} holds {sorted(tensors)}, expected {sorted(expected)}")
        with torch.no_grad():
            for name, t in tensors.items():
                if t.shape != expected[name].shape:
                    raise ValueError(f"{wfile}: {name} has shape {list(t.shape)}, expected {list(expected[name].shape)}")
                getattr(model, name).copy_(t)
        return model


class Transcoder(nn.Module):
    """One member as a standalone module: the ensemble API without the member axis."""

    def __init__(self, single: TranscoderEnsemble):
        super().__init__()
        if single.n_members != 1:
            raise ValueError("Transcoder wraps a one-member ensemble")
        self.ensemble = single

    @property
    def cfg(self) -> EnsembleConfig:
        return self.ensemble.cfg

    def encode(self, x: Tensor) -> SparseCodes:
        """x [B, d_in] -> codes with values/indices [B, K]."""
        c = self.ensemble.encode(x)
        return SparseCodes(c.values[:, 0], c.indices[:, 0], c.n_latents)

    def decode(self, codes: SparseCodes, x: Tensor | None = None) -> Tensor:
        """codes [B, K] -> h_hat [B, d_out]."""
        c = SparseCodes(codes.values[:, None], codes.indices[:, None], codes.n_latents)
        return self.ensemble.decode(c, x)[:, 0]

    def forward(self, x: Tensor) -> EnsembleOutput:
        out = self.ensemble(x)
        return EnsembleOutput(SparseCodes(out.codes.values[:, 0], out.codes.indices[:, 0], out.codes.n_latents),
                              out.h_hat[:, 0])

    def dense_latents(self, x: Tensor) -> Tensor:
        """[B, m]."""
        return self.ensemble.dense_latents(x)[:, 0]

    def save(self, directory: str | Path) -> Path:
        return self.ensemble.save(directory)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device | None = None) -> "Transcoder":
        return cls(TranscoderEnsemble.load(directory, device))


@dataclass
class Normalization:
    """Affine normalisation used in training: x_n = (x - x_mean) / x_scale, h_n = (h - h_mean) / h_scale."""

    x_mean: Tensor
    """[d_in]"""
    x_scale: Tensor
    """scalar (or [d_in]): RMS norm of the centred x divided by sqrt(d_in), so a dimension has unit variance on average."""
    h_mean: Tensor
    """[d_out]"""
    h_scale: Tensor
    """scalar (or [d_out])"""

    @classmethod
    def fit(cls, x: Tensor, h: Tensor) -> "Normalization":
        def stats(a: Tensor) -> tuple[Tensor, Tensor]:
            a64 = a.double()
            mu = a64.mean(0)
            sc = ((a64 - mu).pow(2).sum(1).mean() / a.shape[1]).sqrt().clamp(min=1e-12)
            return mu.float(), sc.float()

        xm, xs = stats(x)
        hm, hs = stats(h)
        return cls(xm, xs, hm, hs)

    @classmethod
    def identity(cls, d_in: int, d_out: int) -> "Normalization":
        return cls(torch.zeros(d_in), torch.tensor(1.0), torch.zeros(d_out), torch.tensor(1.0))

    def x(self, x: Tensor) -> Tensor:
        return (x - self.x_mean.to(x.device)) / self.x_scale.to(x.device)

    def h(self, h: Tensor) -> Tensor:
        return (h - self.h_mean.to(h.device)) / self.h_scale.to(h.device)

    def h_inverse(self, h_n: Tensor) -> Tensor:
        return h_n * self.h_scale.to(h_n.device) + self.h_mean.to(h_n.device)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k).tolist() for k in ("x_mean", "x_scale", "h_mean", "h_scale")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Normalization":
        return cls(**{k: torch.tensor(v, dtype=torch.float32) for k, v in d.items()})


@torch.no_grad()
def fold_normalization(model: TranscoderEnsemble, norm: Normalization) -> TranscoderEnsemble:
    """A copy of `model` (trained on normalised x, h) that takes raw x and returns raw h.

    pre = W_enc (x - mx)/sx + b_enc  =>  W_enc' = W_enc / sx,  b_enc' = b_enc - W_enc' mx
    h = sh (W_dec^T z + b_dec + W_skip (x - mx)/sx) + mh
      =>  W_dec' = sh W_dec,  W_skip' = sh W_skip / sx,  b_dec' = sh b_dec - W_skip' mx + mh
    Pre-activations, hence the selection, the latent values and all thresholds are unchanged.
    """
    out = TranscoderEnsemble(model.cfg, device=model.device, init=False)
    dev = model.device
    mx, sx = norm.x_mean.to(dev), norm.x_scale.to(dev)
    mh, sh = norm.h_mean.to(dev), norm.h_scale.to(dev)
    for name, t in model.state_tensors().items():
        getattr(out, name).copy_(t)
    W_enc = model.W_enc / sx
    out.W_enc.copy_(W_enc)
    out.b_enc.copy_(model.b_enc - torch.einsum("emd,d->em", W_enc, mx))
    out.W_dec.copy_(model.W_dec * sh)
    b_dec = model.b_dec * sh + mh
    if model.W_skip is not None:
        sh_col = sh.view(-1, 1) if sh.ndim else sh
        W_skip = model.W_skip * sh_col / sx
        out.W_skip.copy_(W_skip)
        b_dec = b_dec - torch.einsum("eoi,i->eo", W_skip, mx)
    out.b_dec.copy_(b_dec)
    return out
