"""Shared request handling: prompt rendering, validation into engine jobs, fan-in of n choices."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from server.api.protocol import ChatMessage, SamplingRequest, error_body
from server.engine.async_engine import AsyncEngine
from server.engine.llm_engine import RequestTooLong
from server.engine.outputs import RequestOutput
from server.engine.request import SamplingParams

if TYPE_CHECKING:
    from server.api.admission import Admission

T = TypeVar("T")
TOKENIZER_THREADS = 4


class APIError(Exception):
    """A user-facing error rendered as an OpenAI error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    @property
    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


@dataclass
class Job:
    """One choice: a prompt and its sampling parameters."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class ServingState:
    engine: AsyncEngine
    model_name: str
    tokenizer: object
    admission: Admission
    request_timeout: float | None = None  # seconds; None: no limit
    # Tokenizer calls run in worker threads (the event loop stays free for /health and the streams), this many
    # at once.
    tokenizer_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(TOKENIZER_THREADS))

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                           param="model", code="model_not_found")

    async def off_loop(self, fn: Callable[[], T]) -> T:
        """``fn()`` in a worker thread (at most ``TOKENIZER_THREADS`` at once)."""
        async with self.tokenizer_slots:
            return await asyncio.to_thread(fn)

    async def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        return await self.off_loop(lambda: self.render_chat(messages))

    async def completion_prompts(self, prompts: list[str | list[int]]) -> list[list[int]]:
        return await self.off_loop(lambda: [self.encode_prompt(p) for p in prompts])

    def render_chat(self, messages: list[ChatMessage]) -> list[int]:
        convo = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # template errors are caused by the messages
            raise APIError(400, f"could not apply the chat template: {exc}", param="messages") from exc
        return self.encode_text(text, "messages")

    def encode_text(self, text: str, param: str) -> list[int]:
        """Token ids of ``text``; text that is not valid Unicode (a lone surrogate such as ``\\ud800``) is a 400."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise APIError(400, f"the text cannot be encoded as UTF-8 ({exc.reason} at position {exc.start})",
                           param=param) from exc
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.encode_text(prompt, "prompt")
        vocab = len(self.tokenizer)
        if any(t < 0 or t >= vocab for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return list(prompt)

    def jobs(self, req: SamplingRequest, prompts: list[list[int]]) -> list[Job]:
        """Validate lengths and build one job per (prompt, choice)."""
        try:
            stop = req.stop_list
        except ValueError as exc:
            raise APIError(400, str(exc), param="stop") from exc
        llm = self.engine.engine
        spec = self.speculation(req)
        jobs = []
        for p_idx, ids in enumerate(prompts):
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt")
            max_tokens = req.token_limit or max(1, llm.max_new_tokens(len(ids)))  # default: what fits
            try:
                llm.check_length(len(ids), max_tokens)
            except RequestTooLong as exc:
                raise APIError(400, str(exc), param="max_tokens", code="context_length_exceeded") from exc
            for i in range(req.n):
                seed = None if req.seed is None else (req.seed + i) % 2**63
                params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                        top_k=max(req.top_k, 0), seed=seed, stop=stop, **spec)
                jobs.append(Job(p_idx * req.n + i, ids, params))
        return jobs


    def speculation(self, req: SamplingRequest) -> dict:
        """Per-request tree overrides as SamplingParams fields; 400 if the server cannot honour them."""
        opts = req.speculation
        if opts is None:
            return {}
        limit = self.engine.engine.scheduler.config.num_lookahead_slots
        if limit == 0 and (opts.total_tokens or opts.depth or opts.top_k):
            raise APIError(400, "this server runs without a drafter; 'speculation' can only disable drafting "
                                "(total_tokens: 0)", param="speculation")
        if opts.total_tokens is not None and opts.total_tokens > limit:
            raise APIError(400, f"speculation.total_tokens must be <= {limit} (the server's --max-draft-tokens)",
                           param="speculation.total_tokens")
        drafter = self.engine.engine.runner.drafter
        shape = drafter.tree_shape() if drafter is not None else None
        for name, value, server_max, flag in (("depth", opts.depth, shape and shape[0], "--draft-depth"),
                                              ("top_k", opts.top_k, shape and shape[1], "--draft-top-k")):
            if value is not None and (server_max is None or value > server_max):
                bound = f"<= {server_max} (the server's {flag})" if server_max else "unset (this drafter has no trees)"
                raise APIError(400, f"speculation.{name} must be {bound}", param=f"speculation.{name}")
        if opts.task is not None and (drafter is None or drafter.name != "swift"):
            raise APIError(400, "speculation.task names a skip-set task of the swift drafter; this server runs "
                                f"{drafter.name if drafter else 'no drafter'}", param="speculation.task")
        return {"draft_tokens": opts.total_tokens, "draft_depth": opts.depth, "draft_top_k": opts.top_k,
                "task": opts.task}


async def run_jobs(engine: AsyncEngine, base_id: str, jobs: list[Job], timeout: float | None = None
                   ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Run all choices concurrently and yield ``(choice index, output delta)`` as they arrive.

    Closing the iterator (client gone, error, ``timeout`` seconds passed: a 504 ``APIError``) cancels every
    choice, which aborts it in the engine.
    """
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout

    async def pump(job: Job) -> None:
        try:
            async for out in engine.generate(f"{base_id}-{job.index}", job.prompt_ids, job.params):
                queue.put_nowait((job.index, out))
        except Exception as exc:  # noqa: BLE001 - handed to the request's consumer, which reports it
            queue.put_nowait((job.index, exc))

    tasks = [asyncio.create_task(pump(j)) for j in jobs]
    remaining = len(jobs)
    try:
        while remaining:
            wait = None if deadline is None else deadline - loop.time()
            try:
                index, item = await asyncio.wait_for(queue.get(), wait)
            except asyncio.TimeoutError:
                raise APIError(504, f"the request did not finish within {timeout:g} s (--request-timeout)",
                               "timeout_error", code="request_timeout") from None
            if isinstance(item, Exception):
                raise item
            remaining -= item.finished
            yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def speculation_stats(out: RequestOutput) -> dict:
    return {"verify_steps": out.verify_steps, "drafted_tokens": out.drafted_tokens,
            "accepted_tokens": out.accepted_tokens,
            "mean_acceptance_length": round(out.mean_acceptance_length, 4)}
