"""Clients the project is checked with, through every front data plane (XDP, tc, NFQUEUE), IPv4 and IPv6:
real Linux stacks with option mixes, small MTUs and data in the third ACK, and a hand-written client for
the SYN layouts Linux never sends (Windows', macOS', EOL padding, window scale 15, an AccECN SYN).

One lab (one front, one backend); the front is restarted in each data plane in turn.
Run under the lab lock: `flock /tmp/synproxy-lab.lock python3 -m pytest -q tests/test_clients.py`.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import time

import pytest

from synproxy import encap
from synproxy.cookie import MSS_TABLE, WSCALE_MAX, mss_index
from synproxy.lab.topology import TCP_INFO_PORT, default_hosts
from synproxy.netns import inside
from synproxy.packet import (
    ACK,
    CWR,
    ECE,
    FIN,
    PSH,
    RST,
    SYN,
    MalformedPacket,
    build_tcp_packet,
    internet_checksum,
    parse_tcp,
    parse_tcp_options,
)
from tests import hostile
from tests.lab_fixtures import backend_stats, data_plane, needs_root, outcomes, running_lab
from tests.test_lab_wire import TARGETS, assert_as_direct, client_route, direct_and_proxied, sysctls, transfer

pytestmark = [pytest.mark.netns, needs_root]
ADDRESSES = {4: (hostile.CLIENT4, hostile.VIP4), 6: (hostile.CLIENT6, hostile.VIP6)}
LINK_MSS = {4: 1460, 6: 1440}  # the lab's 1500-byte links
NOT_ECT, ECT0, CE = 0, 2, 3  # the IP header's ECN field (RFC 3168 5)
IPPROTO_MPTCP = 262
AE = 0x01  # Accurate ECN's flag (RFC 9768): the low bit of the byte holding the data offset (byte 12)


@pytest.fixture(scope="module")
def lab():
    with running_lab("spcl", hosts=default_hosts(fronts=1, backends=1)) as lab:
        yield lab


@pytest.fixture(scope="module", params=["xdp", "tc", "nfqueue"])
def plane(lab, request):
    """The front restarted in one data plane (the lab's `auto` is XDP here)."""
    if data_plane(lab) != request.param:
        lab.stop_process("front0")
        lab.start_front("front0", data_plane="auto" if request.param == "xdp" else request.param)
    assert data_plane(lab) == request.param
    return request.param


# --- a client written by hand ---

def mss(value: int) -> bytes:
    return bytes((2, 4)) + value.to_bytes(2, "big")


def wscale(shift: int) -> bytes:
    return bytes((3, 3, shift))


def timestamp(tsval: int, tsecr: int = 0) -> bytes:
    return bytes((8, 10)) + tsval.to_bytes(4, "big") + tsecr.to_bytes(4, "big")


NOP, EOL, SACK_PERMITTED = b"\x01", b"\x00", b"\x04\x02"


def eol_padded(options: bytes) -> bytes:
    return options + EOL * (-len(options) % 4)


# SYN option layouts, by the stack that sends them (the MSS and TSval filled in per family and run).
LAYOUTS = {
    "linux": lambda m, ts: mss(m) + SACK_PERMITTED + timestamp(ts) + NOP + wscale(7),
    "windows": lambda m, ts: mss(m) + NOP + wscale(8) + NOP + NOP + SACK_PERMITTED,
    "macos": lambda m, ts: eol_padded(mss(m) + NOP + wscale(6) + NOP + NOP + timestamp(ts) + SACK_PERMITTED + EOL),
    "eol-padded": lambda m, ts: eol_padded(mss(m) + wscale(2) + SACK_PERMITTED),
    "tsecr-nonzero": lambda m, ts: mss(m) + SACK_PERMITTED + timestamp(ts, 0xDEADBEEF) + NOP + wscale(7),
    "wscale14": lambda m, ts: mss(m) + NOP + wscale(14) + NOP + NOP + SACK_PERMITTED,
    "wscale15": lambda m, ts: mss(m) + NOP + wscale(15) + NOP + NOP + SACK_PERMITTED,
    "wscale255": lambda m, ts: mss(m) + NOP + wscale(255) + NOP + NOP + timestamp(ts) + NOP + NOP,
    "mss-only": lambda m, ts: mss(m),
    "none": lambda m, ts: b"",
    "mss-zero": lambda m, ts: mss(0) + NOP + wscale(7),
    "mss-below-table": lambda m, ts: mss(500 if m == LINK_MSS[4] else 1200) + SACK_PERMITTED + NOP + NOP,
    "mss-65535": lambda m, ts: mss(65535) + SACK_PERMITTED + timestamp(ts) + NOP + wscale(7),
    "nops": lambda m, ts: mss(m) + NOP * 36,  # 40 bytes of options, more than the XDP walk's steps
    # An MPTCP client's (MP_CAPABLE, RFC 8684 3.1): answered without it, the client falls back to TCP.
    "mptcp": lambda m, ts: mss(m) + SACK_PERMITTED + timestamp(ts) + NOP + wscale(7) + bytes((30, 4, 0x01, 0x81)),
}


class HandClient:
    """TCP by hand from the client's namespace: SYNs with any options and flags sent through a raw socket,
    the answers read from a packet socket on its link. The client's kernel never sees the answers (an
    INPUT rule drops them: it would reset connections it does not know)."""

    PORTS = (44000, 44999)

    def __init__(self, lab, family: int):
        self.family = family
        self.source, self.vip = ADDRESSES[family]
        with inside(lab.ns("client")):
            self.sender = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_RAW,
                                        socket.IPPROTO_RAW)
            self.tap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.tap.bind(("eth0", 0))
        self.tap.settimeout(0.2)
        self.destination = (TARGETS[family][0], 0)

    def close(self) -> None:
        self.sender.close()
        self.tap.close()

    def send(self, sport: int, seq: int, ack: int, flags: int, options: bytes = b"", payload: bytes = b"",
             ae: bool = False, ecn: int = 0, ip_options: bytes = b"") -> None:
        """One segment; ``ecn``: the IP header's ECN field; ``ip_options``: IPv4 options, a multiple of 4 bytes
        (the kernel sums an IPv4 header sent raw)."""
        packet = bytearray(build_tcp_packet(self.source, self.vip, sport, TCP_INFO_PORT, seq, ack, flags, 65535,
                                            options, payload))
        if ip_options:
            packet[0] += len(ip_options) // 4
            packet[2:4] = (len(packet) + len(ip_options)).to_bytes(2, "big")
            packet[20:20] = ip_options
        if self.family == 4:
            packet[1] |= ecn
        else:
            packet[1] |= ecn << 4
        if ae:  # build_tcp_packet writes no AE: set it, and sum the segment again
            at = 20 if self.family == 4 else 40
            at += len(ip_options)
            packet[at + 12] |= AE
            packet[at + 16:at + 18] = b"\0\0"
            packet[at + 16:at + 18] = tcp_checksum(bytes(packet), at).to_bytes(2, "big")
        self.sender.sendto(bytes(packet), self.destination)

    def drain(self) -> None:
        """Forget the frames seen so far."""
        with contextlib.suppress(BlockingIOError, TimeoutError):
            while self.tap.recv(65536, socket.MSG_DONTWAIT):
                pass

    def answers(self, sport: int, seconds: float, until=lambda segment: False,
                sent: bool = False) -> list[tuple[object, bytes]]:
        """(segment, IP packet) from the VIP to ``sport`` (``sent``: from ``sport`` to the VIP) seen within
        ``seconds``, or until one matches ``until``."""
        seen, deadline = [], time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                frame = self.tap.recv(65536)
            except TimeoutError:
                continue
            if frame[12:14] not in (b"\x08\x00", b"\x86\xdd"):
                continue
            try:
                segment = parse_tcp(frame[14:])
            except MalformedPacket:
                continue
            ports = (sport, TCP_INFO_PORT) if sent else (TCP_INFO_PORT, sport)
            if (segment.daddr if sent else segment.saddr) == self.vip and (segment.sport, segment.dport) == ports:
                seen.append((segment, frame[14:]))
                if until(segment):
                    break
        return seen


