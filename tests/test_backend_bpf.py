"""The backend program under BPF_PROG_TEST_RUN (loaded, not attached): the cookie and encapsulation
vectors of both families and every verdict, read from its counters and its output packet."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import json
import os
import signal
import socket
import struct
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6PacketTooBig, ICMPv6TimeExceeded, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from synproxy import encap, netns
from synproxy.backend import loader
from synproxy.backend.loader import COUNTERS, BackendError, DataPlane, check_kernel, read_counters
from synproxy.backend.timewait import TimeWaitEvent, reinjection_frame
from synproxy.bpf.libbpf import RingBuffer, kernel_has_function, prog_test_run
from synproxy.bpf.loading import MAP_KEY, SALT_SLOT, build_object
from synproxy.cookie import SynOptions, check_cookie, make_cookie
from synproxy.front.handler import FrontPolicy, handle
from synproxy.maglev import PreviousOwners
from synproxy.packet import RST, internet_checksum, parse_icmp_error, parse_tcp
from synproxy.salt import SaltSchedule, derive_salt
from tests.lab_fixtures import needs_root
from tests.test_front_handler import icmp_error
from tests.vectors.generate import SECRET

pytestmark = needs_root
TC_ACT_OK, TC_ACT_SHOT = 0, 2
FRONT, BACKEND, ENCAP_PORT = "198.18.10.2", "198.18.20.2", 6080
OTHER_FRONT = "198.18.11.2"  # trusted too: a MAC made for FRONT must not pass from it
VIPS = ("198.19.0.10", "2001:db8:ffff::10")
PORTS = (80, 443, 7)  # the cookie vectors' ports
KEY = encap.encap_key(SECRET)
PERIOD = 1  # the vectors reach epoch 2^32: in 1 s epochs their times fit the program's 64-bit ns clock
ETH_HEADER = 14
ETHER = raw(Ether(type=0x0800))  # the frame a vector's outer IPv4 packet arrives in


def test_the_kfunc_is_found_in_the_kernels_btf_and_its_absence_is_named(monkeypatch):
    assert kernel_has_function("bpf_sk_assign_tcp_reqsk")
    check_kernel()
    monkeypatch.setattr(loader, "KFUNC", "bpf_no_such_kfunc")
    with pytest.raises(BackendError, match="this kernel lacks the kfunc bpf_no_such_kfunc"):
        check_kernel()


@pytest.fixture(scope="module")
def plane():
    plane = DataPlane(build_object("backend"))
    plane.configure(ENCAP_PORT, 7)
    plane.trust([ipaddress.ip_address(FRONT), ipaddress.ip_address(OTHER_FRONT)])
    plane.protect([ipaddress.ip_address(vip) for vip in VIPS], PORTS)
    plane.refresh_encap_keys(SaltSchedule((SECRET,)))
    yield plane
    plane.close()


def inner_flow(inner: bytes) -> tuple[bytes, bytes, int, int]:
    """Addresses and the first four bytes after the IP header as ports, as the program reads them."""
    if inner and inner[0] >> 4 == 6:
        return inner[8:24], inner[24:40], int.from_bytes(inner[40:42], "big"), int.from_bytes(inner[42:44], "big")
    start = (inner[0] & 0xF) * 4 if inner else 0
    return (inner[12:16], inner[16:20], int.from_bytes(inner[start:start + 2], "big"),
            int.from_bytes(inner[start + 2:start + 4], "big"))


def encapsulated(inner: bytes, source: str = FRONT, flags: int = 1, magic: int = 0x5C, reserved: int = 0,
                 key: bytes = KEY, mac_for: tuple[str, str] | None = None, mac_flags: int | None = None,
                 version: int = encap.VERSION, former: tuple[str, str] = ("0.0.0.0", "0.0.0.0"),
                 destination: str = BACKEND) -> bytes:
    """As a front encapsulates, MACed with ``key`` for the outer addresses ``mac_for`` (default: the
    packet's own) and ``mac_flags`` (default: its own flags), naming the ``former`` owners."""
    mac = 0
    owner = b"".join(ipaddress.ip_address(a).packed for a in former)
    if len(inner) >= 24:
        outer = mac_for or (source, destination)
        message = encap.mac_input(*(ipaddress.ip_address(a).packed for a in outer), *inner_flow(inner),
                                  flags if mac_flags is None else mac_flags, owner)
        mac = encap.encap_mac(key, message)
    return raw(Ether() / IP(src=source, dst=destination) / UDP(sport=50000, dport=ENCAP_PORT, chksum=0)
               / Raw(bytes([magic, flags, version, reserved]) + owner + mac.to_bytes(8, "big") + inner))


def run(plane: DataPlane, packet: bytes) -> tuple[int, bytes, dict]:
    """The program's verdict, the packet it leaves, and the counters that moved."""
    before = read_counters(plane.counters, plane.kfunc_errors)
    verdict, out = prog_test_run(plane.prog_fd, packet)
    after = read_counters(plane.counters, plane.kfunc_errors)
    changed = {name: after[name] - before[name] for name in COUNTERS if after[name] != before[name]}
    return verdict, out, changed


def ack_of(vector: dict, ack: int | None = None, seq_offset: int = 1) -> bytes:
    """The client's handshake ACK for a vector (seq = client ISN + 1), with its timestamp option."""
    layer = IP if vector["family"] == 4 else IPv6
    return raw(layer(src=vector["saddr"], dst=vector["daddr"])
               / TCP(sport=vector["sport"], dport=vector["dport"], flags="A",
                     seq=(vector["client_isn"] + seq_offset) % 2**32,
                     ack=vector["ack"] if ack is None else ack,
                     options=[("NOP", None), ("NOP", None), ("Timestamp", (1234, 5678))]))


def set_clock(monkeypatch, plane: DataPlane, now: float) -> None:
    """Make the program's wall clock read ``now`` (the loader writes its offset from CLOCK_TAI); the salts
    stay as they are, as if the loader had stopped."""
    offset = round(now * 1e9) - time.clock_gettime_ns(time.CLOCK_TAI)
    monkeypatch.setattr(loader, "clock_offset_ns", lambda: offset)
    plane.configure(ENCAP_PORT, 7)


def load_salts(monkeypatch, plane: DataPlane, cookie_vectors: dict, vector: dict, *secrets: bytes) -> None:
    """The salts the loader would hold in the middle of the vector's epoch (skew 0), and the program's clock
    there."""
    schedule = SaltSchedule(secrets or (bytes.fromhex(cookie_vectors["secret"]),), period=PERIOD, skew=0)
    now = (vector["epoch"] + 0.5) * PERIOD
    set_clock(monkeypatch, plane, now)
    plane.refresh_salts(schedule, now)


def test_every_vector_passes_the_mac_and_any_tampering_fails(monkeypatch, plane, cookie_vectors):
    vectors = cookie_vectors["vectors"]
    assert {v["family"] for v in vectors} == {4, 6} and len(vectors) > 120
    for vector in vectors:
        load_salts(monkeypatch, plane, cookie_vectors, vector)
        verdict, _, changed = run(plane, encapsulated(ack_of(vector)))
        # The MAC holds; nothing listens here, so the ACK ends at the socket lookup.
        assert (verdict, changed) == (TC_ACT_OK, {"decapsulated": 1, "no_socket": 1}), vector["name"]
        for tampered, packet in (
            ("MAC bit", ack_of(vector, ack=vector["ack"] ^ (1 << 20))),
            ("SACK bit", ack_of(vector, ack=vector["ack"] ^ (1 << 3))),
            ("MSS bit", ack_of(vector, ack=vector["ack"] ^ 1)),
            ("epoch bit", ack_of(vector, ack=vector["ack"] ^ (1 << 8))),
            ("client ISN", ack_of(vector, seq_offset=2)),
        ):
            verdict, _, changed = run(plane, encapsulated(packet))
            assert (verdict, changed) == (TC_ACT_SHOT, {"decapsulated": 1, "cookie_bad": 1}), \
                (vector["name"], tampered)


def first_vector(cookie_vectors: dict, family: int) -> dict:
    return next(v for v in cookie_vectors["vectors"] if v["family"] == family)


def test_cookie_of_a_retired_secret_passes_while_rotating(monkeypatch, plane, cookie_vectors):
    vector = first_vector(cookie_vectors, 4)
    old = bytes.fromhex(cookie_vectors["secret"])
    load_salts(monkeypatch, plane, cookie_vectors, vector, b"n" * 32)
    assert run(plane, encapsulated(ack_of(vector)))[2] == {"decapsulated": 1, "cookie_bad": 1}
    load_salts(monkeypatch, plane, cookie_vectors, vector, b"n" * 32, old)
    assert run(plane, encapsulated(ack_of(vector)))[2] == {"decapsulated": 1, "no_socket": 1}


def test_cookie_of_an_epoch_the_loader_no_longer_holds_fails(monkeypatch, plane, cookie_vectors):
    vector = first_vector(cookie_vectors, 4)
    schedule = SaltSchedule((bytes.fromhex(cookie_vectors["secret"]),), period=PERIOD, skew=0)
    now = (vector["epoch"] + 2.5) * PERIOD
    set_clock(monkeypatch, plane, now)
    plane.refresh_salts(schedule, now)
    verdict, _, changed = run(plane, encapsulated(ack_of(vector)))
    assert (verdict, changed) == (TC_ACT_SHOT, {"decapsulated": 1, "cookie_bad": 1})


def test_untrusted_source_is_dropped_before_anything_is_parsed(monkeypatch, plane, cookie_vectors):
    vector = first_vector(cookie_vectors, 4)
    load_salts(monkeypatch, plane, cookie_vectors, vector)
    for packet in (encapsulated(ack_of(vector), source="198.18.99.9"),
                   encapsulated(b"garbage", source="198.18.99.9", magic=0)):
        verdict, _, changed = run(plane, packet)
        assert (verdict, changed) == (TC_ACT_SHOT, {"untrusted": 1})


def with_outer_ipv4(frame: bytes, version: int = 4, total_length: int | None = None, checksum_flip: int = 0) -> bytes:
    """``frame`` (an encapsulation) with its outer IPv4 header's version and total length (default: what the
    frame carries) as given, its checksum right but for the bits of ``checksum_flip``; the UDP length
    follows the total."""
    out = bytearray(frame)
    total = len(frame) - ETH_HEADER if total_length is None else total_length
    out[ETH_HEADER] = version << 4 | out[ETH_HEADER] & 0xF
    out[ETH_HEADER + 2:ETH_HEADER + 4] = total.to_bytes(2, "big")
    out[ETH_HEADER + 24:ETH_HEADER + 26] = ((total - 20) % 2**16).to_bytes(2, "big")
    out[ETH_HEADER + 10:ETH_HEADER + 12] = bytes(2)
    checksum = internet_checksum(bytes(out[ETH_HEADER:ETH_HEADER + 20])) ^ checksum_flip
    out[ETH_HEADER + 10:ETH_HEADER + 12] = checksum.to_bytes(2, "big")
    return bytes(out)


# Outer IPv4 headers no front or backend writes (outer_ipv4_sound, bpf/synproxy.h).
UNSOUND_OUTER = {
    "bytes past its total length": lambda frame: frame + bytes(6),
    "total length past the frame": lambda frame: with_outer_ipv4(frame, total_length=len(frame) - ETH_HEADER + 6),
    "checksum wrong": lambda frame: with_outer_ipv4(frame, checksum_flip=0x0100),
    "version 6": lambda frame: with_outer_ipv4(frame, version=6),
}


@pytest.mark.parametrize("packet", [
    encapsulated(raw(IP() / TCP()), magic=0x5D),
    encapsulated(raw(IP() / TCP()), reserved=1),
    encapsulated(raw(IP() / TCP()), version=2),
    with_outer_ipv4(encapsulated(b"")[:-2]),   # the header cut short
    with_outer_ipv4(encapsulated(b"")[:-10]),  # the MAC cut short
    encapsulated(b""),                         # a header and nothing inside
    encapsulated(b"\x50" + bytes(39)),          # inner IP version 5
], ids=["bad magic", "reserved bits", "v2 header", "truncated header", "truncated MAC", "no inner packet",
        "inner version"])
def test_malformed_encapsulation_is_dropped(plane, packet):
    verdict, _, changed = run(plane, packet)
    assert (verdict, changed) == (TC_ACT_SHOT, {"malformed": 1})


@pytest.mark.parametrize("breakage", UNSOUND_OUTER)
def test_an_outer_ipv4_header_no_front_writes_is_malformed_before_its_source_is_trusted(monkeypatch, plane,
                                                                                    cookie_vectors, breakage):
    """The program reads the outer header before ip_rcv checks it, and decapsulating skips those checks:
    each of these, authentic otherwise, was decapsulated before (bytes past the total length riding in the
    inner packet). Checked first: the source address of a header no one wrote names no one."""
    vector = first_vector(cookie_vectors, 4)
    load_salts(monkeypatch, plane, cookie_vectors, vector)
    unflagged = raw(IP(src="198.18.1.2", dst=VIPS[0]) / TCP(sport=4000, dport=80, flags="PA") / b"data")
    for packet, sound in ((encapsulated(ack_of(vector)), {"decapsulated": 1, "no_socket": 1}),
                          (encapsulated(unflagged, flags=0), {"decapsulated": 1, "no_flow_reset": 1}),
                          (encapsulated(unflagged, flags=0, source="198.18.99.9"), {"untrusted": 1})):
        assert run(plane, packet)[2] == sound
        verdict, _, changed = run(plane, UNSOUND_OUTER[breakage](packet))
        assert (verdict, changed) == (TC_ACT_SHOT, {"malformed": 1}), sound


@pytest.mark.parametrize("inner, ether_type", [
    (raw(IP(src="198.18.1.2", dst="198.19.0.10") / TCP(sport=4000, dport=80, flags="PA", seq=5, ack=9)
         / b"data"), b"\x08\x00"),
    (raw(IPv6(src="2001:db8:1::2", dst="2001:db8:ffff::10") / TCP(sport=4000, dport=80, flags="PA")
         / b"data"), b"\x86\xdd"),
], ids=["ipv4", "ipv6"])
def test_unvalidated_packet_is_decapsulated_and_passed(plane, inner, ether_type):
    """No socket owns it here: passed within the reset budget, for the kernel to reset."""
    packet = encapsulated(inner, flags=0)
    verdict, out, changed = run(plane, packet)
    assert (verdict, changed) == (TC_ACT_OK, {"decapsulated": 1, "no_flow_reset": 1})
    assert out[:12] == packet[:12] and out[12:14] == ether_type and out[ETH_HEADER:] == inner


def test_validated_flag_on_a_non_handshake_segment_only_decapsulates(monkeypatch, plane, cookie_vectors):
    vector = first_vector(cookie_vectors, 4)
    load_salts(monkeypatch, plane, cookie_vectors, vector)
    for flags in ("FA", "RA"):
        inner = raw(IP(src=vector["saddr"], dst=vector["daddr"])
                    / TCP(sport=vector["sport"], dport=vector["dport"], flags=flags, ack=vector["ack"]))
        verdict, out, changed = run(plane, encapsulated(inner))
        assert (verdict, changed) == (TC_ACT_OK, {"decapsulated": 1}) and out[ETH_HEADER:] == inner, flags


def test_plain_traffic_passes_untouched_and_syns_are_counted(plane):
    for layer in (IP(src="198.18.1.2", dst="198.19.0.10"), IPv6(src="2001:db8:1::2", dst="2001:db8:ffff::10")):
        packet = raw(Ether() / layer / TCP(sport=4000, dport=80, flags="S"))
        assert run(plane, packet) == (TC_ACT_OK, packet, {"passed": 1, "syn_received": 1})
    # A SYN to the backend's own address (a metrics scrape, say) did not bypass any front.
    for packet in (raw(Ether() / IP(src=FRONT, dst=BACKEND) / TCP(sport=4000, dport=9101, flags="S")),
                   raw(Ether() / IP(src=FRONT, dst=BACKEND) / TCP(sport=4000, dport=80, flags="A")),
                   raw(Ether() / IP(src=FRONT, dst=BACKEND) / UDP(sport=1, dport=53) / b"x")):
        assert run(plane, packet) == (TC_ACT_OK, packet, {"passed": 1})


def test_every_encap_vector_is_accepted_exactly_as_sent(monkeypatch, plane, cookie_vectors, encap_vectors):
    """The vectors' packets are what a front sends: decapsulated, and the flagged handshake ACKs (whose
    cookies are cookie vectors) reach the socket lookup. No connection owns the others here: passed within
    the reset budget, but a client's RST is dropped (the kernel would not answer it). Those naming a
    previous owner are chained (test_a_segment_no_connection_owns_is_chained_...)."""
    assert (encap_vectors["front"], encap_vectors["backend"], encap_vectors["encap_port"]) == (FRONT, BACKEND,
                                                                                               ENCAP_PORT)
    load_salts(monkeypatch, plane, cookie_vectors, cookie_vectors["vectors"][0])
    for v in encap_vectors["vectors"]:
        if "chained" in v:
            continue
        inner = bytes.fromhex(v["inner"])
        verdict, out, changed = run(plane, ETHER + bytes.fromhex(v["packet"]))
        if v["validated"]:
            expected = (TC_ACT_OK, {"decapsulated": 1, "no_socket": 1})
        elif parse_tcp(inner).flags & RST:
            expected = (TC_ACT_SHOT, {"decapsulated": 1, "no_flow_dropped": 1})
        else:
            expected = (TC_ACT_OK, {"decapsulated": 1, "no_flow_reset": 1})
        assert (verdict, changed) == expected, v["name"]
        assert out[ETH_HEADER:] == inner and out[12:14] == (b"\x08\x00" if v["family"] == 4 else b"\x86\xdd")


TC_ACT_REDIRECT = 7
FARM_LINK = "bcha"
HOPS = {"198.18.21.2": "02:00:00:00:21:02", "198.18.22.2": "02:00:00:00:22:02", BACKEND: "02:00:00:00:20:02"}
UNRESOLVED_OWNER, UNROUTED_OWNER = "198.18.23.2", "203.0.113.9"
SK_BUFF_IFINDEX = struct.Struct("=40xI")  # struct __sk_buff up to ifindex: the interface it came in by


@pytest.fixture(scope="module")
def farm():
    """A namespace where the backend sits on the farm network: the vectors' former owners resolved
    neighbours, another unresolved, a third unrouted. Runs there come in by the farm interface."""
    name = netns.unique_name("bch")
    with netns.namespaces(name):
        netns.link(name, FARM_LINK, name, "bchb")
        netns.add_addresses(name, FARM_LINK, "198.18.30.2/16")
        for address, mac in HOPS.items():
            netns.run(name, ["ip", "neigh", "replace", address, "lladdr", mac, "dev", FARM_LINK, "nud", "permanent"])
        link = json.loads(netns.run(name, ["ip", "-j", "link", "show", FARM_LINK]).stdout)[0]
        yield name, SK_BUFF_IFINDEX.pack(link["ifindex"]), bytes.fromhex(link["address"].replace(":", ""))


def run_in(farm, plane: DataPlane, packet: bytes) -> tuple[int, bytes, dict]:
    name, context, _ = farm
    before = read_counters(plane.counters, plane.kfunc_errors)
    with netns.inside(name):
        verdict, out = prog_test_run(plane.prog_fd, packet, context=context)
    after = read_counters(plane.counters, plane.kfunc_errors)
    return verdict, out, {key: after[key] - before[key] for key in COUNTERS if after[key] != before[key]}


def test_a_segment_no_connection_owns_goes_along_the_chain_as_encap_chain_builds_it(farm, plane, encap_vectors):
    """Every vector naming former owners, flags and families alike (a RST too: a former owner may hold its
    connection): sent back out of the farm interface, byte for byte encap.chain's packet after Ethernet
    addresses from the neighbour table; and at the previous owner, the chained packet once more to the
    earlier one. Nothing was chained before: the packets met the reset budget here."""
    chained = [v for v in encap_vectors["vectors"] if "chained" in v]
    assert {(v["family"], len(v["chained"])) for v in chained} == {(4, 1), (4, 2), (6, 1), (6, 2)}
    for v in chained:
        hops = [BACKEND, *(a for a in v["former"] if a != "0.0.0.0")]
        for hop, (arriving, leaving) in enumerate(zip([v["packet"], *v["chained"]], v["chained"])):
            verdict, out, changed = run_in(farm, plane, ETHER + bytes.fromhex(arriving))
            assert (verdict, changed) == (TC_ACT_REDIRECT, {"decapsulated": 1, "chained": 1}), (v["name"], hop)
            assert out == bytes.fromhex(HOPS[hops[hop + 1]].replace(":", "")) + farm[2] + b"\x08\x00" + \
                bytes.fromhex(leaving), (v["name"], hop)
        last = run_in(farm, plane, ETHER + bytes.fromhex(v["chained"][-1]))
        expected = ({"decapsulated": 1, "no_flow_dropped": 1} if parse_tcp(bytes.fromhex(v["inner"])).flags & RST
                    else {"decapsulated": 1, "no_flow_reset": 1})
        assert last[::2] == (TC_ACT_SHOT if "no_flow_dropped" in expected else TC_ACT_OK, expected), v["name"]


def test_a_chained_packet_comes_from_a_backend_no_one_trusts_and_is_admitted_by_its_mac(farm, plane):
    """At a former owner: from a backend it need not know (added since its last reload), admitted by its
    MAC alone; not flagged CHAINED, the same source is refused; a chained handshake never happens."""
    inner = raw(IP(src=CLIENT4, dst=VIPS[0]) / TCP(sport=4100, dport=80, flags="PA", seq=7, ack=9) / b"x")
    from_owner = encapsulated(inner, source="198.18.23.2", flags=encap.FLAG_CHAINED,
                              former=("198.18.21.2", "0.0.0.0"))
    assert run_in(farm, plane, from_owner)[::2] == (TC_ACT_OK, {"decapsulated": 1, "no_flow_reset": 1})
    unchained = encapsulated(inner, source="198.18.23.2", flags=0, former=("198.18.21.2", "0.0.0.0"))
    assert run_in(farm, plane, unchained)[::2] == (TC_ACT_SHOT, {"untrusted": 1})
    validated = encapsulated(inner, source="198.18.23.2", flags=encap.FLAG_CHAINED | encap.FLAG_VALIDATED,
                             former=("198.18.21.2", "0.0.0.0"))
    assert run_in(farm, plane, validated)[::2] == (TC_ACT_SHOT, {"encap_refused": 1})


@pytest.mark.parametrize("former", [("0.0.0.0", "0.0.0.0"), (BACKEND, "0.0.0.0"), (BACKEND, BACKEND)])
def test_naming_no_former_owner_or_itself_makes_it_the_last_hop(farm, plane, former):
    inner = raw(IP(src=CLIENT4, dst=VIPS[0]) / TCP(sport=4101, dport=80, flags="A", seq=7, ack=9))
    assert run_in(farm, plane, encapsulated(inner, flags=0, former=former))[::2] == (
        TC_ACT_OK, {"decapsulated": 1, "no_flow_reset": 1})


def test_an_unresolved_former_owner_is_left_to_the_kernels_neighbour_and_an_unrouted_one_ends_the_chain(farm, plane):
    inner = raw(IP(src=CLIENT4, dst=VIPS[0]) / TCP(sport=4102, dport=80, flags="A", seq=7, ack=9))
    assert run_in(farm, plane, encapsulated(inner, flags=0, former=(UNRESOLVED_OWNER, "0.0.0.0")))[::2] == (
        TC_ACT_REDIRECT, {"decapsulated": 1, "chained": 1})
    # No route: this backend is the last hop, so the client gets its reset instead of silence.
    assert run_in(farm, plane, encapsulated(inner, flags=0, former=(UNROUTED_OWNER, "0.0.0.0")))[::2] == (
        TC_ACT_OK, {"decapsulated": 1, "chain_failed": 1, "no_flow_reset": 1})


def tampered(v: dict, offset: int, xor: int) -> bytes:
    """A vector's frame with one byte of the outer packet changed (offset from the outer IP header)."""
    packet = bytearray(bytes.fromhex(v["packet"]))
    packet[offset] ^= xor
    if offset < 20:  # keep the outer IPv4 header's checksum right: only the MAC is to fail
        header = IP(bytes(packet[:20]))
        del header.chksum
        packet[:20] = raw(header)
    return ETHER + bytes(packet)


FORMER_OFFSET = 20 + 8 + 4
MAC_OFFSET = 20 + 8 + 12
INNER_OFFSET = 20 + 8 + 20


def inner_sport_offset(v: dict) -> int:
    return INNER_OFFSET + (20 if v["family"] == 4 else 40) + 1


@pytest.mark.parametrize("offset, xor", [
    (lambda v: MAC_OFFSET, 0x80),
    (lambda v: MAC_OFFSET + 7, 0x01),
    (lambda v: 20 + 8 + 1, encap.FLAG_VALIDATED),
    (lambda v: FORMER_OFFSET + 3, 0x01),
    (lambda v: FORMER_OFFSET + 7, 0x01),
    (lambda v: 14, 0x01),  # 198.18.10.2 -> 198.18.11.2, a trusted front too
    (lambda v: 19, 0x01),
    (inner_sport_offset, 0x01),
], ids=["MAC's first bit", "MAC's last bit", "VALIDATED flag", "previous owner", "earlier owner", "outer source: another trusted front",
        "outer destination", "inner source port"])
def test_a_changed_bit_of_an_encapsulation_fails_its_mac(monkeypatch, plane, cookie_vectors, encap_vectors, offset, xor):
    load_salts(monkeypatch, plane, cookie_vectors, cookie_vectors["vectors"][0])
    for v in encap_vectors["vectors"]:
        verdict, _, changed = run(plane, tampered(v, offset(v), xor))
        assert (verdict, changed) == (TC_ACT_SHOT, {"encap_bad_mac": 1}), v["name"]


def test_an_encapsulation_under_another_key_fails_its_mac_and_a_retired_secrets_key_passes(plane, encap_vectors):
    other = b"w" * 32
    vector = next(v for v in encap_vectors["vectors"] if not v["validated"])
    inner = bytes.fromhex(vector["inner"])
    packet = encapsulated(inner, flags=0, key=encap.encap_key(other))
    assert run(plane, packet)[::2] == (TC_ACT_SHOT, {"encap_bad_mac": 1})
    try:
        plane.refresh_encap_keys(SaltSchedule((SECRET, other)))  # rotating: the new secret's key second
        assert run(plane, packet)[::2] == (TC_ACT_OK, {"decapsulated": 1, "no_flow_reset": 1})
        plane.refresh_encap_keys(SaltSchedule((other,)))
        assert run(plane, packet)[::2] == (TC_ACT_OK, {"decapsulated": 1, "no_flow_reset": 1})
        assert run(plane, ETHER + bytes.fromhex(vector["packet"]))[::2] == (TC_ACT_SHOT, {"encap_bad_mac": 1})
    finally:
        plane.refresh_encap_keys(SaltSchedule((SECRET,)))


CLIENT4, CLIENT6 = "198.18.1.2", "2001:db8:1::2"


@pytest.mark.parametrize("inner", [
    raw(IP(src=CLIENT4, dst=VIPS[0]) / TCP(sport=4000, dport=80, flags="S")),
    raw(IPv6(src=CLIENT6, dst=VIPS[1]) / TCP(sport=4000, dport=80, flags="S")),
    raw(IP(src=CLIENT4, dst=BACKEND) / TCP(sport=4000, dport=9101, flags="S")),
    raw(IP(src=CLIENT4, dst=VIPS[0]) / TCP(sport=4000, dport=80, flags="SA")),
    raw(IP(src=CLIENT4, dst=VIPS[0]) / UDP(sport=4000, dport=80) / b"x"),
    raw(IP(src=CLIENT4, dst=VIPS[0]) / ICMP()),
    raw(IPv6(src=CLIENT6, dst=VIPS[1]) / UDP(sport=4000, dport=80) / b"x"),
    raw(IP(src=CLIENT4, dst=VIPS[0], frag=1, flags=0) / TCP(sport=4000, dport=80, flags="A")),
    raw(IP(src=CLIENT4, dst=BACKEND) / TCP(sport=4000, dport=80, flags="A")),
    raw(IP(src=CLIENT4, dst="198.19.0.11") / TCP(sport=4000, dport=80, flags="PA") / b"x"),
    raw(IP(src=CLIENT4, dst=VIPS[0]) / TCP(sport=4000, dport=22, flags="PA") / b"x"),
    raw(IPv6(src=CLIENT6, dst=VIPS[1]) / TCP(sport=4000, dport=8080, flags="A")),
], ids=["v4 SYN", "v6 SYN", "SYN to the backend's own port", "SYN-ACK", "v4 UDP", "ICMP", "v6 UDP", "fragment",
        "not a VIP: the backend's own address", "not a VIP", "not a protected port", "v6 not a protected port"])
@pytest.mark.parametrize("flags", [0, encap.FLAG_VALIDATED], ids=["unflagged", "flagged"])
def test_authentic_encapsulation_of_what_a_front_never_forwards_is_refused(plane, inner, flags):
    """Even under a valid MAC (a front's bug, or a key that leaked): only TCP to a protected VIP and port,
    and never a SYN."""
    verdict, _, changed = run(plane, encapsulated(inner, flags=flags))
    assert (verdict, changed) == (TC_ACT_SHOT, {"encap_refused": 1})


def tfo_syn(layer, client: str, vip: str, port: int = 80, flags: str = "S") -> bytes:
    """A client's TFO SYN: a cookie (TCP option 34) and data."""
    return raw(layer(src=client, dst=vip) / TCP(sport=4000, dport=port, flags=flags, seq=1000,
                                                options=[("MSS", 1460), (34, bytes(8))]) / b"GET / HTTP/1.0\r\n\r\n")


@pytest.mark.parametrize("layer, client, vip", [(IP, CLIENT4, VIPS[0]), (IPv6, CLIENT6, VIPS[1])], ids=["v4", "v6"])
def test_a_syn_a_front_flagged_fastopen_is_passed_to_the_stack_and_nothing_else_under_the_flag(plane, layer, client,
                                                                                              vip):
    """The stack checks the TFO cookie itself (the farm's key); the program only decapsulates an authentic
    FASTOPEN SYN. An unflagged SYN is refused as before."""
    syn = tfo_syn(layer, client, vip)
    verdict, out, changed = run(plane, encapsulated(syn, flags=encap.FLAG_FASTOPEN))
    assert (verdict, changed) == (TC_ACT_OK, {"decapsulated": 1, "fastopen_passed": 1})
    assert out[ETH_HEADER:] == syn
    for refused, flags in ((syn, 0),
                           (syn, encap.FLAG_FASTOPEN | encap.FLAG_VALIDATED),
                           (tfo_syn(layer, client, vip, flags="SA"), encap.FLAG_FASTOPEN),
                           (tfo_syn(layer, client, vip, flags="A"), encap.FLAG_FASTOPEN),
                           (tfo_syn(layer, client, vip, port=22), encap.FLAG_FASTOPEN)):
        assert run(plane, encapsulated(refused, flags=flags))[::2] == (TC_ACT_SHOT, {"encap_refused": 1}), flags
    chained = encap.FLAG_FASTOPEN | encap.FLAG_CHAINED  # from a backend: no front's, whatever its source
    assert run(plane, encapsulated(syn, flags=chained))[::2] == (TC_ACT_SHOT, {"encap_refused": 1})
    # The flag is under the MAC: set on a packet MACed without it, it fails.
    assert run(plane, encapsulated(syn, flags=encap.FLAG_FASTOPEN, mac_flags=0))[::2] == (
        TC_ACT_SHOT, {"encap_bad_mac": 1})


CLOCK_PERIOD = 60


@pytest.mark.parametrize("skew", [0, 2])
def test_the_programs_clock_accepts_a_cookie_while_check_cookie_does_and_not_after(monkeypatch, plane,
                                                                                   cookie_vectors, skew):
    """The loader refreshed 0.2 s before an epoch boundary, then stopped: its salts stay in the map. A
    cookie minted 3 ms past the boundary validates (the next epoch's salt was written ahead), and every
    cookie is refused once the window of check_cookie has passed, although its slot is still there."""
    vector = first_vector(cookie_vectors, 4)
    schedule = SaltSchedule((bytes.fromhex(cookie_vectors["secret"]),), period=CLOCK_PERIOD, skew=skew)
    epoch = vector["epoch"] + 1
    boundary = epoch * CLOCK_PERIOD
    set_clock(monkeypatch, plane, boundary - 0.2)
    plane.refresh_salts(schedule, boundary - 0.2)
    saddr, daddr = (ipaddress.ip_address(vector[side]).packed for side in ("saddr", "daddr"))
    late = (epoch + 2) * CLOCK_PERIOD + skew  # the minted epoch leaves the window
    cases = [(epoch, boundary + 0.003, True), (epoch, boundary + 30, True), (epoch, late - 0.05, True),
             (epoch, late + 0.05, False), (epoch, late + 3 * CLOCK_PERIOD, False),
             (epoch - 1, boundary + 0.003, True), (epoch - 1, late - CLOCK_PERIOD + 0.05, False)]
    if skew:  # the epoch after is held too, but accepted only from `skew` before its start
        cases += [(epoch + 1, boundary + CLOCK_PERIOD - skew - 0.05, False),
                  (epoch + 1, boundary + CLOCK_PERIOD - skew + 0.05, True)]
    for minted, now, accepted in cases:
        salt = derive_salt(bytes.fromhex(cookie_vectors["secret"]), minted)
        cookie = make_cookie(salt, minted, saddr, daddr, vector["sport"], vector["dport"], vector["client_isn"],
                             SynOptions(mss=1460, wscale=7, sack=True, ecn=False))
        reference = check_cookie(schedule, now, saddr, daddr, vector["sport"], vector["dport"],
                                 vector["client_isn"], cookie)
        assert isinstance(reference, SynOptions) == accepted, (minted, now)
        assert plane.salts.map.lookup(MAP_KEY.pack(minted % 4)) is not None  # the frozen loader's slot
        set_clock(monkeypatch, plane, now)
        verdict, _, changed = run(plane, encapsulated(ack_of(vector, ack=cookie + 1)))
        outcome = "no_socket" if accepted else "cookie_bad"
        assert (verdict, changed) == (TC_ACT_OK if accepted else TC_ACT_SHOT,
                                      {"decapsulated": 1, outcome: 1}), (minted - epoch, now - boundary)


def test_a_salt_rewritten_under_readers_is_never_seen_half_written(monkeypatch, cookie_vectors):
    """A writer process swaps the primary and the retired secret of one slot as fast as it can while the
    program checks an ACK valid under both: every check must pass. With `salts` an array map (an update
    is a memcpy under the reader) 3308 of 496,000 checks failed in 3 s here; as a hash map none did."""
    vector = first_vector(cookie_vectors, 4)
    epoch, slot = vector["epoch"], MAP_KEY.pack(vector["epoch"] % 4)
    primary, retired = bytes.fromhex(cookie_vectors["secret"]), b"n" * 32
    swapped = [SALT_SLOT.pack(1, 2, epoch, derive_salt(first, epoch), derive_salt(second, epoch))
               for first, second in ((primary, retired), (retired, primary))]
    plane = DataPlane(build_object("backend"))  # of its own: the writer leaves its slot unknown to the loader
    try:
        plane.configure(ENCAP_PORT, 7)
        plane.trust([ipaddress.ip_address(FRONT)])
        plane.protect([ipaddress.ip_address(vip) for vip in VIPS], PORTS)
        plane.refresh_encap_keys(SaltSchedule((SECRET,)))
        now = (epoch + 0.5) * CLOCK_PERIOD
        set_clock(monkeypatch, plane, now)
        plane.refresh_salts(SaltSchedule((primary, retired), period=CLOCK_PERIOD, skew=0), now)
        packet = encapsulated(ack_of(vector))
        before = read_counters(plane.counters, plane.kfunc_errors)
        writer = os.fork()
        if writer == 0:
            try:
                for _ in range(2_000_000):  # bounded; killed when the checks end
                    for value in swapped:
                        plane.salts.map.update(slot, value)
            finally:
                os._exit(0)
        checks, deadline = 0, time.monotonic() + 3
        try:
            while checks < 400_000 and time.monotonic() < deadline:
                for _ in range(1000):
                    prog_test_run(plane.prog_fd, packet)
                checks += 1000
        finally:
            os.kill(writer, signal.SIGKILL)
            os.waitpid(writer, 0)
        after = read_counters(plane.counters, plane.kfunc_errors)
        assert {name: after[name] - before[name] for name in ("no_socket", "cookie_bad")} == \
            {"no_socket": checks, "cookie_bad": 0}
    finally:
        plane.close()


def forged_ack(sport: int = 4000, flags: str = "A") -> bytes:
    """An unflagged segment to a protected VIP and port, authentic from a front: what a front forwards
    for a forged ACK it cannot tell from established traffic."""
    return encapsulated(raw(IP(src=CLIENT4, dst=VIPS[0]) / TCP(sport=sport, dport=80, flags=flags, seq=7, ack=9)),
                        flags=0)


@pytest.fixture
def budget(plane, one_cpu):
    """Set the reset budget (resets per second, the whole backend); the default is restored after."""
    yield lambda rate: plane.configure(ENCAP_PORT, 7, rate)
    plane.configure(ENCAP_PORT, 7)


def test_a_budget_of_zero_resets_drops_every_packet_of_no_connection(plane, budget):
    budget(0)
    for sport in range(4000, 4010):
        assert run(plane, forged_ack(sport))[::2] == (TC_ACT_SHOT, {"decapsulated": 1, "no_flow_dropped": 1})


def test_the_budget_passes_a_cpus_share_then_drops(plane, budget):
    """One second's worth per CPU (3 here), then nothing until time refills it (1 per 333 ms)."""
    cpus = os.cpu_count() or 1
    budget(3 * cpus)
    verdicts = [run(plane, forged_ack(sport))[::2] for sport in range(4000, 4008)]
    assert verdicts == [(TC_ACT_OK, {"decapsulated": 1, "no_flow_reset": 1})] * 3 + \
        [(TC_ACT_SHOT, {"decapsulated": 1, "no_flow_dropped": 1})] * 5
    time.sleep(0.4)
    assert run(plane, forged_ack())[::2] == (TC_ACT_OK, {"decapsulated": 1, "no_flow_reset": 1})


def test_a_clients_rst_of_no_connection_is_dropped_without_spending_the_budget(plane, budget):
    budget(1000)
    for flags in ("R", "RA"):
        assert run(plane, forged_ack(flags=flags))[::2] == (TC_ACT_SHOT, {"decapsulated": 1, "no_flow_dropped": 1})


def test_packets_of_a_connection_pass_and_a_listener_alone_does_not_own_them(plane, budget):
    """A connection's packets pass uncounted even with no budget; another port of the same client meets only
    the listener, which would reset it: dropped."""
    budget(0)
    with netns.connections_on_loopback("spbc", 80, (VIPS[0], CLIENT4)) as (_, ports):
        sport = ports[CLIENT4]
        for flags in ("A", "PA", "FA", "R"):
            assert run(plane, forged_ack(sport, flags))[::2] == (TC_ACT_OK, {"decapsulated": 1}), flags
        assert run(plane, forged_ack(sport + 1))[::2] == (TC_ACT_SHOT, {"decapsulated": 1, "no_flow_dropped": 1})


ICMP_POLICY = FrontPolicy(vips=frozenset(ipaddress.ip_address(vip).packed for vip in VIPS), ports=frozenset(PORTS),
                          farm_address=ipaddress.ip_address(FRONT).packed,
                          backends=(ipaddress.ip_address(BACKEND).packed,), encap_port=ENCAP_PORT, encap_key=KEY,
                          flow_key=bytes(16))


def front_sends(packet: bytes) -> bytes:
    """What the Python front sends this backend for ``packet`` (handler.handle), in a frame."""
    verdict = handle(packet, 0.0, SaltSchedule((SECRET,)), ICMP_POLICY)
    assert verdict.outcome == "icmp_forwarded", verdict.outcome
    return ETHER + verdict.packet


@pytest.mark.parametrize("family, kind", [(4, ICMP(type=3, code=4, nexthopmtu=1280)), (4, ICMP(type=11)),
                                          (6, ICMPv6PacketTooBig(mtu=1280)), (6, ICMPv6DestUnreach(code=1)),
                                          (6, ICMPv6TimeExceeded())],
                         ids=["frag needed", "time exceeded", "v6 too big", "v6 unreachable", "v6 time exceeded"])
def test_an_icmp_error_a_front_forwards_reaches_the_stack(plane, family, kind):
    error = icmp_error(family, kind, vip=VIPS[0] if family == 4 else VIPS[1])
    verdict, out, changed = run(plane, front_sends(error))
    assert (verdict, changed) == (TC_ACT_OK, {"decapsulated": 1, "icmp_passed": 1})
    assert out[12:14] == (b"\x08\x00" if family == 4 else b"\x86\xdd") and out[ETH_HEADER:] == error


def with_header(packet: bytes, flags: int | None = None, mac_of: bytes | None = None, mac: bytes | None = None) -> bytes:
    """``packet`` (a frame from front_sends) with other flags, MACed as the front would for another inner
    packet's flow (``mac_of``: what the front sends for that one), with ``mac``, or the MAC kept."""
    header = ETH_HEADER + 28
    at = header + encap.HEADER_BYTES - 8
    mac = mac or (packet if mac_of is None else mac_of)[at:at + 8]
    flags = packet[header + 1] if flags is None else flags
    return packet[:header + 1] + bytes([flags]) + packet[header + 2:at] + mac + packet[at + 8:]


def test_icmp_errors_need_the_flag_a_mac_over_the_flow_and_a_protected_flow(plane):
    error = icmp_error(vip=VIPS[0])
    sent = front_sends(error)
    other_flow = front_sends(icmp_error(vip=VIPS[0], client_port=40001))
    not_protected = ETHER + encap.encapsulate(icmp_error(vip=VIPS[0], sport=22), parse_icmp_error(
        icmp_error(vip=VIPS[0], sport=22)), ICMP_POLICY.farm_address, ICMP_POLICY.backends[0], ENCAP_PORT, 0, False,
        KEY, icmp=True)
    # An error sent to another address than the quoted segment's sender (the VIP).
    misaddressed = icmp_error(vip=VIPS[0], destination="198.19.0.99")
    misaddressed_sent = ETHER + encap.encapsulate(misaddressed, parse_icmp_error(misaddressed),
                                                  ICMP_POLICY.farm_address, ICMP_POLICY.backends[0], ENCAP_PORT, 0,
                                                  False, KEY, icmp=True)
    for packet, outcome in (
        (with_header(sent, flags=encap.FLAG_ICMP | encap.FLAG_VALIDATED), "encap_refused"),
        (with_header(sent, mac_of=other_flow), "encap_bad_mac"),
        (with_header(sent, flags=0), "encap_refused"),  # unflagged: not a TCP segment
        (not_protected, "encap_refused"),
        (misaddressed_sent, "encap_refused"),
    ):
        assert run(plane, packet)[::2] == (TC_ACT_SHOT, {outcome: 1})


PREVIOUS_OWNER, EARLIER_OWNER = "198.18.21.2", "198.18.22.2"  # resolved neighbours in the farm namespace


@functools.cache
def moved_policy() -> FrontPolicy:
    """ICMP_POLICY after two backend changes: every slot owned by the earlier owner, then the previous,
    now BACKEND, so the front names both in every packet (maglev.PreviousOwners)."""
    previous = PreviousOwners(window=60.0)
    for at, owner in enumerate((EARLIER_OWNER, PREVIOUS_OWNER, BACKEND)):
        policy = dataclasses.replace(ICMP_POLICY, backends=(ipaddress.ip_address(owner).packed,), previous=previous)
        previous.follow(policy.owner_table(), policy.draining_table(), policy.down, float(at))
    return policy


def front_sends_after_the_changes(packet: bytes) -> bytes:
    """What the Python front sends BACKEND for ``packet`` after moved_policy's changes, in a frame."""
    verdict = handle(packet, 0.0, SaltSchedule((SECRET,)), moved_policy())
    assert verdict.outcome == "icmp_forwarded", verdict.outcome
    owners = ipaddress.ip_address(PREVIOUS_OWNER).packed + ipaddress.ip_address(EARLIER_OWNER).packed
    assert verdict.packet[32:40] == owners
    return ETHER + verdict.packet


@pytest.mark.parametrize("family", [4, 6])
def test_an_icmp_error_about_a_flow_no_connection_here_owns_follows_the_chain(farm, plane, family):
    """After a backend change the flow's connection lives on a former owner: the error the front sends the
    current owner goes on, byte for byte as encap.chain builds it (flagged ICMP and CHAINED), to the
    previous owner, from there to the earlier one, whose stack gets it as the last hop. Before, the
    current owner gave it to its own stack, where no socket took it."""
    error = icmp_error(family, vip=VIPS[0] if family == 4 else VIPS[1], client_port=40100)
    flow = parse_icmp_error(error)
    hops = [BACKEND, PREVIOUS_OWNER, EARLIER_OWNER]
    arriving = front_sends_after_the_changes(error)
    for hop in range(2):
        verdict, out, changed = run_in(farm, plane, arriving)
        assert (verdict, changed) == (TC_ACT_REDIRECT, {"decapsulated": 1, "chained": 1}), hop
        leaving = encap.chain(arriving[ETH_HEADER:], flow, KEY)
        assert leaving[16:20] == ipaddress.ip_address(hops[hop + 1]).packed
        assert leaving[29] == encap.FLAG_ICMP | encap.FLAG_CHAINED and leaving[encap.OVERHEAD:] == error
        assert out == bytes.fromhex(HOPS[hops[hop + 1]].replace(":", "")) + farm[2] + b"\x08\x00" + leaving, hop
        arriving = ETHER + leaving
    assert encap.chain(arriving[ETH_HEADER:], flow, KEY) is None
    verdict, out, changed = run_in(farm, plane, arriving)
    assert (verdict, changed) == (TC_ACT_OK, {"decapsulated": 1, "icmp_passed": 1})
    assert out[ETH_HEADER:] == error


def test_an_icmp_error_about_a_flow_a_connection_here_owns_reaches_the_stack_whatever_the_header_names(plane):
    """The chain starts only where no connection owns the flow: in a namespace of the test's own, an error
    quoting a real connection's segment (server to client) is passed here, former owners named or not;
    one about another port of the same client, which only the listener meets, is passed on (no route to
    the former owner there: the last hop)."""
    with netns.connections_on_loopback("spbc", 80, (VIPS[0], CLIENT4)) as (_, ports):
        sport = ports[CLIENT4]
        owned = icmp_error(vip=VIPS[0], client_port=sport)
        for sent in (front_sends(owned), front_sends_after_the_changes(owned)):
            assert run(plane, sent)[::2] == (TC_ACT_OK, {"decapsulated": 1, "icmp_passed": 1})
        not_owned = front_sends_after_the_changes(icmp_error(vip=VIPS[0], client_port=sport + 1))
        assert run(plane, not_owned)[::2] == (TC_ACT_OK, {"decapsulated": 1, "chain_failed": 1, "icmp_passed": 1})


def test_a_chained_icmp_error_is_admitted_by_its_mac_and_a_validated_one_never(farm, plane):
    """At a former owner: from a backend no one trusts, admitted by its MAC alone; flagged VALIDATED too,
    refused; not flagged ICMP, refused (not a TCP segment); not flagged CHAINED, the source is untrusted."""
    error = icmp_error(vip=VIPS[0], client_port=40101)
    chained = encap.chain(front_sends_after_the_changes(error)[ETH_HEADER:], parse_icmp_error(error), KEY)
    assert chained[12:16] == ipaddress.ip_address(BACKEND).packed
    assert run_in(farm, plane, ETHER + chained)[::2] == (TC_ACT_REDIRECT, {"decapsulated": 1, "chained": 1})
    sent = ETHER + chained
    validated = encap.FLAG_ICMP | encap.FLAG_CHAINED | encap.FLAG_VALIDATED
    assert run_in(farm, plane, with_header(sent, flags=validated))[::2] == (TC_ACT_SHOT, {"encap_refused": 1})
    assert run_in(farm, plane, with_header(sent, flags=encap.FLAG_CHAINED))[::2] == (TC_ACT_SHOT, {"encap_refused": 1})
    assert run_in(farm, plane, with_header(sent, flags=encap.FLAG_ICMP))[::2] == (TC_ACT_SHOT, {"untrusted": 1})


TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 19, 20, 21, 1, 2
TW_PORT = 41000


def closed_by_the_server(listener: socket.socket, port: int) -> tuple[int, int]:
    """A connection from CLIENT4:port that the server closes first, so the server's side stays in
    TIME_WAIT: the client's last sequence number + 1 (its FIN's: tw_rcv_nxt) and last TSval."""
    client = socket.create_connection((VIPS[0], 80), source_address=(CLIENT4, port))
    server, _ = listener.accept()
    client.sendall(b"request")
    server.recv(100)
    server.close()  # the server closes first
    client.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    client.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    write_seq = client.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ)
    client.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)
    client.recv(100)  # the server's FIN
    client.close()
    return (write_seq + 1) & 0xFFFFFFFF, time.monotonic_ns() // 10**6 & 0xFFFFFFFF


