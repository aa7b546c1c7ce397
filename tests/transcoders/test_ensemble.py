"""The stacked model: forward vs a naive per-member reference, selection rules, members, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from sae_cxr.transcoders import sparse_ops
from sae_cxr.transcoders.ensemble import (EnsembleConfig, Normalization, SparseCodes, TranscoderEnsemble,
                                          fold_normalization)
from tests.transcoders.helpers import assert_close, naive_member, small_model


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("activation,skip", [("topk", False), ("topk", True), ("jumprelu", False)])
def test_forward_equals_naive_per_member(native, activation, skip, monkeypatch):
    if not native:
        monkeypatch.setenv("SAE_CXR_NATIVE", "0")
    model = small_model(activation=activation, skip=skip, k=(3, 5, 7, 5))
    x = torch.randn(33, model.cfg.d_in)
    with torch.no_grad():
        out = model(x)
        for e in range(model.n_members):
            z_ref, h_ref = naive_member(model, e, x)
            assert_close(out.codes.to_dense()[:, e], z_ref, 1e-5, f"latents of member {e}")
            assert_close(out.h_hat[:, e], h_ref, 1e-5, f"h_hat of member {e}")


def test_topk_keeps_exactly_k_per_member():
    ks = (1, 4, 9, 16)
    model = small_model(k=ks)
    with torch.no_grad():
        model.b_enc.add_(5.0)  # every pre-activation positive: no row can fall short of k
    codes = model.encode(torch.randn(50, model.cfg.d_in))
    l0 = codes.l0()
    for e, k in enumerate(ks):
        assert bool((l0[:, e] == k).all()), f"member {e}: L0 {l0[:, e].unique().tolist()} != {k}"
    # the invariant of the padded layout: value > 0 exactly where the index is valid
    assert bool(((codes.values > 0) == (codes.indices >= 0)).all())


def test_topk_keeps_only_positive_activations():
    model = small_model(k=8)
    with torch.no_grad():
        model.b_enc.fill_(-100.0)  # nothing positive
    codes = model.encode(torch.randn(10, model.cfg.d_in))
    assert int(codes.l0().sum()) == 0 and bool((codes.indices == -1).all())


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_batchtopk_keeps_k_times_batch_per_member(native):
    ks = (2, 3, 6)
    model = small_model(E=3, k=ks, activation="batchtopk")
    with torch.no_grad():
        model.b_enc.add_(3.0)
    B = 40
    x = torch.randn(B, model.cfg.d_in)
    sel = sparse_ops.Selection("batchtopk", k=model.k_tensor)
    enc = sparse_ops.encode(x, model.W_enc, model.b_enc, None, sel, native=native)
    per_member = (enc.values > 0).sum((0, 2))
    assert per_member.tolist() == [k * B for k in ks]
    counts = (enc.values > 0).sum(-1)  # per sample it varies: that is the point of BatchTopK
    assert int(counts.max()) > int(counts.min())
    z_ref = torch.stack([naive_member(model, e, x, batch_select=True)[0] for e in range(3)], 1)
    assert_close(SparseCodes(enc.values, enc.indices, model.cfg.n_latents).to_dense(), z_ref, 1e-6, "batchtopk")
    # threshold = the k*B-th largest activation
    assert torch.allclose(enc.batch_threshold, torch.stack([z_ref[:, e][z_ref[:, e] > 0].min() for e in range(3)]))


def test_batchtopk_inference_uses_estimated_threshold():
    model = small_model(E=2, k=4, activation="batchtopk")
    x = torch.randn(16, model.cfg.d_in)
    with torch.no_grad():
        model.batch_threshold.copy_(torch.tensor([0.2, 0.5]))
        out = model(x)
        for e in range(2):
            z_ref, h_ref = naive_member(model, e, x)
            assert_close(out.codes.to_dense()[:, e], z_ref, 1e-6, "thresholded codes")
            assert_close(out.h_hat[:, e], h_ref, 1e-5, "h_hat")


def test_matryoshka_prefix_outputs_are_nested_reconstructions():
    model = small_model(E=2, m=48, k=6, matryoshka=(8, 24))
    assert model.cfg.matryoshka == (8, 24, 48)
    x = torch.randn(12, model.cfg.d_in)
    codes = model.encode(x)
    out, _, _ = sparse_ops.decode(codes.values, codes.indices, model.W_dec, model.b_dec, None,
                                  level=model.level, n_levels=3)
    dense = codes.to_dense()
    for l, end in enumerate((8, 24, 48)):
        ref = torch.einsum("bem,emd->bed", dense[..., :end], model.W_dec[:, :end]) + model.b_dec
        assert_close(out[l].detach(), ref.detach(), 1e-5, f"prefix {end}")


def test_member_equals_slice():
    model = small_model(k=(3, 4, 5, 6), skip=True)
    x = torch.randn(20, model.cfg.d_in)
    with torch.no_grad():
        full = model(x)
        for e in (0, 2, 3):
            single = model.member(e)
            out = single(x)
            assert single.cfg.k == model.cfg.k_per_member()[e]
            assert_close(out.h_hat, full.h_hat[:, e], 1e-6, f"member {e} h_hat")
            assert_close(out.codes.to_dense(), full.codes.to_dense()[:, e], 1e-6, f"member {e} codes")
            assert single.dense_latents(x).shape == (20, model.cfg.n_latents)
    with pytest.raises(IndexError):
        model.member(4)


@pytest.mark.parametrize("activation,skip", [("topk", True), ("batchtopk", False), ("jumprelu", False)])
def test_save_load_round_trip_is_exact(tmp_path, activation, skip):
    model = small_model(activation=activation, skip=skip, k=(2, 3, 4, 5), matryoshka=(16, 64))
    if activation == "batchtopk":
        with torch.no_grad():
            model.batch_threshold.copy_(torch.rand(4))
    model.save(tmp_path / "ens")
    assert (tmp_path / "ens" / "ensemble.safetensors").exists()
    meta = json.loads((tmp_path / "ens" / "config.json").read_text())
    assert meta["units"] == "raw" and meta["config"]["k"] == [2, 3, 4, 5]
    back = TranscoderEnsemble.load(tmp_path / "ens")
    assert back.cfg == model.cfg
    for name, t in model.state_tensors().items():
        assert torch.equal(back.state_tensors()[name], t), name
    x = torch.randn(9, model.cfg.d_in)
    assert torch.equal(back(x).h_hat, model(x).h_hat)


def test_load_rejects_foreign_or_mismatched_files(tmp_path):
    model = small_model()
    model.save(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "config.json").read_text())
    meta["config"]["n_latents"] = 32
    (tmp_path / "a" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="shape"):
        TranscoderEnsemble.load(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="TranscoderEnsemble.save"):
        TranscoderEnsemble.load(tmp_path / "missing")


def test_folded_normalisation_maps_raw_to_raw():
    """The saved (folded) model on raw x equals the training model on normalised x, mapped back."""
    model = small_model(skip=True, activation="jumprelu")
    x_raw = 3.0 + 2.5 * torch.randn(40, model.cfg.d_in)
    h_raw = 1.0 + 4.0 * torch.rand(40, model.cfg.d_out)
    norm = Normalization.fit(x_raw, h_raw)
    folded = fold_normalization(model, norm)
    with torch.no_grad():
        trained = model(norm.x(x_raw))
        raw = folded(x_raw)
    assert torch.equal(raw.codes.indices, trained.codes.indices)
    assert_close(raw.codes.values, trained.codes.values, 1e-5, "latent values")
    assert_close(raw.h_hat, norm.h_inverse(trained.h_hat), 1e-5, "h_hat in raw units")
    assert_close(norm.h_inverse(norm.h(h_raw)), h_raw, 1e-6, "normalisation round trip")


def test_input_errors_are_actionable():
    model = small_model()
    with pytest.raises(ValueError, match=r"shape \[B, 24\]"):
        model.encode(torch.randn(3, 7))
    x = torch.randn(30, 24)
    x[17, 2] = float("nan")
    x[21, 0] = float("inf")
    with pytest.raises(ValueError, match=r"NaN/inf in 2 rows \(first: 17\)"):
        model.encode(x)


def test_config_validation():
    with pytest.raises(ValueError, match="activation"):
        EnsembleConfig(d_in=4, d_out=4, activation="relu")
    with pytest.raises(ValueError, match="k has 2 entries"):
        EnsembleConfig(d_in=4, d_out=4, n_members=3, k=(1, 2))
    with pytest.raises(ValueError, match="matryoshka"):
        EnsembleConfig(d_in=4, d_out=4, n_latents=16, k=2, matryoshka=(8, 4))
    cfg = EnsembleConfig.from_dict({"d_in": 4, "d_out": 4, "n_members": 2, "n_latents": 16, "k": [1, 2]})
    assert cfg.k == (1, 2)
    with pytest.raises(ValueError, match="unknown"):
        EnsembleConfig.from_dict({"d_in": 4, "d_out": 4, "typo": 1})


def test_differentiable_forward_gives_input_gradients():
    """Gradient maps downstream need d h_hat / d x through the (sparse) encoder."""
    model = small_model(k=3)
    x = torch.randn(6, model.cfg.d_in, requires_grad=True)
    model(x, differentiable=True).h_hat[:, 1].sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    naive_member(model, 1, x2)[1].sum().backward()
    assert_close(x.grad, x2.grad, 1e-5, "d h_hat / d x")
    assert model(x).h_hat.grad_fn is None  # default: no graph
