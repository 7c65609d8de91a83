"""The front's sans-IO decision for every kind of packet, checked by parsing its output with scapy."""

import dataclasses
import ipaddress
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPv6,
)
from scapy.packet import raw

from synproxy import encap
from synproxy.front.handler import Action, FrontPolicy, TokenBucket, handle
from synproxy.maglev import build_table, derive_flow_key, flow_hash
from synproxy.salt import SaltSchedule

SCHEDULE = SaltSchedule((b"f" * 32,))
NOW = 1.8e9
VIP4, VIP6 = "198.19.0.10", "2001:db8:ffff::10"
CLIENT4, CLIENT6 = "198.18.1.2", "2001:db8:1::2"
BACKENDS = ("198.18.20.2", "198.18.21.2")
POLICY = FrontPolicy(vips=frozenset({ipaddress.ip_address(VIP4).packed, ipaddress.ip_address(VIP6).packed}),
                     ports=frozenset({80}), farm_address=ipaddress.ip_address("198.18.10.2").packed,
                     backends=tuple(ipaddress.ip_address(b).packed for b in BACKENDS), encap_port=6080,
                     encap_key=encap.encap_key(SCHEDULE.secrets[0]),
                     flow_key=derive_flow_key(b"f" * 32))


def syn(family=4, options=(), flags="S", dport=80, sport=40000):
    layer = IP(src=CLIENT4, dst=VIP4) if family == 4 else IPv6(src=CLIENT6, dst=VIP6)
    return raw(layer / TCP(sport=sport, dport=dport, flags=flags, seq=1000, options=list(options)))


def answer(packet):
    verdict = handle(packet, NOW, SCHEDULE, POLICY)
    assert verdict.action is Action.REPLY, verdict.outcome
    return (IP if packet[0] >> 4 == 4 else IPv6)(verdict.packet)


def client_ack(synack, flags="A", payload=b""):
    layer = IP(src=CLIENT4, dst=VIP4) if IP in synack else IPv6(src=CLIENT6, dst=VIP6)
    return raw(layer / TCP(sport=40000, dport=80, flags=flags, seq=1001, ack=synack[TCP].seq + 1) / payload)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("wscale", [None, 0, 7, 14])
@pytest.mark.parametrize("sack", [False, True])
@pytest.mark.parametrize("timestamps", [False, True])
@pytest.mark.parametrize("ecn", [False, True])
def test_syn_gets_a_syn_ack_that_answers_what_the_client_offered(family, wscale, sack, timestamps, ecn):
    options = [("MSS", 1460)]
    if sack:
        options.append(("SAckOK", b""))
    if timestamps:
        options.append(("Timestamp", (4242, 0)))
    if wscale is not None:
        options.append(("WScale", wscale))
    reply = answer(syn(family, options, flags="SEC" if ecn else "S"))
    tcp = reply[TCP]
    got = dict(tcp.options)
    assert (reply.src, reply.dst) == ((VIP4, CLIENT4) if family == 4 else (VIP6, CLIENT6))
    assert (tcp.sport, tcp.dport, tcp.ack) == (80, 40000, 1001)
    assert tcp.flags == ("SAE" if ecn else "SA")
    assert tcp.window == 65535, "a real window, not SYNPROXY's zero"
    assert got["MSS"] == (1460 - encap.OVERHEAD if family == 4 else 1460 - encap.OVERHEAD - 20)
    assert ("SAckOK" in got) == sack
    assert got.get("WScale") == (None if wscale is None else 7)
    assert (got["Timestamp"][1] if timestamps else None) == (4242 if timestamps else None)
    assert {name for name, _ in tcp.options} <= {"MSS", "SAckOK", "Timestamp", "WScale", "NOP"}
    # The client's ACK validates and is forwarded, flagged, to a backend.
    verdict = handle(client_ack(reply), NOW, SCHEDULE, POLICY)
    assert (verdict.action, verdict.outcome) == (Action.FORWARD, "validated")


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("knob, option", [("timestamps", "Timestamp"), ("window_scaling", "WScale")])
def test_an_option_configured_off_is_answered_as_if_the_client_had_not_offered_it(family, knob, option):
    """A backend whose tcp_timestamps or tcp_window_scaling is 0 resets a client the SYN-ACK promised them
    to (docs/backend.md, "Options the backend has off"): with the key off, the SYN-ACK and its cookie are
    those of a client that did not offer the option, so the backend creates the connection without it."""
    offered = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (4242, 0)), ("NOP", None), ("WScale", 7)]
    configured_off = dataclasses.replace(POLICY, **{knob: False})
    verdict = handle(syn(family, offered), NOW, SCHEDULE, configured_off)
    without = handle(syn(family, [entry for entry in offered if entry[0] != option]), NOW, SCHEDULE, POLICY)
    assert verdict.action is Action.REPLY and verdict.packet == without.packet
    reply = (IP if family == 4 else IPv6)(verdict.packet)
    assert option not in dict(reply[TCP].options)
    assert handle(client_ack(reply), NOW, SCHEDULE, configured_off).outcome == "validated"


