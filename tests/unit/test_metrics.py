"""Prometheus exporter: step stats and speculation counters."""

from __future__ import annotations

from server.engine.outputs import StepStats
from server.metrics import Metrics


def value(metrics: Metrics, line_start: str) -> float:
    for line in metrics.render().decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} not exported")


def test_step_stats_and_speculation():
    m = Metrics("tiny")
    m.observe(StepStats(num_running=2, num_waiting=1, kv_usage=0.25, num_prompt_tokens=10,
                        num_generation_tokens=7, step_time=0.01, ttft=[0.05], inter_token=[0.02, 0.02],
                        e2e=[0.3], finished_reasons=["stop"], drafted=[8, 8, 0], accepted=[3, 0, 0]))
    lab = '{model_name="tiny"}'
    assert value(m, f"treespec_num_requests_running{lab}") == 2
    assert value(m, f"treespec_kv_cache_usage_ratio{lab}") == 0.25
    assert value(m, f"treespec_prompt_tokens_total{lab}") == 10
    assert value(m, f"treespec_generation_tokens_total{lab}") == 7
    assert value(m, f"treespec_time_to_first_token_seconds_count{lab}") == 1
    assert value(m, f"treespec_inter_token_latency_seconds_count{lab}") == 2
    assert value(m, f"treespec_spec_verify_steps_total{lab}") == 3
    assert value(m, f"treespec_spec_drafts_total{lab}") == 2
    assert value(m, f"treespec_spec_draft_tokens_total{lab}") == 16
    assert value(m, f"treespec_spec_accepted_tokens_total{lab}") == 3
    assert value(m, 'treespec_spec_accepted_tokens_per_position_total{model_name="tiny",position="3"}') == 1
    assert value(m, f"treespec_spec_accepted_length_count{lab}") == 3
    assert value(m, f"treespec_spec_mean_acceptance_length{lab}") == (4 + 1 + 1) / 3
    assert value(m, 'treespec_request_success_total{model_name="tiny",reason="stop"}') == 1


def test_budget_gauges():
    from server.cache.block_pool import BlockPool
    from server.cache.kv_manager import KVManager
    from server.engine.budget import BudgetPolicy
    from server.engine.scheduler import Scheduler, SchedulerConfig

    policy = BudgetPolicy((8, 4, 0))
    scheduler = Scheduler(SchedulerConfig(3, 64, 8, budget_policy=policy), KVManager(BlockPool(4, 4)))
    m = Metrics("tiny", scheduler)
    for b, n in policy.table().items():
        assert value(m, f'treespec_spec_budget_by_batch_size{{batch_size="{b}",model_name="tiny"}}') == n
    m.observe(StepStats(num_running=2, num_waiting=0, kv_usage=0.5, num_prompt_tokens=0,
                        num_generation_tokens=2, step_time=0.01, drafted=[4, 4], accepted=[1, 0],
                        spec_budget=4))
    assert value(m, 'treespec_spec_budget{model_name="tiny"}') == 4
    m.observe(StepStats(num_running=1, num_waiting=0, kv_usage=0.5, num_prompt_tokens=5,
                        num_generation_tokens=1, step_time=0.01))  # prefill only: keeps the last budget
    assert value(m, 'treespec_spec_budget{model_name="tiny"}') == 4
