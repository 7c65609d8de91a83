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
    assert {(v["family"], v["validated"]) for v in vectors} == {(4, True), (4, False), (6, True), (6, False)}
    for v in vectors:
        inner = bytes.fromhex(v["inner"])
        segment = parse_tcp(inner)
        flags = encap.FLAG_VALIDATED if v["validated"] else 0
        message = encap.mac_input(front, backend, segment.saddr, segment.daddr, segment.sport, segment.dport, flags)
        assert message.hex() == v["mac_input"] and len(message) == 48, v["name"]
        assert encap.encap_mac(key, message) == v["mac"], v["name"]
        packet = encap.encapsulate(inner, segment, front, backend, encap_vectors["encap_port"], v["flow_hash"],
                                   v["validated"], key)
        assert packet.hex() == v["packet"], v["name"]


def test_encapsulation_layout(encap_vectors):
    """What docs/backend.md says, read back with scapy: outer IPv4 with DF, UDP, then 12 header bytes."""
    for v in encap_vectors["vectors"]:
        outer = IP(bytes.fromhex(v["packet"]))
        assert (outer.src, outer.dst, outer.flags, outer[UDP].dport) == (
            encap_vectors["front"], encap_vectors["backend"], "DF", encap_vectors["encap_port"])
        assert outer.chksum == IP(raw(IP(raw(outer)[:20]))).chksum
        header = raw(outer[UDP].payload)
        assert header[:4] == bytes([0x5C, int(v["validated"]), 0, 0])
        assert header[4:12] == v["mac"].to_bytes(8, "big")
        assert header[12:].hex() == v["inner"]
        assert len(outer) - len(header[12:]) == encap.OVERHEAD == 40
        message = bytes.fromhex(v["mac_input"])
        if v["family"] == 4:  # inner IPv4 addresses in the ::ffff:a.b.c.d form
            assert message[8:20] == message[24:36] == bytes(10) + b"\xff\xff"
        assert message[45:] == bytes(3) and message[44] == int(v["validated"])
