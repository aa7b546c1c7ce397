"""The open_clip backbone (BiomedCLIP's code path) on tiny models of the same architecture, offline."""

from __future__ import annotations

import json
import shutil
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sae_cxr.backbones import load_backbone
from sae_cxr.backbones.biomedclip import (BIOMEDCLIP_HUB_ID, BIOMEDCLIP_TEXT_HUB_ID, OpenClipBackbone,
                                          WeightsNotFoundError, hub_offline)
from sae_cxr.backbones.tiny_open_clip import TINY_TEXT_HUB_ID, TINY_VIT, write_tiny_open_clip_dir
from tests.backbones.conftest import TINY_MODEL_HUB_ID, fake_hub_cache

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# -- loading --------------------------------------------------------------------------------------

def test_local_dir_loads_through_load_backbone_with_the_models_own_settings(tiny_backbone, tiny_dir):
    b = tiny_backbone
    assert isinstance(b, OpenClipBackbone)
    assert (b.embed_dim, b.image_size, b.grid, b.context_length) == (16, 64, (4, 4), 24)
    assert b.mean == pytest.approx(CLIP_MEAN) and b.std == pytest.approx(CLIP_STD)
    assert b.has_text and b.patch_method == "timm-vit"
    info = b.info()
    assert info["checkpoint"] == str(tiny_dir / "open_clip_model.safetensors")
    # the config names the text tower by a hub id that exists nowhere; the loader found its config locally
    assert info["text_tower"] == TINY_TEXT_HUB_ID and info["text_config_dir"] == str(tiny_dir)
    assert info["vision_tower"] == TINY_VIT and info["pooling"] == "timm global_pool='token'"
    assert info["autocast"] is None and info["weights_sha256"] == b.weights_sha256
    assert "open_clip" in info["version"]


def test_spec_errors_are_actionable():
    with pytest.raises(ValueError, match="MODEL/PRETRAINED"):
        load_backbone("not-a-spec")
    with pytest.raises(ValueError, match="hf-hub:ORG/REPO"):
        load_backbone("hf-hub:no-slash")
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        load_backbone("NoSuchArch/openai")
    with pytest.raises(ValueError, match="neither a weights file nor a pretrained tag"):
        load_backbone("ViT-B-16/no-such-tag")
    with pytest.raises(ValueError, match="precision"):
        from sae_cxr.backbones.biomedclip import _resolve_precision

        _resolve_precision("fp8", torch.device("cpu"))


# -- images ---------------------------------------------------------------------------------------

