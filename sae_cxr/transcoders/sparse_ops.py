"""Sparse encode / decode for a stacked ensemble: selection, custom autograd, native and torch paths.

Two implementations of the same maths:
- native (CPU, float32, `_kernels.c`): the encoder GEMM runs per chunk of members into a
  cache-sized buffer, selection happens while the chunk is hot, and the backward touches only
  the selected latents: decoder gather-dot + row scatter, encoder row scatter. No [B, E*m]
  tensor is ever kept, no gradient is dense before the optimiser.
- torch (any device, CUDA in particular): dense pre-activations, torch.topk, embedding_bag over
  the flattened decoder, plain autograd. On a GPU the dense GEMMs are cheap and this is simple.

Slot lists. Selected latents are padded per (sample, member): values [B, E, S] and indices
[B, E, S] (int64, -1 = empty slot). A slot with index >= 0 and value 0 exists only inside JumpReLU
training (a latent just below its threshold whose decoder gradient the pseudo-gradient needs).

Matryoshka levels. `level[j]` is the nested prefix a latent first belongs to; the decoder returns
one output per prefix, out[l] = bias + base - target + sum of slots with level <= l.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_cxr.transcoders import _native

CHUNK_BYTES = int(os.environ.get("SAE_CXR_CHUNK_MB", "32")) << 20
"""Size of one chunk of pre-activations on the native path (SAE_CXR_CHUNK_MB, default 32): about
the L3 cache, so the selection reads what the GEMM just wrote, and few enough chunks that a step
has few parallel regions (on a shared machine each region waits for its slowest thread)."""


@dataclass
class Selection:
    """How each member chooses its active latents from its pre-activations.

    kind: "topk" (per sample, k[e] largest positive), "batchtopk" (k[e]*B largest positive per
    member over the batch) or "threshold" (pre > thr and pre > 0; JumpReLU and BatchTopK inference).
    """

    kind: str
    k: Tensor | None = None
    """[E] int64 per-member k (topk, batchtopk)."""
    thr_lat: Tensor | None = None
    """[E, m] per-latent thresholds (JumpReLU)."""
    thr_mem: Tensor | None = None
    """[E] per-member thresholds (BatchTopK at inference)."""
    window: float = 0.0
    """JumpReLU training: also keep latents with pre > thr - window (value 0) for the pseudo-gradient."""
    aux_k: int = 0
    """AuxK: also select the aux_k largest pre-activations among `aux_mask` latents."""
    aux_mask: Tensor | None = None
    """[E, m] bool: latents eligible for AuxK (the dead ones)."""


@dataclass
class Encoded:
    """Slot lists from one encode pass (see module docstring)."""

    values: Tensor
    """[B, E, S] float; differentiable on the training path."""
    indices: Tensor
    """[B, E, S] int64, -1 for empty slots."""
    aux_values: Tensor | None
    """[B, E, Sa] AuxK slots (or None)."""
    aux_indices: Tensor | None
    pre: Tensor | None
    """[B, E, S] pre-activation of each slot (JumpReLU training only)."""
    batch_threshold: Tensor | None
    """[E] the BatchTopK threshold used for this batch (BatchTopK training only)."""
    l0: Tensor
    """[E] mean number of active latents per sample; differentiable w.r.t. JumpReLU thresholds."""


class Workspace:
    """Persistent buffers for a training loop on the native path.

    Each step of a naive implementation allocates, zero-fills and frees ~50 MB tensors (the
    decoder output, every dense gradient), and autograd may clone a returned gradient; on a CPU
    the page faults and fills of that churn cost as much as the sparse kernels. With a workspace,
    outputs reuse named buffers and the backward writes gradients IN PLACE into the parameters'
    persistent .grad tensors ("sinks"): the first write of a step overwrites (zeroing each member's
    block while it is in cache), later writes accumulate, and autograd gets None for them.
    """

    def __init__(self, sink_params: list[Tensor] | tuple[Tensor, ...] = ()):
        self._buffers: dict[str, Tensor] = {}
        self._sinks = {id(p): p for p in sink_params}
        self._fresh: set[int] = set()

    def begin_step(self) -> None:
        """Mark every sink as not yet written in this step (call before backward)."""
        for p in self._sinks.values():
            if p.grad is None:
                p.grad = torch.empty_like(p)
        self._fresh = set(self._sinks)

    def sink(self, p: Tensor | None) -> tuple[Tensor | None, bool]:
        """(grad buffer, overwrite?) for a sink parameter, else (None, False)."""
        if p is None or id(p) not in self._sinks:
            return None, False
        fresh = id(p) in self._fresh
        self._fresh.discard(id(p))
        return p.grad, fresh

    def finish_step(self) -> None:
        """Sinks never written this step (no slot reached them) must read as zero gradient."""
        for i in self._fresh:
            self._sinks[i].grad.zero_()
        self._fresh = set()

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        t = self._buffers.get(name)
        if t is None or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            t = torch.empty(shape, dtype=dtype)
            self._buffers[name] = t
        return t


# ----------------------------------------------------------------------------------- helpers

def _chunk_members(B: int, m: int, E: int) -> int:
    return max(1, min(E, CHUNK_BYTES // max(1, B * m * 4)))


def _kmax(sel: Selection) -> int:
    return int(sel.k.max()) if sel.k is not None and sel.k.numel() else 0


def _pad_assemble(chunks: list[tuple[int, Tensor, Tensor, Tensor | None]], B: int, E: int,
                  device: torch.device, want_pre: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Chunk-local padded slot lists -> one [B, E, S] list (S = the widest chunk)."""
    S = max([c[1].shape[-1] for c in chunks] + [0])
    values = torch.zeros(B, E, S, device=device)
    indices = torch.full((B, E, S), -1, dtype=torch.long, device=device)
    pre = torch.zeros(B, E, S, device=device) if want_pre else None
    for e0, v, i, p in chunks:
        n, s = v.shape[1], v.shape[2]
        values[:, e0:e0 + n, :s] = v
        indices[:, e0:e0 + n, :s] = i
        if pre is not None and p is not None:
            pre[:, e0:e0 + n, :s] = p
    return values, indices, pre


