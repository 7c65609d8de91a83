"""The whole chain with the fronts' tc fast path on: SYNs answered in the kernel, ACKs through NFQUEUE."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest

from synproxy.bpf.libbpf import tc_attached_program
from synproxy.front.fastpath import TC_HANDLE, TC_PRIORITY
from synproxy.lab.demo import scrape
from synproxy.lab.topology import FRONT_METRICS_PORT, VIP, VIP6, Lab
from synproxy.netns import inside
from tests.lab_fixtures import backend_stats, clients, needs_root, running_lab

pytestmark = [pytest.mark.netns, needs_root]


@pytest.fixture(scope="module")
def lab():
    with running_lab("spf", fast_path=True) as lab:
        yield lab


def outcomes(lab: Lab) -> Counter:
    """Every front's counts: ("queue" or "fast_path", outcome, family) -> packets."""
    totals = Counter()
    for host in lab.by_role("front"):
        for (name, labels), value in scrape(lab, host.name, host.address, FRONT_METRICS_PORT).items():
            path = {"synproxy_front_packets_total": "queue",
                    "synproxy_front_fast_path_packets_total": "fast_path"}.get(name)
            if path:
                labels = dict(labels)
                totals[path, labels["outcome"], labels["family"]] += value
    return totals


def test_clients_of_both_families_connect_with_syns_answered_in_the_kernel(lab):
    before = outcomes(lab)
    for vip in (VIP, VIP6):
        result = clients(lab, 20, "--target", vip)
        assert result["failed"] == 0, result["errors"]
        assert set(result["backends"]) == {"backend0", "backend1"}
    moved = outcomes(lab) - before
    for family in ("ipv4", "ipv6"):
        assert moved["fast_path", "syn_answered", family] >= 20
        assert moved["queue", "validated", family] >= 20  # the ACKs: validated in Python
        assert moved["queue", "syn_answered", family] == 0


def test_a_flood_is_answered_in_the_kernel_and_no_syn_reaches_a_backend(lab):
    before = outcomes(lab)
    flood = lab.popen("attacker", [sys.executable, "-m", "synproxy.lab.flood", "--target", VIP, "--count", "60000",
                                   "--seconds", "10"], stdout=subprocess.PIPE, text=True)
    result = clients(lab, 10)
    sent = json.loads(flood.communicate(timeout=60)[0])["sent"]
    assert sent == 60000
    assert result["failed"] == 0, result["errors"]
    moved = outcomes(lab) - before
    assert moved["fast_path", "syn_answered", "ipv4"] >= sent
    assert moved["queue", "syn_answered", "ipv4"] == 0
    for host in lab.by_role("backend"):
        assert backend_stats(lab, host.name)["syn_received"] == 0


def attached_program(lab: Lab, host: str) -> int | None:
    with inside(lab.ns(host)):
        return tc_attached_program(socket.if_nametoindex("eth0"), TC_HANDLE, TC_PRIORITY)


def test_a_stopped_front_takes_its_program_away_and_a_restarted_one_brings_it_back(lab):
    assert attached_program(lab, "front0")
    lab.stop_process("front0")
    try:
        assert attached_program(lab, "front0") is None
    finally:
        lab.start_front("front0")
    assert attached_program(lab, "front0")
    assert clients(lab, 10)["failed"] == 0


def test_sighup_moves_the_rules_and_the_program_to_the_new_ports(lab):
    """Last in this module: it leaves the fronts protecting port 80 only."""
    config = lab.fast_path_config_path
    config.write_text(config.read_text().replace("ports: [80, 7]", "ports: [80]"))
    before = outcomes(lab)
    for host in lab.by_role("front"):
        os.kill(lab.pid(host.name), signal.SIGHUP)
    time.sleep(1.5)  # the reload happens at the next housekeeping (every 0.5 s)
    rules = lab.run("front0", ["iptables", "-w", "-t", "raw", "-S", "PREROUTING"]).stdout
    assert "--dport 80 " in rules and "--dport 7 " not in rules
    lab.run("client", [sys.executable, "-c", SYN_TO_PORT_7])
    time.sleep(0.5)
    moved = outcomes(lab) - before
    assert moved["fast_path", "not_protected", "ipv4"] >= 1 and moved["fast_path", "syn_answered", "ipv4"] == 0
    for _ in range(3):  # port 80 still protected (the lab's clients tool also uses port 7)
        assert json.loads(lab.run("client", ["curl", "-sS", "-m", "5", f"http://{VIP}/"]).stdout)["client"]


SYN_TO_PORT_7 = f"""
from scapy.all import IP, TCP, send
send(IP(dst="{VIP}") / TCP(sport=43210, dport=7, flags="S"), verbose=0)
"""
