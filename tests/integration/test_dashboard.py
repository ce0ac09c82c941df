"""The shipped Grafana dashboard against the exporter: every metric its PromQL reads is in /metrics of a
running server (the app and exporter of `treespec serve`, in process over a tiny model on loopback: fast,
and independent of the real server's start-up calibration), and it has the panels an operator needs
(acceptance length, tokens/s, TTFT/ITL, KV usage, tree budget in force, acceptance by depth). The real
model behind a real Prometheus: tests/image/test_prometheus.py (`make test-image`)."""

from __future__ import annotations

from dashboard_queries import expressions, load, metric_names, panels
from live_app import chat, start_live
from prometheus_client.parser import text_string_to_metric_families

SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "untyped": ("",)}


def exported_names(text: str) -> tuple[set[str], set[str]]:
    """(sample names present, sample names declared by ``# TYPE`` lines) of a /metrics page. A labelled
    series appears with its first observation (per-position counts need an accepted draft, which the
    start-up calibration may rule out at batch 1), but its family is declared from the start."""
    samples = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    declared = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            base = name.removesuffix("_total") if kind == "counter" else name
            declared |= {base + suffix for suffix in SUFFIXES.get(kind, ("",))}
    return samples, declared


def test_exported_names_from_type_lines():
    text = ("# TYPE a_total counter\na_total 1.0\n# TYPE h histogram\n# TYPE g gauge\ng 2.0\n")
    samples, declared = exported_names(text)
    assert samples == {"a_total", "g"}
    assert {"a_total", "h_bucket", "h_count", "g"} <= declared and "g_total" not in declared


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


def test_every_dashboard_metric_is_exported(tiny_pair):
    live = start_live(tiny_pair[1])
    try:
        r = live.post(chat("Hello there", max_tokens=8))   # traffic: histograms get samples
        assert r.status_code == 200, r.text
        with live.client() as http:
            samples, declared = exported_names(http.get("/metrics").text)
    finally:
        live.stop()
    assert {"treespec_time_to_first_token_seconds_bucket", "treespec_generation_tokens_total",
            "treespec_kv_cache_usage_ratio"} <= samples, samples
    queried = {name: where for where, expr in expressions(load()) for name in metric_names(expr)}
    assert len(queried) >= 10, queried
    missing = {name: where for name, where in queried.items() if name not in samples | declared}
    assert not missing, f"dashboard queries name metrics the server does not export: {missing}"
