"""/health, /v1/models and /metrics on the real server."""

from __future__ import annotations

import time

METRIC_NAMES = [
    "treespec_num_requests_running", "treespec_num_requests_waiting", "treespec_kv_cache_usage_ratio",
    "treespec_prompt_tokens_total", "treespec_generation_tokens_total",
    "treespec_time_to_first_token_seconds_bucket", "treespec_inter_token_latency_seconds_bucket",
    "treespec_e2e_request_latency_seconds_bucket", "treespec_spec_budget_by_batch_size",
]


def test_health(http):
    r = http.get("/health")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"status": "ok"}


def test_models_lists_the_model(http, client, model_id):
    r = http.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [model_id]
    assert body["data"][0]["object"] == "model"
    assert [m.id for m in client.models.list()] == [model_id]


def test_metrics_exports_everything(http, model_id):
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    for name in METRIC_NAMES:
        assert f'{name}{{' in r.text, f"{name} missing from /metrics"
    assert f'model_name="{model_id}"' in r.text


def test_metrics_counters_increase_after_a_request(client, model_id, scrape, wait_idle):
    wait_idle()
    names = ["treespec_prompt_tokens_total", "treespec_generation_tokens_total",
             "treespec_time_to_first_token_seconds_count", "treespec_inter_token_latency_seconds_count",
             "treespec_e2e_request_latency_seconds_count"]
    before = {n: scrape(n) for n in names}
    r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Name a color."}],
                                       temperature=0, max_tokens=6)
    want = {"treespec_prompt_tokens_total": before["treespec_prompt_tokens_total"] + r.usage.prompt_tokens,
            "treespec_generation_tokens_total":
                before["treespec_generation_tokens_total"] + r.usage.completion_tokens,
            "treespec_time_to_first_token_seconds_count":
                before["treespec_time_to_first_token_seconds_count"] + 1,
            "treespec_e2e_request_latency_seconds_count": before["treespec_e2e_request_latency_seconds_count"] + 1}
    # The engine thread records a step's stats just after delivering its outputs: allow a moment.
    deadline = time.monotonic() + 5
    while True:
        after = {n: scrape(n) for n in names}
        if all(after[n] >= v for n, v in want.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for n, v in want.items():
        assert after[n] == v, (n, before[n], after[n])
    if r.usage.completion_tokens > 1:
        assert after["treespec_inter_token_latency_seconds_count"] >= \
            before["treespec_inter_token_latency_seconds_count"] + r.usage.completion_tokens - 1
    assert scrape("treespec_num_requests_running") == 0.0
    assert scrape("treespec_kv_cache_usage_ratio") == 0.0
    if r.usage.completion_tokens > 1:                            # a decoding step ran at batch size 1
        assert scrape("treespec_spec_budget") == scrape("treespec_spec_budget_by_batch_size", batch_size="1")


def test_a_repeated_prompt_reuses_the_prefix_cache(http, model_id, scrape, wait_idle):
    wait_idle()
    text = "Summarise the following notes in one sentence. " + " ".join(f"Note {i}: the sky was grey." for i in range(12))
    body = {"model": model_id, "messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 8}
    hits = scrape("treespec_prefix_cache_hits_total")
    first = http.post("/v1/chat/completions", json=body).json()
    second = http.post("/v1/chat/completions", json=body).json()
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert first["usage"]["prompt_tokens"] == second["usage"]["prompt_tokens"] > cached >= 64
    assert second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert scrape("treespec_prefix_cache_hits_total") >= hits + cached
