"""The encapsulation (docs/backend.md) against its vectors: key derivation, MAC message, MAC, packet."""

from __future__ import annotations

import ipaddress

from scapy.layers.inet import IP, UDP
from scapy.packet import raw

from synproxy import encap
from synproxy.packet import parse_tcp
from tests.conftest import ENCAP_VECTORS_FILE
from tests.vectors import generate


def test_encap_vectors_file_is_what_the_generator_writes(cookie_vectors):
    assert ENCAP_VECTORS_FILE.read_text() == generate.render(generate.build_encap_document(cookie_vectors))


def test_encap_vectors_match_the_implementation(encap_vectors):
    key = encap.encap_key(bytes.fromhex(encap_vectors["secret"]))
    assert key.hex() == encap_vectors["encap_key"]
    front, backend = (ipaddress.ip_address(encap_vectors[a]).packed for a in ("front", "backend"))
    vectors = encap_vectors["vectors"]
    assert {(v["family"], v["validated"], v["previous"] != "0.0.0.0") for v in vectors} == {
        (family, validated, named) for family in (4, 6) for validated in (True, False) for named in (True, False)}
    for v in vectors:
        inner = bytes.fromhex(v["inner"])
        segment = parse_tcp(inner)
        flags = encap.FLAG_VALIDATED if v["validated"] else 0
        previous = ipaddress.ip_address(v["previous"]).packed
        message = encap.mac_input(front, backend, segment.saddr, segment.daddr, segment.sport, segment.dport, flags,
                                  previous)
        assert message.hex() == v["mac_input"] and len(message) == encap.MAC_INPUT_BYTES == 56, v["name"]
        assert encap.encap_mac(key, message) == v["mac"], v["name"]
        packet = encap.encapsulate(inner, segment, front, backend, encap_vectors["encap_port"], v["flow_hash"],
                                   v["validated"], key, previous)
        assert packet.hex() == v["packet"], v["name"]


def test_encapsulation_layout(encap_vectors):
    """What docs/backend.md says, read back with scapy: outer IPv4 with DF, UDP, then 16 header bytes."""
    for v in encap_vectors["vectors"]:
        outer = IP(bytes.fromhex(v["packet"]))
        assert (outer.src, outer.dst, outer.flags, outer[UDP].dport) == (
            encap_vectors["front"], encap_vectors["backend"], "DF", encap_vectors["encap_port"])
        assert outer.chksum == IP(raw(IP(raw(outer)[:20]))).chksum
        header = raw(outer[UDP].payload)
        assert header[:4] == bytes([0x5C, int(v["validated"]), 3, 0])
        assert header[4:8] == ipaddress.ip_address(v["previous"]).packed
        assert header[8:16] == v["mac"].to_bytes(8, "big")
        assert header[16:].hex() == v["inner"]
        assert len(outer) - len(header[16:]) == encap.OVERHEAD == 44
        message = bytes.fromhex(v["mac_input"])
        if v["family"] == 4:  # inner IPv4 addresses in the ::ffff:a.b.c.d form
            assert message[8:20] == message[24:36] == bytes(10) + b"\xff\xff"
        assert message[45:48] == bytes(3) and message[44] == int(v["validated"])
        assert message[48:52] == header[4:8] and message[52:] == bytes(4)


def test_a_chained_packet_is_the_same_inner_packet_from_the_owner_to_the_previous_one(encap_vectors):
    """encap.chain, what a backend sends on: outer addresses moved along, CHAINED set, UDP ports and the
    previous-owner field kept, a MAC that holds for the new outer addresses and flags."""
    key = encap.encap_key(bytes.fromhex(encap_vectors["secret"]))
    chained = [v for v in encap_vectors["vectors"] if "chained" in v]
    assert {v["family"] for v in chained} == {4, 6} and not any(v["validated"] for v in chained)
    for v in chained:
        sent, out = IP(bytes.fromhex(v["packet"])), IP(bytes.fromhex(v["chained"]))
        assert (out.src, out.dst, out.flags, out.ttl) == (encap_vectors["backend"], encap_vectors["previous"], "DF", 64)
        assert (out[UDP].sport, out[UDP].dport, out[UDP].len, out[UDP].chksum) == (
            sent[UDP].sport, sent[UDP].dport, sent[UDP].len, 0)
        assert out.chksum == IP(raw(IP(raw(out)[:20]))).chksum
        header, inner = raw(out[UDP].payload)[:16], raw(out[UDP].payload)[16:]
        assert header[:8] == bytes([0x5C, encap.FLAG_CHAINED, 3, 0]) + ipaddress.ip_address(v["previous"]).packed
        assert inner.hex() == v["inner"]
        segment = parse_tcp(inner)
        message = encap.mac_input(*(ipaddress.ip_address(encap_vectors[a]).packed for a in ("backend", "previous")),
                                  segment.saddr, segment.daddr, segment.sport, segment.dport, encap.FLAG_CHAINED,
                                  ipaddress.ip_address(v["previous"]).packed)
        assert header[8:] == encap.encap_mac(key, message).to_bytes(8, "big")
