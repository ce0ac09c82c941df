"""Assemble an ``LLMEngine`` from a ``ServerConfig``: weights, tokenizer, KV pool, scheduler, runner."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from drafters.base import Drafter
from drafters.registry import build_drafter
from server.cache.block_pool import BlockPool
from server.cache.kv_manager import KVManager
from server.config import ServerConfig
from server.engine.budget import (
    BudgetPolicy,
    calibration_grid,
    choose_budgets,
    format_table,
    monotone,
    probe_budgets,
    tau_at,
)
from server.engine.budget_feedback import ServedBudgets
from server.engine.llm_engine import LLMEngine
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.models.llama import LlamaConfig, LlamaModel
from server.models.loader import load_tokenizer, load_weights
from server.worker.calibrate import measure_draft_cost, measure_verify_table
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


def load_model(path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LlamaModel:
    hf_cfg, state = load_weights(path)
    model = LlamaModel(LlamaConfig.from_hf(hf_cfg))
    model.load_hf_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()


def kv_blocks(cfg: ServerConfig, model: LlamaModel, dtype: torch.dtype) -> int:
    """Target KV cache blocks: ``num_kv_blocks``, else as many as ``kv_cache_gib`` holds."""
    return cfg.num_kv_blocks or max(1, int(cfg.kv_cache_gib * 2**30 // (kv_bytes_per_token(model, dtype)
                                                                           * cfg.block_size)))


def calibrate_budget(runner: ModelRunner, drafter: Drafter, cfg: ServerConfig) -> BudgetPolicy | ServedBudgets:
    """Measure verify and drafting cost per (batch size, tree size) on this machine and pick the draft
    budget for every number of decoding requests (0: plain decoding at that load); logs the table.
    With ``budget_feedback`` served steps keep checking each choice against its alternative."""
    t0 = time.perf_counter()
    batches, sizes = calibration_grid(cfg.max_num_seqs, cfg.max_draft_tokens)
    verify, contexts = measure_verify_table(runner, batches, sizes)
    c = runner.model.config
    profile = drafter.acceptance_profile
    draft = measure_draft_cost(drafter, c.hidden_size, c.vocab_size, list(verify), sizes, device=runner.device,
                               dtype=runner.kv_caches[0][0].dtype, tau=lambda n: tau_at(n, profile))
    verify, draft = monotone(verify), monotone(draft)
    policy = choose_budgets(verify, profile, draft, cfg.max_num_seqs)
    log.info("tree calibration in %.1f s (%s acceptance profile; %d context tokens per request), ms per "
             "step = verify + draft by tree size n (made monotone in batch and tree size):\n%s\n"
             "-> draft budget by running batch size: %s",
             time.perf_counter() - t0, "measured" if profile else "heuristic", max(contexts.values()),
             format_table(verify, draft, profile, policy), policy.describe())
    probes = probe_budgets(verify, policy, profile, draft)
    if max(policy.budgets) == 0 and (not cfg.budget_feedback or not any(probes)):
        log.warning("speculation off at every load: plain decoding is predicted faster on this machine "
                    "(--calibrate-tree false forces drafting)")
    return ServedBudgets(policy, probes) if cfg.budget_feedback else policy


def build_engine(cfg: ServerConfig) -> tuple[LLMEngine, str]:
    """Returns the engine and the model name it serves."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    path = resolve_model_path(cfg.model)
    dtype = getattr(torch, cfg.torch_dtype)
    model = load_model(path, cfg.device, dtype)
    tokenizer = load_tokenizer(path)
    mc = model.config
    max_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
    num_blocks = kv_blocks(cfg, model, dtype)
    kv = KVManager(BlockPool(num_blocks, cfg.block_size), prefix_caching=cfg.enable_prefix_caching)
    drafter = build_drafter(cfg.drafter, cfg, model)
    lookahead = drafter.max_tree_tokens if drafter is not None else 0
    runner = ModelRunner(model, kv, cfg.device, dtype, drafter, cfg.attention_backend)
    if cfg.cuda_graphs or (cfg.cuda_graphs is None and runner.device.type == "cuda" and runner.backend.graphable):
        runner.enable_cuda_graphs(cfg.max_num_seqs, lookahead, max_len)
    policy: BudgetPolicy | ServedBudgets = BudgetPolicy.fixed(lookahead, cfg.max_num_seqs)
    if drafter is not None and cfg.calibrate_tree and not drafter.calibratable:
        log.info("drafter %s is not calibrated at start-up: draft budget %d at every load", drafter.name,
                 lookahead)
    elif drafter is not None and cfg.calibrate_tree:
        policy = calibrate_budget(runner, drafter, cfg)
    scheduler = Scheduler(SchedulerConfig(cfg.max_num_seqs, cfg.step_token_budget, lookahead, max_len, policy,
                                          max_prefill_attention=cfg.prefill_attention_budget), kv)
    eos = tuple(mc.eos_token_ids) or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
    log.info("model %s: %d layers, hidden %d, vocab %d, context %d; drafter %s (draft budget %s)", path,
             mc.num_hidden_layers, mc.hidden_size, mc.vocab_size, max_len,
             drafter.name if drafter is not None else "none", policy.describe())
    return LLMEngine(scheduler, runner, tokenizer, max_len, eos), served_name(cfg, path)
