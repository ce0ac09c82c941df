"""Test helpers: tiny random models and reference decoding."""

from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch


def tiny_hf_config(**overrides) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 211, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False,
        "rope_scaling": None,
    }
    cfg.update(overrides)
    return cfg


def hf_model_from(cfg: dict, seed: int = 0):
    """A transformers Llama (Qwen2 for model_type qwen2) with random weights, fp32, eager."""
    import transformers

    family = "Qwen2" if cfg.get("model_type") == "qwen2" else "Llama"
    config_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family}ForCausalLM")
    kwargs = {k: v for k, v in cfg.items() if k not in ("model_type", "attention_bias")}
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs, attn_implementation="eager"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def native_from(cfg: dict, state_dict: dict):
    from server.models.llama import LlamaConfig, LlamaModel

    model = LlamaModel(LlamaConfig.from_hf(cfg))
    model.load_hf_state_dict(state_dict)
    return model.eval()


def make_kv(cfg, num_blocks: int, block_size: int):
    shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_hidden_layers)]


class ByteTokenizer:
    """Token id = byte value (ids >= 256 are special): enough to test detokenization and the engine."""

    eos_token_id = None

    def __len__(self) -> int:
        return 260

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())


def tiny_engine(model=None, num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
                max_model_len: int = 256, eos: tuple[int, ...] = (), drafter=None, budget_policy=None,
                device: str = "cpu", attention_backend: str | None = None, cuda_graphs: bool = False,
                max_num_batched_tokens: int | None = None, max_prefill_attention: int = 0,
                prefix_caching: bool = False):
    """An ``LLMEngine`` over a tiny random native model (from ``tiny_hf_config``; a copy on ``device``);
    ``budget_policy`` (a ``BudgetPolicy``) picks the draft budget per step, else the drafter's
    ``max_tree_tokens`` always; ``max_num_batched_tokens`` (default ``max_model_len``) and
    ``max_prefill_attention`` (default unbounded) set the step's budgets, i.e. chunked prefill."""
    from server.cache.block_pool import BlockPool
    from server.cache.kv_manager import KVManager
    from server.engine.llm_engine import LLMEngine
    from server.engine.scheduler import Scheduler, SchedulerConfig
    from server.worker.model_runner import ModelRunner

    if model is None:
        model = native_from(tiny_hf_config(), hf_model_from(tiny_hf_config()).state_dict())
    if next(model.parameters()).device != torch.device(device):
        model = copy.deepcopy(model).to(device)        # shared fixtures stay on the CPU
    kv = KVManager(BlockPool(num_blocks, block_size), prefix_caching=prefix_caching)
    lookahead = drafter.max_tree_tokens if drafter is not None else 0
    config = SchedulerConfig(max_num_seqs, max_num_batched_tokens or max_model_len, lookahead, max_model_len,
                             budget_policy, max_prefill_attention=max_prefill_attention)
    scheduler = Scheduler(config, kv)
    runner = ModelRunner(model, kv, device, next(model.parameters()).dtype, drafter, attention_backend)
    if cuda_graphs:
        runner.enable_cuda_graphs(max_num_seqs, lookahead, max_model_len)
    return LLMEngine(scheduler, runner, ByteTokenizer(), max_model_len, eos)


@torch.inference_mode()
def reference_greedy(hf_model, prompt: list[int], max_new_tokens: int, eos: tuple[int, ...] = ()) -> list[int]:
    """Plain greedy decoding by full forwards of a transformers model (no cache): the ground truth."""
    ids = list(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        tok = int(hf_model(torch.tensor([ids])).logits[0, -1].argmax())
        out.append(tok)
        ids.append(tok)
        if tok in eos:
            break
    return out


def random_prompts(n: int, seed: int, min_len: int, max_len: int, vocab: int = 211) -> list[list[int]]:
    """``n`` prompts of random length in [min_len, max_len) over token ids 3 .. vocab - 1."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(min_len, max_len, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def assert_matches_reference(engine, hf_model, prompts: list[list[int]], max_tokens: int) -> list:
    """Greedy-run every prompt together; each output must equal plain greedy decoding and the KV pool
    must be free afterwards. Returns the engine's ``Request`` objects (for further checks)."""
    from server.engine.request import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    reqs = [engine.add_request(f"r{i}", p, params) for i, p in enumerate(prompts)]
    got = run_to_completion(engine, {})
    for i, p in enumerate(prompts):
        assert got[f"r{i}"] == reference_greedy(hf_model, p, max_tokens), f"prompt {i}"
    assert engine.scheduler.kv.pool.usage == 0.0
    return reqs


def run_to_completion(engine, requests: dict[str, tuple[list[int], object]]) -> dict[str, list[int]]:
    """Add all requests, step until idle, return generated token ids per request id."""
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    got: dict[str, list[int]] = {rid: [] for rid in requests}
    while engine.has_unfinished():
        outputs, _ = engine.step()
        for o in outputs:
            got.setdefault(o.request_id, []).extend(o.token_ids)
    return got


class ChatByteTokenizer(ByteTokenizer):
    """Byte tokenizer with a trivial chat template (``<role>content\\n``)."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def word_records(n: int) -> list[dict]:
    """``n`` prompt/response records whose responses are random sequences of four words."""
    g = torch.Generator().manual_seed(5)
    words = ["alpha", "beta", "gamma", "delta"]
    out = []
    for i in range(n):
        picks = torch.randint(0, 4, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g).tolist()
        out.append({"id": f"r{i}", "prompt": f"q{i}", "response": " ".join(words[j] for j in picks)})
    return out


def tiny_features(work, records: list[dict], shard_size: int, cfg: dict, aux_layers: tuple[int, ...] = ()):
    """Drafter-training features of ``records`` under a random tiny target of ``cfg`` (and its ``aux_layers``):
    (HF model, meta)."""
    from drafters.train.features import chunk_records, extract_features, run_key

    model = hf_model_from(cfg)
    run = run_key("tiny", "mem", None, 48, 0, shard_size, aux_layers)
    meta = extract_features(model, ChatByteTokenizer(), chunk_records(records, shard_size), work, run, 48, 256)
    return model, meta


def tiny_eagle_net(target, aux_layers: tuple[int, ...] = (), seed: int = 4, std: float = 0.3):
    """A random one-layer EAGLE drafter on ``target``'s embedding and LM head (``tiny_hf_config`` dims), reading
    the target's ``aux_layers`` too when given."""
    from drafters.eagle_model import EagleConfig, EagleDrafter

    torch.manual_seed(seed)
    net = EagleDrafter(EagleConfig.from_target(tiny_hf_config(), aux_layers=aux_layers), target.embed_tokens.weight,
                       target.lm_head.weight).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, std)
    return net


