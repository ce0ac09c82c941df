"""HTTP routes: chat and text completions (streaming and not), models, health, metrics."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    envelope,
    error_body,
    new_id,
    now,
    usage,
)
from server.api.serving import APIError, Job, ServingState, run_jobs, speculation_stats

router = APIRouter()


def state_of(raw: Request) -> ServingState:
    return raw.app.state.serving


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


@router.get("/health")
async def health(raw: Request) -> Response:
    ok = state_of(raw).engine.healthy
    return JSONResponse({"status": "ok" if ok else "engine_dead"}, status_code=200 if ok else 503)


@router.get("/v1/models")
async def models(raw: Request) -> dict:
    name = state_of(raw).model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "treespec"}]}


@router.get("/metrics")
async def metrics(raw: Request) -> Response:
    return Response(raw.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
    st = state_of(raw)
    st.check_model(body.model)
    jobs = st.jobs(body, [st.render_chat(body.messages)])
    return await respond(raw, st, body, jobs, chat=True)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, raw: Request) -> Response:
    st = state_of(raw)
    st.check_model(body.model)
    try:
        prompts = body.prompts
    except ValueError as exc:
        raise APIError(400, str(exc), param="prompt") from exc
    jobs = st.jobs(body, [st.encode_prompt(p) for p in prompts])
    return await respond(raw, st, body, jobs, chat=False)


async def respond(raw: Request, st: ServingState, body, jobs: list[Job], chat: bool) -> Response:
    rid = new_id("chatcmpl" if chat else "cmpl")
    if body.stream:
        return StreamingResponse(stream(st, body, jobs, rid, chat), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    texts = {j.index: "" for j in jobs}
    finals: dict = {}

    async def consume() -> None:
        async for index, out in run_jobs(st.engine, rid, jobs):
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
    outs = list(finals.values())
    spec = {k: sum(o[k] for o in map(speculation_stats, outs)) for k in
            ("verify_steps", "drafted_tokens", "accepted_tokens")}
    steps = spec["verify_steps"]
    spec["mean_acceptance_length"] = round((spec["accepted_tokens"] + steps) / steps, 4) if steps else 0.0
    return usage(prompt_tokens, sum(o.num_output_tokens for o in outs), spec)


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
        async for index, out in run_jobs(st.engine, rid, jobs):
            if out.text:
                yield chunk(index, out.text, None)
            if out.finished:
                finals[index] = out
                yield chunk(index, None, out.finish_reason)
        if body.include_usage:
            yield sse(envelope(kind, rid, st.model_name, created, [], total_usage(jobs, finals, body.n)))
    except Exception as exc:  # engine failure mid-stream: tell the client, then end the stream
        yield sse(error_body(f"generation failed: {exc}", "server_error", code="internal_error"))
    yield sse("[DONE]")
