"""A local transformers vision-language model behind the same `chat` interface as the HTTP client.

Why: a site that cannot send radiographs to a hosted API (or has no server) still gets the LMM
labeler, from a model folder on disk (e.g. one fetched once with `huggingface-cli download
<repo> --local-dir <path>` on a machine with hub access). Nothing here touches the hub.

The messages are the OpenAI format the labeler builds (images as base64 PNG data URLs); they
are turned into the transformers chat format ({"type": "image", "image": PIL image}) and go
through the processor's chat template, so any image-text-to-text model with a chat template works.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sae_cxr.labeling.llm_client import Accounting, ChatResult, LLMConfigError, Message, TokenUsage

log = logging.getLogger(__name__)

_DTYPES = ("auto", "float32", "bfloat16", "float16")


class LocalVLMError(LLMConfigError):
    """A model folder that cannot serve as a local vision-language back end."""


@dataclass
class LocalVLMConfig:
    """Where the local model lives and how it generates."""

    path: str = ""
    """Folder with config.json, the weights and the processor files (tokenizer, image processor,
    chat template) of an image-text-to-text model. Never a hub id: nothing is downloaded."""
    device: str = "cpu"
    """torch device to run on ("cpu", "cuda", "cuda:1")."""
    dtype: str = "auto"
    """auto (what the checkpoint says) | float32 | bfloat16 | float16."""
    max_new_tokens: int = 256
    """Completion token limit per reply."""
    temperature: float = 0.0
    """0 decodes greedily (deterministic); > 0 samples at this temperature."""

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise LocalVLMError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.max_new_tokens < 1:
            raise LocalVLMError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def _check_model_folder(path: str) -> Path:
    """Fail before transformers does, with a message that says what to do."""
    if not path:
        raise LocalVLMError("LocalVLMConfig.path is empty: point it at a local folder holding a "
                            "vision-language model (config.json, weights, processor files)")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise LocalVLMError(f"local VLM folder {folder} does not exist (this back end never downloads); "
                            "fetch the model where the hub is reachable, e.g. `huggingface-cli download "
                            f"<repo> --local-dir {folder}`, and copy the folder here")
    if not (folder / "config.json").is_file():
        raise LocalVLMError(f"{folder} has no config.json: it is not a transformers model folder")
    return folder


class LocalVLM:
    """An image-text-to-text model from a local folder, answering OpenAI-format chat messages.

    Generation is serialised (one reply at a time): the model already uses the machine's cores,
    so `concurrency` is 1 and callers that batch through it simply run in order.
    """

    concurrency = 1

    def __init__(self, config: LocalVLMConfig):
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        self.config = config
        folder = _check_model_folder(config.path)
        try:
            model_config = AutoConfig.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise LocalVLMError(f"{folder}/config.json cannot be read by transformers: {e}") from None
        model_type = getattr(model_config, "model_type", "")
        if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            raise LocalVLMError(f"{folder} holds a {model_type!r} model, which is not a vision-language "
                                "(image-text-to-text) model; the LMM labeler needs one that reads images, "
                                "e.g. a Qwen2.5-VL, Gemma 3, Idefics3/SmolVLM or LLaVA checkpoint")
        try:
            self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise LocalVLMError(f"{folder}: the processor (tokenizer + image processor) does not load: {e}") from None
        if getattr(self.processor, "image_processor", None) is None:
            raise LocalVLMError(f"{folder}: the processor has no image processor, so it cannot read images")
        if not getattr(self.processor, "chat_template", None):
            raise LocalVLMError(f"{folder}: the processor has no chat template (chat_template.jinja); "
                                "the labeler's messages need one to become a prompt")
        dtype: Any = "auto" if config.dtype == "auto" else getattr(torch, config.dtype)
        self.model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=dtype)
        self.model.to(config.device).eval()
        self.model_name = f"local:{folder.name}"
        self._lock = threading.Lock()
        self._accounting = Accounting(model=self.model_name)
        log.info("loaded local VLM %s (%s) on %s", folder, model_type, config.device)

    def __repr__(self) -> str:
        return f"LocalVLM(path={self.config.path!r}, device={self.config.device!r})"

    @property
    def accounting(self) -> Accounting:
        """Calls and tokens so far (the cost of a local model is the machine's time, so 0 here)."""
        with self._lock:
            return dataclasses.replace(self._accounting)

    def chat(self, messages: Sequence[Message], response_format: dict[str, Any] | None = None) -> ChatResult:
        """Generate one reply to OpenAI-format messages.

        `response_format` is accepted for interface parity but cannot constrain local decoding:
        a JSON request is enforced by the caller's strict parser (the LMM labeler re-asks).
        """
        import torch

        conversation = to_transformers_messages(messages)
        with self._lock:
            inputs = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True, return_tensors="pt")
            # floating inputs (pixels) in the model's dtype: not every model casts them itself
            inputs = inputs.to(device=self.config.device, dtype=self.model.dtype)
            sampling = self.config.temperature > 0
            gen_kwargs: dict[str, Any] = {"max_new_tokens": self.config.max_new_tokens, "do_sample": sampling}
            if sampling:
                gen_kwargs["temperature"] = self.config.temperature
            with torch.inference_mode():
                out = self.model.generate(**inputs, **gen_kwargs)
            n_prompt = int(inputs["input_ids"].shape[1])
            new_tokens = out[:, n_prompt:]
            text = self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0]
            usage = TokenUsage(prompt_tokens=n_prompt, completion_tokens=int(new_tokens.shape[1]))
            a = self._accounting
            a.calls += 1
            a.requests += 1
            a.prompt_tokens += usage.prompt_tokens
            a.completion_tokens += usage.completion_tokens
        finish = "length" if usage.completion_tokens >= self.config.max_new_tokens else "stop"
        return ChatResult(text=text.strip(), usage=usage, cached=False, model=self.model_name, finish_reason=finish)


def to_transformers_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """OpenAI-format messages -> transformers chat messages with PIL images.

    Only inline images (data URLs) are accepted: a local back end has no network to fetch URLs.
    """
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, str):
            parts: list[dict[str, Any]] = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = [_convert_part(p, i) for p in content]
        else:
            raise ValueError(f"message {i} has content of type {type(content).__name__}; expected a string "
                             "or a list of content parts")
        out.append({"role": m["role"], "content": parts})
    return out


def _convert_part(part: dict[str, Any], i: int) -> dict[str, Any]:
    kind = part.get("type")
    if kind == "text":
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        ref = part["image_url"]
        url = ref["url"] if isinstance(ref, dict) else str(ref)
        return {"type": "image", "image": decode_data_url_image(url, where=f"message {i}")}
    raise ValueError(f"message {i} has a content part of type {kind!r}; the local VLM reads 'text' and 'image_url'")


def decode_data_url_image(url: str, where: str = "image") -> Any:
    """A `data:image/...;base64,` URL -> an RGB PIL image."""
    from PIL import Image, UnidentifiedImageError

    head, sep, data = url.partition(",")
    if not (sep and head.startswith("data:image/") and head.endswith(";base64")):
        raise ValueError(f"{where}: the local VLM only reads inline base64 image data URLs "
                         f"(data:image/png;base64,...), got {url[:40]!r}")
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as img:
            return img.convert("RGB")
    except (binascii.Error, ValueError, UnidentifiedImageError) as e:
        raise ValueError(f"{where}: the image data URL does not decode to an image ({e})") from None
