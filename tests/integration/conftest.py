"""One real ``treespec serve`` subprocess on a loopback port for the whole integration session."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
MODEL_ID = "SmolLM2-135M-Instruct"
STARTUP_TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as exc:
        return f"<no log: {exc}>"


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def start_server(args: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """``treespec serve <args>`` on a free loopback port (API keys unset), its output in ``log_path``;
    returns (process, base URL) once /health answers 200, else stops it and fails with the log tail."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TREESPEC_API_KEYS", None)   # the tests call the API without a key
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with code {proc.returncode} during startup; log tail:\n"
                        f"{log_tail(log_path)}", pytrace=False)
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_process(proc)
            pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S:.0f}s; log tail:\n{log_tail(log_path)}",
                        pytrace=False)
        time.sleep(0.5)


def scrape_metric(url: str, name: str, **labels: str) -> float:
    """The sum of the live /metrics samples of the server at ``url`` called ``name`` matching ``labels``."""
    text = httpx.get(f"{url}/metrics", timeout=10.0).text
    total, found = 0.0, False
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
                found = True
    assert found, f"metric {name} {labels or ''} not exported"
    return total


def wait_until_idle(url: str, timeout: float = 15.0) -> None:
    """Poll /metrics until nothing runs or waits and the KV pool is empty; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        state = tuple(scrape_metric(url, name) for name in ("treespec_num_requests_running",
                                                            "treespec_num_requests_waiting",
                                                            "treespec_kv_cache_usage_ratio"))
        if state == (0.0, 0.0, 0.0):
            return
        assert time.monotonic() < deadline, f"server not idle after {timeout}s: running/waiting/kv = {state}"
        time.sleep(0.2)


@pytest.fixture(scope="session")
def server_url(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    proc, url = start_server(["--model", str(default_model_dir), "--max-num-seqs", "16", "--num-threads", "2"],
                             log_path)
    try:
        yield url
    finally:
        stop_process(proc)
        print(f"\n[integration] server log: {log_path}")


@pytest.fixture(scope="session")
def model_id(server_url: str) -> str:
    return MODEL_ID


@pytest.fixture(scope="session")
def client(server_url: str):
    import openai

    with openai.OpenAI(base_url=f"{server_url}/v1", api_key="x", timeout=120.0, max_retries=0) as c:
        yield c


@pytest.fixture(scope="session")
def http(server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_url, timeout=120.0) as c:
        yield c


@pytest.fixture(scope="session")
def scrape(server_url: str) -> Callable[..., float]:
    """``scrape(name, **labels)``: the sum of the live /metrics samples called ``name`` matching ``labels``."""
    return functools.partial(scrape_metric, server_url)


@pytest.fixture(scope="session")
def wait_idle(server_url: str) -> Callable[[float], None]:
    """``wait_idle(timeout=15)``: poll /metrics until the server is idle (``wait_until_idle``)."""
    return functools.partial(wait_until_idle, server_url)


@pytest.fixture(scope="session")
def tokenizer(default_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))
