"""ASGI middleware that runs before any routing or parsing: API keys (401) and the body-size limit (413)."""

from __future__ import annotations

import hashlib
import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.protocol import error_body


def header(scope: Scope, name: bytes) -> bytes | None:
    return next((v for k, v in scope["headers"] if k == name), None)


async def reject(scope: Scope, receive: Receive, send: Send, status: int, body: dict,
                 headers: dict[str, str] | None = None) -> None:
    await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)


class ApiKeyAuth:
    """Every ``/v1/*`` path (and ``/metrics`` with ``protect_metrics``) needs ``Authorization: Bearer <key>``.

    The presented key is compared with every configured key, always all of them, by ``hmac.compare_digest``
    over SHA-256 digests (equal lengths), so the time taken does not tell which key or how much of one matched.
    """

    def __init__(self, app: ASGIApp, keys: list[str], protect_metrics: bool = False):
        self.app = app
        self.digests = [hashlib.sha256(k.encode()).digest() for k in keys]
        self.protect_metrics = protect_metrics

    def protects(self, path: str) -> bool:
        return path == "/v1" or path.startswith("/v1/") or (self.protect_metrics and path == "/metrics")

    def authorized(self, scope: Scope) -> bool:
        scheme, _, token = (header(scope, b"authorization") or b"").partition(b" ")
        digest = hashlib.sha256(token.strip()).digest()
        match = False
        for key in self.digests:
            match |= hmac.compare_digest(digest, key)
        return match and scheme.lower() == b"bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.protects(scope["path"]) and not self.authorized(scope):
            body = error_body("Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                              code="invalid_api_key")
            await reject(scope, receive, send, 401, body, {"WWW-Authenticate": "Bearer"})
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Bodies over ``max_bytes`` get a 413 before the app sees them: at once when Content-Length says so,
    else (chunked transfer) as soon as the bytes read pass the limit. The app gets the body replayed from
    memory."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = error_body(f"The request body is larger than {self.max_bytes} bytes (--max-request-bytes).",
                          code="request_too_large")
        await reject(scope, receive, send, 413, body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = header(scope, b"content-length") or b""
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self.too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self.too_large(scope, receive, send)
                return
            more = message.get("more_body", False)
        pending: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)
