"""Front → backend encapsulation v3 (docs/backend.md): outer IPv4 + UDP + 16-byte synproxy header.

The header carries the flow's previous owner (Beamer's daisy chain: a backend that holds no connection
for a packet passes it on to that backend, maglev.PreviousOwners) and a MAC over the outer addresses,
the inner addresses and ports, the flags and the previous owner, keyed from the master secret, so a
packet forged with a front's address on the farm network gains nothing, and no one without the key can
make a backend chain a packet anywhere.
"""

from __future__ import annotations

import functools
import struct

from siphash24 import siphash24

from synproxy.maglev import NO_OWNER
from synproxy.packet import PROTO_UDP, V4_MAPPED_PREFIX, TcpSegment, build_ip_header
from synproxy.salt import derive_key

MAGIC = 0x5C
VERSION = 3  # byte 2; v2 had zero there, so a v2 backend counts a v3 packet malformed, and the reverse
FLAG_VALIDATED = 0x01  # a handshake ACK whose cookie the front found valid: the backend creates the connection
FLAG_CHAINED = 0x02    # re-encapsulated by the current owner to the previous one: never chained again
HEADER_BYTES = 16
OVERHEAD = 20 + 8 + HEADER_BYTES
ENCAP_KEY_INFO = b"synproxy-encap-key-v1"
_UDP = struct.Struct("!HHHH")
_HEADER = struct.Struct("!BBBx4sQ")
# The MAC's 56-byte message; IPv4 inner addresses enter as ::ffff:a.b.c.d, as in the cookie's message.
_MESSAGE = struct.Struct("!4s4s16s16sHHB3x4s4x")
_MESSAGE_V4 = struct.Struct("!4s4s12s4s12s4sHHB3x4s4x")
MAC_INPUT_BYTES = _MESSAGE.size
_U64 = (1 << 64) - 1


@functools.lru_cache(maxsize=16)
def encap_key(secret: bytes) -> bytes:
    """The SipHash key of the encapsulation's MAC: HKDF-SHA256(secret, info "synproxy-encap-key-v1")."""
    return derive_key(secret, ENCAP_KEY_INFO)


def mac_input(front: bytes, backend: bytes, saddr: bytes, daddr: bytes, sport: int, dport: int,
              flags: int, previous: bytes = NO_OWNER) -> bytes:
    """The 56 bytes the MAC covers (outer addresses 4 bytes each, inner ones 4 or 16, the previous owner)."""
    if len(saddr) == 4:
        return _MESSAGE_V4.pack(front, backend, V4_MAPPED_PREFIX, saddr, V4_MAPPED_PREFIX, daddr, sport, dport,
                                flags, previous)
    return _MESSAGE.pack(front, backend, saddr, daddr, sport, dport, flags, previous)


def encap_mac(key: bytes, message: bytes) -> int:
    """SipHash-2-4's 64-bit output as the kernel's siphash() returns it (the package's intdigest() is
    signed); written big endian."""
    return siphash24(message, key=key).intdigest() & _U64


def _wrap(inner: bytes, source: bytes, destination: bytes, source_port: int, port: int, flags: int,
          previous: bytes, mac: int) -> bytes:
    udp_length = 8 + HEADER_BYTES + len(inner)
    return (build_ip_header(source, destination, PROTO_UDP, udp_length) + _UDP.pack(source_port, port, udp_length, 0)
            + _HEADER.pack(MAGIC, flags, VERSION, previous, mac) + inner)


def encapsulate(inner: bytes, segment: TcpSegment, front: bytes, backend: bytes, port: int, flow_hash: int,
                validated: bool, key: bytes, previous: bytes = NO_OWNER) -> bytes:
    """Wrap ``inner`` (parsed as ``segment``) for ``backend``, naming the flow's ``previous`` owner,
    MACed with ``key``; the UDP source port carries the flow hash so the farm network can spread flows."""
    flags = FLAG_VALIDATED if validated else 0
    mac = encap_mac(key, mac_input(front, backend, segment.saddr, segment.daddr, segment.sport, segment.dport,
                                   flags, previous))
    return _wrap(inner, front, backend, 0xC000 | (flow_hash & 0x3FFF), port, flags, previous, mac)


def chain(packet: bytes, segment: TcpSegment, key: bytes) -> bytes:
    """What a backend sends on for an encapsulated ``packet`` (outer IPv4 onwards; ``segment`` its inner
    segment) it holds no connection for: the same inner packet, UDP ports and previous owner, from
    itself (the outer destination) to the previous owner, flagged CHAINED, MACed anew with ``key``."""
    backend, previous = packet[16:20], packet[32:36]
    source_port, port = _UDP.unpack_from(packet, 20)[:2]
    flags = packet[29] | FLAG_CHAINED
    mac = encap_mac(key, mac_input(backend, previous, segment.saddr, segment.daddr, segment.sport, segment.dport,
                                   flags, previous))
    return _wrap(packet[OVERHEAD:], backend, previous, source_port, port, flags, previous, mac)
