"""API keys: with any configured, /v1/* needs ``Authorization: Bearer <key>`` (401 otherwise); /health and, by
default, /metrics stay open."""

from __future__ import annotations

import pytest
from live_app import chat

from server.api import middleware
from server.config import API_KEYS_ENV

KEYS = ["key-one", "key-two", "key-three"]


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def check_401(r) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["code"]) == ("invalid_request_error", "invalid_api_key")


def test_without_keys_the_api_is_open(live):
    with live().client() as http:
        assert http.get("/v1/models").status_code == 200


@pytest.mark.parametrize("headers", [{}, bearer("wrong"), {"Authorization": "Bearer"},
                                     {"Authorization": "Basic key-one"}, {"Authorization": "key-one"},
                                     bearer("key-one-and-more")],
                         ids=["none", "wrong", "empty", "basic", "no-scheme", "prefix"])
def test_v1_routes_need_a_valid_key(live, headers):
    with live(api_key=KEYS).client(headers=headers) as http:
        check_401(http.get("/v1/models"))
        check_401(http.post("/v1/chat/completions", json=chat()))
        check_401(http.post("/v1/completions", content=b"{not json"))   # refused before the body is read
        check_401(http.get("/v1/no-such-route"))


@pytest.mark.parametrize("key", KEYS)
def test_every_configured_key_works(live, key):
    srv = live(api_key=KEYS)
    with srv.client(headers=bearer(key)) as http:
        assert http.get("/v1/models").status_code == 200
        assert http.post("/v1/chat/completions", json=chat()).status_code == 200
    with srv.client(headers={"Authorization": f"bearer {key}"}) as http:   # the scheme is case-insensitive
        assert http.get("/v1/models").status_code == 200


def test_health_and_metrics_stay_open_unless_metrics_are_protected(live):
    with live(api_key=KEYS).client() as http:
        assert http.get("/health").status_code == 200
        assert http.get("/metrics").status_code == 200
    with live(api_key=KEYS, protect_metrics=True).client() as http:
        assert http.get("/health").status_code == 200
        check_401(http.get("/metrics"))
        assert http.get("/metrics", headers=bearer(KEYS[1])).status_code == 200


def test_keys_from_the_environment_and_a_file(live, monkeypatch, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("file-key\n\n")
    monkeypatch.setenv(API_KEYS_ENV, "env-a, env-b")
    srv = live(api_key_file=str(keys))
    with srv.client() as http:
        check_401(http.get("/v1/models"))
        for key in ("env-a", "env-b", "file-key"):
            assert http.get("/v1/models", headers=bearer(key)).status_code == 200


def test_every_key_is_compared_whatever_matches(live, monkeypatch):
    """No early exit on the first match: the comparison count does not depend on the key presented."""
    calls = []
    compare = middleware.hmac.compare_digest
    monkeypatch.setattr(middleware.hmac, "compare_digest", lambda a, b: calls.append(1) or compare(a, b))
    with live(api_key=KEYS).client() as http:
        for key in (KEYS[0], KEYS[2], "wrong"):
            calls.clear()
            http.get("/v1/models", headers=bearer(key))
            assert len(calls) == len(KEYS), key
