"""Start-up failures an operator meets are one line on stderr and a non-zero exit, never a traceback,
and a refused start leaves nothing installed.

Each case runs the real command in a namespace of its own; "not root" is root without the capabilities
(`setpriv --bounding-set`), which is what the kernel checks (an unprivileged user could not run this
machine's Python from /root).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from netfilterqueue import NetfilterQueue

from synproxy import instance
from synproxy.config import write_secret
from synproxy.lab.topology import REPO_ROOT
from synproxy.netns import inside, namespaces, pids_inside, unique_name

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root")
METRICS = "127.0.0.1:9100"
FRONT = "198.18.10.2"  # the front's farm address, on the namespace's loopback
NOT_ROOT = ["setpriv", "--bounding-set=-net_raw,-net_admin,-sys_admin"]


def write_config(directory: Path, extra: str = "") -> Path:
    write_secret(directory / "secret.hex", b"\xab" * 32)
    config = directory / "synproxy.yaml"
    config.write_text(f"vips: [198.19.0.10]\nports: [80]\nsecret_file: secret.hex\nfronts: [{FRONT}]\n"
                      f"backends: [198.18.20.2]\n{extra}")
    return config


def synproxy(namespace: str, *argv: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", namespace, *prefix, sys.executable, "-m", "synproxy.cli", *argv],
                          capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def assert_one_line(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]


def raw_rules(namespace: str) -> str:
    return subprocess.run(["ip", "netns", "exec", namespace, "iptables", "-w", "-t", "raw", "-S"],
                          capture_output=True, text=True, check=True).stdout


@pytest.fixture
def namespace():
    with namespaces(unique_name("spse")) as (name,):
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "netns", "exec", name, "ip", "address", "add", f"{FRONT}/32", "dev", "lo"], check=True)
        yield name


@contextlib.contextmanager
def port_taken(namespace: str):
    host, _, port = METRICS.rpartition(":")
    with inside(namespace):
        taken = socket.create_server((host, int(port)))
    with taken:
        yield


@pytest.mark.parametrize("role", ["front", "backend"])
def test_metrics_port_in_use(namespace, tmp_path, role):
    config = write_config(tmp_path, f"front:\n  farm_address: {FRONT}\n  metrics_address: {METRICS}\n"
                                    f"backend:\n  interface: lo\n  metrics_address: {METRICS}\n")
    with port_taken(namespace):
        result = synproxy(namespace, role, "--config", str(config))
    assert_one_line(result, METRICS, "in use")
    assert "SYNPROXY" not in raw_rules(namespace)


def test_front_without_root(namespace, tmp_path):
    config = write_config(tmp_path, f"front:\n  farm_address: {FRONT}\n")
    assert_one_line(synproxy(namespace, "front", "--config", str(config), prefix=tuple(NOT_ROOT)),
                    "raw socket", "CAP_NET_RAW")


def test_lab_up_without_root(tmp_path):
    for action in ("up", "down"):
        result = subprocess.run([*NOT_ROOT, sys.executable, "-m", "synproxy.cli", "lab", action, "--name", "spnoroot"],
                                capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT,
                                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        assert_one_line(result, "needs root")
    assert not Path("/run/synproxy-lab/spnoroot").exists()


def test_queue_held_by_another_program(namespace, tmp_path):
    config = write_config(tmp_path, f"front:\n  farm_address: {FRONT}\n  queue_num: 7\n")
    with inside(namespace):
        holder = NetfilterQueue()
        holder.bind(7, lambda packet: packet.drop())
    try:
        assert_one_line(synproxy(namespace, "front", "--config", str(config)), "NFQUEUE 7", "another program")
    finally:
        holder.unbind()
    assert "SYNPROXY" not in raw_rules(namespace)


@pytest.mark.parametrize("argv", [["front"], ["backend"], ["backend", "--detach"]])
def test_a_second_instance_in_a_namespace_is_refused(namespace, tmp_path, argv):
    config = write_config(tmp_path, f"front:\n  farm_address: {FRONT}\nbackend:\n  interface: lo\n")
    with inside(namespace):
        first = instance.claim(argv[0])  # this test process plays the running instance
    with first:
        result = synproxy(namespace, *argv, "--config", str(config))
    assert_one_line(result, f"another synproxy {argv[0]} runs", f"pid {os.getpid()}")
    assert "SYNPROXY" not in raw_rules(namespace)


def test_a_worker_that_cannot_bind_its_queue_fails_the_start(namespace, tmp_path):
    """With front.workers the queue is the second worker's: the start fails with its fatal line, last after
    the logs of the workers started, and leaves neither rules nor workers behind."""
    config = write_config(tmp_path, f"front:\n  farm_address: {FRONT}\n  queue_num: 7\n  workers: 2\n")
    with inside(namespace):
        holder = NetfilterQueue()
        holder.bind(8, lambda packet: packet.drop())
    try:
        result = synproxy(namespace, "front", "--config", str(config))
    finally:
        holder.unbind()
    assert result.returncode != 0 and "Traceback" not in result.stderr
    *logs, error = result.stderr.strip().splitlines()
    fatal = json.loads(error)  # a node's fatal error is a log line too (synproxy.logs.fatal)
    assert fatal["event"] == "fatal" and "NFQUEUE 8" in fatal["error"] and "another program" in fatal["error"]
    assert all(line.startswith("{") for line in logs)
    assert "SYNPROXY" not in raw_rules(namespace)
    assert pids_inside(namespace) == []


@pytest.mark.parametrize("argv", [[], ["--stats"], ["--detach"]])
def test_a_backend_interface_that_does_not_exist_is_one_line(namespace, tmp_path, argv):
    """Before: a Python traceback ending in SetupError, for a typo in backend.interface or --interface."""
    config = write_config(tmp_path, "backend:\n  interface: nosuch0\n")
    assert_one_line(synproxy(namespace, "backend", "--config", str(config), *argv), "no network interface 'nosuch0'")
    assert "SYNPROXY" not in raw_rules(namespace)


@pytest.mark.parametrize("argv, error", [
    (["front", "--stats"], f"synproxy front: no front answers on {METRICS}"),
    (["front", "--drain"], "synproxy front: no front runs in this network namespace"),
    (["backend", "--stats"], "synproxy backend: no synproxy backend program is attached to lo")])
def test_a_query_of_a_node_that_is_not_running_answers_in_plain_lines(namespace, tmp_path, argv, error):
    """--stats and --drain are an operator's commands, not a node: their errors, and libbpf's messages, are
    plain lines like check-config's. Before: a node's JSON log lines (libbpf_warning, then fatal)."""
    config = write_config(tmp_path, f"front:\n  metrics_address: {METRICS}\nbackend:\n  interface: lo\n")
    result = synproxy(namespace, argv[0], "--config", str(config), *argv[1:])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(error) and not any(line.startswith("{") for line in lines), result.stderr
