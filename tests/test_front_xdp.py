"""The front's XDP program under BPF_PROG_TEST_RUN, against the Python handler it stands in for.

Every packet to a protected VIP and port must come out as handler.handle's verdict, byte for byte
after the Ethernet header: handshake ACKs encapsulated flagged VALIDATED, every other segment
encapsulated unflagged to the handler's Maglev backend, SYNs answered with the handler's SYN-ACK
(TSval aside); and every packet the program leaves to the queue must pass unchanged and counted. The
runs happen in a namespace of their own, with routes to a backend subnet through a gateway whose
neighbour entry is permanent (XDP cannot resolve one).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import random
import socket
import struct
import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from synproxy import netns
from synproxy.bpf.libbpf import (
    XDP_FLAGS_DRV_MODE,
    BpfObject,
    prog_test_run,
    program_id,
    xdp_attach,
    xdp_attached_program,
    xdp_detach,
)
from synproxy.bpf.loading import build_object
from synproxy.front import fastpath
from synproxy.front.fastpath import FastPath, FastPathError
from synproxy.front.handler import Action, FrontPolicy, handle
from synproxy.maglev import PreviousOwners
from synproxy.netlink import default_route_interfaces
from synproxy.packet import ACK, build_tcp_packet
from synproxy.salt import SaltSchedule
from tests.lab_fixtures import needs_root
from tests.test_front_fastpath import (
    HOST_MAC,
    PERIOD,
    PORT,
    VIP4,
    VIP6,
    random_options,
    set_clock,
    syn,
    vector_syn,
    without_clock,
)

pytestmark = needs_root
XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 1, 2, 3, 4
XDP_MD = struct.Struct("=6I")  # struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue, egress
GATEWAY4, GATEWAY6, GATEWAY_MAC = "10.99.0.2", "fd00:99::2", "02:00:00:00:99:02"
FARM = "10.99.0.1"
BACKENDS = tuple(f"10.98.0.{host}" for host in (11, 12, 13, 14, 15, 16, 17))
UNREACHABLE_BACKEND = "192.0.2.9"     # an unreachable route
UNRESOLVED_BACKEND = "10.97.0.9"      # routed through a gateway without a neighbour entry
LINK = "fxa"
ROUTE_CACHE_SECONDS = 0.1  # ROUTE_CACHE_NS in bpf/front.bpf.c


@pytest.fixture(scope="module")
def namespace():
    name = netns.unique_name("fx")
    with netns.namespaces(name):
        netns.link(name, LINK, name, "fxb")
        netns.add_addresses(name, LINK, f"{FARM}/24", "fd00:99::1/64")
        for gateway in (GATEWAY4, GATEWAY6):
            netns.run(name, ["ip", "neigh", "replace", gateway, "lladdr", GATEWAY_MAC, "dev", LINK, "nud",
                             "permanent"])
        netns.add_route(name, "0.0.0.0/0", GATEWAY4)
        netns.add_route(name, "::/0", GATEWAY6)
        netns.add_route(name, "10.98.0.0/24", GATEWAY4)
        netns.add_route(name, "10.97.0.0/24", "10.99.0.3")
        for prefix in ("203.0.113.0/24", "192.0.2.0/24"):
            netns.run(name, ["ip", "route", "add", "unreachable", prefix])
        netns.write_sysctls(name, {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"})
        yield name


@pytest.fixture(scope="module")
def link_mac(namespace) -> bytes:
    shown = json.loads(netns.run(namespace, ["ip", "-j", "link", "show", LINK]).stdout)
    return bytes.fromhex(shown[0]["address"].replace(":", ""))


def make_policy(vectors: list[dict], backends=BACKENDS) -> FrontPolicy:
    vips = {ipaddress.ip_address(v["daddr"]).packed for v in vectors}
    vips |= {ipaddress.ip_address(VIP4).packed, ipaddress.ip_address(VIP6).packed}
    return FrontPolicy(vips=frozenset(vips), ports=frozenset({v["dport"] for v in vectors} | {PORT}),
                       farm_address=ipaddress.ip_address(FARM).packed,
                       backends=tuple(ipaddress.ip_address(b).packed for b in backends), encap_port=6080,
                       encap_key=bytes(range(16)), flow_key=b"flow-key-16bytes")


@pytest.fixture(scope="module")
def policy(cookie_vectors):
    return make_policy(cookie_vectors["vectors"])


@pytest.fixture(scope="module")
def schedule(cookie_vectors):
    # A skew makes the accepted window three epochs wide near a boundary: the program checks it too.
    return SaltSchedule((bytes.fromhex(cookie_vectors["secret"]),), period=PERIOD, skew=2)


def run(namespace: str, fast_path: FastPath, frame: bytes, ingress: str | None = None) -> tuple[int, bytes, dict]:
    """The verdict, the frame after, and the counters that moved; the frame comes in on ``ingress``
    (the namespace's loopback by default)."""
    before = fast_path.counts("xdp")
    with netns.inside(namespace):
        context = None
        if ingress is not None:
            context = XDP_MD.pack(0, len(frame), 0, socket.if_nametoindex(ingress), 0, 0)
        verdict, out = prog_test_run(fast_path.xdp_prog_fd, frame, context=context)
    after = fast_path.counts("xdp")
    return verdict, out, {key: after[key] - before[key] for key in after if after[key] != before[key]}


def frame_of(packet: bytes) -> bytes:
    return raw(Ether(dst=HOST_MAC, type=0x0800 if packet[0] >> 4 == 4 else 0x86DD)) + packet


def segment(src: str, dst: str, sport: int = 40000, dport: int = PORT, seq: int = 1000, ack: int = 5000,
            flags: str = "A", options=(), payload: bytes = b"", **ip_fields) -> bytes:
    layer = IP(src=src, dst=dst, **ip_fields) if ":" not in dst else IPv6(src=src, dst=dst, **ip_fields)
    tcp = TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, options=list(options))
    return raw(Ether(dst=HOST_MAC) / layer / tcp / (Raw(payload) if payload else b""))