def test_unknown_client_options_are_not_echoed():
    reply = answer(syn(4, [("MSS", 1400), (30, b"\x00\x01\x02\x03"), (34, b"")]))
    assert [name for name, _ in reply[TCP].options] == ["MSS"]


def test_forwarded_packet_is_the_client_packet_inside_the_encapsulation():
    reply = answer(syn(4, [("MSS", 1460)]))
    original = client_ack(reply, flags="PA", payload=b"GET / HTTP/1.0\r\n\r\n")
    verdict = handle(original, NOW, SCHEDULE, POLICY)
    outer = IP(verdict.packet)
    assert (outer.src, outer.dst, outer[UDP].dport) == ("198.18.10.2", BACKENDS[verdict.backend], 6080)
    assert outer.flags == "DF" and outer.chksum == IP(raw(IP(raw(outer)[:20]))).chksum
    message = encap.mac_input(POLICY.farm_address, POLICY.backends[verdict.backend],
                              ipaddress.ip_address(CLIENT4).packed, ipaddress.ip_address(VIP4).packed, 40000, 80,
                              encap.FLAG_VALIDATED)
    mac = encap.encap_mac(POLICY.encap_key, message).to_bytes(8, "big")
    header = raw(outer[UDP].payload)[:encap.HEADER_BYTES]
    assert header == bytes([encap.MAGIC, encap.FLAG_VALIDATED, encap.VERSION, 0]) + encap.NO_FORMER_OWNERS + mac
    assert raw(outer[UDP].payload)[encap.HEADER_BYTES:] == original
    assert len(verdict.packet) == len(original) + encap.OVERHEAD


def client_packet(flags, seq, ack):
    return raw(IP(src=CLIENT4, dst=VIP4) / TCP(sport=40000, dport=80, flags=flags, seq=seq, ack=ack))


@pytest.mark.parametrize("describe, flags, seq, ack_offset, outcome", [
    ("wrong cookie", "A", 1001, 2, "forwarded_bad_mac"),
    ("wrong client ISN", "A", 1002, 1, "forwarded_bad_mac"),
    ("established traffic", "PA", 5000, 12345, None),
    ("fin", "FA", 1001, 1, "forwarded"),
    ("rst", "RA", 1001, 1, "forwarded"),
])
def test_other_packets_are_forwarded_unflagged(describe, flags, seq, ack_offset, outcome):
    cookie = answer(syn(4, [("MSS", 1460)]))[TCP].seq
    verdict = handle(client_packet(flags, seq, (cookie + ack_offset) % 2**32), NOW, SCHEDULE, POLICY)
    assert verdict.action is Action.FORWARD, describe
    assert verdict.outcome in ((outcome,) if outcome else ("forwarded_bad_mac", "forwarded_expired_epoch"))
    assert verdict.packet[29] == 0, "not flagged VALIDATED"


def test_ack_of_an_old_epoch_is_not_flagged():
    reply = answer(syn(4, [("MSS", 1460)]))
    verdict = handle(client_ack(reply), NOW + 2 * SCHEDULE.period + SCHEDULE.skew + 1, SCHEDULE, POLICY)
    assert verdict.outcome == "forwarded_expired_epoch"


