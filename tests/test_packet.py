"""The packet module against scapy (an independent implementation) and against garbage."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.packet import raw

from synproxy.packet import (
    ACK,
    SYN,
    FastOpen,
    MalformedPacket,
    TcpOptions,
    build_tcp_options,
    build_tcp_packet,
    internet_checksum,
    parse_tcp,
    parse_tcp_options,
    tcp_checksum_valid,
)

V4 = (bytes([198, 18, 1, 2]), bytes([198, 19, 0, 10]))
V6 = (bytes.fromhex("20010db8000100000000000000000002"), bytes.fromhex("20010db8ffff00000000000000000010"))

tcp_options = st.builds(TcpOptions, mss=st.none() | st.integers(0, 65535),
                        wscale=st.none() | st.integers(0, 14), sack_permitted=st.booleans(),
                        timestamp=st.none() | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
                        fastopen=st.none() | st.builds(FastOpen, st.sampled_from((0, 4, 6, 8, 10, 12, 14, 16)).flatmap(
                            lambda size: st.binary(min_size=size, max_size=size)), st.booleans()))


def scapy_checksums(packet: bytes, family: int) -> tuple[int, int]:
    """Checksums scapy computes for the same packet with ours removed."""
    layer = IP if family == 4 else IPv6
    parsed = layer(packet)
    if family == 4:
        del parsed[IP].chksum
    del parsed[TCP].chksum
    again = layer(raw(parsed))
    return (again[IP].chksum if family == 4 else 0), again[TCP].chksum


@given(st.sampled_from([V4, V6]), st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 2**32 - 1),
       st.integers(0, 2**32 - 1), tcp_options, st.binary(max_size=64))
def test_built_packets_parse_back_and_checksum_like_scapy(addresses, sport, dport, seq, ack, options,
                                                          payload):
    saddr, daddr = addresses
    packet = build_tcp_packet(saddr, daddr, sport, dport, seq, ack, SYN | ACK, 65535,
                              build_tcp_options(*options), payload)
    segment = parse_tcp(packet)
    assert (segment.saddr, segment.daddr, segment.sport, segment.dport) == (saddr, daddr, sport, dport)
    assert (segment.seq, segment.ack, segment.flags, segment.payload_length) == (seq, ack, SYN | ACK,
                                                                                  len(payload))
    assert parse_tcp_options(segment.raw_options) == options
    family = 4 if len(saddr) == 4 else 6
    ip_checksum, tcp_checksum = scapy_checksums(packet, family)
    if family == 4:
        assert int.from_bytes(packet[10:12], "big") == ip_checksum
    header = 20 if family == 4 else 40
    assert int.from_bytes(packet[header + 16:header + 18], "big") == tcp_checksum


def test_parses_scapy_syn_with_ip_options_and_unknown_tcp_options():
    packet = raw(IP(src="198.18.1.2", dst="198.19.0.10", options=b"\x01\x01\x01\x00")
                 / TCP(sport=4000, dport=80, flags="S", seq=9,
                       options=[("MSS", 1300), ("NOP", None), ("WScale", 3), ("SAckOK", b""),
                                (30, b"\x00\x01"), ("Timestamp", (7, 0))]))
    segment = parse_tcp(packet)
    assert (segment.sport, segment.dport, segment.seq, segment.flags) == (4000, 80, 9, SYN)
    assert parse_tcp_options(segment.raw_options) == TcpOptions(1300, 3, True, (7, 0))


@pytest.mark.parametrize("raw_options", [
    b"\x02",                      # kind with no length byte
    b"\x02\x00\x05\xb4",          # length 0
    b"\x02\x01\x05\xb4",          # length 1
    b"\x02\x08\x05\xb4",          # runs past the end
    b"\x03\x04\x07\x00",          # window scale with the wrong length
    b"\x1e\x09\x00\x00",          # unknown option running past the end
])
def test_bad_option_lengths_are_malformed(raw_options):
    with pytest.raises(MalformedPacket) as caught:
        parse_tcp_options(raw_options)
    assert caught.value.reason == "bad_tcp_option"


@pytest.mark.parametrize("raw_options, fastopen", [
    (b"\x22\x02\x01\x01", FastOpen(b"", False)),                            # a request
    (b"\x22\x0a" + bytes(range(8)) + b"\x01\x01", FastOpen(bytes(range(8)), False)),
    (b"\xfe\x04\xf9\x89", FastOpen(b"", True)),                             # the experimental form
    (b"\xfe\x08\xf9\x89\x01\x02\x03\x04", FastOpen(b"\x01\x02\x03\x04", True)),
    (b"\xfe\x04\xf9\x88", None),                                             # another experiment
    (b"\xfe\x02\x01\x01", None),
    (b"\x22\x03\x00\x01", None),                                             # odd length: ignored...
    (b"\x22\x02\x22\x03\x00\x01", FastOpen(b"", False)),                  # ...so an earlier one stands
    (b"\x22\x04\x00\x01", None),                                             # 2 bytes: too short a cookie
    (b"\x22\x02\x22\x04\x00\x01", None),                                  # ...which cancels an earlier one
    (b"\x22\x14" + bytes(18), None),                                          # 18 bytes: too long
])
def test_fast_open_options_are_read_as_linux_reads_them(raw_options, fastopen):
    assert parse_tcp_options(raw_options).fastopen == fastopen


def test_end_of_options_stops_parsing():
    assert parse_tcp_options(b"\x02\x04\x05\xb4\x00\xff\xff\xff") == TcpOptions(mss=1460)


@pytest.mark.parametrize("mutate, reason", [
    (lambda p: p[:19], "truncated_ip"),
    (lambda p: b"", "truncated_ip"),
    (lambda p: bytes([0x44]) + p[1:], "bad_ip_length"),             # IHL 4
    (lambda p: p[:2] + (9999).to_bytes(2, "big") + p[4:], "bad_ip_length"),
    (lambda p: p[:6] + b"\x20\x00" + p[8:], "fragment"),             # more fragments
    (lambda p: p[:6] + b"\x00\x10" + p[8:], "fragment"),             # non-zero offset
    (lambda p: p[:9] + b"\x11" + p[10:], "not_tcp"),
    (lambda p: bytes([0x55]) + p[1:], "bad_ip_version"),
    (lambda p: p[:32] + bytes([0x40]) + p[33:], "bad_tcp_offset"),   # data offset 4
    (lambda p: p[:32] + bytes([0xF0]) + p[33:], "bad_tcp_offset"),   # past the packet
    (lambda p: p[:2] + (30).to_bytes(2, "big") + p[4:30], "truncated_tcp"),
])
def test_malformed_ipv4_gets_a_reason(mutate, reason):
    packet = build_tcp_packet(*V4, 1, 2, 3, 4, ACK, 100)
    with pytest.raises(MalformedPacket) as caught:
        parse_tcp(mutate(packet))
    assert caught.value.reason == reason


def test_truncated_ipv6_and_extension_headers_are_malformed():
    packet = build_tcp_packet(*V6, 1, 2, 3, 4, ACK, 100)
    for bad, reason in ((packet[:39], "truncated_ip"), (packet[:50], "bad_ip_length"),
                        (packet[:6] + b"\x00" + packet[7:], "not_tcp")):
        with pytest.raises(MalformedPacket) as caught:
            parse_tcp(bad)
        assert caught.value.reason == reason


@settings(max_examples=3000)
@given(st.binary(max_size=120))
def test_garbage_only_ever_raises_malformed_packet(data):
    try:
        segment = parse_tcp(data)
        parse_tcp_options(segment.raw_options)
    except MalformedPacket:
        pass


@settings(max_examples=2000)
@given(st.binary(max_size=40))
def test_garbage_options_only_ever_raise_malformed_packet(data):
    try:
        parse_tcp_options(data)
    except MalformedPacket:
        pass


@given(st.binary(max_size=200))
def test_checksum_verifies_to_zero(data):
    padded = data + b"\0" * (len(data) % 2)
    checksum = internet_checksum(padded)
    assert internet_checksum(padded + checksum.to_bytes(2, "big")) == 0


@given(st.sampled_from(["v4", "v4-ip-options", "v6"]), st.binary(max_size=33), st.integers(0, 2**32 - 1),
       st.data())
def test_tcp_checksum_check_agrees_with_scapy_and_catches_a_flipped_bit(kind, payload, seq, data):
    tcp = TCP(sport=40000, dport=80, flags="PA", seq=seq, options=[("MSS", 1460)]) / payload
    if kind == "v6":
        packet = raw(IPv6(src="2001:db8:1::2", dst="2001:db8:ffff::10") / tcp)
    else:
        packet = raw(IP(src="198.18.1.2", dst="198.19.0.10",
                        options=b"\x01\x01\x01\x00" if kind == "v4-ip-options" else b"") / tcp)
    assert tcp_checksum_valid(packet, parse_tcp(packet))
    start = 40 if kind == "v6" else (packet[0] & 0xF) * 4
    flipped = data.draw(st.integers(start, len(packet) - 1).filter(lambda i: i != start + 12))  # not the offset
    bit = 1 << data.draw(st.integers(0, 7))
    corrupted = packet[:flipped] + bytes([packet[flipped] ^ bit]) + packet[flipped + 1:]
    assert not tcp_checksum_valid(corrupted, parse_tcp(corrupted))
