"""The encapsulation (docs/backend.md) against its vectors: key derivation, MAC message, MAC, packet."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import IP, UDP
from scapy.packet import raw

from synproxy import encap
from synproxy.packet import parse_tcp
from tests.conftest import ENCAP_VECTORS_FILE
from tests.vectors import generate


def test_encap_vectors_file_is_what_the_generator_writes(cookie_vectors):
    assert ENCAP_VECTORS_FILE.read_text() == generate.render(generate.build_encap_document(cookie_vectors))


def former_of(v: dict) -> bytes:
    return b"".join(ipaddress.ip_address(a).packed for a in v["former"])


def test_encap_vectors_match_the_implementation(encap_vectors):
    key = encap.encap_key(bytes.fromhex(encap_vectors["secret"]))
    assert key.hex() == encap_vectors["encap_key"]
    front, backend = (ipaddress.ip_address(encap_vectors[a]).packed for a in ("front", "backend"))
    vectors = encap_vectors["vectors"]
    assert {(v["family"], v["validated"], tuple(v["former"])) for v in vectors} == {
        (family, validated, former) for family in (4, 6) for validated in (True, False)
        for former in (("0.0.0.0", "0.0.0.0"), (encap_vectors["previous"], "0.0.0.0"),
                       (encap_vectors["previous"], encap_vectors["earlier"]))}
    for v in vectors:
        inner = bytes.fromhex(v["inner"])
        segment = parse_tcp(inner)
        flags = encap.FLAG_VALIDATED if v["validated"] else 0
        message = encap.mac_input(front, backend, segment.saddr, segment.daddr, segment.sport, segment.dport, flags,
                                  former_of(v))
        assert message.hex() == v["mac_input"] and len(message) == encap.MAC_INPUT_BYTES == 56, v["name"]
        assert encap.encap_mac(key, message) == v["mac"], v["name"]
        packet = encap.encapsulate(inner, segment, front, backend, encap_vectors["encap_port"], v["flow_hash"],
                                   v["validated"], key, former_of(v))
        assert packet.hex() == v["packet"], v["name"]


def test_encapsulation_layout(encap_vectors):
    """What docs/backend.md says, read back with scapy: outer IPv4 with DF, UDP, then 20 header bytes."""
    for v in encap_vectors["vectors"]:
        outer = IP(bytes.fromhex(v["packet"]))
        assert (outer.src, outer.dst, outer.flags, outer[UDP].dport) == (
            encap_vectors["front"], encap_vectors["backend"], "DF", encap_vectors["encap_port"])
        assert outer.chksum == IP(raw(IP(raw(outer)[:20]))).chksum
        header = raw(outer[UDP].payload)
        assert header[:4] == bytes([0x5C, int(v["validated"]), 3, 0])
        assert header[4:12] == former_of(v)
        assert header[12:20] == v["mac"].to_bytes(8, "big")
        assert header[20:].hex() == v["inner"]
        assert len(outer) - len(header[20:]) == encap.OVERHEAD == 48
        message = bytes.fromhex(v["mac_input"])
        if v["family"] == 4:  # inner IPv4 addresses in the ::ffff:a.b.c.d form
            assert message[8:20] == message[24:36] == bytes(10) + b"\xff\xff"
        assert message[45:48] == bytes(3) and message[44] == int(v["validated"])
        assert message[48:] == header[4:12]


VALIDATED, ICMP, CHAINED = encap.FLAG_VALIDATED, encap.FLAG_ICMP, encap.FLAG_CHAINED


@pytest.mark.parametrize("flags, backend, former, expected", [
    (0, "b", "pe", "p"), (0, "b", "p0", "p"), (0, "b", "0e", "e"), (0, "b", "00", None),
    (0, "p", "pe", "e"),                       # the front's packet reached the previous owner itself
    (0, "b", "bb", None),
    (CHAINED, "p", "pe", "e"), (CHAINED, "p", "p0", None),  # chained to the previous owner: on to the earlier
    (CHAINED, "e", "pe", None), (CHAINED, "x", "pe", None),  # chained anywhere else: the last hop
    (VALIDATED, "b", "pe", None), (VALIDATED | CHAINED, "p", "pe", None),  # VALIDATED: never passed on
    # An ICMP error about a flow follows the chain as the flow's segments do.
    (ICMP, "b", "pe", "p"), (ICMP, "p", "pe", "e"), (ICMP | CHAINED, "p", "pe", "e"), (ICMP | CHAINED, "e", "pe", None),
])
def test_next_owner(flags, backend, former, expected):
    address = {"b": b"\x0a\0\0\x01", "p": b"\x0a\0\0\x02", "e": b"\x0a\0\0\x03", "x": b"\x0a\0\0\x04",
               "0": encap.NO_OWNER}
    assert encap.next_owner(flags, address[backend], address[former[0]] + address[former[1]]) == (
        address[expected] if expected else None)


def test_the_chain_passes_the_same_inner_packet_on_from_owner_to_owner(encap_vectors):
    """encap.chain, what a backend sends on: outer addresses moved along, CHAINED set, UDP ports and the
    former owners kept, a MAC that holds for the new outer addresses and flags; at most two hops."""
    key = encap.encap_key(bytes.fromhex(encap_vectors["secret"]))
    chained = [v for v in encap_vectors["vectors"] if "chained" in v]
    assert {(v["family"], len(v["chained"])) for v in chained} == {(4, 1), (4, 2), (6, 1), (6, 2)}
    assert not any(v["validated"] for v in chained)
    for v in chained:
        hops = [encap_vectors["backend"], *(a for a in v["former"] if a != "0.0.0.0")]
        sent = IP(bytes.fromhex(v["packet"]))
        for hop, packet in enumerate(v["chained"]):
            out = IP(bytes.fromhex(packet))
            assert (out.src, out.dst, out.flags, out.ttl) == (hops[hop], hops[hop + 1], "DF", 64)
            assert (out[UDP].sport, out[UDP].dport, out[UDP].len, out[UDP].chksum) == (
                sent[UDP].sport, sent[UDP].dport, sent[UDP].len, 0)
            assert out.chksum == IP(raw(IP(raw(out)[:20]))).chksum
            header, inner = raw(out[UDP].payload)[:20], raw(out[UDP].payload)[20:]
            assert header[:12] == bytes([0x5C, encap.FLAG_CHAINED, 3, 0]) + former_of(v)
            assert inner.hex() == v["inner"]
            segment = parse_tcp(inner)
            message = encap.mac_input(*(ipaddress.ip_address(a).packed for a in hops[hop:hop + 2]),
                                      segment.saddr, segment.daddr, segment.sport, segment.dport, encap.FLAG_CHAINED,
                                      former_of(v))
            assert header[12:] == encap.encap_mac(key, message).to_bytes(8, "big")
        assert encap.chain(bytes.fromhex(v["chained"][-1]), parse_tcp(bytes.fromhex(v["inner"])), key) is None
