"""--max-waiting-requests: beyond max_num_seqs + N requests (choices) in flight, 429 with Retry-After, all
choices of a request or none; slots come back however a request ends. --request-timeout: 504, or an error
event on a stream, and the request is aborted in the engine."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from live_app import chat, wait_until


def check_error(r, status: int, type_: str, code: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["code"]) == (type_, code)


def test_requests_beyond_the_limit_get_429(live):
    srv = live(max_num_seqs=1, max_waiting_requests=1)     # 2 in flight at most
    engine = srv.serving.engine
    srv.steps.clear()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(srv.post, chat())
        wait_until(lambda: engine.in_flight == 1, "the first request to be admitted")
        check_error(srv.post(chat(n=2)), 429, "rate_limit_error", "too_many_requests")   # 1 + 2 > 2: none
        second = pool.submit(srv.post, chat())
        wait_until(lambda: engine.in_flight == 2, "the second request to be admitted")
        for path, body in (("/v1/chat/completions", chat()),
                           ("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2})):
            r = srv.post(body, path)
            check_error(r, 429, "rate_limit_error", "too_many_requests")
            assert int(r.headers["retry-after"]) >= 1
        srv.steps.set()
        assert first.result().status_code == second.result().status_code == 200
    wait_until(lambda: engine.in_flight == 0, "the slots to come back")
    assert srv.post(chat(n=2)).status_code == 200


def test_a_lone_request_is_admitted_whatever_its_n(live):
    srv = live(max_num_seqs=1, max_waiting_requests=1)
    r = srv.post(chat(n=3))
    assert r.status_code == 200 and len(r.json()["choices"]) == 3


def test_zero_means_no_limit(live):
    srv = live(max_num_seqs=1, max_waiting_requests=0)
    srv.steps.clear()
    with ThreadPoolExecutor(4) as pool:
        pending = [pool.submit(srv.post, chat()) for _ in range(4)]
        wait_until(lambda: srv.serving.engine.in_flight == 4, "all requests to be admitted")
        srv.steps.set()
        assert [p.result().status_code for p in pending] == [200] * 4


def test_a_stream_holds_its_slot_until_it_ends_or_its_client_leaves(live):
    srv = live(max_num_seqs=1, max_waiting_requests=1)
    engine = srv.serving.engine
    events = srv.stream_events(chat(n=2))
    assert events[-1] == "[DONE]"
    wait_until(lambda: engine.in_flight == 0, "the finished stream's slots to come back")
    srv.steps.clear()
    with srv.client() as http, http.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")      # the role chunk: admitted and generating
        assert engine.in_flight == 1
    wait_until(lambda: engine.in_flight == 0, "the abandoned stream's slot to come back")
    srv.steps.set()
    wait_until(lambda: not srv.llm.has_unfinished() and srv.llm.scheduler.kv.pool.usage == 0, "the abort")


def aborts(srv) -> list[str]:
    """Record the request ids the engine aborts."""
    seen, abort = [], srv.llm.abort

    def recording(request_id):
        seen.append(request_id)
        return abort(request_id)

    srv.llm.abort = recording
    return seen


def test_request_timeout_is_a_504_and_aborts(live):
    srv = live(request_timeout=0.3)
    aborted = aborts(srv)
    srv.steps.clear()                 # the request cannot finish
    check_error(srv.post(chat(max_tokens=50)), 504, "timeout_error", "request_timeout")
    srv.steps.set()
    wait_until(lambda: len(aborted) == 1 and not srv.llm.has_unfinished(), "the abort")
    assert srv.llm.scheduler.kv.pool.usage == 0


def test_request_timeout_ends_a_stream_with_an_error_event(live):
    srv = live(request_timeout=0.3)
    aborted = aborts(srv)
    srv.steps.clear()
    events = srv.stream_events(chat(max_tokens=50))
    assert events[-1] == "[DONE]"
    err = events[-2]["error"]
    assert (err["type"], err["code"]) == ("timeout_error", "request_timeout")
    srv.steps.set()
    wait_until(lambda: len(aborted) == 1 and not srv.llm.has_unfinished(), "the abort")
