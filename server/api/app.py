"""FastAPI app factory (lifespan runs the engine thread; errors become OpenAI error bodies) and the uvicorn
server that drains before it shuts down."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from contextlib import asynccontextmanager
from types import FrameType

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.admission import Admission
from server.api.middleware import ApiKeyAuth, BodyLimit
from server.api.protocol import error_body
from server.api.routes import router
from server.api.serving import APIError, ServingState
from server.config import ServerConfig
from server.engine.async_engine import AsyncEngine, EngineDeadError, RequestFailed
from server.engine.llm_engine import LLMEngine
from server.metrics import Metrics

log = logging.getLogger(__name__)


TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def is_field(part: str) -> bool:
    """Pydantic loc parts that name a field or index (not a union member tag like ``list[int]``)."""
    return part.isdigit() or (part.isidentifier() and part not in TYPE_TAGS)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """First validation error as (message, param)."""
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        return f"Invalid JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    loc = [str(p) for p in err.get("loc", ()) if p != "body" and is_field(str(p))]
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    if not loc:
        return ("Request body is missing or not a JSON object" if err.get("type") == "missing" else msg), None
    param = ".".join(loc)
    return f"'{param}': {msg}", param


def create_app(llm: LLMEngine, model_name: str, cfg: ServerConfig | None = None) -> FastAPI:
    """The app serving ``llm``; ``cfg`` gives the front end's settings (API keys, limits, timeouts)."""
    cfg = cfg or ServerConfig()
    metrics = Metrics(model_name, llm.scheduler)
    waiting = cfg.max_waiting_requests
    max_in_flight = llm.scheduler.config.max_num_seqs + waiting if waiting else 0  # 0: no limit
    engine = AsyncEngine(llm, on_stats=metrics.observe, max_in_flight=max_in_flight)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="treespec", lifespan=lifespan)
    app.state.serving = ServingState(engine, model_name, llm.tokenizer, Admission(engine),
                                     cfg.request_timeout)
    app.state.metrics = metrics
    app.include_router(router)
    if cfg.max_request_bytes:
        app.add_middleware(BodyLimit, max_bytes=cfg.max_request_bytes)
    keys = cfg.api_keys()
    if keys:  # added last: runs first, so an unauthenticated body is never read
        app.add_middleware(ApiKeyAuth, keys=keys, protect_metrics=cfg.protect_metrics)
    log.info("API keys: %s", f"{len(keys)} (required on /v1/*)" if keys else "none (the API is open)")

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(RequestFailed)
    async def failed(_: Request, exc: RequestFailed):
        return JSONResponse(error_body(f"generation failed: {exc}", "server_error", code="request_failed"),
                            status_code=500)

    @app.exception_handler(EngineDeadError)
    async def dead(_: Request, exc: EngineDeadError):
        return JSONResponse(error_body(str(exc), "server_error", code="engine_dead"), status_code=503)

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {exc}", "server_error", code="internal_error"),
                            status_code=500)

    return app


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains first: ``drain()`` runs while the server still answers
    (new requests 503, ``/health`` 503), then uvicorn's own graceful shutdown follows. A second signal is
    uvicorn's (it stops waiting for the drain)."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Coroutine]):
        super().__init__(config)
        self.drain = drain
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drain_future: asyncio.Future | None = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.loop is None or self.drain_future is not None:
            super().handle_exit(sig, frame)
            return
        self.drain_future = asyncio.run_coroutine_threadsafe(self.drain_then_exit(sig), self.loop)

    async def drain_then_exit(self, sig: int) -> None:
        """After the drain uvicorn shuts down without re-raising ``sig``: a clean drain exits with status 0."""
        try:
            await self.drain()
        finally:
            self.should_exit = True
