"""The phantom backbone: a small image+text model trained on the phantom world.

It exposes the same interface as BiomedCLIP (image embedding, patch tokens, text embedding), so
the demo runs the code path a real run does. Its weights ship in `sae_cxr/assets/phantom_clip/`
and `scripts/train_phantom_backbone.py` reproduces them.

Image tower: four strided conv stages (128 px -> an 8x8 grid), a learned position embedding and
one self-attention block so each patch token sees the whole film (cardiomegaly and rotation are
global), then a linear map into the embedding space. The image embedding is exactly the MEAN of
the patch tokens before L2 normalisation, so a pattern's response to the patch tokens decomposes
its response to the image.

Text tower: a word-level tokenizer over the phantom reports and the radiology vocabulary, two
transformer layers, masked mean pooling, a linear map into the same space. Training makes the
text embedding of a concept phrase the classifier of that concept in image space.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sae_cxr.backbones.base import Backbone, ImageEncoding, gradcam_from, state_dict_sha256

ASSET_DIR = "phantom_clip"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SPECIAL = ("<pad>", "<unk>", "<cls>")
_WORD = re.compile(r"[a-z0-9]+")


@dataclass
class PhantomClipConfig:
    """Architecture of the phantom backbone (saved as config.json next to the weights)."""

    image_size: int = 128
    """Input side in pixels; images are letterboxed to it."""
    channels: tuple[int, ...] = (24, 48, 96, 160)
    """Widths of the four stride-2 conv stages (128 px -> 8x8 patch grid)."""
    attn_heads: int = 4
    """Heads of the self-attention block over the patch grid."""
    embed_dim: int = 256
    """Embedding dimension shared by images and texts (the classifier input x)."""
    text_width: int = 128
    """Width of the text transformer."""
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 48
    """Maximum tokens per text (phantom reports are short)."""
    vocab: list[str] = field(default_factory=list)
    """Word vocabulary; ids are positions, the first three are <pad>, <unk>, <cls>."""
    concepts: list[str] = field(default_factory=list)
    """Concept names in the order of `concept_bias` (set by training)."""
    mean: float = 0.5
    std: float = 0.25

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PhantomClipConfig":
        d = dict(d)
        d["channels"] = tuple(d.get("channels", cls.channels))
        return cls(**d)


class WordTokenizer:
    """Lower-case words -> ids, with <cls> first and padding to the context length."""

    def __init__(self, vocab: Sequence[str], context_length: int):
        if tuple(vocab[:3]) != SPECIAL:
            raise ValueError(f"vocabulary must start with {SPECIAL}")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = context_length

    @staticmethod
    def words(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros((len(texts), self.context_length), dtype=torch.long)
        unk = self.index["<unk>"]
        for i, t in enumerate(texts):
            ids = [self.index["<cls>"]] + [self.index.get(w, unk) for w in self.words(t)]
            ids = ids[: self.context_length]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    @classmethod
    def build_vocab(cls, texts: Sequence[str]) -> list[str]:
        words = sorted({w for t in texts for w in cls.words(t)})
        return list(SPECIAL) + words


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.GELU())


class ImageTower(nn.Module):
    def __init__(self, cfg: PhantomClipConfig):
        super().__init__()
        ch = cfg.channels
        layers: list[nn.Module] = [_conv(1, ch[0], 2)]
        for cin, cout in zip(ch[:-1], ch[1:]):
            layers += [_conv(cin, cout, 2), _conv(cout, cout, 1)]
        self.convs = nn.Sequential(*layers).to(memory_format=torch.channels_last)  # ~1.4x faster on CPU
        self.grid = cfg.image_size // 2 ** len(ch)
        width = ch[-1]
        self.pos = nn.Parameter(torch.zeros(1, self.grid * self.grid, width))
        nn.init.normal_(self.pos, std=0.02)
        self.block = nn.TransformerEncoderLayer(width, cfg.attn_heads, dim_feedforward=2 * width, dropout=0.0,
                                                activation="gelu", batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, cfg.embed_dim, bias=False)

    def forward(self, gray: torch.Tensor) -> torch.Tensor:
        """gray [B, 1, S, S] -> unnormalised patch tokens [B, P, D]."""
        f = self.convs(gray.contiguous(memory_format=torch.channels_last))
        tokens = f.flatten(2).transpose(1, 2) + self.pos
        tokens = self.block(tokens)
        return self.proj(self.norm(tokens))


class TextTower(nn.Module):
    def __init__(self, cfg: PhantomClipConfig):
        super().__init__()
        self.embed = nn.Embedding(len(cfg.vocab), cfg.text_width, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(1, cfg.context_length, cfg.text_width))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(cfg.text_width, cfg.text_heads, dim_feedforward=2 * cfg.text_width,
                                           dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.text_width)
        self.proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> unnormalised text embedding [B, D]."""
        pad = ids == 0
        h = self.layers(self.embed(ids) + self.pos[:, : ids.shape[1]], src_key_padding_mask=pad)
        h = self.norm(h)
        keep = (~pad).unsqueeze(-1).float()
        pooled = (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return self.proj(pooled)


class PhantomClip(nn.Module):
    def __init__(self, cfg: PhantomClipConfig):
        super().__init__()
        self.cfg = cfg
        self.image = ImageTower(cfg)
        self.text = TextTower(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(2.3))  # exp -> ~10
        self.concept_bias = nn.Parameter(torch.zeros(max(len(cfg.concepts), 1)))

    def encode_image(self, gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gray [B, 1, S, S] -> (normalised embedding [B, D], patch tokens on the same scale [B, P, D])."""
        tokens = self.image(gray)
        pooled = tokens.mean(1)
        norm = pooled.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return pooled / norm, tokens / norm.unsqueeze(1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(ids), dim=-1)


class PhantomClipBackbone(Backbone):
    """The phantom model behind the common Backbone interface."""

    def __init__(self, model: PhantomClip, source: str):
        self.model = model.eval()
        self.cfg = model.cfg
        self.name = "phantom-clip"
        self.source = source
        self.embed_dim = self.cfg.embed_dim
        self.image_size = self.cfg.image_size
        self.mean = (self.cfg.mean,) * 3
        self.std = (self.cfg.std,) * 3
        self.has_text = True
        self.tokenizer = WordTokenizer(self.cfg.vocab, self.cfg.context_length)
        self.device = torch.device("cpu")

    def to(self, device: str | torch.device) -> "PhantomClipBackbone":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor, with_patches: bool = False) -> ImageEncoding:
        gray = pixels[:, :1].to(self.device, torch.float32)  # the three channels are identical copies
        emb, patches = self.model.encode_image(gray)
        g = self.model.image.grid
        return ImageEncoding(embedding=emb.float(), patches=patches.float() if with_patches else None, grid=(g, g))

    def gradcam(self, pixels: torch.Tensor, target) -> torch.Tensor:
        """Grad-CAM on the last conv stage (8x8 at 128 px), before the attention block mixes positions."""
        gray = pixels[:, :1].to(self.device, torch.float32)
        tower = self.model.image
        with torch.enable_grad():
            f = tower.convs(gray.contiguous(memory_format=torch.channels_last))
            feats = f.flatten(2).transpose(1, 2)  # [B, P, C]
            tokens = tower.proj(tower.norm(tower.block(feats + tower.pos)))
            pooled = tokens.mean(1)
            emb = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            return gradcam_from(feats, target(emb), (tower.grid, tower.grid))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        if len(texts) == 0:
            return torch.zeros((0, self.embed_dim))
        return self.model.encode_text(self.tokenizer(texts).to(self.device)).float()

    @cached_property
    def weights_sha256(self) -> str:
        return state_dict_sha256(self.model.state_dict())

    def info(self) -> dict[str, Any]:
        return {**super().info(), "source": self.source}


def default_weights_dir() -> Path:
    return Path(str(resources.files("sae_cxr") / "assets" / ASSET_DIR))


def save_phantom_clip(model: PhantomClip, out: str | Path) -> Path:
    from safetensors.torch import save_file

    from sae_cxr.run import atomic_path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    with atomic_path(out / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(model.cfg.to_dict(), indent=1))
    return out


def load_phantom_clip(path: str | Path | None = None) -> PhantomClip:
    from safetensors.torch import load_file

    d = Path(path) if path else default_weights_dir()
    cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
    if not cfg_path.exists() or not w_path.exists():
        raise FileNotFoundError(f"phantom backbone weights not found in {d} (need {CONFIG_FILE} and {WEIGHTS_FILE}); "
                                "reproduce them with `python scripts/train_phantom_backbone.py --out "
                                f"{d}`")
    cfg = PhantomClipConfig.from_dict(json.loads(cfg_path.read_text()))
    model = PhantomClip(cfg)
    state = load_file(str(w_path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"phantom backbone weights in {w_path} do not match its config: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def load_phantom_backbone(path: str | Path | None = None, device: str | torch.device = "cpu") -> PhantomClipBackbone:
    d = Path(path) if path else default_weights_dir()
    return PhantomClipBackbone(load_phantom_clip(d), source=str(d)).to(device)
