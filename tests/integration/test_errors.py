"""Malformed and invalid requests: always 4xx with an OpenAI error body, never a 500."""

from __future__ import annotations

import json

import pytest

MODEL_ID = "SmolLM2-135M-Instruct"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSGS = [{"role": "user", "content": "Hi"}]


def chat(**fields) -> dict:
    return {"model": MODEL_ID, "messages": MSGS, **fields}


def completion(**fields) -> dict:
    return {"model": MODEL_ID, "prompt": "Hello", **fields}


def without(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


# (id, path, body: dict/list -> JSON, bytes -> raw, status, expected param (None: must be null, ... : any), code)
ANY = ...
CASES = [
    ("invalid-json", CHAT, b'{"model": "x", "messages": [', 400, None, None),
    ("invalid-json-completions", COMPLETIONS, b"{not json}", 400, None, None),
    ("invalid-utf8", CHAT, b"\xff\xfe\x00garbage", 400, ANY, None),
    ("json-array-body", CHAT, [1, 2, 3], 400, None, None),
    ("json-string-body", CHAT, "hello", 400, None, None),
    ("json-null-body", CHAT, b"null", 400, ANY, None),
    ("empty-body", CHAT, b"", 400, ANY, None),
    ("max-tokens-wrong-type", CHAT, chat(max_tokens="lots"), 400, "max_tokens", None),
    ("temperature-wrong-type", CHAT, chat(temperature="hot"), 400, "temperature", None),
    ("stream-wrong-type", CHAT, chat(stream="sometimes"), 400, "stream", None),
    ("stream-int", CHAT, chat(stream=1), 400, "stream", None),
    ("max-tokens-numeric-string", CHAT, chat(max_tokens="16"), 400, "max_tokens", None),
    ("max-tokens-float", COMPLETIONS, completion(max_tokens=16.0), 400, "max_tokens", None),
    ("n-float", CHAT, chat(n=1.0), 400, "n", None),
    ("seed-string", CHAT, chat(seed="3"), 400, "seed", None),
    ("messages-wrong-type", CHAT, chat(messages="Hi"), 400, "messages", None),
    ("model-wrong-type", CHAT, chat(model=7), 400, "model", None),
    ("missing-model", CHAT, without(chat(), "model"), 400, "model", None),
    ("missing-messages", CHAT, without(chat(), "messages"), 400, "messages", None),
    ("empty-messages", CHAT, chat(messages=[]), 400, "messages", None),
    ("bad-role", CHAT, chat(messages=[{"role": "wizard", "content": "Hi"}]), 400, "messages.0.role", None),
    ("message-not-object", CHAT, chat(messages=["Hi"]), 400, "messages.0", None),
    ("image-content-part", CHAT,
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     400, ANY, None),
    ("unknown-model", CHAT, chat(model="gpt-4o"), 404, "model", "model_not_found"),
    ("unknown-model-completions", COMPLETIONS, completion(model="nope"), 404, "model", "model_not_found"),
    ("logprobs", CHAT, chat(logprobs=True), 400, "logprobs", None),
    ("top-logprobs", CHAT, chat(top_logprobs=3), 400, "top_logprobs", None),
    ("tools", CHAT, chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
     400, "tools", None),
    ("tool-choice", CHAT, chat(tool_choice="required"), 400, "tool_choice", None),
    ("presence-penalty", CHAT, chat(presence_penalty=0.5), 400, "presence_penalty", None),
    ("frequency-penalty", COMPLETIONS, completion(frequency_penalty=1.0), 400, "frequency_penalty", None),
    ("logit-bias", CHAT, chat(logit_bias={"50": 10}), 400, "logit_bias", None),
    ("response-format-json", CHAT, chat(response_format={"type": "json_object"}), 400, "response_format", None),
    ("echo", COMPLETIONS, completion(echo=True), 400, "echo", None),
    ("best-of", COMPLETIONS, completion(best_of=3), 400, "best_of", None),
    ("temperature-too-high", CHAT, chat(temperature=2.5), 400, "temperature", None),
    ("temperature-negative", COMPLETIONS, completion(temperature=-0.1), 400, "temperature", None),
    ("top-p-zero", CHAT, chat(top_p=0), 400, "top_p", None),
    ("top-p-above-one", CHAT, chat(top_p=1.5), 400, "top_p", None),
    ("n-zero", CHAT, chat(n=0), 400, "n", None),
    ("n-too-large", CHAT, chat(n=17), 400, "n", None),
    ("max-tokens-zero", CHAT, chat(max_tokens=0), 400, "max_tokens", None),
    ("max-tokens-negative", COMPLETIONS, completion(max_tokens=-5), 400, "max_tokens", None),
    ("max-completion-tokens-zero", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens", None),
    ("seed-too-large", CHAT, chat(seed=2**64), 400, "seed", None),
    ("unknown-field", CHAT, chat(foo=1), 400, "foo", None),
    ("unknown-field-completions", COMPLETIONS, completion(bar="baz"), 400, "bar", None),
    ("unknown-stream-option", CHAT, chat(stream=True, stream_options={"include_usage": True, "x": 1}),
     400, ANY, None),
    ("stream-options-without-stream", CHAT, chat(stream_options={"include_usage": True}), 400, ANY, None),
    ("empty-stop-string", CHAT, chat(stop=[""]), 400, "stop", None),
    ("too-many-stops", CHAT, chat(stop=[f"s{i}" for i in range(17)]), 400, "stop", None),
    ("empty-prompt", COMPLETIONS, completion(prompt=""), 400, "prompt", None),
    ("empty-prompt-list", COMPLETIONS, completion(prompt=[]), 400, "prompt", None),
    ("prompt-token-out-of-vocab", COMPLETIONS, completion(prompt=[1, 2, 10**7]), 400, "prompt", None),
    ("prompt-token-negative", COMPLETIONS, completion(prompt=[5, -1]), 400, "prompt", None),
    ("missing-prompt", COMPLETIONS, without(completion(), "prompt"), 400, "prompt", None),
    ("max-tokens-beyond-context", CHAT, chat(max_tokens=9000), 400, "max_tokens", "context_length_exceeded"),
    ("max-tokens-huge", COMPLETIONS, completion(max_tokens=10**12), 400, "max_tokens", "context_length_exceeded"),
]


def post(http, path: str, body):
    if isinstance(body, bytes):
        return http.post(path, content=body, headers={"content-type": "application/json"})
    return http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def check_error(r, status: int, param=ANY, code=None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    if param is not ANY:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_invalid_request(http, path, body, status, param, code):
    check_error(post(http, path, body), status, param, code)


@pytest.mark.parametrize(("path", "make"), [(CHAT, chat), (COMPLETIONS, completion)], ids=["chat", "completions"])
def test_invalid_request_when_streaming(http, path, make):
    """Validation happens before the stream starts: a plain 4xx, not an SSE body."""
    check_error(post(http, path, make(stream=True, temperature=3)), 400, "temperature")
    check_error(post(http, path, make(stream=True, model="other")), 404, "model", "model_not_found")


def test_context_length_message_names_prompt_and_max_tokens(http):
    prompt = [100 + i % 1000 for i in range(5000)]
    err = check_error(post(http, COMPLETIONS, completion(prompt=prompt, max_tokens=4000)), 400, "max_tokens",
                      "context_length_exceeded")
    assert "5000" in err["message"] and "4000" in err["message"], err["message"]
    assert "8192" in err["message"], err["message"]


def test_chat_context_length_message(http, tokenizer):
    text = tokenizer.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    n = len(tokenizer.encode(text, add_special_tokens=False))
    err = check_error(post(http, CHAT, chat(max_tokens=8190)), 400, "max_tokens", "context_length_exceeded")
    assert f"{n} in the prompt" in err["message"] and "8190" in err["message"], err["message"]


def test_prompt_alone_beyond_context(http):
    err = check_error(post(http, COMPLETIONS, completion(prompt=[200] * 8300)), 400, ANY)
    assert "8300" in err["message"], err["message"]


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/nope", 404), ("GET", "/v1/nope", 404), ("POST", "/v1/embeddings", 404),
    ("GET", "/v1/chat/completions", 405), ("DELETE", "/v1/models", 405),
])
def test_unknown_route_or_method(http, method, path, status):
    err = check_error(http.request(method, path), status)
    if status == 404:
        assert err["type"] == "not_found_error", err


def test_wrong_content_type(http):
    check_error(http.post(CHAT, content=json.dumps(chat()), headers={"content-type": "text/plain"}), 400)


@pytest.mark.parametrize(("path", "make"), [(CHAT, chat), (COMPLETIONS, completion)], ids=["chat", "completions"])
def test_null_optional_params_mean_default(http, path, make):
    """OpenAI accepts null for every optional parameter; it means the default."""
    nulls = dict.fromkeys(["temperature", "top_p", "n", "stream", "seed", "stop", "stream_options", "user",
                           "logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "response_format"])
    if path == CHAT:
        nulls.update(max_completion_tokens=None, tools=None, tool_choice=None)
    r = post(http, path, make(max_tokens=3, **nulls))
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"]) == 1 and body["usage"]["completion_tokens"] <= 3


@pytest.mark.parametrize(("body", "param"), [
    (chat(model=None), "model"), (chat(messages=None), "messages"), (completion(prompt=None), "prompt"),
    (chat(foo=None), "foo"),
], ids=["model", "messages", "prompt", "unknown-field"])
def test_null_required_or_unknown_field_rejected(http, body, param):
    check_error(post(http, COMPLETIONS if "prompt" in body else CHAT, body), 400, param)


def test_server_still_healthy_after_errors(http, client):
    assert http.get("/health").status_code == 200
    r = client.chat.completions.create(model=MODEL_ID, messages=MSGS, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(("path", "body", "param"), [
    (CHAT, b'{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages"),
    (COMPLETIONS, b'{"model": "SmolLM2-135M-Instruct", "prompt": "\\ud800"}', "prompt"),
], ids=["chat", "completions"])
def test_lone_surrogate_is_a_400(http, path, body, param):
    check_error(http.post(path, content=body, headers={"content-type": "application/json"}), 400, param)


@pytest.mark.parametrize("fields", [{"temperature": 1e-300}, {"temperature": 1e-40}, {"top_p": 1e-300},
                                    {"temperature": 1e-300, "top_p": 1e-300}], ids=["t300", "t40", "p300", "both"])
def test_extreme_sampling_parameters_sample_the_limit(http, fields):
    """Limits, not NaN: a vanishing temperature or top_p samples the argmax, exactly as greedy does."""
    greedy = post(http, CHAT, chat(max_tokens=8, temperature=0)).json()["choices"][0]["message"]["content"]
    r = post(http, CHAT, chat(max_tokens=8, seed=1, **fields))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == greedy


@pytest.mark.parametrize(("spec", "param"), [({"depth": 32}, "speculation.depth"), ({"top_k": 64}, "speculation.top_k"),
                                             ({"total_tokens": 257}, "speculation.total_tokens")],
                         ids=["depth", "top_k", "total_tokens"])
def test_speculation_knobs_are_bounded_by_the_server(http, spec, param):
    """A request may shrink its draft tree, never grow it past the server's flags (it would slow every step)."""
    r = post(http, CHAT, chat(max_tokens=3, speculation=spec))
    check_error(r, 400, param if spec.get("total_tokens", 0) <= 256 else ANY)


def test_smaller_speculation_knobs_are_honoured(http):
    r = post(http, CHAT, chat(max_tokens=4, temperature=0, speculation={"depth": 2, "top_k": 2, "total_tokens": 4}))
    assert r.status_code == 200, r.text
