"""Without ``max_tokens`` a request generates what fits: the context window or the KV pool, the smaller."""

from __future__ import annotations

from live_app import chat


def test_missing_max_tokens_fills_the_kv_pool_not_the_context_window(live):
    srv = live(num_blocks=16)                       # 64 KV slots, context window 256
    capacity = srv.llm.scheduler.kv.capacity_tokens
    assert capacity < srv.llm.max_model_len
    with srv.client() as http:
        r = http.post("/v1/chat/completions", json=chat(max_tokens=None))
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == capacity
        assert r.json()["choices"][0]["finish_reason"] == "length"


def test_a_prompt_filling_the_pool_is_a_400(live):
    srv = live(num_blocks=16)
    with srv.client() as http:
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 64})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert "64 in the prompt" in r.json()["error"]["message"]
