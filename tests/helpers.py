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
