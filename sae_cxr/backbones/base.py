"""The interface every backbone implements: BiomedCLIP through open_clip, and the phantom model.

Stages only see this interface, so the demo on the phantom world runs the same code as a real
run on MIMIC-CXR with BiomedCLIP.

Geometry: `preprocess` letterboxes each image into a square (padding with black, which reads as
air) and resizes it to `image_size`, so the whole image is kept and a patch maps back to source
pixels through `Letterbox`. Patch tokens are projected into the embedding space and scaled by the
same factor that L2-normalises the image embedding, so a patch token and the image embedding are
directly comparable (the phantom model's embedding is exactly the mean of its patch tokens).
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Letterbox:
    """Maps model-input pixels back to source-image pixels: src = (model - pad) / scale."""

    scale: float  # model pixels per source pixel
    pad_x: float  # model pixels of padding on the left
    pad_y: float  # model pixels of padding on the top
    src_w: int
    src_h: int

    def to_source(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple[Any, Any]:
        return (np.asarray(x) - self.pad_x) / self.scale, (np.asarray(y) - self.pad_y) / self.scale

    def to_model(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple[Any, Any]:
        return np.asarray(x) * self.scale + self.pad_x, np.asarray(y) * self.scale + self.pad_y


@dataclass
class ImageEncoding:
    """What a backbone returns for a batch of images."""

    embedding: torch.Tensor  # [B, D], L2-normalised
    patches: torch.Tensor | None  # [B, P, D] patch tokens in the embedding space (same scale), or None
    grid: tuple[int, int]  # (rows, cols) of the patch grid; P = rows * cols


@dataclass(frozen=True)
class Preprocessor:
    """Letterbox + resize + normalise one image; picklable, so DataLoader workers can run it."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, img: np.ndarray) -> tuple[torch.Tensor, Letterbox]:
        arr = np.asarray(img, dtype=np.float32)
        if arr.ndim != 2:
            raise ValueError(f"images must be 2-D grayscale, got shape {arr.shape}")
        S = self.image_size
        t, lb = letterbox(torch.from_numpy(np.ascontiguousarray(arr)), S)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (t.expand(3, S, S) - mean) / std, lb


class Backbone(abc.ABC):
    """An image (and optionally text) encoder with a shared embedding space."""

    name: str
    embed_dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    has_text: bool = False
    device: torch.device = torch.device("cpu")

    # -- images ----------------------------------------------------------------------------------
    @property
    def preprocessor(self) -> Preprocessor:
        return Preprocessor(self.image_size, tuple(self.mean), tuple(self.std))

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[Letterbox]]:
        """Grayscale float [H, W] images in [0, 1] -> normalised [B, 3, S, S] pixels and their letterboxes."""
        prep = self.preprocessor
        out = torch.empty((len(images), 3, self.image_size, self.image_size), dtype=torch.float32)
        boxes = []
        for i, img in enumerate(images):
            try:
                out[i], lb = prep(img)
            except ValueError as e:
                raise ValueError(f"backbone {self.name}: image {i}: {e}") from None
            boxes.append(lb)
        return out, boxes

    @abc.abstractmethod
    def encode_pixels(self, pixels: torch.Tensor, with_patches: bool = False) -> ImageEncoding:
        """Encode preprocessed pixels [B, 3, S, S] (on any device; moved to self.device)."""

    def encode_images(self, images: Sequence[np.ndarray], with_patches: bool = False) -> ImageEncoding:
        pixels, _ = self.preprocess(images)
        return self.encode_pixels(pixels, with_patches=with_patches)

    def gradcam(self, pixels: torch.Tensor, target: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Grad-CAM [B, rows, cols] of `target` (normalised embedding [B, D] -> scores [B]) on the
        backbone's last spatial feature map: relu(sum_c mean_grad_c * feature_c)."""
        raise NotImplementedError(f"backbone {self.name} does not implement Grad-CAM")

    # -- text ------------------------------------------------------------------------------------
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """[B, D] L2-normalised text embeddings in the image embedding space."""
        raise NotImplementedError(f"backbone {self.name} has no text tower")

    # -- identity --------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def weights_sha256(self) -> str:
        """A digest of the weights, recorded in the run manifest."""

    @property
    def version(self) -> str:
        return "1"

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "weights_sha256": self.weights_sha256,
                "embed_dim": self.embed_dim, "image_size": self.image_size, "has_text": self.has_text,
                "mean": list(self.mean), "std": list(self.std)}

    def to(self, device: str | torch.device) -> "Backbone":
        self.device = torch.device(device)
        return self


def gradcam_from(features: torch.Tensor, score: torch.Tensor, grid: tuple[int, int], prefix: int = 0
                 ) -> torch.Tensor:
    """Grad-CAM from spatial features [B, prefix + P, C] (part of the graph of `score` [B]): per image,
    channel weights are the mean gradient over positions, the map is the ReLU of the weighted channel
    sum. The first `prefix` tokens (CLS, registers) are not positions and are dropped."""
    grads = torch.autograd.grad(score.sum(), features)[0][:, prefix:]
    features = features[:, prefix:]
    alpha = grads.mean(dim=1, keepdim=True)
    cam = torch.relu((features * alpha).sum(-1))
    return cam.detach().reshape(features.shape[0], *grid)


def letterbox(img: torch.Tensor, size: int) -> tuple[torch.Tensor, Letterbox]:
    """Pad a [H, W] image to a square with zeros (centred) and resize to [1, size, size] (bilinear, antialiased)."""
    h, w = img.shape
    side = max(h, w)
    pad_top, pad_left = (side - h) // 2, (side - w) // 2
    if h != w:
        sq = torch.zeros((side, side), dtype=img.dtype)
        sq[pad_top:pad_top + h, pad_left:pad_left + w] = img
    else:
        sq = img
    if side != size:
        out = F.interpolate(sq[None, None], size=(size, size), mode="bilinear", align_corners=False,
                            antialias=side > size)[0]
    else:
        out = sq[None]
    scale = size / side
    return out.clamp_(0, 1), Letterbox(scale=scale, pad_x=pad_left * scale, pad_y=pad_top * scale, src_w=w, src_h=h)


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """A stable digest of a state dict (names, shapes, bytes)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def load_backbone(spec: str, device: str | torch.device = "cpu", **kwargs: Any) -> Backbone:
    """Open a backbone by name.

    - `phantom` (or `phantom:PATH`): the shipped phantom model (or weights at PATH);
    - `biomedclip`, `hf-hub:...`, `local-dir:PATH`, or an open_clip `MODEL/PRETRAINED` pair.
    """
    if spec == "phantom" or spec.startswith("phantom:"):
        from sae_cxr.backbones.phantom_clip import load_phantom_backbone

        return load_phantom_backbone(spec.partition(":")[2] or None, device=device)
    from sae_cxr.backbones.biomedclip import load_open_clip_backbone

    return load_open_clip_backbone(spec, device=device, **kwargs)
