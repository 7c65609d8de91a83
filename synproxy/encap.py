"""Front → backend encapsulation v3 (docs/backend.md): outer IPv4 + UDP + 20-byte synproxy header.

The header carries the flow's former owners, previous and earlier (Beamer's daisy chain, two deep: a
backend that holds no connection for a packet passes it on to them in turn, maglev.PreviousOwners) and
a MAC over the outer addresses, the inner addresses and ports, the flags and the former owners, keyed
from the master secret, so a packet forged with a front's address on the farm network gains nothing,
and no one without the key can make a backend chain a packet anywhere.
"""

from __future__ import annotations

import functools
import struct

from siphash24 import siphash24

from synproxy.maglev import NO_FORMER_OWNERS, NO_OWNER
from synproxy.packet import PROTO_UDP, V4_MAPPED_PREFIX, IcmpError, TcpSegment, build_ip_header
from synproxy.salt import derive_key

MAGIC = 0x5C
VERSION = 3  # byte 2; v2 had zero there, so a v2 backend counts a v3 packet malformed, and the reverse
FLAG_VALIDATED = 0x01  # a handshake ACK whose cookie the front found valid: the backend creates the connection
FLAG_ICMP = 0x02       # an ICMP error about the flow (the MAC's tuple is the flow's, client to VIP)
FLAG_CHAINED = 0x04    # passed on by a backend to a former owner (next_owner says whether once more)
FLAG_FASTOPEN = 0x08   # a SYN whose TCP Fast Open cookie the front found valid: the backend's stack takes it
HEADER_BYTES = 20
OVERHEAD = 20 + 8 + HEADER_BYTES
ENCAP_KEY_INFO = b"synproxy-encap-key-v1"
_UDP = struct.Struct("!HHHH")
_HEADER = struct.Struct("!BBBx8sQ")
# The MAC's 56-byte message; IPv4 inner addresses enter as ::ffff:a.b.c.d, as in the cookie's message.
_MESSAGE = struct.Struct("!4s4s16s16sHHB3x8s")
_MESSAGE_V4 = struct.Struct("!4s4s12s4s12s4sHHB3x8s")
MAC_INPUT_BYTES = _MESSAGE.size
_U64 = (1 << 64) - 1


@functools.lru_cache(maxsize=16)
def encap_key(secret: bytes) -> bytes:
    """The SipHash key of the encapsulation's MAC: HKDF-SHA256(secret, info "synproxy-encap-key-v1")."""
    return derive_key(secret, ENCAP_KEY_INFO)


def mac_input(front: bytes, backend: bytes, saddr: bytes, daddr: bytes, sport: int, dport: int,
              flags: int, former: bytes = NO_FORMER_OWNERS) -> bytes:
    """The 56 bytes the MAC covers (outer addresses 4 bytes each, inner ones 4 or 16, the former owners:
    previous then earlier, 4 bytes each)."""
    if len(saddr) == 4:
        return _MESSAGE_V4.pack(front, backend, V4_MAPPED_PREFIX, saddr, V4_MAPPED_PREFIX, daddr, sport, dport,
                                flags, former)
    return _MESSAGE.pack(front, backend, saddr, daddr, sport, dport, flags, former)


def encap_mac(key: bytes, message: bytes) -> int:
    """SipHash-2-4's 64-bit output as the kernel's siphash() returns it (the package's intdigest() is
    signed); written big endian."""
    return siphash24(message, key=key).intdigest() & _U64


def _wrap(inner: bytes, source: bytes, destination: bytes, source_port: int, port: int, flags: int,
          former: bytes, mac: int) -> bytes:
    udp_length = 8 + HEADER_BYTES + len(inner)
    return (build_ip_header(source, destination, PROTO_UDP, udp_length) + _UDP.pack(source_port, port, udp_length, 0)
            + _HEADER.pack(MAGIC, flags, VERSION, former, mac) + inner)


def encapsulate(inner: bytes, segment: TcpSegment | IcmpError, front: bytes, backend: bytes, port: int,
                flow_hash: int, validated: bool, key: bytes, former: bytes = NO_FORMER_OWNERS,
                icmp: bool = False, fastopen: bool = False) -> bytes:
    """Wrap ``inner`` (parsed as ``segment``: its flow's addresses and ports) for ``backend``, naming the
    flow's ``former`` owners (previous, earlier), MACed with ``key``; the UDP source port carries the flow
    hash so the farm network can spread flows."""
    flags = (FLAG_VALIDATED if validated else 0) | (FLAG_ICMP if icmp else 0) | (FLAG_FASTOPEN if fastopen else 0)
    mac = encap_mac(key, mac_input(front, backend, segment.saddr, segment.daddr, segment.sport, segment.dport,
                                   flags, former))
    return _wrap(inner, front, backend, 0xC000 | (flow_hash & 0x3FFF), port, flags, former, mac)


def next_owner(flags: int, backend: bytes, former: bytes) -> bytes | None:
    """Where a ``backend`` that holds no connection for a segment (or for the flow an ICMP error quotes)
    passes it on, or None when it is the last hop (which resets a segment within its budget and gives an
    error to its stack): from the front's packet, to the first former owner named that is not itself;
    from a chained one, when it is the previous owner, to the earlier. A packet thus takes at most two
    extra hops, and none back. A handshake (VALIDATED, or a FASTOPEN SYN) is never passed on."""
    previous, earlier = former[:4], former[4:]
    if flags & (FLAG_VALIDATED | FLAG_FASTOPEN):
        return None
    if not flags & FLAG_CHAINED:
        candidates = (previous, earlier)
    elif backend == previous:
        candidates = (earlier,)
    else:
        return None
    return next((owner for owner in candidates if owner not in (NO_OWNER, backend)), None)


def chain(packet: bytes, segment: TcpSegment | IcmpError, key: bytes) -> bytes | None:
    """What a backend sends on for an encapsulated ``packet`` (outer IPv4 onwards; ``segment`` its inner
    segment, or for an ICMP error the flow it quotes) it holds no connection for, or None (next_owner):
    the same inner packet, UDP ports and former owners, from itself (the outer destination) to the next
    owner, flagged CHAINED (an error stays flagged ICMP), MACed anew with ``key``."""
    backend, flags, former = packet[16:20], packet[29], packet[32:40]
    destination = next_owner(flags, backend, former)
    if destination is None:
        return None
    source_port, port = _UDP.unpack_from(packet, 20)[:2]
    flags |= FLAG_CHAINED
    mac = encap_mac(key, mac_input(backend, destination, segment.saddr, segment.daddr, segment.sport, segment.dport,
                                   flags, former))
    return _wrap(packet[OVERHEAD:], backend, destination, source_port, port, flags, former, mac)