def server_states(name: str) -> dict[int, str]:
    """The server side's sockets to CLIENT4 by client port: their states as ss names them."""
    states = {}
    for line in netns.run(name, ["ss", "-Htan", f"dst {CLIENT4}"]).stdout.splitlines():
        state, *_, local, peer = line.split()
        if local == f"{VIPS[0]}:80":
            states[int(peer.rsplit(":", 1)[1])] = state
    return states


@contextlib.contextmanager
def client_and_server(sysctls: dict[str, str]):
    """Namespaces of the test's own, a client's and a server's on a link (the server's the farm interface,
    where runs come in), the server listening on the VIP:80: yields the server's namespace, its run context
    and interface address (as `farm`), the client's namespace and the listener."""
    server, client = netns.unique_name("sptw"), netns.unique_name("sptc")
    with netns.namespaces(server, client):
        netns.link(server, FARM_LINK, client, "sptc")
        netns.add_addresses(server, FARM_LINK, "198.18.1.1/24")
        netns.add_addresses(server, "lo", f"{VIPS[0]}/32")
        netns.add_addresses(client, "sptc", f"{CLIENT4}/24")
        netns.add_route(client, f"{VIPS[0]}/32", "198.18.1.1")
        for name in (server, client):
            netns.write_sysctls(name, sysctls)
        link = json.loads(netns.run(server, ["ip", "-j", "link", "show", FARM_LINK]).stdout)[0]
        farm = server, SK_BUFF_IFINDEX.pack(link["ifindex"]), bytes.fromhex(link["address"].replace(":", ""))
        with netns.inside(server):
            listener = socket.create_server((VIPS[0], 80))
        with listener:
            yield farm, client, listener


