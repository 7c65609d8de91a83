"""An HTTP request's time to first byte from the lab's client, with or without TCP Fast Open: in round
trips, read from a packet trace on the client's interface, and in milliseconds. Shared by
tests/test_tfo_lab.py and the bench's tfo scenario (benchmarks/fastopen.py)."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import time
from dataclasses import dataclass

from synproxy import netns
from synproxy.lab.topology import HTTP_PORT, VIP, Lab
from synproxy.packet import parse_tcp

TCP_FASTOPEN_CONNECT = 30  # linux/tcp.h; Python's socket module lacks it
ETH_P_ALL = 0x0003
TIMEOUT = 5.0
DOCUMENT = "/1k"  # nginx's static 1 KiB body (synproxy/lab/nginx.py)


@dataclass(frozen=True)
class Request:
    trace: list[tuple[str, int, int]]  # (direction, TCP flags, payload bytes) per segment, in order
    connect_seconds: float             # connect() alone: a handshake's round trip, or nothing with TFO
    first_byte_seconds: float          # from connect() to the first byte of the answer


def traced_request(lab: Lab, fastopen: bool, port: int) -> Request:
    """One HTTP/1.0 GET to nginx on the VIP from the client's ``port`` (TCP_FASTOPEN_CONNECT or a plain
    connect), traced on the client's interface: the segments of the connection in the order they
    crossed it, "out" from the client, "in" to it."""
    client = ipaddress.ip_address(next(h.address for h in lab.hosts if h.name == "client")).packed
    with netns.inside(lab.ns("client")):
        capture = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with capture, sock:
        capture.bind(("eth0", 0))
        capture.settimeout(0.2)
        sock.settimeout(TIMEOUT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fastopen:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
        sock.bind(("0.0.0.0", port))
        started = time.perf_counter()
        sock.connect((VIP, HTTP_PORT))
        connect_seconds = time.perf_counter() - started
        sock.sendall(f"GET {DOCUMENT} HTTP/1.0\r\n\r\n".encode())
        first = sock.recv(65536)
        first_byte_seconds = time.perf_counter() - started
        while first and sock.recv(65536):
            pass
        trace = []
        with contextlib.suppress(TimeoutError):
            while True:
                data = capture.recv(65535)
                if data[0] >> 4 != 4 or data[9] != socket.IPPROTO_TCP:
                    continue
                segment = parse_tcp(data)
                if port not in (segment.sport, segment.dport):
                    continue
                trace.append(("out" if segment.saddr == client else "in", segment.flags, segment.payload_length))
    return Request(trace, connect_seconds, first_byte_seconds)


def round_trips_to_first_byte(trace: list[tuple[str, int, int]]) -> int:
    """Round trips until the response's first byte: the request leaves after as many waits for the
    server as there are runs of its segments before the request's first byte, and its answer takes one
    more. (Order, not time: the server's response and the client's ACK of the SYN-ACK may cross.)"""
    waits, last = 0, None
    for direction, _, payload in trace:
        if direction == "out" and payload:
            return waits + 1
        if direction == "in" and last != "in":
            waits += 1
        last = direction
    raise ValueError(f"no request in {trace}")


def data_in_syn(trace: list[tuple[str, int, int]]) -> bool:
    """Did the connection's first segment, the client's SYN, carry the request?"""
    direction, flags, payload = trace[0]
    return direction == "out" and bool(flags & 0x02) and payload > 0
