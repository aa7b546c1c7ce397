"""BiomedCLIP (and other open_clip models) behind the Backbone interface.

Loading uses open_clip's own factory (`create_model_from_pretrained`) on one of four spec forms:

- `biomedclip`: alias for `hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`;
- `hf-hub:ORG/REPO`: read from the LOCAL Hugging Face cache only;
- `local-dir:PATH`: open_clip's folder layout (open_clip_config.json + weights + tokenizer files);
- `MODEL/PRETRAINED`: an open_clip built-in architecture with a pretrained tag or a weights file.

sae-cxr never downloads. Every file a model needs is first looked up locally; when one is missing,
`WeightsNotFoundError` says which repository and file names to fetch and where to put them. Loading
then runs with the hub in offline mode (HF_HUB_OFFLINE), so neither open_clip nor transformers
reaches for the network. One addition to open_clip's path: BiomedCLIP's config names its text tower
by hub id (microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract) and open_clip would fetch that
config.json from the hub at build time; we resolve it to a local folder first (the local-dir itself
when it holds the BERT config.json, or the cached snapshot) and hand open_clip that folder instead.

What the encodings are, for BiomedCLIP (timm `vit_base_patch16_224`, open_clip `timm_pool=""`,
`timm_proj="linear"`):

- image embedding: exactly `model.encode_image`, L2-normalised. With `timm_pool=""` open_clip keeps
  timm's default pooling, which for this ViT is the CLS token ('token') after the trunk's final
  LayerNorm (`fc_norm` is the identity), then open_clip's bias-free linear projection 768 -> 512.
- patch tokens: the trunk's `forward_features` output (all blocks + the same final LayerNorm), minus
  the CLS/prefix tokens, each sent through the same post-pool head as the pooled token (timm's
  `fc_norm`/`head`, identities here, then open_clip's projection), and divided by the norm of the
  UNnormalised image embedding, so patches and embedding are on one scale. At 224 px that is a
  14x14 grid of 196 tokens in the 512-d space. For CLS pooling the embedding is not the mean of
  the patches (the CLS token attends to them); for `timm_pool="avg"` it is, exactly.
- text: the model's tokenizer (WordPiece, padded/truncated to the config's context length, 256 for
  BiomedCLIP) and `model.encode_text` (CLS of the last hidden state, MLP projection), normalised.

Preprocessing: our `Backbone.preprocess` (letterbox to a square with black, bilinear antialiased resize
to the model's size, the model's mean/std) REPLACES open_clip's resize-shortest-side + center-crop,
so that the whole film is seen and a patch maps back to source pixels. BiomedCLIP was trained with
bicubic resize + center crop; letterboxing non-square films is a small distribution shift we accept.

Precision: fp32 on the CPU; on CUDA the model keeps fp32 weights and runs under autocast (bf16 where
supported, else fp16); outputs are always float32.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from copy import deepcopy
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from sae_cxr.backbones.base import Backbone, ImageEncoding, state_dict_sha256

BIOMEDCLIP_HUB_ID = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BIOMEDCLIP_TEXT_HUB_ID = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
BIOMEDCLIP_SPEC = f"hf-hub:{BIOMEDCLIP_HUB_ID}"
ALIASES = {"biomedclip": BIOMEDCLIP_SPEC}

# The published open_clip_config.json of BiomedCLIP; used to build the architecture offline and to name
# the text tower's repository in error messages before the config itself is available.
BIOMEDCLIP_OPEN_CLIP_CONFIG: dict[str, Any] = {
    "model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": BIOMEDCLIP_TEXT_HUB_ID, "hf_tokenizer_name": BIOMEDCLIP_TEXT_HUB_ID,
                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                     "context_length": 256},
    },
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                       "std": [0.26862954, 0.26130258, 0.27577711]},
}
# BERT-base, the architecture of BiomedBERT (PubMedBERT); the vocabulary size is BERT's 30522.
BIOMEDBERT_BASE_CONFIG: dict[str, Any] = {
    "architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 768,
    "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512,
    "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
}

CONFIG_FILE = "open_clip_config.json"
HUB_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
"""What open_clip's hf-hub loader looks for, in order."""
LOCAL_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                      "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
"""What open_clip's local-dir loader prefers (it also takes any other *.safetensors/*.bin/*.pth)."""
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
"""The classic BERT tokenizer files; vocab.txt (or a tokenizer.json) is the one that must exist."""
TEXT_CONFIG_FILE = "config.json"
PRECISIONS = ("auto", "fp32", "amp_bf16", "amp_fp16")