@contextlib.contextmanager
def server_side_time_wait(rfc1337: int = 0):
    """A connection from CLIENT4:TW_PORT to the VIP:80 that the server closed first, so the server's side
    is in TIME_WAIT; beside it, what recycling that one must leave alone: the same from TW_PORT + 1, and a
    connection from TW_PORT + 2 still established. Yields `farm` (client_and_server), the old connection's
    tw_rcv_nxt and the client's last TSval (timestamps without random offsets, tcp_timestamps=2: the
    client's TSval is CLOCK_MONOTONIC in ms)."""
    with client_and_server({"net.ipv4.tcp_timestamps": "2", "net.ipv4.tcp_rfc1337": str(rfc1337)}) as \
            (farm, client, listener), netns.inside(client):
        rcv_nxt, last_tsval = closed_by_the_server(listener, TW_PORT)
        closed_by_the_server(listener, TW_PORT + 1)
        with socket.create_connection((VIPS[0], 80), source_address=(CLIENT4, TW_PORT + 2)), \
                listener.accept()[0]:
            time.sleep(0.05)
            assert server_states(farm[0]) == {TW_PORT: "TIME-WAIT", TW_PORT + 1: "TIME-WAIT",
                                              TW_PORT + 2: "ESTAB"}
            yield farm, rcv_nxt, last_tsval


