"""Path-MTU discovery through the fronts (issue 14): a hop towards the client with a smaller MTU answers
the backend's full-size segments with ICMP "fragmentation needed" / ICMPv6 "packet too big" to the VIP;
the router sends those to a front, which must pass them to the backend owning the flow, or the download
stalls."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from synproxy.lab.nginx import BODY_SIZES
from synproxy.lab.topology import VIP, VIP6
from tests.lab_fixtures import backend_stats, needs_root, outcomes, running_lab
from tests.test_chain_lab import write_backends
from tests.test_lab_robustness import reload_fronts

pytestmark = [pytest.mark.netns, needs_root]
HOP_MTU = 1280
DOWNLOAD_BYTES = BODY_SIZES["1m"]  # nginx's /1m
CLIENTS = {4: ("198.18.1.0/24", "198.18.1.2", VIP), 6: ("2001:db8:1::/64", "2001:db8:1::2", VIP6)}


@pytest.fixture(scope="module", params=["auto", "nfqueue"])
def lab(request):
    """The default data plane (XDP) and the NFQUEUE reference, each with the router's route to the client
    limited to HOP_MTU (the client's own link stays at 1500, so it announces an MSS the path cannot carry)."""
    with running_lab("spicmp", data_plane=request.param) as lab:
        for family, (prefix, _, _) in CLIENTS.items():
            lab.run("router", ["ip", f"-{family}", "route", "replace", prefix, "dev", "client",
                               *(["metric", "256"] if family == 6 else []), "mtu", str(HOP_MTU)])
        yield lab


def path_mtu(lab, backend: str, family: int, client: str | None = None) -> int | None:
    """The backend's cached path MTU from the VIP to the client (the route exception ICMP created)."""
    _, default_client, vip = CLIENTS[family]
    client = client or default_client
    shown = lab.run(backend, ["ip", f"-{family}", "route", "get", client, "from", vip]).stdout
    found = re.search(r"\bmtu (\d+)", shown)
    return int(found.group(1)) if found else None


@pytest.mark.parametrize("family", [4, 6])
def test_a_download_through_a_smaller_mtu_hop_completes_and_the_backend_lowers_its_path_mtu(lab, family):
    _, _, vip = CLIENTS[family]
    url = f"http://[{vip}]/1m" if family == 6 else f"http://{vip}/1m"
    started = time.monotonic()
    done = lab.run("client", ["curl", "-sS", "-o", "/dev/null", "-m", "20", "-w", "%{size_download} %{time_total}",
                              url], check=False, timeout=30)
    elapsed = time.monotonic() - started
    size, seconds = (done.stdout.split() + ["0", "0"])[:2]
    print(f"\n{lab.data_plane} IPv{family}: {size} bytes in {float(seconds):.3f} s (curl), {elapsed:.3f} s (run)")
    assert (done.returncode, int(size)) == (0, DOWNLOAD_BYTES), done.stderr
    assert HOP_MTU in {path_mtu(lab, h.name, family) for h in lab.by_role("backend")}
    passed = sum(backend_stats(lab, h.name)["icmp_passed"] for h in lab.by_role("backend"))
    # The XDP program forwards them itself; the NFQUEUE front through the handler.
    path = "xdp" if lab.data_plane == "auto" else "queue"
    assert passed >= 1 and outcomes(lab)[path, "icmp_forwarded", f"ipv{family}"] >= 1


# The chain's test uses client addresses of its own: no backend has learnt a path MTU to them yet.
CHAIN_CLIENTS = {4: "198.18.1.3", 6: "2001:db8:1::3"}
CHAIN_CONNECTIONS, CHAIN_FIRST_PORT = 16, {4: 42000, 6: 42100}
# In the client namespace: open keep-alive HTTP connections from consecutive ports (a HEAD each: no
# answer larger than the hop's MTU yet), print their ports, then for each port read from stdin download
# /1m on that connection and print its bytes, seconds and error.
KEEPALIVE = """
import http.client, json, sys, time
vip, source, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
connections = {}
for port in range(first, first + count):
    connection = http.client.HTTPConnection(vip, 80, timeout=10, source_address=(source, port))
    connection.request("HEAD", "/1m")
    connection.getresponse().read()
    connections[port] = connection
print(json.dumps(sorted(connections)), flush=True)
for port in json.loads(sys.stdin.readline()):
    started, size, error = time.monotonic(), 0, None
    try:
        connections[port].request("GET", "/1m")
        response = connections[port].getresponse()
        while chunk := response.read(65536):
            size += len(chunk)
    except OSError as failure:
        error = f"{type(failure).__name__}: {failure}"
    print(json.dumps({"port": port, "bytes": size, "seconds": time.monotonic() - started, "error": error}), flush=True)
"""


def established_ports(lab, backend: str, client: str) -> set[int]:
    """The client ports of the backend's established connections from ``client``."""
    shown = lab.run(backend, ["ss", "-Htn", "state", "established", "dst", f"[{client}]" if ":" in client else client]).stdout
    return {int(line.split()[-1].rsplit(":", 1)[1]) for line in shown.splitlines() if line.strip()}


@pytest.mark.parametrize("family", [4, 6])
def test_after_a_backend_change_the_errors_about_a_moved_connection_reach_its_former_owner(lab, family):
    """backend1 is removed from the fronts' list while still running: its connections' flows now go to
    backend0, which passes their packets on along the chain. A download on such a connection through the
    1280-MTU hop needs the hop's errors to reach backend1 the same way; before, backend0's stack got them,
    found no socket, and the download stalled."""
    client, vip = CHAIN_CLIENTS[family], CLIENTS[family][2]
    lab.run("client", ["ip", "addr", "add", f"{client}/{24 if family == 4 else 64}", "dev", "eth0"])
    holder = lab.popen("client", [sys.executable, "-c", KEEPALIVE, vip, client, str(CHAIN_FIRST_PORT[family]),
                                  str(CHAIN_CONNECTIONS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    before = {h.name: backend_stats(lab, h.name) for h in lab.by_role("backend")}
    try:
        assert len(json.loads(holder.stdout.readline())) == CHAIN_CONNECTIONS
        moved = sorted(established_ports(lab, "backend1", client))[:2]
        assert moved, "no connection landed on backend1"
        assert {path_mtu(lab, h.name, family, client) for h in lab.by_role("backend")} <= {None, 1500}
        write_backends(lab, ["{backend0}"])
        reload_fronts(lab)
        holder.stdin.write(json.dumps(moved) + "\n")
        holder.stdin.flush()
        downloads = [json.loads(holder.stdout.readline()) for _ in moved]
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
        write_backends(lab, ["{backend0}", "{backend1}"])
        reload_fronts(lab)
    after = {h.name: backend_stats(lab, h.name) for h in lab.by_role("backend")}
    moved_by = {name: {key: after[name][key] - before[name][key] for key in ("chained", "icmp_passed")}
                for name in after}
    print(f"\n{lab.data_plane} IPv{family}, connections moved off backend1: {downloads}; {moved_by}")
    assert [(d["bytes"], d["error"]) for d in downloads] == [(DOWNLOAD_BYTES, None)] * len(moved)
    assert path_mtu(lab, "backend1", family, client) == HOP_MTU
    assert path_mtu(lab, "backend0", family, client) != HOP_MTU
    assert moved_by["backend0"]["chained"] >= 1 and moved_by["backend1"]["icmp_passed"] >= 1
