"""Loading a draft model (safetensors folder or GGUF) for the ``draft-model`` drafter, and its tokenizer check.

A draft model must share the target's tokenizer: its token ids are the target's. When the draft
brings a tokenizer (a GGUF file always does; a folder with ``tokenizer.json``, ``tokenizer_config.json``
or ``tokenizer.model``), its vocabulary (token -> id) and its BOS/EOS ids must equal the target's, else
a ``ValueError`` names both paths. A draft checkpoint may leave out its token embedding and LM head
(``model.embed_tokens.weight``, ``lm_head.weight``): it then reads the target's (the same tensors, not
copies), as the shipped SmolLM2 draft model does, and it is checked by vocabulary size alone, having no
tokenizer of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from server.models.llama import LlamaConfig, LlamaModel
from server.models.loader import load_tokenizer, load_weights

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def has_tokenizer(path: str | Path) -> bool:
    p = Path(path)
    return p.is_file() or any((p / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_signature(tokenizer: Any) -> tuple[dict[str, int], int | None, int | None]:
    """What must agree between draft and target: the vocabulary and the BOS/EOS ids."""
    return tokenizer.get_vocab(), tokenizer.bos_token_id, tokenizer.eos_token_id


def check_tokenizers(draft_path: str | Path, target_path: str | Path) -> None:
    """``ValueError`` naming both paths unless the draft model's tokenizer equals the target's."""
    draft, target = tokenizer_signature(load_tokenizer(draft_path)), tokenizer_signature(load_tokenizer(target_path))
    if draft[0] != target[0]:
        only_draft = len(set(draft[0].items()) - set(target[0].items()))
        raise ValueError(f"draft model {draft_path} and target {target_path} have different tokenizers: "
                         f"{only_draft} of the draft's {len(draft[0])} (token, id) pairs are not the target's "
                         f"({len(target[0])} tokens); a draft model must share the target's tokenizer")
    if draft[1:] != target[1:]:
        raise ValueError(f"draft model {draft_path} and target {target_path} have different special tokens: "
                         f"BOS/EOS ids {draft[1:]} vs {target[1:]}")


def load_draft_model(path: str | Path, target: LlamaModel, target_path: str | Path | None = None,
                     dtype: torch.dtype | None = None) -> LlamaModel:
    """The draft model at ``path`` on the target's device (``dtype``: default the target's), in eval mode.

    ``target_path``: the target's folder or GGUF, for the tokenizer check (None: skip it)."""
    hf_cfg, state = load_weights(path)
    weight = target.embed_tokens.weight
    dtype = dtype or weight.dtype
    shared = [name for name in (EMBED, HEAD) if name not in state and not (name == HEAD and EMBED in state
                                                                             and hf_cfg.get("tie_word_embeddings"))]
    if target_path is not None and has_tokenizer(path):
        check_tokenizers(path, target_path)
    elif target_path is not None and EMBED in state:
        raise ValueError(f"draft model {path} has its own embedding but no tokenizer to check against the "
                         f"target {target_path} (add its tokenizer files)")
    cfg = LlamaConfig.from_hf(hf_cfg)
    if cfg.vocab_size > target.config.vocab_size:
        raise ValueError(f"draft model {path} has a larger vocabulary ({cfg.vocab_size}) than the target "
                         f"{target_path or ''} ({target.config.vocab_size})")
    if shared and (cfg.vocab_size, cfg.hidden_size) != tuple(weight.shape):
        raise ValueError(f"draft model {path} reads the target's embedding/LM head {tuple(weight.shape)} but is "
                         f"[{cfg.vocab_size}, {cfg.hidden_size}]")
    model = LlamaModel(cfg)
    model.load_hf_state_dict({**state, EMBED: state.get(EMBED, weight.detach().cpu()),
                              **({HEAD: target.lm_head.weight.detach().cpu()} if HEAD in shared else {})})
    model = model.to(device=weight.device, dtype=dtype).eval()
    if dtype == weight.dtype:            # share the target's tensors instead of keeping copies
        if EMBED in shared:
            model.embed_tokens.weight = target.embed_tokens.weight
        if HEAD in shared or (EMBED in shared and cfg.tie_word_embeddings):
            model.lm_head.weight = target.lm_head.weight
    return model


def build_draft_model_drafter(cfg: Any, target: LlamaModel, path: str | Path) -> Any:
    """The ``draft-model`` drafter of a ``ServerConfig`` (its ``draft_model`` options) for the loaded target."""
    from drafters.draft_model import DraftModelDrafter
    from server.build import kv_blocks, resolve_model_path

    opts = cfg.draft_model
    weight = target.embed_tokens.weight
    dtype = weight.dtype if opts.dtype == "auto" else getattr(torch, opts.dtype)
    model = load_draft_model(path, target, resolve_model_path(cfg.model), dtype)
    depth = opts.depth or cfg.draft_depth or DraftModelDrafter.default_depth
    top_k = opts.top_k or cfg.draft_top_k
    slots = opts.kv_tokens or (kv_blocks(cfg, target, weight.dtype) * cfg.block_size
                               + cfg.max_num_seqs * (depth * top_k + 1))   # every committed token + scratch
    return DraftModelDrafter.create(model, slots, cfg.max_draft_tokens, depth, top_k, opts.chunk,
                                    cfg.attention_backend)