def tcp_checksum(packet: bytes, at: int) -> int:
    """The TCP checksum of the segment at ``at`` in an IPv4 (``at`` 20) or IPv6 packet."""
    addresses, segment = packet[12:20] if packet[0] >> 4 == 4 else packet[8:40], packet[at:]
    return internet_checksum(addresses + bytes((0, 6)) + len(segment).to_bytes(2, "big") + segment)


@pytest.fixture(scope="module", params=[4, 6])
def hand(lab, request):
    family = request.param
    tool = "iptables" if family == 4 else "ip6tables"
    rule = ["INPUT", "-p", "tcp", "--sport", str(TCP_INFO_PORT), "--dport", "{}:{}".format(*HandClient.PORTS), "-j", "DROP"]
    lab.run("client", [tool, "-w", "-I", *rule])
    client = HandClient(lab, family)
    try:
        yield client
    finally:
        client.close()
        lab.run("client", [tool, "-w", "-D", *rule])


_ports = iter(range(HandClient.PORTS[0], HandClient.PORTS[1] + 1))
_linux_ports = iter(range(46000, 47000))
REQUEST = b"GET / HTTP/1.0\r\n\r\n"


def ecn_field(packet: bytes) -> int:
    return packet[1] & 3 if packet[0] >> 4 == 4 else packet[1] >> 4 & 3


