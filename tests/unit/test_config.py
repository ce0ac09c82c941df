"""Config: YAML preset, generated CLI flags, validation."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from server.config import DEFAULT_PRESET, ServerConfig, add_config_flags, config_from_args


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