def vector_ack(vector: dict, options=(), payload: bytes = b"", cookie_delta: int = 0) -> bytes:
    """The handshake ACK that answers the vector's SYN-ACK."""
    return segment(vector["saddr"], vector["daddr"], vector["sport"], vector["dport"],
                   (vector["client_isn"] + 1) % 2**32, (vector["cookie"] + 1 + cookie_delta) % 2**32,
                   options=options, payload=payload)


def usable(vectors: list[dict]) -> list[dict]:
    """The vectors the program's 64-bit nanosecond clock can reach (the year 2262; the 32-bit epoch
    wrap is the backend's and the Python code's to check)."""
    return [v for v in vectors if (v["epoch"] + 1) * PERIOD * 10**9 < 2**63]


def assert_encapsulated(verdict: int, out: bytes, expected, link_mac: bytes) -> None:
    assert expected.action is Action.FORWARD
    assert verdict == XDP_REDIRECT
    assert out[:14] == bytes.fromhex(GATEWAY_MAC.replace(":", "")) + link_mac + b"\x08\x00"
    assert out[14:] == expected.packet


@pytest.mark.parametrize("shape", ["bare", "timestamp", "payload"])
def test_every_vectors_ack_is_encapsulated_validated_as_the_handler_does(
        monkeypatch, namespace, link_mac, fast_path, policy, schedule, cookie_vectors, shape):
    rng = random.Random(13)
    vectors = usable(cookie_vectors["vectors"])
    assert {v["family"] for v in vectors} == {4, 6} and len(vectors) > 100
    for vector in vectors:
        now = vector["epoch"] * PERIOD + PERIOD / 2
        set_clock(monkeypatch, fast_path, policy, schedule, now)
        options = [("NOP", None), ("NOP", None), ("Timestamp", (123457, 99))] if shape != "bare" else []
        # Every payload length up to what the farm MTU lets through: the checksum reads them in pieces.
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 1350))) if shape == "payload" else b""
        frame = vector_ack(vector, options, payload)
        expected = handle(frame[14:], now, schedule, policy)
        assert expected.outcome == "validated", vector["name"]
        verdict, out, changed = run(namespace, fast_path, frame)
        assert changed == {("validated", vector["family"]): 1}, vector["name"]
        assert_encapsulated(verdict, out, expected, link_mac)


