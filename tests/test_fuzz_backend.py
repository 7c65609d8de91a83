"""Differential fuzzing of the backend: hostile and unusual frames through its tc program (bpf/backend.bpf.c)
and its XDP stage (bpf/backend_xdp.bpf.c) under BPF_PROG_TEST_RUN, held to a reference written here from
docs/backend.md ("What the backend trusts", the chain, "Packets no connection owns") and synproxy/encap.py.

The rule, whatever the frame: what is not encapsulated (the program's own test: outer IPv4 without options
or fragmentation, UDP to the encap port) is passed unchanged; an encapsulation whose outer IPv4 header is
not as a front writes it (version 4, the frame's total length, its checksum right) is dropped as
malformed; one that does not authenticate is dropped under exactly one of untrusted, malformed,
encap_refused, encap_bad_mac, never passed inner; an
authentic one is decapsulated to exactly its inner bytes behind the same Ethernet addresses, passed on
along the chain byte for byte as encap.chain builds it, or dropped as the reset budget and the cookie say.
The XDP stage either passes a frame unchanged to the tc program or does what the tc program would.
The strategies reuse the front fuzz's (tests/test_fuzz_front.py) for the inner packets and break the
outer headers, the synproxy header and the MAC around them.

Runs happen in test_backend_bpf's `farm` namespace (its former owners resolved, unresolved, unrouted),
where a listener waits on the VIPs' port 80 and one established connection per family gives the frames
a tuple a connection owns. Not reached here: TIME_WAIT and request sockets, and a validated ACK with a valid
cookie that is not the owned connection's own (the recycle, the RST it sends, the loader's ring buffer, delivery past a TIME_WAIT socket: they change the sockets they meet, so
tests/test_backend_bpf.py, tests/test_backend_xdp.py and tests/test_backend_e2e.py build them one at a
time), a full accept queue, and the kfunc's success: a validated ACK that meets the listener ends in the
kfunc, which fails outside a real tc ingress (`kfunc_failed`). The reset budget is never empty here
(tests/test_backend_xdp.py spends it). Frames larger than BPF_PROG_TEST_RUN takes (9000 B, 64 KB) go
through the tc hook as real skbs at the end of the module.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import socket
import struct
import time
from typing import NamedTuple

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from synproxy import encap, netns
from synproxy.backend import loader
from synproxy.backend.loader import (
    COUNTERS,
    XDP_COUNTERS,
    DataPlane,
    XdpStage,
    read_counters,
    read_xdp_counters,
)
from synproxy.bpf.libbpf import prog_test_run
from synproxy.bpf.loading import build_object
from synproxy.config import MAX_UNKNOWN_FLOW_RESETS_PER_SECOND
from synproxy.cookie import Reject, SynOptions, check_cookie, make_cookie
from synproxy.front.handler import Action, handle
from synproxy.packet import (
    ACK,
    FIN,
    RST,
    SYN,
    MalformedPacket,
    build_ip_header,
    build_tcp_packet,
    internet_checksum,
    parse_icmp_error,
)
from tests.lab_fixtures import needs_root
from tests.test_backend_bpf import (  # noqa: F401 (farm: the namespace fixture, by name)
    BACKEND,
    ENCAP_PORT,
    FRONT,
    HOPS,
    ICMP_POLICY,
    KEY,
    OTHER_FRONT,
    PORTS,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    UNRESOLVED_OWNER,
    UNROUTED_OWNER,
    UNSOUND_OUTER,
    VIPS,
    farm,
    inner_flow,
    moved_policy,
    sequence_numbers,
    with_outer_ipv4,
)
from tests.test_backend_xdp import XDP_DROP, XDP_PASS
from tests.test_fuzz_front import (
    EXAMPLES,
    FUZZ,
    GRO_SIZES,
    HANDSHAKE_SCHEDULE,
    LONGEST_FRAME,
    START,
    arriving,
    fix_ipv4_checksum,
    forwarded_as_sent,
    icmp_error,
    icmp_errors,
    kernel_view,
    mutated,
    quoted_segment,
    segments,
    send_as_one_skb,
    tc_program_on,
    tcp_options,
)

pytestmark = needs_root
ETH, INNER = 14, 14 + encap.OVERHEAD  # the outer IPv4 header, the inner packet
HEADER = ETH + 28  # the synproxy header
UNTRUSTED, ANOTHER_BACKEND = "198.18.99.9", "198.18.21.2"
assert {ANOTHER_BACKEND, "198.18.22.2"} <= set(HOPS)  # the farm namespace's resolved neighbours
# The former owners a header names (previous, earlier): none, resolved neighbours, this backend itself, an
# unresolved neighbour, an unrouted address; a third of them make this backend the last hop.
NONE, EARLIER = "0.0.0.0", "198.18.22.2"
FORMER_OWNERS = ((NONE, NONE), (ANOTHER_BACKEND, NONE), (NONE, EARLIER), (ANOTHER_BACKEND, EARLIER), (BACKEND, NONE),
                 (BACKEND, EARLIER), (UNRESOLVED_OWNER, NONE), (UNROUTED_OWNER, NONE), (BACKEND, BACKEND))
FARM_PREFIX = ipaddress.ip_network("198.18.0.0/16")  # the farm namespace's link: on-link, routed
FARM_OWN = ipaddress.ip_address("198.18.30.2")
FARM_MTU = 1500
LISTENING_PORT = 80  # the listener's port on both VIPs; the other protected ports have none
ETHER_TYPE = {4: b"\x08\x00", 6: b"\x86\xdd"}


@pytest.fixture(scope="module")
def plane():
    """The tc program, its maps filled as a backend's loader fills them: the front fuzz's handshake
    schedule's keys and salts (held at START), and a reset budget no run of this module empties (each reset
    costs 2 µs of a CPU's one second of credit), so the budget's answer is always yes."""
    plane = DataPlane(build_object("backend"))
    plane.configure(ENCAP_PORT, 7, MAX_UNKNOWN_FLOW_RESETS_PER_SECOND)
    plane.trust([ipaddress.ip_address(FRONT), ipaddress.ip_address(OTHER_FRONT)])
    plane.protect([ipaddress.ip_address(vip) for vip in VIPS], PORTS)
    plane.refresh_encap_keys(HANDSHAKE_SCHEDULE)
    plane.refresh_salts(HANDSHAKE_SCHEDULE, START)
    yield plane
    plane.close()


class ProgramClock:
    """The program's wall clock (the loader's offset from CLOCK_TAI), set back to read START at each example:
    the strategies' handshakes carry cookies minted at START, which would expire 92 s into a campaign."""

    def __init__(self, plane: DataPlane):
        self.plane, self.offset = plane, 0

    def restart(self) -> None:
        self.offset = round(START * 1e9) - time.clock_gettime_ns(time.CLOCK_TAI)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(loader, "clock_offset_ns", lambda: self.offset)
            self.plane.configure(ENCAP_PORT, 7, MAX_UNKNOWN_FLOW_RESETS_PER_SECOND)

    def now(self) -> float:
        return (time.clock_gettime_ns(time.CLOCK_TAI) + self.offset) / 1e9