class WeightsNotFoundError(FileNotFoundError):
    """Model files are not on this machine; the message says what to fetch and where to put it."""


# -- locating files -------------------------------------------------------------------------------

def hub_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face hub cache: the argument, else HF_HUB_CACHE, else HF_HOME/hub, else the default.

    Read from the environment at call time (huggingface_hub reads it once, at import).
    """
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _cached(repo_id: str, filename: str, cache_dir: Path) -> Path | None:
    """A file of a hub repo in the local cache (revision main), or None. Never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache_dir))
    except Exception:  # an id that is not a valid repo id is simply not cached
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def _is_hf_config_dir(d: Path) -> bool:
    f = d / TEXT_CONFIG_FILE
    if not f.is_file():
        return False
    try:
        return "model_type" in json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def _has_tokenizer(d: Path) -> bool:
    return (d / "vocab.txt").is_file() or (d / "tokenizer.json").is_file()


def _as_dir(name: str | None, base: Path | None = None) -> Path | None:
    """`name` as an existing local directory (absolute, or relative to `base`), else None."""
    if not name:
        return None
    for cand in ([Path(name).expanduser()] + ([base / name] if base is not None else [])):
        if cand.is_dir():
            return cand.resolve()
    return None


@dataclass
class ModelSource:
    """Where every file of a model was found; recorded in `info()` for the run manifest."""

    spec: str
    kind: str  # "hf-hub", "local-dir" or "builtin"
    open_clip_name: str  # what open_clip's factory is given
    pretrained: str | None = None  # builtin only: tag or weights file
    model_cfg: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    revision: str | None = None
    text_config_dir: str | None = None  # local folder with the HF text tower's config.json
    tokenizer_dir: str | None = None  # local folder with the HF tokenizer files
    cache_dir: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "checkpoint": self.checkpoint, "revision": self.revision,
                "text_config_dir": self.text_config_dir, "tokenizer_dir": self.tokenizer_dir,
                "cache_dir": self.cache_dir}


def _fetch_commands(needs: list[tuple[str, list[str]]], target: str) -> str:
    return "\n".join(f"    hf download {repo} {' '.join(files)} {target}" for repo, files in needs)


def _full_needs(repo_id: str, text_repo: str | None) -> list[tuple[str, list[str]]]:
    """Everything a local-dir needs: the CLIP repo's config and weights, the text tower's config and vocab."""
    needs = [(repo_id, [CONFIG_FILE, HUB_WEIGHT_FILES[1]])]
    if text_repo:
        needs.append((text_repo, [TEXT_CONFIG_FILE, TOKENIZER_FILES[0]]))
    return needs


def _local_dir_fix(repo_id: str, text_repo: str | None, d: str = "DIR") -> str:
    return (_fetch_commands(_full_needs(repo_id, text_repo), f"--local-dir {d}") + "\n"
            f"  giving {d}/{CONFIG_FILE} and {d}/{HUB_WEIGHT_FILES[1]} (or {HUB_WEIGHT_FILES[0]}: the CLIP "
            "weights, both towers)"
            + (f", {d}/{TEXT_CONFIG_FILE} (the text tower's config) and {d}/{TOKENIZER_FILES[0]} (its WordPiece "
               "vocabulary; tokenizer_config.json / tokenizer.json may sit beside it)" if text_repo else "") + ".")


def _missing_hub_error(spec: str, repo_id: str, cache: Path, missing: list[tuple[str, list[str]]],
                       text_repo: str | None) -> WeightsNotFoundError:
    what = "\n".join(f"  - {repo}: {', '.join(files)}" for repo, files in missing)
    folders = " and ".join(f"models--{repo.replace('/', '--')}" for repo in dict.fromkeys(r for r, _ in missing))
    return WeightsNotFoundError(
        f"backbone {spec!r}: model files are not in the local Hugging Face cache {cache}, and sae-cxr never "
        f"downloads at run time.\nMissing:\n{what}\n"
        f"Fix (a), the hub cache: with network access run\n{_fetch_commands(missing, f'--cache-dir {cache}')}\n"
        f"  (or run them on another machine and copy the folders {folders} into {cache}; to use a cache "
        "elsewhere, set HF_HUB_CACHE=/path/to/hub or pass cache_dir to the loader).\n"
        f"Fix (b), one folder DIR used as the backbone spec `local-dir:DIR`:\n{_local_dir_fix(repo_id, text_repo)}")


