"""Parse and build IPv4/IPv6 + TCP packets, and the ICMP errors about them: pure functions over bytes.

Malformed input raises :class:`MalformedPacket` (with a short reason usable as a metric label) and
nothing else, so a caller handling untrusted packets catches exactly one exception type.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = (1 << i for i in range(8))
PROTO_TCP = 6
PROTO_UDP = 17
V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"  # IPv4 in a 16-byte address field: ::ffff:a.b.c.d

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_IPV4_TCP = struct.Struct("!BBHHHBBH4s4sHHIIBBHHH")
_IPV6_TCP = struct.Struct("!IHBB16s16sHHIIBBHHH")
_TIMESTAMP = struct.Struct("!II")
_MSS = struct.Struct("!BBH")
_TIMESTAMP_OPTION = struct.Struct("!HHII")  # SACK-permitted or two NOPs, then kind 8, length 10, TSval, TSecr
_SACK_BEFORE_TIMESTAMP = {True: 0x0402, False: 0x0101}
_SACK_ALONE = {True: b"\x01\x01\x04\x02", False: b""}

# new_record(Class, values): a NamedTuple without its constructor, which is a Python-level call
# (~300 ns here, a third of that this way). For the per-packet path.
new_record = tuple.__new__

OPT_END, OPT_NOP, OPT_MSS, OPT_WSCALE, OPT_SACK_PERMITTED, OPT_TIMESTAMP = 0, 1, 2, 3, 4, 8
OPT_FASTOPEN, OPT_EXPERIMENTAL = 34, 254     # RFC 7413; RFC 6994's shared experimental kind
FASTOPEN_MAGIC = 0xF989                      # TFO's experiment id under kind 254 (TCPOPT_FASTOPEN_MAGIC)
TCP_FASTOPEN_COOKIE_MIN, TCP_FASTOPEN_COOKIE_MAX = 4, 16
_OPTION_LENGTHS = {OPT_MSS: 4, OPT_WSCALE: 3, OPT_SACK_PERMITTED: 2, OPT_TIMESTAMP: 10}


class MalformedPacket(ValueError):
    """The bytes are not a packet this proxy can handle; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class FastOpen(NamedTuple):
    """A TCP Fast Open option in a SYN or SYN-ACK."""

    cookie: bytes       # b"": a SYN asking for a cookie
    experimental: bool  # kind 254 + magic 0xF989 (pre-RFC clients) rather than kind 34: a reply uses the same


class TcpOptions(NamedTuple):
    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    timestamp: tuple[int, int] | None = None  # (TSval, TSecr)
    fastopen: FastOpen | None = None


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


def checksum_from_sum(value: int) -> int:
    """The Internet checksum (RFC 1071) of data whose 16-bit words add up to ``value`` (any size).

    2**16 is 1 modulo 0xFFFF, so the one's-complement sum is ``value`` mod 0xFFFF: a 32-bit field
    or a whole byte string read as one big integer (an even number of bytes) adds in directly.
    """
    folded = value % 0xFFFF
    if folded == 0 and value:
        folded = 0xFFFF
    return ~folded & 0xFFFF


def _words(data: bytes) -> int:
    """``data`` as an integer of 16-bit words (an odd length is padded with a zero byte)."""
    value = int.from_bytes(data, "big")
    return value << 8 if len(data) % 2 else value


def internet_checksum(data: bytes) -> int:
    return checksum_from_sum(_words(data))


def tcp_checksum_valid(packet: bytes, segment: TcpSegment) -> bool:
    """Whether the TCP checksum holds (the kernel checks it only at local delivery, after NFQUEUE).

    The addresses sit right before the TCP header (unless IPv4 options intervene), so the
    pseudo-header's addresses and the segment are read as one integer.
    """
    if segment.family == 4:
        start, end = (packet[0] & 0xF) * 4, int.from_bytes(packet[2:4], "big")
        words = _words(packet[12:end]) if start == 20 else _words(packet[12:20]) + _words(packet[start:end])
    else:
        start, end = 40, 40 + int.from_bytes(packet[4:6], "big")
        words = _words(packet[8:end])
    return checksum_from_sum(words + PROTO_TCP + end - start) == 0