def handshake(hand: HandClient, options: bytes, flags: int = SYN, ae: bool = False, acks: int = 1,
              request: bytes = REQUEST, request_ecn: int = 0, syn_data: bytes = b"", ip_options: bytes = b"") -> dict:
    """SYN with ``options`` and ``flags`` (and AE), the SYN-ACK read, then ``acks`` - 1 bare ACKs and one with
    the request (timestamps on each when agreed), the answer read to its FIN, then a RST. What the SYN-ACK
    said, and the backend's JSON answer (its TCP_INFO)."""
    sport, isn = next(_ports), random.getrandbits(32)
    hand.send(sport, isn, 0, flags, options, syn_data, ae=ae, ip_options=ip_options)
    answers = hand.answers(sport, 3, until=lambda s: s.flags & SYN)
    assert answers and answers[-1][0].flags & SYN, f"no SYN-ACK ({hand.family}, {options.hex()})"
    synack, packet = answers[-1]
    at = 20 if hand.family == 4 else 40
    agreed = parse_tcp_options(synack.raw_options)
    said = {"flags": synack.flags, "ack": (synack.ack - isn) & 0xFFFFFFFF, "ae": bool(packet[at + 12] & 0x0F), "mss": agreed.mss, "wscale": agreed.wscale,
            "sack": agreed.sack_permitted, "timestamp": agreed.timestamp}
    seq, ack = (isn + 1) & 0xFFFFFFFF, (synack.seq + 1) & 0xFFFFFFFF

    def ts_option() -> bytes:
        return NOP + NOP + timestamp(int(time.monotonic() * 1000) & 0xFFFFFFFF, agreed.timestamp[0]) \
            if agreed.timestamp else b""

    for _ in range(acks - 1):
        hand.send(sport, seq, ack, ACK, ts_option(), ip_options=ip_options)
    hand.send(sport, seq, ack, ACK | PSH, ts_option(), request, ecn=request_ecn, ip_options=ip_options)
    data: dict[int, bytes] = {}
    said["data_ecn"], said["ece"] = set(), False
    for segment, packet in hand.answers(sport, 5, until=lambda s: s.flags & (FIN | RST)):
        assert not segment.flags & RST, f"reset ({hand.family}, {options.hex()})"
        said["ece"] |= bool(segment.flags & ECE)
        if segment.payload_length:
            data[segment.seq] = packet[len(packet) - segment.payload_length:]
            said["data_ecn"].add(ecn_field(packet))
    hand.send(sport, (seq + len(request)) & 0xFFFFFFFF, 0, RST)
    body = b"".join(data[key] for key in sorted(data, key=lambda s: (s - ack) & 0xFFFFFFFF))
    said["server"] = json.loads(body.partition(b"\r\n\r\n")[2]) if body else None
    return said