def active_l0(values: Tensor) -> Tensor:
    """[B, E, S] -> [E]: mean number of active (value > 0) slots per sample."""
    return (values > 0).sum(-1).float().mean(0)


# ----------------------------------------------------------------------------------- native encode

def _native_select_chunk(pre: Tensor, B: int, n: int, m: int, e0: int, sel: Selection,
                         out_v: Tensor | None, out_i: Tensor | None, S: int, E: int,
                         chunks: list, bthr: Tensor | None, bias: Tensor) -> None:
    """Select from a chunk of pre-activations WITHOUT the bias; adds it (in place) first."""
    lib, nt = _native.lib(), _native.nthreads(B * n * m)
    if sel.kind == "topk":
        k = sel.k[e0:e0 + n].contiguous()
        lib.sel_topk(pre.data_ptr(), B, n, m, k.data_ptr(), None, bias.data_ptr(), out_v.data_ptr(),
                     out_i.data_ptr(), E, S, e0, nt)
        return
    lib.add_bias(pre.data_ptr(), B, n * m, bias.data_ptr(), nt)
    thr_lat = thr_mem = None
    if sel.kind == "batchtopk":
        keep = (sel.k[e0:e0 + n] * B).contiguous()
        t = torch.empty(n)
        lib.batch_kth(pre.data_ptr(), B, n, m, keep.data_ptr(), t.data_ptr(), nt)
        bthr[e0:e0 + n] = t
        # strict '>' below: step just under the k*B-th value so that it is kept
        thr_mem = torch.where(t > 0, torch.nextafter(t, torch.tensor(-math.inf)), t).contiguous()
    elif sel.thr_lat is not None:
        thr_lat = sel.thr_lat[e0:e0 + n].contiguous()
    else:
        thr_mem = sel.thr_mem[e0:e0 + n].contiguous()
    counts = torch.empty(B * n, dtype=torch.long)
    args_thr = (_native.ptr(thr_lat), _native.ptr(thr_mem))
    lib.sel_threshold(pre.data_ptr(), B, n, m, *args_thr, float(sel.window), 0, counts.data_ptr(),
                      None, None, None, n, 0, 0, nt)
    Sc = int(counts.max()) if counts.numel() else 0
    v = torch.empty(B, n, Sc)
    i = torch.empty(B, n, Sc, dtype=torch.long)
    p = torch.empty(B, n, Sc) if sel.window > 0 else None
    if Sc:
        lib.sel_threshold(pre.data_ptr(), B, n, m, *args_thr, float(sel.window), 1, None,
                          v.data_ptr(), i.data_ptr(), _native.ptr(p), n, Sc, 0, nt)
    chunks.append((e0, v, i, p))