def validated_ack(monkeypatch, plane: DataPlane, farm, isn: int, tsval: int | None, payload: bytes = b"",
                  port: int = TW_PORT, trailer: bytes = b"") -> bytes:
    """The client's handshake ACK for a new connection from the TIME_WAIT tuple (or, with a payload, the
    request right behind it), its cookie valid now; in a frame to the farm interface's address (the RST
    the program sends at its ingress must be for this host). ``trailer``: bytes the frame carries past the
    inner packet's IP length (no front sends them; the MAC does not cover them)."""
    schedule = SaltSchedule((SECRET,))
    now = time.time()
    set_clock(monkeypatch, plane, now)
    plane.refresh_salts(schedule, now)
    epoch = schedule.current_epoch(now)
    cookie = make_cookie(derive_salt(SECRET, epoch), epoch, ipaddress.ip_address(CLIENT4).packed,
                         ipaddress.ip_address(VIPS[0]).packed, port, 80, isn,
                         SynOptions(mss=1460, wscale=7, sack=True, ecn=False))
    options = [("NOP", None), ("NOP", None), ("Timestamp", (tsval, 1))] if tsval is not None else []
    segment = TCP(sport=port, dport=80, flags="PA" if payload else "A", seq=(isn + 1) % 2**32,
                  ack=(cookie + 1) % 2**32, options=options) / Raw(payload)
    return farm[2] + encapsulated(raw(IP(src=CLIENT4, dst=VIPS[0]) / segment) + trailer)[6:]


