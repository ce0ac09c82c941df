"""The official ``openai`` client against the real server: chat and text completions, streaming, sampling."""

from __future__ import annotations

import json

import pytest

STORY = [{"role": "user", "content": "Write a long story about a dragon."}]
HELLO = [{"role": "user", "content": "Hello! How are you today?"}]
PROMPT = "The capital of France is"
COUNT = "1, 2, 3, 4, 5,"


def chat_text(client, model_id, messages, **kw):
    r = client.chat.completions.create(model=model_id, messages=messages, temperature=0, **kw)
    return r


# ----------------------------------------------------------------------------- chat


def test_chat_non_streaming(client, model_id):
    r = chat_text(client, model_id, HELLO, max_tokens=12)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == model_id
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0 and c.message.role == "assistant"
    assert isinstance(c.message.content, str) and c.message.content.strip()
    assert c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_matches_non_streaming(client, model_id):
    want = chat_text(client, model_id, HELLO, max_tokens=16)
    chunks = list(client.chat.completions.create(model=model_id, messages=HELLO, temperature=0, max_tokens=16,
                                                 stream=True))
    assert chunks, "no chunks"
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == model_id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == want.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_stream_include_usage(client, model_id):
    want = chat_text(client, model_id, HELLO, max_tokens=8)
    chunks = list(client.chat.completions.create(model=model_id, messages=HELLO, temperature=0, max_tokens=8,
                                                 stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens == want.usage.prompt_tokens
    assert last.usage.completion_tokens == want.usage.completion_tokens
    assert last.usage.total_tokens == want.usage.total_tokens
    assert chunks[-2].choices[0].finish_reason == want.choices[0].finish_reason
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_raw_sse_ends_with_done(http, model_id):
    body = {"model": model_id, "messages": HELLO, "temperature": 0, "max_tokens": 6, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.strip()]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)
    payloads = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_max_tokens(client, model_id):
    r = chat_text(client, model_id, STORY, max_tokens=5)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5


def test_chat_max_completion_tokens(client, model_id):
    r = chat_text(client, model_id, STORY, max_completion_tokens=7)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7


def test_max_completion_tokens_takes_precedence(client, model_id):
    r = chat_text(client, model_id, STORY, max_tokens=12, max_completion_tokens=4)
    assert r.usage.completion_tokens == 4


def test_chat_max_tokens_streaming(client, model_id):
    chunks = list(client.chat.completions.create(model=model_id, messages=STORY, temperature=0, max_tokens=5,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 5
    assert chunks[-2].choices[0].finish_reason == "length"


def test_chat_content_parts(client, model_id):
    want = chat_text(client, model_id, HELLO, max_tokens=10)
    parts = [{"type": "text", "text": "Hello! "}, {"type": "text", "text": "How are you today?"}]
    got = chat_text(client, model_id, [{"role": "user", "content": parts}], max_tokens=10)
    assert got.usage.prompt_tokens == want.usage.prompt_tokens
    assert got.choices[0].message.content == want.choices[0].message.content


def prompt_len(tokenizer, messages) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_chat_system_message(client, model_id, tokenizer):
    system = {"role": "system", "content": "You are a pirate. Always answer like a pirate."}
    default = chat_text(client, model_id, HELLO, max_tokens=10)
    custom = chat_text(client, model_id, [system, *HELLO], max_tokens=10)
    assert default.usage.prompt_tokens == prompt_len(tokenizer, HELLO)
    assert custom.usage.prompt_tokens == prompt_len(tokenizer, [system, *HELLO])
    assert custom.usage.prompt_tokens != default.usage.prompt_tokens
    # 'developer' is OpenAI's new name for the system role
    dev = chat_text(client, model_id, [{**system, "role": "developer"}, *HELLO], max_tokens=10)
    assert dev.usage.prompt_tokens == custom.usage.prompt_tokens
    assert dev.choices[0].message.content == custom.choices[0].message.content


def test_chat_multi_turn(client, model_id, tokenizer):
    convo = [*HELLO, {"role": "assistant", "content": "I'm fine, thanks!"},
             {"role": "user", "content": "What is two plus two?"}]
    r = chat_text(client, model_id, convo, max_tokens=8)
    assert r.usage.prompt_tokens == prompt_len(tokenizer, convo)
    assert r.choices[0].message.content


def test_chat_n2(client, model_id):
    r = client.chat.completions.create(model=model_id, messages=HELLO, temperature=0.8, seed=7, max_tokens=6, n=2)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.message.role == "assistant" and c.message.content for c in r.choices)
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert 0 < r.usage.completion_tokens <= 12
    single = chat_text(client, model_id, HELLO, max_tokens=1)
    assert r.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt is counted once


def test_chat_n2_greedy_identical(client, model_id):
    r = chat_text(client, model_id, HELLO, max_tokens=6, n=2)
    assert r.choices[0].message.content == r.choices[1].message.content


def test_chat_n2_streaming(client, model_id):
    chunks = list(client.chat.completions.create(model=model_id, messages=HELLO, temperature=0, max_tokens=6, n=2,
                                                 stream=True))
    texts, roles, finish = {0: "", 1: ""}, set(), {}
    for c in chunks:
        for ch in c.choices:
            if ch.delta.role:
                roles.add(ch.index)
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert roles == {0, 1} and set(finish) == {0, 1}
    want = chat_text(client, model_id, HELLO, max_tokens=6).choices[0].message.content
    assert texts == {0: want, 1: want}


def test_seed_reproducible(client, model_id):
    def sample(seed):
        r = client.chat.completions.create(model=model_id, messages=STORY, temperature=0.8, seed=seed, max_tokens=12)
        return r.choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(s) != first for s in (1, 2, 3, 4)), "different seeds never changed the sample"


def test_seed_reproducible_streaming(client, model_id):
    r = client.chat.completions.create(model=model_id, messages=STORY, temperature=0.8, seed=99, max_tokens=10)
    chunks = client.chat.completions.create(model=model_id, messages=STORY, temperature=0.8, seed=99,
                                            max_tokens=10, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content


def pick_stop(text: str) -> str:
    """A stop string that occurs in ``text`` (first occurrence well after the start)."""
    words = text.split()
    for w in words[3:]:
        i = text.find(w)
        if len(w) >= 3 and i > 5:
            return w
    raise AssertionError(f"no usable stop word in {text!r}")


def test_chat_stop_string(client, model_id):
    full = chat_text(client, model_id, STORY, max_tokens=24).choices[0].message.content
    stop = pick_stop(full)
    r = chat_text(client, model_id, STORY, max_tokens=24, stop=stop)
    text = r.choices[0].message.content
    assert stop not in text
    assert r.choices[0].finish_reason == "stop"
    assert text == full[:full.find(stop)]
    # streaming: same truncation, same finish reason
    chunks = list(client.chat.completions.create(model=model_id, messages=STORY, temperature=0, max_tokens=24,
                                                 stop=[stop, "zzzqqq"], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completion_stop_string(client, model_id):
    full = client.completions.create(model=model_id, prompt=COUNT, temperature=0, max_tokens=16).choices[0].text
    assert " 9," in full, full
    r = client.completions.create(model=model_id, prompt=COUNT, temperature=0, max_tokens=16, stop=" 9,")
    assert r.choices[0].text == full[:full.find(" 9,")]
    assert " 9," not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"


# ----------------------------------------------------------------------------- text completions


def test_completion_non_streaming(client, model_id):
    r = client.completions.create(model=model_id, prompt=COUNT, temperature=0, max_tokens=8)
    assert r.object == "text_completion"
    assert r.id.startswith("cmpl-")
    assert r.model == model_id
    c = r.choices[0]
    assert c.index == 0
    assert c.text.startswith(" 6, 7,"), c.text
    assert c.finish_reason == "length"
    assert r.usage.completion_tokens == 8


def test_completion_streaming_matches_non_streaming(client, model_id):
    want = client.completions.create(model=model_id, prompt=PROMPT, temperature=0, max_tokens=12)
    chunks = list(client.completions.create(model=model_id, prompt=PROMPT, temperature=0, max_tokens=12,
                                            stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == want.usage.prompt_tokens
    assert chunks[-2].choices[0].finish_reason == want.choices[0].finish_reason


def test_completion_raw_sse_ends_with_done(http, model_id):
    body = {"model": model_id, "prompt": COUNT, "temperature": 0, "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln.strip()]
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(p["choices"][0]["text"] for p in payloads).startswith(" 6,")


def test_completion_token_id_prompt(client, model_id, tokenizer):
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    by_text = client.completions.create(model=model_id, prompt=PROMPT, temperature=0, max_tokens=6)
    by_ids = client.completions.create(model=model_id, prompt=ids, temperature=0, max_tokens=6)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids)


def test_completion_batch_prompts(client, model_id):
    a = client.completions.create(model=model_id, prompt=PROMPT, temperature=0, max_tokens=5).choices[0].text
    b = client.completions.create(model=model_id, prompt=COUNT, temperature=0, max_tokens=5).choices[0].text
    r = client.completions.create(model=model_id, prompt=[PROMPT, COUNT], temperature=0, max_tokens=5)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [a, b]


def test_completion_n2(client, model_id):
    r = client.completions.create(model=model_id, prompt=PROMPT, temperature=0.8, seed=5, max_tokens=5, n=2)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens <= 10


def test_completion_max_tokens(client, model_id):
    r = client.completions.create(model=model_id, prompt=COUNT, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


@pytest.mark.parametrize("stream", [False, True])
def test_finish_reason_stop_at_eos(client, model_id, stream):
    """A short greedy answer ends on the end-of-turn token: finish_reason 'stop', below the limit."""
    msgs = [{"role": "user", "content": "Reply with just the word 'yes'."}]
    if not stream:
        r = chat_text(client, model_id, msgs, max_tokens=48)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        assert r.usage.completion_tokens < 48
        assert "<|im_end|>" not in r.choices[0].message.content
    else:
        chunks = list(client.chat.completions.create(model=model_id, messages=msgs, temperature=0, max_tokens=48,
                                                     stream=True))
        assert chunks[-1].choices[0].finish_reason == "stop"
