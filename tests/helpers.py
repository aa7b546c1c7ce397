"""Tiny offline fixtures shared by the tests: runs, worlds and models built in seconds."""

from __future__ import annotations

from pathlib import Path

from sae_cxr.backbones.phantom_clip import PhantomClip, PhantomClipConfig, WordTokenizer, save_phantom_clip
from sae_cxr.findings import CONCEPT_NAMES


def tiny_phantom_clip(out: Path, embed_dim: int = 32, seed: int = 0) -> Path:
    """A randomly initialised phantom backbone with the real architecture, small widths."""
    import torch

    torch.manual_seed(seed)
    vocab = WordTokenizer.build_vocab(["no pleural effusion", "pacemaker in place", "cardiomegaly", "normal"])
    cfg = PhantomClipConfig(image_size=64, channels=(8, 8, 16, 16), attn_heads=2, embed_dim=embed_dim,
                            text_width=16, text_layers=1, text_heads=2, context_length=16, vocab=vocab,
                            concepts=list(CONCEPT_NAMES))
    return save_phantom_clip(PhantomClip(cfg), out)


def tiny_config(out: Path, n: int = 400, seed: int = 0, shortcut: str | None = "pacemaker:Cardiomegaly:0.9"):
    """Every stage at toy scale on a small phantom world with the shipped backbone: a whole run in
    well under a minute on 2 cores, for end-to-end, evaluation and app tests."""
    from sae_cxr.config import RunConfig

    cfg = RunConfig(name=Path(out).name, seed=seed)
    cfg.data.phantom.n, cfg.data.phantom.seed, cfg.data.phantom.size = n, seed, 64
    cfg.data.phantom.shortcut = shortcut
    cfg.classifier.max_epochs, cfg.classifier.n_boot, cfg.classifier.hidden = 40, 50, 64
    cfg.transcoders.n_members, cfg.transcoders.n_latents, cfg.transcoders.k = 8, 32, 8
    cfg.transcoders.train.epochs, cfg.transcoders.train.batch_size = 6.0, 64
    cfg.transcoders.train.min_samples = 0  # tiny worlds: the epochs above, not the stage's sample floor
    cfg.patterns.probe_size = 300
    cfg.attribution.faithfulness_samples, cfg.attribution.localization_images = 20, 20
    cfg.explain.max_predictions = 60
    cfg.report.max_images, cfg.report.per_page = 20, 10
    return cfg


def build_tiny_run(out: Path, **kw):
    """Run every stage of `tiny_config` into `out`; returns the RunDir."""
    from sae_cxr.pipeline import run_pipeline
    from sae_cxr.run import RunDir

    run = RunDir(out, create=True)
    run_pipeline(run, tiny_config(out, **kw))
    return run
