"""A tiny open_clip model of BiomedCLIP's architecture, written to disk offline.

No model hub is reachable on the machines this project is built on, so the open_clip code path
(`local-dir:` / `hf-hub:` loading, the timm vision tower, the Hugging Face BERT text tower and its
WordPiece tokenizer) is exercised with a model that has the SAME structure as BiomedCLIP and tiny
sizes:

- vision: a timm `VisionTransformer` with 16-px patches (registered below as `sae_cxr_tiny_vit_patch16`,
  64 px -> a 4x4 grid, width 32, depth 2), `timm_pool=""` (timm's default CLS-token pooling) and a
  linear projection, exactly as BiomedCLIP's `vit_base_patch16_224`;
- text: a `BertModel` (width 32, 2 layers) behind open_clip's `HFTextEncoder` with BiomedCLIP's
  `cls_last_hidden_state_pooler` and `mlp` projection, and its own WordPiece vocabulary;
- files: open_clip's local-dir layout (`open_clip_config.json`, `open_clip_model.safetensors`), the
  BERT `config.json` and the tokenizer files (`vocab.txt`, `tokenizer_config.json`,
  `special_tokens_map.json`), i.e. what the BiomedCLIP and BiomedBERT hub repositories hold.

Importing this module registers the tiny timm architecture, so any process that loads a directory
written here (the backbone loader imports this module) can build it.
"""

from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from timm.models import register_model
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import _create_vision_transformer

TINY_VIT = "sae_cxr_tiny_vit_patch16"
TINY_IMAGE_SIZE = 64
TINY_TEXT_HUB_ID = "sae-cxr-test/tiny-pubmedbert"
"""The text tower's name in the tiny config: a hub id that exists nowhere, as BiomedCLIP's config names
microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract; the loader must find the config locally."""

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# timm's register_model picks up this module's default_cfgs, which keeps timm from warning about a
# model without a pretrained config.
default_cfgs = generate_default_cfgs({
    TINY_VIT: {"url": "", "num_classes": 0, "input_size": (3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE),
               "pool_size": None, "crop_pct": 1.0, "interpolation": "bicubic", "fixed_input_size": True,
               "mean": _OPENAI_MEAN, "std": _OPENAI_STD, "first_conv": "patch_embed.proj",
               "classifier": "head", "license": "apache-2.0"},
})


@register_model
def sae_cxr_tiny_vit_patch16(pretrained: bool = False, **kwargs: Any):
    """ViT with 16-px patches at 64 px: the shape of vit_base_patch16_224 at a test-sized scale."""
    args = dict(img_size=TINY_IMAGE_SIZE, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
    return _create_vision_transformer(TINY_VIT, pretrained=pretrained, **dict(args, **kwargs))


TINY_VOCAB: tuple[str, ...] = (
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "a", "an", "the", "of", "in", "with", "and", "no", "is", "are", "there", "at", "to", "on", "or", "not",
    "left", "right", "bilateral", "small", "moderate", "large", "mild", "severe", "new", "stable",
    "heart", "cardiac", "silhouette", "enlarged", "cardiomegaly", "lung", "lungs", "pleural", "effusion",
    "effusions", "consolidation", "edema", "atelectasis", "nodule", "pneumothorax", "opacity", "lobe",
    "upper", "lower", "base", "apex", "angle", "costophrenic", "blunting", "spine", "scoliosis",
    "diaphragm", "hemidiaphragm", "elevated", "rotation", "pacemaker", "tube", "line", "central",
    "sternotomy", "wires", "marker", "text", "exposure", "chest", "radiograph", "film", "x", "ray",
    "normal", "clear", "acute", "finding", "findings", "process", "place", "placed", "tip", "seen",
    ".", ",", "-", "(", ")", ":", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
    "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q", "r", "s", "t", "u",
    "v", "w", "y", "z", "##s", "##es", "##ed", "##ing", "##al", "##ic", "##y", "##a", "##e", "##i", "##o",
)


def tiny_open_clip_config(*, embed_dim: int = 16, context_length: int = 24, timm_pool: str = "",
                          text_hub_id: str = TINY_TEXT_HUB_ID) -> dict[str, Any]:
    """BiomedCLIP's open_clip_config.json with tiny towers (same keys, same pooling and projections)."""
    return {
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": {"timm_model_name": TINY_VIT, "timm_model_pretrained": False, "timm_pool": timm_pool,
                           "timm_proj": "linear", "image_size": TINY_IMAGE_SIZE},
            "text_cfg": {"hf_model_name": text_hub_id, "hf_tokenizer_name": text_hub_id, "hf_proj_type": "mlp",
                         "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": context_length},
        },
        "preprocess_cfg": {"mean": list(_OPENAI_MEAN), "std": list(_OPENAI_STD)},
    }


def tiny_bert_config(vocab_size: int) -> dict[str, Any]:
    """A BERT config.json (what AutoConfig reads for the text tower)."""
    return {"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": vocab_size,
            "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": 64, "type_vocab_size": 2, "initializer_range": 0.3,
            "layer_norm_eps": 1e-12, "pad_token_id": 0}


def write_tokenizer_files(out: Path, vocab: tuple[str, ...] | list[str], model_max_length: int) -> None:
    """The classic BERT tokenizer layout (vocab.txt + configs), as the BiomedBERT hub repo ships it."""
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": model_max_length,
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]"}, indent=1), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps({
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]"}, indent=1), encoding="utf-8")


def write_tiny_open_clip_dir(out: str | Path, *, seed: int = 0, embed_dim: int = 16, context_length: int = 24,
                             timm_pool: str = "", weights_name: str = "open_clip_model.safetensors") -> Path:
    """Write a loadable tiny BiomedCLIP-architecture model in open_clip's local-dir layout; returns the dir.

    The weights are a seeded random initialisation (deterministic for a given seed), built by
    open_clip's own model class from the same config the loader will read.
    """
    from open_clip import CustomTextCLIP
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_open_clip_config(embed_dim=embed_dim, context_length=context_length, timm_pool=timm_pool)
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    (out / "config.json").write_text(json.dumps(tiny_bert_config(len(TINY_VOCAB)), indent=1), encoding="utf-8")
    write_tokenizer_files(out, TINY_VOCAB, context_length)

    model_cfg = deepcopy(cfg["model_cfg"])
    model_cfg["text_cfg"].update(hf_model_name=str(out), hf_model_pretrained=False)
    torch.manual_seed(seed)
    model = CustomTextCLIP(**model_cfg)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if weights_name.endswith(".safetensors"):
        save_file(state, str(out / weights_name))
    else:
        torch.save(state, out / weights_name)
    return out
