"""A real Prometheus (Debian's `prometheus` binary) scrapes a live treespec server on loopback with the
shipped scrape job (deploy/prometheus.yml, target rewritten to the server's port); through Prometheus'
HTTP API: the target is up, the speculation series (acceptance length, accepted tokens per position,
tree budget) are stored, and every query of the Grafana dashboard is valid PromQL that returns data.

Marker ``image`` (kept out of ``make test``; ``make test-image`` runs it); skipped without `prometheus`."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from dashboard_queries import expressions, for_prometheus, load

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus")
STARTUP_S = 600.0
REPEAT = ("Repeat this sentence exactly, three times: the quick brown fox jumps over the lazy dog. "
          "the quick brown fox jumps over the lazy dog.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}\n{log.read_text()[-3000:]}")
        try:
            result = check()
            if result:
                return result
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not ready after {timeout:.0f} s\n{log.read_text()[-3000:]}")
        time.sleep(1.0)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(default_model_dir: Path, tmp_path_factory):
    """The real embedded model behind `treespec serve` (no start-up calibration: quick to start)."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--model", str(default_model_dir), "--max-num-seqs", "4", "--calibrate-tree", "false",
           "--kv-cache-gib", "0.25"]
    env = {k: v for k, v in os.environ.items() if k != "TREESPEC_API_KEYS"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("treespec", lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, STARTUP_S,
                 proc, log)
        yield port, url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    port, _ = server
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "treespec")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"], "labels": {"variant": "cpu"}}]
    config["scrape_configs"] = [job]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    web = free_port()
    log = work / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{web}"],
                                stdout=out, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{web}/api/v1"
    try:
        wait_for("prometheus", lambda: httpx.get(f"http://127.0.0.1:{web}/-/ready", timeout=2).status_code == 200,
                 60, proc, log)
        yield api, proc, log
    finally:
        stop(proc)


def query(api: str, expr: str) -> list[dict]:
    body = httpx.get(f"{api}/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def test_prometheus_scrapes_speculation_metrics(server, prometheus):
    _, url = server
    api, proc, log = prometheus
    model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    for _ in range(2):  # traffic: the model repeats, so the drafter's tokens are accepted
        r = httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
            "model": model, "temperature": 0, "max_tokens": 48,
            "messages": [{"role": "user", "content": REPEAT}]})
        assert r.status_code == 200, r.text

    def target_up():
        targets = httpx.get(f"{api}/targets", timeout=5).json()["data"]["activeTargets"]
        return [t for t in targets if t["labels"]["job"] == "treespec" and t["health"] == "up"]

    up = wait_for("target up", target_up, 60, proc, log)
    assert up[0]["scrapeUrl"].endswith("/metrics"), up

    # Scraped at least twice since the traffic created them (rate() needs two samples).
    def scraped():
        return query(api, 'count_over_time(treespec_spec_accepted_length_count{job="treespec"}[10m]) >= 2 '
                          'and treespec_spec_accepted_length_count{job="treespec"} > 0')

    wait_for("acceptance length scraped", scraped, 60, proc, log)
    positions = query(api, 'treespec_spec_accepted_tokens_per_position_total{job="treespec"}')
    assert {"1"} <= {s["metric"]["position"] for s in positions}, positions
    assert all(s["metric"]["variant"] == "cpu" for s in positions), positions   # the job's labels kept
    depth1 = float(next(s for s in positions if s["metric"]["position"] == "1")["value"][1])
    assert depth1 > 0, positions
    tau = query(api, 'treespec_spec_mean_acceptance_length{job="treespec"}')
    assert tau and float(tau[0]["value"][1]) > 1.0, tau
    budget = query(api, 'treespec_spec_budget{job="treespec"}')
    assert budget and float(budget[0]["value"][1]) > 0, budget
    assert query(api, 'treespec_spec_budget_by_batch_size{job="treespec"}')
    assert query(api, 'up{job="treespec"} == 1')

    # Every dashboard query parses in Prometheus and, after this traffic, returns data.
    empty = []
    for where, expr in expressions(load()):
        if not query(api, for_prometheus(expr, rate_interval="5m", range_="10m")):
            empty.append((where, expr))
    assert not empty, f"dashboard queries with no data after traffic: {empty}"