def test_a_wrong_cookie_is_forwarded_unflagged(monkeypatch, namespace, link_mac, fast_path, policy, schedule,
                                                cookie_vectors):
    for vector in usable(cookie_vectors["vectors"])[:40]:
        now = vector["epoch"] * PERIOD + PERIOD / 2
        set_clock(monkeypatch, fast_path, policy, schedule, now)
        frame = vector_ack(vector, cookie_delta=1 << 12)  # the MAC's bits, not the epoch's
        expected = handle(frame[14:], now, schedule, policy)
        assert expected.outcome == "forwarded_bad_mac"
        verdict, out, changed = run(namespace, fast_path, frame)
        assert changed == {("forwarded_bad_mac", vector["family"]): 1}, vector["name"]
        assert_encapsulated(verdict, out, expected, link_mac)


def test_random_established_packets_are_encapsulated_as_the_handler_does(
        monkeypatch, namespace, link_mac, fast_path, policy, schedule):
    rng = random.Random(31)
    # One second past an epoch boundary: with the skew, three epochs are accepted (until 2 s past it,
    # so the program's clock is set again for every packet).
    now = 29000000 * PERIOD + 1
    outcomes = set()
    for case in range(600):
        set_clock(monkeypatch, fast_path, policy, schedule, now)
        family = rng.choice((4, 6))
        if family == 4:
            src, dst = f"198.18.{rng.randrange(256)}.{rng.randrange(1, 255)}", VIP4
        else:
            src, dst = f"2001:db8:1::{rng.randrange(1, 65536):x}", VIP6
        flags = rng.randrange(256) & ~0x02  # every combination without SYN
        packet = build_tcp_packet(ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed,
                                  rng.randrange(1, 65536), PORT, rng.randrange(2**32), rng.randrange(2**32), flags,
                                  rng.randrange(65536), random_options(rng),
                                  bytes(rng.randrange(256) for _ in range(rng.randrange(0, 1361))))
        frame = frame_of(packet)
        expected = handle(packet, now, schedule, policy)
        verdict, out, changed = run(namespace, fast_path, frame)
        assert changed == {(expected.outcome, family): 1}, case
        assert_encapsulated(verdict, out, expected, link_mac)
        outcomes.add(expected.outcome)
    assert outcomes == {"forwarded", "forwarded_bad_mac", "forwarded_expired_epoch"}


def test_an_ethernet_pad_is_not_encapsulated(monkeypatch, namespace, link_mac, fast_path, policy, schedule,
                                             cookie_vectors):
    vector = next(v for v in usable(cookie_vectors["vectors"]) if v["family"] == 4)
    now = vector["epoch"] * PERIOD + PERIOD / 2
    set_clock(monkeypatch, fast_path, policy, schedule, now)
    frame = vector_ack(vector)
    assert len(frame) == 54
    verdict, out, changed = run(namespace, fast_path, frame + bytes(6))  # padded to Ethernet's 60 bytes
    assert changed == {("validated", 4): 1}
    assert_encapsulated(verdict, out, handle(frame[14:], now, schedule, policy), link_mac)