def as_received(out: bytes, packet: bytes) -> bool:
    """Is ``out`` ``packet`` encapsulated again as it came: the outer addresses, and all after the outer
    IPv4 header (UDP, the synproxy header with its MAC, the inner packet)?"""
    outer_addresses, outer_end = slice(ETH_HEADER + 12, ETH_HEADER + 20), ETH_HEADER + 20
    return (out[:12], out[outer_addresses], out[outer_end:]) == (packet[:12], packet[outer_addresses],
                                                                  packet[outer_end:])


RECYCLE_OWNER_MARK = 0x52435943  # bpf/backend.bpf.c: the mark of the owner's copy queued behind its RST
SK_BUFF_MARK_IFINDEX = struct.Struct("=8xI28xI")  # struct __sk_buff's mark, and its ifindex


def marked(farm) -> bytes:
    """The context of the owner's queued copy: the farm interface, the program's mark."""
    return SK_BUFF_MARK_IFINDEX.pack(RECYCLE_OWNER_MARK, SK_BUFF_IFINDEX.unpack(farm[1])[0])


def decapsulated(packet: bytes) -> bytes:
    """``packet`` (inner IPv4) without its encapsulation, in the Ethernet header it came in."""
    return packet[:12] + b"\x08\x00" + packet[ETH_HEADER + encap.OVERHEAD:]