def expected_backend(family: int, options: bytes) -> dict:
    """What the backend's kernel should use for a SYN carrying ``options``, as a direct connection would."""
    parsed = parse_tcp_options(options)
    option_bytes = 12 if parsed.timestamp else 0
    carried = MSS_TABLE[family][mss_index(family, parsed.mss or None)]
    return {"timestamps": parsed.timestamp is not None, "sack": parsed.sack_permitted,
            "wscale": parsed.wscale is not None,
            "snd_wscale": None if parsed.wscale is None else min(parsed.wscale, WSCALE_MAX),
            "snd_mss": min(carried, LINK_MSS[family]) - option_bytes}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_syn_layout_no_linux_sends_gets_a_matching_syn_ack_and_backend(lab, plane, hand, layout):
    """The SYN-ACK answers each option the SYN offered (and no other), the backend's kernel uses what the
    SYN offered (window scale above 14 as 14, RFC 7323 2.3; an MSS below the table as the table's
    smallest, docs/cookie.md), and the request in the third ACK is answered."""
    family = hand.family
    options = LAYOUTS[layout](LINK_MSS[family], random.getrandbits(32))
    said = handshake(hand, options)
    parsed = parse_tcp_options(options)
    assert said["flags"] == SYN | ACK and not said["ae"]
    assert said["mss"] == 1460 - encap.OVERHEAD - (20 if family == 6 else 0)
    assert said["wscale"] == (7 if parsed.wscale is not None else None)
    assert said["sack"] == parsed.sack_permitted
    assert (said["timestamp"] is not None) == (parsed.timestamp is not None)
    if parsed.timestamp:
        assert said["timestamp"][1] == parsed.timestamp[0]
    assert said["server"] is not None, "no answer to the request in the third ACK"
    server = said["server"]["tcp_info"]
    expected = expected_backend(family, options)
    assert {key: server[key] for key in expected} == expected, server
    assert server["ecn"] is False


@pytest.mark.parametrize("syn_flags, ae, ecn", [
    (SYN | ECE | CWR, True, True),    # Accurate ECN's SYN (RFC 9768 3.1.1)
    (SYN | ECE | CWR, False, True),   # RFC 3168's
    (SYN, True, False),               # AE alone: no ECN asked
    (SYN | ECE, True, False),
], ids=["accecn", "classic", "ae-only", "ae-ece"])
def test_an_accurate_ecn_syn_gets_classic_ecn_as_from_a_server_without_it(lab, plane, hand, syn_flags, ae, ecn):
    """A server without AccECN answers AE|CWR|ECE with ECE alone (RFC 9768 3.1.2, table 2), and the
    client then uses classic ECN (RFC 3168): so do the front and the backend it creates the connection on.
    The AE bit sits beside the data offset: the options are still read."""
    options = LAYOUTS["linux"](LINK_MSS[hand.family], random.getrandbits(32))
    said = handshake(hand, options, syn_flags, ae=ae)
    assert said["flags"] == SYN | ACK | (ECE if ecn else 0) and not said["ae"]
    assert said["wscale"] == 7 and said["sack"] and said["timestamp"]
    assert said["server"]["tcp_info"]["ecn"] is ecn
    assert said["server"]["tcp_info"]["snd_wscale"] == 7
    assert said["data_ecn"] == ({ECT0} if ecn else {NOT_ECT}), "the backend's data: ECT(0) only with ECN on"


@pytest.mark.parametrize("ecn", [True, False])
def test_a_congestion_mark_on_the_clients_data_reaches_the_backend_and_is_echoed(lab, plane, hand, ecn):
    """The client's ECN field crosses the front untouched: a CE mark (a router's, before the front) on the
    request reaches the backend's TCP, which echoes ECE (RFC 3168 6.1.3) when ECN was agreed."""
    options = LAYOUTS["linux"](LINK_MSS[hand.family], random.getrandbits(32))
    said = handshake(hand, options, SYN | ECE | CWR if ecn else SYN, request_ecn=CE)
    assert said["server"]["tcp_info"]["ecn"] is ecn
    assert said["ece"] is ecn


