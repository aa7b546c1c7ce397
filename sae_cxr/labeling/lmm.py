"""The LMM labeler and judge: a large multimodal model names a pattern, then checks the name.

`describe_pattern` shows the model a montage of a pattern's top activating images (plus report
snippets and statistics) and asks for strict JSON {label, description, category, confidence}.
`judge` asks, for one image, whether a label applies. Verification scores a label by BALANCED
accuracy over held-out activating AND non-activating images: CXR-LanIC's sibling code keeps a
name when the yes-rate on positives alone is >= 0.7, which a label that says "yes" to every
radiograph passes; balanced accuracy gives that label 0.5.

Replies are parsed strictly (one JSON object, optionally inside a ```json fence, exactly the
schema's keys); a bad reply is re-asked a bounded number of times, then raises an error that
names the pattern. Works with either back end: `OpenAIChatClient` or `LocalVLM`.
"""

from __future__ import annotations

import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence, TypeVar

from sae_cxr.findings import CATEGORIES
from sae_cxr.labeling.base import (  # noqa: F401  (re-exported: lmm's public API predates base.py)
    JudgeVote,
    PatternLabel,
    Verification,
    balanced_accuracy,
    verification_from_votes,
)
from sae_cxr.labeling.llm_client import ChatBackend, Message, image_part, text_part

T = TypeVar("T")

_CATEGORY_LIST = ", ".join(CATEGORIES)

DESCRIBE_SYSTEM = (
    "You name visual patterns learned by a chest X-ray classifier. You see a montage of the "
    "radiographs on which one pattern fires most strongly. Name the ONE visual feature they share: a "
    "finding, an anatomical structure, a device, or an acquisition artifact (text marker, burned-in "
    "text, noise, collimation edge).\n"
    "Reply with ONLY a JSON object, no other text, with exactly these keys:\n"
    '{"label": "<2-6 word name>", "description": "<one sentence: what it looks like and where>", '
    f'"category": "<one of: {_CATEGORY_LIST}>", "confidence": <number from 0 to 1>}}'
)
DESCRIBE_USER = "Montage of the top activating images of one pattern."
DESCRIBE_REPORTS = "Report snippets of some of these images:"
DESCRIBE_STATS = "Statistics of the pattern:"
DESCRIBE_ASK = "Name the shared feature. Reply with the JSON object only."

JUDGE_SYSTEM = (
    "You check whether a named visual feature is present in one chest X-ray.\n"
    "Reply with ONLY a JSON object, no other text: "
    '{"applies": true or false, "confidence": <number from 0 to 1>}'
)
JUDGE_USER = 'Feature: "{label}": {description}\nIs this feature present in the image? Reply with the JSON object only.'

REASK = "Your reply could not be used: {reason}. Reply again with ONLY the JSON object {schema}, nothing else."
DESCRIBE_SCHEMA = '{"label", "description", "category", "confidence"}'
JUDGE_SCHEMA = '{"applies", "confidence"}'

MAX_LABEL_CHARS = 80
MAX_DESCRIPTION_CHARS = 600
_FENCE = re.compile(r"\A```(?:json)?[ \t]*\n(.*?)\n?[ \t]*```\Z", re.DOTALL | re.IGNORECASE)


class LMMReplyError(ValueError):
    """The model gave no usable reply within the allowed re-asks."""


@dataclass
class LMMConfig:
    """How the labeler talks to the model."""

    max_reasks: int = 2
    """Re-asks after a malformed reply before giving up (so at most max_reasks + 1 replies)."""
    json_mode: bool = True
    """Send response_format={"type": "json_object"}; turn off for servers that reject it."""
    max_reports: int = 8
    """Report snippets shown with a montage (the first ones given)."""
    max_report_chars: int = 300
    """Each snippet is cut to this length, to keep prompts short."""


