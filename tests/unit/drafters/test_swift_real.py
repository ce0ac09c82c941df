"""SWIFT on the real model: the skip set found while serving predicts unseen real text at least as well
as the initial set."""

from __future__ import annotations

import pytest

from drafters.base import DraftRequest
from drafters.swift_config import SwiftConfig
from drafters.swift_search import SearchConfig
from drafters.swift_skipset import SkipSet
from drafters.train.distill import chat_prompt_ids
from server.engine.request import SamplingParams

PROMPTS = ["Explain how a bicycle gear system works.", "Write a short story about a lighthouse keeper.",
           "List five tips for learning a new language, with one sentence each."]
HELD_OUT = "Describe the water cycle to a ten-year-old."


@pytest.mark.slow
def test_the_searched_skip_set_matches_held_out_text_at_least_as_well(default_model_dir):
    from server.build import build_engine
    from server.config import ServerConfig

    window = 16
    swift = SwiftConfig(search=SearchConfig(context_window=window, seed=0))
    engine, _ = build_engine(ServerConfig(model=str(default_model_dir), drafter="swift", num_kv_blocks=512,
                                          max_draft_tokens=8, swift=swift))
    drafter = engine.runner.drafter
    greedy = SamplingParams(max_tokens=72, temperature=0.0)
    for i, text in enumerate(PROMPTS):
        engine.add_request(f"p{i}", chat_prompt_ids(engine.tokenizer, text), greedy)
    while engine.has_unfinished():
        engine.step()
    search = drafter.store.get(drafter.default_task)
    assert search.iteration >= 30
    req = engine.add_request("held", chat_prompt_ids(engine.tokenizer, HELD_OUT),
                             SamplingParams(max_tokens=200, temperature=0.0))
    while req.num_output_tokens < 3 * window:
        engine.step()
    ask = DraftRequest("held", req.token_ids, req.params, 0, req.num_prompt_tokens)
    initial = drafter.matchness(ask, SkipSet.initial(drafter.num_layers), window)
    found = drafter.matchness(ask, search.best, window)
    print(f"held-out matchness: initial {initial:.3f}, found {found:.3f} after {search.iteration} iterations")
    assert found >= initial and search.best != SkipSet.initial(drafter.num_layers)
    engine.abort("held")
    assert engine.scheduler.kv.pool.usage == 0.0
