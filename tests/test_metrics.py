"""Every metric family, scraped by a real Prometheus from the lab, checked against the traffic sent."""

from __future__ import annotations

import json
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from synproxy.lab.topology import VIP, Lab
from synproxy.netns import inside
from tests.lab_fixtures import clients, needs_root, running_lab

pytestmark = [pytest.mark.netns, needs_root]
PYTHON = sys.executable
CLIENTS = 10          # each makes one HTTP and one echo connection
FLOOD = 3000
FORGED = 40
BAD_CHECKSUM = 96


@pytest.fixture(scope="module")
def traffic():
    """A lab with Prometheus; real clients, a bounded flood and forged ACKs; then a settled scrape."""
    with running_lab("spm", prometheus=True) as lab:
        made = clients(lab, CLIENTS)
        flood = json.loads(lab.run("attacker", [PYTHON, "-m", "synproxy.lab.flood", "--target", VIP, "--count",
                                                str(FLOOD), "--seconds", "30"], timeout=60).stdout)
        forge = textwrap.dedent(f"""
            from scapy.all import IP, TCP, send
            send([IP(dst="{VIP}") / TCP(sport=20000 + i, dport=80, flags="A", seq=1, ack=i * 7919)
                  for i in range({FORGED})], verbose=0)
            # SYNs with a wrong checksum: every data plane leaves them to the Python handler (it drops
            # them), so each front's queue times some (one packet in 16).
            send([IP(dst="{VIP}") / TCP(sport=21000 + i, dport=80, flags="S", chksum=0xdead)
                  for i in range({BAD_CHECKSUM})], verbose=0)
        """)
        lab.run("client", [PYTHON, "-c", forge])
        time.sleep(3)  # two scrapes at 1 s
        yield lab, made, flood


def value(lab: Lab, expression: str) -> float:
    result = lab.query_prometheus(expression)
    return sum(float(series["value"][1]) for series in result)


def test_every_node_is_scraped(traffic):
    lab, _, _ = traffic
    up = {series["metric"]["instance"]: series["value"][1] for series in lab.query_prometheus("up")}
    assert len(up) == 5 and set(up.values()) == {"1"}


def test_the_shipped_alert_rules_are_loaded_and_the_fronts_announce(traffic):
    """deploy/prometheus/alerts.yml in the lab's Prometheus; every front ready and announcing, as
    SynproxyFrontNotAnnouncing and SynproxyFrontNotReady read it."""
    lab, _, _ = traffic
    assert value(lab, 'count(ALERTS{alertname=~"SynproxyFrontNot.*"})') == 0
    assert value(lab, "sum(synproxy_front_ready)") == 3
    assert value(lab, "sum(synproxy_front_bgp_announced)") == 3
    with inside(lab.ns("router")):
        rules = json.loads(urllib.request.urlopen("http://127.0.0.1:9090/api/v1/rules", timeout=5).read())
    loaded = {rule["name"] for group in rules["data"]["groups"] for rule in group["rules"]}
    assert {"SynproxySynsReachBackend", "SynproxyFrontNotAnnouncing", "SynproxyFrontsDisagreeOnEpoch"} <= loaded


