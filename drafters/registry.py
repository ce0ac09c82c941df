"""Drafter names -> factories; the engine builder looks methods up here (no method switches elsewhere)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from drafters.base import Drafter

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Factory = Callable[..., Drafter | None]


def _lookup(cfg, target) -> Drafter:
    from drafters.lookup import LookupDrafter

    return LookupDrafter(max_tree_tokens=cfg.max_draft_tokens)


CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
SHIPPED = {"SmolLM2-135M-Instruct": {"eagle": CHECKPOINTS / "smollm2-eagle",
                                     "gumiho": CHECKPOINTS / "smollm2-gumiho",
                                     "medusa": CHECKPOINTS / "smollm2-medusa",
                                     "draft-model": CHECKPOINTS / "smollm2-draft",
                                     "hybrid": CHECKPOINTS / "smollm2-hybrid"}}  # acceptance.json only (see _hybrid)


DATA = Path(__file__).resolve().parent / "data"
SHIPPED_CORPUS = {"SmolLM2-135M-Instruct": [DATA / "smollm2-distill", DATA / "smollm2-distill-self",
                                           DATA / "smollm2-distill-self2", DATA / "smollm2-distill-self3",
                                           DATA / "smollm2-distill-self4", DATA / "smollm2-distill-self5"]}


def shipped_name(model: str) -> str:
    """The key of ``SHIPPED`` for a model given as ``default`` or a path to its folder."""
    return "SmolLM2-135M-Instruct" if model == "default" else Path(model).name


def shipped_drafter(model: str, method: str = "eagle") -> Path | None:
    """The ``method`` drafter shipped for a model given as ``default`` or a path to the embedded model's folder."""
    return SHIPPED.get(shipped_name(model), {}).get(method)


def _checkpoint(cfg, method: str) -> Path:
    path = cfg.drafter_path or shipped_drafter(cfg.model, method)
    if path is None:
        raise ValueError(f"--drafter {method} needs --drafter-path (a {method} checkpoint folder) for this model")
    return Path(path)


def draft_weight_dtype(option: str, target_weight) -> torch.dtype:
    """The dtype of a drafter's weight matrices for ``--draft-weights`` (``auto``: bf16 for an fp32 target on a
    CPU with native bf16 products, else the target's dtype)."""
    import torch

    from kernels.linear import bf16_supported

    if option != "auto":
        return getattr(torch, option)
    cpu_fp32 = target_weight.dtype == torch.float32 and target_weight.device.type == "cpu"
    return torch.bfloat16 if cpu_fp32 and bf16_supported() else target_weight.dtype


def _eagle(cfg, target) -> Drafter:
    from drafters.eagle import EagleTreeDrafter
    from drafters.eagle_model import load_checkpoint

    path = _checkpoint(cfg, "eagle")
    net = load_checkpoint(path, target.embed_tokens, target.lm_head, cfg.draft_head_vocab)
    net.cast_matrices(draft_weight_dtype(cfg.draft_weights, target.embed_tokens.weight))
    drafter = EagleTreeDrafter(net, cfg.max_draft_tokens, cfg.draft_depth, cfg.draft_top_k)
    drafter.acceptance_profile = load_acceptance_profile(path)
    return drafter


def _gumiho(cfg, target) -> Drafter:
    from drafters.gumiho import GumihoTreeDrafter
    from drafters.gumiho_model import load_gumiho_checkpoint

    path = _checkpoint(cfg, "gumiho")
    net = load_gumiho_checkpoint(path, target.embed_tokens, target.lm_head, cfg.draft_head_vocab)
    net.cast_matrices(draft_weight_dtype(cfg.draft_weights, target.embed_tokens.weight))
    drafter = GumihoTreeDrafter(net, cfg.max_draft_tokens, cfg.draft_depth, cfg.draft_top_k,
                                cfg.draft_pruning, cfg.draft_pruning)
    drafter.acceptance_profile = load_acceptance_profile(path)
    return drafter


def _hybrid(cfg, target) -> Drafter:
    """Prompt lookup grafted onto the EAGLE drafter's tree (``_eagle``: shipped checkpoint or --drafter-path).

    Acceptance profile hook: ``acceptance.json`` in the shipped ``hybrid`` folder (tau of the hybrid with the
    shipped EAGLE checkpoint, e.g. written by ``bench --compare hybrid --save-acceptance`` once the folder
    exists) when no --drafter-path is given; otherwise the EAGLE checkpoint's own profile.
    """
    from drafters.hybrid import HybridDrafter

    model = _eagle(cfg, target)
    drafter = HybridDrafter(model, cfg.hybrid, cfg.max_draft_tokens, corpus_index(cfg))
    folder = None if cfg.drafter_path else shipped_drafter(cfg.model, "hybrid")
    drafter.acceptance_profile = (load_acceptance_profile(folder) if folder else None) or model.acceptance_profile
    return drafter