def native_encode_forward(x: Tensor, W_enc: Tensor, b_enc: Tensor, sel: Selection):
    """Chunked GEMM + selection without autograd. Returns the tensors of an `Encoded`."""
    B, d_in = x.shape
    E, m, _ = W_enc.shape
    x = x.contiguous()
    eb = _chunk_members(B, m, E)
    buf = torch.empty(B * eb * m)
    S = _kmax(sel) if sel.kind == "topk" else 0
    out_v = torch.empty(B, E, S) if sel.kind == "topk" else None
    out_i = torch.empty(B, E, S, dtype=torch.long) if sel.kind == "topk" else None
    Sa = int(sel.aux_k) if sel.aux_mask is not None else 0
    aux_v = torch.empty(B, E, Sa) if Sa else None
    aux_i = torch.empty(B, E, Sa, dtype=torch.long) if Sa else None
    aux_mask = sel.aux_mask.to(torch.uint8).contiguous() if Sa else None
    aux_k = torch.full((E,), Sa, dtype=torch.long) if Sa else None
    bthr = torch.zeros(E) if sel.kind == "batchtopk" else None
    chunks: list = []
    Wf = W_enc.detach()
    bf = b_enc.detach()
    lib = _native.lib()
    for e0 in range(0, E, eb):
        n = min(eb, E - e0)
        nt = _native.nthreads(B * n * m)
        pre = buf[: B * n * m].view(B, n * m)
        torch.mm(x, Wf[e0:e0 + n].reshape(n * m, d_in).t(), out=pre)
        _native_select_chunk(pre, B, n, m, e0, sel, out_v, out_i, S, E, chunks, bthr, bf[e0:e0 + n])
        if Sa:  # the bias is in `pre` by now
            lib.sel_topk(pre.data_ptr(), B, n, m, aux_k[e0:e0 + n].data_ptr(), aux_mask[e0:e0 + n].data_ptr(),
                         None, aux_v.data_ptr(), aux_i.data_ptr(), E, Sa, e0, nt)
    pre_slots = None
    if sel.kind != "topk":
        out_v, out_i, pre_slots = _pad_assemble(chunks, B, E, x.device, sel.window > 0)
    return out_v, out_i, aux_v, aux_i, pre_slots, bthr


