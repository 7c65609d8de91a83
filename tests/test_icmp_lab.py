"""Path-MTU discovery through the fronts (issue 14): a hop towards the client with a smaller MTU answers
the backend's full-size segments with ICMP "fragmentation needed" / ICMPv6 "packet too big" to the VIP;
the router sends those to a front, which must pass them to the backend owning the flow, or the download
stalls."""

from __future__ import annotations

import re
import time

import pytest

from synproxy.lab.nginx import BODY_SIZES
from synproxy.lab.topology import VIP, VIP6
from tests.lab_fixtures import backend_stats, needs_root, outcomes, running_lab

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


def path_mtu(lab, backend: str, family: int) -> int | None:
    """The backend's cached path MTU from the VIP to the client (the route exception ICMP created)."""
    _, client, vip = CLIENTS[family]
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
