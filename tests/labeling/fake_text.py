"""A stand-in Backbone whose text tower maps phrases to KNOWN vectors, and images built to match.

The geometry is planted: concept c owns the unit vector e_c; every vocabulary phrase naming c
embeds near e_c, other phrases elsewhere; an image embeds as a large shared "radiograph" component
plus the vectors of its concepts plus noise. So the right label for a pattern is known exactly,
without the phantom model's shipped weights.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from sae_cxr.backbones.base import Backbone, ImageEncoding
from sae_cxr.findings import CONCEPT_NAMES, VocabPhrase

DIM = 64


class PlantedSpace:
    """Orthonormal concept directions, a shared image component, and phrase vectors around them."""

    def __init__(self, seed: int = 0, phrase_noise: float = 0.25):
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
        self.concept = {c: q[:, i] for i, c in enumerate(CONCEPT_NAMES)}
        self.common = q[:, len(CONCEPT_NAMES)]
        self._free = q[:, len(CONCEPT_NAMES) + 1:]
        self.rng = rng
        self.phrase_noise = phrase_noise
        self.vectors: dict[str, np.ndarray] = {}

    def add_vocabulary(self, vocab: Sequence[VocabPhrase], template: str = "{}") -> None:
        for v in vocab:
            base = self.concept[v.concept] if v.concept else self._free @ self.rng.normal(size=self._free.shape[1])
            base = base / np.linalg.norm(base)
            self.set(template.format(v.phrase), base + self.phrase_noise * self._free @ self.rng.normal(
                size=self._free.shape[1]) / np.sqrt(self._free.shape[1]))

    def set(self, text: str, vector: np.ndarray) -> None:
        self.vectors[text] = vector / np.linalg.norm(vector)

    def images(self, concept_masks: dict[str, np.ndarray], n: int, common: float = 3.0, noise: float = 0.3,
               seed: int = 1) -> np.ndarray:
        """[n, DIM] unit image embeddings: common component + present concepts + isotropic noise."""
        rng = np.random.default_rng(seed)
        x = common * self.common[None, :] + noise * rng.normal(size=(n, DIM)) / np.sqrt(DIM) * 4
        for c, m in concept_masks.items():
            x += np.asarray(m, dtype=np.float64)[:, None] * self.concept[c][None, :]
        return x / np.linalg.norm(x, axis=1, keepdims=True)


class FakeTextBackbone(Backbone):
    """A Backbone with a text tower that looks phrases up in a PlantedSpace; counts its calls."""

    name = "fake-text"
    embed_dim = DIM
    image_size = 8
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    has_text = True

    def __init__(self, space: PlantedSpace):
        self.space = space
        self.text_calls = 0

    def encode_pixels(self, pixels: torch.Tensor, with_patches: bool = False) -> ImageEncoding:
        raise NotImplementedError("the fake backbone is given image embeddings directly")

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        self.text_calls += 1
        missing = [t for t in texts if t not in self.space.vectors]
        if missing:
            raise KeyError(f"fake text tower has no vector for {missing[:3]}")
        return torch.tensor(np.stack([self.space.vectors[t] for t in texts]), dtype=torch.float32)

    @property
    def weights_sha256(self) -> str:
        return "0" * 64


class NoTextBackbone(FakeTextBackbone):
    name = "image-only"
    has_text = False
