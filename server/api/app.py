"""FastAPI app factory: lifespan runs the engine thread; errors become OpenAI error bodies."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.protocol import error_body
from server.api.routes import router
from server.api.serving import APIError, ServingState
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


def create_app(llm: LLMEngine, model_name: str) -> FastAPI:
    metrics = Metrics(model_name, llm.scheduler)
    engine = AsyncEngine(llm, on_stats=metrics.observe)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="treespec", lifespan=lifespan)
    app.state.serving = ServingState(engine, model_name, llm.tokenizer)
    app.state.metrics = metrics
    app.include_router(router)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

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