def test_the_maglev_choice_is_the_handlers_also_after_a_reordered_reload(
        monkeypatch, namespace, cookie_vectors, schedule):
    rng = random.Random(5)
    first = make_policy(cookie_vectors["vectors"])
    reordered = make_policy(cookie_vectors["vectors"], backends=BACKENDS[3:] + BACKENDS[:3])
    moved = sum(a != b for a, b in zip(first.table, reordered.table))
    assert moved and any(first.backends[a] != reordered.backends[b] for a, b in zip(first.table, reordered.table))
    loaded = FastPath(build_object("front"))
    try:
        for current in (first, reordered):
            loaded.configure(current, schedule)
            now = 1000 * PERIOD + 30
            set_clock(monkeypatch, loaded, current, schedule, now)
            chosen = set()
            for _ in range(400):
                packet = build_tcp_packet(bytes([rng.randrange(1, 127)]) + rng.randbytes(3), ipaddress.ip_address(VIP4).packed,
                                          rng.randrange(1, 65536), PORT, rng.randrange(2**32), 0, ACK, 1000)
                expected = handle(packet, now, schedule, current)
                _, out, _ = run(namespace, loaded, frame_of(packet))
                assert out[14 + 16:14 + 20] == current.backends[expected.backend] and out[14:] == expected.packet
                chosen.add(expected.backend)
            assert len(chosen) == len(BACKENDS)
    finally:
        loaded.close()


def test_a_moved_flow_names_its_former_owners_as_the_handler_does_until_the_window_ends(
        monkeypatch, namespace, cookie_vectors, schedule):
    """A backend added, then a drain: each moved flow goes to its new owner and names its former owners in
    the header, byte for byte as handler.handle; once the window ends (and the loader rewrites the slots
    that expired) only the drained backend's flows keep naming it."""
    rng = random.Random(7)
    previous = PreviousOwners(window=60.0)
    vectors = cookie_vectors["vectors"]
    steps = [(make_policy(vectors, backends=BACKENDS[:3]), 0.0),
             (make_policy(vectors, backends=BACKENDS[:4]), 1.0),                       # added
             (dataclasses.replace(make_policy(vectors, backends=BACKENDS[1:4]),
                                  draining=((ipaddress.ip_address(BACKENDS[0]).packed, 1),)), 2.0)]  # drained
    loaded = FastPath(build_object("front"))
    try:
        for step, (built, at) in enumerate(steps):
            current = dataclasses.replace(built, previous=previous)
            previous.follow(current.owner_table(), current.draining_table(), current.down, at)
            loaded.configure(current, schedule)
            if step == len(steps) - 1:
                assert previous.expire(at + 61.0)
                loaded.write_maglev(current)
            now = 1000 * PERIOD + 30
            set_clock(monkeypatch, loaded, current, schedule, now)
            named = set()
            for _ in range(400):
                packet = build_tcp_packet(bytes([rng.randrange(1, 127)]) + rng.randbytes(3),
                                          ipaddress.ip_address(VIP4).packed, rng.randrange(1, 65536), PORT,
                                          rng.randrange(2**32), 0, ACK, 1000)
                expected = handle(packet, now, schedule, current)
                _, out, _ = run(namespace, loaded, frame_of(packet))
                assert out[14:] == expected.packet
                named.update((out[14 + 32:14 + 36], out[14 + 36:14 + 40]))
            none, drained = bytes(4), ipaddress.ip_address(BACKENDS[0]).packed
            assert named == [{none}, {none} | set(steps[0][0].backends), {none, drained}][step], step
    finally:
        loaded.close()


@pytest.mark.parametrize("timestamp", [False, True])
def test_every_vectors_syn_gets_the_handlers_syn_ack(monkeypatch, namespace, fast_path, policy, schedule,
                                                     cookie_vectors, timestamp):
    for vector in usable(cookie_vectors["vectors"]):
        now = vector["epoch"] * PERIOD + PERIOD / 2
        set_clock(monkeypatch, fast_path, policy, schedule, now)
        frame = vector_syn(vector, timestamp)
        verdict, out, changed = run(namespace, fast_path, frame)
        assert (verdict, changed) == (XDP_REDIRECT, {("syn_answered", vector["family"]): 1}), vector["name"]
        assert out[:6] == bytes.fromhex(GATEWAY_MAC.replace(":", ""))
        expected = handle(frame[14:], now, schedule, policy)
        assert expected.action is Action.REPLY
        assert without_clock(out[14:]) == without_clock(expected.packet), vector["name"]


