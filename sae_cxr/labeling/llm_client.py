"""An OpenAI-compatible chat-completions client: retries, a content-keyed disk cache, accounting.

One client serves every endpoint that speaks `POST {base_url}/chat/completions` (vLLM, Ollama,
llama.cpp's server, a hosted API). The LMM labeler and the explanation stage's guarded rewrites
use it; `vlm_local.LocalVLM` offers the same `chat` interface for a model on disk.

Why each piece is here:
- retries with exponential backoff and jitter on 429/5xx/timeouts, honouring Retry-After, because
  a batch of thousands of labelling calls must survive rate limits and a restarting server;
- a response cache keyed by the request's CONTENT (model, messages, parameters; never the key),
  so rerunning a stage costs nothing and is reproducible;
- token and cost accounting saved into the run directory, so a run says what it cost;
- the API key is read from the environment only and scrubbed from everything the client
  produces (logs, reprs, cache files, accounting, exception messages).
"""

from __future__ import annotations

import base64
import dataclasses
import email.utils
import hashlib
import json
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import httpx

from sae_cxr.run import write_json_atomic

log = logging.getLogger(__name__)

Message = dict[str, Any]
"""One chat message in the OpenAI format: {"role": ..., "content": str | list[content part]}."""

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RETRYABLE_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
"""429 and 5xx as asked; 408 (request timeout) is the server saying "try again" too."""
_CACHE_VERSION = 1
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "api-key", "x-api-key"})
_MAX_ERROR_CHARS = 500


class LLMError(RuntimeError):
    """A chat request that failed; the message is safe to log (the API key is scrubbed)."""


class LLMConfigError(ValueError):
    """A client configuration that cannot work (bad URL, missing key, secret in a header)."""


class LLMHTTPError(LLMError):
    """The server answered with an error status; `status` and `server_message` say which."""

    def __init__(self, message: str, status: int, server_message: str):
        super().__init__(message)
        self.status = status
        self.server_message = server_message


class LLMTimeoutError(LLMError):
    """No answer within `timeout_s` on every attempt."""


class LLMConnectionError(LLMError):
    """The server could not be reached (refused, reset, DNS) on every attempt."""


class LLMResponseError(LLMError):
    """The server answered 200 with a body that is not a chat completion."""


@dataclass
class LLMConfig:
    """How to reach an OpenAI-compatible chat endpoint. Holds no secret: the key comes from the env."""

    base_url: str = "http://127.0.0.1:8000/v1"
    """Endpoint root; requests go to {base_url}/chat/completions (vLLM: http://host:8000/v1,
    Ollama: http://host:11434/v1, OpenAI: https://api.openai.com/v1)."""
    model: str = ""
    """Model name the server knows (e.g. the vLLM --served-model-name, an Ollama tag)."""
    api_key_env: str = "OPENAI_API_KEY"
    """NAME of the environment variable that holds the API key, sent as `Authorization: Bearer`.
    Empty string: send no key (a local vLLM/Ollama without auth). The key is never a config value."""
    timeout_s: float = 60.0
    """Timeout per network operation (connect, each read, write) of one attempt, in seconds."""
    max_retries: int = 4
    """Retries after the first attempt on 408/429/5xx, timeouts and connection errors."""
    backoff_base_s: float = 1.0
    """First retry waits about this long; each further retry doubles it (exponential backoff)."""
    backoff_max_s: float = 30.0
    """Ceiling for one exponential backoff wait."""
    backoff_jitter: float = 0.5
    """Fraction in [0, 1] of each backoff wait that is randomised, so parallel callers spread out."""
    retry_after_max_s: float = 120.0
    """Ceiling for a wait the server asks for (Retry-After / retry-after-ms), which wins over backoff."""
    concurrency: int = 4
    """Most requests in flight at once from this client (chat_many's workers and a semaphore)."""
    temperature: float = 0.0
    """Sampling temperature; 0 makes replies (and so the cache) as deterministic as the server allows."""
    max_tokens: int = 512
    """Completion token limit per request."""
    cache_dir: str | None = None
    """Folder for the response cache; None disables caching. Entries are keyed by model name,
    messages and parameters (not base_url), so one model served from another host shares them."""
    price_in_per_1k: float = 0.0
    """Price per 1,000 prompt tokens, for the cost estimate (currency of your choice, e.g. USD)."""
    price_out_per_1k: float = 0.0
    """Price per 1,000 completion tokens, for the cost estimate."""
    extra_headers: dict[str, str] = field(default_factory=dict)
    """Extra HTTP headers (e.g. an organisation id). Secrets are refused here: use api_key_env."""
    extra_body: dict[str, Any] = field(default_factory=dict)
    """Extra request fields a server understands (e.g. vLLM's `guided_json`, `seed`, `top_p`);
    they are part of the cache key."""

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise LLMConfigError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        for name in self.extra_headers:
            if name.lower() in _SECRET_HEADERS:
                raise LLMConfigError(f"extra_headers must not carry {name!r}: configs are saved with the run; "
                                     "put the key in an environment variable and name it in api_key_env")
        if self.timeout_s <= 0:
            raise LLMConfigError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.max_retries < 0:
            raise LLMConfigError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.concurrency < 1:
            raise LLMConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        if not 0.0 <= self.backoff_jitter <= 1.0:
            raise LLMConfigError(f"backoff_jitter must lie in [0, 1], got {self.backoff_jitter}")