def tiny_gumiho_net(target, mlp_num: int = 5, res_blocks: int = 2, seed: int = 4, std: float = 0.3):
    """A random two-layer Gumiho drafter on ``target``'s embedding and LM head (``tiny_hf_config`` dims)."""
    from drafters.gumiho_model import GumihoConfig, GumihoDrafter

    torch.manual_seed(seed)
    cfg = GumihoConfig.from_dict(tiny_hf_config(), num_hidden_layers=2, mlp_num=mlp_num, mlp_res_blocks=res_blocks)
    net = GumihoDrafter(cfg, target.embed_tokens.weight, target.lm_head.weight).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, std)
    return net


def feed_random_context(drafter, rid: str, tokens: list[int], hidden: int = 64) -> None:
    """Tell a feature drafter that ``tokens`` were committed for ``rid``, with random target features."""
    from drafters.base import AcceptUpdate

    g = torch.Generator().manual_seed(len(tokens))
    drafter.on_accept([AcceptUpdate(rid, 0, tokens[:-1], torch.randn(len(tokens) - 1, hidden, generator=g),
                                    tokens[-1], reset=True)])


def assert_batched_drafts_equal_solo(make_drafter, contexts: dict[str, list[int]], budget: int) -> None:
    """Trees proposed for all ``contexts`` in one batch equal those proposed one request at a time."""
    from drafters.base import DraftRequest
    from server.engine.request import SamplingParams

    solo = {}
    for rid, toks in contexts.items():
        d = make_drafter()
        feed_random_context(d, rid, toks)
        solo[rid] = d.propose([DraftRequest(rid, toks, SamplingParams(), budget)])[0]
    d = make_drafter()
    for rid, toks in contexts.items():
        feed_random_context(d, rid, toks)
    batched = d.propose([DraftRequest(rid, toks, SamplingParams(), budget) for rid, toks in contexts.items()])
    for (rid, _), tree in zip(contexts.items(), batched):
        assert tree.tokens == solo[rid].tokens and tree.parents == solo[rid].parents
        assert tree.scores == pytest.approx(solo[rid].scores, rel=1e-4, abs=1e-4)   # fp32 rounding of padded batches


def assert_drafter_lossless(hf_model, target, drafter, batch: int, seed: int, max_tokens: int = 25,
                            **engine_options) -> None:
    """Greedy output with ``drafter`` equals plain greedy for ``batch`` random prompts run together;
    drafts were made and accepted state and KV are released afterwards (``engine_options``: ``tiny_engine``'s)."""
    from server.engine.request import SamplingParams

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 211, (6 + i,), generator=g).tolist() for i in range(batch)]
    engine = tiny_engine(target, num_blocks=256, drafter=drafter, **engine_options)
    reqs = [engine.add_request(f"r{i}", p, SamplingParams(max_tokens=max_tokens, temperature=0.0))
            for i, p in enumerate(prompts)]
    got = run_to_completion(engine, {})
    for i, p in enumerate(prompts):
        assert got[f"r{i}"] == reference_greedy(hf_model, p, max_tokens)
    assert all(r.spec.verify_steps > 0 and r.spec.drafted_tokens > 0 for r in reqs)
    assert engine.scheduler.kv.pool.usage == 0.0 and not getattr(engine.runner.drafter, "states", None)


def chi2_sf(stat: float, dof: int) -> float:
    """Chi-square survival function ``Q(dof/2, stat/2)`` (regularized upper incomplete gamma)."""
    a, x = dof / 2.0, stat / 2.0
    if x <= 0.0:
        return 1.0
    log_prefix = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    tiny = 1e-300
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return math.exp(log_prefix) * h


def chi2_pvalue(samples: list[int], probs: torch.Tensor) -> float:
    """Pearson goodness-of-fit p-value of integer ``samples`` against ``probs``.  # probs [V]"""
    counts = Counter(samples)
    n = len(samples)
    expected = (probs * n).tolist()
    assert min(expected) >= 5.0, "too few draws for the chi-square approximation"
    stat = sum((counts.get(v, 0) - e) ** 2 / e for v, e in enumerate(expected))
    return chi2_sf(stat, len(expected) - 1)


def write_shard(path, records: list[tuple[list[int], list[int]]]) -> None:
    """A self-distillation shard (``treespec distill``'s format) of (prompt, answer) token lists."""
    import numpy as np

    seqs = [p + a for p, a in records]
    np.savez(path, tokens=np.array([t for s in seqs for t in s], dtype=np.uint16),
             offsets=np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64),
             prompt_lens=np.array([len(p) for p, _ in records], dtype=np.int32),
             temperature=np.zeros(len(records), dtype=np.float32),
             record_ids=np.array([f"r{i}" for i in range(len(records))]))