def _resolve_text(text_cfg: dict[str, Any], *, base: Path | None, snapshot: Path | None, cache: Path,
                  missing: list[tuple[str, list[str]]]) -> tuple[str | None, str | None]:
    """Local folders for the HF text tower's config.json and its tokenizer files.

    Order: the name as a local folder; the model's own folder (`base`: local-dir, or the hub snapshot);
    the hub cache under the name. Whatever cannot be found is appended to `missing`.
    """
    name = text_cfg.get("hf_model_name")
    if not name:
        return None, None
    tok_name = text_cfg.get("hf_tokenizer_name") or name

    text_dir = _as_dir(name, base)
    if text_dir is None or not _is_hf_config_dir(text_dir):
        text_dir = None
        for cand in (base, snapshot):
            if cand is not None and _is_hf_config_dir(cand):
                text_dir = cand
                break
    if text_dir is None:
        f = _cached(name, TEXT_CONFIG_FILE, cache)
        text_dir = f.parent if f is not None else None
    if text_dir is None:
        missing.append((name, [TEXT_CONFIG_FILE]))

    tok_dir = _as_dir(tok_name, base)
    if tok_dir is None or not _has_tokenizer(tok_dir):
        tok_dir = None
        for cand in (base, snapshot):
            if cand is not None and _has_tokenizer(cand):
                tok_dir = cand
                break
    if tok_dir is None:
        for fname in ("tokenizer.json", "vocab.txt"):
            f = _cached(tok_name, fname, cache)
            if f is not None:
                tok_dir = f.parent
                break
    if tok_dir is None:
        files = [TOKENIZER_FILES[0]]
        for i, (repo, fs) in enumerate(missing):
            if repo == tok_name:  # one line per repository in the message
                missing[i] = (repo, fs + files)
                break
        else:
            missing.append((tok_name, files))
    return (str(text_dir) if text_dir else None), (str(tok_dir) if tok_dir else None)


def resolve_source(spec: str, cache_dir: str | Path | None = None) -> ModelSource:
    """Find every file `spec` needs on this machine, or raise WeightsNotFoundError saying what to fetch."""
    spec = ALIASES.get(spec.strip(), spec.strip())
    cache = hub_cache_dir(cache_dir)
    if spec.startswith("hf-hub:"):
        return _resolve_hub(spec, cache)
    if spec.startswith("local-dir:"):
        return _resolve_local_dir(spec, cache)
    if "/" in spec:
        return _resolve_builtin(spec, cache)
    raise ValueError(f"backbone spec {spec!r} not understood; use 'biomedclip', 'hf-hub:ORG/REPO', "
                     "'local-dir:PATH' or an open_clip 'MODEL/PRETRAINED' pair (e.g. 'ViT-B-16/openai'), "
                     "or 'phantom'")


def _resolve_hub(spec: str, cache: Path) -> ModelSource:
    repo_id = spec[len("hf-hub:"):].strip("/")
    if repo_id.count("/") != 1:
        raise ValueError(f"backbone spec {spec!r}: expected hf-hub:ORG/REPO")
    missing: list[tuple[str, list[str]]] = []
    cfg_file = _cached(repo_id, CONFIG_FILE, cache)
    weights = next((f for f in (_cached(repo_id, w, cache) for w in HUB_WEIGHT_FILES) if f is not None), None)
    main_missing = ([CONFIG_FILE] if cfg_file is None else []) + ([HUB_WEIGHT_FILES[1]] if weights is None else [])
    if main_missing:
        missing.append((repo_id, main_missing))
    if cfg_file is not None:
        full = json.loads(cfg_file.read_text(encoding="utf-8"))
        if "model_cfg" not in full:
            raise ValueError(f"backbone {spec!r}: {cfg_file} has no 'model_cfg'; not an open_clip model config")
        model_cfg = full["model_cfg"]
    elif repo_id == BIOMEDCLIP_HUB_ID:
        model_cfg = deepcopy(BIOMEDCLIP_OPEN_CLIP_CONFIG["model_cfg"])  # to name the text repo in the message
    else:
        model_cfg = {}
    snapshot = cfg_file.parent if cfg_file is not None else None
    text_dir, tok_dir = _resolve_text(model_cfg.get("text_cfg", {}), base=None, snapshot=snapshot, cache=cache,
                                      missing=missing)
    if missing:
        raise _missing_hub_error(spec, repo_id, cache, missing, model_cfg.get("text_cfg", {}).get("hf_model_name"))
    return ModelSource(spec=spec, kind="hf-hub", open_clip_name=spec, model_cfg=model_cfg, checkpoint=str(weights),
                       revision=snapshot.name if snapshot else None, text_config_dir=text_dir, tokenizer_dir=tok_dir,
                       cache_dir=str(cache))


