"""--max-request-bytes: a larger body gets 413 (OpenAI error body) before parsing, with or without a
Content-Length; smaller ones, chunked or not, reach the app intact."""

from __future__ import annotations

import json

from live_app import CHAT, chat

LIMIT = 1000


def chunked(data: bytes, size: int = 100):
    """A generator body: httpx sends it with Transfer-Encoding: chunked and no Content-Length."""
    for i in range(0, len(data), size):
        yield data[i:i + size]


def check_413(r) -> None:
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("invalid_request_error", "request_too_large")
    assert str(LIMIT) in err["message"]


def test_declared_length_over_the_limit_is_refused_before_parsing(live):
    with live(max_request_bytes=LIMIT).client() as http:
        check_413(http.post(CHAT, content=b"{" * (LIMIT + 1), headers={"content-type": "application/json"}))


def test_chunked_body_over_the_limit_is_refused(live):
    body = json.dumps(chat(user="x" * 2 * LIMIT)).encode()
    with live(max_request_bytes=LIMIT).client() as http:
        r = http.post(CHAT, content=chunked(body), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers
        check_413(r)


def test_bodies_within_the_limit_pass_intact(live):
    body = json.dumps(chat(user="x" * (LIMIT // 2))).encode()
    assert len(body) <= LIMIT
    with live(max_request_bytes=LIMIT).client() as http:
        for content in (body, chunked(body, 7)):
            r = http.post(CHAT, content=content, headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text


def test_zero_means_no_limit(live):
    r = live(max_request_bytes=0).post(chat(user="x" * 100 * LIMIT))
    assert r.status_code == 200, r.text