def tcp_checksum_completed(packet: bytes) -> bytes | None:
    """``packet`` (IPv4 without options, or IPv6, carrying TCP) with a whole TCP checksum, or None when
    its checksum is wrong. A sender that offloads it leaves only the pseudo-header's sum in the field for
    its device to finish (Linux's CHECKSUM_PARTIAL, kept across veth), and such a packet crosses the
    fronts unchanged: completed here; a packet sent again through a packet socket is checked in full."""
    if tcp_checksum_valid(packet, parse_tcp(packet)):
        return packet
    if packet[0] >> 4 == 4:
        start, end, addresses = 20, int.from_bytes(packet[2:4], "big"), packet[12:20]
    else:
        start, end, addresses = 40, 40 + int.from_bytes(packet[4:6], "big"), packet[8:40]
    pseudo_header = _words(addresses) + PROTO_TCP + end - start
    if int.from_bytes(packet[start + 16:start + 18], "big") != ~checksum_from_sum(pseudo_header) & 0xFFFF:
        return None
    unchecked = packet[:start + 16] + bytes(2) + packet[start + 18:end]
    checksum = checksum_from_sum(pseudo_header + _words(unchecked[start:]))
    return unchecked[:start + 16] + checksum.to_bytes(2, "big") + unchecked[start + 18:]


def _ip_header(packet: bytes) -> tuple[int, int, int, int, int, bytes, bytes]:
    """An unfragmented IPv4 or IPv6 packet's version, header length, total length, protocol, TTL (hop
    limit), source and destination, its lengths checked against the bytes there are (IPv6 extension
    headers are not walked: the protocol is the next header's)."""
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
    elif version == 6:
        if len(packet) < 40:
            raise MalformedPacket("truncated_ip")
        _vtcfl, payload, proto, ttl, saddr, daddr = _IPV6.unpack_from(packet)
        header, total = 40, 40 + payload
        if total > len(packet):
            raise MalformedPacket("bad_ip_length")
    else:
        raise MalformedPacket("bad_ip_version")
    return version, header, total, proto, ttl, saddr, daddr


def parse_tcp(packet: bytes) -> TcpSegment:
    """Parse an IPv4 or IPv6 packet carrying TCP (no IPv6 extension headers, no fragments)."""
    family, header, total, proto, ttl, saddr, daddr = _ip_header(packet)
    if proto != PROTO_TCP:
        raise MalformedPacket("not_tcp")
    if total - header < 20:
        raise MalformedPacket("truncated_tcp")
    sport, dport, seq, ack, offset_byte, flags, window, _csum, _urg = _TCP.unpack_from(packet, header)
    tcp_header = (offset_byte >> 4) * 4
    if tcp_header < 20 or header + tcp_header > total:
        raise MalformedPacket("bad_tcp_offset")
    return new_record(TcpSegment, (family, saddr, daddr, sport, dport, seq, ack, flags, window, ttl,
                                   packet[header + 20:header + tcp_header], total - header - tcp_header))


def _fastopen(cookie: bytes, experimental: bool, previous: FastOpen | None) -> FastOpen | None:
    """As Linux's tcp_parse_fastopen_option: an odd length is ignored, a cookie is 4 to 16 bytes, none
    is a request, any other length cancels the option."""
    if len(cookie) % 2:
        return previous
    if not cookie or TCP_FASTOPEN_COOKIE_MIN <= len(cookie) <= TCP_FASTOPEN_COOKIE_MAX:
        return new_record(FastOpen, (cookie, experimental))
    return None


def parse_tcp_options(raw: bytes) -> TcpOptions:
    """Read MSS, window scale, SACK-permitted, timestamps and TCP Fast Open (in both forms); skip unknown
    options safely."""
    mss = wscale = timestamp = fastopen = None
    sack = False
    i, end = 0, len(raw)
    while i < end:
        kind = raw[i]
        if kind == OPT_NOP:
            i += 1
            continue
        if kind == OPT_END:
            break
        if i + 1 >= end:
            raise MalformedPacket("bad_tcp_option")
        length = raw[i + 1]
        if length < 2 or i + length > end or _OPTION_LENGTHS.get(kind, length) != length:
            raise MalformedPacket("bad_tcp_option")
        if kind == OPT_MSS:
            mss = raw[i + 2] << 8 | raw[i + 3]
        elif kind == OPT_TIMESTAMP:
            timestamp = _TIMESTAMP.unpack_from(raw, i + 2)
        elif kind == OPT_WSCALE:
            wscale = raw[i + 2]
        elif kind == OPT_SACK_PERMITTED:
            sack = True
        elif kind == OPT_FASTOPEN:
            fastopen = _fastopen(raw[i + 2:i + length], False, fastopen)
        elif kind == OPT_EXPERIMENTAL and length >= 4 and raw[i + 2] << 8 | raw[i + 3] == FASTOPEN_MAGIC:
            fastopen = _fastopen(raw[i + 4:i + length], True, fastopen)
        i += length
    return new_record(TcpOptions, (mss, wscale, sack, timestamp, fastopen))