def test_image_encoding_shapes_and_unit_norm(tiny_backbone, images):
    enc = tiny_backbone.encode_images(images, with_patches=True)
    assert enc.embedding.shape == (3, 16) and enc.embedding.dtype == torch.float32
    assert enc.patches is not None and enc.patches.shape == (3, 16, 16)
    assert enc.grid == (4, 4)
    assert torch.allclose(enc.embedding.norm(dim=-1), torch.ones(3), atol=1e-5)
    plain = tiny_backbone.encode_images(images)
    assert plain.patches is None and plain.grid == (4, 4)
    assert torch.allclose(plain.embedding, enc.embedding, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        tiny_backbone.encode_pixels(torch.zeros(1, 3, 32, 32))


def test_embedding_is_open_clips_encode_image(tiny_backbone, images):
    pixels, _ = tiny_backbone.preprocess(images)
    with torch.inference_mode():
        ref = F.normalize(tiny_backbone.model.encode_image(pixels), dim=-1)
    enc = tiny_backbone.encode_pixels(pixels, with_patches=True)
    assert torch.allclose(enc.embedding, ref, atol=1e-5)


def test_patches_are_the_projected_trunk_tokens_on_the_embedding_scale(tiny_backbone, images):
    """CLS pooling: embedding = proj(CLS after the final norm); patches = proj(patch tokens) / |raw embedding|."""
    b = tiny_backbone
    pixels, _ = b.preprocess(images)
    visual = b.model.visual
    with torch.inference_mode():
        feats = visual.trunk.forward_features(pixels)  # [B, 1 + 16, 32], final LayerNorm applied
        raw = b.model.encode_image(pixels)
        cls = visual.head.proj(feats[:, 0])
        tokens = visual.head.proj(feats[:, 1:])
    assert feats.shape[1] == 1 + 16
    assert torch.allclose(cls, raw, atol=1e-5)  # BiomedCLIP's pooling is the CLS token
    enc = b.encode_pixels(pixels, with_patches=True)
    scale = raw.norm(dim=-1)[:, None, None]
    assert torch.allclose(enc.patches, tokens / scale, atol=1e-5)
    # patch tokens vary over the image and live on the embedding's scale (neither tiny nor huge)
    assert enc.patches.norm(dim=-1).mean() == pytest.approx(1.0, rel=0.8)
    assert not torch.allclose(enc.patches[:, 0], enc.patches[:, 5], atol=1e-3)


def test_avg_pooling_makes_the_embedding_the_mean_of_the_patches(tmp_path, images):
    d = write_tiny_open_clip_dir(tmp_path / "avg", seed=1, timm_pool="avg")
    b = load_backbone(f"local-dir:{d}")
    assert b.info()["pooling"] == "timm global_pool='avg'"
    enc = b.encode_images(images, with_patches=True)
    assert torch.allclose(enc.patches.mean(dim=1), enc.embedding, atol=1e-5)


def test_encoding_is_deterministic_across_calls_and_loads(tiny_backbone, tiny_dir, images):
    a = tiny_backbone.encode_images(images, with_patches=True)
    b = tiny_backbone.encode_images(images, with_patches=True)
    assert torch.equal(a.embedding, b.embedding) and torch.equal(a.patches, b.patches)
    again = load_backbone(f"local-dir:{tiny_dir}").encode_images(images, with_patches=True)
    assert torch.equal(a.embedding, again.embedding) and torch.equal(a.patches, again.patches)


def test_preprocess_letterboxes_with_the_models_mean_and_std(tiny_backbone):
    """A 40x100 film is padded to 100x100 with black (air), not cropped: the model sees all of it."""
    b = tiny_backbone
    wide = np.ones((40, 100), dtype=np.float32)
    pixels, (lb,) = b.preprocess([wide])
    assert pixels.shape == (1, 3, 64, 64)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1), torch.tensor(CLIP_STD).view(3, 1)
    black, white = (0 - mean) / std, (1 - mean) / std
    pad = round(lb.pad_y)
    assert lb.scale == pytest.approx(0.64) and pad == 19
    assert torch.allclose(pixels[0, :, :pad - 1, :].flatten(1), black.expand(3, (pad - 1) * 64), atol=1e-5)
    assert torch.allclose(pixels[0, :, 32, :], white.expand(3, 64), atol=1e-5)  # the film survives whole
    # the embedding of the non-square film is the embedding of the film padded to a square by hand
    square = np.zeros((100, 100), dtype=np.float32)
    square[30:70] = wide
    assert torch.allclose(b.encode_images([wide]).embedding, b.encode_images([square]).embedding, atol=1e-5)
    # a patch maps back to source pixels through the letterbox
    x, y = lb.to_source(np.array([0.0, 64.0]), np.array([lb.pad_y, lb.pad_y + 40 * lb.scale]))
    assert np.allclose(x, [0, 100]) and np.allclose(y, [0, 40])


def test_amp_bf16_on_cpu_is_close_to_fp32_and_returns_float32(tiny_dir, tiny_backbone, images):
    amp = load_backbone(f"local-dir:{tiny_dir}", precision="amp_bf16")
    assert amp.info()["autocast"] == "bfloat16"
    e16 = amp.encode_images(images, with_patches=True)
    e32 = tiny_backbone.encode_images(images, with_patches=True)
    assert e16.embedding.dtype == torch.float32 and e16.patches.dtype == torch.float32
    assert (e16.embedding * e32.embedding).sum(-1).min() > 0.99
    with pytest.raises(ValueError, match="CUDA"):
        load_backbone(f"local-dir:{tiny_dir}", precision="amp_fp16")


# -- text -----------------------------------------------------------------------------------------

def test_text_embeddings_are_normalised_distinct_and_open_clips(tiny_backbone):
    b = tiny_backbone
    texts = ["left pleural effusion", "enlarged cardiac silhouette", "pacemaker in place"]
    t = b.encode_texts(texts)
    assert t.shape == (3, 16) and t.dtype == torch.float32
    assert torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)
    sim = t @ t.T
    assert sim[~torch.eye(3, dtype=torch.bool)].max() < 0.95  # different texts, different embeddings
    with torch.inference_mode():
        ref = F.normalize(b.model.encode_text(b.tokenize(texts)), dim=-1)
    assert torch.allclose(t, ref, atol=1e-5)
    assert torch.allclose(b.encode_texts(texts[:1]), t[:1], atol=1e-5)  # batching does not matter
    assert b.encode_texts([]).shape == (0, 16)