def corpus_index(cfg):
    """The hybrid's corpus index for ``cfg.hybrid.corpus`` ('auto': the model's shipped self-distillation
    answers, if any; 'none'; or comma-joined distillation folders), or None."""
    from drafters.corpus import CorpusIndex

    choice = cfg.hybrid.corpus.strip()
    if choice == "none":
        return None
    data = ",".join(map(str, SHIPPED_CORPUS.get(shipped_name(cfg.model), []))) if choice == "auto" else choice
    if not data:
        return None
    index = CorpusIndex.from_distillations(data, **cfg.hybrid.corpus_options())
    log.info("hybrid corpus lookup: %d tokens from %s", index.num_tokens, data)
    return index


def _swift(cfg, target) -> Drafter:
    """SWIFT drafts with the target itself (no checkpoint); skip sets are searched per task while serving."""
    from drafters.swift import SwiftDrafter

    name = cfg.served_model_name or Path(cfg.model).name
    return SwiftDrafter(target.config.num_hidden_layers, cfg.max_draft_tokens, name, cfg.swift)


def _medusa(cfg, target) -> Drafter:
    """Medusa heads (shipped checkpoint or --drafter-path) with the ``medusa`` options' tree."""
    from drafters.medusa import MedusaDrafter

    path = _checkpoint(cfg, "medusa")
    drafter = MedusaDrafter.from_checkpoint(path, target.lm_head, cfg.max_draft_tokens, cfg.medusa)
    drafter.acceptance_profile = load_acceptance_profile(path)
    return drafter


def _draft_model(cfg, target) -> Drafter:
    """A small Llama-family model (--drafter-path: safetensors folder or GGUF; default: the shipped one) that
    shares the target's tokenizer, drafting with its own paged KV (``drafters.draft_model``)."""
    from drafters.draft_model_load import build_draft_model_drafter

    path = _checkpoint(cfg, "draft-model")
    drafter = build_draft_model_drafter(cfg, target, path)
    drafter.acceptance_profile = load_acceptance_profile(path) if path.is_dir() else None
    return drafter


def _gsd(cfg, target) -> Drafter:
    """GSD (the ``gsd`` options) over the draft-model drafter (``_draft_model``: shipped or --drafter-path), its
    scratch KV sized for ``gsd.max_nodes`` fed nodes per request (depth x top-k >= max_nodes)."""
    from drafters.gsd import GsdDrafter

    opts = cfg.gsd
    shape = {"depth": opts.max_steps, "top_k": -(-opts.max_nodes // opts.max_steps)}
    inner = _draft_model(cfg.model_copy(update={"draft_model": cfg.draft_model.model_copy(update=shape)}), target)
    return GsdDrafter(inner, opts)


def load_acceptance_profile(folder: Path) -> dict[int, float] | None:
    """``acceptance.json`` beside a checkpoint: ``{"tau_by_budget": {"8": 2.1, ...}}`` measured by bench."""
    f = folder / "acceptance.json"
    if not f.is_file():
        return None
    return {int(k): float(v) for k, v in json.loads(f.read_text())["tau_by_budget"].items()}


def save_acceptance_profile(folder: Path, tau_by_budget: dict[int, float], **meta) -> Path:
    """Write ``folder/acceptance.json`` (what ``load_acceptance_profile`` reads): τ by budget, rounded to 4
    places, then ``meta`` (where it was measured)."""
    path = Path(folder) / "acceptance.json"
    data = {"tau_by_budget": {str(b): round(t, 4) for b, t in sorted(tau_by_budget.items())}, **meta}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _auto(cfg, target) -> Drafter | None:
    """The hybrid (prompt lookup + EAGLE) when the model has a shipped EAGLE drafter (or ``--drafter-path``
    is given), else none. Measured on the embedded model (bench/results/README.md, "Speculation that pays"):
    the hybrid accepts more than EAGLE or lookup alone and generalises to copy-heavy requests."""
    if cfg.drafter_path is None and shipped_drafter(cfg.model, "eagle") is None:
        return None
    return _hybrid(cfg, target)


DRAFTERS: dict[str, Factory] = {
    "auto": _auto,
    "none": lambda cfg, target: None,
    "lookup": _lookup,
    "eagle": _eagle,
    "gumiho": _gumiho,
    "hybrid": _hybrid,
    "swift": _swift,
    "draft-model": _draft_model,
    "gsd": _gsd,
    "medusa": _medusa,
}


def build_drafter(name: str, cfg, target) -> Drafter | None:
    """``cfg`` is the ServerConfig, ``target`` the loaded target model."""
    if name not in DRAFTERS:
        raise ValueError(f"unknown drafter {name!r}; available: {sorted(DRAFTERS)}")
    return DRAFTERS[name](cfg, target)
