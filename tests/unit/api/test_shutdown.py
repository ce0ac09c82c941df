"""Drain on SIGTERM: new requests 503 (shutting_down) and /health 503 while requests in flight get
--shutdown-timeout seconds to finish; the rest are then aborted (503, or an error event on a stream)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from live_app import WAIT_S, chat, wait_until


def check_shutting_down(err: dict) -> None:
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["code"]) == ("server_error", "shutting_down")


def test_draining_refuses_new_work_and_lets_requests_in_flight_finish(live):
    srv = live(shutdown_timeout=WAIT_S)
    srv.steps.clear()
    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(srv.stream_events, chat(max_tokens=3))
        wait_until(lambda: srv.serving.engine.in_flight == 1, "the stream to be admitted")
        srv.signal_exit()
        wait_until(lambda: srv.serving.admission.draining, "the drain to start")
        with srv.client() as http:
            r = http.get("/health")
            assert (r.status_code, r.json()) == (503, {"status": "draining"})
            r = http.post("/v1/chat/completions", json=chat())
            assert r.status_code == 503, r.text
            check_shutting_down(r.json()["error"])
        assert srv.thread.is_alive()
        srv.steps.set()
        events = stream.result()
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    srv.thread.join(WAIT_S)
    assert not srv.thread.is_alive(), "the server did not exit after the drain"


def test_requests_still_running_at_the_timeout_are_aborted(live):
    srv = live(shutdown_timeout=0.2)
    srv.steps.clear()                 # nothing can finish
    with ThreadPoolExecutor(2) as pool:
        stream = pool.submit(srv.stream_events, chat(max_tokens=50))
        plain = pool.submit(srv.post, chat(max_tokens=50))
        wait_until(lambda: srv.serving.engine.in_flight == 2, "both requests to be admitted")
        srv.signal_exit()
        events, r = stream.result(), plain.result()
    assert events[-1] == "[DONE]"
    check_shutting_down(events[-2]["error"])
    assert r.status_code == 503, r.text
    check_shutting_down(r.json()["error"])
    srv.steps.set()
    srv.thread.join(WAIT_S)
    assert not srv.thread.is_alive(), "the server did not exit after the drain"