def build_tcp_options(mss: int | None = None, wscale: int | None = None, sack_permitted: bool = False,
                      timestamp: tuple[int, int] | None = None, fastopen: FastOpen | None = None) -> bytes:
    """Options in the order Linux sends them, padded with NOPs to a multiple of four bytes.

    Takes TcpOptions' fields (``build_tcp_options(*options)``): the front builds one per SYN.
    """
    if timestamp is not None:
        middle = _TIMESTAMP_OPTION.pack(_SACK_BEFORE_TIMESTAMP[sack_permitted], 0x080A, *timestamp)
    else:
        middle = _SACK_ALONE[sack_permitted]
    return ((b"" if mss is None else _MSS.pack(OPT_MSS, 4, mss)) + middle
            + (b"" if wscale is None else bytes((OPT_NOP, OPT_WSCALE, 3, wscale)))
            + (b"" if fastopen is None else build_fastopen_option(fastopen)))


def build_fastopen_option(fastopen: FastOpen) -> bytes:
    """The option as Linux writes it (tcp_options_write): kind 34, or kind 254 and the magic, then the
    cookie, then two NOPs when the length is 2 mod 4."""
    cookie, experimental = fastopen
    if experimental:
        option = bytes((OPT_EXPERIMENTAL, 4 + len(cookie))) + FASTOPEN_MAGIC.to_bytes(2, "big") + cookie
    else:
        option = bytes((OPT_FASTOPEN, 2 + len(cookie))) + cookie
    return option + bytes((OPT_NOP, OPT_NOP)) * (len(option) % 4 == 2)


def _ip_header_words(addresses: int, protocol: int, total_length: int, ttl: int) -> int:
    """The word sum of the IPv4 header build_ip_header writes (version/IHL 0x45, DF, ID 0);
    ``addresses`` is the source and destination read as one integer."""
    return 0x4500 + total_length + 0x4000 + (ttl << 8 | protocol) + addresses


def build_ip_header(saddr: bytes, daddr: bytes, protocol: int, payload_length: int,
                    ttl: int = 64) -> bytes:
    """An IPv4 header (DF set, no options, with checksum) or an IPv6 header, by address length."""
    if len(saddr) == 4:
        total = 20 + payload_length
        checksum = checksum_from_sum(_ip_header_words(int.from_bytes(saddr + daddr, "big"), protocol, total, ttl))
        return _IPV4.pack(0x45, 0, total, 0, 0x4000, ttl, protocol, checksum, saddr, daddr)
    return _IPV6.pack(6 << 28, payload_length, protocol, ttl, saddr, daddr)


