"""HTTP routes: chat and text completions (streaming and not), models, health, metrics."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    envelope,
    error_body,
    new_id,
    now,
    usage,
)
from server.api.serving import APIError, Job, ServingState, run_jobs, speculation_stats
from server.engine.async_engine import Reservation

router = APIRouter()

ERRORS = {
    400: "Invalid request: malformed JSON, a wrong type or value, an unsupported parameter, or prompt + "
         "max_tokens beyond the context (code context_length_exceeded)",
    401: "Missing or wrong API key (code invalid_api_key; only when the server has keys)",
    404: "Unknown model (code model_not_found)",
    413: "Request body over --max-request-bytes (code request_too_large)",
    429: "Too many requests in flight (code too_many_requests); see the Retry-After header",
    500: "Generation failed (code request_failed)",
    503: "Engine not running (engine_dead) or the server is shutting down (shutting_down)",
    504: "Not finished within --request-timeout (code request_timeout)",
}


def documented(*statuses: int) -> dict:
    """OpenAPI ``responses=``: the error statuses a route sends, all with the OpenAI error body. The
    ``default`` entry stands for anything else and keeps FastAPI from documenting its 422, which this server
    never sends."""
    out: dict = {s: {"model": ErrorResponse, "description": ERRORS[s]} for s in statuses}
    return out | {"default": {"model": ErrorResponse, "description": "Any other error"}}


GENERATION_ERRORS = documented(400, 401, 404, 413, 429, 500, 503, 504)


def state_of(raw: Request) -> ServingState:
    return raw.app.state.serving


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


@router.get("/health", responses={503: {"description": "The engine thread died, or the server is draining"}})
async def health(raw: Request) -> Response:
    st = state_of(raw)
    status = "engine_dead" if not st.engine.healthy else "draining" if st.admission.draining else "ok"
    return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)


@router.get("/v1/models", responses=documented(401))
async def models(raw: Request) -> dict:
    name = state_of(raw).model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "treespec"}]}


@router.get("/metrics", responses=documented(401))
async def metrics(raw: Request) -> Response:
    return Response(raw.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.post("/v1/chat/completions", responses=GENERATION_ERRORS)
async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
    st = state_of(raw)
    st.check_model(body.model)
    jobs = st.jobs(body, [await st.chat_prompt(body.messages)])
    return await respond(raw, st, body, jobs, chat=True)


@router.post("/v1/completions", responses=GENERATION_ERRORS)
async def completions(body: CompletionRequest, raw: Request) -> Response:
    st = state_of(raw)
    st.check_model(body.model)
    try:
        prompts = body.prompts
    except ValueError as exc:
        raise APIError(400, str(exc), param="prompt") from exc
    jobs = st.jobs(body, await st.completion_prompts(prompts))
    return await respond(raw, st, body, jobs, chat=False)


class ReservedStream(StreamingResponse):
    """A stream that holds its engine reservation until the response is over, however it ends."""

    def __init__(self, content, reservation: Reservation, **kwargs):
        super().__init__(content, **kwargs)
        self.reservation = reservation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.reservation.release()


async def respond(raw: Request, st: ServingState, body, jobs: list[Job], chat: bool) -> Response:
    rid = new_id("chatcmpl" if chat else "cmpl")
    reservation = st.admission.admit(len(jobs))
    if body.stream:
        return ReservedStream(stream(st, body, jobs, rid, chat), reservation, media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        return await complete(raw, st, body, jobs, rid, chat)
    finally:
        reservation.release()


async def complete(raw: Request, st: ServingState, body, jobs: list[Job], rid: str, chat: bool) -> Response:
    """The whole (non-streamed) response; 499 if the client leaves first."""
    texts = {j.index: "" for j in jobs}
    finals: dict = {}

    async def consume() -> None:
        async for index, out in run_jobs(st.engine, rid, jobs, st.request_timeout):
            texts[index] += out.text
            if out.finished:
                finals[index] = out

    task = asyncio.create_task(consume())
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        if not task.done() and await raw.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return Response(status_code=499)
    task.result()
    choices = []
    for j in jobs:
        out = finals[j.index]
        content = ({"message": {"role": "assistant", "content": texts[j.index]}} if chat
                   else {"text": texts[j.index]})
        choices.append({"index": j.index, **content, "logprobs": None, "finish_reason": out.finish_reason})
    return JSONResponse(envelope("chat.completion" if chat else "text_completion", rid, st.model_name, now(),
                                 choices, total_usage(jobs, finals, body.n)))


def total_usage(jobs: list[Job], finals: dict, n: int) -> dict:
    """Usage over all choices; each prompt is counted once, not once per choice."""
    prompt_tokens = sum(len(j.prompt_ids) for j in jobs if j.index % n == 0)
    cached = sum(finals[j.index].num_cached_tokens for j in jobs if j.index % n == 0 and j.index in finals)
    outs = list(finals.values())
    spec = {k: sum(o[k] for o in map(speculation_stats, outs)) for k in
            ("verify_steps", "drafted_tokens", "accepted_tokens")}
    steps = spec["verify_steps"]
    spec["mean_acceptance_length"] = round((spec["accepted_tokens"] + steps) / steps, 4) if steps else 0.0
    return usage(prompt_tokens, sum(o.num_output_tokens for o in outs), spec, cached)


async def stream(st: ServingState, body, jobs: list[Job], rid: str, chat: bool) -> AsyncIterator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"
    created = now()

    def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return sse(envelope(kind, rid, st.model_name, created, [choice]))

    finals: dict = {}
    try:
        if chat:
            for j in jobs:
                yield chunk(j.index, None, None, role=True)
        async for index, out in run_jobs(st.engine, rid, jobs, st.request_timeout):
            if out.text:
                yield chunk(index, out.text, None)
            if out.finished:
                finals[index] = out
                yield chunk(index, None, out.finish_reason)
        if body.include_usage:
            yield sse(envelope(kind, rid, st.model_name, created, [], total_usage(jobs, finals, body.n)))
    except APIError as exc:  # timeout, shutdown
        yield sse(exc.body)
    except Exception as exc:  # noqa: BLE001 - engine failure mid-stream: tell the client, then end the stream
        yield sse(error_body(f"generation failed: {exc}", "server_error", code="internal_error"))
    yield sse("[DONE]")
