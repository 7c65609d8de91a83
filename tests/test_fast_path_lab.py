"""The whole chain with the fronts' kernel data plane, `xdp` and its fallback `tc`: SYNs answered,
handshake ACKs and established traffic encapsulated in the kernel, either way."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from synproxy.bpf.libbpf import program_maps, tc_attached_program, xdp_attached_program
from synproxy.bpf.loading import MAP_KEY
from synproxy.front import fastpath, routes_back
from synproxy.front.fastpath import TC_HANDLE, TC_PRIORITY
from synproxy.lab.topology import PORTS, VIP, VIP6, Lab
from synproxy.netns import inside
from tests.lab_fixtures import backend_stats, clients, needs_root, outcomes, running_lab, summed

pytestmark = [pytest.mark.netns, needs_root]
FAMILIES = ("ipv4", "ipv6")


@pytest.fixture(scope="module", params=["tc", "xdp"])
def lab(request):
    with running_lab("spf", data_plane=request.param) as lab:
        clients(lab, 4, "--target", VIP)  # the fronts' neighbours resolved: the programs' route lookups hold
        clients(lab, 4, "--target", VIP6)
        yield lab


def url(vip: str) -> str:
    return f"http://[{vip}]/" if ":" in vip else f"http://{vip}/"


def test_clients_of_both_families_connect_with_the_kernel_doing_its_part(lab):
    before = outcomes(lab)
    for vip in (VIP, VIP6):
        result = clients(lab, 20, "--target", vip)
        assert result["failed"] == 0, result["errors"]
        assert set(result["backends"]) == {"backend0", "backend1"}
        for _ in range(5):
            assert json.loads(lab.run("client", ["curl", "-sS", "-m", "5", url(vip)]).stdout)["client"]
    moved = outcomes(lab) - before
    for family in FAMILIES:
        assert moved["queue", "syn_answered", family] == 0
        assert moved["tc", "syn_answered", family] + moved["xdp", "syn_answered", family] >= 25
        # Handshake ACKs and every established packet in the kernel, by the first program to see them;
        # the queue sees none of them.
        first = lab.data_plane
        assert moved[first, "validated", family] >= 25
        assert moved[first, "forwarded_bad_mac", family] + moved[first, "forwarded_expired_epoch", family] > 0
        assert sum(value for (path, outcome, fam), value in moved.items() if path == "queue" and fam == family
                   and (outcome == "validated" or outcome.startswith("forwarded"))) == 0


def test_every_front_proves_the_route_back_to_clients_of_both_families(lab):
    """A lab front's routing (a default route via the router, its subnet, the VIPs' blackholes) proves
    the SYN-ACKs' way back (docs/front.md, "The SYN-ACK's way back"): the programs answer the clients'
    and the flood's SYNs (the tests around this one) without a route lookup per SYN."""
    for host in lab.by_role("front"):
        tc, xdp = attached_programs(lab, host.name)
        value = program_maps(xdp or tc)["route_proof"].lookup(MAP_KEY.pack(0))
        half = len(value) // 2
        for family, proof in zip(FAMILIES, (value[:half], value[half:])):
            enabled, exceptions = struct.unpack_from("=II", proof)
            assert enabled == 1 and 0 < exceptions <= routes_back.MAX_EXCEPTIONS, (host.name, family)
    result = clients(lab, 10)
    assert result["failed"] == 0, result["errors"]


def test_a_flood_is_answered_in_the_kernel_and_no_syn_reaches_a_backend(lab):
    before = outcomes(lab)
    flood = lab.popen("attacker", [sys.executable, "-m", "synproxy.lab.flood", "--target", VIP, "--count", "60000",
                                   "--seconds", "10"], stdout=subprocess.PIPE, text=True)
    result = clients(lab, 10)
    sent = json.loads(flood.communicate(timeout=60)[0])["sent"]
    assert sent == 60000
    assert result["failed"] == 0, result["errors"]
    moved = outcomes(lab) - before
    assert moved["tc", "syn_answered", "ipv4"] + moved["xdp", "syn_answered", "ipv4"] >= sent
    if lab.data_plane == "xdp":
        assert moved["xdp", "syn_answered", "ipv4"] >= sent
    assert moved["queue", "syn_answered", "ipv4"] == 0
    for host in lab.by_role("backend"):
        assert backend_stats(lab, host.name)["syn_received"] == 0