def _resolve_local_dir(spec: str, cache: Path) -> ModelSource:
    raw = spec[len("local-dir:"):]
    if not raw:
        raise ValueError("backbone spec 'local-dir:' needs a folder: local-dir:PATH")
    d = Path(raw).expanduser().resolve()
    example = ("To fill it for BiomedCLIP, with network access run\n"
               + _local_dir_fix(BIOMEDCLIP_HUB_ID, BIOMEDCLIP_TEXT_HUB_ID, str(d)))
    if not d.is_dir():
        raise WeightsNotFoundError(f"backbone {spec!r}: folder {d} does not exist. {example}")
    cfg_file = d / CONFIG_FILE
    if not cfg_file.is_file():
        raise WeightsNotFoundError(f"backbone {spec!r}: {cfg_file} is missing, so {d} is not a model folder in "
                                   f"open_clip's local-dir format. {example}")
    full = json.loads(cfg_file.read_text(encoding="utf-8"))
    if "model_cfg" not in full:
        raise ValueError(f"backbone {spec!r}: {cfg_file} has no 'model_cfg'; not an open_clip model config")
    model_cfg = full["model_cfg"]
    missing_here: list[str] = []
    if not any(p for ext in ("*.safetensors", "*.bin", "*.pth") for p in d.glob(ext)):
        missing_here.append(f"the CLIP weights: {HUB_WEIGHT_FILES[1]} or {HUB_WEIGHT_FILES[0]} (from the model repo)")
    missing: list[tuple[str, list[str]]] = []
    text_dir, tok_dir = _resolve_text(model_cfg.get("text_cfg", {}), base=d, snapshot=None, cache=cache,
                                      missing=missing)
    for repo, files in missing:
        missing_here.append(f"{', '.join(files)}: the text tower's config / vocabulary (from the hub repo {repo})")
    if missing_here:
        raise WeightsNotFoundError(
            f"backbone {spec!r}: files missing in {d}:\n" + "\n".join(f"  - {m}" for m in missing_here)
            + f"\nFix: {example}")
    from open_clip.factory import _find_checkpoint_in_dir

    return ModelSource(spec=f"local-dir:{d}", kind="local-dir", open_clip_name=f"local-dir:{d}",
                       model_cfg=model_cfg, checkpoint=_find_checkpoint_in_dir(d), text_config_dir=text_dir,
                       tokenizer_dir=tok_dir, cache_dir=str(cache))


