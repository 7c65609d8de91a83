"""/healthz and /readyz on a node's metrics port (synproxy/health.py) follow the node's real state: the
front's queue bound and programs attached, its drain; the backend's program in its tc slot; a loop that
stops beating. `synproxy front --stats` reads them back."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from synproxy.config import write_secret
from synproxy.health import LIVE_SECONDS, READY_SECONDS, Health
from synproxy.lab.topology import REPO_ROOT
from synproxy.netns import add_addresses, inside, link, namespaces, unique_name

METRICS = "127.0.0.1:9100"
SECRET = b"\xab" * 32  # the namespace fixture's secret.hex
FRONT = "198.18.10.2"


def test_ready_needs_every_check_and_a_recent_beat():
    health = Health()
    assert health.answer("/readyz", 0.0) == (503, {"alive": True, "ready": False, "checks": {"loop": "starting"}})
    health.beat({"loop": None, "data_plane": None}, 100.0)
    assert health.answer("/readyz", 100.0)[0] == 200
    health.beat({"loop": None, "data_plane": "NFQUEUE 0 is not bound"}, 101.0)
    status, body = health.answer("/readyz", 101.0)
    assert status == 503 and body["checks"]["data_plane"] == "NFQUEUE 0 is not bound"
    assert health.answer("/healthz", 101.0)[0] == 200, "alive, not ready"
    health.beat({"loop": None}, 200.0)
    status, body = health.answer("/readyz", 200.0 + READY_SECONDS + 0.1)
    assert status == 503 and body["checks"]["loop"].startswith("no heartbeat for")
    assert health.answer("/healthz", 200.0 + READY_SECONDS + 0.1)[0] == 200
    assert health.answer("/healthz", 200.0 + LIVE_SECONDS + 0.1)[0] == 503


def get(namespace: str, path: str) -> tuple[int, dict]:
    with inside(namespace):
        try:
            with urllib.request.urlopen(f"http://{METRICS}{path}", timeout=5) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())


def wait_for(namespace: str, path: str, status: int, seconds: float = 10) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        try:
            found, body = get(namespace, path)
        except OSError:  # not listening yet
            found, body = None, {}
        if found == status:
            return body
        assert time.monotonic() < deadline, (found, body)
        time.sleep(0.1)


def synproxy(namespace: str, *argv: str, prefix: tuple[str, ...] = ()) -> list[str]:
    return ["ip", "netns", "exec", namespace, *prefix, sys.executable, "-m", "synproxy.cli", *argv]


@contextlib.contextmanager
def running(namespace: str, *argv: str, prefix: tuple[str, ...] = (), env: dict | None = None):
    process = subprocess.Popen(synproxy(namespace, *argv, prefix=prefix), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})})
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def namespace(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the nodes need root")
    with namespaces(unique_name("sphf"), unique_name("sphp")) as (name, peer):
        link(name, "sp0", peer, "sp1")
        add_addresses(name, "sp0", f"{FRONT}/24")
        add_addresses(peer, "sp1", "198.18.10.1/24")
        write_secret(tmp_path / "secret.hex", SECRET)
        yield name


def config(tmp_path, data_plane: str) -> str:
    path = tmp_path / "synproxy.yaml"
    path.write_text(f"vips: [198.19.0.10]\nports: [80]\nsecret_file: secret.hex\nfronts: [{FRONT}]\n"
                    f"backends: [198.18.20.2]\nfront:\n  metrics_address: {METRICS}\n  data_plane: {data_plane}\n"
                    f"  interfaces: [sp0]\nbackend:\n  interface: lo\n  metrics_address: {METRICS}\n")
    return str(path)


def test_a_front_is_ready_until_drained_and_its_stats_say_so(namespace, tmp_path):
    path = config(tmp_path, "nfqueue")
    with running(namespace, "front", "--config", path):
        body = wait_for(namespace, "/readyz", 200)
        assert body["checks"] == {"loop": "ok", "data_plane": "ok", "salts": "ok", "draining": "ok", "stopping": "ok"}
        assert wait_for(namespace, "/healthz", 200)["alive"]
        stats = json.loads(subprocess.run(synproxy(namespace, "front", "--config", path, "--stats", "--json"),
                                          capture_output=True, text=True, check=True, cwd=REPO_ROOT).stdout)
        assert stats["ready"] and "syn_answered" not in stats["packets"] and stats["bgp"] == {}
        drained = subprocess.run(synproxy(namespace, "front", "--config", path, "--drain", "--timeout", "10"),
                                 capture_output=True, text=True, cwd=REPO_ROOT, check=False)
        assert drained.returncode == 0 and "drained" in drained.stdout, drained.stderr
        body = wait_for(namespace, "/readyz", 503)
        assert body["checks"]["draining"].startswith("draining")
        assert wait_for(namespace, "/healthz", 200)["alive"], "a draining front is alive"
        subprocess.run(synproxy(namespace, "front", "--config", path, "--undrain"), check=True, capture_output=True)
        wait_for(namespace, "/readyz", 200)


def test_a_front_whose_program_is_removed_is_not_ready(namespace, tmp_path):
    with running(namespace, "front", "--config", config(tmp_path, "tc")):
        wait_for(namespace, "/readyz", 200, seconds=30)  # the first run builds the program
        subprocess.run(["ip", "netns", "exec", namespace, "tc", "filter", "del", "dev", "sp0", "ingress"], check=True)
        body = wait_for(namespace, "/readyz", 503)
        assert body["checks"]["data_plane"].startswith("program gone: tc on ifindex")


def test_a_backend_whose_program_is_removed_is_not_ready(namespace, tmp_path):
    with running(namespace, "backend", "--config", config(tmp_path, "nfqueue")):
        assert wait_for(namespace, "/readyz", 200, seconds=30)["checks"] == {"loop": "ok", "program": "ok"}
        subprocess.run(["ip", "netns", "exec", namespace, "tc", "filter", "del", "dev", "lo", "ingress"], check=True)
        assert wait_for(namespace, "/readyz", 503)["checks"]["program"] == "no program in lo's tc slot"


def test_the_metrics_carry_build_info_and_process_metrics(namespace, tmp_path):
    with running(namespace, "backend", "--config", config(tmp_path, "nfqueue")):
        wait_for(namespace, "/readyz", 200, seconds=30)
        with inside(namespace):
            text = urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=5).read().decode()
    assert 'synproxy_build_info{role="backend",version="' in text
    assert "process_resident_memory_bytes" in text and "process_cpu_seconds_total" in text