def test_out_of_the_interface_it_came_in_is_xdp_tx(monkeypatch, namespace, fast_path, policy, schedule,
                                                   cookie_vectors):
    vector = usable(cookie_vectors["vectors"])[0]
    set_clock(monkeypatch, fast_path, policy, schedule, vector["epoch"] * PERIOD + PERIOD / 2)
    for frame, outcome in ((vector_ack(vector), "validated"), (vector_syn(vector, True), "syn_answered")):
        verdict, _, changed = run(namespace, fast_path, frame, ingress=LINK)
        assert (verdict, changed) == (XDP_TX, {(outcome, vector["family"]): 1})


def frame_with(frame: bytes, offset: int, value: bytes) -> bytes:
    return frame[:offset] + value + frame[offset + len(value):]


ACK4 = segment("198.18.1.2", VIP4)
PASSED = [
    ("an IPv4 fragment", raw(Ether(dst=HOST_MAC) / IP(src="198.18.1.2", dst=VIP4, flags="MF")
                             / TCP(dport=PORT, flags="A")), "unparsed"),
    ("a later IPv4 fragment", raw(Ether(dst=HOST_MAC) / IP(src="198.18.1.2", dst=VIP4, frag=2)
                                  / TCP(dport=PORT, flags="A")), "unparsed"),
    ("an IPv6 extension header", raw(Ether(dst=HOST_MAC) / IPv6(src="2001:db8:1::2", dst=VIP6) / IPv6ExtHdrDestOpt()
                                     / TCP(dport=PORT, flags="A")), "unparsed"),
    ("too big for the farm MTU", segment("198.18.1.2", VIP4, payload=bytes(1421)), "too_big"),
    ("IPv6, too big for the farm MTU", segment("2001:db8:1::2", VIP6, payload=bytes(1401)), "too_big"),
    ("another address", segment("198.18.1.2", "198.19.0.99"), "not_protected"),
    ("another port", segment("198.18.1.2", VIP4, dport=81), "not_protected"),
    ("IPv4 options", raw(Ether(dst=HOST_MAC) / IP(src="198.18.1.2", dst=VIP4, options=b"\x01\x01\x01\x00")
                         / TCP(dport=PORT, flags="A")), "queued"),
    ("a bad IPv4 header checksum", raw(Ether(dst=HOST_MAC) / IP(src="198.18.1.2", dst=VIP4, chksum=0x1234)
                                       / TCP(dport=PORT, flags="A")), "unverified"),
    ("a SYN with ACK", syn("198.18.1.2", VIP4, flags="SA"), "queued"),
    ("a frame shorter than its IP packet", segment("198.18.1.2", VIP4, payload=b"hello")[:-2], "queued"),
    ("a TCP header longer than the packet", frame_with(ACK4, 46, b"\xf0"), "queued"),
]


@pytest.mark.parametrize("case, frame, outcome", PASSED, ids=[case for case, _, _ in PASSED])
def test_what_the_program_does_not_handle_passes_unchanged(monkeypatch, namespace, fast_path, policy, schedule,
                                                           case, frame, outcome):
    set_clock(monkeypatch, fast_path, policy, schedule, 1000 * PERIOD + 30)
    family = 6 if frame[12:14] == b"\x86\xdd" else 4
    assert run(namespace, fast_path, frame) == (XDP_PASS, frame, {(outcome, family): 1}), case


def test_a_validating_ack_with_a_bad_checksum_goes_to_the_queue(monkeypatch, namespace, fast_path, policy,
                                                                schedule, cookie_vectors):
    vector = usable(cookie_vectors["vectors"])[0]
    now = vector["epoch"] * PERIOD + PERIOD / 2
    set_clock(monkeypatch, fast_path, policy, schedule, now)
    good = vector_ack(vector, payload=b"data")
    offset = 14 + (20 if vector["family"] == 4 else 40) + 16
    frame = frame_with(good, offset, bytes([good[offset] ^ 0xFF]))
    assert handle(frame[14:], now, schedule, policy).outcome == "malformed_bad_checksum"
    assert run(namespace, fast_path, frame) == (XDP_PASS, frame, {("unverified", vector["family"]): 1})


