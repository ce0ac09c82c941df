"""Assemble an ``LLMEngine`` from a ``ServerConfig``: weights, tokenizer, KV pool, scheduler, runner."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from drafters.registry import build_drafter
from server.cache.block_pool import BlockPool
from server.cache.kv_manager import KVManager
from server.config import ServerConfig
from server.engine.llm_engine import LLMEngine
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.models.llama import LlamaConfig, LlamaModel
from server.models.loader import load_tokenizer, load_weights
from server.worker.calibrate import choose_budget, measure_draft_cost, measure_verify_cost
from server.worker.model_runner import ModelRunner, kv_bytes_per_token

log = logging.getLogger(__name__)


def resolve_model_path(model: str) -> Path:
    if model == "default":
        from server.models.fetch import ensure_default_model
        return ensure_default_model()
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model path {model!r} does not exist")
    return path


def served_name(cfg: ServerConfig, path: Path) -> str:
    if cfg.served_model_name:
        return cfg.served_model_name
    return path.stem if path.is_file() else path.name


def load_model(path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
               backend: str | None = None) -> LlamaModel:
    hf_cfg, state = load_weights(path)
    model = LlamaModel(LlamaConfig.from_hf(hf_cfg), backend=backend)
    model.load_hf_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()


def calibrate_budget(runner: ModelRunner, drafter, cfg: ServerConfig) -> int:
    """Measure verify and drafting cost on this machine and pick the draft budget (0: speculation off; logged)."""
    sizes = sorted({n for n in (4, 8, 12, 16, 24, 32, 48, 64) if n < cfg.max_draft_tokens} | {cfg.max_draft_tokens})
    costs = measure_verify_cost(runner, [0, *sizes])
    c = runner.model.config
    draft = measure_draft_cost(drafter, c.hidden_size, c.vocab_size, sizes)
    profile = getattr(drafter, "acceptance_profile", None)
    budget, rate = choose_budget(costs, profile, draft)
    log.info("tree calibration (%s acceptance profile), ms per step = verify + draft: %s -> budget %d",
             "measured" if profile else "heuristic",
             ", ".join(f"{n}: {1000 * costs[n]:.1f} + {1000 * draft[n]:.1f}" for n in sizes), budget)
    if budget == 0:
        best = max((n for n in rate if n), key=lambda n: rate[n])
        log.warning("speculation off: plain decoding is predicted faster on this machine (%.1f vs %.1f tokens/s "
                    "with a %d-node %s tree); --calibrate-tree false forces drafting", rate[0], rate[best], best,
                    cfg.drafter)
    return budget


def build_engine(cfg: ServerConfig) -> tuple[LLMEngine, str]:
    """Returns the engine and the model name it serves."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    path = resolve_model_path(cfg.model)
    dtype = getattr(torch, cfg.dtype)
    model = load_model(path, cfg.device, dtype, cfg.attention_backend)
    tokenizer = load_tokenizer(path)
    mc = model.config
    max_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
    num_blocks = cfg.num_kv_blocks or max(
        1, int(cfg.kv_cache_gib * 2**30 // (kv_bytes_per_token(model, dtype) * cfg.block_size)))
    kv = KVManager(BlockPool(num_blocks, cfg.block_size))
    drafter = build_drafter(cfg.drafter, cfg, model)
    lookahead = drafter.max_tree_tokens if drafter is not None else 0
    scheduler = Scheduler(SchedulerConfig(cfg.max_num_seqs, max(cfg.max_num_batched_tokens, max_len), lookahead,
                                          max_len), kv)
    runner = ModelRunner(model, kv, cfg.device, dtype, drafter)
    if drafter is not None and cfg.calibrate_tree:
        lookahead = scheduler.config.num_lookahead_slots = drafter.max_tree_tokens = calibrate_budget(
            runner, drafter, cfg)
        if lookahead == 0:
            runner.drafter = drafter = None
    eos = tuple(mc.eos_token_ids) or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
    log.info("model %s: %d layers, hidden %d, vocab %d, context %d; drafter %s (%d draft tokens)", path,
             mc.num_hidden_layers, mc.hidden_size, mc.vocab_size, max_len,
             drafter.name if drafter is not None else "none", lookahead)
    return LLMEngine(scheduler, runner, tokenizer, max_len, eos), served_name(cfg, path)
