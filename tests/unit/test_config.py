"""Config: YAML preset, generated CLI flags, validation."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from server.config import API_KEYS_ENV, DEFAULT_PRESET, ServerConfig, add_config_flags, config_from_args


def parse(*argv):
    p = argparse.ArgumentParser()
    add_config_flags(p)
    return config_from_args(p.parse_args(list(argv)))


def test_default_preset_and_overrides():
    cfg = parse()
    assert cfg == ServerConfig.from_yaml(DEFAULT_PRESET) and cfg.model == "default" and cfg.port == 8000
    cfg = parse("--port", "9001", "--block-size", "32", "--dtype", "bfloat16")
    assert (cfg.port, cfg.block_size, cfg.dtype) == (9001, 32, "bfloat16")


def test_invalid_values_are_rejected():
    with pytest.raises(ValidationError):
        parse("--block-size", "0")
    with pytest.raises(SystemExit):
        parse("--dtype", "int3")
    with pytest.raises(ValidationError):
        ServerConfig(unknown_field=1)


def test_auto_dtype_follows_the_device():
    assert ServerConfig(device="cpu").torch_dtype == "float32"
    assert ServerConfig(device="cuda").torch_dtype == "bfloat16"
    assert ServerConfig(device="cuda", dtype="float16").torch_dtype == "float16"


def test_api_keys_from_flags_environment_and_file(monkeypatch, tmp_path):
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    assert parse().api_keys() == []
    cfg = parse("--api-key", "a", "--api-key", "b")
    assert cfg.api_key == ["a", "b"] and cfg.api_keys() == ["a", "b"]
    keys = tmp_path / "keys"
    keys.write_text("f1\n  f2  \n\n")
    monkeypatch.setenv(API_KEYS_ENV, "e1,, e2 ")
    assert parse("--api-key", "a", "--api-key-file", str(keys)).api_keys() == ["a", "e1", "e2", "f1", "f2"]
    with pytest.raises(ValidationError, match="does not exist"):
        parse("--api-key-file", str(tmp_path / "missing"))


def test_hardening_defaults():
    cfg = parse()
    assert (cfg.max_request_bytes, cfg.max_waiting_requests, cfg.request_timeout, cfg.shutdown_timeout,
            cfg.protect_metrics) == (8 << 20, 256, None, 30.0, False)
    cfg = parse("--request-timeout", "2.5", "--protect-metrics", "true", "--max-waiting-requests", "0")
    assert (cfg.request_timeout, cfg.protect_metrics, cfg.max_waiting_requests) == (2.5, True, 0)


def test_drafter_option_groups_come_from_the_preset_and_group_flags(tmp_path):
    preset = tmp_path / "swift.yaml"
    preset.write_text("drafter: swift\nswift:\n  stop_threshold: 0.7\n  search:\n    context_window: 16\n")
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    assert not any(a.dest == "swift" for a in parser._actions)
    cfg = config_from_args(parser.parse_args(["--config", str(preset)]))
    assert cfg.swift.stop_threshold == 0.7 and cfg.swift.search.context_window == 16
    cfg = config_from_args(parser.parse_args(["--config", str(preset), "--swift-search-seed", "7",
                                              "--swift-optimise", "off"]))
    assert (cfg.swift.stop_threshold, cfg.swift.search.context_window, cfg.swift.search.seed,
            cfg.swift.optimise) == (0.7, 16, 7, False)          # flags laid over the preset's section field by field
    assert not any("confidence" in a.dest for a in parser._actions)   # tuples: the preset's
    with pytest.raises(SystemExit):
        parser.parse_args(["--swift-optimise", "maybe"])
    with pytest.raises(ValidationError):
        config_from_args(parser.parse_args(["--swift-stop-threshold", "1.5"]))
    preset.write_text("swift:\n  search:\n    window: 16\n")
    with pytest.raises(ValidationError):
        config_from_args(parser.parse_args(["--config", str(preset)]))


def test_step_budgets_follow_the_device():
    cpu, cuda = ServerConfig(), ServerConfig(device="cuda")
    assert (cpu.step_token_budget, cpu.prefill_attention_budget) == (256, 1 << 19)
    assert (cuda.step_token_budget, cuda.prefill_attention_budget) == (8192, 0)
    assert ServerConfig(max_num_batched_tokens=64, max_prefill_attention=0).step_token_budget == 64