def test_a_multicast_frame_is_not_looked_at(namespace, fast_path):
    frame = b"\x01\x00\x5e\x00\x00\x01" + ACK4[6:]
    assert run(namespace, fast_path, frame) == (XDP_PASS, frame, {})


def test_without_the_current_epochs_salt_syns_and_acks_go_to_the_queue(monkeypatch, namespace, fast_path,
                                                                       policy, schedule):
    set_clock(monkeypatch, fast_path, policy, schedule, 1000 * PERIOD + 30)
    # The map holds epochs 998-1001; a clock in epoch 1003 finds none to mint with, and cannot tell an
    # ACK's expired cookie from a salt the stalled front process did not write.
    offset = fastpath.clock_offset_ns() + 3 * PERIOD * 10**9
    monkeypatch.setattr(fastpath, "clock_offset_ns", lambda: offset)
    fast_path.refresh(policy, schedule, 1000 * PERIOD + 30)
    for frame in (syn("198.18.1.2", VIP4), ACK4):
        assert run(namespace, fast_path, frame) == (XDP_PASS, frame, {("no_salt", 4): 1})
    fin = segment("198.18.1.2", VIP4, flags="FA")  # no cookie to check: forwarded
    assert run(namespace, fast_path, fin)[2] == {("forwarded", 4): 1}


@pytest.mark.parametrize("backend", [UNREACHABLE_BACKEND, UNRESOLVED_BACKEND])
def test_no_route_to_the_backend_goes_to_the_queue(monkeypatch, namespace, cookie_vectors, schedule, backend):
    unroutable = make_policy(cookie_vectors["vectors"], backends=(backend,))
    loaded = FastPath(build_object("front"))
    try:
        loaded.configure(unroutable, schedule)
        set_clock(monkeypatch, loaded, unroutable, schedule, 1000 * PERIOD + 30)
        assert run(namespace, loaded, ACK4) == (XDP_PASS, ACK4, {("unrouted", 4): 1})
    finally:
        loaded.close()


def test_a_syn_with_no_route_back_goes_to_the_queue(monkeypatch, namespace, fast_path, policy, schedule):
    set_clock(monkeypatch, fast_path, policy, schedule, 1000 * PERIOD + 30)
    frame = syn("203.0.113.7", VIP4)
    assert run(namespace, fast_path, frame) == (XDP_PASS, frame, {("unrouted", 4): 1})


def test_attached_natively_or_generically_never_over_another_program_and_detached_on_close(
        namespace, policy, schedule):
    loaded, other = FastPath(build_object("front")), BpfObject(build_object("xdp_pass"))
    with netns.inside(namespace):  # interface indexes are the namespace's: detach there too
        try:
            loaded.configure(policy, schedule)
            # auto: a veth gets generic XDP (its native XDP_TX needs a program on the peer); the loopback
            # has only the generic kind.
            assert loaded.attach_xdp([LINK, "lo"]) == {LINK: "generic", "lo": "generic"}
            assert "prog/xdp" in netns.run(namespace, ["ip", "link", "show", LINK]).stdout
            loaded.close()
            loaded = FastPath(build_object("front"))
            assert loaded.attach_xdp([LINK], "native") == {LINK: "native"}
            loaded.close()
            xdp_attach(socket.if_nametoindex(LINK), other.program_fd("xdp_pass"), XDP_FLAGS_DRV_MODE)
            loaded = FastPath(build_object("front"))
            with pytest.raises(FastPathError, match=f"attaching XDP to {LINK} failed"):
                loaded.attach_xdp([LINK], "native")
            xdp_detach(socket.if_nametoindex(LINK), XDP_FLAGS_DRV_MODE, other.program_fd("xdp_pass"))
        finally:
            other.close()
            loaded.close()
    for interface in (LINK, "lo"):
        assert "xdp" not in netns.run(namespace, ["ip", "link", "show", interface]).stdout