def test_a_syn_retransmitted_with_other_options_is_answered_for_each(lab, plane, hand):
    """A client that sends its SYN again with fewer options (Linux drops ECN, some stacks window scaling,
    SACK and timestamps too) uses whichever SYN-ACK arrives: the backend follows that one's cookie."""
    family, ts = hand.family, random.getrandbits(32)
    for answered in (0, 1):
        sport, isn = next(_ports), random.getrandbits(32)
        syns = ((SYN | ECE | CWR, LAYOUTS["linux"](LINK_MSS[family], ts)), (SYN, mss(LINK_MSS[family])))
        synacks = []
        for flags, options in syns:
            hand.send(sport, isn, 0, flags, options)
            synacks.append(hand.answers(sport, 3, until=lambda s: s.flags & SYN)[-1][0])
        assert synacks[0].seq != synacks[1].seq  # the options are in the cookie
        synack = synacks[answered]
        agreed = parse_tcp_options(synack.raw_options)
        options = NOP + NOP + timestamp(ts + 1, agreed.timestamp[0]) if agreed.timestamp else b""
        hand.send(sport, isn + 1, synack.seq + 1, ACK | PSH, options, REQUEST)
        answer = b"".join(packet[len(packet) - segment.payload_length:] for segment, packet in
                          hand.answers(sport, 5, until=lambda s: s.flags & FIN) if segment.payload_length)
        hand.send(sport, isn + 1 + len(REQUEST), 0, RST)
        server = json.loads(answer.partition(b"\r\n\r\n")[2])["tcp_info"]
        expected = answered == 0
        assert (server["ecn"], server["sack"], server["timestamps"], server["wscale"]) == (expected,) * 4, server


def test_data_in_a_syn_without_fast_open_is_acknowledged_later(lab, plane, hand):
    """Data in a plain SYN is not acknowledged by the SYN-ACK (the backend never sees the SYN): the client
    sends it again after the handshake, as to a server that discards it (RFC 9293 3.10.7.2)."""
    said = handshake(hand, LAYOUTS["linux"](LINK_MSS[hand.family], 1), syn_data=REQUEST)
    assert said["ack"] == 1 and said["server"] is not None


def test_ipv4_options_in_the_handshake_are_handled_by_the_queue(lab, plane, hand):
    """A SYN and ACK with IPv4 options (here NOPs and an end): the kernel programs leave them to the queue,
    whose handler answers and forwards them as any other."""
    if hand.family == 6:
        pytest.skip("IPv4 options")
    said = handshake(hand, LAYOUTS["linux"](LINK_MSS[4], 1), ip_options=b"\x01\x01\x01\x00")
    assert said["server"] is not None and said["server"]["tcp_info"]["timestamps"]


def test_a_duplicated_third_ack_creates_one_connection(lab, plane, hand):
    created = backend_stats(lab, "backend0")["created"]
    said = handshake(hand, LAYOUTS["linux"](LINK_MSS[hand.family], 1), acks=3)
    assert said["server"] is not None
    assert backend_stats(lab, "backend0")["created"] == created + 1


def test_a_reset_right_after_the_handshake_leaves_no_connection(lab, plane, hand):
    sport, isn = next(_ports), random.getrandbits(32)
    hand.send(sport, isn, 0, SYN, mss(LINK_MSS[hand.family]))
    synack = hand.answers(sport, 3, until=lambda s: s.flags & SYN)[-1][0]
    created = backend_stats(lab, "backend0")["created"]
    hand.send(sport, isn + 1, synack.seq + 1, ACK)
    hand.send(sport, isn + 1, synack.seq + 1, RST | ACK)
    time.sleep(0.3)
    assert backend_stats(lab, "backend0")["created"] == created + 1
    left = lab.run("backend0", ["ss", "-Htn", f"dport = :{sport}"]).stdout
    assert not left.strip(), left


# --- real Linux clients ---

