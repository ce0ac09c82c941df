"""Many clients at once, and clients that go away mid-request: the server finishes or aborts, then idles."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

N_CLIENTS = 16
MAX_TOKENS = 24
TOPICS = ["cats", "the moon", "rivers", "bread", "chess", "volcanoes", "music", "winter", "robots", "gardens",
          "trains", "honey", "the desert", "libraries", "owls", "glass"]
COUNT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # greedy keeps counting: never stops on its own


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Tell me one fact about {TOPICS[i]}."}]


def test_concurrent_streams_match_solo_outputs(server_url, client, model_id, scrape, wait_idle):
    assert len(TOPICS) == N_CLIENTS
    wait_idle()
    solo = [client.chat.completions.create(model=model_id, messages=messages(i), temperature=0,
                                           max_tokens=MAX_TOKENS).choices[0] for i in range(N_CLIENTS)]

    async def one(ac, i: int) -> tuple[str, str | None, bool]:
        stream = await ac.chat.completions.create(model=model_id, messages=messages(i), temperature=0,
                                                  max_tokens=MAX_TOKENS, stream=True)
        text, finish, role = "", None, False
        async for chunk in stream:
            for ch in chunk.choices:
                role |= ch.delta.role == "assistant"
                text += ch.delta.content or ""
                finish = ch.finish_reason or finish
        return text, finish, role

    async def all_clients():
        import openai

        async with openai.AsyncOpenAI(base_url=f"{server_url}/v1", api_key="x", timeout=180.0, max_retries=0) as ac:
            return await asyncio.gather(*(one(ac, i) for i in range(N_CLIENTS)))

    results = asyncio.run(all_clients())
    assert len(results) == N_CLIENTS
    for i, ((text, finish, role), want) in enumerate(zip(results, solo)):
        assert role, f"client {i}: no role in the first delta"
        assert finish == want.finish_reason, (i, finish, want.finish_reason)
        assert text == want.message.content, (i, TOPICS[i])
    wait_idle(10)
    assert scrape("treespec_kv_cache_usage_ratio", model_name=model_id) == 0.0
    assert scrape("treespec_num_requests_running", model_name=model_id) == 0.0
    assert scrape("treespec_num_requests_waiting", model_name=model_id) == 0.0


def wait_running(scrape, at_least: int = 1, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while scrape("treespec_num_requests_running") < at_least:
        assert time.monotonic() < deadline, "request never started running"
        time.sleep(0.05)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_streaming_client_disconnect_aborts(server_url, model_id, scrape, wait_idle, path):
    wait_idle()
    body = {"model": model_id, "temperature": 0, "max_tokens": 2000, "stream": True}
    body.update({"messages": [{"role": "user", "content": "Write a very long story about a dragon."}]}
                if "chat" in path else {"prompt": COUNT})
    with httpx.Client(base_url=server_url, timeout=60.0) as c, c.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                assert line != "data: [DONE]"
                json.loads(line.removeprefix("data: "))
                got += 1
                if got == 3:
                    # (checked before leaving the loop: closing the line iterator closes the connection)
                    assert scrape("treespec_num_requests_running") == 1.0
                    assert scrape("treespec_kv_cache_usage_ratio") > 0.0
                    break
        assert got == 3
    # connection closed: the server must abort the request and free its KV blocks
    wait_idle(10)
    assert scrape("treespec_num_requests_running") == 0.0
    assert scrape("treespec_kv_cache_usage_ratio") == 0.0


def test_non_streaming_client_timeout_aborts(server_url, model_id, scrape, wait_idle, client):
    wait_idle()

    def aborts() -> float:
        try:
            return scrape("treespec_request_success_total", reason="abort")
        except AssertionError:  # no abort recorded yet
            return 0.0

    before_aborts = aborts()
    before_tokens = scrape("treespec_generation_tokens_total")
    body = {"model": model_id, "prompt": COUNT, "temperature": 0, "max_tokens": 2000}
    start = time.monotonic()
    with httpx.Client(base_url=server_url, timeout=1.5) as c, pytest.raises(httpx.TimeoutException):
        c.post("/v1/completions", json=body)
    assert time.monotonic() - start < 30
    wait_idle(10)
    # the server aborted it: counted as an abort, far fewer than the 2000 requested tokens generated
    assert aborts() == before_aborts + 1
    assert scrape("treespec_generation_tokens_total") - before_tokens < 1000
    # and the server keeps serving
    r = client.completions.create(model=model_id, prompt=COUNT, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length"
    wait_idle(10)


def test_disconnect_during_n2_stream_aborts_all_choices(server_url, model_id, scrape, wait_idle):
    wait_idle()
    body = {"model": model_id, "prompt": COUNT, "temperature": 0, "max_tokens": 2000, "n": 2,
            "stream": True}
    with httpx.Client(base_url=server_url, timeout=60.0) as c, c.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(4):
            while not next(lines).startswith("data: "):
                pass
        wait_running(scrape, 2)
        lines.close()
    wait_idle(10)