@pytest.fixture(scope="module")
def clock(plane) -> ProgramClock:
    clock = ProgramClock(plane)
    clock.restart()
    return clock


@pytest.fixture(scope="module")
def stage(plane):
    stage = XdpStage(plane)
    yield stage
    stage.close()


CLIENTS = {4: "198.18.1.2", 6: "2001:db8:1::2"}
CONNECTED_PORT = 41500  # the client port of the connection each client holds to its VIP's LISTENING_PORT


@pytest.fixture(scope="module")
def listening(farm):  # noqa: F811
    """`farm` with the VIPs and the clients on its loopback, a listener on each VIP's LISTENING_PORT and a
    connection to it from CONNECTED_PORT of the client of its family (OWNED)."""
    name = farm[0]
    netns.add_addresses(name, "lo", f"{VIPS[0]}/32", f"{VIPS[1]}/128", f"{CLIENTS[4]}/32", f"{CLIENTS[6]}/128")
    with netns.inside(name), contextlib.ExitStack() as sockets:
        for vip, family in zip(VIPS, (socket.AF_INET, socket.AF_INET6)):
            listener = sockets.enter_context(socket.create_server((vip, LISTENING_PORT), family=family))
            client = CLIENTS[4 if family == socket.AF_INET else 6]
            connection = sockets.enter_context(socket.create_connection((vip, LISTENING_PORT),
                                                                         source_address=(client, CONNECTED_PORT)))
            sockets.enter_context(listener.accept()[0])
            OWNED_SEQUENCES[ipaddress.ip_address(client).packed] = sequence_numbers(connection)
        yield farm


# --- the reference ---

class Segment(NamedTuple):
    """What parse_frame (bpf/synproxy.h) reads of a TCP segment: addresses as the packet has them (4 or 16
    bytes, as synproxy.encap and synproxy.cookie take them)."""

    family: int
    saddr: bytes
    daddr: bytes
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int


def parsed_segment(frame: bytes) -> Segment | None:
    """parse_frame's PARSE_SEGMENT: an unfragmented TCP header in the frame behind an IPv4 header (any IHL
    of 5 or more; no length or checksum checked) or an IPv6 header without extension headers. The backend
    leaves the rest of an inner packet's validity to the kernel behind it."""
    ether_type, ip = frame[12:14], frame[ETH:]
    if ether_type == b"\x08\x00" and len(ip) >= 20 and ip[0] >> 4 == 4 and ip[0] & 0xF >= 5 and ip[9] == 6:
        start, saddr, daddr = (ip[0] & 0xF) * 4, ip[12:16], ip[16:20]
        if int.from_bytes(ip[6:8], "big") & 0x3FFF:
            return None
    elif ether_type == b"\x86\xdd" and len(ip) >= 40 and ip[0] >> 4 == 6 and ip[6] == 6:
        start, saddr, daddr = 40, ip[8:24], ip[24:40]
    else:
        return None
    if len(ip) < start + 20:
        return None
    sport, dport, seq, ack = struct.unpack_from("!HHII", ip, start)
    return Segment(4 if len(saddr) == 4 else 6, saddr, daddr, sport, dport, seq, ack, ip[start + 13])


def encapsulated(frame: bytes) -> bool:
    """The programs' test: outer IPv4 with a 20-byte header, UDP, not a fragment, to the encap port."""
    return (len(frame) >= HEADER and frame[12:14] == b"\x08\x00" and frame[ETH] & 0xF == 5 and frame[ETH + 9] == 17
            and not int.from_bytes(frame[ETH + 6:ETH + 8], "big") & 0x3FFF
            and int.from_bytes(frame[ETH + 22:ETH + 24], "big") == ENCAP_PORT)


def outer_sound(frame: bytes) -> bool:
    """outer_ipv4_sound (bpf/synproxy.h): version 4, the total length the frame carries, the checksum right."""
    outer = frame[ETH:ETH + 20]
    return outer[0] >> 4 == 4 and int.from_bytes(outer[2:4], "big") == len(frame) - ETH and \
        not internet_checksum(outer)


def whole_header(frame: bytes) -> bool:
    return len(frame) >= INNER and frame[HEADER] == encap.MAGIC and frame[HEADER + 2] == encap.VERSION \
        and frame[HEADER + 3] == 0


PROTECTED_VIPS = frozenset(ipaddress.ip_address(vip).packed for vip in VIPS)
TRUSTED = frozenset(ipaddress.ip_address(front).packed for front in (FRONT, OTHER_FRONT))
OWNED = frozenset((ipaddress.ip_address(CLIENTS[family]).packed, CONNECTED_PORT, ipaddress.ip_address(vip).packed,
                   LISTENING_PORT) for family, vip in zip((4, 6), VIPS))


def owned(flow) -> bool:
    """Does a connection here own the flow (the `listening` fixture's; a listener alone does not)?"""
    return (flow.saddr, flow.sport, flow.daddr, flow.dport) in OWNED