def dead_soon(name: str, port: int) -> bool:
    """Is the server's socket to CLIENT4:port gone (the RST is processed in a softirq: give it a moment)?"""
    deadline = time.monotonic() + 1
    while port in server_states(name) and time.monotonic() < deadline:
        time.sleep(0.01)
    return port not in server_states(name)


RECYCLE_WINDOW = 0.002  # RECYCLE_WINDOW_US in bpf/backend.bpf.c: a sequence must run within it


def within_the_recycle_window(monkeypatch, plane: DataPlane, order: tuple[str, ...], rfc1337: int = 0,
                              attempts: int = 5, request_trailer: bytes = b""):
    """On a fresh TIME_WAIT socket, the ACK and the request behind it (same sequence number) run in the
    ``order`` a race can bring them ("ack" first; "request": the request, as on another CPU; "queued ack":
    the copy the ACK's run queued again, in its mark; "marked request", "marked other ack": the request
    decapsulated, and that copy with another ack, both in the mark). Repeated until one attempt runs within
    the recycle window (a descheduled test would see it expire). Returns the ACK and the request, each run's verdict and packet,
    and the counters that moved over them all."""
    for _ in range(attempts):
        with server_side_time_wait(rfc1337) as (farm, rcv_nxt, _):
            isn = (rcv_nxt + 1000) % 2**32
            packets = {"ack": validated_ack(monkeypatch, plane, farm, isn, None),
                       "request": validated_ack(monkeypatch, plane, farm, isn, None, b"GET / HTTP/1.0\r\n\r\n",
                                                trailer=request_trailer)}
            before = read_counters(plane.counters, plane.kfunc_errors)
            runs = []
            with netns.inside(farm[0]):
                started = time.monotonic()
                for name in order:
                    context = farm[1] if name in ("ack", "request") else marked(farm)
                    runs.append(prog_test_run(plane.prog_fd, packets[name], context=context))
                    packets.setdefault("queued ack", runs[0][1])
                    packets.setdefault("marked request", decapsulated(packets["request"]))
                    packets.setdefault("marked other ack", other_ack(runs[0][1]))
                elapsed = time.monotonic() - started
            after = read_counters(plane.counters, plane.kfunc_errors)
            if elapsed < RECYCLE_WINDOW:
                changed = {key: after[key] - before[key] for key in COUNTERS if after[key] != before[key]}
                return packets["ack"], packets["request"], runs, changed
    pytest.fail(f"no attempt of {attempts} ran within {RECYCLE_WINDOW} s")


