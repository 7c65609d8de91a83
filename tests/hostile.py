"""Malformed and hostile packets of named kinds, fast and reproducible (seeded), for fuzz runs.

Each kind starts from a well-formed SYN or ACK to the protected VIP and breaks one thing, so every
parser branch is reached often; `random_bytes` adds plain garbage.
"""

from __future__ import annotations

import random
import struct

from synproxy import encap
from synproxy.packet import (
    ACK,
    FIN,
    PROTO_UDP,
    RST,
    SYN,
    build_ip_header,
    build_tcp_options,
    build_tcp_packet,
)

VIP4 = bytes([198, 19, 0, 10])
VIP6 = bytes.fromhex("20010db8ffff00000000000000000010")
CLIENT4 = bytes([198, 18, 1, 2])
CLIENT6 = bytes.fromhex("20010db8000100000000000000000002")


def _base(rng: random.Random, flags: int = SYN, family: int = 4, options: bytes | None = None,
          port: int = 80, payload: bytes = b"") -> bytearray:
    saddr, daddr = (CLIENT4, VIP4) if family == 4 else (CLIENT6, VIP6)
    if options is None:
        options = build_tcp_options(1460, rng.randrange(15), True, (rng.getrandbits(32), 0))
    return bytearray(build_tcp_packet(saddr, daddr, rng.randrange(1024, 65536), port, rng.getrandbits(32),
                                      rng.getrandbits(32), flags, 64240, options, payload))


def truncated_ip(rng):
    return bytes(_base(rng)[:rng.randrange(0, 20)])


def truncated_tcp(rng):
    packet = _base(rng)
    return bytes(packet[:rng.randrange(20, 40)])


def ihl_out_of_range(rng):
    packet = _base(rng)
    packet[0] = 0x40 | rng.choice([0, 1, 2, 3, 4, 15, 14])
    return bytes(packet)


def total_length_wrong(rng):
    packet = _base(rng)
    packet[2:4] = struct.pack("!H", rng.choice([0, 19, 39, len(packet) + 1, 65535]))
    return bytes(packet)


def data_offset_out_of_range(rng):
    packet = _base(rng)
    packet[32] = (rng.choice([0, 1, 4, 15]) << 4) | (packet[32] & 0x0F)
    return bytes(packet)


def option_length_bad(rng):
    kind = rng.choice([2, 3, 4, 8, 30, 254])
    length = rng.choice([0, 1, 41, 255])
    options = bytes([kind, length]) + bytes(rng.getrandbits(8) for _ in range(2))
    return bytes(_base(rng, options=options))


def options_garbage(rng):
    options = bytes(rng.getrandbits(8) for _ in range(4 * rng.randrange(1, 11)))
    return bytes(_base(rng, options=options))


def ip_options(rng):
    packet = _base(rng)
    extra = bytes([1, 1, 1, 0]) * rng.randrange(1, 10)
    header = bytearray(packet[:20] + extra)
    header[0] = 0x40 | (len(header) // 4)
    header[2:4] = struct.pack("!H", len(header) + len(packet) - 20)
    return bytes(header + packet[20:])


def fragment(rng):
    packet = _base(rng)
    packet[6:8] = struct.pack("!H", rng.choice([0x2000, 0x0001, 0x2010, 0x1FFF]))
    return bytes(packet)


def bad_flag_combination(rng):
    return bytes(_base(rng, flags=SYN | rng.choice([FIN, RST, ACK, FIN | RST | ACK])))


def wrong_tcp_checksum(rng):
    packet = _base(rng, flags=rng.choice([SYN, ACK]))
    packet[36] ^= 0xFF
    return bytes(packet)


def wrong_ip_checksum(rng):
    """The kernel drops these before PREROUTING; the handler need not check again."""
    packet = _base(rng, flags=rng.choice([SYN, ACK]))
    packet[10] ^= 0xFF
    return bytes(packet)


def other_port(rng):
    return bytes(_base(rng, port=rng.choice([22, 81, 443, 65535])))


def not_tcp(rng):
    packet = _base(rng)
    packet[9] = rng.choice([1, 17, 47, 255])
    return bytes(packet)


def ipv6_broken(rng):
    packet = _base(rng, family=6)
    choice = rng.randrange(3)
    if choice == 0:
        return bytes(packet[:rng.randrange(0, 60)])
    if choice == 1:
        packet[6] = rng.choice([0, 43, 44, 60])  # extension headers
        return bytes(packet)
    packet[4:6] = struct.pack("!H", 65535)
    return bytes(packet)


def random_ack(rng):
    return bytes(_base(rng, flags=ACK, options=b""))


def random_bytes(rng):
    return bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80)))


KINDS = {f.__name__: f for f in (truncated_ip, truncated_tcp, ihl_out_of_range, total_length_wrong,
                                 data_offset_out_of_range, option_length_bad, options_garbage, ip_options,
                                 fragment, bad_flag_combination, wrong_tcp_checksum, wrong_ip_checksum, other_port, not_tcp,
                                 ipv6_broken, random_ack, random_bytes)}


def packets(count: int, seed: int = 7):
    """``count`` (kind, packet) pairs, the kinds in turn."""
    rng = random.Random(seed)
    makers = list(KINDS.items())
    for i in range(count):
        name, make = makers[i % len(makers)]
        yield name, make(rng)


def _flow(packet: bytes) -> tuple[bytes, bytes, int, int] | None:
    """Addresses and ports where the backend program reads them (IPv4: after the IHL's header), whatever
    the rest says; None when the packet is too short to hold them."""
    if packet and packet[0] >> 4 == 6:
        saddr, daddr, start = packet[8:24], packet[24:40], 40
    elif len(packet) >= 20:
        saddr, daddr, start = packet[12:16], packet[16:20], (packet[0] & 0xF) * 4
    else:
        return None
    if len(packet) < max(start, 20) + 4:
        return None
    return saddr, daddr, int.from_bytes(packet[start:start + 2], "big"), int.from_bytes(packet[start + 2:start + 4],
                                                                                        "big")


def encapsulations(count: int, key: bytes, front: bytes, backend: bytes, port: int, seed: int = 11):
    """``count`` (kind, genuine MAC?, encapsulated packet) of the hostile kinds, wrapped as a front would
    (no Ethernet header): half flagged VALIDATED; half carry the MAC of ``key`` (a front relaying them, or
    a leaked key), the others a random one (anyone else on the farm network)."""
    rng = random.Random(seed)
    for i, (kind, packet) in enumerate(packets(count, seed)):
        flags = i & 1
        flow = _flow(packet)
        genuine = bool(i & 2 and flow)
        if genuine:
            mac = encap.encap_mac(key, encap.mac_input(front, backend, *flow, flags))
        else:
            mac = rng.getrandbits(64)
        length = 8 + encap.HEADER_BYTES + len(packet)
        header = struct.pack("!HHHHBBBx8sQ", 0xC000, port, length, 0, encap.MAGIC, flags, encap.VERSION,
                             encap.NO_FORMER_OWNERS, mac)
        yield kind, genuine, build_ip_header(front, backend, PROTO_UDP, length) + header + packet
