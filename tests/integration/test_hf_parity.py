"""Greedy decoding through the server equals ``transformers`` greedy generation on the same weights."""

from __future__ import annotations

import pytest
import torch

MAX_NEW = 32
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Explain photosynthesis in one sentence.",
    "List three primary colors.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
]


@pytest.fixture(scope="module")
def hf_model(default_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32)
    return model.eval()


@pytest.mark.parametrize("question", PROMPTS)
def test_greedy_matches_transformers(client, model_id, tokenizer, hf_model, question):
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=2, pad_token_id=2)
    new = out[0, len(ids):].tolist()
    want = tokenizer.decode(new, skip_special_tokens=True)

    r = client.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=MAX_NEW)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == want
    hf_finished = new[-1] == 2
    assert r.usage.completion_tokens == len(new)
    assert r.choices[0].finish_reason == ("stop" if hf_finished else "length")