@pytest.mark.parametrize("packet, outcome", [
    (syn(flags="SA"), "invalid_flags"),
    (syn(flags="SR"), "invalid_flags"),
    (syn(flags="SF"), "invalid_flags"),
    (syn(dport=22), "not_protected"),
    (raw(IP(src=CLIENT4, dst="198.19.0.99") / TCP(dport=80, flags="S")), "not_protected"),
    (syn()[:30], "malformed_bad_ip_length"),
    (syn()[:36] + bytes([syn()[36] ^ 0xFF]) + syn()[37:], "malformed_bad_checksum"),
    (raw(IP(src=CLIENT4, dst=VIP4) / UDP(dport=80)), "malformed_not_tcp"),
    (raw(IP(src=CLIENT4, dst=VIP4) / TCP(dport=80, flags="S", dataofs=6) / b"\x02\x09\x05\xb4"),
     "malformed_bad_tcp_option"),
])
def test_bad_packets_are_dropped_with_a_reason(packet, outcome):
    verdict = handle(packet, NOW, SCHEDULE, POLICY)
    assert (verdict.action, verdict.outcome) == (Action.DROP, outcome)


@settings(max_examples=3000)
@given(st.binary(max_size=100))
def test_garbage_gets_a_verdict(data):
    verdict = handle(data, NOW, SCHEDULE, POLICY)
    assert verdict.action in Action


