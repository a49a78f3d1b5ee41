"""Limits in front of the routes: the request body size and which other origins may call the API (CORS).

- :class:`BodyLimit`: a body larger than ``serve.max_body_bytes`` gets 413 before any route reads it:
  at once when its ``Content-Length`` says so, else (a chunked body) as soon as the bytes received pass
  the limit; memory stays bounded by the limit.
- :func:`install_limits`: the body limit, and CORS for the origins of ``serve.cors_allow_origins``
  (none by default: browsers then let only pages of the API's own origin, such as its viewer, read
  its answers).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from vectorgeo.api.errors import error_response
from vectorgeo.api.settings import ServeSettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: 413 ``too_large`` for a request body over ``max_bytes``.

    Args:
        app: The wrapped application.
        max_bytes: The largest body passed on.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await self._refuse(scope, receive, send, length.decode("latin-1"))
                return
            await self.app(scope, receive, send)
            return
        # no length declared (chunked): read the body here, up to the limit, then replay it
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, f"more than {self.max_bytes}")
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        resp = error_response(
            413,
            "too_large",
            f"request body: {size} bytes; at most {self.max_bytes} are accepted (serve.max_body_bytes)",
            "body",
        )
        resp.headers["Connection"] = "close"  # the rest of the body is not read
        await resp(scope, receive, send)


def install_limits(app: FastAPI, serve: ServeSettings) -> None:
    """Add the body limit and, when origins are configured, CORS (outermost, so that errors carry it too)."""
    app.add_middleware(BodyLimit, max_bytes=serve.max_body_bytes)
    if serve.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(serve.cors_allow_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type"],
            max_age=600,
        )
