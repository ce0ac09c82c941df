"""Draft budget per running-batch size from synthetic cost tables (no torch, no models)."""

from __future__ import annotations

import logging

import pytest

from server.engine.budget import (
    BudgetLog,
    BudgetPolicy,
    calibration_grid,
    choose_budgets,
    cost_at,
    format_table,
    monotone,
    rates_at,
    tau_at,
)

BATCHES = [1, 2, 4, 8, 16]
SIZES = [0, 4, 8, 16]
PROFILE = {4: 1.6, 8: 1.8, 16: 1.9}   # tau by budget, as acceptance.json holds it


def table(seconds) -> dict[int, dict[int, float]]:
    """``seconds(b, n)`` on the calibration grid."""
    return {b: {n: seconds(b, n) for n in SIZES} for b in BATCHES}


def test_grid_has_powers_of_two_and_the_limits():
    assert calibration_grid(16, 16) == ([1, 2, 4, 8, 16], [0, 4, 8, 16])
    assert calibration_grid(12, 6) == ([1, 2, 4, 8, 12], [0, 4, 6])
    assert calibration_grid(1, 1) == ([1], [0, 1])
    assert calibration_grid(3, 40) == ([1, 2, 3], [0, 4, 8, 16, 32, 40])


def test_always_zero_when_verify_cost_grows_steeply():
    verify = table(lambda b, n: 0.02 * b * (1 + n))              # every tree token costs a full forward
    policy = choose_budgets(verify, PROFILE, max_batch=16)
    assert policy.budgets == (0,) * 16


def test_never_zero_when_verify_is_cheap():
    verify = table(lambda b, n: 0.02 + 0.0001 * b * n)
    policy = choose_budgets(verify, PROFILE, max_batch=16)
    assert all(n > 0 for n in policy.budgets) and policy.budget(1) == 16


def test_budget_falls_with_batch_size():
    verify = table(lambda b, n: 0.025 + 0.001 * b * (1 + n))     # fixed weight cost + 1 ms per token
    policy = choose_budgets(verify, PROFILE, max_batch=16)
    assert policy.budget(1) > 0 and policy.budget(16) == 0
    assert list(policy.budgets) == sorted(policy.budgets, reverse=True)
    rates = rates_at(16, verify, PROFILE)
    assert rates[0] == pytest.approx(16 / verify[16][0]) and rates[0] > max(rates[n] for n in (4, 8, 16))


def test_drafting_cost_counts():
    verify = table(lambda b, n: 0.02 + 0.0001 * b * n)
    assert choose_budgets(verify, PROFILE).budget(1) == 16
    draft = {b: {n: 0.02 for n in (4, 8, 16)} for b in BATCHES}  # drafting doubles a step: no tree pays
    assert choose_budgets(verify, PROFILE, draft).budgets == (0,) * 16
    pricey_big = {b: {4: 0.001, 8: 0.001, 16: 0.05} for b in BATCHES}
    assert choose_budgets(verify, PROFILE, pricey_big).budget(1) == 8


def test_costs_interpolate_between_measured_batch_sizes_and_hold_beyond():
    verify = {1: {0: 1.0, 4: 1.5}, 4: {0: 1.5, 4: 6.0}}
    assert cost_at(verify, 3, 0) == pytest.approx(4 / 3) and cost_at(verify, 2, 4) == pytest.approx(3.0)
    assert cost_at(verify, 9, 4) == 6.0
    # tau(4) = 3: trees pay at 1 (3 / 1.5 s > 1 / 1 s), not at 4 (4 * 3 / 6 s < 4 / 1.5 s); in between by the
    # interpolated costs: b=2 (6 / 3 s > 2 / (7/6) s) yes, b=3 (9 / 4.5 s < 3 / (4/3) s) no; beyond 4 as at 4
    policy = choose_budgets(verify, {4: 3.0}, max_batch=8)
    assert policy.budgets == (4, 4, 0, 0, 0, 0, 0, 0)


def test_tau_interpolates_from_plain_decoding_and_holds_beyond():
    assert tau_at(0, PROFILE) == 1.0
    assert tau_at(2, {4: 2.0}) == pytest.approx(1.5)
    assert tau_at(6, {4: 2.0, 8: 3.0}) == pytest.approx(2.5)
    assert tau_at(64, {4: 2.0, 16: 3.0}) == 3.0
    verify = {1: {0: 1.0, 4: 1.2, 8: 1.3, 12: 1.8}}
    assert choose_budgets(verify, {4: 1.3, 12: 1.8}).budget(1) == 8    # tau(8) = 1.55 (from 4 and 12): 1.19/s


def test_without_a_profile_speculation_stays_on():
    verify = table(lambda b, n: 0.02 * b * (1 + n))
    policy = choose_budgets(verify, None, max_batch=16)
    assert policy.budgets == (4,) * 16                          # smallest tree: heuristic tau barely grows
    assert 0 not in rates_at(1, verify)
    flat = {1: {0: 1.0, 4: 1.0, 8: 1.0}}
    assert choose_budgets(flat).budget(1) == 8                  # equal cost: the bigger tree


def test_policy_lookup_table_and_description():
    policy = BudgetPolicy((8, 8, 8, 4, 0, 0))
    assert policy.budget(0) == 8 and policy.budget(4) == 4 and policy.budget(100) == 0
    assert policy.table() == {1: 8, 2: 8, 3: 8, 4: 4, 5: 0, 6: 0}
    assert policy.describe() == "batch 1-3: 8, 4: 4, 5-6: 0"
    assert BudgetPolicy.fixed(16, 3).table() == {1: 16, 2: 16, 3: 16}


def test_format_table_has_a_row_per_measured_batch_size():
    verify = table(lambda b, n: 0.025 + 0.001 * b * (1 + n))
    draft = {b: {n: 0.002 for n in (4, 8, 16)} for b in BATCHES}
    policy = choose_budgets(verify, PROFILE, draft, max_batch=16)
    lines = format_table(verify, draft, PROFILE, policy).splitlines()
    assert len(lines) == 1 + len(BATCHES) and "n=16" in lines[0]
    assert lines[1].split("|")[0].strip() == "1" and " 26.0 " in lines[1] and "+  2.0" in lines[1]
    assert lines[-1].split("|")[-2].strip() == "0" and lines[-1].endswith("1.00x")


def test_budget_changes_are_logged_rate_limited(caplog):
    now = [0.0]
    note = BudgetLog(initial=8, interval=10.0, clock=lambda: now[0]).note
    with caplog.at_level(logging.INFO, logger="server.engine.budget"):
        assert not note(8, 1)                                   # unchanged: silent
        assert note(0, 5)
        now[0] = 3.0
        assert not note(8, 1)                                   # changed back within the interval: held
        now[0] = 12.0
        assert note(8, 1)
    assert [r.getMessage() for r in caplog.records] == [
        "draft budget now 0 nodes per request (5 decoding requests)",
        "draft budget now 8 nodes per request (1 decoding requests)"]


def test_monotone_removes_noise_that_makes_more_work_cheaper():
    noisy = {1: {0: 1.0, 4: 3.0, 8: 2.0}, 2: {0: 0.5, 4: 4.0, 8: 5.0}}
    assert monotone(noisy) == {1: {0: 1.0, 4: 3.0, 8: 3.0}, 2: {0: 1.0, 4: 4.0, 8: 5.0}}
    assert monotone({1: {4: 0.2}, 4: {4: 0.1, 8: 0.3}}) == {1: {4: 0.2}, 4: {4: 0.2, 8: 0.3}}