@settings(max_examples=500)
@given(st.binary(min_size=0, max_size=40))
def test_syn_with_garbage_options_gets_a_verdict(options):
    padded = options + b"\0" * (-len(options) % 4)
    packet = raw(IP(src=CLIENT4, dst=VIP4) / TCP(sport=1, dport=80, flags="S", dataofs=5 + len(padded) // 4)
                 / padded)
    assert handle(packet, NOW, SCHEDULE, POLICY).action in (Action.REPLY, Action.DROP)


def test_every_front_picks_the_same_backend_and_load_is_spread():
    other = dataclasses.replace(POLICY, farm_address=ipaddress.ip_address("198.18.11.2").packed)
    chosen = Counter()
    for sport in range(1024, 3024):
        packet = raw(IP(src=CLIENT4, dst=VIP4) / TCP(sport=sport, dport=80, flags="A", seq=1, ack=1))
        first, second = handle(packet, NOW, SCHEDULE, POLICY), handle(packet, NOW, SCHEDULE, other)
        assert first.backend == second.backend
        chosen[first.backend] += 1
    assert min(chosen.values()) > 800


def test_an_attacker_cannot_aim_flows_at_one_backend():
    """Before: the flow key was public (zeros), so an attacker could pick 4-tuples that all land on
    backend 0. With a key derived from the secret, the same tuples spread over both backends."""
    public = dataclasses.replace(POLICY, flow_key=bytes(16))
    client, vip = ipaddress.ip_address(CLIENT4).packed, ipaddress.ip_address(VIP4).packed
    aimed = [sport for sport in range(1024, 65536)
             if public.backend_for(flow_hash(client, vip, sport, 80, public.flow_key)) == 0][:2000]
    chosen = Counter(handle(raw(IP(src=CLIENT4, dst=VIP4) / TCP(sport=sport, dport=80, flags="A")), NOW, SCHEDULE,
                            POLICY).backend for sport in aimed)
    assert min(chosen[0], chosen[1]) > 800, chosen


def test_the_flow_hash_is_siphash13_of_the_tuple_in_40_bytes():
    """Known answers: SipHash-1-3 (the XDP program hashes every packet it forwards; docs/cookie.md) of
    the addresses in 16-byte form, the ports and four zero bytes. tests/test_front_xdp.py checks that the
    program's flow_hash picks the same backends and source ports."""
    key = bytes(range(16))
    client4, vip4 = ipaddress.ip_address("198.18.1.2").packed, ipaddress.ip_address("198.19.0.10").packed
    client6, vip6 = ipaddress.ip_address("2001:db8::1").packed, ipaddress.ip_address("2001:db8:ffff::10").packed
    assert flow_hash(client4, vip4, 40000, 80, key) == 0xADE27A8F9B905C7A
    assert flow_hash(client6, vip6, 40000, 443, key) == 0x91F608BCBBBE6708


def test_maglev_moves_only_the_removed_backends_flows():
    three = build_table(["a", "b", "c"], size=65537)
    two = build_table(["a", "c"], size=65537)
    kept = {0: 0, 2: 1}
    moved = sum(1 for old, new in zip(three, two) if old in kept and kept[old] != new)
    assert moved < 0.02 * len(three)


@pytest.mark.parametrize("offset, validates", [(-1.5, True), (1.5, True), (-3.0, False)])
def test_clock_skew_between_fronts(offset, validates):
    """Front A answers the SYN; front B, whose clock is ``offset`` s off, gets the ACK (skew 2 s).

    A answers just after an epoch boundary: a B that is behind still lives in the previous epoch and
    accepts the new one only within the tolerance. A B that is ahead sees an epoch it accepts anyway.
    """
    front_b = dataclasses.replace(POLICY, farm_address=ipaddress.ip_address("198.18.11.2").packed)
    boundary = (NOW // SCHEDULE.period + 1) * SCHEDULE.period
    syn_time = boundary + 0.5
    reply = (IP)(handle(syn(4, [("MSS", 1460)]), syn_time, SCHEDULE, POLICY).packet)
    verdict = handle(client_ack(reply), syn_time + 0.01 + offset, SCHEDULE, front_b)
    assert verdict.outcome == ("validated" if validates else "forwarded_expired_epoch")


def data_packet(family, size, dont_fragment=True):
    """A client's established-traffic segment of ``size`` bytes in all."""
    layer = (IP(src=CLIENT4, dst=VIP4, flags="DF" if dont_fragment else 0) if family == 4
             else IPv6(src=CLIENT6, dst=VIP6))
    headers = len(raw(layer / TCP()))
    return raw(layer / TCP(sport=40000, dport=80, flags="PA", seq=5, ack=7) / (b"d" * (size - headers)))


def routers_answer(family, mtu, quoted):
    """The ICMP error scapy builds, checksums included, for comparison byte for byte."""
    if family == 4:
        return raw(IP(src=VIP4, dst=CLIENT4, id=0, flags="DF", ttl=64) / ICMP(type=3, code=4, nexthopmtu=mtu)
                   / quoted)
    return raw(IPv6(src=VIP6, dst=CLIENT6, hlim=64) / ICMPv6PacketTooBig(mtu=mtu) / quoted)


@pytest.mark.parametrize("farm_mtu", [1500, 9000, 1400])
def test_a_packet_too_big_to_encapsulate_gets_a_routers_icmp_from_the_vip(farm_mtu):
    policy = dataclasses.replace(POLICY, farm_mtu=farm_mtu)
    fits = farm_mtu - encap.OVERHEAD
    for family in (4, 6):
        assert handle(data_packet(family, fits), NOW, SCHEDULE, policy).action is Action.FORWARD
        packet = data_packet(family, fits + 1)
        verdict = handle(packet, NOW, SCHEDULE, policy)
        assert (verdict.action, verdict.outcome) == (Action.REPLY, "too_big")
        if family == 4:
            reply = IP(verdict.packet)
            assert (reply.src, reply.dst, reply[ICMP].type, reply[ICMP].code) == (VIP4, CLIENT4, 3, 4)
            assert reply[ICMP].nexthopmtu == fits
            quoted = packet[:576 - 20 - 8]  # RFC 1812 4.3.2.3: as much as fits in 576 bytes
        else:
            reply = IPv6(verdict.packet)
            assert (reply.src, reply.dst, reply[ICMPv6PacketTooBig].mtu) == (VIP6, CLIENT6, fits)
            quoted = packet[:1280 - 40 - 8]  # RFC 4443 2.4 (c): as much as fits in the minimum MTU
        assert verdict.packet == routers_answer(family, fits, quoted)


def test_a_jumbo_packet_whose_queued_copy_was_cut_gets_the_routers_icmp_too():
    """NFQUEUE copies at most ~4 KB of a 9000-byte frame (a front on a jumbo link): the answer is the
    whole packet's, quoting the same bytes; a cut SYN (its checksum unverifiable) and a cut packet that
    would have fitted stay malformed."""
    for family in (4, 6):
        packet = data_packet(family, 9000)
        cut = packet[:4016]
        verdict = handle(cut, NOW, SCHEDULE, POLICY)
        assert verdict[:3] == handle(packet, NOW, SCHEDULE, POLICY)[:3], family
        assert verdict.outcome == "too_big"
        syn_flag = 33 if family == 4 else 53  # the TCP flags byte
        cut_syn = cut[:syn_flag] + bytes([0x02]) + cut[syn_flag + 1:]
        assert handle(cut_syn, NOW, SCHEDULE, POLICY).outcome == "malformed_bad_ip_length"
        small = data_packet(family, POLICY.encapsulation_mtu)
        assert handle(small[:-1], NOW, SCHEDULE, POLICY).outcome == "malformed_bad_ip_length"


def test_an_ipv4_packet_too_big_without_df_is_dropped_not_fragmented():
    packet = data_packet(4, POLICY.encapsulation_mtu + 1, dont_fragment=False)
    assert handle(packet, NOW, SCHEDULE, POLICY)[:4] == (Action.DROP, None, "too_big_not_df", -1)


def test_the_mtu_announced_follows_the_encapsulation_overhead(monkeypatch):
    monkeypatch.setattr(encap, "OVERHEAD", 40)
    verdict = handle(data_packet(6, 1500), NOW, SCHEDULE, POLICY)
    assert IPv6(verdict.packet)[ICMPv6PacketTooBig].mtu == 1460


def test_token_bucket_allows_its_burst_then_its_rate():
    bucket = TokenBucket(rate=100, burst=3)
    assert [bucket.take(10.0) for _ in range(4)] == [True, True, True, False]
    assert [bucket.take(10.015) for _ in range(2)] == [True, False]  # 1.5 tokens came back in 15 ms
    assert bucket.take(9.0) is False  # a clock going back gives nothing
    assert sum(bucket.take(20.0) for _ in range(10)) == 3  # refilled to the burst, not beyond


ROUTER4, ROUTER6 = "198.18.1.1", "2001:db8:1::1"


def icmp_error(family=4, kind=None, vip=None, sport=80, destination=None, client_port=40000, quoted_bytes=None):
    """A router's error about a 1200-byte segment the server sent from VIP:sport to the client, quoting
    what a router quotes (576 bytes in all for IPv4, 1280 for IPv6) unless told otherwise."""
    if family == 4:
        quoted = IP(src=vip or VIP4, dst=CLIENT4) / TCP(sport=sport, dport=client_port, flags="PA", seq=7) / bytes(1200)
        return raw(IP(src=ROUTER4, dst=destination or vip or VIP4) / (kind or ICMP(type=3, code=4, nexthopmtu=1280))
                   / raw(quoted)[:quoted_bytes or 548])
    quoted = IPv6(src=vip or VIP6, dst=CLIENT6) / TCP(sport=sport, dport=client_port, flags="PA", seq=7) / bytes(1400)
    return raw(IPv6(src=ROUTER6, dst=destination or vip or VIP6) / (kind or ICMPv6PacketTooBig(mtu=1280))
               / raw(quoted)[:quoted_bytes or 1232])


@pytest.mark.parametrize("family, kind", [
    (4, ICMP(type=3, code=4, nexthopmtu=1280)),
    (4, ICMP(type=3, code=1)),
    (4, ICMP(type=11, code=0)),
    (6, ICMPv6PacketTooBig(mtu=1280)),
    (6, ICMPv6DestUnreach(code=3)),
    (6, ICMPv6TimeExceeded()),
], ids=["frag needed", "host unreachable", "time exceeded", "v6 too big", "v6 unreachable", "v6 time exceeded"])
def test_an_icmp_error_about_a_flow_goes_to_the_flows_backend_flagged_icmp(family, kind):
    packet = icmp_error(family, kind)
    verdict = handle(packet, NOW, SCHEDULE, POLICY)
    client, vip = (CLIENT4, VIP4) if family == 4 else (CLIENT6, VIP6)
    layer = IP if family == 4 else IPv6
    flow_packet = raw(layer(src=client, dst=vip) / TCP(sport=40000, dport=80, flags="A", seq=1, ack=8))
    assert (verdict.action, verdict.outcome) == (Action.FORWARD, "icmp_forwarded")
    assert verdict.backend == handle(flow_packet, NOW, SCHEDULE, POLICY).backend
    outer = IP(verdict.packet)
    assert (outer.src, outer.dst, outer[UDP].dport) == ("198.18.10.2", BACKENDS[verdict.backend], 6080)
    # The MAC covers the flow's tuple, as for its own packets, and the ICMP flag.
    message = encap.mac_input(POLICY.farm_address, POLICY.backends[verdict.backend],
                              ipaddress.ip_address(client).packed, ipaddress.ip_address(vip).packed, 40000, 80,
                              encap.FLAG_ICMP)
    mac = encap.encap_mac(POLICY.encap_key, message).to_bytes(8, "big")
    assert raw(outer[UDP].payload) == bytes([encap.MAGIC, encap.FLAG_ICMP, encap.VERSION, 0]) + \
        encap.NO_FORMER_OWNERS + mac + packet


def test_every_backend_gets_the_errors_of_its_own_flows():
    for sport in range(30000, 30200):
        error = handle(icmp_error(client_port=sport), NOW, SCHEDULE, POLICY)
        flow_packet = raw(IP(src=CLIENT4, dst=VIP4) / TCP(sport=sport, dport=80, flags="A"))
        assert error.backend == handle(flow_packet, NOW, SCHEDULE, POLICY).backend


@pytest.mark.parametrize("packet, outcome", [
    (icmp_error(sport=22), "icmp_not_protected"),
    (icmp_error(vip="198.19.0.99"), "icmp_not_protected"),
    (icmp_error(destination="198.19.0.99"), "icmp_not_protected"),  # about another sender's segment
    (icmp_error(6, sport=22), "icmp_not_protected"),
    (raw(IP(src=ROUTER4, dst=VIP4) / ICMP(type=8) / b"ping"), "malformed_not_icmp_error"),
    (raw(IP(src=ROUTER4, dst=VIP4) / ICMP(type=5) / raw(IP(src=VIP4, dst=CLIENT4) / TCP())),
     "malformed_not_icmp_error"),  # a redirect
    (raw(IPv6(src=ROUTER6, dst=VIP6) / ICMPv6EchoRequest()), "malformed_not_icmp_error"),
    (raw(IP(src=ROUTER4, dst=VIP4) / ICMP(type=3, code=4) / raw(IP(src=VIP4, dst=CLIENT4) / UDP())),
     "malformed_bad_quoted_packet"),
    (raw(IP(src=ROUTER4, dst=VIP4) / ICMP(type=3, code=4) / raw(IP(src=VIP4, dst=CLIENT4) / TCP())[:24]),
     "malformed_bad_quoted_packet"),
    (raw(IP(src=ROUTER4, dst=VIP4) / ICMP(type=3, code=4) / raw(IPv6(src=VIP6, dst=CLIENT6) / TCP())),
     "malformed_bad_quoted_packet"),
    (raw(IP(src=ROUTER4, dst=VIP4) / ICMP(type=3, code=4) / raw(IP(src=VIP4, dst=CLIENT4, frag=3) / TCP())),
     "malformed_bad_quoted_packet"),
    (raw(IP(src=ROUTER4, dst=VIP4) / ICMP(type=3, code=4)), "malformed_bad_quoted_packet"),
    # Longer than a router quotes, and than the encapsulation carries.
    (icmp_error(6, quoted_bytes=1500 - 40 - 8 - 39), "icmp_too_big"),
])
def test_other_icmp_is_dropped_with_a_reason(packet, outcome):
    verdict = handle(packet, NOW, SCHEDULE, POLICY)
    assert (verdict.action, verdict.outcome) == (Action.DROP, outcome)
