"""Parse and build IPv4/IPv6 + TCP packets: pure functions over bytes.

Malformed input raises :class:`MalformedPacket` (with a short reason usable as a metric label) and
nothing else, so a caller handling untrusted packets catches exactly one exception type.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = (1 << i for i in range(8))
PROTO_TCP = 6
PROTO_UDP = 17

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_TIMESTAMP = struct.Struct("!II")
_MSS = struct.Struct("!BBH")

OPT_END, OPT_NOP, OPT_MSS, OPT_WSCALE, OPT_SACK_PERMITTED, OPT_TIMESTAMP = 0, 1, 2, 3, 4, 8
_OPTION_LENGTHS = {OPT_MSS: 4, OPT_WSCALE: 3, OPT_SACK_PERMITTED: 2, OPT_TIMESTAMP: 10}


class MalformedPacket(ValueError):
    """The bytes are not a packet this proxy can handle; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TcpOptions(NamedTuple):
    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    timestamp: tuple[int, int] | None = None  # (TSval, TSecr)


class TcpSegment(NamedTuple):
    """The fields of an IP + TCP packet the proxy acts on; options stay unparsed until asked for."""

    family: int
    saddr: bytes
    daddr: bytes
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    ttl: int
    raw_options: bytes
    payload_length: int


def internet_checksum(data: bytes) -> int:
    """RFC 1071 checksum; the one's-complement sum of 16-bit words is the big integer mod 0xFFFF."""
    if len(data) % 2:
        data += b"\0"
    value = int.from_bytes(data, "big")
    folded = value % 0xFFFF
    if folded == 0 and value:
        folded = 0xFFFF
    return ~folded & 0xFFFF


def _pseudo_header(saddr: bytes, daddr: bytes, protocol: int, length: int) -> bytes:
    if len(saddr) == 4:
        return saddr + daddr + struct.pack("!BBH", 0, protocol, length)
    return saddr + daddr + struct.pack("!IxxxB", length, protocol)


def transport_checksum(saddr: bytes, daddr: bytes, protocol: int, segment: bytes) -> int:
    return internet_checksum(_pseudo_header(saddr, daddr, protocol, len(segment)) + segment)


def tcp_checksum_valid(packet: bytes, segment: TcpSegment) -> bool:
    """Whether the TCP checksum holds (the kernel checks it only at local delivery, after NFQUEUE)."""
    if segment.family == 4:
        start, end = (packet[0] & 0xF) * 4, int.from_bytes(packet[2:4], "big")
    else:
        start, end = 40, 40 + int.from_bytes(packet[4:6], "big")
    return transport_checksum(segment.saddr, segment.daddr, PROTO_TCP, packet[start:end]) == 0


def parse_tcp(packet: bytes) -> TcpSegment:
    """Parse an IPv4 or IPv6 packet carrying TCP (no IPv6 extension headers, no fragments)."""
    if not packet:
        raise MalformedPacket("truncated_ip")
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < 20:
            raise MalformedPacket("truncated_ip")
        vihl, _tos, total, _ident, frag, ttl, proto, _csum, saddr, daddr = _IPV4.unpack_from(packet)
        header = (vihl & 0xF) * 4
        if header < 20 or total < header or total > len(packet):
            raise MalformedPacket("bad_ip_length")
        if frag & 0x3FFF:
            raise MalformedPacket("fragment")
        family = 4
    elif version == 6:
        if len(packet) < 40:
            raise MalformedPacket("truncated_ip")
        _vtcfl, payload, proto, ttl, saddr, daddr = _IPV6.unpack_from(packet)
        header = 40
        total = header + payload
        if total > len(packet):
            raise MalformedPacket("bad_ip_length")
        family = 6
    else:
        raise MalformedPacket("bad_ip_version")
    if proto != PROTO_TCP:
        raise MalformedPacket("not_tcp")
    if total - header < 20:
        raise MalformedPacket("truncated_tcp")
    sport, dport, seq, ack, offset_byte, flags, window, _csum, _urg = _TCP.unpack_from(packet, header)
    tcp_header = (offset_byte >> 4) * 4
    if tcp_header < 20 or header + tcp_header > total:
        raise MalformedPacket("bad_tcp_offset")
    return TcpSegment(family, saddr, daddr, sport, dport, seq, ack, flags, window, ttl,
                      packet[header + 20:header + tcp_header], total - header - tcp_header)


def parse_tcp_options(raw: bytes) -> TcpOptions:
    """Read MSS, window scale, SACK-permitted and timestamps; skip unknown options safely."""
    mss = wscale = timestamp = None
    sack = False
    i, end = 0, len(raw)
    while i < end:
        kind = raw[i]
        if kind == OPT_END:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            raise MalformedPacket("bad_tcp_option")
        length = raw[i + 1]
        if length < 2 or i + length > end:
            raise MalformedPacket("bad_tcp_option")
        expected = _OPTION_LENGTHS.get(kind)
        if expected is not None and length != expected:
            raise MalformedPacket("bad_tcp_option")
        if kind == OPT_MSS:
            mss = int.from_bytes(raw[i + 2:i + 4], "big")
        elif kind == OPT_WSCALE:
            wscale = raw[i + 2]
        elif kind == OPT_SACK_PERMITTED:
            sack = True
        elif kind == OPT_TIMESTAMP:
            timestamp = _TIMESTAMP.unpack_from(raw, i + 2)
        i += length
    return TcpOptions(mss, wscale, sack, timestamp)


def build_tcp_options(options: TcpOptions) -> bytes:
    """Options in the order Linux sends them, padded with NOPs to a multiple of four bytes."""
    parts = []
    if options.mss is not None:
        parts.append(_MSS.pack(OPT_MSS, 4, options.mss))
    if options.timestamp is not None:
        prefix = b"\x04\x02" if options.sack_permitted else b"\x01\x01"
        parts.append(prefix + b"\x08\x0a" + _TIMESTAMP.pack(*options.timestamp))
    elif options.sack_permitted:
        parts.append(b"\x01\x01\x04\x02")
    if options.wscale is not None:
        parts.append(bytes((OPT_NOP, OPT_WSCALE, 3, options.wscale)))
    return b"".join(parts)


def build_ip_header(saddr: bytes, daddr: bytes, protocol: int, payload_length: int,
                    ttl: int = 64) -> bytes:
    """An IPv4 header (DF set, no options, with checksum) or an IPv6 header, by address length."""
    if len(saddr) == 4:
        header = _IPV4.pack(0x45, 0, 20 + payload_length, 0, 0x4000, ttl, protocol, 0, saddr, daddr)
        checksum = internet_checksum(header)
        return header[:10] + checksum.to_bytes(2, "big") + header[12:]
    return _IPV6.pack(6 << 28, payload_length, protocol, ttl, saddr, daddr)


def build_tcp_packet(saddr: bytes, daddr: bytes, sport: int, dport: int, seq: int, ack: int,
                     flags: int, window: int, options: bytes = b"", payload: bytes = b"") -> bytes:
    """A whole IP + TCP packet with correct checksums; ``options`` must be a multiple of 4 bytes."""
    offset_byte = (5 + len(options) // 4) << 4
    tcp = _TCP.pack(sport, dport, seq, ack, offset_byte, flags, window, 0, 0) + options + payload
    checksum = transport_checksum(saddr, daddr, PROTO_TCP, tcp)
    tcp = tcp[:16] + checksum.to_bytes(2, "big") + tcp[18:]
    return build_ip_header(saddr, daddr, PROTO_TCP, len(tcp)) + tcp
