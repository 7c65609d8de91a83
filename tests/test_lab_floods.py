"""Every flood an attacker sends at the default front (`data_plane: auto`, native XDP on the lab's veths):
where it ends, that the counters say so, that legitimate clients keep connecting during and after it, and
that no node process dies. docs/threat-model.md ("Floods by kind") has the table these tests check.

Each flood is a bounded burst (FLOOD_PACKETS within FLOOD_SECONDS) sent from the attacker's namespace by a
raw socket; the lab's clients connect while it runs.
Run under the lab lock: `flock /tmp/synproxy-lab.lock python3 -m pytest -q tests/test_lab_floods.py`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import socket
import struct
import threading
import time
from collections import Counter

import pytest

from synproxy.lab.topology import SPOOFED_SOURCES, VIP, VIP6, Lab
from synproxy.netns import inside
from synproxy.packet import (
    ACK,
    FIN,
    PROTO_ICMP,
    PROTO_UDP,
    PSH,
    RST,
    SYN,
    FastOpen,
    build_fastopen_option,
    build_ip_header,
    build_tcp_options,
    build_tcp_packet,
    internet_checksum,
)
from tests.lab_fixtures import backend_stats, clients, data_plane, needs_root, outcomes, running_lab

pytestmark = [pytest.mark.netns, needs_root]
FLOOD_PACKETS = 8000
FLOOD_SECONDS = 1.5
BURST_PACKETS = 20_000
PROTECTED_PORT, UNPROTECTED_PORT = 80, 81
VIP4_BYTES, VIP6_BYTES = ipaddress.ip_address(VIP).packed, ipaddress.ip_address(VIP6).packed
SPOOFED = ipaddress.ip_network(SPOOFED_SOURCES)
SPOOFED6 = ipaddress.ip_network("2001:db8:2::/64")  # the attacker's own /64: replies come back to it, unread
SYN_OPTIONS = build_tcp_options(mss=1460, wscale=7, sack_permitted=True)


def source4(rng: random.Random) -> bytes:
    return (int(SPOOFED.network_address) + rng.randrange(SPOOFED.num_addresses)).to_bytes(4, "big")


def source6(rng: random.Random) -> bytes:
    return (int(SPOOFED6.network_address) + rng.randrange(2, 1 << 32)).to_bytes(16, "big")


def tcp4(rng, flags, port=PROTECTED_PORT, options=b"", payload=b"") -> bytearray:
    return bytearray(build_tcp_packet(source4(rng), VIP4_BYTES, rng.randrange(1024, 65536), port,
                                      rng.getrandbits(32), rng.getrandbits(32) if flags & ACK else 0, flags,
                                      64240, options, payload))


def rst(rng):
    return tcp4(rng, RST)


def fin(rng):
    return tcp4(rng, FIN | ACK)


def established_data(rng):
    return tcp4(rng, ACK | PSH, payload=bytes(100))


def syn_with_payload(rng):
    return tcp4(rng, SYN, options=SYN_OPTIONS, payload=bytes(100))


def tfo_random_cookie(rng):
    option = build_fastopen_option(FastOpen(rng.getrandbits(64).to_bytes(8, "big"), False))
    return tcp4(rng, SYN, options=SYN_OPTIONS + option + bytes(-len(option) % 4), payload=bytes(100))


def syn_ack(rng):
    return tcp4(rng, SYN | ACK, options=SYN_OPTIONS)


def fragment4(rng):
    """A first fragment (TCP header, MF) or a later one (no TCP header), of never-completed datagrams."""
    packet = tcp4(rng, SYN, options=SYN_OPTIONS, payload=bytes(64))
    packet[4:6] = rng.getrandbits(16).to_bytes(2, "big")
    packet[6:8] = struct.pack("!H", 0x2000 if rng.getrandbits(1) else 0x2000 | rng.randrange(1, 100))
    packet[10:12] = b"\0\0"
    packet[10:12] = internet_checksum(bytes(packet[:20])).to_bytes(2, "big")
    return packet


def ipv6_extension_header(rng):
    """A SYN behind a destination-options header (8 bytes of padding)."""
    packet = build_tcp_packet(source6(rng), VIP6_BYTES, rng.randrange(1024, 65536), PROTECTED_PORT,
                              rng.getrandbits(32), 0, SYN, 64240, SYN_OPTIONS)
    header = bytearray(packet[:40])
    header[4:6] = struct.pack("!H", len(packet) - 40 + 8)
    header[6] = 60
    return header + bytes([6, 0, 1, 4, 0, 0, 0, 0]) + packet[40:]


def udp(rng):
    payload = bytes(32)
    return build_ip_header(source4(rng), VIP4_BYTES, PROTO_UDP, 8 + len(payload)) + struct.pack(
        "!HHHH", rng.randrange(1024, 65536), rng.choice([53, PROTECTED_PORT, 4789]), 8 + len(payload), 0) + payload


def icmp_echo(rng):
    body = struct.pack("!BBHHH", 8, 0, 0, rng.getrandbits(16), 1) + bytes(32)
    body = body[:2] + internet_checksum(body).to_bytes(2, "big") + body[4:]
    return build_ip_header(source4(rng), VIP4_BYTES, PROTO_ICMP, len(body)) + body


def unprotected_port(rng):
    return tcp4(rng, SYN, port=UNPROTECTED_PORT, options=SYN_OPTIONS)


def bad_tcp_checksum(rng):
    packet = tcp4(rng, rng.choice([SYN, ACK]), options=SYN_OPTIONS)
    packet[36] ^= 0xFF
    return packet


def bad_ip_checksum(rng):
    """Sent as frames (LINK_LAYER): a raw IP socket fills the IPv4 header checksum in itself (raw(7))."""
    packet = tcp4(rng, rng.choice([SYN, ACK]), options=SYN_OPTIONS)
    packet[10] ^= 0xFF
    return packet


LINK_LAYER = {"bad_ip_checksum"}
FLOODS = {f.__name__: f for f in (rst, fin, established_data, syn_with_payload, tfo_random_cookie, syn_ack,
                                  fragment4, ipv6_extension_header, udp, icmp_echo, unprotected_port,
                                  bad_tcp_checksum, bad_ip_checksum)}


def send_flood(lab: Lab, make, count: int, seconds: float, sent: list, paced: bool = True) -> None:
    """``count`` packets of ``make``, paced evenly over ``seconds`` (unpaced: as fast as a raw socket
    takes them), at most until ``seconds`` are over, from the attacker's namespace; the number the socket
    took is appended to ``sent`` (a busy machine falls behind the pace and the deadline cuts the flood
    short: the tests check where what was sent ends, not that all of it was)."""
    rng = random.Random(17)
    packets = [bytes(make(rng)) for _ in range(count)]
    family = socket.AF_INET6 if packets[0][0] >> 4 == 6 else socket.AF_INET
    target = (VIP6 if family == socket.AF_INET6 else VIP, 0)
    if make.__name__ in LINK_LAYER:
        header = router_mac(lab) + attacker_mac(lab) + b"\x08\x00"
        packets, target = [header + packet for packet in packets], ("eth0", 0)
    with inside(lab.ns("attacker")):
        sock = (socket.socket(socket.AF_PACKET, socket.SOCK_RAW) if make.__name__ in LINK_LAYER
                else socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW))
    started, taken = time.monotonic(), 0
    with sock:
        for done, packet in enumerate(packets, 1):
            try:
                sock.sendto(packet, target)
                taken += 1
            except OSError:  # the device queue is full: the packet is lost as a flood's would be
                pass
            if done % 64 == 0:
                now = time.monotonic()
                if now - started >= seconds:
                    break
                if paced and (ahead := started + done * seconds / count - now) > 0:
                    time.sleep(ahead)
    sent.append((taken, time.monotonic() - started))


def attacker_mac(lab: Lab) -> bytes:
    return bytes.fromhex(json.loads(lab.run("attacker", ["ip", "-j", "link", "show", "eth0"]).stdout)[0]["address"]
                         .replace(":", ""))


def router_mac(lab: Lab) -> bytes:
    """The router's end of the attacker's link (named after the host there)."""
    return bytes.fromhex(json.loads(lab.run("router", ["ip", "-j", "link", "show", "attacker"]).stdout)[0]["address"]
                         .replace(":", ""))


def header_errors(lab: Lab, host: str) -> int:
    """Ip: InHdrErrors of a namespace (/proc/net/snmp): IPv4 headers its kernel dropped as broken."""
    names, values = [line.split() for line in lab.run(host, ["cat", "/proc/net/snmp"]).stdout.splitlines()[:2]]
    return int(values[names.index("InHdrErrors")])


def queue_drops(lab: Lab) -> int:
    """Packets the fronts' kernels dropped because a queue was full (queue_dropped, summed over the fronts'
    queues: /proc/net/netfilter/nfnetlink_queue, sixth column)."""
    return sum(int(line.split()[5]) for host in lab.by_role("front")
               for line in lab.run(host.name, ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout.splitlines())


def processes_alive(lab: Lab) -> dict[str, bool]:
    """Each front and backend process (this test process started them: a dead one stays a zombie until
    reaped, so signal 0 would still find it)."""
    return {host.name: os.waitpid(lab.pid(host.name), os.WNOHANG) == (0, 0)
            for host in lab.by_role("front") + lab.by_role("backend")}


def backend_totals(lab: Lab) -> Counter:
    totals = Counter()
    for host in lab.by_role("backend"):
        stats = backend_stats(lab, host.name)
        totals.update({name: value for name, value in stats.items() if isinstance(value, int)})
        totals.update({f"xdp_{name}": value for name, value in stats.get("xdp", {}).items()})
    return totals


def flood_with_clients(lab: Lab, kind: str, count: int, seconds: float, paced: bool = True) -> tuple:
    """send_flood of ``kind`` in a thread, 10 clients connecting during it and 10 after it:
    (sent, during, after)."""
    sent: list = []
    flood = threading.Thread(target=send_flood, args=(lab, FLOODS[kind], count, seconds, sent, paced))
    flood.start()
    during = clients(lab, 10)
    flood.join(timeout=30)
    assert not flood.is_alive(), "the flood did not end within 30 s"
    return sent, during, clients(lab, 10)


@pytest.fixture(scope="module")
def lab():
    with running_lab("spfl") as lab:
        assert data_plane(lab) == "xdp"
        clients(lab, 4, "--target", VIP)  # neighbours resolved before anything is counted
        yield lab


# Where each flood ends, as the counters that move say: (front counts, backend counts), each a set of
# names whose sum must reach the number of packets sent. What the programs pass on and the queue does not
# take (not TCP to a protected port) ends at the front's blackhole route for the VIP, which the kernel
# does not count (Ip:InReceives only): the programs' `not_protected` is its one count. Background: the
# clients' own connections move the same counters by tens.
WHERE_IT_ENDS = {
    "rst": ({("xdp", "forwarded")}, {"xdp_no_flow_dropped"}),
    "fin": ({("xdp", "forwarded")}, {"xdp_no_flow_dropped", "xdp_no_flow_reset"}),
    "established_data": ({("xdp", "forwarded_bad_mac"), ("xdp", "forwarded_expired_epoch")},
                         {"xdp_no_flow_dropped", "xdp_no_flow_reset"}),
    "syn_with_payload": ({("xdp", "syn_answered")}, set()),
    "tfo_random_cookie": ({("xdp", "fastopen_disabled")}, set()),
    "syn_ack": ({("xdp", "queued")}, set()),
    "fragment4": ({("xdp", "unparsed")}, set()),
    "ipv6_extension_header": ({("xdp", "unparsed")}, set()),
    "udp": ({("xdp", "not_protected")}, set()),
    "icmp_echo": ({("xdp", "not_protected")}, set()),
    "unprotected_port": ({("xdp", "not_protected")}, set()),
    "bad_tcp_checksum": ({("xdp", "unverified"), ("xdp", "forwarded_bad_mac"), ("xdp", "forwarded_expired_epoch")},
                         set()),
    "bad_ip_checksum": (set(), set()),  # the router drops them (its InHdrErrors): no front sees one
}
# What reaches the Python handler (the queue), by its own outcome: every packet of these floods.
QUEUED_AS = {"syn_ack": "invalid_flags", "fragment4": "malformed_fragment", "ipv6_extension_header": "malformed_not_tcp",
             "bad_tcp_checksum": "malformed_bad_checksum"}


@pytest.mark.parametrize("kind", FLOODS)
def test_flood(lab, kind):
    front_before, backend_before = outcomes(lab), backend_totals(lab)
    router_before = header_errors(lab, "router")
    sent, during, after = flood_with_clients(lab, kind, FLOOD_PACKETS, FLOOD_SECONDS)
    front, backend = outcomes(lab) - front_before, backend_totals(lab) - backend_before
    family = "ipv6" if kind == "ipv6_extension_header" else "ipv4"
    print(f"\n{kind}: sent {sent}, failed during {during['failed']}, after {after['failed']}\n"
          f"  front {sorted((k, v) for k, v in front.items() if v)}\n  backend {sorted(backend.items())}")
    assert all(processes_alive(lab).values()), processes_alive(lab)
    assert during["failed"] == 0 and after["failed"] == 0, (during["errors"], after["errors"])
    count = sent[0][0]
    assert count >= FLOOD_PACKETS // 2  # a flood; on a busy machine the pace falls behind and the deadline cuts it
    front_names, backend_names = WHERE_IT_ENDS[kind]
    if front_names:
        assert sum(front[path, outcome, family] for path, outcome in front_names) >= count
    if backend_names:
        assert sum(backend[name] for name in backend_names) >= count
    queued = sum(v for (path, _, fam), v in front.items() if path == "queue" and fam == family)
    if kind in QUEUED_AS:  # of bad checksums, the SYN half: the ACKs are forwarded, the backend's kernel checks
        expected = front["xdp", "unverified", family] if kind == "bad_tcp_checksum" else count
        assert queued == front["queue", QUEUED_AS[kind], family] == expected > 0
    else:
        assert queued == 0
    assert backend["syn_received"] == 0
    if kind in LINK_LAYER:
        assert header_errors(lab, "router") - router_before >= count
        assert front["xdp", "syn_answered", "ipv4"] < count / 10  # the clients' 20, not the flood's


@pytest.mark.parametrize("kind", ["fragment4", "syn_ack"])
def test_a_full_rate_burst_to_the_queue_leaves_clients_connecting(lab, kind):
    """The floods the programs leave to the queue, as fast as the attacker's raw socket sends: the tc
    program drops what exceeds the queue's budget (front.queue_packets_per_second, counted), the Python
    handler takes what it can of the rest, the kernel drops what a full queue cannot take (counted), and
    legitimate clients, whose handshakes the programs answer, do not wait on the queue."""
    front_before, drops_before = outcomes(lab), queue_drops(lab)
    sent, during, after = flood_with_clients(lab, kind, BURST_PACKETS, 10, paced=False)
    front, dropped = outcomes(lab) - front_before, queue_drops(lab) - drops_before
    handled, limited = front["queue", QUEUED_AS[kind], "ipv4"], front["tc", "queue_rate_limited", "ipv4"]
    print(f"\n{kind} unpaced: sent {sent}, beyond the budget {limited}, queue handled {handled}, "
          f"queue full dropped {dropped}, failed during {during['failed']}, after {after['failed']}")
    assert all(processes_alive(lab).values()), processes_alive(lab)
    assert during["failed"] == 0 and after["failed"] == 0, (during["errors"], after["errors"])
    assert limited + handled + dropped >= sent[0][0] * 0.99
