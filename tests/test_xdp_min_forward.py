"""bpf/xdp_min_forward.bpf.c, the anchor of benchmarks/front_xdp_cost.py: it must forward what it claims
to (the encapsulation's headers, the front's layout, MAC zero) or its cost says nothing."""

import ipaddress
import os
import struct

import pytest

from synproxy import encap
from synproxy.bpf.libbpf import BpfObject, prog_test_run
from synproxy.bpf.loading import build_object
from synproxy.packet import ACK, PSH, build_tcp_packet, parse_tcp

XDP_PASS, XDP_TX = 2, 3
FARM, BACKEND = ipaddress.ip_address("10.99.0.1").packed, ipaddress.ip_address("10.98.0.1").packed
DMAC, SMAC = bytes.fromhex("020000009902"), bytes.fromhex("020000009901")
SOURCE_PORT, ENCAP_PORT = 0xC000 | 0x1234, 6080
MAC_AT = 20 + 8 + 12  # the encapsulation header's MAC, from the outer IPv4 header on


@pytest.fixture
def anchor():
    loaded = BpfObject(build_object("xdp_min_forward"))
    try:
        loaded.map("min_forward_target").update(
            bytes(4), FARM + BACKEND + struct.pack("!HH", ENCAP_PORT, SOURCE_PORT) + DMAC + SMAC)
        yield loaded.program_fd("xdp_min_forward")
    finally:
        loaded.close()


def test_the_minimal_forwarder_encapsulates_a_segment_as_the_front_does_without_the_mac(anchor):
    client, vip = ipaddress.ip_address("198.18.1.2").packed, ipaddress.ip_address("198.19.0.10").packed
    inner = build_tcp_packet(client, vip, 40000, 80, 5000, 777, ACK | PSH, 502, b"", os.urandom(100))
    verdict, frame = prog_test_run(anchor, bytes(12) + b"\x08\x00" + inner)
    wrapped = encap.encapsulate(inner, parse_tcp(inner), FARM, BACKEND, ENCAP_PORT, SOURCE_PORT, False,
                                os.urandom(16))
    assert verdict == XDP_TX
    assert frame == DMAC + SMAC + b"\x08\x00" + wrapped[:MAC_AT] + bytes(8) + wrapped[MAC_AT + 8:]


def test_the_minimal_forwarder_passes_what_is_not_ipv4_tcp(anchor):
    udp = bytes(12) + b"\x08\x00" + bytes.fromhex("45000020000040004011") + bytes(10) + bytes(12)
    ipv6 = bytes(12) + b"\x86\xdd" + bytes(60)
    for frame in (udp, ipv6, bytes(12) + b"\x08\x00"):
        assert prog_test_run(anchor, frame) == (XDP_PASS, frame)
