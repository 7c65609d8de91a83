"""Front → backend encapsulation (docs/backend.md): outer IPv4 + UDP + 4-byte synproxy header."""

from __future__ import annotations

import struct

from synproxy.packet import PROTO_UDP, build_ip_header

MAGIC = 0x5C
FLAG_VALIDATED = 0x01
OVERHEAD = 20 + 8 + 4
_UDP_AND_HEADER = struct.Struct("!HHHHBBH")


def encapsulate(inner: bytes, front: bytes, backend: bytes, port: int, flow_hash: int,
                validated: bool) -> bytes:
    """Wrap ``inner``; the UDP source port carries the flow hash so the farm network can spread flows."""
    udp_length = 8 + 4 + len(inner)
    source_port = 0xC000 | (flow_hash & 0x3FFF)
    header = _UDP_AND_HEADER.pack(source_port, port, udp_length, 0, MAGIC,
                                  FLAG_VALIDATED if validated else 0, 0)
    return build_ip_header(front, backend, PROTO_UDP, udp_length) + header + inner
