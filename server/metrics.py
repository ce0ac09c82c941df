"""Prometheus exporter fed by the engine's ``StepStats`` (kept apart from the stats dataclasses)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server.engine.outputs import StepStats

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30, 60)


class Metrics:
    """One registry per app, so several servers (tests) can live in one process."""

    def __init__(self, model_name: str, scheduler=None):
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.running = Gauge("treespec_num_requests_running", "Requests in the running batch", labels, registry=r)
        self.waiting = Gauge("treespec_num_requests_waiting", "Requests waiting for admission", labels, registry=r)
        self.kv_usage = Gauge("treespec_kv_cache_usage_ratio", "Fraction of KV blocks in use", labels, registry=r)
        self.prompt_tokens = Counter("treespec_prompt_tokens", "Prefilled prompt tokens", labels, registry=r)
        self.generation_tokens = Counter("treespec_generation_tokens", "Generated tokens", labels, registry=r)
        self.ttft = Histogram("treespec_time_to_first_token_seconds", "Time to first token", labels,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("treespec_inter_token_latency_seconds", "Time per output token after the first",
                             labels, buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("treespec_e2e_request_latency_seconds", "Arrival to finish", labels,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.finished = Counter("treespec_request_success", "Finished requests by reason", labels + ["reason"],
                                registry=r)
        self.model_name = model_name
        if scheduler is not None:  # read live at scrape time: correct even while the engine idles
            self.running.labels(model_name).set_function(lambda: len(scheduler.running))
            self.waiting.labels(model_name).set_function(lambda: len(scheduler.waiting))
            self.kv_usage.labels(model_name).set_function(lambda: scheduler.kv.pool.usage)
        self.live = scheduler is not None

    def observe(self, stats: StepStats) -> None:
        m = self.model_name
        if not self.live:
            self.running.labels(m).set(stats.num_running)
            self.waiting.labels(m).set(stats.num_waiting)
            self.kv_usage.labels(m).set(stats.kv_usage)
        self.prompt_tokens.labels(m).inc(stats.num_prompt_tokens)
        self.generation_tokens.labels(m).inc(stats.num_generation_tokens)
        for v in stats.ttft:
            self.ttft.labels(m).observe(v)
        for v in stats.inter_token:
            self.itl.labels(m).observe(v)
        for v in stats.e2e:
            self.e2e.labels(m).observe(v)
        for reason in stats.finished_reasons:
            self.finished.labels(m, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
