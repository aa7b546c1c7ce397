"""Tiny BiomedCLIP-architecture models on disk, built once per test session (no network anywhere)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from sae_cxr.backbones.tiny_open_clip import TINY_TEXT_HUB_ID, write_tiny_open_clip_dir

TINY_MODEL_HUB_ID = "sae-cxr-test/tiny-biomedclip"
MODEL_FILES = ("open_clip_config.json", "open_clip_model.safetensors")
TEXT_FILES = ("config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """open_clip local-dir: timm ViT/16 (64 px), tiny BERT text tower, WordPiece tokenizer, CLS pooling."""
    return write_tiny_open_clip_dir(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_dir: Path):
    from sae_cxr.backbones import load_backbone

    return load_backbone(f"local-dir:{tiny_dir}")


@pytest.fixture()
def images() -> list[np.ndarray]:
    """Grayscale films in [0, 1]: square, portrait and landscape, as `Backbone.preprocess` takes them."""
    rng = np.random.default_rng(0)
    return [rng.random((64, 64), dtype=np.float32), rng.random((90, 70), dtype=np.float32),
            rng.random((40, 100), dtype=np.float32)]


def fake_hub_cache(root: Path, model_dir: Path, *, text_files: tuple[str, ...] = TEXT_FILES,
                   model_files: tuple[str, ...] = MODEL_FILES, with_text_repo: bool = True) -> Path:
    """A Hugging Face hub cache holding the tiny model as two repos, laid out like a real download.

    models--ORG--NAME/refs/main holds a commit hash, snapshots/<hash>/ the files (plain files here;
    the hub's blob symlinks are an implementation detail the readers do not need).
    """
    def repo(repo_id: str, commit: str, files: tuple[str, ...]) -> Path:
        base = root / f"models--{repo_id.replace('/', '--')}"
        snap = base / "snapshots" / commit
        snap.mkdir(parents=True)
        (base / "refs").mkdir(exist_ok=True)
        (base / "refs" / "main").write_text(commit)
        for f in files:
            shutil.copy(model_dir / f, snap / f)
        return snap

    repo(TINY_MODEL_HUB_ID, "a" * 40, model_files)
    if with_text_repo:
        repo(TINY_TEXT_HUB_ID, "b" * 40, text_files)
    return root