# The owned connections' next sequence numbers, the client's and the server's (idle: the server's rcv_nxt,
# and its snd_nxt = snd_una, nothing acknowledged since its ISN + 1), by client address; read by `listening`.
OWNED_SEQUENCES: dict[bytes, tuple[int, int]] = {}
NEAR, FAR = 0x10000, 1 << 24  # surely inside the program's windows (each + 64 KiB), surely outside them


def distance(a: int, b: int) -> int:
    return min((a - b) % 2**32, (b - a) % 2**32)


def segment_of_connection(segment) -> bool | None:
    """bpf/backend.bpf.c's segment_of_connection for the owned connection: True, False, or None where the
    answer depends on windows the test does not read (rcv_wnd, max_window)."""
    rcv_nxt, snd_nxt = OWNED_SEQUENCES[segment.saddr]
    nearest = min(distance(segment.seq, rcv_nxt), distance(segment.ack, snd_nxt))
    return True if nearest <= NEAR else False if nearest > FAR else None


def protected(flow) -> bool:
    return flow.daddr in PROTECTED_VIPS and flow.dport in PORTS


def mac_holds(frame: bytes, flow) -> bool:
    header = frame[HEADER:INNER]
    message = encap.mac_input(frame[ETH + 12:ETH + 16], frame[ETH + 16:ETH + 20], flow.saddr, flow.daddr, flow.sport,
                              flow.dport, header[1], header[4:12])
    return encap.encap_mac(KEY, message) == int.from_bytes(header[12:20], "big")


class Expected(NamedTuple):
    verdict: int
    frame: bytes | None  # None: any (a drop's)
    counts: dict
    path: str            # what hypothesis reports as the event


def decapsulated_frame(frame: bytes) -> bytes:
    inner = frame[INNER:]
    return frame[:12] + ETHER_TYPE[inner[0] >> 4] + inner


def chained_frame(frame: bytes, flow, farm_mac: bytes, next_owner: bytes) -> bytes:
    """encap.chain's packet in the frame the program sends: the neighbour's address when resolved (else the
    frame's own, which bpf_redirect_neigh fills in later)."""
    chained = encap.chain(frame[ETH:], flow, KEY)
    assert chained is not None and chained[16:20] == next_owner
    hop = HOPS.get(str(ipaddress.ip_address(next_owner)))
    addresses = bytes.fromhex(hop.replace(":", "")) + farm_mac if hop else frame[:12]
    return addresses + b"\x08\x00" + chained


def routed(address: bytes) -> bool:
    """The farm namespace's routes: its /16 on-link (not its own address), nothing else."""
    address = ipaddress.ip_address(address)
    return address in FARM_PREFIX and address != FARM_OWN


def pass_if_owned(frame: bytes, flow, icmp: bool, farm_mac: bytes) -> Expected:
    """A connection's flow is passed; any other along the chain, else at the last hop by the reset budget."""
    counts = {"decapsulated": 1}
    if owned(flow):
        return Expected(TC_ACT_OK, decapsulated_frame(frame), {**counts, **({"icmp_passed": 1} if icmp else {})},
                        "a connection's")
    following = encap.next_owner(frame[HEADER + 1], frame[ETH + 16:ETH + 20], frame[HEADER + 4:HEADER + 12])
    if following is not None:
        # The route's MTU (the farm link's) bounds the packet the program means to send: past it, refused.
        if routed(following) and len(frame) - ETH <= FARM_MTU:
            return Expected(TC_ACT_REDIRECT, chained_frame(frame, flow, farm_mac, following), {**counts, "chained": 1},
                            "chained")
        counts["chain_failed"] = 1
    if icmp:
        return Expected(TC_ACT_OK, decapsulated_frame(frame), {**counts, "icmp_passed": 1}, "icmp passed")
    if flow.flags & RST:
        return Expected(TC_ACT_SHOT, None, {**counts, "no_flow_dropped": 1}, "no flow: a RST dropped")
    return Expected(TC_ACT_OK, decapsulated_frame(frame), {**counts, "no_flow_reset": 1}, "no flow: reset")


def refused(counter: str) -> Expected:
    return Expected(TC_ACT_SHOT, None, {counter: 1}, counter)


