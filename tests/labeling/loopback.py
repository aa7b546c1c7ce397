"""A loopback chat-completions server for tests: it speaks the PROTOCOL, it is not a model.

`ChatServer` listens on 127.0.0.1 on a free port and answers `POST /v1/chat/completions` with
scripted replies (status, JSON or raw body, headers, a delay). It records every request (headers
and body) and counts how many are in flight at once. Its request loop is bounded: it stops by
itself after `max_requests` requests or `max_seconds`, whichever comes first, or when closed.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass
class Reply:
    """One scripted answer."""

    status: int = 200
    body: Any = None  # dict/list -> JSON; str/bytes -> sent as is
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to sleep before answering


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: Any  # the parsed JSON body, or the raw text if it was not JSON


def completion(text: str, prompt_tokens: int | None = 10, completion_tokens: int | None = 2,
               model: str = "tiny-test") -> dict[str, Any]:
    """A chat.completion object as OpenAI-compatible servers return it."""
    out: dict[str, Any] = {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": model,
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": text}}]}
    if prompt_tokens is not None:
        out["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + (completion_tokens or 0)}
    return out


class ChatServer:
    """Scripted replies first (in order), then `responder(request)` for everything after."""

    def __init__(self, responder: Callable[[Recorded], Reply] | None = None, *,
                 max_requests: int = 200, max_seconds: float = 30.0):
        self.responder = responder or (lambda req: Reply(body=completion("ok")))
        self.script: deque[Reply] = deque()
        self.requests: list[Recorded] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._max_requests = max_requests
        self._deadline = time.monotonic() + max_seconds
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8")
                try:
                    body: Any = json.loads(raw)
                except ValueError:
                    body = raw
                req = Recorded(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with server._lock:
                    server.requests.append(req)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    reply = server.script.popleft() if server.script else None
                counted = True

                def done() -> None:
                    # leave the in-flight count BEFORE answering: once the reply is on the wire the
                    # client may send its next request, which must not find this one still counted
                    nonlocal counted
                    if counted:
                        with server._lock:
                            server.in_flight -= 1
                        counted = False

                try:
                    reply = reply or server.responder(req)
                    if reply.delay:
                        time.sleep(reply.delay)
                    done()
                    payload = reply.body
                    data = (json.dumps(payload).encode() if isinstance(payload, (dict, list))
                            else payload.encode() if isinstance(payload, str) else payload or b"")
                    self.send_response(reply.status)
                    ctype = "application/json" if isinstance(payload, (dict, list)) else "text/plain"
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test): nothing to answer
                finally:
                    done()

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._httpd.timeout = 0.05
        self.port = self._httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self._loop, name="loopback-chat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (not self._stop.is_set() and len(self.requests) < self._max_requests
               and time.monotonic() < self._deadline):
            self._httpd.handle_request()

    def queue(self, *replies: Reply) -> None:
        with self._lock:
            self.script.extend(replies)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._httpd.server_close()

    def __enter__(self) -> "ChatServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_png(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 6)) -> bytes:
    """A small solid-colour PNG (the colour lets a responder tell images apart)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()
