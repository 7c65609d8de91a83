"""The front's XDP program under BPF_PROG_TEST_RUN, against the Python handler it stands in for, and the
tc program wherever it forwards as XDP does (the `hook` fixture: both share the decisions).

Every packet to a protected VIP and port must come out as handler.handle's verdict, byte for byte
after the Ethernet header: handshake ACKs encapsulated flagged VALIDATED, every other segment
encapsulated unflagged to the handler's Maglev backend, SYNs answered with the handler's SYN-ACK
(TSval aside; the tc program's SYN-ACKs are tests/test_front_fastpath.py's); and every packet the
program leaves to the queue must pass unchanged and counted. The
runs happen in a namespace of their own, with routes to a backend subnet through a gateway whose
neighbour entry is permanent (XDP cannot resolve one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import random
import socket
import struct
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
)
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from synproxy import netns
from synproxy.bpf.libbpf import (
    XDP_FLAGS_DRV_MODE,
    BpfObject,
    prog_test_run,
    program_id,
    tc_attached_program,
    xdp_attach,
    xdp_attached_program,
    xdp_detach,
)
from synproxy.bpf.loading import MAP_KEY, build_object, per_cpu_token_bucket
from synproxy.front import fastpath
from synproxy.front.fastpath import FastPath, FastPathError
from synproxy.front.handler import Action, FrontPolicy, handle
from synproxy.maglev import PreviousOwners
from synproxy.netlink import default_route_interfaces
from synproxy.packet import (
    ACK,
    ECE,
    FIN,
    SYN,
    build_tcp_options,
    build_tcp_packet,
    parse_tcp,
    parse_tcp_options,
)
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
from tests.test_front_handler import icmp_error

pytestmark = needs_root
XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 1, 2, 3, 4
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
PASS = {"xdp": XDP_PASS, "tc": TC_ACT_OK}
REDIRECT = {"xdp": XDP_REDIRECT, "tc": TC_ACT_REDIRECT}
DROP = {"xdp": XDP_DROP, "tc": TC_ACT_SHOT}
XDP_MD = struct.Struct("=6I")  # struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue, egress
GATEWAY4, GATEWAY6, GATEWAY_MAC = "10.99.0.2", "fd00:99::2", "02:00:00:00:99:02"
FARM = "10.99.0.1"
BACKENDS = tuple(f"10.98.0.{host}" for host in (11, 12, 13, 14, 15, 16, 17))
UNREACHABLE_BACKEND = "192.0.2.9"     # an unreachable route
UNRESOLVED_BACKEND = "10.97.0.9"      # routed through a gateway without a neighbour entry
LINK = "fxa"
ROUTE_CACHE_SECONDS = 0.1  # ROUTE_CACHE_JIFFIES in bpf/front.bpf.c: at most 100 ms (HZ >= 100)


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
def fast_path(namespace, policy, schedule):
    """conftest's, with the route back to clients proved from the namespace's routing (the runs look
    routes up there), as a front proves it from its own: every SYN test runs the shortcut."""
    loaded = FastPath(build_object("front"))
    with netns.inside(namespace):
        loaded.watch_routes_back()
    loaded.configure(policy, schedule)
    yield loaded
    loaded.close()


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


@pytest.fixture(params=["xdp", "tc"])
def hook(request) -> str:
    """The program a forwarding test runs: the XDP one, and the tc one, which must forward alike."""
    return request.param


def run(namespace: str, fast_path: FastPath, frame: bytes, ingress: str | None = None,
        hook: str = "xdp") -> tuple[int, bytes, dict]:
    """The verdict, the frame after, and the counters that moved, of the `hook`'s program; the frame
    comes in on ``ingress`` (XDP only; the namespace's loopback by default)."""
    before = fast_path.counts(hook)
    with netns.inside(namespace):
        context = None
        if ingress is not None:
            context = XDP_MD.pack(0, len(frame), 0, socket.if_nametoindex(ingress), 0, 0)
        prog_fd = fast_path.xdp_prog_fd if hook == "xdp" else fast_path.prog_fd
        verdict, out = prog_test_run(prog_fd, frame, context=context)
    after = fast_path.counts(hook)
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


def assert_encapsulated(verdict: int, out: bytes, expected, link_mac: bytes, hook: str = "xdp") -> None:
    assert expected.action is Action.FORWARD
    assert verdict == REDIRECT[hook]
    assert out[:14] == bytes.fromhex(GATEWAY_MAC.replace(":", "")) + link_mac + b"\x08\x00"
    assert out[14:] == expected.packet


@pytest.mark.parametrize("shape", ["bare", "timestamp", "payload"])
def test_every_vectors_ack_is_encapsulated_validated_as_the_handler_does(
        hook, monkeypatch, namespace, link_mac, fast_path, policy, schedule, cookie_vectors, shape):
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
        verdict, out, changed = run(namespace, fast_path, frame, hook=hook)
        assert changed == {("validated", vector["family"]): 1}, vector["name"]
        assert_encapsulated(verdict, out, expected, link_mac, hook)


def test_a_wrong_cookie_is_forwarded_unflagged(hook, monkeypatch, namespace, link_mac, fast_path, policy, schedule,
                                                cookie_vectors):
    for vector in usable(cookie_vectors["vectors"])[:40]:
        now = vector["epoch"] * PERIOD + PERIOD / 2
        set_clock(monkeypatch, fast_path, policy, schedule, now)
        frame = vector_ack(vector, cookie_delta=1 << 12)  # the MAC's bits, not the epoch's
        expected = handle(frame[14:], now, schedule, policy)
        assert expected.outcome == "forwarded_bad_mac"
        verdict, out, changed = run(namespace, fast_path, frame, hook=hook)
        assert changed == {("forwarded_bad_mac", vector["family"]): 1}, vector["name"]
        assert_encapsulated(verdict, out, expected, link_mac, hook)


def test_random_established_packets_are_encapsulated_as_the_handler_does(
        hook, monkeypatch, namespace, link_mac, fast_path, policy, schedule):
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
        verdict, out, changed = run(namespace, fast_path, frame, hook=hook)
        assert changed == {(expected.outcome, family): 1}, case
        assert_encapsulated(verdict, out, expected, link_mac, hook)
        outcomes.add(expected.outcome)
    assert outcomes == {"forwarded", "forwarded_bad_mac", "forwarded_expired_epoch"}


def test_an_ethernet_pad_is_not_encapsulated(hook, monkeypatch, namespace, link_mac, fast_path, policy, schedule,
                                             cookie_vectors):
    vector = next(v for v in usable(cookie_vectors["vectors"]) if v["family"] == 4)
    now = vector["epoch"] * PERIOD + PERIOD / 2
    set_clock(monkeypatch, fast_path, policy, schedule, now)
    frame = vector_ack(vector)
    assert len(frame) == 54
    verdict, out, changed = run(namespace, fast_path, frame + bytes(6), hook=hook)  # padded to Ethernet's 60 bytes
    assert changed == {("validated", 4): 1}
    assert_encapsulated(verdict, out, handle(frame[14:], now, schedule, policy), link_mac, hook)


def test_the_maglev_choice_is_the_handlers_also_after_a_reordered_reload(
        hook, monkeypatch, namespace, cookie_vectors, schedule):
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
                _, out, _ = run(namespace, loaded, frame_of(packet), hook=hook)
                assert out[14 + 16:14 + 20] == current.backends[expected.backend] and out[14:] == expected.packet
                chosen.add(expected.backend)
            assert len(chosen) == len(BACKENDS)
    finally:
        loaded.close()


def test_a_moved_flow_names_its_former_owners_as_the_handler_does_until_the_window_ends(
        hook, monkeypatch, namespace, cookie_vectors, schedule):
    """A backend added, then a drain: each moved flow goes to its new owner and names its former owners in
    the header, byte for byte as handler.handle, and so do ICMP errors about such flows; once the window
    ends (and the loader rewrites the slots that expired) only the drained backend's flows keep naming it."""
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
                _, out, _ = run(namespace, loaded, frame_of(packet), hook=hook)
                assert out[14:] == expected.packet
                named.update((out[14 + 32:14 + 36], out[14 + 36:14 + 40]))
            none, drained = bytes(4), ipaddress.ip_address(BACKENDS[0]).packed
            assert named == [{none}, {none} | set(steps[0][0].backends), {none, drained}][step], step
            errors_named = set()
            for client_port in rng.sample(range(1, 65536), 100):
                frame = icmp_frame(rng.choice((4, 6)), client_port=client_port)
                expected = handle(frame[14:], now, schedule, current)
                _, out, _ = run(namespace, loaded, frame, hook=hook)
                assert expected.outcome == "icmp_forwarded" and out[14:] == expected.packet, step
                errors_named.update((out[14 + 32:14 + 36], out[14 + 36:14 + 40]))
            assert errors_named <= named and (errors_named != {none}) == (step > 0), step
    finally:
        loaded.close()


def test_a_flows_kept_hash_and_mac_follow_its_flags_and_its_maglev_slot_rewritten_in_place(
        hook, one_cpu, monkeypatch, namespace, link_mac, cookie_vectors, schedule):
    """Each CPU keeps a flow's flow hash and encapsulation MAC (bpf/front.bpf.c, flow_of): on one CPU, the
    same flows' packets stay the handler's bytes when only the flags change (a handshake ACK between
    unflagged ones) and when the loader rewrites their Maglev slots in place (former owners expired: no
    new generation)."""
    rng = random.Random(11)
    vectors = cookie_vectors["vectors"]
    loaded = FastPath(build_object("front"))
    try:
        policy = make_policy(vectors)
        loaded.configure(policy, schedule)
        for vector in usable(vectors)[:10]:
            now = vector["epoch"] * PERIOD + PERIOD / 2
            set_clock(monkeypatch, loaded, policy, schedule, now)
            for delta, outcome in ((1 << 12, "forwarded_bad_mac"), (0, "validated"), (1 << 12, "forwarded_bad_mac")):
                frame = vector_ack(vector, cookie_delta=delta)
                expected = handle(frame[14:], now, schedule, policy)
                verdict, out, changed = run(namespace, loaded, frame, hook=hook)
                assert changed == {(outcome, vector["family"]): 1}, vector["name"]
                assert_encapsulated(verdict, out, expected, link_mac, hook)
        previous = PreviousOwners(window=60.0)
        flows = [build_tcp_packet(bytes([rng.randrange(1, 127)]) + rng.randbytes(3), ipaddress.ip_address(VIP4).packed,
                                  rng.randrange(1, 65536), PORT, rng.randrange(2**32), 0, ACK, 1000)
                 for _ in range(200)]
        named = []
        for step, backends in enumerate((BACKENDS[:3], BACKENDS[:4], None)):
            if backends:
                current = dataclasses.replace(make_policy(vectors, backends=backends), previous=previous)
                previous.follow(current.owner_table(), current.draining_table(), current.down, float(step))
                loaded.configure(current, schedule)
            else:  # the window ends: the slots rewritten in place, the same generation
                assert previous.expire(step + 61.0)
                loaded.write_maglev(current)
            now = 1000 * PERIOD + 30
            set_clock(monkeypatch, loaded, current, schedule, now)
            for packet in flows * 2:  # the second time from the kept hash and MAC
                _, out, _ = run(namespace, loaded, frame_of(packet), hook=hook)
                assert out[14:] == handle(packet, now, schedule, current).packet, step
            named.append(sum(out[14 + 32:14 + 40] != bytes(8) for out in
                             (run(namespace, loaded, frame_of(packet), hook=hook)[1] for packet in flows)))
        assert named[0] == 0 and named[1] > 0 and named[2] == 0
    finally:
        loaded.close()


def test_no_cpus_copy_of_the_forwarding_element_or_salts_outlives_a_change_by_the_loader(
        hook, one_cpu, monkeypatch, namespace, link_mac, cookie_vectors, schedule):
    """Each CPU copies `forwarding` and `salts` and uses its copy while `config`'s generation stays (bpf/
    front.bpf.c, local_copy): on the same CPU, the first packet after a reload (other backends and keys)
    and after a secret rotation is already the new handler's, and so is a SYN's cookie."""
    vector = next(v for v in usable(cookie_vectors["vectors"]) if v["family"] == 4)
    now = vector["epoch"] * PERIOD + PERIOD / 2
    frame, syn_frame = vector_ack(vector), vector_syn(vector, True)
    first = make_policy(cookie_vectors["vectors"])
    reloaded = dataclasses.replace(make_policy(cookie_vectors["vectors"], backends=BACKENDS[:2]),
                                   encap_key=bytes(range(16, 32)), flow_key=b"another-flow-key")
    rotated = SaltSchedule((b"another secret, 32 bytes long...",), period=PERIOD, skew=2)
    loaded = FastPath(build_object("front"))
    try:
        for current, salts, outcome in ((first, schedule, "validated"), (reloaded, schedule, "validated"),
                                        (reloaded, rotated, "forwarded_bad_mac")):
            loaded.configure(current, salts)
            set_clock(monkeypatch, loaded, current, salts, now)
            expected = handle(frame[14:], now, salts, current)
            assert expected.outcome == outcome
            for _ in range(2):  # the run that copies the maps, and one from the copy
                verdict, out, _ = run(namespace, loaded, frame, hook=hook)
                assert_encapsulated(verdict, out, expected, link_mac, hook)
            if hook == "xdp":
                _, out, changed = run(namespace, loaded, syn_frame)
                assert changed == {("syn_answered", 4): 1}
                assert without_clock(out[14:]) == without_clock(handle(syn_frame[14:], now, salts, current).packet)
    finally:
        loaded.close()


def test_a_configuration_of_generation_0_leaves_every_packet_to_the_queue_uncounted(
        hook, one_cpu, monkeypatch, namespace, link_mac, cookie_vectors, policy, schedule):
    """Generation 0 names no copy: the loader never writes it (only a reader racing the configuration's
    first write could see it), and a program that copied the maps for every such packet (a loop over
    512 VIP slots) would do so unseen. The packet is passed on uncounted, as before any configuration;
    with the loader's generation back, the same ACK is forwarded."""
    vector = next(v for v in usable(cookie_vectors["vectors"]) if v["family"] == 4)
    now = vector["epoch"] * PERIOD + PERIOD / 2
    loaded = FastPath(build_object("front"))
    try:
        loaded.configure(policy, schedule)
        set_clock(monkeypatch, loaded, policy, schedule, now)
        written = loaded.config.lookup(MAP_KEY.pack(0))
        loaded.config.update(MAP_KEY.pack(0), fastpath._CONFIG.pack(*fastpath._CONFIG.unpack(written)[:-1], 0))
        for frame in (vector_ack(vector), vector_syn(vector, True)):
            assert run(namespace, loaded, frame, hook=hook) == (PASS[hook], frame, {})
        loaded.config.update(MAP_KEY.pack(0), written)
        verdict, out, _ = run(namespace, loaded, vector_ack(vector), hook=hook)
        assert_encapsulated(verdict, out, handle(vector_ack(vector)[14:], now, schedule, policy), link_mac, hook)
    finally:
        loaded.close()


def test_every_protected_vip_is_found_past_the_copys_table_and_none_after_a_reload_removes_it(
        hook, one_cpu, monkeypatch, namespace, link_mac, cookie_vectors, schedule):
    """Each CPU copies the protected VIPs into a table of 512 (bpf/front.bpf.c, protected_vip): 1000 VIPs
    overflow it and are all found (the rest in `protected_vips`), other addresses are not, and after a
    reload that keeps three of them the first packet to another one is not protected any more."""
    rng = random.Random(11)
    many = make_policy(cookie_vectors["vectors"])
    many = dataclasses.replace(many, vips=many.vips | {bytes([10, 1, n >> 8, n & 0xFF]) for n in range(1000 - len(many.vips))})
    kept = sorted(many.vips)[:3]
    few = dataclasses.replace(many, vips=frozenset(kept) | {ipaddress.ip_address(VIP4).packed})
    now = 1000 * PERIOD + 30
    monkeypatch.setattr(fastpath.time, "time", lambda: now)  # a reload within the epoch: the salts stay
    loaded = FastPath(build_object("front"))
    try:
        for current in (many, few):
            set_clock(monkeypatch, loaded, current, schedule, now)
            loaded.configure(current, schedule)
            v4 = [vip for vip in many.vips if len(vip) == 4]
            addresses = rng.sample(v4, 150) + kept[:1] + [bytes([10, 2, 0, n]) for n in range(1, 30)]
            for address in addresses:
                packet = build_tcp_packet(bytes([198, 18, 0, rng.randrange(1, 255)]), address, 40000, PORT, 7,
                                          5000, FIN | ACK, 1000)
                expected = handle(packet, now, schedule, current)
                verdict, out, changed = run(namespace, loaded, frame_of(packet), hook=hook)
                if address in current.vips:
                    assert changed == {("forwarded", 4): 1}, address
                    assert_encapsulated(verdict, out, expected, link_mac, hook)
                else:
                    assert (verdict, changed) == (PASS[hook], {("not_protected", 4): 1}), address
    finally:
        loaded.close()


def test_acks_around_an_epoch_boundary_are_judged_at_the_handlers_moments(
        hook, one_cpu, monkeypatch, namespace, fast_path, policy, schedule):
    """Just before and after each moment the handler's judgement changes (the boundary, and the skew's
    both ends), ACKs carrying cookies of the epochs around are judged as the handler judges them."""
    client, vip = ipaddress.ip_address("198.18.7.7").packed, ipaddress.ip_address(VIP4).packed
    boundary_epoch = 29000000
    acks = []
    for epoch in range(boundary_epoch - 2, boundary_epoch + 2):
        syn_packet = build_tcp_packet(client, vip, 40000, PORT, 1000, 0, SYN, 64240,
                                      build_tcp_options(1460, 7, True, None))
        cookie = parse_tcp(handle(syn_packet, epoch * PERIOD + PERIOD / 2, schedule, policy).packet).seq
        acks.append(build_tcp_packet(client, vip, 40000, PORT, 1001, (cookie + 1) % 2**32, ACK, 502))
    skew, boundary = schedule.skew, boundary_epoch * PERIOD
    moments = [boundary + offset for offset in (-PERIOD / 2, -skew - 0.2, -skew + 0.2, -0.2, 0.2, skew - 0.2,
                                                skew + 0.2, PERIOD - skew - 0.2, PERIOD - skew + 0.2)]
    judged = set()
    for now in moments:
        set_clock(monkeypatch, fast_path, policy, schedule, now)
        for ack in acks:
            expected = handle(ack, now, schedule, policy)
            _, out, changed = run(namespace, fast_path, frame_of(ack), hook=hook)
            assert changed == {(expected.outcome, 4): 1}, (now - boundary, parse_tcp(ack).ack)
            assert out[14:] == expected.packet
            judged.add(expected.outcome)
    assert judged == {"validated", "forwarded_expired_epoch"}


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


def test_without_sack_and_ecn_configured_the_syn_ack_is_the_handlers_and_offers_neither(
        monkeypatch, namespace, fast_path, policy, schedule, cookie_vectors):
    quiet = dataclasses.replace(policy, sack=False, ecn=False)
    for vector in usable(cookie_vectors["vectors"]):
        now = vector["epoch"] * PERIOD + PERIOD / 2
        set_clock(monkeypatch, fast_path, quiet, schedule, now)
        frame = vector_syn(vector, True)
        verdict, out, _ = run(namespace, fast_path, frame)
        expected = handle(frame[14:], now, schedule, quiet)
        assert verdict == XDP_REDIRECT and without_clock(out[14:]) == without_clock(expected.packet), vector["name"]
        segment = parse_tcp(expected.packet)
        assert not segment.flags & ECE and not parse_tcp_options(segment.raw_options)[2], vector["name"]
    set_clock(monkeypatch, fast_path, policy, schedule, now)


@pytest.mark.parametrize("knob, option", [("timestamps", 3), ("window_scaling", 1)])  # parse_tcp_options' index
def test_an_option_configured_off_leaves_the_syn_ack_the_handlers_and_without_it(
        hook, monkeypatch, namespace, fast_path, policy, schedule, cookie_vectors, knob, option):
    """`timestamps: false` / `window_scaling: false` (a backend with tcp_timestamps / tcp_window_scaling
    0): both programs answer a client offering the option, IPv4 and IPv6, as the handler does: without
    it, and with a cookie that records no window scale."""
    configured_off = dataclasses.replace(policy, **{knob: False})
    vectors = [vector for vector in usable(cookie_vectors["vectors"])
               if knob == "timestamps" or vector["syn"]["wscale"] is not None]
    assert {vector["family"] for vector in vectors} == {4, 6}
    for vector in vectors:
        now = vector["epoch"] * PERIOD + PERIOD / 2
        set_clock(monkeypatch, fast_path, configured_off, schedule, now)
        frame = vector_syn(vector, True)
        verdict, out, _ = run(namespace, fast_path, frame, hook=hook)
        expected = handle(frame[14:], now, schedule, configured_off)
        assert verdict == REDIRECT[hook], vector["name"]
        assert without_clock(out[14:]) == without_clock(expected.packet), vector["name"]
        assert parse_tcp_options(parse_tcp(out[14:]).raw_options)[option] is None, vector["name"]
    set_clock(monkeypatch, fast_path, policy, schedule, now)


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
def test_what_the_program_does_not_handle_passes_unchanged(hook, monkeypatch, namespace, fast_path, policy, schedule,
                                                           case, frame, outcome):
    set_clock(monkeypatch, fast_path, policy, schedule, 1000 * PERIOD + 30)
    family = 6 if frame[12:14] == b"\x86\xdd" else 4
    assert run(namespace, fast_path, frame, hook=hook) == (PASS[hook], frame, {(outcome, family): 1}), case


def test_a_validating_ack_with_a_bad_checksum_goes_to_the_queue(hook, monkeypatch, namespace, fast_path, policy,
                                                                schedule, cookie_vectors):
    vector = usable(cookie_vectors["vectors"])[0]
    now = vector["epoch"] * PERIOD + PERIOD / 2
    set_clock(monkeypatch, fast_path, policy, schedule, now)
    good = vector_ack(vector, payload=b"data")
    offset = 14 + (20 if vector["family"] == 4 else 40) + 16
    frame = frame_with(good, offset, bytes([good[offset] ^ 0xFF]))
    assert handle(frame[14:], now, schedule, policy).outcome == "malformed_bad_checksum"
    assert run(namespace, fast_path, frame, hook=hook) == (PASS[hook], frame, {("unverified", vector["family"]): 1})


SK_BUFF_SIZE, GSO_SEGS_OFFSET = 192, 164  # struct __sk_buff and its gso_segs (<linux/bpf.h>)


def test_a_merged_gso_packet_goes_to_the_queue_at_tc(monkeypatch, namespace, fast_path, policy, schedule):
    """GRO may merge a flow's segments into one skb before tc sees it; the queue hands the handler one
    segment at a time, so the tc program leaves such a packet to it."""
    now = 1000 * PERIOD + 30
    set_clock(monkeypatch, fast_path, policy, schedule, now)
    frame = segment("198.18.1.2", VIP4, payload=bytes(1000))
    unmerged = handle(frame[14:], now, schedule, policy).outcome
    context = bytearray(SK_BUFF_SIZE)
    struct.pack_into("=I", context, GSO_SEGS_OFFSET, 2)
    before = fast_path.counts("tc")
    with netns.inside(namespace):
        assert prog_test_run(fast_path.prog_fd, frame, context=bytes(context)) == (TC_ACT_OK, frame)
        assert prog_test_run(fast_path.prog_fd, frame)[0] == TC_ACT_REDIRECT  # the same, not merged
    after = fast_path.counts("tc")
    assert {key: after[key] - before[key] for key in after if after[key] != before[key]} == {
        ("queued", 4): 1, (unmerged, 4): 1}


def test_a_multicast_frame_is_not_looked_at(namespace, fast_path):
    frame = b"\x01\x00\x5e\x00\x00\x01" + ACK4[6:]
    assert run(namespace, fast_path, frame) == (XDP_PASS, frame, {})


def test_without_the_current_epochs_salt_syns_and_acks_go_to_the_queue(hook, monkeypatch, namespace, fast_path,
                                                                       policy, schedule):
    set_clock(monkeypatch, fast_path, policy, schedule, 1000 * PERIOD + 30)
    # The map holds epochs 998-1001; a clock in epoch 1003 finds none to mint with, and cannot tell an
    # ACK's expired cookie from a salt the stalled front process did not write.
    offset = fastpath.clock_offset_ns() + 3 * PERIOD * 10**9
    monkeypatch.setattr(fastpath, "clock_offset_ns", lambda: offset)
    fast_path.refresh(policy, schedule, 1000 * PERIOD + 30)
    for frame in (syn("198.18.1.2", VIP4), ACK4):
        assert run(namespace, fast_path, frame, hook=hook) == (PASS[hook], frame, {("no_salt", 4): 1})
    fin = segment("198.18.1.2", VIP4, flags="FA")  # no cookie to check: forwarded
    assert run(namespace, fast_path, fin, hook=hook)[2] == {("forwarded", 4): 1}


@pytest.mark.parametrize("backend", [UNREACHABLE_BACKEND, UNRESOLVED_BACKEND])
def test_no_route_to_the_backend_goes_to_the_queue(hook, monkeypatch, namespace, cookie_vectors, schedule, backend):
    unroutable = make_policy(cookie_vectors["vectors"], backends=(backend,))
    loaded = FastPath(build_object("front"))
    try:
        loaded.configure(unroutable, schedule)
        set_clock(monkeypatch, loaded, unroutable, schedule, 1000 * PERIOD + 30)
        assert run(namespace, loaded, ACK4, hook=hook) == (PASS[hook], ACK4, {("unrouted", 4): 1})
    finally:
        loaded.close()


def test_a_syn_with_no_route_back_goes_to_the_queue(monkeypatch, namespace, fast_path, policy, schedule):
    set_clock(monkeypatch, fast_path, policy, schedule, 1000 * PERIOD + 30)
    frame = syn("203.0.113.7", VIP4)
    assert run(namespace, fast_path, frame) == (XDP_PASS, frame, {("unrouted", 4): 1})


OTHER_GATEWAY4, OTHER_GATEWAY6, OTHER_MAC = "10.99.0.4", "fd00:99::4", "02:00:00:00:99:04"


@contextlib.contextmanager
def routed(namespace: str, *routes: tuple[str, ...]):
    """The namespace with ``routes`` (`ip route` arguments) added, and the other gateway's neighbours, for the
    body; the module's routing again after."""
    for gateway in (OTHER_GATEWAY4, OTHER_GATEWAY6):
        netns.run(namespace, ["ip", "neigh", "replace", gateway, "lladdr", OTHER_MAC, "dev", LINK, "nud", "permanent"])
    added = []
    try:
        for route in routes:
            netns.run(namespace, ["ip", "route", "add", *route])
            added.append(route)
        yield
    finally:
        for route in reversed(added):
            netns.run(namespace, ["ip", "route", "del", *route])


PROVED_AT = 1000 * PERIOD + 30


def next_hop_of(namespace: str, fast_path: FastPath, frame: bytes, hook: str, policy, schedule) -> str:
    """The gateway the SYN-ACK to ``frame``'s SYN was sent to (by MAC), once checked to be the handler's."""
    verdict, out, changed = run(namespace, fast_path, frame, hook=hook)
    family = 4 if frame[12:14] == b"\x08\x00" else 6
    assert (verdict, changed) == (REDIRECT[hook], {("syn_answered", family): 1})
    assert without_clock(out[14:]) == without_clock(handle(frame[14:], PROVED_AT, schedule, policy).packet)
    return {GATEWAY_MAC: "default", OTHER_MAC: "other"}[":".join(f"{byte:02x}" for byte in out[:6])]


def refreshed(monkeypatch, fast_path, policy, schedule) -> None:
    """A refresh, as the front's housekeeping makes one: the control plane reads the routing's changes."""
    set_clock(monkeypatch, fast_path, policy, schedule, PROVED_AT)


def test_every_client_gets_the_next_hop_its_route_gives_default_routed_or_not(hook, monkeypatch, namespace,
                                                                                fast_path, policy, schedule):
    """Default-routed clients take the proof's shortcut, clients of another route (a gateway of its own)
    their own lookup: each SYN-ACK the handler's, to the gateway `ip route get` names."""
    with routed(namespace, ("198.51.100.0/24", "via", OTHER_GATEWAY4), ("2001:db8:5::/48", "via", OTHER_GATEWAY6)):
        refreshed(monkeypatch, fast_path, policy, schedule)
        assert {family: proof.refused for family, proof in fast_path.proofs.items()} == {4: "", 6: ""}
        assert ipaddress.ip_network("198.51.100.0/24") in fast_path.proofs[4].exceptions
        for _ in range(2):  # the probe's lookup, then the cached one
            for client, dst, gateway in (("198.18.1.2", VIP4, "default"), ("198.51.100.7", VIP4, "other"),
                                         ("2001:db8:1::2", VIP6, "default"), ("2001:db8:5::9", VIP6, "other")):
                assert next_hop_of(namespace, fast_path, syn(client, dst), hook, policy, schedule) == gateway, client
    refreshed(monkeypatch, fast_path, policy, schedule)


def test_a_route_added_for_a_default_routed_client_is_followed_once_the_control_plane_refreshed(
        hook, monkeypatch, namespace, fast_path, policy, schedule):
    """The programs answer from the proof (no lookup for the client) until the next refresh reads the
    change (the front's housekeeping, every 0.5 s: the staleness docs/front.md states); then the new route."""
    refreshed(monkeypatch, fast_path, policy, schedule)
    moved4, moved6, stayed = syn("198.18.7.7", VIP4), syn("2001:db8:7::7", VIP6), syn("198.18.1.2", VIP4)
    for frame in (moved4, moved6):
        assert next_hop_of(namespace, fast_path, frame, hook, policy, schedule) == "default"
    with routed(namespace, ("198.18.7.0/24", "via", OTHER_GATEWAY4), ("2001:db8:7::/48", "via", OTHER_GATEWAY6)):
        for frame in (moved4, moved6):
            assert next_hop_of(namespace, fast_path, frame, hook, policy, schedule) == "default"  # not yet read
        refreshed(monkeypatch, fast_path, policy, schedule)
        for frame, gateway in ((moved4, "other"), (moved6, "other"), (stayed, "default")):
            assert next_hop_of(namespace, fast_path, frame, hook, policy, schedule) == gateway
    refreshed(monkeypatch, fast_path, policy, schedule)
    assert next_hop_of(namespace, fast_path, moved4, hook, policy, schedule) == "default"


def test_a_new_default_gateway_unresolved_is_left_as_without_the_shortcut(hook, monkeypatch, namespace, fast_path,
                                                                          policy, schedule):
    """The default route moved to a gateway without a neighbour entry: the kept next hop is dropped at the
    refresh (a new proof), the probe's lookup finds no neighbour and is not kept, and the client's own
    lookup decides as before: XDP passes the SYN to the queue (no bpf_redirect_neigh), tc answers it
    through bpf_redirect_neigh."""
    frame = syn("198.18.1.2", VIP4)
    refreshed(monkeypatch, fast_path, policy, schedule)
    assert next_hop_of(namespace, fast_path, frame, hook, policy, schedule) == "default"  # kept
    netns.run(namespace, ["ip", "route", "replace", "default", "via", "10.99.0.3"])  # no neighbour entry
    try:
        refreshed(monkeypatch, fast_path, policy, schedule)
        assert fast_path.proofs[4].next_hop.startswith("10.99.0.3 ")
        verdict, out, changed = run(namespace, fast_path, frame, hook=hook)
        if hook == "xdp":
            assert (verdict, out, changed) == (XDP_PASS, frame, {("unrouted", 4): 1})
        else:
            assert (verdict, changed) == (TC_ACT_REDIRECT, {("syn_answered", 4): 1})
            assert without_clock(out[14:]) == without_clock(handle(frame[14:], PROVED_AT, schedule, policy).packet)
    finally:
        netns.run(namespace, ["ip", "route", "replace", "default", "via", GATEWAY4])
    refreshed(monkeypatch, fast_path, policy, schedule)
    assert next_hop_of(namespace, fast_path, frame, hook, policy, schedule) == "default"


@pytest.mark.parametrize("change, refused", [
    ((["ip", "rule", "add", "to", "198.18.0.0/16", "lookup", "100", "pref", "100"],
      ["ip", "route", "add", "default", "via", OTHER_GATEWAY4, "table", "100"]), "policy rules"),
    ((["ip", "route", "replace", "default", "nexthop", "via", GATEWAY4, "nexthop", "via", OTHER_GATEWAY4],),
     "not a unicast route via one gateway"),
], ids=["custom rule", "multipath default"])
def test_no_shortcut_with_a_custom_rule_or_a_multipath_default(hook, monkeypatch, namespace, fast_path, policy,
                                                                schedule, change, refused):
    """Where the kernel's answer may depend on more than the destination's prefix, every SYN is looked up:
    the rule's own gateway is taken at once."""
    undo = {"rule": [["ip", "route", "flush", "table", "100"], ["ip", "rule", "del", "pref", "100"]],
            "route": [["ip", "route", "replace", "default", "via", GATEWAY4]]}["rule" if "rule" in change[0] else "route"]
    with routed(namespace):
        try:
            for command in change:
                netns.run(namespace, command)
            refreshed(monkeypatch, fast_path, policy, schedule)
            assert refused in fast_path.proofs[4].refused and not fast_path.proofs[6].refused
            gateways = {next_hop_of(namespace, fast_path, syn(f"198.18.1.{host}", VIP4), hook, policy, schedule)
                        for host in range(2, 18)}  # the multipath hash: the addresses
            assert gateways == ({"other"} if refused == "policy rules" else {"default", "other"})
        finally:
            for command in undo:
                netns.run(namespace, command)
    refreshed(monkeypatch, fast_path, policy, schedule)
    assert not fast_path.proofs[4].refused


def test_syn_reply_ingress_answers_the_sender_without_a_route_lookup(hook, monkeypatch, namespace, cookie_vectors,
                                                                    schedule):
    """front.syn_reply: ingress: the SYN-ACK goes back out of the interface the SYN came in by, to the
    neighbour that sent it (the Ethernet addresses swapped), even for a source no route leads back to;
    its IP packet is still the handler's."""
    replying = dataclasses.replace(make_policy(cookie_vectors["vectors"]), syn_reply="ingress")
    sender = bytes.fromhex("02c0ffee0001")
    vector6 = next(v for v in usable(cookie_vectors["vectors"]) if v["family"] == 6)
    loaded = FastPath(build_object("front"))
    try:
        loaded.configure(replying, schedule)
        for now, frame in ((1000 * PERIOD + 30, syn("203.0.113.7", VIP4)),
                           (vector6["epoch"] * PERIOD + PERIOD / 2, vector_syn(vector6, True))):
            set_clock(monkeypatch, loaded, replying, schedule, now)
            frame = frame[:6] + sender + frame[12:]
            family = 4 if frame[12:14] == b"\x08\x00" else 6
            verdict, out, changed = run(namespace, loaded, frame, hook=hook)
            assert (verdict, changed) == ({"xdp": XDP_TX, "tc": TC_ACT_REDIRECT}[hook], {("syn_answered", family): 1})
            assert out[:12] == sender + frame[:6]
            expected = handle(frame[14:], now, schedule, replying)
            assert expected.action is Action.REPLY
            assert without_clock(out[14:]) == without_clock(expected.packet)
    finally:
        loaded.close()


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


def test_every_start_removes_the_programs_a_killed_front_left(namespace, policy, schedule):
    """Whatever the next front's data plane: nfqueue attaches nothing, tc no XDP program, and a dead
    front's would keep answering from its stale maps (docs/front.md)."""
    with netns.inside(namespace):
        ifindex = socket.if_nametoindex(LINK)
        for next_mode in ("nfqueue", "tc"):
            dead, _ = fastpath.start("xdp", (LINK,), "native", policy, schedule)
            dead.attached.clear()  # as if the process had died: nothing detaches them
            dead.xdp_attached.clear()
            dead.close()
            assert xdp_attached_program(ifindex) and tc_attached_program(ifindex, fastpath.TC_HANDLE,
                                                                          fastpath.TC_PRIORITY)
            mode, loaded, _, _ = fastpath.select(next_mode, (LINK,), "native", policy, schedule)
            try:
                assert mode == next_mode and xdp_attached_program(ifindex) is None
                tc_program = tc_attached_program(ifindex, fastpath.TC_HANDLE, fastpath.TC_PRIORITY)
                assert tc_program == (program_id(loaded.prog_fd) if loaded else None)
            finally:
                if loaded:
                    loaded.close()


def test_a_route_change_is_seen_within_the_route_cache_time(hook, monkeypatch, namespace, cookie_vectors, schedule):
    single = make_policy(cookie_vectors["vectors"], backends=(BACKENDS[0],))
    loaded = FastPath(build_object("front"))
    try:
        loaded.configure(single, schedule)
        set_clock(monkeypatch, loaded, single, schedule, 1000 * PERIOD + 30)
        assert run(namespace, loaded, ACK4, hook=hook)[0] == REDIRECT[hook]
        netns.run(namespace, ["ip", "route", "add", "unreachable", f"{BACKENDS[0]}/32"])
        try:
            time.sleep(ROUTE_CACHE_SECONDS * 1.5)
            assert run(namespace, loaded, ACK4, hook=hook) == (PASS[hook], ACK4, {("unrouted", 4): 1})
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


ICMP_KINDS = [(4, ICMP(type=3, code=4, nexthopmtu=1280)), (4, ICMP(type=3, code=3)), (4, ICMP(type=11)),
              (6, ICMPv6PacketTooBig(mtu=1280)), (6, ICMPv6DestUnreach(code=4)), (6, ICMPv6TimeExceeded())]


def icmp_frame(family: int, kind=None, **fields) -> bytes:
    return frame_of(icmp_error(family, kind, **{"vip": VIP4 if family == 4 else VIP6, "sport": PORT, **fields}))


@pytest.mark.parametrize("family, kind", ICMP_KINDS, ids=["frag needed", "port unreachable", "time exceeded",
                                                          "v6 too big", "v6 unreachable", "v6 time exceeded"])
def test_an_icmp_error_about_a_flow_is_encapsulated_as_the_handler_does(
        hook, monkeypatch, namespace, link_mac, fast_path, policy, schedule, family, kind):
    now = 1000 * PERIOD + 30
    set_clock(monkeypatch, fast_path, policy, schedule, now)
    rng = random.Random(family)
    backends = set()
    for client_port in [40000] + [rng.randrange(1, 65536) for _ in range(60)]:
        frame = icmp_frame(family, kind, client_port=client_port)
        expected = handle(frame[14:], now, schedule, policy)
        assert expected.outcome == "icmp_forwarded"
        verdict, out, changed = run(namespace, fast_path, frame, hook=hook)
        assert changed == {("icmp_forwarded", family): 1}
        assert_encapsulated(verdict, out, expected, link_mac, hook)
        backends.add(expected.backend)
    assert len(backends) > 3  # spread as the flows are


@pytest.mark.parametrize("frame, outcome", [
    (icmp_frame(4, sport=PORT + 1), "icmp_not_protected"),
    (icmp_frame(6, sport=PORT + 1), "icmp_not_protected"),
    (icmp_frame(4, destination="198.19.0.10", vip="198.19.0.99"), "icmp_not_protected"),
], ids=["another port", "v6 another port", "sent elsewhere than its quoted sender"])
def test_an_icmp_error_about_another_flow_is_dropped_as_the_handler_does(
        hook, monkeypatch, namespace, fast_path, policy, schedule, frame, outcome):
    set_clock(monkeypatch, fast_path, policy, schedule, 1000 * PERIOD + 30)
    assert handle(frame[14:], 0, schedule, policy).outcome == outcome
    family = 6 if frame[12:14] == b"\x86\xdd" else 4
    assert run(namespace, fast_path, frame, hook=hook)[::2] == (DROP[hook], {(outcome, family): 1})


# What the program passes, what it counts, and what the handler then does (None: the kernel drops it first).
# Not an ICMP error, to a VIP: the rules do not queue it, the VIP's blackhole route drops it uncounted, so
# the program counts it `not_protected`.
ICMP_PASSED = [
    ("an echo request", frame_of(raw(IP(src="198.18.1.1", dst=VIP4) / ICMP(type=8) / b"ping")), {("not_protected", 4): 1},
     "malformed_not_icmp_error"),
    ("a UDP datagram", frame_of(raw(IP(src="198.18.1.1", dst=VIP4) / UDP(dport=PORT) / b"data")),
     {("not_protected", 4): 1}, None),
    ("quoting a UDP datagram", frame_of(raw(IP(src="198.18.1.1", dst=VIP4) / ICMP(type=3, code=4)
                                            / raw(IP(src=VIP4, dst="198.18.1.2") / UDP()))), {},
     "malformed_bad_quoted_packet"),
    ("quoting too little", icmp_frame(4, quoted_bytes=27), {}, "malformed_bad_quoted_packet"),
    ("to another address", frame_of(icmp_error(4, vip="198.19.0.99", sport=PORT)), {}, "icmp_not_protected"),
    ("longer than the farm MTU takes", icmp_frame(6, quoted_bytes=1500 - 40 - 8 - 39), {("too_big", 6): 1},
     "icmp_too_big"),
    ("a bad IPv4 header checksum", frame_with(icmp_frame(4), 14 + 10, b"\x12\x34"), {("unverified", 4): 1}, None),
]


@pytest.mark.parametrize("case, frame, changed, handler_outcome", ICMP_PASSED, ids=[case[0] for case in ICMP_PASSED])
def test_icmp_the_program_does_not_forward_passes_unchanged(hook, monkeypatch, namespace, fast_path, policy,
                                                           schedule, case, frame, changed, handler_outcome):
    set_clock(monkeypatch, fast_path, policy, schedule, 1000 * PERIOD + 30)
    if handler_outcome:
        assert handle(frame[14:], 0, schedule, policy)[:3:2] == (Action.DROP, handler_outcome), case
    assert run(namespace, fast_path, frame, hook=hook) == (PASS[hook], frame, changed), case


@pytest.mark.parametrize("source", ["127.0.0.1", "0.1.2.3", "224.0.0.9", "255.255.255.255", "::1", "ff02::1", "::",
                                    "::ffff:198.18.1.2"])
def test_udp_and_echoes_from_a_source_the_kernel_refuses_pass_uncounted_as_tcp_does(
        hook, monkeypatch, namespace, fast_path, policy, schedule, source):
    """The kernel drops these as martians (or answers none), so the programs leave them to it uncounted,
    TCP to another port of the VIP as much as UDP or an echo request (the rules queue none of them).
    Before: UDP and echo requests from such a source counted `not_protected` (other_to_vip had no
    addresses_refused), TCP did not."""
    set_clock(monkeypatch, fast_path, policy, schedule, 1000 * PERIOD + 30)
    vip, layer, echo = (VIP4, IP, ICMP(type=8)) if "." in source and ":" not in source else (VIP6, IPv6, ICMPv6EchoRequest())
    frames = [frame_of(raw(layer(src=source, dst=vip) / UDP(dport=PORT) / b"data")),
              frame_of(raw(layer(src=source, dst=vip) / echo / b"ping")), segment(source, vip, dport=PORT + 1)]
    for frame in frames:
        assert run(namespace, fast_path, frame, hook=hook) == (PASS[hook], frame, {}), frame.hex()


def test_what_tc_leaves_to_the_queue_beyond_its_budget_is_dropped_and_counted(monkeypatch, namespace, fast_path, policy,
                                                                              schedule, one_cpu):
    """front.queue_packets_per_second, 3 a second on the one CPU the test runs on: of the SYN-ACKs (the
    handler's invalid_flags) the tc program, the last hook before the queue, passes 3 unchanged and drops
    the next 5, counted queue_rate_limited; 0.4 s later it passes one more, a fragment then (the handler's
    malformed_fragment). The XDP program passes them all: the tc program decides alike after it, so each
    takes one token, at tc."""
    set_clock(monkeypatch, fast_path, policy, schedule, 1000 * PERIOD + 30)
    syn_ack = segment("198.18.1.2", VIP4, flags="SA")
    fragment = raw(Ether(dst=HOST_MAC) / IP(src="198.18.1.2", dst=VIP4, flags="MF") / TCP(dport=PORT, flags="A"))
    assert [handle(frame[14:], 0, schedule, policy).outcome for frame in (syn_ack, fragment)] == [
        "invalid_flags", "malformed_fragment"]
    fast_path.queue_limit.update(MAP_KEY.pack(0), struct.pack("=QQ", 10**9 // 3, 10**9))
    try:
        at_xdp = run(namespace, fast_path, syn_ack, hook="xdp")
        outcomes = [run(namespace, fast_path, syn_ack, hook="tc") for _ in range(8)]
        time.sleep(0.4)
        later = [run(namespace, fast_path, frame, hook="tc") for frame in (fragment, fragment)]
    finally:
        fast_path.configure(policy, schedule)
    assert at_xdp == (XDP_PASS, syn_ack, {("queued", 4): 1})
    assert outcomes[:3] == [(TC_ACT_OK, syn_ack, {("queued", 4): 1})] * 3
    assert [outcome[::2] for outcome in outcomes[3:]] == [(TC_ACT_SHOT, {("queue_rate_limited", 4): 1})] * 5
    assert later[0] == (TC_ACT_OK, fragment, {("unparsed", 4): 1})
    assert later[1][::2] == (TC_ACT_SHOT, {("queue_rate_limited", 4): 1})


def test_the_queue_budget_is_the_policys_shared_out_between_the_cpus(namespace, fast_path, policy, schedule):
    """configure() writes front.queue_packets_per_second (FrontPolicy.queue_packets_per_second) as each
    CPU's share, as the ICMP budget; 0, a policy without one, writes no limit."""
    try:
        fast_path.configure(dataclasses.replace(policy, queue_packets_per_second=20_000), schedule)
        written = fast_path.queue_limit.lookup(MAP_KEY.pack(0))
    finally:
        fast_path.configure(policy, schedule)
    assert struct.unpack("=QQ", written) == per_cpu_token_bucket(20_000, os.cpu_count() or 1)
    assert fast_path.queue_limit.lookup(MAP_KEY.pack(0)) == bytes(16)


def test_icmp_errors_beyond_the_budget_are_dropped_and_counted(monkeypatch, namespace, fast_path, policy, schedule,
                                                               one_cpu):
    """A budget of 3 errors a second on the one CPU the test runs on: 3 pass, the next 5 are dropped, and
    0.4 s later one more passes."""
    set_clock(monkeypatch, fast_path, policy, schedule, 1000 * PERIOD + 30)
    fast_path.icmp_limit.update(MAP_KEY.pack(0), struct.pack("=QQ", 10**9 // 3, 10**9))
    try:
        outcomes = [run(namespace, fast_path, icmp_frame(4))[2] for _ in range(8)]
        time.sleep(0.4)
        later = run(namespace, fast_path, icmp_frame(4))[2]
    finally:
        fast_path.configure(policy, schedule)
    assert outcomes == [{("icmp_forwarded", 4): 1}] * 3 + [{("icmp_rate_limited", 4): 1}] * 5
    assert later == {("icmp_forwarded", 4): 1}