def test_a_program_a_killed_front_left_is_replaced(namespace, policy, schedule):
    """SIGKILL leaves the XDP program attached (docs/front.md); the next front takes its place."""
    dead, restarted = FastPath(build_object("front")), FastPath(build_object("front"))
    with netns.inside(namespace):
        ifindex = socket.if_nametoindex(LINK)
        try:
            dead.attach_xdp([LINK], "native")
            left = xdp_attached_program(ifindex)
            dead.xdp_attached.clear()  # as if the process had died: nothing detaches it
            dead.close()
            assert xdp_attached_program(ifindex) == left
            assert restarted.attach_xdp([LINK], "native") == {LINK: "native"}
            assert xdp_attached_program(ifindex)[0] == program_id(restarted.xdp_prog_fd) != left[0]
        finally:
            restarted.close()
        assert xdp_attached_program(ifindex) is None


def test_a_route_change_is_seen_within_the_route_cache_time(monkeypatch, namespace, cookie_vectors, schedule):
    single = make_policy(cookie_vectors["vectors"], backends=(BACKENDS[0],))
    loaded = FastPath(build_object("front"))
    try:
        loaded.configure(single, schedule)
        set_clock(monkeypatch, loaded, single, schedule, 1000 * PERIOD + 30)
        assert run(namespace, loaded, ACK4)[0] == XDP_REDIRECT
        netns.run(namespace, ["ip", "route", "add", "unreachable", f"{BACKENDS[0]}/32"])
        try:
            time.sleep(ROUTE_CACHE_SECONDS * 1.5)
            assert run(namespace, loaded, ACK4) == (XDP_PASS, ACK4, {("unrouted", 4): 1})
        finally:
            netns.run(namespace, ["ip", "route", "del", "unreachable", f"{BACKENDS[0]}/32"])
    finally:
        loaded.close()


def test_the_data_plane_is_chosen_as_configured_and_auto_says_why(namespace, policy, schedule):
    with netns.inside(namespace):
        assert default_route_interfaces() == (LINK,)  # the IPv4 and the IPv6 default route, one interface
        mode, loaded, xdp_modes, reason = fastpath.select("auto", (LINK,), "auto", policy, schedule)
        try:
            assert (mode, xdp_modes, reason) == ("xdp", {LINK: "generic"}, "auto: xdp loaded and attached")
            assert loaded.attached == [socket.if_nametoindex(LINK)]  # tc too: it answers SYNs XDP passes
        finally:
            loaded.close()
        other = BpfObject(build_object("xdp_pass"))
        try:  # someone else's XDP program: auto settles for tc, and says so
            xdp_attach(socket.if_nametoindex(LINK), other.program_fd("xdp_pass"), XDP_FLAGS_DRV_MODE)
            mode, loaded, xdp_modes, reason = fastpath.select("auto", (LINK,), "native", policy, schedule)
            loaded.close()
            assert (mode, xdp_modes) == ("tc", {})
            assert reason.startswith(f"auto: tc loaded and attached; xdp: attaching XDP to {LINK} failed")
            with pytest.raises(FastPathError, match=f"attaching XDP to {LINK} failed"):
                fastpath.select("xdp", (LINK,), "native", policy, schedule)
        finally:
            xdp_detach(socket.if_nametoindex(LINK), XDP_FLAGS_DRV_MODE, other.program_fd("xdp_pass"))
            other.close()
        assert fastpath.select("nfqueue", (LINK,), "auto", policy, schedule)[:3] == ("nfqueue", None, {})
        assert fastpath.select("auto", (), "auto", policy, schedule)[:3] == ("nfqueue", None, {})
        with pytest.raises(FastPathError, match="front.interfaces: no network interface 'nope' here"):
            fastpath.select("tc", ("nope",), "auto", policy, schedule)
