"""Legitimate lab clients: HTTP requests and echo round trips, with connect times.

`python3 -m synproxy.lab.clients --target VIP --count N` prints one JSON object: successes,
failures, the backends that answered, and connect-time percentiles.
"""

from __future__ import annotations

import argparse
import errno
import json
import socket
import time
from collections.abc import Iterator


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def any_address(target: str) -> str:
    return "::" if ":" in target else "0.0.0.0"


def free_port(ports: Iterator[int] | None, target: str) -> int | None:
    """The next of `ports` no socket holds, or None to let the kernel choose. The kernel hands out its
    ephemeral ports from the same range, so an earlier connection's TIME_WAIT may hold a steered port."""
    if ports is None:
        return None
    for port in ports:
        with socket.socket(socket.AF_INET6 if ":" in target else socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((any_address(target), port))
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    raise
                continue
        return port
    raise OSError("no free source port left")


def connect(target: str, port: int, timeout: float, source_port: int | None) -> socket.socket:
    """A TCP connection, from a chosen source port when the router steers by port."""
    try:
        return socket.create_connection((target, port), timeout=timeout,
                                        source_address=(any_address(target), source_port) if source_port else None)
    except OSError as error:  # say which phase failed: a lost handshake is not a lost answer
        raise OSError(f"connect to port {port}: {error}") from error


def http_get(target: str, port: int, timeout: float, source_port: int | None = None) -> tuple[float, dict]:
    started = time.monotonic()
    with connect(target, port, timeout, source_port) as sock:
        connected = time.monotonic() - started
        sock.sendall(f"GET / HTTP/1.0\r\nHost: {target}\r\n\r\n".encode())
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    if not head.startswith((b"HTTP/1.0 200 ", b"HTTP/1.1 200 ")):  # nginx answers a 1.0 request in 1.1
        raise OSError(f"unexpected answer {head[:40]!r}")
    return connected, json.loads(body)


def echo(target: str, port: int, timeout: float, payload: bytes, source_port: int | None = None) -> float:
    started = time.monotonic()
    with connect(target, port, timeout, source_port) as sock:
        connected = time.monotonic() - started
        sock.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    if received != payload:
        raise OSError("echo answered different bytes")
    return connected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--source-port-from", type=int, default=0,
                        help="bind each connection to the next free port from this one (0: let the kernel choose)")
    args = parser.parse_args()
    ports = iter(range(args.source_port_from, 65536)) if args.source_port_from else None
    connect_times, backends, errors = [], {}, []
    for i in range(args.count):
        try:
            connected, answer = http_get(args.target, 80, args.timeout, free_port(ports, args.target))
            connect_times.append(connected)
            backends[answer["backend"]] = backends.get(answer["backend"], 0) + 1
            connect_times.append(echo(args.target, 7, args.timeout, f"echo {i} ".encode() * 100,
                                      free_port(ports, args.target)))
        except (OSError, ValueError) as error:
            errors.append(str(error))
    print(json.dumps({
        "attempted": 2 * args.count, "completed": len(connect_times), "failed": len(errors),
        "errors": sorted(set(errors))[:5], "backends": backends,
        "connect_p50_ms": round(1000 * percentile(connect_times, 0.5), 2) if connect_times else None,
        "connect_p99_ms": round(1000 * percentile(connect_times, 0.99), 2) if connect_times else None,
    }))


if __name__ == "__main__":
    main()