def expected_tc(frame: bytes, now: float, farm_mac: bytes) -> Expected:
    """What bpf/backend.bpf.c must do with ``frame`` here, by docs/backend.md's checks in their order."""
    if not encapsulated(frame):
        segment = parsed_segment(frame)
        syn = segment is not None and segment.flags & (SYN | ACK) == SYN and segment.daddr in PROTECTED_VIPS
        return Expected(TC_ACT_OK, frame, {"passed": 1, **({"syn_received": 1} if syn else {})}, "not encapsulated")
    if not outer_sound(frame):
        return refused("malformed")
    flags = frame[HEADER + 1] if len(frame) > HEADER + 1 else 0
    if not flags & encap.FLAG_CHAINED and frame[ETH + 12:ETH + 16] not in TRUSTED:
        return refused("untrusted")
    # bpf_skb_adjust_room leaves no less than an IP header of the inner family behind the Ethernet one.
    if not whole_header(frame) or len(frame) == INNER or frame[INNER] >> 4 not in (4, 6) or \
            len(frame) - INNER < (20 if frame[INNER] >> 4 == 4 else 40):
        return refused("malformed")
    inner = frame[INNER:]
    if flags & encap.FLAG_ICMP:
        try:
            flow = parse_icmp_error(inner)
        except MalformedPacket:
            return refused("encap_refused")
        if flags & encap.FLAG_VALIDATED:
            return refused("encap_refused")
        if not mac_holds(frame, flow):
            return refused("encap_bad_mac")
        if not protected(flow) or flow.destination != flow.daddr:
            return refused("encap_refused")
        return pass_if_owned(frame, flow, True, farm_mac)
    segment = parsed_segment(decapsulated_frame(frame))
    if segment is None:
        return refused("encap_refused")
    if not mac_holds(frame, segment):
        return refused("encap_bad_mac")
    if flags & encap.FLAG_FASTOPEN:
        if (segment.flags & (SYN | ACK | RST | FIN) != SYN or flags & (encap.FLAG_VALIDATED | encap.FLAG_CHAINED)
                or not protected(segment)):
            return refused("encap_refused")
        return Expected(TC_ACT_OK, decapsulated_frame(frame), {"decapsulated": 1, "fastopen_passed": 1}, "fastopen")
    if segment.flags & SYN or not protected(segment) or \
            flags & (encap.FLAG_VALIDATED | encap.FLAG_CHAINED) == encap.FLAG_VALIDATED | encap.FLAG_CHAINED:
        return refused("encap_refused")
    if not flags & encap.FLAG_VALIDATED:
        return pass_if_owned(frame, segment, False, farm_mac)
    if segment.flags & (ACK | SYN | RST | FIN) != ACK:
        return Expected(TC_ACT_OK, decapsulated_frame(frame), {"decapsulated": 1}, "validated, not a handshake ACK")
    connections = segment_of_connection(segment) if owned(segment) else False
    if connections is None:
        return Expected(TC_ACT_OK, frame, {}, "untested at tc: the connection's windows decide")
    if connections:  # the connection's own: passed on the MAC alone, the cookie not checked
        return Expected(TC_ACT_OK, decapsulated_frame(frame), {"decapsulated": 1, "not_listener": 1},
                        "validated: not_listener")
    cookie = check_cookie(HANDSHAKE_SCHEDULE, now, segment.saddr, segment.daddr, segment.sport, segment.dport,
                          (segment.seq - 1) % 2**32, (segment.ack - 1) % 2**32)
    if isinstance(cookie, Reject):
        return Expected(TC_ACT_SHOT, None, {"decapsulated": 1, "cookie_bad": 1}, "cookie bad")
    if owned(segment):  # another connection's ACK: the recycle would reset the fixture's (tests/test_backend_bpf.py)
        return Expected(TC_ACT_OK, frame, {}, "untested at tc: would recycle the owned connection")
    # A listener: the kfunc, which refuses outside a real tc ingress; none.
    outcome = "kfunc_failed" if segment.dport == LISTENING_PORT else "no_socket"
    return Expected(TC_ACT_OK, decapsulated_frame(frame), {"decapsulated": 1, outcome: 1}, f"validated: {outcome}")


def expected_xdp(frame: bytes) -> tuple[str, bool]:
    """The XDP stage's counter for ``frame`` ('' for none) and whether it decides it (for the tc program's
    answer: the decapsulated frame, or the drop) rather than passing it on unchanged."""
    if not encapsulated(frame) or len(frame) < INNER:
        return "", False
    if frame[HEADER + 1]:
        return "flagged", False
    if not outer_sound(frame) or not whole_header(frame) or frame[ETH + 12:ETH + 16] not in TRUSTED \
            or len(frame) == INNER or frame[INNER] >> 4 not in (4, 6):
        return "left", False
    segment = parsed_segment(decapsulated_frame(frame))
    if segment is None or segment.flags & SYN or not protected(segment) or not mac_holds(frame, segment) or \
            not owned(segment) and encap.next_owner(0, frame[ETH + 16:ETH + 20], frame[HEADER + 4:HEADER + 12]):
        return "left", False
    if owned(segment):
        return "decapsulated", True
    return ("no_flow_dropped" if segment.flags & RST else "no_flow_reset"), True


# --- running it ---

def run_tc(site, plane, frame: bytes) -> tuple[int, bytes, dict]:
    name, context, _ = site
    before = read_counters(plane.counters, plane.kfunc_errors)
    with netns.inside(name):
        verdict, out = prog_test_run(plane.prog_fd, frame, out_size=len(frame) + 256, context=context)
    after = read_counters(plane.counters, plane.kfunc_errors)
    return verdict, out, {key: after[key] - before[key] for key in COUNTERS if after[key] != before[key]}


def run_xdp(site, stage, frame: bytes) -> tuple[int, bytes, dict]:
    before = read_xdp_counters(stage.counters)
    with netns.inside(site[0]):
        verdict, out = prog_test_run(stage.prog_fd, frame, out_size=len(frame) + 256)
    after = read_xdp_counters(stage.counters)
    return verdict, out, {key: after[key] - before[key] for key in XDP_COUNTERS if after[key] != before[key]}


def judge(site, plane, stage, clock: ProgramClock, frame: bytes) -> str:
    """Run ``frame`` through the tc program and the XDP stage, each held to the reference; the outcome."""
    clock.restart()
    started = clock.now()
    expected = expected_tc(frame, started, site[2])
    if len(frame) - ETH < {b"\x08\x00": 20, b"\x86\xdd": 40}.get(frame[12:14], 0):
        # BPF_PROG_TEST_RUN builds no skb shorter than its IP header (EINVAL); the XDP stage's run
        expected = Expected(TC_ACT_OK, frame, {}, "untested at tc")
    elif not expected.path.startswith("untested"):
        verdict, out, changed = run_tc(site, plane, frame)
        # The cookie's epoch window moves with the program's clock: the reference at either reading.
        candidates = [expected, expected_tc(frame, clock.now(), site[2])]
        expected = next((e for e in candidates if e.counts == changed), candidates[-1])
        assert (verdict, changed) == (expected.verdict, expected.counts), expected.path
        if expected.frame is not None:
            assert out == expected.frame, expected.path
    if len(frame) <= LONGEST_FRAME:
        xdp_verdict, xdp_out, xdp_changed = run_xdp(site, stage, frame)
        counter, decides = expected_xdp(frame)
        assert xdp_changed == ({counter: 1} if counter else {}), (counter, expected.path)
        if not decides:
            assert (xdp_verdict, xdp_out) == (XDP_PASS, frame), counter
        elif counter == "no_flow_dropped":
            assert xdp_verdict == XDP_DROP and expected.counts == {"decapsulated": 1, counter: 1}
        else:
            assert (xdp_verdict, xdp_out) == (XDP_PASS, expected.frame)
            assert expected.counts == {"decapsulated": 1, **({} if counter == "decapsulated" else {counter: 1})}
    return expected.path