@dataclass(frozen=True)
class TokenUsage:
    """Tokens one reply cost, as the server's `usage` reports them (zeros if it reports none)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class ChatResult:
    """One reply: its text, the tokens it cost, and whether it came from the cache (cost nothing)."""

    text: str
    usage: TokenUsage
    cached: bool
    model: str = ""
    finish_reason: str | None = None  # "length" means max_tokens cut the reply short


@dataclass
class Accounting:
    """What a client spent. `requests` counts HTTP attempts (retries included); `calls` counts chat()."""

    model: str = ""
    calls: int = 0
    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    replies_without_usage: int = 0  # replies whose tokens are unknown, so the cost is a lower bound
    estimated_cost: float = 0.0  # in the currency of price_in_per_1k / price_out_per_1k

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the numbers as JSON, atomically (e.g. into the run directory next to labels.jsonl)."""
        write_json_atomic(path, self.to_dict())


class ChatBackend(Protocol):
    """What the LMM labeler needs from a back end: the HTTP client and the local VLM both fit."""

    concurrency: int

    def chat(self, messages: Sequence[Message], response_format: dict[str, Any] | None = None) -> ChatResult: ...


def png_data_url(png: bytes) -> str:
    """A base64 PNG data URL, the form OpenAI-compatible servers accept for inline images."""
    if not png.startswith(PNG_MAGIC):
        raise ValueError("image bytes are not a PNG (missing the PNG signature); encode the image as PNG first")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_part(png: bytes) -> dict[str, Any]:
    """An image content part in the OpenAI format."""
    return {"type": "image_url", "image_url": {"url": png_data_url(png)}}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def request_key(payload: dict[str, Any]) -> str:
    """sha256 of the request's content (model, messages, parameters): the cache key.

    The payload never holds the API key (it travels in a header), so the key cannot reach the hash.
    """
    blob = json.dumps({"v": _CACHE_VERSION, **payload}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """Replies on disk, one JSON file per request hash, written atomically.

    Only the reply is stored (text, usage, model, finish reason), never the request's images or
    headers. An unreadable entry counts as a miss and is overwritten by the next reply.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> ChatResult | None:
        path = self._path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            usage = TokenUsage(**entry["usage"])
            return ChatResult(text=entry["text"], usage=usage, cached=True, model=entry.get("model", ""),
                              finish_reason=entry.get("finish_reason"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable cache entry %s (%s); the request will be sent again", path, e)
            return None

    def put(self, key: str, result: ChatResult) -> None:
        write_json_atomic(self._path(key), {"v": _CACHE_VERSION, "text": result.text,
                                            "usage": dataclasses.asdict(result.usage),
                                            "model": result.model, "finish_reason": result.finish_reason})


class _Scrubber:
    """Removes the API key from any text before it leaves the client."""

    def __init__(self, secret: str | None):
        self._secret = secret or None

    def __call__(self, text: object) -> str:
        s = str(text)
        if self._secret:
            s = s.replace(self._secret, "***")
        return s


def _read_key(env_name: str) -> str | None:
    """The key from the environment, checked so that httpx never has to echo a bad header value."""
    if not env_name:
        return None
    raw = os.environ.get(env_name)
    if raw is None or not raw.strip():
        raise LLMConfigError(f"environment variable {env_name} is not set (or empty): export the API key "
                             "there, or set api_key_env to '' for a server that needs no key (vLLM, Ollama)")
    key = raw.strip()
    if not all(33 <= ord(c) <= 126 for c in key):
        # Deliberately no part of the value in the message.
        raise LLMConfigError(f"environment variable {env_name} holds characters an HTTP header cannot carry "
                             "(spaces, control or non-ASCII characters); check how the key was exported")
    return key


class OpenAIChatClient:
    """A thread-safe client for `POST {base_url}/chat/completions`."""

    def __init__(self, config: LLMConfig):
        if not config.model:
            raise LLMConfigError("LLMConfig.model is empty: name the model the server serves "
                                 "(e.g. the vLLM --served-model-name or an Ollama tag)")
        self.config = config
        self._key = _read_key(config.api_key_env)
        self._scrub = _Scrubber(self._key)
        self._cache = ResponseCache(config.cache_dir) if config.cache_dir else None
        self._lock = threading.Lock()
        self._accounting = Accounting(model=config.model)
        self._slots = threading.BoundedSemaphore(config.concurrency)
        self._sleep: Callable[[float], None] = time.sleep  # a seam for tests that check the waits
        self._url = config.base_url.rstrip("/") + "/chat/completions"
        self._http = httpx.Client(timeout=httpx.Timeout(config.timeout_s),
                                  limits=httpx.Limits(max_connections=config.concurrency,
                                                      max_keepalive_connections=config.concurrency))

    @property
    def concurrency(self) -> int:
        return self.config.concurrency

    def __repr__(self) -> str:
        auth = f"key from ${self.config.api_key_env}" if self._key else "no key"
        return f"OpenAIChatClient(url={self._url!r}, model={self.config.model!r}, {auth})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "OpenAIChatClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def accounting(self) -> Accounting:
        """A snapshot of the numbers so far (safe to save while other threads keep calling)."""
        with self._lock:
            return dataclasses.replace(self._accounting)

    def _count(self, **deltas: float) -> None:
        with self._lock:
            for name, d in deltas.items():
                setattr(self._accounting, name, getattr(self._accounting, name) + d)

    def payload(self, messages: Sequence[Message], response_format: dict[str, Any] | None = None, *,
                max_tokens: int | None = None, temperature: float | None = None) -> dict[str, Any]:
        """The JSON body of a request (also the content the cache key hashes)."""
        cfg = self.config
        body: dict[str, Any] = {**cfg.extra_body, "model": cfg.model, "messages": list(messages),
                                "temperature": cfg.temperature if temperature is None else temperature,
                                "max_tokens": cfg.max_tokens if max_tokens is None else max_tokens}
        if response_format is not None:
            body["response_format"] = response_format
        return body

    def chat(self, messages: Sequence[Message], response_format: dict[str, Any] | None = None, *,
             max_tokens: int | None = None, temperature: float | None = None) -> ChatResult:
        """Send one chat completion (or answer it from the cache) and return the first choice's text.

        `messages` follow the OpenAI format; images go in as content parts built by `image_part`.
        `response_format` is passed through (e.g. {"type": "json_object"}) and is part of the cache key.
        """
        body = self.payload(messages, response_format, max_tokens=max_tokens, temperature=temperature)
        key = request_key(body)
        self._count(calls=1)
        if self._cache is not None and (hit := self._cache.get(key)) is not None:
            self._count(cache_hits=1)
            log.debug("chat %s: cache hit", key[:12])
            return hit
        try:
            result = self._send(body, key)
        except LLMError:
            self._count(failures=1)
            raise
        if self._cache is not None:
            self._cache.put(key, result)
        return result

    def chat_many(self, batch: Sequence[Sequence[Message]], response_format: dict[str, Any] | None = None, *,
                  return_exceptions: bool = False) -> list[ChatResult | LLMError]:
        """Many independent chats, at most `concurrency` in flight; results in input order.

        With return_exceptions the failures come back in place (the successes are cached, so a
        rerun only repeats what failed); otherwise the first failure is raised after all finish.
        """
        with ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="llm") as pool:
            futures = [pool.submit(self.chat, m, response_format) for m in batch]
        out: list[ChatResult | LLMError] = []
        for f in futures:
            err = f.exception()
            if err is not None and not (return_exceptions and isinstance(err, LLMError)):
                raise err
            out.append(err if err is not None else f.result())  # type: ignore[arg-type]
        return out

    # -- the wire ---------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", **self.config.extra_headers}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        return headers

    def _post(self, data: bytes) -> httpx.Response | tuple[type[LLMError], str]:
        """One attempt: the response, or the kind of transport failure and a scrubbed description.

        The httpx exception is dropped here, inside this frame, so that no exception this client
        raises carries it as __context__: httpx errors hold the request, and the request holds
        the Authorization header.
        """
        try:
            with self._slots:
                return self._http.post(self._url, content=data, headers=self._headers())
        except httpx.TimeoutException as e:
            return LLMTimeoutError, f"timed out after {self.config.timeout_s:g} s ({type(e).__name__})"
        except httpx.TransportError as e:
            return LLMConnectionError, self._scrub(f"{type(e).__name__}: {e}")

    def _send(self, body: dict[str, Any], key: str) -> ChatResult:
        cfg = self.config
        attempts = cfg.max_retries + 1
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        for attempt in range(attempts):
            last = attempt == attempts - 1
            self._count(requests=1)
            resp = self._post(data)
            wait: float | None = None
            if isinstance(resp, tuple):
                kind, problem = resp
                if last and kind is LLMTimeoutError:
                    raise LLMTimeoutError(f"chat request to {self._url} {problem} on all {attempts} attempt(s); "
                                          "raise timeout_s or check the server's load")
                if last:
                    raise LLMConnectionError(f"cannot reach {self._url} ({problem}) on all {attempts} attempt(s); "
                                             "is the server running and base_url right?")
            elif resp.status_code == 200:
                return self._parse(resp, key)
            else:
                server_message = self._scrub(_error_message(resp))
                problem = f"HTTP {resp.status_code}: {server_message}"
                if resp.status_code not in RETRYABLE_STATUS:
                    raise LLMHTTPError(f"chat request to {self._url} failed with {problem}{_hint(resp.status_code)}",
                                       resp.status_code, server_message)
                if last:
                    raise LLMHTTPError(f"chat request to {self._url} still failing after {attempts} attempt(s): "
                                       f"{problem}", resp.status_code, server_message)
                wait = _retry_after(resp.headers, cfg.retry_after_max_s)
            if wait is None:
                wait = min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** attempt)
                wait *= 1.0 - cfg.backoff_jitter * random.random()
            self._count(retries=1)
            log.warning("chat %s: %s; retry %d/%d in %.2f s", key[:12], problem, attempt + 1, cfg.max_retries, wait)
            self._sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _parse(self, resp: httpx.Response, key: str) -> ChatResult:
        snippet = self._scrub(resp.text[:_MAX_ERROR_CHARS])
        try:
            reply = resp.json()
        except ValueError:
            raise LLMResponseError(f"{self._url} answered 200 with a body that is not JSON "
                                   f"(is base_url the /v1 root of an OpenAI-compatible server?): {snippet!r}") from None
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise LLMResponseError(f"{self._url} answered 200 but not with a chat completion "
                                   f"(no choices[0].message.content): {snippet!r}") from None
        if not isinstance(text, str):
            raise LLMResponseError(f"{self._url} answered with no text content (content={self._scrub(repr(text))[:80]}, "
                                   f"finish_reason={choice.get('finish_reason')!r}); the model may have refused")
        usage_raw = reply.get("usage") or {}
        try:
            usage = TokenUsage(int(usage_raw.get("prompt_tokens") or 0), int(usage_raw.get("completion_tokens") or 0))
        except (TypeError, ValueError, AttributeError):
            usage = TokenUsage()
        cfg = self.config
        cost = usage.prompt_tokens / 1000 * cfg.price_in_per_1k + usage.completion_tokens / 1000 * cfg.price_out_per_1k
        self._count(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                    replies_without_usage=int(not usage_raw), estimated_cost=cost)
        log.debug("chat %s: %d prompt + %d completion tokens", key[:12], usage.prompt_tokens, usage.completion_tokens)
        # A reply that quotes the key (an echoing proxy, a debug server) must not carry it into the cache.
        return ChatResult(text=self._scrub(text), usage=usage, cached=False, model=str(reply.get("model") or cfg.model),
                          finish_reason=choice.get("finish_reason"))


def _error_message(resp: httpx.Response) -> str:
    """The server's own words: OpenAI {"error": {"message"}}, vLLM {"message"}, or the raw body."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:_MAX_ERROR_CHARS].strip() or resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:_MAX_ERROR_CHARS]
        if isinstance(err, str):
            return err[:_MAX_ERROR_CHARS]
        if body.get("message"):
            return str(body["message"])[:_MAX_ERROR_CHARS]
    return json.dumps(body)[:_MAX_ERROR_CHARS]


def _hint(status: int) -> str:
    return {401: " (check the key in api_key_env)", 403: " (the key lacks access to this model)",
            404: " (check base_url ends in /v1 and the model name)",
            413: " (the request is too large: fewer or smaller images)"}.get(status, "")


def _retry_after(headers: httpx.Headers, cap: float) -> float | None:
    """Seconds the server asks us to wait: retry-after-ms, else Retry-After (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return min(cap, max(0.0, float(ms) / 1000))
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra is None:
        return None
    try:
        return min(cap, max(0.0, float(ra)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError):
        return None
    return min(cap, max(0.0, when.timestamp() - time.time()))
