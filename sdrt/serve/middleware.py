"""ASGI middleware of the server: bearer-token auth, the request body limit, and request latency."""
from __future__ import annotations

import json
import secrets
import time
from typing import Any, Callable, Optional

from starlette.exceptions import HTTPException

from sdrt.serve.openai_api import error_body

Scope, Receive, Send = dict, Callable, Callable
OPENAI_PREFIX = "/v1/"


def error_payload(path: str, status: int, message: str) -> dict[str, Any]:
    """An error in the shape the path's clients parse: OpenAI's for /v1/, FastAPI's (`detail`) elsewhere."""
    if path.startswith(OPENAI_PREFIX):
        kind = {401: "authentication_error", 413: "invalid_request_error", 422: "invalid_request_error"}
        return error_body(message, kind=kind.get(status, "server_error"))
    return {"detail": message}


async def send_json(send: Send, status: int, payload: dict, headers: Optional[dict[str, str]] = None) -> None:
    body = json.dumps(payload).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class BearerAuth:
    """With an API key, every path but the open ones needs `Authorization: Bearer <key>` (else 401)."""

    def __init__(self, app, api_key: Optional[str], open_paths: tuple[str, ...] = ("/health",),
                 on_reject: Callable[[], None] = lambda: None):
        self.app, self.open_paths, self.on_reject = app, open_paths, on_reject
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.expected is None or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if secrets.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        self.on_reject()
        message = "a valid API key is required: Authorization: Bearer <key>"
        await send_json(send, 401, error_payload(scope["path"], 401, message), {"WWW-Authenticate": "Bearer"})


class BodyLimit:
    """Refuses (413) a request body over `max_bytes`: at once by its Content-Length, else while it streams."""

    def __init__(self, app, max_bytes: int, on_reject: Callable[[], None] = lambda: None):
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is over the server's {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            self.on_reject()
            return await send_json(send, 413, error_payload(scope["path"], 413, message))
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            event = await receive()
            seen += len(event.get("body", b""))
            if seen > self.max_bytes:
                self.on_reject()
                raise HTTPException(413, message)  # FastAPI passes an HTTPException from body reading through
            return event

        await self.app(scope, counted, send)


class Latency:
    """Observes each request's seconds under its path, for the paths in `paths`."""

    def __init__(self, app, observe: Callable[[str, float], None], paths: tuple[str, ...]):
        self.app, self.observe, self.paths = app, observe, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        started = time.monotonic()
        try:
            await self.app(scope, receive, send)
        finally:
            self.observe(scope["path"], time.monotonic() - started)