def test_tokenizer_uses_the_wordpiece_vocab_and_truncates_at_the_context_length(tiny_backbone):
    b = tiny_backbone
    tok = b.tokenizer.tokenizer
    ids = b.tokenize(["Left pleural nodules."])
    assert ids.shape == (1, 24)
    words = tok.convert_ids_to_tokens(ids[0].tolist())
    assert words[:7] == ["[CLS]", "left", "pleural", "nodule", "##s", ".", "[SEP]"]
    assert set(words[7:]) == {"[PAD]"}
    long_a = "left pleural effusion " * 12 + "pacemaker"
    long_b = "left pleural effusion " * 12 + "cardiomegaly"
    ids = b.tokenize([long_a, long_b])
    assert ids.shape == (2, 24) and (ids != tok.pad_token_id).all()
    assert ids[0, -1].item() == tok.sep_token_id and torch.equal(ids[0], ids[1])
    ta, tb = b.encode_texts([long_a, long_b])
    assert torch.allclose(ta, tb)  # what differs lies past the context length


# -- identity -------------------------------------------------------------------------------------

def test_weights_hash_is_stable_and_changes_with_one_weight(tiny_backbone, tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    h = tiny_backbone.weights_sha256
    assert len(h) == 64 and h == tiny_backbone.weights_sha256
    assert load_backbone(f"local-dir:{tiny_dir}").weights_sha256 == h
    edited = tmp_path / "edited"
    shutil.copytree(tiny_dir, edited)
    state = load_file(str(edited / "open_clip_model.safetensors"))
    key = "visual.head.proj.weight"
    state[key][0, 0] += 1e-3
    save_file(state, str(edited / "open_clip_model.safetensors"))
    other = load_backbone(f"local-dir:{edited}")
    assert other.weights_sha256 != h
    assert not torch.equal(other.model.state_dict()[key], tiny_backbone.model.state_dict()[key])


# -- missing files --------------------------------------------------------------------------------

def test_missing_biomedclip_names_both_repos_the_cache_and_the_local_dir_layout(tmp_path, monkeypatch):
    cache = tmp_path / "empty-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(WeightsNotFoundError) as err:
        load_backbone("biomedclip")
    msg = str(err.value)
    for needed in (BIOMEDCLIP_HUB_ID, BIOMEDCLIP_TEXT_HUB_ID, str(cache), "open_clip_config.json",
                   "open_clip_pytorch_model.bin", "config.json", "vocab.txt", "local-dir:DIR", "HF_HUB_CACHE",
                   f"hf download {BIOMEDCLIP_HUB_ID} open_clip_config.json open_clip_pytorch_model.bin",
                   f"hf download {BIOMEDCLIP_TEXT_HUB_ID} config.json vocab.txt",
                   f"models--{BIOMEDCLIP_HUB_ID.replace('/', '--')}"):
        assert needed in msg, needed
    assert "Traceback" not in msg and err.value.__cause__ is None


@pytest.mark.parametrize("remove, expected", [
    ("open_clip_model.safetensors", ["open_clip_pytorch_model.bin", "CLIP weights"]),
    ("config.json", ["config.json", TINY_TEXT_HUB_ID]),
    ("vocab.txt", ["vocab.txt", TINY_TEXT_HUB_ID]),
])
def test_missing_file_in_a_local_dir_is_named(tiny_dir, tmp_path, monkeypatch, remove, expected):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    d = tmp_path / "partial"
    shutil.copytree(tiny_dir, d)
    (d / remove).unlink()
    with pytest.raises(WeightsNotFoundError) as err:
        load_backbone(f"local-dir:{d}")
    msg = str(err.value)
    assert f"files missing in {d}" in msg
    for needed in expected + [f"--local-dir {d}"]:
        assert needed in msg, needed


def test_weights_that_do_not_fit_the_config_say_so(tiny_dir, tmp_path):
    d = tmp_path / "mismatch"
    shutil.copytree(tiny_dir, d)
    other = write_tiny_open_clip_dir(tmp_path / "wider", embed_dim=8)
    shutil.copy(other / "open_clip_model.safetensors", d / "open_clip_model.safetensors")
    expected = "(?s)open_clip could not build the model from .*size mismatch.*match open_clip_config.json"
    with pytest.raises(RuntimeError, match=expected):
        load_backbone(f"local-dir:{d}")


def test_local_dir_that_is_not_a_model_folder(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_backbone(f"local-dir:{tmp_path / 'nowhere'}")
    with pytest.raises(WeightsNotFoundError, match="open_clip_config.json is missing"):
        load_backbone(f"local-dir:{tmp_path}")


# -- hf-hub from a pre-populated cache ------------------------------------------------------------

@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_hf_hub_spec_loads_offline_from_a_populated_cache(tiny_backbone, tiny_dir, tmp_path, monkeypatch,
                                                          images, no_network):
    from huggingface_hub import constants

    cache = fake_hub_cache(tmp_path / "hub", tiny_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    offline_before = constants.HF_HUB_OFFLINE
    b = load_backbone(f"hf-hub:{TINY_MODEL_HUB_ID}")
    assert constants.HF_HUB_OFFLINE == offline_before  # offline mode was scoped to the load
    info = b.info()
    assert info["kind"] == "hf-hub" and info["revision"] == "a" * 40 and info["cache_dir"] == str(cache)
    assert info["text_config_dir"].endswith("b" * 40) and info["tokenizer_dir"].endswith("b" * 40)
    assert b.weights_sha256 == tiny_backbone.weights_sha256
    assert torch.equal(b.encode_images(images).embedding, tiny_backbone.encode_images(images).embedding)
    assert torch.equal(b.encode_texts(["left pleural effusion"]), tiny_backbone.encode_texts(["left pleural effusion"]))


def test_hf_hub_tokenizer_falls_back_to_the_model_snapshot(tiny_dir, tmp_path, monkeypatch, no_network):
    """BiomedCLIP's own repo ships tokenizer files; they serve when the text repo holds only its config."""
    cache = fake_hub_cache(tmp_path / "hub", tiny_dir, text_files=("config.json",),
                           model_files=("open_clip_config.json", "open_clip_model.safetensors", "vocab.txt",
                                        "tokenizer_config.json"))
    b = load_backbone(f"hf-hub:{TINY_MODEL_HUB_ID}", cache_dir=cache)  # the cache as an argument, not the env
    assert b.info()["tokenizer_dir"].endswith("a" * 40)
    assert b.tokenize(["left"])[0, 1].item() == b.tokenizer.tokenizer.convert_tokens_to_ids("left")


def test_hf_hub_without_the_text_repo_names_it(tiny_dir, tmp_path, monkeypatch, no_network):
    cache = fake_hub_cache(tmp_path / "hub", tiny_dir, with_text_repo=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(WeightsNotFoundError) as err:
        load_backbone(f"hf-hub:{TINY_MODEL_HUB_ID}")
    msg = str(err.value)
    assert f"- {TINY_TEXT_HUB_ID}: config.json, vocab.txt" in msg
    assert f"- {TINY_MODEL_HUB_ID}:" not in msg  # the model repo itself is complete


def test_hub_offline_is_restored():
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    with hub_offline():
        assert constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE == before


# -- an open_clip built-in architecture (native ViT tower) with a weights file --------------------

def test_builtin_architecture_with_a_weights_file(tmp_path, images):
    import open_clip
    from safetensors.torch import save_file

    name = "sae-cxr-test-native-vit"
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                           "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    cfg_path = tmp_path / f"{name}.json"
    cfg_path.write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))

    b = load_backbone(f"{name}/{weights}")
    assert (b.embed_dim, b.image_size, b.grid, b.patch_method) == (16, 32, (4, 4), "open_clip-vit")
    enc = b.encode_images(images, with_patches=True)
    assert enc.embedding.shape == (3, 16) and enc.patches.shape == (3, 16, 16)
    pixels, _ = b.preprocess(images)
    with torch.inference_mode():
        raw = b.model.encode_image(pixels)
    assert torch.allclose(enc.embedding, F.normalize(raw, dim=-1), atol=1e-5)
    assert enc.patches.norm(dim=-1).mean() == pytest.approx(1.0, rel=0.9)
    t = b.encode_texts(["left pleural effusion", "no acute process"])
    assert t.shape == (2, 16) and torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert b.tokenize(["x"]).shape == (1, 16)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_backbone(f"{name}/{tmp_path / 'missing.safetensors'}")


# -- the full-size architecture -------------------------------------------------------------------

@pytest.mark.slow
def test_full_size_biomedclip_architecture_builds_offline(no_network):
    from sae_cxr.backbones.biomedclip import build_biomedclip_architecture

    b = build_biomedclip_architecture()
    assert (b.embed_dim, b.image_size, b.grid, b.context_length) == (512, 224, (14, 14), 256)
    assert b.info()["random_init"] is True and b.info()["vision_tower"] == "vit_base_patch16_224"
    n_vision = sum(p.numel() for p in b.model.visual.parameters())
    n_text = sum(p.numel() for p in b.model.text.parameters())
    assert 86e6 < n_vision < 87e6  # ViT-B/16 trunk + 768->512 projection
    assert 109e6 < n_text < 112e6  # BERT-base + MLP projection
    enc = b.encode_images([np.random.default_rng(0).random((256, 200), dtype=np.float32)], with_patches=True)
    assert enc.embedding.shape == (1, 512) and enc.patches.shape == (1, 196, 512)
    assert b.tokenize(["left pleural effusion"]).shape == (1, 256)
    assert b.encode_texts(["left pleural effusion"]).shape == (1, 512)