def test_front_counters_match_the_traffic(traffic):
    lab, made, flood = traffic
    assert made["failed"] == 0
    connections = made["completed"]
    dropped = value(lab, "sum(synproxy_front_queue_dropped_total) + sum(synproxy_front_queue_user_dropped_total)")
    # Each packet is counted where it was handled: by the queue or by one of the front's programs.
    both = '{__name__=~"synproxy_front_packets_total|synproxy_front_kernel_packets_total", outcome=~"%s"}'
    answered = value(lab, f"sum({both % 'syn_answered'})")
    assert answered + dropped == connections + flood["sent"], (answered, dropped, connections, flood)
    # The handshake ACK validates, and so does the client's first data segment (same seq and ack).
    validated = value(lab, f"sum({both % 'validated'})")
    assert validated == 2 * connections, (validated, connections)
    # A forged ACK's epoch bits name an accepted epoch or not, depending on the current epoch mod 4.
    assert value(lab, f"sum({both % 'forwarded_bad_mac|forwarded_expired_epoch'})") >= FORGED
    assert value(lab, 'sum(synproxy_front_packets_total{outcome="malformed_bad_checksum"})') == BAD_CHECKSUM
    # The queue's per-backend series count what the queue forwarded.
    forwarded = value(lab, "sum(synproxy_front_forwarded_packets_total)")
    assert forwarded == value(lab, 'sum(synproxy_front_packets_total{outcome=~"validated|forwarded.*"})')
    assert len(lab.query_prometheus('synproxy_backend_packets_total{outcome="decapsulated"} > 0')) == 2
    assert len(lab.query_prometheus('synproxy_front_data_plane{mode="xdp"} == 1')) == 3, "the default"


def test_per_vip_and_port_counts_add_up_to_the_fronts_totals(traffic):
    """synproxy_front_vip_packets_total (the queue's and the programs' counts together): every SYN answered,
    handshake validated and packet forwarded is counted once, under the VIP and port it was sent to."""
    lab, _, _ = traffic
    both = '{__name__=~"synproxy_front_packets_total|synproxy_front_kernel_packets_total", outcome=~"%s"}'
    for outcome, outcomes in (("syn_answered", "syn_answered"), ("validated", "validated"),
                              ("forwarded", "forwarded|forwarded_bad_mac|forwarded_expired_epoch")):
        per_vip = value(lab, f'sum(synproxy_front_vip_packets_total{{outcome="{outcome}"}})')
        assert per_vip == value(lab, f"sum({both % outcomes})") > 0, outcome
    answered = {(s["metric"]["vip"], s["metric"]["port"])
                for s in lab.query_prometheus('synproxy_front_vip_packets_total{outcome="syn_answered"} > 0')}
    assert {(VIP, "80"), (VIP, "7")} <= answered  # the flood and HTTP, the echo clients


def test_front_gauges_and_histogram(traffic):
    lab, _, _ = traffic
    epochs = {float(s["value"][1]) for s in lab.query_prometheus("synproxy_front_salt_epoch")}
    assert epochs <= {time.time() // 60, time.time() // 60 - 1} and epochs
    assert len(lab.query_prometheus("synproxy_front_queue_length")) == 3
    assert value(lab, "sum(synproxy_front_packet_processing_seconds_count)") > 0
    assert value(lab, "sum(synproxy_front_packet_processing_seconds_sum)") > 0


def test_backend_counters_match_the_traffic(traffic):
    lab, made, _ = traffic
    assert value(lab, 'sum(synproxy_backend_packets_total{outcome="created"})') == made["completed"]
    assert value(lab, 'sum(synproxy_backend_packets_total{outcome="syn_received"})') == 0
    assert value(lab, 'sum(synproxy_backend_packets_total{outcome="cookie_bad"})') == 0
    assert value(lab, 'sum(synproxy_backend_packets_total{outcome="untrusted"})') == 0
    assert value(lab, 'sum(synproxy_backend_packets_total{outcome="decapsulated"})') >= made["completed"]
    assert lab.query_prometheus("synproxy_backend_kfunc_failures_total") == []


def test_metrics_never_show_the_secret(traffic):
    lab, _, _ = traffic
    secret = (lab.state_dir / "secret.hex").read_text().strip()
    for host in lab.by_role("front") + lab.by_role("backend"):
        port = 9100 if host.role == "front" else 9101
        text = lab.run("client", ["curl", "-sS", f"http://{host.address}:{port}/metrics"]).stdout
        assert "synproxy_" in text and secret not in text and secret[:16] not in text
    logs = "".join(p.read_text() for p in (lab.state_dir / "logs").glob("*.log"))
    assert secret not in logs and secret[:16] not in logs
    for pid in (lab.pid(h.name) for h in lab.by_role("front") + lab.by_role("backend")):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        assert secret not in cmdline
