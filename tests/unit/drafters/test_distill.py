"""Self-distillation data: the engine's answers, stored compactly, resumable, readable as training data."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from drafters.train.distill import chat_prompt_ids, distill, distill_shards, is_sampled, load_prompts
from drafters.train.features import (
    FREQ_FILE,
    feature_chunks,
    load_records,
    prepare_features,
    run_key,
    shard_groups,
    shard_records,
    split_shards,
    tokenize_record,
)
from tests.helpers import (
    ChatByteTokenizer,
    hf_model_from,
    native_from,
    reference_greedy,
    tiny_engine,
    tiny_hf_config,
)

MAX_NEW = 12


@pytest.fixture(scope="module")
def models():
    cfg = tiny_hf_config(vocab_size=300)
    hf = hf_model_from(cfg)
    return hf, native_from(cfg, hf.state_dict())


def _engine(native):
    engine = tiny_engine(native, num_blocks=512, max_num_seqs=4)
    engine.tokenizer = ChatByteTokenizer()
    return engine


def _data(tmp_path, n: int = 10):
    path = tmp_path / "prompts.jsonl"
    rows = [{"id": f"p{i}", "prompt": "ab" * (i % 4 + 1) + ("x" * 40 if i == 3 else "")} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(models, data, out, **kw):
    settings = {"seed": 3, "shard_size": 4, "max_new_tokens": MAX_NEW, "max_prompt_len": 30,
                "sample_share": 0.5, "temperature": 0.8}
    return distill(_engine(models[1]), data, out, **(settings | kw))


def test_shards_hold_the_targets_own_answers(tmp_path, models):
    data, out = _data(tmp_path), tmp_path / "distill"
    summary = _run(models, data, out)
    tok = ChatByteTokenizer()
    kept = [r for r in map(json.loads, data.read_text().splitlines())
            if len(chat_prompt_ids(tok, r["prompt"])) <= 30]
    assert len(kept) == 9                                          # the long prompt is skipped
    assert summary["records"] == 9 and summary["shards"] == 3
    seen = 0
    for path in distill_shards(out):
        with np.load(path) as shard:
            assert shard["tokens"].dtype == np.uint16
            for r, rid in enumerate(shard["record_ids"]):
                seq = shard["tokens"][shard["offsets"][r]:shard["offsets"][r + 1]].tolist()
                prompt = chat_prompt_ids(tok, next(k["prompt"] for k in kept if k["id"] == rid))
                plen = int(shard["prompt_lens"][r])
                assert seq[:plen] == prompt and len(seq) - plen == MAX_NEW
                sampled = is_sampled(3, str(rid), 0.5)
                assert shard["temperature"][r] == pytest.approx(0.8 if sampled else 0.0)
                if not sampled:                                   # greedy answers are plain greedy decoding
                    assert seq[plen:] == reference_greedy(models[0], prompt, MAX_NEW)
                seen += 1
    assert seen == 9
    assert 0 < summary["sampled"] < 9


def test_a_passed_time_budget_finishes_what_is_in_flight_and_returns(tmp_path, models):
    data, out = _data(tmp_path), tmp_path / "distill"
    summary = _run(models, data, out, max_minutes=1e-9)           # past the deadline before the first step
    assert summary["shards"] == 0 and distill_shards(out) == []
    assert json.loads((out / "meta.json").read_text())["summary"] == summary


def test_rerun_resumes_and_reproduces(tmp_path, models):
    data, out = _data(tmp_path), tmp_path / "distill"
    _run(models, data, out, max_shards=2)
    assert len(distill_shards(out)) == 2
    first = distill_shards(out)[0].read_bytes()
    distill_shards(out)[0].unlink()
    summary = _run(models, data, out)                              # redoes shard 0, adds shard 2
    assert summary["shards"] == 3 and len(json.loads((out / "meta.json").read_text())["runs"]) == 2
    with np.load(distill_shards(out)[0]) as again, np.load(io.BytesIO(first)) as before:
        for key in ("tokens", "offsets", "prompt_lens", "temperature"):
            assert np.array_equal(again[key], before[key])       # seeded sampling: same answers
    with pytest.raises(ValueError, match="another distillation run"):
        _run(models, data, out, temperature=1.0)


def test_distilled_folder_is_training_data(tmp_path, models):
    data, out = _data(tmp_path), tmp_path / "distill"
    _run(models, data, out)
    records = load_records(out, None, seed=0)
    assert len(records) == 9
    ids, mask = tokenize_record(None, records[0], max_len=1000)
    assert ids == records[0]["input_ids"]
    assert sum(mask) == MAX_NEW and not any(mask[:records[0]["prompt_len"]])
    chunks = feature_chunks(out, None, seed=0, shard_size=250)      # one feature shard per distillation shard
    assert [len(c) for c in chunks] == [4, 4, 1] and [r["id"] for c in chunks for r in c] == [
        r["id"] for path in distill_shards(out) for r in shard_records(path)]
    assert [len(c) for c in feature_chunks(out, 6, seed=0, shard_size=250)] == [4, 2]
    assert run_key("m", out, None, 512, 0, 250) == run_key("m", out, None, 512, 1, 100)   # seed, size: unused


def test_several_distilled_folders_train_together(tmp_path, models):
    from drafters.train.draft_model import split_records

    data = _data(tmp_path)
    _run(models, data, tmp_path / "a")
    _run(models, data, tmp_path / "b", limit=8)
    both = f"{tmp_path / 'a'},{tmp_path / 'b'}"
    assert len(load_records(both, None, seed=0)) == 9 + 8
    assert [len(c) for c in feature_chunks(both, None, 0, 250)] == [4, 4, 1, 4, 4]
    train, held = split_records(both, 1)
    assert (len(train), len(held)) == (8 + 4, 1 + 4)       # each folder's last shard held out (4 4 1 / 4 4)
    with pytest.raises(FileNotFoundError):
        load_records(f"{tmp_path / 'a'},{tmp_path / 'empty'}", None, seed=0)


def test_several_folders_extract_part_by_part(tmp_path, models):
    data, work, loads = _data(tmp_path), tmp_path / "work", []
    for name, limit in (("a", None), ("b", 8), ("c", 4)):
        _run(models, data, tmp_path / name, limit=limit)

    def load_target():
        loads.append(1)
        return models[0], ChatByteTokenizer()

    def prepare(names):
        data = ",".join(str(tmp_path / n) for n in names)
        return prepare_features(load_target, "m", data, work, max_len=48, shard_size=4, batch_tokens=256)

    meta = prepare(["a", "b"])
    assert (meta["parts"], meta["num_records"], len(loads)) == (["a", "b"], 9 + 8, 1)
    assert [len(g) for g in shard_groups(work)] == [3, 2]
    train, held = split_shards(work, 1)
    assert [p.relative_to(work).as_posix() for p in held] == ["a/shard_00002.pt", "b/shard_00001.pt"]
    assert len(train) == 3
    counts = [torch.load(work / d / FREQ_FILE) for d in ("", "a", "b")]
    assert torch.equal(counts[0], counts[1] + counts[2]) and int(counts[0].sum()) == meta["assistant_tokens"]

    first = (work / "a" / "shard_00000.pt").stat().st_mtime_ns
    assert prepare(["a", "b", "c"])["num_records"] == 9 + 8 + 4 and len(loads) == 2   # only c extracted
    assert prepare(["a", "b", "c"])["num_shards"] == 3 + 2 + 1 and len(loads) == 2    # nothing extracted
    assert (work / "a" / "shard_00000.pt").stat().st_mtime_ns == first
    (tmp_path / "x").mkdir()
    (tmp_path / "a").rename(tmp_path / "x" / "a")
    with pytest.raises(ValueError, match="distinct names"):
        prepare_features(load_target, "m", f"{tmp_path / 'x' / 'a'},{tmp_path / 'x' / 'a'}", work)


def test_a_grown_distillation_folder_only_adds_feature_shards(tmp_path, models):
    data, work, loads = _data(tmp_path), tmp_path / "work", []
    _run(models, data, tmp_path / "a")
    _run(models, data, tmp_path / "b", limit=4)

    def load_target():
        loads.append(1)
        return models[0], ChatByteTokenizer()

    both = f"{tmp_path / 'a'},{tmp_path / 'b'}"
    prepare_features(load_target, "m", both, work, max_len=48, shard_size=4, batch_tokens=256)
    assert [len(g) for g in shard_groups(work)] == [3, 1] and len(loads) == 1
    kept = {p: p.stat().st_mtime_ns for p in work.glob("*/shard_*.pt")}
    _run(models, data, tmp_path / "b", limit=8)                    # the distillation goes on: shard 1 of b
    meta = prepare_features(load_target, "m", both, work, max_len=48, shard_size=4, batch_tokens=256)
    assert (meta["num_records"], meta["num_shards"], len(loads)) == (9 + 8, 3 + 2, 2)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept         # earlier shards untouched
    new = torch.load(work / "b" / "shard_00001.pt", weights_only=False)
    assert new["record_ids"] == [r["id"] for r in shard_records(distill_shards(tmp_path / "b")[1])]
    assert [p.relative_to(work).as_posix() for p in split_shards(work, 1)[1]] == [
        "a/shard_00002.pt", "b/shard_00001.pt"]                    # the held-out shard moves to the new last one
    prepare_features(load_target, "m", both, work, max_len=48, shard_size=4, batch_tokens=256)
    assert len(loads) == 2                                         # complete again: nothing extracted
    with pytest.raises(ValueError, match="another run"):
        prepare_features(load_target, "m", both, work, max_len=64, shard_size=4, batch_tokens=256)


def test_spec_bench_questions_are_prompts_of_their_first_turn(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["first", "second"]}) + "\n")
    tok = ChatByteTokenizer()
    [(record, ids)] = load_prompts(path, tok, 0, 100, None)
    assert record == {"id": "81", "source": "writing", "prompt": "first"} and ids == chat_prompt_ids(tok, "first")
    path.write_text(json.dumps({"id": "x", "text": "no prompt"}) + "\n")
    with pytest.raises(ValueError, match="neither `prompt` nor"):
        load_prompts(path, tok, 0, 100, None)