class NativeEncode(torch.autograd.Function):
    """Encoder + selection with a sparse backward: only the selected latents get gradient.

    Inputs: x [B, d_in], W_enc [E, m, d_in], b_enc [E, m], log_threshold [E, m] or None
    (JumpReLU), selection, bandwidth. Outputs: values, indices, aux values, aux indices,
    slot pre-activations, batch threshold, l0 [E].
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, log_threshold, sel: Selection, bandwidth: float, ws: Workspace | None):
        v, i, av, ai, p, bthr = native_encode_forward(x, W_enc, b_enc, sel)
        l0 = active_l0(v)
        ctx.save_for_backward(x, W_enc, v, i, av, ai, p, log_threshold)
        ctx.bandwidth = bandwidth
        ctx.ws = ws
        ctx.params = (W_enc, b_enc)
        ctx.mark_non_differentiable(i, *(t for t in (ai, p, bthr) if t is not None))
        ctx.set_materialize_grads(False)
        return v, i, av, ai, p, bthr, l0

    @staticmethod
    def backward(ctx, g_v, _gi, g_av, _gai, _gp, _gb, g_l0):
        x, W_enc, v, i, av, ai, p, log_thr = ctx.saved_tensors
        B, d_in = x.shape
        E, m, _ = W_enc.shape
        lib, nt = _native.lib(), _native.nthreads(v.numel() * d_in)
        need_x, need_W, need_b, need_t = ctx.needs_input_grad[:4]
        ws = ctx.ws
        sW = ws.sink(ctx.params[0]) if (need_W and ws is not None) else (None, False)
        sb = ws.sink(ctx.params[1]) if (need_b and ws is not None) else (None, False)
        gW = sW[0] if sW[0] is not None else (torch.zeros_like(W_enc) if need_W else None)
        gb = sb[0] if sb[0] is not None else (torch.zeros(E, m) if need_b else None)
        ow_w, ow_b = sW[1], sb[1]  # overwrite (first write of the step into a sink) or accumulate
        gx = torch.zeros_like(x) if need_x else None
        for vals, idx, g in ((v, i, g_v), (av, ai, g_av)):
            if g is None or vals is None or vals.shape[-1] == 0:
                continue
            g = g.contiguous()
            S = vals.shape[-1]
            if need_W or need_b:
                lib.enc_bwd(g.data_ptr(), vals.data_ptr(), idx.data_ptr(), B, E, S, x.data_ptr(), d_in, m,
                            _native.ptr(gW), _native.ptr(gb), int(ow_w), int(ow_b), nt)
                ow_w = ow_b = False
            if need_x:
                lib.enc_bwd_x(g.data_ptr(), vals.data_ptr(), idx.data_ptr(), B, E, S,
                              W_enc.detach().contiguous().data_ptr(), d_in, m, gx.data_ptr(), nt)
        g_thr = None
        if need_t and log_thr is not None:
            g_thr = jumprelu_threshold_grad(p, i, log_thr, g_v, g_l0, ctx.bandwidth, B)
        if ow_w:  # a sink that no slot list reached: zero gradient
            gW.zero_()
        if ow_b:
            gb.zero_()
        if sW[0] is not None:
            gW = None
        if sb[0] is not None:
            gb = None
        return gx, gW, gb, g_thr, None, None, None


def jumprelu_threshold_grad(pre: Tensor, idx: Tensor, log_thr: Tensor, g_v: Tensor | None,
                            g_l0: Tensor | None, bandwidth: float, B: int) -> Tensor:
    """Pseudo-gradient of the JumpReLU thresholds (Rajamanoharan et al. 2024), rectangle kernel.

    For z = pre * H(pre - t): dz/dt ~ -(t/eps) K((pre - t)/eps); for the L0 count H(pre - t):
    -(1/eps) K(...). K is 1 on |u| < 1/2. Returned w.r.t. log t (t = exp(log t)).
    """
    E, m = log_thr.shape
    thr = log_thr.detach().exp()
    valid = idx >= 0
    j = idx.clamp(min=0)
    t_slot = thr.gather(1, j.permute(1, 0, 2).reshape(E, -1)).view(E, idx.shape[0], -1).permute(1, 0, 2)
    inwin = valid & ((pre - t_slot).abs() < bandwidth / 2)
    contrib = torch.zeros_like(pre)
    if g_v is not None:
        contrib = contrib + g_v * (-(t_slot / bandwidth))
    if g_l0 is not None:
        contrib = contrib + g_l0.view(1, E, 1) * (-(1.0 / bandwidth) / B)
    contrib = torch.where(inwin, contrib, torch.zeros_like(contrib))
    gidx = (j + torch.arange(E, device=idx.device).view(1, E, 1) * m).reshape(-1)
    g_t = torch.zeros(E * m, device=pre.device, dtype=pre.dtype).index_add_(0, gidx, contrib.reshape(-1))
    return g_t.view(E, m) * thr


# ----------------------------------------------------------------------------------- native decode

class NativeDecode(torch.autograd.Function):
    """Sparse decoder with the residual and its squared norm fused in.

    out[l, b, e] = bias[e] + base[b, e] - target[b] + sum_{slots, level <= l} v * W_dec[e, idx]
    sse[l, e] = sum_b |out[l, b, e]|^2, rsum[e] = sum_b out[L-1, b, e].
    Inputs: values [B,E,S], W_dec [E,m,d], bias [E,d] | None, base [B,E,d] | None, indices,
    target [B,d] | None, level [m] int32 | None, n_levels.
    """

    @staticmethod
    def forward(ctx, values, W_dec, bias, base, indices, target, level, n_levels: int,
                ws: Workspace | None, key: str):
        B, E, S = values.shape
        _, m, d = W_dec.shape
        L = n_levels
        out = ws.buffer(f"dec_out_{key}", (L, B, E, d)) if ws is not None else torch.empty(L, B, E, d)
        sse = torch.zeros(L, E, dtype=torch.float64)
        rsum = torch.zeros(E, d, dtype=torch.float64)
        values = values.contiguous()
        Wd = W_dec.detach().contiguous()
        _native.lib().dec_fwd(values.data_ptr(), indices.data_ptr(), B, E, S, Wd.data_ptr(), m, d,
                              _native.ptr(level), L, _native.ptr(None if bias is None else bias.detach().contiguous()),
                              _native.ptr(None if base is None else base.detach().contiguous()),
                              _native.ptr(None if target is None else target.contiguous()),
                              out.data_ptr(), sse.data_ptr(), rsum.data_ptr(), _native.nthreads(B * E * max(S, 1) * d))
        ctx.save_for_backward(values, Wd, indices, level, out)
        ctx.has = (bias is not None, base is not None)
        ctx.ws = ws
        ctx.params = (W_dec, bias)
        ctx.mark_non_differentiable(rsum)
        ctx.set_materialize_grads(False)
        return out, sse.float(), rsum.float()

    @staticmethod
    def backward(ctx, g_out, g_sse, _g_rsum):
        values, Wd, indices, level, out = ctx.saved_tensors
        L, B, E, d = out.shape
        S = values.shape[-1]
        m = Wd.shape[1]
        if g_out is None and g_sse is None:
            return (None,) * 10
        if g_out is None:
            src, coef = out, (2.0 * g_sse).float().contiguous()
        elif g_sse is None:
            src, coef = g_out.contiguous(), None
        else:
            src, coef = (g_out + 2.0 * g_sse.view(L, 1, E, 1) * out).contiguous(), None
        need_v, need_W, need_bias, need_base = ctx.needs_input_grad[:4]
        need_bias = need_bias and ctx.has[0]
        ws = ctx.ws
        gv = torch.empty(B, E, S)
        sW = ws.sink(ctx.params[0]) if (need_W and ws is not None) else (None, False)
        sb = ws.sink(ctx.params[1]) if (need_bias and ws is not None) else (None, False)
        gW = sW[0] if sW[0] is not None else (torch.zeros_like(Wd) if need_W else None)
        gbias = sb[0] if sb[0] is not None else (torch.zeros(E, d) if need_bias else None)
        gbase = torch.empty(B, E, d) if (need_base and ctx.has[1]) else None
        _native.lib().dec_bwd(values.data_ptr(), indices.data_ptr(), B, E, S, Wd.data_ptr(), m, d,
                              _native.ptr(level), L, src.data_ptr(), _native.ptr(coef), gv.data_ptr(),
                              _native.ptr(gW), _native.ptr(gbias), _native.ptr(gbase), int(sW[1]), int(sb[1]),
                              _native.nthreads(B * E * max(S, 1) * d))
        if sW[0] is not None:
            gW = None
        if sb[0] is not None:
            gbias = None
        return (gv if need_v else None), gW, gbias, gbase, None, None, None, None, None, None


class NativeDecodeLoss(torch.autograd.Function):
    """Sparse decoder + a FIXED weighted squared-error loss, gradients computed in the forward.

    loss[e] = sum_l weights[l, e] * sse[l, e], sse as in NativeDecode. Because the loss is known,
    one pass per (member, sample) produces the reconstruction, the loss and every gradient (the
    training step's case); the backward only scales them by the incoming d total / d loss[e].
    Outputs: loss [E] (differentiable), sse [L, E], rsum [E, d], out [L, B, E, d] or an empty
    tensor (want_out=False saves writing it).
    With a workspace, decoder gradients go straight into the sinks during the forward: the
    trainer calls ws.begin_step() before it.
    """

    @staticmethod
    def forward(ctx, values, W_dec, bias, base, indices, target, level, n_levels: int, weights,
                want_out: bool, ws: Workspace | None):
        B, E, S = values.shape
        _, m, d = W_dec.shape
        L = n_levels
        need_v, need_W, need_b, need_base = ctx.needs_input_grad[:4]
        need_b = need_b and bias is not None
        need_base = need_base and base is not None
        out = None
        if want_out:
            out = ws.buffer("dec_out_main", (L, B, E, d)) if ws is not None else torch.empty(L, B, E, d)
        sse = torch.zeros(L, E, dtype=torch.float64)
        rsum = torch.zeros(E, d, dtype=torch.float64)
        gv = torch.empty(B, E, S)
        sW = ws.sink(W_dec) if (need_W and ws is not None) else (None, False)
        sb = ws.sink(bias) if (need_b and ws is not None) else (None, False)
        gW = sW[0] if sW[0] is not None else (torch.zeros_like(W_dec) if need_W else None)
        gbias = sb[0] if sb[0] is not None else (torch.zeros(E, d) if need_b else None)
        gbase = torch.empty(B, E, d) if need_base else None
        w = weights.detach().float().contiguous()
        values = values.contiguous()
        _native.lib().dec_fused(
            values.data_ptr(), indices.data_ptr(), B, E, S, W_dec.detach().contiguous().data_ptr(), m, d,
            _native.ptr(level), L, _native.ptr(None if bias is None else bias.detach().contiguous()),
            _native.ptr(None if base is None else base.detach().contiguous()),
            _native.ptr(None if target is None else target.contiguous()), w.data_ptr(), _native.ptr(out),
            sse.data_ptr(), rsum.data_ptr(), gv.data_ptr(), _native.ptr(gW), _native.ptr(gbias), _native.ptr(gbase),
            int(sW[1]), int(sb[1]), _native.nthreads(B * E * max(S, 1) * d))
        loss = (w.double() * sse).sum(0).float()
        ctx.grads = (gv if need_v else None, gW, gbias, gbase)
        ctx.sinks = (sW[0] is not None, sb[0] is not None, sW[1], sb[1])
        ctx.mark_non_differentiable(sse, rsum)
        ctx.set_materialize_grads(False)
        out_t = out if out is not None else torch.empty(0)
        ctx.mark_non_differentiable(out_t)
        return loss, sse.float(), rsum.float(), out_t

    @staticmethod
    def backward(ctx, g_loss, _g_sse, _g_rsum, _g_out):
        gv, gW, gbias, gbase = ctx.grads
        ctx.grads = None
        sinkW, sinkb, freshW, freshb = ctx.sinks
        if g_loss is None:
            return (None,) * 11
        if not bool((g_loss == 1).all()):
            E = g_loss.shape[0]
            sc = g_loss.float()
            if (sinkW and not freshW) or (sinkb and not freshb):
                raise RuntimeError("NativeDecodeLoss: a loss weight != 1 on a shared gradient sink is not supported")
            gv = gv * sc.view(1, E, 1) if gv is not None else None
            gbase = gbase * sc.view(1, E, 1) if gbase is not None else None
            if gW is not None:
                gW.mul_(sc.view(E, 1, 1))
            if gbias is not None:
                gbias.mul_(sc.view(E, 1))
        return (gv, None if sinkW else gW, None if sinkb else gbias, gbase, None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------------- torch path

def torch_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, log_threshold: Tensor | None, sel: Selection,
                 bandwidth: float) -> Encoded:
    """Dense pre-activations + torch selection; autograd does the backward (any device)."""
    B = x.shape[0]
    E, m, d_in = W_enc.shape
    pre = torch.addmm(b_enc.reshape(-1), x, W_enc.reshape(E * m, d_in).t()).view(B, E, m)
    bthr = None
    p_slots = None
    if sel.kind == "topk":
        S = _kmax(sel)
        uniform = bool((sel.k == S).all())
        v, i = pre.relu().topk(S, dim=-1, sorted=not uniform)
        keep = v > 0
        if not uniform:
            keep = keep & (torch.arange(S, device=x.device).view(1, 1, S) < sel.k.view(1, E, 1))
        values = torch.where(keep, v, torch.zeros_like(v))
        indices = torch.where(keep, i, torch.full_like(i, -1))
    else:
        if sel.kind == "batchtopk":
            flat = pre.detach().relu().permute(1, 0, 2).reshape(E, B * m)
            kmax = int(min(B * m, int(sel.k.max()) * B))
            top = flat.topk(kmax, dim=-1).values  # [E, kmax] descending
            pos = (sel.k * B).clamp(max=B * m) - 1
            bthr = top.gather(1, pos.view(E, 1)).view(E)
            thr = torch.where(bthr > 0, torch.nextafter(bthr, torch.tensor(-math.inf, device=x.device)), bthr)
            thr = thr.view(1, E, 1)
            active = (pre > thr) & (pre > 0)
            near = torch.zeros_like(active)
        else:
            thr_t = (log_threshold.exp() if (log_threshold is not None and sel.thr_lat is None) else sel.thr_lat)
            thr = thr_t.view(1, E, m) if thr_t is not None else sel.thr_mem.view(1, E, 1)
            active = (pre > thr.detach()) & (pre > 0)
            near = (pre > thr.detach() - sel.window) if sel.window > 0 else torch.zeros_like(active)
        keep = active | near
        S = int(keep.sum(-1).max()) if keep.numel() else 0
        key, i = keep.float().topk(S, dim=-1) if S else (keep.float()[..., :0], keep.long()[..., :0])
        kept = key > 0
        indices = torch.where(kept, i, torch.full_like(i, -1))
        if log_threshold is not None and sel.thr_lat is None:
            z = JumpReLUFn.apply(pre, log_threshold, bandwidth)
        else:
            z = torch.where(active, pre, torch.zeros_like(pre))
        values = torch.where(kept, z.gather(-1, i), torch.zeros_like(z.gather(-1, i)))
        if sel.window > 0:
            p_slots = pre.detach().gather(-1, i)
    if log_threshold is not None and sel.kind == "threshold" and sel.thr_lat is None:
        l0 = StepFn.apply(pre, log_threshold, bandwidth).sum(-1).mean(0)
    else:
        l0 = active_l0(values)
    av = ai = None
    if sel.aux_mask is not None and sel.aux_k > 0:
        masked = torch.where(sel.aux_mask.view(1, E, m), pre.relu(), torch.zeros_like(pre))
        a, ai = masked.topk(int(sel.aux_k), dim=-1, sorted=False)
        av = a
        ai = torch.where(a > 0, ai, torch.full_like(ai, -1))
    return Encoded(values, indices, av, ai, p_slots, bthr, l0)


class JumpReLUFn(torch.autograd.Function):
    """z = pre * H(pre - t), t = exp(log t); straight-through pseudo-gradient for t (rectangle kernel)."""

    @staticmethod
    def forward(ctx, pre, log_thr, bandwidth: float):
        t = log_thr.exp()
        ctx.save_for_backward(pre, t)
        ctx.bandwidth = bandwidth
        return pre * (pre > t).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, t = ctx.saved_tensors
        eps = ctx.bandwidth
        gate = (pre > t).to(pre.dtype)
        win = ((pre - t).abs() < eps / 2).to(pre.dtype)
        g_t = (g * win * (-(t / eps))).sum(0)
        return g * gate, g_t * t, None


class StepFn(torch.autograd.Function):
    """H(pre - t) with the same pseudo-gradient for t: the JumpReLU L0 penalty."""

    @staticmethod
    def forward(ctx, pre, log_thr, bandwidth: float):
        t = log_thr.exp()
        ctx.save_for_backward(pre, t)
        ctx.bandwidth = bandwidth
        return (pre > t).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, t = ctx.saved_tensors
        eps = ctx.bandwidth
        win = ((pre - t).abs() < eps / 2).to(pre.dtype)
        g_t = (g * win * (-(1.0 / eps))).sum(0)
        return None, g_t * t, None


def torch_decode(values: Tensor, W_dec: Tensor, bias: Tensor | None, base: Tensor | None, indices: Tensor,
                 target: Tensor | None, level: Tensor | None, n_levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Same outputs as NativeDecode with embedding_bag over the flattened decoder; autograd backward."""
    B, E, S = values.shape
    _, m, d = W_dec.shape
    valid = indices >= 0
    gidx = (indices.clamp(min=0) + torch.arange(E, device=values.device).view(1, E, 1) * m).reshape(B * E, S)
    Wf = W_dec.reshape(E * m, d)
    lv = level[indices.clamp(min=0)].long() if level is not None else torch.zeros_like(indices)
    acc = torch.zeros(B, E, d, device=values.device, dtype=values.dtype)
    if bias is not None:
        acc = acc + bias.view(1, E, d)
    if base is not None:
        acc = acc + base
    if target is not None:
        acc = acc - target.view(B, 1, d)
    outs = []
    for l in range(n_levels):
        w = torch.where(valid & (lv == l), values, torch.zeros_like(values)).reshape(B * E, S)
        acc = acc + F.embedding_bag(gidx, Wf, per_sample_weights=w, mode="sum").view(B, E, d)
        outs.append(acc)
    out = torch.stack(outs)
    sse = out.pow(2).sum((1, 3))
    rsum = out[-1].detach().sum(0)
    return out, sse, rsum


# ----------------------------------------------------------------------------------- dispatch

def decode_loss(values: Tensor, indices: Tensor, W_dec: Tensor, bias: Tensor | None, base: Tensor | None,
                target: Tensor, weights: Tensor, level: Tensor | None = None, n_levels: int = 1,
                want_out: bool = False, native: bool | None = None,
                workspace: Workspace | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Decode and score: (loss [E] = sum_l weights[l, e] sse[l, e], sse [L, E], rsum [E, d],
    out [L, B, E, d] or None). On the native path the gradients come out of the same pass."""
    if native is None:
        native = use_native(values, W_dec, bias, base, target)
    if level is not None:
        level = level.to(device=values.device, dtype=torch.int32).contiguous()
    if native:
        loss, sse, rsum, out = NativeDecodeLoss.apply(values, W_dec, bias, base, indices.contiguous(), target, level,
                                                      n_levels, weights, want_out, workspace)
        return loss, sse, rsum, (out if want_out else None)
    out, sse, rsum = torch_decode(values, W_dec, bias, base, indices, target, level, n_levels)
    return (weights * sse).sum(0), sse.detach(), rsum, (out.detach() if want_out else None)


def use_native(x: Tensor, *params: Tensor | None) -> bool:
    return _native.usable(x, *params)


def encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, log_threshold: Tensor | None, sel: Selection,
           bandwidth: float = 1e-3, native: bool | None = None, workspace: Workspace | None = None) -> Encoded:
    """Select active latents for every member; differentiable w.r.t. W_enc, b_enc (and thresholds)."""
    if native is None:
        native = use_native(x, W_enc, b_enc)
    if native and sel.kind == "batchtopk" and x.shape[0] * W_enc.shape[1] >= 2 ** 31:
        native = False  # the kernel's candidate indices are int32
    if not native:
        return torch_encode(x, W_enc, b_enc, log_threshold, sel, bandwidth)
    lt = log_threshold if (sel.kind == "threshold" and sel.thr_lat is None and log_threshold is not None) else None
    if lt is not None:
        sel = Selection(sel.kind, sel.k, lt.detach().exp().contiguous(), None, sel.window, sel.aux_k, sel.aux_mask)
    v, i, av, ai, p, bthr, l0 = NativeEncode.apply(x, W_enc, b_enc, lt, sel, bandwidth, workspace)
    return Encoded(v, i, av, ai, p, bthr, l0)


def decode(values: Tensor, indices: Tensor, W_dec: Tensor, bias: Tensor | None = None, base: Tensor | None = None,
           target: Tensor | None = None, level: Tensor | None = None, n_levels: int = 1,
           native: bool | None = None, workspace: Workspace | None = None,
           key: str = "main") -> tuple[Tensor, Tensor, Tensor]:
    """Decode slot lists: (out [L,B,E,d], sse [L,E], rsum [E,d]); see NativeDecode."""
    if native is None:
        native = use_native(values, W_dec, bias, base, target)
    if level is not None:
        level = level.to(device=values.device, dtype=torch.int32).contiguous()
    if native:
        return NativeDecode.apply(values, W_dec, bias, base, indices.contiguous(), target, level, n_levels,
                                  workspace, key)
    return torch_decode(values, W_dec, bias, base, indices, target, level, n_levels)