def test_a_segment_queued_again_keeps_in_its_outer_lengths_all_it_carries(monkeypatch, plane):
    """A request carrying bytes past its IP length, queued again while the ACK's recycle is under way, comes
    out with outer lengths of all it carries: with the inner length field's, its next run would find the outer
    header unsound and drop it as malformed."""
    _, request, runs, changed = within_the_recycle_window(monkeypatch, plane, ("ack", "request"),
                                                          request_trailer=bytes(6))
    verdict, queued = runs[1]
    assert verdict == TC_ACT_REDIRECT and as_received(queued, request)
    assert struct.unpack_from("!H", queued, ETH_HEADER + 2)[0] == len(queued) - ETH_HEADER
    assert "malformed" not in changed


def test_the_request_behind_the_ack_waits_for_the_acks_connection_and_never_makes_its_own(monkeypatch, plane):
    """The race the recycle must not have: the request right behind the ACK (on another CPU) meets the
    listener after the RST and before the re-queued ACK made the connection. It is queued again, as it came,
    as long as the ACK, the recycle's owner, may still make that connection: a second connection made from
    the request would race the ACK's, and the loser is dropped (the request: 200 ms to its retransmission).
    The ACK is queued decapsulated, its checks done: its copy's run is no second decapsulation. Here the
    owner's kfunc fails (BPF_PROG_TEST_RUN runs outside tc's ingress), which ends the wait: the request then
    tries itself."""
    ack, request, runs, changed = within_the_recycle_window(
        monkeypatch, plane, ("ack", "request", "request", "queued ack", "request"))
    assert [verdict for verdict, _ in runs] == [TC_ACT_REDIRECT, TC_ACT_REDIRECT, TC_ACT_REDIRECT, TC_ACT_OK, TC_ACT_OK]
    assert runs[0][1] == decapsulated(ack) and as_received(runs[1][1], request) and as_received(runs[2][1], request)
    assert changed == {"decapsulated": 4, "time_wait_recycled": 1, "kfunc_failed": 2}, \
        "only the owner tried, until it failed"


def test_where_the_rst_cannot_kill_rfc_1337_the_recycle_falls_back_to_the_loader(monkeypatch, plane):
    """With net.ipv4.tcp_rfc1337=1 the kernel ignores the RST: the re-queued ACK meets the TIME_WAIT socket
    again and is reported to the loader (which destroys the socket and re-injects); the request, which
    waited while the RST could still work, is reported after it, in that order."""
    reported = []
    ring = RingBuffer(plane.time_wait, reported.append)
    try:
        ack, request, runs, changed = within_the_recycle_window(
            monkeypatch, plane, ("ack", "request", "queued ack", "request"), rfc1337=1)
        ring.poll(0)
    finally:
        ring.close()
    assert [verdict for verdict, _ in runs] == [TC_ACT_REDIRECT, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_SHOT]
    assert changed == {"decapsulated": 3, "time_wait_recycled": 1}
    events = [TimeWaitEvent.unpack(record) for record in reported]
    assert [event.packet for event in events] == [ack[ETH_HEADER + encap.OVERHEAD:],
                                                  request[ETH_HEADER + encap.OVERHEAD:]]
    assert not any(event.reinjected for event in events)
    assert as_received(bytes(12) + reinjection_frame(events[0])[12:], bytes(12) + ack[12:]), \
        "the loader encapsulates it again as it came"


