"""API test helpers: an in-process server (uvicorn in a thread, real HTTP on loopback) over a tiny random
model whose engine steps can be held, so requests stay in flight for as long as a test needs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import uvicorn
from helpers import ChatByteTokenizer, tiny_engine

from server.api.app import DrainingServer, create_app
from server.config import ServerConfig

MODEL = "tiny"
CHAT = "/v1/chat/completions"
WAIT_S = 30.0   # upper bound on waiting for something that must happen (not a speed assertion)


@dataclass
class Live:
    url: str
    app: object
    llm: object
    server: DrainingServer
    thread: threading.Thread
    steps: threading.Event   # set: the engine steps; cleared: it holds before its next step

    @property
    def serving(self):
        return self.app.state.serving

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": WAIT_S, **kwargs})

    def post(self, body: dict, path: str = CHAT, **kwargs) -> httpx.Response:
        with self.client() as http:
            return http.post(path, json=body, **kwargs)

    def stream_events(self, body: dict, path: str = CHAT) -> list[dict | str]:
        """The SSE ``data:`` payloads of a streamed request (JSON decoded; ``[DONE]`` as is)."""
        with self.client() as http, http.stream("POST", path, json={**body, "stream": True}) as r:
            assert r.status_code == 200, r.read()
            data = [line.removeprefix("data: ") for line in r.iter_lines() if line]
        return [d if d == "[DONE]" else json.loads(d) for d in data]

    def signal_exit(self) -> None:
        """What SIGTERM does (the handler is only installed in a main thread)."""
        self.server.handle_exit(15, None)

    def stop(self) -> None:
        self.steps.set()
        self.server.should_exit = True
        self.thread.join(WAIT_S)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def chat(content: str = "Hi", **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}


def start_live(model, num_blocks: int = 64, max_num_seqs: int = 8, **fields) -> Live:
    """A running server over ``model`` (a native tiny model) with ``ServerConfig(**fields)``."""
    llm = tiny_engine(model, num_blocks=num_blocks, max_num_seqs=max_num_seqs)
    llm.tokenizer = ChatByteTokenizer()
    steps = threading.Event()
    steps.set()
    step = llm.step

    def held_step():
        steps.wait()
        return step()

    llm.step = held_step
    cfg = ServerConfig(**fields)
    app = create_app(llm, MODEL, cfg)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=5)
    server = DrainingServer(config, lambda: app.state.serving.admission.drain(cfg.shutdown_timeout))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), "the server to start")
    assert server.started, "the server did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    return Live(f"http://127.0.0.1:{port}", app, llm, server, thread, steps)
