"""Strict OpenAI types (400 naming the parameter) and an OpenAPI schema that documents the statuses sent."""

from __future__ import annotations

import pytest
from live_app import CHAT, chat, start_live

from server.config import API_KEYS_ENV

COMPLETIONS = "/v1/completions"


def completion(**fields) -> dict:
    return {"model": "tiny", "prompt": "Hi", "max_tokens": 2, **fields}


@pytest.fixture(scope="module")
def server(tiny_pair):
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(API_KEYS_ENV, raising=False)
        srv = start_live(tiny_pair[1])
    yield srv
    srv.stop()


LOOSE = [
    (CHAT, chat(stream="yes"), "stream"),
    (CHAT, chat(stream=1), "stream"),
    (CHAT, chat(stream=True, stream_options={"include_usage": 1}), "stream_options.include_usage"),
    (CHAT, chat(max_tokens="16"), "max_tokens"),
    (CHAT, chat(max_tokens=16.0), "max_tokens"),
    (CHAT, chat(max_tokens=True), "max_tokens"),
    (CHAT, chat(max_completion_tokens="8"), "max_completion_tokens"),
    (CHAT, chat(n=1.0), "n"),
    (CHAT, chat(n="2"), "n"),
    (CHAT, chat(seed="3"), "seed"),
    (CHAT, chat(seed=1.5), "seed"),
    (CHAT, chat(top_k="2"), "top_k"),
    (CHAT, chat(temperature="0.5"), "temperature"),
    (CHAT, chat(top_p="1"), "top_p"),
    (CHAT, chat(speculation={"depth": "2"}), "speculation.depth"),
    (COMPLETIONS, completion(max_tokens="2"), "max_tokens"),
    (COMPLETIONS, completion(prompt=[1.0, 2.0]), "prompt"),
]


@pytest.mark.parametrize(("path", "body", "param"), LOOSE,
                         ids=[f"{p}-{i}" for i, (_, _, p) in enumerate(LOOSE)])
def test_loose_types_are_400(server, path, body, param):
    r = server.post(body, path)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_json_numbers_of_either_kind_are_fine_for_floats(server):
    r = server.post(chat(temperature=0, top_p=1, max_tokens=2))
    assert r.status_code == 200, r.text


def test_openapi_documents_the_statuses_sent_and_no_422(server):
    with server.client() as http:
        schema = http.get("/openapi.json").json()
    assert "422" not in str(schema["paths"])
    assert "HTTPValidationError" not in schema.get("components", {}).get("schemas", {})
    error_ref = "#/components/schemas/ErrorResponse"
    for path in (CHAT, COMPLETIONS):
        responses = schema["paths"][path]["post"]["responses"]
        for status in ("400", "401", "404", "413", "429", "500", "503", "504"):
            schema_of = responses[status]["content"]["application/json"]["schema"]
            assert schema_of["$ref"] == error_ref, (path, status)
    detail = schema["components"]["schemas"]["ErrorDetail"]
    assert set(detail["properties"]) == {"message", "type", "param", "code"}
    assert "401" in schema["paths"]["/v1/models"]["get"]["responses"]
    assert "503" in schema["paths"]["/health"]["get"]["responses"]


@pytest.mark.parametrize("task", ["", "a b", "x" * 65, 3])
def test_a_malformed_speculation_task_is_400(server, task):
    r = server.post(chat(speculation={"task": task}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "speculation.task", r.text


def test_a_speculation_task_needs_the_swift_drafter(server):
    r = server.post(chat(speculation={"task": "code"}))
    assert r.status_code == 400 and "swift" in r.json()["error"]["message"], r.text