def parse_json_object(text: str) -> dict[str, Any]:
    """The one JSON object a reply consists of, optionally wrapped in a ```json fence; else ValueError."""
    s = text.strip()
    fenced = _FENCE.match(s)
    if fenced:
        s = fenced.group(1).strip()
    if not s.startswith("{"):
        raise ValueError("the reply is not a JSON object (it must start with '{', with no text around it)")
    try:
        obj = json.loads(s, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ValueError(f"the reply is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError("the reply is JSON but not an object")
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in the reply")


def _check_keys(obj: dict[str, Any], expected: tuple[str, ...]) -> None:
    missing = [k for k in expected if k not in obj]
    extra = sorted(set(obj) - set(expected))
    if missing or extra:
        parts = ([f"missing key(s) {missing}"] if missing else []) + ([f"unexpected key(s) {extra}"] if extra else [])
        raise ValueError("; ".join(parts))


def _confidence(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"confidence must be a number from 0 to 1, got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"confidence must lie in [0, 1], got {value!r}")
    return float(value)


def _text_field(obj: dict[str, Any], key: str, limit: int) -> str:
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key} must be a non-empty string, got {value!r}")
    value = value.strip()
    if len(value) > limit:
        raise ValueError(f"{key} is {len(value)} characters long; keep it under {limit}")
    if "\n" in value:
        raise ValueError(f"{key} must be one line")
    return value


def parse_pattern_label(text: str) -> PatternLabel:
    """Strictly parse a describe_pattern reply into a PatternLabel; ValueError says what is wrong."""
    obj = parse_json_object(text)
    _check_keys(obj, ("label", "description", "category", "confidence"))
    label = _text_field(obj, "label", MAX_LABEL_CHARS)
    description = _text_field(obj, "description", MAX_DESCRIPTION_CHARS)
    category = obj["category"]
    if not isinstance(category, str) or category.strip().lower() not in CATEGORIES:
        raise ValueError(f"category must be one of {_CATEGORY_LIST}; got {category!r}")
    return PatternLabel(label=label, description=description, category=category.strip().lower(),
                        confidence=_confidence(obj["confidence"]), labeler="lmm", raw=text)


def parse_judge_vote(text: str) -> JudgeVote:
    """Strictly parse a judge reply ({"applies": bool, "confidence": number}); ValueError says what is wrong."""
    obj = parse_json_object(text)
    _check_keys(obj, ("applies", "confidence"))
    if not isinstance(obj["applies"], bool):
        raise ValueError(f"applies must be JSON true or false, got {obj['applies']!r}")
    return JudgeVote(applies=obj["applies"], confidence=_confidence(obj["confidence"]), raw=text)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str, separators=(", ", ": "))
    return str(value)


class LMMLabeler:
    """Names patterns and judges names with a multimodal chat back end."""

    def __init__(self, backend: ChatBackend, config: LMMConfig | None = None):
        self.backend = backend
        self.config = config or LMMConfig()
        if self.config.max_reasks < 0:
            raise ValueError(f"max_reasks must be >= 0, got {self.config.max_reasks}")

    def describe_messages(self, montage_png: bytes, reports: Sequence[str], context: dict[str, Any]) -> list[Message]:
        """The prompt for one pattern: system rules, then the montage, snippets and statistics."""
        cfg = self.config
        lines = [DESCRIBE_USER]
        snippets = [r.strip() for r in reports if r and r.strip()][: cfg.max_reports]
        if snippets:
            lines.append(DESCRIBE_REPORTS)
            lines += [f"- {_clip(s, cfg.max_report_chars)}" for s in snippets]
        stats = {k: v for k, v in context.items() if k != "pattern_id"}
        if stats:
            lines.append(DESCRIBE_STATS)
            lines += [f"- {k}: {_format_value(v)}" for k, v in stats.items()]
        lines.append(DESCRIBE_ASK)
        return [{"role": "system", "content": DESCRIBE_SYSTEM},
                {"role": "user", "content": [image_part(montage_png), text_part("\n".join(lines))]}]

    def describe_pattern(self, montage_png: bytes, reports: list[str], context: dict[str, Any]) -> PatternLabel:
        """Name one pattern from its montage; context["pattern_id"] names it in errors.

        Other context entries (density, stability, top findings, ...) are shown to the model as statistics.
        """
        where = f"pattern {context.get('pattern_id', '<no pattern_id in context>')}"
        try:
            messages = self.describe_messages(montage_png, reports, context)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        label = self._ask(messages, parse_pattern_label, DESCRIBE_SCHEMA, where)
        return replace(label, pattern_id=context.get("pattern_id"))

    def judge_messages(self, image_png: bytes, label: str, description: str) -> list[Message]:
        return [{"role": "system", "content": JUDGE_SYSTEM},
                {"role": "user", "content": [image_part(image_png),
                                             text_part(JUDGE_USER.format(label=label, description=description))]}]

    def judge(self, image_png: bytes, label: str, description: str) -> JudgeVote:
        """Does `label` apply to this one image? A strict yes/no with confidence."""
        return self._ask(self.judge_messages(image_png, label, description), parse_judge_vote, JUDGE_SCHEMA,
                         f"judge of label {label!r}")

    def verify(self, label: str, description: str, activating_png: Sequence[bytes],
               non_activating_png: Sequence[bytes]) -> Verification:
        """Judge a label on held-out activating and non-activating images; score both sides.

        Judgements run `backend.concurrency` at a time (1 for a local model).
        """
        images = list(activating_png) + list(non_activating_png)
        with ThreadPoolExecutor(max_workers=max(1, self.backend.concurrency), thread_name_prefix="judge") as pool:
            votes = list(pool.map(lambda png: self.judge(png, label, description), images))
        return verification_from_votes(votes[: len(activating_png)], votes[len(activating_png):], judge="lmm")

    def _ask(self, messages: list[Message], parse: Callable[[str], T], schema: str, where: str) -> T:
        """Chat, parse strictly, and re-ask with the reason on a bad reply, at most max_reasks times."""
        response_format = {"type": "json_object"} if self.config.json_mode else None
        conversation = list(messages)
        attempts = self.config.max_reasks + 1
        for attempt in range(attempts):
            reply = self.backend.chat(conversation, response_format=response_format)
            try:
                return parse(reply.text)
            except ValueError as e:
                reason = str(e)
                if reply.finish_reason == "length":
                    reason += " (the reply was cut off by the token limit)"
            if attempt < attempts - 1:
                conversation += [{"role": "assistant", "content": reply.text},
                                 {"role": "user", "content": REASK.format(reason=reason, schema=schema)}]
        raise LMMReplyError(f"{where}: no valid reply from the model after {attempts} attempt(s); last problem: "
                            f"{reason}; last reply: {_clip(reply.text, 300)!r}")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