def attached_programs(lab: Lab, host: str) -> tuple:
    """The front program ids at tc ingress and at XDP on the front's eth0 (None where absent)."""
    with inside(lab.ns(host)):
        ifindex = socket.if_nametoindex("eth0")
        xdp = xdp_attached_program(ifindex)
        return tc_attached_program(ifindex, TC_HANDLE, TC_PRIORITY), xdp and xdp[0]


def test_a_stopped_front_takes_its_programs_away_and_a_restarted_one_brings_them_back(lab):
    tc, xdp = attached_programs(lab, "front0")
    assert tc and bool(xdp) == (lab.data_plane == "xdp")
    lab.stop_process("front0")
    try:
        assert attached_programs(lab, "front0") == (None, None)
    finally:
        lab.start_front("front0")
    tc, xdp = attached_programs(lab, "front0")
    assert tc and bool(xdp) == (lab.data_plane == "xdp")
    assert clients(lab, 10)["failed"] == 0


def syn_reply_of(lab: Lab, host: str) -> str:
    """What the front's programs do with a SYN-ACK, read from their `config` map."""
    tc, xdp = attached_programs(lab, host)
    value = program_maps(xdp or tc)["config"].lookup(MAP_KEY.pack(0))
    return "ingress" if fastpath._CONFIG.unpack(value)[7] else "route"


def test_syn_reply_ingress_completes_the_handshakes_of_both_families(lab):
    """front.syn_reply: ingress, taken at a SIGHUP: the SYN-ACKs leave by the link the SYNs came in by, to
    the lab's router (the fronts' one neighbour, which routes to every client): handshakes complete, the
    SYNs answered in the kernel, as with the route lookup."""
    config = lab.config_path
    original = config.read_text()
    plane = f"  data_plane: {lab.data_plane}\n"
    for text, wanted in ((original.replace(plane, plane + "  syn_reply: ingress\n"), "ingress"), (original, "route")):
        config.write_text(text)
        for host in lab.by_role("front"):
            os.kill(lab.pid(host.name), signal.SIGHUP)
        time.sleep(1.5)  # the reload happens at the next housekeeping (every 0.5 s)
        assert {syn_reply_of(lab, host.name) for host in lab.by_role("front")} == {wanted}
        if wanted == "route":
            break
        before = outcomes(lab)
        for vip in (VIP, VIP6):
            result = clients(lab, 20, "--target", vip)
            assert result["failed"] == 0, result["errors"]
        moved = outcomes(lab) - before
        for family in FAMILIES:
            assert moved["queue", "syn_answered", family] == 0
            assert moved["tc", "syn_answered", family] + moved["xdp", "syn_answered", family] >= 20


def test_sighup_moves_the_rules_and_the_programs_to_the_new_ports(lab):
    """Last in this module: it leaves the fronts protecting port 80 only."""
    config = lab.config_path
    config.write_text(config.read_text().replace(f"ports: [{', '.join(map(str, PORTS))}]", "ports: [80]"))
    before = outcomes(lab)
    for host in lab.by_role("front"):
        os.kill(lab.pid(host.name), signal.SIGHUP)
    time.sleep(1.5)  # the reload happens at the next housekeeping (every 0.5 s)
    rules = lab.run("front0", ["iptables", "-w", "-t", "raw", "-S", "PREROUTING"]).stdout
    assert "--dport 80 " in rules and "--dport 7 " not in rules
    lab.run("client", [sys.executable, "-c", SYN_TO_PORT_7])
    time.sleep(0.5)
    moved = outcomes(lab) - before
    path = lab.data_plane  # the first program to see the packet
    assert moved[path, "not_protected", "ipv4"] >= 1 and moved[path, "syn_answered", "ipv4"] == 0
    for _ in range(3):  # port 80 still protected (the lab's clients tool also uses port 7)
        assert json.loads(lab.run("client", ["curl", "-sS", "-m", "5", f"http://{VIP}/"]).stdout)["client"]
    assert summed(outcomes(lab) - before, "syn_answered") >= 3


SYN_TO_PORT_7 = f"""
from scapy.all import IP, TCP, send
send(IP(dst="{VIP}") / TCP(sport=43210, dport=7, flags="S"), verbose=0)
"""
