"""The front's tc fast path under BPF_PROG_TEST_RUN, against the Python handler it stands in for.

Every cookie vector's SYN must come out as the SYN-ACK handler.handle builds (same cookie, same bytes
but for the timestamp's TSval, which is the clock's), and every packet the program does not answer
must pass unchanged to the queue. The runs happen in a namespace of their own, where the program's
route lookups find a default route (and an unreachable prefix).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from synproxy import netns
from synproxy.bpf.libbpf import prog_test_run
from synproxy.bpf.loading import bpf_dir
from synproxy.front import fastpath
from synproxy.front.fastpath import FAMILIES, OUTCOMES, FastPath, FastPathError
from synproxy.front.handler import Action, FrontPolicy, handle
from synproxy.packet import SYN, build_tcp_packet, internet_checksum, parse_tcp, tcp_checksum_valid
from synproxy.salt import SaltSchedule
from tests.lab_fixtures import needs_root

pytestmark = needs_root
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
PERIOD = 60
VIP4, VIP6, PORT = "198.19.0.10", "2001:db8:ffff::10", 80
UNREACHABLE4 = "203.0.113.0/24"
HOST_MAC = "00:00:00:00:00:00"  # the test run's device is the loopback: this makes the frame ours


@pytest.fixture(scope="module")
def route_namespace():
    """A namespace with default routes (IPv4 and IPv6), an unreachable prefix, and forwarding on."""
    with netns.routed_namespace("fp") as name:
        netns.run(name, ["ip", "route", "add", "unreachable", UNREACHABLE4])
        yield name


@pytest.fixture(scope="module")
def policy(cookie_vectors):
    vips = {ipaddress.ip_address(v["daddr"]).packed for v in cookie_vectors["vectors"]}
    ports = {v["dport"] for v in cookie_vectors["vectors"]}
    return FrontPolicy(vips=frozenset(vips | {ipaddress.ip_address(VIP4).packed, ipaddress.ip_address(VIP6).packed}),
                       ports=frozenset(ports | {PORT}), farm_address=bytes(4), backends=(bytes(4),),
                       encap_port=6080, encap_key=bytes(16), flow_key=b"f" * 16)


@pytest.fixture(scope="module")
def schedule(cookie_vectors):
    return SaltSchedule((bytes.fromhex(cookie_vectors["secret"]),), period=PERIOD, skew=0)


def set_clock(monkeypatch, fast_path, policy, schedule, now: float) -> None:
    """Make the program's wall clock read ``now`` (its offset from CLOCK_TAI is the loader's to set)."""
    offset = round(now * 1e9) - time.clock_gettime_ns(time.CLOCK_TAI)
    monkeypatch.setattr(fastpath, "clock_offset_ns", lambda: offset)
    fast_path.refresh(policy, schedule, now)


def run(route_namespace: str, fast_path: FastPath, frame: bytes) -> tuple[int, bytes, dict]:
    """The verdict, the frame after, and the counters that moved."""
    before = fast_path.counts("tc")
    with netns.inside(route_namespace):
        verdict, out = prog_test_run(fast_path.prog_fd, frame)
    after = fast_path.counts("tc")
    return verdict, out, {key: after[key] - before[key] for key in after if after[key] != before[key]}


def syn(src: str, dst: str, sport: int = 40000, dport: int = PORT, seq: int = 1000, flags: str = "S",
        options=(("MSS", 1460), ("SAckOK", b""), ("Timestamp", (777, 0)), ("NOP", None), ("WScale", 7)),
        payload: bytes = b"", **ip_fields) -> bytes:
    layer = IP(src=src, dst=dst, **ip_fields) if ":" not in dst else IPv6(src=src, dst=dst, **ip_fields)
    segment = TCP(sport=sport, dport=dport, seq=seq, flags=flags, options=list(options))
    return raw(Ether(dst=HOST_MAC) / layer / segment / (Raw(payload) if payload else b""))


def vector_syn(vector: dict, timestamp: bool) -> bytes:
    options = []
    wanted = vector["syn"]
    if wanted["mss"] is not None:
        options.append(("MSS", wanted["mss"]))
    if wanted["sack"]:
        options.append(("SAckOK", b""))
    if timestamp:
        options.append(("Timestamp", (123456, 0)))
    if wanted["wscale"] is not None:
        options += [("NOP", None), ("WScale", wanted["wscale"])]
    return syn(vector["saddr"], vector["daddr"], vector["sport"], vector["dport"], vector["client_isn"],
               "SEC" if wanted["ecn"] else "S", options)


def without_clock(packet: bytes) -> bytes:
    """The IP packet with its TSval and TCP checksum zeroed: what must match byte for byte."""
    parsed = IP(packet) if packet[0] >> 4 == 4 else IPv6(packet)
    tcp = parsed[TCP]
    tcp.chksum = 0
    tcp.options = [(kind, (0, value[1]) if kind == "Timestamp" else value) for kind, value in tcp.options]
    return raw(parsed)


def assert_checksums_hold(packet: bytes) -> None:
    if packet[0] >> 4 == 4:
        assert internet_checksum(packet[:20]) == 0
    assert tcp_checksum_valid(packet, parse_tcp(packet))


@pytest.mark.parametrize("timestamp", [False, True])
def test_every_vector_gets_the_handlers_syn_ack(monkeypatch, route_namespace, fast_path, policy, schedule,
                                                cookie_vectors, timestamp):
    # The program's clock counts nanoseconds in 64 bits (to the year 2262): the vectors of epochs past
    # that (the 32-bit epoch wrap) are the backend's and the Python code's to check.
    vectors = [v for v in cookie_vectors["vectors"] if (v["epoch"] + 1) * PERIOD * 10**9 < 2**63]
    assert {v["family"] for v in vectors} == {4, 6} and len(vectors) > 100
    for vector in vectors:
        now = vector["epoch"] * PERIOD + PERIOD / 2
        set_clock(monkeypatch, fast_path, policy, schedule, now)
        frame = vector_syn(vector, timestamp)
        verdict, out, changed = run(route_namespace, fast_path, frame)
        family = vector["family"]
        assert (verdict, changed) == (TC_ACT_REDIRECT, {("syn_answered", family): 1}), vector["name"]
        answer = out[14:]
        assert parse_tcp(answer).seq == vector["cookie"], vector["name"]
        expected = handle(frame[14:], now, schedule, policy)
        assert expected.action is Action.REPLY
        assert without_clock(answer) == without_clock(expected.packet), vector["name"]
        assert_checksums_hold(answer)
        if timestamp:
            tsval = int.from_bytes(answer[answer.index(b"\x08\x0a") + 2:][:4], "big")
            assert abs(tsval - int(now * 1000) % 2**32) < 5000


def random_options(rng: random.Random) -> bytes:
    """Option bytes a fuzzer would send: known kinds with right and wrong lengths, NOPs, EOL, junk."""
    out = b""
    while len(out) < rng.randrange(0, 41):
        kind = rng.choice([0, 1, 2, 3, 4, 8, 5, 30, 254])
        if kind in (0, 1):
            out += bytes([kind])
            continue
        size = rng.choice([{2: 4, 3: 3, 4: 2, 8: 10}.get(kind, 6), rng.randrange(0, 12)])
        out += bytes([kind, size]) + bytes(rng.randrange(256) for _ in range(max(0, size - 2)))
    out = out[:40]
    return out + b"\x00" * (-len(out) % 4)


def answered_as_the_handler(route_namespace, fast_path, rng, options, now, schedule, policy) -> bool:
    """A SYN with ``options`` from a random port and ISN, of a random family, through the program: the
    handler's answer byte for byte, or the queue when the handler would not answer. True if answered."""
    family = rng.choice(FAMILIES)
    src, dst = ("198.18.1.2", VIP4) if family == 4 else ("2001:db8:1::2", VIP6)
    packet = build_tcp_packet(ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed,
                              rng.randrange(1, 65536), PORT, rng.randrange(2**32), 0, SYN, 64240, options)
    frame = raw(Ether(dst=HOST_MAC, type=0x0800 if family == 4 else 0x86DD)) + packet
    verdict, out, changed = run(route_namespace, fast_path, frame)
    expected = handle(packet, now, schedule, policy)
    if expected.action is Action.REPLY:
        assert verdict == TC_ACT_REDIRECT, options.hex()
        assert without_clock(out[14:]) == without_clock(expected.packet), options.hex()
        return True
    assert (verdict, out, changed) == (TC_ACT_OK, frame, {("queued", family): 1}), options.hex()
    return False