def build_tcp_packet(saddr: bytes, daddr: bytes, sport: int, dport: int, seq: int, ack: int,
                     flags: int, window: int, options: bytes = b"", payload: bytes = b"") -> bytes:
    """A whole IP + TCP packet with correct checksums; ``options`` must be a multiple of 4 bytes.

    The checksums are summed from the field values and the whole packet is packed once: this
    builds every SYN-ACK a front sends.
    """
    offset_byte = (5 + len(options) // 4) << 4
    tcp_length = 20 + len(options) + len(payload)
    addresses = int.from_bytes(saddr + daddr, "big")
    # Each 32-bit field counts as its two words (2**16 is 1 modulo 0xFFFF); the pseudo-header is the
    # addresses, the protocol and the TCP length.
    tcp_checksum = checksum_from_sum((sport << 16 | dport) + seq + ack + ((offset_byte << 8 | flags) << 16 | window)
                                     + _words(options + payload) + addresses + PROTO_TCP + tcp_length)
    if len(saddr) == 4:
        total = 20 + tcp_length
        ip_checksum = checksum_from_sum(_ip_header_words(addresses, PROTO_TCP, total, 64))
        headers = _IPV4_TCP.pack(0x45, 0, total, 0, 0x4000, 64, PROTO_TCP, ip_checksum, saddr, daddr,
                                 sport, dport, seq, ack, offset_byte, flags, window, tcp_checksum, 0)
    else:
        headers = _IPV6_TCP.pack(6 << 28, tcp_length, PROTO_TCP, 64, saddr, daddr,
                                 sport, dport, seq, ack, offset_byte, flags, window, tcp_checksum, 0)
    return headers + options + payload


PROTO_ICMP, PROTO_ICMPV6 = 1, 58
ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED = 3, 4    # RFC 792: "fragmentation needed and DF set"
ICMPV6_PACKET_TOO_BIG = 2                     # RFC 4443 section 3.2
# An ICMP error quotes as much of the offending packet as keeps it within the size every host accepts:
# 576 bytes for IPv4 (RFC 1812 4.3.2.3), the minimum MTU of 1280 for IPv6 (RFC 4443 2.4 (c)).
ICMP_ERROR_MAX_BYTES = {4: 576, 6: 1280}
_ICMP_HEADER = struct.Struct("!BBHI")  # type, code, checksum, then the "rest of header" word


def build_icmp_too_big(packet: bytes, mtu: int) -> bytes:
    """The error a router sends for ``packet`` when its next hop's MTU is ``mtu``: ICMP "fragmentation
    needed" (type 3 code 4, next-hop MTU in the low 16 bits, RFC 1191) for IPv4, ICMPv6 "packet too
    big" (type 2, MTU, RFC 4443) for IPv6; from the packet's destination to its source, quoting the
    packet's start. ``packet`` must be a parsed IPv4 or IPv6 packet (parse_tcp accepted it)."""
    family = packet[0] >> 4
    if family == 4:
        saddr, daddr, protocol, rest = packet[16:20], packet[12:16], PROTO_ICMP, mtu & 0xFFFF
        ip_header = 20
    else:
        saddr, daddr, protocol, rest = packet[24:40], packet[8:24], PROTO_ICMPV6, mtu
        ip_header = 40
    quoted = packet[:ICMP_ERROR_MAX_BYTES[family] - ip_header - _ICMP_HEADER.size]
    kind = (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED) if family == 4 else (ICMPV6_PACKET_TOO_BIG, 0)
    length = _ICMP_HEADER.size + len(quoted)
    words = (kind[0] << 8 | kind[1]) + rest + _words(quoted)
    if family == 6:  # ICMPv6 sums a pseudo-header (RFC 4443 2.3); ICMP does not
        words += int.from_bytes(saddr + daddr, "big") + PROTO_ICMPV6 + length
    message = _ICMP_HEADER.pack(*kind, checksum_from_sum(words), rest) + quoted
    return build_ip_header(saddr, daddr, protocol, length) + message


# The ICMP errors a host's TCP acts on (RFC 1122 4.2.3.9, RFC 4443 3): the path-MTU ones among them.
ICMP_TIME_EXCEEDED = 11
ICMPV6_DEST_UNREACH, ICMPV6_TIME_EXCEEDED = 1, 3
ICMP_ERROR_TYPES = {4: (ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED),
                    6: (ICMPV6_DEST_UNREACH, ICMPV6_PACKET_TOO_BIG, ICMPV6_TIME_EXCEEDED)}
_QUOTED_PORTS = struct.Struct("!HH")


class IcmpError(NamedTuple):
    """An ICMP error about a TCP segment a server sent to a client, named as the flow's own packets are:
    ``saddr``/``sport`` the client, ``daddr``/``dport`` the server (the quoted segment's destination and
    source), so the flow hash and the encapsulation's MAC are the flow's. ``destination`` is the error's
    own (the quoted segment's sender, when a router sent it)."""

    family: int
    saddr: bytes
    daddr: bytes
    sport: int
    dport: int
    destination: bytes
    icmp_type: int


def parse_icmp_error(packet: bytes) -> IcmpError:
    """Parse an ICMP or ICMPv6 error (ICMP_ERROR_TYPES) that quotes a TCP segment's IP header and ports, of
    the packet's own family. Raises MalformedPacket: ``not_icmp_error`` for other ICMP (echo, redirects...)
    and other protocols, else what is wrong with it."""
    version, header, total, proto, _ttl, _saddr, destination = _ip_header(packet)
    wanted = PROTO_ICMP if version == 4 else PROTO_ICMPV6
    if proto != wanted or total - header < _ICMP_HEADER.size or packet[header] not in ICMP_ERROR_TYPES[version]:
        raise MalformedPacket("not_icmp_error")
    quoted = header + _ICMP_HEADER.size
    if total - quoted < 1 or packet[quoted] >> 4 != version:
        raise MalformedPacket("bad_quoted_packet")
    # Where the quoted IP header keeps its length, protocol and addresses, by family.
    if version == 4:
        quoted_header, fixed, proto_at, source_at, length = (packet[quoted] & 0xF) * 4, 20, 9, 12, 4
    else:
        quoted_header, fixed, proto_at, source_at, length = 40, 40, 6, 8, 16
    if total - quoted < fixed or packet[quoted + proto_at] != PROTO_TCP:
        raise MalformedPacket("bad_quoted_packet")
    if version == 4 and int.from_bytes(packet[quoted + 6:quoted + 8], "big") & 0x1FFF:
        raise MalformedPacket("bad_quoted_packet")  # a later fragment: no TCP header where the ports would be
    source = packet[quoted + source_at:quoted + source_at + length]
    target = packet[quoted + source_at + length:quoted + source_at + 2 * length]
    # The quoted header and the first 8 bytes of its TCP header (ports and sequence number: RFC 792).
    if quoted_header < 20 or total - quoted < quoted_header + 8:
        raise MalformedPacket("bad_quoted_packet")
    server_port, client_port = _QUOTED_PORTS.unpack_from(packet, quoted + quoted_header)
    return new_record(IcmpError, (version, target, source, client_port, server_port, destination, packet[header]))
