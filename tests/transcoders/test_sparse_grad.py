"""The sparse autograd Functions against dense autograd references."""

from __future__ import annotations

import pytest
import torch

from sae_cxr.transcoders import _native, sparse_ops
from sae_cxr.transcoders.sparse_ops import Selection
from tests.transcoders.helpers import assert_close, naive_member, small_model

needs_native = pytest.mark.skipif(not _native.available(), reason=f"CPU kernels unavailable: {_native.error()}")


def _grads(model, extra=()):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for name, t in extra:
        out[name] = t.grad.clone()
    return out


@needs_native
@pytest.mark.parametrize("skip", [False, True])
def test_sparse_function_gradient_equals_dense_autograd(skip):
    """Custom sparse backward (only k latents per member get gradient) == dense reference."""
    torch.manual_seed(0)
    model = small_model(k=(3, 5, 7, 4), skip=skip)
    x = torch.randn(29, model.cfg.d_in, requires_grad=True)
    h = torch.randn(29, model.cfg.d_out)
    probe = torch.randn(29, model.n_members, model.cfg.d_out)  # a generic loss term on h_hat too

    enc = sparse_ops.encode(x, model.W_enc, model.b_enc, None, Selection("topk", k=model.k_tensor), native=True)
    out, sse, _ = sparse_ops.decode(enc.values, enc.indices, model.W_dec, model.b_dec, model.skip_term(x),
                                    target=h, native=True)
    loss = sse.sum() + (out[0] * probe).sum()
    loss.backward()
    got = _grads(model, [("x", x)])

    model.zero_grad()
    x.grad = None
    ref_loss = 0.0
    for e in range(model.n_members):
        _, h_hat = naive_member(model, e, x)
        ref_loss = ref_loss + (h_hat - h).pow(2).sum() + ((h_hat - h) * probe[:, e]).sum()
    ref_loss.backward()
    ref = _grads(model, [("x", x)])
    assert set(got) == set(ref)
    assert_close(loss.detach(), ref_loss.detach(), 1e-5, "loss")
    for name in ref:
        assert_close(got[name], ref[name], 1e-4, f"grad {name}")


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("matryoshka", [None, (16, 32)])
@pytest.mark.parametrize("d_in", [24, 140])
def test_native_and_torch_paths_agree(activation, matryoshka, d_in):
    """Same forward and gradients (thresholds, AuxK, Matryoshka included) on both paths; d_in = 140
    covers the encoder backward's 128-column register block and a tail."""
    if not _native.available():
        pytest.skip("CPU kernels unavailable")
    model = small_model(k=(3, 4, 5, 6), d_in=d_in, activation=activation, matryoshka=matryoshka, skip=True)
    L = model.cfg.n_levels()
    x = torch.randn(31, model.cfg.d_in)
    h = torch.randn(31, model.cfg.d_out)
    dead = torch.rand(model.n_members, model.cfg.n_latents, generator=torch.Generator().manual_seed(1)) < 0.4
    kind = {"topk": "topk", "batchtopk": "batchtopk", "jumprelu": "threshold"}[activation]
    sel = Selection(kind, k=model.k_tensor, window=0.05 if kind == "threshold" else 0.0, aux_k=6, aux_mask=dead)
    w = torch.rand(L, model.n_members)
    results = []
    for native in (True, False):
        model.zero_grad()
        enc = sparse_ops.encode(x, model.W_enc, model.b_enc, model.log_threshold, sel, bandwidth=0.1, native=native)
        out, sse, _ = sparse_ops.decode(enc.values, enc.indices, model.W_dec, model.b_dec, model.skip_term(x),
                                        target=h, level=model.level, n_levels=L, native=native)
        _, asse, _ = sparse_ops.decode(enc.aux_values, enc.aux_indices, model.W_dec, None, out[-1].detach(),
                                       native=native)
        loss = (sse * w).sum() + 0.3 * asse.sum() + 0.01 * (enc.l0 * torch.arange(4)).sum()
        loss.backward()
        results.append((out.detach(), sse.detach(), _grads(model)))
    (o1, s1, g1), (o2, s2, g2) = results
    assert_close(o1, o2, 1e-5, "outputs")
    assert_close(s1, s2, 1e-5, "sse")
    assert set(g1) == set(g2)
    for name in g1:
        assert_close(g1[name], g2[name], 1e-4, f"grad {name}")
    if activation == "jumprelu":
        assert float(g1["log_threshold"].abs().sum()) > 0, "the threshold pseudo-gradient must reach some latents"


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_auxk_gradient_reaches_only_dead_latents(native):
    if native and not _native.available():
        pytest.skip("CPU kernels unavailable")
    model = small_model(k=4)
    E, m = model.n_members, model.cfg.n_latents
    dead = torch.zeros(E, m, dtype=torch.bool)
    dead[:, ::3] = True
    x = torch.randn(40, model.cfg.d_in)
    residual = torch.randn(40, E, model.cfg.d_out)
    enc = sparse_ops.encode(x, model.W_enc, model.b_enc, None,
                            Selection("topk", k=model.k_tensor, aux_k=8, aux_mask=dead), native=native)
    assert bool(dead.view(1, E, m).expand(40, E, m).gather(-1, enc.aux_indices.clamp(min=0))[enc.aux_indices >= 0].all())
    _, asse, _ = sparse_ops.decode(enc.aux_values, enc.aux_indices, model.W_dec, None, residual, native=native)
    asse.sum().backward()
    for name in ("W_enc", "W_dec", "b_enc"):
        g = getattr(model, name).grad
        rows = g.abs().reshape(E, m, -1).sum(-1)
        assert float(rows[~dead].abs().max()) == 0.0, f"{name}: a live latent got AuxK gradient"
        assert float(rows[dead].sum()) > 0, f"{name}: no dead latent got AuxK gradient"
    assert model.b_dec.grad is None or float(model.b_dec.grad.abs().sum()) == 0.0


