"""The synchronous engine: scheduler + model runner + detokenizers, one ``step()`` at a time.

Used directly by the benchmark harness and, inside one background thread, by ``AsyncEngine``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.outputs import RequestOutput, RunnerOutput, StepStats
from server.engine.request import Request, SamplingParams
from server.engine.scheduler import Scheduler, SchedulerOutput

log = logging.getLogger(__name__)


class RequestTooLong(ValueError):
    """The prompt plus requested tokens do not fit the context window or the KV pool."""


class LLMEngine:
    def __init__(self, scheduler: Scheduler, runner, tokenizer, max_model_len: int,
                 eos_token_ids: tuple[int, ...]):
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.detok: dict[str, IncrementalDetokenizer] = {}

    def check_length(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise ``RequestTooLong`` unless prompt + max_tokens fits (thread-safe: reads config only)."""
        limit = min(self.max_model_len, self.scheduler.kv.capacity_tokens)
        if num_prompt_tokens + max_tokens > limit:
            raise RequestTooLong(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, "
                f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.")

    def max_new_tokens(self, num_prompt_tokens: int) -> int:
        """Most tokens a prompt this long may generate (<= 0: the prompt alone does not fit)."""
        return min(self.max_model_len, self.scheduler.kv.capacity_tokens) - num_prompt_tokens

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        self.check_length(len(prompt_token_ids), params.max_tokens)
        req = Request(request_id, list(prompt_token_ids), params, self.eos_token_ids)
        self.scheduler.add(req)
        self.detok[request_id] = IncrementalDetokenizer(self.tokenizer, params.stop)
        return req

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.scheduler.abort(request_id)
        if req is None:
            return None
        return self._finish_output(req, [], "")

    def idle_stats(self, **fields) -> StepStats:
        """Stats for an event outside a step (an abort): current occupancy, no tokens."""
        return StepStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                         kv_usage=self.scheduler.kv.pool.usage, num_prompt_tokens=0, num_generation_tokens=0,
                         step_time=0.0, **fields)

    def step(self) -> tuple[list[RequestOutput], StepStats]:
        start = time.monotonic()
        sched = self.scheduler.schedule()
        outputs: list[RequestOutput] = []
        prompt_tokens = gen_tokens = recomputed = 0
        for rid in sched.preempted:
            req = self.scheduler.requests[rid]
            log.warning("preempted request %s (KV pool full): %d tokens will be recomputed (%d preemptions)",
                        rid, len(req.token_ids), req.num_preemptions)
        stats_ttft, stats_itl, stats_e2e, reasons, drafted, accepted = [], [], [], [], [], []
        timings: dict[str, float] = {}
        failed_any = False
        if not sched.empty:
            result, failed = self._execute_isolated(sched)
            failed_any = bool(failed)
            timings = result.timings
            now = time.monotonic()
            for s in sched.scheduled:
                req = s.request
                if req.request_id in failed:
                    self.scheduler.finish(req, "error")
                    reasons.append("error")
                    outputs.append(self._finish_output(req, [], "", error=failed[req.request_id]))
                    continue
                if s.first_chunk and req.num_preemptions == 0:   # prompt tokens the prefix cache served
                    prompt_tokens += req.num_cached_tokens
                lo, hi = req.num_computed_tokens, req.num_computed_tokens + s.num_new_tokens   # positions fed
                prompt_tokens += max(0, min(hi, req.num_prompt_tokens) - max(lo, req.max_computed_tokens))
                recomputed += max(0, min(hi, req.max_computed_tokens) - lo)
                if s.partial:
                    self.scheduler.advance(s)
                    continue
                tokens = self.scheduler.commit(req, result.new_tokens[req.request_id])
                if req.request_id in result.drafted:
                    drafted.append(result.drafted[req.request_id])
                    accepted.append(result.accepted[req.request_id])
                    req.spec.verify_steps += 1
                    req.spec.drafted_tokens += drafted[-1]
                    req.spec.accepted_tokens += accepted[-1]
                gen_tokens += len(tokens)
                if req.first_token_time is None:
                    req.first_token_time = now
                    stats_ttft.append(now - req.arrival_time)
                    if len(tokens) > 1:
                        stats_itl.extend([0.0] * (len(tokens) - 1))
                else:
                    stats_itl.extend([(now - req.last_token_time) / len(tokens)] * len(tokens))
                req.last_token_time = now
                detok = self.detok[req.request_id]
                text = detok.add(tokens, final=req.finish_reason is not None)
                if detok.stopped:
                    req.finish_reason = "stop"
                if req.finish_reason is not None:
                    self.scheduler.finish(req, req.finish_reason)
                    stats_e2e.append(now - req.arrival_time)
                    reasons.append(req.finish_reason)
                    outputs.append(self._finish_output(req, tokens, text))
                else:
                    outputs.append(self._output(req, tokens, text))
        step_time = time.monotonic() - start
        if not failed_any:
            self.scheduler.observe(sched, gen_tokens, step_time)
        stats = StepStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_usage=self.scheduler.kv.pool.usage, num_prompt_tokens=prompt_tokens,
            num_generation_tokens=gen_tokens, step_time=step_time,
            ttft=stats_ttft, inter_token=stats_itl, e2e=stats_e2e, finished_reasons=reasons,
            drafted=drafted, accepted=accepted, timings=timings, spec_budget=sched.budget,
            num_preemptions=len(sched.preempted), num_recomputed_tokens=recomputed,
            prefix_query_tokens=sched.prefix_query_tokens, prefix_hit_tokens=sched.prefix_hit_tokens)
        return outputs, stats

    def _execute_isolated(self, sched: SchedulerOutput):
        """``runner.execute(sched)``; if it raises, each request is rerun alone so that only the requests
        that fail on their own are failed. Returns the (merged) runner output and ``{request_id: error}``."""
        try:
            return self.runner.execute(sched), {}
        except Exception as exc:  # one request's failure must not fail the others
            if len(sched.scheduled) == 1:
                log.exception("request %s failed", sched.scheduled[0].request.request_id)
                return RunnerOutput(), {sched.scheduled[0].request.request_id: describe(exc)}
            log.warning("step of %d requests failed (%s); rerunning each alone", len(sched.scheduled), describe(exc))
        self.runner.rollback()
        merged, failed = RunnerOutput(), {}
        for s in sched.scheduled:
            try:
                one = self.runner.execute(replace(sched, scheduled=[s]))
            except Exception as exc:
                self.runner.rollback()
                log.exception("request %s failed", s.request.request_id)
                failed[s.request.request_id] = describe(exc)
                continue
            merged.merge(one)
        return merged, failed

    def _output(self, req: Request, tokens: list[int], text: str) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id, text=text, token_ids=tokens, finished=req.finished,
            finish_reason=req.finish_reason if req.finished else None,
            num_prompt_tokens=req.num_prompt_tokens, num_output_tokens=req.num_output_tokens,
            verify_steps=req.spec.verify_steps, drafted_tokens=req.spec.drafted_tokens,
            accepted_tokens=req.spec.accepted_tokens, num_cached_tokens=req.num_cached_tokens)

    def _finish_output(self, req: Request, tokens: list[int], text: str, error: str | None = None) -> RequestOutput:
        detok = self.detok.pop(req.request_id)
        self.runner.release(req.request_id)
        out = self._output(req, tokens, text + detok.flush())
        out.error = error
        return out


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
