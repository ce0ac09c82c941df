"""The shipped Grafana dashboard against the exporter: every metric its PromQL reads is in /metrics of the
running server, and it has the panels an operator needs (acceptance length, tokens/s, TTFT/ITL, KV usage,
tree budget in force, acceptance by depth)."""

from __future__ import annotations

import httpx
from dashboard_queries import expressions, load, metric_names, panels
from prometheus_client.parser import text_string_to_metric_families

# Text the model repeats, so a drafter's tokens are accepted and the per-position series exist.
REPEAT = ("Repeat this sentence exactly, three times: the quick brown fox jumps over the lazy dog. "
          "the quick brown fox jumps over the lazy dog.")


def exported_samples(url: str) -> set[str]:
    text = httpx.get(f"{url}/metrics", timeout=30.0).text
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_metric_names_are_extracted_from_promql():
    expr = ('histogram_quantile(0.95, sum by (le) (rate(foo_seconds_bucket{instance=~"$instance",a="b"}'
            '[$__rate_interval]))) / ignoring(position) group_left scalar(bar_total offset 5m) > 0.5')
    assert metric_names(expr) == {"foo_seconds_bucket", "bar_total"}
    assert metric_names("label_values(treespec_num_requests_running, instance)") == {
        "treespec_num_requests_running"}


def test_dashboard_has_the_operator_panels():
    dashboard = load()
    by_metric: dict[str, list[str]] = {}
    for title, expr in expressions(dashboard):
        for name in metric_names(expr):
            by_metric.setdefault(name, []).append(title)
    needed = {
        "acceptance length": {"treespec_spec_mean_acceptance_length", "treespec_spec_accepted_length_bucket"},
        "tokens/s": {"treespec_generation_tokens_total"},
        "TTFT": {"treespec_time_to_first_token_seconds_bucket"},
        "ITL": {"treespec_inter_token_latency_seconds_bucket"},
        "KV usage": {"treespec_kv_cache_usage_ratio"},
        "tree budget in force": {"treespec_spec_budget", "treespec_spec_budget_by_batch_size"},
        "accepted tokens per position": {"treespec_spec_accepted_tokens_per_position_total"},
    }
    for what, names in needed.items():
        missing = names - by_metric.keys()
        assert not missing, f"no dashboard panel shows {what} ({sorted(missing)})"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in panels(dashboard):
        for t in p.get("targets", []):
            assert t.get("datasource", {}).get("uid") == "prometheus", p["title"]


def test_every_dashboard_metric_is_exported(server_url: str, http: httpx.Client, model_id: str):
    # Traffic first: labelled series (per position, per finish reason) appear with their first sample.
    for _ in range(3):
        r = http.post("/v1/chat/completions", json={
            "model": model_id, "temperature": 0, "max_tokens": 48,
            "messages": [{"role": "user", "content": REPEAT}]})
        assert r.status_code == 200, r.text
        exported = exported_samples(server_url)
        if "treespec_spec_accepted_tokens_per_position_total" in exported:
            break
    queried = {name: where for where, expr in expressions(load()) for name in metric_names(expr)}
    assert len(queried) >= 10, queried
    missing = {name: where for name, where in queried.items() if name not in exported}
    assert not missing, f"dashboard queries name metrics the server does not export: {missing}"