def _resolve_builtin(spec: str, cache: Path) -> ModelSource:
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    model, _, pretrained = spec.partition("/")
    model_cfg = open_clip.get_model_config(model)
    if model_cfg is None:
        raise ValueError(f"backbone spec {spec!r}: {model!r} is not an open_clip architecture (known: "
                         f"{', '.join(open_clip.list_models()[:8])}, ... see open_clip.list_models()); for a "
                         f"Hugging Face repo write 'hf-hub:{spec}'")
    if not pretrained:
        raise ValueError(f"backbone spec {spec!r}: name the weights, MODEL/TAG or MODEL/PATH_TO_WEIGHTS; tags for "
                         f"{model}: {list_pretrained_tags_by_model(model)}")
    checkpoint = None
    if Path(pretrained).expanduser().is_file():
        checkpoint = str(Path(pretrained).expanduser().resolve())
        pretrained = checkpoint
    elif not get_pretrained_cfg(model, pretrained):
        if pretrained.startswith(("/", ".", "~")) or Path(pretrained).suffix in (".safetensors", ".bin", ".pt", ".pth"):
            raise WeightsNotFoundError(f"backbone {spec!r}: weights file {pretrained} does not exist")
        raise ValueError(f"backbone spec {spec!r}: {pretrained!r} is neither a weights file nor a pretrained tag "
                         f"of {model}; tags: {list_pretrained_tags_by_model(model)}")
    missing: list[tuple[str, list[str]]] = []
    text_dir, tok_dir = _resolve_text(model_cfg.get("text_cfg", {}), base=None, snapshot=None, cache=cache,
                                      missing=missing)
    if missing:
        raise WeightsNotFoundError(
            f"backbone {spec!r}: the text tower of {model} needs files that are not in the local hub cache {cache}:\n"
            + "\n".join(f"  - {repo}: {', '.join(files)}" for repo, files in missing)
            + f"\nFetch them with network access:\n{_fetch_commands(missing, f'--cache-dir {cache}')}")
    return ModelSource(spec=spec, kind="builtin", open_clip_name=model, pretrained=pretrained, model_cfg=model_cfg,
                       checkpoint=checkpoint, text_config_dir=text_dir, tokenizer_dir=tok_dir, cache_dir=str(cache))


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hub offline mode for the duration: HF_HUB_OFFLINE=1 in the environment and in huggingface_hub.

    huggingface_hub reads HF_HUB_OFFLINE once at import, so the module constant is set too; both are
    restored afterwards.
    """
    from huggingface_hub import constants

    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


# -- building -------------------------------------------------------------------------------------

def _text_override(source: ModelSource) -> dict[str, Any]:
    """open_clip model kwargs that point the HF text tower at its local config folder (random init: the
    CLIP checkpoint then overwrites every text weight)."""
    text_cfg = source.model_cfg.get("text_cfg", {})
    if not text_cfg.get("hf_model_name") or source.text_config_dir is None:
        return {}
    return {"text_cfg": {**text_cfg, "hf_model_name": source.text_config_dir, "hf_model_pretrained": False}}


def _tokenizer(source: ModelSource, cache: Path) -> Callable[..., torch.Tensor]:
    """open_clip's tokenizer for the model, built from local files (HFTokenizer for HF text towers)."""
    import open_clip
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer

    text_cfg = source.model_cfg.get("text_cfg", {})
    context_length = text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH)
    if source.tokenizer_dir is not None:  # same arguments open_clip.get_tokenizer passes
        return HFTokenizer(source.tokenizer_dir, context_length=context_length,
                           tokenizer_mode=text_cfg.get("tokenizer_mode"), **text_cfg.get("tokenizer_kwargs", {}))
    return open_clip.get_tokenizer(source.open_clip_name, context_length=context_length, cache_dir=str(cache))


def _create(source: ModelSource, require_weights: bool) -> torch.nn.Module:
    import open_clip

    kwargs: dict[str, Any] = dict(device="cpu", precision="fp32", cache_dir=source.cache_dir, **_text_override(source))
    try:
        if require_weights:
            return open_clip.create_model_from_pretrained(source.open_clip_name, pretrained=source.pretrained,
                                                          return_transform=False, **kwargs)
        # random init on purpose: no tower-default (timm/HF) weights either
        return open_clip.create_model(source.open_clip_name, pretrained=source.pretrained, pretrained_text=False,
                                      **kwargs)
    except Exception as e:  # the hub, a tag download, or a checkpoint that does not fit the config
        detail = f"{type(e).__name__}: {e}"
        if source.kind == "builtin" and source.checkpoint is None:
            from open_clip.pretrained import get_pretrained_cfg

            pc = get_pretrained_cfg(source.open_clip_name, source.pretrained or "")
            where = (f"the hub repo {pc['hf_hub'].rstrip('/')}" if pc.get("hf_hub") else pc.get("url", "?"))
            raise WeightsNotFoundError(
                f"backbone {source.spec!r}: the weights of open_clip tag {source.pretrained!r} are not available "
                f"offline (they come from {where}; hub cache {source.cache_dir}). Fetch them on a machine with "
                "network access (e.g. `python -c \"import open_clip; open_clip.create_model_from_pretrained("
                f"'{source.open_clip_name}', pretrained='{source.pretrained}')\"`), copy the cache over, or pass "
                f"'{source.open_clip_name}/PATH_TO_WEIGHTS'. ({detail})") from None
        raise RuntimeError(f"backbone {source.spec!r}: open_clip could not build the model from "
                           f"{source.checkpoint or source.open_clip_name} ({detail}). Check that the weights "
                           f"match {CONFIG_FILE}.") from None