def test_random_options_are_answered_as_the_handler_would_or_left_to_the_queue(
        monkeypatch, route_namespace, fast_path, policy, schedule):
    rng = random.Random(6)
    now = 29000000 * PERIOD + 5
    set_clock(monkeypatch, fast_path, policy, schedule, now)
    answered = queued = 0
    for _ in range(400):
        options = random_options(rng)
        if answered_as_the_handler(route_namespace, fast_path, rng, options, now, schedule, policy):
            answered += 1
        else:
            queued += 1
    assert answered > 100 and queued > 100


# The layouts the program reads without its option walk (read_common_options in bpf/front.bpf.c):
# Linux's SYN, and Linux's without timestamps.
COMMON_LAYOUTS = {"Linux": "0204{mss:04x}0402080a{tsval:08x}00000000010303{wscale:02x}",
                  "Linux without timestamps": "0204{mss:04x}01010402010303{wscale:02x}"}


def layout(name: str, rng: random.Random) -> bytes:
    return bytes.fromhex(COMMON_LAYOUTS[name].format(mss=rng.randrange(65536), tsval=rng.randrange(2**32),
                                                     wscale=rng.randrange(256)))


@pytest.mark.parametrize("name", COMMON_LAYOUTS)
def test_the_common_option_layouts_and_their_near_misses_are_read_as_the_handler_reads_them(
        monkeypatch, route_namespace, fast_path, policy, schedule, name):
    """Any values in the layouts the program reads without its walk, and each layout with one byte
    changed (which the walk then reads, or the queue gets): the handler's answer, byte for byte."""
    rng = random.Random(name)
    now = 29000000 * PERIOD + 5
    set_clock(monkeypatch, fast_path, policy, schedule, now)
    answered = 0
    for case in range(300):
        options = layout(name, rng)
        if case % 2:
            at = rng.randrange(len(options))
            options = options[:at] + bytes([rng.choice([0, 1, 2, 3, 4, 8, 10, rng.randrange(256)])]) + options[at + 1:]
        answered += answered_as_the_handler(route_namespace, fast_path, rng, options, now, schedule, policy)
    assert answered > 150


