"""SO_REUSEPORT listener groups behind the backend's kfunc path (issue 17).

The backend program finds the listener with bpf_skc_lookup_tcp and hangs the request socket on it with
bpf_sk_assign_tcp_reqsk. With a reuseport group the lookup must pick a member per flow, as the kernel
does for a SYN, or one worker would take every connection made from a cookie. The test bed is
tests/test_backend_e2e.py's: a real loader on a veth, validated ACKs encapsulated as a front sends them.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import time
from collections import Counter

import pytest
from scapy.layers.inet import TCP
from scapy.packet import raw

from synproxy import netns
from synproxy.lab import nginx
from tests import test_backend_e2e as e2e
from tests.lab_fixtures import needs_root

pytestmark = [pytest.mark.netns, needs_root]

bed = e2e.bed  # the same module-scoped bed, built afresh for this module

GROUP_PORT = e2e.OVERFLOW_PORT  # protected by the bed's configuration; no listener of its own here
NGINX_PORT = e2e.CLOSED_PORT  # likewise
GROUP_SIZE, GROUP_HANDSHAKES = 4, 256
NGINX_CONNECTIONS = 64
ACCEPT_SECONDS = RESPONSE_SECONDS = 5.0
HTTP_CASE = e2e.Case(4, mss_index=3, wscale=7, sack=True, ecn=False, timestamps=False)


@contextlib.contextmanager
def reuseport_group(bed: e2e.Bed, family: int, size: int):
    """``size`` listeners sharing VIP:GROUP_PORT through SO_REUSEPORT, each with room for every handshake."""
    with contextlib.ExitStack() as stack, netns.inside(bed.backend):
        group = []
        for _ in range(size):
            sock = stack.enter_context(socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6,
                                                     socket.SOCK_STREAM))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((e2e.VIP[family], GROUP_PORT))
            sock.listen(GROUP_HANDSHAKES)
            sock.setblocking(False)
            group.append(sock)
        yield group


def accept_all(group: list[socket.socket], expected: int) -> list[int]:
    """Accept from every member until ``expected`` connections came or time ran out; how many each took.

    Each connection is reset, not closed: the raw client never answers a FIN, and hundreds of orphaned
    connections retransmitting theirs in bursts (at 1, 3, 7 s...) overflowed the next test's capture,
    which then missed nginx's IPv6 answers (257 of 518 frames dropped, PACKET_STATISTICS).
    """
    taken = [0] * len(group)
    deadline = time.monotonic() + ACCEPT_SECONDS
    while sum(taken) < expected and time.monotonic() < deadline:
        for index, listener in enumerate(group):
            with contextlib.suppress(BlockingIOError):
                connection = listener.accept()[0]
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                connection.close()
                taken[index] += 1
        time.sleep(0.001)
    return taken


@pytest.mark.parametrize("family", [4, 6])
def test_validated_acks_spread_over_a_reuseport_group_and_none_is_lost(bed, family):
    case = e2e.CASES[0]._replace(family=family)
    overflows_before = e2e.listen_overflows(bed)
    with reuseport_group(bed, family, GROUP_SIZE) as group:
        handshakes = [e2e.handshake(bed, case, port=GROUP_PORT) for _ in range(GROUP_HANDSHAKES)]
        moved = e2e.counters_after(bed, lambda: [e2e.send_via_front(bed, hs.ack_packet) for hs in handshakes])
        taken = accept_all(group, GROUP_HANDSHAKES)
    print(f"IPv{family}: {GROUP_HANDSHAKES} validated ACKs over {GROUP_SIZE} reuseport listeners -> {taken}")
    assert moved == {"decapsulated": GROUP_HANDSHAKES, "created": GROUP_HANDSHAKES}
    assert sum(taken) == GROUP_HANDSHAKES
    assert e2e.listen_overflows(bed) == overflows_before
    # A uniform pick leaves a member empty with probability 4 * (3/4)^256, about 1e-32.
    assert min(taken) > 0, taken


@pytest.fixture(scope="module")
def nginx_workers(bed, tmp_path_factory):
    """nginx with its default two workers and `reuseport` in the backend namespace (its master process)."""
    config = nginx.prepare(tmp_path_factory.mktemp("nginx"), e2e.VIP[4], e2e.VIP[6], port=NGINX_PORT)
    with open(config.parent / "logs" / "stdout.log", "wb") as output:
        master = nginx.start(bed.backend, config, port=NGINX_PORT, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield master
    finally:
        e2e.stop(master)


def http_get(bed: e2e.Bed, hs: e2e.Handshake, path: str, capture: socket.socket) -> tuple[dict[str, str], bytes]:
    """The client's half of one HTTP/1.1 request over a connection the backend made from a cookie: the
    request segment goes through the front unvalidated, as every later packet does; the response is read
    from the capture, segment by segment in sequence order, until its Content-Length is complete."""
    family = hs.case.family
    request = f"GET {path} HTTP/1.1\r\nHost: {e2e.VIP[4]}\r\n\r\n".encode()
    client_seq, server_seq = (hs.client_isn + 1) % 2**32, (hs.cookie + 1) % 2**32
    segment = raw(e2e._ip(family, e2e.CLIENT[family], e2e.VIP[family])
                  / TCP(sport=hs.sport, dport=NGINX_PORT, flags="PA", seq=client_seq, ack=server_seq,
                        window=65535) / request)
    e2e.send_via_front(bed, segment, validated=False)
    received: dict[int, bytes] = {}
    deadline = time.monotonic() + RESPONSE_SECONDS
    while time.monotonic() < deadline:
        frame = e2e.segment_from_server(bed, hs, lambda f: len(f[TCP].payload) > 0, capture=capture)
        received[(frame[TCP].seq - server_seq) % 2**32] = bytes(frame[TCP].payload)
        stream, offset = b"", 0
        while offset in received:
            stream += received[offset]
            offset += len(received[offset])
        head, separator, content = stream.partition(b"\r\n\r\n")
        if separator:
            lines = head.decode().split("\r\n")
            headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
            headers["status"] = lines[0]
            if len(content) >= int(headers["content-length"]):
                return headers, content
    pytest.fail(f"no complete response to port {hs.sport} within {RESPONSE_SECONDS} s")


@pytest.mark.parametrize("family", [4, 6])
def test_nginx_workers_share_the_connections_made_from_cookies(bed, nginx_workers, family):
    """Each validated ACK becomes a connection one of nginx's two workers accepts; a real HTTP request
    over it gets the whole body back, and both workers answer some."""
    answered_by = Counter()
    with e2e.incoming_capture(bed) as capture:
        for _ in range(NGINX_CONNECTIONS):
            hs = e2e.handshake(bed, HTTP_CASE._replace(family=family), port=NGINX_PORT)
            e2e.send_via_front(bed, hs.ack_packet)
            headers, content = http_get(bed, hs, "/1k", capture)
            assert headers["status"] == "HTTP/1.1 200 OK"
            assert content == nginx.body(nginx.BODY_SIZES["1k"])
            answered_by[headers["x-worker"]] += 1
    print(f"IPv{family}: {NGINX_CONNECTIONS} connections over nginx's workers -> {sorted(answered_by.values())}")
    assert sum(answered_by.values()) == NGINX_CONNECTIONS
    assert len(answered_by) == nginx.WORKERS, answered_by
