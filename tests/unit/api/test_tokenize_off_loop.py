"""Tokenisation and chat templating run off the event loop: /health answers while a prompt is tokenised."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from live_app import CHAT, WAIT_S, chat


@pytest.mark.parametrize(("method", "path", "body"), [
    ("apply_chat_template", CHAT, chat()),
    ("encode", "/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 2}),
], ids=["chat-template", "encode"])
def test_health_answers_while_a_prompt_is_tokenised(live, method, path, body):
    srv = live()
    tokenizer = srv.llm.tokenizer
    entered, release = threading.Event(), threading.Event()
    released_in_time = []
    original = getattr(tokenizer, method)

    def slow(*args, **kwargs):        # blocks until the test has had its /health answer
        entered.set()
        released_in_time.append(release.wait(WAIT_S))
        return original(*args, **kwargs)

    setattr(tokenizer, method, slow)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(srv.post, body, path)
        try:
            assert entered.wait(WAIT_S), "the request never reached the tokenizer"
            with srv.client(timeout=2 * WAIT_S) as http:
                health = http.get("/health")
        finally:
            release.set()
        assert pending.result().status_code == 200
    assert health.status_code == 200
    assert released_in_time == [True], "/health only answered after the tokenizer gave up waiting"