@pytest.mark.parametrize("case, frame, outcome", [
    ("an ACK", syn("198.18.1.2", VIP4, flags="A"), "queued"),
    ("a SYN-ACK", syn("198.18.1.2", VIP4, flags="SA"), "queued"),
    ("a SYN with RST", syn("198.18.1.2", VIP4, flags="SR"), "queued"),
    ("a SYN with IP options", raw(Ether(dst=HOST_MAC) / IP(src="198.18.1.2", dst=VIP4, options=b"\x01\x01\x01\x00")
                                  / TCP(dport=PORT, flags="S")), "queued"),
    ("a SYN with a bad TCP checksum", raw(Ether(dst=HOST_MAC) / IP(src="198.18.1.2", dst=VIP4)
                                          / TCP(dport=PORT, flags="S", chksum=0x1234)), "unverified"),
    ("a SYN with a bad IP checksum", raw(Ether(dst=HOST_MAC) / IP(src="198.18.1.2", dst=VIP4, chksum=0x1234)
                                         / TCP(dport=PORT, flags="S")), "unverified"),
    ("a SYN to another address", syn("198.18.1.2", "198.19.0.99"), "not_protected"),
    ("a SYN to another port", syn("198.18.1.2", VIP4, dport=81), "not_protected"),
    ("an IPv6 SYN to another port", syn("2001:db8:1::2", VIP6, dport=81), "not_protected"),
])
def test_what_the_program_does_not_answer_passes_unchanged(route_namespace, fast_path, case, frame, outcome):
    verdict, out, changed = run(route_namespace, fast_path, frame)
    family = 6 if frame[12:14] == b"\x86\xdd" else 4
    assert (verdict, out, changed) == (TC_ACT_OK, frame, {(outcome, family): 1}), case


def test_a_frame_for_another_host_is_not_looked_at(route_namespace, fast_path):
    frame = raw(Ether(dst="02:00:00:00:00:01", type=0x0800)) + syn("198.18.1.2", VIP4)[14:]
    assert run(route_namespace, fast_path, frame) == (TC_ACT_OK, frame, {})


