"""Self-generated prompts (Magpie): the pre-query cut from the chat template, and real SmolLM2 user turns that
are kept, deduplicated (also against earlier files), reproducible, resumable and readable by
``treespec distill``."""

from __future__ import annotations

import json

import pytest

from drafters.train.distill import load_prompts
from drafters.train.self_prompts import SOURCE, generate_prompts, pre_query_ids, record_id
from tests.helpers import ChatByteTokenizer


def test_pre_query_is_the_template_before_the_user_message():
    tok = ChatByteTokenizer()
    assert tok.decode(pre_query_ids(tok)) == "<user>"


def test_record_ids_keep_the_first_files_and_name_other_seeds():
    assert record_id(0, 42) == "self-000042"
    assert record_id(1, 42) == "self-s1-000042" != record_id(2, 42)


def test_a_template_that_rewrites_the_message_is_refused():
    class Shouting(ChatByteTokenizer):
        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            return "".join(f"<{m['role']}>{m['content'].upper()}\n" for m in messages)

    with pytest.raises(ValueError, match="verbatim"):
        pre_query_ids(Shouting())


@pytest.mark.slow
def test_smollm2_writes_distinct_reproducible_prompts_and_resumes(default_model_dir, tmp_path):
    from server.build import build_engine
    from server.config import ServerConfig

    def engine():
        return build_engine(ServerConfig(model=str(default_model_dir), drafter="none", num_kv_blocks=256,
                                         calibrate_tree=False))[0]

    settings = {"seed": 1, "max_tokens": 64, "in_flight": 4}
    first = generate_prompts(engine(), tmp_path / "a.jsonl", 3, **settings)
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and first["kept"] == 3
    assert first["attempts"] >= 3 + sum(first["dropped"].values())
    assert len({r["prompt"].lower() for r in rows}) == 3 and all(r["source"] == SOURCE for r in rows)
    assert all(len(r["prompt"]) >= 16 and "<|im_end|>" not in r["prompt"] for r in rows)
    generate_prompts(engine(), tmp_path / "b.jsonl", 3, **settings)
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()     # seeded: same file
    resumed = generate_prompts(engine(), tmp_path / "a.jsonl", 5, **settings)
    more = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert more[:3] == rows and len(more) == 5 and resumed["kept"] == 5
    assert len({r["id"] for r in more}) == 5 and resumed["attempts"] > first["attempts"]
    loaded = load_prompts(tmp_path / "a.jsonl", engine().tokenizer, 0, 1024, None)
    assert sorted(r["id"] for r, _ in loaded) == sorted(r["id"] for r in more)
    other = generate_prompts(engine(), tmp_path / "c.jsonl", 2, avoid=[tmp_path / "a.jsonl"], **settings)
    fresh = {json.loads(line)["prompt"].lower() for line in (tmp_path / "c.jsonl").read_text().splitlines()}
    assert len(fresh) == 2 and not fresh & {r["prompt"].lower() for r in more}
    assert other["dropped"]["repeat"] >= 1                     # the same seed wrote a.jsonl's prompts first
