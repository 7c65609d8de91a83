"""The docker-compose lab: build the image locally, bring the topology up, serve real requests.

Skipped, with the reason printed, only where no Docker engine can be started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.lab_fixtures import needs_root

pytestmark = [pytest.mark.netns, needs_root]
REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "deploy" / "docker-compose.yml"
SOCKET = "/run/synproxy-docker.sock"
VIP = "198.19.0.10"


def _engine_answers(env: dict) -> bool:
    return subprocess.run(["docker", "info"], env=env, capture_output=True, check=False).returncode == 0


@pytest.fixture(scope="module")
def docker_env():
    """A Docker engine: the one DOCKER_HOST names if it answers, else our own dockerd, stopped afterwards."""
    env = dict(os.environ)
    if shutil.which("docker") is None or shutil.which("docker-compose") is None:
        pytest.skip("docker or docker-compose is not installed")
    if os.environ.get("DOCKER_HOST") and _engine_answers(env):
        yield env
        return
    if shutil.which("dockerd") is None:
        pytest.skip("no Docker engine (dockerd) on this machine")
    env["DOCKER_HOST"] = f"unix://{SOCKET}"
    started = None
    if not _engine_answers(env):
        log = open("/var/tmp/synproxy-dockerd.log", "ab")  # noqa: SIM115 (lives as long as dockerd)
        started = subprocess.Popen(
            ["dockerd", "--data-root", "/var/lib/synproxy-docker", "--exec-root", "/run/synproxy-docker",
             "-H", f"unix://{SOCKET}", "--pidfile", "/run/synproxy-docker.pid", "--storage-driver", "overlay2"],
            stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 30
        while not _engine_answers(env):
            if started.poll() is not None or time.monotonic() > deadline:
                started.kill()
                pytest.skip(f"dockerd would not start here (see {log.name})")
            time.sleep(0.3)
    try:
        yield env
    finally:
        if started is not None:
            started.send_signal(signal.SIGTERM)
            try:
                started.wait(timeout=30)
            except subprocess.TimeoutExpired:
                started.kill()


@pytest.fixture(scope="module")
def compose(docker_env, tmp_path_factory):
    project = f"spc{os.getpid() % 10000}"
    secret = REPO / "deploy" / "docker" / "config" / "secret.hex"
    made_secret = not secret.exists()
    if made_secret:
        secret.touch(mode=0o600)
        secret.write_text(os.urandom(32).hex() + "\n")
    subprocess.run([str(REPO / "deploy" / "docker" / "build-images.sh")], env=docker_env, check=True,
                   timeout=900, capture_output=True)
    command = ["docker-compose", "-f", str(COMPOSE_FILE), "-p", project]
    try:
        subprocess.run([*command, "up", "-d"], env=docker_env, check=True, timeout=300, capture_output=True)
        yield lambda *argv, check=False: subprocess.run([*command, "exec", "-T", *argv], env=docker_env, check=check,
                                                     capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run([*command, "down", "-v", "--timeout", "5"], env=docker_env, timeout=300,
                       capture_output=True, check=False)
        if made_secret:
            secret.unlink()


def test_client_requests_reach_both_backends_through_the_fronts(compose):
    deadline = time.monotonic() + 60
    while compose("client", "curl", "-sS", "-m", "2", f"http://{VIP}/").returncode:
        assert time.monotonic() < deadline, "the compose lab never answered"
        time.sleep(1)
    answers = [json.loads(compose("client", "curl", "-sS", "-m", "5", f"http://{VIP}/", check=True).stdout)
               for _ in range(12)]
    assert {a["backend"] for a in answers} == {"backend0", "backend1"}
    assert all(a["client"].startswith("198.18.101.20:") for a in answers)
    echo = compose("client", "python3", "-m", "synproxy.lab.clients", "--target", VIP, "--count", "5", check=True)
    assert json.loads(echo.stdout)["failed"] == 0


def test_nginx_serves_a_large_body_through_the_vip(compose):
    """The backends' HTTP server is nginx (synproxy/lab/nginx.py, in the image): 10 MiB through the fronts."""
    done = compose("client", "curl", "-sS", "-m", "60", "-o", "/dev/null", "-D", "-", "-w", "%{http_code} %{size_download}",
                   f"http://{VIP}/10m", check=True)
    assert "Server: nginx" in done.stdout and done.stdout.endswith(f"200 {10 << 20}")


def test_front_metrics_and_backend_counters(compose):
    compose("client", "curl", "-sS", "-m", "5", f"http://{VIP}/", check=True)
    fronts = [compose("client", "curl", "-sS", f"http://198.18.120.{20 + i}:9100/metrics", check=True).stdout
              for i in range(3)]
    answered = sum(sample.value for text in fronts for family in text_string_to_metric_families(text)
                   for sample in family.samples
                   if sample.name == "synproxy_front_packets_total" and sample.labels["outcome"] == "syn_answered")
    assert answered >= 1
    stats = [json.loads(compose(b, "python3", "-m", "synproxy.cli", "backend", "--config",
                                "/etc/synproxy/synproxy.yaml", "--stats", "--json", check=True).stdout)
             for b in ("backend0", "backend1")]
    assert sum(s["created"] for s in stats) >= 1
    assert sum(s["syn_received"] for s in stats) == 0
