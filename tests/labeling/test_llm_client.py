"""OpenAIChatClient against a loopback chat-completions server.

These tests check the PROTOCOL, not a model: the server (tests/labeling/loopback.py) runs on
127.0.0.1 inside the test, answers with canned chat.completion objects and error statuses, and
records what the client sent. They cover the request shape, retries and backoff, timeouts,
malformed replies, the cache, the concurrency limit, accounting, and that the API key never leaks.
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import socket
import threading
import time
import traceback
from pathlib import Path

import httpx
import pytest

from sae_cxr.labeling.llm_client import (
    LLMConfig,
    LLMConfigError,
    LLMConnectionError,
    LLMHTTPError,
    LLMResponseError,
    LLMTimeoutError,
    OpenAIChatClient,
    _retry_after,
    image_part,
    png_data_url,
    text_part,
)
from tests.labeling.loopback import ChatServer, Recorded, Reply, completion, make_png

KEY = "sk-test-PLANTED-7f3a9c1e5b2d4f60"


@pytest.fixture(autouse=True)
def _api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAE_CXR_TEST_KEY", KEY)


def make_client(server: ChatServer, **overrides) -> OpenAIChatClient:
    fields = dict(base_url=server.base_url, model="tiny-test", api_key_env="SAE_CXR_TEST_KEY", timeout_s=5.0,
                  max_retries=3, backoff_base_s=0.01, backoff_max_s=0.05)
    fields.update(overrides)
    return OpenAIChatClient(LLMConfig(**fields))


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_request_shape(server: ChatServer) -> None:
    png = make_png()
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [text_part("what is this?"), image_part(png)]}]
    server.queue(Reply(body=completion("a red square", prompt_tokens=12, completion_tokens=3)))
    with make_client(server, temperature=0.3, max_tokens=77, extra_headers={"X-Org": "lab"}) as client:
        result = client.chat(messages, response_format={"type": "json_object"})

    assert result.text == "a red square" and result.cached is False
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (12, 3)
    [req] = server.requests
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.headers["content-type"] == "application/json"
    assert req.headers["x-org"] == "lab"
    body = req.body
    assert body["model"] == "tiny-test"
    assert body["temperature"] == 0.3 and body["max_tokens"] == 77
    assert body["response_format"] == {"type": "json_object"}
    assert body["messages"] == messages
    url = body["messages"][1]["content"][1]["image_url"]["url"]
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    assert base64.b64decode(url[len(prefix):]) == png


def test_png_data_url_refuses_non_png() -> None:
    with pytest.raises(ValueError, match="not a PNG"):
        png_data_url(b"\xff\xd8\xff\xe0 a jpeg")


def test_no_key_sends_no_authorization(server: ChatServer) -> None:
    with make_client(server, api_key_env="") as client:
        client.chat(user("hi"))
    assert "authorization" not in server.requests[0].headers


def test_retries_429_and_503_honour_retry_after(server: ChatServer) -> None:
    server.queue(Reply(429, {"error": {"message": "rate limited"}}, {"Retry-After": "2"}),
                 Reply(503, {"error": {"message": "loading"}}, {"retry-after-ms": "250"}),
                 Reply(body=completion("finally")))
    client = make_client(server)
    waits: list[float] = []
    client._sleep = waits.append  # record the waits instead of sleeping through them
    result = client.chat(user("hi"))
    assert result.text == "finally"
    assert waits == [2.0, 0.25]
    assert len(server.requests) == 3
    acc = client.accounting
    assert (acc.calls, acc.requests, acc.retries, acc.failures) == (1, 3, 2, 0)


def test_backoff_without_retry_after_is_exponential_with_jitter(server: ChatServer) -> None:
    server.queue(Reply(500, "boom"), Reply(502, "bad gateway"), Reply(504, "timeout"), Reply(body=completion("ok")))
    client = make_client(server, backoff_base_s=1.0, backoff_max_s=3.0, backoff_jitter=0.5)
    waits: list[float] = []
    client._sleep = waits.append
    assert client.chat(user("hi")).text == "ok"
    # attempt k waits min(max, base * 2**k) scaled by a factor in [1 - jitter, 1]
    for wait, nominal in zip(waits, [1.0, 2.0, 3.0], strict=True):
        assert nominal * 0.5 <= wait <= nominal


def test_retry_after_as_http_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    wait = _retry_after(httpx.Headers({"Retry-After": when}), cap=120)
    assert wait is not None and 25 <= wait <= 31
    assert _retry_after(httpx.Headers({"Retry-After": "999"}), cap=60) == 60


def test_real_sleep_backoff_then_success(server: ChatServer) -> None:
    server.queue(Reply(503, "warming up"), Reply(body=completion("up")))
    t0 = time.monotonic()
    with make_client(server, backoff_base_s=0.05, backoff_jitter=0.0) as client:
        assert client.chat(user("hi")).text == "up"
    assert 0.05 <= time.monotonic() - t0 < 2.0


def test_no_retry_on_400(server: ChatServer) -> None:
    server.queue(Reply(400, {"error": {"message": "image_url must be a data URL", "type": "invalid_request_error"}}))
    client = make_client(server)
    with pytest.raises(LLMHTTPError) as info:
        client.chat(user("hi"))
    assert info.value.status == 400
    assert "HTTP 400" in str(info.value) and "image_url must be a data URL" in str(info.value)
    assert len(server.requests) == 1
    assert client.accounting.failures == 1 and client.accounting.retries == 0


def test_vllm_style_error_body_and_404_hint(server: ChatServer) -> None:
    server.queue(Reply(404, {"object": "error", "message": "The model `nope` does not exist."}))
    with pytest.raises(LLMHTTPError, match=r"HTTP 404: The model `nope` does not exist\..*model name"):
        make_client(server).chat(user("hi"))


def test_retries_exhausted(server: ChatServer) -> None:
    server.responder = lambda req: Reply(503, {"error": {"message": "overloaded"}})
    with pytest.raises(LLMHTTPError, match=r"after 3 attempt\(s\): HTTP 503: overloaded"):
        make_client(server, max_retries=2).chat(user("hi"))
    assert len(server.requests) == 3


def test_timeout(server: ChatServer) -> None:
    server.responder = lambda req: Reply(body=completion("too late"), delay=1.5)
    t0 = time.monotonic()
    with pytest.raises(LLMTimeoutError, match=r"timed out after 0.2 s .* on all 2 attempt\(s\)"):
        make_client(server, timeout_s=0.2, max_retries=1).chat(user("hi"))
    assert time.monotonic() - t0 < 1.4  # gave up on its own timeout, not the server's delay
    assert len(server.requests) == 2


def test_timeout_then_success(server: ChatServer) -> None:
    server.queue(Reply(body=completion("slow"), delay=1.0), Reply(body=completion("fast")))
    client = make_client(server, timeout_s=0.2, max_retries=2)
    assert client.chat(user("hi")).text == "fast"
    assert client.accounting.retries == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_error() -> None:
    config = LLMConfig(base_url=f"http://127.0.0.1:{_closed_port()}/v1", model="m", api_key_env="SAE_CXR_TEST_KEY",
                       max_retries=1, backoff_base_s=0.01, timeout_s=1.0)
    client = OpenAIChatClient(config)
    with pytest.raises(LLMConnectionError, match=r"cannot reach .* on all 2 attempt\(s\); is the server running"):
        client.chat(user("hi"))
    assert client.accounting.requests == 2


@pytest.mark.parametrize("body, message", [
    ("<html>502 from a proxy</html>", "not JSON"),
    ({"id": "x", "object": "list", "data": []}, r"no choices\[0\]\.message\.content"),
    ({"choices": [{"message": {"role": "assistant", "content": None}, "finish_reason": "content_filter"}]},
     "no text content"),
])
def test_malformed_replies_are_clear_errors(server: ChatServer, body, message: str) -> None:
    server.queue(Reply(200, body))
    client = make_client(server)
    with pytest.raises(LLMResponseError, match=message):
        client.chat(user("hi"))
    assert len(server.requests) == 1  # a malformed 200 is not retried


def test_cache_hits_cost_no_request(server: ChatServer, tmp_path: Path) -> None:
    server.queue(Reply(body=completion("first")), Reply(body=completion("second")))
    cache = tmp_path / "cache"
    client = make_client(server, cache_dir=str(cache))
    a = client.chat(user("hi"))
    b = client.chat(user("hi"))
    assert (a.text, a.cached, b.text, b.cached) == ("first", False, "first", True)
    assert len(server.requests) == 1
    # a different parameter is a different request
    assert client.chat(user("hi"), response_format={"type": "json_object"}).text == "second"
    assert len(server.requests) == 2
    acc = client.accounting
    assert (acc.calls, acc.requests, acc.cache_hits) == (3, 2, 1)
    # a rerun (a new client on the same folder) costs nothing
    rerun = make_client(server, cache_dir=str(cache))
    assert rerun.chat(user("hi")).cached is True
    assert len(server.requests) == 2 and rerun.accounting.requests == 0
    assert not list(cache.rglob("*.tmp"))  # atomic writes leave no temporary files


def test_corrupt_cache_entry_is_a_miss(server: ChatServer, tmp_path: Path) -> None:
    client = make_client(server, cache_dir=str(tmp_path))
    client.chat(user("hi"))
    [entry] = tmp_path.rglob("*.json")
    entry.write_text("{truncated")
    result = client.chat(user("hi"))
    assert result.cached is False and len(server.requests) == 2
    assert json.loads(entry.read_text())["text"] == "ok"


def test_chat_many_honours_concurrency_and_order(server: ChatServer) -> None:
    def echo_slowly(req: Recorded) -> Reply:
        return Reply(body=completion("echo " + req.body["messages"][-1]["content"]), delay=0.15)

    server.responder = echo_slowly
    client = make_client(server, concurrency=2)
    results = client.chat_many([user(f"q{i}") for i in range(6)])
    assert [r.text for r in results] == [f"echo q{i}" for i in range(6)]
    assert server.max_in_flight == 2  # parallel, but never more than the limit


def test_concurrency_limit_holds_across_caller_threads(server: ChatServer) -> None:
    server.responder = lambda req: Reply(body=completion("ok"), delay=0.1)
    client = make_client(server, concurrency=3)
    threads = [threading.Thread(target=client.chat, args=(user(f"t{i}"),)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(server.requests) == 8
    assert server.max_in_flight <= 3


def test_chat_many_return_exceptions(server: ChatServer) -> None:
    def fail_on_bad(req: Recorded) -> Reply:
        if req.body["messages"][-1]["content"] == "bad":
            return Reply(400, {"error": {"message": "nope"}})
        return Reply(body=completion("fine"))

    server.responder = fail_on_bad
    client = make_client(server, concurrency=2)
    out = client.chat_many([user("a"), user("bad"), user("c")], return_exceptions=True)
    assert out[0].text == "fine" and out[2].text == "fine"
    assert isinstance(out[1], LLMHTTPError) and out[1].status == 400
    with pytest.raises(LLMHTTPError):
        client.chat_many([user("a"), user("bad")])


def test_accounting_numbers_and_json(server: ChatServer, tmp_path: Path) -> None:
    server.queue(Reply(body=completion("a", prompt_tokens=100, completion_tokens=20)),
                 Reply(429, "slow down", {"Retry-After": "0"}),
                 Reply(body=completion("b", prompt_tokens=300, completion_tokens=50)),
                 Reply(body=completion("c", prompt_tokens=None)))
    client = make_client(server, price_in_per_1k=0.5, price_out_per_1k=2.0, cache_dir=str(tmp_path / "cache"))
    client.chat(user("1"))
    client.chat(user("2"))
    client.chat(user("3"))
    client.chat(user("1"))  # cache hit: no tokens, no cost
    acc = client.accounting
    assert (acc.calls, acc.requests, acc.retries, acc.cache_hits, acc.failures) == (4, 4, 1, 1, 0)
    assert (acc.prompt_tokens, acc.completion_tokens, acc.replies_without_usage) == (400, 70, 1)
    # (400 * 0.5 + 70 * 2.0) / 1000 = (200 + 140) / 1000
    assert acc.estimated_cost == pytest.approx(0.34)
    path = tmp_path / "run" / "labeling" / "lmm_accounting.json"
    acc.save(path)
    saved = json.loads(path.read_text())
    assert saved == acc.to_dict() and saved["model"] == "tiny-test"


def test_config_refuses_secrets_and_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LLMConfigError, match="api_key_env"):
        LLMConfig(model="m", extra_headers={"Authorization": "Bearer x"})
    with pytest.raises(LLMConfigError, match="http:// or https://"):
        LLMConfig(base_url="127.0.0.1:8000/v1", model="m")
    with pytest.raises(LLMConfigError, match="model is empty"):
        OpenAIChatClient(LLMConfig(api_key_env=""))
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(LLMConfigError, match="NO_SUCH_KEY_VAR is not set"):
        OpenAIChatClient(LLMConfig(model="m", api_key_env="NO_SUCH_KEY_VAR"))


def test_key_is_stripped_and_checked_without_echoing_it(monkeypatch: pytest.MonkeyPatch, server: ChatServer) -> None:
    monkeypatch.setenv("SAE_CXR_TEST_KEY", KEY + "\n")  # as `export KEY=$(cat key.txt)` can leave it
    with make_client(server) as client:
        client.chat(user("hi"))
    assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"
    monkeypatch.setenv("SAE_CXR_TEST_KEY", "sk-BAD\u00e9KEY-secret")
    with pytest.raises(LLMConfigError) as info:
        make_client(server)
    assert "secret" not in str(info.value) and "SAE_CXR_TEST_KEY" in str(info.value)


def test_key_never_leaks(server: ChatServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Plant a key, make the server echo it in every way it can, and grep all the client produced."""
    caplog.set_level(logging.DEBUG)  # root: also httpx's and httpcore's debug logs

    seen: dict[str, int] = {}

    def echo_auth(req: Recorded) -> Reply:
        echoed = f"your header was {req.headers.get('authorization')}"
        text = req.body["messages"][-1]["content"]
        seen[text] = seen.get(text, 0) + 1
        if text == "retry-then-400":  # a retried 503 (logged), then a 400 (raised)
            return Reply(503 if seen[text] == 1 else 400, {"error": {"message": echoed}})
        if text == "401":
            return Reply(401, {"error": {"message": f"Incorrect API key provided: {KEY}"}})
        if text == "garbage":
            return Reply(200, f"<html>{echoed}</html>")
        if text == "echo":  # a 200 whose reply quotes the header: it gets cached
            return Reply(body=completion(echoed))
        if text == "slow":
            return Reply(body=completion(echoed), delay=1.0)
        return Reply(body=completion("fine", prompt_tokens=5, completion_tokens=1))

    server.responder = echo_auth
    cache = tmp_path / "cache"
    client = make_client(server, cache_dir=str(cache), max_retries=1)
    client.chat(user("ok"))
    client.chat(user("ok"))  # cache hit
    assert client.chat(user("echo")).text == "your header was Bearer ***"
    errors: list[BaseException] = []
    for text in ("retry-then-400", "401", "garbage"):
        with pytest.raises(LLMHTTPError if text != "garbage" else LLMResponseError) as info:
            client.chat(user(text))
        errors.append(info.value)
    with pytest.raises(LLMTimeoutError) as info:
        make_client(server, timeout_s=0.2, max_retries=0).chat(user("slow"))
    errors.append(info.value)
    dead = OpenAIChatClient(LLMConfig(base_url=f"http://127.0.0.1:{_closed_port()}/v1", model="m",
                                      api_key_env="SAE_CXR_TEST_KEY", max_retries=0))
    with pytest.raises(LLMConnectionError) as info:
        dead.chat(user("hi"))
    errors.append(info.value)
    acc_path = tmp_path / "accounting.json"
    client.accounting.save(acc_path)

    # positive control: the key did travel in the header
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in server.requests)
    produced = [caplog.text, repr(client), repr(client.config), repr(dead), acc_path.read_text()]
    produced += [p.read_text() for p in cache.rglob("*") if p.is_file()]
    for e in errors:
        produced += [str(e), repr(e), "".join(traceback.format_exception(e))]
        # httpx exceptions hold the request and so the header: none may ride along as cause/context
        chained = e.__cause__ or e.__context__
        while chained is not None:
            assert not isinstance(chained, (httpx.HTTPError, httpx.InvalidURL)), repr(chained)
            chained = chained.__cause__ or chained.__context__
        if isinstance(e, LLMHTTPError):
            produced.append(e.server_message)
    assert caplog.records, "the client logged nothing, so the log check would be vacuous"
    leaks = [text[:120] for text in produced if KEY in text]
    assert not leaks
    assert any("***" in str(e) for e in errors)  # the server echoed the key and the client masked it