def _resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {PRECISIONS}")
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and precision == "amp_fp16":
        raise ValueError("precision amp_fp16 needs a CUDA device; use fp32 (or amp_bf16) on the CPU")
    return torch.bfloat16 if precision == "amp_bf16" else torch.float16


def load_open_clip_backbone(spec: str, device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
                            precision: str = "auto") -> "OpenClipBackbone":
    """Open an open_clip model (BiomedCLIP by default alias) from local files only.

    spec: 'biomedclip' | 'hf-hub:ORG/REPO' | 'local-dir:PATH' | 'MODEL/PRETRAINED'; cache_dir: the hub
    cache (default HF_HUB_CACHE / HF_HOME/hub / ~/.cache/huggingface/hub); precision: 'auto' (fp32 on
    CPU, autocast bf16/fp16 on CUDA), 'fp32', 'amp_bf16', 'amp_fp16'.
    """
    from sae_cxr.backbones import tiny_open_clip  # noqa: F401  (registers the tiny timm test architecture)

    source = resolve_source(spec, cache_dir)
    with hub_offline():
        model = _create(source, require_weights=True)
        tokenizer = _tokenizer(source, Path(source.cache_dir or hub_cache_dir()))
    name = next((alias for alias, target in ALIASES.items() if target == source.spec), source.spec)
    return OpenClipBackbone(model, tokenizer, name=name, source=source, device=device, precision=precision)


def build_biomedclip_architecture(device: str | torch.device = "cpu", precision: str = "auto",
                                  seed: int = 0) -> "OpenClipBackbone":
    """The FULL-SIZE BiomedCLIP architecture with random weights, built offline (for timing, not results).

    Everything goes through open_clip's local-dir factory like the real model: BiomedCLIP's published
    open_clip_config.json, a BERT-base config.json written locally for the PubMedBERT text tower
    (12 layers, 768 wide, 512 positions, vocab 30522), and a placeholder WordPiece vocabulary of that
    size (real radiology words tokenize to [UNK]: text timings are right, text outputs are meaningless).
    The image side (timm vit_base_patch16_224, 224 px, 14x14 patches, 512-d) is exactly BiomedCLIP's.
    """
    from sae_cxr.backbones.tiny_open_clip import TINY_VOCAB, write_tokenizer_files

    with tempfile.TemporaryDirectory(prefix="sae-cxr-biomedclip-arch-") as tmp:
        d = Path(tmp)
        (d / CONFIG_FILE).write_text(json.dumps(BIOMEDCLIP_OPEN_CLIP_CONFIG, indent=1), encoding="utf-8")
        (d / TEXT_CONFIG_FILE).write_text(json.dumps(BIOMEDBERT_BASE_CONFIG, indent=1), encoding="utf-8")
        size = BIOMEDBERT_BASE_CONFIG["vocab_size"]
        vocab = list(TINY_VOCAB) + [f"[unused{i}]" for i in range(size - len(TINY_VOCAB))]
        write_tokenizer_files(d, vocab, BIOMEDCLIP_OPEN_CLIP_CONFIG["model_cfg"]["text_cfg"]["context_length"])
        source = ModelSource(spec=f"local-dir:{d}", kind="local-dir", open_clip_name=f"local-dir:{d}",
                             model_cfg=deepcopy(BIOMEDCLIP_OPEN_CLIP_CONFIG["model_cfg"]), text_config_dir=str(d),
                             tokenizer_dir=str(d))
        torch.manual_seed(seed)
        with hub_offline():
            model = _create(source, require_weights=False)
            tokenizer = _tokenizer(source, hub_cache_dir())
    source = ModelSource(spec="biomedclip-architecture", kind="random-init", open_clip_name="",
                         model_cfg=source.model_cfg)
    return OpenClipBackbone(model, tokenizer, name="biomedclip-architecture-random", source=source, device=device,
                            precision=precision, random_init=True)


# -- the backbone ---------------------------------------------------------------------------------

