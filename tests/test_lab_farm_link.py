"""The lab's farm link (Lab.farm_link, the benchmark's lab): the front sends what it forwards to the backend
over a link of their own, not back through the router, and clients are served through it as before.

Run under the lab lock: `flock /tmp/synproxy-lab.lock python3 -m pytest -q tests/test_lab_farm_link.py`.
"""

from __future__ import annotations

import pytest

from synproxy.lab.topology import FARM_INTERFACE, VIP, VIP6, Lab, LabError, default_hosts
from tests.lab_fixtures import needs_root, running_lab

REQUESTS = 20


def test_a_farm_link_joins_one_front():
    with pytest.raises(LabError, match="one front"):
        Lab(name="unused", hosts=default_hosts(fronts=2, backends=1), farm_link=True).up()


def link_packets(lab: Lab, host: str, interface: str, direction: str) -> int:
    """Packets an interface of a lab host received ("rx") or sent ("tx")."""
    return int(lab.run(host, ["cat", f"/sys/class/net/{interface}/statistics/{direction}_packets"]).stdout)


@pytest.mark.netns
@needs_root
def test_forwarded_packets_take_the_farm_link():
    with running_lab("spfl", hosts=default_hosts(fronts=1, backends=1), routing="static", farm_link=True) as lab:
        for vip in (VIP, f"[{VIP6}]"):
            farm_before = link_packets(lab, "backend0", FARM_INTERFACE, "rx")
            routed_before = link_packets(lab, "router", "backend0", "tx")
            loop = f"for i in $(seq {REQUESTS}); do curl -s -g -m 3 -o /dev/null -w '%{{http_code}} ' http://{vip}/1k; done"
            answers = lab.run("client", ["sh", "-c", loop], timeout=120)
            assert answers.stdout.split() == ["200"] * REQUESTS
            # Each request's handshake ACK, request and closing segments went over the farm link; the
            # router sent backend0 nothing of them (a neighbour probe at most).
            assert link_packets(lab, "backend0", FARM_INTERFACE, "rx") - farm_before >= 3 * REQUESTS
            assert link_packets(lab, "router", "backend0", "tx") - routed_before < 3