# --- frames ---

def ip(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


def frame_around(inner: bytes, source: str = FRONT, destination: str = BACKEND, flags: int = 0,
                 former: tuple[str, str] = (NONE, NONE), mac: int | None = None, magic: int = encap.MAGIC,
                 version: int = encap.VERSION, reserved: int = 0, source_port: int = 0xC123) -> bytearray:
    """``inner`` encapsulated as a front does (encap._wrap's layout), with the MAC given or, by default,
    the right one for the flow the backend reads (an ICMP error's quoted flow when flagged ICMP)."""
    owners = ip(former[0]) + ip(former[1])
    if mac is None:
        mac = right_mac(inner, ip(source), ip(destination), flags, owners)
    udp_length = 8 + encap.HEADER_BYTES + len(inner)
    return bytearray(bytes(6) + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00"
                     + build_ip_header(ip(source), ip(destination), 17, udp_length)
                     + struct.pack("!HHHH", source_port, ENCAP_PORT, udp_length, 0)
                     + bytes([magic, flags, version, reserved]) + owners + mac.to_bytes(8, "big") + inner)


def right_mac(inner: bytes, source: bytes, destination: bytes, flags: int, owners: bytes) -> int:
    flow = None
    if flags & encap.FLAG_ICMP:
        try:
            flow = parse_icmp_error(inner)
        except MalformedPacket:
            pass
    if flow is None:
        if len(inner) < 24:
            return 0
        saddr, daddr, sport, dport = inner_flow(inner)
        if inner[0] >> 4 == 4:
            saddr, daddr = saddr[-4:], daddr[-4:]
    else:
        saddr, daddr, sport, dport = flow.saddr, flow.daddr, flow.sport, flow.dport
    return encap.encap_mac(KEY, encap.mac_input(source, destination, saddr, daddr, sport, dport, flags, owners))


OTHER_FLAGS = {
    "segment": [encap.FLAG_CHAINED, encap.FLAG_VALIDATED | encap.FLAG_CHAINED, encap.FLAG_FASTOPEN, encap.FLAG_ICMP,
                encap.FLAG_VALIDATED],
    "syn": [encap.FLAG_FASTOPEN | encap.FLAG_CHAINED, encap.FLAG_FASTOPEN | encap.FLAG_VALIDATED, encap.FLAG_VALIDATED,
            0],
    "icmp": [encap.FLAG_ICMP | encap.FLAG_CHAINED, encap.FLAG_ICMP | encap.FLAG_VALIDATED, 0],
    "bytes": [0, encap.FLAG_VALIDATED, encap.FLAG_ICMP],
    "connection": [encap.FLAG_VALIDATED, encap.FLAG_CHAINED, encap.FLAG_ICMP, encap.FLAG_FASTOPEN],
}


def mostly(draw, usual, others: list):
    """``usual`` nine times in ten, else one of ``others`` (a list)."""
    if draw(st.integers(0, 9)) < 9:
        return usual
    return draw(st.sampled_from(others))


@st.composite
def connection_segments(draw) -> bytes:
    """A segment of a connection a client holds here (OWNED), any flags, options and length, a handshake ACK
    whose cookie holds now and then; broken as the front fuzz breaks its segments."""
    family = draw(st.sampled_from((4, 6)))
    client, vip = ip(CLIENTS[family]), ip(VIPS[0 if family == 4 else 1])
    seq, ack = draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        epoch, salt = HANDSHAKE_SCHEDULE.minting_salt(START)
        cookie = make_cookie(salt, epoch, client, vip, CONNECTED_PORT, LISTENING_PORT, seq, SynOptions(1460, 7, True, False))
        seq, ack = (seq + 1) % 2**32, (cookie + 1) % 2**32
    flags = draw(st.integers(0, 255))  # a SYN now and then (refused at once): the other 128 combinations mostly
    flags = mostly(draw, flags & ~SYN, [flags])
    packet = build_tcp_packet(client, vip, CONNECTED_PORT, LISTENING_PORT, seq, ack, flags,
                              draw(st.integers(0, 65535)), draw(tcp_options()), bytes(draw(st.integers(0, 1400))))
    return bytes(draw(mutated(bytearray(packet))))


INNERS = {"segment": segments(), "syn": segments(syn_only=True), "icmp": icmp_errors(), "bytes": st.binary(max_size=64),
          "connection": connection_segments()}


def natural_flags(kind: str, inner: bytes) -> int:
    """The flags a front gives ``inner``: the handler's, where it forwards it; a SYN's FASTOPEN (the handler
    here has no TFO keys)."""
    if kind == "syn":
        return encap.FLAG_FASTOPEN
    view = kernel_view(inner) if kind != "bytes" else None
    verdict = handle(view, START, HANDSHAKE_SCHEDULE, ICMP_POLICY) if view else None
    if verdict is not None and verdict.action is Action.FORWARD:
        return verdict.packet[29]
    return encap.FLAG_ICMP if kind == "icmp" else 0


@st.composite
def encapsulations(draw) -> bytes:
    """A front's (or a backend's) encapsulation of a client's packet, broken or not: the flags the front
    would give it or others (any byte, now and then), the source trusted or not, any FORMER_OWNERS, the MAC
    right or right for something else, the header's constants wrong, the outer headers broken, cut at any
    length, or grown. Each breakage is drawn one time in ten, so the deep paths are reached too."""
    kind = draw(st.sampled_from(["segment", "segment", "connection", "connection", "icmp", "syn", "bytes"]))
    inner = draw(INNERS[kind])
    flags = mostly(draw, natural_flags(kind, inner), OTHER_FLAGS[kind] + [draw(st.integers(0, 255))])
    source = mostly(draw, FRONT, [OTHER_FRONT, UNTRUSTED, UNRESOLVED_OWNER])
    destination = mostly(draw, BACKEND, [ANOTHER_BACKEND])
    former = draw(st.sampled_from(FORMER_OWNERS))
    owners = ip(former[0]) + ip(former[1])
    mac = mostly(draw, "right", ["flags", "addresses", "random"])
    if mac == "right":
        mac = None
    elif mac == "flags":  # a front's MAC for other flags: VALIDATED set by whoever relays it, say
        mac = right_mac(inner, ip(source), ip(destination), flags ^ draw(st.sampled_from([1, 2, 4, 8])), owners)
    elif mac == "addresses":
        mac = right_mac(inner, ip(OTHER_FRONT if source == FRONT else FRONT), ip(destination), flags, owners)
    else:
        mac = draw(st.integers(0, 2**64 - 1))
    constants = mostly(draw, {}, [{"magic": 0x5D}, {"version": 2}, {"version": 4}, {"reserved": 1}, {"magic": 0}])
    frame = frame_around(inner, source, destination, flags, former, mac, **constants)
    return bytes(draw(outer_mutated(frame)))


@st.composite
def outer_mutated(draw, frame: bytearray) -> bytearray:
    if draw(st.integers(0, 9)) < 8:
        return frame
    mutations = draw(st.lists(st.sampled_from(["truncate", "trailing", "total_length", "checksum", "ether_type", "ihl",
                                               "protocol", "fragment", "port", "version"]),
                              min_size=1, max_size=3, unique=True))
    if "ether_type" in mutations:
        frame[12:14] = draw(st.sampled_from([b"\x86\xdd", b"\x81\x00", b"\x08\x06"]))
    if "ihl" in mutations:
        frame[ETH] = frame[ETH] & 0xF0 | draw(st.sampled_from([0, 4, 6, 15]))
    if "protocol" in mutations:
        frame[ETH + 9] = draw(st.sampled_from([6, 4, 41, 0]))
    if "fragment" in mutations:
        frame[ETH + 6:ETH + 8] = draw(st.sampled_from([0x2000, 0x0001, 0x6000, 0x8000])).to_bytes(2, "big")
    if "port" in mutations:
        frame[ETH + 22:ETH + 24] = draw(st.sampled_from([ENCAP_PORT + 1, 0, 4789])).to_bytes(2, "big")
    if "version" in mutations:
        frame[ETH] = draw(st.sampled_from([0, 6, 15])) << 4 | frame[ETH] & 0xF
    if "total_length" in mutations:
        frame[ETH + 2:ETH + 4] = draw(st.integers(0, 65535)).to_bytes(2, "big")
    if "checksum" in mutations:
        frame[ETH + 10] ^= draw(st.integers(1, 255))
    else:
        packet = frame[ETH:]
        fix_ipv4_checksum(packet, 20)
        frame[ETH:] = packet
    if "truncate" in mutations:
        del frame[draw(st.integers(ETH, len(frame))):]
    if "trailing" in mutations:
        frame += draw(st.binary(min_size=1, max_size=64))
    return frame


def plain(packet: bytes) -> bytes:
    """A client's packet arriving unencapsulated, as if it bypassed the fronts."""
    return bytes(12) + ETHER_TYPE.get(packet[0] >> 4 if packet else 4, b"\x08\x00") + packet


# --- the tests ---

@pytest.fixture(scope="module")
def backend(listening, plane, stage, clock):
    """judge(frame) with the module's programs and clock; a hypothesis test makes the outcome an event
    (`--hypothesis-show-statistics`: what the strategies reach)."""
    return lambda frame: judge(listening, plane, stage, clock, frame)


def chained_along(inner: bytes) -> bytes:
    """``inner`` encapsulated by FRONT naming a resolved former owner: passed on along the chain here."""
    return bytes(frame_around(inner, former=(ANOTHER_BACKEND, NONE)))


def client_ack(family: int, payload: bytes = b"") -> bytearray:
    vip, client = (ip(VIPS[0]), ip("198.18.1.2")) if family == 4 else (ip(VIPS[1]), ip("2001:db8:1::2"))
    return bytearray(build_tcp_packet(client, vip, 40000, LISTENING_PORT, 7, 9, ACK, 1000, b"", payload))


def with_ip_length(packet: bytearray, length: int) -> bytes:
    """``packet`` declaring ``length`` bytes (IPv4's total length, its header checksum kept right; IPv6's
    40 + payload length) whatever it carries."""
    if packet[0] >> 4 == 4:
        packet[2:4] = length.to_bytes(2, "big")
        fix_ipv4_checksum(packet, 20)
    else:
        packet[4:6] = (length - 40).to_bytes(2, "big")
    return bytes(packet)


# Found by this module (bpf/backend.bpf.c before the fix in chain_to): the program passed a segment on along
# the chain with outer lengths computed from the inner packet's own length field, not from what it carries:
# a packet with bytes behind its IP length left with an outer header too short for it (encap.chain's
# counts them), and an IPv6 payload length of 65535 wrapped the 16-bit outer length.
TRAILING_BYTES_CHAINED = chained_along(client_ack(4) + bytes(6))
DECLARED_LENGTH_ZERO_CHAINED = chained_along(with_ip_length(client_ack(4, b"x"), 0))
DECLARED_JUMBO_CHAINED = chained_along(with_ip_length(client_ack(6, b"x"), 40 + 65535))


# Decapsulated before outer_ipv4_sound (bpf/synproxy.h), by the XDP stage too: an authentic front's packet
# whose outer IPv4 header no front writes (tests/test_backend_bpf.py's UNSOUND_OUTER).
UNSOUND_OUTER_FRAMES = [breakage(bytes(frame_around(client_ack(4)))) for breakage in UNSOUND_OUTER.values()]


@settings(FUZZ, max_examples=EXAMPLES * 2)
@given(frame=encapsulations())
@example(frame=TRAILING_BYTES_CHAINED)
@example(frame=DECLARED_LENGTH_ZERO_CHAINED)
@example(frame=DECLARED_JUMBO_CHAINED)
def test_every_encapsulation_is_decided_as_the_reference_says(backend, frame):
    event(backend(frame[:LONGEST_FRAME]))


@pytest.mark.parametrize("frame", UNSOUND_OUTER_FRAMES, ids=list(UNSOUND_OUTER))
def test_an_outer_ipv4_header_no_front_writes_is_decided_as_the_reference_says(backend, frame):
    backend(frame)


def handshake_ack(family: int) -> bytes:
    """The handshake ACK of a new connection from the client of ``family`` to its VIP's LISTENING_PORT (a
    listener there), its cookie minted at START, with timestamps and a request."""
    client, vip = ip(CLIENTS[family]), ip(VIPS[0 if family == 4 else 1])
    epoch, salt = HANDSHAKE_SCHEDULE.minting_salt(START)
    cookie = make_cookie(salt, epoch, client, vip, 40100, LISTENING_PORT, 999, SynOptions(1460, 7, True, False))
    return build_tcp_packet(client, vip, 40100, LISTENING_PORT, 1000, (cookie + 1) % 2**32, ACK | 0x08, 502,
                            b"\x01\x01\x08\x0a" + bytes(range(8)), b"GET / HTTP/1.0\r\n\r\n")


WHOLE_FRAMES = {
    "validated v4": bytes(frame_around(handshake_ack(4), flags=encap.FLAG_VALIDATED)),
    "validated v6": bytes(frame_around(handshake_ack(6), flags=encap.FLAG_VALIDATED)),
    "a connection's v6": bytes(frame_around(build_tcp_packet(ip(CLIENTS[6]), ip(VIPS[1]), CONNECTED_PORT,
                                                             LISTENING_PORT, 7, 9, ACK | 0x08, 1000, b"", b"data"))),
    "chained v4": TRAILING_BYTES_CHAINED,
    "icmp v4": bytes(frame_around(bytes(icmp_error(4, quoted_segment(4)[:548])), flags=encap.FLAG_ICMP)),
}


# The most the programs read of a frame in place (HEADERS_READ in bpf/backend.bpf.c): the outer headers, an
# inner IPv4 header with options, an ICMP error's quote; past it a cut changes only the payload.
HEADERS_READ = INNER + 60 + 8 + 60 + 8


@pytest.mark.parametrize("name", WHOLE_FRAMES)
def test_an_encapsulation_cut_at_every_length_is_decided_as_the_reference_says(backend, name):
    """Every length through the headers, then every 37th byte: cut as it arrived (its outer total length
    then the frame's no longer), and with the outer lengths of what is left, to reach the inner parse."""
    whole = WHOLE_FRAMES[name]
    assert backend(whole) in ("validated: kfunc_failed", "a connection's", "chained", "icmp passed")
    for length in (*range(ETH, min(len(whole), HEADERS_READ)), *range(HEADERS_READ, len(whole), 37)):
        backend(whole[:length])
        if length >= HEADER:
            backend(with_outer_ipv4(whole[:length]))


@FUZZ
@given(packet=st.one_of(segments(), segments(syn_only=True), icmp_errors(), st.binary(max_size=120)))
def test_plain_traffic_is_passed_unchanged(backend, packet):
    event(backend(plain(packet)[:LONGEST_FRAME]))


def forwarded(packet: bytes, now: float, moved: bool) -> bytes | None:
    """The frame the Python front (handler.handle) sends BACKEND for ``packet`` as the kernel hands it over,
    or None when it sends nothing there."""
    view = kernel_view(packet)
    if view is None:
        return None
    verdict = handle(view, now, HANDSHAKE_SCHEDULE, moved_policy() if moved else ICMP_POLICY)
    return bytes(12) + b"\x08\x00" + verdict.packet if verdict.action is Action.FORWARD else None


@FUZZ
@given(packet=st.one_of(segments(), icmp_errors()), moved=st.booleans())
def test_what_a_front_forwards_is_decapsulated_as_sent(backend, packet, moved):
    """The two data planes' rules meet: every packet the front's reference forwards authenticates here and
    is decapsulated (or passed on) as it left the front."""
    frame = forwarded(packet, START, moved)
    if frame is None or len(frame) > LONGEST_FRAME:
        event("not forwarded")
        return
    outcome = backend(frame)
    event(outcome)
    assert outcome not in ("untrusted", "malformed", "encap_refused", "encap_bad_mac"), outcome


# --- GRO-sized frames at the tc hook (real skbs: BPF_PROG_TEST_RUN refuses them; tests/test_fuzz_front.py) ---

GRO_LINK, GRO_PEER, GRO_GATEWAY4, GRO_GATEWAY6 = "sgra", "sgrb", "198.18.40.1", "fd00:40::1"


@pytest.fixture(scope="module")
def forwarding():
    """A namespace of its own whose veth pair carries frames in (GRO_PEER -> GRO_LINK) and, forwarded by it
    to a gateway behind GRO_LINK, out again: what the program passes is seen at GRO_PEER as it left."""
    name = netns.unique_name("sgr")
    with netns.namespaces(name):
        netns.link(name, GRO_LINK, name, GRO_PEER)
        netns.add_addresses(name, GRO_LINK, "198.18.40.2/24", "fd00:40::2/64")
        for gateway in (GRO_GATEWAY4, GRO_GATEWAY6):
            netns.run(name, ["ip", "neigh", "replace", gateway, "lladdr", "02:00:00:00:40:01", "dev", GRO_LINK, "nud",
                             "permanent"])
        netns.add_route(name, "0.0.0.0/0", GRO_GATEWAY4)
        netns.add_route(name, "::/0", GRO_GATEWAY6)
        # The injecting end sends nothing of its own (MLD reports would meet the program too).
        netns.write_sysctls(name, {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1",
                                   f"net.ipv6.conf.{GRO_PEER}.disable_ipv6": "1"})
        shown = json.loads(netns.run(name, ["ip", "-j", "link", "show", GRO_LINK]).stdout)
        yield name, bytes.fromhex(shown[0]["address"].replace(":", ""))


def client_segment(family: int, size: int, sport: int = 40000) -> bytes:
    """An ACK with data of ``size`` bytes in all, from a client to its VIP's LISTENING_PORT."""
    header = 40 if family == 4 else 60
    vip, client = (ip(VIPS[0]), ip(CLIENTS[4])) if family == 4 else (ip(VIPS[1]), ip(CLIENTS[6]))
    return build_tcp_packet(client, vip, sport, LISTENING_PORT, 7, 9, ACK | 0x08, 1000, b"", bytes(size - header))


@pytest.mark.parametrize("family", (4, 6))
@pytest.mark.parametrize("size", GRO_SIZES)
def test_gro_sized_frames_at_the_tc_hook_are_decided_as_the_reference_says(forwarding, plane, family, size):
    """Encapsulated, ``size`` bytes in all (a jumbo farm link's; a front sends no more than its farm MTU):
    decapsulated to exactly the inner bytes (seen forwarded) with a valid MAC, whether the headers are in
    the skb's linear area or, as a packet socket leaves them, in its pages; dropped and counted with a
    wrong MAC, or marked UDP GSO (UDP GRO forwarding, off by default, would coalesce them so: the program
    cannot strip the encapsulation of a GSO UDP packet). Not encapsulated, the same size (GRO's, marked
    GSO at 64 KB): passed on unchanged."""
    name, link_mac = forwarding
    ether = link_mac + bytes.fromhex("020000000001") + b"\x08\x00"
    inner = client_segment(family, size - encap.OVERHEAD)
    headers = INNER + (20 if family == 4 else 40) + 20
    good = ether + bytes(frame_around(inner))[ETH:]
    bad = ether + bytes(frame_around(inner, mac=0))[ETH:]
    plain_segment = client_segment(family, size, 40001)
    cases = ((good, headers, 0, False, {"decapsulated": 1, "no_flow_reset": 1}, inner),
             (good, ETH, 0, False, {"decapsulated": 1, "no_flow_reset": 1}, inner),
             (good, headers, 1440, True, {"malformed": 1}, None),
             (bad, headers, 0, False, {"encap_bad_mac": 1}, None),
             (ether[:12] + ETHER_TYPE[family] + plain_segment, headers - encap.OVERHEAD,
              1440 if size > 9000 else 0, False, {"passed": 1}, plain_segment))
    with tc_program_on(name, (GRO_LINK, GRO_PEER), plane.prog_fd):
        for frame, linear, gso_size, udp, counts, passed in cases:
            before = read_counters(plane.counters, plane.kfunc_errors)
            with netns.inside(name), arriving(GRO_PEER) as frames:
                send_as_one_skb(GRO_PEER, frame, linear, gso_size, udp)
            after = read_counters(plane.counters, plane.kfunc_errors)
            assert {key: after[key] - before[key] for key in COUNTERS if after[key] != before[key]} == counts, linear
            ours = [out for out in frames if out[12:14] == ETHER_TYPE[family] and len(out) > 1000]
            assert [forwarded_as_sent(out, passed) for out in ours] == ([True] if passed else []), counts


# --- short frames whose headers lie in pages (a tap device's NAPI frags) ---

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_NAPI, IFF_NAPI_FRAGS = 0x0002, 0x1000, 0x0010, 0x0020
NAPI_TAP = "sgrt"


@contextlib.contextmanager
def napi_frags_tap(namespace: str, name: str):
    """A tap device in ``namespace`` that turns each frame written to it into an skb as a NIC's driver
    builds one from its receive pages (IFF_NAPI_FRAGS: tun_napi_alloc_frags puts the first iovec in the
    linear area and each further one in a page frag, then napi_gro_frags). A packet socket's skb is
    linear under a page (packet_alloc_skb), so only this path gives a short frame its headers in pages.
    Yields the tap's fd; the device goes when it is closed."""
    with netns.inside(namespace):
        fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        flags = IFF_TAP | IFF_NO_PI | IFF_NAPI | IFF_NAPI_FRAGS
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        netns.write_sysctls(namespace, {f"net.ipv4.conf.{name}.rp_filter": "0", "net.ipv4.conf.all.rp_filter": "0"})
        netns.run(namespace, ["ip", "link", "set", name, "up"])
        yield fd
    finally:
        os.close(fd)


@pytest.mark.parametrize("family", (4, 6))
def test_a_short_frame_whose_headers_lie_in_pages_is_decided_as_when_linear(forwarding, plane, family):
    """A front's bare ACK encapsulated (102 or 122 bytes, under HEADERS_READ), arriving with only its
    Ethernet header, or its outer IPv4 and UDP headers too, in the linear area: authenticated and
    decapsulated as when the whole frame is linear (before, the program saw only the linear part: to the
    UDP stack as plain traffic, or dropped as malformed)."""
    name, _ = forwarding
    inner = client_segment(family, 40 if family == 4 else 60)
    with napi_frags_tap(name, NAPI_TAP) as tap, tc_program_on(name, (NAPI_TAP,), plane.prog_fd, mtu=1500):
        shown = json.loads(netns.run(name, ["ip", "-j", "link", "show", NAPI_TAP]).stdout)
        frame = bytes.fromhex(shown[0]["address"].replace(":", "")) + bytes.fromhex("020000000001") + \
            bytes(frame_around(inner))[12:]
        assert len(frame) < HEADERS_READ
        for linear in (len(frame), ETH, ETH + 28):
            before = read_counters(plane.counters, plane.kfunc_errors)
            with netns.inside(name), arriving(GRO_PEER) as frames:
                os.writev(tap, [frame[:linear], frame[linear:]] if linear < len(frame) else [frame])
            after = read_counters(plane.counters, plane.kfunc_errors)
            changed = {key: after[key] - before[key] for key in COUNTERS if after[key] != before[key]}
            assert changed == {"decapsulated": 1, "no_flow_reset": 1}, linear
            # The namespace's own IPv6 (MLD, neighbour discovery) leaves by the same link.
            ours = [out for out in frames if out[12:14] == ETHER_TYPE[family] and out[23 if family == 4 else 20] == 6]
            assert [forwarded_as_sent(out, inner) for out in ours] == [True], linear