class OpenClipBackbone(Backbone):
    """An open_clip CLIP model (BiomedCLIP) behind the Backbone interface; see the module docstring."""

    def __init__(self, model: torch.nn.Module, tokenizer: Callable[..., torch.Tensor], *, name: str,
                 source: ModelSource, device: str | torch.device = "cpu", precision: str = "auto",
                 random_init: bool = False):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.source = source
        self.random_init = random_init
        self.precision = precision
        self.embed_dim = int(source.model_cfg.get("embed_dim") or self._probe_embed_dim())
        pp = getattr(model.visual, "preprocess_cfg", {})
        size = pp.get("size", getattr(model.visual, "image_size", None))
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if size[0] != size[1]:
            raise ValueError(f"backbone {name}: non-square input {size} is not supported (letterboxing is square)")
        self.image_size = int(size[0])
        self.mean = tuple(float(v) for v in pp.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(float(v) for v in pp.get("std", (0.26862954, 0.26130258, 0.27577711)))
        self.has_text = hasattr(model, "encode_text") and tokenizer is not None
        self.context_length = int(getattr(tokenizer, "context_length", 0) or
                                  source.model_cfg.get("text_cfg", {}).get("context_length", 77))
        self.patch_method = self._patch_method()
        self.device = torch.device("cpu")
        self._amp: torch.dtype | None = None
        self.to(device)

    # -- device / precision --------------------------------------------------------------------------
    def to(self, device: str | torch.device) -> "OpenClipBackbone":
        self.device = torch.device(device)
        self.model.to(self.device)
        self._amp = _resolve_precision(self.precision, self.device)
        return self

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self._amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._amp)

    # -- images ------------------------------------------------------------------------------------
    def _patch_method(self) -> str | None:
        """How patch tokens can be read off this vision tower, or None where they have no meaning here."""
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        v = self.model.visual
        if isinstance(v, TimmModel):
            t = v.trunk
            if (hasattr(t, "forward_features") and hasattr(t, "num_prefix_tokens") and hasattr(t, "fc_norm")
                    and getattr(t, "attn_pool", None) is None and "pool" not in dict(v.head.named_children())):
                return "timm-vit"
        elif isinstance(v, VisionTransformer):
            if getattr(v, "attn_pool", None) is None and v.pool_type in ("tok", "avg"):
                return "open_clip-vit"
        return None

    def _probe_embed_dim(self) -> int:
        s = self.model.visual.preprocess_cfg["size"]
        s = s if isinstance(s, (tuple, list)) else (s, s)
        with torch.inference_mode():
            return int(self.model.encode_image(torch.zeros(1, 3, *s)).shape[-1])

    def _forward_with_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(unnormalised image embedding [B, D], unnormalised patch tokens [B, P, D], grid) in one pass."""
        v = self.model.visual
        if self.patch_method == "timm-vit":
            t = v.trunk
            feats = t.forward_features(x)  # [B, prefix + P, W]: all blocks and the trunk's final norm
            raw = v.head(t.forward_head(feats))  # exactly TimmModel.forward: timm pool/fc_norm/head, then proj
            tokens = feats[:, t.num_prefix_tokens:]
            tokens = v.head(t.head(t.head_drop(t.fc_norm(tokens))))  # the same post-pool path, per token
            ph, pw = t.patch_embed.patch_size
        elif self.patch_method == "open_clip-vit":
            h = v.transformer(v._embeds(x))
            raw, tokens = v._pool(h)  # ln_post applied (before pooling unless final_ln_after_pool)
            if v.final_ln_after_pool:
                tokens = v.ln_post(tokens)
            if v.proj is not None:
                raw, tokens = raw @ v.proj, tokens @ v.proj
            ph, pw = v.patch_size
        else:
            raise NotImplementedError(
                f"backbone {self.name}: patch tokens are implemented for ViT vision towers (timm or open_clip) "
                f"without attention pooling; this one is {type(v).__name__}. Use with_patches=False.")
        grid = (x.shape[-2] // ph, x.shape[-1] // pw)
        if grid[0] * grid[1] != tokens.shape[1]:
            raise RuntimeError(f"backbone {self.name}: {tokens.shape[1]} patch tokens do not fill a {grid} grid")
        return raw, tokens, grid

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor, with_patches: bool = False) -> ImageEncoding:
        S = self.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[-2:]) != (S, S):
            raise ValueError(f"backbone {self.name}: pixels must be [B, 3, {S}, {S}] (use preprocess), "
                             f"got {tuple(pixels.shape)}")
        x = pixels.to(self.device, torch.float32)
        with self._autocast():
            if with_patches:
                raw, tokens, grid = self._forward_with_patches(x)
            else:
                raw, tokens = self.model.encode_image(x), None
                grid = self.grid
        raw = raw.float()
        norm = raw.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        patches = tokens.float() / norm.unsqueeze(1) if tokens is not None else None
        return ImageEncoding(embedding=raw / norm, patches=patches, grid=grid)

    def gradcam(self, pixels: torch.Tensor, target) -> torch.Tensor:
        """Grad-CAM on the patch tokens leaving the last transformer block (ViT towers only)."""
        from sae_cxr.backbones.base import gradcam_from

        v = self.model.visual
        if self.patch_method == "timm-vit":
            block, prefix = v.trunk.blocks[-1], v.trunk.num_prefix_tokens
        elif self.patch_method == "open_clip-vit":
            block, prefix = v.transformer.resblocks[-1], getattr(v, "num_prefix_tokens", 1)
        else:
            raise NotImplementedError(f"backbone {self.name}: Grad-CAM needs a ViT vision tower")
        captured: dict[str, torch.Tensor] = {}
        handle = block.register_forward_hook(lambda m, i, o: captured.__setitem__("tokens", o))
        try:
            with torch.enable_grad():
                raw = self.model.encode_image(pixels.to(self.device, torch.float32)).float()
                emb = raw / raw.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                tokens = captured["tokens"]
                tokens = tokens if tokens.shape[1] != pixels.shape[0] else tokens.transpose(0, 1)
                return gradcam_from(tokens, target(emb), self.grid, prefix=prefix)
        finally:
            handle.remove()

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid at `image_size` ((14, 14) for BiomedCLIP at 224 px); (0, 0) if there are no patches."""
        v = self.model.visual
        if self.patch_method == "timm-vit":
            ph, pw = v.trunk.patch_embed.patch_size
        elif self.patch_method == "open_clip-vit":
            ph, pw = v.patch_size
        else:
            return (0, 0)
        return (self.image_size // ph, self.image_size // pw)

    # -- text ------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids [B, context_length], padded and truncated as the model was trained."""
        return self.tokenizer(list(texts), context_length=self.context_length)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
        if not self.has_text:
            return super().encode_texts(texts)
        texts = list(texts)
        if not texts:
            return torch.zeros((0, self.embed_dim), device=self.device)
        out = []
        for i in range(0, len(texts), batch_size):
            ids = self.tokenize(texts[i:i + batch_size]).to(self.device)
            with self._autocast():
                out.append(self.model.encode_text(ids).float())
        return F.normalize(torch.cat(out), dim=-1)

    # -- identity --------------------------------------------------------------------------------
    @cached_property
    def weights_sha256(self) -> str:
        """Digest of the state dict as loaded (computed once: the weights are never trained here)."""
        return state_dict_sha256(self.model.state_dict())

    @property
    def version(self) -> str:
        import open_clip
        import timm
        import transformers

        return f"open_clip {open_clip.__version__}, timm {timm.__version__}, transformers {transformers.__version__}"

    def info(self) -> dict[str, Any]:
        vision = self.source.model_cfg.get("vision_cfg", {})
        pool = None
        if self.patch_method == "timm-vit":
            pool = f"timm global_pool={self.model.visual.trunk.global_pool!r}"
        elif self.patch_method == "open_clip-vit":
            pool = f"open_clip pool_type={self.model.visual.pool_type!r}"
        return {**super().info(), **self.source.as_dict(), "precision": self.precision,
                "autocast": str(self._amp).replace("torch.", "") if self._amp else None,
                "context_length": self.context_length, "grid": list(self.grid), "patch_method": self.patch_method,
                "pooling": pool, "vision_tower": vision.get("timm_model_name") or "open_clip VisionTransformer",
                "text_tower": self.source.model_cfg.get("text_cfg", {}).get("hf_model_name"),
                "preprocess": "letterbox (black) + bilinear antialiased resize; replaces open_clip's resize + "
                              "center crop", "random_init": self.random_init}