def test_jumprelu_threshold_pseudo_gradient_by_hand():
    """One latent, rectangle kernel of width eps: d/dt of z = pre H(pre - t) is -(t/eps) on the
    window |pre - t| < eps/2, and of the L0 count -(1/eps); w.r.t. log t both are times t."""
    eps, t = 0.2, 0.5
    pre = torch.tensor([[0.45], [0.58], [0.9], [0.2]])  # in window: rows 0 and 1
    log_t = torch.tensor([[float(torch.log(torch.tensor(t)))]], requires_grad=True)
    z = sparse_ops.JumpReLUFn.apply(pre.view(4, 1, 1), log_t, eps)
    assert z.view(-1).tolist() == pytest.approx([0.0, 0.58, 0.9, 0.0])
    z.sum().backward()
    assert float(log_t.grad) == pytest.approx(2 * (-(t / eps)) * t)
    log_t.grad = None
    sparse_ops.StepFn.apply(pre.view(4, 1, 1), log_t, eps).sum().backward()
    assert float(log_t.grad) == pytest.approx(2 * (-(1 / eps)) * t)


@needs_native
def test_workspace_sinks_give_autograd_gradients():
    """The trainer's in-place gradient buffers hold exactly the gradients autograd would return."""
    model = small_model(k=(3, 4, 5, 6))
    x, h = torch.randn(25, model.cfg.d_in), torch.randn(25, model.cfg.d_out)
    dead = torch.zeros(4, model.cfg.n_latents, dtype=torch.bool)
    dead[:, 1::2] = True
    sel = Selection("topk", k=model.k_tensor, aux_k=5, aux_mask=dead)

    def run(ws):
        for p in model.parameters():
            p.grad = torch.full_like(p, 123.0) if ws is not None else None  # stale values must be overwritten
        if ws is not None:
            ws.begin_step()
        enc = sparse_ops.encode(x, model.W_enc, model.b_enc, None, sel, native=True, workspace=ws)
        out, sse, _ = sparse_ops.decode(enc.values, enc.indices, model.W_dec, model.b_dec, None, target=h,
                                        native=True, workspace=ws)
        _, asse, _ = sparse_ops.decode(enc.aux_values, enc.aux_indices, model.W_dec, None, out[-1].detach(),
                                       native=True, workspace=ws, key="aux")
        (sse.sum() + asse.sum()).backward()
        if ws is not None:
            ws.finish_step()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = run(None)
    got = run(sparse_ops.Workspace([model.W_enc, model.b_enc, model.W_dec, model.b_dec]))
    for name in ref:
        assert torch.allclose(got[name], ref[name], atol=1e-5, rtol=1e-5), name


@needs_native
@pytest.mark.parametrize("matryoshka", [None, (16, 40)])
@pytest.mark.parametrize("d_out", [20, 276])
def test_fused_decode_loss_matches_autograd(matryoshka, d_out):
    """The fused decoder+loss (gradients computed in the forward) == autograd of the torch path,
    including per-member loss weights != 1 downstream and the skip path. d_out = 276 covers the
    kernel's 128-column register blocks and a tail."""
    model = small_model(k=(3, 4, 5, 6), d_out=d_out, skip=True, matryoshka=matryoshka)
    L = model.cfg.n_levels()
    x, h = torch.randn(27, model.cfg.d_in), torch.randn(27, model.cfg.d_out)
    weights = torch.rand(L, model.n_members) + 0.1
    downstream = torch.tensor([1.0, 0.5, 2.0, 1.0])
    res = []
    for native in (True, False):
        model.zero_grad()
        enc = sparse_ops.encode(x, model.W_enc, model.b_enc, None, Selection("topk", k=model.k_tensor), native=native)
        loss, sse, rsum, out = sparse_ops.decode_loss(enc.values, enc.indices, model.W_dec, model.b_dec,
                                                      model.skip_term(x), h, weights, level=model.level,
                                                      n_levels=L, want_out=True, native=native)
        (loss * downstream).sum().backward()
        res.append((loss.detach(), sse, rsum, out, _grads(model)))
    for a, b, what in zip(res[0][:4], res[1][:4], ("loss", "sse", "rsum", "out")):
        assert_close(a, b, 1e-5, what)
    for name in res[1][4]:
        assert_close(res[0][4][name], res[1][4][name], 1e-4, f"grad {name}")
