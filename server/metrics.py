"""Prometheus exporter fed by the engine's ``StepStats`` (kept apart from the stats dataclasses)."""

from __future__ import annotations

from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server.engine.outputs import StepStats

ACCEPT_BUCKETS = tuple(range(1, 17))
RECENT_STEPS = 256  # window of the recent mean acceptance length gauge
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30, 60)


class Metrics:
    """One registry per app, so several servers (tests) can live in one process."""

    def __init__(self, model_name: str, scheduler=None):
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.running = Gauge("treespec_num_requests_running", "Requests in the running batch", labels, registry=r)
        self.waiting = Gauge("treespec_num_requests_waiting", "Requests waiting for admission", labels, registry=r)
        self.kv_usage = Gauge("treespec_kv_cache_usage_ratio", "Fraction of KV blocks in use", labels, registry=r)
        self.prompt_tokens = Counter("treespec_prompt_tokens", "Prompt tokens (prefilled or from the prefix "
                                     "cache; recomputation after a preemption not counted)", labels, registry=r)
        self.preemptions = Counter("treespec_num_preemptions", "Requests preempted (KV pool full; recomputed "
                                   "later)", labels, registry=r)
        self.recomputed_tokens = Counter("treespec_recomputed_prompt_tokens", "Tokens prefilled again after a "
                                         "preemption (not counted as prompt tokens)", labels, registry=r)
        self.prefix_queries = Counter("treespec_prefix_cache_queries", "Tokens of admitted requests looked up "
                                      "in the prefix cache", labels, registry=r)
        self.prefix_hits = Counter("treespec_prefix_cache_hits", "Tokens whose KV the prefix cache held (hit "
                                   "rate = hits / queries)", labels, registry=r)
        self.generation_tokens = Counter("treespec_generation_tokens", "Generated tokens", labels, registry=r)
        self.ttft = Histogram("treespec_time_to_first_token_seconds", "Time to first token", labels,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("treespec_inter_token_latency_seconds", "Time per output token after the first",
                             labels, buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("treespec_e2e_request_latency_seconds", "Arrival to finish", labels,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.finished = Counter("treespec_request_success", "Finished requests by reason", labels + ["reason"],
                                registry=r)
        self.verify_steps = Counter("treespec_spec_verify_steps", "Speculative verify steps (one per request "
                                    "per decoding step with a drafter)", labels, registry=r)
        self.drafts = Counter("treespec_spec_drafts", "Non-empty draft trees verified", labels, registry=r)
        self.draft_tokens = Counter("treespec_spec_draft_tokens", "Draft tokens verified", labels, registry=r)
        self.accepted_tokens = Counter("treespec_spec_accepted_tokens", "Draft tokens accepted", labels, registry=r)
        self.accepted_by_position = Counter("treespec_spec_accepted_tokens_per_position",
                                            "Accepted draft tokens by depth in the tree", labels + ["position"],
                                            registry=r)
        self.accept_length = Histogram("treespec_spec_accepted_length", "Tokens committed per verify step "
                                       "(accepted drafts + 1)", labels, buckets=ACCEPT_BUCKETS, registry=r)
        self.mean_accept = Gauge("treespec_spec_mean_acceptance_length", f"Mean tokens committed per verify "
                                 f"step over the last {RECENT_STEPS} steps (tau)", labels, registry=r)
        self.budget = Gauge("treespec_spec_budget", "Draft-tree budget (nodes per request) of the last step "
                            "with decoding requests", labels, registry=r)
        self.budget_table = Gauge("treespec_spec_budget_by_batch_size", "Draft-tree budget in force for "
                                  "each number of decoding requests (start-up calibration, checked on "
                                  "served steps; else --max-draft-tokens)",
                                  labels + ["batch_size"], registry=r)
        self.recent: deque[int] = deque(maxlen=RECENT_STEPS)
        self.model_name = model_name
        for metric in (self.prompt_tokens, self.preemptions, self.recomputed_tokens, self.prefix_queries,
                       self.prefix_hits, self.generation_tokens, self.ttft, self.itl, self.e2e):
            metric.labels(model_name)          # exported (at 0) from the start, not from the first request
        if scheduler is not None:  # read live at scrape time: correct even while the engine idles
            self.running.labels(model_name).set_function(lambda: len(scheduler.running))
            self.waiting.labels(model_name).set_function(lambda: len(scheduler.waiting))
            self.kv_usage.labels(model_name).set_function(lambda: scheduler.kv.pool.usage)
            for b in scheduler.policy.table():   # the leader per batch size, which served steps may change
                self.budget_table.labels(model_name, str(b)).set_function(lambda b=b: scheduler.policy.budget(b))
        self.live = scheduler is not None

    def observe(self, stats: StepStats) -> None:
        m = self.model_name
        if not self.live:
            self.running.labels(m).set(stats.num_running)
            self.waiting.labels(m).set(stats.num_waiting)
            self.kv_usage.labels(m).set(stats.kv_usage)
        self.prompt_tokens.labels(m).inc(stats.num_prompt_tokens)
        self.generation_tokens.labels(m).inc(stats.num_generation_tokens)
        self.preemptions.labels(m).inc(stats.num_preemptions)
        self.recomputed_tokens.labels(m).inc(stats.num_recomputed_tokens)
        self.prefix_queries.labels(m).inc(stats.prefix_query_tokens)
        self.prefix_hits.labels(m).inc(stats.prefix_hit_tokens)
        for v in stats.ttft:
            self.ttft.labels(m).observe(v)
        for v in stats.inter_token:
            self.itl.labels(m).observe(v)
        for v in stats.e2e:
            self.e2e.labels(m).observe(v)
        for reason in stats.finished_reasons:
            self.finished.labels(m, reason).inc()
        if stats.spec_budget is not None:
            self.budget.labels(m).set(stats.spec_budget)
        self.observe_speculation(stats.drafted, stats.accepted)

    def observe_speculation(self, drafted: list[int], accepted: list[int]) -> None:
        if not drafted:
            return
        m = self.model_name
        self.verify_steps.labels(m).inc(len(drafted))
        self.drafts.labels(m).inc(sum(1 for d in drafted if d))
        self.draft_tokens.labels(m).inc(sum(drafted))
        self.accepted_tokens.labels(m).inc(sum(accepted))
        for a in accepted:
            self.accept_length.labels(m).observe(a + 1)
            for pos in range(1, a + 1):
                self.accepted_by_position.labels(m, str(pos)).inc()
        self.recent.extend(a + 1 for a in accepted)
        self.mean_accept.labels(m).set(sum(self.recent) / len(self.recent))

    def render(self) -> bytes:
        return generate_latest(self.registry)