OFF = {"net.ipv4.tcp_timestamps": "0", "net.ipv4.tcp_sack": "0", "net.ipv4.tcp_window_scaling": "0"}


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("settings", [
    {"net.ipv4.tcp_ecn": "1"},
    {"net.ipv4.tcp_ecn": "1", "net.ipv4.tcp_ecn_option": "0"},  # AccECN's option sysctl (tcp_ecn=3: EINVAL here)
    {"net.ipv4.tcp_timestamps": "0"},
    {"net.ipv4.tcp_sack": "0"},
    {"net.ipv4.tcp_window_scaling": "0"},
    {**OFF, "net.ipv4.tcp_ecn": "1"},
    OFF,
], ids=["ecn", "ecn-option0", "no-ts", "no-sack", "no-wscale", "only-ecn", "nothing"])
def test_a_linux_client_negotiates_through_each_plane_what_it_would_directly(lab, plane, family, settings):
    with sysctls(lab, "client", settings):
        seen = direct_and_proxied(lab, family, size=1 << 16)
    assert_as_direct(seen, family)


@pytest.mark.parametrize("family, attributes, announced", [
    (4, ("mtu", "576"), 536), (6, ("mtu", "1280"), 1220), (4, ("advmss", "500"), 500), (6, ("advmss", "1200"), 1200)],
    ids=["v4-mtu576", "v6-mtu1280", "v4-advmss500", "v6-advmss1200"])
def test_a_linux_client_with_a_small_mss_moves_data_both_ways(lab, plane, family, attributes, announced):
    """Below the cookie table's smallest MSS (536, 1220) the backend sends the smallest: every IPv4 host
    takes 576-byte datagrams (RFC 1122 3.3.2), every IPv6 link 1280 (RFC 8200 5), and the kfunc refuses
    a smaller MSS (docs/cookie.md)."""
    try:
        client_route(lab, family, *attributes)
        client, server = transfer(lab, TARGETS[family][0], size=1 << 18)
    finally:
        client_route(lab, family)
    assert server["snd_mss"] == MSS_TABLE[family][mss_index(family, announced)] - 12
    path = int(attributes[1]) - (40 if family == 4 else 60) if attributes[0] == "mtu" else LINK_MSS[family]
    assert client["snd_mss"] == min(path, 1460 - encap.OVERHEAD - (20 if family == 6 else 0)) - 12


def test_data_in_the_third_ack_from_a_linux_client_opens_the_connection(lab, plane, hand):
    """TCP_DEFER_ACCEPT on a connecting socket makes Linux hold its handshake ACK until it has data to send
    (tcp_rcv_synsent_state_process): the front's first sight of the connection is the request, which
    carries the cookie and validates."""
    family = hand.family
    before = outcomes(lab)
    hand.drain()
    with inside(lab.ns("client")):
        sock = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET)
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
        sock.settimeout(5)
        sport = next(_linux_ports)  # outside the hand client's, whose answers the client's kernel drops
        sock.bind(("", sport))
        sock.connect((TARGETS[family][0], TCP_INFO_PORT))
        sock.sendall(REQUEST)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 200"), answer[:40]
    sent = [segment for segment, _ in hand.answers(sport, 0.5, sent=True)]
    assert sent[0].flags == SYN and sent[1].flags & ACK and sent[1].payload_length == len(REQUEST), sent[:2]
    moved = outcomes(lab) - before
    name = "ipv4" if family == 4 else "ipv6"
    assert sum(v for (_, outcome, fam), v in moved.items() if outcome == "validated" and fam == name) >= 1, moved


@pytest.mark.parametrize("family", [4, 6])
def test_a_linux_mptcp_client_falls_back_to_tcp_through_the_front(lab, plane, family):
    """An MPTCP socket's SYN carries MP_CAPABLE; the front answers without it (it never echoes an option
    it does not implement), so the client falls back to plain TCP (RFC 8684 3.1) with the backend."""
    with inside(lab.ns("client")):
        sock = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    with sock:
        sock.settimeout(5)
        sock.connect((TARGETS[family][0], TCP_INFO_PORT))
        sock.sendall(REQUEST)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    server = json.loads(answer.partition(b"\r\n\r\n")[2])["tcp_info"]
    assert server["sack"] and server["timestamps"] and server["wscale"]
