"""The few BGP-4 messages a front needs to announce and withdraw its VIPs (RFC 4271, 4760, 6793), as
pure functions over bytes; synproxy/front/announce.py owns the sockets and the clock.

A front only announces: it sends OPEN (multiprotocol IPv4 and IPv6 unicast, four-octet AS), KEEPALIVE,
UPDATE (IPv4 NLRI with NEXT_HOP, IPv6 in MP_REACH_NLRI / MP_UNREACH_NLRI) and NOTIFICATION, and reads the
peer's OPEN, KEEPALIVE and NOTIFICATION; the routes the peer sends are ignored.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

MARKER = b"\xff" * 16
HEADER = struct.Struct("!16sHB")
OPEN, UPDATE, NOTIFICATION, KEEPALIVE = 1, 2, 3, 4
MAX_MESSAGE = 4096
AS_TRANS = 23456            # RFC 6793: the two-octet stand-in for a four-octet AS
AFI_IPV4, AFI_IPV6, SAFI_UNICAST = 1, 2, 1
CAP_MULTIPROTOCOL, CAP_FOUR_OCTET_AS = 1, 65
ORIGIN_IGP = 0
ATTR_ORIGIN, ATTR_AS_PATH, ATTR_NEXT_HOP, ATTR_MP_REACH, ATTR_MP_UNREACH = 1, 2, 3, 14, 15
TRANSITIVE, OPTIONAL, EXTENDED_LENGTH = 0x40, 0x80, 0x10
AS_SEQUENCE = 2
# NOTIFICATION codes used here (RFC 4271 section 4.5, RFC 4486).
HOLD_TIMER_EXPIRED, CEASE, ADMINISTRATIVE_SHUTDOWN = 4, 6, 2

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class BgpError(ValueError):
    """The peer sent something this speaker cannot follow; the session is reset."""


@dataclass(frozen=True)
class Open:
    peer_as: int          # the four-octet AS when the peer announced the capability
    hold_time: int
    router_id: ipaddress.IPv4Address
    four_octet_as: bool
    families: frozenset[int]  # AFIs of the unicast SAFIs the peer supports


def message(kind: int, body: bytes = b"") -> bytes:
    return HEADER.pack(MARKER, HEADER.size + len(body), kind) + body


def keepalive() -> bytes:
    return message(KEEPALIVE)


def notification(code: int, subcode: int = 0) -> bytes:
    return message(NOTIFICATION, bytes((code, subcode)))


def _capability(code: int, value: bytes) -> bytes:
    return bytes((code, len(value))) + value


def open_message(local_as: int, hold_time: int, router_id: ipaddress.IPv4Address) -> bytes:
    capabilities = b"".join(_capability(CAP_MULTIPROTOCOL, struct.pack("!HBB", afi, 0, SAFI_UNICAST))
                            for afi in (AFI_IPV4, AFI_IPV6))
    capabilities += _capability(CAP_FOUR_OCTET_AS, struct.pack("!I", local_as))
    parameters = bytes((2, len(capabilities))) + capabilities  # one Capabilities parameter (RFC 5492)
    return message(OPEN, struct.pack("!BHH4sB", 4, local_as if local_as < 65536 else AS_TRANS, hold_time,
                                     router_id.packed, len(parameters)) + parameters)


def parse_open(body: bytes) -> Open:
    if len(body) < 10:
        raise BgpError("OPEN too short")
    version, two_octet_as, hold_time, router_id, length = struct.unpack_from("!BHH4sB", body)
    if version != 4:
        raise BgpError(f"BGP version {version}")
    if hold_time in (1, 2):
        raise BgpError(f"hold time {hold_time} (0 or at least 3)")
    peer_as, families, four_octet = two_octet_as, set(), False
    parameters = body[10:10 + length]
    while len(parameters) >= 2:
        kind, size = parameters[0], parameters[1]
        value, parameters = parameters[2:2 + size], parameters[2 + size:]
        while kind == 2 and len(value) >= 2:
            code, size = value[0], value[1]
            capability, value = value[2:2 + size], value[2 + size:]
            if code == CAP_FOUR_OCTET_AS and len(capability) == 4:
                peer_as, four_octet = struct.unpack("!I", capability)[0], True
            elif code == CAP_MULTIPROTOCOL and len(capability) == 4:
                afi, _, safi = struct.unpack("!HBB", capability)
                if safi == SAFI_UNICAST:
                    families.add(afi)
    return Open(peer_as, hold_time, ipaddress.IPv4Address(router_id), four_octet,
                frozenset(families or {AFI_IPV4}))  # no capability: IPv4 unicast only (RFC 4760)


class Reader:
    """Splits a byte stream into (type, body) messages."""

    def __init__(self):
        self.buffer = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buffer += data
        messages = []
        while len(self.buffer) >= HEADER.size:
            marker, length, kind = HEADER.unpack_from(self.buffer)
            if marker != MARKER or not HEADER.size <= length <= MAX_MESSAGE:
                raise BgpError("bad message header")
            if len(self.buffer) < length:
                break
            messages.append((kind, self.buffer[HEADER.size:length]))
            self.buffer = self.buffer[length:]
        return messages


def _attribute(flags: int, code: int, value: bytes) -> bytes:
    if len(value) > 255:
        return struct.pack("!BBH", flags | EXTENDED_LENGTH, code, len(value)) + value
    return struct.pack("!BBB", flags, code, len(value)) + value


def _prefixes(networks: list[Network]) -> bytes:
    return b"".join(bytes((n.prefixlen,)) + n.network_address.packed[:(n.prefixlen + 7) // 8] for n in networks)


def _update(withdrawn: bytes, attributes: bytes, nlri: bytes = b"") -> bytes:
    return message(UPDATE, struct.pack("!H", len(withdrawn)) + withdrawn + struct.pack("!H", len(attributes))
                   + attributes + nlri)


def announcements(networks: list[Network], local_as: int, four_octet_as: bool,
                  next_hop: ipaddress.IPv4Address, next_hop6: ipaddress.IPv6Address | None) -> list[bytes]:
    """The UPDATEs announcing ``networks`` from this AS: one for the IPv4 ones, one for the IPv6 ones
    (which need ``next_hop6``)."""
    as_path = (struct.pack("!BBI", AS_SEQUENCE, 1, local_as) if four_octet_as
               else struct.pack("!BBH", AS_SEQUENCE, 1, local_as if local_as < 65536 else AS_TRANS))
    common = _attribute(TRANSITIVE, ATTR_ORIGIN, bytes((ORIGIN_IGP,))) + _attribute(TRANSITIVE, ATTR_AS_PATH,
                                                                                     as_path)
    updates = []
    ipv4 = [n for n in networks if n.version == 4]
    ipv6 = [n for n in networks if n.version == 6]
    if ipv4:
        updates.append(_update(b"", common + _attribute(TRANSITIVE, ATTR_NEXT_HOP, next_hop.packed),
                               _prefixes(ipv4)))
    if ipv6:
        if next_hop6 is None:
            raise ValueError("announcing IPv6 needs an IPv6 next hop")
        reach = struct.pack("!HBB", AFI_IPV6, SAFI_UNICAST, 16) + next_hop6.packed + b"\x00" + _prefixes(ipv6)
        updates.append(_update(b"", common + _attribute(OPTIONAL, ATTR_MP_REACH, reach)))
    return updates


def withdrawals(networks: list[Network]) -> list[bytes]:
    """The UPDATEs withdrawing ``networks``: IPv4 in Withdrawn Routes, IPv6 in MP_UNREACH_NLRI."""
    updates = []
    ipv4 = [n for n in networks if n.version == 4]
    ipv6 = [n for n in networks if n.version == 6]
    if ipv4:
        updates.append(_update(_prefixes(ipv4), b""))
    if ipv6:
        unreach = struct.pack("!HB", AFI_IPV6, SAFI_UNICAST) + _prefixes(ipv6)
        updates.append(_update(b"", _attribute(OPTIONAL, ATTR_MP_UNREACH, unreach)))
    return updates
