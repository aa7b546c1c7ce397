"""The local transformers back end, on a tiny LLaVA built offline in the test (random weights).

The model loads through the same code path as a real checkpoint (AutoConfig, AutoProcessor,
AutoModelForImageTextToText from a local folder, with sockets blocked while it loads). Its replies are
noise, so these tests check the plumbing (message conversion, image tokens, usage, errors) and
that the LMM labeler's strict parser turns noise into a clear error; not what a model says.
"""

from __future__ import annotations

import base64
import socket
from pathlib import Path

import pytest

from sae_cxr.labeling.llm_client import image_part, text_part
from sae_cxr.labeling.lmm import LMMConfig, LMMLabeler, LMMReplyError
from sae_cxr.labeling.vlm_local import LocalVLM, LocalVLMConfig, LocalVLMError, to_transformers_messages
from tests.labeling.loopback import make_png
from tests.labeling.tiny_vlm import IMAGE_TOKEN, IMAGE_TOKENS, build_tiny_llava


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="module")
def vlm(tiny_folder: Path) -> LocalVLM:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the local back end tried to open a connection: {args[1:]}")

    with pytest.MonkeyPatch.context() as mp:  # any attempt to reach the hub fails the test
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket, "getaddrinfo", no_network)
        return LocalVLM(LocalVLMConfig(path=str(tiny_folder), max_new_tokens=6))


def test_chat_with_an_image(vlm: LocalVLM) -> None:
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [image_part(make_png(size=(40, 30))), text_part("what is it?")]}]
    result = vlm.chat(messages, response_format={"type": "json_object"})
    assert isinstance(result.text, str) and result.cached is False
    assert 1 <= result.usage.completion_tokens <= 6
    # the prompt is the template's characters plus one placeholder per image feature
    prompt = vlm.processor.apply_chat_template(to_transformers_messages(messages), add_generation_prompt=True,
                                               tokenize=False)
    n_chars = len(prompt) - len(IMAGE_TOKEN)
    assert result.usage.prompt_tokens == n_chars + IMAGE_TOKENS
    assert result.model == f"local:{Path(vlm.config.path).name}"
    acc = vlm.accounting
    assert (acc.calls, acc.prompt_tokens, acc.estimated_cost) == (1, result.usage.prompt_tokens, 0.0)


def test_greedy_decoding_is_deterministic(vlm: LocalVLM) -> None:
    messages = [{"role": "user", "content": [image_part(make_png()), text_part("again")]}]
    assert vlm.chat(messages).text == vlm.chat(messages).text


def test_message_conversion_keeps_the_pixels() -> None:
    png = make_png((12, 34, 56), (5, 4))
    [msg] = to_transformers_messages([{"role": "user", "content": [text_part("hi"), image_part(png)]}])
    assert msg["role"] == "user" and msg["content"][0] == {"type": "text", "text": "hi"}
    img = msg["content"][1]["image"]
    assert msg["content"][1]["type"] == "image" and img.size == (5, 4) and img.getpixel((2, 2)) == (12, 34, 56)
    assert to_transformers_messages([{"role": "assistant", "content": "ok"}]) == \
        [{"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]


@pytest.mark.parametrize("url, message", [
    ("https://example.org/cxr.png", "only reads inline base64 image data URLs"),
    ("data:image/png;base64,!!!not-base64", "does not decode to an image"),
    ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "does not decode to an image"),
])
def test_message_conversion_rejects_what_it_cannot_read(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_transformers_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LocalVLMError, match="does not exist .*never downloads"):
        LocalVLM(LocalVLMConfig(path=str(tmp_path / "nope")))
    with pytest.raises(LocalVLMError, match="path is empty"):
        LocalVLM(LocalVLMConfig())
    with pytest.raises(LocalVLMError, match="no config.json"):
        LocalVLM(LocalVLMConfig(path=str(tmp_path)))


def test_text_only_model_is_refused(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(LocalVLMError, match="'llama' model, which is not a vision-language"):
        LocalVLM(LocalVLMConfig(path=str(tmp_path)))


def test_labeler_on_the_local_back_end_rejects_noise(vlm: LocalVLM) -> None:
    """A random model never writes the schema: the strict parser re-asks, then names the pattern."""
    before = vlm.accounting.calls
    with pytest.raises(LMMReplyError, match=r"pattern 42: no valid reply from the model after 2 attempt\(s\)"):
        LMMLabeler(vlm, LMMConfig(max_reasks=1)).describe_pattern(make_png(), ["Pacemaker."], {"pattern_id": 42})
    assert vlm.accounting.calls == before + 2


def test_dtype_option_loads_bfloat16_and_generates(tiny_folder: Path) -> None:
    import torch

    vlm = LocalVLM(LocalVLMConfig(path=str(tiny_folder), dtype="bfloat16", max_new_tokens=2))
    assert vlm.model.dtype == torch.bfloat16
    result = vlm.chat([{"role": "user", "content": [image_part(make_png()), text_part("hi")]}])
    assert 1 <= result.usage.completion_tokens <= 2
