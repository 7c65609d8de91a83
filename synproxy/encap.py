"""Front → backend encapsulation v2 (docs/backend.md): outer IPv4 + UDP + 12-byte synproxy header.

The header carries a MAC over the outer addresses, the inner addresses and ports and the flags, keyed
from the master secret, so a packet forged with a front's address on the farm network gains nothing.
"""

from __future__ import annotations

import functools
import struct

from siphash24 import siphash24

from synproxy.packet import PROTO_UDP, V4_MAPPED_PREFIX, IcmpError, TcpSegment, build_ip_header
from synproxy.salt import derive_key

MAGIC = 0x5C
FLAG_VALIDATED = 0x01
FLAG_ICMP = 0x02  # an ICMP error about the flow (the MAC's tuple is the flow's, client to VIP)
HEADER_BYTES = 12
OVERHEAD = 20 + 8 + HEADER_BYTES
ENCAP_KEY_INFO = b"synproxy-encap-key-v1"
_UDP_AND_HEADER = struct.Struct("!HHHHBBHQ")
# The MAC's 48-byte message; IPv4 inner addresses enter as ::ffff:a.b.c.d, as in the cookie's message.
_MESSAGE = struct.Struct("!4s4s16s16sHHB3x")
_MESSAGE_V4 = struct.Struct("!4s4s12s4s12s4sHHB3x")
_U64 = (1 << 64) - 1


@functools.lru_cache(maxsize=16)
def encap_key(secret: bytes) -> bytes:
    """The SipHash key of the encapsulation's MAC: HKDF-SHA256(secret, info "synproxy-encap-key-v1")."""
    return derive_key(secret, ENCAP_KEY_INFO)


def mac_input(front: bytes, backend: bytes, saddr: bytes, daddr: bytes, sport: int, dport: int,
              flags: int) -> bytes:
    """The 48 bytes the MAC covers (outer addresses 4 bytes each, inner ones 4 or 16)."""
    if len(saddr) == 4:
        return _MESSAGE_V4.pack(front, backend, V4_MAPPED_PREFIX, saddr, V4_MAPPED_PREFIX, daddr, sport, dport,
                                flags)
    return _MESSAGE.pack(front, backend, saddr, daddr, sport, dport, flags)


def encap_mac(key: bytes, message: bytes) -> int:
    """SipHash-2-4's 64-bit output as the kernel's siphash() returns it (the package's intdigest() is
    signed); written big endian."""
    return siphash24(message, key=key).intdigest() & _U64


def encapsulate(inner: bytes, segment: TcpSegment | IcmpError, front: bytes, backend: bytes, port: int,
                flow_hash: int, validated: bool, key: bytes, icmp: bool = False) -> bytes:
    """Wrap ``inner`` (parsed as ``segment``: its flow's addresses and ports), MACed with ``key``; the UDP
    source port carries the flow hash so the farm network can spread flows."""
    flags = (FLAG_VALIDATED if validated else 0) | (FLAG_ICMP if icmp else 0)
    mac = encap_mac(key, mac_input(front, backend, segment.saddr, segment.daddr, segment.sport, segment.dport,
                                   flags))
    udp_length = 8 + HEADER_BYTES + len(inner)
    header = _UDP_AND_HEADER.pack(0xC000 | (flow_hash & 0x3FFF), port, udp_length, 0, MAGIC, flags, 0, mac)
    return build_ip_header(front, backend, PROTO_UDP, udp_length) + header + inner
