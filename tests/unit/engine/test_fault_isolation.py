"""One request's failure fails that request alone: its step is rerun without it, bystanders finish with
exactly the output they have when run alone (greedy and seeded sampling), and nothing leaks."""

from __future__ import annotations

import pytest
from helpers import random_prompts, reference_greedy, run_to_completion, tiny_engine

from drafters.lookup import LookupDrafter
from server.engine.request import SamplingParams


class PoisonError(RuntimeError):
    pass


class FailingLookup(LookupDrafter):
    """Prompt lookup that raises while drafting for the poisoned request once it has ``after`` tokens."""

    def __init__(self, poisoned: str, after: int):
        super().__init__(max_tree_tokens=6)
        self.poisoned, self.after = poisoned, after

    def propose(self, requests):
        if any(r.request_id == self.poisoned and len(r.token_ids) >= self.after for r in requests):
            raise PoisonError("drafting blew up")
        return super().propose(requests)


def sampled(seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=20, temperature=0.9, seed=seed)


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=20, temperature=0.0)


def run_with_outputs(engine, requests):
    """Like ``run_to_completion`` but also returns every request's final output."""
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    got, finals = {rid: [] for rid in requests}, {}
    while engine.has_unfinished():
        outputs, _ = engine.step()
        for o in outputs:
            got[o.request_id].extend(o.token_ids)
            if o.finished:
                finals[o.request_id] = o
    return got, finals


@pytest.mark.parametrize("where", ["draft", "accept"])
def test_a_failing_request_does_not_fail_its_batch(tiny_pair, monkeypatch, where):
    hf, model = tiny_pair
    prompts = [p * 2 for p in random_prompts(4, seed=21, min_len=4, max_len=9)]
    drafter = FailingLookup("bad", after=len(prompts[0]) + 3) if where == "draft" else LookupDrafter(6)
    engine = tiny_engine(model, num_blocks=256, drafter=drafter)
    if where == "accept":   # sampling/acceptance of the poisoned request raises after a few steps
        finish = engine.runner._finish_request

        def poisoned(s, *args):
            if s.request.request_id == "bad" and s.request.num_output_tokens >= 3:
                raise PoisonError("acceptance blew up")
            return finish(s, *args)

        monkeypatch.setattr(engine.runner, "_finish_request", poisoned)
    requests = {f"g{i}": (p, greedy()) for i, p in enumerate(prompts[1:])}
    requests["s"] = (prompts[1], sampled(5))
    requests["bad"] = (prompts[0], greedy())
    got, finals = run_with_outputs(engine, requests)

    assert finals["bad"].finish_reason == "error" and "PoisonError" in finals["bad"].error
    for i, p in enumerate(prompts[1:]):
        assert got[f"g{i}"] == reference_greedy(hf, p, 20) and finals[f"g{i}"].error is None
    alone = tiny_engine(model, num_blocks=256, drafter=LookupDrafter(6))
    assert got["s"] == run_to_completion(alone, {"s": (prompts[1], sampled(5))})["s"]   # same random draws
    assert engine.scheduler.kv.pool.usage == 0.0 and not engine.runner.generators


def test_a_request_failing_alone_is_failed_without_a_rerun(tiny_pair, monkeypatch):
    _, model = tiny_pair
    engine = tiny_engine(model, num_blocks=64)
    calls = []

    def broken(sched):
        calls.append(len(sched.scheduled))
        raise PoisonError("forward blew up")

    monkeypatch.setattr(engine.runner, "execute", broken)
    _, finals = run_with_outputs(engine, {"only": ([5, 6, 7], greedy())})
    assert finals["only"].finish_reason == "error" and calls == [1]
    assert engine.scheduler.kv.pool.usage == 0.0
