"""The lab's nginx (synproxy/lab/nginx.py): its configuration is valid for Debian's nginx, and in a namespace
of its own it serves every body, over IPv4 and IPv6, and takes a large upload."""

from __future__ import annotations

import json
import shutil

import pytest

from synproxy import netns
from synproxy.lab import nginx
from tests.lab_fixtures import needs_root

pytestmark = [pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed "
                                 "(deploy/install-deps.sh)")]

VIP4, VIP6, PORT = "198.19.0.10", "2001:db8:ffff::10", 8080


def test_the_configuration_listens_with_reuseport_on_both_families_and_logs_no_access(tmp_path):
    text = nginx.render_config(tmp_path, VIP4, VIP6, port=PORT)
    assert f"listen {VIP4}:{PORT} reuseport backlog={nginx.BACKLOG} fastopen={nginx.FASTOPEN_QUEUE};" in text
    assert f"listen [{VIP6}]:{PORT} reuseport backlog={nginx.BACKLOG} fastopen={nginx.FASTOPEN_QUEUE};" in text
    assert f"worker_processes {nginx.WORKERS};" in text and "access_log off;" in text
    assert str(tmp_path) in text and "/var/" not in text  # nothing outside its own prefix


def test_without_ipv6_it_listens_on_ipv4_alone(tmp_path):
    """The docker-compose lab's networks have no IPv6 (deploy/docker/start.sh gives no --vip6)."""
    text = nginx.render_config(tmp_path, VIP4, None, port=PORT, backend="backend0")
    assert f"listen {VIP4}:{PORT} " in text and "listen [" not in text and '"backend": "backend0"' in text


@pytest.fixture
def served(tmp_path):
    """nginx running in a namespace of its own; the namespace's name."""
    name = netns.unique_name("spn")
    with netns.namespaces(name):
        netns.run(name, ["ip", "link", "set", "lo", "up"])
        netns.add_addresses(name, "lo", f"{VIP4}/32", f"{VIP6}/128")
        config = nginx.prepare(tmp_path / "prefix", VIP4, VIP6, port=PORT, backend="backend7")
        master = nginx.start(name, config, port=PORT)
        try:
            yield name
        finally:
            master.terminate()
            assert master.wait(10) == 0


def curl(namespace: str, *arguments: str) -> str:
    return netns.run(namespace, ["curl", "-sS", "--max-time", "20", *arguments]).stdout


@needs_root
@pytest.mark.netns
@pytest.mark.parametrize("host", [VIP4, f"[{VIP6}]"])
def test_every_body_is_served_whole(served, host, tmp_path):
    for name, size in nginx.BODY_SIZES.items():
        received = tmp_path / name
        assert curl(served, "-o", str(received), "-w", "%{http_code}", f"http://{host}:{PORT}/{name}") == "200"
        assert received.read_bytes() == nginx.body(size)


@needs_root
@pytest.mark.netns
@pytest.mark.parametrize("host, client", [(VIP4, VIP4), (f"[{VIP6}]", VIP6)])
def test_the_root_names_the_backend_and_the_client_address(served, host, client):
    """What the lab's clients and tests read (as from the Python server before): who answered, and the
    client's address as the server saw it."""
    answer = json.loads(curl(served, f"http://{host}:{PORT}/"))
    assert answer["backend"] == "backend7" and answer["client"].startswith(f"{client}:")


@needs_root
@pytest.mark.netns
def test_a_large_upload_is_taken_and_discarded(served, tmp_path):
    upload = tmp_path / "upload"
    upload.write_bytes(nginx.body(20 << 20))
    status = curl(served, "-o", "/dev/null", "-w", "%{http_code} %{size_upload}", "-T", str(upload),
                  f"http://{VIP4}:{PORT}{nginx.UPLOAD_PATH}")
    assert status == f"204 {20 << 20}"
