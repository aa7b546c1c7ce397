"""Training: resumption, member independence, convergence, boundary errors."""

from __future__ import annotations

import os

import pytest
import torch

from sae_cxr.transcoders.ensemble import EnsembleConfig
from sae_cxr.transcoders.synthetic import synthetic_pairs
from sae_cxr.transcoders.train import Interrupted, TrainConfig, train_ensemble

os.environ.setdefault("SAE_CXR_NO_PROGRESS", "1")


def _data(n=320, d_in=24, d_out=20, seed=3):
    p = synthetic_pairs(n, d_in=d_in, d_out=d_out, n_concepts=12, active=2.0, seed=seed)
    return p.x, p.h


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_resume_after_kill_matches_uninterrupted(tmp_path, activation):
    x, h = _data()
    ecfg = EnsembleConfig(d_in=24, d_out=20, n_members=3, n_latents=32, k=(3, 4, 5), activation=activation)
    tcfg = TrainConfig(batch_size=32, epochs=2.5, checkpoint_every=5, dead_window=64, lr=3e-3)
    ref, ref_hist = train_ensemble(x, h, ecfg, tcfg, progress=False)

    def kill_at_10(step, rec):
        if step == 10:
            raise Interrupted("killed")

    with pytest.raises(Interrupted):
        train_ensemble(x, h, ecfg, tcfg, checkpoint_dir=tmp_path, progress=False, callback=kill_at_10)
    assert (tmp_path / "checkpoint.pt").exists()
    resumed, hist = train_ensemble(x, h, ecfg, tcfg, checkpoint_dir=tmp_path, progress=False)
    assert hist.steps == ref_hist.steps == 25
    for name, t in ref.state_tensors().items():
        assert torch.equal(resumed.state_tensors()[name], t), f"{name} differs after resume"
    assert [r["step"] for r in hist.records] == [r["step"] for r in ref_hist.records]
    # a checkpoint written for another config is refused, not silently reused
    with pytest.raises(ValueError, match="another config"):
        train_ensemble(x, h, ecfg, TrainConfig(batch_size=32, epochs=3), checkpoint_dir=tmp_path, progress=False)


def test_members_do_not_couple():
    """Member 1 of a 3-member ensemble trains like a 1-member ensemble with the same seed."""
    x, h = _data(seed=5)
    tcfg = TrainConfig(batch_size=32, epochs=1, dead_window=64, lr=3e-3, clip_norm=0.05)  # clipping active
    trio, _ = train_ensemble(x, h, EnsembleConfig(d_in=24, d_out=20, n_members=3, n_latents=32, k=(2, 4, 6),
                                                  seeds=(10, 11, 12)), tcfg, progress=False)
    solo, _ = train_ensemble(x, h, EnsembleConfig(d_in=24, d_out=20, n_members=1, n_latents=32, k=4, seeds=(11,)),
                             tcfg, progress=False)
    for name, t in solo.state_tensors().items():
        a, b = trio.state_tensors()[name][1], t[0]
        assert float((a - b).norm() / b.norm().clamp(min=1e-12)) < 1e-4, name


def test_training_reduces_fvu_and_reports_history():
    x, h = _data(n=640, seed=7)
    model, hist = train_ensemble(x, h, EnsembleConfig(d_in=24, d_out=20, n_members=2, n_latents=64, k=6),
                                 TrainConfig(batch_size=64, epochs=8, log_every=5), progress=False)
    first, last = hist.records[0], hist.records[-1]
    assert last["fvu"] < 0.7 * first["fvu"]
    assert last["l0"] <= 6 and hist.steps == 80 and hist.normalization is not None
    out = model(x[:10])  # the returned model works on raw x and returns raw h
    err = (out.h_hat - h[:10, None]).pow(2).sum() / (h[:10] - h.mean(0)).pow(2).sum() / 2
    assert float(err) < 1.0


@pytest.mark.parametrize("activation", ["jumprelu"])
def test_jumprelu_trains_and_moves_thresholds(activation):
    x, h = _data(n=320, seed=9)
    ecfg = EnsembleConfig(d_in=24, d_out=20, n_members=2, n_latents=32, k=4, activation=activation)
    model, hist = train_ensemble(x, h, ecfg, TrainConfig(batch_size=32, epochs=3, jumprelu_bandwidth=0.1),
                                 progress=False)
    assert hist.records[-1]["fvu"] < hist.records[0]["fvu"]
    assert 0 < hist.records[-1]["l0"] < 32