def test_without_the_current_epochs_salt_the_syn_goes_to_the_queue(monkeypatch, route_namespace, fast_path,
                                                                   policy, schedule):
    set_clock(monkeypatch, fast_path, policy, schedule, 1000 * PERIOD + 1)
    # The map holds epochs 1000 and 1001; a clock in epoch 1003 finds neither.
    offset = fastpath.clock_offset_ns() + 3 * PERIOD * 10**9
    monkeypatch.setattr(fastpath, "clock_offset_ns", lambda: offset)
    fast_path.refresh(policy, schedule, 1000 * PERIOD + 1)
    frame = syn("198.18.1.2", VIP4)
    assert run(route_namespace, fast_path, frame) == (TC_ACT_OK, frame, {("no_salt", 4): 1})


def test_a_syn_with_no_route_back_goes_the_kernels_way(monkeypatch, route_namespace, fast_path, policy, schedule):
    set_clock(monkeypatch, fast_path, policy, schedule, 1000 * PERIOD + 1)
    frame = syn("203.0.113.7", VIP4)
    assert run(route_namespace, fast_path, frame) == (TC_ACT_OK, frame, {("unrouted", 4): 1})


@pytest.mark.parametrize("case, frame", [
    ("IPv4 loopback source", syn("127.0.0.1", VIP4)),
    ("IPv4 zero-network source", syn("0.0.0.0", VIP4)),
    ("IPv4 multicast source", syn("224.0.0.9", VIP4)),
    ("IPv4 broadcast source", syn("255.255.255.255", VIP4)),
    ("IPv6 multicast source", syn("ff02::1", VIP6)),
    ("IPv6 loopback source", syn("::1", VIP6)),
    ("IPv6 unspecified source", syn("::", VIP6)),
    ("IPv6 IPv4-mapped source", syn("::ffff:198.18.1.2", VIP6)),
    ("IPv6 IPv4-mapped destination", syn("2001:db8:1::2", "::ffff:" + VIP4)),
    ("IPv6 EtherType, version 4", syn("2001:db8:1::2", VIP6)[:14] + b"\x40" + syn("2001:db8:1::2", VIP6)[15:]),
])
def test_what_the_kernel_refuses_is_left_to_it(monkeypatch, route_namespace, fast_path, policy, schedule, case,
                                               frame):
    set_clock(monkeypatch, fast_path, policy, schedule, 1000 * PERIOD + 1)
    assert run(route_namespace, fast_path, frame) == (TC_ACT_OK, frame, {}), case


def test_more_vips_than_the_map_holds_is_a_clear_error_and_any_number_of_ports_fits(
        monkeypatch, route_namespace, fast_path, policy, schedule):
    crowded = FrontPolicy(vips=frozenset(bytes([10, 0, n >> 8, n & 0xFF]) for n in range(1099)), ports=policy.ports,
                          farm_address=bytes(4), backends=(bytes(4),), encap_port=6080, encap_key=bytes(16),
                          flow_key=policy.flow_key)
    with pytest.raises(FastPathError, match="1099 VIPs: the fast path holds at most 1024"):
        fast_path.configure(crowded, schedule)
    # Every port has its element in protected_port_slots: a port past the per-VIP counters' slots is
    # answered, and no longer once a reload removes it.
    frame = syn("198.18.1.2", VIP4, dport=1099)
    for ports, outcome in ((frozenset(range(1, 1100)), "syn_answered"), (policy.ports, "not_protected")):
        reloaded = dataclasses.replace(policy, ports=ports)
        fast_path.configure(reloaded, schedule)
        set_clock(monkeypatch, fast_path, reloaded, schedule, 1000 * PERIOD + 1)
        assert run(route_namespace, fast_path, frame)[2] == {(outcome, 4): 1}


def test_counter_names_follow_the_programs_enum():
    header = (bpf_dir() / "synproxy.h").read_text()
    enum = header[header.index("enum front_counter"):]
    names = [line.split()[0].rstrip(",").removeprefix("FRONT_").lower()
             for line in enum[:enum.index("FRONT_COUNTER_MAX")].splitlines()[1:] if line.strip().startswith("FRONT_")]
    assert tuple(names) == OUTCOMES
