"""Schemathesis against the served OpenAPI schema (/openapi.json of the session server).

Every /v1/*, /health and /metrics operation gets ``MAX_EXAMPLES`` generated requests, twice: as
generated (the ``model`` is then almost never the served one, so this mostly fuzzes validation), and
with the served model, only the parameters the server implements and short outputs (so the engine
generates: odd messages, stops, sampling and speculation settings, streams). No response may be a 5xx;
the statuses, bodies and headers must conform to the schema.

Checks left out, because the schema is looser than the server (the server is right; the schema
does not say it):
- ``positive_data_acceptance``: schema-valid bodies get 400 for parameters the server does not
  implement (typed ``Any`` in the schema), integral floats where an integer is due (JSON Schema calls
  ``16.0`` an integer; the server, like OpenAI, does not), empty prompts, empty ``stop`` strings,
  ``stream_options`` without ``stream``.
- ``content_type_conformance`` on /metrics (text/plain, documented as application/json) and on
  streams (text/event-stream, documented as application/json).

pytest 9 broke schemathesis' lazy ``from_fixture`` loader (it sets ``node._nodeid``), so the
operations run as subtests of one test per variant, each with its own Hypothesis ``@given``.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from server.api.protocol import UNSUPPORTED

MAX_EXAMPLES = 25            # per operation and variant: about half a minute in all on 2 cores
MAX_OUTPUT = 4               # tokens (and choices: 2) per generated request with the served model
OPERATIONS = {"GET /health", "GET /metrics", "GET /v1/models", "POST /v1/chat/completions",
              "POST /v1/completions"}
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance, response_headers_conformance]


@pytest.fixture(scope="module")
def api_schema(server_url: str):
    return schemathesis.openapi.from_url(f"{server_url}/openapi.json").include(
        path_regex=r"^/(v1/.*|health|metrics)$")


def served(model: str):
    """A map over generated cases: the served model, implemented parameters only, short outputs."""

    def pin(case):
        body = case.body
        if not isinstance(body, dict):
            return case
        for name in UNSUPPORTED:
            body.pop(name, None)
        body["model"] = model
        body["max_tokens"] = min(body.get("max_tokens") or MAX_OUTPUT, MAX_OUTPUT)
        if body.get("max_completion_tokens") is not None:
            body["max_completion_tokens"] = min(body["max_completion_tokens"], MAX_OUTPUT)
        if body.get("n") is not None:
            body["n"] = min(body["n"], 2)
        if isinstance(body.get("prompt"), list):    # token ids: keep them inside any vocabulary
            body["prompt"] = [[t % 256 for t in p] if isinstance(p, list) else p % 256 if isinstance(p, int) else p
                              for p in body["prompt"]]
        return case

    return pin


def checks_for(case) -> list:
    json_body = case.path != "/metrics" and not (isinstance(case.body, dict) and case.body.get("stream") is True)
    return CHECKS + [content_type_conformance] if json_body else CHECKS


def fuzz(strategy, seen: list[int]) -> None:
    """``MAX_EXAMPLES`` cases from ``strategy``: each is sent, its status noted in ``seen`` and checked."""

    @given(case=strategy)
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call(timeout=120)
        seen.append(response.status_code)
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
        case.validate_response(response, checks=checks_for(case))

    check()


@pytest.mark.parametrize("variant", ["generated", "served-model"])
def test_generated_requests_conform_and_never_5xx(api_schema, model_id, subtests, variant):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.label for op in operations} == OPERATIONS
    statuses: dict[str, list[int]] = {}
    for op in operations:
        if variant == "served-model" and op.method.upper() != "POST":
            continue
        strategy = op.as_strategy() if variant == "generated" else op.as_strategy().map(served(model_id))
        with subtests.test(msg=op.label):
            fuzz(strategy, statuses.setdefault(op.label, []))
    print(f"\n[schemathesis {variant}] statuses: "
          + "; ".join(f"{label}: {sorted(set(s))} x{len(s)}" for label, s in statuses.items()))
    if variant == "served-model":   # the generation path ran, not only validation
        assert any(200 in s for s in statuses.values()), statuses