def test_boundary_errors():
    x, h = _data()
    ecfg = EnsembleConfig(d_in=24, d_out=20, n_members=2, n_latents=32, k=4)
    bad = x.clone()
    bad[[17, 40, 41]] = float("nan")
    with pytest.raises(ValueError, match=r"x has NaN/inf in 3 rows \(first: 17\)"):
        train_ensemble(bad, h, ecfg, TrainConfig(), progress=False)
    with pytest.raises(ValueError, match="rows"):
        train_ensemble(x, h[:100], ecfg, TrainConfig(), progress=False)
    with pytest.raises(ValueError, match=r"h must have shape \[B, 20\]"):
        train_ensemble(x, h[:, :5], ecfg, TrainConfig(), progress=False)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_ensemble(x[:10], h[:10], ecfg, TrainConfig(batch_size=64), progress=False)


def test_torch_path_trains_like_native(monkeypatch):
    """The device-agnostic torch path (what CUDA runs) and the CPU kernels train the same model."""
    from sae_cxr.transcoders import _native

    if not _native.available():
        pytest.skip("CPU kernels unavailable")
    x, h = _data(seed=11)
    ecfg = EnsembleConfig(d_in=24, d_out=20, n_members=2, n_latents=32, k=(3, 5), matryoshka=(8, 32))
    tcfg = TrainConfig(batch_size=32, samples=6 * 32, dead_window=32)
    native, hn = train_ensemble(x, h, ecfg, tcfg, progress=False)
    monkeypatch.setenv("SAE_CXR_NATIVE", "0")
    torch_model, ht = train_ensemble(x, h, ecfg, tcfg, progress=False)
    assert hn.backend == "native" and ht.backend == "torch"
    for name, t in torch_model.state_tensors().items():
        a = native.state_tensors()[name]
        assert float((a - t).norm() / t.norm().clamp(min=1e-12)) < 1e-3, name


def test_input_reconstruction_keeps_an_ordinary_transcoder():
    """With the auxiliary x decoder the returned model still maps x -> h (raw units), with d_out outputs,
    and reconstructs h about as well as a pure transcoder."""
    from sae_cxr.transcoders.ensemble import EnsembleConfig
    from sae_cxr.transcoders.synthetic import synthetic_pairs
    from sae_cxr.transcoders.train import TrainConfig, train_ensemble

    pairs = synthetic_pairs(n=1024, d_in=32, d_out=24, n_concepts=12, seed=0)
    x, h = pairs.x, pairs.h
    cfg = EnsembleConfig(d_in=32, d_out=24, n_members=3, n_latents=64, k=8)
    pure, _ = train_ensemble(x, h, cfg, TrainConfig(epochs=10, batch_size=128), progress=False)
    aux, _ = train_ensemble(x, h, cfg, TrainConfig(epochs=10, batch_size=128, input_reconstruction=1.0),
                            progress=False)
    assert aux.cfg.d_out == 24 and aux.W_dec.shape == (3, 64, 24)

    def fvu(model):
        hh = model(torch.as_tensor(x)).h_hat
        return float(((hh - torch.as_tensor(h)[:, None]) ** 2).sum() / (3 * ((torch.as_tensor(h) - torch.as_tensor(h).mean(0)) ** 2).sum()))

    assert fvu(aux) < 0.5 and fvu(aux) < 2.0 * fvu(pure) + 0.05


def test_sample_budget_floors_small_data_sets():
    from sae_cxr.transcoders.train import sample_budget

    # 40 epochs of 3,624 samples = 144,960, under the floor of 150,000: the floor wins (41.4 epochs)
    assert sample_budget(TrainConfig(epochs=40.0, min_samples=150_000), 3624) == 150_000
    # 20 epochs of 170,000 samples = 3.4M, far above the floor: the epochs win
    assert sample_budget(TrainConfig(epochs=20.0, min_samples=150_000), 170_000) == 3_400_000
    # an explicit budget overrides both
    assert sample_budget(TrainConfig(epochs=40.0, min_samples=150_000, samples=1000), 3624) == 1000
    assert sample_budget(TrainConfig(epochs=2.5, min_samples=0), 100) == 250


def test_the_sample_floor_sets_the_number_of_steps():
    x, h = _data(n=320)
    ecfg = EnsembleConfig(d_in=24, d_out=20, n_members=1, n_latents=16, k=4)
    _, hist = train_ensemble(x, h, ecfg, TrainConfig(epochs=1.0, min_samples=3200, batch_size=64, log_every=1),
                             progress=False)
    assert hist.steps == 3200 // 64  # 50 steps, not the 5 that one epoch of 320 samples gives
    assert hist.records[-1]["samples"] == 3200