REQUEST_PORT = 41100


@contextlib.contextmanager
def server_side_request(tsval: int):
    """A SYN from CLIENT4:REQUEST_PORT straight to the server (timestamp ``tsval``), whose client never
    answers the SYN-ACK (its RSTs dropped): the server keeps a request socket for the tuple, as a backend
    does after a client gave up on a direct SYN before fronts were put in front of it. Beside it, a request
    socket from REQUEST_PORT + 1 that recycling this one must leave alone. Yields `farm`."""
    with client_and_server({}) as (farm, client, _):
        netns.run(client, ["iptables", "-A", "OUTPUT", "-p", "tcp", "--tcp-flags", "RST", "RST", "-j", "DROP"])
        with netns.inside(client), socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sender:
            for port in (REQUEST_PORT, REQUEST_PORT + 1):
                syn = IP(src=CLIENT4, dst=VIPS[0]) / TCP(sport=port, dport=80, flags="S", seq=0x1000_0000,
                                                         options=[("MSS", 1460), ("Timestamp", (tsval, 0))])
                sender.sendto(raw(syn), (VIPS[0], 0))
        time.sleep(0.05)
        assert server_states(farm[0]) == {REQUEST_PORT: "SYN-RECV", REQUEST_PORT + 1: "SYN-RECV"}
        yield farm


@pytest.mark.parametrize("timestamps", ["none", "older than the syn's"])
def test_a_validated_ack_resets_a_stale_request_socket_of_its_tuple_and_is_queued_behind_the_rst(
        monkeypatch, plane, timestamps):
    """The request socket a direct SYN left would hand the new connection's ACK (another ISN) to the
    listener, which resets it, and the kfunc's connection could not be inserted next to it. The ACK sends it
    an in-window RST, its TSval the SYN's and its TSecr 0 (tcp_check_req checks a RST's timestamps too: the
    ACK's TSval, older here, fails PAWS, and its TSecr, the front's clock, is none of the request's SYN-ACK
    TSvals), and is queued again behind it, decapsulated and marked; the copy queued meets the listener (where
    the kfunc fails: BPF_PROG_TEST_RUN runs outside tc's ingress)."""
    syn_tsval = 0x7000_0000
    with server_side_request(syn_tsval) as farm:
        ack = validated_ack(monkeypatch, plane, farm, 0x2000_0000, syn_tsval - 1000 if timestamps != "none" else None,
                            port=REQUEST_PORT)
        before = read_counters(plane.counters, plane.kfunc_errors)
        with netns.inside(farm[0]):  # the queued copy's run right behind, within the recycle's window
            verdict, queued = prog_test_run(plane.prog_fd, ack, context=farm[1])
            verdict_queued = prog_test_run(plane.prog_fd, queued, context=marked(farm))[0]
        after = read_counters(plane.counters, plane.kfunc_errors)
        assert (verdict, verdict_queued) == (TC_ACT_REDIRECT, TC_ACT_OK)
        assert queued == decapsulated(ack)
        assert {key: after[key] - before[key] for key in COUNTERS if after[key] != before[key]} == \
            {"decapsulated": 1, "request_recycled": 1, "kfunc_failed": 1}
        assert dead_soon(farm[0], REQUEST_PORT)
        assert server_states(farm[0]) == {REQUEST_PORT + 1: "SYN-RECV"}


def other_ack(frame: bytes) -> bytes:
    """The decapsulated IPv4 segment ``frame`` with another acknowledgment number (its checksum not kept)."""
    changed = bytearray(frame)
    changed[ETH_HEADER + 20 + 8] ^= 1
    return bytes(changed)


def test_a_marked_segment_is_only_ever_the_owner_of_a_recycle_under_way(monkeypatch, plane):
    """The owner's queued copy skips the checks its first run made, so the mark alone admits nothing: a marked
    segment that is not the owner its tuple's recycle names (another IP length: the request; another ack) is
    dropped. The owner's copy is still its owner after the window (a backlog that held it longer): it meets
    the listener; unmarked, it is plain TCP, passed."""
    _, _, runs, changed = within_the_recycle_window(monkeypatch, plane, ("ack", "marked request", "marked other ack"))
    assert [verdict for verdict, _ in runs] == [TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_SHOT]
    assert changed == {"decapsulated": 1, "time_wait_recycled": 1, "time_wait_unreported": 2}
    time.sleep(RECYCLE_WINDOW)
    with client_and_server({}) as (farm, _, _):
        assert run_in(farm, plane, runs[0][1])[::2] == (TC_ACT_OK, {"passed": 1})
        assert run_in((farm[0], marked(farm), farm[2]), plane, runs[0][1])[::2] == \
            (TC_ACT_OK, {"kfunc_failed": 1})


def sequence_numbers(client: socket.socket) -> tuple[int, int]:
    """An idle connection's next sequence numbers, the client's and the server's (TCP_REPAIR's view of its
    queues): the server's rcv_nxt and snd_nxt."""
    client.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    numbers = []
    for queue in (TCP_SEND_QUEUE, TCP_RECV_QUEUE):
        client.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
        numbers.append(client.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF)
    client.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)
    return numbers[0], numbers[1]


OWN_PORT = TW_PORT + 4


def test_a_validated_segment_of_an_existing_connection_is_passed_without_its_cookie(monkeypatch, plane):
    """A connection of the tuple owns a segment that is its own (its seq within the connection's window: the
    request right behind the ACK that made it, or a later segment whose ack - 1 passed for a cookie), as it owns
    an unflagged one: passed on the encapsulation's MAC alone, the cookie not checked. What the segment
    would make or kill (a connection at the listener, a recycled TIME_WAIT socket) still needs its cookie."""
    with server_side_time_wait() as (farm, rcv_nxt, _), \
            socket.create_connection((VIPS[0], 80), source_address=(CLIENT4, OWN_PORT)) as own:
        own_isn = (sequence_numbers(own)[0] - 1) % 2**32
        for port, isn, expected in ((OWN_PORT, own_isn, (TC_ACT_OK, {"decapsulated": 1, "not_listener": 1})),
                                    (TW_PORT, (rcv_nxt + 1000) % 2**32, (TC_ACT_SHOT, {"decapsulated": 1, "cookie_bad": 1})),
                                    (TW_PORT + 3, 1000, (TC_ACT_SHOT, {"decapsulated": 1, "cookie_bad": 1}))):
            segment = bytearray(validated_ack(monkeypatch, plane, farm, isn, None, b"GET / HTTP/1.0\r\n\r\n",
                                              port=port))
            segment[ETH_HEADER + encap.OVERHEAD + 20 + 8] ^= 0x80  # a cookie bit (the encap MAC covers no ack)
            assert run_in(farm, plane, bytes(segment))[::2] == expected, port


def test_a_validated_ack_meeting_another_connection_of_its_tuple_resets_it_and_is_queued_again(monkeypatch, plane):
    """A client reused its port while the backend kept an earlier connection of it that the client forgot (the
    bench's concurrency-1 abort of 2026-12-01: a socket in CLOSING, made by a kernel handshake before the fronts,
    met a proxied connection's ACK and request, which were delivered to it and hung). Neither the segment's seq
    nor its ack is that connection's: with a valid cookie, the program sends the connection a RST at its
    rcv_nxt, which kills it, and queues the segment again, as for a stale request socket; with a bad cookie the
    segment is dropped and the connection kept."""
    with server_side_time_wait() as (farm, _, _), \
            socket.create_connection((VIPS[0], 80), source_address=(CLIENT4, OWN_PORT)) as own:
        client_next, server_next = sequence_numbers(own)
        isn = (client_next + 0x4000_0000) % 2**32
        while True:  # a cookie (the ack) outside what the connection sent
            ack = validated_ack(monkeypatch, plane, farm, isn, None, port=OWN_PORT)
            if (struct.unpack_from("!I", ack, ETH_HEADER + encap.OVERHEAD + 28)[0] - server_next + 2**24) % 2**32 > 2**25:
                break
            isn = (isn + 1) % 2**32
        forged = bytearray(ack)
        forged[ETH_HEADER + encap.OVERHEAD + 20 + 8] ^= 0x80  # a cookie bit
        assert run_in(farm, plane, bytes(forged))[::2] == (TC_ACT_SHOT, {"decapsulated": 1, "cookie_bad": 1})
        assert server_states(farm[0])[OWN_PORT] == "ESTAB"
        verdict, queued, changed = run_in(farm, plane, ack)
        assert (verdict, changed) == (TC_ACT_REDIRECT, {"decapsulated": 1, "connection_recycled": 1})
        assert queued == decapsulated(ack)
        assert dead_soon(farm[0], OWN_PORT)
